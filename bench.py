"""Benchmarks of CAV-MAE. The default: the paper's pretraining step (norm_pix_loss, mask ratio 0.75)
on random inputs, forward + backward + Adam step, at each --batch_size (OMP_NUM_THREADS=N on a CPU):
    python bench.py [--batch_size 48 256] [--dtype float16] [--compile] [--model_embed_dim 384]
    python bench.py --data DATAFILE [--label_csv CSV]   # the input pipeline's CPU time, one thread
    python bench.py --data_scale 2000000                # AVDataset's build time and memory
"""

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
import timeit

import torch

import data
import prepare
from model import CAVMAE, MASK_RATIO, CAVMAEConfig, apply_compile

PRETRAIN_CONFIG = CAVMAEConfig(norm_pix_loss=True)  # the paper's base model, as its checkpoints
ADAM = dict(lr=5e-5, betas=(0.95, 0.999), weight_decay=5e-7)  # train.py's pretraining optimizer
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, datasheets; else H100's


def flops_per_sample(config, mask_ratio_a=MASK_RATIO, mask_ratio_v=MASK_RATIO):
    """Analytic forward FLOPs of one pretraining sample (base model: 78.07 G, docs/costs.md)."""
    D = config.embed_dim
    Dd = config.decoder_embed_dim
    P = config.patch_size**2
    La = math.prod(config.audio_grid)
    Lv = math.prod(config.visual_grid)
    ka = int(La * (1 - mask_ratio_a))  # the kept tokens, as model.random_masking
    kv = int(Lv * (1 - mask_ratio_v))

    def block(L, width):  # the linear layers, then q k^T and the weighted sum of v
        return 2 * L * width * width * (4 + 2 * config.mlp_ratio) + 4 * L * L * width

    flops = 2 * (La * P + Lv * P * config.in_chans) * D  # patch embeddings
    flops += config.modality_specific_depth * (block(ka, D) + block(kv, D))
    # three streams; by the official quirk the audio and visual ones pass the last joint block only
    single_depth = min(config.joint_depth, 1) if config.official_contrastive_streams else config.joint_depth
    flops += config.joint_depth * block(ka + kv, D) + single_depth * (block(ka, D) + block(kv, D))
    flops += 2 * (ka + kv) * D * Dd + config.decoder_depth * block(La + Lv, Dd)
    flops += 2 * Dd * (La * P + Lv * P * config.in_chans)  # prediction heads
    return flops


def time_step(config, batch, device, args):
    """Time the training step at one batch size; print and return its numbers."""
    torch.manual_seed(0)
    model = CAVMAE(config).to(device)
    if args.compile:
        torch._dynamo.reset()  # each batch size compiles afresh: its own compile time
        apply_compile(model)
    optimizer = torch.optim.Adam(model.parameters(), **ADAM, fused=device.type == "cuda")
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    audio = torch.randn(batch, config.audio_length, config.num_mel_bins, device=device)  # (B, T, F)
    image = torch.randn(batch, config.in_chans, config.img_size, config.img_size, device=device)

    def run(steps):  # -> (last loss, seconds); only the .item() at the end waits for the device
        start = time.perf_counter()
        loss = torch.zeros(())
        for _ in range(steps):
            with autocast:
                loss = model(audio, image)["loss"]
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        return loss.item(), time.perf_counter() - start  # .item() first: the clock after the device

    _, warmup_s = run(args.warmup)
    loss, seconds = run(args.steps)
    step_s = seconds / args.steps
    result = dict(samples_per_s=batch / step_s, step_ms=1000 * step_s, loss=loss)
    if device.type == "cuda":  # MFU: 3 x the forward FLOPs (forward + backward) x samples/s / peak
        result["mfu_%"] = 300 * flops_per_sample(config) * batch / step_s / args.peak
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30  # the warm-up's too
    if args.compile:
        result["compile_s"] = warmup_s - args.warmup * step_s  # the warm-up's extra time
    print(f"batch {batch}:", ", ".join(f"{k} {v:.5g}" for k, v in result.items()), flush=True)
    return result


