"""GPU specification: the CUDA fbank and device-side preprocessing compute what the CPU computes, the
model compiled block by block trains in bf16 and fp16 at two batch sizes with the eager masks and losses, a training
step never makes the host wait for the GPU, and one-process NCCL DDP runs a step. Skipped without CUDA.

    python -m pytest tests/test_gpu.py -q          # on a GPU machine, a few minutes (compilation dominates)
"""

import copy
import math
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import synthetic
from model import CAVMAE, CAVMAEClassifier, CAVMAEConfig, apply_compile

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TARGET_LENGTH, IMAGE_SIZE = 256, 64


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each test compiles from scratch: graphs of another test's shapes would count against the recompile limit."""
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    synthetic.make_synthetic(out, n_train=8, n_test=4, image_size=IMAGE_SIZE, seconds=2.0, seed=0)
    return out


def raw_batch(synth, train, pin=False, **augment):
    """A collate_raw batch of the 8 training clips read as raw=True workers return them (their draws seeded)."""
    ds = data.AVDataset(
        f"{synth}/train.json",
        f"{synth}/labels.csv",
        train=train,
        target_length=TARGET_LENGTH,
        image_size=IMAGE_SIZE,
        raw=True,
        **augment,
    )
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    batch = data.collate_raw([ds[i] for i in range(len(ds))])
    return ds, ({k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()} if pin else batch)


TRAIN_AUGMENT = dict(freqm=24, timem=48, mixup=0.5, noise=True, label_smooth=0.1)


# --- preprocessing ----------------------------------------------------------------------------------------


def test_cuda_fbank_matches_the_cpu_fbank():
    t = torch.arange(32000) / 16000
    g = torch.Generator().manual_seed(0)
    wave = torch.stack([0.3 * torch.sin(2 * math.pi * f * t * (1 + t)) for f in (220.0, 880.0, 3000.0)])
    wave = wave + 0.01 * torch.randn(wave.shape, generator=g)  # (3, 32000): chirps in noise
    cpu, gpu = data.fbank(wave), data.fbank(wave.cuda()).cpu()  # (3, T, 128) log-mel
    assert gpu.shape == cpu.shape and (gpu - cpu).abs().max() < 2e-3


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batch_preprocessor_on_cuda_matches_the_cpu_for_the_same_batch(synth, train):
    """Train mode: every random choice (frame, mixup partner and lambda, SpecAugment bands, noise) is drawn by the
    workers into the items, so the device only applies them and both devices give the same batch."""
    ds, batch = raw_batch(synth, train, **(TRAIN_AUGMENT if train else {}))
    prep = data.BatchPreprocessor.from_dataset(ds)
    torch.manual_seed(1)
    cpu = prep(batch, "cpu")
    torch.manual_seed(1)
    gpu = [t.cpu() for t in prep(batch, "cuda")]
    for name, want, got, tol in zip(("fbank", "image", "label"), cpu, gpu, (2e-3, 1e-5, 1e-6)):
        assert got.shape == want.shape and (got - want).abs().max() <= tol, name


# --- compiled training steps --------------------------------------------------------------------------------


def small_model(**overrides):
    torch.manual_seed(0)
    return CAVMAE(CAVMAEConfig.from_preset("small", **overrides)).cuda()


def inputs(config, batch):
    g = torch.Generator(device="cuda").manual_seed(1)
    return (
        torch.randn(batch, config.audio_length, config.num_mel_bins, device="cuda", generator=g),
        torch.randn(batch, config.in_chans, config.img_size, config.img_size, device="cuda", generator=g),
    )


