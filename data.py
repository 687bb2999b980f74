"""CAV-MAE's input pipeline: files -> (fbank, image, label) tensors, equal to the official loader (preprocessing.md).

One definition of every augmentation: a worker decodes a row and draws every random choice of the item (frame,
mixup partner from the whole dataset and lambda, SpecAugment bands, noise seed, scale and roll) from Python's
`random`, NumPy and torch's CPU generator (train.py seeds them per item); BatchPreprocessor applies the draws:
    ds = AVDataset(datafile, label_csv, raw=True, ...)   # ds[i] or ds[(i, frame)] -> a raw item (dict)
    loader = DataLoader(ds, batch_size, collate_fn=collate_raw, num_workers=8, pin_memory=True)
    prep = BatchPreprocessor.from_dataset(ds)
    for batch in loader:
        audio, image, label = prep(batch, device)        # [B, T, 128], [B, 3, S, S], [B, K]
AVDataset(raw=False)[i] -> (fbank [T, 128], image [3, S, S], label [K]) is the same code on a batch of one.
Project deviations: bad input raises a clear error instead of becoming a 0.01-filled sample; non-RGB frames are
converted to RGB; augmentation only when train=True; a mixup partner's frame comes from its own video_path (the
official code looks under the first sample's); the noise field is hash_uniform's. CLI: see main().
"""

import argparse
import csv
import ctypes
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from array import array
from collections import namedtuple
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

SAMPLE_RATE = 16000
WIN, HOP = 400, 160  # fbank window and hop in samples: 25 ms and 10 ms at 16 kHz
AUDIOSET_MEAN, AUDIOSET_STD = -5.081, 4.4849  # fbank normalisation of the paper (AudioSet's)
IMAGE_MEAN, IMAGE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MIXUP_BETA = 10.0  # lambda ~ Beta(10, 10)


class DataError(ValueError):
    """A file, row or label that cannot become a training sample."""


# ----------------------------------------------------------------------------------------------------------
# Audio: Kaldi fbank (preprocessing.md 1.2-1.4)

_CACHE = {}  # device constants: mel filters, windows, image mean/std, noise counters
CPU_BLOCK_FRAMES = 1024  # fbank works through a CPU batch in cache-sized blocks; other devices take it whole
BAND_GROUP = 16  # mel bands per block of the band-limited filterbank product


