"""The audio-visual input pipeline of CAV-MAE: files on disk -> (fbank, image, label) tensors.

Equal to the official loader (../shared/preprocessing.md), with torch, numpy, soundfile and Pillow only:
    fbank(waveform)            Kaldi log-mel filterbank, [N] -> [T, 128] or [B, N] -> [B, T, 128], CPU or GPU
    load_audio(path)           float32 [N] in [-1, 1), first channel, 16 kHz, or a DataError naming the file
    load_image(path, size)     [3, S, S]: bicubic resize of the shorter side, centre crop, ImageNet normalisation
    load_label_csv, read_datafile, class_balance_weights, dataset_stats
    AVDataset(datafile, label_csv, train=False, ...)[i] -> fbank [T, 128], image [3, S, S], label [K]

Two ways to feed a model:
  * per item (raw=False): each ds[i] is finished on the worker, as the official loader does.
  * device-side (raw=True): workers only read and decode; the training device does the rest batch-wise:
        ds = AVDataset(..., raw=True)            # ds[i] -> (waveform [n], uint8 image [3, S, S], 0/1 label [K])
        loader = DataLoader(ds, batch_size, collate_fn=collate_raw, num_workers=8, pin_memory=True)
        prep = BatchPreprocessor.from_dataset(ds)        # fbank, pad/cut, SpecAugment, normalisation, mixup,
        for batch in loader:                             # noise and label smoothing, all on `device`
            audio, image, label = prep(batch, device)    # [B, T, 128], [B, 3, S, S], [B, K]
    In evaluation mode both give the same tensors on the CPU (bit for bit; within 1 ulp for clips shorter than
    about 16 fbank frames, where BLAS picks another kernel). In training, the mixup partner is a random member
    of the same batch rather than of the whole dataset.

Random draws use torch and Python's `random`, which DataLoader seeds per worker (the official np.random draws
repeat across workers). Deviations decided by the project: bad input raises a clear error instead of becoming
a 0.01-filled sample; non-RGB frames are converted to RGB; augmentation only runs when train=True; a mixup
partner's frame comes from its own video_path (the official code looks under the first sample's).
Run `python data.py --check DATAFILE LABEL_CSV` to validate a datafile, `python data.py --bench` to time it.
"""
import argparse
import csv
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image

SAMPLE_RATE = 16000
AUDIOSET_MEAN, AUDIOSET_STD = -5.081, 4.4849          # fbank normalisation of the paper (AudioSet's)
IMAGE_MEAN, IMAGE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MIXUP_BETA = 10.0                                     # lambda ~ Beta(10, 10)


class DataError(ValueError):
    """A file, row or label that cannot become a training sample."""


# ----------------------------------------------------------------------------------------------------------
# Audio: Kaldi fbank (preprocessing.md 1.2-1.4)

_CACHE = {}                 # mel filters and windows per (parameters, device, dtype)
CPU_BLOCK_FRAMES = 1024     # fbank works through a CPU batch in cache-sized blocks; other devices take it whole
BAND_GROUP = 16             # mel bands per block of the band-limited filterbank product


