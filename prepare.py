"""
Prepare data for CAV-MAE in the official on-disk format, from real videos or from nothing.

    python prepare.py videos --input DIR_OR_LIST --out OUT [--labels CSV] [--workers N]
    python prepare.py synthetic --out data/synthetic [--n-train 2000 --n-test 500 --seed 0 --multilabel]

The format (what data.py reads):
    datafile   {"data": [{"video_id", "wav", "video_path", "labels": "mid1,mid2"}, ...]}
    labels.csv index,mid,display_name
    wav        16 kHz mono PCM16:            OUT/audio/{video_id}.wav
    frames     10 RGB JPEGs per video:       {video_path}/frame_{i}/{video_id}.jpg, i = 0..9
Paths inside our datafiles are relative to the datafile's folder, so a dataset folder can be moved.

`videos` reproduces the official extraction (../shared/preprocessing.md section 5) with the ffmpeg and
ffprobe programs: audio resampled to 16 kHz keeping the first channel, and the 10 frames the official
OpenCV extractor reads, resized (shorter side 224, Pillow bilinear), centre-cropped to 224 and saved with
Pillow's JPEG defaults. `synthetic` draws a toy audio-visual dataset (shapes that sound) with
instance-level correspondences between the modalities, so retrieval must learn more than the class, and
records where each object is on each frame (objects.json, for eval.py's localisation score).
"""

import argparse
import contextlib
import csv
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction

import numpy as np
import soundfile as sf
from PIL import Image
from tqdm import tqdm

import data

SAMPLE_RATE = 16000
NUM_FRAMES = 10  # frames per video, evenly spaced over the first 10 seconds
FRAME_SIZE = 224  # side of the stored frames
MIN_SAMPLES = 400  # one 25 ms fbank window: a shorter wav cannot be featurised
VIDEO_EXTS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp", ".ts"}
FFMPEG_HELP = (
    "prepare.py needs the `ffmpeg` and `ffprobe` programs on the PATH. Install them with one of\n"
    "  sudo apt-get install -y ffmpeg          (Debian, Ubuntu)\n"
    "  brew install ffmpeg                     (macOS)\n"
    "  conda install -c conda-forge ffmpeg     (any conda environment)"
)


class PrepareError(ValueError):
    """A video that cannot become a sample; the message is the reason shown to the user."""


class FFmpegMissing(RuntimeError):
    """ffmpeg or ffprobe is not installed; the message says how to install it."""


def parallel_map(fn, jobs, workers, desc, chunksize=1):
    """list(map(fn, jobs)) over `workers` processes (in this process when 1), with a progress bar."""
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.map(fn, jobs, chunksize=chunksize) if pool else map(fn, jobs)
        return list(tqdm(results, total=len(jobs), desc=desc, unit="clip"))


def _atomic_path(path):
    return path + ".part"  # written first, renamed to `path` when complete


def _write_json(path, obj, indent=1):
    tmp = _atomic_path(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def _write_label_csv(path, mids, names):
    tmp = _atomic_path(path)
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows([i, mid, name] for i, (mid, name) in enumerate(zip(mids, names)))
    os.replace(tmp, path)


# -----------------------------------------------------------------------------------------------------
# Real videos: ffprobe / ffmpeg wrappers (importable: eval.py's `predict` runs them on one video)


@functools.cache
def check_ffmpeg():
    """Return ffmpeg's (major, minor) version; raise FFmpegMissing with install help when it is missing."""
    missing = [p for p in ("ffmpeg", "ffprobe") if shutil.which(p) is None]
    if missing:
        raise FFmpegMissing(f"{' and '.join(missing)} not found.\n{FFMPEG_HELP}")
    line = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    match = re.search(r"version n?(\d+)\.(\d+)", line)
    return (int(match.group(1)), int(match.group(2))) if match else (99, 0)  # git builds: assume new


def _run(cmd, timeout=600):
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PrepareError(f"ffmpeg did not finish within {timeout} s") from None


def _ffmpeg_error(stderr, video):
    """ffmpeg's error lines, without the `[demuxer @ 0x..]` and file name prefixes, on one line."""
    lines = []
    for line in stderr.decode(errors="replace").splitlines():
        line = re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\] ", "", line.strip()).replace(f"{video}: ", "")
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines[:2]) + ("; ..." if len(lines) > 2 else "") if lines else "no message from ffmpeg"


def _fraction(text):
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError, TypeError):
        return 0.0
    return float(value)


