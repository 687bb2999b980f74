"""
Evaluate CAV-MAE the ways the paper does (Sec. 4), and look inside it: `python eval.py COMMAND
--help` for classify, retrieval, inpaint, embed and localize. A checkpoint is train.py's final.pt or
an official one (a state dict of the paper's architecture). The metrics are scikit-learn's AP and
ROC AUC bit for bit, and the official retrieval script's recall and median rank.
"""

import argparse
import json
import math
import os
import random
import sys

import numpy as np
import torch

import data
import pictures
import prepare
from model import (
    CAVMAE,
    MASK_RATIO,
    CAVMAEClassifier,
    CAVMAEConfig,
    load_pretrained,
    pooled_representation,
    read_checkpoint,
)

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


def classification_metrics(scores, targets):
    """Per-class AP and ROC AUC as scikit-learn computes them, their means, d' and accuracy. scores
    (N, C): logits or probabilities (only their order counts); targets (N, C) 0/1. As the official
    code, mAP counts a class without positives as AP 0 and d' comes from the mean AUC; such a
    class's AUC is NaN (sklearn 1.9), left out of mAUC. acc: first argmax of scores = of targets."""
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu().numpy()
    targets = torch.as_tensor(targets, dtype=torch.float64).detach().cpu().numpy()
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
    """Recall@1/5/10 and median rank (1-based) of each row's match, on the diagonal, as the official
    script ranks it: a match tied with k others counts once at each of the k+1 tied positions (so a
    collapsed model scores chance, not perfectly)."""
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
    position_in_tie = torch.arange(int(tied.sum())) - start.repeat_interleave(tied)  # 0..k, k ties
    ranks = above.repeat_interleave(tied) + position_in_tie
    ranks = ranks.numpy()  # 0-based, one per (row, tied position)
    recalls = {f"R{k}": float(np.mean(ranks < k)) for k in (1, 5, 10)}
    return dict(recalls, MR=float(np.median(ranks) + 1))


def per_class_subset(ds, k, seed):
    """The paper's retrieval protocol: the indices of k clips of each class (a clip's first label),
    drawn for `seed`, in order; a class with fewer clips gives them all."""
    members = {}
    for i in range(len(ds)):
        classes = ds.row(i)["classes"]
        if classes:
            members.setdefault(ds.mids[classes[0]], []).append(i)
    rng = random.Random(seed)
    keep = []
    for mid in sorted(members):
        keep += rng.sample(members[mid], min(k, len(members[mid])))
    return sorted(keep)


def load_model(checkpoint, device="cpu", task=None, audio_length=None):
    """CAVMAE (task 'pretrain') or CAVMAEClassifier ('finetune') in eval mode on `device`, from
    train.py's checkpoint or an official state dict (a classifier when it has a head); audio_length:
    for shorter clips. -> (model, info: task, num_classes, config: the training settings)."""
    ckpt = read_checkpoint(checkpoint)
    model_args = dict(ckpt.get("model_args", {}))  # official: the paper's architecture
    if "model_args" in ckpt:  # ours
        info = dict(task=ckpt["task"], num_classes=ckpt["num_classes"], config=ckpt.get("config") or {})
    else:  # official, its keys maybe prefixed `module.`
        heads = [value for key, value in ckpt.items() if key.endswith("mlp_head.1.weight")]
        info = dict(task="pretrain", num_classes=None, config={})
        if heads:
            info.update(task="finetune", num_classes=len(heads[0]))
    if (task is not None) and (task != info["task"]):
        need = "a fine-tuned classifier" if task == "finetune" else "a pretrained CAV-MAE"
        raise ValueError(f"{checkpoint} holds a {info['task']} model; this command needs {need}")
    if audio_length:
        model_args["audio_length"] = audio_length
    config = CAVMAEConfig(**model_args)
    model = CAVMAEClassifier(config, info["num_classes"]) if info["task"] == "finetune" else CAVMAE(config)
    try:
        missing, _ = load_pretrained(model, ckpt)
    except (RuntimeError, ValueError) as error:  # a tensor of another shape, positions too short
        raise ValueError(f"{checkpoint} does not fit: {str(error).splitlines()[-1].strip()}") from None
    if missing:
        raise ValueError(f"{checkpoint} lacks {len(missing)} of the model's weights: {missing[0]} ...")
    return model.to(device).eval(), info


