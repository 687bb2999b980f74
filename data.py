"""CAV-MAE's input pipeline: files -> (fbank, image, label) tensors, equal to the official loader
(docs/preprocessing.md).

    audio          load_audio; fbank, the Kaldi recipe; cpu_fbank, the same numbers faster on a CPU
    images         read_frame, normalise_image, load_image
    augmentations  mixup, SpecAugment, noise, label smoothing: each drawn on the loader worker
                   (draw_*) and applied by the batch path (mix, spec_augment, add_noise, ...)
    datafiles      read_datafile, load_label_csv; row_problems (prepare.py check); adaptation_notes
                   (how the model's input sizes change the data). The rows are held by storage.Rows,
                   a few numpy arrays that forked loader workers share instead of copying
    AVDataset      a datafile's rows -> items; collate_raw batches raw items; BatchPreprocessor
                   finishes a batch on any device

A worker decodes a row and draws every random choice of the item (frame, mixup partner from the
whole dataset and lambda, SpecAugment bands, noise seed, scale and roll) from Python's `random`,
NumPy and torch's CPU generator (train.py seeds them per item); BatchPreprocessor applies the draws:
    ds = AVDataset(datafile, label_csv, raw=True, ...)  # ds[i] or ds[(i, frame)] -> a raw item
    batches = DataLoader(ds, batch_size, collate_fn=collate_raw, num_workers=8, pin_memory=True)
    prep = BatchPreprocessor.from_dataset(ds)
    for batch in batches:
        audio, image, label = prep(batch, device)  # (B, T, 128), (B, 3, S, S), (B, K)
AVDataset(raw=False)[i] -> (fbank [T, 128], image [3, S, S], label [K]) is that on a batch of one.

Project deviations: bad input raises a clear error instead of becoming a 0.01-filled sample; non-RGB
frames are converted to RGB; augmentation only when train=True; a mixup partner's frame comes from
its own video_path (the official code looks under the first sample's); the noise field is
hash_uniform's. `python prepare.py check` loads every row as training does.
"""

import csv
import functools
import json
import math
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from storage import Rows, release_freed_heap, split_labels

SAMPLE_RATE = 16000
WIN = 400  # fbank window in samples: 25 ms at 16 kHz
HOP = 160  # fbank frame shift in samples: 10 ms
N_FFT = 512  # the window zero-padded to a power of two
NUM_MEL_BINS = 128
FRAME_LENGTH_MS = 1000 * WIN / SAMPLE_RATE  # 25.0: WIN in milliseconds, as kaldi.fbank takes it
FRAME_SHIFT_MS = 1000 * HOP / SAMPLE_RATE  # 10.0: HOP in milliseconds
LOW_FREQ = 20.0  # Hz, the lowest mel filter's left edge
HIGH_FREQ = 0.0  # Kaldi's 0: up to the Nyquist frequency
PREEMPHASIS = 0.97
AUDIOSET_MEAN = -5.081  # fbank normalisation of the paper (AudioSet's)
AUDIOSET_STD = 4.4849
IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet's, as the official loader's transforms.Normalize
IMAGE_STD = (0.229, 0.224, 0.225)
MIXUP_BETA = 10.0  # lambda ~ Beta(10, 10)
# A clip padded by more than this share of the model's audio_length is worth a note
# (adaptation_notes); a 10 s AudioSet clip fills 998 of the 1024 frames (2.5 % padding), as in the
# official setup.
PADDING_NOTE_FRACTION = 0.05


class DataError(ValueError):
    """A file, row or label that cannot become a training sample."""


