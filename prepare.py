"""
Prepare data for CAV-MAE in the official on-disk format, from real videos or drawn from nothing.

    python prepare.py videos --input FOLDER --out OUT [--labels CSV] [--workers N]
    python prepare.py synthetic --out data/synthetic [--n-train 2000 --n-test 500 --multilabel ...]

The format (what data.py reads), paths relative to the datafile's folder:
    datafile    {"data": [{"video_id", "wav", "video_path", "labels": "mid1,mid2"}, ...]}
    labels.csv  index,mid,display_name
    wav         16 kHz mono PCM16:          audio/{video_id}.wav
    frames      10 RGB JPEGs per video:     {video_path}/frame_{i}/{video_id}.jpg, i = 0..9

`videos` extracts real videos as the official scripts do (docs/preprocessing.md, section 5);
--labels is a csv of `video_id,labels` rows, each label its own mid (default: /m/unlabeled). Videos
that fail are listed, with why, in OUT/failed.csv (exit status 1); a rerun does only what is missing.
`synthetic` draws shapes that sound, with objects.json: where each object is on each frame.
"""

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction

import numpy as np
import soundfile as sf
from PIL import Image
from tqdm import tqdm

import data

NUM_FRAMES = 10  # frames per video, spread over its first 10 seconds
VIDEO_EXTS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".wmv", ".3gp", ".ts"}


def parallel_map(fn, jobs, workers, desc, chunksize=1):
    """list(map(fn, jobs)) in `workers` processes (None: all CPUs; 1: here), with a progress bar."""
    if workers == 1:
        return list(tqdm(map(fn, jobs), total=len(jobs), desc=desc))
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, jobs, chunksize=chunksize), total=len(jobs), desc=desc))


def write_datafile(path, labels):
    """labels: {video_id: "mid1,mid2"}; the clips' wavs and frames lie beside the datafile."""
    rows = [dict(video_id=v, wav=f"audio/{v}.wav", video_path="frames", labels=labels[v]) for v in labels]
    with open(path, "w") as f:
        json.dump({"data": rows}, f, indent=1)


def write_label_csv(path, mids, names):
    rows = [[i, mid, name] for i, (mid, name) in enumerate(zip(mids, names))]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["index", "mid", "display_name"], *rows])


# ----------------------------------------------------------------------------
# Real videos, with ffprobe and ffmpeg


def ffmpeg_error(result):
    """ffmpeg's first line on stderr, without its `[demuxer @ 0x...]` prefix."""
    lines = result.stderr.decode(errors="replace").strip().splitlines() + ["no message from ffmpeg"]
    return re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\] ", "", lines[0])


def probe(video):
    """(the index of the video stream, total): what the official OpenCV extractor sees of `video`.

    fps is OpenCV's CAP_PROP_FPS: the stream's average frame rate. The frame count is
    CAP_PROP_FRAME_COUNT: the container's, else floor(duration * fps + 0.5); a container with
    neither (a webm as browsers write it) has its packets counted. total = min(count, int(10 fps))
    is the number of frames the 10 samples are spread over."""
    entries = "stream=index,codec_type,avg_frame_rate,time_base,nb_frames,duration,nb_read_packets"
    entries += ":stream_disposition=attached_pic:format=duration"
    cmd = "ffprobe -v error -count_packets -of json -show_entries".split() + [entries, video]
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0:
        raise ValueError(f"not a readable video ({ffmpeg_error(result)})")
    facts = json.loads(result.stdout)
    streams = facts.get("streams", [])
    # the cover art of an audio file is a video stream of one picture
    videos = [s for s in streams if s["codec_type"] == "video" and not s["disposition"]["attached_pic"]]
    if not videos:
        raise ValueError("no video stream")
    if not any(s["codec_type"] == "audio" for s in streams):
        raise ValueError("no audio stream")
    stream = videos[0]
    rate = stream["avg_frame_rate"]
    if rate == "0/0":  # unknown: OpenCV takes 1 / the time base
        rate = "/".join(reversed(stream["time_base"].split("/")))
    fps = float(Fraction(rate))
    count = int(stream.get("nb_frames", 0))
    if count == 0:
        duration = float(facts["format"].get("duration", stream.get("duration", 0)))
        count = math.floor(duration * fps + 0.5)
    if count == 0:
        count = int(stream["nb_read_packets"])  # a packet holds one frame
    total = min(count, int(fps * 10))
    if total < NUM_FRAMES:
        raise ValueError(f"too short: {total} frames in the first 10 s, need {NUM_FRAMES}")
    return stream["index"], total


