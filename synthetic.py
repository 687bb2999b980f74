"""
The synthetic audio-visual dataset: shapes that sound. Written in the official on-disk format
(prepare.py's docstring describes it), so everything that reads real data reads it too.

    python prepare.py synthetic --out data/synthetic [--n-train 2000 --n-test 500 --seed 0 --multilabel]

Class = a visual shape/texture + a sound timbre (each recognisable alone). Instance cues shared by
both modalities, so retrieval must learn more than the class: hue <-> pitch of each object's note,
number of objects <-> number of note onsets, left-to-right order <-> order in time, size <->
loudness (the size follows the loudness envelope over the 10 frames). Nuisances: background colour,
gradient and pixel noise, vertical position, drift, audio noise level.

Beside the official files, objects.json records where each object is on each frame, for eval.py's
localisation score (`inside_objects` tests points against it, `read_objects` reads it back). Every
clip draws from its own random generator, so a seed gives the same bytes with any number of workers.
"""

import json
import os

import numpy as np
import soundfile as sf
from PIL import Image

from prepare import (
    MIN_SAMPLES,
    NUM_FRAMES,
    SAMPLE_RATE,
    frame_path,
    parallel_map,
    write_json_atomic,
    write_label_csv,
)

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
MIN_IMAGE_SIZE = 16  # smaller frames leave the shapes a pixel or two
POOL_MIN_CLIPS = 64  # a process pool costs more than it saves below this many clips

OBJECTS = "objects.json"  # beside the datafiles: where each object is on each frame
OBJECTS_HELP = (
    "clips[video_id][frame] lists the objects on that frame as {class, x, y, radius} in pixels (x to "
    "the right, y down, (0, 0) the top-left corner); a point (px, py) is inside an object where "
    "synthetic.shape_mask(class, (px - x) / radius, (py - y) / radius) is true"
)


# ----------------------------------------------------------------------------
# Drawing one clip


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
    t = np.arange(n) / SAMPLE_RATE
    dur = n / SAMPLE_RATE
    nyquist_margin = 0.45 * SAMPLE_RATE

    def partials(ratios, amps):
        """Sines at f0 times each ratio (those below the Nyquist margin), each with a random phase."""
        keep = [(r, a) for r, a in zip(ratios, amps) if r * f0 < nyquist_margin]
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
    ramp = np.minimum(1, np.minimum(t / 0.01, (dur - t) / 0.06))  # 10 ms attack, 60 ms release
    wave = wave * ramp
    return wave / (np.abs(wave).max() + 1e-9)


def object_box(x, y, r):
    """(rows, columns) slices of the pixels that a shape of radius r centred at (x, y) can touch."""
    rows = slice(max(int(y - 1.2 * r), 0), max(int(y + 1.2 * r) + 2, 0))
    columns = slice(max(int(x - 1.2 * r), 0), max(int(x + 1.2 * r) + 2, 0))
    return rows, columns


def background(rng, S):
    """(S, S, 3) float: a dull colour with a linear gradient in a random direction."""
    colour = hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.1, 0.45))
    gradient_dir = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0, 40)
    from_centre = np.arange(S) - S / 2  # (S,) pixels
    # (S, S) signed distance along the gradient, in pixels
    along = from_centre[None, :] * np.cos(gradient_dir) + from_centre[:, None] * np.sin(gradient_dir)
    return colour + gradient * along[..., None] / S


