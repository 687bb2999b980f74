"""What a training run saves and how it continues: train.py's checkpoints.

out_dir/ckpt.pt, written atomically (a temporary file, then a rename) by rank 0, is one dict:
    model        the weights the run reports: the training weights, or after the final evaluation
                 the weight average (wa=True) or the best validation weights (fine-tuning)
    model_last   the training weights when they differ from `model` (else None): what a resume
                 continues
    model_args   the CAVMAEConfig fields; task, num_classes, config (the settings of the run)
    optimizer, scaler, scheduler, iter_num, epoch
    world_size   the processes that trained it (another count would change the clip order)
    rng          every rank's RNG states (torch, CUDA, NumPy, Python) after the saved step; [] in a
                 checkpoint written by rank 0 alone after an error under torchrun (the streams then
                 restart from the seed)
    sampler      (epoch, start): where the data order continues (loader.RunBatches)
    best_metric, best_iter, wa (the running sum of weight averaging: {count, sum} or None)
out_dir/best.pt holds the best validation weights by the main metric (model, model_args, task,
num_classes, config, iter_num, metric). model.load_pretrained and eval.py read both files.

A resume continues the run exactly or not at all: refuse_changed_settings names the settings that
would change its clip order or schedule.

The file's sections, in order:
    saving and resuming   WeightAverage, load_start, refuse_changed_settings, save_checkpoint
    fault tolerance       Safeguard: signals, the NaN check, the ranks' agreement on stopping and
                          saving, and a checkpoint after an error
    random streams        restore_rngs: a resumed run's RNG states
    reading checkpoints   read_checkpoint and load_pretrained: ours, the official release's and the
                          ImageNet MAE ViT-B initialisation (train.py, eval.py and model.py use them)
"""

import codecs
import dataclasses
import math
import os
import random
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from configurator import ConfigError
from model import CAVMAEConfig


class WeightAverage:
    """Official fine-tuning WA: the element-wise mean of the weights at the ends of epochs
    start..end (1-based), kept as a running sum on the CPU; stored in checkpoints as {'count',
    'sum'}."""

    def __init__(self, start, end, state=None):
        self.start = start
        self.end = end
        self.count = 0  # the epochs summed so far
        self.sum = None  # {key: the sum of the weights} on the CPU
        if state:
            self.count = state["count"]
            self.sum = state["sum"]

    def update(self, model, epochs_done):
        if self.start <= epochs_done <= self.end:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.sum = weights if self.sum is None else {k: self.sum[k] + weights[k] for k in weights}
            self.count += 1

    def averaged(self, current):
        return {k: s / self.count if s.is_floating_point() else current[k] for k, s in self.sum.items()}

    def state_dict(self):
        return dict(count=self.count, sum=self.sum) if self.count else None


# what a resume needs of ckpt.pt
TRAINING_STATE = ("model", "optimizer", "iter_num", "task", "sampler", "config")


def load_start(cfg, ckpt_path):
    """-> (our checkpoint to resume, or None; weights to initialise from, or None). A new run
    refuses an out_dir that holds a checkpoint unless overwrite=True: nothing is replaced by
    accident."""
    if cfg["init_from"] == "resume":
        if not os.path.isfile(ckpt_path):
            raise ConfigError(f"init_from=resume but {ckpt_path} does not exist")
        ckpt = read_checkpoint(ckpt_path)
        missing = [k for k in TRAINING_STATE if k not in ckpt]  # read_checkpoint returns a dict
        if missing:
            raise ConfigError(
                f"{ckpt_path} holds no training state to resume (no {', '.join(missing)}): start a "
                f"new run from its weights with --init_from={ckpt_path} and another --out_dir"
            )
        if ckpt["task"] != cfg["task"]:
            raise ConfigError(f"{ckpt_path} is a {ckpt['task']} checkpoint but task={cfg['task']}")
        return ckpt, None
    if os.path.exists(ckpt_path) and (not cfg["overwrite"]):
        raise ConfigError(
            f"{ckpt_path} exists: continue that run with --init_from=resume, or start a new one with "
            f"--overwrite=True (which replaces it) or another --out_dir"
        )
    if cfg["init_from"] == "scratch":
        return None, None
    if not os.path.isfile(cfg["init_from"]):
        raise ConfigError(f"init_from={cfg['init_from']}: no such file")
    return None, read_checkpoint(cfg["init_from"])


