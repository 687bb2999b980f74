"""train.py: training runs and learns, resumes exactly, checkpoints atomically, stops on NaN, checks its
config, and keeps DDP ranks in sync. Tiny model on 16 synthetic clips made on the fly."""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import data
import loader
import synthetic
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    synthetic.make_synthetic(out, n_train=16, n_test=8, image_size=32, seconds=0.7, seed=0)
    return out


def flags(synth, out_dir, *extra):
    return [
        f"--data_train={synth}/train.json",
        f"--data_val={synth}/test.json",
        f"--label_csv={synth}/labels.csv",
        f"--out_dir={out_dir}",
        "--model_preset=tiny",
        "--batch_size=4",
        "--num_workers=0",
        "--log_interval=1",
        "--device=cpu",
        "--dtype=float32",
        "--lr=2e-3",
        "--lrscheduler_start=1",
        "--lrscheduler_step=1",
        "--lrscheduler_decay=0.9",
        *extra,
    ]


def train_losses(out_dir):
    return [
        r["loss"] for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if r["split"] == "train"
    ]


def training_state(path):
    ckpt = torch.load(path, weights_only=False)
    return ckpt["model_last"] or ckpt["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_runs_and_lowers_the_loss(synth, tmp_path):
    result = train.main(flags(synth, tmp_path, "--max_iters=24", "--noise=False"))
    losses = train_losses(tmp_path)
    assert len(losses) == 24 and sum(losses[-6:]) < sum(losses[:6])
    assert {"a2v_R1", "v2a_R1", "loss_c", "contrastive_accuracy"} <= result["final"].keys()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 24 and ckpt["task"] == "pretrain" and ckpt["num_classes"] is None
    assert ckpt["model_args"]["embed_dim"] == 32 and ckpt["config"]["max_iters"] == 24
    assert json.load(open(tmp_path / "config.json"))["model_preset"] == "tiny"
    assert (tmp_path / "train.png").stat().st_size > 0


def test_finetuning_from_a_pretraining_checkpoint_lowers_the_loss(synth, tmp_path):
    train.main(flags(synth, tmp_path / "pre", "--max_iters=4"))
    result = train.main(
        flags(
            synth,
            tmp_path / "ft",
            "--task=finetune",
            f"--init_from={tmp_path}/pre/ckpt.pt",
            "--loss=ce",
            "--metric=acc",
            "--head_lr=10",
            "--epochs=6",
            "--wa=True",
            "--wa_start=4",
            "--wa_end=6",
        )
    )
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


def nan_loss_from_step(monkeypatch, step):
    """The loss of training step `step` (1-based) and of every later one is NaN."""
    real = train.compute_loss
    steps = []

    def compute_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # evaluation
            return loss, stats
        steps.append(1)
        if len(steps) < step:
            return loss, stats
        nan = float("nan")
        return loss * nan, {**stats, "loss": stats["loss"] * nan}

    monkeypatch.setattr(train, "compute_loss", compute_loss)


def failing_step_at(monkeypatch, step, message):
    """Training step `step` (1-based) raises a DataError, as data that cannot be read does."""
    real = train.train_step
    steps = []

    def failing_step(run):
        steps.append(1)
        if len(steps) == step:
            raise data.DataError(message)
        return real(run)

    monkeypatch.setattr(train, "train_step", failing_step)


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
    common = [
        "--task=finetune",
        "--mixup=0.5",
        "--freqm=8",
        "--timem=16",
        "--label_smooth=0.1",
        "--balanced_sampling=True",
        "--grad_accum=2",
        "--grad_clip=1.0",
    ]
    train.main(flags(synth, tmp_path / "a", *common, "--max_iters=5"))
    train.main(flags(synth, tmp_path / "b", *common, "--max_iters=3"))
    train.main(flags(synth, tmp_path / "b", *common, "--max_iters=5", "--init_from=resume"))
    # the training state (the reported weights are the best validation ones, evaluated at other iterations)
    assert same_weights(*(training_state(tmp_path / run / "ckpt.pt") for run in "ab"))


def test_checkpoint_is_replaced_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.atomic_save({"iter_num": 1}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    before = open(path, "rb").read()

    def broken_save(obj, f):  # writes half a file, then fails (disk full, killed, ...)
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left on device"):
        train.atomic_save({"iter_num": 2}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"] and open(path, "rb").read() == before


def test_a_full_disk_during_a_checkpoint_write_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    train.atomic_save({"iter_num": 1}, path)
    before = open(path, "rb").read()
    os.symlink("/dev/full", path + ".tmp")  # every write there fails with ENOSPC, as on a full disk
    with pytest.raises(train.WriteError, match="No space left on device; the previous ckpt.pt is intact"):
        train.atomic_save({"iter_num": 2}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"] and open(path, "rb").read() == before


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    synth, tmp_path, monkeypatch
):
    nan_loss_from_step(monkeypatch, 6)  # the epoch-4 checkpoint is good
    with pytest.raises(train.NonFiniteLoss, match="non-finite loss at iter 6"):
        train.main(flags(synth, tmp_path, "--max_iters=8"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_config_file_then_flags_override_the_defaults(tmp_path):
    config = tmp_path / "cfg.py"
    config.write_text(
        "import math\nbatch_size = 12\nlr = 1e-4\nmodel_preset = 'small'\nmask_ratio = math.sqrt(0.25)\n"
    )
    cfg = train.configure(
        [
            str(config),
            "--lr=3e-4",
            "--compile=true",
            "--betas=(0.9, 0.95)",
            "--epochs=2",
            "--model_embed_dim=96",
            "--out_dir=out/x",
            "--weight_decay=0",
        ]
    )
    assert (cfg["batch_size"], cfg["lr"], cfg["compile"], cfg["betas"]) == (12, 3e-4, True, (0.9, 0.95))
    assert cfg["epochs"] == 2
    assert cfg["mask_ratio"] == 0.5 and cfg["out_dir"] == "out/x" and cfg["weight_decay"] == 0.0
    mcfg = train.model_config(cfg)
    assert mcfg.embed_dim == 96 and mcfg.img_size == 64  # the preset, one field overridden
    assert train.configure(["--compile=0", "--freeze_base=True"])["compile"] is False


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--bach_size=8", "unknown config key 'bach_size'"),
        ("--batch_size=8.5", "batch_size=8.5: expected int"),
        ("--batch_size=eight", "not a int literal"),
        ("--compile=maybe", "expected a bool"),
        ("--task=distill", "choose one of pretrain, finetune"),
        ("--betas=(0.9,)", "expected tuple"),
        ("--model_embed_dims=64", "unknown config key 'model_embed_dims'"),
        ("--lr", "--key=value"),
    ],
)
def test_config_rejects_unknown_keys_and_wrong_types(arg, message):
    with pytest.raises(train.ConfigError, match=message.replace("(", r"\(")):
        train.configure([arg])


def test_settings_are_the_lowercase_defaults_not_the_imported_constants():
    import configurator

    assert [key for key in train.DEFAULTS if not key.islower()] == []  # FT_MODES, MASK_MODES were
    assert "--FT_MODES" not in configurator.usage(train.__file__, train.DEFAULTS, train.CHOICES)
    with pytest.raises(train.ConfigError, match="unknown config key 'MASK_MODES'"):
        train.configure(["--MASK_MODES=('time',)"])


def test_config_file_errors_name_the_file(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("batch_sise = 8\n")
    with pytest.raises(train.ConfigError, match=f"unknown config key 'batch_sise' in {config}"):
        train.configure([str(config)])


def test_command_line_reports_config_errors_without_a_traceback():
    run = subprocess.run(
        [sys.executable, "train.py", "--max_iter=5"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 1 and "error: unknown config key 'max_iter'" in run.stderr
    assert "Traceback" not in run.stderr


def _ddp_worker(rank, world, port, argv, out):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    result = train.main(argv)
    torch.save(result["model"].state_dict(), os.path.join(out, f"rank{rank}.pt"))


def run_ddp(argv, out):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, argv, str(out)), nprocs=2, join=True)


def final_records(out_dir):
    return [r for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if r["split"] == "final"]


def test_ddp_on_two_cpu_processes_keeps_ranks_in_sync(synth, tmp_path):
    argv = flags(
        synth, tmp_path, "--max_iters=3", "--gather_negatives=True", "--batch_size=2", "--grad_accum=2"
    )
    run_ddp(argv, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert same_weights(rank0, rank1)
    assert (
        torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter_num"] == 3
        and len(os.listdir(tmp_path)) >= 4
    )
    torch.manual_seed(0)  # the initial weights
    assert not same_weights(train.CAVMAE(train.CAVMAEConfig.from_preset("tiny")).state_dict(), rank0)
    # each rank retrieved over its half of the clips; gathered, that is one process's retrieval over all of them
    train.main(
        argv + ["--init_from=resume"]
    )  # one process, nothing left to train: the final evaluation again
    ddp, single = final_records(tmp_path)[-2:]
    assert {k: ddp[k] for k in ("a2v_R1", "v2a_R1", "a2v_R5", "v2a_R5")} == {
        k: single[k] for k in ("a2v_R1", "v2a_R1", "a2v_R5", "v2a_R5")
    }


def test_ddp_fine_tuning_evaluation_equals_one_process(synth, tmp_path):
    argv = flags(synth, tmp_path, "--task=finetune", "--max_iters=2", "--batch_size=2", "--num_workers=1")
    run_ddp(argv, tmp_path)
    train.main(argv + ["--init_from=resume"])
    ddp, single = final_records(tmp_path)[-2:]
    assert ddp.keys() == single.keys() and "acc_frames" in ddp
    metrics = [k for k in ddp if k not in ("split", "iter", "epoch")]
    assert all(ddp[k] == pytest.approx(single[k], rel=1e-6, abs=1e-9) for k in metrics)


def test_step_schedule_matches_the_official_multisteplr():
    cfg = dict(train.DEFAULTS, lrscheduler_start=10, lrscheduler_step=5, lrscheduler_decay=0.5)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    official = torch.optim.lr_scheduler.MultiStepLR(opt, list(range(10, 1000, 5)), gamma=0.5)
    for epoch in range(25):  # the official loop steps the scheduler after every epoch
        assert train.lr_factor(cfg, 0, epoch, 0) == opt.param_groups[0]["lr"]
        opt.step()
        official.step()


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    cfg = dict(train.DEFAULTS, lr_schedule="cosine", warmup_iters=10, min_lr_ratio=0.1)
    factors = [train.lr_factor(cfg, it, 0, 110) for it in range(111)]
    assert factors[0] == 0.1 and factors[9] == 1.0 and factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_device_side_preprocessing_path_trains(synth, tmp_path):
    result = train.main(
        flags(
            synth,
            tmp_path,
            "--task=finetune",
            "--gpu_preprocess=on",
            "--mixup=0.5",
            "--freqm=8",
            "--timem=16",
            "--max_iters=2",
        )
    )
    assert result["iter_num"] == 2 and 0 <= result["final"]["acc_frames"] <= 1


def test_a_new_run_refuses_an_out_dir_with_a_checkpoint_unless_told(synth, tmp_path):
    train.main(flags(synth, tmp_path, "--max_iters=1"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(
        train.ConfigError, match="--init_from=resume, or start a new one with --overwrite=True"
    ):
        train.main(flags(synth, tmp_path, "--max_iters=2"))
    assert (tmp_path / "ckpt.pt").read_bytes() == before and len(train_losses(tmp_path)) == 1
    train.main(flags(synth, tmp_path, "--max_iters=2", "--overwrite=True"))
    assert len(train_losses(tmp_path)) == 2  # a new log


def test_an_error_inside_the_loop_saves_the_last_step_and_resume_is_exact(
    synth, tmp_path, monkeypatch, capsys
):
    common = ["--max_iters=6", "--mixup=0.5", "--save_minutes=0"]
    train.main(flags(synth, tmp_path / "a", *common))
    with monkeypatch.context() as patch:
        failing_step_at(patch, 6, "clip7.wav: cannot read audio")
        with pytest.raises(data.DataError, match="clip7.wav"):
            train.main(flags(synth, tmp_path / "b", *common))
    assert (
        torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["iter_num"] == 5
    )  # not the epoch end (4)
    message = capsys.readouterr().err
    assert f"{tmp_path / 'b' / 'ckpt.pt'} holds that state" in message and "--init_from=resume" in message
    train.main(flags(synth, tmp_path / "b", *common, "--init_from=resume"))
    assert same_weights(*(training_state(tmp_path / run / "ckpt.pt") for run in "ab"))


def test_save_interval_writes_checkpoints_between_epoch_ends(synth, tmp_path, monkeypatch):
    saved, real = [], train.save_checkpoint
    monkeypatch.setattr(
        train, "save_checkpoint", lambda run, **kw: (saved.append(run.iter_num), real(run, **kw))
    )
    train.main(flags(synth, tmp_path, "--max_iters=7", "--save_interval=3", "--eval_interval=-1"))
    assert saved == [
        3,
        4,
        6,
        7,
        7,
    ]  # every 3 iterations, each epoch end (4 iterations), the last step, the end


def test_fine_tuning_reports_the_best_validation_weights_without_weight_averaging(synth, tmp_path):
    result = train.main(
        flags(
            synth,
            tmp_path,
            "--task=finetune",
            "--loss=ce",
            "--metric=acc",
            "--lr=3e-2",
            "--epochs=4",
            "--eval_interval=2",
        )
    )
    records = list(map(json.loads, open(tmp_path / "log.jsonl")))
    val = [r["acc"] for r in records if r["split"] == "val"]
    assert len(val) == 8  # every 2 iterations, the last weights included
    assert result["final"]["acc"] == max(val)
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert same_weights(best["model"], result["model"].state_dict()) and best["metric"] == max(val)


def test_persistent_validation_workers_see_the_frame_of_each_pass():
    keys = loader.EvalKeys(5)
    workers = torch.utils.data.DataLoader(
        _KeyEcho(), sampler=keys, batch_size=2, num_workers=2, persistent_workers=True
    )
    seen = []
    for frame in (None, 3, 7):  # the final evaluation's passes over the same workers
        keys.frame = frame
        seen.append([f for batch in workers for f in batch[1].tolist()])
    assert seen == [[-1] * 5, [3] * 5, [7] * 5]


class _KeyEcho(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, key):  # (index, frame) -> (index, frame or -1)
        return key[0], -1 if key[1] is None else key[1]


def test_worker_count_does_not_change_training_or_evaluation(synth, tmp_path):
    finals = [
        train.main(
            flags(
                synth,
                tmp_path / str(w),
                "--task=finetune",
                "--max_iters=4",
                f"--num_workers={w}",
                "--mixup=0.5",
                "--freqm=8",
                "--timem=16",
            )
        )["final"]
        for w in (0, 2)
    ]
    assert finals[0] == pytest.approx(finals[1])


def test_epoch_records_report_throughput_and_frame_fallbacks(synth, tmp_path):
    train.main(flags(synth, tmp_path, "--max_iters=8"))
    epochs = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if r["split"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["samples_per_s"] > 0 for r in epochs)
    assert all(r["frame_fallbacks"] == 0 and r["fallback_examples"] == [] for r in epochs)


def test_seeded_items_touch_and_restore_only_the_cpu_generators(monkeypatch):
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    items = loader.SeededItems(_RandomItems(), seed=1)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first, again = items[(0, 5, 1)], items[(0, 5, 1)]
    assert first == again and items[(0, 6, 1)] != first
    assert (random.getstate(), torch.get_rng_state().tolist()) == (states[0], states[2].tolist())
    assert (np.random.get_state()[1] == states[1]).all() and seeded == []


class _RandomItems:
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_one_gpu_reproduction_recipes_run_on_the_cpu_at_a_tiny_size(synth, tmp_path):
    tiny = [
        f"--data_train={synth}/train.json",
        f"--data_val={synth}/test.json",
        f"--label_csv={synth}/labels.csv",
        "--device=cpu",
        "--compile=False",
        "--model_preset=tiny",
        "--num_workers=0",
        "--batch_size=4",
        "--max_iters=2",
    ]  # the recipes' bf16 autocast, optimiser, schedule and augmentation stay as they are
    pre = train.main(
        [os.path.join(ROOT, "config/pretrain_synthetic_gpu.py"), *tiny, f"--out_dir={tmp_path}/pre"]
    )
    ft = train.main(
        [
            os.path.join(ROOT, "config/finetune_synthetic_gpu.py"),
            *tiny,
            f"--out_dir={tmp_path}/ft",
            f"--init_from={tmp_path}/pre/ckpt.pt",
        ]
    )
    assert pre["iter_num"] == ft["iter_num"] == 2 and 0 <= ft["final"]["acc_frames"] <= 1
    assert torch.load(tmp_path / "pre" / "ckpt.pt", weights_only=False)["config"]["dtype"] == "bfloat16"


def test_device_side_and_worker_side_preprocessing_log_the_same_losses(synth, tmp_path):
    common = [
        "--task=finetune",
        "--mixup=0.5",
        "--freqm=8",
        "--timem=16",
        "--noise=True",
        "--label_smooth=0.1",
        "--max_iters=6",
        "--num_workers=1",
    ]
    for where in ("on", "off"):
        train.main(flags(synth, tmp_path / where, *common, f"--gpu_preprocess={where}"))
    on, off = train_losses(tmp_path / "on"), train_losses(tmp_path / "off")
    assert len(on) == 6 and on == pytest.approx(off, rel=1e-4)


def test_fine_tuning_shorter_clips_from_a_longer_checkpoint_cuts_the_audio_positions(synth, tmp_path, capsys):
    train.main(flags(synth, tmp_path / "pre", "--max_iters=1"))  # tiny: 64 fbank frames
    result = train.main(
        flags(
            synth,
            tmp_path / "ft",
            "--task=finetune",
            "--max_iters=1",
            "--model_audio_length=32",
            f"--init_from={tmp_path}/pre/ckpt.pt",
        )
    )
    assert result["model"].config.audio_length == 32
    assert "audio positions cut from 8x4 to 8x2 time steps" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not longer ones"):
        train.main(
            flags(
                synth,
                tmp_path / "long",
                "--max_iters=1",
                "--model_audio_length=128",
                f"--init_from={tmp_path}/pre/ckpt.pt",
            )
        )


def test_an_error_after_an_unchecked_nan_keeps_the_last_good_checkpoint(synth, tmp_path, monkeypatch):
    nan_loss_from_step(monkeypatch, 6)  # between two log lines
    failing_step_at(monkeypatch, 7, "clip3.wav: cannot read audio")
    with pytest.raises(data.DataError):
        train.main(flags(synth, tmp_path, "--max_iters=8", "--log_interval=10", "--save_minutes=0"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_an_error_in_evaluation_saves_the_step_and_resume_is_exact(synth, tmp_path, monkeypatch):
    common = ["--max_iters=6", "--save_minutes=0", "--eval_interval=3"]
    train.main(flags(synth, tmp_path / "a", *common))
    real = train.evaluate

    def failing_evaluate(run, final=False):
        raise data.DataError("test_00001.wav: cannot read audio")

    monkeypatch.setattr(train, "evaluate", failing_evaluate)
    with pytest.raises(data.DataError):
        train.main(flags(synth, tmp_path / "b", *common))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["iter_num"] == 3
    monkeypatch.setattr(train, "evaluate", real)
    train.main(flags(synth, tmp_path / "b", *common, "--init_from=resume"))
    assert same_weights(*(training_state(tmp_path / run / "ckpt.pt") for run in "ab"))


# --- the command line: how a run ends -------------------------------------------------------------------------


def command_line(synth, out_dir, *extra):
    return [sys.executable, "train.py", *flags(synth, out_dir, *extra)]


def test_a_data_error_with_loader_workers_ends_the_process_with_the_resume_command(synth, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synth, broken)
    os.remove(broken / "audio" / "train_00005.wav")
    out_dir = tmp_path / "out"
    run = subprocess.run(
        command_line(broken, out_dir, "--max_iters=8", "--num_workers=1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # it used to wait forever for a worker that ignored SIGTERM
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    error = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "audio file not found" in error[0] and "train_00005.wav" in error[0]
    assert "--init_from=resume" in run.stderr


def wait_for_a_train_record(process, out_dir, seconds=300):
    log = out_dir / "log.jsonl"
    deadline = time.time() + seconds
    while not (log.exists() and '"train"' in log.read_text()):
        assert process.poll() is None and time.time() < deadline, "the run did not start training"
        time.sleep(0.2)


@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 0), (signal.SIGTERM, 1), (signal.SIGINT, 1)])
def test_a_signal_saves_and_exits_with_128_plus_its_number(synth, tmp_path, signum, workers):
    process = subprocess.Popen(
        command_line(synth, tmp_path, "--max_iters=100000", f"--num_workers={workers}"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_a_train_record(process, tmp_path)
        os.killpg(process.pid, signum)  # as a terminal's Ctrl-C or a scheduler: every process, workers too
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signum
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "--init_from=resume" in stderr
    assert "Traceback" not in stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter_num"] >= 1


# --- one-line errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--device=gpu", "device='gpu' is not a device: use auto, cpu, cuda"),
        ("--batch_size=0", "batch_size=0: must be 1 or more"),
        ("--grad_accum=-1", "grad_accum=-1: must be 1 or more"),
        ("--num_workers=-2", "num_workers=-2: must be 0 or more"),
        ("--log_interval=0", "log_interval=0: must be 1 or more"),
    ],
)
def test_bad_settings_are_refused_with_one_line(synth, tmp_path, arg, message):
    with pytest.raises(train.ConfigError, match=message):
        train.main(flags(synth, tmp_path, "--max_iters=1", arg))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_with_one_line(synth, tmp_path):
    with pytest.raises(train.ConfigError, match="device=cuda but torch sees no CUDA GPU"):
        train.main(flags(synth, tmp_path, "--max_iters=1", "--device=cuda"))


def test_a_model_that_cannot_be_built_is_refused_with_its_flags(synth, tmp_path):
    with pytest.raises(
        train.ConfigError, match="--model_embed_dim=33 is not divisible by --model_num_heads=2"
    ):
        train.main(flags(synth, tmp_path, "--max_iters=1", "--model_embed_dim=33"))


def test_init_from_a_dict_that_is_not_a_checkpoint_names_the_file(synth, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(1)}, path)
    expected = re.escape(f"checkpoint {path}: unrecognised checkpoint format")
    with pytest.raises(train.ConfigError, match=expected):
        train.main(flags(synth, tmp_path / "run", "--max_iters=1", f"--init_from={path}"))


def test_resume_accepts_a_checkpoint_whose_config_holds_names_that_are_not_settings(synth, tmp_path):
    train.main(flags(synth, tmp_path, "--max_iters=1"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    ckpt["config"]["FT_MODES"] = ("multimodal",)  # what the checkpoints of earlier versions held
    torch.save(ckpt, tmp_path / "ckpt.pt")
    result = train.main(flags(synth, tmp_path, "--max_iters=2", "--init_from=resume"))
    assert result["iter_num"] == 2


def test_resuming_a_file_that_is_not_a_checkpoint_says_so(synth, tmp_path):
    (tmp_path / "ckpt.pt").write_text("not a checkpoint")
    with pytest.raises(train.ConfigError, match="ckpt.pt"):  # one line naming the file
        train.main(flags(synth, tmp_path, "--max_iters=1", "--init_from=resume"))


def test_resuming_weights_without_a_training_state_says_how_to_start_from_them(synth, tmp_path):
    torch.save({"module.weight": torch.zeros(1)}, tmp_path / "ckpt.pt")  # an official state dict
    with pytest.raises(train.ConfigError, match="holds no training state to resume.*--init_from="):
        train.main(flags(synth, tmp_path, "--max_iters=1", "--init_from=resume"))


def test_an_out_dir_that_cannot_be_written_is_named(synth, tmp_path):
    (tmp_path / "file").write_text("")
    out_dir = tmp_path / "file" / "run"  # a folder inside a file cannot be made, like one on a read-only disk
    with pytest.raises(train.WriteError, match=f"out_dir={out_dir} cannot be written"):
        train.main(flags(synth, out_dir, "--max_iters=1"))


def test_missing_data_files_say_how_to_make_the_synthetic_set(tmp_path):
    with pytest.raises(train.ConfigError, match="not found: data_train=.*python prepare.py synthetic"):
        train.main([f"--out_dir={tmp_path}", "--data_train=nowhere/train.json", "--device=cpu"])


# --- resume ---------------------------------------------------------------------------------------------------


def test_resume_with_settings_that_change_the_clip_order_is_refused_with_the_differences(synth, tmp_path):
    train.main(flags(synth, tmp_path, "--max_iters=2"))
    with pytest.raises(train.ConfigError) as refused:
        train.main(
            flags(synth, tmp_path, "--max_iters=4", "--batch_size=2", "--seed=1", "--init_from=resume")
        )
    message = str(refused.value)
    assert "batch_size: 4 -> 2" in message and "seed: 0 -> 1" in message
    assert f"--init_from={tmp_path / 'ckpt.pt'}" in message
    changeable = ["--num_workers=1", "--log_interval=2", "--save_interval=1", "--eval_interval=-1"]
    result = train.main(flags(synth, tmp_path, "--max_iters=3", *changeable, "--init_from=resume"))
    assert result["iter_num"] == 3


def test_resume_drops_the_log_records_past_the_checkpoint(synth, tmp_path, monkeypatch):
    common = ["--max_iters=7", "--save_minutes=0"]
    real, steps = train.train_step, []

    def killed_at_step_7(
        run,
    ):  # no save on the way out, as after kill -9: ckpt.pt holds the epoch end (iter 4)
        steps.append(1)
        if len(steps) == 7:
            raise KeyboardInterrupt
        return real(run)

    with monkeypatch.context() as patch:
        patch.setattr(train, "train_step", killed_at_step_7)
        with pytest.raises(KeyboardInterrupt):
            train.main(flags(synth, tmp_path, *common))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter_num"] == 4
    train.main(flags(synth, tmp_path, *common, "--init_from=resume"))
    records = list(map(json.loads, open(tmp_path / "log.jsonl")))
    assert [r["iter"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6, 7]


# --- what a run says ------------------------------------------------------------------------------------------


def test_the_end_of_pretraining_prints_the_metrics_the_files_and_the_next_commands(synth, tmp_path, capsys):
    train.main(flags(synth, tmp_path, "--max_iters=2"))
    out = capsys.readouterr().out
    assert "audio->visual" in out and "visual->audio" in out and "median rank" in out
    assert str(tmp_path / "log.jsonl") in out and str(tmp_path / "train.png") in out
    assert f"--init_from={tmp_path / 'ckpt.pt'}" in out and "--task=finetune" in out
    assert f"python eval.py retrieval --checkpoint {tmp_path / 'ckpt.pt'}" in out
    final = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if r["split"] == "final"]
    assert len(final) == 1 and {"a2v_R10", "v2a_R10", "a2v_MR", "v2a_MR"} <= final[0].keys()


def test_the_end_of_fine_tuning_prints_both_evaluations_and_the_classify_command(synth, tmp_path, capsys):
    train.main(flags(synth, tmp_path, "--task=finetune", "--metric=acc", "--max_iters=2"))
    out = capsys.readouterr().out
    assert "(middle frame)" in out and "(averaged over 10 frames)" in out
    assert f"python eval.py classify --checkpoint {tmp_path / 'ckpt.pt'}" in out


def test_a_model_that_takes_larger_frames_than_the_data_says_they_are_resized(synth, tmp_path, capsys):
    train.main(flags(synth, tmp_path, "--max_iters=1", "--model_img_size=64"))
    assert "its frames are 32x32 px and the model's img_size is 64: frames resized" in capsys.readouterr().out


def test_the_slowdown_watch_warns_once_when_throughput_falls_below_a_third():
    watch = train.SlowdownWatch()
    rates = [100.0] * 6 + [40.0, 20.0, 10.0]
    warnings = [watch.check(rate, now=float(t)) for t, rate in enumerate(rates)]
    assert warnings[:7] == [None] * 7  # too few windows yet, then 40 is above a third of 100
    assert "top or nvidia-smi" in warnings[7] and warnings[8] is None  # at most once per WARN_SECONDS
    assert watch.check(10.0, now=7.0 + train.SlowdownWatch.WARN_SECONDS) is not None


def test_importing_train_leaves_out_evaluation_and_preparation_modules():
    check = "import sys, train; print(sorted(m for m in ('eval', 'prepare', 'pictures') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "[]", run.stderr


def test_final_retrieval_equals_eval_py_retrieval_on_the_same_checkpoint(synth, tmp_path):
    import eval

    final = train.main(flags(synth, tmp_path, "--max_iters=2"))["final"]
    ckpt = str(tmp_path / "ckpt.pt")
    out = eval.main(["retrieval", "--checkpoint", ckpt, "--data", f"{synth}/test.json", "--device", "cpu"])
    for name, key in (("audio_to_visual", "a2v"), ("visual_to_audio", "v2a")):
        assert {k: final[f"{key}_{k}"] for k in ("R1", "R5", "R10", "MR")} == out[name]


def test_an_error_in_the_final_evaluation_prints_the_command_that_finishes_the_run(
    synth, tmp_path, monkeypatch, capsys
):
    real = train.evaluate

    def failing_final_evaluation(run, final=False):
        if final:
            raise data.DataError("test_00003.wav: cannot read audio")
        return real(run, final)

    with monkeypatch.context() as patch:
        patch.setattr(train, "evaluate", failing_final_evaluation)
        with pytest.raises(data.DataError):
            train.main(flags(synth, tmp_path, "--max_iters=2"))
    assert "--init_from=resume" in capsys.readouterr().err
    result = train.main(flags(synth, tmp_path, "--max_iters=2", "--init_from=resume"))
    assert result["iter_num"] == 2 and "a2v_R1" in result["final"]


def test_a_resumed_log_drops_a_line_cut_short_by_a_kill(tmp_path):
    log = tmp_path / "log.jsonl"
    whole = [json.dumps({"split": "train", "iter": it}) + "\n" for it in (10, 20, 30)]
    log.write_text("".join(whole) + '{"split": "train", "it')  # killed while writing iteration 40
    train.trim_log(str(log), 20)
    assert log.read_text() == "".join(whole[:2])
