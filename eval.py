"""
Evaluate CAV-MAE the ways the paper does (Sec. 4), and look inside it.

    python eval.py classify  --checkpoint out/finetune/ckpt.pt --data test.json --out out/eval
    python eval.py retrieval --checkpoint out/pretrain/ckpt.pt --data test.json [--per_class 5]
    python eval.py inpaint   --checkpoint out/pretrain/ckpt.pt --data test.json --out out/inpaint
    python eval.py embed     --checkpoint out/pretrain/ckpt.pt --data test.json --out out/emb.npz
    python eval.py localize  --checkpoint out/pretrain/ckpt.pt --data data/synthetic/test.json --out out/loc

A checkpoint is train.py's ckpt.pt or one of the official release (a bare state dict of the paper's
architecture). The metric functions at the top stand alone: they give scikit-learn's average precision and
ROC AUC bit for bit, and the official retrieval script's recall@K and median rank.
"""

import argparse
import csv
import json
import math
import os
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data
import pictures
import prepare
from model import (
    CAVMAE,
    FT_MODES,
    MASK_MODES,
    MASK_RATIO,
    CAVMAEClassifier,
    CAVMAEConfig,
    load_pretrained,
    pooled_representation,
)

MAP_KINDS = ("cosine", "contribution", "centred")  # localize's heat maps, see heat_map
SOUNDING_COLOUR = (0, 255, 0)  # localize's outlines
SILENT_COLOUR = (255, 0, 255)

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


def per_class_subset(first_labels, k, seed):
    """The paper's retrieval protocol: k clips of each class (a clip's class is its first label; clips
    without one are left out), drawn reproducibly for `seed`; a class with fewer clips gives them all.
    first_labels: each clip's first label, or None. Returns the chosen clips' indices in order."""
    members = {}
    for i, label in enumerate(first_labels):
        if label is not None:
            members.setdefault(label, []).append(i)
    rng = random.Random(seed)
    keep = []
    for label in sorted(members):
        keep += rng.sample(members[label], min(k, len(members[label])))
    return sorted(keep)


# -----------------------------------------------------------------------------
# Models, data and inference