def mel_filterbank(num_mel_bins=128, n_fft=512, sample_rate=SAMPLE_RATE, low_freq=20.0, high_freq=0.0):
    """Kaldi's triangular mel filters, linear in mel = 1127 ln(1 + f/700), [num_mel_bins, n_fft // 2 + 1] float32,
    built with the same float32 torch ops as torchaudio (preprocessing.md 1.4)."""

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    high = high_freq if high_freq > 0 else high_freq + 0.5 * sample_rate
    mel_low, mel_high = mel(low_freq), mel(high)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    b = torch.arange(num_mel_bins).unsqueeze(1)  # (M, 1), float32 below
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    bin_mel = 1127.0 * (1.0 + sample_rate / n_fft * torch.arange(n_fft // 2) / 700.0).log()  # (n_fft/2,)
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    weights = torch.max(torch.zeros(1), torch.min(up, down))  # (M, n_fft/2)
    return F.pad(weights, (0, 1))  # zero column for Nyquist


def _fbank_constants(win, n_fft, num_mel_bins, sample_rate, low_freq, high_freq, device, dtype):
    """Hann window, dense filters and their band-limited blocks [(first band, lo bin, hi bin, (hi-lo, G) weights)]."""
    key = (win, n_fft, num_mel_bins, sample_rate, low_freq, high_freq, str(device), dtype)
    if key not in _CACHE:
        weights = mel_filterbank(num_mel_bins, n_fft, sample_rate, low_freq, high_freq)  # built on the CPU
        bands = []
        for g in range(0, num_mel_bins, BAND_GROUP):
            support = weights[g : g + BAND_GROUP].ne(0).any(0).nonzero().flatten().tolist() or [0]
            lo, hi = support[0], support[-1] + 1  # each triangle is contiguous
            bands.append(
                (g, lo, hi, constant_on(weights[g : g + BAND_GROUP, lo:hi].T.contiguous().to(dtype), device))
            )
        window = torch.hann_window(win, periodic=False).to(dtype)  # symmetric Hann
        _CACHE[key] = constant_on(window, device), constant_on(weights.to(dtype), device), bands
    return _CACHE[key]


def constant_on(t, device):
    """A CPU constant on `device` without a host sync: a CUDA copy from pinned memory, non-blocking."""
    return (
        t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)
    )


def fbank(
    waveform,
    sample_rate=SAMPLE_RATE,
    num_mel_bins=128,
    frame_length=25.0,
    frame_shift=10.0,
    low_freq=20.0,
    high_freq=0.0,
    preemphasis=0.97,
    exact=False,
):
    """Log-mel filterbank of torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False,
    window_type='hanning', dither=0.0) as CAV-MAE calls it. [N] -> [T, M] or [B, N] -> [B, T, M],
    T = 1 + (N - window) // hop (snip_edges). The waveform's own scale is kept (CAV-MAE feeds [-1, 1)).
    exact=True repeats torchaudio's float32 ops one for one (bit-identical on the CPU); the default computes
    |X|^2 as re^2 + im^2 and skips the zeros of the filterbank, within 1e-6 of it and about twice as fast."""
    win, hop = (
        int(sample_rate * frame_length * 0.001),
        int(sample_rate * frame_shift * 0.001),
    )  # Kaldi's rounding
    if waveform.shape[-1] < win:
        raise DataError(
            f"fbank needs at least {win} samples (one {frame_length} ms frame), got {waveform.shape[-1]}"
        )
    n_fft = 1 << (win - 1).bit_length()  # 400 -> 512
    window, weights, bands = _fbank_constants(
        win, n_fft, num_mel_bins, sample_rate, low_freq, high_freq, waveform.device, waveform.dtype
    )
    frames = (waveform.unsqueeze(0) if waveform.dim() == 1 else waveform).unfold(
        -1, win, hop
    )  # (B, T, win) view
    B, T, _ = frames.shape
    out = frames.new_empty(B, T, num_mel_bins)
    if frames.device.type == "cpu":  # cache-sized blocks
        steps = min(T, CPU_BLOCK_FRAMES)
        blocks = [
            (frames[b, t : t + steps], out[b, t : t + steps]) for b in range(B) for t in range(0, T, steps)
        ]
    else:  # the whole batch at once
        blocks = [(frames.reshape(B * T, win), out.view(B * T, num_mel_bins))]
    for x, mel in blocks:  # (rows, win) -> (rows, M)
        x = x - x.mean(dim=-1, keepdim=True)  # DC removal per frame
        previous = torch.cat([x[:, :1], x[:, :-1]], dim=-1)  # first sample replicated
        x = x.sub_(previous.mul_(preemphasis)).mul_(window)  # pre-emphasis in-frame, Hann
        spec = torch.fft.rfft(x, n=n_fft)  # (rows, n_fft/2 + 1) complex
        if exact:
            torch.mm(spec.abs().pow(2.0), weights.T, out=mel)
        else:
            re_im = torch.view_as_real(spec).square_()  # (rows, bins, 2)
            power = re_im[..., 0] + re_im[..., 1]
            for first, lo, hi, w in bands:  # only the filters' support
                torch.mm(power[:, lo:hi], w, out=mel[:, first : first + w.shape[1]])
        mel.clamp_min_(torch.finfo(mel.dtype).eps).log_()
    return out[0] if waveform.dim() == 1 else out


def load_audio(path, sample_rate=SAMPLE_RATE):
    """float32 [N] in [-1, 1) (int16 / 32768 for PCM-16), the first channel of a wav/flac file."""
    if not os.path.isfile(path):
        raise DataError(f"audio file not found: {path}")
    try:
        with sf.SoundFile(path) as f:
            rate, subtype = f.samplerate, f.subtype
            if rate == sample_rate:
                data = f.read(dtype="float32", always_2d=True)  # (N, C), int16 / 32768
    except Exception as e:  # soundfile raises several types for corrupt files
        raise DataError(f"cannot read audio {path}: {e}") from None
    if rate != sample_rate:
        raise DataError(
            f"{path} is sampled at {rate} Hz, the model needs {sample_rate} Hz: extract it with "
            f"`python prepare.py videos` (which resamples), or `ffmpeg -i IN -ar {sample_rate} OUT.wav`"
        )
    if data.shape[0] < WIN:
        raise DataError(
            f"{path} has {data.shape[0]} samples, fewer than one fbank frame ({WIN}): empty or too short"
        )
    wave = torch.from_numpy(np.ascontiguousarray(data[:, 0]))  # stereo -> first channel
    if subtype in ("FLOAT", "DOUBLE") and not torch.isfinite(wave).all():  # integer PCM cannot be NaN
        raise DataError(f"{path} contains NaN or infinite samples")
    return wave


def fbank_features(wave, length, target_length):
    """Centred waveforms (B, N) and their lengths (B,) on the same device -> fbank cut or padded with zero rows to
    (B, target_length, M). Rows past a clip's own frames are zero: a clip in a padded batch equals its own fbank."""
    feats = fbank(wave[:, : WIN + HOP * (target_length - 1)])  # (B, <=T, M), no unused frames
    frames = torch.div(length - WIN, HOP, rounding_mode="floor") + 1  # (B,) a clip's own frames
    past_end = torch.arange(feats.shape[1], device=wave.device) >= frames[:, None]  # (B, <=T)
    feats = feats.masked_fill(past_end[..., None], 0.0)
    return F.pad(feats, (0, 0, 0, target_length - feats.shape[1]))  # zero rows, not padded audio


# ----------------------------------------------------------------------------------------------------------
# Augmentation: a worker draws (AVDataset.load, draw_band), BatchPreprocessor applies (spec_augment, add_noise)


def draw_band(length, max_width):
    """One SpecAugment band as torchaudio draws it from torch's CPU generator: width = floor(u1 F) in [0, F),
    start = floor(u2 (L - u1 F)), so start + width <= L. Returns (start, width); max_width 0 draws nothing."""
    if not max_width:
        return 0, 0
    value = torch.rand(1) * max_width  # draw 1: width
    start = (torch.rand(1) * (length - value)).long()  # draw 2: start
    return int(start), int(value.long())


def spec_augment(feats, bands):
    """SpecAugment on (B, T, M) with bands (B, 4) = (freq start, freq width, time start, time width): whole mel bands
    and whole frames set to 0 (preprocessing.md 3). A width of 0 masks nothing."""
    frame, mel = (torch.arange(n, device=feats.device) for n in feats.shape[1:])  # (T,), (M,)
    in_band = ((mel >= bands[:, :1]) & (mel < bands[:, :1] + bands[:, 1:2]))[:, None, :]  # (B, 1, M)
    in_time = ((frame >= bands[:, 2:3]) & (frame < bands[:, 2:3] + bands[:, 3:]))[:, :, None]  # (B, T, 1)
    return feats.masked_fill(in_band | in_time, 0.0)


def hash32(x):
    """A 32-bit integer mixing hash, in place on int64 holding uint32 values: hash-prospector's xorshift-multiply
    [16 21f0aaad 15 735a2d97 15], whose multipliers are below 2^31, so x * c < 2^63 never overflows int64."""
    for shift, multiplier in ((16, 0x21F0AAAD), (15, 0x735A2D97)):
        x ^= x >> shift
        x.mul_(multiplier).bitwise_and_(0xFFFFFFFF)
    x ^= x >> 15
    return x


def hash_uniform(seeds, shape, device):
    """U[0, 1) float32 (B, *shape) from integer seeds (B,): element k of sample b is a hash of (seed b, k), 24 bits.
    Counter-based, not a generator's stream: the same numbers on every device and for any batch composition, a
    worker ships one integer instead of a (T, M) field, and the device makes the field in a few integer kernels."""
    device, n = torch.device(device), math.prod(shape)
    key = ("counter", n, str(device))
    if key not in _CACHE:
        _CACHE[key] = hash32(torch.arange(n, device=device))  # (n,) the same for every seed
    seed = hash32(seeds.to(device, torch.int64) & 0xFFFFFFFF)  # (B,)
    out = torch.empty(len(seed), n, device=device)
    blocks = range(len(seed)) if device.type == "cpu" else [slice(None)]  # CPU: a sample stays in cache
    for b in blocks:
        torch.mul(hash32(_CACHE[key] ^ seed[b, None]) >> 8, 2.0**-24, out=out[b])  # top 24 bits -> [0, 1)
    return out.view(-1, *shape)


def add_noise(feats, seed, scale, shift):
    """The official `noise` augmentation on normalised fbank (B, T, M): + U(0,1) * s / 10, then a roll in time by
    `shift` (out[t] = in[t - shift]). seed, scale (float64) and shift are (B,) tensors a worker drew."""
    B, T, M = feats.shape
    noisy = hash_uniform(seed, (T, M), feats.device).mul_(scale.float()[:, None, None]).div_(10).add_(feats)
    source = (torch.arange(T, device=feats.device) - shift[:, None]) % T  # (B, T)
    rows = (source + T * torch.arange(B, device=feats.device)[:, None]).flatten()  # (B * T,)
    return noisy.reshape(B * T, M).index_select(0, rows).view(B, T, M)


def smooth_labels(y1, label_smooth, y2=None, lam=None):
    """Multi-hot (B, K) -> targets (section 6): negatives ls/K, positives 1 - ls; with mixup positives of the
    two samples add lam (1 - ls) and (1 - lam) (1 - ls) on top of ls/K. Float64 arithmetic, float32 result."""
    y1, base = y1.double(), label_smooth / y1.shape[1]
    if y2 is None:
        return torch.where(y1 > 0, 1.0 - label_smooth, base).float()
    lam = lam.double()[:, None]
    return (
        base + y1 * (lam * (1.0 - label_smooth)) + y2.double() * ((1 - lam) * (1.0 - label_smooth))
    ).float()


# ----------------------------------------------------------------------------------------------------------
# Images (preprocessing.md 2)


def read_frame(path, image_size=224):
    """uint8 [3, S, S]: RGB, shorter side resized to S with Pillow bicubic, centre crop (torchvision's rules)."""
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img = img if img.mode == "RGB" else img.convert("RGB")  # project deviation: any mode
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(image_size * long / short)
            new_w, new_h = (image_size, new_long) if w <= h else (new_long, image_size)
            if (new_w, new_h) != (w, h):
                img = img.resize((new_w, new_h), Image.BICUBIC)
            top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
            img = img.crop((left, top, left + image_size, top + image_size))
            pixels = np.array(img)  # (S, S, 3) uint8
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, S, S)


