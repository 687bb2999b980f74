"""
Prepare data for CAV-MAE in the official on-disk format, from real videos or from nothing.

    python prepare.py videos --input DIR_OR_LIST --out OUT [--labels CSV] [--workers N]
    python prepare.py synthetic --out data/synthetic [--n-train 2000 --n-test 500 --seed 0 --multilabel]
    python prepare.py check --data X.json --label-csv labels.csv [--num-frames 10 --image-size 224]

The format (what data.py reads):
    datafile   {"data": [{"video_id", "wav", "video_path", "labels": "mid1,mid2"}, ...]}
    labels.csv index,mid,display_name
    wav        16 kHz mono PCM16:            OUT/audio/{video_id}.wav
    frames     10 RGB JPEGs per video:       {video_path}/frame_{i}/{video_id}.jpg, i = 0..9
Paths inside our datafiles are relative to the datafile's folder, so a dataset folder can be moved.

`videos` reproduces the official extraction (docs/preprocessing.md, section 5) with the ffmpeg and
ffprobe programs: audio resampled to 16 kHz keeping the first channel, and the 10 frames the
official OpenCV extractor reads, resized (shorter side 224, Pillow bilinear), centre-cropped to 224
and saved with Pillow's JPEG defaults. A video that cannot become a sample is listed with its reason
in OUT/failed.csv (and the exit status is 1); a rerun redoes only what is missing or broken.
`synthetic` draws a toy audio-visual dataset (synthetic.py: shapes that sound).
`check` loads every row of a datafile as training does and lists the rows that would stop it (exit
status 1 if any; 2 if the datafile or label csv is missing or unreadable, as for every subcommand's
bad input).
"""

import argparse
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
# audio-only files in an --input folder are listed too, and fail with "no video stream"
AUDIO_EXTS = {".m4a", ".mp3", ".wav", ".flac", ".ogg", ".opus", ".aac", ".wma"}
LIST_HEADERS = {"path", "video", "video_path", "file", "filename"}  # --input's header line, skipped
LABEL_HEADERS = {"video_id", "video", "id", "ytid", "youtube_id"}  # --labels' header line, skipped
NEEDS_BOTH = "CAV-MAE needs a clip with pictures and sound (eval.py also takes --wav with --image)"
FFMPEG_HELP = (
    "prepare.py needs the `ffmpeg` and `ffprobe` programs on the PATH. Install them with one of\n"
    "  sudo apt-get install -y ffmpeg          (Debian, Ubuntu)\n"
    "  brew install ffmpeg                     (macOS)\n"
    "  conda install -c conda-forge ffmpeg     (any conda environment)"
)


class PrepareError(ValueError):
    """A video that cannot become a sample: str(error) is the reason (failed.csv's), .advice what to do."""

    def __init__(self, reason, advice):
        super().__init__(reason)
        self.advice = advice


class FFmpegMissing(RuntimeError):
    """ffmpeg or ffprobe is not installed; the message says how to install it."""


def progress(results, total, desc):
    return list(tqdm(results, total=total, desc=desc, unit="clip"))


def parallel_map(fn, jobs, workers, desc, chunksize=1):
    """list(map(fn, jobs)) over `workers` processes (here when 1), with a progress bar."""
    if workers <= 1:
        return progress(map(fn, jobs), len(jobs), desc)
    with ProcessPoolExecutor(workers) as pool:
        return progress(pool.map(fn, jobs, chunksize=chunksize), len(jobs), desc)


def _atomic_path(path):
    return path + ".part"  # written first, renamed to `path` when complete


