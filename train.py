"""
Train CAV-MAE: self-supervised pretraining (task='pretrain') or fine-tuning a classifier (task='finetune').

    python train.py config/pretrain_synthetic.py                      # the CPU demo, a few minutes
    python train.py config/pretrain_synthetic.py --batch_size=32 --out_dir=out/x
    python train.py config/pretrain_synthetic.py --init_from=resume   # continue out_dir/ckpt.pt exactly
    torchrun --standalone --nproc_per_node=4 train.py config/pretrain_audioset.py

Settings: the defaults below (the paper's base pretraining recipe), then each config file (plain Python
assignments), then --key=value flags. Model fields are set with --model_<field>=value (e.g. --model_embed_dim=256)
on top of --model_preset. batch_size is per process and micro-step: one optimizer step sees
batch_size x grad_accum x world_size clips, and the contrastive negatives are the batch_size clips of one step on
one process (the official code: the per-GPU batch) unless gather_negatives=True.
"""
import ast
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from eval import average_frames, classification_metrics, retrieval_metrics
from model import FT_MODES, MASK_MODES, CAVMAE, CAVMAEClassifier, CAVMAEConfig, load_pretrained, pooled_representation

# ----------------------------------------------------------------------------------------------------------
# default config: CAV-MAE base pretraining on AudioSet-2M (paper.md, "Official recipes")
# I/O
out_dir = "out/pretrain"
task = "pretrain"              # 'pretrain' (CAV-MAE objective) | 'finetune' (CAVMAEClassifier)
init_from = "scratch"          # 'scratch' | 'resume' (out_dir/ckpt.pt) | a checkpoint (ours, official, ImageNet MAE)
eval_interval = 0              # evaluate (and save) every N iterations; 0 = every epoch; -1 = only at the end
log_interval = 10
# data
data_train = "data/audioset/train.json"
data_val = "data/audioset/eval.json"
label_csv = "data/audioset/class_labels_indices.csv"
target_length = 0              # fbank frames; 0 = the model's audio_length
image_size = 0                 # frame side; 0 = the model's img_size
num_frames = 10
dataset_mean, dataset_std = data.AUDIOSET_MEAN, data.AUDIOSET_STD  # fbank normalisation (also for VGGSound)
freqm, timem = 0, 0            # SpecAugment frequency / time mask widths (fine-tuning: 48 / 192)
mixup = 0.0
noise = True                   # the official noise augmentation (all recipes)
label_smooth = 0.0
balanced_sampling = False      # sample clips with the official per-label weights 1000 / (count + 0.01)
num_workers = 4
gpu_preprocess = "auto"        # 'auto' (on for CUDA) | 'on' | 'off': workers decode; fbank, augmentation on device
on_error = "raise"             # 'raise' | 'skip' unreadable rows (data.AVDataset)
# model
model_preset = "base"          # model.PRESETS name; single fields via --model_<field>=value
# pretraining objective (Sec. 3)
mae_weight = 1.0
contrastive_weight = 0.01      # lambda_c; 0 = AV-MAE
mask_ratio = 0.75
mask_ratio_a, mask_ratio_v = -1.0, -1.0  # per modality; < 0: use mask_ratio
mask_mode = "unstructured"     # audio masking: 'unstructured' | 'time' | 'freq' | 'tf'
bidirectional = False          # contrastive loss in both directions (official: one)
gather_negatives = False       # DDP: negatives from all ranks (all_gather with gradient)
# fine-tuning
ftmode = "multimodal"          # multimodal | audioonly | videoonly | missingaudioonly | missingvideoonly
head_lr = 100.0                # the new head's lr multiplier
freeze_base = False            # linear probing: train the head only
loss = "bce"                   # 'bce' (multi-label) | 'ce' (single-label)
metric = "mAP"                 # 'mAP' | 'acc': main metric, and sigmoid vs softmax in the multi-frame evaluation
wa = False                     # average the weights of epochs wa_start..wa_end (1-based) before the final evaluation
wa_start, wa_end = 1, 10
# optimisation
optimizer = "adam"             # 'adam' (official: L2 weight decay) | 'adamw'
lr = 5e-5
weight_decay = 5e-7
betas = (0.95, 0.999)
epochs = 25
max_iters = 0                  # > 0: stop after this many optimizer steps, whatever `epochs` says
batch_size = 48
grad_accum = 1
grad_clip = 0.0                # 0 = off
lr_schedule = "step"           # 'step' (official: x decay every `step` epochs from epoch `start`) | 'cosine'
lrscheduler_start, lrscheduler_step, lrscheduler_decay = 10, 5, 0.5
warmup_iters, min_lr_ratio = 0, 0.0  # cosine schedule: linear warm-up steps, final lr / lr
# system
device = "auto"                # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = "auto"                 # 'auto' (bfloat16 on CUDA, else float32) | 'float32' | 'bfloat16' | 'float16'
compile = False
seed = 0
peak_flops = 989e12            # for MFU: H100 SXM dense bf16
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (bool, int, float, str, tuple)}
CHOICES = dict(task=("pretrain", "finetune"), optimizer=("adam", "adamw"), lr_schedule=("step", "cosine"),
               loss=("bce", "ce"), metric=("mAP", "acc"), dtype=("auto", "float32", "bfloat16", "float16"),
               gpu_preprocess=("auto", "on", "off"), mask_mode=MASK_MODES, ftmode=FT_MODES, on_error=("raise", "skip"))
