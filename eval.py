"""
Evaluate CAV-MAE the ways the paper does, and run a model on a video.

    python eval.py classify  --checkpoint out/finetune/ckpt.pt --data test.json --label_csv labels.csv --frames all
    python eval.py retrieval --checkpoint out/pretrain/ckpt.pt --data test.json
    python eval.py inpaint   --checkpoint out/pretrain/ckpt.pt --data test.json --out inpaint/
    python eval.py predict   --checkpoint out/finetune/ckpt.pt --video clip.mp4 --topk 5
    python eval.py localize  --checkpoint out/pretrain/ckpt.pt --data test.json --out localize/
    python eval.py embed     --checkpoint out/pretrain/ckpt.pt --video clip.mp4 --out emb/

The metric functions at the top stand alone (numpy + torch) and reproduce scikit-learn's average
precision and ROC AUC bit for bit, and the official retrieval script's recall@K and median rank.
"""

import argparse
import csv
import json
import math
import os
import random
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

import data
from checkpoint import (
    architecture_from,
    infer_architecture,
    load_pretrained,
    read_checkpoint,
    state_dict_of,
)
from configurator import ConfigError, config_file_items, resolve_device
from model import (
    CAVMAE,
    FT_MODES,
    MASK_MODES,
    PRESETS,
    CAVMAEClassifier,
    CAVMAEConfig,
    pooled_representation,
)

# -----------------------------------------------------------------------------
# Metrics (Sec. 4 of the paper reports mAP, accuracy and retrieval R@K)


def _threshold_counts(y, s):
    """True/false positives above each distinct score, highest first: a tie is one threshold."""
    order = np.argsort(s, kind="stable")[::-1]  # descending; the order inside a tie does not matter
    s = s[order]
    y = y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[last_of_group]
    fps = 1 + last_of_group - tps
    return fps, tps


def average_precision(y, s):
    """scikit-learn's average_precision_score for one class: sum of precision x recall step."""
    fps, tps = _threshold_counts(y, s)
    ps = tps + fps
    precision = np.divide(tps, ps, out=np.zeros_like(tps), where=ps != 0)
    no_positives = tps[-1] == 0  # then AP = 0, as sklearn >= 1.1 says
    recall = np.ones_like(tps) if no_positives else tps / tps[-1]
    # sklearn's summation order: recall decreasing, then the point (recall 0, precision 1) appended
    precision = np.r_[precision[::-1], 1.0]
    recall = np.r_[recall[::-1], 0.0]
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def roc_auc(y, s):
    """scikit-learn's roc_auc_score for one class: trapezoids over thresholds (a tie is one diagonal
    step). NaN when the class has only positives or only negatives, as sklearn 1.9 returns."""
    if y.min() == y.max():
        return float("nan")
    fps, tps = _threshold_counts(y, s)
    if fps.size > 2:  # roc_curve drops collinear interior points; kept for bit-exact sums
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps = fps[keep]
        tps = tps[keep]
    fpr = np.r_[0.0, fps] / fps[-1]
    tpr = np.r_[0.0, tps] / tps[-1]
    return float((np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0).sum())


def d_prime(auc):
    """sqrt(2) * inverse normal CDF of an AUC (float64): 0 at chance, +inf at AUC 1."""
    return float(torch.special.ndtri(torch.tensor(auc, dtype=torch.float64)) * math.sqrt(2.0))


def _as_numpy(x, name):
    x = x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, classes), got shape {x.shape}")
    return x


def classification_metrics(scores, targets):
    """Per-class AP and ROC AUC exactly as scikit-learn defines them, their means, d-prime and
    accuracy.

    scores: (N, C) logits or probabilities (only their order matters for AP/AUC); targets: (N, C) in
    {0, 1}. As the official code does, mAP averages AP over all classes (a class without positives
    has AP 0.0) and d_prime is computed from the mean AUC. A class without positives (or negatives)
    has AUC NaN, as in sklearn 1.9; mAUC averages the classes whose AUC is defined (the official
    code would print NaN). acc: fraction of rows whose argmax of scores equals the argmax of targets
    (first index on ties)."""
    scores = _as_numpy(scores, "scores")
    targets = _as_numpy(targets, "targets")
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; AP and AUC are undefined")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be 0/1 (evaluate without label smoothing or mixup)")
    ap = [average_precision(targets[:, k], scores[:, k]) for k in range(targets.shape[1])]
    auc = [roc_auc(targets[:, k], scores[:, k]) for k in range(targets.shape[1])]
    defined = [a for a in auc if not math.isnan(a)]
    mauc = float(np.mean(defined)) if defined else float("nan")
    acc = float(np.mean(np.argmax(targets, 1) == np.argmax(scores, 1)))
    return dict(mAP=float(np.mean(ap)), mAUC=mauc, d_prime=d_prime(mauc), acc=acc, AP=ap, AUC=auc)