def open_dataset(model, info, datafile, label_csv=None):
    """The datafile in raw items, as the model saw its data in training, without augmentation."""
    sizes = dict(target_length=model.config.audio_length, image_size=model.config.img_size)
    mean = info["config"].get("dataset_mean", data.AUDIOSET_MEAN)
    std = info["config"].get("dataset_std", data.AUDIOSET_STD)
    return data.AVDataset(datafile, label_csv, mean=mean, std=std, raw=True, **sizes)


def autocast(device):  # bf16 on a GPU, float32 on the CPU
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda")


@torch.no_grad()
def embeddings(model, dataset, batch_size=32, device="cpu", num_workers=0, indices=None):
    """Sec. 4.2's coordinated representations (mean-pooled, unit length) of the raw items of
    `dataset` (or of its clips `indices`) in order: audio (N, D), visual (N, D) float32 on the CPU."""
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
    """A classifier's logits (N, C) float32 on the CPU and targets (N, C), at the dataset's frame."""
    logits = []
    targets = []
    for audio, image, label in data.batches(dataset, batch_size, device, num_workers):
        with autocast(device):
            logits.append(model(audio, image, mode).float().cpu())
        targets.append(label.cpu())
    return torch.cat(logits), torch.cat(targets)


def retrieval(model, dataset, batch_size=32, device="cpu", num_workers=0, indices=None):
    """Audio->visual (a2v) and visual->audio (v2a) R@1, R@5, R@10 and median rank by the cosine
    of the pooled representations: {a2v_R1: ..., v2a_MR: ...}."""
    audio, visual = embeddings(model, dataset, batch_size, device, num_workers, indices)
    similarity = audio.double() @ visual.double().T  # (N, N) cosine, rows are the audio queries
    a2v = retrieval_metrics(similarity)
    v2a = retrieval_metrics(similarity.T)
    return {f"{name}_{k}": v for name, m in (("a2v", a2v), ("v2a", v2a)) for k, v in m.items()}


def classification(model, ds, mode, all_frames, metric, batch_size=32, device="cpu", num_workers=0):
    """mAP, mAUC, d' and accuracy of a classifier on the middle frame and, with all_frames, of the
    official score: the frames' mean softmax (metric 'acc') or mean sigmoid ('mAP'), as *_frames.
    (classification_metrics has each class's AP and AUC too.)"""
    middle = ds.num_frames // 2
    logits = {}
    for k in range(ds.num_frames) if all_frames else [middle]:
        ds.frame = k
        logits[k], targets = predict(model, ds, mode, batch_size, device, num_workers)
    ds.frame = None  # the middle frame again
    m = classification_metrics(logits[middle], targets)
    results = {key: m[key] for key in ("mAP", "mAUC", "d_prime", "acc")}
    if all_frames:
        per_frame = torch.stack(list(logits.values()))  # (frames, N, C)
        probs = per_frame.softmax(-1) if metric == "acc" else per_frame.sigmoid()
        m = classification_metrics(probs.mean(dim=0), targets)
        results.update({f"{key}_frames": m[key] for key in ("mAP", "mAUC", "d_prime", "acc")})
    return results


def report(results, folder, name):
    """Print the results, and write them to folder/name where a folder is given."""
    print(json.dumps(results))
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(results, f, indent=1)


def cmd_classify(args):
    """mAP, AUC, d' and accuracy of a fine-tuned model on the middle frame and over all frames."""
    model, info = load_model(args.checkpoint, args.device, "finetune", args.audio_length)
    settings = info["config"]
    label_csv = args.label_csv or settings.get("label_csv")
    if not label_csv:
        raise ValueError(f"{args.checkpoint} names no label csv: give --label_csv")
    ds = open_dataset(model, info, args.data, label_csv)
    if ds.num_classes != info["num_classes"]:
        raise ValueError(f"{label_csv} lists {ds.num_classes} classes, the model {info['num_classes']}")
    mode = args.ftmode or settings.get("ftmode", "multimodal")
    # the frames' mean softmax where training's main metric is accuracy, else their mean sigmoid;
    # without that setting, softmax iff every clip has one label
    single_label = all(len(ds.row(i)["classes"]) == 1 for i in range(len(ds)))
    metric = settings.get("metric", "acc" if single_label else "mAP")
    loader = dict(batch_size=args.batch_size, device=args.device, num_workers=args.num_workers)
    results = classification(model, ds, mode, args.frames == "all", metric, **loader)
    results.update(mode=mode, clips=len(ds), activation="softmax" if metric == "acc" else "sigmoid")
    report(results, args.out, "classify.json")
    return results


