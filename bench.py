"""Benchmark CAV-MAE pretraining on one device: a training step (forward + backward + Adam step) on
random inputs, eager and compiled, at several batch sizes; or end to end: train.py's real loop on
generated clips.

    # the GPU table: eager and compiled, batch 48 and 256, bf16
    python bench.py
    # fp16 autocast with a GradScaler, as train.py runs it
    python bench.py --dtype float16
    # one technique at a time (--sdpa, --compile_mode)
    python bench.py --modes compiled --static --batch_sizes 256
    # train.py on 224 px / 10 s clips, next to the bench rate
    python bench.py --e2e --workers 8 --batch_size 256
    # a CPU smoke test
    python bench.py --preset tiny --device cpu --modes eager --batch_sizes 4 --steps 2
    # the input pipeline's CPU time, one thread
    python bench.py --data
    # AVDataset's build time and memory, 2M rows
    python bench.py --data_scale 2000000

Per configuration: samples/s (--steps timed steps after --warmup ones, one synchronisation at each
end), MFU (3 x analytic forward FLOPs per sample x samples/s / --peak_flops, CUDA only), peak memory
(CUDA: max allocated; CPU: the process's max RSS) and compile time (the warm-up steps' time minus as
many timed steps; inductor's on-disk cache shortens it on later runs:
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench.py measures a cold one). The model is the paper's
pretraining setup: norm_pix_loss, mask ratio 0.75, contrastive weight 0.01, Adam as train.py (fused
on CUDA). --e2e runs train.py's own compile and attention settings; the bench row next to it uses
this file's.
"""

import argparse
import contextlib
import gc
import os
import resource
import statistics
import tempfile
import time

import torch

import data
import pictures
import storage
from configurator import ConfigError, resolve_device
from model import CAVMAE, CAVMAEConfig, apply_compile, num_params

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_flags(p)
    add_end_to_end_flags(p)
    add_data_flags(p)
    args = p.parse_args(argv)
    return resolve_defaults(p, args)