def retrieval_metrics(similarity):
    """Recall@1/5/10 and median rank (1-based) with queries as rows and the match on the diagonal.

    Same numbers as the official retrieval script: the match's rank is its position in the row
    sorted by decreasing similarity; when k other candidates tie with the match exactly, the row
    counts once at each of the k+1 tied positions (so a collapsed model scores like chance, not
    perfectly)."""
    sim = torch.as_tensor(similarity).double()
    if (sim.ndim != 2) or (sim.shape[0] != sim.shape[1]):
        shape = tuple(sim.shape)
        raise ValueError(f"similarity must be a square (queries, candidates) matrix, got {shape}")
    if not torch.isfinite(sim).all():
        raise ValueError("similarity contains NaN or inf (did the embeddings diverge?)")
    match = sim.diagonal()[:, None]  # (N, 1)
    above = (sim > match).sum(1)  # (N,) candidates strictly more similar than the match
    tied = (sim == match).sum(1)  # (N,) >= 1: the match itself
    start = torch.cumsum(tied, 0) - tied
    position_in_tie = torch.arange(int(tied.sum())) - start.repeat_interleave(tied)  # 0 .. k for k ties
    ranks = above.repeat_interleave(tied) + position_in_tie
    ranks = ranks.numpy()  # 0-based, one per (row, tied position)
    return dict(
        R1=float(np.mean(ranks < 1)),
        R5=float(np.mean(ranks < 5)),
        R10=float(np.mean(ranks < 10)),
        MR=float(np.median(ranks) + 1),
    )


# -----------------------------------------------------------------------------
# Rebuilding a model from a checkpoint (ours or the official release)


def read_config_file(path):
    """Settings from a json file or a python config file like train.py's (its top-level assignments)."""
    if path.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    return dict(config_file_items(path))


def load_model(checkpoint, task=None, preset="base", config=None, device="cpu", **arch_overrides):
    """Rebuild CAVMAE (task 'pretrain') or CAVMAEClassifier ('finetune') from a checkpoint and load it.

    Ours (train.py's dict with model_args/task/num_classes) needs nothing else. An official state dict gets
    its architecture from `preset`, then what its tensor shapes say, then `config` (a dict, or a .json / .py
    file), then `arch_overrides`; its task and class count come from its keys. `task` given and different
    from the checkpoint's is an error. Returns (model in eval mode on `device`, info dict with the
    checkpoint's format, task, num_classes, train config and load report)."""
    ckpt = read_checkpoint(checkpoint)
    state = state_dict_of(ckpt)
    extra = read_config_file(config) if isinstance(config, str) else dict(config or {})
    if "model_args" in ckpt:  # ours
        model_args = {**ckpt["model_args"], **arch_overrides}
        found_task = ckpt.get("task", "pretrain")
        found_classes = ckpt.get("num_classes")
        train_config = ckpt.get("config") or {}
    else:  # official (or a bare state dict of ours)
        preset = extra.get("preset", extra.get("model_preset", preset))
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}: choose one of {sorted(PRESETS)}")
        model_args = {
            **PRESETS[preset],
            **infer_architecture(state),
            **architecture_from(extra),
            **arch_overrides,
        }
        head = state.get("mlp_head.1.weight", state.get("head.1.weight"))
        found_task = "pretrain" if head is None else "finetune"
        found_classes = None if head is None else head.shape[0]
        train_config = extra
    if (task is not None) and (task != found_task):
        need = "a fine-tuned classifier" if task == "finetune" else "a pretrained CAV-MAE (with its decoder)"
        raise ValueError(f"{checkpoint} holds a {found_task} model; this command needs {need}")
    cfg = CAVMAEConfig(**model_args)
    model = CAVMAEClassifier(cfg, found_classes) if found_task == "finetune" else CAVMAE(cfg)
    report = load_pretrained(model, state, path=checkpoint)  # errors name the file
    if report.missing:
        raise ValueError(f"{checkpoint} does not fill the model: {report}")
    info = dict(
        format=report.source_format,
        task=found_task,
        num_classes=found_classes,
        config=train_config,
        report=str(report),
    )
    return model.to(device).eval(), info


def fbank_statistic(flag, train, name, default):
    """--mean / --std if given, else the checkpoint's (dataset_NAME or NAME), else AudioSet's."""
    if flag is not None:
        return flag
    return train.get(f"dataset_{name}", train.get(name, default))


def data_settings(model, info, args):
    """AVDataset keywords for this model: its input sizes, and the fbank mean/std it trained with."""
    cfg = model.config
    train = info["config"]
    return dict(
        target_length=cfg.audio_length,
        image_size=cfg.img_size,
        mean=fbank_statistic(args.mean, train, "mean", data.AUDIOSET_MEAN),
        std=fbank_statistic(args.std, train, "std", data.AUDIOSET_STD),
    )


def open_dataset(model, info, args, datafile, label_csv, source=None, **options):
    """data.AVDataset of `datafile` with the model's input sizes and fbank statistics (options:
    AVDataset's other keywords); says in one line when those sizes change the data (source: what to
    call it there)."""
    ds = data.AVDataset(datafile, label_csv, **data_settings(model, info, args), **options)
    cfg = model.config
    for note in data.adaptation_notes(
        datafile, ds.rows, cfg.img_size, cfg.audio_length, ds.num_frames, source
    ):
        print(note)
    return ds


