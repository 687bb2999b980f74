"""data.py: the official preprocessing exactly (golden vectors), the raw items the loader workers decode,
the batch preprocessing (mixup, fbank, SpecAugment, noise, label smoothing) and clear errors on bad input."""

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

import data

FLOOR = math.log(torch.finfo(torch.float32).eps)  # log-mel of silence: -15.942384719848633
LABELS_CSV = 'index,mid,display_name\n0,/m/a,Alpha\n1,/m/b,"Beta, with comma"\n2,/m/c,Gamma\n'
PADDED_ROW = (0 - data.AUDIOSET_MEAN) / data.AUDIOSET_STD  # a zero fbank row after normalisation


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


def own_label_dataset(root, n, **kw):
    """n clips, clip i with the single label /m/i and the datafile's labels as the classes (no label csv),
    so that a label says which clip it came from."""
    make_dataset(root, n=n, labels=[f"/m/{i}" for i in range(n)])
    kw = {"target_length": 128, "image_size": 32, **kw}
    return data.AVDataset(os.path.join(root, "data.json"), None, **kw)


def centred_audio(path):
    wave = data.load_audio(str(path))
    return wave - wave.mean()


# ---------------------------------------------------------------------------------------------- golden vectors


def test_fbank_matches_torchaudio_golden(golden):
    vec = torch.load(os.path.join(golden, "fbank", "fbank_vectors.pth"), weights_only=False)
    for name in (k for k in vec if k != "kwargs"):
        wave = torch.from_numpy(sf.read(os.path.join(golden, "fbank", name + ".wav"), dtype="float32")[0])
        assert_fbank_close(data.fbank(wave - wave.mean()), vec[name], name=name)


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


def test_fbank_of_silence_is_the_log_floor_and_mel_bin_3_is_always_empty():
    assert torch.all(data.fbank(torch.zeros(4000)) == FLOOR)
    assert torch.all(data.fbank(torch.randn(4000))[:, 3] == FLOOR)


def three_clips():
    """Waveforms of 98, 48 and 1 fbank frames, and their fbank_features (3, 64, 128) as one padded batch."""
    generator = torch.Generator().manual_seed(0)
    waves = [torch.randn(n, generator=generator) * 0.1 for n in (16000, 8000, 480)]
    padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)  # (3, 16000)
    return waves, data.fbank_features(padded, torch.tensor([len(w) for w in waves]), 64)


def test_fbank_features_of_a_clip_in_a_padded_batch_equal_the_clip_alone():
    waves, batch = three_clips()
    for b, wave in enumerate(waves):
        alone = data.fbank_features(wave[None], torch.tensor([len(wave)]), 64)[0]
        torch.testing.assert_close(batch[b], alone, atol=1e-5, rtol=0)


def test_fbank_features_are_cut_or_padded_to_target_length_with_zero_rows_past_each_clips_end():
    waves, batch = three_clips()
    assert batch.shape == (3, 64, 128)
    for b, (wave, frames) in enumerate(zip(waves, (98, 48, 1))):
        own = min(frames, 64)
        assert_fbank_close(batch[b, :own], data.fbank(wave)[:own], name=f"clip {b}")
        assert torch.all(batch[b, own:] == 0)


# ---------------------------------------------------------------------------------------------- items


def test_short_clip_is_padded_with_zero_rows_before_normalisation(tmp_path):
    make_dataset(tmp_path)
    fb, _, _ = dataset(tmp_path, target_length=128)[1]  # 0.5 s -> 48 frames
    want = data.fbank(centred_audio(tmp_path / "clip1.wav"))
    assert fb.shape == (128, 128)
    torch.testing.assert_close(fb[:48], (want - data.AUDIOSET_MEAN) / data.AUDIOSET_STD, atol=1e-6, rtol=0)
    assert torch.all(fb[48:] == PADDED_ROW)