def cmd_retrieval(args):
    """Audio->visual and visual->audio retrieval by the cosine of the pooled representations."""
    model, info = load_model(args.checkpoint, args.device, None, args.audio_length)
    ds = open_dataset(model, info, args.data, args.label_csv)
    indices = per_class_subset(ds, args.per_class, args.seed) if args.per_class else None
    loader = dict(batch_size=args.batch_size, device=args.device, num_workers=args.num_workers)
    results = retrieval(model, ds, **loader, indices=indices)
    results.update(clips=len(indices or ds), per_class=args.per_class, seed=args.seed)
    report(results, args.out, "retrieval.json")
    return results


@torch.no_grad()
def cmd_inpaint(args):
    """Fig. 3: pictures of the first clips masked and reconstructed by a pretrained model."""
    model, info = load_model(args.checkpoint, args.device, "pretrain", args.audio_length)
    settings = info["config"]
    mask_ratio = settings.get("mask_ratio", MASK_RATIO) if args.mask_ratio is None else args.mask_ratio
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
        outputs = [out[key][i] for key in ("mask_a", "mask_v", "pred_a", "pred_v")]
        picture = pictures.inpaint_picture(model, audio[i].cpu(), image[i].cpu(), *outputs, video_id)
        picture.save(os.path.join(args.out, f"{video_id}.png"))
    results = dict(mask_ratio=mask_ratio, mask_mode=mask_mode, masked_audio=out["mask_a"].mean().item())
    report(results, None, None)
    return results


def cmd_embed(args):
    """Each clip's pooled audio and visual representations and video_id, in an .npz file."""
    model, info = load_model(args.checkpoint, args.device, None, args.audio_length)
    ds = open_dataset(model, info, args.data, args.label_csv)
    audio, visual = embeddings(model, ds, args.batch_size, args.device, args.num_workers)
    video_ids = [ds.row(i)["video_id"] for i in range(len(ds))]
    np.savez(args.out, audio=audio.numpy(), visual=visual.numpy(), video_ids=np.array(video_ids))
    print(f"embeddings of {len(ds)} clips -> {args.out}")
    return dict(audio=audio, visual=visual, video_ids=video_ids)


# Sound-source localisation on a synthetic set, whose objects.json says where each object is


def heat_map(audio, visual_tokens):
    """The contribution map (N, Lv): each patch token (N, Lv, D) dotted with its clip's audio direction
    (N, D), un-normalised: a patch weighs as much as it adds to the audio-visual similarity."""
    return torch.einsum("bd,bld->bl", audio, visual_tokens.float())


@torch.no_grad()
def localization_maps(model, ds, batch_size=32, device="cpu", num_workers=0):
    """Heat maps (N, Lv) of each clip's frame with its own audio, and with the next clip's audio (the
    control; the last clip takes the first's), from the tokens of the modality-specific blocks. The
    audio direction is the pooled representation less its mean over the clips: what sets this clip's
    sound apart. Of the maps we measured (docs/localization.md), these listen best."""
    audio = []
    visual = []
    for audio_batch, image, _ in data.batches(ds, batch_size, device, num_workers):
        with autocast(device):
            a = model.encoder.audio_tokens(audio_batch)  # (B, La, D)
            v = model.encoder.visual_tokens(image)  # (B, Lv, D)
        audio.append(pooled_representation(a).cpu())  # (B, D) unit length
        visual.append(v.float().cpu())
    audio = torch.cat(audio)
    audio = audio - audio.mean(dim=0)  # (N, D) centred over the clips
    visual = torch.cat(visual)
    return heat_map(audio, visual), heat_map(audio.roll(-1, dims=0), visual)


def object_masks(frame_objects, x, y):
    """Which points (x, y in pixels of objects.json's frames) lie on a sounding object, and which on
    a silent one only. An object without the `sounding` key sounds."""
    sounding = prepare.inside_objects([o for o in frame_objects if o.get("sounding", True)], x, y)
    silent = prepare.inside_objects([o for o in frame_objects if not o.get("sounding", True)], x, y)
    return sounding, silent & ~sounding