# Settings that decide the clip order or the lr schedule of the steps left: a resume with other
# values would not continue the run it says it continues. The run's length changes only the cosine
# schedule (the step schedule depends on the epoch alone, so a step-schedule run may be extended
# exactly).
ORDER_AND_SCHEDULE = (
    "data_train",
    "label_csv",
    "num_frames",
    "balanced_sampling",
    "batch_size",
    "grad_accum",
    "seed",
    "lr_schedule",
    "lrscheduler_start",
    "lrscheduler_step",
    "lrscheduler_decay",
    "warmup_iters",
    "min_lr_ratio",
)
COSINE_LENGTH = ("epochs", "max_iters")


def changed_settings(ckpt, cfg, world):
    """{setting: (old, new)} of the settings in ORDER_AND_SCHEDULE (and the world size) that a
    resume changes."""
    old = dict(ckpt["config"], world_size=ckpt.get("world_size", world))
    new = dict(cfg, world_size=world)
    keys = [*ORDER_AND_SCHEDULE, "world_size"]
    if new["lr_schedule"] == "cosine":
        keys += COSINE_LENGTH
    return {k: (old[k], new[k]) for k in keys if (k in old) and (old[k] != new[k])}


def refuse_changed_settings(ckpt, cfg, world, ckpt_path):
    """A resume with steps left to train must keep the clip order and the schedule
    (changed_settings)."""
    changed = changed_settings(ckpt, cfg, world)
    if not changed:
        return
    lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
    raise ConfigError(
        f"init_from=resume would not continue the run in {ckpt_path}: these settings change its "
        f"clip order or schedule (old -> new):\n{lines}\nresume with the old values, or start a new "
        f"run from its weights with --init_from={ckpt_path} and another --out_dir"
    )


def rng_state(device):
    return dict(
        torch=torch.get_rng_state(),
        numpy=np.random.get_state(),
        python=random.getstate(),
        cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    )


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if (device.type == "cuda") and (state["cuda"] is not None):
        torch.cuda.set_rng_state(state["cuda"], device)


class WriteError(OSError):
    """A file of the run could not be written (a full disk, a read-only or missing folder)."""


