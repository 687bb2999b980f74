"""
Train CAV-MAE: self-supervised pretraining (task='pretrain') or fine-tuning a classifier (task='finetune').

    python train.py config/pretrain_synthetic.py                      # the CPU demo, a few minutes
    python train.py config/pretrain_synthetic.py --batch_size=32 --out_dir=out/x
    python train.py config/pretrain_synthetic.py --init_from=resume   # continue out_dir/ckpt.pt exactly
    torchrun --standalone --nproc_per_node=4 train.py config/pretrain_audioset.py

Settings: the defaults below (the paper's base pretraining recipe), then each config file (plain Python
assignments), then --key=value flags (configurator.py). Model fields are set with --model_<field>=value (e.g.
--model_embed_dim=256) on top of --model_preset. batch_size is per process and micro-step: one optimizer step sees
batch_size x grad_accum x world_size clips, and the contrastive negatives are the batch_size clips of one step on
one process (the official code: the per-GPU batch) unless gather_negatives=True.

Read train() first: it builds a Run, then loops over train_step, logging, epoch ends, evaluation and checkpoints.
Long runs lose minutes, not hours: a checkpoint at every evaluation, every save_interval steps or save_minutes,
on SIGINT/SIGTERM, and on any error inside the loop (the state after the last completed step).
"""

import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import signal
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
    WeightAverage,
    architecture_from,
    atomic_save,
    load_pretrained,
    load_start,
    restore_rngs,
    rng_state,
    save_checkpoint,
    weights_entry,
)
from configurator import ConfigError
from eval import average_frames, classification_metrics, retrieval_metrics
from loader import build_data, gather_in_order, to_device
from model import (
    CAVMAE,
    FT_MODES,
    MASK_MODES,
    CAVMAEClassifier,
    CAVMAEConfig,
    apply_compile,
    pooled_representation,
)
from pictures import loss_picture

# ----------------------------------------------------------------------------------------------------------
# default config: CAV-MAE base pretraining on AudioSet-2M (paper.md, "Official recipes")
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
dataset_mean, dataset_std = data.AUDIOSET_MEAN, data.AUDIOSET_STD  # fbank normalisation (also for VGGSound)
freqm, timem = 0, 0  # SpecAugment frequency / time mask widths (fine-tuning: 48 / 192)
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
mask_ratio_a, mask_ratio_v = -1.0, -1.0  # per modality; < 0: use mask_ratio
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
wa_start, wa_end = 1, 10
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
lrscheduler_start, lrscheduler_step, lrscheduler_decay = 10, 5, 0.5
warmup_iters, min_lr_ratio = 0, 0.0  # cosine schedule: linear warm-up steps, final lr / lr
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = "auto"  # 'auto' (CUDA: bfloat16, or float16 + GradScaler where no bf16; CPU: float32)
compile = False  # compile each transformer block on its own (model.apply_compile)
ddp_timeout_minutes = 30.0  # torchrun: how long a rank waits for the others in a collective
seed = 0
peak_flops = 989e12  # for MFU: H100 SXM dense bf16
DEFAULTS = {
    k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (bool, int, float, str, tuple)
}
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


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


def configure(argv):
    """Defaults <- config files <- --key=value flags (configurator.py); model_<field> keys only where set.
    -h / --help prints every setting with its default and the comment beside it above, and exits."""
    if configurator.wants_help(argv):
        print(configurator.usage(__file__, DEFAULTS, CHOICES, model_class=CAVMAEConfig))
        sys.exit(0)
    model_fields = {"model_" + f.name: f.default for f in dataclasses.fields(CAVMAEConfig)}
    return configurator.configure(argv, DEFAULTS, CHOICES, optional=model_fields)


def model_config(cfg, model_args=None, resume=False):
    """The architecture: a resumed checkpoint's; else a checkpoint of ours with the --model_<field> values that
    differ from the paper's model (e.g. --model_audio_length=512: load_pretrained cuts the audio positions); else
    the preset with the model_<field> overrides."""
    overrides = architecture_from(cfg)  # the model_<field> keys that are set
    if model_args is None:
        return CAVMAEConfig.from_preset(cfg["model_preset"], **overrides)
    if resume:
        return CAVMAEConfig(**model_args)
    paper = CAVMAEConfig()
    changed = {k: v for k, v in overrides.items() if v != getattr(paper, k)}
    return CAVMAEConfig(**{**model_args, **changed})


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
    step_model: torch.nn.Module  # what a training step calls: the same model, DDP-wrapped under torchrun
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
    step_rng: dict = None  # RNG states after the last completed step (an error's checkpoint)
    updating: bool = False  # inside optimizer.step: the weights are not consistent
    nonfinite: torch.Tensor = None  # steps with a NaN/inf loss, counted on the device (no host sync per step)
    fallbacks: list = dataclasses.field(default_factory=list)  # this epoch's missing frames
    resume_cmd: str = ""

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