def normalise_image(image_u8):
    """uint8 (..., 3, S, S) -> float32 /255, then ImageNet mean/std (torchvision ToTensor + Normalize)."""
    key = ("image", str(image_u8.device))
    if key not in _CACHE:  # (3, 1, 1) each, once a device
        _CACHE[key] = [
            constant_on(torch.tensor(c)[:, None, None], image_u8.device) for c in (IMAGE_MEAN, IMAGE_STD)
        ]
    mean, std = _CACHE[key]
    return (image_u8.float().div(255) - mean) / std


def load_image(path, image_size=224):
    """[3, S, S] float32, equal to the official torchvision transform."""
    return normalise_image(read_frame(path, image_size))


# ----------------------------------------------------------------------------------------------------------
# Datafiles and labels

LabelCSV = namedtuple("LabelCSV", "index mids names")  # {mid: class index}, mids and display names by index


def load_label_csv(path):
    """The `index,mid,display_name` csv (quoted names may hold commas); indices must be 0..K-1."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"index", "mid"} <= set(reader.fieldnames or []):
            raise DataError(
                f"{path}: expected a header with columns index,mid,display_name, got {reader.fieldnames}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            if not (row.get("mid") or "").strip():
                raise DataError(f"{path} line {line}: no mid (want index,mid,display_name)")
            try:
                rows.append((int(row["index"]), row["mid"].strip(), (row.get("display_name") or "").strip()))
            except (TypeError, ValueError):
                raise DataError(f"{path} line {line}: index {row['index']!r} is not an integer") from None
    rows.sort()
    if [r[0] for r in rows] != list(range(len(rows))):
        raise DataError(f"{path}: class indices must be 0..{len(rows) - 1}, each once")
    mids = [r[1] for r in rows]
    if len(set(mids)) != len(mids):
        raise DataError(f"{path}: a mid appears twice")
    return LabelCSV({m: i for i, m in enumerate(mids)}, mids, [r[2] for r in rows])


def read_datafile(path):
    """Rows {video_id, wav, video_path, labels} of an official json datafile, paths resolved against its folder."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read datafile {path} (want json {{'data': [...]}}): {e}") from None
    rows = Rows(records, os.path.dirname(os.path.abspath(path)), path)
    del records
    release_freed_heap()
    return rows