def write_json_atomic(path, obj, indent=1):
    tmp = _atomic_path(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def write_label_csv(path, mids, names):
    tmp = _atomic_path(path)
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows([i, mid, name] for i, (mid, name) in enumerate(zip(mids, names)))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Real videos: ffprobe / ffmpeg wrappers (importable: eval.py's `predict` runs them on one video)


@functools.cache
def check_ffmpeg():
    """ffmpeg's (major, minor) version; FFmpegMissing, with install help, when it is missing."""
    missing = [p for p in ("ffmpeg", "ffprobe") if shutil.which(p) is None]
    if missing:
        raise FFmpegMissing(f"{' and '.join(missing)} not found.\n{FFMPEG_HELP}")
    version = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout
    line = version.split("\n")[0]
    match = re.search(r"version n?(\d+)\.(\d+)", line)
    if match is None:  # git builds say `version N-...`: assume a new one
        return (99, 0)
    return (int(match.group(1)), int(match.group(2)))


def _run(cmd, video, timeout=600):
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PrepareError(
            f"ffmpeg did not finish within {timeout} s",
            f"check that the file plays (`ffprobe {video}`); cut a long video first (ffmpeg -t 10)",
        ) from None


def _ffmpeg_error(stderr, video):
    """ffmpeg's error lines, without the `[demuxer @ 0x..]` and file name prefixes, on one line."""
    lines = []
    for line in stderr.decode(errors="replace").splitlines():
        line = re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\] ", "", line.strip())
        line = line.replace(f"{video}: ", "")
        if line and (line not in lines):
            lines.append(line)
    if not lines:
        return "no message from ffmpeg"
    if len(lines) > 2:
        return "; ".join(lines[:2]) + "; ..."
    return "; ".join(lines)


def _fraction(text):
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError, TypeError):
        return 0.0
    return float(value)


def stream_fps(stream):
    """OpenCV's CAP_PROP_FPS: the stream's avg_frame_rate, else 1 / time_base."""
    fps = _fraction(stream.get("avg_frame_rate"))
    if fps > 0:
        return fps
    time_base = _fraction(stream.get("time_base"))
    return 1.0 / time_base if time_base > 0 else 1.0


def count_packets(video, stream_index):
    """The packets (one frame each) of one stream, counted by reading the file without decoding."""
    result = _run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            str(stream_index),
            "-count_packets",
            "-show_entries",
            "stream=nb_read_packets",
            "-of",
            "csv=p=0",
            video,
        ],
        video,
    )
    text = result.stdout.decode(errors="replace").strip()
    return int(text) if text.isdigit() else 0


def frame_count(video, facts, stream, fps):
    """OpenCV's CAP_PROP_FRAME_COUNT: the container's nb_frames, else floor(duration * fps + 0.5). A
    container with neither (a webm as browsers and downloaders write it) has its frames counted: the
    number the official extractor would get from a container that announced it."""
    count = int(stream.get("nb_frames") or 0)
    if count > 0:
        return count
    duration = _fraction(facts.get("format", {}).get("duration"))
    if duration <= 0:
        duration = _fraction(stream.get("duration"))
    if duration > 0:
        return math.floor(duration * fps + 0.5)
    return count_packets(video, stream["index"])


def is_video_stream(stream):
    is_cover_art = stream.get("disposition", {}).get("attached_pic")
    return (stream.get("codec_type") == "video") and (not is_cover_art)


def probe(video):
    """Stream facts of `video` as OpenCV reports them to the official extractor.

    Returns dict(has_video, has_audio, video_stream, fps, count, total): fps and count as stream_fps
    and frame_count say; total = min(count, int(fps * 10)), the number of frames the 10 samples are
    spread over. Raises PrepareError when the file is missing, empty or unreadable.
    """
    check_ffmpeg()
    if not os.path.isfile(video):
        raise PrepareError("file not found", "check the path")
    if os.path.getsize(video) == 0:
        raise PrepareError("empty file", "the file has 0 bytes: copy or download it again")
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
        ],
        video,
    )
    if result.returncode != 0:
        raise PrepareError(
            f"not a readable video ({_ffmpeg_error(result.stderr, video)})",
            f"check that ffmpeg can read it (`ffprobe {video}`), or copy or download it again",
        )
    facts = json.loads(result.stdout or b"{}")
    streams = facts.get("streams", [])
    videos = [s for s in streams if is_video_stream(s)]
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
    fps = stream_fps(stream)
    count = frame_count(video, facts, stream, fps)
    total = min(count, int(fps * 10))
    info.update(video_stream=int(stream["index"]), fps=fps, count=count, total=total)
    return info