def ftmode(args, info):
    return args.ftmode or info["config"].get("ftmode", "multimodal")


def check_classes(ds, info, label_csv):
    if ds.num_classes != info["num_classes"]:
        predicted = info["num_classes"]
        raise ValueError(f"{label_csv} lists {ds.num_classes} classes but the model predicts {predicted}")


def label_csv_for(datafile, label_csv, workdir):
    """The label csv to read `datafile` with: retrieval needs none, so one of the datafile's labels."""
    if label_csv:
        return label_csv
    mids = sorted({m for row in data.read_datafile(datafile) for m in data.label_mids(row)})
    if not mids:
        mids = ["unlabelled"]
    path = os.path.join(workdir, "labels.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("index", "mid", "display_name"))
        writer.writerows((i, m, m) for i, m in enumerate(mids))
    return path


def check_file(flag, path):
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: file not found; check the path")


def clip_name(args):
    """The one clip of --video, or of --wav with --image, as the user named it."""
    if args.video:
        return args.video
    return f"{args.wav} with {args.image}"


def clip_datafile(args, tmp):
    """--video, or --wav with --image: a one-clip datafile in `tmp`; returns (its path, the frames
    the clip has). An error names the file and says what to do."""
    import prepare  # ffmpeg's wrappers, only for a clip

    has_clip = bool(args.video) or (bool(args.wav) and bool(args.image))
    if not has_clip:
        alternative = ", or --data" if "data" in vars(args) else ""
        raise ValueError(f"{args.command} needs --video, or --wav together with --image{alternative}")
    if not args.video:
        check_file("--wav", args.wav)
        check_file("--image", args.image)
    try:
        return prepare.one_clip_datafile(tmp, args.video, args.wav, args.image)
    except prepare.PrepareError as error:
        raise ValueError(f"--video {args.video}: {error}; {error.advice}") from None
    except prepare.FFmpegMissing as error:
        raise ValueError(f"--video {args.video} is read with ffmpeg: {error}") from None


def clip_dataset(model, info, args, tmp):
    """What localize and embed run on: the clips of --data (the first --limit), or the one clip of
    --video / --wav + --image, at frame --frame (default: the middle one, as retrieval; an --image
    is frame 0)."""
    if args.data:
        datafile = args.data
        available = None  # every frame of the datafile's clips
        source = None
    else:
        datafile, available = clip_datafile(args, tmp)
        source = clip_name(args)
    label_csv = label_csv_for(datafile, args.label_csv, tmp)
    ds = open_dataset(model, info, args, datafile, label_csv, source, raw=True)
    if available == [0]:  # an --image is the clip's only frame
        ds.frame = 0
    elif args.frame is not None:
        ds.frame = args.frame
    else:
        ds.frame = ds.num_frames // 2
    ds.rows = ds.rows[: args.limit]
    return ds


def batches(ds, args):
    """Finished (audio, image, label) batches on args.device, in datafile order."""
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        collate_fn=data.collate_raw,
    )
    prep = data.BatchPreprocessor.from_dataset(ds)
    for batch in loader:
        yield prep(batch, args.device)


def autocast(args):
    dtype = dict(float32=None, bfloat16=torch.bfloat16, float16=torch.float16)[args.dtype]
    return torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def predict_logits(model, ds, args, mode):
    """Logits (N, K) float32 and labels (N, K) of the whole dataset at its current frame."""
    logits = []
    labels = []
    for audio, image, label in batches(ds, args):
        with autocast(args):
            logits.append(model(audio, image, mode).float().cpu())
        labels.append(label.cpu())
    return torch.cat(logits), torch.cat(labels)


def frame_list(frames, num_frames=10):
    """--frames: 'all' -> every frame (averaged), an int -> that frame, None -> the middle one."""
    if frames is None:
        return [num_frames // 2]
    if frames == "all":
        return list(range(num_frames))
    if (not frames.isdigit()) or (int(frames) >= num_frames):
        raise ValueError(f"--frames must be 'all' or a frame number 0..{num_frames - 1}, got {frames!r}")
    return [int(frames)]


def activation_for(args, info, labels=None):
    """How per-frame predictions are averaged (docs/preprocessing.md, section 3): softmax for accuracy
    runs, sigmoid for mAP runs, as the checkpoint's config says (metric='acc' | 'mAP'); without one,
    softmax iff every clip has one label."""
    if args.activation != "auto":
        return args.activation
    metric = info["config"].get("metric")
    if metric is None:
        metric = "acc" if one_label_each(labels) else "mAP"
    return "softmax" if metric == "acc" else "sigmoid"


def one_label_each(labels):
    """Whether every clip has exactly one label: (N, K) 0/1, or None (unknown: no)."""
    if labels is None:
        return False
    return bool((labels.sum(1) == 1).all())


def frame_logits(model, ds, args, mode, frames):
    """Logits (len(frames), N, K) with each frame in turn, and the labels (N, K)."""
    logits = []
    for k in frames:
        ds.frame = k
        x, labels = predict_logits(model, ds, args, mode)
        logits.append(x)
    return torch.stack(logits), labels


def average_frames(logits, activation):
    """(frames, N, K) logits -> (N, K) mean of per-frame sigmoid or softmax (the official score)."""
    probs = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=-1)
    return probs.mean(0)