def mel_filterbank(num_mel_bins=128, n_fft=512, sample_rate=SAMPLE_RATE, low_freq=20.0, high_freq=0.0):
    """Kaldi's triangular mel filters, linear in mel = 1127 ln(1 + f/700), [num_mel_bins, n_fft // 2 + 1] float32,
    built with the same float32 torch ops as torchaudio (preprocessing.md 1.4)."""
    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)
    high = high_freq if high_freq > 0 else high_freq + 0.5 * sample_rate
    mel_low, mel_high = mel(low_freq), mel(high)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    b = torch.arange(num_mel_bins).unsqueeze(1)                                      # (M, 1), float32 below
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    bin_mel = 1127.0 * (1.0 + sample_rate / n_fft * torch.arange(n_fft // 2) / 700.0).log()   # (n_fft/2,)
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    weights = torch.max(torch.zeros(1), torch.min(up, down))                        # (M, n_fft/2)
    return F.pad(weights, (0, 1))                                                    # zero column for Nyquist


def _fbank_constants(win, n_fft, num_mel_bins, sample_rate, low_freq, high_freq, device, dtype):
    """Hann window, dense filters and their band-limited blocks [(first band, lo bin, hi bin, (hi-lo, G) weights)]."""
    key = (win, n_fft, num_mel_bins, sample_rate, low_freq, high_freq, str(device), dtype)
    if key not in _CACHE:
        weights = mel_filterbank(num_mel_bins, n_fft, sample_rate, low_freq, high_freq)      # built on the CPU
        bands = []
        for g in range(0, num_mel_bins, BAND_GROUP):
            support = weights[g:g + BAND_GROUP].ne(0).any(0).nonzero().flatten().tolist() or [0]
            lo, hi = support[0], support[-1] + 1                                     # each triangle is contiguous
            bands.append((g, lo, hi, weights[g:g + BAND_GROUP, lo:hi].T.contiguous().to(device, dtype)))
        window = torch.hann_window(win, periodic=False).to(device, dtype)           # symmetric Hann
        _CACHE[key] = window, weights.to(device, dtype), bands
    return _CACHE[key]


def fbank_geometry(sample_rate=SAMPLE_RATE, frame_length=25.0, frame_shift=10.0):
    """(window, hop) in samples, as Kaldi rounds them."""
    return int(sample_rate * frame_length * 0.001), int(sample_rate * frame_shift * 0.001)


def fbank(waveform, sample_rate=SAMPLE_RATE, num_mel_bins=128, frame_length=25.0, frame_shift=10.0,
          low_freq=20.0, high_freq=0.0, preemphasis=0.97, exact=False):
    """Log-mel filterbank of torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False,
    window_type='hanning', dither=0.0) as CAV-MAE calls it. [N] -> [T, M] or [B, N] -> [B, T, M],
    T = 1 + (N - window) // hop (snip_edges). The waveform's own scale is kept (CAV-MAE feeds [-1, 1)).
    exact=True repeats torchaudio's float32 ops one for one (bit-identical on the CPU); the default computes
    |X|^2 as re^2 + im^2 and skips the zeros of the filterbank, within 1e-6 of it and about twice as fast."""
    win, hop = fbank_geometry(sample_rate, frame_length, frame_shift)
    if waveform.shape[-1] < win:
        raise DataError(f"fbank needs at least {win} samples (one {frame_length} ms frame), got {waveform.shape[-1]}")
    n_fft = 1 << (win - 1).bit_length()                                              # 400 -> 512
    window, weights, bands = _fbank_constants(win, n_fft, num_mel_bins, sample_rate, low_freq, high_freq,
                                               waveform.device, waveform.dtype)
    frames = (waveform.unsqueeze(0) if waveform.dim() == 1 else waveform).unfold(-1, win, hop)  # (B, T, win) view
    B, T, _ = frames.shape
    out = frames.new_empty(B, T, num_mel_bins)
    if frames.device.type == "cpu":                                                  # cache-sized blocks
        steps = min(T, CPU_BLOCK_FRAMES)
        blocks = [(frames[b, t:t + steps], out[b, t:t + steps]) for b in range(B) for t in range(0, T, steps)]
    else:                                                                            # the whole batch at once
        blocks = [(frames.reshape(B * T, win), out.view(B * T, num_mel_bins))]
    for x, mel in blocks:                                                            # (rows, win) -> (rows, M)
        x = x - x.mean(dim=-1, keepdim=True)                                         # DC removal per frame
        previous = torch.cat([x[:, :1], x[:, :-1]], dim=-1)                          # first sample replicated
        x = x.sub_(previous.mul_(preemphasis)).mul_(window)                          # pre-emphasis in-frame, Hann
        spec = torch.fft.rfft(x, n=n_fft)                                            # (rows, n_fft/2 + 1) complex
        if exact:
            torch.mm(spec.abs().pow(2.0), weights.T, out=mel)
        else:
            re_im = torch.view_as_real(spec).square_()                               # (rows, bins, 2)
            power = re_im[..., 0] + re_im[..., 1]
            for first, lo, hi, w in bands:                                           # only the filters' support
                torch.mm(power[:, lo:hi], w, out=mel[:, first:first + w.shape[1]])
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
                data = f.read(dtype="float32", always_2d=True)                      # (N, C), int16 / 32768
    except Exception as e:  # soundfile raises several types for corrupt files
        raise DataError(f"cannot read audio {path}: {e}") from None
    if rate != sample_rate:
        raise DataError(f"{path} is sampled at {rate} Hz, the model needs {sample_rate} Hz: extract it with "
                        f"`python prepare.py videos` (which resamples), or `ffmpeg -i IN -ar {sample_rate} OUT.wav`")
    win, _ = fbank_geometry(sample_rate)
    if data.shape[0] < win:
        raise DataError(f"{path} has {data.shape[0]} samples, fewer than one fbank frame ({win}): empty or too short")
    wave = torch.from_numpy(np.ascontiguousarray(data[:, 0]))                       # stereo -> first channel
    if subtype in ("FLOAT", "DOUBLE") and not torch.isfinite(wave).all():          # integer PCM cannot be NaN
        raise DataError(f"{path} contains NaN or infinite samples")
    return wave


def fbank_features(wave, length, target_length):
    """Centred waveforms (B, N), their lengths (B,) on the CPU -> fbank cut or padded with zero rows to
    (B, target_length, M). Rows past a clip's own frames are zero: a clip in a padded batch equals its own fbank."""
    win, hop = fbank_geometry()
    feats = fbank(wave[:, :win + hop * (target_length - 1)])                        # (B, <=T, M), no unused frames
    frames = torch.div(length.cpu() - win, hop, rounding_mode="floor") + 1          # (B,)
    if bool((frames < feats.shape[1]).any()):                                        # decided without a GPU sync
        past_end = torch.arange(feats.shape[1]) >= frames[:, None]                   # (B, <=T)
        feats = feats.masked_fill(past_end[..., None].to(wave.device), 0.0)
    return F.pad(feats, (0, 0, 0, target_length - feats.shape[1]))                  # zero rows, not padded audio


def mix_waveforms(w1, w2, lam, length):
    """Mixup of centred waveforms (B, N) that are zero past length: w2 cut to w1's length, lam w1 + (1 - lam) w2,
    centred again over the clip."""
    w2 = w2.masked_fill(torch.arange(w1.shape[1], device=w1.device) >= length[:, None], 0.0)
    mix = lam[:, None] * w1 + (1 - lam[:, None]) * w2                               # (B, N)
    return mix - mix.sum(1, keepdim=True) / length[:, None]


# ----------------------------------------------------------------------------------------------------------
# Augmentation and labels, batched over the leading dim (one item is a batch of one)

def draw_band(B, length, max_width, device):
    """One SpecAugment mask per sample as torchaudio draws it: width = floor(u1 F) in [0, F), start =
    floor(u2 (L - u1 F)), so start + width <= L. Returns (B, L) bool, True = masked."""
    value = torch.rand(B, device=device) * max_width                                # draw 1: width
    start = (torch.rand(B, device=device) * (length - value)).long()                # draw 2: start
    pos = torch.arange(length, device=device)
    return (pos >= start[:, None]) & (pos < (start + value.long())[:, None])


def spec_augment(feats, freqm, timem):
    """SpecAugment on (B, T, M): a frequency band, then a time band (that draw order), set to 0 (preprocessing.md 3).
    A width of 0 turns a mask off, and then no random numbers are drawn."""
    B, T, M = feats.shape
    masked = torch.zeros(B, T, M, dtype=torch.bool, device=feats.device)
    if freqm:
        masked = masked | draw_band(B, M, freqm, feats.device)[:, None, :]          # whole mel bands
    if timem:
        masked = masked | draw_band(B, T, timem, feats.device)[:, :, None]          # whole frames
    return feats.masked_fill(masked, 0.0) if freqm or timem else feats


def add_noise(feats):
    """The official `noise` augmentation on normalised fbank (B, T, M): + U(0,1) * s / 10 with s ~ U(0,1) per
    sample, and a roll in time by an integer in [-T, T) (the noise is iid, so adding it after the roll is the same)."""
    B, T, M = feats.shape
    shift = torch.randint(-T, T, (B,), device=feats.device)
    source = (torch.arange(T, device=feats.device) - shift[:, None]) % T             # roll: out[t] = in[t - s]
    rows = (source + T * torch.arange(B, device=feats.device)[:, None]).flatten()   # (B * T,)
    rolled = feats.reshape(B * T, M).index_select(0, rows).view(B, T, M)
    return rolled + torch.rand(B, T, M, device=feats.device) * torch.rand(B, 1, 1, device=feats.device) / 10


def smooth_labels(y1, label_smooth, y2=None, lam=None):
    """Multi-hot (B, K) -> targets (section 6): negatives ls/K, positives 1 - ls; with mixup positives of the
    two samples add lam (1 - ls) and (1 - lam) (1 - ls) on top of ls/K. Float64 arithmetic, float32 result."""
    y1, base = y1.double(), label_smooth / y1.shape[1]
    if y2 is None:
        return torch.where(y1 > 0, 1.0 - label_smooth, base).float()
    lam = lam.double()[:, None]
    return (base + y1 * (lam * (1.0 - label_smooth)) + y2.double() * ((1 - lam) * (1.0 - label_smooth))).float()


def normalise(feats, mean, std):
    return (feats - mean) / std


# ----------------------------------------------------------------------------------------------------------
# Images (preprocessing.md 2)

def read_frame(path, image_size=224):
    """uint8 [3, S, S]: RGB, shorter side resized to S with Pillow bicubic, centre crop (torchvision's rules)."""
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img = img if img.mode == "RGB" else img.convert("RGB")                   # project deviation: any mode
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(image_size * long / short)
            new_w, new_h = (image_size, new_long) if w <= h else (new_long, image_size)
            if (new_w, new_h) != (w, h):
                img = img.resize((new_w, new_h), Image.BICUBIC)
            top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
            img = img.crop((left, top, left + image_size, top + image_size))
            array = np.array(img)                                                    # (S, S, 3) uint8
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()                     # (3, S, S)


def normalise_image(image_u8):
    """uint8 (..., 3, S, S) -> float32 /255, then ImageNet mean/std (torchvision ToTensor + Normalize)."""
    mean = torch.tensor(IMAGE_MEAN, device=image_u8.device)[:, None, None]
    std = torch.tensor(IMAGE_STD, device=image_u8.device)[:, None, None]
    return (image_u8.float().div(255) - mean) / std


def load_image(path, image_size=224):
    """[3, S, S] float32, equal to the official torchvision transform."""
    return normalise_image(read_frame(path, image_size))


# ----------------------------------------------------------------------------------------------------------
# Datafiles and labels

class LabelCSV(NamedTuple):
    index: dict   # mid -> class index
    mids: list    # by class index
    names: list   # display names by class index


def load_label_csv(path):
    """The `index,mid,display_name` csv (quoted names may hold commas); indices must be 0..K-1."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"index", "mid"} <= set(reader.fieldnames or []):
            raise DataError(f"{path}: expected a header with columns index,mid,display_name, got {reader.fieldnames}")
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
            data = json.load(f)["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read datafile {path} (want json {{'data': [...]}}): {e}") from None
    root = os.path.dirname(os.path.abspath(path))
    rows = []
    for i, d in enumerate(data):
        missing = [k for k in ("video_id", "wav", "video_path", "labels") if k not in d]
        if missing:
            raise DataError(f"{path} row {i}: missing field(s) {', '.join(missing)}")
        rows.append(dict(video_id=str(d["video_id"]), wav=os.path.normpath(os.path.join(root, d["wav"])),
                         video_path=os.path.normpath(os.path.join(root, d["video_path"])), labels=str(d["labels"])))
    return rows


def label_mids(row):
    return [m.strip() for m in row["labels"].split(",") if m.strip()]


def frame_path(row, i):
    return os.path.join(row["video_path"], f"frame_{i}", row["video_id"] + ".jpg")


def check_row(row, labels, num_frames=10, sample_rate=SAMPLE_RATE):
    """Problems that would stop this row from loading (empty list = fine), and how many frames are missing."""
    problems = [f"label {m!r} is not in the label csv" for m in label_mids(row) if m not in labels.index]
    try:
        info = sf.info(row["wav"])
        if info.samplerate != sample_rate:
            problems.append(f"{row['wav']}: {info.samplerate} Hz, not {sample_rate} "
                            f"(resample: python prepare.py videos)")
        elif info.frames < fbank_geometry(sample_rate)[0]:
            problems.append(f"{row['wav']}: only {info.frames} samples")
    except Exception as e:
        problems.append(f"cannot open audio {row['wav']}: {e}" if os.path.isfile(row["wav"])
                        else f"audio file not found: {row['wav']}")
    missing = 0
    for i in range(num_frames):
        path = frame_path(row, i)
        if not os.path.isfile(path):
            missing += 1
            if i == 0:
                problems.append(f"frame_0 missing ({path}): a missing frame has no earlier one to fall back to")
            continue
        try:
            with Image.open(path):
                pass
        except Exception as e:
            problems.append(f"cannot open image {path}: {e}")
    return problems, missing


# ----------------------------------------------------------------------------------------------------------
# The dataset

class AVDataset(torch.utils.data.Dataset):
    """Official-format datafile -> (fbank [T, 128], image [3, S, S], label [K]); see the module docstring."""

    def __init__(self, datafile, label_csv, train=False, target_length=1024, num_frames=10, frame=None,
                 mean=AUDIOSET_MEAN, std=AUDIOSET_STD, freqm=0, timem=0, mixup=0.0, noise=False,
                 label_smooth=0.0, image_size=224, on_error="raise", raw=False):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.datafile, self.train, self.target_length, self.num_frames = datafile, train, target_length, num_frames
        self.frame, self.mean, self.std, self.freqm, self.timem = frame, mean, std, freqm, timem
        self.mixup, self.noise, self.label_smooth = mixup, noise, label_smooth
        self.image_size, self.raw = image_size, raw
        self.labels = load_label_csv(label_csv)
        self.num_classes = len(self.labels.mids)
        rows = read_datafile(datafile)
        self.dropped = []                       # (row in the datafile, video_id, problems) dropped by on_error="skip"
        if on_error == "raise":
            for i, row in enumerate(rows):
                for m in label_mids(row):
                    if m not in self.labels.index:
                        raise DataError(f"{datafile} row {i} (video_id {row['video_id']}): label {m!r} is not in "
                                        f"{label_csv}")
        else:
            with ThreadPoolExecutor(8) as pool:
                checks = list(pool.map(lambda r: check_row(r, self.labels, num_frames)[0], rows))
            self.dropped = [(i, r["video_id"], p) for i, (r, p) in enumerate(zip(rows, checks)) if p]
            rows = [r for r, p in zip(rows, checks) if not p]
            if self.dropped:
                warnings.warn(f"{datafile}: skipped {len(self.dropped)} of {len(checks)} rows with unreadable "
                              f"files or unknown labels (first: row {self.dropped[0][0]}: {self.dropped[0][2][0]}); "
                              f"the list is in .dropped", stacklevel=2)
        self.rows = rows
        self._fallbacks = torch.zeros(1, dtype=torch.int64).share_memory_()  # counted across DataLoader workers

    def __len__(self):
        return len(self.rows)

    @property
    def frame_fallbacks(self):
        """How many loads used an earlier frame because the chosen one was missing (all workers together)."""
        return int(self._fallbacks.item())

    def _frame_file(self, i):
        """Path of row i's frame for this load; decode() adds the datafile and row to a DataError."""
        row = self.rows[i]
        want = random.randint(0, self.num_frames - 1) if self.train else (
            int(self.num_frames / 2) if self.frame is None else self.frame)
        for k in range(want, -1, -1):                   # missing frame -> nearest earlier one, as the official code
            path = frame_path(row, k)
            if os.path.isfile(path):
                if k != want:
                    self._fallbacks += 1
                return path
        raise DataError(f"no frame at or before frame_{want} (looked for {frame_path(row, want)} and earlier)")

    def decode(self, i):
        """What a raw worker returns: centred waveform [n], uint8 frame [3, S, S], multi-hot label [K]."""
        row = self.rows[i]
        try:
            wave = load_audio(row["wav"])
            image = read_frame(self._frame_file(i), self.image_size)
        except DataError as e:
            raise DataError(f"{self.datafile} row {i} (video_id {row['video_id']}): {e}") from None
        label = torch.zeros(self.num_classes)
        label[[self.labels.index[m] for m in label_mids(row)]] = 1.0
        return wave - wave.mean(), image, label

    def __getitem__(self, i):
        mix = self.train and not self.raw and self.mixup > 0 and random.random() < self.mixup
        j, lam = (random.randrange(len(self)), random.betavariate(MIXUP_BETA, MIXUP_BETA)) if mix else (None, None)
        wave, image_u8, y = self.decode(i)
        if self.raw:
            win, hop = fbank_geometry()
            keep = win + hop * (self.target_length - 1)                 # samples that reach target_length frames
            return (wave[:keep].clone() if wave.shape[0] > keep else wave), image_u8, y
        image, length = normalise_image(image_u8), torch.tensor([wave.shape[0]])
        wave = wave[None]                                               # (1, N)
        y2 = lam_t = None
        if mix:
            wave2, image2_u8, y2 = self.decode(j)
            wave2 = F.pad(wave2, (0, max(0, wave.shape[1] - wave2.shape[0])))[None, :wave.shape[1]]
            lam_t = torch.tensor([lam])
            wave = mix_waveforms(wave, wave2, lam_t, length)
            image = lam * image + (1 - lam) * normalise_image(image2_u8)
            y2 = y2[None]
        feats = fbank_features(wave, length, self.target_length)        # (1, T, 128)
        feats = finish_fbank(feats, self.mean, self.std, self.freqm, self.timem, self.noise, self.train)
        return feats[0], image, smooth_labels(y[None], self.label_smooth, y2, lam_t)[0]

    def audio_features(self, i):
        """Unnormalised, unaugmented fbank [T, 128] of row i (for dataset_stats)."""
        wave = load_audio(self.rows[i]["wav"])
        return fbank_features((wave - wave.mean())[None], torch.tensor([wave.shape[0]]), self.target_length)[0]


def finish_fbank(feats, mean, std, freqm, timem, noise, train):
    """(B, T, M) padded fbank -> SpecAugment (train), normalisation, noise (train), in the official order."""
    if train:
        feats = spec_augment(feats, freqm, timem)
    feats = normalise(feats, mean, std)
    return add_noise(feats) if train and noise else feats


def collate_raw(items):
    """Raw items -> dict(wave [B, N] zero-padded, length [B], image uint8 [B, 3, S, S], label [B, K])."""
    waves, images, labels = zip(*items)
    length = torch.tensor([w.shape[0] for w in waves])
    wave = torch.zeros(len(waves), int(length.max()))
    for b, w in enumerate(waves):
        wave[b, :w.shape[0]] = w
    return dict(wave=wave, length=length, image=torch.stack(images), label=torch.stack(labels))


class BatchPreprocessor:
    """Finishes a collate_raw batch on a device: fbank, pad/cut, SpecAugment, normalisation, in-batch mixup
    (partner drawn uniformly from the batch), noise and label smoothing. Same settings as AVDataset."""

    def __init__(self, target_length=1024, mean=AUDIOSET_MEAN, std=AUDIOSET_STD, train=False, freqm=0, timem=0,
                 mixup=0.0, noise=False, label_smooth=0.0):
        self.target_length, self.mean, self.std, self.train = target_length, mean, std, train
        self.freqm, self.timem, self.mixup, self.noise, self.label_smooth = freqm, timem, mixup, noise, label_smooth

    @classmethod
    def from_dataset(cls, ds):
        return cls(ds.target_length, ds.mean, ds.std, ds.train, ds.freqm, ds.timem, ds.mixup, ds.noise,
                   ds.label_smooth)

    def __call__(self, batch, device="cpu"):
        wave, length = batch["wave"].to(device, non_blocking=True), batch["length"]              # length on CPU
        image = normalise_image(batch["image"].to(device, non_blocking=True))          # (B, 3, S, S)
        y = batch["label"].to(device, non_blocking=True)
        label = smooth_labels(y, self.label_smooth)                                   # (B, K)
        if self.train and self.mixup > 0:                                            # mixup with a batch partner
            B = wave.shape[0]
            mixed = torch.rand(B, device=device) < self.mixup                        # (B,)
            partner = torch.randint(0, B, (B,), device=device)
            lam = torch.distributions.Beta(*torch.full((2,), MIXUP_BETA, device=device)).sample((B,))
            mixed_wave = mix_waveforms(wave, wave[partner], lam, length.to(device))
            wave = torch.where(mixed[:, None], mixed_wave, wave)
            lam_image = lam[:, None, None, None]
            mixed_image = lam_image * image + (1 - lam_image) * image[partner]
            image = torch.where(mixed[:, None, None, None], mixed_image, image)
            label = torch.where(mixed[:, None], smooth_labels(y, self.label_smooth, y[partner], lam), label)
        feats = fbank_features(wave, length, self.target_length)                    # (B, T, 128)
        feats = finish_fbank(feats, self.mean, self.std, self.freqm, self.timem, self.noise, self.train)
        return feats, image, label


def class_balance_weights(ds):
    """Per-sample weights for WeightedRandomSampler (official formula): a label weighs 1000 / (count + 0.01)
    over the dataset's rows, a sample the sum over its labels. float64 [len(ds)], aligned with ds (after skips)."""
    counts = np.zeros(ds.num_classes)
    indices = [[ds.labels.index[m] for m in label_mids(r)] for r in ds.rows]
    for idx in indices:
        np.add.at(counts, idx, 1)
    label_weight = 1000.0 / (counts + 0.01)
    return torch.tensor([label_weight[idx].sum() for idx in indices], dtype=torch.float64)


def dataset_stats(ds, max_items=None):
    """(mean, std) of the padded, unnormalised fbank over ds (or its first max_items rows), to normalise a new
    dataset as the paper normalises AudioSet (-5.081, 4.4849)."""
    total = total_sq = count = 0.0
    for i in range(min(len(ds), max_items or len(ds))):
        feats = ds.audio_features(i).double()
        total, total_sq, count = total + feats.sum().item(), total_sq + (feats ** 2).sum().item(), count + feats.numel()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean ** 2, 0.0) * count / max(count - 1, 1))