def release_freed_heap():
    """Give the heap pages that parsing freed back to the OS (glibc keeps ~100 MB after AudioSet-2M's json)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def label_mids(row):
    """The mids of a row (or of a labels string)."""
    return [m.strip() for m in (row if isinstance(row, str) else row["labels"]).split(",") if m.strip()]


def pack_paths(strings):
    """Strings -> numpy arrays (folder buffer, folder offsets, folder code per string, name buffer, name offsets):
    the few distinct folders once, the names in one UTF-8 buffer. Forked workers share numpy pages untouched."""

    def pack(texts):  # one UTF-8 buffer and its offsets
        encoded = [s.encode() for s in texts]
        offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
        small = offsets[-1] < 2**31  # int32 offsets up to 2 GB of text
        return np.frombuffer(b"".join(encoded), np.uint8), offsets.astype(np.int32) if small else offsets

    folders, codes, names = {}, array("i"), []
    for s in strings:
        head, sep, name = s.rpartition("/")
        codes.append(folders.setdefault(head + sep, len(folders)))
        names.append(name)
    return (*pack(list(folders)), np.array(codes, np.int32), *pack(names))


class Rows(Sequence):
    """A datafile's rows in numpy arrays instead of a list of dicts (~340 B a row, 0.7 GB per process for
    AudioSet-2M, copied into every worker as refcounts touch the pages). rows[i] -> dict(video_id, wav, video_path,
    labels), paths resolved against `root` on demand; labels as CSR codes into `mids` (label_codes, label_offsets)."""

    FIELDS = ("video_id", "wav", "video_path", "labels")

    def __init__(self, records, root, source):
        try:
            fields = {k: [str(r[k]) for r in records] for k in self.FIELDS}
        except (KeyError, TypeError):
            i, missing = next(
                (i, m) for i, r in enumerate(records) if (m := [k for k in self.FIELDS if k not in r])
            )
            raise DataError(f"{source} row {i}: missing field(s) {', '.join(missing)}") from None
        self.root, self.columns = (
            root,
            [pack_paths(fields[k]) for k in self.FIELDS[:3]],
        )  # video_id, wav, video_path
        mids, codes, offsets = {}, array("i"), array("q", [0])
        for text in fields["labels"]:
            codes.extend(mids.setdefault(m, len(mids)) for m in label_mids(text))
            offsets.append(len(codes))
        self.mids, self.label_codes = (
            list(mids),
            np.array(codes, np.int32),
        )  # distinct mids in first-seen order
        self.label_offsets = np.array(offsets, np.int64)  # (n + 1,) row i: [off[i], off[i+1])

    def __len__(self):
        return len(self.label_offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):  # a list of row dicts, like a list's
            return [self[j] for j in range(len(self))[i]]
        i, o = range(len(self))[i], self.label_offsets  # negative i; IndexError past the end
        video_id, wav, video_path = (
            (fb[fo[c[i]] : fo[c[i] + 1]].tobytes() + nb[no[i] : no[i + 1]].tobytes()).decode()
            for fb, fo, c, nb, no in self.columns
        )  # folder + name, see pack_paths
        return dict(
            video_id=video_id,
            wav=os.path.normpath(os.path.join(self.root, wav)),
            video_path=os.path.normpath(os.path.join(self.root, video_path)),
            labels=",".join(self.mids[c] for c in self.label_codes[o[i] : o[i + 1]]),
        )


def frame_path(row, i):
    return os.path.join(row["video_path"], f"frame_{i}", row["video_id"] + ".jpg")


def check_row(row, labels, num_frames=10, sample_rate=SAMPLE_RATE):
    """Problems that would stop this row from loading (empty list = fine), and how many frames are missing."""
    problems = [f"label {m!r} is not in the label csv" for m in label_mids(row) if m not in labels.index]
    try:
        info = sf.info(row["wav"])
        if info.samplerate != sample_rate:
            problems.append(
                f"{row['wav']}: {info.samplerate} Hz, not {sample_rate} (resample: python prepare.py videos)"
            )
        elif info.frames < WIN:
            problems.append(f"{row['wav']}: only {info.frames} samples")
    except Exception as e:
        problems.append(
            f"cannot open audio {row['wav']}: {e}"
            if os.path.isfile(row["wav"])
            else f"audio file not found: {row['wav']}"
        )
    paths = [frame_path(row, i) for i in range(num_frames)]
    present = [p for p in paths if os.path.isfile(p)]
    if paths[0] not in present:
        problems.append(f"frame_0 missing ({paths[0]}): a missing frame has no earlier one to fall back to")
    for path in present:
        try:
            Image.open(path).close()
        except Exception as e:
            problems.append(f"cannot open image {path}: {e}")
    return problems, num_frames - len(present)


# ----------------------------------------------------------------------------------------------------------
# The dataset


class AVDataset(torch.utils.data.Dataset):
    """ds[i] or ds[(i, frame)] -> (fbank [T, 128], image [3, S, S], label [K]), or the raw item that collate_raw
    batches (raw=True). A key's frame (int or None) overrides ds.frame for that load in evaluation. frame_fallbacks
    counts the per-item path's fallbacks in this process (num_workers=0); loaders read batch["fallbacks"]."""

    def __init__(
        self,
        datafile,
        label_csv,
        train=False,
        target_length=1024,
        num_frames=10,
        frame=None,
        mean=AUDIOSET_MEAN,
        std=AUDIOSET_STD,
        freqm=0,
        timem=0,
        mixup=0.0,
        noise=False,
        label_smooth=0.0,
        image_size=224,
        on_error="raise",
        raw=False,
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.datafile, self.train, self.target_length, self.num_frames = (
            datafile,
            train,
            target_length,
            num_frames,
        )
        self.frame, self.mean, self.std, self.freqm, self.timem = frame, mean, std, freqm, timem
        self.mixup, self.noise, self.label_smooth = mixup, noise, label_smooth
        self.image_size, self.raw, self.frame_fallbacks = image_size, raw, 0
        self.labels, self.rows = load_label_csv(label_csv), read_datafile(datafile)
        self.num_classes = len(self.labels.mids)
        self.dropped = []  # (row in the datafile, video_id, problems) dropped by on_error="skip"
        if on_error == "skip":
            with ThreadPoolExecutor(8) as pool:
                checks = list(pool.map(lambda r: check_row(r, self.labels, num_frames)[0], self.rows))
            self.dropped = [(i, self.rows[i]["video_id"], p) for i, p in enumerate(checks) if p]
            self.rows = Rows([r for r, p in zip(self.rows, checks) if not p], "", datafile)  # paths resolved
            if self.dropped:
                warnings.warn(
                    f"{datafile}: skipped {len(self.dropped)} of {len(checks)} rows with unreadable "
                    f"files or unknown labels (first: row {self.dropped[0][0]}: {self.dropped[0][2][0]}); "
                    f"the list is in .dropped",
                    stacklevel=2,
                )
        self.class_of_code = np.array([self.labels.index.get(m, -1) for m in self.rows.mids], np.int64)
        unknown = np.flatnonzero(self.class_of_code[self.rows.label_codes] < 0)  # positions in label_codes
        if len(unknown):
            i = int(np.searchsorted(self.rows.label_offsets, unknown[0], side="right")) - 1
            raise DataError(
                f"{datafile} row {i} (video_id {self.rows[i]['video_id']}): label "
                f"{self.rows.mids[self.rows.label_codes[unknown[0]]]!r} is not in {label_csv}"
            )

    def __len__(self):
        return len(self.rows)

    def choose_frame(self, row, frame=None):
        """(path, frame loaded, the wanted frame's path if it was missing else None) for one load of `row`."""
        want = (
            random.randint(0, self.num_frames - 1)
            if self.train
            else next(f for f in (frame, self.frame, self.num_frames // 2) if f is not None)
        )  # key's frame, ds.frame, middle
        for k in range(want, -1, -1):  # missing frame -> nearest earlier one, as the official code
            path = frame_path(row, k)
            if os.path.isfile(path):
                return path, k, (frame_path(row, want) if k != want else None)
        raise DataError(
            f"no frame at or before frame_{want} (looked for {frame_path(row, want)} and earlier)"
        )

    def decode(self, i, frame=None):
        """Row i read: centred waveform [n], uint8 frame [3, S, S], 0/1 label [K], frame index, missing path or None."""
        row = self.rows[i]
        try:
            wave = load_audio(row["wav"])
            path, k, missing = self.choose_frame(row, frame)
            image = read_frame(path, self.image_size)
        except DataError as e:
            raise DataError(f"{self.datafile} row {i} (video_id {row['video_id']}): {e}") from None
        label = torch.zeros(self.num_classes)
        label[[self.labels.index[m] for m in label_mids(row)]] = 1.0  # ds.rows may also be a list
        return wave - wave.mean(), image, label, k, missing

    def load(self, i, frame=None):
        """The raw item of row i: decoded, with every random choice of its augmentation drawn here, in the official
        order (mixup test, partner, lambda, frames, SpecAugment bands, noise). Keys: see collate_raw."""
        mixed = self.train and self.mixup > 0 and random.random() < self.mixup
        if mixed:  # partner from the whole dataset, as the official
            partner, lam = random.randrange(len(self)), random.betavariate(MIXUP_BETA, MIXUP_BETA)
        wave, image, label, k, missing = self.decode(i, frame)
        item = dict(wave=wave, image=image, label=label, frame=k, fallbacks=[missing] if missing else [])
        if mixed:  # partner wave cut or zero-padded to this one's length
            wave2, image2, label2, _, missing2 = self.decode(partner)
            wave2 = F.pad(wave2, (0, max(0, len(wave) - len(wave2))))[: len(wave)]
            item.update(
                partner=partner, lam=lam, partner_wave=wave2, partner_image=image2, partner_label=label2
            )
            item["fallbacks"] += [missing2] if missing2 else []
        elif len(wave) > WIN + HOP * (
            self.target_length - 1
        ):  # only samples that reach target_length frames travel
            item["wave"] = wave[: WIN + HOP * (self.target_length - 1)].clone()
        if self.train:  # SpecAugment bands; noise: field seed, s ~ U(0,1), roll in [-T, T)
            item["bands"] = (*draw_band(128, self.freqm), *draw_band(self.target_length, self.timem))
            item.update(noise_seed=0, noise_scale=0.0, noise_shift=0)
            if self.noise:
                item.update(
                    noise_seed=int(torch.randint(2**32, (1,))),
                    noise_scale=float(np.random.rand()),
                    noise_shift=int(np.random.randint(-self.target_length, self.target_length)),
                )
        return item

    def __getitem__(self, key):
        i, frame = key if isinstance(key, tuple) else (key, None)
        item = self.load(int(i), frame)
        if self.raw:
            return item
        self.frame_fallbacks += len(item["fallbacks"])
        audio, image, label = BatchPreprocessor.from_dataset(self)(
            collate_raw([item]), "cpu"
        )  # a batch of one
        return audio[0], image[0], label[0]


def collate_raw(items):
    """Raw items -> a batch dict of tensors, plus `fallbacks`: the paths of the wanted frames that were missing.
      wave (B, N) float32 centred, zero-padded; length (B,) int64; image (B, 3, S, S) uint8; label (B, K) 0/1;
      frame (B,) the frame index loaded.
    training adds the draws: bands (B, 4) int64 = (freq start, freq width, time start, time width);
      noise_seed (B,) int64, noise_scale (B,) float64, noise_shift (B,) int64;
    and if any item is mixed: mixed (B,) bool, partner (B,) row index (-1: none), lam (B,) float64,
      partner_wave (B, N), partner_image (B, 3, S, S) uint8, partner_label (B, K) (zeros where not mixed)."""

    def with_partner(it):  # unmixed: zero partner, lam 1
        zeros = {f"partner_{k}": torch.zeros_like(it[k]) for k in ("wave", "image", "label")}
        return {"partner": -1, "lam": 1.0, **zeros, **it, "mixed": "partner" in it}

    if any("partner" in it for it in items):
        items = [with_partner(it) for it in items]
    batch = dict(
        length=torch.tensor([len(it["wave"]) for it in items]),
        fallbacks=[path for it in items for path in it["fallbacks"]],
    )
    for key in items[0].keys() - batch.keys():
        values = [it[key] for it in items]
        if key.endswith("wave"):
            batch[key] = pad_sequence(values, batch_first=True)  # (B, N) zero-padded
        elif torch.is_tensor(values[0]):
            batch[key] = torch.stack(values)
        else:  # python floats as float64
            batch[key] = torch.tensor(values, dtype=torch.float64 if isinstance(values[0], float) else None)
    return batch


class BatchPreprocessor:
    """Applies a collate_raw batch's draws on a device in the official order: mixup (waveforms before fbank, images
    after normalisation, labels), fbank, pad/cut, SpecAugment, normalisation, noise, label smoothing. No host sync
    on CUDA: pinned tensors move non_blocking, constants are cached per device, masks come from device lengths."""

    def __init__(
        self,
        target_length=1024,
        mean=AUDIOSET_MEAN,
        std=AUDIOSET_STD,
        train=False,
        freqm=0,
        timem=0,
        noise=False,
        label_smooth=0.0,
    ):
        self.target_length, self.mean, self.std, self.train = target_length, mean, std, train
        self.freqm, self.timem, self.noise, self.label_smooth = freqm, timem, noise, label_smooth

    @classmethod
    def from_dataset(cls, ds):
        return cls(ds.target_length, ds.mean, ds.std, ds.train, ds.freqm, ds.timem, ds.noise, ds.label_smooth)

    def __call__(self, batch, device="cpu"):
        def get(key):
            return batch[key].to(device, non_blocking=True)

        wave, length, y = get("wave"), get("length"), get("label")  # (B, N), (B,), (B, K)
        image = normalise_image(get("image"))  # (B, 3, S, S)
        label = smooth_labels(y, self.label_smooth)  # (B, K)
        if self.train and "lam" in batch:  # mixup: rows the worker mixed
            mixed, lam = get("mixed")[:, None], get("lam")[:, None]  # (B, 1) bool, float64
            lam_f, rest_f = lam.float(), (1 - lam).float()  # as the official numpy scalar
            mixed_wave = lam_f * wave + rest_f * get("partner_wave")  # (B, N), centred over the clip
            wave = torch.where(mixed, mixed_wave - mixed_wave.sum(1, keepdim=True) / length[:, None], wave)
            partner_image = normalise_image(get("partner_image"))
            image = torch.where(
                mixed[..., None, None],
                lam_f[..., None, None] * image + rest_f[..., None, None] * partner_image,
                image,
            )
            label = torch.where(
                mixed, smooth_labels(y, self.label_smooth, get("partner_label"), lam[:, 0]), label
            )
        feats = fbank_features(wave, length, self.target_length)  # (B, T, 128)
        if self.train and (self.freqm or self.timem):
            feats = spec_augment(feats, get("bands"))
        feats = (feats - self.mean) / self.std
        if self.train and self.noise:
            feats = add_noise(feats, get("noise_seed"), get("noise_scale"), get("noise_shift"))
        return feats, image, label


def class_balance_weights(ds):
    """Per-sample weights for WeightedRandomSampler (official formula): a label weighs 1000 / (count + 0.01)
    over the dataset's rows, a sample the sum over its labels. float64 [len(ds)], aligned with ds (after skips)."""
    classes = ds.class_of_code[ds.rows.label_codes]  # (labels of all rows,)
    label_weight = 1000.0 / (np.bincount(classes, minlength=ds.num_classes) + 0.01)
    owner = np.repeat(np.arange(len(ds)), np.diff(ds.rows.label_offsets))  # row of each label
    return torch.from_numpy(np.bincount(owner, weights=label_weight[classes], minlength=len(ds)))


def dataset_stats(ds, max_items=None):
    """(mean, std) of the padded, unnormalised fbank over ds (or its first max_items rows), to normalise a new
    dataset as the paper normalises AudioSet (-5.081, 4.4849)."""
    total = total_sq = count = 0.0
    for i in range(min(len(ds), max_items or len(ds))):
        wave = load_audio(ds.rows[i]["wav"])
        feats = fbank_features(
            (wave - wave.mean())[None], torch.tensor([len(wave)]), ds.target_length
        ).double()
        total, total_sq, count = (
            total + feats.sum().item(),
            total_sq + (feats**2).sum().item(),
            count + feats.numel(),
        )
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean**2, 0.0) * count / max(count - 1, 1))


# ----------------------------------------------------------------------------------------------------------
# python data.py --check DATAFILE LABEL_CSV | --bench [--datafile F --label_csv L] | --scale N


def check_datafile(datafile, label_csv, num_frames=10, show=20):
    """Validate every row (audio opens at 16 kHz, frames exist and open, labels known); print a summary and
    return the number of rows with problems."""
    start, labels, rows = time.time(), load_label_csv(label_csv), read_datafile(datafile)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: check_row(r, labels, num_frames), rows))
    bad = [(i, row, problems) for i, (row, (problems, _)) in enumerate(zip(rows, results)) if problems]
    print(
        f"checked {len(rows)} rows of {datafile} in {time.time() - start:.1f} s: "
        f"{len(rows) - len(bad)} ok, {len(bad)} with problems"
    )
    for i, row, problems in bad[:show]:
        print(f"  row {i} (video_id {row['video_id']}): {'; '.join(problems)}")
    if len(bad) > show:
        print(f"  ... and {len(bad) - show} more rows")
    partial = sum(0 < missing < num_frames for _, missing in results)
    if partial:
        print(
            f"  {partial} rows miss some of their {num_frames} frames (loading falls back to an earlier frame)"
        )
    seen, unlabelled = (
        [m for m in rows.mids if m in labels.index],
        int((np.diff(rows.label_offsets) == 0).sum()),
    )
    print(
        f"  labels: {len(seen)} of {len(labels.mids)} classes have examples"
        + (f", {unlabelled} rows have no label" if unlabelled else "")
    )
    return len(bad)