# -----------------------------------------------------------------------------
# Commands


def nan_to_none(x):
    """x with every float NaN inside it (dicts, lists, tuples) replaced by None: json has no NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    return x


def write_json(path, obj):
    """json with NaN written as null."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(nan_to_none(obj), f, indent=1)


def print_table(rows, header):
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells))


def cmd_classify(args):
    model, info = load_model(args.checkpoint, "finetune", device=args.device, **arch_flags(args))
    label_csv = args.label_csv or info["config"].get("label_csv")
    if not label_csv:
        raise ValueError("classify needs --label_csv (the checkpoint does not name one)")
    ds = open_dataset(model, info, args, args.data, label_csv, raw=True)
    check_classes(ds, info, label_csv)
    frames = frame_list(args.frames)
    mode = ftmode(args, info)
    logits, labels = frame_logits(model, ds, args, mode, frames)
    if len(frames) > 1:
        act = activation_for(args, info, labels)
        scores = average_frames(logits, act)
    else:  # one frame: raw logits, as official
        act = None
        scores = logits[0]
    m = classification_metrics(scores, labels)
    averaged = f" ({act} averaged)" if act else ""
    frames_shown = args.frames or frames[0]
    print(f"{args.checkpoint}: {len(ds)} clips, mode {mode}, frames {frames_shown}{averaged}")
    summary = [[k, f"{m[k]:.4f}"] for k in ("mAP", "mAUC", "d_prime", "acc")]
    print_table(summary, ["metric", "value"])
    out = dict(m, mode=mode, frames=frames, activation=act, clips=len(ds), checkpoint=args.checkpoint)
    per_class = per_class_csv_path(args)
    if per_class:
        write_per_class_csv(per_class, ds.labels, labels, m)
        print(f"per-class AP/AUC -> {per_class}")
    if args.out:
        write_json(args.out, out)
    return out


def per_class_csv_path(args):
    """--per_class_csv, else next to --out (cls.json -> cls_per_class.csv), else None."""
    if args.per_class_csv:
        return args.per_class_csv
    if args.out:
        return os.path.splitext(args.out)[0] + "_per_class.csv"
    return None


def write_per_class_csv(path, label_csv, labels, metrics):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "mid", "display_name", "positives", "AP", "AUC"])
        for k, (mid, name) in enumerate(zip(label_csv.mids, label_csv.names)):
            positives = int(labels[:, k].sum())
            ap = f"{metrics['AP'][k]:.6f}"
            auc = f"{metrics['AUC'][k]:.6f}"
            w.writerow([k, mid, name, positives, ap, auc])


def per_class_subset(rows, k, seed):
    """The paper's retrieval protocol: k clips of each class (a clip's class is its first label;
    unlabelled clips are left out), drawn reproducibly for `seed`; a class with fewer clips gives
    all of them. Returns (the chosen row indices in datafile order, {mid: clips taken} for each
    class)."""
    members = {}
    for i, row in enumerate(rows):
        mids = data.label_mids(row)
        if mids:
            members.setdefault(mids[0], []).append(i)
    rng = random.Random(seed)
    keep = []
    taken = {}
    for mid in sorted(members):
        keep += rng.sample(members[mid], min(k, len(members[mid])))
        taken[mid] = min(k, len(members[mid]))
    return sorted(keep), taken


def save_embeddings(folder, ds, **arrays):
    """NAME.npy (float32, one row per clip) for each array, and video_ids.txt in the same order."""
    os.makedirs(folder, exist_ok=True)
    for name, array in arrays.items():
        np.save(os.path.join(folder, f"{name}.npy"), np.asarray(array, dtype=np.float32))
    with open(os.path.join(folder, "video_ids.txt"), "w") as f:
        f.writelines(row["video_id"] + "\n" for row in ds.rows)
    print(f"{', '.join(arrays)} embeddings ({len(ds)} clips) -> {folder}")


@torch.no_grad()
def pool_embeddings(model, batches, autocast):
    """The coordinated representations that retrieval compares (Sec. 4.2): each clip's audio and
    visual tokens, each modality alone through the joint blocks, mean-pooled and unit length ->
    audio (N, D), visual (N, D) on the CPU, in the order of `batches` ((audio, image, label)
    batches; train.py's validation and cmd_retrieval)."""
    audio_emb = []
    visual_emb = []
    for audio, image, _ in batches:
        with autocast:
            a, v = model.embed(audio, image)  # (B, La, D), (B, Lv, D); classifiers have embed too
        audio_emb.append(pooled_representation(a).cpu())  # (B, D)
        visual_emb.append(pooled_representation(v).cpu())
    return torch.cat(audio_emb), torch.cat(visual_emb)