def draw_clip(rng, classes, image_size, seconds):
    """Draw one clip: (10 frames (10, S, S, 3) uint8, waveform (N,) int16, where the objects are).
    classes: one per object. The geometry is, per frame, a list of dict(class, x, y, radius) in
    pixels of the frame (x to the right, y down, pixel k spans [k, k + 1)); inside_objects() tests
    points against it."""
    S = image_size
    n = len(classes)
    n_samples = int(round(seconds * SAMPLE_RATE))
    hues = rng.uniform(0, 0.8, n)  # 0.8: stop before red wraps round
    pitches = 200 * 2 ** (3 * hues / 0.8)  # hue <-> pitch: 200 .. 1600 Hz
    loud = rng.uniform(0.8, 1.25)  # near = big and loud
    depth = rng.uniform(0.15, 0.3)
    cycles = rng.uniform(0.4, 1.2)
    phase = rng.uniform(0, 2 * np.pi)

    def envelope(t):  # the loudness, and the objects' size, over the clip
        return 1 + depth * np.sin(2 * np.pi * cycles * t / seconds + phase)

    # audio: object j (left to right) sounds its note in time slot j
    slot = seconds / n
    wave = np.zeros(n_samples)
    for j, (cls, f0) in enumerate(zip(classes, pitches)):
        start = int((j + rng.uniform(0, 0.2)) * slot * SAMPLE_RATE)
        length = int(min(1.2, 0.7 * slot) * SAMPLE_RATE)
        wave[start : start + length] += note(cls, f0, length, rng)[: n_samples - start]
    t = np.arange(n_samples) / SAMPLE_RATE
    wave *= 0.3 * loud * envelope(t)
    white = rng.standard_normal(n_samples)
    noise = white * rng.uniform(0.003, 0.03) * 0.3  # 10 .. 30 dB below the notes
    pcm = np.round(np.clip(wave + noise, -1, 1) * 32767).astype(np.int16)

    # frames: background + objects, 2 x 2 supersampled edges
    base = background(rng, S)  # (S, S, 3)
    pixel_noise = rng.uniform(2, 10)
    slot_width = S / n  # one horizontal slot per object
    xs = rng.uniform(0.3, 0.7, n) * slot_width + np.arange(n) * slot_width
    ys = rng.uniform(0.3, 0.7, n) * S
    drift = rng.uniform(-0.08, 0.08, 2) * S
    radii = 0.1 * S * loud * rng.uniform(0.9, 1.1, n)
    colours = [hsv_to_rgb(h, rng.uniform(0.75, 1), rng.uniform(0.85, 1)) for h in hues]
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
        for cls, x0, y0, r0, colour in zip(classes, xs, ys, radii, colours):
            r = r0 * envelope(t_i)
            x = x0 + drift[0] * t_i / seconds
            y = y0 + drift[1] * t_i / seconds
            drawn = {"class": int(cls), "x": float(x), "y": float(y), "radius": float(r)}
            objects[-1].append(drawn)
            rows, columns = object_box(x, y, r)
            inside, dark = shape_mask(cls, (gx[..., columns] - x) / r, (gy[..., rows, :] - y) / r)
            cover = inside.mean(axis=(0, 1))[..., None]  # (h, w, 1) in [0, 1]
            shade = (inside & dark).mean(axis=(0, 1))[..., None]
            paint = colour * (cover - 0.65 * shade)  # the textures' dark parts at 35 % brightness
            image[rows, columns] = image[rows, columns] * (1 - cover) + paint
        image += rng.normal(0, pixel_noise, image.shape)
        frames[i] = np.clip(np.round(image), 0, 255)
    return frames, pcm, objects


# ----------------------------------------------------------------------------
# Where the objects are: objects.json


def inside_objects(objects, x, y):
    """Which points lie inside one of a frame's objects (draw_clip's geometry): boolean array shaped
    like x and y, which are coordinates in pixels of the frame (arrays of any shape)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    inside = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    for o in objects:
        inside |= shape_mask(o["class"], (x - o["x"]) / o["radius"], (y - o["y"]) / o["radius"])[0]
    return inside


def objects_beside(datafile):
    """The objects.json next to `datafile`, or None when there is none (real data has none)."""
    if not datafile:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(datafile)), OBJECTS)
    return path if os.path.isfile(path) else None


def read_objects(path, datafile, video_ids):
    """make_synthetic's objects.json: `path`, else the one next to `datafile` if there (else (None,
    None)). Checked to hold every clip of video_ids. Returns (the objects, the path read)."""
    path = path or objects_beside(datafile)
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


def rounded_geometry(clip):
    """One clip's objects per frame with every number rounded to 4 decimals (1e-4 px)."""
    return [[{key: round(value, 4) for key, value in o.items()} for o in frame] for frame in clip]