def test_long_clip_is_cut_to_target_length(tmp_path):
    make_dataset(tmp_path)
    fb, _, _ = dataset(tmp_path, target_length=64, mean=0.0, std=1.0)[2]  # 1.3 s -> 128 frames
    want = data.fbank(centred_audio(tmp_path / "clip2.wav"))[:64]
    assert fb.shape == (64, 128)
    torch.testing.assert_close(fb, want, atol=1e-5, rtol=0)


def test_label_csv_keeps_quoted_commas_and_orders_by_index(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('index,mid,display_name\n1,/m/b,"Beta, with comma"\n0,/m/a,Alpha\n')
    mids, names = data.load_label_csv(str(path))
    assert mids == ["/m/a", "/m/b"]
    assert names == ["Alpha", "Beta, with comma"]


def test_label_csv_with_a_gap_in_its_indices_is_an_error_naming_it(tmp_path):
    path = tmp_path / "gap.csv"
    path.write_text("index,mid,display_name\n0,/m/a,Alpha\n2,/m/c,Gamma\n")
    with pytest.raises(data.DataError, match=r"gap\.csv: the class indices must be 0\.\.1"):
        data.load_label_csv(str(path))


def test_without_a_label_csv_the_classes_are_the_datafiles_labels_in_first_seen_order(tmp_path):
    datafile, _ = make_dataset(tmp_path, labels=["/m/b", "/m/a,/m/b", "", "/m/c"])
    ds = data.AVDataset(datafile, None, target_length=128, image_size=32, raw=True)
    assert ds.mids == ["/m/b", "/m/a", "/m/c"]
    assert ds.num_classes == 3
    assert ds[1]["label"].tolist() == [1.0, 1.0, 0.0]


def test_eval_item_labels_are_multi_hot_and_smoothed(tmp_path):
    make_dataset(tmp_path)
    assert dataset(tmp_path)[1][2].tolist() == [0.0, 1.0, 1.0]
    smooth = dataset(tmp_path, label_smooth=0.3)[1][2]
    torch.testing.assert_close(smooth, torch.tensor([0.1, 0.7, 0.7]))


def test_rows_without_labels_get_an_all_zero_target(tmp_path):
    make_dataset(tmp_path, labels=["", "/m/a", "/m/b", "/m/c"])
    assert dataset(tmp_path)[0][2].tolist() == [0.0, 0.0, 0.0]


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
    for i, own in enumerate([0, 1, 2, 1]):
        fb, image, label = ds[(i, 3)]
        assert torch.isfinite(fb).all()
        assert image.shape == (3, 32, 32)
        # lam + (1 - lam), lam > 0.2
        assert label.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert label[own] > 0.2


def frame_index(root, image, clip=0):
    """Which frame_k/clip{clip}.jpg a uint8 image is."""
    found = [
        k
        for k in range(10)
        if torch.equal(image, data.read_frame(str(root / f"frame_{k}" / f"clip{clip}.jpg"), 32))
    ]
    assert len(found) == 1
    return found[0]


def test_eval_uses_the_middle_frame_and_ds_frame_overrides_it(tmp_path):
    make_dataset(tmp_path, n=1)
    ds = dataset(tmp_path, raw=True)
    assert frame_index(tmp_path, ds[0]["image"]) == 5
    ds.frame = 2
    assert frame_index(tmp_path, ds[0]["image"]) == 2


def test_train_frames_are_drawn_from_all_num_frames(tmp_path):
    make_dataset(tmp_path, n=1)
    ds = dataset(tmp_path, raw=True, train=True)
    assert {frame_index(tmp_path, ds[(0, seed)]["image"]) for seed in range(100)} == set(range(10))


def test_an_item_is_the_same_for_the_same_index_and_seed_whatever_the_global_random_state(tmp_path):
    make_dataset(tmp_path)
    ds = dataset(tmp_path, raw=True, train=True, mixup=0.5)
    random.seed(1)
    first = ds[(2, 7)]
    random.seed(2)
    second = ds[(2, 7)]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert len({ds[(2, seed)]["lam"].item() for seed in range(20)}) > 1  # another seed, other draws


def test_an_int_key_draws_from_pythons_global_random(tmp_path):
    make_dataset(tmp_path, n=1)
    ds = dataset(tmp_path, raw=True, train=True)
    random.seed(5)
    first = [frame_index(tmp_path, ds[0]["image"]) for _ in range(20)]
    random.seed(5)
    second = [frame_index(tmp_path, ds[0]["image"]) for _ in range(20)]
    assert first == second
    assert len(set(first)) > 1


def test_evaluation_items_are_not_augmented(tmp_path):
    make_dataset(tmp_path, n=1)
    plain = dataset(tmp_path)[0]
    asked = dataset(tmp_path, freqm=48, timem=64, noise=True, mixup=1.0)[0]
    assert all(torch.equal(a, b) for a, b in zip(plain, asked))


# ---------------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("seed", range(10))
def test_spec_augment_masks_whole_bands_and_frames_within_bounds_with_torchaudio_draws(seed):
    B = 4
    T = 100
    M = 128
    torch.manual_seed(seed)
    out = data.spec_augment(torch.ones(B, T, M), 48, 30)
    torch.manual_seed(seed)
    freq_value = torch.rand(B) * 48
    freq_start = (torch.rand(B) * (M - freq_value)).long()
    time_value = torch.rand(B) * 30
    time_start = (torch.rand(B) * (T - time_value)).long()
    for b in range(B):
        f0 = freq_start[b].item()
        fw = int(freq_value[b])
        t0 = time_start[b].item()
        tw = int(time_value[b])
        assert fw < 48
        assert tw < 30
        assert f0 + fw <= M
        assert t0 + tw <= T
        zero = out[b].eq(0)
        assert zero.all(0).nonzero().flatten().tolist() == list(range(f0, f0 + fw))  # whole mel bands
        assert zero.all(1).nonzero().flatten().tolist() == list(range(t0, t0 + tw))  # whole frames
        assert zero.sum() == fw * T + tw * M - fw * tw  # and nothing else


def test_spec_augment_with_zero_widths_changes_nothing_and_draws_nothing():
    feats = torch.randn(2, 50, 128)
    state = torch.get_rng_state()
    assert torch.equal(data.spec_augment(feats, 0, 0), feats)
    assert torch.equal(state, torch.get_rng_state())


def test_noise_adds_at_most_a_tenth_of_its_scale_then_rolls_in_time_by_the_drawn_shift():
    B = 3
    T = 64
    M = 128
    feats = torch.arange(T, dtype=torch.float32)[None, :, None].expand(B, T, M)  # row t holds t
    torch.manual_seed(4)
    out = data.add_noise(feats)
    torch.manual_seed(4)
    scale = torch.rand(B, 1, 1)  # the official noise: U(0, 1) * s / 10, s ~ U(0, 1) per clip
    uniform = torch.rand(B, T, M)
    shift = torch.randint(-T, T, (B, 1))
    for b in range(B):
        want = torch.roll(feats[b] + uniform[b] * scale[b] / 10, shift[b].item(), 0)
        assert torch.equal(out[b], want)
        source = (torch.arange(T) - shift[b]) % T  # out[t] = in[t - shift]
        extra = out[b] - source[:, None]
        assert extra.min() >= 0
        assert extra.max() <= scale[b].item() / 10 + 1e-5


# ---------------------------------------------------------------------------------------------- bad input


def test_wrong_sample_rate_names_file_rate_and_fix(tmp_path):
    path = write_wav(str(tmp_path / "a.wav"), rate=44100)
    with pytest.raises(data.DataError, match=r"a\.wav is sampled at 44100 Hz.*prepare\.py videos"):
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


def test_truncated_wav_is_an_error_naming_the_file_and_both_lengths(tmp_path):
    path = tmp_path / "cut.wav"
    write_wav(str(path), seconds=1.0)  # 16000 samples of PCM-16 after a 44-byte header
    path.write_bytes(path.read_bytes()[: 44 + 2 * 6000])
    with pytest.raises(
        data.DataError, match=r"cut\.wav is truncated: its header promises 16000 samples, it has 6000"
    ):
        data.load_audio(str(path))


def test_nan_audio_is_an_error_naming_the_file(tmp_path):
    wave = np.full(16000, 0.1, np.float32)
    wave[100] = np.nan
    sf.write(str(tmp_path / "nan.wav"), wave, 16000, subtype="FLOAT")
    with pytest.raises(data.DataError, match=r"nan\.wav contains NaN"):
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


def test_missing_or_unreadable_image_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(data.DataError, match=r"image file not found: .*none\.jpg"):
        data.read_frame(str(tmp_path / "none.jpg"), 32)
    path = write_jpg(str(tmp_path / "cut.jpg"))
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:300])
    with pytest.raises(data.DataError, match=r"cannot read image .*cut\.jpg"):
        data.read_frame(path, 32)