def bench(datafile, label_csv, items=64, repeats=5, target_length=1024, image_size=224):
    """CPU time of items and batches on one thread, medians of interleaved rounds (load from other processes hits
    every path alike)."""
    torch.set_num_threads(1)
    kw = dict(target_length=target_length, image_size=image_size)
    train = dict(train=True, mixup=0.5, freqm=48, timem=192, noise=True, label_smooth=0.1, **kw)
    sets = dict(
        eval=AVDataset(datafile, label_csv, **kw),
        train=AVDataset(datafile, label_csv, **train),
        raw=AVDataset(datafile, label_csv, raw=True, **train),
    )
    n, prep = min(items, len(sets["eval"])), BatchPreprocessor.from_dataset(sets["raw"])
    batch = collate_raw([sets["raw"][i % n] for i in range(32)])  # also warms the file cache
    jobs = [(name, lambda ds=ds, i=i: ds[i]) for i in range(n) for name, ds in sets.items()] + [
        ("fbank32", lambda: fbank(batch["wave"])),
        ("prep32", lambda: prep(batch)),
        ("loop", lambda: [fbank(w[:k], exact=True) for w, k in zip(batch["wave"], batch["length"])]),
    ]
    ms = {name: [] for name, _ in jobs}
    for name, job in jobs * repeats:
        start = time.process_time()
        job()
        ms[name].append(1000 * (time.process_time() - start))
    ms = {name: statistics.median(v) for name, v in ms.items()}
    print(f"{n} clips of {datafile}; CPU time, 1 thread, medians over {repeats} interleaved rounds")
    for name, label, note in [
        ("eval", "eval item (wav + fbank + one JPEG)", "official loader 9.8 ms"),
        ("train", "train item (mixup .5, SpecAugment 48/192, noise)", "official loader 14.3 ms"),
        ("raw", "raw item (read, decode, draw)", f"= {1000 / ms['raw']:.0f} samples/s per worker"),
        ("fbank32", "fbank, batch of 32 clips", f"({ms['fbank32'] / 32:.2f} ms per clip)"),
        (
            "loop",
            "fbank, one clip at a time with torchaudio's ops",
            f"(batch / loop = {ms['fbank32'] / ms['loop']:.2f}; torchaudio: 7.8 ms per clip)",
        ),
        ("prep32", "BatchPreprocessor, train batch of 32 on the CPU", ""),
    ]:
        print(f"  {label:<50} {ms[name]:7.2f} ms   {note}")
    return ms


