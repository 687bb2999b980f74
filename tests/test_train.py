"""train.py: training runs and learns, resumes exactly, checkpoints atomically, stops on NaN, checks its
config, and keeps DDP ranks in sync. Tiny model on 16 synthetic clips made on the fly."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import prepare
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    prepare.make_synthetic(out, n_train=16, n_test=8, image_size=32, seconds=0.7, seed=0)
    return out


def flags(synth, out_dir, *extra):
    return [f"--data_train={synth}/train.json", f"--data_val={synth}/test.json", f"--label_csv={synth}/labels.csv",
            f"--out_dir={out_dir}", "--model_preset=tiny", "--batch_size=4", "--num_workers=0", "--log_interval=1",
            "--device=cpu", "--dtype=float32", "--lr=2e-3", "--lrscheduler_start=1", "--lrscheduler_step=1",
            "--lrscheduler_decay=0.9", *extra]


def train_losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if r["split"] == "train"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_runs_and_lowers_the_loss(synth, tmp_path):
    result = train.main(flags(synth, tmp_path, "--max_iters=24", "--noise=False"))
    losses = train_losses(tmp_path)
    assert len(losses) == 24 and sum(losses[-6:]) < sum(losses[:6])
    assert {"a2v_R1", "v2a_R1", "loss_c", "c_acc"} <= result["final"].keys()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 24 and ckpt["task"] == "pretrain" and ckpt["num_classes"] is None
    assert ckpt["model_args"]["embed_dim"] == 32 and ckpt["config"]["max_iters"] == 24
    assert json.load(open(tmp_path / "config.json"))["model_preset"] == "tiny"
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_finetuning_from_a_pretraining_checkpoint_lowers_the_loss(synth, tmp_path):
    train.main(flags(synth, tmp_path / "pre", "--max_iters=4"))
    result = train.main(flags(synth, tmp_path / "ft", "--task=finetune", f"--init_from={tmp_path}/pre/ckpt.pt",
                              "--loss=ce", "--metric=acc", "--head_lr=10", "--epochs=6", "--wa=True", "--wa_start=4",
                              "--wa_end=6"))
    losses = train_losses(tmp_path / "ft")
    assert len(losses) == 24 and sum(losses[-6:]) < sum(losses[:6])
    assert {"acc", "mAP", "acc_frames", "mAP_frames"} <= result["final"].keys()
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    assert ckpt["task"] == "finetune" and ckpt["num_classes"] == 10 and ckpt["wa"]["count"] == 3
    assert not same_weights(ckpt["model"], ckpt["model_last"])  # averaged weights vs the training state


def test_head_trains_alone_when_the_base_is_frozen(synth, tmp_path):
    result = train.main(flags(synth, tmp_path, "--task=finetune", "--freeze_base=True", "--max_iters=2"))
    torch.manual_seed(0)  # train.py seeds the initial weights with `seed`
    fresh = train.CAVMAEClassifier(train.CAVMAEConfig.from_preset("tiny"), 10)
    trained = result["model"].state_dict()
    changed = {k for k, v in fresh.state_dict().items() if not torch.equal(v, trained[k])}
    assert changed == {"head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"}


def interrupt_at(monkeypatch, call_number):
    """Send ourselves SIGINT during the given forward pass (1-based)."""
    real, calls = train.compute_loss, []

    def compute_loss(*args, **kwargs):
        calls.append(torch.is_grad_enabled())  # training steps only
        if calls[-1] and sum(calls) == call_number:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "compute_loss", compute_loss)


def test_sigint_saves_and_resume_continues_exactly(synth, tmp_path, monkeypatch):
    common = ["--max_iters=7", "--mixup=0.5"]  # 7 iters: across an epoch boundary (4 per epoch)
    straight = train.main(flags(synth, tmp_path / "a", *common))["model"].state_dict()
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        first = train.main(flags(synth, tmp_path / "b", *common))
    assert first["stopped"] and first["iter_num"] == 3
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["iter_num"] == 3
    resumed = train.main(flags(synth, tmp_path / "b", *common, "--init_from=resume"))["model"].state_dict()
    assert same_weights(straight, resumed)


def test_finetuning_resume_is_exact_with_augmentation_and_balanced_sampling(synth, tmp_path):
    common = ["--task=finetune", "--mixup=0.5", "--freqm=8", "--timem=16", "--label_smooth=0.1",
              "--balanced_sampling=True", "--grad_accum=2", "--grad_clip=1.0"]
    straight = train.main(flags(synth, tmp_path / "a", *common, "--max_iters=5"))["model"].state_dict()
    train.main(flags(synth, tmp_path / "b", *common, "--max_iters=3"))
    resumed = train.main(flags(synth, tmp_path / "b", *common, "--max_iters=5", "--init_from=resume"))
    assert same_weights(straight, resumed["model"].state_dict())


def test_checkpoint_is_replaced_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.atomic_save({"iter_num": 1}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    before = open(path, "rb").read()

    def broken_save(obj, f):  # writes half a file, then fails (disk full, killed, ...)
        open(f, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train.atomic_save({"iter_num": 2}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"] and open(path, "rb").read() == before


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(synth, tmp_path, monkeypatch):
    real, calls = train.compute_loss, []

    def compute_loss(*args, **kwargs):  # NaN from the 6th training step on (the epoch-4 checkpoint is good)
        calls.append(torch.is_grad_enabled())  # evaluation calls run without grad
        loss, stats = real(*args, **kwargs)
        if sum(calls) >= 6:
            loss, stats = loss * float("nan"), {**stats, "loss": stats["loss"] * float("nan")}
        return loss, stats
    monkeypatch.setattr(train, "compute_loss", compute_loss)
    with pytest.raises(train.NonFiniteLoss, match="non-finite loss at iter 6"):
        train.main(flags(synth, tmp_path, "--max_iters=8"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_config_file_then_flags_override_the_defaults(tmp_path):
    config = tmp_path / "cfg.py"
    config.write_text("import math\nbatch_size = 12\nlr = 1e-4\nmodel_preset = 'small'\nmask_ratio = math.sqrt(0.25)\n")
    cfg = train.configure([str(config), "--lr=3e-4", "--compile=true", "--betas=(0.9, 0.95)", "--epochs=2",
                           "--model_embed_dim=96", "--out_dir=out/x", "--weight_decay=0"])
    assert (cfg["batch_size"], cfg["lr"], cfg["compile"], cfg["betas"]) == (12, 3e-4, True, (0.9, 0.95))
    assert cfg["epochs"] == 2
    assert cfg["mask_ratio"] == 0.5 and cfg["out_dir"] == "out/x" and cfg["weight_decay"] == 0.0
    mcfg = train.model_config(cfg)
    assert mcfg.embed_dim == 96 and mcfg.img_size == 64  # the preset, one field overridden
    assert train.configure(["--compile=0", "--freeze_base=True"])["compile"] is False


@pytest.mark.parametrize("arg, message", [
    ("--bach_size=8", "unknown config key 'bach_size'"),
    ("--batch_size=8.5", "batch_size=8.5: expected int"),
    ("--batch_size=eight", "not a int literal"),
    ("--compile=maybe", "expected a bool"),
    ("--task=distill", "choose one of pretrain, finetune"),
    ("--betas=(0.9,)", "expected tuple"),
    ("--model_embed_dims=64", "unknown config key 'model_embed_dims'"),
    ("--lr", "--key=value"),
])
def test_config_rejects_unknown_keys_and_wrong_types(arg, message):
    with pytest.raises(train.ConfigError, match=message.replace("(", r"\(")):
        train.configure([arg])


def test_config_file_errors_name_the_file(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("batch_sise = 8\n")
    with pytest.raises(train.ConfigError, match=f"unknown config key 'batch_sise' in {config}"):
        train.configure([str(config)])


def test_command_line_reports_config_errors_without_a_traceback():
    run = subprocess.run([sys.executable, "train.py", "--max_iter=5"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "error: unknown config key 'max_iter'" in run.stderr
    assert "Traceback" not in run.stderr


def _ddp_worker(rank, world, port, argv, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train.main(argv)
    torch.save(result["model"].state_dict(), os.path.join(out, f"rank{rank}.pt"))


def test_ddp_on_two_cpu_processes_keeps_ranks_in_sync(synth, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = flags(synth, tmp_path, "--max_iters=3", "--gather_negatives=True", "--batch_size=2", "--grad_accum=2")
    mp.spawn(_ddp_worker, args=(2, port, argv, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert same_weights(rank0, rank1)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter_num"] == 3 and len(os.listdir(tmp_path)) >= 4
    torch.manual_seed(0)  # the initial weights
    assert not same_weights(train.CAVMAE(train.CAVMAEConfig.from_preset("tiny")).state_dict(), rank0)


def test_step_schedule_matches_the_official_multisteplr():
    cfg = dict(train.DEFAULTS, lrscheduler_start=10, lrscheduler_step=5, lrscheduler_decay=0.5)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    official = torch.optim.lr_scheduler.MultiStepLR(opt, list(range(10, 1000, 5)), gamma=0.5)
    for epoch in range(25):  # the official loop steps the scheduler after every epoch
        assert train.lr_factor(cfg, 0, epoch, 0) == opt.param_groups[0]["lr"]
        opt.step(), official.step()


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    cfg = dict(train.DEFAULTS, lr_schedule="cosine", warmup_iters=10, min_lr_ratio=0.1)
    factors = [train.lr_factor(cfg, it, 0, 110) for it in range(111)]
    assert factors[0] == 0.1 and factors[9] == 1.0 and factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_device_side_preprocessing_path_trains(synth, tmp_path):
    result = train.main(flags(synth, tmp_path, "--task=finetune", "--gpu_preprocess=on", "--mixup=0.5",
                              "--freqm=8", "--timem=16", "--max_iters=2"))
    assert result["iter_num"] == 2 and 0 <= result["final"]["acc_frames"] <= 1