def atomic_save(obj, path):
    """torch.save to path.tmp, then rename: a crash or a full disk leaves the old file, never half
    of a new one. Written through a Python file, so that a full disk is reported as such (torch's
    own writer says only `unexpected pos`)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except OSError as e:
        kept = f"; the previous {os.path.basename(path)} is intact" if os.path.exists(path) else ""
        raise WriteError(
            f"cannot write {path}: {e.strerror or e}{kept}. Free space there or choose another --out_dir"
        ) from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def weights_entry(run):
    """What ckpt.pt and best.pt share, and all that model.load_pretrained and eval.py need: the
    weights, the architecture, the task, the classes and the settings of the run."""
    return dict(
        model=run.model.state_dict(),
        model_args=dataclasses.asdict(run.mcfg),
        task=run.cfg["task"],
        num_classes=run.num_classes,
        config=run.cfg,
    )


def every_rank_rng_state(run):
    """[rank 0's RNG states, rank 1's, ...] on every rank (a collective under torchrun)."""
    if run.world == 1:
        return [rng_state(run.device)]
    states = [None] * run.world
    dist.all_gather_object(states, rng_state(run.device))
    return states


def save_checkpoint(run, rngs=None, model_last=None):
    """Rank 0 writes out_dir/ckpt.pt atomically. Every rank calls it (their RNG states are gathered)
    unless `rngs` is given. `model` holds what the run reports (after the final evaluation: the
    weight average or the best weights), `model_last` the training state that a resumed run
    continues (None: the same as `model`)."""
    if rngs is None:
        rngs = every_rank_rng_state(run)
    if run.master:
        atomic_save(checkpoint_contents(run, rngs, model_last), run.path("ckpt.pt"))
    run.last_save = time.time()  # only once the file is there
    run.saved_iter = run.iter_num


def checkpoint_contents(run, rngs, model_last):
    """The ckpt.pt dict (the module docstring lists its entries)."""
    cfg = run.cfg
    epoch, done = divmod(run.iter_num, run.iters_per_epoch)
    return dict(
        weights_entry(run),
        model_last=model_last,
        optimizer=run.optimizer.state_dict(),
        scaler=run.scaler.state_dict(),
        scheduler=dict(kind=cfg["lr_schedule"], epoch=epoch),
        iter_num=run.iter_num,
        epoch=epoch,
        world_size=run.world,
        rng=rngs,
        best_metric=run.best_metric,
        best_iter=run.best_iter,
        wa=run.wa and run.wa.state_dict(),
        sampler=dict(epoch=epoch, start=done * cfg["batch_size"] * cfg["grad_accum"]),
    )


# ----------------------------------------------------------------------------------------------------------
# Fault tolerance of the training loop: signals, the NaN check, the ranks' agreement, a checkpoint
# after an error


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


class Safeguard:
    """train.py's loop runs inside `with Safeguard(run, resume_cmd) as guard:`.

    - SIGINT / SIGTERM set `received`; at the next sync (`agree`) the ranks agree to stop, the loop
      saves after the step and ends, and `stopped` holds the signal (the process then exits with
      status 128 + signal).
    - Each step's loss is counted on the device when it is not finite (`step_done`: no host sync per
      step); `agree` raises NonFiniteLoss, and the last good checkpoint stays.
    - Any other exception saves the state after the last completed step and prints the command that
      resumes it. One that follows a signal (loader workers ended by the same SIGTERM) ends the run
      as the signal does."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, run, resume_cmd=""):
        self.run = run
        self.resume_cmd = resume_cmd
        self.received = 0  # the signal this process got, 0: none
        self.stopped = 0  # the signal the ranks agreed to stop on, 0: none
        self.nonfinite = torch.zeros((), device=run.device)  # steps with a NaN/inf loss
        self.step_rng = None  # RNG states after the last step (one process): an error's checkpoint
        self.previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self.on_signal)
        return self

    def on_signal(self, signum, frame):
        self.received = signum

    def __exit__(self, kind, error, traceback):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if not isinstance(error, Exception):
            return False
        self.save_after_error(error)
        if not self.received:
            return False
        if isinstance(error, NonFiniteLoss):
            return False
        self.stopped = self.received
        self.say_stopped(f" ({type(error).__name__} after it: {one_line(error)})")
        return True  # the signal ends the run, not the error

    def step_done(self, stats):
        """After a step: its loss counted if not finite; on one process, the RNG states an error's
        checkpoint needs (under torchrun every rank's states are gathered at a save, which an error
        cannot do)."""
        self.nonfinite += ~torch.isfinite(stats["loss"])
        if self.run.world == 1:
            self.step_rng = rng_state(self.run.device)

    def agree(self):
        """The loop's one host sync: a NaN/inf loss on any rank raises NonFiniteLoss; the ranks
        agree on stopping after a signal and on a save that `save_minutes` asks for. -> (the signal
        to stop on or 0, save now)."""
        run = self.run
        minutes = run.cfg["save_minutes"]
        clock_due = (minutes > 0) and (time.time() - run.last_save > 60 * minutes)
        host_flags = torch.tensor([float(self.received), float(clock_due)], device=run.device)
        flags = torch.cat([self.nonfinite.view(1), host_flags])  # (3,)
        if run.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # any rank's NaN, signal or clock counts
        bad, stop, clock_due = flags.tolist()
        if bad:
            raise NonFiniteLoss(
                f"non-finite loss at iter {run.iter_num}: stopped; {run.path('ckpt.pt')} (if any) "
                "keeps the last good state: continue with --init_from=resume and a lower lr or "
                "--grad_clip=1.0"
            )
        self.stopped = int(stop)
        save_now = (self.stopped > 0) or (clock_due > 0)
        return self.stopped, save_now

    def say_stopped(self, extra=""):
        if self.run.master:
            print(
                f"\nstopped by {signal.Signals(self.stopped).name} at iter {self.run.iter_num}{extra}: "
                f"{self.run.path('ckpt.pt')} holds iter {self.run.saved_iter}; continue with:\n"
                f"  {self.resume_cmd}",
                file=sys.stderr,
            )

    def save_after_error(self, error):
        """An exception inside the loop: save the state after the last completed step before the
        error propagates, and say how to resume. A NaN keeps the last good checkpoint instead; so
        does an error inside the weight update. Under torchrun rank 0 saves alone, without the other
        ranks' RNG streams; an error on another rank leaves rank 0 waiting in a collective until
        torchrun or the NCCL timeout ends it, with the last regular checkpoint."""
        run = self.run
        if isinstance(error, NonFiniteLoss):
            return
        if run.updating:
            return
        if not run.master:
            return
        try:
            if self.nonfinite.item():  # a NaN since the last check: the last good checkpoint stays
                return
        except Exception:  # a broken device cannot tell
            return
        if run.saved_iter != run.iter_num:
            try:
                save_checkpoint(run, rngs=[self.step_rng] if run.world == 1 else [])
            except Exception as e:  # the original error matters more
                print(f"could not save a checkpoint after the error: {one_line(e)}", file=sys.stderr)
                return
        if self.received:
            return  # __exit__ reports the stop
        self.say_how_to_resume(error)

    def say_how_to_resume(self, error):
        """After an error (also one after the loop, in the final evaluation): the command that continues
        from ckpt.pt, when ckpt.pt holds this run's last step."""
        run = self.run
        if not run.master:
            return
        if run.saved_iter != run.iter_num:
            return
        if (run.iter_num == 0) and (run.cfg["init_from"] != "resume"):  # ckpt.pt is not this run's
            return
        print(
            f"\n{type(error).__name__} after iter {run.iter_num}: {run.path('ckpt.pt')} holds that "
            f"state; once the cause is fixed, continue with:\n  {self.resume_cmd}",
            file=sys.stderr,
        )