def frame_indices(total):
    """0-based decode index of each of the 10 frames: the official seek to int(i*total/10) - 1."""
    return [max(int(i * (total / NUM_FRAMES)) - 1, 0) for i in range(NUM_FRAMES)]


def extract_frames(video, stream_index, total, paths):
    """Write the 10 official frames of `video` to `paths`: decoded by ffmpeg, resized by Pillow."""
    indices = frame_indices(total)
    wanted = sorted(set(indices))  # each decode index comes out once, in order
    select = "+".join(f"eq(n\\,{k})" for k in wanted)
    # setpts and -r 1 put the k-th selected frame at second k of the output: none repeated or lost
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", video, "-map", f"0:{stream_index}"]
    cmd += ["-vf", f"select='{select}',setpts=N/TB", "-r", "1", "-frames:v", str(len(wanted))]
    with tempfile.TemporaryDirectory() as tmp:
        cmd += ["-pix_fmt", "rgb24", os.path.join(tmp, "%d.png")]
        result = subprocess.run(cmd, capture_output=True)
        pngs = [os.path.join(tmp, f"{n + 1}.png") for n in range(len(wanted))]  # numbered from 1
        decoded = sum(os.path.isfile(png) for png in pngs)
        if decoded < len(wanted):  # the official extractor stops at the first unreadable frame
            reason = f"decoding stopped before frame {wanted[decoded]} ({ffmpeg_error(result)})"
            raise ValueError(f"truncated or corrupt: {reason}")
        for path, k in zip(paths, indices):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            frame = data.resize_crop(Image.open(pngs[wanted.index(k)]), 224, Image.BILINEAR)
            frame.save(path, "JPEG")  # Pillow's defaults: quality 75, 4:2:0


def extract_audio(video, wav_path):
    """Write the first audio channel of `video`, resampled to 16 kHz, as a PCM16 wav. pan keeps
    channel 0 as the official `sox ... remix 1` does (-ac 1 would average the channels)."""
    part = wav_path + ".part"
    options = "-vn -af pan=mono|c0=c0 -ar 16000 -c:a pcm_s16le -bitexact -map_metadata -1 -f wav"
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", video, *options.split(), part]
    result = subprocess.run(cmd, capture_output=True)
    if result.returncode != 0:
        raise ValueError(f"audio extraction failed ({ffmpeg_error(result)})")
    os.replace(part, wav_path)


def prepare_video(job):
    """One video (job: path, video_id, output folder) -> its wav and frames, unless there."""
    video, video_id, out = job
    wav = os.path.join(out, "audio", f"{video_id}.wav")
    frames = [os.path.join(out, "frames", f"frame_{i}", f"{video_id}.jpg") for i in range(NUM_FRAMES)]
    if all(os.path.isfile(path) for path in [wav, *frames]):
        return ""
    try:
        stream_index, total = probe(video)
        extract_frames(video, stream_index, total, frames)
        extract_audio(video, wav)  # last, renamed into place: a run cut short leaves no wav
    except Exception as error:  # a reason above, or the unforeseen (a disk full): the rest go on
        return str(error)
    return ""


def list_videos(folder):
    """The videos of a folder and its subfolders."""
    paths = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    found = [path for path in paths if os.path.splitext(path)[1].lower() in VIDEO_EXTS]
    if not found:
        raise ValueError(f"--input {folder}: not a folder with video files")
    return sorted(found)