def probe(video):
    """Stream facts of `video` as OpenCV reports them to the official extractor.

    Returns dict(has_video, has_audio, video_stream, fps, count, total): fps = avg_frame_rate (fallback
    1/time_base); count = container nb_frames, else floor(duration * fps + 0.5); total = min(count,
    int(fps * 10)), the number of frames the 10 samples are spread over. Raises PrepareError when the file
    is missing, empty or unreadable.
    """
    check_ffmpeg()
    if not os.path.isfile(video):
        raise PrepareError("file not found")
    if os.path.getsize(video) == 0:
        raise PrepareError("empty file")
    result = _run(
        [
            "ffprobe",
            "-v",
            "error",
            "-of",
            "json",
            "-show_entries",
            "stream=index,codec_type,avg_frame_rate,time_base,nb_frames,duration:"
            "stream_disposition=attached_pic:format=duration",
            video,
        ]
    )
    if result.returncode != 0:
        raise PrepareError(f"not a readable video ({_ffmpeg_error(result.stderr, video)})")
    facts = json.loads(result.stdout or b"{}")
    streams = facts.get("streams", [])
    videos = [
        s
        for s in streams
        if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")
    ]  # cover art is not a video
    info = dict(
        has_video=bool(videos),
        has_audio=any(s.get("codec_type") == "audio" for s in streams),
        video_stream=None,
        fps=0.0,
        count=0,
        total=0,
    )
    if not videos:
        return info
    stream = videos[0]
    fps = _fraction(stream.get("avg_frame_rate")) or 1.0 / (_fraction(stream.get("time_base")) or 1.0)
    count = int(stream.get("nb_frames") or 0)
    if count <= 0:  # no frame count in the container: OpenCV estimates it from the duration
        duration = _fraction(facts.get("format", {}).get("duration")) or _fraction(stream.get("duration"))
        count = math.floor(duration * fps + 0.5)
    info.update(video_stream=int(stream["index"]), fps=fps, count=count, total=min(count, int(fps * 10)))
    return info


def frame_indices(total):
    """0-based decode index of each of the 10 frames: the official seek to int(i*total/10) - 1 (Sec. 5.1)."""
    return [max(int(i * (total / NUM_FRAMES)) - 1, 0) for i in range(NUM_FRAMES)]


def resize_crop(image, size=FRAME_SIZE):
    """Shorter side to `size` with Pillow bilinear (torchvision's int rule), then a centre crop."""
    w, h = image.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))  # round half to even
    return image.crop((left, top, left + size, top + size))


def _read_ppm_stream(data):
    """Split ffmpeg's image2pipe PPM output into (H, W, 3) uint8 arrays; a cut-off last image is dropped."""
    frames, pos = [], 0
    header = re.compile(rb"P6\s+(\d+)\s+(\d+)\s+255\s")
    while pos < len(data):
        match = header.match(data, pos)
        if match is None:
            break
        w, h = int(match.group(1)), int(match.group(2))
        end = match.end() + w * h * 3
        if end > len(data):
            break
        frames.append(np.frombuffer(data, np.uint8, w * h * 3, match.end()).reshape(h, w, 3))
        pos = end
    return frames


def frame_path(frames_root, i, video_id):
    return os.path.join(frames_root, f"frame_{i}", f"{video_id}.jpg")