# ----------------------------------------------------------------------------------------------------------
# python data.py --check DATAFILE LABEL_CSV | --bench [--datafile F --label_csv L]

def check_datafile(datafile, label_csv, num_frames=10, show=20):
    """Validate every row (audio opens at 16 kHz, frames exist and open, labels known); print a summary and
    return the number of rows with problems."""
    start, labels, rows = time.time(), load_label_csv(label_csv), read_datafile(datafile)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: check_row(r, labels, num_frames), rows))
    bad = [(i, row, problems) for i, (row, (problems, _)) in enumerate(zip(rows, results)) if problems]
    print(f"checked {len(rows)} rows of {datafile} in {time.time() - start:.1f} s: "
          f"{len(rows) - len(bad)} ok, {len(bad)} with problems")
    for i, row, problems in bad[:show]:
        print(f"  row {i} (video_id {row['video_id']}): {'; '.join(problems)}")
    if len(bad) > show:
        print(f"  ... and {len(bad) - show} more rows")
    partial = sum(0 < missing < num_frames for _, missing in results)
    if partial:
        print(f"  {partial} rows miss some of their {num_frames} frames (loading falls back to an earlier frame)")
    seen = {labels.index[m] for row in rows for m in label_mids(row) if m in labels.index}
    unlabelled = sum(not label_mids(row) for row in rows)
    print(f"  labels: {len(seen)} of {len(labels.mids)} classes have examples"
          + (f", {unlabelled} rows have no label" if unlabelled else ""))
    return len(bad)


