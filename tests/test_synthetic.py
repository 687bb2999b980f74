"""synthetic.py: the dataset is deterministic, in the official format, and its cues are what it says."""

import colorsys
import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import synthetic


def read_tree(folder):
    """{path relative to folder: bytes} of every file below it."""
    tree = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            tree[os.path.relpath(path, folder)] = open(path, "rb").read()
    return tree


def read_rows(folder, split):
    """The rows of folder/{split}.json."""
    with open(os.path.join(folder, f"{split}.json")) as f:
        return json.load(f)["data"]


FOUR_CLASSES = dict(image_size=32, seconds=0.5, num_classes=4)
TINY = dict(n_train=40, n_test=30, image_size=32, seconds=0.5)  # 70 clips: enough to use the pool


def test_synthetic_is_the_same_bytes_for_a_seed_with_or_without_workers(tmp_path):
    synthetic.make_synthetic(str(tmp_path / "a"), seed=3, workers=2, **TINY)
    synthetic.make_synthetic(str(tmp_path / "b"), seed=3, workers=1, **TINY)
    synthetic.make_synthetic(str(tmp_path / "c"), seed=4, workers=1, **TINY)
    pooled = read_tree(str(tmp_path / "a"))
    in_process = read_tree(str(tmp_path / "b"))
    other_seed = read_tree(str(tmp_path / "c"))
    assert len(pooled) == 4 + 70 * 11  # 2 datafiles, labels.csv, objects.json; a wav + 10 frames a clip
    assert pooled == in_process
    assert pooled["audio/train_00000.wav"] != other_seed["audio/train_00000.wav"]


def test_synthetic_is_in_the_official_format(tmp_path):
    out = str(tmp_path / "syn")
    synthetic.make_synthetic(out, n_train=12, n_test=5, image_size=48, seconds=1.0, num_classes=4, workers=1)
    with open(os.path.join(out, "labels.csv")) as f:
        mids = [row["mid"] for row in csv.DictReader(f)]
    assert len(mids) == 4
    for split, n in (("train", 12), ("test", 5)):
        data = read_rows(out, split)
        assert len(data) == n
        assert all(e["video_id"].startswith(split) for e in data)
        for e in data:
            assert e["labels"] in mids  # single-label
            info = sf.info(os.path.join(out, e["wav"]))
            wav_format = (info.samplerate, info.channels, info.subtype, info.frames)
            assert wav_format == (16000, 1, "PCM_16", 16000)
            for i in range(10):
                path = os.path.join(out, e["video_path"], f"frame_{i}", f"{e['video_id']}.jpg")
                image = Image.open(path)
                assert (image.mode, image.size) == ("RGB", (48, 48))


def test_synthetic_multilabel_has_one_to_three_distinct_events(tmp_path):
    out = str(tmp_path / "syn")
    synthetic.make_synthetic(
        out, n_train=60, n_test=0, image_size=32, seconds=0.5, multilabel=True, workers=1
    )
    counts = [len(set(e["labels"].split(","))) for e in read_rows(out, "train")]
    assert set(counts) == {1, 2, 3}


def test_synthetic_object_hue_sets_the_pitch_of_its_sound():
    disk_with_pure_tone = [0]
    frames, pcm, _ = synthetic.draw_clip(np.random.default_rng(5), disk_with_pure_tone, 64, 1.0)
    pixels = frames[5].reshape(-1, 3) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    vivid = (hsv[:, 1] > 0.6) & (hsv[:, 2] > 0.6)  # the object, not the dull background
    hue = np.median(hsv[vivid, 0])
    pitch = np.argmax(np.abs(np.fft.rfft(pcm / 32768.0)))  # 1 s: bin k = k Hz
    assert pitch == pytest.approx(200 * 2 ** (3 * hue / 0.8), rel=0.03)


