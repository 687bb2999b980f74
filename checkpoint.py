"""What a training run saves and how it continues: train.py's checkpoints.

out_dir/ckpt.pt, written atomically (a temporary file, then a rename) by rank 0, is one dict:
    model          the weights the run reports: the training weights, or after the final evaluation the weight
                   average (wa=True) or the best validation weights (fine-tuning)
    model_last     the training weights when they differ from `model` (else None): what a resumed run continues
    model_args     the CAVMAEConfig fields; task, num_classes, config (the settings of the run)
    optimizer, scaler, scheduler, iter_num, epoch
    rng            every rank's RNG states (torch, CUDA, NumPy, Python) after the saved step; [] in a checkpoint
                   written by rank 0 alone after an error under torchrun (the streams then restart from the seed)
    sampler        (epoch, start): where the data order continues (loader.RunBatches)
    best_metric, best_iter, wa (the running sum of weight averaging: {count, sum} or None)
out_dir/best.pt holds the best validation weights by the main metric (model, model_args, task, num_classes,
config, iter_num, metric). model.load_pretrained and eval.py read both files.
"""

import dataclasses
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from configurator import ConfigError


class WeightAverage:
    """Official fine-tuning WA: the element-wise mean of the weights at the ends of epochs start..end (1-based),
    kept as a running sum on the CPU; stored in checkpoints as {'count', 'sum'}."""

    def __init__(self, start, end, state=None):
        self.start, self.end = start, end
        self.count, self.sum = (state["count"], state["sum"]) if state else (0, None)

    def update(self, model, epochs_done):
        if self.start <= epochs_done <= self.end:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.sum = weights if self.sum is None else {k: self.sum[k] + weights[k] for k in weights}
            self.count += 1

    def averaged(self, current):
        return {k: s / self.count if s.is_floating_point() else current[k] for k, s in self.sum.items()}

    def state_dict(self):
        return dict(count=self.count, sum=self.sum) if self.count else None


def load_start(cfg, ckpt_path):
    """-> (our checkpoint to resume, or None; weights to initialise from, or None). A new run refuses an out_dir
    that holds a checkpoint unless overwrite=True: nothing is replaced by accident."""
    if cfg["init_from"] == "resume":
        if not os.path.isfile(ckpt_path):
            raise ConfigError(f"init_from=resume but {ckpt_path} does not exist")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["task"] != cfg["task"]:
            raise ConfigError(f"{ckpt_path} is a {ckpt['task']} checkpoint but task={cfg['task']}")
        return ckpt, None
    if os.path.exists(ckpt_path) and not cfg["overwrite"]:
        raise ConfigError(
            f"{ckpt_path} exists: continue that run with --init_from=resume, or start a new one with "
            f"--overwrite=True (which replaces it) or another --out_dir"
        )
    if cfg["init_from"] == "scratch":
        return None, None
    if not os.path.isfile(cfg["init_from"]):
        raise ConfigError(f"init_from={cfg['init_from']}: no such file")
    return None, torch.load(cfg["init_from"], map_location="cpu", weights_only=False)


def rng_state(device):
    return dict(
        torch=torch.get_rng_state(),
        numpy=np.random.get_state(),
        python=random.getstate(),
        cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    )


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"]), np.random.set_state(state["numpy"]), random.setstate(state["python"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_save(obj, path):
    """torch.save to path.tmp, then rename: a crash leaves either the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def weights_entry(run):
    """What ckpt.pt and best.pt share, and all that model.load_pretrained and eval.py need: the weights, the
    architecture, the task, the classes and the settings of the run."""
    return dict(
        model=run.model.state_dict(),
        model_args=dataclasses.asdict(run.mcfg),
        task=run.cfg["task"],
        num_classes=run.num_classes,
        config=run.cfg,
    )


def save_checkpoint(run, rngs=None, model_last=None):
    """Rank 0 writes out_dir/ckpt.pt atomically. Every rank calls it (their RNG states are gathered) unless `rngs`
    is given. `model` holds what the run reports (after the final evaluation: the weight average or the best
    weights), `model_last` the training state that a resumed run continues (None: the same as `model`)."""
    if rngs is None:
        rngs = [rng_state(run.device)]
        if run.world > 1:
            rngs = [None] * run.world
            dist.all_gather_object(rngs, rng_state(run.device))
    if not run.master:
        run.last_save, run.saved_iter = time.time(), run.iter_num
        return
    cfg, (epoch, done) = run.cfg, divmod(run.iter_num, run.iters_per_epoch)
    atomic_save(
        dict(
            weights_entry(run),
            model_last=model_last,
            optimizer=run.optimizer.state_dict(),
            scaler=run.scaler.state_dict(),
            scheduler=dict(kind=cfg["lr_schedule"], epoch=epoch),
            iter_num=run.iter_num,
            epoch=epoch,
            rng=rngs,
            best_metric=run.best_metric,
            best_iter=run.best_iter,
            wa=run.wa and run.wa.state_dict(),
            sampler=dict(epoch=epoch, start=done * cfg["batch_size"] * cfg["grad_accum"]),
        ),
        run.path("ckpt.pt"),
    )
    run.last_save, run.saved_iter = time.time(), run.iter_num  # only once the file is there


def restore_rngs(cfg, rank, device, ckpt):
    """Per-rank RNG streams (masking, structured masks): from the checkpoint when resuming; an error's checkpoint
    under torchrun has none, and the streams start again from (seed, rank, iteration)."""
    states = ckpt and ckpt["rng"]
    if states:
        set_rng_state(states[rank] if len(states) > rank else states[0], device)
    else:
        s = cfg["seed"] + rank + (ckpt["iter_num"] * 7919 if ckpt else 0)
        torch.manual_seed(s), np.random.seed(s), random.seed(s)
