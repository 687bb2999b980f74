"""data.py: exact official preprocessing, augmentation semantics, the raw device path and clear errors;
the datafile check (prepare.py check), the compact rows (storage.Rows) and the data benchmarks (bench.py)."""

import json
import math
import os
import random

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from conftest import assert_fbank_close
from PIL import Image

import bench
import data
import prepare

FLOOR = math.log(torch.finfo(torch.float32).eps)  # log-mel of silence: -15.942384719848633
LABELS_CSV = 'index,mid,display_name\n0,/m/a,Alpha\n1,/m/b,"Beta, with comma"\n2,/m/c,Gamma\n'


def write_wav(path, seconds=1.0, rate=16000, seed=0, channels=1, subtype="PCM_16", samples=None):
    rng = np.random.default_rng(seed)
    n = int(seconds * rate) if samples is None else samples
    t = np.arange(n) / rate
    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.standard_normal(n)
    wave = np.stack([wave * (c + 1) / channels for c in range(channels)], 1)
    sf.write(path, wave.astype(np.float32), rate, subtype=subtype)
    return path


def write_jpg(path, size=(40, 32), seed=0, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def make_dataset(root, n=4, seconds=(1.0, 0.5, 1.3, 0.03), labels=None, frames=range(10)):
    """n clips in the official layout under root; clip i lasts seconds[i % len(seconds)]."""
    rows = []
    for i in range(n):
        vid = f"clip{i}"
        write_wav(os.path.join(root, vid + ".wav"), seconds[i % len(seconds)], seed=i)
        for k in frames:
            write_jpg(os.path.join(root, f"frame_{k}", vid + ".jpg"), seed=10 * i + k)
        rows.append(
            dict(
                video_id=vid,
                wav=vid + ".wav",
                video_path=".",
                labels=labels[i] if labels else ["/m/a", "/m/b,/m/c", "/m/c", "/m/a,/m/b"][i % 4],
            )
        )
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump({"data": rows}, f)
    with open(os.path.join(root, "labels.csv"), "w") as f:
        f.write(LABELS_CSV)
    return os.path.join(root, "data.json"), os.path.join(root, "labels.csv")


def dataset(root, **kw):
    kw = {"target_length": 128, "image_size": 32, **kw}
    return data.AVDataset(os.path.join(root, "data.json"), os.path.join(root, "labels.csv"), **kw)


# ---------------------------------------------------------------------------------------------- golden vectors


@pytest.mark.parametrize("fbank", [data.fbank, data.cpu_fbank], ids=["fbank", "cpu_fbank"])
def test_fbank_matches_torchaudio_golden(golden, fbank):
    vec = torch.load(os.path.join(golden, "fbank", "fbank_vectors.pth"), weights_only=False)
    for name in (k for k in vec if k != "kwargs"):
        wave = torch.from_numpy(sf.read(os.path.join(golden, "fbank", name + ".wav"), dtype="float32")[0])
        assert_fbank_close(fbank(wave - wave.mean()), vec[name], name=name)


def test_load_image_matches_torchvision_golden(golden):
    vec = torch.load(os.path.join(golden, "image", "image_vectors.pth"), weights_only=False)
    for name, want in vec.items():
        got = data.load_image(os.path.join(golden, "image", name), image_size=want.shape[-1])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def golden_item_sets(golden):
    """(settings of the official loader, its items) for each item set of the reference dataset."""
    vec = torch.load(os.path.join(golden, "dataset", "loader_vectors.pth"), weights_only=False)
    return [(vec["audio_conf" + tag[len("items") :]], vec[tag]) for tag in vec if tag.startswith("items")]


def test_eval_items_match_official_loader_golden(golden):
    root = os.path.join(golden, "dataset")
    item_sets = golden_item_sets(golden)
    assert item_sets
    for conf, items in item_sets:
        frame = {} if conf["frame_use"] < 0 else {"frame": conf["frame_use"]}
        ds = data.AVDataset(
            os.path.join(root, "data.json"),
            os.path.join(root, "labels.csv"),
            train=False,
            target_length=conf["target_length"],
            image_size=conf["im_res"],
            mean=conf["mean"],
            std=conf["std"],
            **frame,
        )
        for i, (fbank, image, labels) in enumerate(items):
            got_fbank, got_image, got_labels = ds[i]
            assert_fbank_close(got_fbank, fbank, scale=1 / conf["std"], name=f"item {i}")
            assert (got_image - image).abs().max() <= 1e-4
            assert torch.equal(got_labels, labels)


# ---------------------------------------------------------------------------------------------- fbank


def test_batch_fbank_equals_per_clip_fbank_and_leaves_the_input_alone():
    x = torch.randn(5, 8000) * 0.1
    before = x.clone()
    batch = data.fbank(x)
    assert torch.equal(x, before)
    assert batch.shape == (5, 1 + (8000 - 400) // 160, 128)
    assert torch.equal(batch, torch.stack([data.fbank(w) for w in x]))


@pytest.mark.parametrize("n,frames", [(400, 1), (559, 1), (560, 2), (160000, 998), (160125, 999)])
def test_fbank_frame_count_follows_snip_edges(n, frames):
    assert data.fbank(torch.randn(n)).shape == (frames, 128)
    assert data.fbank_frame_count(n) == frames
    assert data.fbank_frame_count(torch.tensor([n])).tolist() == [frames]


def test_fbank_of_silence_is_the_log_floor_and_mel_bin_3_is_always_empty():
    assert torch.all(data.fbank(torch.zeros(4000)) == FLOOR)
    assert torch.all(data.fbank(torch.randn(4000))[:, 3] == FLOOR)


def test_fbank_rejects_fewer_samples_than_one_frame():
    with pytest.raises(data.DataError, match="400 samples"):
        data.fbank(torch.randn(399))


def test_cpu_fbank_equals_the_recipe_on_a_batch_and_on_one_clip():
    x = torch.randn(3, 20000) * 0.2
    assert (data.cpu_fbank(x) - data.fbank(x)).abs().max() < 1e-5
    assert_fbank_close(data.cpu_fbank(x[0]), data.fbank(x[0]))
    with pytest.raises(data.DataError, match="400 samples"):
        data.cpu_fbank(torch.randn(2, 399))


# ---------------------------------------------------------------------------------------------- items


def test_short_clip_is_padded_with_zero_rows_before_normalisation(tmp_path):
    make_dataset(tmp_path)
    fb, _, _ = dataset(tmp_path, target_length=128)[1]  # 0.5 s -> 48 frames
    wave = data.load_audio(str(tmp_path / "clip1.wav"))
    want = data.cpu_fbank(wave - wave.mean())  # the fbank of the item path on the CPU
    assert fb.shape == (128, 128)
    torch.testing.assert_close(fb[:48], (want - data.AUDIOSET_MEAN) / data.AUDIOSET_STD, atol=0, rtol=0)
    assert torch.all(fb[48:] == (0 - data.AUDIOSET_MEAN) / data.AUDIOSET_STD)


def test_long_clip_is_cut_to_target_length(tmp_path):
    make_dataset(tmp_path)
    fb, _, _ = dataset(tmp_path, target_length=64, mean=0.0, std=1.0)[2]  # 1.3 s -> 128 frames
    w = data.load_audio(str(tmp_path / "clip2.wav"))
    assert torch.equal(fb, data.cpu_fbank(w - w.mean())[:64])


def test_adaptation_notes_say_that_frames_are_resized_and_audio_cut_to_the_model(tmp_path):
    datafile, _ = make_dataset(tmp_path, n=1)  # 40x32 px frames, 1 s: 98 fbank frames
    os.remove(tmp_path / "frame_0" / "clip0.jpg")  # the first frame that exists is measured
    notes = data.adaptation_notes(datafile, data.read_datafile(datafile), image_size=32, target_length=64)
    source = f"note: the first clip of {datafile}: "
    assert notes == [
        source + "its frames are 40x32 px and the model's img_size is 32: "
        "frames resized and centre-cropped to 32x32",
        source + "its audio has 98 fbank frames and the model's audio_length is 64: "
        "audio cut to its first 64 frames",
    ]


@pytest.mark.parametrize("target_length, note", [(100, None), (110, "audio padded with 12 frames of zeros")])
def test_adaptation_notes_mention_padding_only_past_five_percent_of_the_length(tmp_path, target_length, note):
    datafile, _ = make_dataset(tmp_path, n=1, frames=[])  # 98 fbank frames, no frames to measure
    rows = data.read_datafile(datafile)
    notes = data.adaptation_notes(datafile, rows, 32, target_length, source="clip0")
    if note is None:
        assert notes == []
    else:
        assert notes == [
            f"note: clip0: its audio has 98 fbank frames and the model's audio_length is 110: {note}"
        ]


def test_adaptation_notes_are_empty_without_rows_or_with_unreadable_audio(tmp_path):
    datafile, _ = make_dataset(tmp_path, n=1)
    rows = data.read_datafile(datafile)
    (tmp_path / "clip0.wav").write_bytes(b"not a wav")
    assert data.adaptation_notes(datafile, rows, 32, 64) == []
    assert data.adaptation_notes(datafile, rows[:0], 32, 64) == []


def test_label_csv_keeps_quoted_commas_and_orders_by_index(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('index,mid,display_name\n1,/m/b,"Beta, with comma"\n0,/m/a,Alpha\n')
    labels = data.load_label_csv(str(path))
    assert labels.mids == ["/m/a", "/m/b"]
    assert labels.names == ["Alpha", "Beta, with comma"]
    assert labels.index == {"/m/a": 0, "/m/b": 1}


def test_eval_item_labels_are_multi_hot_and_smoothed(tmp_path):
    make_dataset(tmp_path)
    assert dataset(tmp_path)[1][2].tolist() == [0.0, 1.0, 1.0]
    smooth = dataset(tmp_path, label_smooth=0.3)[1][2]
    torch.testing.assert_close(smooth, torch.tensor([0.1, 0.7, 0.7]))


def test_mixup_label_arithmetic_follows_the_official_loader():
    y1 = torch.tensor([[1.0, 0, 0, 0]])
    y2 = torch.tensor([[0.0, 1, 0, 1]])
    got = data.smooth_labels(y1, 0.1, y2, torch.tensor([0.6]))
    torch.testing.assert_close(got, torch.tensor([[0.025 + 0.54, 0.025 + 0.36, 0.025, 0.025 + 0.36]]))
    shared = data.smooth_labels(y1, 0.1, y1, torch.tensor([0.6]))  # a label of both samples adds up
    torch.testing.assert_close(shared, torch.tensor([[0.925, 0.025, 0.025, 0.025]]))


def test_train_item_with_mixup_mixes_labels_and_images(tmp_path):
    make_dataset(tmp_path, labels=["/m/a", "/m/b", "/m/c", "/m/b"])
    ds = dataset(tmp_path, train=True, mixup=1.0)
    random.seed(3)
    for i, own in enumerate([0, 1, 2, 1]):
        fb, image, label = ds[i]
        assert torch.isfinite(fb).all()
        assert image.shape == (3, 32, 32)
        # lam + (1 - lam), lam > 0.2
        assert label.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert label[own] > 0.2


def test_train_frames_are_drawn_from_all_num_frames_and_eval_uses_the_middle(tmp_path):
    make_dataset(tmp_path, n=1)
    ds = dataset(tmp_path)
    row = ds.rows[0]
    assert ds.choose_frame(row)[0].endswith(os.path.join("frame_5", "clip0.jpg"))
    ds.frame = 2
    assert ds.choose_frame(row)[0].endswith(os.path.join("frame_2", "clip0.jpg"))
    ds.train = True
    assert {ds.choose_frame(row)[0] for _ in range(300)} == {
        str(tmp_path / f"frame_{k}" / "clip0.jpg") for k in range(10)
    }


def test_a_key_with_a_frame_overrides_the_evaluation_frame_for_that_load(tmp_path):
    make_dataset(tmp_path, n=2)
    ds = dataset(tmp_path)
    raw = dataset(tmp_path, raw=True)
    assert torch.equal(ds[(1, 2)][1], data.load_image(str(tmp_path / "frame_2" / "clip1.jpg"), 32))
    assert torch.equal(ds[(1, None)][1], ds[1][1])  # None: ds.frame's rule (middle)
    assert raw[(0, 7)]["frame"] == 7
    assert raw[0]["frame"] == 5
    ds.frame = 3  # ds.frame still works
    assert torch.equal(ds[1][1], data.load_image(str(tmp_path / "frame_3" / "clip1.jpg"), 32))


@pytest.mark.parametrize("seed", range(20))
def test_spec_augment_masks_whole_bands_within_bounds_with_torchaudio_draws(seed):
    torch.manual_seed(seed)
    bands = [data.draw_band(128, 48), data.draw_band(100, 30)]
    torch.manual_seed(seed)
    for (start, width), (width_max, length) in zip(bands, ((48, 128), (30, 100))):
        value = torch.rand(1) * width_max
        assert (start, width) == (int(torch.rand(1) * (length - value)), int(value))
        assert width < width_max
        assert start + width <= length
    (f0, fw), (t0, tw) = bands
    out = data.spec_augment(torch.ones(1, 100, 128), torch.tensor([[f0, fw, t0, tw]]))[0]
    assert out.eq(0).all(0).nonzero().flatten().tolist() == list(range(f0, f0 + fw))  # whole mel bands
    assert out.eq(0).all(1).nonzero().flatten().tolist() == list(range(t0, t0 + tw))  # whole frames
    assert out.eq(0).sum() == fw * 100 + tw * 128 - fw * tw  # and nothing else


def test_spec_augment_with_zero_widths_changes_nothing_and_draws_nothing():
    feats = torch.randn(2, 50, 128)
    torch.manual_seed(0)
    assert data.draw_band(128, 0) == (0, 0)
    assert data.draw_band(50, 0) == (0, 0)
    assert torch.equal(data.spec_augment(feats, torch.tensor([[5, 0, 7, 0], [0, 0, 0, 0]])), feats)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_noise_adds_at_most_a_tenth_of_its_scale_then_rolls_in_time_by_the_drawn_shift():
    T = 64
    feats = torch.arange(T, dtype=torch.float32).repeat(128, 1).T[None].repeat(2, 1, 1)  # row t holds t
    out = data.add_noise(
        feats, torch.tensor([3, 4]), torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([5, -70])
    )
    for b, (scale, shift) in enumerate([(1.0, 5), (0.5, -70)]):
        source = out[b].floor()[:, 0]
        assert torch.equal(source.long(), (torch.arange(T) - shift) % T)
        extra = out[b] - source[:, None]
        assert extra.min() >= 0
        assert extra.max() <= 0.1 * scale + 1e-5
        assert extra.std() > 0.01 * scale


def hash32_reference(x):
    for shift, multiplier in ((16, 0x21F0AAAD), (15, 0x735A2D97)):
        x ^= x >> shift
        x = x * multiplier & 0xFFFFFFFF
    return x ^ (x >> 15)


def test_hash_uniform_is_the_hash_of_seed_and_position_with_24_bits():
    seeds = [0, 1, 2**32 - 1, 123456789]
    got = data.hash_uniform(torch.tensor(seeds), (3, 5), "cpu")
    assert got.shape == (4, 3, 5)
    assert got.dtype == torch.float32
    for b, seed in enumerate(seeds):
        for k in (0, 1, 7, 14):
            bits = hash32_reference(hash32_reference(k) ^ hash32_reference(seed))
            assert got[b].flatten()[k].item() == (bits >> 8) / 2**24


def test_hash_uniform_rows_depend_only_on_their_seed_and_look_uniform():
    seeds = torch.tensor([7, 8, 9])
    field = data.hash_uniform(seeds, (1024, 128), "cpu")
    alone = data.hash_uniform(seeds[1:2], (1024, 128), "cpu")[0]
    assert torch.equal(field[1], alone)  # any batch composition
    assert field.min() >= 0
    assert field.max() < 1
    assert abs(field.mean().item() - 0.5) < 1e-3
    assert abs(field.std().item() - (1 / 12) ** 0.5) < 1e-3
    assert not torch.equal(field[0], field[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hash_uniform_gives_the_same_field_on_cuda_as_on_the_cpu():
    seeds = torch.tensor([0, 5, 2**32 - 1])
    on_cuda = data.hash_uniform(seeds, (1024, 128), "cuda")
    on_cpu = data.hash_uniform(seeds, (1024, 128), "cpu")
    assert torch.equal(on_cuda.cpu(), on_cpu)


# ---------------------------------------------------------------------------------------------- bad input


def test_wrong_sample_rate_names_file_rate_and_fix(tmp_path):
    path = write_wav(str(tmp_path / "a.wav"), rate=44100)
    with pytest.raises(data.DataError, match=r"a\.wav.*44100 Hz.*prepare\.py videos"):
        data.load_audio(path)


@pytest.mark.parametrize("samples", [0, 399])
def test_empty_or_too_short_audio_is_an_error_naming_the_file(tmp_path, samples):
    path = write_wav(str(tmp_path / "short.wav"), samples=samples)
    with pytest.raises(data.DataError, match=rf"short\.wav has {samples} samples"):
        data.load_audio(path)


def test_corrupt_or_missing_audio_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk" * 10)
    with pytest.raises(data.DataError, match=r"cannot read audio .*bad\.wav"):
        data.load_audio(str(tmp_path / "bad.wav"))
    with pytest.raises(data.DataError, match=r"not found: .*none\.wav"):
        data.load_audio(str(tmp_path / "none.wav"))


def write_nan_wav(path):
    wave = np.full(16000, 0.1, np.float32)
    wave[100] = np.nan
    sf.write(path, wave, 16000, subtype="FLOAT")


def test_nan_audio_is_an_error(tmp_path):
    write_nan_wav(str(tmp_path / "nan.wav"))
    with pytest.raises(data.DataError, match="NaN"):
        data.load_audio(str(tmp_path / "nan.wav"))


def test_stereo_audio_keeps_the_first_channel(tmp_path):
    path = write_wav(str(tmp_path / "st.wav"), channels=2)
    first = sf.read(path, dtype="float32")[0][:, 0]
    assert torch.equal(data.load_audio(path), torch.from_numpy(np.ascontiguousarray(first)))


def test_greyscale_frame_is_converted_to_rgb(tmp_path):
    path = write_jpg(str(tmp_path / "g.jpg"), mode="L")
    image = data.load_image(path, image_size=32)
    grey = torch.from_numpy(np.array(Image.open(path))).float() / 255
    assert image.shape == (3, 32, 32)
    for c in range(3):
        want = (grey - data.IMAGE_MEAN[c]) / data.IMAGE_STD[c]
        torch.testing.assert_close(image[c], want[:, 4:36], atol=1e-6, rtol=0)


def test_missing_frame_falls_back_to_an_earlier_one_and_is_counted(tmp_path):
    make_dataset(tmp_path, n=1, frames=range(4))
    ds = dataset(tmp_path)
    _, image, _ = ds[0]
    assert torch.equal(image, data.load_image(str(tmp_path / "frame_3" / "clip0.jpg"), 32))
    ds[0]
    assert ds.frame_fallbacks == 2


def test_no_frame_at_or_before_the_chosen_one_is_an_error(tmp_path):
    make_dataset(tmp_path, n=1, frames=[7])
    with pytest.raises(data.DataError, match=r"row 0 \(video_id clip0\): no frame at or before frame_5"):
        dataset(tmp_path)[0]


def test_unknown_label_names_datafile_row_and_mid(tmp_path):
    make_dataset(tmp_path, labels=["/m/a", "/m/a", "/m/zz", "/m/a"])
    with pytest.raises(data.DataError, match=r"data\.json row 2 \(video_id clip2\): label '/m/zz'"):
        dataset(tmp_path)


def test_unreadable_wav_in_a_row_names_the_row(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "clip1.wav").write_bytes(b"garbage")
    ds = dataset(tmp_path)
    with pytest.raises(data.DataError, match=r"row 1 \(video_id clip1\): cannot read audio"):
        ds[1]


def test_skip_policy_drops_bad_rows_at_start_and_lists_them(tmp_path):
    make_dataset(tmp_path, n=4, labels=["/m/a", "/m/zz", "/m/c", "/m/a"])
    os.remove(tmp_path / "clip2.wav")
    with pytest.warns(UserWarning, match="skipped 2 of 4 rows"):
        ds = dataset(tmp_path, on_error="skip")
    assert [r["video_id"] for r in ds.rows] == ["clip0", "clip3"]
    assert [(i, vid) for i, vid, _ in ds.dropped] == [(1, "clip1"), (2, "clip2")]
    assert "not found" in ds.dropped[1][2][0]


def check(datafile, labels):
    return prepare.main(["check", "--data", datafile, "--label-csv", labels, "--image-size", "32"])


def test_check_command_reports_problems_with_nonzero_exit(tmp_path, capsys):
    datafile, labels = make_dataset(tmp_path)
    assert check(datafile, labels) == 0
    write_wav(str(tmp_path / "clip0.wav"), rate=8000)
    os.remove(tmp_path / "frame_9" / "clip1.jpg")
    assert check(datafile, labels) == 1
    out = capsys.readouterr().out
    assert "3 ok, 1 with problems" in out
    assert "8000 Hz" in out
    assert "1 rows miss some" in out


def test_check_command_finds_nan_audio(tmp_path, capsys):
    datafile, labels = make_dataset(tmp_path)
    write_nan_wav(str(tmp_path / "clip1.wav"))
    assert check(datafile, labels) == 1
    out = capsys.readouterr().out
    assert "3 ok, 1 with problems" in out
    assert "row 1 (video_id clip1)" in out
    assert "NaN" in out


def test_skip_policy_drops_rows_with_nan_audio(tmp_path):
    make_dataset(tmp_path)
    write_nan_wav(str(tmp_path / "clip1.wav"))
    with pytest.warns(UserWarning, match="skipped 1 of 4 rows"):
        ds = dataset(tmp_path, on_error="skip")
    assert [(i, vid) for i, vid, _ in ds.dropped] == [(1, "clip1")]
    assert "NaN" in ds.dropped[0][2][0]


def test_check_command_finds_a_truncated_frame(tmp_path, capsys):
    datafile, labels = make_dataset(tmp_path)
    frame = tmp_path / "frame_3" / "clip2.jpg"
    frame.write_bytes(frame.read_bytes()[:300])  # the header opens, the pixels do not decode
    assert check(datafile, labels) == 1
    out = capsys.readouterr().out
    assert "row 2 (video_id clip2)" in out
    assert "cannot read image" in out
    assert "frame_3" in out


def test_truncated_wav_is_an_error_naming_the_file_and_both_lengths(tmp_path):
    path = tmp_path / "cut.wav"
    write_wav(str(path), seconds=1.0)  # 16000 samples of PCM-16 after a 44-byte header
    path.write_bytes(path.read_bytes()[: 44 + 2 * 6000])
    with pytest.raises(
        data.DataError, match=r"cut\.wav is truncated: its header promises 16000 samples, the file holds 6000"
    ):
        data.load_audio(str(path))


def test_check_command_finds_a_truncated_wav(tmp_path, capsys):
    datafile, labels = make_dataset(tmp_path)
    path = tmp_path / "clip2.wav"
    path.write_bytes(path.read_bytes()[:5000])
    assert check(datafile, labels) == 1
    assert "clip2.wav is truncated" in capsys.readouterr().out


@pytest.mark.parametrize("missing", ["data.json", "labels.csv"])
def test_a_missing_datafile_or_label_csv_is_an_error_naming_it_and_the_command_that_writes_it(
    tmp_path, missing
):
    folder = tmp_path / "synthetic"
    folder.mkdir()
    make_dataset(folder, n=1)
    os.remove(folder / missing)
    what = "datafile" if missing == "data.json" else "label csv"
    want = rf"{what} not found: .*synthetic/{missing}; write it with `python prepare.py synthetic --out .*synthetic`"
    with pytest.raises(data.DataError, match=want):
        dataset(folder)


def test_a_missing_label_csv_outside_a_synthetic_folder_points_at_prepare_videos(tmp_path):
    datafile, _ = make_dataset(tmp_path, n=1)
    with pytest.raises(
        data.DataError, match=r"label csv not found: .*none\.csv; write it with `python prepare\.py videos"
    ):
        data.AVDataset(datafile, str(tmp_path / "none.csv"))


def test_check_command_on_a_missing_label_csv_exits_2_with_the_error(tmp_path, capsys):
    datafile, _ = make_dataset(tmp_path, n=1)
    assert check(datafile, str(tmp_path / "none.csv")) == 2
    assert "error: label csv not found" in capsys.readouterr().err


def test_check_command_on_a_datafile_that_is_not_json_exits_2_with_the_error(tmp_path, capsys):
    _, labels = make_dataset(tmp_path, n=1)
    (tmp_path / "data.json").write_text("not json")
    assert check(str(tmp_path / "data.json"), labels) == 2
    assert "error: cannot read datafile" in capsys.readouterr().err


def test_check_command_takes_the_label_csv_flag_as_eval_and_bench_spell_it(tmp_path, capsys):
    datafile, labels = make_dataset(tmp_path, n=1)
    argv = ["check", "--data", datafile, "--label_csv", labels, "--image-size", "32"]
    assert prepare.main(argv) == 0
    assert "1 ok, 0 with problems" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- loading at scale


def write_rows(root, n, seed=0):
    """A datafile of n generated rows (files need not exist) over the three labels of LABELS_CSV."""
    rng = random.Random(seed)
    rows = [
        dict(
            video_id=f"vid{i}_{rng.random():.3f}",
            wav=f"audio/part{i % 3}/v{i}.flac",
            video_path=rng.choice(["frames", "/abs/frames", "x/../frames2"]),
            labels=",".join(rng.sample(["/m/a", "/m/b", "/m/c"], rng.randint(0, 3))),
        )
        for i in range(n)
    ]
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump({"data": rows}, f)
    with open(os.path.join(root, "labels.csv"), "w") as f:
        f.write(LABELS_CSV)
    return rows


def test_compact_rows_give_back_every_row_and_its_labels(tmp_path):
    rows = write_rows(tmp_path, 3000)
    ds = dataset(tmp_path)
    codes = ds.rows.label_codes
    offsets = ds.rows.label_offsets
    assert len(ds) == len(ds.rows) == 3000
    for i in range(0, 3000, 7):
        want = rows[i]
        assert ds.rows[i] == dict(
            video_id=want["video_id"],
            wav=os.path.normpath(str(tmp_path / want["wav"])),
            video_path=os.path.normpath(str(tmp_path / want["video_path"])),
            labels=want["labels"],
        )
        classes = ds.class_of_code[codes[offsets[i] : offsets[i + 1]]].tolist()
        assert classes == [["/m/a", "/m/b", "/m/c"].index(m) for m in data.label_mids(want)]
    assert [r["video_id"] for r in ds.rows] == [r["video_id"] for r in rows]  # iteration
    assert ds.rows[-1] == ds.rows[2999]
    assert ds.rows[:3] == [ds.rows[0], ds.rows[1], ds.rows[2]]
    with pytest.raises(IndexError):
        ds.rows[3000]


def test_rows_cut_to_a_list_of_dicts_still_load(tmp_path):
    make_dataset(tmp_path)
    ds = dataset(tmp_path)
    want = ds[1]
    ds.rows = ds.rows[:2]  # as eval.py --limit may do
    assert len(ds) == 2
    assert all(torch.equal(a, b) for a, b in zip(ds[1], want))


def test_class_balance_weights_on_compact_rows_equal_the_formula_over_dicts(tmp_path):
    rows = write_rows(tmp_path, 2000, seed=1)
    got = data.class_balance_weights(dataset(tmp_path))
    counts = {m: sum(m in data.label_mids(r["labels"]) for r in rows) for m in ("/m/a", "/m/b", "/m/c")}
    want = [sum(1000 / (counts[m] + 0.01) for m in data.label_mids(r["labels"])) for r in rows]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_data_scale_bench_reports_build_time_and_memory(capsys):
    seconds, held = bench.main(["--data_scale", "2000"])
    assert seconds > 0
    assert held >= 0
    out = capsys.readouterr().out
    assert "2000 rows" in out
    assert "s to build" in out
    assert "MB held" in out


def test_class_balance_weights_follow_the_official_formula(tmp_path):
    make_dataset(tmp_path, labels=["/m/a", "/m/a,/m/b", "/m/b", "/m/a"])
    w = data.class_balance_weights(dataset(tmp_path))
    a = 1000 / 3.01  # /m/a: 3 rows
    b = 1000 / 2.01  # /m/b: 2 rows
    torch.testing.assert_close(w, torch.tensor([a, a + b, b, a], dtype=torch.float64))


def test_dataset_stats_are_mean_and_std_of_padded_fbank(tmp_path):
    make_dataset(tmp_path, n=3)
    ds = dataset(tmp_path)
    waves = [data.load_audio(str(tmp_path / f"clip{i}.wav")) for i in range(3)]
    feats = torch.stack(
        [F.pad(data.fbank(w - w.mean()), (0, 0, 0, 128 - data.fbank(w).shape[0])) for w in waves]
    )
    mean, std = data.dataset_stats(ds)
    assert mean == pytest.approx(feats.mean().item())
    assert std == pytest.approx(feats.std().item(), rel=1e-6)


def test_dataloader_with_two_workers_loads_items(tmp_path):
    make_dataset(tmp_path, n=6)
    batches = list(torch.utils.data.DataLoader(dataset(tmp_path), batch_size=2, num_workers=2))
    assert len(batches) == 3
    assert batches[0][0].shape == (2, 128, 128)
    assert batches[0][1].shape == (2, 3, 32, 32)


def test_raw_batches_report_each_missing_frame_they_fell_back_from(tmp_path):
    make_dataset(tmp_path, n=6, frames=range(3))
    raw = dataset(tmp_path, raw=True)
    loader = torch.utils.data.DataLoader(raw, batch_size=2, num_workers=2, collate_fn=data.collate_raw)
    fallbacks = [p for batch in loader for p in batch["fallbacks"]]
    assert fallbacks == [str(tmp_path / "frame_5" / f"clip{i}.jpg") for i in range(6)]


def test_raw_path_equals_item_path_in_eval_mode(tmp_path):
    # shorter and longer than 128 frames; from about 16 frames up the BLAS kernel, and so every bit, is the same
    make_dataset(tmp_path, seconds=(1.0, 0.5, 1.6, 0.2))
    items = dataset(tmp_path)
    raw = dataset(tmp_path, raw=True, label_smooth=0.0)
    batch = next(iter(torch.utils.data.DataLoader(raw, batch_size=4, collate_fn=data.collate_raw)))
    audio, image, label = data.BatchPreprocessor.from_dataset(raw)(batch)
    for i in range(4):
        fb, im, lab = items[i]
        assert torch.equal(audio[i], fb)
        assert torch.equal(image[i], im)
        assert torch.equal(label[i], lab)


def test_raw_path_in_training_keeps_the_label_mass_of_mixed_rows(tmp_path):
    make_dataset(tmp_path, labels=["/m/a", "/m/b", "/m/c", "/m/b"])
    raw = dataset(tmp_path, raw=True, train=True, mixup=1.0, freqm=20, timem=30, noise=True, label_smooth=0.1)
    batch = data.collate_raw([raw[i] for i in range(4)])
    torch.manual_seed(0)
    audio, image, label = data.BatchPreprocessor.from_dataset(raw)(batch)
    assert audio.shape == (4, 128, 128)
    assert image.shape == (4, 3, 32, 32)
    assert torch.isfinite(audio).all()
    # ls/K * K + lam (1-ls) + (1-lam) (1-ls)
    torch.testing.assert_close(label.sum(1), torch.full((4,), 0.1 + 0.9))


def test_raw_path_rows_left_unmixed_keep_plain_smoothed_labels(tmp_path):
    make_dataset(tmp_path, labels=["/m/a", "/m/b,/m/c", "/m/c", "/m/b"])
    raw = dataset(tmp_path, raw=True, train=True, mixup=1e-9, label_smooth=0.3)
    batch = data.collate_raw([raw[i] for i in range(4)])
    assert "lam" not in batch
    assert "partner_wave" not in batch
    _, _, label = data.BatchPreprocessor.from_dataset(raw)(batch)
    torch.testing.assert_close(label, data.smooth_labels(batch["label"], 0.3))
    assert label[1].tolist() == pytest.approx([0.1, 0.7, 0.7])


TRAIN = dict(train=True, mixup=0.5, freqm=20, timem=30, noise=True, label_smooth=0.1)


def seeded(ds, key, seed):
    """ds[key] with Python, NumPy and torch seeded as train.py's SeededItems does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return ds[key]


def test_items_equal_rows_of_a_device_batch_built_from_the_same_draws(tmp_path):
    make_dataset(tmp_path, n=6, seconds=(1.0, 0.5, 1.6, 0.2, 0.03, 1.2))
    items = dataset(tmp_path, **TRAIN)
    raw = dataset(tmp_path, raw=True, **TRAIN)
    keys = [(i % 6, 100 + i) for i in range(8)]
    batch = data.collate_raw([seeded(raw, i, s) for i, s in keys])
    assert 0 < int(batch["mixed"].sum()) < len(keys)  # both kinds of rows in the batch
    audio, image, label = data.BatchPreprocessor.from_dataset(raw)(batch, "cpu")
    for b, (i, s) in enumerate(keys):
        fb, im, lab = seeded(items, i, s)
        torch.testing.assert_close(audio[b], fb, atol=1e-5, rtol=0)
        torch.testing.assert_close(image[b], im, atol=1e-5, rtol=0)
        torch.testing.assert_close(label[b], lab, atol=1e-6, rtol=0)


def test_mixup_partner_is_drawn_from_the_whole_dataset_and_lambda_from_beta_10_10(tmp_path):
    make_dataset(tmp_path, n=6)
    raw = dataset(tmp_path, raw=True, train=True, mixup=1.0)
    draws = [seeded(raw, 0, s) for s in range(200)]
    assert {d["partner"] for d in draws} == set(range(6))
    lams = np.array([d["lam"] for d in draws])
    # Beta(10, 10): mean 0.5, sd 0.109
    assert abs(lams.mean() - 0.5) < 0.03
    assert abs(lams.std() - (1 / 84) ** 0.5) < 0.03


def test_mixup_mixes_waveforms_cut_to_the_first_then_centres_before_fbank(tmp_path):
    make_dataset(tmp_path, n=4)
    raw = dataset(tmp_path, raw=True, train=True, mixup=1.0, mean=0.0, std=1.0)
    item = next(it for it in (seeded(raw, 0, s) for s in range(50)) if it["partner"] == 2)  # 1.0 s with 1.3 s
    w1 = data.load_audio(str(tmp_path / "clip0.wav"))
    w2 = data.load_audio(str(tmp_path / "clip2.wav"))
    w1 = w1 - w1.mean()
    w2 = (w2 - w2.mean())[: len(w1)]  # the partner is cut to the item's length
    lam = item["lam"]
    mixed = lam * w1 + (1 - lam) * w2
    want = data.fbank(mixed - mixed.mean())
    audio, image, label = data.BatchPreprocessor.from_dataset(raw)(data.collate_raw([item]))
    torch.testing.assert_close(audio[0, : len(want)], want, atol=1e-4, rtol=0)
    want_image = lam * data.normalise_image(item["image"]) + (1 - lam) * data.normalise_image(
        item["partner_image"]
    )
    torch.testing.assert_close(image[0], want_image, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        label[0],
        data.smooth_labels(
            item["label"][None], 0.0, item["partner_label"][None], torch.tensor([lam], dtype=torch.float64)
        )[0],
    )


def test_every_random_choice_is_in_the_raw_item_and_the_preprocessor_draws_nothing(tmp_path):
    make_dataset(tmp_path)
    raw = dataset(tmp_path, raw=True, **TRAIN)
    batch = data.collate_raw([seeded(raw, i, i) for i in range(4)])
    assert {"bands", "noise_seed", "noise_scale", "noise_shift", "mixed", "lam", "partner"} <= set(batch)
    assert all(torch.is_tensor(v) for k, v in batch.items() if k != "fallbacks")
    prep = data.BatchPreprocessor.from_dataset(raw)
    torch.manual_seed(0)
    first = prep(batch)
    state = torch.get_rng_state()
    second = prep(batch)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_rows_without_labels_get_an_all_zero_target(tmp_path):
    make_dataset(tmp_path, labels=["", "/m/a", "/m/b", "/m/c"])
    assert dataset(tmp_path)[0][2].tolist() == [0.0, 0.0, 0.0]


def test_data_bench_times_every_path(tmp_path, capsys):
    datafile, labels = make_dataset(tmp_path)
    flags = ["--datafile", datafile, "--label_csv", labels, "--data_items", "4", "--data_repeats", "1"]
    ms = bench.main(["--data", *flags, "--target_length", "128", "--image_size", "32"])
    assert set(ms) == {"eval", "train", "raw", "cpu_fbank", "fbank", "loop", "prep"}
    out = capsys.readouterr().out
    for line in ("eval item", "train item", "raw item", "cpu_fbank, batch of 32", "one clip at a time"):
        assert line in out