def bench_data(datafile, label_csv):
    """CPU time on one thread of an evaluation item (decode + preprocess), and of the fbank of 32
    ten-second clips, clip by clip and as one batch. The first of 3 runs warms the caches."""
    cpu_ms = lambda fn: 1000 * min(timeit.repeat(fn, timer=time.process_time, number=1, repeat=3))
    torch.set_num_threads(1)
    ds = data.AVDataset(datafile, label_csv)
    n = min(64, len(ds))
    item_ms = cpu_ms(lambda: [ds[i] for i in range(n)]) / n
    clips = torch.randn(32, 10 * data.SAMPLE_RATE) / 10
    by_clip_ms = cpu_ms(lambda: [data.fbank(clip) for clip in clips])
    batch_ms = cpu_ms(lambda: data.fbank(clips))
    print(f"CPU time, 1 thread: {item_ms:.2f} ms per evaluation item ({n} of {datafile})")
    print(f"fbank of 32 clips of 10 s: {by_clip_ms:.1f} ms one by one, {batch_ms:.1f} ms batched")
    return dict(item_ms=item_ms, by_clip_ms=by_clip_ms, batch_ms=batch_ms)


def bench_data_scale(n, num_classes=527):
    """Seconds to build AVDataset over n AudioSet-like rows (their files need not exist) and the
    resident memory it adds; the goal for AudioSet-2M: <= 30 s and <= 400 MB."""

    def resident_mb():  # this process's resident memory (Linux)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    mids = [f"/m/0{k:06x}" for k in range(num_classes)]
    with tempfile.TemporaryDirectory() as folder:
        label_csv = os.path.join(folder, "labels.csv")
        prepare.write_label_csv(label_csv, mids, [f"class {k}" for k in range(num_classes)])
        datafile = os.path.join(folder, "data.json")
        with open(datafile, "w") as f:  # row by row: no large string is left to free
            f.write('{"data": [')
            for i in range(n):
                labels = ",".join(mids[(i * 7919 + j) % num_classes] for j in range(1 + i % 4))
                wav = f"/data/audioset/audio/{i:011x}.flac"  # absolute, as AudioSet's datafiles
                row = dict(video_id=f"{i:011x}", wav=wav, video_path="/data/frames", labels=labels)
                f.write(("\n" if i == 0 else ",\n") + json.dumps(row))
            f.write("\n]}\n")
        before = resident_mb()
        start = time.perf_counter()
        ds = data.AVDataset(datafile, label_csv)
        seconds = time.perf_counter() - start
        added_mb = resident_mb() - before
    print(f"{len(ds)} rows: AVDataset built in {seconds:.1f} s, resident memory +{added_mb:.0f} MB")
    return seconds, added_mb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch_size", type=int, nargs="+", default=[48, 256])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="compile each block (apply_compile)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--data", metavar="DATAFILE", help="time the input pipeline on it")
    parser.add_argument("--label_csv", help="of --data (default: the datafile's own labels)")
    parser.add_argument("--data_scale", type=int, default=0, help="AVDataset over this many rows")
    for name, default in vars(PRETRAIN_CONFIG).items():
        if not isinstance(default, bool):  # the sizes
            parser.add_argument(f"--model_{name}", type=type(default), default=default, metavar="N")
    args = parser.parse_args(argv)
    sizes = {key[6:]: value for key, value in vars(args).items() if key.startswith("model_")}
    try:
        config = dataclasses.replace(PRETRAIN_CONFIG, **sizes)
        args.device = torch.device(args.device)
    except ValueError as error:
        parser.error(str(error))
    except RuntimeError:
        parser.error(f"device={args.device!r} is not a device: use cpu, cuda or cuda:N")
    if args.data:
        return bench_data(args.data, args.label_csv)
    if args.data_scale:
        return bench_data_scale(args.data_scale)
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    args.peak = next((flops for gpu, flops in PEAK_FLOPS.items() if gpu in name), PEAK_FLOPS["H100"])
    print(f"{args.dtype} on {name}, {torch.get_num_threads()} threads")
    return [time_step(config, batch, args.device, args) for batch in args.batch_size]


if __name__ == "__main__":
    main()