def test_missing_frame_falls_back_to_an_earlier_one(tmp_path):
    make_dataset(tmp_path, n=1, frames=range(4))
    image = dataset(tmp_path, raw=True)[0]["image"]  # the middle frame, 5, is missing
    assert torch.equal(image, data.read_frame(str(tmp_path / "frame_3" / "clip0.jpg"), 32))


def test_no_frame_at_or_before_the_chosen_one_is_an_error_naming_the_row_and_file(tmp_path):
    make_dataset(tmp_path, n=1, frames=[7])
    want = r"data\.json row 0 \(video_id clip0\): image file not found: .*frame_0.clip0\.jpg"
    with pytest.raises(data.DataError, match=want):
        dataset(tmp_path)[0]


def test_unreadable_frame_in_a_row_names_the_row_and_the_frame(tmp_path):
    make_dataset(tmp_path)
    frame = tmp_path / "frame_5" / "clip2.jpg"
    frame.write_bytes(frame.read_bytes()[:300])  # the header opens, the pixels do not decode
    with pytest.raises(
        data.DataError, match=r"row 2 \(video_id clip2\): cannot read image .*frame_5.clip2\.jpg"
    ):
        dataset(tmp_path)[2]


def test_unreadable_wav_in_a_row_names_the_row(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "clip1.wav").write_bytes(b"garbage")
    with pytest.raises(
        data.DataError, match=r"data\.json row 1 \(video_id clip1\): cannot read audio .*clip1\.wav"
    ):
        dataset(tmp_path)[1]