def constant_on(t, device):
    """A CPU constant on `device` without a host sync (a non-blocking copy from pinned memory)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def samples_for(frames):
    """The samples that `frames` fbank frames read: one window, then a hop per further frame."""
    return WIN + HOP * (frames - 1)


def fbank_frame_count(num_samples):
    """The fbank frames of `num_samples` samples (an int, or an int64 tensor): the windows that fit
    whole, one every hop (Kaldi's snip_edges)."""
    return (num_samples - WIN) // HOP + 1


# ----------------------------------------------------------------------------------------------------------
# Audio (docs/preprocessing.md, section 1)


def wav_header_frames(path):
    """The sample frames the data chunk of a RIFF/WAVE file declares, or None (another format, or a
    streamed wav whose header holds a placeholder size). libsndfile quietly shortens a truncated wav
    to what is there."""
    with open(path, "rb") as f:
        riff = f.read(12)
        if (riff[:4] != b"RIFF") or (riff[8:12] != b"WAVE"):
            return None
        block_align = None
        while len(chunk := f.read(8)) == 8:
            size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"fmt ":
                block_align = int.from_bytes(f.read(16)[12:14], "little")  # bytes per sample frame
                f.seek(size - 16 + size % 2, os.SEEK_CUR)
            elif chunk[:4] == b"data":
                placeholder = size in (0, 0xFFFFFFFF)
                return None if (placeholder or (not block_align)) else size // block_align
            else:
                f.seek(size + size % 2, os.SEEK_CUR)  # chunks are padded to an even size
    return None


def load_audio(path, sample_rate=SAMPLE_RATE):
    """float32 [N] in [-1, 1) (int16 / 32768 for PCM-16), the first channel of a wav/flac file."""
    if not os.path.isfile(path):
        raise DataError(f"audio file not found: {path}")
    try:
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            subtype = f.subtype
            promised = wav_header_frames(path) or f.frames
            if rate == sample_rate:
                data = f.read(dtype="float32", always_2d=True)  # (N, C), int16 / 32768
    except Exception as e:  # soundfile raises several types for corrupt files
        raise DataError(f"cannot read audio {path}: {e}") from None
    if rate != sample_rate:
        raise DataError(
            f"{path} is sampled at {rate} Hz, the model needs {sample_rate} Hz: extract it with "
            f"`python prepare.py videos` (which resamples), "
            f"or `ffmpeg -i IN -ar {sample_rate} OUT.wav`"
        )
    if data.shape[0] < promised:
        raise DataError(
            f"{path} is truncated: its header promises {promised} samples, "
            f"the file holds {data.shape[0]}; extract it again (python prepare.py videos redoes broken files)"
        )
    if data.shape[0] < WIN:
        raise DataError(
            f"{path} has {data.shape[0]} samples, fewer than one fbank frame ({WIN}): empty or too short"
        )
    wave = torch.from_numpy(np.ascontiguousarray(data[:, 0]))  # stereo -> first channel
    is_float = subtype in ("FLOAT", "DOUBLE")  # integer PCM cannot be NaN
    if is_float and (not torch.isfinite(wave).all()):
        raise DataError(f"{path} contains NaN or infinite samples")
    return wave


def mel_filterbank(
    num_mel_bins=NUM_MEL_BINS, n_fft=N_FFT, sample_rate=SAMPLE_RATE, low_freq=LOW_FREQ, high_freq=HIGH_FREQ
):
    """Kaldi's triangular mel filters, linear in mel = 1127 ln(1 + f/700), float32
    [num_mel_bins, n_fft // 2 + 1], built with the same float32 torch ops as torchaudio
    (docs/preprocessing.md 1.2)."""

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    high = high_freq if high_freq > 0 else high_freq + 0.5 * sample_rate  # 0: the Nyquist frequency
    mel_low = mel(low_freq)
    delta = (mel(high) - mel_low) / (num_mel_bins + 1)
    band = torch.arange(num_mel_bins).unsqueeze(1)  # (M, 1), float32 below
    left = mel_low + band * delta
    center = mel_low + (band + 1.0) * delta
    right = mel_low + (band + 2.0) * delta
    bin_hz = sample_rate / n_fft * torch.arange(n_fft // 2)  # (n_fft/2,)
    bin_mel = 1127.0 * (1.0 + bin_hz / 700.0).log()
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    weights = torch.max(torch.zeros(1), torch.min(up, down))  # (M, n_fft/2)
    return F.pad(weights, (0, 1))  # zero column for Nyquist


@functools.cache
def fbank_constants(win, n_fft, num_mel_bins, sample_rate, low_freq, high_freq, device, dtype):
    """(symmetric Hann window (win,), mel filters (M, n_fft/2 + 1)) on `device`, built once."""
    window = torch.hann_window(win, periodic=False).to(dtype)
    weights = mel_filterbank(num_mel_bins, n_fft, sample_rate, low_freq, high_freq).to(dtype)
    return constant_on(window, device), constant_on(weights, device)


def cavmae_fbank_constants(device, dtype):
    """fbank_constants at CAV-MAE's settings, the only ones cpu_fbank computes."""
    return fbank_constants(WIN, N_FFT, NUM_MEL_BINS, SAMPLE_RATE, LOW_FREQ, HIGH_FREQ, device, dtype)


def windowed_frames(waveform, win, hop, window, preemphasis):
    """(..., N) -> (..., T, win), T = 1 + (N - win) // hop (snip_edges): Kaldi's frames with the DC
    removed, pre-emphasis inside the frame (its first sample replicated) and the window applied."""
    frames = waveform.unfold(-1, win, hop)  # (..., T, win) view
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove DC, frame by frame
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    return frames.sub_(previous.mul_(preemphasis)).mul_(window)  # in place on the new tensors


def require_one_frame(waveform, win, frame_length):
    if waveform.shape[-1] < win:
        raise DataError(
            f"fbank needs at least {win} samples (one {frame_length} ms frame), got {waveform.shape[-1]}"
        )


def fbank(
    waveform,
    sample_rate=SAMPLE_RATE,
    num_mel_bins=NUM_MEL_BINS,
    frame_length=FRAME_LENGTH_MS,
    frame_shift=FRAME_SHIFT_MS,
    low_freq=LOW_FREQ,
    high_freq=HIGH_FREQ,
    preemphasis=PREEMPHASIS,
):
    """Log-mel filterbank of torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False,
    window_type='hanning', dither=0.0) as CAV-MAE calls it, with torchaudio's float32 ops one for
    one (docs/preprocessing.md 1.1-1.2). [N] -> [T, M] or [B, N] -> [B, T, M]. The waveform's own scale
    is kept (CAV-MAE feeds [-1, 1))."""
    win = int(sample_rate * frame_length * 0.001)  # Kaldi's rounding: 400 samples
    hop = int(sample_rate * frame_shift * 0.001)  # 160
    require_one_frame(waveform, win, frame_length)
    n_fft = 1 << (win - 1).bit_length()  # 400 -> 512
    window, weights = fbank_constants(
        win, n_fft, num_mel_bins, sample_rate, low_freq, high_freq, waveform.device, waveform.dtype
    )
    frames = windowed_frames(waveform, win, hop, window, preemphasis)  # (..., T, win)
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2.0)  # (..., T, n_fft/2 + 1) power spectrum
    mel = torch.matmul(power, weights.T)  # (..., T, M)
    return mel.clamp_min(torch.finfo(mel.dtype).eps).log()  # log with a float eps floor


@functools.cache
def mel_bands(dtype, group=16):
    """CAV-MAE's mel filters in groups of `group` bands, each cut to the bins it covers (the
    triangles are contiguous): [(first band, lo bin, hi bin, filters (hi - lo, group))]."""
    weights = cavmae_fbank_constants(torch.device("cpu"), dtype)[1]  # (M, n_fft/2 + 1)
    bands = []
    for first in range(0, NUM_MEL_BINS, group):
        filters = weights[first : first + group]  # (group, n_fft/2 + 1)
        covered = filters.ne(0).any(0).nonzero().flatten()
        lo = int(covered[0])
        hi = int(covered[-1]) + 1
        bands.append((first, lo, hi, filters[:, lo:hi].T.contiguous()))
    return bands


def cpu_fbank(waveform):
    """fbank(waveform) at CAV-MAE's settings, within 1e-5 of it, faster on a CPU: one clip at a
    time, so its frames stay in cache; |X|^2 as re^2 + im^2, in place; each group of 16 mel filters
    multiplied with the bins it covers only. Measured on 32 clips of 10 s, one thread, 2-core CPU
    (python bench.py --data): 76 ms against 116 ms for fbank clip by clip and 288 ms for fbank over
    the whole batch. [N] -> [T, M] or [B, N] -> [B, T, M]."""
    require_one_frame(waveform, WIN, FRAME_LENGTH_MS)
    window = cavmae_fbank_constants(waveform.device, waveform.dtype)[0]
    clips = waveform.unsqueeze(0) if waveform.dim() == 1 else waveform  # (B, N)
    num_frames = fbank_frame_count(clips.shape[-1])
    out = clips.new_empty(len(clips), num_frames, NUM_MEL_BINS)  # (B, T, M)
    for clip, mel in zip(clips, out):
        frames = windowed_frames(clip, WIN, HOP, window, PREEMPHASIS)  # (T, win)
        re_im = torch.view_as_real(torch.fft.rfft(frames, n=N_FFT)).square_()  # (T, n_fft/2 + 1, 2)
        power = re_im[..., 0] + re_im[..., 1]  # (T, n_fft/2 + 1)
        for first, lo, hi, filters in mel_bands(waveform.dtype):
            torch.mm(power[:, lo:hi], filters, out=mel[:, first : first + filters.shape[1]])
        mel.clamp_min_(torch.finfo(mel.dtype).eps).log_()
    return out[0] if waveform.dim() == 1 else out


def fbank_features(wave, length, target_length):
    """Centred waveforms (B, N) and their lengths (B,) on the same device -> fbank cut or padded
    with zero rows to (B, target_length, M). Rows past a clip's own frames are zero: a clip in a
    padded batch equals its own fbank."""
    wave = wave[:, : samples_for(target_length)]  # no unused frames
    feats = cpu_fbank(wave) if wave.device.type == "cpu" else fbank(wave)  # (B, <=T, M)
    frames = fbank_frame_count(length)  # (B,) a clip's own frames
    past_end = torch.arange(feats.shape[1], device=wave.device) >= frames[:, None]  # (B, <=T)
    feats = feats.masked_fill(past_end[..., None], 0.0)
    return F.pad(feats, (0, 0, 0, target_length - feats.shape[1]))  # zero rows, not padded audio


# ----------------------------------------------------------------------------------------------------------
# Images (docs/preprocessing.md, section 2)


def resized_size(width, height, size):
    """torchvision's Resize(size): the shorter side becomes `size`, the longer one
    int(size * long / short)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def read_frame(path, image_size=224):
    """uint8 [3, S, S]: RGB, the shorter side resized to S with Pillow bicubic, a centre crop
    (torchvision's rules)."""
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img = img if img.mode == "RGB" else img.convert("RGB")  # project deviation: any mode
            width, height = resized_size(*img.size, image_size)
            if (width, height) != img.size:
                img = img.resize((width, height), Image.BICUBIC)
            top = int(round((height - image_size) / 2.0))
            left = int(round((width - image_size) / 2.0))
            img = img.crop((left, top, left + image_size, top + image_size))
            pixels = np.array(img)  # (S, S, 3) uint8
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, S, S)


@functools.cache
def image_mean_std(device):
    """ImageNet's mean and std as (3, 1, 1) tensors on `device`, built once."""
    return [constant_on(torch.tensor(c)[:, None, None], device) for c in (IMAGE_MEAN, IMAGE_STD)]


def normalise_image(image_u8):
    """uint8 (..., 3, S, S) -> float32 / 255, then ImageNet's mean and std (torchvision's ToTensor
    and Normalize)."""
    mean, std = image_mean_std(image_u8.device)
    return (image_u8.float().div(255) - mean) / std


def load_image(path, image_size=224):
    """[3, S, S] float32, equal to the official torchvision transform."""
    return normalise_image(read_frame(path, image_size))


# ----------------------------------------------------------------------------------------------------------
# Augmentations: a worker draws (draw_*, in AVDataset.load), BatchPreprocessor applies the draws


def draw_band(length, max_width):
    """One SpecAugment band as torchaudio draws it from torch's CPU generator: width = floor(u1 F)
    in [0, F), start = floor(u2 (L - u1 F)), so start + width <= L. Returns (start, width);
    max_width 0 draws nothing."""
    if not max_width:
        return 0, 0
    value = torch.rand(1) * max_width  # draw 1: width
    start = (torch.rand(1) * (length - value)).long()  # draw 2: start
    return int(start), int(value.long())


def spec_augment(feats, bands):
    """SpecAugment on (B, T, M) with bands (B, 4) = (freq start, freq width, time start, time
    width): whole mel bands and whole frames set to 0 (docs/preprocessing.md 1.4). A width of 0 masks
    nothing."""
    frame = torch.arange(feats.shape[1], device=feats.device)  # (T,)
    band = torch.arange(feats.shape[2], device=feats.device)  # (M,)
    in_band = (band >= bands[:, 0:1]) & (band < bands[:, 0:1] + bands[:, 1:2])  # (B, M)
    in_time = (frame >= bands[:, 2:3]) & (frame < bands[:, 2:3] + bands[:, 3:4])  # (B, T)
    return feats.masked_fill(in_band[:, None, :] | in_time[:, :, None], 0.0)


def mix(first, second, lam):
    """Mixup: lam * first + (1 - lam) * second per sample; lam (B,) float64, both weights rounded to
    float32 as the official loader's numpy scalars are."""
    shape = (-1,) + (1,) * (first.dim() - 1)  # (B, 1, ...)
    own = lam.float().view(shape)
    other = (1 - lam).float().view(shape)
    return own * first + other * second


def draw_noise(target_length):
    """The noise augmentation's draws: the seed of its field, its scale s ~ U(0, 1) and a roll in
    [-T, T)."""
    return dict(
        noise_seed=int(torch.randint(2**32, (1,))),
        noise_scale=float(np.random.rand()),
        noise_shift=int(np.random.randint(-target_length, target_length)),
    )


def hash32(x):
    """A 32-bit integer mixing hash, in place on int64 holding uint32 values: hash-prospector's
    xorshift-multiply [16 21f0aaad 15 735a2d97 15], whose multipliers are below 2^31, so
    x * c < 2^63 never overflows int64."""
    for shift, multiplier in ((16, 0x21F0AAAD), (15, 0x735A2D97)):
        x ^= x >> shift
        x.mul_(multiplier).bitwise_and_(0xFFFFFFFF)
    x ^= x >> 15
    return x


@functools.cache
def hashed_positions(n, device):
    """hash32 of the positions 0..n-1 on `device`, the same for every seed."""
    return hash32(torch.arange(n, device=device))  # (n,)


def hash_uniform(seeds, shape, device):
    """U[0, 1) float32 (B, *shape) from integer seeds (B,): element k of sample b is a hash of
    (seed b, k), 24 bits. Counter-based, not a generator's stream: the same numbers on every device
    and for any batch composition, a worker ships one integer instead of a (T, M) field, and the
    device makes the field in a few integer kernels."""
    device = torch.device(device)
    positions = hashed_positions(math.prod(shape), device)  # (n,)
    seed = hash32(seeds.to(device, torch.int64) & 0xFFFFFFFF)  # (B,)
    out = torch.empty(len(seed), len(positions), device=device)  # (B, n)
    samples = range(len(seed)) if device.type == "cpu" else [slice(None)]  # CPU: one stays in cache
    for b in samples:
        bits = hash32(positions ^ seed[b, None]) >> 8  # the top 24 bits
        torch.mul(bits, 2.0**-24, out=out[b])  # -> [0, 1)
    return out.view(-1, *shape)


def add_noise(feats, seed, scale, shift):
    """The official `noise` augmentation on normalised fbank (B, T, M): + U(0,1) * s / 10, then a
    roll in time by `shift` (out[t] = in[t - shift]). seed, scale (float64) and shift are (B,)
    tensors a worker drew."""
    B, T, M = feats.shape
    uniform = hash_uniform(seed, (T, M), feats.device)  # (B, T, M)
    noisy = uniform.mul_(scale.float()[:, None, None]).div_(10).add_(feats)
    source = (torch.arange(T, device=feats.device) - shift[:, None]) % T  # (B, T) frame moved to t
    rows = (source + T * torch.arange(B, device=feats.device)[:, None]).flatten()  # (B * T,)
    return noisy.reshape(B * T, M).index_select(0, rows).view(B, T, M)


def smooth_labels(y1, label_smooth, y2=None, lam=None):
    """Multi-hot (B, K) -> targets (docs/preprocessing.md, section 4): negatives ls/K, positives
    1 - ls; with mixup positives of the two samples add lam (1 - ls) and (1 - lam) (1 - ls) on top
    of ls/K. Float64 arithmetic, float32 result."""
    y1 = y1.double()
    base = label_smooth / y1.shape[1]
    if y2 is None:
        return torch.where(y1 > 0, 1.0 - label_smooth, base).float()
    lam = lam.double()[:, None]  # (B, 1)
    own = y1 * (lam * (1.0 - label_smooth))
    other = y2.double() * ((1 - lam) * (1.0 - label_smooth))
    return (base + own + other).float()


# ----------------------------------------------------------------------------------------------------------
# Datafiles and labels


class LabelCSV(NamedTuple):
    """A label csv (index,mid,display_name), in class order."""

    index: dict  # mid -> class index
    mids: list  # the mid of each class
    names: list  # the display name of each class


def is_synthetic_folder(path):
    """A path under a folder named synthetic*, as the synthetic recipes' datafiles are."""
    folder = os.path.dirname(path) or "."
    return os.path.basename(os.path.normpath(folder)).startswith("synthetic")


def require_file(path, what):
    """A clear error for a missing datafile or label csv, naming the command that writes it."""
    if os.path.isfile(path):
        return
    folder = os.path.dirname(path) or "."
    if is_synthetic_folder(path):
        make = f"`python prepare.py synthetic --out {folder}` (its config's header has the options)"
    else:
        make = "`python prepare.py videos --input VIDEOS --out FOLDER --labels CSV`"
    raise DataError(f"{what} not found: {path}; write it with {make}, or give the path of yours")


def load_label_csv(path):
    """The `index,mid,display_name` csv (quoted names may hold commas); indices must be 0..K-1."""
    require_file(path, "label csv")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"index", "mid"} <= set(reader.fieldnames or []):
            raise DataError(
                f"{path}: expected a header with columns index,mid,display_name, got {reader.fieldnames}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            mid = (row.get("mid") or "").strip()
            if not mid:
                raise DataError(f"{path} line {line}: no mid (want index,mid,display_name)")
            try:
                index = int(row["index"])
            except (TypeError, ValueError):
                problem = f"index {row['index']!r} is not an integer"
                raise DataError(f"{path} line {line}: {problem}") from None
            rows.append((index, mid, (row.get("display_name") or "").strip()))
    rows.sort()
    if [index for index, _, _ in rows] != list(range(len(rows))):
        raise DataError(f"{path}: class indices must be 0..{len(rows) - 1}, each once")
    mids = [mid for _, mid, _ in rows]
    if len(set(mids)) != len(mids):
        raise DataError(f"{path}: a mid appears twice")
    return LabelCSV({mid: k for k, mid in enumerate(mids)}, mids, [name for _, _, name in rows])


def read_datafile(path):
    """Rows {video_id, wav, video_path, labels} of an official json datafile, paths resolved against
    its folder, held compactly (Rows)."""
    require_file(path, "datafile")
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read datafile {path} (want json {{'data': [...]}}): {e}") from None
    try:
        rows = Rows(records, os.path.dirname(os.path.abspath(path)), path)
    except ValueError as e:  # a row without one of the four fields
        raise DataError(str(e)) from None
    del records
    release_freed_heap()
    return rows


def label_mids(row):
    """The mids of a row (or of a labels string)."""
    text = row if isinstance(row, str) else row["labels"]
    return split_labels(text)


def frame_path(row, k):
    return os.path.join(row["video_path"], f"frame_{k}", row["video_id"] + ".jpg")


def row_problems(row, labels, num_frames=10, image_size=224):
    """(every problem that would stop training on `row`, how many of its frames are missing),
    found by loading it as training does: load_audio, and read_frame on each frame. Fine: []."""
    unknown = [mid for mid in label_mids(row) if mid not in labels.index]
    problems = [f"label {mid!r} is not in the label csv" for mid in unknown]
    try:
        load_audio(row["wav"])
    except DataError as e:
        problems.append(str(e))
    paths = [frame_path(row, k) for k in range(num_frames)]
    present = [path for path in paths if os.path.isfile(path)]
    if paths[0] not in present:
        problems.append(f"frame_0 missing ({paths[0]}): a missing frame has no earlier one to use")
    for path in present:
        try:
            read_frame(path, image_size)
        except DataError as e:
            problems.append(str(e))
    return problems, num_frames - len(present)


def all_row_problems(rows, labels, num_frames=10, image_size=224):
    """row_problems of every row, on 8 threads (decoding releases the GIL)."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda row: row_problems(row, labels, num_frames, image_size), rows))


def first_frame_size(row, num_frames):
    """(width, height) of the first of the row's frames that exists, or None if none does."""
    for k in range(num_frames):
        path = frame_path(row, k)
        if os.path.isfile(path):
            with Image.open(path) as image:
                return image.size
    return None


def adaptation_notes(datafile, rows, image_size, target_length, num_frames=10, source=None):
    """One line per way the model's input sizes change this data, seen on its first row from the
    file headers: frames resized, audio cut, or audio padded by more than PADDING_NOTE_FRACTION.
    [] when the data fits as it is, when there are no rows, or when the files cannot be read
    (loading the row then says what is wrong). source: what the lines call the data (default: the
    first clip of `datafile`)."""
    if len(rows) == 0:
        return []
    row = rows[0]
    try:
        frame_size = first_frame_size(row, num_frames)
        fbank_length = fbank_frame_count(sf.info(row["wav"]).frames)
    except (OSError, RuntimeError, ValueError):
        return []  # missing or unreadable: the loader's error says which
    changes = []
    if (frame_size is not None) and (frame_size != (image_size, image_size)):
        width, height = frame_size
        changes.append(
            f"its frames are {width}x{height} px and the model's img_size is {image_size}: "
            f"frames resized and centre-cropped to {image_size}x{image_size}"
        )
    lengths = f"its audio has {fbank_length} fbank frames and the model's audio_length is {target_length}"
    padding = target_length - fbank_length
    if fbank_length > target_length:
        changes.append(f"{lengths}: audio cut to its first {target_length} frames")
    elif padding > PADDING_NOTE_FRACTION * target_length:
        changes.append(f"{lengths}: audio padded with {padding} frames of zeros")
    if source is None:
        source = f"the first clip of {datafile}"
    return [f"note: {source}: {change}" for change in changes]


# ----------------------------------------------------------------------------------------------------------
# The dataset


class AVDataset(torch.utils.data.Dataset):
    """ds[i] or ds[(i, frame)] -> (fbank [T, 128], image [3, S, S], label [K]), or the raw item that
    collate_raw batches (raw=True). A key's frame (int or None) overrides ds.frame for that load in
    evaluation. frame_fallbacks counts the per-item path's fallbacks in this process
    (num_workers=0); loaders read batch["fallbacks"]."""

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
        self.datafile = datafile
        self.train = train
        self.target_length = target_length
        self.num_frames = num_frames
        self.frame = frame  # the evaluation frame; None: the middle one
        self.mean = mean
        self.std = std
        self.freqm = freqm
        self.timem = timem
        self.mixup = mixup
        self.noise = noise
        self.label_smooth = label_smooth
        self.image_size = image_size
        self.raw = raw
        self.frame_fallbacks = 0
        self.labels = load_label_csv(label_csv)
        self.rows = read_datafile(datafile)
        self.num_classes = len(self.labels.mids)
        self.dropped = []  # (row in the datafile, video_id, problems) dropped by on_error="skip"
        if on_error == "skip":
            self.skip_bad_rows()
        classes = [self.labels.index.get(mid, -1) for mid in self.rows.mids]
        self.class_of_code = np.array(classes, np.int64)  # label code -> class, -1: not in the csv
        self.require_known_labels(label_csv)

    def require_known_labels(self, label_csv):
        """A DataError naming the first row with a label that the label csv lacks."""
        unknown = np.flatnonzero(self.class_of_code[self.rows.label_codes] < 0)  # places in label_codes
        if len(unknown) == 0:
            return
        i = int(np.searchsorted(self.rows.label_offsets, unknown[0], side="right")) - 1  # its row
        mid = self.rows.mids[self.rows.label_codes[unknown[0]]]
        raise DataError(
            f"{self.datafile} row {i} (video_id {self.rows[i]['video_id']}): "
            f"label {mid!r} is not in {label_csv}"
        )

    def skip_bad_rows(self):
        """Drop every row that would stop training (row_problems); list them in self.dropped, warn."""
        results = all_row_problems(self.rows, self.labels, self.num_frames, self.image_size)
        checks = [problems for problems, _ in results]
        self.dropped = [(i, self.rows[i]["video_id"], p) for i, p in enumerate(checks) if p]
        kept = [row for row, problems in zip(self.rows, checks) if not problems]
        self.rows = Rows(kept, "", self.datafile)  # paths already resolved
        if self.dropped:
            first_row, _, first_problems = self.dropped[0]
            warnings.warn(
                f"{self.datafile}: skipped {len(self.dropped)} of {len(checks)} rows "
                f"that would stop training "
                f"(first: row {first_row}: {first_problems[0]}); the list is in .dropped",
                stacklevel=3,
            )

    def __len__(self):
        return len(self.rows)

    def wanted_frame(self, frame=None):
        """Training: a random frame; evaluation: the key's frame, else ds.frame, else the middle."""
        if self.train:
            return random.randint(0, self.num_frames - 1)
        if frame is not None:
            return frame
        if self.frame is not None:
            return self.frame
        return self.num_frames // 2

    def choose_frame(self, row, frame=None):
        """(path, frame loaded, the wanted frame's path if it was missing, else None) for a load."""
        want = self.wanted_frame(frame)
        for k in range(want, -1, -1):  # missing frame -> nearest earlier one, as the official code
            path = frame_path(row, k)
            if os.path.isfile(path):
                missing = frame_path(row, want) if k != want else None
                return path, k, missing
        raise DataError(
            f"no frame at or before frame_{want} (looked for {frame_path(row, want)} and earlier)"
        )

    def decode(self, i, frame=None):
        """Row i read: (centred waveform [n], uint8 frame [3, S, S], 0/1 label [K], frame index,
        the missing wanted frame's path or None)."""
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
        """The raw item of row i: decoded, with every random choice of its augmentation drawn here,
        in the official order (mixup test, partner, lambda, frames, SpecAugment bands, noise). Keys:
        see collate_raw."""
        mixup_on = self.train and (self.mixup > 0)
        mixed = mixup_on and (random.random() < self.mixup)  # draw: mix this item?
        if mixed:  # partner from the whole dataset, as the official
            partner = random.randrange(len(self))
            lam = random.betavariate(MIXUP_BETA, MIXUP_BETA)
        wave, image, label, k, missing = self.decode(i, frame)
        used_samples = samples_for(self.target_length)  # the samples the model's fbank frames read
        fallbacks = [missing] if missing else []
        item = dict(wave=wave, image=image, label=label, frame=k, fallbacks=fallbacks)
        if mixed:
            partner_wave, partner_image, partner_label, _, partner_missing = self.decode(partner)
            shortfall = max(0, len(wave) - len(partner_wave))
            partner_wave = F.pad(partner_wave, (0, shortfall))[: len(wave)]  # cut or zero-padded
            item.update(
                partner=partner,
                lam=lam,
                partner_wave=partner_wave,
                partner_image=partner_image,
                partner_label=partner_label,
            )
            item["fallbacks"] += [partner_missing] if partner_missing else []
        elif len(wave) > used_samples:  # only samples that reach a used frame
            item["wave"] = wave[:used_samples].clone()
        if self.train:
            frequency_band = draw_band(NUM_MEL_BINS, self.freqm)
            time_band = draw_band(self.target_length, self.timem)
            item["bands"] = (*frequency_band, *time_band)
        if self.train and self.noise:
            item.update(draw_noise(self.target_length))
        return item

    def __getitem__(self, key):
        i, frame = key if isinstance(key, tuple) else (key, None)
        item = self.load(int(i), frame)
        if self.raw:
            return item
        self.frame_fallbacks += len(item["fallbacks"])
        prep = BatchPreprocessor.from_dataset(self)
        audio, image, label = prep(collate_raw([item]), "cpu")  # a batch of one
        return audio[0], image[0], label[0]


def collate_raw(items):
    """Raw items -> a batch dict of tensors, plus `fallbacks`: the paths of the wanted frames that
    were missing.
      wave (B, N) float32 centred, zero-padded; length (B,) int64; image (B, 3, S, S) uint8;
      label (B, K) 0/1; frame (B,) the frame index loaded.
    training adds the draws: bands (B, 4) int64 = (freq start, freq width, time start, time width);
      with noise: noise_seed (B,) int64, noise_scale (B,) float64, noise_shift (B,) int64;
    and if any item is mixed: mixed (B,) bool, partner (B,) row index (-1: none), lam (B,) float64,
      partner_wave (B, N), partner_image (B, 3, S, S) uint8, partner_label (B, K) (zeros if unmixed).
    """

    def with_partner(item):  # unmixed: zero partner, lam 1
        zeros = {f"partner_{k}": torch.zeros_like(item[k]) for k in ("wave", "image", "label")}
        return {"partner": -1, "lam": 1.0, **zeros, **item, "mixed": "partner" in item}

    if any("partner" in item for item in items):
        items = [with_partner(item) for item in items]
    batch = dict(
        length=torch.tensor([len(item["wave"]) for item in items]),
        fallbacks=[path for item in items for path in item["fallbacks"]],
    )
    for key in items[0].keys() - batch.keys():
        values = [item[key] for item in items]
        if key.endswith("wave"):
            batch[key] = pad_sequence(values, batch_first=True)  # (B, N) zero-padded
        elif torch.is_tensor(values[0]):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], float):
            batch[key] = torch.tensor(values, dtype=torch.float64)
        else:  # ints, bools and band tuples
            batch[key] = torch.tensor(values)
    return batch