def make_bench_data(root, n=64, seconds=10.0, image_size=224, seed=0):
    """A throwaway dataset of n clips (16 kHz PCM-16 tones in noise) with 10 JPEG frames each."""
    rng, rows = np.random.default_rng(seed), []
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    for i in range(n):
        vid = f"clip{i}"
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(t.shape)
        sf.write(os.path.join(root, vid + ".wav"), wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        for k in range(10):
            os.makedirs(os.path.join(root, f"frame_{k}"), exist_ok=True)
            small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            small.resize((image_size, image_size), Image.BILINEAR).save(os.path.join(root, f"frame_{k}", vid + ".jpg"))
        rows.append(dict(video_id=vid, wav=vid + ".wav", video_path=".", labels=f"/m/{i % 5}"))
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump({"data": rows}, f)
    with open(os.path.join(root, "labels.csv"), "w") as f:
        f.write("index,mid,display_name\n" + "".join(f'{k},/m/{k},"class {k}, synthetic"\n' for k in range(5)))
    return os.path.join(root, "data.json"), os.path.join(root, "labels.csv")


def bench(datafile, label_csv, items=64, repeats=5, target_length=1024, image_size=224):
    """CPU time of items and fbank on one thread, interleaved so that load from other processes hits all alike."""
    torch.set_num_threads(1)
    train = dict(train=True, mixup=0.5, freqm=48, timem=192, noise=True, label_smooth=0.1)
    shape = dict(target_length=target_length, image_size=image_size)
    sets = dict(eval=AVDataset(datafile, label_csv, **shape), train=AVDataset(datafile, label_csv, **train, **shape),
                raw=AVDataset(datafile, label_csv, raw=True, **train, **shape))
    n = min(items, len(sets["eval"]))
    batch = collate_raw([sets["raw"][i % n] for i in range(32)])                # also warms the file cache
    prep = BatchPreprocessor.from_dataset(sets["raw"])
    batch_jobs = dict(fbank32=lambda: fbank(batch["wave"]), prep32=lambda: prep(batch),
                      loop_exact=lambda: [fbank(w[:k], exact=True) for w, k in zip(batch["wave"], batch["length"])])
    ms = {name: [] for name in [*sets, *batch_jobs]}
    for _ in range(repeats):                     # interleaved: load from other processes hits every path alike
        for i in range(n):
            for name, ds in sets.items():
                start = time.process_time()
                ds[i]
                ms[name].append(1000 * (time.process_time() - start))
        for name, job in batch_jobs.items():
            start = time.process_time()
            job()
            ms[name].append(1000 * (time.process_time() - start))
    ms = {name: statistics.median(v) for name, v in ms.items()}
    print(f"{n} clips of {datafile}; CPU time, 1 thread, medians over {repeats} interleaved rounds")
    print(f"  eval item (wav + fbank + one JPEG)               {ms['eval']:7.2f} ms   official loader 9.8 ms")
    print(f"  train item (mixup .5, SpecAugment 48/192, noise) {ms['train']:7.2f} ms   official loader 14.3 ms")
    print(f"  raw item (read + decode only)                    {ms['raw']:7.2f} ms   "
          f"= {1000 / ms['raw']:.0f} samples/s per worker")
    print(f"  fbank, batch of 32 clips                         {ms['fbank32']:7.2f} ms   "
          f"({ms['fbank32'] / 32:.2f} ms per clip)")
    print(f"  fbank, one clip at a time with torchaudio's ops  {ms['loop_exact']:7.2f} ms   "
          f"(batch / loop = {ms['fbank32'] / ms['loop_exact']:.2f}; torchaudio: 7.8 ms per clip)")
    print(f"  BatchPreprocessor, train batch of 32 on the CPU  {ms['prep32']:7.2f} ms")
    return ms


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check or benchmark a CAV-MAE datafile.")
    parser.add_argument("--check", nargs=2, metavar=("DATAFILE", "LABEL_CSV"), help="validate every row")
    parser.add_argument("--num_frames", type=int, default=10)
    parser.add_argument("--bench", action="store_true", help="time items, fbank and the raw path")
    parser.add_argument("--datafile", help="--bench on this datafile instead of a generated one")
    parser.add_argument("--label_csv")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target_length", type=int, default=1024)
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args(argv)
    if args.check:
        try:
            return 1 if check_datafile(*args.check, num_frames=args.num_frames) else 0
        except (DataError, OSError) as e:                                   # unreadable datafile or label csv
            print(f"error: {e}")
            return 1
    if args.bench:
        if args.datafile:
            bench(args.datafile, args.label_csv, args.items, args.repeats, args.target_length, args.image_size)
        else:
            with tempfile.TemporaryDirectory() as root:
                bench(*make_bench_data(root, n=args.items), items=args.items, repeats=args.repeats)
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
