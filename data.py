"""CAV-MAE's input pipeline: files -> (fbank, image, label), as the official loader computes them
(docs/preprocessing.md says exactly what that is).

    audio          load_audio, and fbank: torchaudio's Kaldi fbank written in torch
    images         read_frame, load_image: torchvision's resize, crop and normalisation
    augmentation   mixup, SpecAugment, noise, label smoothing, on a whole batch, on its device
    the data       the datafile and label csv, AVDataset, collate, batches

A loader worker only decodes: a row's wav, one frame and its labels (and a mixup partner's) make a
raw item. AVDataset.preprocess finishes a batch of them on the training device, with torch's
random numbers, so a GPU computes the fbank and the augmentation of the whole batch at once:
    ds = AVDataset(datafile, label_csv, train=True, raw=True)
    for batch in DataLoader(ds, batch_size, collate_fn=collate, num_workers=8):
        audio, image, label = ds.preprocess(batch, device)  # (B, T, 128), (B, 3, S, S), (B, K)
Without raw=True, ds[i] is that on a batch of one: (fbank [T, 128], image [3, S, S], label [K]).
"""

import csv
import functools
import itertools
import json
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

SAMPLE_RATE = 16000
WIN = 400  # fbank window: 25 ms at 16 kHz
HOP = 160  # fbank frame shift: 10 ms
N_FFT = 512  # the window zero-padded to a power of two
NUM_MEL_BINS = 128
AUDIOSET_MEAN = -5.081  # the paper's fbank normalisation (AudioSet's statistics)
AUDIOSET_STD = 4.4849
IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet's, as the official transforms.Normalize
IMAGE_STD = (0.229, 0.224, 0.225)
MIXUP_BETA = 10.0  # mixup's lambda ~ Beta(10, 10)


class DataError(ValueError):
    """A file, row or label that cannot become a sample."""


# ----------------------------------------------------------------------------------------------------------
# Audio (docs/preprocessing.md, section 1)


def wav_header_frames(path):
    """The sample frames a RIFF/WAVE header promises, or None (another format, or a streamed wav's
    placeholder). libsndfile reads a truncated wav short without a word: this is how we notice."""
    with open(path, "rb") as f:
        if f.read(12)[8:] != b"WAVE":
            return None
        block_align = None
        while len(chunk := f.read(8)) == 8:
            size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                placeholder = size in (0, 0xFFFFFFFF)
                return None if (placeholder or (not block_align)) else size // block_align
            body = f.read(size + size % 2)  # chunks are padded to an even size
            if chunk[:4] == b"fmt ":
                block_align = int.from_bytes(body[12:14], "little")  # bytes per sample frame
    return None


def load_audio(path):
    """float32 [N] in [-1, 1) (int16 / 32768 for PCM), the first channel of a 16 kHz wav or flac."""
    if not os.path.isfile(path):
        raise DataError(f"audio file not found: {path}")
    try:
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            wave = torch.from_numpy(f.read(dtype="float32", always_2d=True)[:, 0].copy())
        promised = wav_header_frames(path)
    except Exception as error:  # soundfile raises several types for a corrupt file
        raise DataError(f"cannot read audio {path}: {error}") from None
    if rate != SAMPLE_RATE:
        raise DataError(f"{path} is sampled at {rate} Hz, not 16 kHz: run python prepare.py videos")
    if (promised is not None) and (len(wave) < promised):
        raise DataError(f"{path} is truncated: its header promises {promised} samples, it has {len(wave)}")
    if len(wave) < WIN:
        raise DataError(f"{path} has {len(wave)} samples, fewer than one 25 ms fbank window ({WIN})")
    if not torch.isfinite(wave).all():  # a float wav can hold NaN
        raise DataError(f"{path} contains NaN or infinite samples")
    return wave