def extract_frames(video, frames_root, video_id, info=None, only=None):
    """Write the 10 official frames of `video` to frames_root/frame_{i}/{video_id}.jpg; return their paths.

    Decodes the wanted frames in one ffmpeg pass (select by decode index, RGB24), then resizes, crops and
    saves each with Pillow. `only`: the frame numbers i to (re)write, default all. Each JPEG is written to
    a temporary name and renamed. Raises PrepareError for a video with too few decodable frames.
    """
    info = info or probe(video)
    if not info["has_video"]:
        raise PrepareError("no video stream")
    if info["fps"] <= 0 or info["total"] < NUM_FRAMES:
        raise PrepareError(f"too short: {info['total']} frames in the first 10 s, need {NUM_FRAMES}")
    todo = list(range(NUM_FRAMES)) if only is None else sorted(only)
    indices = frame_indices(info["total"])
    wanted = sorted({indices[i] for i in todo})  # each decode index comes out once, in order
    select = "+".join(f"eq(n\\,{k})" for k in wanted)
    passthrough = ["-fps_mode", "passthrough"] if check_ffmpeg() >= (5, 1) else ["-vsync", "0"]
    result = _run(
        [
            "ffmpeg",
            "-nostdin",
            "-v",
            "error",
            "-i",
            video,
            "-map",
            f"0:{info['video_stream']}",
            "-vf",
            f"select='{select}'",
            *passthrough,
            "-frames:v",
            str(len(wanted)),
            "-pix_fmt",
            "rgb24",
            "-c:v",
            "ppm",
            "-f",
            "image2pipe",
            "pipe:1",
        ]
    )
    decoded = dict(zip(wanted, _read_ppm_stream(result.stdout)))
    if len(decoded) < len(wanted):  # the official extractor stops at the first unreadable frame
        missing = min(set(wanted) - set(decoded))
        raise PrepareError(
            f"truncated or corrupt: decoding stopped before frame {missing} of the {info['total']}"
            f" the container announces ({_ffmpeg_error(result.stderr, video)})"
        )
    paths = []
    for i in todo:
        path = frame_path(frames_root, i, video_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        resize_crop(Image.fromarray(decoded[indices[i]])).save(
            _atomic_path(path), "JPEG"
        )  # quality 75, 4:2:0
        os.replace(_atomic_path(path), path)
        paths.append(path)
    return paths


def extract_audio(video, wav_path, info=None):
    """Write the first audio channel of `video`, resampled to 16 kHz, as PCM16 wav (Sec. 5.2); return the path.

    pan keeps channel 0 like the official `sox remix 1` (-ac 1 would average the channels instead).
    """
    info = info or probe(video)
    if not info["has_audio"]:
        raise PrepareError("no audio stream")
    os.makedirs(os.path.dirname(os.path.abspath(wav_path)), exist_ok=True)
    tmp = _atomic_path(wav_path)
    result = _run(
        [
            "ffmpeg",
            "-nostdin",
            "-v",
            "error",
            "-y",
            "-i",
            video,
            "-vn",
            "-sn",
            "-dn",
            "-af",
            "pan=mono|c0=c0",
            "-ar",
            str(SAMPLE_RATE),
            "-c:a",
            "pcm_s16le",
            "-bitexact",
            "-map_metadata",
            "-1",
            "-f",
            "wav",
            tmp,
        ]
    )
    if result.returncode != 0:
        _remove(tmp)
        raise PrepareError(f"audio extraction failed ({_ffmpeg_error(result.stderr, video)})")
    samples = sf.info(tmp).frames
    if samples < MIN_SAMPLES:
        _remove(tmp)
        raise PrepareError(f"audio too short: {samples} samples at 16 kHz, need {MIN_SAMPLES} (25 ms)")
    os.replace(tmp, wav_path)
    return wav_path


def one_clip_datafile(folder, video=None, wav=None, image=None):
    """One clip as a dataset in `folder`: a video's audio and 10 frames, or a wav and one image (frame_0). The clip
    is named after the file. Returns (the datafile's path, the frame numbers the clip has)."""
    video_id = os.path.splitext(os.path.basename(video or wav))[0]
    frames = os.path.join(folder, "frames")
    if video:
        facts = probe(video)
        wav = extract_audio(video, os.path.join(folder, video_id + ".wav"), facts)
        extract_frames(video, frames, video_id, facts)
    else:
        os.makedirs(os.path.join(frames, "frame_0"), exist_ok=True)
        shutil.copyfile(image, frame_path(frames, 0, video_id))  # data.read_frame decodes by content
    path = os.path.join(folder, "clip.json")
    _write_json(
        path, {"data": [dict(video_id=video_id, wav=os.path.abspath(wav), video_path="frames", labels="")]}
    )
    return path, list(range(NUM_FRAMES)) if video else [0]


def _remove(*paths):
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _wav_ok(path):
    try:
        info = sf.info(path)
    except Exception:  # missing or unreadable: redo it
        return False
    return info.samplerate == SAMPLE_RATE and info.channels == 1 and info.frames >= MIN_SAMPLES


def _jpeg_ok(path):
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                return False
            f.seek(-2, os.SEEK_END)
            return f.read(2) == b"\xff\xd9"  # a complete JPEG ends with the EOI marker
    except OSError:
        return False


def prepare_video(job):
    """One video -> OUT/audio/{id}.wav and OUT/frames/frame_{i}/{id}.jpg. Returns (status, reason).

    status: 'skipped' (all outputs already complete), 'done', or 'failed' (outputs removed).
    """
    video, video_id, out = job
    wav = os.path.join(out, "audio", f"{video_id}.wav")
    frames_root = os.path.join(out, "frames")
    frames = [frame_path(frames_root, i, video_id) for i in range(NUM_FRAMES)]
    need_frames = [i for i, path in enumerate(frames) if not _jpeg_ok(path)]
    need_audio = not _wav_ok(wav)
    if not need_frames and not need_audio:
        return "skipped", ""
    try:
        info = probe(video)
        for ok, reason in ((info["has_video"], "no video stream"), (info["has_audio"], "no audio stream")):
            if not ok:
                raise PrepareError(reason)
        if need_frames:
            extract_frames(video, frames_root, video_id, info=info, only=need_frames)
        if need_audio:
            extract_audio(video, wav, info=info)
    except Exception as error:  # PrepareError, or anything unforeseen (disk full, odd ffprobe output):
        _remove(wav, *frames)  # one bad video must not stop the run; a failed video leaves nothing behind
        reason = str(error) if isinstance(error, PrepareError) else f"{type(error).__name__}: {error}"
        return "failed", reason
    return "done", ""


def list_videos(source):
    """Video paths from a folder (recursive, by extension) or a csv/text list (first column, one a line)."""
    if os.path.isdir(source):
        found = [
            os.path.join(root, name)
            for root, _, names in os.walk(source)
            for name in names
            if os.path.splitext(name)[1].lower() in VIDEO_EXTS
        ]
        return sorted(found)
    if not os.path.isfile(source):
        raise ValueError(f"--input {source}: no such folder or list file")
    base = os.path.dirname(os.path.abspath(source))
    with open(source, newline="") as f:
        rows = [row for row in csv.reader(f) if row and row[0].strip() and not row[0].startswith("#")]
    if rows and rows[0][0].strip().lower() in {"path", "video", "video_path", "file", "filename"}:
        rows = rows[1:]  # a header line
    return [os.path.join(base, row[0].strip()) for row in rows]


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_video_labels(path):
    """Labels per video_id from a csv in one of three layouts; returns dict video_id -> [label, ...].

    `video_id,labels` (labels: mids or names separated by commas, quoted), the VGGSound csv
    `youtube_id,start_seconds,label,split` and the AudioSet segment csv `YTID, start_seconds,
    end_seconds, positive_labels`. Segment rows are keyed as {id}_{start} in the usual spellings
    (`abc_30`, `abc_30.000`, `abc_000030`) and by the bare id.
    """
    with open(path, newline="") as f:
        rows = [
            [c.strip() for c in row]
            for row in csv.reader(f, skipinitialspace=True)
            if row and not row[0].lstrip().startswith("#")
        ]
    if rows and rows[0][0].lower() in {"video_id", "video", "id", "ytid", "youtube_id"}:
        rows = rows[1:]
    labels = {}
    for n, row in enumerate(rows, 1):
        if len(row) >= 4 and _is_number(row[1]):  # VGGSound (label in col 2) or AudioSet (labels in col 3)
            names = [row[2]] if not _is_number(row[2]) else row[3].split(",")
            start = float(row[1])
            for key in (
                f"{row[0]}_{row[1]}",
                f"{row[0]}_{start:.3f}",
                f"{row[0]}_{int(start):06d}",
                f"{row[0]}_{int(start)}",
            ):
                labels[key] = names
            labels.setdefault(row[0], names)
        elif len(row) >= 2:
            labels[row[0]] = [l.strip() for l in ",".join(row[1:]).split(",")]
        else:
            raise ValueError(
                f"{path} row {n}: expected `video_id,labels`, a VGGSound or an AudioSet row, got {row}"
            )
    for key in labels:
        labels[key] = [l for l in labels[key] if l]
    return labels


def prepare_videos(source, out, labels_csv=None, workers=None):
    """Extract every video of `source` into `out`; write data.json, failed.csv (and labels.csv). Returns failures."""
    check_ffmpeg()
    videos = list_videos(source)
    table = read_video_labels(labels_csv) if labels_csv else {}  # a bad csv fails before any work
    os.makedirs(out, exist_ok=True)
    jobs, failed, seen = [], [], {}
    for video in videos:
        video_id = os.path.splitext(os.path.basename(video))[0]
        if video_id in seen:
            failed.append((video, f"duplicate video_id {video_id!r} (also {seen[video_id]})"))
        else:
            seen[video_id] = video
            jobs.append((video, video_id, out))
    results = parallel_map(prepare_video, jobs, workers or os.cpu_count() or 1, "videos")

    entries, counts = [], {"done": 0, "skipped": 0}
    for (video, video_id, _), (status, reason) in zip(jobs, results):
        if status == "failed":
            failed.append((video, reason))
        elif labels_csv and not table.get(video_id):
            failed.append((video, f"no labels for {video_id!r} in {labels_csv}"))
        else:
            counts[status] += 1
            entries.append(
                dict(
                    video_id=video_id,
                    wav=f"audio/{video_id}.wav",
                    video_path="frames",
                    labels=table.get(video_id, ["/m/unlabeled"]),
                )
            )

    names = sorted({l for e in entries for l in e["labels"]})
    if not labels_csv:  # a one-class dummy label file keeps the folder loadable for pretraining
        _write_label_csv(os.path.join(out, "labels.csv"), ["/m/unlabeled"], ["unlabeled"])
    elif any(not l.startswith("/") for l in names):  # names, not mids: number them
        mids = {name: f"/label/{i:04d}" for i, name in enumerate(names)}
        for e in entries:
            e["labels"] = [mids[l] for l in e["labels"]]
        _write_label_csv(os.path.join(out, "labels.csv"), list(mids.values()), names)
    for e in entries:
        e["labels"] = ",".join(e["labels"])
    _write_json(os.path.join(out, "data.json"), {"data": entries})
    with open(os.path.join(out, "failed.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("video", "reason"), *failed])

    print(
        f"{len(entries)} videos ready in {os.path.join(out, 'data.json')} ({counts['done']} extracted, "
        f"{counts['skipped']} already done), {len(failed)} failed"
    )
    for video, reason in failed:
        print(f"  FAILED {video}: {reason}")
    if failed:
        print(f"failures listed in {os.path.join(out, 'failed.csv')}")
    return failed


# -----------------------------------------------------------------------------------------------------
# The synthetic dataset: shapes that sound.
# Class = a visual shape/texture + a sound timbre (each recognisable alone). Instance cues shared by both
# modalities: hue <-> pitch of each object's note, number of objects <-> number of note onsets, left-to-right
# order <-> order in time, size <-> loudness (the size follows the loudness envelope over the 10 frames).
# Nuisances: background colour, gradient and pixel noise, vertical position, drift, audio noise level.


SHAPES = [
    "disk",
    "square",
    "triangle",
    "diamond",
    "plus",
    "ring",
    "x-cross",
    "striped square",
    "checkered disk",
    "bar",
]
SOUNDS = [
    "pure tone",
    "square wave",
    "sawtooth",
    "noise band",
    "rising chirp",
    "falling chirp",
    "tremolo",
    "vibrato",
    "pluck",
    "bell",
]


def shape_mask(cls, x, y):
    """(inside, dark texture) boolean masks of class `cls`'s shape; x, y: coordinates / object radius."""
    ax, ay, r2 = np.abs(x), np.abs(y), x * x + y * y
    box = np.maximum(ax, ay)
    none = np.zeros_like(x, dtype=bool)
    if cls == 0:
        return r2 <= 1, none
    if cls == 1:
        return box <= 0.85, none
    if cls == 2:  # apex up
        return (y >= -1) & (y <= 0.75) & (ax <= (y + 1) * 0.55), none
    if cls == 3:
        return ax + ay <= 1.1, none
    if cls == 4:
        return (box <= 1) & (np.minimum(ax, ay) <= 0.3), none
    if cls == 5:
        return (r2 <= 1) & (r2 >= 0.3), none
    if cls == 6:
        return (box <= 0.85) & ((np.abs(x - y) <= 0.4) | (np.abs(x + y) <= 0.4)), none
    if cls == 7:  # 5 vertical stripes
        return box <= 0.85, np.floor((x + 0.85) / 0.34) % 2 == 1
    if cls == 8:  # 4 x 4 checkerboard
        return r2 <= 1, (np.floor((x + 1) * 2) + np.floor((y + 1) * 2)) % 2 == 1
    return (x / 1.1) ** 2 + (y / 0.45) ** 2 <= 1, none


def hsv_to_rgb(h, s, v):
    """One colour, components in [0, 1] -> RGB in [0, 255]."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return 255 * (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1))


def note(cls, f0, n, rng):
    """One note of class `cls`'s timbre at pitch f0 Hz, n samples, peak 1."""
    t = np.arange(n) / SAMPLE_RATE
    dur = n / SAMPLE_RATE
    nyquist_margin = 0.45 * SAMPLE_RATE

    def partials(ratios, amps, phase_t=t):
        keep = [(r, a) for r, a in zip(ratios, amps) if r * f0 < nyquist_margin]
        return sum(a * np.sin(2 * np.pi * r * f0 * phase_t + rng.uniform(0, 2 * np.pi)) for r, a in keep)

    if cls == 0:
        wave = partials([1], [1])
    elif cls == 1:
        wave = partials(range(1, 40, 2), [1 / k for k in range(1, 40, 2)])
    elif cls == 2:
        wave = partials(range(1, 40), [1 / k for k in range(1, 40)])
    elif cls == 3:  # noise low-passed to ~400 Hz, shifted up to f0: a noise band around the pitch
        noise = np.convolve(rng.standard_normal(n + 39), np.ones(40) / 40, mode="valid")
        wave = noise * np.sin(2 * np.pi * f0 * t)
    elif cls in (4, 5):  # one octave glide up or down over the note
        sign = 1 if cls == 4 else -1
        wave = np.sin(2 * np.pi * f0 * dur / (sign * np.log(2)) * (2 ** (sign * t / dur) - 1))
    elif cls == 6:  # 100 % amplitude modulation at 15 Hz
        wave = partials([1], [1]) * (0.5 + 0.5 * np.sin(2 * np.pi * 15 * t))
    elif cls == 7:  # 8 % frequency modulation at 6 Hz
        wave = np.sin(2 * np.pi * f0 * t + 0.08 * f0 / 6 * np.sin(2 * np.pi * 6 * t))
    elif cls == 8:  # plucked string: harmonics with a fast decay
        wave = partials(range(1, 7), [1 / k for k in range(1, 7)]) * np.exp(-t / 0.08)
    else:  # bell: inharmonic partials, slower decay
        wave = partials([1, 2.76, 5.4], [1, 0.5, 0.25]) * np.exp(-t / 0.3)
    ramp = np.minimum(1, np.minimum(t / 0.01, (dur - t) / 0.06))  # 10 ms attack, 60 ms release
    wave = wave * ramp
    return wave / (np.abs(wave).max() + 1e-9)


def draw_clip(rng, classes, image_size, seconds):
    """Draw one clip: (10 frames (10, S, S, 3) uint8, waveform (N,) int16, where the objects are). classes: one
    per object. The geometry is, per frame, a list of dict(class, x, y, radius) in pixels of the frame (x to the
    right, y down, pixel k spans [k, k + 1)); inside_objects() tests points against it."""
    S, n = image_size, len(classes)
    n_samples = int(round(seconds * SAMPLE_RATE))
    hues = rng.uniform(0, 0.8, n)  # 0.8: stop before red wraps round
    pitches = 200 * 2 ** (3 * hues / 0.8)  # hue <-> pitch: 200 .. 1600 Hz
    loud = rng.uniform(0.8, 1.25)  # near = big and loud
    depth, cycles, phase = rng.uniform(0.15, 0.3), rng.uniform(0.4, 1.2), rng.uniform(0, 2 * np.pi)
    envelope = lambda t: 1 + depth * np.sin(2 * np.pi * cycles * t / seconds + phase)  # noqa: E731

    # audio: object j (left to right) sounds its note in time slot j
    slot = seconds / n
    wave = np.zeros(n_samples)
    for j, (cls, f0) in enumerate(zip(classes, pitches)):
        start = int((j + rng.uniform(0, 0.2)) * slot * SAMPLE_RATE)
        length = int(min(1.2, 0.7 * slot) * SAMPLE_RATE)
        wave[start : start + length] += note(cls, f0, length, rng)[: n_samples - start]
    t = np.arange(n_samples) / SAMPLE_RATE
    wave *= 0.3 * loud * envelope(t)
    noise = rng.standard_normal(n_samples) * rng.uniform(0.003, 0.03) * 0.3  # 10 .. 30 dB below the notes
    pcm = np.round(np.clip(wave + noise, -1, 1) * 32767).astype(np.int16)

    # frames: background + objects, 2 x 2 supersampled edges
    bg = hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.1, 0.45))
    gradient_dir, gradient = rng.uniform(0, 2 * np.pi), rng.uniform(0, 40)
    pixel_noise = rng.uniform(2, 10)
    xs = rng.uniform(0.3, 0.7, n) * (S / n) + np.arange(n) * (S / n)  # one horizontal slot per object
    ys = rng.uniform(0.3, 0.7, n) * S
    drift = rng.uniform(-0.08, 0.08, 2) * S
    radii = 0.1 * S * loud * rng.uniform(0.9, 1.1, n)
    colours = [hsv_to_rgb(h, rng.uniform(0.75, 1), rng.uniform(0.85, 1)) for h in hues]
    grid = (np.arange(S) + 0.5)[None, :] - 0.25 + 0.5 * np.array([0, 1])[:, None]  # (2, S) sub-pixel
    gy, gx = grid[:, None, :, None], grid[None, :, None, :]  # (2, 1, S, 1), (1, 2, 1, S)
    frames, objects = np.empty((NUM_FRAMES, S, S, 3), np.uint8), []
    base = (
        bg
        + gradient
        * (
            (np.arange(S)[None, :] - S / 2) * np.cos(gradient_dir)
            + (np.arange(S)[:, None] - S / 2) * np.sin(gradient_dir)
        )[..., None]
        / S
    )
    for i in range(NUM_FRAMES):
        t_i = i * seconds / NUM_FRAMES
        image = base.copy()  # (S, S, 3)
        objects.append([])
        for cls, x, y, r, colour in zip(classes, xs, ys, radii, colours):
            r, x, y = r * envelope(t_i), x + drift[0] * t_i / seconds, y + drift[1] * t_i / seconds
            objects[-1].append({"class": int(cls), "x": float(x), "y": float(y), "radius": float(r)})
            box = [
                slice(max(int(c - 1.2 * r), 0), max(int(c + 1.2 * r) + 2, 0)) for c in (y, x)
            ]  # shapes fit
            inside, dark = shape_mask(cls, (gx[..., box[1]] - x) / r, (gy[..., box[0], :] - y) / r)
            cover = inside.mean(axis=(0, 1))[..., None]  # (h, w, 1) in [0, 1]
            shade = (inside & dark).mean(axis=(0, 1))[..., None]
            image[box[0], box[1]] = image[box[0], box[1]] * (1 - cover) + colour * (cover - 0.65 * shade)
        image += rng.normal(0, pixel_noise, image.shape)
        frames[i] = np.clip(np.round(image), 0, 255)
    return frames, pcm, objects


OBJECTS = "objects.json"  # beside the datafiles: where each object is on each frame
OBJECTS_HELP = (
    "clips[video_id][frame] lists the objects on that frame as {class, x, y, radius} in pixels (x to "
    "the right, y down, (0, 0) the top-left corner); a point (px, py) is inside an object where "
    "prepare.shape_mask(class, (px - x) / radius, (py - y) / radius) is true"
)


def inside_objects(objects, x, y):
    """Which points lie inside one of a frame's objects (draw_clip's geometry): boolean array shaped like x and y,
    which are coordinates in pixels of the frame (arrays of any shape)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    inside = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    for o in objects:
        inside |= shape_mask(o["class"], (x - o["x"]) / o["radius"], (y - o["y"]) / o["radius"])[0]
    return inside


def read_objects(path, datafile, video_ids):
    """make_synthetic's objects.json: `path`, else the one next to `datafile` if there (real data has none: then
    (None, None)). Checked to hold every clip of video_ids. Returns (the objects, the path read)."""
    beside = datafile and os.path.join(os.path.dirname(os.path.abspath(datafile)), OBJECTS)
    path = path or (beside if beside and os.path.isfile(beside) else None)
    if not path:
        return None, None
    with open(path) as f:
        objects = json.load(f)
    missing = [v for v in video_ids if v not in objects["clips"]]
    if missing:
        raise ValueError(
            f"{path}: no objects for {len(missing)} of the {len(video_ids)} clips (first: {missing[0]})"
        )
    return objects, path


def _make_clip(job):
    """Draw and write one synthetic clip; its own Generator makes the bytes independent of scheduling.
    Returns (class indices, object geometry per frame)."""
    out, video_id, seed, split, index, image_size, seconds, num_classes, multilabel = job
    rng = np.random.default_rng([seed, split, index])
    if multilabel:  # 1-3 different events, one object each
        classes = rng.choice(num_classes, size=rng.integers(1, min(3, num_classes) + 1), replace=False)
    else:  # one event class, 1-3 objects of it
        classes = np.full(rng.integers(1, 4), rng.integers(num_classes))
    frames, pcm, objects = draw_clip(rng, list(classes), image_size, seconds)
    sf.write(os.path.join(out, "audio", f"{video_id}.wav"), pcm, SAMPLE_RATE, subtype="PCM_16")
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(frame_path(os.path.join(out, "frames"), i, video_id), "JPEG")
    return sorted(set(int(c) for c in classes)), objects


def synthetic_mid(cls):
    return f"/synth/{cls:02d}"


def make_synthetic(
    out,
    n_train=2000,
    n_test=500,
    seed=0,
    image_size=64,
    seconds=2.56,
    num_classes=10,
    multilabel=False,
    workers=None,
):
    """Write the synthetic dataset to `out` (train.json, test.json, labels.csv, audio/, frames/) and, beside the
    official format, objects.json: where each clip's objects are on each frame (draw_clip's geometry, keyed by
    video_id). Return counts."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be between 2 and {len(SHAPES)}, got {num_classes}")
    if seconds * SAMPLE_RATE < MIN_SAMPLES or image_size < 16:
        raise ValueError(f"need seconds >= {MIN_SAMPLES / SAMPLE_RATE} and image_size >= 16")
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    for i in range(NUM_FRAMES):
        os.makedirs(os.path.join(out, "frames", f"frame_{i}"), exist_ok=True)
    splits = {"train": (0, n_train), "test": (1, n_test)}
    jobs = [
        (out, f"{name}_{k:05d}", seed, code, k, image_size, seconds, num_classes, multilabel)
        for name, (code, count) in splits.items()
        for k in range(count)
    ]
    workers = (workers or os.cpu_count() or 1) if len(jobs) >= 64 else 1  # a pool costs more for a few
    labels, objects = (
        zip(*parallel_map(_make_clip, jobs, workers, "synthetic", chunksize=16)) if jobs else ((), ())
    )
    for name in splits:
        entries = [
            dict(
                video_id=job[1],
                wav=f"audio/{job[1]}.wav",
                video_path="frames",
                labels=",".join(synthetic_mid(c) for c in classes),
            )
            for job, classes in zip(jobs, labels)
            if job[1].startswith(name)
        ]
        _write_json(os.path.join(out, f"{name}.json"), {"data": entries})
    _write_label_csv(
        os.path.join(out, "labels.csv"),
        [synthetic_mid(c) for c in range(num_classes)],
        [f"{SHAPES[c]} + {SOUNDS[c]}" for c in range(num_classes)],
    )
    _write_json(
        os.path.join(out, OBJECTS),
        dict(
            frame_size=image_size,
            shapes=SHAPES,
            geometry=OBJECTS_HELP,
            clips={
                job[1]: [[{k: round(v, 4) for k, v in o.items()} for o in frame] for frame in clip]
                for job, clip in zip(jobs, objects)
            },
        ),
        indent=None,
    )
    return dict(train=n_train, test=n_test)