def read_labels(path):
    """{video_id: "label1,label2"} from a csv of `video_id,labels` rows (a header does no harm)."""
    labels = {}
    with open(path, newline="") as f:
        for row in filter(None, csv.reader(f)):  # a blank line is an empty row
            names = [name.strip() for name in ",".join(row[1:]).split(",")]  # quoted or not
            labels[row[0].strip()] = ",".join(name for name in names if name)
    return labels


def prepare_videos(source, out, labels_csv=None, workers=None):
    """Extract the videos of folder `source` into `out`; write data.json, labels.csv, failed.csv."""
    if (shutil.which("ffmpeg") is None) or (shutil.which("ffprobe") is None):
        install = "apt-get install -y ffmpeg, brew install ffmpeg or conda install -c conda-forge ffmpeg"
        raise RuntimeError(f"prepare.py needs ffmpeg and ffprobe: install them with {install}")
    jobs = [(video, os.path.splitext(os.path.basename(video))[0], out) for video in list_videos(source)]
    twice = [video_id for video_id, n in Counter(job[1] for job in jobs).items() if n > 1]
    if twice:  # their files would overwrite each other
        raise ValueError(f"--input {source}: {len(twice)} video_ids name two videos, e.g. {twice[0]!r}")
    if labels_csv:
        labels = read_labels(labels_csv)  # before any work
    else:  # one class, enough for pretraining
        labels = {video_id: "/m/unlabeled" for _, video_id, _ in jobs}
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    reasons = parallel_map(prepare_video, jobs, workers, "videos")

    ready = {}  # video_id: its labels
    failed = []  # (video, reason)
    for (video, video_id, _), reason in zip(jobs, reasons):
        if not reason and not labels.get(video_id):
            reason = f"no labels for {video_id!r} in {labels_csv}"
        if reason:
            failed.append((video, reason))
        else:
            ready[video_id] = labels[video_id]
    mids = sorted({mid for video_labels in ready.values() for mid in video_labels.split(",")})
    write_label_csv(os.path.join(out, "labels.csv"), mids, mids)  # each label its own mid and name
    write_datafile(os.path.join(out, "data.json"), ready)
    with open(os.path.join(out, "failed.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("video", "reason"), *failed])
    print(f"{len(ready)} videos ready in {os.path.join(out, 'data.json')}, {len(failed)} failed")
    for video, reason in failed:
        print(f"  FAILED {video}: {reason}")
    return failed


# ----------------------------------------------------------------------------
# The synthetic dataset: shapes that sound. A class is a shape and a timbre, each recognisable
# alone; the two modalities share cues, so that retrieval must learn more than the class: hue <->
# pitch, number of objects <-> number of onsets, left to right <-> order in time, size <-> loudness.

CLASSES = [  # (shape, sound)
    ("disk", "pure tone"),
    ("square", "square wave"),
    ("triangle", "sawtooth"),
    ("diamond", "noise band"),
    ("plus", "rising chirp"),
    ("ring", "falling chirp"),
    ("x-cross", "tremolo"),
    ("striped square", "vibrato"),
    ("checkered disk", "pluck"),
    ("bar", "bell"),
]
OBJECTS_HELP = (  # objects.json's "geometry"
    "clips[video_id][frame]: its objects {class, x, y, radius, sounding} in pixels from the top-left corner; "
    "(px, py) is inside one where prepare.shape_mask(class, (px - x) / radius, (py - y) / radius)[0]"
)


def shape_mask(cls, x, y):
    """(inside, dark texture) boolean masks of class `cls`'s shape; x, y: coordinates / radius."""
    ax = np.abs(x)
    ay = np.abs(y)
    r2 = x * x + y * y
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
    t = np.arange(n) / data.SAMPLE_RATE
    dur = n / data.SAMPLE_RATE

    def partials(ratios, amps):
        """Sines at f0 times each ratio (those below the Nyquist margin), each with a random phase."""
        keep = [(r, a) for r, a in zip(ratios, amps) if r * f0 < 0.45 * data.SAMPLE_RATE]
        return sum(a * np.sin(2 * np.pi * r * f0 * t + rng.uniform(0, 2 * np.pi)) for r, a in keep)

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
    wave = wave * np.minimum(1, np.minimum(t / 0.01, (dur - t) / 0.06))  # fade 10 ms in, 60 ms out
    return wave / (np.abs(wave).max() + 1e-9)


def background(rng, S):
    """(S, S, 3) float: a dull colour with a linear gradient in a random direction."""
    colour = hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.1, 0.45))
    gradient_dir = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0, 40)
    from_centre = np.arange(S) - S / 2  # (S,) pixels
    # (S, S) signed distance along the gradient, in pixels
    along = from_centre[None, :] * np.cos(gradient_dir) + from_centre[:, None] * np.sin(gradient_dir)
    return colour + gradient * along[..., None] / S