def resolve_dtype(
    cfg, device
):  # 'auto': bf16 on CUDA, fp16 (the official AMP) where it has none, fp32 on CPU
    if cfg["dtype"] != "auto" or device.type != "cuda":
        return "float32" if cfg["dtype"] == "auto" else cfg["dtype"]
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def build_model(cfg, mcfg, num_classes, ckpt, init):
    """The model with its initial weights (seeded: the same on every rank), pretrained or resumed."""
    torch.manual_seed(cfg["seed"])
    model = CAVMAE(mcfg) if num_classes is None else CAVMAEClassifier(mcfg, num_classes)
    report = load_pretrained(model, init) if init is not None else None
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
            params=[p for p in model.parameters() if p.requires_grad and (id(p) in head) == is_head],
            lr_scale=cfg["head_lr"] if is_head else 1.0,
        )
        for is_head in (False, True)
    ]
    return (torch.optim.Adam if cfg["optimizer"] == "adam" else torch.optim.AdamW)(
        [g for g in groups if g["params"]],
        lr=cfg["lr"],
        betas=cfg["betas"],
        weight_decay=cfg["weight_decay"],
        **({"fused": True} if device.type == "cuda" else {}),
    )


def build_run(cfg, device, rank, world, resume_cmd=""):
    ckpt, init = load_start(cfg, os.path.join(cfg["out_dir"], "ckpt.pt"))
    ours = (ckpt or init) if isinstance(ckpt or init, dict) else {}
    mcfg = model_config(cfg, ours.get("model_args"), resume=ckpt is not None)
    for key, size in (("target_length", mcfg.audio_length), ("image_size", mcfg.img_size)):
        if cfg[key] not in (0, size):
            raise ConfigError(f"{key}={cfg[key]} but the model takes {size}: set {key}=0 or change the model")
    sampler = ckpt["sampler"] if ckpt else dict(epoch=0, start=0)
    loaders = build_data(cfg, mcfg, device, rank, world, sampler["epoch"], sampler["start"])
    num_classes = None if cfg["task"] == "pretrain" else loaders["train_ds"].num_classes
    model, report = build_model(cfg, mcfg, num_classes, ckpt, init)
    model.to(device)
    dtype = resolve_dtype(cfg, device)
    total_iters = cfg["max_iters"] if cfg["max_iters"] > 0 else cfg["epochs"] * loaders["iters_per_epoch"]
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
        nonfinite=torch.zeros((), device=device),
        resume_cmd=resume_cmd,
    )
    run.wa = WeightAverage(cfg["wa_start"], cfg["wa_end"], ckpt and ckpt["wa"]) if cfg["wa"] else None
    if ckpt is not None:
        run.optimizer.load_state_dict(ckpt["optimizer"]), run.scaler.load_state_dict(ckpt["scaler"])
        run.iter_num, run.best_metric, run.best_iter = (
            ckpt["iter_num"],
            ckpt["best_metric"],
            ckpt.get("best_iter"),
        )
        run.saved_iter = run.iter_num
    restore_rngs(cfg, rank, device, ckpt)
    if cfg["compile"]:
        apply_compile(model)  # regional: each block on its own; same state-dict keys, same random draws
    if (
        world > 1
    ):  # branches that a loss weight of 0 or a fine-tuning stream leave out have no gradient; so do the
        # single-modality norms of all but the last joint block under the official contrastive-stream quirk
        unused = (
            num_classes is not None
            or cfg["mae_weight"] == 0
            or cfg["contrastive_weight"] == 0
            or (mcfg.joint_depth > 1 and mcfg.official_contrastive_streams)
        )
        run.step_model = DDP(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
        )
        run.gather = GatherWithGrad.apply if cfg["gather_negatives"] else None
    run.batches = iter(loaders["train_loader"])
    return run, report