def one_line(error):
    """An error's message without the worker traceback that DataLoader puts into errors raised on a
    worker."""
    text = str(error).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]  # "module.ErrorType: message"
    return last.split(": ", 1)[-1]


# ----------------------------------------------------------------------------------------------------------
# A resumed run's random streams


RESUME_SEED_STRIDE = 7919  # a prime above any rank count: each (rank, iteration) gets its own seed


def restore_rngs(cfg, rank, device, ckpt):
    """Per-rank RNG streams (masking, structured masks): from the checkpoint when resuming; an
    error's checkpoint under torchrun has none, and the streams start again from (seed, rank,
    iteration)."""
    states = ckpt and ckpt["rng"]
    if states:
        set_rng_state(states[rank] if len(states) > rank else states[0], device)
    else:
        s = cfg["seed"] + rank + (ckpt["iter_num"] * RESUME_SEED_STRIDE if ckpt else 0)
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)


# --------------------------------------------------------------------------------------------------
# Reading checkpoints: ours, the official release's and the ImageNet MAE ViT-B initialisation
#
# model.load_pretrained, train.py (resume, init_from) and eval.py (load_model) all read checkpoints
# through read_checkpoint, strip wrapper prefixes with strip_key_prefixes and load weights with
# load_pretrained.

KEY_PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel / DDP, and torch.compile of a whole model


class CheckpointError(ConfigError):
    """A checkpoint file that does not exist or is not a checkpoint."""


