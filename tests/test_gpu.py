"""Device specification: the fbank and the batch preprocessing on a device compute what the CPU
computes, the model compiled block by block trains with the eager masks and losses (bf16 and fp16 on
CUDA), a training step never makes the host wait for the GPU, train.py runs compiled end to end, and
one-process NCCL DDP runs. Each test runs on the devices it can use: the CPU variants everywhere (so
that the bodies do not rot), the CUDA ones with a GPU. CPU compilation takes about a minute with a
cold inductor cache, so the CPU compiles one tiny model, which train.py's compiled run then reuses.

    python -m pytest tests/test_gpu.py -q   # on a GPU machine, a few minutes (compilation dominates)
"""

import copy
import json
import math
import random
import socket

import pytest
import torch
from conftest import TINY, assert_fbank_close

import data
import prepare
import train
from model import CAVMAE, CAVMAEClassifier, CAVMAEConfig, apply_compile

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]

# the CPU demo's model (config/pretrain_synthetic.py): the CUDA tests' model, at realistic batches
DEMO = dict(
    img_size=64,
    audio_length=256,
    norm_pix_loss=True,
    embed_dim=128,
    num_heads=2,
    modality_specific_depth=2,
    decoder_embed_dim=64,
    decoder_depth=1,
    decoder_num_heads=2,
)
TINY_SIZES = dict(target_length=TINY["audio_length"], image_size=TINY["img_size"])
TRAIN_AUGMENT = dict(freqm=24, timem=16, mixup=0.5, noise=True, label_smooth=0.1)
# compiled against eager: float32 differs by the order of sums, bf16 and fp16 by their rounding
TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-2, atol=1e-3),
}


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each test compiles from scratch: graphs of another test's shapes would count against the
    recompile limit. (Inductor's on-disk cache stays: graphs compiled before load their kernels.)"""
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    prepare.make_synthetic(out, n_train=8, n_test=4, image_size=32, seconds=0.7, seed=0, workers=1)
    return out


def dataset(synth, train_mode, raw, **augment):
    files = (f"{synth}/train.json", f"{synth}/labels.csv")
    return data.AVDataset(*files, train=train_mode, raw=raw, **TINY_SIZES, **augment)


def item_seeds(ds):
    return [(i, 1000 + i) for i in range(len(ds))]  # an item's draws (frame, mixup) from its seed


def raw_batch(ds, pin=False):
    """The 8 training clips collated as loader workers give them."""
    batch = data.collate([ds[key] for key in item_seeds(ds)])
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


# --- preprocessing --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_fbank_of_a_batch_on_the_device_matches_the_cpu_fbank_of_each_clip(device):
    t = torch.arange(32000) / 16000
    g = torch.Generator().manual_seed(0)
    chirps = [0.3 * torch.sin(2 * math.pi * f * t * (1 + t)) for f in (220.0, 880.0, 3000.0)]
    wave = torch.stack(chirps) + 0.01 * torch.randn(3, len(t), generator=g)  # (3, 32000) in noise
    want = torch.stack([data.fbank(clip) for clip in wave])  # (3, T, 128)
    got = data.fbank(wave.to(device)).cpu()
    assert_fbank_close(got, want, name=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "train_mode, augment",
    [(False, {}), (True, dict(mixup=1.0, label_smooth=0.1))],
    ids=["eval", "train-mixup"],
)
def test_preprocess_of_a_batch_on_the_device_matches_each_clip_alone_on_the_cpu(
    synth, device, train_mode, augment
):
    """Evaluation, and training with mixup alone, draw nothing on the device (the frame, the mixup
    partner and lambda come with the items), so the device computes what the CPU computes."""
    raw_ds = dataset(synth, train_mode, raw=True, **augment)
    audio, image, label = [x.cpu() for x in raw_ds.preprocess(raw_batch(raw_ds), device)]
    item_ds = dataset(synth, train_mode, raw=False, **augment)
    for row, key in enumerate(item_seeds(item_ds)):
        want_audio, want_image, want_label = item_ds[key]  # preprocessed alone, on the CPU
        assert_fbank_close(audio[row], want_audio, scale=1 / item_ds.std, name=f"row {row}")
        torch.testing.assert_close(image[row], want_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(label[row], want_label, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_train_preprocess_with_every_augmentation_keeps_the_cpu_batchs_non_random_parts(synth, device):
    """SpecAugment and the noise draw from the device's random numbers, which differ from the
    CPU's: the fbank keeps its shape and stays finite, the images and labels (mixed by the items'
    own draws) are the CPU's."""
    ds = dataset(synth, True, raw=True, **TRAIN_AUGMENT)
    batch = raw_batch(ds)
    torch.manual_seed(1)
    want = ds.preprocess(batch, "cpu")
    torch.manual_seed(1)
    audio, image, label = [x.cpu() for x in ds.preprocess(batch, device)]
    assert audio.shape == want[0].shape == (len(ds), ds.target_length, data.NUM_MEL_BINS)
    assert torch.isfinite(audio).all()
    torch.testing.assert_close(image, want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(label, want[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_train_preprocess_on_a_device_gives_the_same_batch_for_the_same_seed(synth, device):
    ds = dataset(synth, True, raw=True, **TRAIN_AUGMENT)
    batch = raw_batch(ds)
    outputs = []
    for _ in range(2):
        torch.manual_seed(1)
        outputs.append(ds.preprocess(batch, device))
    for first, second in zip(*outputs):
        assert torch.equal(first, second)


# --- compiled training steps ----------------------------------------------------------------------


def random_inputs(config, batch, device):
    g = torch.Generator(device=device).manual_seed(1)
    audio = torch.randn(batch, config.audio_length, config.num_mel_bins, device=device, generator=g)
    size = config.img_size
    image = torch.randn(batch, config.in_chans, size, size, device=device, generator=g)
    return audio, image


def compiled_graphs():
    """The graphs torch.compile has made in this process."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def training_steps(model, audio, image, dtype, steps=2):
    """`steps` optimizer steps as train.py takes them (autocast, a GradScaler for float16, Adam
    fused on CUDA), each drawing its masks from seed 3 -> the outputs of each step."""
    device = audio.device.type
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device == "cuda")
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    outputs = []
    for _ in range(steps):
        torch.manual_seed(3)
        random.seed(3)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            out = model(audio, image)
        scaler.scale(out["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        outputs.append({k: v.detach() for k, v in out.items()})
    return outputs


@pytest.mark.parametrize(
    "device, dtype, config, batch",
    [
        pytest.param("cpu", torch.float32, TINY, 4, id="cpu-float32"),  # one: CPU compilation is slow
        pytest.param("cuda", torch.bfloat16, DEMO, 32, marks=NEEDS_CUDA, id="cuda-bf16-32"),
        pytest.param("cuda", torch.bfloat16, DEMO, 128, marks=NEEDS_CUDA, id="cuda-bf16-128"),
        pytest.param("cuda", torch.float16, DEMO, 32, marks=NEEDS_CUDA, id="cuda-fp16-32"),
        pytest.param("cuda", torch.float16, DEMO, 128, marks=NEEDS_CUDA, id="cuda-fp16-128"),
    ],
)
def test_compiled_training_step_gives_the_eager_masks_and_losses(device, dtype, config, batch):
    torch.manual_seed(0)
    eager = CAVMAE(CAVMAEConfig(**config)).to(device)
    compiled = apply_compile(copy.deepcopy(eager))
    audio, image = random_inputs(eager.config, batch, device)
    want = training_steps(eager, audio, image, dtype)
    graphs = compiled_graphs()
    got = training_steps(compiled, audio, image, dtype)
    assert compiled_graphs() > graphs  # the blocks did compile
    for w, g in zip(want, got):
        assert torch.equal(w["mask_a"], g["mask_a"])
        assert torch.equal(w["mask_v"], g["mask_v"])
        for key in ("loss", "loss_mae_a", "loss_mae_v", "loss_c"):
            assert torch.isfinite(g[key]), key
            torch.testing.assert_close(g[key], w[key], **TOLERANCE[dtype], msg=key)


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.skip(reason="the CPU compiles one model, in the step test")),
        pytest.param("cuda", marks=NEEDS_CUDA),
    ],
)
def test_compiled_classifier_step_gives_the_eager_logits_and_gradients(device):
    torch.manual_seed(0)
    eager = CAVMAEClassifier(CAVMAEConfig(**DEMO), num_classes=10).to(device)
    compiled = apply_compile(copy.deepcopy(eager))
    audio, image = random_inputs(eager.config, 16, device)
    logits = []
    graphs = compiled_graphs()
    for model in (eager, compiled):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(audio, image, mode="multimodal")
        out.float().logsumexp(-1).mean().backward()
        logits.append(out.float().detach())
    assert compiled_graphs() > graphs  # the blocks did compile
    torch.testing.assert_close(logits[1], logits[0], rtol=2e-2, atol=2e-2)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert (p.grad is None) == (q.grad is None), name


# --- no host synchronisation inside a training step -----------------------------------------------


class NoSync:
    """torch.cuda.set_sync_debug_mode('error') inside: an operation that waits for the GPU raises."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


@NEEDS_CUDA
@pytest.mark.parametrize(
    "task, mask_mode, dtype",
    [
        ("pretrain", "unstructured", "bfloat16"),
        ("pretrain", "tf", "bfloat16"),
        ("pretrain", "time", "float16"),
        ("finetune", "unstructured", "bfloat16"),
    ],
)
def test_training_step_never_waits_for_the_gpu(synth, task, mask_mode, dtype):
    """train.py's step: preprocessing of a pinned batch with every augmentation, forward, backward
    and the fused Adam step (with a GradScaler in float16). The first step (lazy initialisation of
    cuFFT, cuBLAS, the optimizer state and the scaler) runs outside the check."""
    cfg = dict(train.SETTINGS, task=task, mask_mode=mask_mode, dtype=dtype, **TRAIN_AUGMENT)
    device = torch.device("cuda")
    ds = dataset(synth, True, raw=True, **TRAIN_AUGMENT)
    batches = iter([raw_batch(ds, pin=True)] * 2)
    torch.manual_seed(0)
    mcfg = CAVMAEConfig(**TINY)
    model = CAVMAE(mcfg) if task == "pretrain" else CAVMAEClassifier(mcfg, ds.num_classes)
    model = model.to(device)
    optimizer = train.build_optimizer(cfg, model, device)
    autocast, scaler = train.precision(cfg, device)[1:]
    train.train_step(model, batches, ds, optimizer, scaler, autocast, cfg, device)
    with NoSync():
        train.train_step(model, batches, ds, optimizer, scaler, autocast, cfg, device)


# --- train.py end to end --------------------------------------------------------------------------


def train_flags(synth, out_dir, device, *extra):
    """A compiled run of the tiny model: 4 clips a step, an evaluation after the first step."""
    return [
        f"--data_train={synth}/train.json",
        f"--data_val={synth}/test.json",
        f"--label_csv={synth}/labels.csv",
        f"--out_dir={out_dir}",
        *[f"--model_{k}={v}" for k, v in TINY.items()],
        f"--device={device}",
        "--compile=True",
        "--batch_size=4",
        "--max_iters=2",
        "--eval_interval=1",
        "--log_interval=1",
        "--num_workers=0",
        *extra,
    ]


@pytest.mark.parametrize(
    "device, task, dtype",
    [
        ("cpu", "pretrain", "float32"),  # the step test's graphs: inductor's cache has them
        pytest.param("cuda", "pretrain", "bfloat16", marks=NEEDS_CUDA),
        pytest.param("cuda", "finetune", "bfloat16", marks=NEEDS_CUDA),
    ],
)
def test_train_py_runs_compiled_with_device_preprocessing_and_evaluation(
    synth, tmp_path, device, task, dtype
):
    augment = ["--mixup=0.5", "--freqm=8", "--timem=16"] if task == "finetune" else []
    flags = train_flags(synth, tmp_path, device, f"--task={task}", f"--dtype={dtype}", *augment)
    assert train.main(flags) == 0
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert {"train", "val", "final"} == {r["split"] for r in records}
    assert [r["iter"] for r in records if r["split"] == "train"] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if r["split"] == "train")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter_num"] == 2


# --- distributed ----------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@NEEDS_CUDA
def test_one_process_nccl_ddp_runs_train_py_compiled(synth, tmp_path, monkeypatch):
    """torchrun's environment for one process: train.py sets up NCCL, trains, saves, tears down."""
    environment = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert train.main(train_flags(synth, tmp_path, "cuda", "--dtype=bfloat16")) == 0
    assert not torch.distributed.is_initialized()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert len(ckpt["rng"]) == 1 and ckpt["iter_num"] == 2
    fresh = CAVMAE(CAVMAEConfig(**TINY)).state_dict()
    assert list(ckpt["model"]) == list(fresh)  # no DDP or compile prefixes in the saved keys