# ----------------------------------------------------------------------------------------------------------
# Objectives and a training step


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of every rank's loss w.r.t. its own slice: the
    `gather` of model.contrastive_loss for negatives from every rank (gather_negatives=True)."""

    @staticmethod
    def forward(ctx, x):  # (B, D) -> (world * B, D)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):  # (world * B, D) -> (B, D)
        # Every rank computes the same loss over all gathered clips; summing their gradients here and DDP's mean
        # over ranks afterwards give each parameter the gradient of that one loss.
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over the ranks' losses
        B = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * B : (dist.get_rank() + 1) * B]


def pretrain_kwargs(cfg):
    ratios = {k: cfg[k] if cfg[k] >= 0 else cfg["mask_ratio"] for k in ("mask_ratio_a", "mask_ratio_v")}
    return dict(
        **ratios, **{k: cfg[k] for k in ("mae_weight", "contrastive_weight", "mask_mode", "bidirectional")}
    )


def classification_loss(logits, label, kind):
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), label)
    return F.cross_entropy(logits.float(), label)  # soft targets (mixup, smoothing), as the official loss


def compute_loss(model, audio, image, label, cfg, gather=None):
    """-> (loss to minimise, dict of detached scalars to log)."""
    if cfg["task"] == "pretrain":
        out = model(audio, image, gather=gather, **pretrain_kwargs(cfg))
        return out["loss"], {
            k: out[k].detach() for k in ("loss", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")
        }
    loss = classification_loss(model(audio, image, mode=cfg["ftmode"]), label, cfg["loss"])
    return loss, {"loss": loss.detach()}


def train_step(run):
    """One optimizer step over grad_accum micro-batches -> the step's statistics as device scalars (no host sync)."""
    cfg, accum, stats = run.cfg, run.cfg["grad_accum"], {}
    for micro in range(accum):
        batch = next(run.batches)
        run.fallbacks += batch["fallbacks"]
        audio, image, label = to_device(batch, run.data["prep"], run.device)
        sync = run.step_model is run.model or micro == accum - 1  # DDP: all-reduce gradients on the last one
        with contextlib.nullcontext() if sync else run.step_model.no_sync(), run.autocast:
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
        return cfg["lrscheduler_decay"] ** len(
            range(cfg["lrscheduler_start"], epoch + 1, cfg["lrscheduler_step"])
        )
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


@torch.no_grad()
def evaluate_pretrain(run):
    """Validation losses (masks from a fixed seed; under torchrun each rank masks its own share) and audio<->visual
    retrieval from mean-pooled, L2-normalised coordinated tokens (Sec. 4.2), over the whole validation set."""
    cfg, model, sums, audio_emb, visual_emb = run.cfg, run.model, {}, [], []
    python_state = random.getstate()  # structured masking draws from Python's RNG
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(cfg["seed"]), random.seed(cfg["seed"])
        for audio, image, label in val_batches(run):
            with run.autocast:
                _, stats = compute_loss(model, audio, image, label, cfg)
                a, v = model.embed(audio, image)  # (B, La, D), (B, Lv, D)
            for k, val in stats.items():
                sums[k] = sums.get(k, 0.0) + val.double() * len(audio)
            sums["n"] = sums.get("n", 0.0) + len(audio)
            audio_emb.append(pooled_representation(a).cpu())  # (B, D)
            visual_emb.append(pooled_representation(v).cpu())
    random.setstate(python_state)
    keys = list(sums)
    totals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=run.device) for k in keys])
    if run.world > 1:
        dist.all_reduce(totals)
    audio_emb, visual_emb = gather_in_order(
        [torch.cat(audio_emb), torch.cat(visual_emb)], run.rank, run.world
    )
    sim = audio_emb @ visual_emb.T  # (N, N), rows = audio clips
    a2v, v2a = retrieval_metrics(sim), retrieval_metrics(sim.T)
    losses = {k: float(t / totals[-1]) for k, t in zip(keys[:-1], totals[:-1])}
    return {**losses, "a2v_R1": a2v["R1"], "v2a_R1": v2a["R1"], "a2v_R5": a2v["R5"], "v2a_R5": v2a["R5"]}


@torch.no_grad()
def predict(run, frame=None):
    """Logits (N, K) float32 and targets (N, K) of the whole validation set at `frame` (None: the middle one)."""
    logits, targets = [], []
    for audio, image, label in val_batches(run, frame):
        with run.autocast:
            logits.append(run.model(audio, image, mode=run.cfg["ftmode"]).float().cpu())
        targets.append(label.float().cpu())
    return gather_in_order([torch.cat(logits), torch.cat(targets)], run.rank, run.world)


