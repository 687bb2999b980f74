"""A newcomer's first hour: every program answers --help and -h with its usage, train.py lists its
settings with their defaults, and a bad setting or a broken config file is refused in one line that
names it."""

import ast
import contextlib
import dataclasses
import io
import os
import subprocess
import sys

import pytest

import configurator
import eval as ev
import prepare
import train
from model import CAVMAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds for a program that only prints its usage or an error


def run_program(*args):
    command = [sys.executable, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)


# -----------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help_exits_cleanly_with_the_usage(flag):
    run = run_program("train.py", flag)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: python train.py [CONFIG_FILE ...] [--key=value ...]")


@pytest.fixture(scope="module")
def train_help_lines():
    """The lines train.py's --help prints."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        train.main(["--help"])
    return printed.getvalue().splitlines()


def test_train_help_lists_every_setting_with_its_default(train_help_lines):
    for key, default in train.SETTINGS.items():
        assert f"  --{key}={default}" in train_help_lines
    assert "  --batch_size=48" in train_help_lines


def test_train_help_lists_every_model_field_with_its_default(train_help_lines):
    for field in dataclasses.fields(CAVMAEConfig):
        assert f"  --model_{field.name}={field.default}" in train_help_lines
    assert "  --model_embed_dim=768" in train_help_lines


def test_train_help_after_a_config_file_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        train.main([os.path.join(ROOT, "config", "pretrain_synthetic.py"), "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize(
    "command",
    [
        "eval",
        "eval classify",
        "eval retrieval",
        "eval inpaint",
        "eval embed",
        "eval localize",
        "prepare",
        "prepare videos",
        "prepare synthetic",
    ],
)
def test_eval_and_prepare_and_their_commands_print_their_usage(command, flag, capsys):
    program, *argv = command.split()
    main = ev.main if program == "eval" else prepare.main
    with pytest.raises(SystemExit) as stop:
        main([*argv, flag])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bench_prints_its_usage(flag):
    run = run_program("bench.py", flag)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage:")


# -----------------------------------------------------------------------------
# configurator: defaults <- config files <- flags

DEFAULTS = dict(batch_size=48, lr=5e-5, compile=False, out_dir="out", betas=(0.95, 0.999))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_config_file_then_flags_override_the_defaults(tmp_path):
    config = write(tmp_path, "run.py", "batch_size = 8\nlr = 1e-3\nbetas = [0.9, 0.95]\n")
    cfg = configurator.configure([config, "--lr=0.1", "--out_dir=elsewhere"], DEFAULTS)
    assert cfg == dict(batch_size=8, lr=0.1, compile=False, out_dir="elsewhere", betas=(0.9, 0.95))


def test_config_files_apply_in_the_order_given(tmp_path):
    first = write(tmp_path, "first.py", "batch_size = 8\nlr = 1e-3\n")
    second = write(tmp_path, "second.py", "batch_size = 16\n")
    cfg = configurator.configure([first, second], DEFAULTS)
    assert (cfg["batch_size"], cfg["lr"]) == (16, 1e-3)


def test_an_unknown_flag_names_the_setting_it_was_probably_meant_to_be():
    with pytest.raises(configurator.ConfigError, match=r"'bach_size' \(similar: batch_size\)"):
        configurator.configure(["--bach_size=3"], DEFAULTS)


def test_an_unknown_setting_in_a_config_file_names_the_file(tmp_path):
    config = write(tmp_path, "run.py", "bach_size = 3\n")
    with pytest.raises(configurator.ConfigError, match=f"{config}: unknown setting 'bach_size'"):
        configurator.configure([config], DEFAULTS)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--lr=fast", "--lr=fast: not a float"),
        ("--batch_size=8.5", "batch_size=8.5: expected int"),
        ("--betas=0.9", "betas=0.9: expected tuple"),
    ],
)
def test_a_flag_of_the_wrong_type_is_refused(flag, message):
    with pytest.raises(configurator.ConfigError, match=message):
        configurator.configure([flag], DEFAULTS)


def test_a_config_file_value_of_the_wrong_type_is_refused(tmp_path):
    config = write(tmp_path, "run.py", "lr = 'fast'\n")
    with pytest.raises(configurator.ConfigError, match="config file .*: lr=.fast.: expected float"):
        configurator.configure([config], DEFAULTS)


def test_an_int_is_accepted_where_the_default_is_a_float():
    cfg = configurator.configure(["--lr=1"], DEFAULTS)
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)


@pytest.mark.parametrize(
    "text, value",
    [("True", True), ("true", True), ("1", True), ("False", False), ("false", False), ("0", False)],
)
def test_bool_flags_read_true_false_1_and_0(text, value):
    assert configurator.configure([f"--compile={text}"], DEFAULTS)["compile"] is value


def test_a_bool_flag_of_another_word_is_refused():
    with pytest.raises(configurator.ConfigError, match=r"--compile=yes: not a bool"):
        configurator.configure(["--compile=yes"], DEFAULTS)


def test_a_flag_without_a_value_says_the_form_flags_take():
    with pytest.raises(configurator.ConfigError, match="flags take the form --key=value"):
        configurator.configure(["--batch_size"], DEFAULTS)


def test_config_file_with_a_syntax_error_names_the_file_and_line(tmp_path):
    config = write(tmp_path, "bad.py", "batch_size = 8\nlr = = 1e-3\n")
    message = f"config file {config}, line 2: SyntaxError"
    with pytest.raises(configurator.ConfigError, match=message):
        train.configure([config])


def test_config_file_that_raises_names_the_file_line_and_error(tmp_path):
    config = write(tmp_path, "bad.py", "batch_size = 8\nlr = base_lr * 2\n")
    message = f"config file {config}, line 2: NameError: name 'base_lr' is not defined"
    with pytest.raises(configurator.ConfigError, match=message):
        train.configure([config])


def test_a_missing_config_file_is_named():
    with pytest.raises(configurator.ConfigError, match="config file nowhere.py: No such file"):
        configurator.configure(["nowhere.py"], DEFAULTS)


def test_train_py_reports_a_broken_config_file_in_one_line_without_a_traceback(tmp_path):
    config = write(tmp_path, "bad.py", "batch_size = 8\nlr = = 1e-3\n")
    run = run_program("train.py", config)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"config file {config}, line 2: SyntaxError" in lines[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("batch_size = 8\nlr = base_lr * 2\n", "line 2: NameError"),
        ("bach_size = 3\n", "unknown setting 'bach_size'"),
    ],
    ids=["raises", "unknown"],
)
def test_train_main_reports_a_bad_config_file_in_one_line(tmp_path, capsys, text, message):
    config = write(tmp_path, "bad.py", text)
    assert train.main([config]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert config in lines[0] and message in lines[0]


def test_train_main_reports_a_bad_flag_in_one_line(capsys):
    assert train.main(["--lr=fast"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--lr=fast: not a float" in lines[0]


# -----------------------------------------------------------------------------
# train.py's settings


def assigned_settings():
    """The lowercase names train.py assigns at the top level before SETTINGS."""
    with open(train.__file__) as f:
        tree = ast.parse(f.read())
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "SETTINGS" for t in targets):
            return names
        names += [t.id for t in targets if isinstance(t, ast.Name) and t.id[0].islower()]
    raise AssertionError("train.py assigns no SETTINGS")


def test_train_settings_are_the_lowercase_defaults_train_py_assigns():
    assert list(train.SETTINGS) == assigned_settings()
    assert all(type(v) in (bool, int, float, str, tuple) for v in train.SETTINGS.values())
    assert train.SETTINGS["contrastive_weight"] == 0.01
    assert train.SETTINGS["dataset_mean"] == train.data.AUDIOSET_MEAN  # a default from a constant
