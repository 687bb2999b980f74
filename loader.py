"""How train.py feeds a model: the order of the clips, the randomness of each item, and loader
workers that live for the whole run.

    RunBatches    micro-batches of (epoch, position, index) keys, epoch after epoch,
                  resumable from (epoch, start)
    SeededItems   seeds every item's random draws from its key: the same augmentation for any worker
                  count, world size or resume, on the worker's CPU or on the device
    EvalKeys      this rank's share of the validation set, with the frame to show;
                  gather_in_order joins the shares
    build_data    the datasets and loaders of a run (workers read and decode; fbank and augmentation
                  on the device, or on the workers with gpu_preprocess=off)

One DataLoader iterator serves the whole run and its workers persist: no stall at an epoch start
(measured on an H100 with 12 workers: 4-5 s per epoch when workers restarted every epoch).
"""

import itertools
import random
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

import data
from configurator import ConfigError

PREFETCH_BATCHES = 4  # per loader worker: batches decoded ahead of the step that needs them


class RunBatches(torch.utils.data.Sampler):
    """Micro-batches of (epoch, position, index) keys for this rank, epoch after epoch from
    (epoch, start). Each epoch is a permutation (or a class-balanced draw with replacement) seeded
    by (seed, epoch), split across ranks like DistributedSampler and cut to whole optimizer steps.
    One DataLoader iterator serves the whole run, so the workers never stop at an epoch end;
    (epoch, start) is all a resumed run needs to continue the same order."""

    def __init__(
        self, n, batch_size, batches_per_epoch, seed, rank=0, world=1, weights=None, epoch=0, start=0
    ):
        self.n = n
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.rank = rank
        self.world = world
        self.weights = weights  # class-balanced sampling weights, or None: a permutation
        self.epoch = epoch  # where the run continues: this epoch,
        self.start = start  # after this many of its clips on each rank

    def order(self, epoch):  # -> (n,) dataset indices
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)  # a prime: (seed, epoch) apart
        if self.weights is None:
            return torch.randperm(self.n, generator=g).numpy()
        return torch.multinomial(self.weights, self.n, replacement=True, generator=g).numpy()

    def __iter__(self):
        B = self.batch_size
        for epoch in itertools.count(self.epoch):
            order = self.order(epoch)
            first = self.start // B if epoch == self.epoch else 0  # a resumed epoch's first batch
            for b in range(first, self.batches_per_epoch):
                positions = np.arange(b * B, (b + 1) * B) * self.world + self.rank  # (B,)
                yield [(epoch, int(p), int(i)) for p, i in zip(positions, order[positions])]


class SeededItems(torch.utils.data.Dataset):
    """ds[index] with Python, NumPy and the torch CPU RNGs seeded from (seed, epoch, position), and
    each restored afterwards. The workers draw every random choice of an item (frame, mixup partner
    and lambda, SpecAugment bands, noise), so an item is the same for any num_workers, world size or
    resume, and wherever it is finished."""

    def __init__(self, ds, seed):
        self.ds = ds
        self.seed = seed

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, position, index = key
        # one seed per (seed, epoch, position): mixed with a prime, kept within the generators' range
        s = ((self.seed * 1_000_003 + epoch) * 1_000_003 + position) % 2**62
        python_state = random.getstate()
        numpy_state = np.random.get_state()
        torch_state = torch.get_rng_state()
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.default_generator.manual_seed(s)  # the CPU generator only
        try:
            return self.ds[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            torch.set_rng_state(torch_state)


class EvalKeys(torch.utils.data.Sampler):
    """(index, frame) keys of this rank's share of the validation set: clips rank, rank + world, ...
    Set `frame` before iterating (None: the middle frame); the keys carry it to workers that live
    across evaluations."""

    def __init__(self, n, rank=0, world=1):
        self.n = n
        self.rank = rank
        self.world = world
        self.frame = None

    def __len__(self):
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):
        return ((i, self.frame) for i in range(self.rank, self.n, self.world))


def gather_in_order(tensors, rank=0, world=1):
    """This rank's rows (clips rank, rank + world, ...) -> every clip's rows in dataset order,
    on every rank."""
    if world == 1:
        return tensors
    parts = [None] * world
    dist.all_gather_object(parts, [t.cpu() for t in tensors])
    full = []
    for i, t in enumerate(tensors):
        out = torch.empty((sum(len(p[i]) for p in parts), *t.shape[1:]), dtype=t.dtype)
        for r in range(world):
            out[r::world] = parts[r][i]
        full.append(out)
    return full


class FinishOnWorker:
    """collate_fn for gpu_preprocess=off: the worker also computes fbank and applies the item's
    augmentation draws on its CPU, with the same BatchPreprocessor the device would use."""

    def __init__(self, prep):
        self.prep = prep

    def __call__(self, items):
        batch = data.collate_raw(items)
        audio, image, label = self.prep(batch, "cpu")
        return dict(audio=audio, image=image, label=label, fallbacks=batch["fallbacks"])