@torch.no_grad()
def cmd_retrieval(args):
    if args.frames == "all":
        raise ValueError("retrieval embeds one frame of each clip: --frames must be a frame number")
    model, info = load_model(args.checkpoint, device=args.device, **arch_flags(args))
    with tempfile.TemporaryDirectory() as tmp:
        ds = open_dataset(
            model, info, args, args.data, label_csv_for(args.data, args.label_csv, tmp), raw=True
        )
        ds.frame = frame_list(args.frames)[0]
        subset = None
        if args.per_class:  # the paper's protocol: the same number of clips of each class
            keep, taken = per_class_subset(ds.rows, args.per_class, args.seed)
            short = {mid: n for mid, n in taken.items() if n < args.per_class}
            subset = dict(
                per_class=args.per_class,
                seed=args.seed,
                clips=len(keep),
                of=len(ds),
                classes=len(taken),
                short_classes=short,
            )
            ds.rows = [ds.rows[i] for i in keep]
            print(
                f"{args.per_class} clips per class (seed {args.seed}): {len(keep)} of {subset['of']} clips, "
                f"{len(taken)} classes"
                + (f"; all clips of {len(short)} with fewer: {short}" if short else "")
            )
        audio_emb, visual_emb = pool_embeddings(model, batches(ds, args), autocast(args))  # (N, D) each
    similarity = audio_emb.double() @ visual_emb.double().T  # (N, N) cosine, rows = audio queries
    out = dict(
        audio_to_visual=retrieval_metrics(similarity),
        visual_to_audio=retrieval_metrics(similarity.T),
        clips=len(ds),
        subset=subset,
        checkpoint=args.checkpoint,
    )
    print(f"{args.checkpoint} ({info['task']}): retrieval among {len(ds)} clips")
    print_table(
        [
            [d, *(f"{out[d][k]:.4f}" for k in ("R1", "R5", "R10")), f"{out[d]['MR']:g}"]
            for d in ("audio_to_visual", "visual_to_audio")
        ],
        ["direction", "R@1", "R@5", "R@10", "MR"],
    )
    if args.save_embeddings:
        save_embeddings(args.save_embeddings, ds, audio=audio_emb, visual=visual_emb)
    if args.out:
        write_json(args.out, out)
    return out


# Inpainting pictures (Fig. 3 of the paper): original / masked / reconstructed spectrogram and frame


@torch.no_grad()
def cmd_inpaint(args):
    import pictures

    model, info = load_model(args.checkpoint, "pretrain", device=args.device, **arch_flags(args))
    with tempfile.TemporaryDirectory() as tmp:
        label_csv = label_csv_for(args.data, args.label_csv, tmp)
        ds = open_dataset(model, info, args, args.data, label_csv)
    items = [ds[i] for i in range(min(args.n, len(ds)))]
    audio = torch.stack([x[0] for x in items])  # (n, T, F)
    image = torch.stack([x[1] for x in items])  # (n, 3, S, S)
    torch.manual_seed(args.seed)
    random.seed(args.seed)  # structured audio masks draw their rows/columns with `random`
    out = model(
        audio.to(args.device),
        image.to(args.device),
        mask_ratio_a=args.mask_ratio,
        mask_ratio_v=args.mask_ratio,
        mask_mode=args.mask_mode,
        mae_weight=1.0,
        contrastive_weight=0.0,
    )
    out = {k: v.float().cpu() for k, v in out.items() if torch.is_tensor(v)}
    model.cpu()
    os.makedirs(args.out, exist_ok=True)
    note = " (norm_pix_loss: patch mean/std from the input)" if model.config.norm_pix_loss else ""
    written = [os.path.join(args.out, f"{row['video_id']}.png") for row in ds.rows[: len(items)]]
    for i, path in enumerate(written):
        title = f"{ds.rows[i]['video_id']}, {args.mask_mode} masking{note}"
        pictures.inpaint_picture(
            model,
            audio[i],
            image[i],
            out["mask_a"][i],
            out["mask_v"][i],
            out["pred_a"][i],
            out["pred_v"][i],
            title,
        ).save(path)
    losses = dict(loss_mae_a=out["loss_mae_a"].item(), loss_mae_v=out["loss_mae_v"].item())
    errors = f"audio {losses['loss_mae_a']:.4f}, visual {losses['loss_mae_v']:.4f}"
    print(f"{len(written)} pictures -> {args.out}; masked-patch MSE {errors}")
    write_json(
        os.path.join(args.out, "inpaint.json"),
        dict(
            losses,
            pictures=written,
            mask_ratio=args.mask_ratio,
            mask_mode=args.mask_mode,
            checkpoint=args.checkpoint,
        ),
    )
    return written


# Sound-source localisation: where in the frame the sound comes from


