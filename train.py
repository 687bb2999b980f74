"""Train CAV-MAE: self-supervised pretraining (task='pretrain') or fine-tuning a classifier
(task='finetune').

    python train.py config/pretrain_synthetic.py                      # the CPU demo, a few minutes
    python train.py config/pretrain_synthetic.py --batch_size=32 --out_dir=out/x
    python train.py config/pretrain_synthetic.py --init_from=resume   # continue out_dir/ckpt.pt exactly
    torchrun --standalone --nproc_per_node=4 train.py config/pretrain_audioset.py

Settings: the defaults below (the paper's base pretraining recipe), then each config file (plain
Python assignments), then --key=value flags (configurator.py). Model fields are set with
--model_<field>=value (e.g. --model_embed_dim=256) on top of --model_preset. batch_size is per
process and micro-step: one optimizer step sees batch_size x grad_accum x world_size clips, and the
contrastive negatives are the batch_size clips of one step on one process (the official code: the
per-GPU batch) unless gather_negatives=True.

Read train() first: it builds a Run, then loop() runs the steps (set_lr, train_step) and whatever
due_at says the iteration asks for (a log line, the epoch end, an evaluation, a checkpoint), then
finish() evaluates and saves. Long runs lose minutes, not hours (checkpoint.Safeguard): a checkpoint
at every evaluation, every save_interval steps or save_minutes, on SIGINT/SIGTERM, and on any error
inside the loop (the state after the last completed step). Exit status: 0 when the run ended, 1
after an error, 128 + the signal's number after a signal (saved).
"""

import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import re
import signal
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import configurator
import data
from checkpoint import (
    NonFiniteLoss,
    Safeguard,
    WeightAverage,
    WriteError,
    architecture_from,
    atomic_save,
    load_pretrained,
    load_start,
    one_line,
    read_checkpoint,
    refuse_changed_settings,
    restore_rngs,
    save_checkpoint,
    weights_entry,
)
from configurator import ConfigError, resolve_device
from loader import build_data, gather_in_order, to_device
from model import (
    CAVMAE,
    FT_MODES,
    MASK_MODES,
    CAVMAEClassifier,
    CAVMAEConfig,
    apply_compile,
    num_params,
)

# ----------------------------------------------------------------------------------------------------------
# default config: CAV-MAE base pretraining on AudioSet-2M (docs/recipes.md)
# I/O
out_dir = "out/pretrain"
task = "pretrain"  # 'pretrain' (CAV-MAE objective) | 'finetune' (CAVMAEClassifier)
init_from = "scratch"  # 'scratch' | 'resume' (out_dir/ckpt.pt) | a checkpoint (ours, official, ImageNet MAE)
eval_interval = 0  # evaluate (and save) every N iterations; 0 = every epoch; -1 = only at the end
save_interval = 0  # also save every N iterations (0: at evaluations, epoch ends and the end only)
save_minutes = 30.0  # also save when this many minutes have passed since the last save (0: off)
save_epochs = True  # also save at each epoch end (off for short epochs of a big model)
overwrite = False  # a new run may replace the checkpoint in out_dir (else: --init_from=resume)
log_interval = 10
# data
data_train = "data/audioset/train.json"
data_val = "data/audioset/eval.json"
label_csv = "data/audioset/class_labels_indices.csv"
target_length = 0  # fbank frames; 0 = the model's audio_length
image_size = 0  # frame side; 0 = the model's img_size
num_frames = 10
dataset_mean = data.AUDIOSET_MEAN  # fbank normalisation: the mean (AudioSet's, also for VGGSound)
dataset_std = data.AUDIOSET_STD  # fbank normalisation: the standard deviation (AudioSet's)
freqm = 0  # SpecAugment frequency mask width in mel bins (fine-tuning: 48)
timem = 0  # SpecAugment time mask width in fbank frames (fine-tuning: 192)
mixup = 0.0
noise = True  # the official noise augmentation (all recipes)
label_smooth = 0.0
balanced_sampling = False  # sample clips with the official per-label weights 1000 / (count + 0.01)
num_workers = 4  # loader processes; they live for the whole run (persistent)
gpu_preprocess = "auto"  # 'auto' (on for CUDA) | 'on' | 'off': workers decode; fbank, augmentation on device
on_error = "raise"  # 'raise' | 'skip' unreadable rows (data.AVDataset)
# model
model_preset = "base"  # model.PRESETS name; single fields via --model_<field>=value
# pretraining objective (Sec. 3)
mae_weight = 1.0
contrastive_weight = 0.01  # lambda_c; 0 = AV-MAE
mask_ratio = 0.75
mask_ratio_a = -1.0  # the audio mask ratio; < 0: use mask_ratio
mask_ratio_v = -1.0  # the visual mask ratio; < 0: use mask_ratio
mask_mode = "unstructured"  # audio masking: 'unstructured' | 'time' | 'freq' | 'tf'
bidirectional = False  # contrastive loss in both directions (official: one)
gather_negatives = False  # DDP: negatives from all ranks (all_gather with gradient)
# fine-tuning
ftmode = "multimodal"  # multimodal | audioonly | videoonly | missingaudioonly | missingvideoonly
head_lr = 100.0  # the new head's lr multiplier
freeze_base = False  # linear probing: train the head only
loss = "bce"  # 'bce' (multi-label) | 'ce' (single-label)
metric = "mAP"  # 'mAP' | 'acc': main metric, and sigmoid vs softmax in the multi-frame evaluation
wa = False  # average the weights of epochs wa_start..wa_end (1-based) before the final evaluation
wa_start = 1  # the first epoch (1-based) of the weight average
wa_end = 10  # the last epoch (1-based) of the weight average
select_best = True  # fine-tuning without wa: report the best validation weights (best.pt), as official
# optimisation
optimizer = "adam"  # 'adam' (official: L2 weight decay) | 'adamw'
lr = 5e-5
weight_decay = 5e-7
betas = (0.95, 0.999)
epochs = 25
max_iters = 0  # > 0: stop after this many optimizer steps, whatever `epochs` says
batch_size = 48
grad_accum = 1
grad_clip = 0.0  # 0 = off
lr_schedule = "step"  # 'step' (official: x decay every `step` epochs from epoch `start`) | 'cosine'
lrscheduler_start = 10  # step schedule: the lr first decays after this many epochs
lrscheduler_step = 5  # step schedule: then again every this many epochs
lrscheduler_decay = 0.5  # step schedule: the lr factor of each decay
warmup_iters = 0  # cosine schedule: linear warm-up steps
min_lr_ratio = 0.0  # cosine schedule: the final lr / lr
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = "auto"  # 'auto' (CUDA: bfloat16, or float16 + GradScaler where no bf16; CPU: float32)
compile = False  # compile each transformer block on its own (model.apply_compile)
ddp_timeout_minutes = 30.0  # torchrun: how long a rank waits for the others in a collective
seed = 0
peak_flops = 989e12  # for MFU: H100 SXM dense bf16
DEFAULTS = configurator.defaults_in(globals())  # the lowercase names above (not FT_MODES, MASK_MODES)
CHOICES = dict(
    task=("pretrain", "finetune"),
    optimizer=("adam", "adamw"),
    lr_schedule=("step", "cosine"),
    loss=("bce", "ce"),
    metric=("mAP", "acc"),
    dtype=("auto", "float32", "bfloat16", "float16"),
    gpu_preprocess=("auto", "on", "off"),
    mask_mode=MASK_MODES,
    ftmode=FT_MODES,
    on_error=("raise", "skip"),
)
# ----------------------------------------------------------------------------------------------------------