def exit_quietly(signum, frame):
    sys.exit(0)


def worker_signals(worker_id):
    """A loader worker leaves stopping to the main process, which saves and then ends the workers.
    Ctrl-C, which reaches every process of the terminal, is ignored. SIGTERM ends the worker with
    status 0: it is how the DataLoader and multiprocessing end workers when the process exits (a
    worker that ignored it kept the process from ever exiting after an error), and a worker that
    exits 0 when a scheduler sends SIGTERM to every process does not interrupt the main process
    (DataLoader raises for a worker killed by a signal): it saves the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, exit_quietly)


def make_loader(ds, cfg, device, prep, on_device, **kw):
    workers = cfg["num_workers"]
    return torch.utils.data.DataLoader(
        ds,
        num_workers=workers,
        collate_fn=data.collate_raw if on_device else FinishOnWorker(prep),
        # pinned: copies overlap compute
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_BATCHES if workers else None,
        worker_init_fn=worker_signals,
        # own generator: an iterator's seed draw leaves the global RNG alone
        generator=torch.Generator(),
        **kw,
    )


def preprocesses_on_device(cfg, device):
    """Whether the training device finishes each batch (gpu_preprocess=on, or auto on CUDA)."""
    if cfg["gpu_preprocess"] == "auto":
        return device.type == "cuda"
    return cfg["gpu_preprocess"] == "on"


def build_data(cfg, mcfg, device, rank, world, epoch, start):
    """Datasets (workers read, decode and draw), the train batches from (epoch, start) on,
    the validation loader.
    With device-side preprocessing the training device finishes each batch; otherwise the
    workers do."""
    on_device = preprocesses_on_device(cfg, device)
    common = dict(
        label_csv=cfg["label_csv"],
        target_length=mcfg.audio_length,
        num_frames=cfg["num_frames"],
        mean=cfg["dataset_mean"],
        std=cfg["dataset_std"],
        image_size=mcfg.img_size,
        on_error=cfg["on_error"],
        raw=True,
    )
    train_ds = data.AVDataset(
        cfg["data_train"],
        train=True,
        freqm=cfg["freqm"],
        timem=cfg["timem"],
        mixup=cfg["mixup"],
        noise=cfg["noise"],
        label_smooth=cfg["label_smooth"],
        **common,
    )
    val_ds = data.AVDataset(cfg["data_val"], train=False, **common)
    per_step = cfg["batch_size"] * cfg["grad_accum"]
    if len(train_ds) // world < per_step:
        raise ConfigError(
            f"{cfg['data_train']}: {len(train_ds)} clips over {world} process(es) do not fill "
            f"one step of batch_size={cfg['batch_size']} x grad_accum={cfg['grad_accum']}"
        )
    if len(val_ds) < world:
        raise ConfigError(
            f"{cfg['data_val']}: {len(val_ds)} clips cannot give each of {world} processes a share"
        )
    iters_per_epoch = len(train_ds) // world // per_step
    weights = data.class_balance_weights(train_ds) if cfg["balanced_sampling"] else None
    batches = RunBatches(
        len(train_ds),
        batch_size=cfg["batch_size"],
        batches_per_epoch=iters_per_epoch * cfg["grad_accum"],
        seed=cfg["seed"],
        rank=rank,
        world=world,
        weights=weights,
        epoch=epoch,
        start=start,
    )
    prep = data.BatchPreprocessor.from_dataset(train_ds)
    val_prep = data.BatchPreprocessor.from_dataset(val_ds)
    train_loader = make_loader(
        SeededItems(train_ds, cfg["seed"]), cfg, device, prep, on_device, batch_sampler=batches
    )
    val_keys = EvalKeys(len(val_ds), rank, world)
    val_loader = make_loader(
        val_ds, cfg, device, val_prep, on_device, sampler=val_keys, batch_size=cfg["batch_size"]
    )
    return dict(
        train_ds=train_ds,
        val_ds=val_ds,
        train_loader=train_loader,
        val_loader=val_loader,
        val_keys=val_keys,
        prep=prep if on_device else None,
        val_prep=val_prep if on_device else None,
        iters_per_epoch=iters_per_epoch,
    )


def to_device(batch, prep, device):
    """A loader batch -> (fbank (B, T, 128), image (B, 3, S, S), label (B, K)) on the device,
    without a host sync."""
    if prep is not None:  # raw batch: fbank, augmentation, normalisation on the device
        return prep(batch, device)
    return tuple(batch[k].to(device, non_blocking=True) for k in ("audio", "image", "label"))
