"""bench.py: each benchmark runs end to end on tiny inputs and prints its numbers; flops_per_sample
counts what torch's FLOP counter counts."""

import math

import pytest
import torch
from conftest import TINY
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import prepare
from model import CAVMAE, CAVMAEConfig

TINY_FLAGS = [f"--model_{name}={value}" for name, value in TINY.items()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_step_benchmark_prints_the_numbers_of_each_batch_size(dtype, capsys):
    argv = [*TINY_FLAGS, "--device=cpu", f"--dtype={dtype}", "--batch_size", "2", "3"]
    results = bench.main([*argv, "--steps=2", "--warmup=1"])
    lines = capsys.readouterr().out.splitlines()[1:]  # after the header
    assert [line.split(":")[0] for line in lines] == ["batch 2", "batch 3"]
    assert all(("samples_per_s" in line) and ("step_ms" in line) for line in lines)
    assert all((r["samples_per_s"] > 0) and math.isfinite(r["loss"]) for r in results)


def test_flops_per_sample_is_what_the_flop_counter_counts_in_a_forward():
    config = CAVMAEConfig(**TINY)
    model = CAVMAE(config)
    batch = 3
    audio = torch.randn(batch, config.audio_length, config.num_mel_bins)
    image = torch.randn(batch, config.in_chans, config.img_size, config.img_size)
    # the math kernel runs attention as matrix products, which the counter counts
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(audio, image)
    similarity = 2 * batch * config.embed_dim  # the contrastive loss's (B, B) product, left out of the count
    assert counter.get_total_flops() / batch == bench.flops_per_sample(config) + similarity


def test_flops_per_sample_of_the_base_model_is_the_figure_in_docs_costs():
    assert bench.flops_per_sample(CAVMAEConfig()) == 78_068_784_128  # 78.07 GFLOP


def test_data_benchmark_prints_the_item_time_and_both_fbank_times(tmp_path, capsys):
    prepare.make_synthetic(str(tmp_path), n_train=3, n_test=0, image_size=32, seconds=1.0, workers=1)
    times = bench.main(["--data", str(tmp_path / "train.json"), "--label_csv", str(tmp_path / "labels.csv")])
    assert all(ms > 0 for ms in times.values())
    out = capsys.readouterr().out
    assert "ms per evaluation item (3 of" in out
    assert "fbank of 32 clips of 10 s" in out


def test_data_scale_benchmark_prints_the_build_time_and_memory_of_its_rows(capsys):
    seconds, added_mb = bench.main(["--data_scale", "2000"])
    assert seconds > 0
    assert added_mb < 50  # 2000 rows take well under 1 MB
    assert "2000 rows: AVDataset built in" in capsys.readouterr().out


def test_a_device_that_does_not_exist_is_one_line_naming_it(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--device", "gpu"])
    assert stop.value.code == 2
    assert "device='gpu' is not a device" in capsys.readouterr().err


def test_a_model_size_the_config_refuses_is_one_line_naming_it(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--model_img_size", "30"])
    assert stop.value.code == 2
    assert "img_size=30 is not a multiple of patch_size=16" in capsys.readouterr().err
