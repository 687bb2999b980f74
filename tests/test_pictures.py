"""The pictures read as they should: inpainting rows, the localisation heat map and outlines, training curves."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY

import data
import model
import pictures

PAD = pictures.PAD
TEXT = pictures.TEXT
GREY = (pictures.GREY,) * 3
BLACK = tuple(-m / s for m, s in zip(data.IMAGE_MEAN, data.IMAGE_STD))  # a normalised black pixel


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return model.CAVMAE(model.CAVMAEConfig(**TINY))  # 64 frames x 128 bins, 32 px frames, p = 16


def inpaint(tiny, audio, mask_a, mask_v, pred_a=None):
    """The inpainting picture of a tiny clip and its regions: spectrogram and frame of each row."""
    c = tiny.config
    image = torch.randn(3, c.img_size, c.img_size, generator=torch.Generator().manual_seed(0))
    La = len(mask_a)
    pred_a = torch.zeros(La, c.patch_size**2) if pred_a is None else pred_a
    pred_v = torch.zeros(len(mask_v), 3 * c.patch_size**2)
    picture = pictures.inpaint_picture(tiny, audio, image, mask_a, mask_v, pred_a, pred_v, "clip")
    return np.asarray(picture)


def spectrogram_of(picture, row, T=64, bins=128, P=128):
    y = TEXT + row * (TEXT + max(bins, P)) + TEXT
    return picture[y : y + bins, PAD : PAD + T]


def frame_of(picture, row, T=64, bins=128, P=128):
    y = TEXT + row * (TEXT + max(bins, P)) + TEXT
    return picture[y : y + P, 2 * PAD + T : 2 * PAD + T + P]


def test_inpaint_picture_is_three_rows_of_spectrogram_and_frame_enlarged_to_128_pixels(tiny):
    audio = torch.randn(64, 128)  # (T, F)
    picture = inpaint(tiny, audio, torch.zeros(32), torch.zeros(4))
    T = 64
    P = 4 * 32  # 32 px frames are shown 4 times larger
    assert picture.shape == (TEXT + 3 * (TEXT + max(128, P)), PAD + T + PAD + P + PAD, 3)


def test_spectrogram_shows_time_to_the_right_and_low_frequencies_at_the_bottom(tiny):
    audio = torch.zeros(64, 128)
    audio[:8, :8] = 1.0  # loud: the first frames, the lowest bins
    spectrogram = spectrogram_of(inpaint(tiny, audio, torch.zeros(32), torch.zeros(4)), row=0)
    brightest = tuple(pictures.DARK_TO_BRIGHT[-1])
    assert (spectrogram[-8:, :8] == brightest).all()  # bottom left
    assert not (spectrogram[:-8] == brightest).all(-1).any()


def test_masked_patches_are_grey_in_the_masked_row_only(tiny):
    mask_a = torch.zeros(32)
    mask_a[0] = 1  # the lowest band, the first time step: the bottom-left 16 x 16 of the spectrogram
    mask_v = torch.zeros(4)
    mask_v[0] = 1  # the top-left patch: 64 x 64 pixels of the enlarged frame
    picture = inpaint(tiny, torch.randn(64, 128, generator=torch.Generator().manual_seed(1)), mask_a, mask_v)
    grey_a = (spectrogram_of(picture, 1) == GREY).all(-1)
    grey_v = (frame_of(picture, 1) == GREY).all(-1)
    assert grey_a[-16:, :16].all()
    assert grey_a.sum() == 16 * 16
    assert grey_v[:64, :64].all()
    assert grey_v.sum() == 64 * 64
    assert not (spectrogram_of(picture, 0) == GREY).all(-1).any()  # the original row has none


def test_reconstruction_shows_the_prediction_in_masked_patches_and_the_input_elsewhere(tiny):
    audio = torch.rand(64, 128)  # values in [0, 1)
    mask_a = torch.zeros(32)
    mask_a[0] = 1
    pred_a = torch.full((32, 256), 5.0)  # above the input: the brightest colour
    picture = inpaint(tiny, audio, mask_a, torch.zeros(4), pred_a)
    original = spectrogram_of(picture, 0)
    reconstruction = spectrogram_of(picture, 2)
    assert (reconstruction[-16:, :16] == tuple(pictures.DARK_TO_BRIGHT[-1])).all()
    assert (reconstruction[:-16] == original[:-16]).all()


def black_frame(size=32):
    return torch.tensor(BLACK, dtype=torch.float32)[:, None, None].expand(3, size, size)


def heat_panel(picture, P=128):
    """The heat map panel (P, P, 3) of a localisation picture of a 32 px frame."""
    return np.asarray(picture)[3 * TEXT : 3 * TEXT + P, 2 * PAD + P : 2 * PAD + 2 * P].astype(int)


def test_heat_map_is_red_where_the_similarity_peaks_and_blue_where_it_is_lowest():
    similarity = torch.zeros(4, 4)
    similarity[0, 3] = 1.0  # top right
    similarity[3, 0] = -1.0  # bottom left
    heat = heat_panel(pictures.localization_picture(black_frame(), similarity, "clip"))  # 32 px patches
    top_right = heat[2, 125]
    bottom_left = heat[125, 2]
    assert top_right[0] > 3 * top_right[1:].max()
    assert bottom_left[2] > 3 * bottom_left[:2].max()


def test_outlines_are_drawn_in_their_colours_around_their_masks_on_both_panels():
    square = np.zeros((32, 32), bool)
    square[8:24, 4:12] = True
    disk = np.hypot(*np.mgrid[:32, :32] - 24) < 5
    outlines = [(square, (255, 0, 255)), (disk, (0, 255, 0))]
    similarity = torch.tensor([[0.0, 0.2], [0.4, 1.0]])  # the peak's cross bottom right, off the square
    picture = np.asarray(pictures.localization_picture(black_frame(), similarity, "clip", outlines))
    P = 128
    y = 3 * TEXT
    for x in (PAD, 2 * PAD + P):  # the frame, the heat map
        panel = picture[y : y + P, x : x + P]
        magenta = np.argwhere((panel == (255, 0, 255)).all(-1))
        assert magenta.min(0).tolist() == [4 * 8, 4 * 4]  # the square's corners, 4 times enlarged
        assert magenta.max(0).tolist() == [4 * 24 - 1, 4 * 12 - 1]
        assert len(magenta) < 2 * (64 + 32)  # its boundary, not its inside
        assert (panel == (0, 255, 0)).all(-1).any()


def test_localization_picture_without_outlines_draws_no_outline_colour():
    picture = np.asarray(pictures.localization_picture(black_frame(), torch.rand(2, 2), "clip"))
    assert not (picture == (255, 0, 255)).all(-1).any()


# -----------------------------------------------------------------------------
# train_picture


def pretraining_records():
    records = []
    for it in range(10, 310, 10):
        losses = dict(loss_mae_a=1.0 - it / 1000, loss_mae_v=0.8 - it / 1000, loss_c=0.35 - it / 2000)
        records.append(dict(split="train", iter=it, contrastive_accuracy=it / 600, **losses))
        if it % 100 == 0:
            records.append(dict(split="epoch", iter=it, samples_per_s=100.0))
            records.append(dict(split="val", iter=it, a2v_R1=it / 5000, v2a_R1=it / 4000, **losses))
    records.append(dict(split="final", iter=300, loss_c=0.3, a2v_R1=0.05, v2a_R1=0.08))
    return records


def finetuning_records():
    records = [dict(split="train", iter=it, loss=3.0 / it) for it in range(5, 125, 5)]
    for it in (40, 80, 120):
        records.append(dict(split="val", iter=it, loss=1.0, mAP=it / 200, acc=it / 150))
    records.append(dict(split="final", iter=120, mAP=0.6, acc=0.8, acc_frames=0.82, mAP_frames=0.63))
    return records


def picture_of(tmp_path, records, tail=""):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + tail)
    return pictures.train_picture(str(path))


def panel_colours(picture, k):
    """The colours in panel k."""
    box = (0, TEXT + k * pictures.PANEL_HEIGHT, pictures.PANEL_WIDTH, TEXT + (k + 1) * pictures.PANEL_HEIGHT)
    return {colour for _, colour in picture.crop(box).getcolors(maxcolors=1 << 16)}


def number_of_panels(picture):
    assert picture.width == pictures.PANEL_WIDTH
    assert (picture.height - TEXT) % pictures.PANEL_HEIGHT == 0
    return (picture.height - TEXT) // pictures.PANEL_HEIGHT


def test_pretraining_picture_has_four_panels_with_their_curves(tmp_path):
    picture = picture_of(tmp_path, pretraining_records())
    assert number_of_panels(picture) == 4
    for k in range(4):
        assert pictures.SERIES_COLOURS[0] in panel_colours(picture, k)
    assert pictures.SERIES_COLOURS[1] in panel_colours(picture, 0)  # visual beside audio
    assert pictures.SERIES_COLOURS[1] not in panel_colours(picture, 1)  # the contrastive loss alone


def test_pretraining_picture_without_a_final_record_still_draws_its_four_panels(tmp_path):
    records = [r for r in pretraining_records() if r["split"] != "final"]  # a run stopped early
    assert number_of_panels(picture_of(tmp_path, records)) == 4


def test_finetuning_picture_has_loss_accuracy_and_map_panels(tmp_path):
    picture = picture_of(tmp_path, finetuning_records())
    assert number_of_panels(picture) == 3
    for k in range(3):
        assert pictures.SERIES_COLOURS[0] in panel_colours(picture, k)


def test_quantities_missing_from_the_log_leave_their_panel_out(tmp_path):
    records = [r for r in finetuning_records() if r["split"] == "train"]  # the loss only
    assert number_of_panels(picture_of(tmp_path, records)) == 1


def test_picture_of_a_log_with_nothing_to_draw_is_none(tmp_path):
    assert picture_of(tmp_path, []) is None
    assert picture_of(tmp_path, [dict(split="epoch", iter=62, samples_per_s=100.0)]) is None


def test_a_cut_short_last_line_is_skipped(tmp_path):
    whole = picture_of(tmp_path, finetuning_records())
    cut = picture_of(tmp_path, finetuning_records(), tail='{"split": "train", "iter": 12')
    assert cut.tobytes() == whole.tobytes()


def test_the_last_record_of_an_iteration_logged_twice_wins(tmp_path):
    first = [dict(split="train", iter=it, loss=1.0 + it) for it in (1, 2, 3)]
    resumed = [dict(split="train", iter=it, loss=0.5 * it) for it in (2, 3, 4)]  # resumed from 1
    once = picture_of(tmp_path, first[:1] + resumed)
    assert picture_of(tmp_path, first + resumed).tobytes() == once.tobytes()


def test_non_finite_values_are_skipped(tmp_path):
    records = finetuning_records()
    with_nan = records[:3] + [dict(split="train", iter=16, loss=float("nan"))] + records[3:]
    assert picture_of(tmp_path, with_nan).tobytes() == picture_of(tmp_path, records).tobytes()