def add_step_flags(p):
    """The training-step benchmark: model, batch sizes, compile and attention choices, precision."""
    p.add_argument("--preset", default="base", help="model preset: base | small | tiny")
    p.add_argument("--batch_sizes", default="48,256", help="comma-separated batch sizes")
    p.add_argument("--batch_size", type=int, default=0, help="one batch size (overrides --batch_sizes)")
    p.add_argument(
        "--modes", default="", help="eager,compiled (default; --e2e: compiled on CUDA, eager on CPU)"
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="compile with dynamic=False: every block shape compiled on its own, static sizes "
        "(not measured yet against apply_compile's default, torch's automatic dynamic shapes)",
    )
    p.add_argument(
        "--compile_mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
        help="torch.compile mode (longer compiles; CUDA graphs with reduce-overhead)",
    )
    p.add_argument(
        "--sdpa",
        default="auto",
        choices=["auto", "flash", "cudnn", "efficient", "math"],
        help="attention kernel (auto: PyTorch's choice; the decoder's head dim is 32)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (the compiled ones compile here)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA (float16 where bf16 is missing), float32 on CPU",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--mask_ratio", type=float, default=0.75, help="audio and visual mask ratio")
    p.add_argument("--norm_pix_loss", type=int, default=1, choices=[0, 1], help="as the released checkpoints")
    p.add_argument("--contrastive_weight", type=float, default=0.01)
    p.add_argument("--mae_weight", type=float, default=1.0)
    p.add_argument(
        "--peak_flops", type=float, default=989e12, help="accelerator peak FLOP/s (H100 SXM dense bf16)"
    )
    p.add_argument("--seed", type=int, default=0)


def add_end_to_end_flags(p):
    e = p.add_argument_group("end to end (--e2e): train.py's loop, workers and device preprocessing")
    e.add_argument(
        "--e2e", action="store_true", help="run train.py on generated clips instead of random tensors"
    )
    e.add_argument("--workers", type=int, default=8, help="DataLoader workers")
    e.add_argument("--e2e_clips", type=int, default=4096, help="training clips to generate (test clips: 64)")
    e.add_argument(
        "--e2e_epochs", type=int, default=3, help="epochs; the first (compilation) is not averaged"
    )
    e.add_argument("--e2e_data", default="data/bench_e2e", help="cache folder of the generated clips")
    e.add_argument("--e2e_out", default="out/bench_e2e", help="train.py's out_dir (one subfolder per run)")


def add_data_flags(p):
    d = p.add_argument_group("the input pipeline (--data, --data_scale): CPU time and memory")
    d.add_argument("--data", action="store_true", help="time items, batches and fbank, one thread")
    d.add_argument("--datafile", default="", help="--data on it (default: generated 10 s clips)")
    d.add_argument("--label_csv", default="", help="the label csv of --datafile")
    d.add_argument(
        "--data_items", type=int, default=64, help="clips timed (and generated without --datafile)"
    )
    d.add_argument("--data_repeats", type=int, default=5, help="interleaved rounds (medians)")
    d.add_argument("--target_length", type=int, default=1024, help="fbank frames of an item")
    d.add_argument("--image_size", type=int, default=224, help="frame size of an item")
    d.add_argument("--data_scale", type=int, default=0, metavar="N", help="AVDataset over N rows")


def resolve_defaults(p, args):
    """--device, --batch_sizes, --modes and --dtype from what they say and what this machine has."""
    try:
        args.device = str(resolve_device(args.device))
    except ConfigError as error:
        p.error(str(error))
    args.batch_sizes = [args.batch_size] if args.batch_size else [int(b) for b in args.batch_sizes.split(",")]
    cuda = args.device.startswith("cuda")
    if args.modes:
        args.modes = args.modes.split(",")
    elif args.e2e:
        args.modes = ["compiled" if cuda else "eager"]
    else:
        args.modes = ["eager", "compiled"]
    if args.dtype == "auto":
        if cuda:
            args.dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            args.dtype = "float32"
    return args


def compile_options(args):
    """torch.compile keywords of --static and --compile_mode (none: PyTorch's defaults)."""
    options = {}
    if args.static:
        options["dynamic"] = False
    if args.compile_mode != "default":
        options["mode"] = args.compile_mode
    return options


def build(args, device, mode):
    """(a fresh model, compiled as `mode` asks, its Adam optimizer: fused on CUDA, as train.py)."""
    torch.manual_seed(args.seed)
    config = CAVMAEConfig.from_preset(args.preset, norm_pix_loss=bool(args.norm_pix_loss))
    model = CAVMAE(config).to(device).train()
    if mode == "compiled":
        # every configuration compiles from scratch: its compile time, its own shapes
        torch._dynamo.reset()
        # each transformer block on its own, as train.py's compile=True
        apply_compile(model, **compile_options(args))
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=5e-5,
        betas=(0.95, 0.999),
        weight_decay=5e-7,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    return model, optimizer


SDPA_BACKENDS = dict(
    auto=None, flash="FLASH_ATTENTION", cudnn="CUDNN_ATTENTION", efficient="EFFICIENT_ATTENTION", math="MATH"
)


def train_step(model, optimizer, scaler, autocast, audio, image, args, sdpa=None):
    """forward + backward + optimizer step, as train.py's loop; returns the loss
    without synchronising.
    sdpa: the name of one torch.nn.attention.SDPBackend to force, or None for PyTorch's choice."""
    backend = (
        torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, sdpa))
        if sdpa
        else contextlib.nullcontext()
    )
    with autocast, backend:
        out = model(
            audio,
            image,
            mask_ratio_a=args.mask_ratio,
            mask_ratio_v=args.mask_ratio,
            mae_weight=args.mae_weight,
            contrastive_weight=args.contrastive_weight,
        )
    scaler.scale(out["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return out["loss"].detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def bench_config(args, device, batch, mode):
    """Time one (mode, batch) configuration -> a result row, then free its memory."""
    row = measure_config(args, device, batch, mode)
    gc.collect()  # the model, optimizer and inputs of measure_config are garbage now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def measure_config(args, device, batch, mode):
    model, optimizer = build(args, device, mode)
    config = model.config
    dtype = getattr(torch, args.dtype)
    audio = torch.randn(batch, config.audio_length, config.num_mel_bins, device=device)
    image = torch.randn(batch, config.in_chans, config.img_size, config.img_size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sdpa = SDPA_BACKENDS[args.sdpa]

    def step():
        return train_step(model, optimizer, scaler, autocast, audio, image, args, sdpa)

    warmup_times = []
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        step()
        sync(device)
        warmup_times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    step_s = (time.perf_counter() - t0) / args.steps
    samples_per_s = batch / step_s
    flops = 3 * model.flops_per_sample(args.mask_ratio, args.mask_ratio) * samples_per_s
    row = dict(
        mode=mode,
        batch=batch,
        samples_per_s=samples_per_s,
        step_ms=1000 * step_s,
        mfu=flops / args.peak_flops if device.type == "cuda" else None,
        peak_gib=peak_memory_gib(device),
        compile_s=sum(warmup_times) - len(warmup_times) * step_s if mode == "compiled" else None,
        loss=float(loss),
    )
    return row


def describe(row):
    mfu = f"MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else "MFU -"
    compile_s = f", compile {row['compile_s']:.1f} s" if row["compile_s"] is not None else ""
    return (
        f"{row['mode']:8s} batch {row['batch']:4d}: {row['samples_per_s']:8.1f} samples/s, {mfu}, "
        f"peak {row['peak_gib']:.1f} GiB, step {row['step_ms']:.1f} ms{compile_s}, "
        f"loss {row['loss']:.4f}"
    )


def print_table(rows):
    print("\n| mode | batch | samples/s | MFU | peak GiB | compile s |\n|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        print(
            f"| {r['mode']} | {r['batch']} | {r['samples_per_s']:.1f} | "
            f"{mfu} | {r['peak_gib']:.1f} | {compile_s} |"
        )


# --------------------------------------------------------------------------------------------------
# End to end: train.py's loop (loader workers, device-side preprocessing, logging)
# on generated clips


def e2e_dataset(args, config):
    """Generate the synthetic clips once per (size, length, count) into args.e2e_data;
    return the folder."""
    import synthetic

    # 10 s clips for the base model (padded to 1024 frames)
    seconds = min(10.0, config.audio_length / 100 + 0.05)
    n_test = min(64, args.e2e_clips)
    out = os.path.join(args.e2e_data, f"{config.img_size}px_{seconds:g}s_{args.e2e_clips}")
    if not os.path.isfile(os.path.join(out, "test.json")):  # written last
        print(
            f"generating {args.e2e_clips} + {n_test} synthetic clips "
            f"({config.img_size} px, {seconds:g} s) in {out}"
        )
        synthetic.make_synthetic(
            out, n_train=args.e2e_clips, n_test=n_test, image_size=config.img_size, seconds=seconds
        )
    return out


def epoch_rate(log_path):
    """Mean samples/s over whole epochs after the first (which compiles and starts the workers),
    from the "epoch" records of train.py's log (evaluation and checkpoint time excluded)."""
    records = pictures.read_log(log_path)
    rates = [r["samples_per_s"] for r in records if r["split"] == "epoch"]
    return statistics.mean(rates[1:] if len(rates) > 1 else rates), len(rates)


def e2e_config(args, device, batch, mode):
    """train.py on the generated clips at this batch size and mode,
    then the bench step at the same settings."""
    import train

    data_dir = e2e_dataset(args, CAVMAEConfig.from_preset(args.preset))
    per_epoch = args.e2e_clips // batch
    if per_epoch < 1:
        raise SystemExit(f"--e2e_clips={args.e2e_clips} is less than one batch of {batch}")
    out_dir = os.path.join(args.e2e_out, f"{args.preset}_b{batch}_{mode}_w{args.workers}")
    train.main(
        [
            os.path.join(ROOT, "config", "bench_gpu.py"),
            f"--data_train={data_dir}/train.json",
            f"--data_val={data_dir}/test.json",
            f"--label_csv={data_dir}/labels.csv",
            f"--out_dir={out_dir}",
            f"--model_preset={args.preset}",
            f"--model_norm_pix_loss={bool(args.norm_pix_loss)}",
            f"--batch_size={batch}",
            f"--num_workers={args.workers}",
            f"--max_iters={args.e2e_epochs * per_epoch}",
            "--eval_interval=-1",
            f"--log_interval={per_epoch}",
            f"--device={device}",
            f"--dtype={args.dtype}",
            f"--compile={mode == 'compiled'}",
            "--gpu_preprocess=on",
            f"--mask_ratio={args.mask_ratio}",
            f"--mae_weight={args.mae_weight}",
            f"--contrastive_weight={args.contrastive_weight}",
            f"--seed={args.seed}",
        ]
    )
    rate, epochs = epoch_rate(os.path.join(out_dir, "log.jsonl"))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row = bench_config(args, device, batch, mode)
    row.update(e2e_samples_per_s=rate, e2e_epochs=epochs, ratio=rate / row["samples_per_s"])
    return row


def describe_e2e(row, workers):
    n = row["e2e_epochs"]
    epochs = "one epoch" if n == 1 else "epoch 2" if n == 2 else f"mean of epochs 2-{n}"
    return (
        f"{row['mode']:8s} batch {row['batch']:4d}: "
        f"end to end {row['e2e_samples_per_s']:8.1f} samples/s "
        f"({workers} workers, {epochs}) vs bench {row['samples_per_s']:.1f}: "
        f"{100 * row['ratio']:.0f}% (goal >= 90%)"
    )


# --------------------------------------------------------------------------------------------------
# The input pipeline (--data, --data_scale): CPU time of data.py's paths; memory at scale


def data_bench(datafile, label_csv, items=64, repeats=5, target_length=1024, image_size=224):
    """CPU time of items, batches and the fbank on one thread, medians of interleaved rounds (load
    from other processes hits every path alike). Returns {path: ms}."""
    torch.set_num_threads(1)
    size = dict(target_length=target_length, image_size=image_size)
    augment = dict(train=True, mixup=0.5, freqm=48, timem=192, noise=True, label_smooth=0.1)
    sets = dict(
        eval=data.AVDataset(datafile, label_csv, **size),
        train=data.AVDataset(datafile, label_csv, **augment, **size),
        raw=data.AVDataset(datafile, label_csv, raw=True, **augment, **size),
    )
    n = min(items, len(sets["eval"]))
    prep = data.BatchPreprocessor.from_dataset(sets["raw"])
    batch = data.collate_raw([sets["raw"][i % n] for i in range(32)])  # also warms the file cache
    clips = [wave[:length] for wave, length in zip(batch["wave"], batch["length"])]
    jobs = [(name, lambda ds=ds, i=i: ds[i]) for i in range(n) for name, ds in sets.items()]
    jobs += [
        ("cpu_fbank", lambda: data.cpu_fbank(batch["wave"])),
        ("fbank", lambda: data.fbank(batch["wave"])),
        ("loop", lambda: [data.fbank(clip) for clip in clips]),
        ("prep", lambda: prep(batch)),
    ]
    times = {name: [] for name, _ in jobs}
    for name, job in jobs * repeats:
        start = time.process_time()
        job()
        times[name].append(1000 * (time.process_time() - start))
    ms = {name: statistics.median(values) for name, values in times.items()}
    print(f"{n} clips of {datafile}; CPU time, 1 thread, medians over {repeats} interleaved rounds")
    rows = [
        ("eval", "eval item (wav + fbank + one JPEG)", "official loader 9.8 ms (docs/costs.md)"),
        ("train", "train item (mixup .5, SpecAugment 48/192, noise)", "official loader 14.3 ms"),
        ("raw", "raw item (read, decode, draw)", f"= {1000 / ms['raw']:.0f} samples/s per worker"),
        ("cpu_fbank", "cpu_fbank, batch of 32 clips", f"({ms['cpu_fbank'] / 32:.2f} ms per clip)"),
        (
            "fbank",
            "fbank (the recipe), batch of 32 clips",
            f"(cpu_fbank / fbank = {ms['cpu_fbank'] / ms['fbank']:.2f})",
        ),
        ("loop", "fbank, one clip at a time", f"(cpu_fbank / loop = {ms['cpu_fbank'] / ms['loop']:.2f})"),
        ("prep", "BatchPreprocessor, train batch of 32 on the CPU", ""),
    ]
    for name, label, note in rows:
        print(f"  {label:<50} {ms[name]:7.2f} ms   {note}")
    return ms


def resident_mb():
    """This process's resident memory (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def scale_row(i, mids):
    """Row i of data_scale's datafile, as ~150 B of json: an AudioSet-like clip with 1-4 labels."""
    labels = ",".join(mids[(i * 7919 + j) % len(mids)] for j in range(1 + i % 4))
    return (
        f'{{"video_id": "{i:011x}_30.000", "wav": "/data/audioset/audio/{i:011x}_30.000.flac", '
        f'"video_path": "/data/audioset/frames", "labels": "{labels}"}}'
    )


def data_scale(n, num_classes=527):
    """Seconds to build AVDataset over n generated AudioSet-like rows (files need not exist), and
    the memory it holds once the json is freed (this process's resident memory grows by it).
    Returns (seconds, MB)."""
    mids = [f"/m/0{k:06x}" for k in range(num_classes)]
    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "labels.csv"), "w") as f:
            f.write("index,mid,display_name\n" + "".join(f"{k},{m},class {k}\n" for k, m in enumerate(mids)))
        rows = (scale_row(i, mids) for i in range(n))
        with open(os.path.join(root, "data.json"), "w") as f:
            f.write('{"data": [' + ",".join(rows) + "]}")
        storage.release_freed_heap()  # what writing the json freed
        before = resident_mb()
        start = time.time()
        ds = data.AVDataset(os.path.join(root, "data.json"), os.path.join(root, "labels.csv"))
        seconds = time.time() - start
        held = resident_mb() - before
    print(
        f"{n} rows: {seconds:.1f} s to build AVDataset, "
        f"{held:.0f} MB held (RSS growth after the json is freed)"
    )
    del ds
    return seconds, held


def data_main(args):
    """--data_scale, or --data on --datafile (or on --data_items generated 10 s clips, 224 px)."""
    if args.data_scale:
        return data_scale(args.data_scale)
    with tempfile.TemporaryDirectory() as root:
        datafile = args.datafile
        label_csv = args.label_csv
        if not datafile:
            import synthetic

            synthetic.make_synthetic(root, n_train=args.data_items, n_test=0, image_size=224, seconds=10.0)
            datafile = os.path.join(root, "train.json")
            label_csv = os.path.join(root, "labels.csv")
        sizes = (args.target_length, args.image_size)
        return data_bench(datafile, label_csv, args.data_items, args.data_repeats, *sizes)


def main(argv=None):
    args = parse_args(argv)
    if args.data or args.data_scale:
        return data_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with torch.device("meta"):
        size = num_params(CAVMAE(CAVMAEConfig.from_preset(args.preset)))
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"preset {args.preset} ({size / 1e6:.1f}M trainable), {args.dtype}, {name}, "
        f"torch {torch.__version__}, "
        f"compile per block {args.compile_mode}{' static' if args.static else ''}, "
        f"attention {args.sdpa}, norm_pix_loss {bool(args.norm_pix_loss)}, mask {args.mask_ratio}, "
        "forward + backward + Adam step"
    )
    rows = []
    for mode in args.modes:
        for batch in args.batch_sizes:
            try:
                row = (
                    e2e_config(args, device, batch, mode)
                    if args.e2e
                    else bench_config(args, device, batch, mode)
                )
            except torch.cuda.OutOfMemoryError:
                row = None
            # outside the except block, whose traceback would keep the model's memory alive
            if row is None:
                print(f"{mode:8s} batch {batch:4d}: out of memory")
                gc.collect()
                torch.cuda.empty_cache()
                continue
            rows.append(row)
            print(describe_e2e(row, args.workers) if args.e2e else describe(row), flush=True)
    if not args.e2e:
        print_table(rows)
    return rows


if __name__ == "__main__":
    main()