@dataclass
class BatchPreprocessor:
    """Applies a collate_raw batch's draws on a device in the official order: mixup (waveforms
    before fbank, images after normalisation, labels), fbank, pad/cut, SpecAugment, normalisation,
    noise, label smoothing. No host sync on CUDA: pinned tensors move non_blocking, constants are
    cached per device, masks come from device lengths."""

    target_length: int = 1024  # fbank frames
    mean: float = AUDIOSET_MEAN  # fbank normalisation
    std: float = AUDIOSET_STD
    train: bool = False  # apply the draws (training) or only normalise (evaluation)
    freqm: int = 0  # SpecAugment: the largest mel band and time band
    timem: int = 0
    noise: bool = False
    label_smooth: float = 0.0

    @classmethod
    def from_dataset(cls, ds):  # each field from the AVDataset attribute of the same name
        return cls(**{field.name: getattr(ds, field.name) for field in fields(cls)})

    def __call__(self, batch, device="cpu"):
        def get(key):
            return batch[key].to(device, non_blocking=True)

        wave = get("wave")  # (B, N)
        length = get("length")  # (B,)
        y = get("label")  # (B, K)
        image = normalise_image(get("image"))  # (B, 3, S, S)
        label = smooth_labels(y, self.label_smooth)  # (B, K)
        if self.train and ("lam" in batch):  # mixup: the rows the worker mixed
            mixed = get("mixed")  # (B,) bool
            lam = get("lam")  # (B,) float64
            mixed_wave = mix(wave, get("partner_wave"), lam)  # (B, N)
            clip_mean = mixed_wave.sum(1, keepdim=True) / length[:, None]  # over the clip's samples
            centred = mixed_wave - clip_mean
            wave = torch.where(mixed[:, None], centred, wave)
            mixed_image = mix(image, normalise_image(get("partner_image")), lam)
            image = torch.where(mixed[:, None, None, None], mixed_image, image)
            mixed_label = smooth_labels(y, self.label_smooth, get("partner_label"), lam)
            label = torch.where(mixed[:, None], mixed_label, label)
        feats = fbank_features(wave, length, self.target_length)  # (B, T, 128)
        if self.train and (self.freqm or self.timem):
            feats = spec_augment(feats, get("bands"))
        feats = (feats - self.mean) / self.std
        if self.train and self.noise:
            feats = add_noise(feats, get("noise_seed"), get("noise_scale"), get("noise_shift"))
        return feats, image, label