# -----------------------------------------------------------------------------------------------------


def check_datafile(datafile, label_csv, num_frames=10, image_size=224, show=20):
    """Load every row of a datafile as training does (data.row_problems: the wav, each frame, the
    labels); print a summary and the first `show` rows with problems. Returns how many have some."""
    start = time.time()
    labels = data.load_label_csv(label_csv)
    rows = data.read_datafile(datafile)
    results = data.all_row_problems(rows, labels, num_frames, image_size)
    bad = [(i, problems) for i, (problems, _) in enumerate(results) if problems]
    print(
        f"checked {len(rows)} rows of {datafile} in {time.time() - start:.1f} s: "
        f"{len(rows) - len(bad)} ok, {len(bad)} with problems"
    )
    for i, problems in bad[:show]:
        print(f"  row {i} (video_id {rows[i]['video_id']}): {'; '.join(problems)}")
    if len(bad) > show:
        print(f"  ... and {len(bad) - show} more rows")
    partial = sum(0 < missing < num_frames for _, missing in results)
    if partial:
        print(
            f"  {partial} rows miss some of their {num_frames} frames (loading falls back to an earlier frame)"
        )
    classes_seen = sum(mid in labels.index for mid in rows.mids)
    unlabelled = int((np.diff(rows.label_offsets) == 0).sum())
    summary = f"  labels: {classes_seen} of {len(labels.mids)} classes have examples"
    print(summary + (f", {unlabelled} rows have no label" if unlabelled else ""))
    return len(bad)