def check_streams(info):
    """Raise PrepareError unless the video has both a picture and a sound stream."""
    if not info["has_video"]:
        raise PrepareError("no video stream", NEEDS_BOTH)
    if not info["has_audio"]:
        raise PrepareError("no audio stream", NEEDS_BOTH)


def frame_indices(total):
    """0-based decode index of each of the 10 frames: the official seek to int(i*total/10) - 1."""
    return [max(int(i * (total / NUM_FRAMES)) - 1, 0) for i in range(NUM_FRAMES)]


def resize_crop(image, size=FRAME_SIZE):
    """Shorter side to `size` with Pillow bilinear (torchvision's int rule), then a centre crop."""
    new_size = data.resized_size(*image.size, size)  # the loader's rule, with bilinear here
    if new_size != image.size:
        image = image.resize(new_size, Image.BILINEAR)
    left = int(round((new_size[0] - size) / 2))  # round half to even
    top = int(round((new_size[1] - size) / 2))
    return image.crop((left, top, left + size, top + size))


def _read_ppm_stream(data):
    """ffmpeg's image2pipe PPM output as (H, W, 3) uint8 arrays; a cut-off last image is dropped."""
    frames = []
    pos = 0
    header = re.compile(rb"P6\s+(\d+)\s+(\d+)\s+255\s")
    while pos < len(data):
        match = header.match(data, pos)
        if match is None:
            break
        w = int(match.group(1))
        h = int(match.group(2))
        end = match.end() + w * h * 3
        if end > len(data):
            break
        frames.append(np.frombuffer(data, np.uint8, w * h * 3, match.end()).reshape(h, w, 3))
        pos = end
    return frames


def frame_path(frames_root, i, video_id):
    return os.path.join(frames_root, f"frame_{i}", f"{video_id}.jpg")


def decode_frames(video, info, wanted):
    """The frames of `video` at the sorted decode indices `wanted`, in one ffmpeg pass (select by
    decode index, RGB24): {index: (H, W, 3) uint8}. A frame that could not be decoded is absent."""
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
        ],
        video,
    )
    decoded = dict(zip(wanted, _read_ppm_stream(result.stdout)))
    if len(decoded) < len(wanted):  # the official extractor stops at the first unreadable frame
        missing = min(set(wanted) - set(decoded))
        raise PrepareError(
            f"truncated or corrupt: decoding stopped before frame {missing} of the {info['total']}"
            f" the container announces ({_ffmpeg_error(result.stderr, video)})",
            "the file is cut off or damaged: copy or download it again",
        )
    return decoded


def extract_frames(video, frames_root, video_id, info=None, only=None):
    """Write the 10 official frames of `video` to frames_root/frame_{i}/{video_id}.jpg; return their
    paths.

    Decodes the wanted frames, then resizes, crops and saves each with Pillow. `only`: the frame
    numbers i to (re)write, default all. Each JPEG is written to a temporary name and renamed.
    Raises PrepareError for a video with too few decodable frames.
    """
    if info is None:
        info = probe(video)
    if not info["has_video"]:
        raise PrepareError("no video stream", NEEDS_BOTH)
    too_few = (info["fps"] <= 0) or (info["total"] < NUM_FRAMES)
    if too_few:
        raise PrepareError(
            f"too short: {info['total']} frames in the first 10 s, need {NUM_FRAMES}",
            f"give a clip of at least {NUM_FRAMES} frames",
        )
    todo = list(range(NUM_FRAMES)) if only is None else sorted(only)
    indices = frame_indices(info["total"])
    wanted = sorted({indices[i] for i in todo})  # each decode index comes out once, in order
    decoded = decode_frames(video, info, wanted)
    paths = []
    for i in todo:
        path = frame_path(frames_root, i, video_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        frame = resize_crop(Image.fromarray(decoded[indices[i]]))
        frame.save(_atomic_path(path), "JPEG")  # Pillow's defaults: quality 75, 4:2:0
        os.replace(_atomic_path(path), path)
        paths.append(path)
    return paths


def extract_audio(video, wav_path, info=None):
    """Write the first audio channel of `video`, resampled to 16 kHz, as PCM16 wav
    (docs/preprocessing.md, section 5); return the path.

    pan keeps channel 0 like the official `sox remix 1` (-ac 1 would average the channels instead).
    """
    if info is None:
        info = probe(video)
    if not info["has_audio"]:
        raise PrepareError("no audio stream", NEEDS_BOTH)
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
        ],
        video,
    )
    if result.returncode != 0:
        _remove(tmp)
        raise PrepareError(
            f"audio extraction failed ({_ffmpeg_error(result.stderr, video)})",
            f"check that ffmpeg can decode its sound (`ffmpeg -i {video} -f null -`)",
        )
    samples = sf.info(tmp).frames
    if samples < MIN_SAMPLES:
        _remove(tmp)
        raise PrepareError(
            f"audio too short: {samples} samples at 16 kHz, need {MIN_SAMPLES} (25 ms)",
            "give a clip with at least 25 ms of sound",
        )
    os.replace(tmp, wav_path)
    return wav_path