def training_steps(model, audio, image, dtype, steps=2, **kwargs):
    """`steps` optimizer steps as train.py takes them (autocast, GradScaler for fp16, fused Adam) -> outputs."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    outs = []
    for _ in range(steps):
        torch.manual_seed(3)
        random.seed(3)
        with torch.autocast("cuda", dtype=dtype):
            out = model(audio, image, **kwargs)
        scaler.scale(out["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        outs.append({k: v.detach() for k, v in out.items()})
    return outs


@pytest.mark.parametrize("batch", [32, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_compiled_training_step_gives_the_eager_masks_and_losses(dtype, batch):
    eager = small_model()
    compiled = apply_compile(copy.deepcopy(eager))
    audio, image = inputs(eager.config, batch)
    want, got = (training_steps(m, audio, image, dtype) for m in (eager, compiled))
    for w, g in zip(want, got):
        assert torch.equal(w["mask_a"], g["mask_a"]) and torch.equal(w["mask_v"], g["mask_v"])
        for key in ("loss", "loss_mae_a", "loss_mae_v", "loss_c"):
            assert torch.isfinite(g[key]) and torch.allclose(g[key], w[key], rtol=2e-2, atol=1e-3), key


def test_compiled_classifier_step_gives_the_eager_logits():
    torch.manual_seed(0)
    eager = CAVMAEClassifier(CAVMAEConfig.from_preset("small"), num_classes=10).cuda()
    compiled = apply_compile(copy.deepcopy(eager))
    audio, image = inputs(eager.config, 16)
    logits = []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(audio, image, mode="multimodal")
        out.float().logsumexp(-1).mean().backward()
        logits.append(out.float().detach())
    assert torch.allclose(logits[0], logits[1], rtol=2e-2, atol=2e-2)
    assert [p.grad is None for p in eager.parameters()] == [q.grad is None for q in compiled.parameters()]


# --- no host synchronisation inside a step -------------------------------------------------------------------


class NoSync:
    """torch.cuda.set_sync_debug_mode('error') inside: any operation that waits for the GPU raises."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    "mask_mode,dtype",
    [("unstructured", torch.bfloat16), ("tf", torch.bfloat16), ("time", torch.float16)],
    ids=["unstructured", "tf", "time-fp16"],
)
def test_training_step_never_waits_for_the_gpu(mask_mode, dtype):
    """forward + backward + fused Adam step (+ GradScaler in fp16); the first step (lazy initialisation of
    cuBLAS, the optimizer state and the scaler) runs outside the check."""
    model = small_model()
    audio, image = inputs(model.config, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def step():
        with torch.autocast("cuda", dtype=dtype):
            loss = model(audio, image, mask_mode=mask_mode)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step()
    with NoSync():
        step()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batch_preprocessor_never_waits_for_the_gpu_on_pinned_batches(synth, train):
    ds, batch = raw_batch(synth, train, pin=True, **(TRAIN_AUGMENT if train else {}))
    prep = data.BatchPreprocessor.from_dataset(ds)
    prep(batch, "cuda")  # lazy initialisation (cuFFT plans, constants) outside the check
    with NoSync():
        prep(batch, "cuda")


# --- distributed -------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_nccl_ddp_trains_a_compiled_model_with_gathered_negatives():
    import train  # its all_gather with gradient, as gather_negatives=True uses it

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = apply_compile(
            CAVMAE(CAVMAEConfig.from_preset("tiny")).cuda()
        )  # as train.py: compile, then wrap
        ddp = DDP(model, device_ids=[torch.cuda.current_device()])
        before = copy.deepcopy(model.state_dict())
        (out,) = training_steps(
            ddp, *inputs(model.config, 8), torch.bfloat16, steps=1, gather=train.GatherWithGrad.apply
        )
        assert torch.isfinite(out["loss"]) and out["loss_c"] > 0
        assert list(model.state_dict()) == list(
            before
        )  # DDP over per-block compile keeps the checkpoint keys
        qkv = "encoder.joint_blocks.0.attn.qkv.weight"
        assert not torch.equal(model.state_dict()[qkv], before[qkv])  # the step updated the weights
    finally:
        dist.destroy_process_group()


# --- train.py end to end on the GPU ------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_train_py_runs_compiled_bf16_with_device_preprocessing_and_evaluation(synth, tmp_path, task):
    import json

    import train

    argv = [
        f"--data_train={synth}/train.json",
        f"--data_val={synth}/test.json",
        f"--label_csv={synth}/labels.csv",
        f"--out_dir={tmp_path}",
        "--model_preset=tiny",
        f"--model_audio_length={TARGET_LENGTH}",
        f"--model_img_size={IMAGE_SIZE}",
        f"--task={task}",
        "--batch_size=4",
        "--max_iters=4",
        "--eval_interval=2",
        "--num_workers=2",
        "--device=cuda",
        "--dtype=bfloat16",
        "--compile=True",
        "--gpu_preprocess=auto",
        "--mixup=0.5",
        "--freqm=8",
        "--timem=16",
    ]
    result = train.main(argv)
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert result["iter_num"] == 4 and {"val", "final", "epoch"} <= {r["split"] for r in records}
    assert all(math.isfinite(r["loss"]) for r in records if r["split"] == "train")
    if task == "pretrain":
        assert all("mfu" in r for r in records if r["split"] == "train")