def configure(argv):
    """Defaults <- config files <- --key=value flags (configurator.py); model_<field> keys only where set.
    -h / --help prints every setting with its default and the comment beside it above, and exits."""
    if configurator.wants_help(argv):
        print(configurator.usage(__file__, DEFAULTS, CHOICES, model_class=CAVMAEConfig))
        sys.exit(0)
    model_fields = {"model_" + f.name: f.default for f in dataclasses.fields(CAVMAEConfig)}
    return configurator.configure(argv, DEFAULTS, CHOICES, optional=model_fields)


def model_config(cfg, model_args=None, resume=False):
    """The architecture: a resumed checkpoint's; else a checkpoint of ours with the --model_<field>
    values that differ from the paper's model (e.g. --model_audio_length=512: load_pretrained cuts
    the audio positions); else the preset with the model_<field> overrides. A model that cannot be
    built is a ConfigError naming the --model_<field> flags."""
    try:
        return architecture(cfg, model_args, resume)
    except ValueError as error:
        raise ConfigError(f"model_preset={cfg['model_preset']}: {as_model_flags(error)}") from None


def architecture(cfg, model_args, resume):
    overrides = architecture_from(cfg)  # the model_<field> keys that are set
    if model_args is None:
        return CAVMAEConfig.from_preset(cfg["model_preset"], **overrides)
    if resume:
        return CAVMAEConfig(**model_args)
    paper = CAVMAEConfig()
    changed = {k: v for k, v in overrides.items() if v != getattr(paper, k)}
    return CAVMAEConfig(**{**model_args, **changed})


def as_model_flags(error):
    """CAVMAEConfig's message with each field as the flag that sets it: `CAVMAEConfig.embed_dim=33 is
    not divisible by num_heads=12` -> `--model_embed_dim=33 is not divisible by --model_num_heads=12`."""
    names = "|".join(f.name for f in dataclasses.fields(CAVMAEConfig))
    return re.sub(rf"(?:CAVMAEConfig\.)?\b({names})=", r"--model_\1=", str(error))


# ----------------------------------------------------------------------------------------------------------
# Checks before a run starts: one line that names the setting and what to do, not a traceback later

AT_LEAST_ONE = ("batch_size", "grad_accum", "num_frames", "log_interval")
AT_LEAST_ZERO = (
    "epochs",
    "max_iters",
    "num_workers",
    "save_interval",
    "save_minutes",
    "target_length",
    "image_size",
    "warmup_iters",
)
DATA_FILES = ("data_train", "data_val", "label_csv")


def check_settings(cfg):
    for key in AT_LEAST_ONE:
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]}: must be 1 or more")
    for key in AT_LEAST_ZERO:
        if cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]}: must be 0 or more")
    if cfg["eval_interval"] < -1:
        raise ConfigError(
            f"eval_interval={cfg['eval_interval']}: "
            "N (every N iterations), 0 (every epoch) or -1 (only at the end)"
        )
    if cfg["task"] == "pretrain":
        check_objective(cfg)


def check_objective(cfg):
    """Pretraining settings that cannot train: no loss at all, or nothing left visible to encode."""
    if (cfg["mae_weight"] == 0) and (cfg["contrastive_weight"] == 0):
        raise ConfigError("mae_weight=0 and contrastive_weight=0: there is nothing to train; set one above 0")
    for key in ("mask_ratio", "mask_ratio_a", "mask_ratio_v"):
        if cfg[key] >= 1:
            raise ConfigError(f"{key}={cfg[key]}: must be below 1 (1 masks every token: nothing to encode)")
    if cfg["mask_ratio"] < 0:
        raise ConfigError(f"mask_ratio={cfg['mask_ratio']}: must be 0 or more")