def one_clip_datafile(folder, video=None, wav=None, image=None):
    """One clip as a dataset in `folder`: a video's audio and 10 frames, or a wav and one image
    (frame_0). The clip is named after the file. Returns (the datafile's path, the frame numbers the
    clip has)."""
    video_id = os.path.splitext(os.path.basename(video if video else wav))[0]
    frames_root = os.path.join(folder, "frames")
    if video:
        facts = probe(video)
        check_streams(facts)
        wav = extract_audio(video, os.path.join(folder, video_id + ".wav"), facts)
        extract_frames(video, frames_root, video_id, facts)
        available = list(range(NUM_FRAMES))
    else:
        os.makedirs(os.path.join(frames_root, "frame_0"), exist_ok=True)
        shutil.copyfile(image, frame_path(frames_root, 0, video_id))  # read by content: any format
        available = [0]
    path = os.path.join(folder, "clip.json")
    row = dict(video_id=video_id, wav=os.path.abspath(wav), video_path="frames", labels="")
    write_json_atomic(path, {"data": [row]})
    return path, available


def _remove(*paths):
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _wav_ok(path):
    try:
        info = sf.info(path)
    except Exception:  # missing or unreadable: redo it
        return False
    right_format = (info.samplerate == SAMPLE_RATE) and (info.channels == 1)
    return right_format and (info.frames >= MIN_SAMPLES)


def _jpeg_ok(path):
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                return False
            f.seek(-2, os.SEEK_END)
            return f.read(2) == b"\xff\xd9"  # a complete JPEG ends with the EOI marker
    except OSError:
        return False


def failure_reason(error):
    """failed.csv's reason: a PrepareError's own words, else the exception's type and message."""
    if isinstance(error, PrepareError):
        return str(error)
    return f"{type(error).__name__}: {error}"


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
    if (not need_frames) and (not need_audio):
        return "skipped", ""
    try:
        info = probe(video)
        check_streams(info)
        if need_frames:
            extract_frames(video, frames_root, video_id, info=info, only=need_frames)
        if need_audio:
            extract_audio(video, wav, info=info)
    except Exception as error:  # PrepareError, or the unforeseen (disk full, odd ffprobe output):
        _remove(wav, *frames)  # one bad video does not stop the run, and leaves nothing behind
        return "failed", failure_reason(error)
    return "done", ""


def list_folder(folder):
    """The videos in `folder` and below, by extension, and the audio-only files (to fail: no video)."""
    wanted = VIDEO_EXTS | AUDIO_EXTS
    found = [
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if os.path.splitext(name)[1].lower() in wanted
    ]
    if not found:
        extensions = " ".join(sorted(VIDEO_EXTS))
        raise ValueError(f"--input {folder}: no video files in it or below (looked for {extensions})")
    return sorted(found)


def is_listed_path(row):
    """A csv/text row that names a file: not empty, not a # comment."""
    if not row:
        return False
    return bool(row[0].strip()) and (not row[0].startswith("#"))