# ----------------------------------------------------------------------------
# The dataset


def synthetic_mid(cls):
    return f"/synth/{cls:02d}"


def draw_classes(rng, num_classes, multilabel):
    """The class of each object of one clip."""
    if multilabel:  # 1-3 different events, one object each
        return rng.choice(num_classes, size=rng.integers(1, min(3, num_classes) + 1), replace=False)
    return np.full(rng.integers(1, 4), rng.integers(num_classes))  # one event class, 1-3 objects


def _make_clip(job):
    """Draw and write one synthetic clip; its own Generator makes the bytes independent of
    scheduling. Returns (class indices, object geometry per frame)."""
    out, video_id, seed, split, index, image_size, seconds, num_classes, multilabel = job
    rng = np.random.default_rng([seed, split, index])
    classes = draw_classes(rng, num_classes, multilabel)
    frames, pcm, objects = draw_clip(rng, list(classes), image_size, seconds)
    sf.write(os.path.join(out, "audio", f"{video_id}.wav"), pcm, SAMPLE_RATE, subtype="PCM_16")
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(frame_path(os.path.join(out, "frames"), i, video_id), "JPEG")
    return sorted(set(int(c) for c in classes)), objects


def check_settings(image_size, seconds, num_classes):
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be between 2 and {len(SHAPES)}, got {num_classes}")
    if seconds * SAMPLE_RATE < MIN_SAMPLES:
        raise ValueError(
            f"seconds must be at least {MIN_SAMPLES / SAMPLE_RATE} (a fbank window), got {seconds}"
        )
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")


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
    """Write the synthetic dataset to `out` (train.json, test.json, labels.csv, audio/, frames/)
    and, beside the official format, objects.json: where each clip's objects are on each frame
    (draw_clip's geometry, keyed by video_id). Return counts."""
    check_settings(image_size, seconds, num_classes)
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    for i in range(NUM_FRAMES):
        os.makedirs(os.path.join(out, "frames", f"frame_{i}"), exist_ok=True)
    splits = {"train": (0, n_train), "test": (1, n_test)}  # name: (the split's seed code, clips)
    jobs = [
        (out, f"{name}_{k:05d}", seed, code, k, image_size, seconds, num_classes, multilabel)
        for name, (code, count) in splits.items()
        for k in range(count)
    ]
    if len(jobs) < POOL_MIN_CLIPS:
        workers = 1
    elif workers is None:
        workers = os.cpu_count() or 1
    # (classes, geometry) of each clip
    results = parallel_map(_make_clip, jobs, workers, "synthetic", chunksize=16)
    video_ids = [job[1] for job in jobs]
    for name in splits:
        entries = [
            dict(
                video_id=video_id,
                wav=f"audio/{video_id}.wav",
                video_path="frames",
                labels=",".join(synthetic_mid(c) for c in classes),
            )
            for video_id, (classes, _) in zip(video_ids, results)
            if video_id.startswith(name)
        ]
        write_json_atomic(os.path.join(out, f"{name}.json"), {"data": entries})
    write_label_csv(
        os.path.join(out, "labels.csv"),
        [synthetic_mid(c) for c in range(num_classes)],
        [f"{SHAPES[c]} + {SOUNDS[c]}" for c in range(num_classes)],
    )
    geometry = {video_id: rounded_geometry(clip) for video_id, (_, clip) in zip(video_ids, results)}
    objects = dict(frame_size=image_size, shapes=SHAPES, geometry=OBJECTS_HELP, clips=geometry)
    write_json_atomic(os.path.join(out, OBJECTS), objects, indent=None)
    return dict(train=n_train, test=n_test)