@functools.cache
def fbank_constants(device, dtype):
    """(Hann window (WIN,), Kaldi's mel filters (128, N_FFT/2 + 1)) on `device`, built once, with
    torchaudio's float32 ops one for one (docs/preprocessing.md 1.4)."""

    def mel(hz):  # Kaldi's mel scale
        return 1127.0 * math.log(1.0 + hz / 700.0)

    mel_low = mel(20.0)  # the lowest filter starts at 20 Hz, the highest ends at Nyquist
    delta = (mel(SAMPLE_RATE / 2) - mel_low) / (NUM_MEL_BINS + 1)
    band = torch.arange(NUM_MEL_BINS).unsqueeze(1)  # (M, 1)
    left = mel_low + band * delta
    center = mel_low + (band + 1.0) * delta
    right = mel_low + (band + 2.0) * delta
    bin_hz = SAMPLE_RATE / N_FFT * torch.arange(N_FFT // 2)  # (N_FFT/2,)
    bin_mel = 1127.0 * (1.0 + bin_hz / 700.0).log()
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    weights = F.pad(torch.max(torch.zeros(1), torch.min(up, down)), (0, 1))  # + the Nyquist bin
    window = torch.hann_window(WIN, periodic=False)
    return window.to(device, dtype), weights.to(device, dtype)


def fbank(waveform):
    """Log-mel filterbank [N >= 400] -> [T, 128] (or [B, N] -> [B, T, 128]) of torchaudio's
    compliance.kaldi.fbank as CAV-MAE calls it (htk_compat, hanning window, no dither), with the
    same float32 ops in the same order. The waveform's scale is kept (CAV-MAE feeds [-1, 1))."""
    window, weights = fbank_constants(waveform.device, waveform.dtype)
    frames = waveform.unfold(-1, WIN, HOP)  # (..., T, WIN), T = 1 + (N - WIN) // HOP
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove DC, frame by frame
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # pre-emphasis inside the frame
    frames = (frames - 0.97 * previous) * window
    power = torch.fft.rfft(frames, n=N_FFT).abs().pow(2.0)  # (..., T, N_FFT/2 + 1)
    mel = torch.matmul(power, weights.T)  # (..., T, M)
    return mel.clamp_min(torch.finfo(mel.dtype).eps).log()


def fbank_features(wave, length, target_length):
    """Centred waveforms (B, N), zero-padded, and their lengths (B,) -> fbank (B, target_length, M),
    cut or padded with zero rows as the official loader does; a clip's frames past its own end are
    zero too, so a clip in a batch equals the clip alone."""
    wave = wave[:, : WIN + HOP * (target_length - 1)]  # the samples that reach a used frame
    # A CPU takes one clip at a time: its frames stay in cache (measured, 32 clips of 10 s: 0.76x
    # of torchaudio's time clip by clip, 2.3x over the whole batch). A GPU takes the batch at once.
    clips_at_once = 1 if wave.device.type == "cpu" else len(wave)
    feats = torch.cat([fbank(clips) for clips in wave.split(clips_at_once)])  # (B, T', M)
    own_frames = (length - WIN) // HOP + 1  # (B,)
    past_end = torch.arange(feats.shape[1], device=wave.device) >= own_frames[:, None]  # (B, T')
    feats = feats.masked_fill(past_end[..., None], 0.0)
    return F.pad(feats, (0, 0, 0, target_length - feats.shape[1]))


# ----------------------------------------------------------------------------------------------------------
# Images (docs/preprocessing.md, section 2)


def resize_crop(image, size, resample):
    """torchvision's Resize(size) then CenterCrop(size) of a Pillow image: the shorter side becomes
    size, the other int(size * long / short); the crop's offsets are rounded half to even."""
    width, height = image.size
    if width <= height:
        height = int(size * height / width)
        width = size
    else:
        width = int(size * width / height)
        height = size
    image = image.resize((width, height), resample)  # a copy when the size is already right
    left = int(round((width - size) / 2))
    top = int(round((height - size) / 2))
    return image.crop((left, top, left + size, top + size))


def read_frame(path, image_size=224):
    """uint8 [3, S, S]: RGB, the shorter side resized to S (Pillow bicubic), then a centre crop."""
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")  # project deviation: the official loader fails on greyscale
            pixels = np.array(resize_crop(img, image_size, Image.BICUBIC))  # (S, S, 3)
    except Exception as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


@functools.cache
def image_mean_std(device):  # built once per device: no copy, and so no wait for the GPU, per batch
    return [torch.tensor(c, device=device)[:, None, None] for c in (IMAGE_MEAN, IMAGE_STD)]


def normalise_image(image_u8):  # uint8 (..., 3, S, S) -> float32 / 255 -> ImageNet mean and std
    mean, std = image_mean_std(image_u8.device)
    return (image_u8.float().div(255) - mean) / std


def load_image(path, image_size=224):
    """[3, S, S] float32, equal to the official torchvision transform."""
    return normalise_image(read_frame(path, image_size))


# ----------------------------------------------------------------------------------------------------------
# Augmentation of a batch (docs/preprocessing.md, sections 1.6, 3 and 4), with torch's random numbers


def mix(first, second, lam):
    """Mixup: lam * first + (1 - lam) * second, per sample; lam (B,) in float32, as the official loader."""
    shape = (-1,) + (1,) * (first.dim() - 1)  # (B, 1, ...)
    return lam.float().view(shape) * first + (1 - lam).float().view(shape) * second


def spec_augment(feats, freqm, timem):
    """SpecAugment on (B, T, M) as torchaudio's FrequencyMasking(freqm), then TimeMasking(timem),
    draw it for each clip: width = floor(u F) in [0, F), start = floor(u' (L - u F)); whole mel
    bands, then whole frames, set to 0. A maximum width of 0 draws nothing."""
    B, T, M = feats.shape
    for max_width, length, dim in ((freqm, M, 2), (timem, T, 1)):
        if max_width == 0:
            continue
        value = torch.rand(B, device=feats.device) * max_width
        start = (torch.rand(B, device=feats.device) * (length - value)).long()[:, None]  # (B, 1)
        position = torch.arange(length, device=feats.device)  # (L,)
        inside = (position >= start) & (position < start + value.long()[:, None])  # (B, L)
        feats = feats.masked_fill(inside.unsqueeze(3 - dim), 0.0)  # (B, 1, M) or (B, T, 1)
    return feats


def add_noise(feats):
    """The official noise on normalised fbank (B, T, M): + U(0, 1) * s / 10 with s ~ U(0, 1) per
    clip, then a roll in time by a shift drawn from [-T, T)."""
    B, T, M = feats.shape
    scale = torch.rand(B, 1, 1, device=feats.device)
    noisy = feats + torch.rand_like(feats) * scale / 10
    shift = torch.randint(-T, T, (B, 1), device=feats.device)
    source = (torch.arange(T, device=feats.device) - shift) % T  # (B, T): out[t] = in[t - shift]
    return noisy.gather(1, source[..., None].expand(-1, -1, M))


def smooth_labels(y1, label_smooth, y2=None, lam=None):
    """0/1 targets (B, K) -> label_smooth / K on negatives, 1 - label_smooth on positives; with
    mixup each clip's positives get lam (1 - ls) and its partner's (1 - lam) (1 - ls) on top of
    ls / K (docs/preprocessing.md, section 4). Computed in float64, returned in float32."""
    base = label_smooth / y1.shape[1]
    if y2 is None:
        return torch.where(y1 > 0, 1.0 - label_smooth, base).float()
    lam = lam.double()[:, None]  # (B, 1)
    own = y1.double() * (lam * (1.0 - label_smooth))
    return (base + own + y2.double() * ((1 - lam) * (1.0 - label_smooth))).float()


# ----------------------------------------------------------------------------------------------------------
# The datafile, the label csv and the dataset


def require_file(path, what):
    if not os.path.isfile(path):
        command = "python prepare.py synthetic" if "synthetic" in path else "python prepare.py videos"
        raise DataError(f"{what} not found: {path} (`{command}` writes one)")


def load_label_csv(path):
    """The official `index,mid,display_name` csv -> (mids, names), in class order."""
    require_file(path, "label csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    try:
        rows = sorted((int(r["index"]), r["mid"].strip(), r.get("display_name", "")) for r in rows)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(f"{path}: want the columns index,mid,display_name with integer indices") from None
    if [index for index, _, _ in rows] != list(range(len(rows))):
        raise DataError(f"{path}: the class indices must be 0..{len(rows) - 1}, each once")
    return [mid for _, mid, _ in rows], [name for _, _, name in rows]


def frame_path(row, k):
    return os.path.join(row["video_path"], f"frame_{k}", row["video_id"] + ".jpg")


@dataclass(eq=False)  # eq=False: a dataset is equal only to itself, and hashable
class AVDataset(torch.utils.data.Dataset):
    """The rows of an official datafile (json {"data": [{video_id, wav, video_path, labels}]}, frames
    at video_path/frame_{k}/{video_id}.jpg, relative paths from the datafile's folder). ds[i] ->
    (fbank [T, 128], image [3, S, S], label [K]); with raw=True, ds[i] or ds[(i, seed)] -> the raw
    item for collate. label_csv None: the classes are the datafile's own labels."""

    datafile: str
    label_csv: str | None
    train: bool = False  # draw a frame, mixup and augmentation; else the evaluation `frame`
    target_length: int = 1024
    num_frames: int = 10
    frame: int | None = None  # the evaluation frame, None: the middle one
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD
    freqm: int = 0
    timem: int = 0
    mixup: float = 0.0
    noise: bool = False
    label_smooth: float = 0.0
    image_size: int = 224
    raw: bool = False

    def __post_init__(self):
        """The classes, and the rows as a few numpy arrays, which forked loader workers share (2M
        rows as dicts take ~1.5 GB, copied into every worker): fixed-width bytes for the strings,
        and each row's classes at label_offsets[i]:label_offsets[i + 1] of label_classes."""
        self.mids, self.names = load_label_csv(self.label_csv) if self.label_csv else ([], [])
        require_file(self.datafile, "datafile")
        try:
            with open(self.datafile, encoding="utf-8") as f:
                records = json.load(f)["data"]
            self.video_ids = np.array([str(r["video_id"]).encode() for r in records])
            self.wavs = np.array([str(r["wav"]).encode() for r in records])
            self.video_paths = np.array([str(r["video_path"]).encode() for r in records])
        except (OSError, ValueError, KeyError, TypeError) as error:
            want = "json {'data': [rows with video_id, wav, video_path, labels]}"
            raise DataError(f"cannot read datafile {self.datafile} ({error!r}); want {want}") from None
        index = {mid: k for k, mid in enumerate(self.mids)}
        classes = []
        counts = []
        for i, record in enumerate(records):
            mids = [mid.strip() for mid in record.get("labels", "").split(",") if mid.strip()]  # "/m/a,/m/b"
            for mid in mids:
                if self.label_csv is None:  # the datafile's labels, in first-seen order
                    index.setdefault(mid, len(index))
                if mid not in index:
                    where = f"{self.datafile} row {i} (video_id {record['video_id']})"
                    raise DataError(f"{where}: label {mid!r} is not in {self.label_csv}")
            classes += [index[mid] for mid in mids]
            counts.append(len(mids))
        if self.label_csv is None:
            self.mids = list(index)
            self.names = list(index)
        self.num_classes = len(self.mids)
        self.folder = os.path.dirname(os.path.abspath(self.datafile))
        self.label_classes = np.array(classes, dtype=np.int32)
        self.label_offsets = np.cumsum([0, *counts])

    def __len__(self):
        return len(self.video_ids)

    def row(self, i):
        """Row i: video_id, wav and video_path (resolved), its class indices."""
        start, end = self.label_offsets[i : i + 2]
        return dict(
            video_id=self.video_ids[i].decode(),
            wav=os.path.join(self.folder, self.wavs[i].decode()),
            video_path=os.path.join(self.folder, self.video_paths[i].decode()),
            classes=self.label_classes[start:end].tolist(),
        )

    def decode(self, i, rng):
        """Row i -> (centred waveform [N], uint8 frame [3, S, S], 0/1 label [K]). The frame: in
        training one drawn with rng, else ds.frame or the middle one; a missing frame falls back to
        the nearest earlier one, as the official loader does."""
        row = self.row(i)
        frame = self.frame if self.frame is not None else self.num_frames // 2
        if self.train:
            frame = rng.randint(0, self.num_frames - 1)
        while (frame > 0) and (not os.path.isfile(frame_path(row, frame))):
            frame -= 1
        try:
            wave = load_audio(row["wav"])
            image = read_frame(frame_path(row, frame), self.image_size)
        except DataError as error:
            raise DataError(f"{self.datafile} row {i} (video_id {row['video_id']}): {error}") from None
        label = torch.zeros(self.num_classes)
        label[row["classes"]] = 1.0
        return wave - wave.mean(), image, label

    def __getitem__(self, key):
        """ds[i], or ds[(i, seed)]: the item's random choices (frame; mixup, its partner and lambda)
        from random.Random(seed), so that an item is the same whatever the loader workers."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        rng = random if seed is None else random.Random(seed)
        mixup = self.train and (self.mixup > 0)
        mixed = mixup and (rng.random() < self.mixup)
        partner_index = rng.randrange(len(self)) if mixed else None  # any clip, as the official
        lam = rng.betavariate(MIXUP_BETA, MIXUP_BETA) if mixed else 1.0
        wave, image, label = self.decode(int(i), rng)
        item = dict(wave=wave, image=image, label=label)
        if mixup:  # every item of a mixup run has a partner: itself, unused, when lam = 1
            partner = self.decode(partner_index, rng) if mixed else (wave, image, label)
            partner_wave, partner_image, partner_label = partner
            partner_wave = F.pad(partner_wave, (0, max(0, len(wave) - len(partner_wave))))[: len(wave)]
            item.update(partner_wave=partner_wave, partner_image=partner_image, partner_label=partner_label)
            item["lam"] = torch.tensor(lam, dtype=torch.float64)
        if self.raw:
            return item
        audio, image, label = self.preprocess(collate([item]), "cpu")
        return audio[0], image[0], label[0]

    def preprocess(self, batch, device):
        """A collated batch -> (fbank (B, T, 128), image (B, 3, S, S), label (B, K)) on `device`, in
        the official order: mixup (waveforms, centred again; images after normalisation; labels),
        fbank cut or padded to target_length, SpecAugment, normalisation, noise. No host sync."""
        wave = batch["wave"].to(device, non_blocking=True)  # (B, N)
        length = batch["length"].to(device, non_blocking=True)  # (B,)
        y = batch["label"].to(device, non_blocking=True)  # (B, K)
        image = normalise_image(batch["image"].to(device, non_blocking=True))
        label = smooth_labels(y, self.label_smooth)
        if "lam" in batch:  # mixup: the clips with lam < 1 are mixed with their partner
            lam = batch["lam"].to(device, non_blocking=True)  # (B,)
            mixed = (lam < 1)[:, None]  # (B, 1)
            mixed_wave = mix(wave, batch["partner_wave"].to(device, non_blocking=True), lam)
            mixed_wave = mixed_wave - mixed_wave.sum(1, keepdim=True) / length[:, None]  # over the clip
            wave = torch.where(mixed, mixed_wave, wave)
            partner_image = normalise_image(batch["partner_image"].to(device, non_blocking=True))
            image = torch.where(mixed[..., None, None], mix(image, partner_image, lam), image)
            partner_label = batch["partner_label"].to(device, non_blocking=True)
            label = torch.where(mixed, smooth_labels(y, self.label_smooth, partner_label, lam), label)
        feats = fbank_features(wave, length, self.target_length)  # (B, T, 128)
        if self.train:
            feats = spec_augment(feats, self.freqm, self.timem)
        feats = (feats - self.mean) / self.std
        if self.train and self.noise:
            feats = add_noise(feats)
        return feats, image, label


def collate(items):
    """Raw items -> a batch: waveforms zero-padded to the longest (B, N), their lengths (B,), the rest
    stacked."""
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0] if "wave" not in key}
    for key in ("wave", "partner_wave"):
        if key in items[0]:
            batch[key] = pad_sequence([item[key] for item in items], batch_first=True)
    batch["length"] = torch.tensor([len(item["wave"]) for item in items])
    return batch


def batches(ds, batch_size, device, num_workers=0, indices=None):
    """The finished (audio, image, label) batches of a raw=True dataset (or of its rows `indices`),
    in order, on `device`."""
    pin = torch.device(device).type == "cuda"
    loader = torch.utils.data.DataLoader(
        ds, batch_size, sampler=indices, num_workers=num_workers, collate_fn=collate, pin_memory=pin
    )
    for batch in loader:
        yield ds.preprocess(batch, device)


def clip_order(num_clips, batch_size, per_epoch, rank, world, seed, weights, start):
    """The run's micro-batches from micro-batch `start` on, each a list of (clip index, item seed).
    Epoch e's order comes from a generator seeded with (seed, e) (balanced sampling: drawn with the
    official per-clip weights) and each process takes every world-th batch of it: a resumed run
    sees what a run that never stopped would, whatever the loader workers."""
    for epoch in itertools.count(start // per_epoch):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        if weights is None:
            order = torch.randperm(num_clips, generator=g)
        else:
            order = torch.multinomial(weights, num_clips, replacement=True, generator=g)
        item_seeds = torch.randint(2**62, (num_clips,), generator=g)
        for b in range(per_epoch):
            first = (b * world + rank) * batch_size
            batch = slice(first, first + batch_size)
            if epoch * per_epoch + b >= start:
                yield list(zip(order[batch].tolist(), item_seeds[batch].tolist()))


def class_balance_weights(ds):
    """The official balanced sampling: a label weighs 1000 / (its count + 0.01), a clip the sum of
    its labels' weights. float64 (len(ds),)."""
    label_weight = 1000.0 / (np.bincount(ds.label_classes, minlength=ds.num_classes) + 0.01)
    owner = np.repeat(np.arange(len(ds)), np.diff(ds.label_offsets))  # the row of each label
    weights = np.bincount(owner, weights=label_weight[ds.label_classes], minlength=len(ds))
    return torch.from_numpy(weights)


def dataset_stats(ds):
    """(mean, std) of the padded, unnormalised fbank over ds: how a new dataset is normalised, as
    the paper normalises AudioSet's (-5.081, 4.4849)."""
    total = 0.0
    total_sq = 0.0
    for i in range(len(ds)):
        wave = load_audio(ds.row(i)["wav"])
        length = torch.tensor([len(wave)])
        feats = fbank_features((wave - wave.mean())[None], length, ds.target_length).double()
        total += feats.sum().item()
        total_sq += (feats**2).sum().item()
    count = len(ds) * ds.target_length * NUM_MEL_BINS
    return total / count, math.sqrt(total_sq / count - (total / count) ** 2)