def list_videos(source):
    """Video paths from a folder (recursive, by extension) or a csv/text list (first column)."""
    if os.path.isdir(source):
        return list_folder(source)
    if not os.path.isfile(source):
        raise ValueError(f"--input {source}: no such folder or list file")
    base = os.path.dirname(os.path.abspath(source))
    with open(source, newline="") as f:
        rows = [row for row in csv.reader(f) if is_listed_path(row)]
    has_header = bool(rows) and (rows[0][0].strip().lower() in LIST_HEADERS)
    if has_header:
        rows = rows[1:]
    if not rows:
        raise ValueError(f"--input {source}: the list names no videos (one path a line)")
    return [os.path.join(base, row[0].strip()) for row in rows]


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def is_segment_row(row):
    """A VGGSound (label in column 2) or AudioSet (labels in column 3) row: id, start, ..."""
    return (len(row) >= 4) and _is_number(row[1])


def segment_keys(video_id, start_text):
    """The usual names of a segment's file: {id}_{start} as written, %.3f, 6 digits, int."""
    start = float(start_text)
    return [
        f"{video_id}_{start_text}",
        f"{video_id}_{start:.3f}",
        f"{video_id}_{int(start):06d}",
        f"{video_id}_{int(start)}",
    ]


def read_video_labels(path):
    """Labels per video_id from a csv in one of three layouts; returns dict video_id -> [label,
    ...].

    `video_id,labels` (labels: mids or names separated by commas, quoted), the VGGSound csv
    `youtube_id,start_seconds,label,split` and the AudioSet segment csv `YTID, start_seconds,
    end_seconds, positive_labels`. Segment rows are keyed as {id}_{start} in the usual spellings
    (`abc_30`, `abc_30.000`, `abc_000030`) and by the bare id.
    """
    with open(path, newline="") as f:
        rows = [
            [c.strip() for c in row]
            for row in csv.reader(f, skipinitialspace=True)
            if row and (not row[0].lstrip().startswith("#"))
        ]
    has_header = bool(rows) and (rows[0][0].lower() in LABEL_HEADERS)
    if has_header:
        rows = rows[1:]
    labels = {}
    for n, row in enumerate(rows, 1):
        if is_segment_row(row):
            audioset = _is_number(row[2])  # its column 2 is the end time
            names = row[3].split(",") if audioset else [row[2]]
            for key in segment_keys(row[0], row[1]):
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


def number_label_names(entries, names):
    """Labels given by name get mids /label/0000, ... in name order; returns (mids, names)."""
    mids = {name: f"/label/{i:04d}" for i, name in enumerate(names)}
    for e in entries:
        e["labels"] = [mids[l] for l in e["labels"]]
    return list(mids.values()), names


def report(out, entries, counts, failed):
    done = f"{counts['done']} extracted, {counts['skipped']} already done"
    print(f"{len(entries)} videos ready in {os.path.join(out, 'data.json')} ({done}), {len(failed)} failed")
    for video, reason in failed:
        print(f"  FAILED {video}: {reason}")
    if failed:
        print(f"failures listed in {os.path.join(out, 'failed.csv')}")