def similarity_map(audio_tokens, visual_tokens, grid):
    """Cosine similarity between each clip's pooled audio representation (the coordinated one
    retrieval uses) and each of its coordinated visual patch tokens: (B, La, D), (B, Lv, D) -> (B,
    h, w) over the patch grid."""
    audio = pooled_representation(audio_tokens)  # (B, D) unit length
    visual = F.normalize(visual_tokens.float(), dim=-1)  # (B, Lv, D)
    return torch.einsum("bd,bld->bl", audio, visual).reshape(-1, *grid)


def peak_patch(similarity):
    """(h, w) -> (row, col) of the most similar patch (the first in row-major order on a tie)."""
    k = int(similarity.flatten().argmax())
    width = similarity.shape[1]
    return k // width, k % width


def object_patches(inside, patch_size, image_size, samples=256):
    """The pointing game's truth on one frame: which patch centres lie inside an object ((h, w)
    bool: a map hits when its peak patch is one), and the fraction of the frame the objects cover
    (on samples x samples points). inside(x, y): the objects test, in pixels of the (image_size,
    image_size) image the model sees."""
    centres = (np.arange(image_size // patch_size) + 0.5) * patch_size
    points = (np.arange(samples) + 0.5) * image_size / samples
    in_patch = inside(centres[None, :], centres[:, None])  # (h, w)
    area = float(inside(points[None, :], points[:, None]).mean())
    return in_patch, area


def score_clip(objects, video_id, frame, sim, other, patch_size, image_size):
    """One clip's entry of localization.json: its peak patch and, where objects.json says where the
    objects are, hit (the pointing game), area (its chance level), patch_centres (the chance of a
    random patch), hit_min (a diagnostic: the map's minimum on an object, i.e. a map that finds the
    objects with the wrong sign) and hit_other_audio (the control: the map of another clip's audio,
    `other`; None to skip). Returns (the entry, the objects test inside(x, y) in image pixels, or
    None)."""
    import synthetic  # objects.json's geometry

    clip = dict(video_id=video_id, peak=list(peak_patch(sim)))
    if objects is None:
        return clip, None
    # objects.json is in pixels of the stored (square) frame; read_frame rescales it to image_size
    scale = objects["frame_size"] / image_size
    frame_objects = objects["clips"][video_id][frame]

    def inside(x, y):  # in pixels of the image the model sees
        return synthetic.inside_objects(frame_objects, x * scale, y * scale)

    in_patch, area = object_patches(inside, patch_size, image_size)
    clip.update(
        hit=bool(in_patch[tuple(clip["peak"])]),
        area=area,
        patch_centres=float(in_patch.mean()),
        hit_min=bool(in_patch[peak_patch(-sim)]),
    )
    if other is not None:
        clip["hit_other_audio"] = bool(in_patch[peak_patch(other)])
    return clip, inside


def hit_or_miss(clip, inside):
    """The picture title's verdict: ': hit', ': miss', or nothing without object positions."""
    if inside is None:
        return ""
    return ": hit" if clip["hit"] else ": miss"


@torch.no_grad()
def cmd_localize(args):
    import pictures
    import synthetic  # objects.json

    model, info = load_model(args.checkpoint, device=args.device, **arch_flags(args))
    p = model.config.patch_size
    S = model.config.img_size
    grid = model.config.visual_grid
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ds = clip_dataset(model, info, args, tmp)
        video_ids = [r["video_id"] for r in ds.rows]
        objects, objects_path = synthetic.read_objects(args.objects, args.data, video_ids)
        clips = []
        for audio, image, _ in batches(ds, args):
            with autocast(args):
                a, v = model.embed(audio, image)  # (B, La, D), (B, Lv, D); classifiers have embed too
            sims = similarity_map(a, v, grid).cpu()  # (B, h, w)
            if len(a) > 1:  # the control: each frame's map with the previous clip's audio
                others = similarity_map(a.roll(1, 0), v, grid).cpu()
            else:
                others = [None] * len(a)
            for sim, other, img in zip(sims, others, image.cpu()):
                video_id = ds.rows[len(clips)]["video_id"]
                clip, inside = score_clip(objects, video_id, ds.frame, sim, other, p, S)
                clip["picture"] = os.path.join(args.out, f"{video_id}.png")
                title = f"{video_id}, frame {ds.frame}{hit_or_miss(clip, inside)}"
                picture = pictures.localization_picture(img, sim, clip["peak"], p, title, inside)
                picture.save(clip["picture"])
                clips.append(clip)

    def mean(key):  # over the clips that have it, None if none has
        values = [c[key] for c in clips if key in c]
        return float(np.mean(values)) if values else None

    out = dict(
        pointing_game=mean("hit"),
        chance=mean("area"),
        chance_patch_centres=mean("patch_centres"),
        pointing_game_other_audio=mean("hit_other_audio"),
        pointing_game_min=mean("hit_min"),
        n=len(clips),
        frame=ds.frame,
        grid=list(grid),
        objects=objects_path,
        checkpoint=args.checkpoint,
        clips=clips,
    )
    write_json(os.path.join(args.out, "localization.json"), out)
    scores = [f"{k} {v:.3f}" for k, v in list(out.items())[:5] if v is not None]  # the five means
    if not scores:
        scores = ["no objects.json, pictures only"]
    written = f"pictures and localization.json -> {args.out}"
    print(f"{len(clips)} clips, frame {ds.frame}: {', '.join(scores)}; {written}")
    return out


# Embeddings of any clip (the official release extracts audio features only)


def representations(model, audio, image):
    """Sec. 3's three representations of each clip, without masking: the coordinated audio and
    visual ones (each modality alone through the joint blocks with its own norms, mean-pooled, unit
    length: what retrieval compares) and the joint one (audio and visual tokens together through the
    joint blocks with the joint norms, mean-pooled and not normalised: the classifier's multimodal
    features, what its head reads). (B, D) each."""
    enc = model.encoder
    a = enc.audio_tokens(audio)  # (B, La, D)
    v = enc.visual_tokens(image)  # (B, Lv, D)
    joint = enc.joint(torch.cat([a, v], dim=1), "joint").mean(dim=1)  # (B, D)
    audio_alone = pooled_representation(enc.joint(a, "audio"))  # (B, D)
    visual_alone = pooled_representation(enc.joint(v, "visual"))  # (B, D)
    return audio_alone, visual_alone, joint


@torch.no_grad()
def cmd_embed(args):
    model, info = load_model(args.checkpoint, device=args.device, **arch_flags(args))
    with tempfile.TemporaryDirectory() as tmp:
        ds = clip_dataset(model, info, args, tmp)
        parts = []
        for audio, image, _ in batches(ds, args):
            with autocast(args):
                parts.append([x.float().cpu() for x in representations(model, audio, image)])
    audio_emb = torch.cat([audio for audio, _, _ in parts])  # (N, D)
    visual_emb = torch.cat([visual for _, visual, _ in parts])  # (N, D)
    joint_emb = torch.cat([joint for _, _, joint in parts])  # (N, D)
    save_embeddings(args.out, ds, audio=audio_emb, visual=visual_emb, joint=joint_emb)
    video_ids = [r["video_id"] for r in ds.rows]
    return dict(audio=audio_emb, visual=visual_emb, joint=joint_emb, video_ids=video_ids)


# Inference on one video


def predict_label_csv(args, info, tmp):
    """--label_csv (which must exist), else the checkpoint's label csv if it is here, else one
    written in `tmp` that names the classes by their index."""
    if args.label_csv:
        return args.label_csv
    label_csv = info["config"].get("label_csv")
    if label_csv and os.path.isfile(label_csv):
        return label_csv
    print(
        f"the checkpoint's label csv {label_csv!r} is not here and no --label_csv given: "
        "classes are named by their index"
    )
    path = os.path.join(tmp, "labels.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("index", "mid", "display_name"))
        writer.writerows((k, f"class_{k}", f"class {k}") for k in range(info["num_classes"]))
    return path


@torch.no_grad()
def cmd_predict(args):
    model, info = load_model(args.checkpoint, "finetune", device=args.device, **arch_flags(args))
    with tempfile.TemporaryDirectory() as tmp:
        datafile, available = clip_datafile(args, tmp)
        if len(available) > 1:  # a video: every frame unless --frames says otherwise
            frames = frame_list(args.frames or "all")
        else:
            frames = available
        label_csv = predict_label_csv(args, info, tmp)
        ds = open_dataset(model, info, args, datafile, label_csv, clip_name(args), raw=True)
        check_classes(ds, info, label_csv)
        logits, _ = frame_logits(model, ds, args, ftmode(args, info), frames)
    act = activation_for(args, info)
    probs = average_frames(logits, act)[0]  # (K,)
    top = probs.topk(min(args.topk, probs.numel()))
    result = [
        dict(index=int(k), mid=ds.labels.mids[k], name=ds.labels.names[k], score=float(p))
        for p, k in zip(top.values, top.indices)
    ]
    print(
        f"{clip_name(args)}: top {len(result)} of {probs.numel()} classes "
        f"({act}, mean over {len(frames)} frames)"
    )
    print_table([[r["name"] or r["mid"], f"{r['score']:.4f}"] for r in result], ["label", "score"])
    if args.out:
        write_json(
            args.out,
            dict(
                top=result,
                activation=act,
                frames=frames,
                mode=ftmode(args, info),
                input=args.video or [args.wav, args.image],
            ),
        )
    return result


# -----------------------------------------------------------------------------
# Command line


def arch_flags(args):
    """--preset / --config / --model_arg KEY=VALUE: the architecture of an official checkpoint;
    --audio_length: clips shorter than the checkpoint's, for any checkpoint."""
    overrides = {}
    defaults = CAVMAEConfig()
    for item in args.model_arg:
        key, _, value = item.partition("=")
        if not hasattr(defaults, key):
            raise ValueError(f"--model_arg {item}: {key!r} is not a CAVMAEConfig field")
        kind = type(getattr(defaults, key))
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    if args.audio_length:
        overrides["audio_length"] = args.audio_length
    return dict(preset=args.preset, config=args.config, **overrides)


def add_command(commands, name, help, inputs="data"):
    """A subcommand with the flags every command shares. inputs: "data" (--data), "clip" (one video,
    or a wav and an image) or "either"."""
    p = commands.add_parser(name, help=help)
    p.add_argument("--checkpoint", required=True, help="train.py's ckpt.pt, or an official state dict")
    if inputs != "clip":
        p.add_argument("--data", required=inputs == "data", help="datafile (json, official format)")
    if inputs != "data":
        p.add_argument("--video", help="a video file with audio (any format ffmpeg reads)")
        p.add_argument("--wav", help="a 16 kHz audio file (with --image instead of --video)")
        p.add_argument("--image", help="one frame (with --wav)")
    if inputs == "either":
        p.add_argument(
            "--frame", type=int, choices=range(10), metavar="K", help="which frame (default: middle)"
        )
        p.add_argument("--limit", type=int, metavar="N", help="only the first N clips of --data")
    p.add_argument("--label_csv", help="index,mid,display_name csv")
    p.add_argument("--out", help="json file of the results (inpaint, localize, embed: a folder)")
    p.add_argument(
        "--preset", default="base", choices=sorted(PRESETS), help="official checkpoints: architecture"
    )
    p.add_argument("--config", help="official checkpoints: architecture from a .json or .py config")
    p.add_argument(
        "--model_arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="official checkpoints: override a CAVMAEConfig field (repeatable)",
    )
    p.add_argument(
        "--audio_length",
        type=int,
        help="fbank frames per clip (default: the checkpoint's); "
        "shorter ones cut the audio position tables, e.g. 512 for 5 s clips with a 10 s model",
    )
    p.add_argument("--mean", type=float, help="fbank mean (default: the checkpoint's, or AudioSet's)")
    p.add_argument("--std", type=float, help="fbank normalisation std")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="autocast dtype"
    )
    return p


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    commands = parser.add_subparsers(dest="command", required=True)

    p = add_command(commands, "classify", "mAP, mAUC, d-prime and accuracy of a fine-tuned model")
    p.add_argument("--ftmode", choices=FT_MODES, help="default: the checkpoint's, else multimodal")
    p.add_argument(
        "--frames", help="'all' (average over the 10 frames) or a frame number (default: middle frame)"
    )
    p.add_argument(
        "--activation",
        default="auto",
        choices=["auto", "sigmoid", "softmax"],
        help="averaging over frames: auto = the checkpoint's metric (acc: softmax, mAP: sigmoid)",
    )
    p.add_argument("--per_class_csv", help="per-class AP/AUC csv (default: next to --out)")
    p.set_defaults(run=cmd_classify)

    p = add_command(commands, "retrieval", "audio->visual and visual->audio recall@K and median rank")
    p.add_argument("--frames", help="which frame (default: the middle one, as the official script)")
    p.add_argument("--save_embeddings", metavar="DIR", help="audio.npy, visual.npy, video_ids.txt")
    p.add_argument(
        "--per_class",
        type=int,
        metavar="K",
        help="the paper's protocol: K clips of each class "
        "(by a clip's first label) instead of the whole datafile",
    )
    p.add_argument("--seed", type=int, default=0, help="which K clips --per_class draws")
    p.set_defaults(run=cmd_retrieval)

    p = add_command(commands, "inpaint", "pictures of masked reconstructions of a pretrained model")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--mask_mode", default="unstructured", choices=MASK_MODES)
    p.add_argument("--n", type=int, default=4, help="number of clips (the first n of the datafile)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_inpaint)

    p = add_command(
        commands,
        "localize",
        "heat maps of where the sound comes from, and the pointing game on synthetic data",
        "either",
    )
    p.add_argument("--objects", help="where the objects are (default: objects.json beside --data)")
    p.set_defaults(run=cmd_localize)

    p = add_command(
        commands, "embed", "coordinated audio / visual and joint representations as .npy", "either"
    )
    p.set_defaults(run=cmd_embed)

    p = add_command(
        commands, "predict", "top labels of a fine-tuned model on one video (or a wav and an image)", "clip"
    )
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--ftmode", choices=FT_MODES, help="default: the checkpoint's, else multimodal")
    p.add_argument("--frames", help="'all' (default for videos) or a frame number")
    p.add_argument("--activation", default="auto", choices=["auto", "sigmoid", "softmax"])
    p.set_defaults(run=cmd_predict)

    args = parser.parse_args(argv)
    try:
        args.device = str(resolve_device(args.device))
    except ConfigError as error:
        parser.error(str(error))
    writes_a_folder = args.command in ("inpaint", "localize", "embed")
    if writes_a_folder and (not args.out):
        parser.error(f"{args.command} needs --out DIR")
    has_data = bool(getattr(args, "data", None))
    has_clip = bool(getattr(args, "video", None)) or bool(getattr(args, "wav", None))
    if has_data and has_clip:
        one_clip = "one clip (--video, or --wav with --image)"
        parser.error(f"{args.command} takes --data or {one_clip}, not both")
    return args.run(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        # bad input: one readable line (clip errors name the file, data.py's the row)
        sys.exit(f"eval.py: error: {e}")