def read_checkpoint(path, map_location="cpu"):
    """torch.load of a checkpoint file -> its dict (ours, or a state dict such as the official
    release's). A missing file, or one that is not a checkpoint, is a CheckpointError naming the
    file and what it holds. Unpickles with weights_only=False (our checkpoints hold settings too):
    load only checkpoints you trust."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file): check the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    # an empty, truncated, text or random file fails in torch's zip, pickle or EOF checks alike
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch checkpoint ({_describe_file(path)}; torch.load: "
            f"{type(error).__name__}): give a file written by torch.save"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict or a state dict"
        )
    return ckpt


def _describe_file(path):  # what a file that is not a checkpoint holds, for the error message
    size = os.path.getsize(path)
    if size == 0:
        return "an empty file"
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at byte 512 is fine
    except UnicodeDecodeError:
        return f"{size} bytes of unrecognised binary data"
    if b"\0" in head:
        return f"{size} bytes of unrecognised binary data"
    return f"a text file of {size} bytes"


def strip_key_prefixes(state):
    """The one rule for wrapper prefixes: each key without its leading `module.` / `_orig_mod.`."""
    return {_strip_prefixes(key): value for key, value in state.items()}


def _strip_prefixes(key):
    while key.startswith(KEY_PREFIXES):
        prefix = next(p for p in KEY_PREFIXES if key.startswith(p))
        key = key[len(prefix) :]
    return key


def state_dict_of(ckpt):
    """The weights in a checkpoint dict, prefixes stripped: ours keep them under 'model', the
    official release's file is the state dict itself."""
    state = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    return strip_key_prefixes(state)


def architecture_from(settings):
    """The CAVMAEConfig fields in a settings dict, named as themselves or as train.py's model_<f>."""
    fields = {f.name for f in dataclasses.fields(CAVMAEConfig)}
    found = {key: value for key, value in settings.items() if key in fields}
    for key, value in settings.items():
        field = key.removeprefix("model_")
        if key.startswith("model_") and (field in fields):
            found[field] = value
    return found


def infer_architecture(state):
    """The CAVMAEConfig fields a state dict's shapes determine, ours or official (all but the head
    counts and mlp_ratio): what eval.py needs to rebuild a model around an official checkpoint."""

    def count(prefix):  # distinct block indices under prefix
        return len({k[len(prefix) + 1 :].split(".")[0] for k in state if k.startswith(prefix + ".")})

    arch = {}
    pos_a = state.get("pos_embed_a", state.get("encoder.pos_embed_a"))
    pos_v = state.get("pos_embed_v", state.get("encoder.pos_embed_v"))
    patch = state.get("patch_embed_a.proj.weight", state.get("encoder.patch_embed_a.weight"))
    if (patch is not None) and (pos_a is not None) and (pos_v is not None):
        p = patch.shape[-1]
        bands = CAVMAEConfig.num_mel_bins // p  # the audio grid is bands x time steps
        arch["patch_size"] = p
        arch["embed_dim"] = pos_a.shape[-1]
        arch["audio_length"] = pos_a.shape[1] // bands * p
        arch["img_size"] = math.isqrt(pos_v.shape[1]) * p
    for official, ours, name in (
        ("blocks_a", "encoder.audio_blocks", "modality_specific_depth"),
        ("blocks_u", "encoder.joint_blocks", "joint_depth"),
        ("decoder_blocks", "decoder_blocks", "decoder_depth"),
    ):
        depth = count(official) or count(ours)
        if depth:
            arch[name] = depth
    if "decoder_embed.weight" in state:
        arch["decoder_embed_dim"] = state["decoder_embed.weight"].shape[0]
    return arch


@dataclasses.dataclass
class LoadReport:
    source_format: str  # "ours" | "official" | "imagenet-mae"
    loaded: list = dataclasses.field(default_factory=list)  # model keys that received a tensor
    missing: list = dataclasses.field(default_factory=list)  # model keys left as initialised
    ignored: list = dataclasses.field(default_factory=list)  # checkpoint keys with no place in the model
    adapted: list = dataclasses.field(default_factory=list)  # what was changed to fit (audio positions cut)

    def __str__(self):
        unused_norms = [k for k in self.ignored if _is_unused_modality_norm(k)]
        other = [k for k in self.ignored if not _is_unused_modality_norm(k)]
        lines = [f"{self.source_format} checkpoint: loaded {len(self.loaded)} tensors"]
        if unused_norms:
            lines.append(
                f"ignored {len(unused_norms)} per-modality norms of non-joint blocks "
                "(the official model never uses them)"
            )
        if other:
            lines.append(f"ignored {len(other)}: {_summary(other)}")
        if self.missing:
            lines.append(f"missing {len(self.missing)} (left as initialised): {_summary(self.missing)}")
        else:
            lines.append("missing: none")
        return "; ".join(lines + self.adapted)