def check_command(args):
    """`python prepare.py check`: exit status 0 when every row loads, 1 when any does not."""
    try:
        return 1 if check_datafile(args.data, args.label_csv, args.num_frames, args.image_size) else 0
    except data.DataError as error:  # a missing or unreadable datafile or label csv
        print(f"error: {error}", file=sys.stderr)
        return 1


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    videos = commands.add_parser("videos", help="extract audio and frames from real videos")
    videos.add_argument("--input", required=True, help="folder of videos, or a csv/text list of paths")
    videos.add_argument("--out", required=True, help="output folder")
    videos.add_argument("--labels", help="csv: video_id,labels | VGGSound csv | AudioSet segment csv")
    videos.add_argument("--workers", type=int, default=None, help="parallel videos (default: CPU count)")
    synth = commands.add_parser("synthetic", help="generate the synthetic audio-visual dataset")
    synth.add_argument("--out", default="data/synthetic")
    synth.add_argument("--n-train", type=int, default=2000)
    synth.add_argument("--n-test", type=int, default=500)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--seconds", type=float, default=2.56)
    synth.add_argument("--num-classes", type=int, default=10)
    synth.add_argument("--multilabel", action="store_true", help="1-3 events of different classes per clip")
    synth.add_argument("--workers", type=int, default=None)
    check = commands.add_parser("check", help="load every row of a datafile as training does")
    check.add_argument("--data", required=True, help="the datafile (json)")
    check.add_argument("--label-csv", required=True, help="its label csv (index,mid,display_name)")
    check.add_argument("--num-frames", type=int, default=10, help="frames per video")
    check.add_argument("--image-size", type=int, default=224, help="the size frames are decoded at")
    args = parser.parse_args(argv)

    if args.command == "check":
        return check_command(args)
    if args.command == "synthetic":
        start = time.time()
        make_synthetic(
            args.out,
            args.n_train,
            args.n_test,
            args.seed,
            args.image_size,
            args.seconds,
            args.num_classes,
            args.multilabel,
            args.workers,
        )
        print(
            f"synthetic: {args.n_train} train + {args.n_test} test clips, {args.num_classes} classes"
            f"{' (multi-label)' if args.multilabel else ''}, {args.image_size}px frames, {args.seconds} s audio"
            f" -> {args.out} in {time.time() - start:.1f} s"
        )
        return 0
    try:
        return 1 if prepare_videos(args.input, args.out, args.labels, args.workers) else 0
    except (RuntimeError, ValueError) as error:  # ffmpeg missing, bad --input or --labels
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
