"""prepare.py: real videos -> the official on-disk format, byte for byte as the official extraction."""

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
HAS_FFMPEG = (shutil.which("ffmpeg") is not None) and (shutil.which("ffprobe") is not None)
needs_ffmpeg = pytest.mark.skipif(not HAS_FFMPEG, reason="ffmpeg/ffprobe not installed")
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
    good = tmp_path / "good.txt"
    bad = tmp_path / "bad.txt"
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
    with open(video, "wb") as pipe:  # 4.9 s at 14.985 fps: 74 frames, with sound
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-f",
                "lavfi",
                "-i",
                COUNTER.format(size="160x120", rate=14.985, seconds=4.9),
                "-f",
                "lavfi",
                "-i",
                "sine=frequency=440:duration=4.9",
                "-pix_fmt",
                "yuv420p",
                *streamed_container_args(),
                "pipe:1",
            ],
            stdout=pipe,
            check=True,
        )
    facts = prepare.probe(str(video))
    assert (facts["count"], facts["total"]) == (74, 74)
    out = str(tmp_path / "out")
    assert prepare.prepare_videos(str(folder), out, workers=1) == []
    frames = [frame_number(os.path.join(out, "frames", f"frame_{i}", "browser.jpg")) for i in range(10)]
    assert frames == prepare.frame_indices(74) == [0, 6, 13, 21, 28, 36, 43, 50, 58, 65]


def run_prepare(*argv):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "prepare.py"), *argv], capture_output=True, text=True, timeout=120
    )


@needs_ffmpeg
def test_an_input_folder_without_videos_is_an_error_naming_the_folder_and_the_extensions(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no videos here\n")
    result = run_prepare("videos", "--input", str(empty), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert str(empty) in message
    assert ".mp4" in message
    assert ".webm" in message


@needs_ffmpeg
def test_audio_only_files_are_listed_among_the_failures_with_no_video_stream(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(folder / "voice.m4a"))
    sf.write(str(folder / "tone.wav"), np.zeros(16000, np.int16), 16000)
    out = str(tmp_path / "out")
    failures = prepare.prepare_videos(str(folder), out, workers=1)
    assert {os.path.basename(video): reason for video, reason in failures} == {
        "voice.m4a": "no video stream",
        "tone.wav": "no video stream",
    }
    with open(os.path.join(out, "failed.csv")) as f:
        assert len(list(csv.DictReader(f))) == 2


@pytest.mark.parametrize("argv", [["--help"], ["videos", "--help"], ["synthetic", "--help"]])
def test_help_prints_the_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        prepare.main(argv)
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")
