"""Benchmark a CAV-MAE pretraining step (forward + backward) on random inputs.

    python bench.py --preset base --batch_size 4 --steps 5 --dtype float32 --device cpu --threads 2
    python bench.py --preset base --batch_size 128 --steps 20 --dtype bfloat16 --device cuda --compile

Prints the median step time, samples/s, peak memory (CPU: max RSS of the process; CUDA: max allocated) and,
on CUDA, the model FLOPs utilisation: 3 x analytic forward FLOPs x samples/s / --peak_flops.
"""
import argparse
import resource
import statistics
import time

import torch

from model import CAVMAE, CAVMAEConfig, num_params

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="base", help="model preset: base | small | tiny")
parser.add_argument("--batch_size", type=int, default=4)
parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup untimed ones)")
parser.add_argument("--warmup", type=int, default=1)
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="float32, or autocast to bfloat16 / float16 (weights stay float32)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
parser.add_argument("--mask_ratio", type=float, default=0.75, help="audio and visual mask ratio")
parser.add_argument("--norm_pix_loss", type=int, default=1, choices=[0, 1], help="as the released checkpoints")
parser.add_argument("--contrastive_weight", type=float, default=0.01)
parser.add_argument("--mae_weight", type=float, default=1.0)
parser.add_argument("--peak_flops", type=float, default=989e12, help="accelerator peak FLOP/s (H100 SXM dense bf16)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

if args.threads:
    torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
device = torch.device(args.device)
cuda = device.type == "cuda"
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

config = CAVMAEConfig.from_preset(args.preset, norm_pix_loss=bool(args.norm_pix_loss))
model = CAVMAE(config).to(device).train()
step_model = torch.compile(model) if args.compile else model
B = args.batch_size
audio = torch.randn(B, config.audio_length, config.num_mel_bins, device=device)
image = torch.randn(B, config.in_chans, config.img_size, config.img_size, device=device)
autocast = torch.autocast(device.type, dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32")


def sync():
    if cuda:
        torch.cuda.synchronize(device)


def step():
    with autocast:
        out = step_model(audio, image, mask_ratio_a=args.mask_ratio, mask_ratio_v=args.mask_ratio,
                         mae_weight=args.mae_weight, contrastive_weight=args.contrastive_weight)
    out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return out["loss"].item()


print(f"preset {args.preset}: {num_params(model):,} trainable parameters, batch {B}, {args.dtype}, {device}, "
      f"threads {torch.get_num_threads()}, compile {args.compile}, norm_pix_loss {config.norm_pix_loss}")
for i in range(args.warmup):
    t0 = time.perf_counter()
    step()
    sync()
    print(f"warmup step {i}: {time.perf_counter() - t0:.3f} s")
if cuda:
    torch.cuda.reset_peak_memory_stats(device)
times = []
for i in range(args.steps):
    sync()
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t0)
    print(f"step {i}: {times[-1]:.3f} s, loss {loss:.4f}")

median = statistics.median(times)
samples_per_s = B / median
if cuda:
    peak_memory = torch.cuda.max_memory_allocated(device) / 2 ** 30
else:
    peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB
summary = (f"median step {median * 1000:.1f} ms (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}), "
           f"{samples_per_s:.2f} samples/s, peak memory {peak_memory:.2f} GiB")
if cuda:
    flops = 3 * model.flops_per_sample(args.mask_ratio, args.mask_ratio) * samples_per_s
    summary += f", {flops / 1e12:.1f} TFLOP/s, MFU {100 * flops / args.peak_flops:.1f}%"
print(summary)