def check_data_files(cfg):
    for key in DATA_FILES:
        if data.is_synthetic_folder(cfg[key]):
            data.require_file(cfg[key], key)  # names the prepare.py synthetic command that writes it
    missing = [f"{key}={cfg[key]}" for key in DATA_FILES if not os.path.isfile(cfg[key])]
    if missing:
        raise ConfigError(
            f"not found: {', '.join(missing)}. Make the synthetic set with `python prepare.py "
            "synthetic` and run a synthetic config (python train.py config/pretrain_synthetic.py), "
            "or point --data_train, --data_val and --label_csv at your data"
        )


# ----------------------------------------------------------------------------------------------------------
# The run: everything a training run carries from step to step


@dataclasses.dataclass
class Run:
    cfg: dict
    mcfg: CAVMAEConfig
    device: torch.device
    rank: int
    world: int
    model: torch.nn.Module  # the plain model: weights, checkpoints, evaluation
    step_model: torch.nn.Module  # what a step calls: the same model, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    dtype: str
    data: dict  # build_data's datasets, loaders and preprocessors
    batches: object  # the iterator over the training loader, for the whole run
    total_iters: int
    num_classes: int = None
    gather: object = None  # all_gather for contrastive negatives from every rank
    wa: object = None  # WeightAverage
    iter_num: int = 0
    best_metric: float = None
    best_iter: int = None
    last_eval_iter: int = None
    last_save: float = dataclasses.field(default_factory=time.time)
    saved_iter: int = 0  # the iteration ckpt.pt holds
    updating: bool = False  # inside optimizer.step: the weights are not consistent
    fallbacks: list = dataclasses.field(default_factory=list)  # this epoch's missing frames

    @property
    def master(self):
        return self.rank == 0

    @property
    def pretrain(self):
        return self.cfg["task"] == "pretrain"

    @property
    def iters_per_epoch(self):
        return self.data["iters_per_epoch"]

    @property
    def step_samples(self):  # clips per optimizer step, all ranks
        return self.cfg["batch_size"] * self.cfg["grad_accum"] * self.world

    def path(self, name):
        return os.path.join(self.cfg["out_dir"], name)


def resolve_dtype(cfg, device):
    """'auto': bf16 on CUDA, fp16 (the official AMP) where it has none, fp32 on the CPU."""
    if cfg["dtype"] != "auto":
        return cfg["dtype"]
    if device.type != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def build_model(cfg, mcfg, num_classes, ckpt, init):
    """The model with its initial weights (seeded: the same on every rank), pretrained or resumed."""
    torch.manual_seed(cfg["seed"])
    model = CAVMAE(mcfg) if num_classes is None else CAVMAEClassifier(mcfg, num_classes)
    report = None
    if init is not None:
        report = load_pretrained(model, init, path=cfg["init_from"])
    if ckpt is not None:
        model.load_state_dict(ckpt["model_last"] or ckpt["model"])
    if cfg["freeze_base"]:  # linear probing: the head alone trains
        if num_classes is None:
            raise ConfigError("freeze_base=True is for fine-tuning (linear probing)")
        head = {id(p) for p in model.head.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    return model, report


def build_optimizer(cfg, model, device):
    """Adam(W) with the newly initialised head at head_lr x lr; fused kernels on CUDA."""
    head = set() if isinstance(model, CAVMAE) else {id(p) for p in model.head.parameters()}
    groups = [
        dict(
            params=[p for p in model.parameters() if p.requires_grad and ((id(p) in head) == is_head)],
            lr_scale=cfg["head_lr"] if is_head else 1.0,
        )
        for is_head in (False, True)
    ]
    # official: Adam with L2 weight decay; adamw decouples it
    optimizer_class = torch.optim.Adam if cfg["optimizer"] == "adam" else torch.optim.AdamW
    options = dict(lr=cfg["lr"], betas=cfg["betas"], weight_decay=cfg["weight_decay"])
    if device.type == "cuda":
        options["fused"] = True  # one kernel for the whole update
    return optimizer_class([g for g in groups if g["params"]], **options)


def has_unused_parameters(cfg, mcfg, num_classes):
    """DDP: branches that a loss weight of 0 or a fine-tuning stream leave out have no gradient;
    neither have the single-modality norms of all but the last joint block under the official
    contrastive-stream quirk."""
    if num_classes is not None:
        return True
    if cfg["mae_weight"] == 0:
        return True
    if cfg["contrastive_weight"] == 0:
        return True
    return (mcfg.joint_depth > 1) and mcfg.official_contrastive_streams


def build_run(cfg, device, rank, world):
    check_settings(cfg)
    check_data_files(cfg)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    ckpt, init = load_start(cfg, ckpt_path)
    source = init if ckpt is None else ckpt  # what the architecture may come from; None: scratch
    model_args = None if source is None else source.get("model_args")
    mcfg = model_config(cfg, model_args, resume=ckpt is not None)
    for key, size in (("target_length", mcfg.audio_length), ("image_size", mcfg.img_size)):
        if cfg[key] not in (0, size):
            raise ConfigError(f"{key}={cfg[key]} but the model takes {size}: set {key}=0 or change the model")
    sampler = ckpt["sampler"] if ckpt else dict(epoch=0, start=0)
    loaders = build_data(cfg, mcfg, device, rank, world, sampler["epoch"], sampler["start"])
    total_iters = cfg["max_iters"] if cfg["max_iters"] > 0 else cfg["epochs"] * loaders["iters_per_epoch"]
    if (ckpt is not None) and (ckpt["iter_num"] < total_iters):  # steps left: the run's own ones
        refuse_changed_settings(ckpt, cfg, world, ckpt_path)
    num_classes = None if cfg["task"] == "pretrain" else loaders["train_ds"].num_classes
    model, report = build_model(cfg, mcfg, num_classes, ckpt, init)
    model.to(device)
    dtype = resolve_dtype(cfg, device)
    run = Run(
        cfg=cfg,
        mcfg=mcfg,
        device=device,
        rank=rank,
        world=world,
        model=model,
        step_model=model,
        optimizer=build_optimizer(cfg, model, device),
        dtype=dtype,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == "float16"),  # fp16 only
        autocast=torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32"),
        data=loaders,
        batches=None,
        total_iters=total_iters,
        num_classes=num_classes,
    )
    if cfg["wa"]:
        run.wa = WeightAverage(cfg["wa_start"], cfg["wa_end"], ckpt and ckpt["wa"])
    if ckpt is not None:
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        run.iter_num = ckpt["iter_num"]
        run.best_metric = ckpt["best_metric"]
        run.best_iter = ckpt.get("best_iter")
        run.saved_iter = run.iter_num
    restore_rngs(cfg, rank, device, ckpt)
    if cfg["compile"]:
        apply_compile(model)  # each block compiled on its own; same state-dict keys, same random draws
    if world > 1:
        run.step_model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=has_unused_parameters(cfg, mcfg, num_classes),
        )
        run.gather = GatherWithGrad.apply if cfg["gather_negatives"] else None
    run.batches = iter(loaders["train_loader"])
    return run, report