def evaluate_finetune(run, all_frames=False):
    """Middle-frame metrics; with all_frames, also the official multi-frame evaluation: probabilities (sigmoid
    for mAP runs, softmax for acc runs) averaged over the num_frames frames (preprocessing.md 4.4)."""
    cfg = run.cfg
    logits, targets = predict(run)
    m = classification_metrics(logits, targets)
    out = dict(
        loss=float(classification_loss(logits, targets, cfg["loss"])),
        mAP=m["mAP"],
        mAUC=m["mAUC"],
        d_prime=m["d_prime"],
        acc=m["acc"],
    )
    if all_frames:
        per_frame = torch.stack(
            [predict(run, frame)[0] for frame in range(cfg["num_frames"])]
        )  # (frames, N, K)
        probs = average_frames(per_frame, "sigmoid" if cfg["metric"] == "mAP" else "softmax")
        m = classification_metrics(probs, targets)
        out.update({f"{k}_frames": m[k] for k in ("mAP", "mAUC", "d_prime", "acc")})
    return out


def main_metric(cfg, metrics):
    return (
        (metrics["a2v_R1"] + metrics["v2a_R1"]) / 2 if cfg["task"] == "pretrain" else metrics[cfg["metric"]]
    )


def eager_evaluation():
    """Compiled blocks run eagerly in evaluation: graphs without gradients would need compiling again."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def evaluate(run, final=False):
    """Evaluate the plain model on data_val (every rank its share); rank 0 logs and prints the metrics."""
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
    """Keep the best validation weights by the main metric in out_dir/best.pt (the official fine-tuning keeps its
    best_audio_model.pth and evaluates it at the end)."""
    value = main_metric(run.cfg, metrics)
    if run.best_metric is not None and value <= run.best_metric:
        return
    run.best_metric, run.best_iter = value, run.iter_num
    if run.master:
        atomic_save(dict(weights_entry(run), iter_num=run.iter_num, metric=value), run.path("best.pt"))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and the log


def save_on_error(run, error):
    """An exception inside the loop: save the state after the last completed step before the error propagates,
    and say how to resume. A NaN keeps the last good checkpoint instead; so does an error inside the weight update.
    Under torchrun rank 0 saves alone, without the other ranks' RNG streams; an error on another rank leaves rank
    0 waiting in a collective until torchrun or the NCCL timeout ends it, with the last regular checkpoint."""
    if isinstance(error, NonFiniteLoss) or run.updating or not run.master:
        return
    try:
        if run.nonfinite.item():  # a NaN since the last check: the last good checkpoint stays
            return
    except Exception:  # a broken device cannot tell
        return
    if run.saved_iter != run.iter_num:
        try:
            save_checkpoint(run, rngs=[run.step_rng] if run.world == 1 else [])
        except Exception as e:  # the original error matters more
            print(f"could not save a checkpoint after the error: {e}", file=sys.stderr)
            return
    if run.iter_num > 0 or run.cfg["init_from"] == "resume":  # else ckpt.pt is not this run's
        print(
            f"\n{type(error).__name__} after iter {run.iter_num}: {run.path('ckpt.pt')} holds that state; once the "
            f"cause is fixed, continue with:\n  {run.resume_cmd}",
            file=sys.stderr,
        )


def log_line(cfg, record):
    with open(os.path.join(cfg["out_dir"], "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------------
# The loop


class StopSignal:
    """SIGINT / SIGTERM while the loop runs set `requested`: the loop saves after the step and returns."""

    def __enter__(self):
        self.requested = False
        self.previous = {
            s: signal.signal(s, lambda *_: setattr(self, "requested", True))
            for s in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@dataclasses.dataclass
class Meter:
    """Step statistics summed on the device since `start`, and the training time they took (evaluation and
    checkpoint time, added to `paused`, excluded)."""

    sums: dict = dataclasses.field(default_factory=dict)
    steps: int = 0
    start: float = dataclasses.field(default_factory=time.time)
    paused: float = 0.0

    def add(self, stats):
        self.sums = {k: self.sums.get(k, 0.0) + v for k, v in stats.items()}
        self.steps += 1

    def samples_per_s(self, step_samples):
        return self.steps * step_samples / max(time.time() - self.start - self.paused, 1e-9)


def check_point(run, stop):
    """The loop's one host sync (at log intervals, evaluations, saves): a NaN/inf loss on any rank raises
    NonFiniteLoss; the ranks agree on stopping after a signal and on a save that save_minutes asks for."""
    due = run.cfg["save_minutes"] > 0 and time.time() - run.last_save > 60 * run.cfg["save_minutes"]
    flags = torch.cat(
        [run.nonfinite.view(1), torch.tensor([float(stop.requested), float(due)], device=run.device)]
    )
    if run.world > 1:
        dist.all_reduce(flags)  # any rank's NaN, signal or clock counts for all
    bad, stopping, save_due = flags.tolist()
    if bad:
        raise NonFiniteLoss(
            f"non-finite loss at iter {run.iter_num}: stopped; {run.path('ckpt.pt')} (if any) keeps "
            "the last good state: continue with --init_from=resume and a lower lr or --grad_clip=1.0"
        )
    return stopping > 0, save_due > 0


def log_train(run, meter, bar):
    record = {k: float(v) / meter.steps for k, v in meter.sums.items()}
    record["samples_per_s"] = meter.samples_per_s(run.step_samples)
    if run.pretrain and run.device.type == "cuda":  # model FLOPs utilisation; training = 3 forward passes
        ratios = pretrain_kwargs(run.cfg)
        flops = 3 * run.model.flops_per_sample(ratios["mask_ratio_a"], ratios["mask_ratio_v"])
        record["mfu"] = flops * record["samples_per_s"] / run.world / run.cfg["peak_flops"]
    if run.master:
        bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
        log_line(
            run.cfg,
            dict(
                split="train",
                iter=run.iter_num,
                epoch=run.iter_num / run.iters_per_epoch,
                lr=run.optimizer.param_groups[0]["lr"],
                **record,
            ),
        )


def end_epoch(run, meter):
    """Weight averaging, and the epoch's record: throughput over the whole epoch and the loads that fell back to
    an earlier frame because the chosen one was missing (counted from the batches: no race between workers)."""
    epoch = run.iter_num // run.iters_per_epoch  # epochs done, 1-based
    if run.wa is not None:
        run.wa.update(run.model, epoch)
    count = torch.tensor([len(run.fallbacks)], device=run.device)
    if run.world > 1:
        dist.all_reduce(count)
    count = int(count.item())
    if run.master:
        log_line(
            run.cfg,
            dict(
                split="epoch",
                epoch=epoch,
                iter=run.iter_num,
                samples_per_s=meter.samples_per_s(run.step_samples),
                seconds=time.time() - meter.start - meter.paused,
                frame_fallbacks=count,
                fallback_examples=run.fallbacks[:3],
            ),
        )
        if count:
            tqdm.write(
                f"epoch {epoch}: {count} loads used an earlier frame because the chosen one was missing, "
                f"e.g. {', '.join(run.fallbacks[:3])} (python data.py --check lists them all)"
            )
    run.fallbacks = []


def loop(run):
    """The training steps from run.iter_num to total_iters. Returns True when a signal stopped it (saved)."""
    cfg, bar = (
        run.cfg,
        tqdm(total=run.total_iters, initial=run.iter_num, disable=not run.master, dynamic_ncols=True),
    )
    window, epoch_meter = Meter(), Meter()
    try:
        with StopSignal() as stop:
            while run.iter_num < run.total_iters:
                set_lr(run)
                stats = train_step(run)
                run.iter_num, run.nonfinite = run.iter_num + 1, run.nonfinite + ~torch.isfinite(stats["loss"])
                run.step_rng = (
                    rng_state(run.device) if run.world == 1 else None
                )  # evaluation leaves it as it is
                window.add(stats), epoch_meter.add(stats), bar.update(1)
                it, last = run.iter_num, run.iter_num == run.total_iters
                epoch_end = it % run.iters_per_epoch == 0
                want_eval = not last and (
                    cfg["eval_interval"] > 0
                    and it % cfg["eval_interval"] == 0
                    or cfg["eval_interval"] == 0
                    and epoch_end
                )
                want_save = (
                    last
                    or want_eval
                    or epoch_end
                    and cfg["save_epochs"]
                    or cfg["save_interval"] > 0
                    and it % cfg["save_interval"] == 0
                )
                stopping = save_due = False
                if (
                    want_save
                    or epoch_end
                    or it % cfg["log_interval"] == 0
                    or stop.requested
                    and run.world == 1
                ):
                    stopping, save_due = check_point(run, stop)
                    log_train(run, window, bar)
                    window = Meter()
                paused_at = time.time()
                if epoch_end:
                    end_epoch(run, epoch_meter)
                if want_eval and not stopping:
                    update_best(run, evaluate(run))
                if want_save or stopping or save_due:
                    save_checkpoint(run)
                window.paused += time.time() - paused_at
                epoch_meter = (
                    Meter()
                    if epoch_end
                    else dataclasses.replace(epoch_meter, paused=epoch_meter.paused + time.time() - paused_at)
                )
                if stopping:
                    if run.master:
                        tqdm.write(
                            f"stopped by a signal at iter {it}: saved {run.path('ckpt.pt')}; continue with "
                            f"{run.resume_cmd}"
                        )
                    return True
    except Exception as error:
        save_on_error(run, error)
        raise
    finally:
        bar.close()
    return False


def finish(run):
    """After the last step: the weights the run reports (the weight average; when fine-tuning, the best validation
    weights, as the official code does; else the last ones), evaluated on all frames, saved, and the loss plot."""
    reported = None
    if run.wa is not None and run.wa.count:
        reported = run.wa.averaged(run.model.state_dict())
    elif run.cfg["select_best"] and not run.pretrain:
        if run.last_eval_iter != run.iter_num:  # the last weights are candidates too
            update_best(run, evaluate(run))
        if run.best_iter not in (None, run.iter_num):
            if run.world > 1:
                dist.barrier()  # rank 0 has written best.pt
            reported = torch.load(run.path("best.pt"), map_location=run.device, weights_only=False)["model"]
    last_state = None  # the training state, kept for a resume when the reported weights differ from it
    if reported is not None:
        last_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        run.model.load_state_dict(reported)
    final = evaluate(run, final=True)
    save_checkpoint(run, model_last=last_state)
    if run.master:
        picture = loss_picture(run.path("log.jsonl"))
        if picture is not None:
            picture.save(run.path("loss.png"))
    return dict(model=run.model, iter_num=run.iter_num, final=final, stopped=False)


def start_log(run, report):
    """out_dir, config.json, a fresh log for a new run, and one line that says what is about to run."""
    cfg, mcfg, d = run.cfg, run.mcfg, run.data
    os.makedirs(cfg["out_dir"], exist_ok=True)
    if cfg["init_from"] != "resume":  # a new run (load_start has checked overwrite): a new log, no old best
        for name in ("log.jsonl", "best.pt"):
            if os.path.exists(run.path(name)):
                os.remove(run.path(name))
    with open(run.path("config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    params = sum(p.numel() for p in run.model.parameters())
    trained = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    print(
        f"{cfg['task']}: {params / 1e6:.2f}M params ({trained / 1e6:.2f}M trained) | audio {mcfg.audio_length}x"
        f"{mcfg.num_mel_bins}, image {mcfg.img_size} | data {len(d['train_ds'])} train, {len(d['val_ds'])} val"
        f"{f', {run.num_classes} classes' if run.num_classes else ''} | {run.device} {run.dtype} x{run.world}"
        f"{', compiled' if cfg['compile'] else ''}, {'device' if d['prep'] else 'worker'} preprocessing | "
        f"{run.total_iters} iters of {run.step_samples} clips ({run.iters_per_epoch}/epoch) from iter {run.iter_num}"
        + (f"\ninit_from {cfg['init_from']}: {report}" if report else "")
    )


def train(cfg, device, rank=0, world=1, resume_cmd=""):
    """Build the run, loop over the steps, finish: the whole of training in the order it happens."""
    run, report = build_run(cfg, device, rank, world, resume_cmd)
    try:
        if run.master:
            start_log(run, report)
        if loop(run):
            return dict(model=run.model, iter_num=run.iter_num, stopped=True)
        return finish(run)
    finally:
        run.batches = run.data = None  # the loader workers stop now, not whenever the run is collected


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = configure(argv)
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device_name = cfg["device"] if cfg["device"] != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        if device_name.startswith("cuda"):
            device_name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(device_name)
        dist.init_process_group(
            "nccl" if device_name.startswith("cuda") else "gloo",
            timeout=datetime.timedelta(minutes=cfg["ddp_timeout_minutes"]),
        )
    launcher = f"torchrun --nproc_per_node={world}" if ddp else "python"
    kept = [a for a in argv if not a.startswith(("--init_from=", "--overwrite="))]
    resume_cmd = " ".join([launcher, "train.py", *kept, "--init_from=resume"])
    try:
        return train(cfg, torch.device(device_name), rank, world, resume_cmd)
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, NonFiniteLoss, data.DataError) as e:
        sys.exit(f"error: {e}")