def test_unknown_label_names_datafile_row_video_id_and_mid(tmp_path):
    make_dataset(tmp_path, labels=["/m/a", "/m/a", "/m/zz", "/m/a"])
    with pytest.raises(
        data.DataError, match=r"data\.json row 2 \(video_id clip2\): label '/m/zz' is not in .*labels\.csv"
    ):
        dataset(tmp_path)


@pytest.mark.parametrize("missing", ["data.json", "labels.csv"])
def test_a_missing_datafile_or_label_csv_names_it_and_the_command_that_writes_it(tmp_path, missing):
    folder = tmp_path / "synthetic"
    folder.mkdir()
    make_dataset(folder, n=1)
    os.remove(folder / missing)
    what = "datafile" if missing == "data.json" else "label csv"
    want = rf"{what} not found: .*synthetic/{missing} \(`python prepare\.py synthetic` writes one\)"
    with pytest.raises(data.DataError, match=want):
        dataset(folder)


def test_a_missing_label_csv_of_videos_points_at_prepare_videos(tmp_path):
    datafile, _ = make_dataset(tmp_path, n=1)
    with pytest.raises(
        data.DataError, match=r"label csv not found: .*none\.csv \(`python prepare\.py videos` writes one\)"
    ):
        data.AVDataset(datafile, str(tmp_path / "none.csv"))


@pytest.mark.parametrize("text", ["not json", '{"rows": []}', '{"data": [{"wav": "a.wav"}]}'])
def test_a_datafile_that_is_not_the_official_json_is_an_error_naming_it(tmp_path, text):
    _, labels = make_dataset(tmp_path, n=1)
    (tmp_path / "data.json").write_text(text)
    with pytest.raises(data.DataError, match=r"cannot read datafile .*data\.json .*want json"):
        data.AVDataset(str(tmp_path / "data.json"), labels)