# ----------------------------------------------------------------------------------------------------------
# Objectives and a training step


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of every rank's loss w.r.t. its own
    slice: the `gather` of model.contrastive_loss for negatives from every rank
    (gather_negatives=True)."""

    @staticmethod
    def forward(ctx, x):  # (B, D) -> (world * B, D)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):  # (world * B, D) -> (B, D)
        # Every rank computes the same loss over all gathered clips; summing their gradients here
        # and DDP's mean over ranks afterwards give each parameter the gradient of that one loss.
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over the ranks' losses
        B = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * B : (dist.get_rank() + 1) * B]


def mask_ratio_of(cfg, key):
    """mask_ratio_a / mask_ratio_v, or mask_ratio where the per-modality one is negative (unset)."""
    return cfg[key] if cfg[key] >= 0 else cfg["mask_ratio"]


def pretrain_kwargs(cfg):
    """The CAVMAE.forward arguments of the pretraining objective."""
    return dict(
        mask_ratio_a=mask_ratio_of(cfg, "mask_ratio_a"),
        mask_ratio_v=mask_ratio_of(cfg, "mask_ratio_v"),
        mae_weight=cfg["mae_weight"],
        contrastive_weight=cfg["contrastive_weight"],
        mask_mode=cfg["mask_mode"],
        bidirectional=cfg["bidirectional"],
    )


def classification_loss(logits, label, kind):
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), label)
    return F.cross_entropy(logits.float(), label)  # soft targets (mixup, smoothing), as the official loss


PRETRAIN_STATS = ("loss", "loss_mae_a", "loss_mae_v", "loss_c", "contrastive_accuracy")  # logged per step


def compute_loss(model, audio, image, label, cfg, gather=None):
    """-> (loss to minimise, dict of detached scalars to log)."""
    if cfg["task"] == "pretrain":
        out = model(audio, image, gather=gather, **pretrain_kwargs(cfg))
        return out["loss"], {k: out[k].detach() for k in PRETRAIN_STATS}
    loss = classification_loss(model(audio, image, mode=cfg["ftmode"]), label, cfg["loss"])
    return loss, {"loss": loss.detach()}


def train_step(run):
    """One optimizer step over grad_accum micro-batches -> its statistics as device scalars (no sync)."""
    cfg = run.cfg
    accum = cfg["grad_accum"]
    stats = {}
    for micro in range(accum):
        batch = next(run.batches)
        run.fallbacks += batch["fallbacks"]
        audio, image, label = to_device(batch, run.data["prep"], run.device)
        # DDP: the gradients are all-reduced on the last micro-batch only
        sync = (run.step_model is run.model) or (micro == accum - 1)
        gradient_sync = contextlib.nullcontext() if sync else run.step_model.no_sync()
        with gradient_sync, run.autocast:
            loss, micro_stats = compute_loss(run.step_model, audio, image, label, cfg, run.gather)
        run.scaler.scale(loss / accum).backward()
        for k, v in micro_stats.items():
            stats[k] = stats.get(k, 0.0) + v.float() / accum
    if cfg["grad_clip"] > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg["grad_clip"])
    run.updating = True
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.updating = False
    run.optimizer.zero_grad(set_to_none=True)
    return stats


def lr_factor(cfg, it, epoch, total_iters):
    if cfg["lr_schedule"] == "step":  # MultiStepLR(range(start, 1000, step)) stepped after every epoch
        milestones_passed = len(range(cfg["lrscheduler_start"], epoch + 1, cfg["lrscheduler_step"]))
        return cfg["lrscheduler_decay"] ** milestones_passed
    if it < cfg["warmup_iters"]:
        return (it + 1) / cfg["warmup_iters"]
    progress = min(1.0, (it - cfg["warmup_iters"]) / max(1, total_iters - cfg["warmup_iters"]))
    return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(run):
    factor = lr_factor(run.cfg, run.iter_num, run.iter_num // run.iters_per_epoch, run.total_iters)
    for g in run.optimizer.param_groups:
        g["lr"] = run.cfg["lr"] * g["lr_scale"] * factor


# ----------------------------------------------------------------------------------------------------------
# Evaluation: every rank takes its share of the validation set, and the results are gathered


def val_batches(run, frame=None):
    run.data["val_keys"].frame = frame
    for batch in run.data["val_loader"]:
        yield to_device(batch, run.data["val_prep"], run.device)


def with_validation_losses(run, batches, sums):
    """Pass the validation batches on, adding each one's losses (times its clips) and its clip count
    to `sums`: losses and retrieval embeddings come from one pass over the validation set."""
    for audio, image, label in batches:
        with run.autocast:
            _, stats = compute_loss(run.model, audio, image, label, run.cfg)
        for k, value in stats.items():
            sums[k] = sums.get(k, 0.0) + value.double() * len(audio)
        sums["clips"] = sums.get("clips", 0.0) + len(audio)
        yield audio, image, label


def mean_over_ranks(run, sums):
    """The losses summed over every rank's clips, divided by the clips."""
    keys = [k for k in sums if k != "clips"]
    totals = torch.stack(
        [torch.as_tensor(sums[k], dtype=torch.float64, device=run.device) for k in [*keys, "clips"]]
    )
    if run.world > 1:
        dist.all_reduce(totals)
    return {k: float(totals[i] / totals[-1]) for i, k in enumerate(keys)}


