"""prepare.py: real videos -> the official on-disk format, byte for byte as the official extraction; the
synthetic dataset is deterministic, in the official format, and its cues are what it says."""

import colorsys
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import data
import prepare

HAS_FFMPEG = (shutil.which("ffmpeg") is not None) and (shutil.which("ffprobe") is not None)
needs_ffmpeg = pytest.mark.skipif(not HAS_FFMPEG, reason="ffmpeg/ffprobe not installed")
# Each frame's colour encodes its decode index n: red = (n % 16) * 16 + 8, green = (n // 16) * 16 + 8.
COUNTER = (
    "nullsrc=size={size}:rate={rate}:duration={seconds},geq=r='mod(N\\,16)*16+8':g='trunc(N/16)*16+8':b=128"
)
H264 = "-c:v libx264 -pix_fmt yuv420p".split()


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def lavfi(*sources):
    """ffmpeg's input options for generated sources (a test picture, a tone)."""
    return [option for source in sources for option in ("-f", "lavfi", "-i", source)]


def make_videos(folder):
    """Three good videos and one of each kind of bad one."""
    os.makedirs(folder)
    path = lambda name: os.path.join(folder, name)
    # portrait 120x160, 10 fps, 3 s = 30 frames; 48 kHz stereo PCM: 440 Hz left, 1000 Hz right
    counter = COUNTER.format(size="120x160", rate=10, seconds=3)
    left = "sine=frequency=440:duration=3:sample_rate=48000"
    right = "sine=frequency=1000:duration=3:sample_rate=48000"
    stereo = "-filter_complex [1:a][2:a]amerge=inputs=2[a] -map 0:v -map [a] -c:a pcm_s16le".split()
    ffmpeg(*lavfi(counter, left, right), *stereo, *H264, path("counter.mov"))
    # landscape 160x120, 25 fps, 11 s = 275 frames (only the first 250 count), AAC mono
    counter = COUNTER.format(size="160x120", rate=25, seconds=11)
    faststart = "-c:a aac -movflags +faststart".split()  # the index first, then the frames
    ffmpeg(*lavfi(counter, "sine=frequency=300:duration=11"), *H264, *faststart, path("long.mp4"))
    # variable frame rate: 20 frames at 10 fps, then 20 at 5 fps (5.7 s, 40 / 5.7 fps on average)
    counter = COUNTER.format(size="160x120", rate=10, seconds=4)
    vfr = "-vf setpts='if(lt(N,20),N/10,2+(N-20)/5)/TB' -c:a aac".split()
    ffmpeg(*lavfi(counter, "sine=duration=6"), *vfr, *H264, path("vfr.mkv"))  # Matroska keeps the times
    ffmpeg("-i", path("vfr.mkv"), "-c", "copy", path("vfr.mp4"))
    os.remove(path("vfr.mkv"))
    ffmpeg(*lavfi("testsrc=size=160x120:rate=10:duration=2"), *H264, path("noaudio.mp4"))
    short = lavfi("testsrc=size=160x120:rate=25:duration=0.2", "sine=duration=0.2")
    ffmpeg(*short, *H264, "-c:a", "aac", path("short.mp4"))
    content = open(path("long.mp4"), "rb").read()
    open(path("truncated.mp4"), "wb").write(content[: len(content) // 2])  # index intact, frames cut off
    ffmpeg("-i", path("long.mp4"), "-c", "copy", path("moov_last.mp4"))
    content = open(path("moov_last.mp4"), "rb").read()
    open(path("cut.mp4"), "wb").write(content[: len(content) // 2])  # index lost with the tail
    os.remove(path("moov_last.mp4"))
    open(path("notvideo.mp4"), "w").write("this is not a video\n")
    open(path("empty.mp4"), "w").close()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Videos in `in/`, `prepare_videos` run once into `out/`; returns (in, out, failures)."""
    if not HAS_FFMPEG:
        pytest.skip("ffmpeg/ffprobe not installed")
    root = tmp_path_factory.mktemp("videos")
    videos = str(root / "in")
    out = str(root / "out")
    make_videos(videos)
    failures = prepare.prepare_videos(videos, out, workers=2)
    return videos, out, failures


def frame_number(jpeg_path):
    rgb = np.asarray(Image.open(jpeg_path), dtype=float)[96:128, 96:128].reshape(-1, 3).mean(0)
    return int(round((rgb[0] - 8) / 16)) + 16 * int(round((rgb[1] - 8) / 16))


def frame_paths(out, video_id):
    return [os.path.join(out, "frames", f"frame_{i}", f"{video_id}.jpg") for i in range(10)]


def frame_numbers(out, video_id):
    return [frame_number(path) for path in frame_paths(out, video_id)]


def test_frame_indices_match_the_official_examples():
    # docs/preprocessing.md, section 5: byte-matched against the official extractor's output
    assert prepare.frame_indices(125) == [0, 11, 24, 36, 49, 61, 74, 86, 99, 111]
    assert prepare.frame_indices(299) == [0, 28, 58, 88, 118, 148, 178, 208, 238, 268]


@pytest.mark.parametrize(
    "size, resized, offset",
    [
        ((1280, 720), (398, 224), (87, 0)),
        ((333, 500), (224, 336), (0, 56)),
        ((300, 225), (298, 224), (37, 0)),
        ((227, 224), (227, 224), (2, 0)),  # round(1.5) = 2
        ((225, 224), (225, 224), (0, 0)),  # round(0.5) = 0
    ],
)
def test_resize_crop_uses_the_torchvision_size_rule_and_half_even_offsets(size, resized, offset):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8))
    expected = image if resized == size else image.resize(resized, Image.BILINEAR)
    expected = expected.crop((offset[0], offset[1], offset[0] + 224, offset[1] + 224))
    assert np.array_equal(np.asarray(data.resize_crop(image, 224, Image.BILINEAR)), np.asarray(expected))


def test_only_complete_videos_are_listed(extracted):
    _, out, _ = extracted
    rows = json.load(open(os.path.join(out, "data.json")))["data"]
    assert sorted(row["video_id"] for row in rows) == ["counter", "long", "vfr"]
    for row in rows:
        assert os.path.isfile(os.path.join(out, row["wav"]))
        for i in range(10):
            assert os.path.isfile(
                os.path.join(out, row["video_path"], f"frame_{i}", f"{row['video_id']}.jpg")
            )


def test_bad_videos_are_reported_with_their_reason(extracted):
    _, out, failures = extracted
    with open(os.path.join(out, "failed.csv")) as f:
        rows = {os.path.basename(r["video"]): r["reason"] for r in csv.DictReader(f)}
    assert {os.path.basename(v): r for v, r in failures} == rows
    assert set(rows) == {"noaudio.mp4", "short.mp4", "truncated.mp4", "cut.mp4", "notvideo.mp4", "empty.mp4"}
    assert rows["noaudio.mp4"] == "no audio stream"
    assert rows["short.mp4"].startswith("too short")
    assert rows["truncated.mp4"].startswith("truncated or corrupt")
    for name in ("cut.mp4", "notvideo.mp4", "empty.mp4"):
        assert rows[name].startswith("not a readable video (")
        assert "\n" not in rows[name]
    names = {name.split(".")[0] for _, _, files in os.walk(out) for name in files}
    assert names == {"counter", "long", "vfr", "data", "failed", "labels"}  # the failed wrote nothing


def test_bad_videos_are_printed_and_the_exit_status_is_1(extracted, tmp_path, capsys):
    videos, _, _ = extracted
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("counter.mov", "noaudio.mp4"):
        shutil.copy(os.path.join(videos, name), folder)
    assert prepare.main(["videos", "--input", str(folder), "--out", str(tmp_path / "out")]) == 1
    assert "noaudio.mp4: no audio stream" in capsys.readouterr().out


def test_a_folder_of_good_videos_becomes_their_datafile_with_exit_status_0(extracted, tmp_path):
    videos, _, _ = extracted
    (tmp_path / "in").mkdir()
    shutil.copy(os.path.join(videos, "counter.mov"), tmp_path / "in")
    out = str(tmp_path / "out")
    assert prepare.main(["videos", "--input", str(tmp_path / "in"), "--out", out]) == 0
    assert [row["video_id"] for row in json.load(open(os.path.join(out, "data.json")))["data"]] == ["counter"]


def test_wav_is_16k_mono_pcm16_of_the_video_length(extracted):
    _, out, _ = extracted
    info = sf.info(os.path.join(out, "audio", "counter.wav"))  # from 48 kHz stereo
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
        ("long", [0, 24, 49, 74, 99, 124, 149, 174, 199, 224]),  # total = min(275, int(25 * 10)) = 250
        ("vfr", [0, 3, 7, 11, 15, 19, 23, 27, 31, 35]),  # total = min(40, int(40 / 5.7 * 10)) = 40
    ],
)
def test_frames_are_the_decode_indices_the_official_extractor_reads(extracted, video_id, indices):
    _, out, _ = extracted
    assert frame_numbers(out, video_id) == indices


def test_frame_bytes_equal_a_direct_decode_resized_with_pillow(extracted, tmp_path):
    videos, out, _ = extracted
    png = str(tmp_path / "frame.png")  # decode index 14 = frame_5 of counter, lossless
    ffmpeg("-i", os.path.join(videos, "counter.mov"), "-vf", "select='eq(n\\,14)'", "-frames:v", "1", png)
    image = Image.open(png).convert("RGB").resize((224, 298), Image.BILINEAR).crop((0, 37, 224, 261))
    expected = io.BytesIO()
    image.save(expected, "JPEG")
    assert open(os.path.join(out, "frames", "frame_5", "counter.jpg"), "rb").read() == expected.getvalue()


def test_rerun_skips_finished_videos_and_redoes_those_a_run_cut_short_or_a_user_left_incomplete(
    extracted, tmp_path
):
    videos, first_out, _ = extracted
    out = str(tmp_path / "out")
    shutil.copytree(first_out, out)
    good = tmp_path / "good"
    good.mkdir()
    for name in ("counter.mov", "long.mp4", "vfr.mp4"):
        shutil.copy(os.path.join(videos, name), good)
    files = {}  # video_id: its wav and frames
    for video_id in ("counter", "long", "vfr"):
        files[video_id] = [os.path.join(out, "audio", f"{video_id}.wav"), *frame_paths(out, video_id)]
    original = {path: open(path, "rb").read() for paths in files.values() for path in paths}
    before = {path: os.stat(path).st_mtime_ns for path in original}
    os.remove(files["counter"][3])  # a frame deleted
    open(files["long"][7], "r+b").truncate(500)  # a run killed while writing a frame: no wav yet
    os.remove(files["long"][0])
    open(files["long"][0] + ".part", "wb").close()
    assert prepare.prepare_videos(str(good), out, workers=1) == []
    assert {path: open(path, "rb").read() for path in original} == original
    assert not os.path.exists(files["long"][0] + ".part")
    assert all(os.stat(path).st_mtime_ns == before[path] for path in files["vfr"])  # untouched
    assert os.stat(files["long"][1]).st_mtime_ns != before[files["long"][1]]  # redone
    before = {path: os.stat(path).st_mtime_ns for path in original}
    prepare.prepare_videos(str(good), out, workers=1)
    assert {path: os.stat(path).st_mtime_ns for path in original} == before  # nothing left to do


def test_labels_csv_gives_each_video_its_labels_and_each_label_its_own_mid(extracted, tmp_path):
    videos, first_out, _ = extracted
    out = str(tmp_path / "out")
    shutil.copytree(first_out, out)  # already extracted: this run only writes the lists
    labels = tmp_path / "labels.csv"
    labels.write_text('video_id,labels\ncounter,dog\nlong,"cat, dog"\n')
    failures = prepare.prepare_videos(videos, out, str(labels), workers=1)
    with open(os.path.join(out, "labels.csv")) as f:
        assert [(row["mid"], row["display_name"]) for row in csv.DictReader(f)] == [
            ("cat", "cat"),
            ("dog", "dog"),
        ]
    rows = {row["video_id"]: row["labels"] for row in json.load(open(os.path.join(out, "data.json")))["data"]}
    assert rows == {"counter": "dog", "long": "cat,dog"}
    assert (os.path.join(videos, "vfr.mp4"), f"no labels for 'vfr' in {labels}") in failures


def test_missing_ffmpeg_names_the_install_commands(monkeypatch, tmp_path):
    monkeypatch.setattr(prepare.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="ffmpeg and ffprobe") as error:
        prepare.prepare_videos(str(tmp_path), str(tmp_path / "out"))
    for install in (
        "apt-get install -y ffmpeg",
        "brew install ffmpeg",
        "conda install -c conda-forge ffmpeg",
    ):
        assert install in str(error.value)


# -----------------------------------------------------------------------------------------------------
# Inputs seen in the wild


def ffmpeg_encoders():
    listing = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return {line.split()[1] for line in listing.splitlines() if len(line.split()) > 1}


def streamed_container_args():
    """ffmpeg output options for a clip whose container holds no duration and no frame count: a webm
    (VP9 + Opus) as browsers and downloaders write it, else Matroska with ffmpeg's own encoders; both written
    to a pipe, so the muxer cannot go back to fill the duration in."""
    encoders = ffmpeg_encoders()
    if {"libvpx-vp9", "libopus"} <= encoders:
        return [
            "-c:v",
            "libvpx-vp9",
            "-deadline",
            "realtime",
            "-cpu-used",
            "8",
            "-c:a",
            "libopus",
            "-f",
            "webm",
        ]
    if {"mpeg4", "aac"} <= encoders:
        return ["-c:v", "mpeg4", "-q:v", "2", "-c:a", "aac", "-f", "matroska"]
    pytest.skip("this ffmpeg can write neither VP9 + Opus nor MPEG-4 + AAC")


@needs_ffmpeg
def test_a_webm_without_duration_has_its_frames_counted_and_extracted_as_the_official_extractor_would(
    tmp_path,
):
    folder = tmp_path / "in"
    folder.mkdir()
    video = folder / "browser.webm"
    counter = COUNTER.format(size="160x120", rate=14.985, seconds=4.9)
    cmd = ["ffmpeg", "-v", "error", *lavfi(counter, "sine=duration=4.9"), "-pix_fmt", "yuv420p"]
    with open(video, "wb") as pipe:  # 4.9 s at 14.985 fps: 74 frames, with sound
        subprocess.run(cmd + streamed_container_args() + ["pipe:1"], stdout=pipe, check=True)
    assert prepare.probe(str(video)) == (0, 74)
    out = str(tmp_path / "out")
    assert prepare.prepare_videos(str(folder), out, workers=1) == []
    assert (
        frame_numbers(out, "browser") == prepare.frame_indices(74) == [0, 6, 13, 21, 28, 36, 43, 50, 58, 65]
    )


@needs_ffmpeg
def test_an_input_folder_without_videos_is_an_error_naming_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no videos here\n")
    assert prepare.main(["videos", "--input", str(empty), "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert str(empty) in message


@needs_ffmpeg
def test_two_videos_with_one_video_id_are_an_error_before_any_work(tmp_path):
    for folder in ("dog", "cat"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        (tmp_path / "in" / folder / "001.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="1 video_ids name two videos, e.g. '001'"):
        prepare.prepare_videos(str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@needs_ffmpeg
def test_an_audio_only_mp4_fails_with_no_video_stream(tmp_path):
    (tmp_path / "in").mkdir()
    audio = str(tmp_path / "in" / "voice.mp4")
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", audio)
    failures = prepare.prepare_videos(str(tmp_path / "in"), str(tmp_path / "out"), workers=1)
    assert failures == [(audio, "no video stream")]


@pytest.mark.parametrize("argv", [["--help"], ["videos", "--help"], ["synthetic", "--help"]])
def test_help_prints_the_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        prepare.main(argv)
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


# -----------------------------------------------------------------------------------------------------
# The synthetic dataset


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


TINY = dict(n_train=40, n_test=30, image_size=32, seconds=0.5)  # 70 clips: enough to use the pool


def test_synthetic_is_the_same_bytes_for_a_seed_with_or_without_workers(tmp_path):
    prepare.make_synthetic(str(tmp_path / "a"), seed=3, workers=2, **TINY)
    prepare.make_synthetic(str(tmp_path / "b"), seed=3, workers=1, **TINY)
    prepare.make_synthetic(str(tmp_path / "c"), seed=4, workers=1, **TINY)
    pooled = read_tree(str(tmp_path / "a"))
    in_process = read_tree(str(tmp_path / "b"))
    other_seed = read_tree(str(tmp_path / "c"))
    assert len(pooled) == 4 + 70 * 11  # 2 datafiles, labels.csv, objects.json; a wav + 10 frames a clip
    assert pooled == in_process
    assert pooled["audio/train_00000.wav"] != other_seed["audio/train_00000.wav"]


def test_synthetic_is_in_the_official_format(tmp_path):
    out = str(tmp_path / "syn")
    prepare.make_synthetic(out, n_train=12, n_test=5, image_size=48, seconds=1.0, num_classes=4, workers=1)
    with open(os.path.join(out, "labels.csv")) as f:
        mids = [row["mid"] for row in csv.DictReader(f)]
    assert len(mids) == 4
    for split, n in (("train", 12), ("test", 5)):
        rows = read_rows(out, split)
        assert len(rows) == n
        assert all(row["video_id"].startswith(split) for row in rows)
        for row in rows:
            assert row["labels"] in mids  # single-label
            info = sf.info(os.path.join(out, row["wav"]))
            assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 16000)
            for i in range(10):
                image = Image.open(
                    os.path.join(out, row["video_path"], f"frame_{i}", f"{row['video_id']}.jpg")
                )
                assert (image.mode, image.size) == ("RGB", (48, 48))


def test_synthetic_multilabel_has_one_to_three_distinct_events(tmp_path):
    out = str(tmp_path / "syn")
    prepare.make_synthetic(out, n_train=60, n_test=0, image_size=32, seconds=0.5, multilabel=True, workers=1)
    counts = [len(set(row["labels"].split(","))) for row in read_rows(out, "train")]
    assert set(counts) == {1, 2, 3}


def test_synthetic_object_hue_sets_the_pitch_of_its_sound():
    disk_with_pure_tone = [0]
    frames, pcm, _ = prepare.draw_clip(np.random.default_rng(5), disk_with_pure_tone, 64, 1.0)
    pixels = frames[5].reshape(-1, 3) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    vivid = (hsv[:, 1] > 0.6) & (hsv[:, 2] > 0.6)  # the object, not the dull background
    hue = np.median(hsv[vivid, 0])
    pitch = np.argmax(np.abs(np.fft.rfft(pcm / 32768.0)))  # 1 s: bin k = k Hz
    assert pitch == pytest.approx(200 * 2 ** (3 * hue / 0.8), rel=0.03)


def test_synthetic_number_of_objects_is_the_number_of_onsets():
    _, pcm, _ = prepare.draw_clip(np.random.default_rng(1), [8, 8, 8], 64, 2.56)  # three plucks
    power = (pcm / 32768.0) ** 2
    energy = np.convolve(power, np.ones(160) / 160, mode="same")[::160]  # 10 ms frames
    loud = energy > 0.1 * energy.max()
    assert np.count_nonzero(loud[1:] & ~loud[:-1]) + int(loud[0]) == 3


def test_inside_objects_tests_points_against_each_shape():
    disk = {"class": 0, "x": 10.0, "y": 20.0, "radius": 4.0}
    bar = {"class": 9, "x": 40.0, "y": 20.0, "radius": 4.0}  # an ellipse 1.1 r wide, 0.45 r high
    x = np.array([10, 13.9, 10, 40, 44.3, 40])
    y = np.array([20, 20, 24.5, 20, 20, 22])
    inside = prepare.inside_objects([disk, bar], x, y)
    assert inside.tolist() == [True, True, False, True, True, False]
    assert not prepare.inside_objects([], x, y).any()


def test_synthetic_object_geometry_covers_the_drawn_objects():
    disk_and_square = [0, 1]
    frames, _, objects = prepare.draw_clip(np.random.default_rng(2), disk_and_square, 64, 2.56)
    assert len(objects) == 10
    assert all(len(o) == 2 for o in objects)
    centres = np.arange(64) + 0.5
    for frame, frame_objects in zip(frames, objects):
        pixels = frame.reshape(-1, 3) / 255.0
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels]).reshape(64, 64, 3)
        drawn = (hsv[..., 1] > 0.5) & (hsv[..., 2] > 0.7)  # saturated and bright: the objects
        inside = prepare.inside_objects(frame_objects, centres[None, :], centres[:, None])
        both = (drawn & inside).sum()
        assert both >= 0.99 * drawn.sum()  # every object-coloured pixel lies inside an object
        assert both >= 0.8 * inside.sum()  # and most inside pixels are object-coloured (not edges)


def test_synthetic_writes_the_objects_of_every_clip_and_frame(tmp_path):
    out = str(tmp_path / "syn")
    prepare.make_synthetic(out, n_train=3, n_test=2, image_size=32, seconds=0.5, num_classes=4, workers=1)
    objects = json.load(open(os.path.join(out, "objects.json")))
    rows = read_rows(out, "train") + read_rows(out, "test")
    assert objects["frame_size"] == 32
    assert objects["shapes"][:4] == ["disk", "square", "triangle", "diamond"]
    assert "shape_mask" in objects["geometry"]
    assert "sounding" in objects["geometry"]
    assert sorted(objects["clips"]) == sorted(row["video_id"] for row in rows)
    for row in rows:
        frames = objects["clips"][row["video_id"]]
        assert len(frames) == 10
        assert 1 <= len(frames[0]) <= 3
        assert {f"/synth/{o['class']:02d}" for frame in frames for o in frame} == {row["labels"]}
        assert all(o["sounding"] is True for frame in frames for o in frame)  # no distractors asked for


def test_avdataset_reads_the_synthetic_dataset(tmp_path):
    out = str(tmp_path / "syn")
    prepare.make_synthetic(out, n_train=4, n_test=2, image_size=64, seconds=2.56, workers=1)
    ds = data.AVDataset(
        os.path.join(out, "train.json"), os.path.join(out, "labels.csv"), target_length=256, image_size=64
    )
    fbank, image, label = ds[0]
    assert tuple(fbank.shape) == (256, 128)
    assert tuple(image.shape) == (3, 64, 64)
    assert tuple(label.shape) == (10,)
    assert float(label.sum()) == 1.0


# -----------------------------------------------------------------------------------------------------
# The synthetic dataset with distractors: silent objects of other classes

# make_synthetic(out, **BEFORE_DISTRACTORS) as written before --distractors existed: the SHA-256 of its
# datafiles and labels.csv, of its wavs, of its JPEGs (as Pillow encodes them) and of objects.json's clips
BEFORE_DISTRACTORS = dict(n_train=4, n_test=2, seed=7, image_size=32, seconds=0.5, multilabel=True, workers=1)
DIGESTS_BEFORE = {
    "lists": "c4df499033e254b25e86d7e260803dfe9ce2e67b6df407193d41cf964981da02",
    "audio": "a976e4ee39ed8933f4a5a003f426689f9f0c7f00d8a5ac04932c3e9257ad513f",
    "frames": "0dc396bb88b09151346257b51fd45b44d43f86423c9421041550958f6545a11b",
    "clips": "5cc0895fd9ee4dc5f3c174d4574327ea31f023fe8a650489bdc7eb1acb33f115",
}


def sha256(*contents):
    return hashlib.sha256(b"".join(contents)).hexdigest()


def test_synthetic_without_distractors_writes_the_files_written_before_distractors_existed(tmp_path):
    out = str(tmp_path / "syn")
    prepare.make_synthetic(out, distractors=0, **BEFORE_DISTRACTORS)
    tree = read_tree(out)
    clips = json.load(open(os.path.join(out, "objects.json")))["clips"]
    for frames in clips.values():
        for frame in frames:
            for o in frame:
                assert o.pop("sounding") is True
    digests = {
        "lists": sha256(*(tree[name] for name in ("labels.csv", "test.json", "train.json"))),
        "audio": sha256(*(tree[name] for name in sorted(tree) if name.endswith(".wav"))),
        "frames": sha256(*(tree[name] for name in sorted(tree) if name.endswith(".jpg"))),
        "clips": sha256(json.dumps(clips).encode()),
    }
    assert digests == DIGESTS_BEFORE


def test_distractors_change_neither_the_audio_nor_the_labels(tmp_path):
    settings = dict(n_train=6, n_test=3, image_size=32, seconds=0.5, workers=1)
    prepare.make_synthetic(str(tmp_path / "none"), **settings)
    prepare.make_synthetic(str(tmp_path / "three"), distractors=3, **settings)
    without = read_tree(str(tmp_path / "none"))
    with_three = read_tree(str(tmp_path / "three"))
    heard = [name for name in without if not name.startswith("frames") and name != "objects.json"]
    assert len(heard) == 3 + 9  # labels.csv, 2 datafiles, 9 wavs
    assert all(without[name] == with_three[name] for name in heard)
    assert without["frames/frame_0/train_00000.jpg"] != with_three["frames/frame_0/train_00000.jpg"]


def test_distractors_leave_the_clips_own_draws_as_they_were():
    clips = [([3], 1), ([2, 2], 2), ([0, 5, 7], 3)]  # (classes, seed)
    for classes, seed in clips:
        frames, pcm, objects = prepare.draw_clip(np.random.default_rng(seed), classes, 48, 1.0)
        frames_4, pcm_4, objects_4 = prepare.draw_clip(np.random.default_rng(seed), classes, 48, 1.0, 4)
        assert np.array_equal(pcm, pcm_4)
        for frame, frame_4 in zip(objects, objects_4):  # object j still j-th from the left, as big
            left_to_right = sorted(frame_4, key=lambda o: o["x"])
            sounding = [(o["class"], o["radius"]) for o in left_to_right if o["sounding"]]
            assert sounding == [(o["class"], o["radius"]) for o in frame]
        # away from every object of both clips, the background and its pixel noise are the same
        centres = np.arange(48) + 0.5
        away = np.ones((10, 48, 48), dtype=bool)
        for i in range(10):
            for o in objects[i] + objects_4[i]:
                distance = np.hypot(centres[None, :] - o["x"], centres[:, None] - o["y"])
                away[i] &= distance > 1.2 * o["radius"] + 1
        assert away.mean() > 0.2
        assert np.array_equal(frames[away], frames_4[away])


def test_distractors_are_silent_objects_of_other_classes_inside_the_frame(tmp_path):
    out = str(tmp_path / "syn")
    size = ["--image-size", "32", "--seconds", "0.5", "--workers", "1", "--multilabel"]
    argv = ["synthetic", "--out", out, "--n-train", "6", "--n-test", "2", "--distractors", "6", *size]
    assert prepare.main(argv) == 0
    clips = json.load(open(os.path.join(out, "objects.json")))["clips"]
    for row in read_rows(out, "train") + read_rows(out, "test"):
        labels = set(row["labels"].split(","))
        for frame in clips[row["video_id"]]:
            silent = [o for o in frame if not o["sounding"]]
            sounding = [o for o in frame if o["sounding"]]
            assert len(silent) == 6
            assert len(sounding) == len(labels)  # multilabel: one object per event
            assert {f"/synth/{o['class']:02d}" for o in sounding} == labels
            assert not {f"/synth/{o['class']:02d}" for o in silent} & labels
            assert all(0 <= o[key] <= 32 for o in frame for key in ("x", "y"))


def random_clips(count, distractors, size=32):
    """`count` clips drawn with 1-3 sounding objects of random classes and `distractors` silent ones."""
    rng = np.random.default_rng(0)
    for _ in range(count):
        classes = list(rng.choice(10, size=rng.integers(1, 4), replace=False))
        yield prepare.draw_clip(rng, classes, size, 0.3, distractors)


def test_objects_with_distractors_stay_as_far_apart_as_three_sounding_objects_can_be():
    closest = []
    for distractors in range(7):
        for _, _, objects in random_clips(20, distractors):
            centres = np.array([(o["x"], o["y"]) for o in objects[0]])
            distances = np.hypot(*(centres[:, None] - centres[None, :]).T)
            closest.append(distances[~np.eye(len(centres), dtype=bool)].min(initial=np.inf))
    # 3 sounding objects alone lie in 3 slots S / 3 wide, at 0.3-0.7 of theirs: >= 0.6 S / 3 apart
    assert min(closest) >= 0.2 * 32 - 1e-3


def test_silent_objects_pulse_and_drift_with_the_sounding_ones():
    for _, _, objects in random_clips(20, 4):
        first = objects[0]
        for frame in objects[1:]:
            sizes = [o["radius"] / o0["radius"] for o, o0 in zip(frame, first)]
            shifts = [(o["x"] - o0["x"], o["y"] - o0["y"]) for o, o0 in zip(frame, first)]
            assert np.ptp(sizes) < 1e-3
            assert np.ptp(shifts, axis=0).max() < 1e-3


def test_silent_objects_have_the_sizes_and_colours_of_the_sounding_ones():
    radii = {True: [], False: []}  # by sounding
    hsv = {True: [], False: []}  # of each object's centre pixel on frame 0
    for frames, _, objects in random_clips(150, 2):
        for o in objects[0]:
            radii[o["sounding"]].append(o["radius"])
            if o["class"] != 5:  # a ring's centre is its hole
                rgb = frames[0, int(o["y"]), int(o["x"])] / 255.0
                hsv[o["sounding"]].append(colorsys.rgb_to_hsv(*rgb))
    for quantile in (0.05, 0.5, 0.95):
        sounding = np.quantile(radii[True], quantile)
        assert np.quantile(radii[False], quantile) == pytest.approx(sounding, rel=0.08)
        for channel in range(3):  # hue, saturation, value
            sounding = np.quantile(np.array(hsv[True])[:, channel], quantile)
            assert abs(np.quantile(np.array(hsv[False])[:, channel], quantile) - sounding) < 0.08


def test_sounding_objects_are_placed_as_the_silent_ones_are():
    places = {True: [], False: []}  # (x, y) of each object on frame 0, by sounding
    for _, _, objects in random_clips(300, 2):
        for o in objects[0]:
            places[o["sounding"]].append((o["x"], o["y"]))
    for quantile in (0.1, 0.5, 0.9):
        sounding = np.quantile(places[True], quantile, axis=0)
        assert np.abs(np.quantile(places[False], quantile, axis=0) - sounding).max() < 0.08 * 32


def test_sounding_objects_are_not_painted_or_listed_first():
    first_sounds = [objects[0][0]["sounding"] for _, _, objects in random_clips(50, 2)]
    assert any(first_sounds)
    assert not all(first_sounds)  # a silent object is painted first, under any it overlaps


def test_too_many_distractors_or_no_class_left_to_be_silent_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="distractors must be between 0 and 6, got 7"):
        prepare.make_synthetic(str(tmp_path / "a"), distractors=7)
    with pytest.raises(ValueError, match="num_classes above 3, got 3"):
        prepare.make_synthetic(str(tmp_path / "b"), num_classes=3, multilabel=True, distractors=1)
    assert not os.path.exists(tmp_path / "a")
    assert not os.path.exists(tmp_path / "b")