# ----------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """An unknown config key or a value of the wrong type."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


def model_fields():
    return {"model_" + f.name: getattr(CAVMAEConfig(), f.name) for f in dataclasses.fields(CAVMAEConfig)}


def check_value(key, value, default):
    """`value` as the type of `default`, or a ConfigError naming the key."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if type(value) is not kind or (kind is tuple and len(value) != len(default)):
        raise ConfigError(f"{key}={value!r}: expected {kind.__name__} like the default {default!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(CHOICES[key])}")
    return value


def parse_flag(key, text, default):
    if isinstance(default, bool):
        table = {"true": True, "1": True, "false": False, "0": False}
        if text.lower() not in table:
            raise ConfigError(f"--{key}={text}: expected a bool (True/False/true/false/1/0)")
        return table[text.lower()]
    if isinstance(default, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--{key}={text}: not a {type(default).__name__} literal") from None


def configure(argv):
    """Defaults <- config files (positional args) <- --key=value flags; returns the resolved config dict."""
    cfg, known = dict(DEFAULTS), {**DEFAULTS, **model_fields()}
    for arg in argv:
        if not arg.startswith("--"):  # a config file: its top-level assignments
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} not found")
            namespace = {}
            exec(open(arg).read(), namespace)
            items = [(k, v) for k, v in namespace.items() if not k.startswith("_") and not callable(v)
                     and type(v).__name__ != "module"]
            where = f" in {arg}"
        else:
            if "=" not in arg:
                raise ConfigError(f"{arg}: flags take the form --key=value")
            key, text = arg[2:].split("=", 1)
            items, where = [(key, parse_flag(key, text, known[key]) if key in known else None)], ""
        for key, value in items:
            if key not in known:
                close = [k for k in known if k.split("_")[0] == key.split("_")[0]][:6]
                hint = f" (similar: {', '.join(close)})" if close else ""
                raise ConfigError(f"unknown config key {key!r}{where}{hint}")
            cfg[key] = check_value(key, value, known[key])
    return cfg


def model_config(cfg, model_args=None):
    if model_args is not None:  # a checkpoint of ours fixes the architecture
        return CAVMAEConfig(**model_args)
    overrides = {k[len("model_"):]: v for k, v in cfg.items() if k.startswith("model_") and k != "model_preset"}
    return CAVMAEConfig.from_preset(cfg["model_preset"], **overrides)


# ----------------------------------------------------------------------------------------------------------
# Data: an epoch-seeded order, and per-item randomness that depends only on (seed, epoch, position)


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, position, index) for this rank: a permutation (or class-balanced draw with replacement)
    seeded by (seed, epoch), split across ranks like DistributedSampler (the remainder dropped), from position
    `start` on. (epoch, start) is all a resumed run needs to continue the same order."""

    def __init__(self, n, seed, rank=0, world=1, weights=None):
        self.n, self.seed, self.rank, self.world, self.weights = n, seed, rank, world, weights
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.n // self.world - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = (torch.multinomial(self.weights, self.n, replacement=True, generator=g) if self.weights is not None
                 else torch.randperm(self.n, generator=g)).tolist()
        for j in range(self.start, self.n // self.world):
            position = j * self.world + self.rank
            yield self.epoch, position, order[position]


class SeededItems(torch.utils.data.Dataset):
    """ds[index] with Python, NumPy and torch RNGs seeded from (seed, epoch, position) and the caller's RNG
    state restored afterwards: augmentations are then the same for any num_workers, world size or resume."""

    def __init__(self, ds, seed):
        self.ds, self.seed = ds, seed

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, position, index = key
        s = ((self.seed * 1_000_003 + epoch) * 1_000_003 + position) % 2 ** 62
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(s), np.random.seed(s % 2 ** 32), torch.manual_seed(s)
        try:
            return self.ds[index]
        finally:
            random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])