def draw_clip(rng, classes, image_size, seconds, distractors=0, num_classes=10):
    """One clip, an object per entry of `classes`: frames (10, S, S, 3) uint8, waveform (N,) int16,
    where the objects are: per frame, [dict(class, x, y, radius, sounding)] in pixels (k spans [k, k + 1)),
    with `distractors` silent ones of other classes, drawn alike from a generator of their own."""
    S = image_size
    n = len(classes)
    silent_rng = rng.spawn(1)[0]  # spawning takes no draws from rng
    n_samples = int(round(seconds * data.SAMPLE_RATE))
    hues = rng.uniform(0, 0.8, n)  # 0.8: stop before red wraps round
    pitches = 200 * 2 ** (3 * hues / 0.8)  # hue <-> pitch: 200 .. 1600 Hz
    loud = rng.uniform(0.8, 1.25)  # near = big and loud
    depth = rng.uniform(0.15, 0.3)
    cycles = rng.uniform(0.4, 1.2)
    phase = rng.uniform(0, 2 * np.pi)

    def envelope(t):  # the loudness, and the objects' size, over the clip
        return 1 + depth * np.sin(2 * np.pi * cycles * t / seconds + phase)

    # audio: sounding object j (left to right) sounds its note in time slot j
    slot = seconds / n
    wave = np.zeros(n_samples)
    for j, (cls, f0) in enumerate(zip(classes, pitches)):
        start = int((j + rng.uniform(0, 0.2)) * slot * data.SAMPLE_RATE)
        length = int(min(1.2, 0.7 * slot) * data.SAMPLE_RATE)
        wave[start : start + length] += note(cls, f0, length, rng)[: n_samples - start]
    t = np.arange(n_samples) / data.SAMPLE_RATE
    wave *= 0.3 * loud * envelope(t)
    noise = rng.standard_normal(n_samples) * rng.uniform(0.003, 0.03) * 0.3  # 10-30 dB quieter
    pcm = np.round(np.clip(wave + noise, -1, 1) * 32767).astype(np.int16)

    # frames: background + objects, 2 x 2 supersampled edges
    base = background(rng, S)  # (S, S, 3)
    pixel_noise = rng.uniform(2, 10)
    count = n + distractors
    n_rows = math.ceil(count / 3)  # slot k in row k // 3: 3 to a row, as without distractors

    def centres(rng, slots):  # slots, x, y, left to right; x, y in a slot's middle 40 %
        rows = slots // 3
        slot_width = S / np.minimum(count - 3 * rows, 3)  # (len(slots),) the last row holds 1-3
        xs = rng.uniform(0.3, 0.7, len(slots)) * slot_width + slots % 3 * slot_width
        ys = (rows + rng.uniform(0.3, 0.7, len(slots))) * (S / n_rows)
        left_to_right = np.argsort(xs)
        return slots[left_to_right], xs[left_to_right], ys[left_to_right]

    def looks(rng, hues):  # radius and colour of an object of each hue
        radii = 0.1 * S * loud * rng.uniform(0.9, 1.1, len(hues))
        colours = [hsv_to_rgb(h, rng.uniform(0.75, 1), rng.uniform(0.85, 1)) for h in hues]
        return radii, colours

    sounding_slots = np.sort(silent_rng.choice(count, n, replace=False))  # any n of the slots
    sounding_slots, xs, ys = centres(rng, sounding_slots)  # object j is j-th from the left
    drift = rng.uniform(-0.08, 0.08, 2) * S
    radii, colours = looks(rng, hues)
    silent_slots = np.setdiff1d(np.arange(count), sounding_slots)
    silent_classes = silent_rng.choice([c for c in range(num_classes) if c not in classes], distractors)
    silent_slots, silent_xs, silent_ys = centres(silent_rng, silent_slots)
    silent_radii, silent_colours = looks(silent_rng, silent_rng.uniform(0, 0.8, distractors))
    sounding = zip(sounding_slots, classes, xs, ys, radii, colours)
    silent = zip(silent_slots, silent_classes, silent_xs, silent_ys, silent_radii, silent_colours)
    shapes = sorted([*sounding, *silent], key=lambda shape: shape[0])  # painted in slot order
    sub_pixel = 0.5 * np.array([0, 1])[:, None]  # (2, 1): 2 samples per pixel and axis
    grid = (np.arange(S) + 0.5)[None, :] - 0.25 + sub_pixel  # (2, S)
    gy = grid[:, None, :, None]  # (2, 1, S, 1)
    gx = grid[None, :, None, :]  # (1, 2, 1, S)
    frames = np.empty((NUM_FRAMES, S, S, 3), np.uint8)
    objects = []
    for i in range(NUM_FRAMES):
        t_i = i * seconds / NUM_FRAMES
        image = base.copy()  # (S, S, 3)
        objects.append([])
        for slot, cls, x0, y0, r0, colour in shapes:
            r = r0 * envelope(t_i)
            x = x0 + drift[0] * t_i / seconds
            y = y0 + drift[1] * t_i / seconds
            position = {"x": round(float(x), 4), "y": round(float(y), 4), "radius": round(float(r), 4)}
            objects[-1].append({"class": int(cls), **position, "sounding": bool(slot in sounding_slots)})
            # the pixels the shape can touch
            rows = slice(max(int(y - 1.2 * r), 0), max(int(y + 1.2 * r) + 2, 0))
            columns = slice(max(int(x - 1.2 * r), 0), max(int(x + 1.2 * r) + 2, 0))
            inside, dark = shape_mask(cls, (gx[..., columns] - x) / r, (gy[..., rows, :] - y) / r)
            cover = inside.mean(axis=(0, 1))[..., None]  # (h, w, 1) in [0, 1]
            shade = (inside & dark).mean(axis=(0, 1))[..., None]
            paint = colour * (cover - 0.65 * shade)  # the textures' dark parts at 35 % brightness
            image[rows, columns] = image[rows, columns] * (1 - cover) + paint
        image += rng.normal(0, pixel_noise, image.shape)
        frames[i] = np.clip(np.round(image), 0, 255)
    return frames, pcm, objects