def measure_scale(n, num_classes=527):
    """Seconds to build AVDataset over n generated AudioSet-like rows (files need not exist), and the memory it
    holds once the json is freed (growth of this process's resident memory; Linux)."""

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    mids = [f"/m/0{k:06x}" for k in range(num_classes)]
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "labels.csv"), "w") as f:
            f.write("index,mid,display_name\n" + "".join(f"{k},{m},class {k}\n" for k, m in enumerate(mids)))
        rows = (
            f'{{"video_id": "{i:011x}_30.000", "wav": "/data/audioset/audio/{i:011x}_30.000.flac", '
            f'"video_path": "/data/audioset/frames", "labels": "{labels}"}}'
            for i in range(n)  # ~150 B of json
            for labels in [",".join(mids[(i * 7919 + j) % num_classes] for j in range(1 + i % 4))]
        )  # 1-4 labels
        with open(os.path.join(root, "data.json"), "w") as f:
            f.write('{"data": [' + ",".join(rows) + "]}")
        release_freed_heap()  # what writing the json freed
        before, start = rss_mb(), time.time()
        ds = AVDataset(os.path.join(root, "data.json"), os.path.join(root, "labels.csv"))
        seconds, held = time.time() - start, rss_mb() - before
    print(
        f"{n} rows of {ds.datafile}: {seconds:.1f} s to build AVDataset, {held:.0f} MB held (RSS growth after "
        f"the json is freed)"
    )
    return seconds, held


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check, benchmark or size a CAV-MAE datafile.")
    parser.add_argument("--check", nargs=2, metavar=("DATAFILE", "LABEL_CSV"), help="validate every row")
    parser.add_argument(
        "--bench",
        action="store_true",
        help="time items and batches on --datafile and --label_csv, or on --items synthetic 10 s clips",
    )
    parser.add_argument(
        "--scale", type=int, metavar="N", help="time and memory of AVDataset over N generated rows"
    )
    for name, default in dict(
        datafile="", label_csv="", num_frames=10, items=64, repeats=5, target_length=1024, image_size=224
    ).items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    args = parser.parse_args(argv)
    if args.check:
        try:
            return 1 if check_datafile(*args.check, num_frames=args.num_frames) else 0
        except (DataError, OSError) as e:  # unreadable datafile or label csv
            print(f"error: {e}")
            return 1
    if args.scale:
        measure_scale(args.scale)
    elif args.bench:
        with tempfile.TemporaryDirectory() as root:
            if not args.datafile:  # synthetic clips of 10 s, 224 px
                __import__("prepare").make_synthetic(
                    root, n_train=args.items, n_test=0, image_size=224, seconds=10.0
                )
                args.datafile, args.label_csv = (
                    os.path.join(root, "train.json"),
                    os.path.join(root, "labels.csv"),
                )
            bench(
                args.datafile, args.label_csv, args.items, args.repeats, args.target_length, args.image_size
            )
    else:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