def retrieval_record(a2v, v2a):
    """a2v_R1, v2a_R1, a2v_R5, ... v2a_MR: recall@1/5/10 and median rank of both directions."""
    directions = (("a2v", a2v), ("v2a", v2a))
    keys = ("R1", "R5", "R10", "MR")
    return {f"{name}_{k}": metrics[k] for k in keys for name, metrics in directions}


@torch.no_grad()
def evaluate_pretrain(run):
    """Validation losses (masks from a fixed seed; under torchrun each rank masks its own share) and
    audio<->visual retrieval from mean-pooled, L2-normalised coordinated tokens (Sec. 4.2), over the
    whole validation set."""
    from eval import pool_embeddings, retrieval_metrics  # eval.py: only needed to evaluate

    seed = run.cfg["seed"]
    sums = {}
    python_state = random.getstate()  # structured masking draws from Python's RNG
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(seed)
        random.seed(seed)
        batches = with_validation_losses(run, val_batches(run), sums)
        audio_emb, visual_emb = pool_embeddings(run.model, batches, run.autocast)  # (n, D) each
    random.setstate(python_state)
    losses = mean_over_ranks(run, sums)
    audio_emb, visual_emb = gather_in_order([audio_emb, visual_emb], run.rank, run.world)  # (N, D)
    similarity = audio_emb @ visual_emb.T  # (N, N), rows = audio clips
    a2v = retrieval_metrics(similarity)
    v2a = retrieval_metrics(similarity.T)
    return {**losses, **retrieval_record(a2v, v2a)}


@torch.no_grad()
def predict(run, frame=None):
    """Logits (N, K) float32 and targets (N, K) of the validation set at `frame` (None: the middle)."""
    logits = []
    targets = []
    for audio, image, label in val_batches(run, frame):
        with run.autocast:
            logits.append(run.model(audio, image, mode=run.cfg["ftmode"]).float().cpu())
        targets.append(label.float().cpu())
    return gather_in_order([torch.cat(logits), torch.cat(targets)], run.rank, run.world)


CLASSIFICATION_METRICS = ("mAP", "mAUC", "d_prime", "acc")  # of eval.classification_metrics, logged


def evaluate_finetune(run, all_frames=False):
    """Middle-frame metrics; with all_frames, also the official multi-frame evaluation:
    probabilities (sigmoid for mAP runs, softmax for acc runs) averaged over the num_frames frames
    (docs/preprocessing.md, section 3)."""
    from eval import average_frames, classification_metrics  # eval.py: only needed to evaluate

    cfg = run.cfg
    logits, targets = predict(run)
    m = classification_metrics(logits, targets)
    out = dict(loss=float(classification_loss(logits, targets, cfg["loss"])))
    out.update({k: m[k] for k in CLASSIFICATION_METRICS})
    if all_frames:
        frames = range(cfg["num_frames"])
        per_frame = torch.stack([predict(run, frame)[0] for frame in frames])  # (F, N, K)
        probs = average_frames(per_frame, "sigmoid" if cfg["metric"] == "mAP" else "softmax")
        m = classification_metrics(probs, targets)
        out.update({f"{k}_frames": m[k] for k in CLASSIFICATION_METRICS})
    return out


def main_metric(cfg, metrics):
    if cfg["task"] == "pretrain":
        return (metrics["a2v_R1"] + metrics["v2a_R1"]) / 2
    return metrics[cfg["metric"]]


def eager_evaluation():
    """Compiled blocks run eagerly in evaluation: graphs without gradients would compile again."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def evaluate(run, final=False):
    """Evaluate the plain model on data_val (every rank its share); rank 0 logs and prints."""
    run.model.eval()
    with eager_evaluation():
        metrics = evaluate_pretrain(run) if run.pretrain else evaluate_finetune(run, all_frames=final)
    run.model.train()
    run.last_eval_iter = run.iter_num
    if run.master:
        split = "final" if final else "val"
        log_line(
            run.cfg, dict(split=split, iter=run.iter_num, epoch=run.iter_num / run.iters_per_epoch, **metrics)
        )
        tqdm.write(f"{split} iter {run.iter_num}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def update_best(run, metrics):
    """Keep the best validation weights by the main metric in out_dir/best.pt (the official
    fine-tuning keeps its best_audio_model.pth and evaluates it at the end)."""
    value = main_metric(run.cfg, metrics)
    if (run.best_metric is not None) and (value <= run.best_metric):
        return
    run.best_metric = value
    run.best_iter = run.iter_num
    if run.master:
        atomic_save(dict(weights_entry(run), iter_num=run.iter_num, metric=value), run.path("best.pt"))


# ----------------------------------------------------------------------------------------------------------
# The log


def log_line(cfg, record):
    path = os.path.join(cfg["out_dir"], "log.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise WriteError(
            f"cannot write {path}: {e.strerror or e}. Free space there or choose another --out_dir"
        ) from None


def logged_at_or_before(line, iter_num):
    """Whether a log.jsonl line is a whole record of an iteration <= iter_num (a line cut short by
    a kill during its write is not)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return record.get("iter", 0) <= iter_num