def test_synthetic_number_of_objects_is_the_number_of_onsets():
    _, pcm, _ = synthetic.draw_clip(np.random.default_rng(1), [8, 8, 8], 64, 2.56)  # three plucks
    power = (pcm / 32768.0) ** 2
    energy = np.convolve(power, np.ones(160) / 160, mode="same")[::160]  # 10 ms frames
    loud = energy > 0.1 * energy.max()
    assert np.count_nonzero(loud[1:] & ~loud[:-1]) + int(loud[0]) == 3


def test_inside_objects_tests_points_against_each_shape():
    disk = {"class": 0, "x": 10.0, "y": 20.0, "radius": 4.0}
    bar = {"class": 9, "x": 40.0, "y": 20.0, "radius": 4.0}  # an ellipse 1.1 r wide, 0.45 r high
    x = np.array([10, 13.9, 10, 40, 44.3, 40])
    y = np.array([20, 20, 24.5, 20, 20, 22])
    inside = synthetic.inside_objects([disk, bar], x, y)
    assert inside.tolist() == [True, True, False, True, True, False]
    assert not synthetic.inside_objects([], x, y).any()


def test_synthetic_object_geometry_covers_the_drawn_objects():
    disk_and_square = [0, 1]
    frames, _, objects = synthetic.draw_clip(np.random.default_rng(2), disk_and_square, 64, 2.56)
    assert len(objects) == 10
    assert all(len(o) == 2 for o in objects)
    centres = np.arange(64) + 0.5
    for frame, frame_objects in zip(frames, objects):
        pixels = frame.reshape(-1, 3) / 255.0
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels]).reshape(64, 64, 3)
        drawn = (hsv[..., 1] > 0.5) & (
            hsv[..., 2] > 0.7
        )  # saturated and bright: the objects, not the background
        inside = synthetic.inside_objects(frame_objects, centres[None, :], centres[:, None])
        both = (drawn & inside).sum()
        assert both >= 0.99 * drawn.sum()  # every object-coloured pixel lies inside an object
        assert both >= 0.8 * inside.sum()  # and most inside pixels are object-coloured (not edges)


def test_synthetic_writes_the_objects_of_every_clip_and_frame(tmp_path):
    out = str(tmp_path / "syn")
    synthetic.make_synthetic(out, n_train=3, n_test=2, workers=1, **FOUR_CLASSES)
    objects = json.load(open(os.path.join(out, "objects.json")))
    rows = [e for split in ("train", "test") for e in read_rows(out, split)]
    assert objects["frame_size"] == 32
    assert sorted(objects["clips"]) == sorted(e["video_id"] for e in rows)
    for e in rows:
        frames = objects["clips"][e["video_id"]]
        assert len(frames) == 10
        assert 1 <= len(frames[0]) <= 3
        assert {synthetic.synthetic_mid(o["class"]) for f in frames for o in f} == {e["labels"]}


def test_read_objects_finds_the_file_beside_the_datafile_and_checks_it_holds_every_clip(tmp_path):
    out = str(tmp_path / "syn")
    synthetic.make_synthetic(out, n_train=1, n_test=1, workers=1, **FOUR_CLASSES)
    found, path = synthetic.read_objects(None, os.path.join(out, "test.json"), ["test_00000"])
    assert path == os.path.join(out, "objects.json")
    assert found == json.load(open(path))
    with pytest.raises(ValueError, match="no objects for 1 of the 2 clips"):
        synthetic.read_objects(path, None, ["test_00000", "elsewhere"])
    assert synthetic.read_objects(None, str(tmp_path / "real" / "data.json"), ["x"]) == (None, None)


def test_avdataset_reads_the_synthetic_dataset(tmp_path):
    import data

    out = str(tmp_path / "syn")
    synthetic.make_synthetic(out, n_train=4, n_test=2, image_size=64, seconds=2.56, workers=1)
    ds = data.AVDataset(
        os.path.join(out, "train.json"), os.path.join(out, "labels.csv"), target_length=256, image_size=64
    )
    fbank, image, label = ds[0]
    assert tuple(fbank.shape) == (256, 128)
    assert tuple(image.shape) == (3, 64, 64)
    assert tuple(label.shape) == (10,)
    assert float(label.sum()) == 1.0