# ---------------------------------------------------------------------------------------------- the rows


def write_rows(root, n, seed=0):
    """A datafile of n generated rows (files need not exist) over the three labels of LABELS_CSV."""
    rng = random.Random(seed)
    rows = [
        dict(
            video_id=f"vid{i}_{rng.random():.3f}_é",
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


def test_row_gives_back_the_datafile_row_with_paths_from_its_folder_and_class_indices(tmp_path):
    rows = write_rows(tmp_path, 200)
    ds = dataset(tmp_path)
    assert len(ds) == 200
    for i, want in enumerate(rows):
        assert ds.row(i) == dict(
            video_id=want["video_id"],
            wav=os.path.join(str(tmp_path), want["wav"]),
            video_path=os.path.join(str(tmp_path), want["video_path"]),
            classes=[["/m/a", "/m/b", "/m/c"].index(m) for m in want["labels"].split(",") if m],
        )


def test_class_balance_weights_follow_the_official_formula(tmp_path):
    make_dataset(tmp_path, labels=["/m/a", "/m/a,/m/b", "/m/b", "/m/a"])
    w = data.class_balance_weights(dataset(tmp_path))
    a = 1000 / 3.01  # /m/a: 3 rows
    b = 1000 / 2.01  # /m/b: 2 rows
    torch.testing.assert_close(w, torch.tensor([a, a + b, b, a], dtype=torch.float64))


def test_class_balance_weights_of_rows_with_any_number_of_labels_equal_the_formula(tmp_path):
    rows = write_rows(tmp_path, 300, seed=1)
    got = data.class_balance_weights(dataset(tmp_path))
    mids = [[m for m in r["labels"].split(",") if m] for r in rows]
    counts = {m: sum(m in row for row in mids) for m in ("/m/a", "/m/b", "/m/c")}
    want = [sum(1000 / (counts[m] + 0.01) for m in row) for row in mids]  # an unlabelled row weighs 0
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_dataset_stats_are_mean_and_std_of_padded_fbank(tmp_path):
    make_dataset(tmp_path, n=3)
    ds = dataset(tmp_path)
    waves = [centred_audio(tmp_path / f"clip{i}.wav") for i in range(3)]
    feats = torch.stack([F.pad(data.fbank(w), (0, 0, 0, 128 - data.fbank(w).shape[0])) for w in waves])
    mean, std = data.dataset_stats(ds)
    assert mean == pytest.approx(feats.double().mean().item(), rel=1e-5)
    assert std == pytest.approx(feats.double().std(correction=0).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- raw items and batches


def test_collate_zero_pads_the_waveforms_and_records_their_lengths(tmp_path):
    make_dataset(tmp_path)
    raw = dataset(tmp_path, raw=True)
    items = [raw[1], raw[0], raw[3]]  # 8000, 16000 and 480 samples
    batch = data.collate(items)
    assert batch["length"].tolist() == [8000, 16000, 480]
    assert batch["wave"].shape == (3, 16000)
    for b, item in enumerate(items):
        n = len(item["wave"])
        assert torch.equal(batch["wave"][b, :n], item["wave"])
        assert torch.all(batch["wave"][b, n:] == 0)
        assert torch.equal(batch["image"][b], item["image"])
        assert torch.equal(batch["label"][b], item["label"])


def test_raw_item_is_the_centred_wave_the_uint8_frame_and_the_label(tmp_path):
    make_dataset(tmp_path)
    item = dataset(tmp_path, raw=True)[1]
    assert set(item) == {"wave", "image", "label"}
    assert torch.equal(item["wave"], centred_audio(tmp_path / "clip1.wav"))
    assert torch.equal(item["image"], data.read_frame(str(tmp_path / "frame_5" / "clip1.jpg"), 32))
    assert item["label"].tolist() == [0.0, 1.0, 1.0]


def test_raw_path_equals_item_path_in_eval_mode(tmp_path):
    # shorter and longer than 128 frames, in one padded batch
    make_dataset(tmp_path, seconds=(1.0, 0.5, 1.6, 0.03))
    items = dataset(tmp_path, label_smooth=0.1)
    raw = dataset(tmp_path, raw=True, label_smooth=0.1)
    audio, image, label = raw.preprocess(data.collate([raw[i] for i in range(4)]), "cpu")
    for i in range(4):
        fb, im, lab = items[i]
        torch.testing.assert_close(audio[i], fb, atol=1e-5, rtol=0)
        assert torch.equal(image[i], im)
        assert torch.equal(label[i], lab)


def test_batches_yield_the_finished_items_of_the_rows_asked_for_in_order(tmp_path):
    make_dataset(tmp_path)
    items = dataset(tmp_path)
    raw = dataset(tmp_path, raw=True)
    got = list(data.batches(raw, 2, "cpu", indices=[3, 1, 0]))
    assert [len(audio) for audio, _, _ in got] == [2, 1]
    for b, i in enumerate([3, 1, 0]):
        audio, image, label = got[b // 2]
        torch.testing.assert_close(audio[b % 2], items[i][0], atol=1e-5, rtol=0)
        assert torch.equal(image[b % 2], items[i][1])
        assert torch.equal(label[b % 2], items[i][2])


def test_dataloader_with_two_workers_loads_items(tmp_path):
    make_dataset(tmp_path, n=6)
    ds = dataset(tmp_path)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2))
    assert len(batches) == 3
    assert batches[0][0].shape == (2, 128, 128)
    assert batches[0][1].shape == (2, 3, 32, 32)
    assert torch.equal(batches[2][2][1], ds[5][2])


def test_items_are_the_same_for_the_same_index_and_seed_whatever_the_worker_count(tmp_path):
    make_dataset(tmp_path, n=6)
    raw = dataset(tmp_path, raw=True, train=True, mixup=0.5)
    keys = [(i % 6, 100 + i) for i in range(8)]

    def load(workers):
        loader = torch.utils.data.DataLoader(
            raw, batch_size=4, sampler=keys, collate_fn=data.collate, num_workers=workers
        )
        return list(loader)

    alone = load(0)
    for workers in (1, 2):
        for want, got in zip(alone, load(workers), strict=True):
            assert want.keys() == got.keys()
            assert all(torch.equal(want[k], got[k]) for k in want)


TRAIN = dict(train=True, mixup=0.5, label_smooth=0.1)  # every random choice made by the item's seed


def test_a_batchs_rows_equal_the_items_built_alone_from_the_same_seeds(tmp_path):
    make_dataset(tmp_path, n=6, seconds=(1.0, 0.5, 1.6, 0.2, 0.03, 1.2))
    items = dataset(tmp_path, **TRAIN)
    raw = dataset(tmp_path, raw=True, **TRAIN)
    keys = [(i % 6, 100 + i) for i in range(8)]
    batch = data.collate([raw[key] for key in keys])
    mixed = batch["lam"] < 1
    assert 0 < int(mixed.sum()) < len(keys)  # both kinds of rows in the batch
    assert (batch["length"][mixed] < batch["length"].max()).any()  # a mixed clip shorter than the batch
    audio, image, label = raw.preprocess(batch, "cpu")
    for b, key in enumerate(keys):
        fb, im, lab = items[key]
        torch.testing.assert_close(audio[b], fb, atol=1e-5, rtol=0)
        torch.testing.assert_close(image[b], im, atol=1e-6, rtol=0)
        torch.testing.assert_close(label[b], lab, atol=1e-7, rtol=0)


def test_a_training_batch_with_every_augmentation_keeps_the_label_mass_of_mixed_rows(tmp_path):
    make_dataset(tmp_path, labels=["/m/a", "/m/b", "/m/c", "/m/b"])
    raw = dataset(tmp_path, raw=True, train=True, mixup=1.0, freqm=20, timem=30, noise=True, label_smooth=0.1)
    batch = data.collate([raw[(i, i)] for i in range(4)])
    torch.manual_seed(0)
    audio, image, label = raw.preprocess(batch, "cpu")
    assert audio.shape == (4, 128, 128)
    assert image.shape == (4, 3, 32, 32)
    assert torch.isfinite(audio).all()
    # ls/K * K + lam (1-ls) + (1-lam) (1-ls)
    torch.testing.assert_close(label.sum(1), torch.full((4,), 0.1 + 0.9))


def test_a_row_left_unmixed_is_the_row_without_mixup(tmp_path):
    make_dataset(tmp_path, labels=["/m/a", "/m/b,/m/c", "/m/c", "/m/b"], frames=[0])
    kw = dict(raw=True, train=True, num_frames=1, label_smooth=0.3)
    raw = dataset(tmp_path, mixup=1e-9, **kw)
    batch = data.collate([raw[(i, i)] for i in range(4)])
    assert batch["lam"].tolist() == [1.0] * 4  # every item of a mixup run carries a partner
    assert "partner_wave" in batch
    plain = dataset(tmp_path, mixup=0.0, **kw)
    want = plain.preprocess(data.collate([plain[(i, i)] for i in range(4)]), "cpu")
    got = raw.preprocess(batch, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[2][1].tolist() == pytest.approx([0.1, 0.7, 0.7])


def test_mixup_partner_is_drawn_from_the_whole_dataset_and_lambda_from_beta_10_10(tmp_path):
    raw = own_label_dataset(tmp_path, 6, raw=True, train=True, mixup=1.0)
    draws = [raw[(0, seed)] for seed in range(200)]
    assert {int(d["partner_label"].argmax()) for d in draws} == set(range(6))
    lams = np.array([d["lam"].item() for d in draws])
    # Beta(10, 10): mean 0.5, sd 0.109
    assert abs(lams.mean() - 0.5) < 0.03
    assert abs(lams.std() - (1 / 84) ** 0.5) < 0.03
    assert lams.max() < 1


def mixed_item(raw, partner):
    """The first raw item 0 whose mixup partner is clip `partner`."""
    items = (raw[(0, seed)] for seed in range(200))
    return next(it for it in items if it["lam"] < 1 and int(it["partner_label"].argmax()) == partner)


@pytest.mark.parametrize("partner", [1, 2], ids=["shorter partner", "longer partner"])
def test_mixup_mixes_waveforms_cut_to_the_first_then_centres_before_fbank(tmp_path, partner):
    raw = own_label_dataset(tmp_path, 4, raw=True, train=True, mixup=1.0, mean=0.0, std=1.0)
    item = mixed_item(raw, partner)  # clip 0 lasts 1.0 s, clip 1 0.5 s, clip 2 1.3 s
    w1 = centred_audio(tmp_path / "clip0.wav")
    w2 = centred_audio(tmp_path / f"clip{partner}.wav")
    w2 = F.pad(w2, (0, max(0, len(w1) - len(w2))))[: len(w1)]  # zero-padded or cut to the item's length
    assert torch.equal(item["partner_wave"], w2)
    lam = item["lam"]  # float64, used in float32 as the official loader
    mixed = lam.float() * w1 + (1 - lam).float() * w2
    want = data.fbank(mixed - mixed.mean())  # 98 frames
    audio, _, _ = raw.preprocess(data.collate([item]), "cpu")
    assert_fbank_close(audio[0, :98], want)
    assert torch.all(audio[0, 98:] == 0)


def test_mixup_mixes_images_after_normalisation_and_labels_by_lambda(tmp_path):
    raw = own_label_dataset(tmp_path, 4, raw=True, train=True, mixup=1.0, label_smooth=0.2)
    item = mixed_item(raw, 2)
    lam = item["lam"].item()
    _, image, label = raw.preprocess(data.collate([item]), "cpu")
    want = lam * data.normalise_image(item["image"]) + (1 - lam) * data.normalise_image(item["partner_image"])
    torch.testing.assert_close(image[0], want, atol=1e-6, rtol=0)
    want_label = [0.05 + lam * 0.8, 0.05, 0.05 + (1 - lam) * 0.8, 0.05]  # ls / K + lam (1 - ls) ...
    torch.testing.assert_close(label[0], torch.tensor(want_label), atol=1e-7, rtol=0)