def pointing_scores(maps, control_maps, sounding, silent):
    """The pointing game over clips: where each map's peak patch lies. maps, control_maps (N, Lv);
    sounding, silent (N, Lv): whether each patch centre lies on a sounding / a silent object."""
    clips = torch.arange(len(maps))
    peak = maps.argmax(dim=1)  # (N,)
    control_peak = control_maps.argmax(dim=1)
    return dict(
        pointing_game=sounding[clips, peak].float().mean().item(),
        distractor_rate=silent[clips, peak].float().mean().item(),
        chance=sounding.float().mean().item(),  # the pointing game of a random patch
        unwinnable=int((~sounding.any(dim=1)).sum()),  # clips without a patch centre on one
        pointing_game_control=sounding[clips, control_peak].float().mean().item(),
        distractor_rate_control=silent[clips, control_peak].float().mean().item(),
    )


def cmd_localize(args):
    """The pointing game of the heat maps on a synthetic set, and pictures of its first clips."""
    model, info = load_model(args.checkpoint, args.device, None, args.audio_length)
    with open(os.path.join(os.path.dirname(os.path.abspath(args.data)), "objects.json")) as f:
        objects = json.load(f)
    ds = open_dataset(model, info, args.data, args.label_csv)
    video_ids = [ds.row(i)["video_id"] for i in range(len(ds))]
    clip_objects = [objects["clips"][video_id][ds.num_frames // 2] for video_id in video_ids]
    maps, control = localization_maps(model, ds, args.batch_size, args.device, args.num_workers)
    # the model sees the square stored frames at its img_size: patch centres in the frames' pixels
    S = model.config.img_size
    p = model.config.patch_size
    scale = objects["frame_size"] / S
    centres = (np.arange(S // p) + 0.5) * p * scale
    truth = [object_masks(objects_on_frame, centres, centres[:, None]) for objects_on_frame in clip_objects]
    sounding = torch.from_numpy(np.stack([s for s, _ in truth])).flatten(1)  # (N, Lv), row-major
    silent = torch.from_numpy(np.stack([s for _, s in truth])).flatten(1)
    results = dict(pointing_scores(maps, control, sounding, silent), clips=len(ds))
    report(results, args.out, "localize.json")
    pixels = (np.arange(S) + 0.5) * scale
    for i in range(min(args.pictures, len(ds))):
        sounding_pixels, silent_pixels = object_masks(clip_objects[i], pixels, pixels[:, None])
        outlines = [(sounding_pixels, (0, 255, 0)), (silent_pixels, (255, 0, 255))]
        image = data.normalise_image(ds[i]["image"])  # (3, S, S)
        title = f"{video_ids[i]}: green sounds, magenta silent"
        picture = pictures.localization_picture(image, maps[i].view(S // p, S // p), title, outlines)
        picture.save(os.path.join(args.out, f"{video_ids[i]}.png"))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate CAV-MAE, and look inside it.")
    commands = parser.add_subparsers(dest="command", required=True)
    flags = {}
    for run in (cmd_classify, cmd_retrieval, cmd_inpaint, cmd_embed, cmd_localize):
        name = run.__name__.removeprefix("cmd_")
        p = commands.add_parser(name, description=run.__doc__, help=run.__doc__)
        p.set_defaults(run=run)
        p.add_argument("--checkpoint", required=True, help="train.py's final.pt or an official one")
        p.add_argument("--data", required=True, help="datafile (json, the official format)")
        out = "the .npz file to write" if name == "embed" else "the folder to write to"
        p.add_argument("--out", required=name in ("inpaint", "embed", "localize"), help=out)
        p.add_argument("--label_csv", help="classes (default for classify: the checkpoint's)")
        p.add_argument("--audio_length", type=int, help="fbank frames, if fewer than the model's")
        p.add_argument("--batch_size", type=int, default=32)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--num_workers", type=int, default=0)
        flags[name] = p
    flags["classify"].add_argument("--ftmode", help="a model.FT_MODES; default: the checkpoint's")
    flags["classify"].add_argument("--frames", choices=("all", "middle"), default="all")
    flags["retrieval"].add_argument("--per_class", type=int, help="N clips of each class, as the paper")
    flags["inpaint"].add_argument("--mask_ratio", type=float, help="default: the checkpoint's")
    flags["inpaint"].add_argument("--mask_mode", help="a model.MASK_MODES; default: the checkpoint's")
    for name in ("retrieval", "inpaint"):
        flags[name].add_argument("--seed", type=int, default=0, help="draws --per_class, the masks")
    for name in ("inpaint", "localize"):
        flags[name].add_argument("--pictures", type=int, default=4, help="of the first N clips")
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # data.DataError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