def inside_objects(frame_objects, x, y):
    """Which points lie inside one of a frame's objects (objects.json's {class, x, y, radius}):
    a boolean array shaped like x and y, numpy arrays in pixels of the frame."""
    inside = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    for o in frame_objects:
        inside |= shape_mask(o["class"], (x - o["x"]) / o["radius"], (y - o["y"]) / o["radius"])[0]
    return inside


def make_clip(job):
    """Draw and write one clip with its own Generator; (video_id, labels, objects)."""
    out, video_id, seed, split, index, image_size, seconds, num_classes, multilabel, distractors = job
    rng = np.random.default_rng([seed, split, index])
    if multilabel:  # 1-3 different events, one object each
        classes = rng.choice(num_classes, size=rng.integers(1, min(3, num_classes) + 1), replace=False)
    else:  # one event class, 1-3 objects
        classes = np.full(rng.integers(1, 4), rng.integers(num_classes))
    frames, pcm, objects = draw_clip(rng, list(classes), image_size, seconds, distractors, num_classes)
    sf.write(os.path.join(out, "audio", f"{video_id}.wav"), pcm, data.SAMPLE_RATE, subtype="PCM_16")
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(out, "frames", f"frame_{i}", f"{video_id}.jpg"), "JPEG")
    labels = ",".join(f"/synth/{c:02d}" for c in sorted(set(int(c) for c in classes)))
    return video_id, labels, objects