# the official blocks all carry norm1_a/_v, norm2_a/_v; ours only the joint ones
def _is_unused_modality_norm(key):
    return re.search(r"blocks\.\d+\.norm[12]_[av]\.", key) is not None


def _summary(keys, n=6):
    more = f", ... (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


OFFICIAL_RENAMES = [  # official CAVMAE / CAVMAEFT key -> ours
    (r"^blocks_a\.", "encoder.audio_blocks."),
    (r"^blocks_v\.", "encoder.visual_blocks."),
    (r"^blocks_u\.", "encoder.joint_blocks."),
    (r"^patch_embed_([av])\.proj\.", r"encoder.patch_embed_\1."),
    (r"^(modality_[av]|pos_embed_[av])$", r"encoder.\1"),
    (r"^(norm|norm_a|norm_v)\.", r"encoder.\1."),
    (r"^mlp_head\.", "head."),
]


def checkpoint_format(state):
    """'ours', 'official' or 'imagenet-mae', from the keys of a prefix-stripped state dict."""
    if any(k.startswith("encoder.") for k in state):
        return "ours"
    if any(k.startswith(("blocks_a.", "blocks_u.")) for k in state):
        return "official"
    if ("patch_embed.proj.weight" in state) and any(k.startswith("blocks.") for k in state):
        return "imagenet-mae"
    raise ValueError(
        f"unrecognised checkpoint format (first keys: {_summary(list(state))}); expected this project's, "
        "the official CAV-MAE release's, or an ImageNet MAE ViT-B state dict"
    )


def official_to_ours(state):
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in OFFICIAL_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def imagenet_mae_to_ours(state, config):
    """The official adaptation of an ImageNet MAE ViT-B: layers < modality_specific_depth -> both
    modality branches, the next joint_depth layers -> joint blocks with all three norm sets copied
    from their norms, the final norm -> norm, norm_a and norm_v, audio patch kernel = RGB kernel
    summed over channels, encoder and decoder positions from the MAE grid without the cls position,
    the decoder by name, the visual prediction head as is and the audio one from the first p*p rows.
    Returns (mapped, ignored keys)."""
    specific = config.modality_specific_depth
    joint = config.joint_depth
    mapped = {}
    ignored = []
    for key, value in state.items():
        block = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        if block and (int(block[1]) < specific):
            mapped[f"encoder.audio_blocks.{block[1]}.{block[2]}"] = value
            mapped[f"encoder.visual_blocks.{block[1]}.{block[2]}"] = value
        elif block and (int(block[1]) < specific + joint):
            prefix = f"encoder.joint_blocks.{int(block[1]) - specific}."
            mapped[prefix + block[2]] = value
            if re.match(r"norm[12]\.", block[2]):
                for suffix in ("_a", "_v"):
                    mapped[prefix + block[2].replace(".", suffix + ".", 1)] = value
        elif key.startswith("norm."):
            for name in ("norm", "norm_a", "norm_v"):
                mapped[f"encoder.{name}.{key[len('norm.') :]}"] = value
        elif key == "patch_embed.proj.weight":
            mapped["encoder.patch_embed_v.weight"] = value
            mapped["encoder.patch_embed_a.weight"] = value.sum(dim=1, keepdim=True)
        elif key == "patch_embed.proj.bias":
            mapped["encoder.patch_embed_v.bias"] = value
            mapped["encoder.patch_embed_a.bias"] = value
        elif key == "pos_embed":
            mapped["encoder.pos_embed_v"] = value[:, 1:]  # without the cls position
        elif key == "decoder_pos_embed":
            mapped["decoder_pos_embed_v"] = value[:, 1:]
        elif key.startswith("decoder_pred."):
            parameter = key.removeprefix("decoder_pred.")
            mapped["decoder_pred_v." + parameter] = value
            mapped["decoder_pred_a." + parameter] = value[: config.patch_size**2]
        elif (key == "mask_token") or key.startswith(("decoder_embed.", "decoder_blocks.", "decoder_norm.")):
            mapped[key] = value
        else:
            ignored.append(key)
    return mapped, ignored


AUDIO_POSITION_KEYS = ("encoder.pos_embed_a", "decoder_pos_embed_a")


