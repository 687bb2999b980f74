"""Train CAV-MAE: pretraining with both objectives (task='pretrain', Sec. 3) or fine-tuning a
classifier (task='finetune', Sec. 4.3).

    python train.py config/pretrain_synthetic.py                     # the CPU demo, a few minutes
    python train.py config/pretrain_synthetic.py --batch_size=16     # any setting as --key=value
    python train.py config/pretrain_synthetic.py --init_from=resume  # continue out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=4 train.py config/pretrain_audioset.py --batch_size=12

The settings below are the paper's base pretraining on AudioSet-2M; config files, then --key=value
flags, change them; --model_<field>=value sets a CAVMAEConfig field. batch_size is per process and
micro-step: the contrastive negatives are the batch_size clips of one micro-step, as the official
per-GPU batch. Read train() first: the setup in the order it runs, then the loop; README says how a
run saves, stops and resumes.
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
import data
import eval as evaluation
import pictures
from configurator import ConfigError
from model import (
    CAVMAE,
    FT_MODES,
    MASK_MODES,
    CAVMAEClassifier,
    CAVMAEConfig,
    apply_compile,
    load_pretrained,
    num_params,
    read_checkpoint,
)

# ----------------------------------------------------------------------------------------------
# settings: the paper's base pretraining on AudioSet-2M (docs/recipes.md lists every recipe)
# I/O
out_dir = "out/pretrain"
task = "pretrain"  # 'pretrain' (Sec. 3) | 'finetune' (CAVMAEClassifier)
init_from = "scratch"  # 'scratch' | 'resume' (out_dir/ckpt.pt) | a checkpoint: ours, official, MAE
overwrite = False  # a new run may replace the checkpoint in out_dir
eval_interval = 0  # evaluate and save every N steps; 0: at every epoch's end
save_interval = 0  # also save every N steps; 0: at evaluations only
log_interval = 10
# data
data_train = "data/audioset/train.json"
data_val = "data/audioset/eval.json"
label_csv = "data/audioset/class_labels_indices.csv"  # "": the classes are the datafile's own labels
num_frames = 10  # frames per clip; training draws one, evaluation takes the middle one
dataset_mean = data.AUDIOSET_MEAN  # the fbank normalisation (AudioSet's, also used for VGGSound)
dataset_std = data.AUDIOSET_STD
freqm = 0  # SpecAugment: frequency mask width in mel bins (fine-tuning: 48)
timem = 0  # SpecAugment: time mask width in fbank frames (fine-tuning: 192)
mixup = 0.0  # the share of clips mixed with another clip (fine-tuning: 0.5)
noise = True  # the official noise augmentation of the fbank
label_smooth = 0.0
balanced_sampling = False  # draw clips with the official per-label weights 1000 / (count + 0.01)
num_workers = 4  # loader processes; they decode files, the fbank and augmentation run on `device`
# pretraining objective (Sec. 3)
mae_weight = 1.0
contrastive_weight = 0.01  # lambda_c; 0: AV-MAE
mask_ratio = 0.75
mask_mode = "unstructured"  # audio masking: 'unstructured' | 'time' | 'freq' | 'tf'
bidirectional = False  # the contrastive loss in both directions (official: one)
# fine-tuning
ftmode = "multimodal"  # multimodal | audioonly | videoonly | missingaudioonly | missingvideoonly
head_lr = 100.0  # the new head's lr multiplier
freeze_base = False  # linear probing: train the head only
loss = "bce"  # 'bce' (multi-label) | 'ce' (single-label)
metric = "mAP"  # 'mAP' | 'acc': the best checkpoint's metric; sigmoid or softmax over frames
wa = False  # average the weights of epochs wa_start..wa_end (1-based) for the final model
wa_start = 1
wa_end = 10
# optimisation
optimizer = "adam"  # 'adam' (official: L2 weight decay) | 'adamw'
lr = 5e-5
weight_decay = 5e-7
betas = (0.95, 0.999)
epochs = 25
max_iters = 0  # > 0: stop after this many optimizer steps, whatever `epochs` says
batch_size = 48
grad_accum = 1
lr_schedule = "step"  # 'step' (the official) | 'cosine'
lrscheduler_start = 10  # step schedule: the lr is multiplied by lrscheduler_decay after this epoch
lrscheduler_step = 5  # step schedule: and again every this many epochs
lrscheduler_decay = 0.5
warmup_iters = 0  # cosine schedule: linear warm-up steps
min_lr_ratio = 0.0  # cosine schedule: the final lr / lr
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "auto"  # 'auto' (CUDA: bfloat16, or float16 without it; CPU: float32) | 'float32' | ...
compile = False  # compile each transformer block (model.apply_compile)
seed = 0
SETTINGS = {
    k: v for k, v in globals().items() if k[0].islower() and type(v) in (bool, int, float, str, tuple)
}
# ----------------------------------------------------------------------------------------------
CHOICES = dict(
    task=("pretrain", "finetune"),
    mask_mode=MASK_MODES,
    ftmode=FT_MODES,
    loss=("bce", "ce"),
    metric=("mAP", "acc"),
    optimizer=("adam", "adamw"),
    lr_schedule=("step", "cosine"),
    dtype=("auto", "float32", "bfloat16", "float16"),
)
PRETRAIN_STATS = ("loss", "loss_mae_a", "loss_mae_v", "loss_c", "contrastive_accuracy")
received_signal = 0  # set by Ctrl-C or SIGTERM: the loop saves after its step and stops


def configure(argv):
    """Defaults <- config files <- flags; model_<field> keys appear only where set."""
    model_fields = {f"model_{f.name}": f.default for f in dataclasses.fields(CAVMAEConfig)}
    cfg = configurator.configure(argv, SETTINGS, optional=model_fields)
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            raise ConfigError(f"{key}={cfg[key]!r}: choose one of {', '.join(choices)}")
    for key in ("batch_size", "grad_accum", "epochs", "log_interval", "num_frames"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]}: must be 1 or more")
    if (cfg["task"] == "pretrain") and (cfg["mae_weight"] == cfg["contrastive_weight"] == 0):
        raise ConfigError("mae_weight=0 and contrastive_weight=0: there is nothing to train")
    if not 0 <= cfg["mask_ratio"] < 1:
        raise ConfigError(f"mask_ratio={cfg['mask_ratio']}: must be in [0, 1)")
    for key in ("data_train", "data_val"):
        if not os.path.isfile(cfg[key]):
            hint = "run `python prepare.py synthetic`, then `python train.py config/pretrain_synthetic.py`"
            raise ConfigError(f"{key}={cfg[key]} not found: {hint}")
    return cfg


def train(cfg):
    """One run: setup in the order it happens, then the loop. -> the process's exit status."""
    global received_signal
    # processes, precision, out_dir
    rank, world, device = setup_processes(cfg)
    master = rank == 0
    dtype, autocast, scaler = precision(cfg, device)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    best_path = os.path.join(cfg["out_dir"], "best.pt")
    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    resume = start_out_dir(cfg, ckpt_path, log_path, master)
    iter_num = resume["iter_num"] if resume is not None else 0
    mcfg, init = model_config(cfg, resume)
    # data, model, optimizer
    train_ds, val_ds, batches, steps_per_epoch = build_data(cfg, mcfg, rank, world, iter_num)
    total_iters = cfg["max_iters"] or cfg["epochs"] * steps_per_epoch
    model = build_model(cfg, mcfg, train_ds.num_classes, resume, init).to(device)
    optimizer = build_optimizer(cfg, model, device)
    best_metric, wa_sum = restore_training_state(resume, optimizer, scaler, cfg, rank, world, device)
    step_model = model
    if world > 1:  # a fine-tuning mode or a loss weight of 0 leaves branches without gradients
        unused = (cfg["task"] == "finetune") or (cfg["mae_weight"] * cfg["contrastive_weight"] == 0)
        step_model = DDP(model, find_unused_parameters=unused or mcfg.joint_depth > 1)
    print(f"{cfg['task']}: {num_params(model) / 1e6:.1f}M parameters, {len(train_ds)} clips, {dtype}")

    def save(rngs):  # ckpt.pt: all that an exact resume needs
        state = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rngs, wa_sum=wa_sum)
        save_checkpoint(ckpt_path, model, cfg, iter_num=iter_num, best_metric=best_metric, **state)

    # the loop
    select_best = (cfg["task"] == "finetune") and not cfg["wa"]  # the official fine-tuning: the best
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    received_signal = 0
    rng = rng_state(device)
    window = []  # the steps' scalars since the last log line
    t0 = time.time()
    try:
        while iter_num < total_iters:
            lr_now = cfg["lr"] * lr_factor(cfg, iter_num, iter_num // steps_per_epoch, total_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr_now * group["lr_scale"]
            stats = train_step(step_model, batches, train_ds, optimizer, scaler, autocast, cfg, device)
            window.append(stats)
            iter_num += 1
            rng = rng_state(device)  # after a completed step: what a checkpoint holds
            stop = max(every_process(received_signal, world))  # all processes stop after one step
            epoch_end = iter_num % steps_per_epoch == 0
            evaluate_now = epoch_end
            if cfg["eval_interval"] > 0:
                evaluate_now = iter_num % cfg["eval_interval"] == 0
            last = iter_num == total_iters  # the final evaluation follows, but best.pt needs the last
            save_now = evaluate_now or last or stop
            if cfg["save_interval"] > 0:
                save_now = save_now or (iter_num % cfg["save_interval"] == 0)
            if (iter_num % cfg["log_interval"] == 0) or save_now:  # a save follows a finite loss only
                means = torch.stack([torch.stack(list(s.values())) for s in window]).mean(0)
                if world > 1:
                    dist.all_reduce(means)
                stats = dict(zip(window[0], (means / world).tolist()))
                record = dict(split="train", iter=iter_num, lr=lr_now, **stats)
                if not math.isfinite(record["loss"]):  # diverged: the last checkpoint stays good
                    print(f"error: non-finite loss at iter {iter_num}, not saved", file=sys.stderr)
                    return 1
                clips = len(window) * cfg["batch_size"] * cfg["grad_accum"] * world
                record["samples_per_s"] = clips / (time.time() - t0)
                if master:
                    log(log_path, record)
                window = []
                t0 = time.time()
            if cfg["wa"] and epoch_end and (cfg["wa_start"] <= iter_num // steps_per_epoch <= cfg["wa_end"]):
                state = model.state_dict()
                weights = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()}
                wa_sum = weights if wa_sum is None else {k: wa_sum[k] + weights[k] for k in weights}
            if master and (evaluate_now or last) and (select_best or not last):
                metrics = evaluate(model, val_ds, cfg, device)
                log(log_path, dict(split="val", iter=iter_num, **metrics))
                if (best_metric is None) or (main_metric(cfg, metrics) > best_metric):
                    best_metric = main_metric(cfg, metrics)
                    save_checkpoint(best_path, model, cfg, iter_num=iter_num, metric=best_metric)
            if save_now:
                rngs = every_process(rng, world)
                if master:
                    save(rngs)
                t0 = time.time()
            if stop:
                name = signal.Signals(stop).name
                print(f"stopped by {name}: saved iter {iter_num} in {ckpt_path}", file=sys.stderr)
                return 128 + stop

        # the final model: the average of epochs wa_start..wa_end, or the best validation weights
        for signum, handler in handlers.items():  # Ctrl-C stops the final evaluation at once
            signal.signal(signum, handler)
        if master:
            if wa_sum is not None:
                count = min(iter_num // steps_per_epoch, cfg["wa_end"]) - cfg["wa_start"] + 1
                model.load_state_dict({k: v / count for k, v in wa_sum.items()})
            elif select_best:
                model.load_state_dict(read_checkpoint(best_path)["model"])
            metrics = evaluate(model, val_ds, cfg, device, final=True)
            log(log_path, dict(split="final", iter=iter_num, **metrics))
            final_path = os.path.join(cfg["out_dir"], "final.pt")
            save_checkpoint(final_path, model, cfg, iter_num=iter_num, metrics=metrics)
            summary(cfg, log_path)
        if world > 1:  # the others wait for it: a process that leaves early can abort its group
            dist.barrier()
        return 0
    except Exception as error:
        finite = all(torch.isfinite(s["loss"]) for s in window)
        if master and (world == 1) and finite and (iter_num < total_iters):  # (else already saved)
            save([rng])  # the state after the last completed step
            print(f"saved iter {iter_num} in {ckpt_path}", file=sys.stderr)
        if received_signal:  # the signal may end the loader workers first, and their end raise here
            print(f"stopped by {signal.Signals(received_signal).name} after iter {iter_num}", file=sys.stderr)
            return 128 + received_signal
        fix = "fix it, then continue with --init_from=resume"
        print(f"error after iter {iter_num}: {one_line(error)} ({fix})", file=sys.stderr)
        return 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def setup_processes(cfg):
    """(rank, world size, device) of this process: one, or torchrun's (RANK, LOCAL_RANK, WORLD_SIZE)."""
    device = torch.device(cfg["device"])
    if (device.type == "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg['device']}: there is no CUDA GPU here (use --device=cpu)")
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # a long timeout: the other processes wait while process 0 evaluates (NCCL's default is 10 min)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device


def precision(cfg, device):
    """(dtype name, autocast context, GradScaler): bfloat16 on a GPU that has it, else float16 with
    loss scaling; float32 on the CPU."""
    dtype = cfg["dtype"]
    if dtype == "auto":
        dtype = "float32" if device.type == "cpu" else "bfloat16"
        if (device.type == "cuda") and not torch.cuda.is_bf16_supported(including_emulation=False):
            dtype = "float16"
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    return dtype, autocast, torch.amp.GradScaler(device.type, enabled=dtype == "float16")


def start_out_dir(cfg, ckpt_path, log_path, master):
    """The checkpoint to resume (None for a new run), read by every process; process 0 writes the log."""
    if cfg["init_from"] != "resume":
        if os.path.exists(ckpt_path) and not cfg["overwrite"]:
            raise ConfigError(
                f"{ckpt_path} exists: continue that run with --init_from=resume, or replace it "
                "with --overwrite=True (or choose another --out_dir)"
            )
        if master:
            os.makedirs(cfg["out_dir"], exist_ok=True)
            open(log_path, "w").close()  # a new log
        return None
    resume = read_checkpoint(ckpt_path)
    if "optimizer" not in resume:
        raise ValueError(
            f"{ckpt_path} holds weights without a training state: start from them with "
            f"--init_from={ckpt_path} and another --out_dir"
        )
    if master:
        trim_log(log_path, resume["iter_num"])
    return resume


def trim_log(path, iter_num):
    """A resumed run's log keeps the records up to its checkpoint (the steps after it run again)
    and drops a line cut short by a kill."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line)["iter"] <= iter_num:
                    kept.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def model_config(cfg, resume):
    """(the architecture, init_from's checkpoint or None): a resumed run's; else init_from's (ours) or
    the paper's, with the --model_<field> values set (a shorter audio_length cuts the positions)."""
    init = read_checkpoint(cfg["init_from"]) if cfg["init_from"] not in ("scratch", "resume") else None
    if resume is not None:
        return CAVMAEConfig(**resume["model_args"]), init
    overrides = {k.removeprefix("model_"): v for k, v in cfg.items() if k.startswith("model_")}
    saved = init.get("model_args", {}) if init is not None else {}
    try:
        return CAVMAEConfig(**{**saved, **overrides}), init
    except (TypeError, ValueError) as error:
        raise ConfigError(f"the --model_<field> settings do not build a model: {error}") from None


def build_data(cfg, mcfg, rank, world, iter_num):
    """The datasets, the training batches from step iter_num on, and the steps per epoch. Loader
    workers decode the files; the fbank and augmentation of a batch run on the training device."""
    sizes = dict(target_length=mcfg.audio_length, image_size=mcfg.img_size)
    normalise = dict(mean=cfg["dataset_mean"], std=cfg["dataset_std"], num_frames=cfg["num_frames"])
    augment = {k: cfg[k] for k in ("freqm", "timem", "mixup", "noise", "label_smooth")}
    label_csv = cfg["label_csv"] or None  # None: the datafile's own labels
    train_ds = data.AVDataset(cfg["data_train"], label_csv, True, raw=True, **sizes, **normalise, **augment)
    val_ds = data.AVDataset(cfg["data_val"], label_csv, raw=True, **sizes, **normalise)
    steps_per_epoch = len(train_ds) // (cfg["batch_size"] * cfg["grad_accum"] * world)
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg['data_train']}: {len(train_ds)} clips are fewer than a step takes")
    weights = data.class_balance_weights(train_ds) if cfg["balanced_sampling"] else None
    per_epoch = steps_per_epoch * cfg["grad_accum"]  # micro-batches
    start = iter_num * cfg["grad_accum"]
    batch_size = cfg["batch_size"]
    order = data.clip_order(len(train_ds), batch_size, per_epoch, rank, world, cfg["seed"], weights, start)
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_sampler=order,
        num_workers=cfg["num_workers"],
        collate_fn=data.collate,
        pin_memory=torch.device(cfg["device"]).type == "cuda",
        worker_init_fn=worker_signals,
        generator=torch.Generator(),  # its own: starting the workers leaves the run's RNG alone
    )
    return train_ds, val_ds, iter(loader), steps_per_epoch


def worker_signals(worker_id):
    """Loader workers leave stopping to the main process, which saves: Ctrl-C (sent to the whole
    terminal) is ignored, and SIGTERM ends a worker quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def build_model(cfg, mcfg, num_classes, resume, init):
    """The model with its first weights: seeded (the same in every process), resumed or loaded."""
    torch.manual_seed(cfg["seed"])
    model = CAVMAE(mcfg) if cfg["task"] == "pretrain" else CAVMAEClassifier(mcfg, num_classes)
    if resume is not None:
        model.load_state_dict(resume["model"])
    elif init is not None:
        missing, unexpected = load_pretrained(model, init)
        print(f"{cfg['init_from']}: {len(missing)} tensors new, {len(unexpected)} unused")
    if cfg["freeze_base"]:  # linear probing: the head alone trains
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    if cfg["compile"]:
        apply_compile(model)  # block by block (model.py)
    return model


def build_optimizer(cfg, model, device):
    """Adam(W); a classifier's new head at head_lr x lr; fused kernels on CUDA."""
    head = [p for n, p in model.named_parameters() if n.startswith("head.") and p.requires_grad]
    base = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    groups = [dict(params=base, lr_scale=1.0), dict(params=head, lr_scale=cfg["head_lr"])]
    optimizer_class = torch.optim.Adam if cfg["optimizer"] == "adam" else torch.optim.AdamW
    options = dict(lr=cfg["lr"], betas=cfg["betas"], weight_decay=cfg["weight_decay"])
    return optimizer_class([g for g in groups if g["params"]], fused=device.type == "cuda", **options)


def restore_training_state(resume, optimizer, scaler, cfg, rank, world, device):
    """A resumed run's optimizer and random state, that of the step it saved; a new run's seed.
    -> (the best validation metric so far, the sum of the weights to average so far)."""
    torch.manual_seed(cfg["seed"] + rank)  # each process its own masks and augmentation
    random.seed(cfg["seed"] + rank)
    if resume is None:
        return None, None
    if len(resume["rng"]) != world:  # each process continues its own random state
        raise ConfigError(f"ckpt.pt was saved by {len(resume['rng'])} processes: resume it with as many")
    optimizer.load_state_dict(resume["optimizer"])
    scaler.load_state_dict(resume["scaler"])
    rng = resume["rng"][rank]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return resume["best_metric"], resume["wa_sum"]


def on_signal(signum, frame):
    global received_signal
    received_signal = signum


def lr_factor(cfg, it, epoch, total_iters):
    """The lr multiplier at step `it` (0-based) of epoch `epoch` (0-based)."""
    if cfg["lr_schedule"] == "step":  # the official MultiStepLR(range(start, 1000, step)) per epoch
        decays = len(range(cfg["lrscheduler_start"], epoch + 1, cfg["lrscheduler_step"]))
        return cfg["lrscheduler_decay"] ** decays
    if it < cfg["warmup_iters"]:
        return (it + 1) / cfg["warmup_iters"]
    progress = min(1.0, (it - cfg["warmup_iters"]) / max(1, total_iters - cfg["warmup_iters"]))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * cosine


def train_step(model, batches, train_ds, optimizer, scaler, autocast, cfg, device):
    """One optimizer step over grad_accum micro-batches -> its mean scalars (on the device: no wait)."""
    stats = {}
    for micro in range(cfg["grad_accum"]):
        audio, image, label = train_ds.preprocess(next(batches), device)
        last = micro == cfg["grad_accum"] - 1
        gradient_sync = contextlib.nullcontext()
        if isinstance(model, DDP) and not last:  # DDP: the gradients are summed once, after the last
            gradient_sync = model.no_sync()
        with gradient_sync, autocast:
            loss, micro_stats = compute_loss(model, audio, image, label, cfg)
        scaler.scale(loss / cfg["grad_accum"]).backward()
        for k, v in micro_stats.items():
            stats[k] = stats.get(k, 0.0) + v.float() / cfg["grad_accum"]
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return stats


def compute_loss(model, audio, image, label, cfg):
    """-> (the loss to minimise, a dict of detached scalars to log)."""
    if cfg["task"] == "finetune":  # soft targets (mixup, smoothing) in either loss, as the official
        logits = model(audio, image, mode=cfg["ftmode"]).float()
        bce = cfg["loss"] == "bce"
        loss = F.binary_cross_entropy_with_logits(logits, label) if bce else F.cross_entropy(logits, label)
        return loss, {"loss": loss.detach()}
    objective = {k: cfg[k] for k in ("mae_weight", "contrastive_weight", "mask_mode", "bidirectional")}
    out = model(audio, image, mask_ratio_a=cfg["mask_ratio"], mask_ratio_v=cfg["mask_ratio"], **objective)
    return out["loss"], {k: out[k].detach() for k in PRETRAIN_STATS}


def evaluate(model, val_ds, cfg, device, final=False):
    """Validation metrics of the plain model (eval.py's): pretraining, audio<->visual retrieval
    (Sec. 4.2); fine-tuning, the classification metrics of the middle frame, and at the end also
    the official score over all frames. The run's random state is left as it was."""
    model.eval()
    loader = dict(batch_size=cfg["batch_size"], device=device, num_workers=cfg["num_workers"])
    with torch.random.fork_rng([device] if device.type == "cuda" else []):
        with torch.compiler.set_stance("force_eager"):  # compiled blocks: no graphs for evaluation
            if cfg["task"] == "pretrain":
                metrics = evaluation.retrieval(model, val_ds, **loader)
            else:
                mode = cfg["ftmode"]
                metrics = evaluation.classification(model, val_ds, mode, final, cfg["metric"], **loader)
    model.train()
    return metrics


def main_metric(cfg, metrics):
    if cfg["task"] == "pretrain":
        return (metrics["a2v_R1"] + metrics["v2a_R1"]) / 2
    return metrics[cfg["metric"]]


def rng_state(device):
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def every_process(obj, world):
    """[obj of process 0, obj of process 1, ...]."""
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


def save_checkpoint(path, model, cfg, **training_state):
    """The weights, what rebuilds the model, and the training state; written to a temporary file
    and renamed, so a kill or a full disk during the write leaves the previous file whole."""
    checkpoint = dict(
        model=model.state_dict(),
        model_args=dataclasses.asdict(model.config),
        task=cfg["task"],
        num_classes=model.head[-1].out_features if cfg["task"] == "finetune" else None,
        config=cfg,
        **training_state,
    )
    try:
        with open(path + ".tmp", "wb") as f:  # a file object: a failed write raises its OSError
            torch.save(checkpoint, f)
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as error:  # torch reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        name = os.path.basename(path)
        raise OSError(f"cannot write {path} ({one_line(error)}); the previous {name} is intact") from None


def log(path, record):
    """Append a record to log.jsonl and print it."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    values = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()]
    print(" | ".join([record["split"], *values[1:]]))


def one_line(error):
    """The last line of an error's message (a loader worker's error arrives with its traceback);
    an unexpected error's type first."""
    lines = str(error).strip().splitlines() or [""]
    if isinstance(error, (ValueError, OSError)) or lines[-1].split(": ", 1)[0].endswith("Error"):
        return lines[-1]
    return f"{type(error).__name__}: {lines[-1]}"


def summary(cfg, log_path):
    """The end of a run: its picture, its files and the command that evaluates it."""
    picture = pictures.train_picture(log_path)
    if picture is not None:
        picture.save(os.path.join(cfg["out_dir"], "train.png"))
    files = "final.pt (the final model), ckpt.pt (to resume), best.pt, log.jsonl, train.png"
    print(f"files in {cfg['out_dir']}: {files}")
    command = "retrieval" if cfg["task"] == "pretrain" else "classify"
    final = os.path.join(cfg["out_dir"], "final.pt")
    print(f"next: python eval.py {command} --checkpoint {final} --data {cfg['data_val']}")


def main(argv=None):
    try:
        return train(configure(sys.argv[1:] if argv is None else argv))
    except (ValueError, OSError) as error:  # bad settings or data, before the loop: one line
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
