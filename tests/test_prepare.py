"""prepare.py: real videos -> the official on-disk format, and the synthetic dataset."""

import colorsys
import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None, reason="ffmpeg/ffprobe not installed"
)
# Each frame's colour encodes its decode index n: red = (n % 16) * 16 + 8, green = (n // 16) * 16 + 8.
COUNTER = (
    "nullsrc=size={size}:rate={rate}:duration={seconds},geq=r='mod(N\\,16)*16+8':g='trunc(N/16)*16+8':b=128"
)


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def make_videos(folder):
    """Two good videos and one of each kind of bad one."""
    os.makedirs(folder)
    path = lambda name: os.path.join(folder, name)  # noqa: E731
    # portrait 120x160, 10 fps, 3 s = 30 frames; stereo PCM: 440 Hz left, 1000 Hz right
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        COUNTER.format(size="120x160", rate=10, seconds=3),
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=3:sample_rate=44100",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=1000:duration=3:sample_rate=44100",
        "-filter_complex",
        "[1:a][2:a]amerge=inputs=2[a]",
        "-map",
        "0:v",
        "-map",
        "[a]",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "pcm_s16le",
        path("counter.mov"),
    )
    # landscape 160x120, 25 fps, 11 s = 275 frames (only the first 250 count), AAC mono
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        COUNTER.format(size="160x120", rate=25, seconds=11),
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=300:duration=11",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-movflags",
        "+faststart",
        path("long.mp4"),
    )
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=160x120:rate=10:duration=2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        path("noaudio.mp4"),
    )
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=160x120:rate=25:duration=0.2",
        "-f",
        "lavfi",
        "-i",
        "sine=duration=0.2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        path("short.mp4"),
    )
    data = open(path("long.mp4"), "rb").read()
    open(path("truncated.mp4"), "wb").write(data[: len(data) // 2])  # index intact, frames cut off
    ffmpeg("-i", path("long.mp4"), "-c", "copy", path("moov_last.mp4"))
    data = open(path("moov_last.mp4"), "rb").read()
    open(path("cut.mp4"), "wb").write(data[: len(data) // 2])  # index lost with the tail
    os.remove(path("moov_last.mp4"))
    open(path("notvideo.mp4"), "w").write("this is not a video\n")
    open(path("empty.mp4"), "w").close()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Videos in `in/`, `prepare_videos` run once into `out/`; returns (in, out, failures)."""
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        pytest.skip("ffmpeg/ffprobe not installed")
    root = tmp_path_factory.mktemp("videos")
    videos, out = str(root / "in"), str(root / "out")
    make_videos(videos)
    failures = prepare.prepare_videos(videos, out, workers=2)
    return videos, out, failures


def frame_number(jpeg_path):
    rgb = np.asarray(Image.open(jpeg_path), dtype=float)[96:128, 96:128].reshape(-1, 3).mean(0)
    return int(round((rgb[0] - 8) / 16)) + 16 * int(round((rgb[1] - 8) / 16))


def test_frame_indices_match_the_official_examples():
    # ../shared/preprocessing.md 5.1: byte-matched against the official extractor's output
    assert prepare.frame_indices(125) == [0, 11, 24, 36, 49, 61, 74, 86, 99, 111]
    assert prepare.frame_indices(299) == [0, 28, 58, 88, 118, 148, 178, 208, 238, 268]


@pytest.mark.parametrize(
    "size, resized, offset",
    [
        ((1280, 720), (398, 224), (87, 0)),
        ((333, 500), (224, 336), (0, 56)),
        ((300, 225), (298, 224), (37, 0)),
        ((227, 224), (227, 224), (2, 0)),  # round(1.5) = 2
        ((225, 224), (225, 224), (0, 0)),
    ],
)  # round(0.5) = 0
def test_resize_crop_uses_the_torchvision_size_rule_and_half_even_offsets(size, resized, offset):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8))
    expected = image if resized == size else image.resize(resized, Image.BILINEAR)
    expected = expected.crop((offset[0], offset[1], offset[0] + 224, offset[1] + 224))
    assert np.array_equal(np.asarray(prepare.resize_crop(image)), np.asarray(expected))


def test_only_complete_videos_are_listed(extracted):
    _, out, _ = extracted
    data = json.load(open(os.path.join(out, "data.json")))["data"]
    assert sorted(e["video_id"] for e in data) == ["counter", "long"]
    for e in data:
        assert os.path.isfile(os.path.join(out, e["wav"]))
        assert all(
            os.path.isfile(os.path.join(out, e["video_path"], f"frame_{i}", f"{e['video_id']}.jpg"))
            for i in range(10)
        )


def test_bad_videos_are_reported_with_their_reason(extracted):
    videos, out, failures = extracted
    with open(os.path.join(out, "failed.csv")) as f:
        rows = {os.path.basename(r["video"]): r["reason"] for r in csv.DictReader(f)}
    assert {os.path.basename(v): r for v, r in failures} == rows
    assert set(rows) == {"noaudio.mp4", "short.mp4", "truncated.mp4", "cut.mp4", "notvideo.mp4", "empty.mp4"}
    assert rows["noaudio.mp4"] == "no audio stream"
    assert rows["short.mp4"].startswith("too short")
    assert rows["truncated.mp4"].startswith("truncated or corrupt")
    assert rows["cut.mp4"].startswith("not a readable video")
    assert rows["notvideo.mp4"].startswith("not a readable video")
    assert rows["empty.mp4"] == "empty file"
    names = {name.split(".")[0] for _, _, files in os.walk(out) for name in files}
    assert names == {"counter", "long", "data", "failed", "labels"}  # failed videos leave nothing behind


def test_wav_is_16k_mono_pcm16_of_the_video_length(extracted):
    _, out, _ = extracted
    info = sf.info(os.path.join(out, "audio", "counter.wav"))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 48000)
    info = sf.info(os.path.join(out, "audio", "long.wav"))
    assert abs(info.frames - 11 * 16000) < 0.01 * 16000  # AAC adds a few ms of padding


def test_wav_keeps_the_first_channel_rather_than_the_average(extracted):
    _, out, _ = extracted
    wave, _ = sf.read(os.path.join(out, "audio", "counter.wav"))
    spectrum = np.abs(np.fft.rfft(wave))  # 3 s: bin k = k / 3 Hz
    assert spectrum[440 * 3] > 1000 * spectrum[1000 * 3]  # left 440 Hz kept, right 1000 Hz gone


def test_frames_are_ten_224_rgb_jpegs(extracted):
    _, out, _ = extracted
    for i in range(10):
        image = Image.open(os.path.join(out, "frames", f"frame_{i}", "long.jpg"))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (224, 224))


@pytest.mark.parametrize(
    "video_id, indices",
    [
        ("counter", [0, 2, 5, 8, 11, 14, 17, 20, 23, 26]),  # total = 30 frames
        ("long", [0, 24, 49, 74, 99, 124, 149, 174, 199, 224]),
    ],
)  # total = min(275, int(25 * 10)) = 250
def test_frames_are_the_decode_indices_the_official_extractor_reads(extracted, video_id, indices):
    _, out, _ = extracted
    frames = [frame_number(os.path.join(out, "frames", f"frame_{i}", f"{video_id}.jpg")) for i in range(10)]
    assert frames == indices


def test_frame_bytes_equal_a_direct_decode_resized_with_pillow(extracted, tmp_path):
    videos, out, _ = extracted
    png = str(tmp_path / "frame.png")  # decode index 14 = frame_5 of counter, lossless
    ffmpeg("-i", os.path.join(videos, "counter.mov"), "-vf", "select='eq(n\\,14)'", "-frames:v", "1", png)
    image = Image.open(png).convert("RGB").resize((224, 298), Image.BILINEAR).crop((0, 37, 224, 261))
    expected = io.BytesIO()
    image.save(expected, "JPEG")
    assert open(os.path.join(out, "frames", "frame_5", "counter.jpg"), "rb").read() == expected.getvalue()


@needs_ffmpeg
def test_rerun_skips_finished_videos_and_redoes_missing_or_broken_outputs(extracted, tmp_path):
    videos, first_out, _ = extracted
    out = str(tmp_path / "out")
    shutil.copytree(first_out, out)
    listing = tmp_path / "list.txt"
    listing.write_text(os.path.join(videos, "counter.mov") + "\n")
    frames = [os.path.join(out, "frames", f"frame_{i}", "counter.jpg") for i in range(10)]
    wav = os.path.join(out, "audio", "counter.wav")
    before = {p: os.stat(p).st_mtime_ns for p in frames + [wav]}
    original = [open(p, "rb").read() for p in frames]
    os.remove(frames[3])
    open(frames[7], "r+b").truncate(500)  # a broken JPEG
    assert prepare.prepare_videos(str(listing), out, workers=1) == []
    assert [open(p, "rb").read() for p in frames] == original
    assert all(os.stat(p).st_mtime_ns == before[p] for p in frames + [wav] if p not in (frames[3], frames[7]))
    before = {p: os.stat(p).st_mtime_ns for p in frames + [wav]}
    prepare.prepare_videos(str(listing), out, workers=1)
    assert {p: os.stat(p).st_mtime_ns for p in frames + [wav]} == before  # nothing left to do


@needs_ffmpeg
def test_exit_status_is_nonzero_iff_a_video_failed(extracted, tmp_path):
    videos, _, _ = extracted
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text(os.path.join(videos, "counter.mov") + "\n")
    bad.write_text(os.path.join(videos, "counter.mov") + "\n" + os.path.join(videos, "noaudio.mp4") + "\n")
    run = lambda listing: subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "prepare.py"),
            "videos",  # noqa
            "--input",
            str(listing),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert run(good).returncode == 0
    result = run(bad)
    assert result.returncode == 1
    assert "noaudio.mp4: no audio stream" in result.stdout


def test_label_csv_layouts_are_read(tmp_path):
    ours = tmp_path / "ours.csv"
    ours.write_text('video_id,labels\nclip1,"/m/a,/m/b"\nclip2,/m/c\n')
    assert prepare.read_video_labels(str(ours)) == {"clip1": ["/m/a", "/m/b"], "clip2": ["/m/c"]}
    vggsound = tmp_path / "vggsound.csv"
    vggsound.write_text("---g-f_I2yQ,1,people marching,test\n")
    labels = prepare.read_video_labels(str(vggsound))
    assert labels["---g-f_I2yQ_000001"] == labels["---g-f_I2yQ_1"] == ["people marching"]
    audioset = tmp_path / "segments.csv"
    audioset.write_text(
        "# Segments csv\n# YTID, start_seconds, end_seconds, positive_labels\n"
        '00W1lcxW-WU, 40.000, 50.000, "/m/09x0r,/t/dd00001"\n'
    )
    assert prepare.read_video_labels(str(audioset))["00W1lcxW-WU_40.000"] == ["/m/09x0r", "/t/dd00001"]


def test_labels_given_by_name_get_a_label_csv(extracted, tmp_path):
    _, first_out, _ = extracted
    out = str(tmp_path / "out")
    shutil.copytree(first_out, out)  # already extracted: this run only writes the lists
    labels = tmp_path / "labels.csv"
    labels.write_text('video_id,labels\ncounter,dog\nlong,"cat,dog"\n')
    prepare.prepare_videos(os.path.join(first_out, "..", "in"), out, str(labels), workers=1)
    with open(os.path.join(out, "labels.csv")) as f:
        mids = {row["display_name"]: row["mid"] for row in csv.DictReader(f)}
    data = {e["video_id"]: e["labels"] for e in json.load(open(os.path.join(out, "data.json")))["data"]}
    assert sorted(mids) == ["cat", "dog"]
    assert data == {"counter": mids["dog"], "long": f"{mids['cat']},{mids['dog']}"}


def test_missing_ffmpeg_names_the_install_command(monkeypatch):
    prepare.check_ffmpeg.cache_clear()
    monkeypatch.setattr(prepare.shutil, "which", lambda name: None)
    try:
        with pytest.raises(RuntimeError, match="apt-get install -y ffmpeg"):
            prepare.check_ffmpeg()
    finally:
        prepare.check_ffmpeg.cache_clear()


# -----------------------------------------------------------------------------------------------------
# synthetic dataset


def read_tree(folder):
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


TINY = dict(n_train=40, n_test=30, image_size=32, seconds=0.5)  # 70 clips: enough to use the process pool


def test_synthetic_is_the_same_bytes_for_a_seed_with_or_without_workers(tmp_path):
    prepare.make_synthetic(str(tmp_path / "a"), seed=3, workers=2, **TINY)
    prepare.make_synthetic(str(tmp_path / "b"), seed=3, workers=1, **TINY)
    prepare.make_synthetic(str(tmp_path / "c"), seed=4, workers=1, **TINY)
    a, b, c = (read_tree(str(tmp_path / x)) for x in "abc")
    assert (
        len(a) == 4 + 70 * 11 and a == b
    )  # datafiles, labels.csv, objects.json; a wav and 10 frames per clip
    assert a["audio/train_00000.wav"] != c["audio/train_00000.wav"]


def test_synthetic_is_in_the_official_format(tmp_path):
    out = str(tmp_path / "syn")
    prepare.make_synthetic(out, n_train=12, n_test=5, image_size=48, seconds=1.0, num_classes=4, workers=1)
    with open(os.path.join(out, "labels.csv")) as f:
        mids = [row["mid"] for row in csv.DictReader(f)]
    assert len(mids) == 4
    for split, n in (("train", 12), ("test", 5)):
        data = json.load(open(os.path.join(out, f"{split}.json")))["data"]
        assert len(data) == n and all(e["video_id"].startswith(split) for e in data)
        for e in data:
            assert e["labels"] in mids  # single-label
            info = sf.info(os.path.join(out, e["wav"]))
            assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 16000)
            for i in range(10):
                image = Image.open(os.path.join(out, e["video_path"], f"frame_{i}", f"{e['video_id']}.jpg"))
                assert (image.mode, image.size) == ("RGB", (48, 48))


def test_synthetic_multilabel_has_one_to_three_distinct_events(tmp_path):
    out = str(tmp_path / "syn")
    prepare.make_synthetic(out, n_train=60, n_test=0, image_size=32, seconds=0.5, multilabel=True, workers=1)
    counts = [
        len(set(e["labels"].split(","))) for e in json.load(open(os.path.join(out, "train.json")))["data"]
    ]
    assert set(counts) == {1, 2, 3}


def test_synthetic_object_hue_sets_the_pitch_of_its_sound():
    frames, pcm, _ = prepare.draw_clip(np.random.default_rng(5), [0], 64, 1.0)  # one disk, one pure tone
    pixels = frames[5].reshape(-1, 3) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    hue = np.median(hsv[(hsv[:, 1] > 0.6) & (hsv[:, 2] > 0.6), 0])  # the object, not the dull background
    pitch = np.argmax(np.abs(np.fft.rfft(pcm / 32768.0)))  # 1 s: bin k = k Hz
    assert pitch == pytest.approx(200 * 2 ** (3 * hue / 0.8), rel=0.03)


def test_synthetic_number_of_objects_is_the_number_of_onsets():
    _, pcm, _ = prepare.draw_clip(np.random.default_rng(1), [8, 8, 8], 64, 2.56)  # three plucks
    energy = np.convolve((pcm / 32768.0) ** 2, np.ones(160) / 160, mode="same")[::160]  # 10 ms frames
    loud = energy > 0.1 * energy.max()
    assert np.count_nonzero(loud[1:] & ~loud[:-1]) + int(loud[0]) == 3


def test_inside_objects_tests_points_against_each_shape():
    disk = {"class": 0, "x": 10.0, "y": 20.0, "radius": 4.0}
    bar = {"class": 9, "x": 40.0, "y": 20.0, "radius": 4.0}  # an ellipse 1.1 r wide, 0.45 r high
    x, y = np.array([10, 13.9, 10, 40, 44.3, 40]), np.array([20, 20, 24.5, 20, 20, 22])
    assert prepare.inside_objects([disk, bar], x, y).tolist() == [True, True, False, True, True, False]
    assert not prepare.inside_objects([], x, y).any()


def test_synthetic_object_geometry_covers_the_drawn_objects():
    frames, _, objects = prepare.draw_clip(np.random.default_rng(2), [0, 1], 64, 2.56)  # a disk and a square
    assert len(objects) == 10 and all(len(o) == 2 for o in objects)
    centres = np.arange(64) + 0.5
    for frame, frame_objects in zip(frames, objects):
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in frame.reshape(-1, 3) / 255.0]).reshape(64, 64, 3)
        drawn = (hsv[..., 1] > 0.5) & (
            hsv[..., 2] > 0.7
        )  # saturated and bright: the objects, not the background
        inside = prepare.inside_objects(frame_objects, centres[None, :], centres[:, None])
        assert (
            drawn & inside
        ).sum() >= 0.99 * drawn.sum()  # every object-coloured pixel lies inside an object
        assert (
            drawn & inside
        ).sum() >= 0.8 * inside.sum()  # and most inside pixels are object-coloured (not edges)


def test_synthetic_writes_the_objects_of_every_clip_and_frame(tmp_path):
    out = str(tmp_path / "syn")
    prepare.make_synthetic(out, n_train=3, n_test=2, image_size=32, seconds=0.5, num_classes=4, workers=1)
    objects = json.load(open(os.path.join(out, "objects.json")))
    rows = [
        e for split in ("train", "test") for e in json.load(open(os.path.join(out, f"{split}.json")))["data"]
    ]
    assert objects["frame_size"] == 32 and sorted(objects["clips"]) == sorted(e["video_id"] for e in rows)
    for e in rows:
        frames = objects["clips"][e["video_id"]]
        assert len(frames) == 10 and 1 <= len(frames[0]) <= 3
        assert {prepare.synthetic_mid(o["class"]) for f in frames for o in f} == {e["labels"]}
    found, path = prepare.read_objects(None, os.path.join(out, "test.json"), ["test_00000"])
    assert path == os.path.join(out, "objects.json") and found == objects
    with pytest.raises(ValueError, match="no objects for 1 of the 2 clips"):
        prepare.read_objects(path, None, ["test_00000", "elsewhere"])
    assert prepare.read_objects(None, str(tmp_path / "real" / "data.json"), ["x"]) == (None, None)


def test_avdataset_reads_the_synthetic_dataset(tmp_path):
    data = pytest.importorskip("data")
    if not hasattr(data, "AVDataset"):
        pytest.skip("data.AVDataset not written yet")
    out = str(tmp_path / "syn")
    prepare.make_synthetic(out, n_train=4, n_test=2, image_size=64, seconds=2.56, workers=1)
    ds = data.AVDataset(
        os.path.join(out, "train.json"), os.path.join(out, "labels.csv"), target_length=256, image_size=64
    )
    fbank, image, label = ds[0]
    assert (
        tuple(fbank.shape) == (256, 128) and tuple(image.shape) == (3, 64, 64) and tuple(label.shape) == (10,)
    )
    assert float(label.sum()) == 1.0