def prepare_videos(source, out, labels_csv=None, workers=None):
    """Extract every video of `source` into `out`; write data.json, failed.csv (and labels.csv).
    Returns the failures, (video, reason) each."""
    check_ffmpeg()
    videos = list_videos(source)
    table = read_video_labels(labels_csv) if labels_csv else {}  # a bad csv fails before any work
    os.makedirs(out, exist_ok=True)
    jobs = []
    failed = []  # (video, reason)
    seen = {}  # video_id: the video it came from
    for video in videos:
        video_id = os.path.splitext(os.path.basename(video))[0]
        if video_id in seen:
            failed.append((video, f"duplicate video_id {video_id!r} (also {seen[video_id]})"))
        else:
            seen[video_id] = video
            jobs.append((video, video_id, out))
    if workers is None:
        workers = os.cpu_count() or 1
    results = parallel_map(prepare_video, jobs, workers, "videos")

    entries = []
    counts = {"done": 0, "skipped": 0}
    for (video, video_id, _), (status, reason) in zip(jobs, results):
        if status == "failed":
            failed.append((video, reason))
        elif labels_csv and (not table.get(video_id)):
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
    label_csv = os.path.join(out, "labels.csv")
    if not labels_csv:  # a one-class dummy label file keeps the folder loadable for pretraining
        write_label_csv(label_csv, ["/m/unlabeled"], ["unlabeled"])
    elif any(not l.startswith("/") for l in names):  # names, not mids: number them
        write_label_csv(label_csv, *number_label_names(entries, names))
    for e in entries:
        e["labels"] = ",".join(e["labels"])
    write_json_atomic(os.path.join(out, "data.json"), {"data": entries})
    with open(os.path.join(out, "failed.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("video", "reason"), *failed])
    report(out, entries, counts, failed)
    return failed


# ----------------------------------------------------------------------------
# Command line: one function per subcommand, each returning the exit status


def cmd_videos(args):
    """Exit status 0 when every video became a sample, 1 when some failed (OUT/failed.csv)."""
    failed = prepare_videos(args.input, args.out, args.labels, args.workers)
    return 1 if failed else 0


def cmd_synthetic(args):
    import synthetic  # the generator reads this file's format helpers

    start = time.time()
    synthetic.make_synthetic(
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
    kind = " (multi-label)" if args.multilabel else ""
    clips = f"{args.n_train} train + {args.n_test} test clips, {args.num_classes} classes{kind}"
    sizes = f"{args.image_size}px frames, {args.seconds} s audio"
    print(f"synthetic: {clips}, {sizes} -> {args.out} in {time.time() - start:.1f} s")
    return 0


def check_datafile(datafile, label_csv, num_frames=10, image_size=224, show=20):
    """Load every row of a datafile as training does (data.row_problems: the wav, each frame, the
    labels); print a summary and the first `show` rows with problems. Returns how many have some."""
    start = time.time()
    rows = data.read_datafile(datafile)
    labels = data.load_label_csv(label_csv)
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


def cmd_check(args):
    """Exit status 0 when every row loads, 1 when some rows have problems. A missing or unreadable
    datafile or label csv raises data.DataError (a ValueError): main's exit status 2."""
    bad_rows = check_datafile(args.data, args.label_csv, args.num_frames, args.image_size)
    return 1 if bad_rows else 0


def main(argv=None):
    description = __doc__.split("\n\n")[0].strip()
    parser = argparse.ArgumentParser(description=description)
    commands = parser.add_subparsers(dest="command", required=True)

    videos = commands.add_parser("videos", help="extract audio and frames from real videos")
    videos.add_argument("--input", required=True, help="folder of videos, or a csv/text list")
    videos.add_argument("--out", required=True, help="output folder")
    videos.add_argument("--labels", help="csv: video_id,labels | VGGSound | AudioSet segments")
    videos.add_argument("--workers", type=int, default=None, help="parallel videos (default: CPUs)")
    videos.set_defaults(run=cmd_videos)

    synth = commands.add_parser(
        "synthetic", help="generate the synthetic audio-visual dataset (synthetic.py)"
    )
    synth.add_argument("--out", default="data/synthetic")
    synth.add_argument("--n-train", type=int, default=2000)
    synth.add_argument("--n-test", type=int, default=500)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--seconds", type=float, default=2.56)
    synth.add_argument("--num-classes", type=int, default=10)
    synth.add_argument("--multilabel", action="store_true", help="1-3 events of different classes")
    synth.add_argument("--workers", type=int, default=None)
    synth.set_defaults(run=cmd_synthetic)

    check_help = (
        "load every row of a datafile as training does; exit status 1 when rows have problems, "
        "2 when the datafile or label csv is missing or unreadable"
    )
    check = commands.add_parser("check", help=check_help, description=check_help)
    check.add_argument("--data", required=True, help="the datafile (json)")
    check.add_argument(
        "--label-csv",
        "--label_csv",  # the spelling of eval.py and bench.py
        dest="label_csv",
        required=True,
        help="its label csv (index,mid,display_name)",
    )
    check.add_argument("--num-frames", type=int, default=10, help="frames per video")
    check.add_argument("--image-size", type=int, default=224, help="the size frames are decoded at")
    check.set_defaults(run=cmd_check)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (RuntimeError, ValueError) as error:
        # ffmpeg missing; a bad --input, --labels or setting; a missing or unreadable datafile or label csv
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