def class_balance_weights(ds):
    """Per-sample weights for WeightedRandomSampler (official formula): a label weighs 1000 / (count
    + 0.01) over the dataset's rows, a sample the sum over its labels. float64 [len(ds)], aligned
    with ds (after skips)."""
    classes = ds.class_of_code[ds.rows.label_codes]  # (labels of all rows,)
    label_weight = 1000.0 / (np.bincount(classes, minlength=ds.num_classes) + 0.01)
    owner = np.repeat(np.arange(len(ds)), np.diff(ds.rows.label_offsets))  # row of each label
    return torch.from_numpy(np.bincount(owner, weights=label_weight[classes], minlength=len(ds)))


def dataset_stats(ds, max_items=None):
    """(mean, std) of the padded, unnormalised fbank over ds (or its first max_items rows), to
    normalise a new dataset as the paper normalises AudioSet (-5.081, 4.4849)."""
    total = 0.0
    total_sq = 0.0
    count = 0
    for i in range(min(len(ds), max_items or len(ds))):
        wave = load_audio(ds.rows[i]["wav"])
        centred = (wave - wave.mean())[None]  # (1, n)
        feats = fbank_features(centred, torch.tensor([len(wave)]), ds.target_length).double()
        total += feats.sum().item()
        total_sq += (feats**2).sum().item()
        count += feats.numel()
    mean = total / count
    variance = max(total_sq / count - mean**2, 0.0) * count / max(count - 1, 1)  # unbiased
    return mean, math.sqrt(variance)