def ignore_sigint(worker_id):  # Ctrl-C is the main process's business: it saves a checkpoint and stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_data(cfg, mcfg, raw, rank, world):
    common = dict(label_csv=cfg["label_csv"], target_length=mcfg.audio_length, num_frames=cfg["num_frames"],
                  mean=cfg["dataset_mean"], std=cfg["dataset_std"], image_size=mcfg.img_size,
                  on_error=cfg["on_error"], raw=raw)
    train_ds = data.AVDataset(cfg["data_train"], train=True, freqm=cfg["freqm"], timem=cfg["timem"],
                              mixup=cfg["mixup"], noise=cfg["noise"], label_smooth=cfg["label_smooth"], **common)
    val_ds = data.AVDataset(cfg["data_val"], train=False, **common)
    weights = data.class_balance_weights(train_ds) if cfg["balanced_sampling"] else None
    sampler = EpochSampler(len(train_ds), cfg["seed"], rank, world, weights)
    if len(train_ds) // world < cfg["batch_size"] * cfg["grad_accum"]:
        raise ConfigError(f"{cfg['data_train']}: {len(train_ds)} clips over {world} process(es) do not fill one step "
                          f"of batch_size={cfg['batch_size']} x grad_accum={cfg['grad_accum']}")
    loader_args = dict(batch_size=cfg["batch_size"], num_workers=cfg["num_workers"],
                       pin_memory=raw and torch.cuda.is_available(), collate_fn=data.collate_raw if raw else None,
                       worker_init_fn=ignore_sigint)
    train_loader = torch.utils.data.DataLoader(SeededItems(train_ds, cfg["seed"]), sampler=sampler, drop_last=True,
                                               generator=torch.Generator(), **loader_args)
    val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, **loader_args)
    return train_ds, val_ds, sampler, train_loader, val_loader


def batch_to_device(batch, prep, device):
    """A loader batch -> (fbank (B, T, 128), image (B, 3, S, S), label (B, K)) on the device."""
    if prep is not None:  # raw batch: fbank, augmentation, normalisation on the device
        return prep(batch, device)
    return tuple(t.to(device, non_blocking=True) for t in batch)


# ----------------------------------------------------------------------------------------------------------
# Objectives and evaluation


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of every rank's loss w.r.t. its own slice."""

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
        return grad[dist.get_rank() * B:(dist.get_rank() + 1) * B]


def pretrain_kwargs(cfg):
    ratios = {k: cfg[k] if cfg[k] >= 0 else cfg["mask_ratio"] for k in ("mask_ratio_a", "mask_ratio_v")}
    return dict(**ratios, **{k: cfg[k] for k in ("mae_weight", "contrastive_weight", "mask_mode", "bidirectional")})