def trim_log(path, iter_num):
    """A resumed run's log keeps the records up to the checkpoint's iteration: the steps after it,
    done before the interruption, are done again (rewritten atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if logged_at_or_before(line, iter_num)]
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class TrainingClock:
    """Seconds of training: the wall clock less the time spent inside `with clock.paused():`
    (evaluation and checkpoints)."""

    def __init__(self):
        self.paused_seconds = 0.0
        self.paused_at = None

    def now(self):
        wall = time.time() if self.paused_at is None else self.paused_at
        return wall - self.paused_seconds

    @contextlib.contextmanager
    def paused(self):
        self.paused_at = time.time()
        try:
            yield
        finally:
            self.paused_seconds += time.time() - self.paused_at
            self.paused_at = None


class Meter:
    """Step statistics summed on the device since the meter started (no host sync), and their time."""

    def __init__(self, clock):
        self.clock = clock
        self.start = clock.now()
        self.sums = {}
        self.steps = 0

    def add(self, stats):
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def seconds(self):
        return self.clock.now() - self.start

    def samples_per_s(self, step_samples):
        return self.steps * step_samples / max(self.seconds(), 1e-9)


class SlowdownWatch:
    """A line when a log window's throughput falls below a third of the median of the earlier
    windows: another job on the same CPU or GPU slowed long runs 10-30x without a word. At most once
    per WARN_SECONDS."""

    HISTORY = 50  # earlier windows the median is taken over
    MIN_HISTORY = 5
    FACTOR = 3.0
    WARN_SECONDS = 300.0

    def __init__(self):
        self.rates = []
        self.last_warning = None

    def warned_recently(self, now):
        if self.last_warning is None:
            return False
        return now - self.last_warning < self.WARN_SECONDS

    def check(self, rate, now):
        """-> the warning for a window of `rate` samples/s at time `now`, or None."""
        earlier = self.rates[-self.HISTORY :]
        self.rates.append(rate)
        if len(earlier) < self.MIN_HISTORY:
            return None
        typical = statistics.median(earlier)
        if rate >= typical / self.FACTOR:
            return None
        if self.warned_recently(now):
            return None
        self.last_warning = now
        return (
            f"slow: {rate:.1f} samples/s in the last log interval, against a median of "
            f"{typical:.1f} before: other processes may be using the CPU or GPU (check with top "
            "or nvidia-smi)"
        )


class Progress:
    """The loop's bookkeeping: the progress bar, the step statistics since the last log line
    (`window`) and since the epoch began (`epoch`), their training time, and the slowdown watch."""

    def __init__(self, run):
        self.bar = tqdm(
            total=run.total_iters, initial=run.iter_num, disable=not run.master, dynamic_ncols=True
        )
        self.clock = TrainingClock()
        self.window = Meter(self.clock)
        self.epoch = Meter(self.clock)
        self.slowdown = SlowdownWatch()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def step_done(self, stats):
        self.window.add(stats)
        self.epoch.add(stats)
        self.bar.update(1)

    def paused(self):
        return self.clock.paused()


def log_train(run, progress):
    """The `train` record of the steps since the last one: mean statistics, samples/s, MFU on CUDA."""
    window = progress.window
    record = {k: float(v) / window.steps for k, v in window.sums.items()}
    record["samples_per_s"] = window.samples_per_s(run.step_samples)
    # model FLOPs utilisation (CUDA only); training costs 3 forward passes
    if run.pretrain and (run.device.type == "cuda"):
        mask_ratio_a = mask_ratio_of(run.cfg, "mask_ratio_a")
        mask_ratio_v = mask_ratio_of(run.cfg, "mask_ratio_v")
        flops = 3 * run.model.flops_per_sample(mask_ratio_a, mask_ratio_v)
        record["mfu"] = flops * record["samples_per_s"] / run.world / run.cfg["peak_flops"]
    progress.window = Meter(progress.clock)
    if not run.master:
        return
    progress.bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
    epoch = run.iter_num / run.iters_per_epoch
    lr = run.optimizer.param_groups[0]["lr"]
    log_line(run.cfg, dict(split="train", iter=run.iter_num, epoch=epoch, lr=lr, **record))
    warning = progress.slowdown.check(record["samples_per_s"], time.time())
    if warning:
        tqdm.write(warning)


def end_epoch(run, progress):
    """Weight averaging, and the epoch's record: throughput over the whole epoch and the loads that
    fell back to an earlier frame because the chosen one was missing (counted from the batches: no
    race between workers)."""
    epoch = run.iter_num // run.iters_per_epoch  # epochs done, 1-based
    if run.wa is not None:
        run.wa.update(run.model, epoch)
    count = torch.tensor([len(run.fallbacks)], device=run.device)
    if run.world > 1:
        dist.all_reduce(count)
    count = int(count.item())
    meter = progress.epoch
    progress.epoch = Meter(progress.clock)
    examples = run.fallbacks[:3]
    run.fallbacks = []
    if not run.master:
        return
    record = dict(
        split="epoch",
        epoch=epoch,
        iter=run.iter_num,
        samples_per_s=meter.samples_per_s(run.step_samples),
        seconds=meter.seconds(),
        frame_fallbacks=count,
        fallback_examples=examples,
    )
    log_line(run.cfg, record)
    if count:
        tqdm.write(
            f"epoch {epoch}: {count} loads used an earlier frame because the chosen one was "
            f"missing, e.g. {', '.join(examples)} (python prepare.py check --data "
            f"{run.cfg['data_train']} --label-csv {run.cfg['label_csv']} lists them all)"
        )


# ----------------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class Due:
    """What the iteration just done asks for."""

    sync: bool  # the host sync: a log line, the NaN check, the ranks' stop/save agreement
    epoch_end: bool
    evaluate: bool
    save: bool
    stop: int = 0  # the signal the ranks agreed to stop on (known after the sync)


def every(it, interval):
    """Iteration `it` closes a stretch of `interval` steps (never for an interval of 0 or less)."""
    return (interval > 0) and (it % interval == 0)


def due_at(run, signal_received):
    """What iteration run.iter_num asks for now that its step is done, one reason per line."""
    cfg = run.cfg
    it = run.iter_num
    last = it == run.total_iters
    epoch_end = it % run.iters_per_epoch == 0
    if cfg["eval_interval"] == 0:
        evaluate = epoch_end
    else:
        evaluate = every(it, cfg["eval_interval"])  # -1: never
    if last:
        evaluate = False  # finish() evaluates the last step
    reasons_to_save = [
        last,
        evaluate,
        epoch_end and cfg["save_epochs"],
        every(it, cfg["save_interval"]),
    ]
    reasons_to_sync = [
        any(reasons_to_save),
        epoch_end,
        every(it, cfg["log_interval"]),
        signal_received and (run.world == 1),  # under torchrun the ranks agree at the next log line
    ]
    sync = any(reasons_to_sync)
    save = any(reasons_to_save)
    return Due(sync=sync, epoch_end=epoch_end, evaluate=evaluate, save=save)


def loop(run, guard):
    """The training steps from run.iter_num to total_iters, inside `guard` (checkpoint.Safeguard): a
    signal ends the loop after the step, saved; an error saves the last completed step."""
    with Progress(run) as progress:
        while run.iter_num < run.total_iters:
            set_lr(run)
            stats = train_step(run)
            run.iter_num += 1
            guard.step_done(stats)
            progress.step_done(stats)
            due = due_at(run, guard.received)
            if due.sync:
                stop, save_now = guard.agree()  # raises NonFiniteLoss after a NaN on any rank
                due = dataclasses.replace(due, stop=stop, save=due.save or save_now)
                log_train(run, progress)
            with progress.paused():  # evaluation and checkpoints are not training time
                if due.epoch_end:
                    end_epoch(run, progress)
                if due.evaluate and (not due.stop):
                    update_best(run, evaluate(run))
                if due.save:
                    save_checkpoint(run)
            if due.stop:
                guard.say_stopped()
                return


# ----------------------------------------------------------------------------------------------------------
# The start and the end of a run


def finish(run):
    """After the last step: the weights the run reports (the weight average; when fine-tuning, the
    best validation weights, as the official code does; else the last ones), evaluated on all
    frames, saved, and the picture."""
    reported = None
    if (run.wa is not None) and run.wa.count:
        reported = run.wa.averaged(run.model.state_dict())
    elif run.cfg["select_best"] and (not run.pretrain):
        if run.last_eval_iter != run.iter_num:  # the last weights are candidates too
            update_best(run, evaluate(run))
        if run.best_iter not in (None, run.iter_num):
            if run.world > 1:
                dist.barrier()  # rank 0 has written best.pt
            reported = read_checkpoint(run.path("best.pt"), map_location=run.device)["model"]
    last_state = None  # the training state, kept for a resume when the reported weights differ from it
    if reported is not None:
        last_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        run.model.load_state_dict(reported)
    final = evaluate(run, final=True)
    save_checkpoint(run, model_last=last_state)
    if run.master:
        import pictures  # only here, at the end of a run

        picture = pictures.train_picture(run.path("log.jsonl"))
        if picture is not None:
            picture.save(run.path("train.png"))
    return dict(model=run.model, iter_num=run.iter_num, final=final, stopped=False)


def prepare_out_dir(cfg):
    """out_dir, created and written to (config.json): a folder that cannot be written is named here,
    before the run starts. A new run (load_start has checked overwrite) starts a new log and has no
    best weights yet."""
    out_dir = cfg["out_dir"]
    try:
        os.makedirs(out_dir, exist_ok=True)
        if cfg["init_from"] != "resume":
            for name in ("log.jsonl", "best.pt"):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    except OSError as e:
        raise WriteError(
            f"out_dir={out_dir} cannot be written ({e.strerror or e}): choose another --out_dir"
        ) from None


def start_log(run, report):
    """out_dir and its config.json, the log (a resumed run's cut at the checkpoint), one line that
    says what is about to run, and how the model's input sizes change the data (data.adaptation_notes)."""
    cfg = run.cfg
    mcfg = run.mcfg
    d = run.data
    prepare_out_dir(cfg)
    if cfg["init_from"] == "resume":
        trim_log(run.path("log.jsonl"), run.iter_num)
    params = num_params(run.model, trainable_only=False)
    trained = num_params(run.model)
    classes = f", {run.num_classes} classes" if run.num_classes else ""
    compiled = ", compiled" if cfg["compile"] else ""
    preprocessing = "device" if d["prep"] else "worker"
    parts = [
        f"{cfg['task']}: {params / 1e6:.2f}M params ({trained / 1e6:.2f}M trained)",
        f"audio {mcfg.audio_length}x{mcfg.num_mel_bins}, image {mcfg.img_size}",
        f"data {len(d['train_ds'])} train, {len(d['val_ds'])} val{classes}",
        f"{run.device} {run.dtype} x{run.world}{compiled}, {preprocessing} preprocessing",
        f"{run.total_iters} iters of {run.step_samples} clips ({run.iters_per_epoch}/epoch) "
        f"from iter {run.iter_num}",
    ]
    print(" | ".join(parts))
    if report:
        print(f"init_from {cfg['init_from']}: {report}")
    said = set()  # data_val may be data_train
    for ds in (d["train_ds"], d["val_ds"]):
        notes = data.adaptation_notes(ds.datafile, ds.rows, mcfg.img_size, mcfg.audio_length, ds.num_frames)
        for note in notes:
            if note not in said:
                print(note)
                said.add(note)


def train(cfg, device, rank=0, world=1, resume_cmd=""):
    """Build the run, loop over the steps, finish: the whole of training in the order it happens."""
    run, report = build_run(cfg, device, rank, world)
    try:
        if run.master:
            start_log(run, report)
        with Safeguard(run, resume_cmd) as guard:
            loop(run, guard)
        if guard.stopped:
            return dict(model=run.model, iter_num=run.iter_num, stopped=True, signal=guard.stopped)
        try:
            return finish(run)
        except (Exception, KeyboardInterrupt) as error:  # ckpt.pt holds the last step: resume finishes
            guard.say_how_to_resume(error)
            raise
    finally:
        run.batches = None  # the loader workers stop now, not whenever the run is collected
        run.data = None


# ----------------------------------------------------------------------------------------------------------
# The command line


DATA_FLAGS = ("--data_train=", "--data_val=", "--label_csv=", "--dataset_mean=", "--dataset_std=")


def next_commands(cfg, argv):
    """What to run next: fine-tuning and evaluation after pretraining, evaluation after fine-tuning."""
    ckpt = os.path.join(cfg["out_dir"], "ckpt.pt")
    evaluate_on = f"--checkpoint {ckpt} --data {cfg['data_val']}"
    if cfg["task"] == "finetune":
        classify = f"python eval.py classify {evaluate_on} --label_csv {cfg['label_csv']}"
        return [f"{classify} --frames all"]
    configs = [a for a in argv if not a.startswith("--")]
    finetune_configs = [
        c.replace("pretrain", "finetune") for c in configs if "pretrain" in os.path.basename(c)
    ]
    data_flags = [a for a in argv if a.startswith(DATA_FLAGS)]
    if finetune_configs and os.path.isfile(finetune_configs[-1]):  # its own out_dir
        finetune = [finetune_configs[-1], *data_flags]
    else:
        data_settings = [f"--{k}={cfg[k]}" for k in DATA_FILES]
        finetune = ["--task=finetune", *data_settings, f"--out_dir={cfg['out_dir']}_finetune"]
    return [
        " ".join(["python train.py", *finetune, f"--init_from={ckpt}"]),
        f"python eval.py retrieval {evaluate_on}",
        f"python eval.py inpaint {evaluate_on} --out {os.path.join(cfg['out_dir'], 'inpaint')}",
    ]


def summary(cfg, result, argv, minutes):
    """The end of a run in a few lines: the final metrics, where the files are, what to run next."""
    out_dir = cfg["out_dir"]
    final = result["final"]
    lines = [f"done: {cfg['task']}, {result['iter_num']} iterations in {minutes:.1f} min"]
    if cfg["task"] == "pretrain":
        lines.append("  final retrieval      R@1     R@5     R@10    median rank")
        for name, key in (("audio->visual", "a2v"), ("visual->audio", "v2a")):
            recalls = "  ".join(f"{final[f'{key}_{k}']:.4f}" for k in ("R1", "R5", "R10"))
            lines.append(f"  {name:18s} {recalls}  {final[f'{key}_MR']:g}")
    else:
        metric = cfg["metric"]
        lines.append(
            f"  final {metric} {final[metric]:.4f} (middle frame), {final[f'{metric}_frames']:.4f} "
            f"(averaged over {cfg['num_frames']} frames)"
        )
    lines.append(f"  weights {os.path.join(out_dir, 'ckpt.pt')}")
    log = os.path.join(out_dir, "log.jsonl")
    picture = os.path.join(out_dir, "train.png")
    lines.append(f"  log     {log}, picture {picture}")
    lines.append("next:")
    lines += [f"  {command}" for command in next_commands(cfg, argv)]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    cfg = configure(argv)
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = int(os.environ["RANK"]) if ddp else 0
    world = int(os.environ["WORLD_SIZE"]) if ddp else 1
    device = resolve_device(cfg["device"])
    if ddp:
        if device.type == "cuda":
            device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=cfg["ddp_timeout_minutes"]),
        )
    launcher = f"torchrun --nproc_per_node={world}" if ddp else "python"
    kept = [a for a in argv if not a.startswith(("--init_from=", "--overwrite="))]
    resume_cmd = " ".join([launcher, "train.py", *kept, "--init_from=resume"])
    try:
        result = train(cfg, device, rank, world, resume_cmd)
    finally:
        if ddp:
            dist.destroy_process_group()
    if (rank == 0) and (not result["stopped"]):
        print(summary(cfg, result, argv, (time.time() - started) / 60))
    return result


def exit_status(result):
    """0 when the run ended; 128 + the signal's number when a signal stopped it (saved), as a shell
    reports a process that a signal ended: `... && python train.py config/finetune_...` stops."""
    if result["stopped"]:
        return 128 + result["signal"]
    return 0


if __name__ == "__main__":
    try:
        status = exit_status(main())
    except (ConfigError, NonFiniteLoss, data.DataError, WriteError) as e:
        sys.exit(f"error: {one_line(e)}")  # status 1
    except KeyboardInterrupt:  # Ctrl-C outside the loop: building the run or the final evaluation
        print("\ninterrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    sys.exit(status)