def cut_audio_positions(mapped, own, bands):
    """Clips shorter than the checkpoint's (e.g. ESC-50's 5 s): each audio
    position table (1, bands * T/p, D), frequency-major, keeps its first T'/p time columns, so every
    kept token has the position it was trained with. A model longer than its checkpoint is an error:
    positions it never saw would have to be invented (interpolating a trained table would also
    change what every column means), so we do not guess. Returns (mapped with the cut tables, notes
    for the load report)."""
    cut = dict(mapped)
    notes = []
    for key in AUDIO_POSITION_KEYS:
        have = mapped.get(key)
        want = own.get(key)
        if (have is None) or (want is None) or (have.shape == want.shape):
            continue
        if not _differs_in_time_only(have, want, bands):
            continue  # not a difference in clip length: load_pretrained's shape check reports it
        steps = have.shape[1] // bands
        keep = want.shape[1] // bands
        if keep > steps:
            raise ValueError(
                f"{key}: checkpoint has {steps} audio time steps ({bands}x{steps} positions), the model "
                f"{keep}: a model may take shorter clips than its checkpoint (the table is cut), not "
                "longer ones; build it with audio_length <= the checkpoint's"
            )
        table = have.reshape(1, bands, steps, -1)  # (1, F/p, T/p, D)
        cut[key] = table[:, :, :keep].reshape(1, bands * keep, -1)  # (1, F/p * T'/p, D)
        notes.append(f"{key}: audio positions cut from {bands}x{steps} to {bands}x{keep} time steps")
    return cut, notes


def _differs_in_time_only(have, want, bands):  # (1, bands * T/p, D) tables of the same width
    if (have.ndim != 3) or (want.ndim != 3):
        return False
    same_batch_and_width = (have.shape[0] == want.shape[0]) and (have.shape[2] == want.shape[2])
    return same_batch_and_width and (have.shape[1] % bands == 0)


def load_pretrained(model, source, path=None):
    """Load `source` (a path, a state dict, or a checkpoint dict with the state dict under 'model')
    into a CAVMAE or CAVMAEClassifier. Formats: this project's, the official release's (with or
    without the prefixes of nn.DataParallel / torch.compile), and an ImageNet MAE ViT-B. A
    pretraining checkpoint loads into the classifier (decoder ignored, head left newly initialised).
    A model with a shorter audio_length than the checkpoint gets the first time columns of its audio
    position tables (cut_audio_positions; the report says so). Raises ValueError on an unrecognised
    format or any other shape mismatch: a CheckpointError naming the file when `source` is a path,
    or `path` names the file a dict `source` was read from. Returns a LoadReport."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        source = read_checkpoint(path)
    if path is None:
        return load_state(model, source)
    try:
        return load_state(model, source)
    except ValueError as error:  # the format or the shapes: say which file
        raise CheckpointError(f"checkpoint {path}: {error}") from None


def load_state(model, ckpt):
    """load_pretrained of a checkpoint dict or a state dict already in memory."""
    if (not isinstance(ckpt, dict)) or (not ckpt):
        raise ValueError(f"no state dict found in the given {type(ckpt).__name__}")
    state = state_dict_of(ckpt)
    source_format = checkpoint_format(state)
    ignored = []
    if source_format == "ours":
        mapped = state
    elif source_format == "official":
        mapped = official_to_ours(state)
    else:
        mapped, ignored = imagenet_mae_to_ours(state, model.config)
    own = model.state_dict()
    ignored += [k for k in mapped if k not in own]
    mapped = {k: v for k, v in mapped.items() if k in own}
    mapped, adapted = cut_audio_positions(mapped, own, model.config.audio_grid[0])
    mismatches = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if v.shape != own[k].shape
    ]
    if mismatches:
        raise ValueError(
            f"{source_format} checkpoint does not fit this model config ({len(mismatches)} shape "
            "mismatches): " + "; ".join(mismatches[:5])
        )
    model.load_state_dict(mapped, strict=False)
    missing = [k for k in own if k not in mapped]
    return LoadReport(source_format, list(mapped), missing, ignored, adapted)
