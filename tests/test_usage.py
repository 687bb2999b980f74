"""A newcomer's first hour: every program answers --help, a broken config file is named in one
line, and train_picture draws what a person reads to judge a run."""

import json
import os
import subprocess
import sys

import pytest

import bench
import configurator
import eval as ev
import pictures
import prepare
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds for a program that only prints its usage


def run_program(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


# -----------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help_exits_cleanly_with_the_usage(flag):
    run = run_program("train.py", flag)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: python train.py [CONFIG_FILE ...] [--key=value ...]")


@pytest.fixture(scope="module")
def train_help():
    """What `python train.py --help` prints."""
    return run_program("train.py", "--help").stdout


def test_train_help_lists_settings_with_their_defaults_and_comments(train_help):
    lines = train_help.splitlines()
    comments = {name: comment for _, name, comment in configurator.setting_comments(train.__file__)}
    assert comments["contrastive_weight"]  # train.py says what lambda_c is beside its default
    shown = [line for line in lines if line.startswith("  --contrastive_weight=")]
    assert shown == [
        f"  --contrastive_weight={train.DEFAULTS['contrastive_weight']}".ljust(configurator.DEFAULT_COLUMN)
        + "  "
        + comments["contrastive_weight"]
    ]
    assert f"  --batch_size={train.DEFAULTS['batch_size']}" in lines
    assert "  --betas=(0.95,0.999)" in lines  # a tuple as one types it after --betas=
    sections = [line for line in lines if line.startswith("pretraining objective")]
    assert sections  # train.py's section comments head the groups


def test_train_help_lists_the_model_fields(train_help):
    assert "--model_<field>=value" in train_help
    assert "  --model_embed_dim=768" in train_help.splitlines()


def test_train_help_after_a_config_file_still_prints_the_usage():
    run = run_program("train.py", "config/pretrain_synthetic.py", "--help")
    assert run.returncode == 0
    assert run.stdout.startswith("usage:")


@pytest.mark.parametrize(
    "main, argv",
    [
        (ev.main, []),
        (ev.main, ["classify"]),
        (ev.main, ["retrieval"]),
        (ev.main, ["inpaint"]),
        (ev.main, ["localize"]),
        (ev.main, ["embed"]),
        (ev.main, ["predict"]),
        (prepare.main, []),
        (prepare.main, ["videos"]),
        (prepare.main, ["synthetic"]),
        (bench.main, []),
    ],
)
def test_every_other_command_prints_its_usage(main, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_setting_comments_reads_sections_tuples_and_trailing_comments(tmp_path):
    source = tmp_path / "program.py"
    source.write_text(
        "# I/O\n"
        "out_dir = 'out'  # where the run writes\n"
        "log_interval = 10\n"
        "\n"
        "# augmentation\n"
        "freqm, timem = 0, 0  # mask widths\n"
        "noise = (\n"
        "    True\n"
        ")  # the official noise\n"
    )
    assert configurator.setting_comments(str(source)) == [
        ("I/O", "out_dir", "where the run writes"),
        ("I/O", "log_interval", ""),
        ("augmentation", "freqm", "mask widths"),
        ("augmentation", "timem", "mask widths"),
        ("augmentation", "noise", "the official noise"),
    ]


def test_usage_shows_each_default_as_it_is_typed(tmp_path):
    source = tmp_path / "program.py"
    source.write_text('"""Do a thing."""\nname = "x"  # a name\nrate = 2.0\npeak = 989e12\n')
    defaults = dict(name="x", rate=2.0, peak=989e12)
    lines = configurator.usage(str(source), defaults).splitlines()
    assert "Do a thing." in lines
    assert any(line.startswith("  --name=x ") and line.endswith("a name") for line in lines)
    assert "  --rate=2.0" in lines  # still reads as a float
    assert "  --peak=9.89e+14" in lines


# -----------------------------------------------------------------------------
# config file errors


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_with_a_syntax_error_names_the_file_and_line(tmp_path):
    config = write(tmp_path, "bad.py", "batch_size = 8\nlr = = 1e-3\n")
    with pytest.raises(train.ConfigError, match=f"config file {config}, line 2: invalid syntax"):
        train.configure([config])


def test_config_file_syntax_error_is_one_line_without_a_traceback(tmp_path):
    config = write(tmp_path, "bad.py", "batch_size = 8\nlr = = 1e-3\n")
    run = run_program("train.py", config)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"error: config file {config}, line 2: invalid syntax: lr = = 1e-3"
    ]


def test_config_file_that_fails_to_run_names_the_file_line_and_error(tmp_path):
    config = write(tmp_path, "bad.py", "batch_size = 8\nlr = base_lr * 2\n")
    with pytest.raises(
        train.ConfigError, match=f"{config}, line 2: NameError: name 'base_lr' is not defined"
    ):
        train.configure([config])


def test_config_file_value_of_the_wrong_type_names_the_file(tmp_path):
    config = write(tmp_path, "bad.py", "lr = 'fast'\n")
    with pytest.raises(train.ConfigError, match=f"{config}: lr='fast': expected float"):
        train.configure([config])


# -----------------------------------------------------------------------------
# round tick values


@pytest.mark.parametrize(
    "low, high, ticks",
    [
        (10, 1488, [0, 500, 1000, 1500]),
        (0, 120, [0, 20, 40, 60, 80, 100, 120]),
        (0.21, 0.39, [0.2, 0.25, 0.3, 0.35, 0.4]),
        (0, 0.072, [0, 0.02, 0.04, 0.06, 0.08]),
        (-0.3, 0.2, [-0.3, -0.2, -0.1, 0, 0.1, 0.2]),
    ],
)
def test_nice_ticks_are_round_numbers_that_cover_the_range(low, high, ticks):
    assert pictures.nice_ticks(low, high) == pytest.approx(ticks, abs=1e-12)


def test_nice_ticks_of_a_single_value_still_span_it():
    ticks = pictures.nice_ticks(0.5, 0.5)
    assert ticks[0] < 0.5 < ticks[-1]
    assert len(ticks) <= pictures.MAX_TICKS


def test_nice_ticks_never_exceed_their_count():
    for high in (1, 7, 13, 99, 101, 777, 1234, 99999):
        assert len(pictures.nice_ticks(0, high)) <= pictures.MAX_TICKS


# -----------------------------------------------------------------------------
# train_picture


def pretraining_records(accuracy_key="contrastive_accuracy", final=True):
    records = []
    for it in range(10, 310, 10):
        losses = dict(loss_mae_a=1.0 - it / 1000, loss_mae_v=0.8 - it / 1000, loss_c=0.35 - it / 2000)
        records.append(dict(split="train", iter=it, epoch=it / 62, lr=1e-4, loss=2.0, **losses))
        records[-1][accuracy_key] = it / 600
        if it % 100 == 0:
            records.append(dict(split="epoch", epoch=it // 62, iter=it, samples_per_s=100.0))
            records.append(dict(split="val", iter=it, a2v_R1=it / 5000, v2a_R1=it / 4000, **losses))
    if final:
        final = dict(loss_c=0.3, a2v_R1=0.05, v2a_R1=0.08, loss_mae_a=0.7)
        records.append(dict(split="final", iter=300, **final))
    return records


def finetuning_records():
    records = [dict(split="train", iter=it, lr=1e-3, loss=3.0 / it) for it in range(5, 125, 5)]
    for it in (40, 80, 120):
        records.append(dict(split="val", iter=it, loss=1.0, mAP=it / 200, acc=it / 150))
    records.append(
        dict(split="final", iter=120, loss=1.0, mAP=0.6, acc=0.8, acc_frames=0.82, mAP_frames=0.63)
    )
    return records


def write_log(tmp_path, records, tail=""):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + tail)
    return str(path)


def panel_origin(k, columns=2):
    x0 = (k % columns) * pictures.CHART_WIDTH
    y0 = pictures.CHART_HEADER + (k // columns) * pictures.CHART_HEIGHT
    return x0, y0


def plot_colours(picture, k):
    """The colours inside the plot area of panel k."""
    x0, y0 = panel_origin(k)
    box = (
        x0 + pictures.CHART_LEFT + 2,
        y0 + pictures.CHART_TOP + 2,
        x0 + pictures.CHART_WIDTH - pictures.CHART_RIGHT - 2,
        y0 + pictures.CHART_HEIGHT - pictures.CHART_BOTTOM - 2,
    )
    return {colour for _, colour in picture.crop(box).getcolors(maxcolors=1 << 16)}


def expected_size(panels, columns=2):
    rows = -(-panels // columns)
    return columns * pictures.CHART_WIDTH, pictures.CHART_HEADER + rows * pictures.CHART_HEIGHT


def test_pretraining_picture_has_four_panels_each_with_its_curves(tmp_path):
    picture = pictures.train_picture(write_log(tmp_path, pretraining_records()))
    assert picture.size == expected_size(4)
    for k in range(4):
        assert pictures.SERIES_COLOURS[0] in plot_colours(picture, k), f"panel {k} is empty"
    second = pictures.SERIES_COLOURS[1]
    assert second in plot_colours(picture, 0)  # the visual reconstruction loss beside the audio one
    assert second in plot_colours(picture, 3)  # visual->audio R@1 beside audio->visual


def test_finetuning_picture_has_loss_accuracy_and_map_panels(tmp_path):
    picture = pictures.train_picture(write_log(tmp_path, finetuning_records()))
    assert picture.size == expected_size(3)
    for k in range(3):
        assert pictures.SERIES_COLOURS[0] in plot_colours(picture, k), f"panel {k} is empty"
    titles = [panel.title for panel in pictures.panels_of(finetuning_records())]
    assert titles == [title for title, _, _ in pictures.FINETUNE_PANELS]


def test_final_evaluation_is_drawn_and_named_in_the_legend(tmp_path):
    panels = pictures.panels_of(finetuning_records())
    accuracy = {series.label: series.final for series in panels[1].series}
    assert accuracy == {"middle frame": (120, 0.8), "all frames": (120, 0.82)}


def test_picture_without_a_final_record_still_draws_the_run(tmp_path):
    picture = pictures.train_picture(write_log(tmp_path, pretraining_records(final=False)))
    assert picture.size == expected_size(4)


@pytest.mark.parametrize("key", ["contrastive_accuracy", "c_acc"])  # c_acc: the name in older logs
def test_contrastive_accuracy_is_read_under_its_new_and_old_names(key):
    panels = pictures.panels_of(pretraining_records(accuracy_key=key))
    titles = [panel.title for panel in panels]
    assert "contrastive accuracy (in batch)" in titles


def test_quantities_missing_from_the_log_leave_their_panel_out(tmp_path):
    records = [r for r in finetuning_records() if r["split"] == "train"]  # no evaluation at all
    picture = pictures.train_picture(write_log(tmp_path, records))
    assert [panel.title for panel in pictures.panels_of(records)] == ["loss"]
    assert picture.size == expected_size(1, columns=1)


def test_picture_of_an_empty_log_is_none(tmp_path):
    assert pictures.train_picture(write_log(tmp_path, [])) is None
    epochs_only = [dict(split="epoch", epoch=1, iter=62, samples_per_s=100.0)]
    assert pictures.train_picture(write_log(tmp_path, epochs_only)) is None


def test_a_cut_short_last_line_is_skipped(tmp_path):
    log = write_log(tmp_path, finetuning_records(), tail='{"split": "train", "iter": 12')
    assert pictures.train_picture(log).size == expected_size(3)


def test_a_resumed_run_keeps_the_last_record_of_each_iteration():
    records = [dict(split="train", iter=it, loss=1.0) for it in (1, 2, 3)]
    records += [dict(split="train", iter=it, loss=0.5) for it in (2, 3, 4)]  # resumed from 1
    assert pictures.points(records, "train", ["loss"]) == [(1, 1.0), (2, 0.5), (3, 0.5), (4, 0.5)]


def test_an_unknown_flag_names_the_setting_it_was_probably_meant_to_be():
    defaults = {"batch_size": 48, "lr": 5e-5, "model_embed_dim": 768}
    with pytest.raises(configurator.ConfigError, match=r"'bach_size' \(similar: batch_size\)"):
        configurator.configure(["--bach_size=3"], defaults)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--mae_weight=0", "--contrastive_weight=0"], "nothing to train"),
        (["--mask_ratio=1.0"], "mask_ratio=1.0: must be below 1"),
        (["--mask_ratio_a=1.0"], "mask_ratio_a=1.0: must be below 1"),
    ],
)
def test_a_pretraining_objective_that_cannot_train_is_refused_before_the_run(flags, message):
    cfg = configurator.configure(flags, train.DEFAULTS, train.CHOICES)
    with pytest.raises(configurator.ConfigError, match=message):
        train.check_settings(cfg)


@pytest.mark.parametrize("program", ["eval.py", "bench.py"])
def test_a_device_that_does_not_exist_is_one_line_naming_it(program):
    args = ["retrieval", "--checkpoint", "x.pt", "--data", "y.json"] if program == "eval.py" else []
    result = subprocess.run(
        [sys.executable, program, *args, "--device", "gpu"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "device='gpu' is not a device" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_synthetic_datafile_names_the_command_that_writes_its_folder(tmp_path):
    folder = tmp_path / "synthetic_gpu"
    cfg = {
        key: str(folder / name) for key, name in zip(train.DATA_FILES, ["train.json", "test.json", "x.csv"])
    }
    with pytest.raises(ValueError, match=f"python prepare.py synthetic --out {folder}"):
        train.check_data_files(cfg)