def classification_loss(logits, label, kind):
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), label)
    # soft targets (mixup, smoothing); the official CE loss uses argmax(label.long()), i.e. hard targets
    return F.cross_entropy(logits.float(), label)


def compute_loss(model, audio, image, label, cfg, gather=None):
    """-> (loss to minimise, dict of detached scalars to log)."""
    if cfg["task"] == "pretrain":
        out = model(audio, image, gather=gather, **pretrain_kwargs(cfg))
        return out["loss"], {k: out[k].detach() for k in ("loss", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")}
    loss = classification_loss(model(audio, image, mode=cfg["ftmode"]), label, cfg["loss"])
    return loss, {"loss": loss.detach()}


@torch.no_grad()
def evaluate_pretrain(model, loader, prep, cfg, device, autocast):
    """Validation losses (fixed masking seed) and audio<->visual retrieval R@1 from mean-pooled, L2-normalised
    coordinated tokens (Sec. 4.2)."""
    sums, n, audio_emb, visual_emb = {}, 0, [], []
    python_state = random.getstate()  # structured masking draws from Python's RNG
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg["seed"]), random.seed(cfg["seed"])
        for batch in loader:
            audio, image, label = batch_to_device(batch, prep, device)
            with autocast:
                _, stats = compute_loss(model, audio, image, label, cfg)
                a, v = model.embed(audio, image)  # (B, La, D), (B, Lv, D)
            for k, val in stats.items():
                sums[k] = sums.get(k, 0.0) + float(val) * len(audio)
            n += len(audio)
            audio_emb.append(pooled_representation(a).cpu())  # (B, D)
            visual_emb.append(pooled_representation(v).cpu())
    random.setstate(python_state)
    sim = torch.cat(audio_emb) @ torch.cat(visual_emb).T  # (N, N), rows = audio clips
    a2v, v2a = retrieval_metrics(sim), retrieval_metrics(sim.T)
    return {**{k: s / n for k, s in sums.items()}, "a2v_R1": a2v["R1"], "v2a_R1": v2a["R1"],
            "a2v_R5": a2v["R5"], "v2a_R5": v2a["R5"]}


@torch.no_grad()
def predict(model, loader, prep, cfg, device, autocast):
    """-> logits (N, K) float32, targets (N, K), mean loss."""
    logits, targets, loss_sum = [], [], 0.0
    for batch in loader:
        audio, image, label = batch_to_device(batch, prep, device)
        with autocast:
            out = model(audio, image, mode=cfg["ftmode"]).float()
        loss_sum += float(classification_loss(out, label, cfg["loss"])) * len(out)
        logits.append(out.cpu()), targets.append(label.cpu())
    logits, targets = torch.cat(logits), torch.cat(targets)
    return logits, targets, loss_sum / len(logits)


def evaluate_finetune(model, loader, prep, cfg, device, autocast, all_frames=False):
    """Middle-frame metrics; with all_frames, also the official multi-frame evaluation: probabilities (sigmoid
    for mAP runs, softmax for acc runs) averaged over the num_frames frames (preprocessing.md 4.4)."""
    ds = loader.dataset
    logits, targets, val_loss = predict(model, loader, prep, cfg, device, autocast)
    m = classification_metrics(logits, targets)
    out = dict(loss=val_loss, mAP=m["mAP"], mAUC=m["mAUC"], d_prime=m["d_prime"], acc=m["acc"])
    if all_frames:
        per_frame = []
        for frame in range(cfg["num_frames"]):
            ds.frame = frame
            per_frame.append(predict(model, loader, prep, cfg, device, autocast)[0])
        ds.frame = None
        activation = "sigmoid" if cfg["metric"] == "mAP" else "softmax"
        probs = average_frames(torch.stack(per_frame), activation)  # (frames, N, K) -> (N, K)
        m = classification_metrics(probs, targets)
        out.update({f"{k}_frames": m[k] for k in ("mAP", "mAUC", "d_prime", "acc")})
    return out


def main_metric(cfg, metrics):
    return (metrics["a2v_R1"] + metrics["v2a_R1"]) / 2 if cfg["task"] == "pretrain" else metrics[cfg["metric"]]


# ----------------------------------------------------------------------------------------------------------
# Schedule, checkpoints, log


def lr_factor(cfg, it, epoch, total_iters):
    if cfg["lr_schedule"] == "step":  # MultiStepLR(range(start, 1000, step)) stepped after every epoch
        return cfg["lrscheduler_decay"] ** len(range(cfg["lrscheduler_start"], epoch + 1, cfg["lrscheduler_step"]))
    if it < cfg["warmup_iters"]:
        return (it + 1) / cfg["warmup_iters"]
    progress = min(1.0, (it - cfg["warmup_iters"]) / max(1, total_iters - cfg["warmup_iters"]))
    return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state(device):
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


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


def log_line(cfg, record):
    with open(os.path.join(cfg["out_dir"], "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses(log_path, png_path, width=720, height=420, margin=(70, 20, 30, 50)):
    """Training loss per logged iteration (blue line) and validation loss (red dots), drawn with Pillow."""
    records = [json.loads(line) for line in open(log_path)]
    train = [(r["iter"], r["loss"]) for r in records if r["split"] == "train"]
    val = [(r["iter"], r["loss"]) for r in records if r["split"] == "val"]
    if len(train + val) < 2:
        return
    left, right, top, bottom = margin
    (x0, y0), (x1, y1) = [tuple(f(p[i] for p in train + val) for i in (0, 1)) for f in (min, max)]
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-3)
    px = lambda x, y: (left + (x - x0) / (x1 - x0) * (width - left - right),  # noqa: E731
                       height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):  # axis ticks with their values
        x, y = round(x0 + (x1 - x0) * i / 4), y0 + (y1 - y0) * i / 4
        draw.text((px(x, y0)[0] - 10, height - bottom + 6), str(x), fill="black")
        draw.text((8, px(x0, y)[1] - 6), f"{y:.3g}", fill="black")
    draw.text(((width - left) // 2, height - 20), "iteration", fill="black")
    draw.text((8, 8), "loss      train (blue), validation (red)", fill="black")
    if len(train) > 1:
        draw.line([px(*p) for p in train], fill=(30, 90, 200), width=2)
    for p in val:
        draw.ellipse([px(*p)[0] - 3, px(*p)[1] - 3, px(*p)[0] + 3, px(*p)[1] + 3], fill=(210, 40, 40))
    img.save(png_path)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = configure(sys.argv[1:] if argv is None else argv)
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    master = rank == 0
    device_name = cfg["device"] if cfg["device"] != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        if device_name.startswith("cuda"):
            device_name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(device_name)
        dist.init_process_group("nccl" if device_name.startswith("cuda") else "gloo")
    try:
        return train(cfg, device=torch.device(device_name), ddp=ddp, rank=rank, world=world, master=master)
    finally:
        if ddp:
            dist.destroy_process_group()


def load_start(cfg, ckpt_path):
    """-> (our checkpoint to resume, or None; weights to initialise from, or None)."""
    if cfg["init_from"] == "resume":
        if not os.path.isfile(ckpt_path):
            raise ConfigError(f"init_from=resume but {ckpt_path} does not exist")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["task"] != cfg["task"]:
            raise ConfigError(f"{ckpt_path} is a {ckpt['task']} checkpoint but task={cfg['task']}")
        return ckpt, None
    if cfg["init_from"] == "scratch":
        return None, None
    if not os.path.isfile(cfg["init_from"]):
        raise ConfigError(f"init_from={cfg['init_from']}: no such file")
    return None, torch.load(cfg["init_from"], map_location="cpu", weights_only=False)


def train(cfg, device, ddp, rank, world, master):
    dtype = cfg["dtype"] if cfg["dtype"] != "auto" else (
        "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32")
    autocast = (torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32"
                else contextlib.nullcontext())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    raw = cfg["gpu_preprocess"] == "on" or (cfg["gpu_preprocess"] == "auto" and device.type == "cuda")
    pretrain, ckpt_path = cfg["task"] == "pretrain", os.path.join(cfg["out_dir"], "ckpt.pt")

    # --- model, from scratch, from pretrained weights, or resumed ----------------------------------------------
    ckpt, init = load_start(cfg, ckpt_path)
    mcfg = model_config(cfg, (ckpt or init).get("model_args") if isinstance(ckpt or init, dict) else None)
    for key, size in (("target_length", mcfg.audio_length), ("image_size", mcfg.img_size)):
        if cfg[key] not in (0, size):
            raise ConfigError(f"{key}={cfg[key]} but the model takes {size}: set {key}=0 or change the model")
    train_ds, val_ds, sampler, train_loader, val_loader = build_data(cfg, mcfg, raw, rank, world)
    prep, val_prep = (data.BatchPreprocessor.from_dataset(ds) if raw else None for ds in (train_ds, val_ds))
    num_classes = None if pretrain else train_ds.num_classes
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    model = CAVMAE(mcfg) if pretrain else CAVMAEClassifier(mcfg, num_classes)
    load_report = load_pretrained(model, init) if init is not None else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model_last"] or ckpt["model"])
    head = set() if pretrain else {id(p) for p in model.head.parameters()}
    if cfg["freeze_base"]:  # linear probing
        if pretrain:
            raise ConfigError("freeze_base=True is for fine-tuning (linear probing)")
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    model.to(device)

    # --- optimizer: the newly initialised head at head_lr x lr ---------------------------------------------------
    groups = [dict(params=[p for p in model.parameters() if p.requires_grad and (id(p) in head) == is_head],
                   lr_scale=cfg["head_lr"] if is_head else 1.0) for is_head in (False, True)]
    optimizer = (torch.optim.Adam if cfg["optimizer"] == "adam" else torch.optim.AdamW)(
        [g for g in groups if g["params"]], lr=cfg["lr"], betas=cfg["betas"], weight_decay=cfg["weight_decay"],
        **({"fused": True} if device.type == "cuda" else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    iter_num, best_metric, wa_state = 0, None, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"]), scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_metric, wa_state = ckpt["iter_num"], ckpt["best_metric"], ckpt["wa"]
    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:  # branches that a loss weight of 0 or a fine-tuning stream leave out have no gradient; so do the
        # single-modality norms of all but the last joint block under the official contrastive-stream quirk
        unused = (not pretrain or cfg["mae_weight"] == 0 or cfg["contrastive_weight"] == 0
                  or (mcfg.joint_depth > 1 and mcfg.official_contrastive_streams))
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
    gather = GatherWithGrad.apply if ddp and cfg["gather_negatives"] else None

    iters_per_epoch = len(train_ds) // world // cfg["batch_size"] // cfg["grad_accum"]
    total_iters = cfg["max_iters"] if cfg["max_iters"] > 0 else cfg["epochs"] * iters_per_epoch
    step_samples = cfg["batch_size"] * cfg["grad_accum"] * world
    ratios = pretrain_kwargs(cfg)  # training FLOPs = forward + backward = 3 forward passes
    flops = 3 * raw_model.flops_per_sample(ratios["mask_ratio_a"], ratios["mask_ratio_v"]) if pretrain else 0
    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        if ckpt is None and os.path.exists(os.path.join(cfg["out_dir"], "log.jsonl")):
            os.remove(os.path.join(cfg["out_dir"], "log.jsonl"))  # a new run, a new log
        with open(os.path.join(cfg["out_dir"], "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        trained = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        print(f"{cfg['task']}: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M params "
              f"({trained / 1e6:.2f}M trained) | audio {mcfg.audio_length}x{mcfg.num_mel_bins}, "
              f"image {mcfg.img_size} | "
              f"data {len(train_ds)} train, {len(val_ds)} val{f', {num_classes} classes' if num_classes else ''} | "
              f"{device} {dtype} x{world}{', compiled' if cfg['compile'] else ''}, "
              f"{'device' if raw else 'worker'} preprocessing | {total_iters} iters of {step_samples} clips "
              f"({iters_per_epoch}/epoch) from iter {iter_num}"
              + (f"\ninit_from {cfg['init_from']}: {load_report}" if load_report else ""))

    nonfinite = torch.zeros((), device=device)  # steps with a NaN/inf loss, counted on the device (no sync per step)

    def check_finite():
        bad = nonfinite.clone()
        if ddp:
            dist.all_reduce(bad)
        if bad.item() > 0:
            raise NonFiniteLoss(f"non-finite loss at iter {iter_num}: stopped; {ckpt_path} (if any) keeps the last "
                                "good state: continue with --init_from=resume and a lower lr or --grad_clip=1.0")

    def save(last_state=None):
        """Every rank calls this (RNG states are gathered); rank 0 writes out_dir/ckpt.pt atomically. After weight
        averaging, `model` holds the averaged weights and `model_last` the training state that resume continues."""
        check_finite()
        rngs = [rng_state(device)]
        if ddp:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(device))
        if master:
            epoch, done = divmod(iter_num, iters_per_epoch)
            atomic_save(dict(model=raw_model.state_dict(), model_last=last_state, model_args=dataclasses.asdict(mcfg),
                             task=cfg["task"], num_classes=num_classes, config=cfg, optimizer=optimizer.state_dict(),
                             scaler=scaler.state_dict(), scheduler=dict(kind=cfg["lr_schedule"], epoch=epoch),
                             iter_num=iter_num, epoch=epoch, rng=rngs, best_metric=best_metric, wa=wa_state,
                             sampler=dict(epoch=epoch, start=done * cfg["batch_size"] * cfg["grad_accum"])), ckpt_path)

    def evaluate(final=False):
        """Rank 0 evaluates the unwrapped model on data_val; the other ranks wait."""
        check_finite()  # a NaN model gets the clear NonFiniteLoss, not an error from the metrics
        metrics = None
        if master:
            raw_model.eval()
            metrics = (evaluate_pretrain(raw_model, val_loader, val_prep, cfg, device, autocast) if pretrain else
                       evaluate_finetune(raw_model, val_loader, val_prep, cfg, device, autocast, all_frames=final))
            raw_model.train()
            log_line(cfg, dict(split="final" if final else "val", iter=iter_num, epoch=iter_num / iters_per_epoch,
                               **metrics))
            tqdm.write(f"{'final' if final else 'val'} iter {iter_num}: " +
                       " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if ddp:
            dist.barrier()
        return metrics

    # --- the loop: SIGINT/SIGTERM finish the step, save and return ----------------------------------------------
    stop = []
    old_handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    if ckpt is not None:
        set_rng_state(ckpt["rng"][rank] if len(ckpt["rng"]) == world else ckpt["rng"][0], device)
    else:
        torch.manual_seed(cfg["seed"] + rank), np.random.seed(cfg["seed"] + rank), random.seed(cfg["seed"] + rank)
    model.train()
    bar = tqdm(total=total_iters, initial=iter_num, disable=not master, dynamic_ncols=True)
    sums, sums_n, t_log, stopping = {}, 0, time.time(), False
    try:
        while iter_num < total_iters and not stopping:
            epoch, done = divmod(iter_num, iters_per_epoch)
            sampler.set_epoch(epoch, start=done * cfg["batch_size"] * cfg["grad_accum"])
            train_loader.generator.manual_seed(cfg["seed"] * 7919 + epoch)  # worker seeds; augmentation: SeededItems
            batches = iter(train_loader)
            while iter_num < total_iters and not stopping:
                for g in optimizer.param_groups:
                    g["lr"] = cfg["lr"] * g["lr_scale"] * lr_factor(cfg, iter_num, epoch, total_iters)
                for micro in range(cfg["grad_accum"]):
                    audio, image, label = batch_to_device(next(batches), prep, device)
                    sync = not ddp or micro == cfg["grad_accum"] - 1  # DDP: all-reduce gradients on the last one
                    with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                        loss, stats = compute_loss(model, audio, image, label, cfg, gather)
                    scaler.scale(loss / cfg["grad_accum"]).backward()
                    nonfinite += ~torch.isfinite(stats["loss"])
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v.float() / cfg["grad_accum"]
                if cfg["grad_clip"] > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"])
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                iter_num, sums_n, stopping = iter_num + 1, sums_n + 1, bool(stop)
                bar.update(1)
                if ddp:  # every rank stops at the same step
                    flag = torch.tensor([float(stopping)], device=device)
                    dist.all_reduce(flag)
                    stopping = flag.item() > 0
                if iter_num % cfg["log_interval"] == 0 or iter_num == total_iters or stopping:
                    check_finite()
                    record = {k: float(v) / sums_n for k, v in sums.items()}
                    record["samples_per_s"] = sums_n * step_samples / (time.time() - t_log)
                    if flops and device.type == "cuda":  # model FLOPs utilisation
                        record["mfu"] = flops * record["samples_per_s"] / world / cfg["peak_flops"]
                    if master:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                        log_line(cfg, dict(split="train", iter=iter_num, epoch=iter_num / iters_per_epoch,
                                           lr=optimizer.param_groups[0]["lr"], **record))
                    sums, sums_n, t_log = {}, 0, time.time()
                epoch_end, e = iter_num % iters_per_epoch == 0, iter_num // iters_per_epoch  # e: epochs done
                if epoch_end and cfg["wa"] and cfg["wa_start"] <= e <= cfg["wa_end"]:  # running sum of epoch weights
                    sd = {k: v.detach().to("cpu", copy=True) for k, v in raw_model.state_dict().items()}
                    wa_state = dict(count=1, sum=sd) if wa_state is None else \
                        dict(count=wa_state["count"] + 1, sum={k: wa_state["sum"][k] + sd[k] for k in sd})
                want_eval = (cfg["eval_interval"] > 0 and iter_num % cfg["eval_interval"] == 0
                             or cfg["eval_interval"] == 0 and epoch_end)
                t_pause = time.time()  # evaluation and checkpoint time do not count in samples/s
                if want_eval and iter_num < total_iters and not stopping:  # the last one is the final evaluation
                    metrics = evaluate()
                    best_metric = max(best_metric or -math.inf, main_metric(cfg, metrics)) if master else None
                if want_eval or epoch_end or stopping:
                    save()
                t_log += time.time() - t_pause
                if epoch_end:
                    break
        if stopping:
            if master:
                tqdm.write(f"stopped by a signal at iter {iter_num}: saved {ckpt_path}; continue: --init_from=resume")
            return dict(model=raw_model, iter_num=iter_num, stopped=True)

        # --- the end: weight averaging (official WA: element-wise mean of the epoch weights), final evaluation ---
        last_state = None
        if cfg["wa"] and wa_state is not None:
            last_state = {k: v.detach().clone() for k, v in raw_model.state_dict().items()}
            raw_model.load_state_dict({k: s / wa_state["count"] if s.is_floating_point() else last_state[k]
                                       for k, s in wa_state["sum"].items()})
        final = evaluate(final=True)
        best_metric = max(best_metric or -math.inf, main_metric(cfg, final)) if master else None
        save(last_state)
        if master:
            plot_losses(os.path.join(cfg["out_dir"], "log.jsonl"), os.path.join(cfg["out_dir"], "loss.png"))
        return dict(model=raw_model, iter_num=iter_num, final=final, stopped=False)
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, NonFiniteLoss, data.DataError) as e:
        sys.exit(f"error: {e}")
