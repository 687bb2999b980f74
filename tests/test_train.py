"""train.py: runs learn and write their files, resume exactly, save atomically and on signals and
errors, stop on a non-finite loss, refuse bad settings in one line, and keep DDP processes in step.
A tiny model on 16 synthetic clips made on the fly."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY

import data
import prepare
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    prepare.make_synthetic(out, n_train=16, n_test=8, image_size=32, seconds=0.7, seed=0)
    return out


def flags(synth, out_dir, *extra):
    """A tiny run: 4 clips a step, 4 steps an epoch; a step schedule that decays every epoch."""
    return [
        f"--data_train={synth}/train.json",
        f"--data_val={synth}/test.json",
        f"--label_csv={synth}/labels.csv",
        f"--out_dir={out_dir}",
        *[f"--model_{k}={v}" for k, v in TINY.items()],
        "--batch_size=4",
        "--num_workers=0",
        "--log_interval=1",
        "--device=cpu",
        "--lr=2e-3",
        "--lrscheduler_start=1",
        "--lrscheduler_step=1",
        "--lrscheduler_decay=0.9",
        *extra,
    ]


def records(out_dir, split):
    return [r for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if r["split"] == split]


def weights(path):
    return torch.load(path, weights_only=False)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- runs ---------------------------------------------------------------------------------------------


def test_pretraining_lowers_the_loss_and_writes_its_checkpoints_log_and_picture(synth, tmp_path):
    assert train.main(flags(synth, tmp_path, "--max_iters=24", "--noise=False")) == 0
    losses = [r["loss"] for r in records(tmp_path, "train")]
    assert len(losses) == 24 and sum(losses[-6:]) < sum(losses[:6])
    assert {"a2v_R1", "v2a_R1", "a2v_MR", "v2a_R10"} <= records(tmp_path, "final")[0].keys()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 24 and ckpt["task"] == "pretrain" and ckpt["num_classes"] is None
    assert ckpt["model_args"]["embed_dim"] == 32 and ckpt["config"]["max_iters"] == 24
    assert same_weights(ckpt["model"], weights(tmp_path / "final.pt"))  # no averaging in pretraining
    assert (tmp_path / "best.pt").exists() and (tmp_path / "train.png").stat().st_size > 0


def test_finetuning_from_pretraining_with_weight_averaging(synth, tmp_path):
    train.main(flags(synth, tmp_path / "pre", "--max_iters=4"))
    finetune = ["--task=finetune", f"--init_from={tmp_path}/pre/ckpt.pt", "--loss=ce", "--metric=acc"]
    averaging = ["--epochs=6", "--wa=True", "--wa_start=4", "--wa_end=6", "--head_lr=10"]
    assert train.main(flags(synth, tmp_path / "ft", *finetune, *averaging)) == 0
    losses = [r["loss"] for r in records(tmp_path / "ft", "train")]
    assert len(losses) == 24 and sum(losses[-6:]) < sum(losses[:6])
    assert {"acc", "mAP", "acc_frames", "mAP_frames"} <= records(tmp_path / "ft", "final")[0].keys()
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    assert ckpt["task"] == "finetune" and ckpt["num_classes"] == 10
    final = weights(tmp_path / "ft" / "final.pt")
    average = {k: v / 3 for k, v in ckpt["wa_sum"].items()}  # epochs 4, 5 and 6
    assert all(torch.allclose(final[k], average[k]) for k in final)
    assert not same_weights(final, ckpt["model"])  # the final model is not the last step's


def test_the_head_trains_alone_when_the_base_is_frozen(synth, tmp_path):
    train.main(flags(synth, tmp_path, "--task=finetune", "--freeze_base=True", "--max_iters=2"))
    torch.manual_seed(0)  # train.py seeds the initial weights with `seed`
    fresh = train.CAVMAEClassifier(train.CAVMAEConfig(**TINY), 10).state_dict()
    trained = weights(tmp_path / "ckpt.pt")
    changed = {k for k in fresh if not torch.equal(fresh[k], trained[k])}
    assert changed == {"head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"}


def test_fine_tuning_reports_the_best_validation_weights_without_weight_averaging(synth, tmp_path):
    train.main(flags(synth, tmp_path, "--task=finetune", "--metric=acc", "--lr=3e-2", "--epochs=3"))
    val = [r["acc"] for r in records(tmp_path, "val")]
    assert len(val) == 3  # every epoch, the last one included
    assert records(tmp_path, "final")[0]["acc"] == max(val)
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert same_weights(best["model"], weights(tmp_path / "final.pt"))


def test_step_schedule_matches_the_official_multisteplr():
    cfg = dict(train.SETTINGS, lrscheduler_start=10, lrscheduler_step=5, lrscheduler_decay=0.5)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    official = torch.optim.lr_scheduler.MultiStepLR(opt, list(range(10, 1000, 5)), gamma=0.5)
    for epoch in range(25):  # the official loop steps the scheduler after every epoch
        assert train.lr_factor(cfg, 0, epoch, 0) == opt.param_groups[0]["lr"]
        opt.step()
        official.step()


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    cfg = dict(train.SETTINGS, lr_schedule="cosine", warmup_iters=10, min_lr_ratio=0.1)
    factors = [train.lr_factor(cfg, it, 0, 110) for it in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55) and factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_the_loader_workers_change_neither_training_nor_evaluation(synth, tmp_path):
    augment = ["--task=finetune", "--max_iters=4", "--mixup=0.5", "--freqm=8", "--timem=16"]
    for workers in (0, 2):
        train.main(flags(synth, tmp_path / str(workers), *augment, f"--num_workers={workers}"))
    assert same_weights(weights(tmp_path / "0" / "ckpt.pt"), weights(tmp_path / "2" / "ckpt.pt"))
    assert records(tmp_path / "0", "final") == records(tmp_path / "2", "final")


def test_finetuning_shorter_clips_from_a_longer_checkpoint_cuts_the_audio_positions(synth, tmp_path):
    train.main(flags(synth, tmp_path / "pre", "--max_iters=1"))
    short = [f"--init_from={tmp_path}/pre/ckpt.pt", "--task=finetune", "--model_audio_length=32"]
    short.append("--freeze_base=True")  # the positions as loaded
    assert train.main(flags(synth, tmp_path / "ft", *short, "--max_iters=1")) == 0
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    assert ckpt["model_args"]["audio_length"] == 32
    cut = weights(tmp_path / "pre" / "ckpt.pt")["encoder.pos_embed_a"].reshape(1, 8, 4, 32)[:, :, :2]
    assert torch.equal(ckpt["model"]["encoder.pos_embed_a"], cut.reshape(1, 16, 32))


# --- exact resume -------------------------------------------------------------------------------------


def interrupt_at(monkeypatch, step):
    """Send ourselves SIGINT during training step `step` (1-based), as Ctrl-C does."""
    real = train.compute_loss
    steps = []

    def compute_loss(*args, **kwargs):
        if torch.is_grad_enabled():  # training, not evaluation
            steps.append(1)
            if len(steps) == step:
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "compute_loss", compute_loss)


def failing_step_at(monkeypatch, step, error):
    """Training step `step` (1-based) raises `error`."""
    real = train.train_step
    steps = []

    def train_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == step:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", train_step)


def nan_loss_from_step(monkeypatch, step):
    """The loss of training step `step` (1-based) and of every later one is NaN."""
    real = train.compute_loss
    steps = []

    def compute_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        if torch.is_grad_enabled():
            steps.append(1)
        if (not torch.is_grad_enabled()) or (len(steps) < step):
            return loss, stats
        return loss * float("nan"), {**stats, "loss": stats["loss"] * float("nan")}

    monkeypatch.setattr(train, "compute_loss", compute_loss)


@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_saves_and_resume_continues_exactly(synth, tmp_path, monkeypatch, workers):
    common = ["--max_iters=7", "--mixup=0.5", f"--num_workers={workers}"]  # across an epoch end (4 steps)
    train.main(flags(synth, tmp_path / "a", *common))
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        assert train.main(flags(synth, tmp_path / "b", *common)) == 128 + signal.SIGINT
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["iter_num"] == 3
    assert train.main(flags(synth, tmp_path / "b", *common, "--init_from=resume")) == 0
    assert same_weights(weights(tmp_path / "a" / "ckpt.pt"), weights(tmp_path / "b" / "ckpt.pt"))
    assert [r["iter"] for r in records(tmp_path / "b", "train")] == list(range(1, 8))


def test_finetuning_resume_is_exact_with_augmentation_balanced_sampling_and_accumulation(synth, tmp_path):
    common = [
        "--task=finetune",
        "--mixup=0.5",
        "--freqm=8",
        "--timem=16",
        "--label_smooth=0.1",
        "--balanced_sampling=True",
        "--grad_accum=2",
        "--wa=True",
        "--wa_start=1",
    ]
    train.main(flags(synth, tmp_path / "a", *common, "--max_iters=5"))
    train.main(flags(synth, tmp_path / "b", *common, "--max_iters=3"))
    train.main(flags(synth, tmp_path / "b", *common, "--max_iters=5", "--init_from=resume"))
    assert same_weights(weights(tmp_path / "a" / "ckpt.pt"), weights(tmp_path / "b" / "ckpt.pt"))
    assert same_weights(weights(tmp_path / "a" / "final.pt"), weights(tmp_path / "b" / "final.pt"))


def test_an_error_in_the_loop_saves_the_last_step_and_resume_is_exact(synth, tmp_path, monkeypatch, capsys):
    common = ["--max_iters=6", "--mixup=0.5"]
    train.main(flags(synth, tmp_path / "a", *common))
    with monkeypatch.context() as patch:
        failing_step_at(patch, 6, data.DataError("clip7.wav: cannot read audio"))
        assert train.main(flags(synth, tmp_path / "b", *common)) == 1
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["iter_num"] == 5  # not the epoch end
    message = capsys.readouterr().err
    assert "clip7.wav: cannot read audio" in message and "--init_from=resume" in message
    train.main(flags(synth, tmp_path / "b", *common, "--init_from=resume"))
    assert same_weights(weights(tmp_path / "a" / "ckpt.pt"), weights(tmp_path / "b" / "ckpt.pt"))


def test_an_error_in_evaluation_saves_the_step_and_resume_is_exact(synth, tmp_path, monkeypatch):
    common = ["--max_iters=6", "--eval_interval=3"]
    train.main(flags(synth, tmp_path / "a", *common))
    with monkeypatch.context() as patch:
        patch.setattr(train, "evaluate", lambda *args, **kwargs: 1 / 0)
        assert train.main(flags(synth, tmp_path / "b", *common)) == 1
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["iter_num"] == 3
    train.main(flags(synth, tmp_path / "b", *common, "--init_from=resume"))
    assert same_weights(weights(tmp_path / "a" / "ckpt.pt"), weights(tmp_path / "b" / "ckpt.pt"))


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    synth, tmp_path, monkeypatch, capsys
):
    nan_loss_from_step(monkeypatch, 6)  # the checkpoint of the epoch end (iter 4) is good
    assert train.main(flags(synth, tmp_path, "--max_iters=8")) == 1
    assert "non-finite loss at iter 6" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_an_error_after_an_unchecked_nan_keeps_the_last_good_checkpoint(synth, tmp_path, monkeypatch):
    nan_loss_from_step(monkeypatch, 6)
    failing_step_at(monkeypatch, 7, RuntimeError("boom"))
    assert train.main(flags(synth, tmp_path, "--max_iters=8", "--log_interval=4")) == 1
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter_num"] == 4


def test_a_nan_inside_a_log_window_is_caught_before_the_save_that_ends_the_window(
    synth, tmp_path, monkeypatch
):
    nan_loss_from_step(monkeypatch, 5)  # the save at iter 6 (--save_interval=3) ends the window 5-6
    assert train.main(flags(synth, tmp_path, "--max_iters=8", "--log_interval=4", "--save_interval=3")) == 1
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter_num"] == 4  # not the NaN at iter 6


def test_save_interval_writes_checkpoints_between_evaluations(synth, tmp_path, monkeypatch):
    saved = []
    real = train.save_checkpoint

    def save_checkpoint(path, model, cfg, **state):
        saved.append((os.path.basename(path), state["iter_num"]))
        real(path, model, cfg, **state)

    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    train.main(flags(synth, tmp_path, "--max_iters=7", "--save_interval=3"))
    assert [it for name, it in saved if name == "ckpt.pt"] == [3, 4, 6, 7]  # every 3, the epoch end, the end
    assert ("final.pt", 7) in saved and ("best.pt", 4) in saved


def test_resume_drops_the_log_records_past_the_checkpoint(synth, tmp_path, monkeypatch):
    common = ["--max_iters=7"]
    with monkeypatch.context() as patch:  # killed (no save on the way out): ckpt.pt holds the epoch end
        failing_step_at(patch, 7, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            train.main(flags(synth, tmp_path, *common))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"split": "train", "it')  # a line cut short by the kill
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter_num"] == 4
    train.main(flags(synth, tmp_path, *common, "--init_from=resume"))
    assert [r["iter"] for r in records(tmp_path, "train")] == [1, 2, 3, 4, 5, 6, 7]


def test_a_checkpoint_is_replaced_atomically_and_a_failed_write_keeps_the_previous(tmp_path, monkeypatch):
    model = train.CAVMAE(train.CAVMAEConfig(**TINY))
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, model, dict(task="pretrain"), iter_num=1)
    before = open(path, "rb").read()
    os.symlink("/dev/full", path + ".tmp")  # every write there fails with ENOSPC, as on a full disk
    with pytest.raises(OSError, match="No space left on device.*the previous ckpt.pt is intact"):
        train.save_checkpoint(path, model, dict(task="pretrain"), iter_num=2)
    assert os.listdir(tmp_path) == ["ckpt.pt"] and open(path, "rb").read() == before


# --- DDP ----------------------------------------------------------------------------------------------


def ddp_process(rank, world, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert train.main(argv) == 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_processes_equals_one_process_with_their_batches_together(synth, tmp_path):
    common = ["--task=finetune", "--max_iters=3", "--noise=False", "--grad_accum=2"]
    argv = flags(synth, tmp_path / "ddp", *common, "--batch_size=2")
    mp.spawn(ddp_process, args=(2, free_port(), argv), nprocs=2, join=True)
    train.main(flags(synth, tmp_path / "one", *common, "--batch_size=4"))
    ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)
    one = weights(tmp_path / "one" / "ckpt.pt")
    assert len(ddp["rng"]) == 2 and ddp["iter_num"] == 3
    for k in [k for k in one if k.endswith("qkv.bias")]:  # the key bias has no effect: its gradient is
        ddp["model"][k][32:64] = one[k][32:64]  # rounding noise, which Adam turns into steps of lr
    assert all(torch.allclose(ddp["model"][k], one[k], atol=1e-5) for k in one)
    losses = [[r["loss"] for r in records(tmp_path / run, "train")] for run in ("ddp", "one")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    argv = flags(synth, tmp_path / "ddp", *common, "--batch_size=2", "--max_iters=4", "--init_from=resume")
    mp.spawn(ddp_process, args=(2, free_port(), argv), nprocs=2, join=True)  # each process reads ckpt.pt
    assert [r["iter"] for r in records(tmp_path / "ddp", "train")] == [1, 2, 3, 4]


# --- how a run starts and ends ------------------------------------------------------------------------


def test_a_new_run_refuses_an_out_dir_with_a_checkpoint_unless_told(synth, tmp_path, capsys):
    train.main(flags(synth, tmp_path, "--max_iters=1"))
    assert train.main(flags(synth, tmp_path, "--max_iters=1")) == 1
    assert "--init_from=resume" in capsys.readouterr().err
    assert train.main(flags(synth, tmp_path, "--max_iters=2", "--overwrite=True")) == 0
    assert [r["iter"] for r in records(tmp_path, "train")] == [1, 2]


def test_the_end_of_a_run_prints_its_metrics_files_and_the_evaluation_command(synth, tmp_path, capsys):
    train.main(flags(synth, tmp_path, "--max_iters=2"))
    out = capsys.readouterr().out
    assert "a2v_R1" in out and "v2a_MR" in out and "train.png" in out
    assert f"python eval.py retrieval --checkpoint {tmp_path}/final.pt" in out
    train.main(flags(synth, tmp_path / "ft", "--task=finetune", "--max_iters=2"))
    out = capsys.readouterr().out
    assert "acc_frames" in out and f"python eval.py classify --checkpoint {tmp_path}/ft/final.pt" in out


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--batch_size=0", "batch_size=0: must be 1 or more"),
        ("--task=pretrian", "task='pretrian': choose one of pretrain, finetune"),
        ("--mask_ratio=1.0", r"mask_ratio=1.0: must be in \[0, 1\)"),
        ("--contrastive_weight=0", "mae_weight=0 and contrastive_weight=0"),
        ("--model_embed_dim=33", "do not build a model: .*embed_dim=33"),
        ("--init_from=nowhere.pt", "cannot read checkpoint nowhere.pt"),
    ],
)
def test_bad_settings_are_refused_with_one_line(synth, tmp_path, capsys, arg, message):
    extra = ["--mae_weight=0"] if "contrastive" in arg else []
    assert train.main(flags(synth, tmp_path, "--max_iters=1", arg, *extra)) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_with_one_line(synth, tmp_path, capsys):
    assert train.main(flags(synth, tmp_path, "--max_iters=1", "--device=cuda")) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def test_resuming_weights_without_a_training_state_says_how_to_start_from_them(synth, tmp_path, capsys):
    train.main(flags(synth, tmp_path, "--max_iters=1"))
    shutil.copy(tmp_path / "final.pt", tmp_path / "ckpt.pt")
    assert train.main(flags(synth, tmp_path, "--max_iters=2", "--init_from=resume")) == 1
    assert "without a training state" in capsys.readouterr().err


def test_resuming_with_another_number_of_processes_is_refused_with_one_line(synth, tmp_path, capsys):
    train.main(flags(synth, tmp_path, "--max_iters=1"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    torch.save({**ckpt, "rng": ckpt["rng"] * 2}, tmp_path / "ckpt.pt")  # as two processes save it
    assert train.main(flags(synth, tmp_path, "--max_iters=2", "--init_from=resume")) == 1
    assert "saved by 2 processes" in capsys.readouterr().err


def test_missing_data_says_how_to_make_the_synthetic_set(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train.main([]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "python prepare.py synthetic" in err


# --- the command line: signals and data errors with loader workers ---------------------------------------


def command_line(synth, out_dir, *extra):
    return [sys.executable, "train.py", *flags(synth, out_dir, *extra)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_with_loader_workers_saves_and_exits_with_128_plus_its_number(synth, tmp_path, signum):
    process = subprocess.Popen(
        command_line(synth, tmp_path, "--max_iters=100000", "--num_workers=2", "--eval_interval=100000"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not ((tmp_path / "log.jsonl").exists() and '"train"' in (tmp_path / "log.jsonl").read_text()):
            assert process.poll() is None and time.time() < deadline, "the run did not start training"
            time.sleep(0.2)
        os.killpg(process.pid, signum)  # as a terminal's Ctrl-C or a scheduler: every process, workers too
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signum and "Traceback" not in stderr
    assert f"stopped by {signal.Signals(signum).name}" in stdout + stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["iter_num"] >= 1


def test_a_data_error_with_loader_workers_ends_the_run_in_seconds_with_one_line(synth, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synth, broken)
    os.remove(broken / "audio" / "train_00005.wav")
    start = time.time()
    run = subprocess.run(
        command_line(broken, tmp_path / "out", "--max_iters=8", "--num_workers=2"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr and time.time() - start < 60
    error = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert len(error) == 1 and "audio file not found" in error[0] and "train_00005.wav" in error[0]