def make_synthetic(
    out,
    n_train=2000,
    n_test=500,
    seed=0,
    image_size=64,
    seconds=2.56,
    num_classes=10,
    multilabel=False,
    distractors=0,
    workers=None,
):
    """Write train.json, test.json, labels.csv, objects.json, audio/ and frames/ to `out`."""
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be between 2 and {len(CLASSES)}, got {num_classes}")
    if not 0 <= distractors <= 6:  # with 3 sounding objects, 9 fill the 3 rows of 3 slots
        raise ValueError(f"distractors must be between 0 and 6, got {distractors}")
    if distractors > 0 and multilabel and num_classes <= 3:  # 3 events may take every class
        raise ValueError(f"distractors need a silent class: num_classes above 3, got {num_classes}")
    for i in range(NUM_FRAMES):
        os.makedirs(os.path.join(out, "frames", f"frame_{i}"), exist_ok=True)
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    settings = (image_size, seconds, num_classes, multilabel, distractors)
    jobs = []
    for split, (name, count) in enumerate([("train", n_train), ("test", n_test)]):
        for k in range(count):
            jobs.append((out, f"{name}_{k:05d}", seed, split, k, *settings))
    results = parallel_map(make_clip, jobs, workers, "synthetic", chunksize=16)

    for name in ("train", "test"):
        split_labels = {video_id: labels for video_id, labels, _ in results if video_id.startswith(name)}
        write_datafile(os.path.join(out, f"{name}.json"), split_labels)
    mids = [f"/synth/{c:02d}" for c in range(num_classes)]
    names = [f"{shape} + {sound}" for shape, sound in CLASSES[:num_classes]]
    write_label_csv(os.path.join(out, "labels.csv"), mids, names)
    clips = {video_id: geometry for video_id, _, geometry in results}
    shapes = [shape for shape, _ in CLASSES]
    objects = dict(frame_size=image_size, shapes=shapes, geometry=OBJECTS_HELP, clips=clips)
    with open(os.path.join(out, "objects.json"), "w") as f:
        json.dump(objects, f)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare data for CAV-MAE in its on-disk format.")
    commands = parser.add_subparsers(dest="command", required=True)
    videos = commands.add_parser("videos", help="extract audio and frames from real videos")
    videos.add_argument("--input", required=True, help="a folder of videos (and subfolders)")
    videos.add_argument("--out", required=True, help="output folder")
    videos.add_argument("--labels", help="csv of video_id,labels rows (the labels quoted)")
    videos.add_argument("--workers", type=int, help="videos in parallel (default: all CPUs)")
    synth = commands.add_parser("synthetic", help="draw the synthetic dataset: shapes that sound")
    synth.add_argument("--out", default="data/synthetic")
    synth.add_argument("--n-train", type=int, default=2000)
    synth.add_argument("--n-test", type=int, default=500)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--seconds", type=float, default=2.56)
    synth.add_argument("--num-classes", type=int, default=10)
    synth.add_argument("--multilabel", action="store_true", help="1-3 events of different classes")
    synth.add_argument("--distractors", type=int, default=0, help="silent objects per clip")
    synth.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    options = {name: value for name, value in vars(args).items() if name != "command"}
    try:
        if args.command == "synthetic":
            make_synthetic(**options)  # the options are named as its arguments
            print(f"synthetic dataset written to {args.out}")
            return 0
        failed = prepare_videos(args.input, args.out, args.labels, args.workers)
    except (OSError, RuntimeError, ValueError) as error:  # no ffmpeg, a bad --input or setting
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