def load_model(checkpoint, device="cpu", task=None, audio_length=None):
    """Rebuild CAVMAE (task 'pretrain') or CAVMAEClassifier ('finetune') from a checkpoint: train.py's
    dict (weights under 'model', the architecture under 'model_args') or an official state dict (the
    paper's architecture; a classifier when it has a head). audio_length: a model for shorter clips,
    its audio positions cut from the checkpoint's. Returns (the model in eval mode on `device`, info:
    task, num_classes and config, the training settings)."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as error:  # a missing, truncated or foreign file
        raise ValueError(f"cannot read checkpoint {checkpoint}: {error}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{checkpoint} is not a checkpoint: it holds a {type(ckpt).__name__}")
    if "model_args" in ckpt:  # ours
        model_args = dict(ckpt["model_args"])
        found_task = ckpt["task"]
        num_classes = ckpt["num_classes"]
        settings = ckpt.get("config") or {}
    else:  # the official release, keys maybe prefixed `module.`
        model_args = {}
        heads = [value for key, value in ckpt.items() if key.endswith("mlp_head.1.weight")]
        found_task = "finetune" if heads else "pretrain"
        num_classes = len(heads[0]) if heads else None
        settings = {}
    if (task is not None) and (task != found_task):
        need = "a fine-tuned classifier" if task == "finetune" else "a pretrained CAV-MAE (with its decoder)"
        raise ValueError(f"{checkpoint} holds a {found_task} model; this command needs {need}")
    if audio_length:
        model_args["audio_length"] = audio_length
    config = CAVMAEConfig(**model_args)
    model = CAVMAEClassifier(config, num_classes) if found_task == "finetune" else CAVMAE(config)
    try:
        missing, _ = load_pretrained(model, ckpt)
    except (RuntimeError, ValueError) as error:  # a tensor of another shape, positions too short
        raise ValueError(f"{checkpoint} does not fit the model: {' '.join(str(error).split())}") from None
    if missing:
        raise ValueError(f"{checkpoint} lacks {len(missing)} of the model's weights, e.g. {missing[0]}")
    return model.to(device).eval(), dict(task=found_task, num_classes=num_classes, config=settings)


def open_dataset(model, info, datafile, label_csv=None):
    """The datafile as the model saw its data in training (its input sizes, the fbank mean and std),
    without augmentation, in raw items for data.batches."""
    settings = info["config"]
    return data.AVDataset(
        datafile,
        label_csv,
        target_length=model.config.audio_length,
        image_size=model.config.img_size,
        mean=settings.get("dataset_mean", data.AUDIOSET_MEAN),
        std=settings.get("dataset_std", data.AUDIOSET_STD),
        raw=True,
    )


def autocast(device):  # bf16 on a GPU; float32 on the CPU
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda")


@torch.no_grad()
def embeddings(model, dataset, batch_size=32, device="cpu", num_workers=0, indices=None):
    """Sec. 4.2's coordinated representations, what retrieval compares: each clip's audio and visual
    tokens, each modality alone through the joint blocks, mean-pooled, unit length. dataset: raw
    items (a raw=True AVDataset); indices: only these clips. -> audio (N, D), visual (N, D) float32
    on the CPU, in dataset order."""
    audio_parts = []
    visual_parts = []
    for audio, image, _ in data.batches(dataset, batch_size, device, num_workers, indices):
        with autocast(device):
            a, v = model.encoder.embed(audio, image)  # (B, La, D), (B, Lv, D)
        audio_parts.append(pooled_representation(a).cpu())  # (B, D)
        visual_parts.append(pooled_representation(v).cpu())
    return torch.cat(audio_parts), torch.cat(visual_parts)


@torch.no_grad()
def predict(model, dataset, mode="multimodal", batch_size=32, device="cpu", num_workers=0):
    """A classifier's logits (N, C) float32 on the CPU and the targets (N, C), at the dataset's frame."""
    logits = []
    targets = []
    for audio, image, label in data.batches(dataset, batch_size, device, num_workers):
        with autocast(device):
            logits.append(model(audio, image, mode).float().cpu())
        targets.append(label.cpu())
    return torch.cat(logits), torch.cat(targets)


def frame_activation(settings, targets):
    """How the frames' predictions are averaged: softmax where the training's main metric is accuracy,
    sigmoid where it is mAP (train.py's `metric`); without it, softmax iff every clip has one label."""
    metric = settings.get("metric")
    if metric is None:
        metric = "acc" if bool((targets.sum(dim=1) == 1).all()) else "mAP"
    return "softmax" if metric == "acc" else "sigmoid"


def nan_to_none(x):  # json has no NaN (a class without positives has AUC NaN)
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {key: nan_to_none(value) for key, value in x.items()}
    if isinstance(x, list):
        return [nan_to_none(value) for value in x]
    return x


def write_json(folder, name, results):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        json.dump(nan_to_none(results), f, indent=1)
    print(f"-> {os.path.join(folder, name)}")


# -----------------------------------------------------------------------------
# Commands


def cmd_classify(args):
    """mAP, AUC, d' and accuracy on the middle frame and, with --frames all, averaged over the frames."""
    model, info = load_model(args.checkpoint, args.device, "finetune", args.audio_length)
    settings = info["config"]
    label_csv = args.label_csv or settings.get("label_csv")
    if not label_csv:
        raise ValueError(f"{args.checkpoint} names no label csv: give --label_csv")
    ds = open_dataset(model, info, args.data, label_csv)
    if ds.num_classes != info["num_classes"]:
        raise ValueError(
            f"{label_csv} lists {ds.num_classes} classes, the model predicts {info['num_classes']}"
        )
    mode = args.ftmode or settings.get("ftmode", "multimodal")
    middle = ds.num_frames // 2  # the dataset's frame
    frames = range(ds.num_frames) if args.frames == "all" else [middle]
    logits = {}
    for k in frames:
        ds.frame = k
        logits[k], targets = predict(model, ds, mode, args.batch_size, args.device, args.num_workers)
    results = dict(mode=mode, clips=len(ds), middle_frame=classification_metrics(logits[middle], targets))
    final = results["middle_frame"]
    if args.frames == "all":  # the official score: the mean of the frames' probabilities
        results["activation"] = frame_activation(settings, targets)
        per_frame = torch.stack(list(logits.values()))  # (frames, N, C)
        probs = per_frame.softmax(-1) if results["activation"] == "softmax" else per_frame.sigmoid()
        final = classification_metrics(probs.mean(dim=0), targets)
        results["all_frames"] = final
    for name in ("middle_frame", "all_frames"):
        if name in results:
            scores = ", ".join(f"{key} {results[name][key]:.4f}" for key in ("mAP", "mAUC", "d_prime", "acc"))
            print(f"{name}: {scores}")
    if args.out:
        write_json(args.out, "classify.json", results)
        with open(os.path.join(args.out, "classify_per_class.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "mid", "display_name", "positives", "AP", "AUC"])
            for k in range(ds.num_classes):
                positives = int(targets[:, k].sum())
                writer.writerow([k, ds.mids[k], ds.names[k], positives, final["AP"][k], final["AUC"][k]])
    return results


def first_labels(ds):
    """Each clip's first label (a mid), None for a clip without one."""
    starts = ds.label_offsets[:-1]
    ends = ds.label_offsets[1:]
    return [ds.mids[ds.label_classes[start]] if end > start else None for start, end in zip(starts, ends)]


def cmd_retrieval(args):
    """Audio->visual and visual->audio retrieval by the cosine of the pooled representations."""
    model, info = load_model(args.checkpoint, args.device, None, args.audio_length)
    ds = open_dataset(model, info, args.data, args.label_csv)
    indices = None
    if args.per_class:
        indices = per_class_subset(first_labels(ds), args.per_class, args.seed)
    audio, visual = embeddings(model, ds, args.batch_size, args.device, args.num_workers, indices)
    similarity = audio.double() @ visual.double().T  # (N, N) cosine, rows are the audio queries
    results = dict(
        audio_to_visual=retrieval_metrics(similarity),
        visual_to_audio=retrieval_metrics(similarity.T),
        clips=len(similarity),
        per_class=args.per_class,
        seed=args.seed,
    )
    print(f"retrieval among {len(similarity)} of {len(ds)} clips")
    for name in ("audio_to_visual", "visual_to_audio"):
        recalls = ", ".join(f"{key} {results[name][key]:.4f}" for key in ("R1", "R5", "R10"))
        print(f"{name}: {recalls}, median rank {results[name]['MR']:g}")
    if args.out:
        write_json(args.out, "retrieval.json", results)
    return results


@torch.no_grad()
def cmd_inpaint(args):
    """Fig. 3: masked inputs and their reconstructions, as pictures of the first clips."""
    model, info = load_model(args.checkpoint, args.device, "pretrain", args.audio_length)
    settings = info["config"]
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else settings.get("mask_ratio", MASK_RATIO)
    mask_mode = args.mask_mode or settings.get("mask_mode", "unstructured")
    ds = open_dataset(model, info, args.data, args.label_csv)
    clips = range(min(args.pictures, len(ds)))
    audio, image, _ = next(data.batches(ds, len(clips), args.device, indices=clips))
    torch.manual_seed(args.seed)
    random.seed(args.seed)  # structured audio masks draw their rows and columns with `random`
    out = model(audio, image, mask_ratio, mask_ratio, contrastive_weight=0.0, mask_mode=mask_mode)
    out = {key: value.float().cpu() for key, value in out.items()}
    os.makedirs(args.out, exist_ok=True)
    for i in clips:
        video_id = ds.row(i)["video_id"]
        title = f"{video_id}: {mask_mode} masking, ratio {mask_ratio}"
        masks_and_predictions = [out[key][i] for key in ("mask_a", "mask_v", "pred_a", "pred_v")]
        picture = pictures.inpaint_picture(
            model, audio[i].cpu(), image[i].cpu(), *masks_and_predictions, title
        )
        picture.save(os.path.join(args.out, f"{video_id}.png"))
    results = dict(mask_ratio=mask_ratio, mask_mode=mask_mode, pictures=len(clips))
    results.update(masked_audio=out["mask_a"].mean().item(), masked_visual=out["mask_v"].mean().item())
    results.update(loss_mae_a=out["loss_mae_a"].item(), loss_mae_v=out["loss_mae_v"].item())
    write_json(args.out, "inpaint.json", results)
    return results


def cmd_embed(args):
    """Each clip's pooled audio and visual representations and its video_id, in a .npz or .pt file."""
    model, info = load_model(args.checkpoint, args.device, None, args.audio_length)
    ds = open_dataset(model, info, args.data, args.label_csv)
    audio, visual = embeddings(model, ds, args.batch_size, args.device, args.num_workers)
    video_ids = [ds.row(i)["video_id"] for i in range(len(ds))]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.out.endswith(".pt"):
        torch.save(dict(audio=audio, visual=visual, video_ids=video_ids), args.out)
    else:  # numpy adds .npz to another name
        np.savez(args.out, audio=audio.numpy(), visual=visual.numpy(), video_ids=np.array(video_ids))
    print(f"{len(ds)} clips' audio and visual embeddings ({audio.shape[1]} wide) -> {args.out}")
    return dict(audio=audio, visual=visual, video_ids=video_ids)


# Sound-source localisation on the synthetic set, whose objects.json says where each object is


def heat_map(audio_tokens, visual_tokens, kind="cosine"):
    """How strongly each visual patch token answers the clip's sound: audio tokens (B, La, D), mean-pooled
    (a pooled representation passes as one token), visual tokens (B, Lv, D) -> (B, Lv). cosine: with the
    coordinated audio representation; contribution: each token's dot product with the unit audio
    representation; centred: the cosine after each frame's mean token is taken from its tokens."""
    audio = pooled_representation(audio_tokens)  # (B, D) unit length
    visual = visual_tokens.float()
    if kind == "centred":
        visual = visual - visual.mean(dim=1, keepdim=True)
    if kind != "contribution":
        visual = F.normalize(visual, dim=-1)
    return torch.einsum("bd,bld->bl", audio, visual)


@torch.no_grad()
def localization_maps(model, ds, kind, batch_size=32, device="cpu", num_workers=0):
    """Heat maps (N, Lv) of each clip's frame with its own audio, and with the next clip's (the
    control; the last clip takes the first's)."""
    audio, _ = embeddings(model, ds, batch_size, device, num_workers)  # (N, D)
    next_audio = audio.roll(-1, dims=0)
    maps = []
    control = []
    done = 0
    for _, image, _ in data.batches(ds, batch_size, device, num_workers):
        with autocast(device):
            _, visual = model.encoder.embed(None, image)  # (B, Lv, D)
        clips = slice(done, done + len(image))
        maps.append(heat_map(audio[clips, None].to(device), visual, kind).cpu())
        control.append(heat_map(next_audio[clips, None].to(device), visual, kind).cpu())
        done += len(image)
    return torch.cat(maps), torch.cat(control)


def object_masks(frame_objects, x, y):
    """Which points (x, y in pixels of objects.json's frames) lie on a sounding object, and which on a
    silent one only. An object without the `sounding` key sounds."""
    sounding = prepare.inside_objects([o for o in frame_objects if o.get("sounding", True)], x, y)
    silent = prepare.inside_objects([o for o in frame_objects if not o.get("sounding", True)], x, y)
    return sounding, silent & ~sounding


def pointing_scores(maps, control_maps, sounding, silent):
    """The pointing game: maps, control_maps (N, Lv); sounding, silent (N, Lv) bool, whether each patch
    centre lies on a sounding / a silent object. A clip scores where its map's peak patch lies."""
    clips = torch.arange(len(maps))
    peak = maps.argmax(dim=1)  # (N,)
    control_peak = control_maps.argmax(dim=1)
    return dict(
        pointing_game=sounding[clips, peak].float().mean().item(),
        distractor_rate=silent[clips, peak].float().mean().item(),
        chance=sounding.float().mean().item(),  # the pointing game of a random patch
        unwinnable=int((~sounding.any(dim=1)).sum()),  # clips without a patch centre on a sounding object
        pointing_game_control=sounding[clips, control_peak].float().mean().item(),
        distractor_rate_control=silent[clips, control_peak].float().mean().item(),
    )


def cmd_localize(args):
    """Where the sound comes from: the pointing game of the heat maps, and pictures of the first clips."""
    model, info = load_model(args.checkpoint, args.device, None, args.audio_length)
    objects_path = os.path.join(os.path.dirname(os.path.abspath(args.data)), "objects.json")
    if not os.path.isfile(objects_path):
        raise ValueError(f"{objects_path} not found: localize needs a set from `python prepare.py synthetic`")
    with open(objects_path) as f:
        objects = json.load(f)
    ds = open_dataset(model, info, args.data, args.label_csv)
    frame = ds.num_frames // 2  # the dataset's frame
    video_ids = [ds.row(i)["video_id"] for i in range(len(ds))]
    missing = [video_id for video_id in video_ids if video_id not in objects["clips"]]
    if missing:
        raise ValueError(f"{objects_path} has no objects for {missing[0]}: is {args.data} of another set?")
    maps, control = localization_maps(model, ds, args.map, args.batch_size, args.device, args.num_workers)
    # the model sees the (square) stored frames resized to its img_size: patch centres in frame pixels
    p = model.config.patch_size
    scale = objects["frame_size"] / model.config.img_size
    centres = (np.arange(model.config.img_size // p) + 0.5) * p * scale  # (w,), the grid is square
    truth = [object_masks(objects["clips"][v][frame], centres, centres[:, None]) for v in video_ids]
    sounding = torch.from_numpy(np.stack([s for s, _ in truth])).flatten(1)  # (N, Lv), row-major
    silent = torch.from_numpy(np.stack([s for _, s in truth])).flatten(1)
    results = dict(pointing_scores(maps, control, sounding, silent), clips=len(ds), map=args.map, frame=frame)
    print(", ".join(f"{key} {value:.3f}" for key, value in list(results.items())[:6]))
    write_json(args.out, "localize.json", results)
    pixels = (np.arange(model.config.img_size) + 0.5) * scale
    for i in range(min(args.pictures, len(ds))):
        image = data.normalise_image(ds[i]["image"])  # (3, S, S)
        sounding_pixels, silent_pixels = object_masks(
            objects["clips"][video_ids[i]][frame], pixels, pixels[:, None]
        )
        outlines = [(sounding_pixels, SOUNDING_COLOUR), (silent_pixels, SILENT_COLOUR)]
        title = f"{video_ids[i]}, frame {frame}, {args.map} map; green: sounding, magenta: silent"
        heat = maps[i].view(model.config.visual_grid)
        pictures.localization_picture(image, heat, title, outlines).save(
            os.path.join(args.out, f"{video_ids[i]}.png")
        )
    return results


# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    commands = parser.add_subparsers(dest="command", required=True)
    flags = {}
    for name, run, out in [
        ("classify", cmd_classify, "folder for classify.json and classify_per_class.csv"),
        ("retrieval", cmd_retrieval, "folder for retrieval.json"),
        ("inpaint", cmd_inpaint, "folder for the pictures"),
        ("embed", cmd_embed, "file.npz or file.pt"),
        ("localize", cmd_localize, "folder for localize.json and the pictures"),
    ]:
        flags[name] = commands.add_parser(name, description=run.__doc__, help=run.__doc__)
        flags[name].set_defaults(run=run)
        flags[name].add_argument("--checkpoint", required=True, help="train.py's ckpt.pt or an official one")
        flags[name].add_argument("--data", required=True, help="the datafile (json, the official format)")
        flags[name].add_argument("--out", required=name not in ("classify", "retrieval"), help=out)
        flags[name].add_argument(
            "--label_csv", help="index,mid,display_name csv (classify: default the checkpoint's)"
        )
        flags[name].add_argument(
            "--audio_length", type=int, help="fbank frames, for clips shorter than the checkpoint's"
        )
        flags[name].add_argument("--batch_size", type=int, default=32)
        flags[name].add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        flags[name].add_argument("--num_workers", type=int, default=0)
    flags["classify"].add_argument("--ftmode", choices=FT_MODES, help="default: the checkpoint's")
    flags["classify"].add_argument(
        "--frames", choices=("all", "middle"), default="all", help="all: also averaged over the frames"
    )
    flags["retrieval"].add_argument(
        "--per_class", type=int, metavar="K", help="the paper's protocol: K clips of each class"
    )
    flags["inpaint"].add_argument("--mask_ratio", type=float, help="default: the checkpoint's")
    flags["inpaint"].add_argument("--mask_mode", choices=MASK_MODES, help="default: the checkpoint's")
    for name in ("retrieval", "inpaint"):
        flags[name].add_argument(
            "--seed", type=int, default=0, help="which clips --per_class draws; the masks"
        )
    for name in ("inpaint", "localize"):
        flags[name].add_argument("--pictures", type=int, default=4, metavar="N", help="of the first N clips")
    flags["localize"].add_argument("--map", choices=MAP_KINDS, default="cosine", help="see heat_map")
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # data.DataError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
