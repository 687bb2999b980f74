"""Settings for train.py, nanoGPT style: the defaults, then config files (plain Python assignments),
then --key=value flags. Every key must exist among the defaults, and every value must have the
default's type.

    cfg = configure(["config/pretrain_synthetic.py", "--batch_size=32"], defaults, choices)

`usage` writes the --help text: each setting with its default and the comment beside it in the
source.
"""

import ast
import dataclasses
import difflib
import inspect
import io
import os
import textwrap
import tokenize
import traceback

import torch

HELP_FLAGS = ("-h", "--help")
SETTING_TYPES = (bool, int, float, str, tuple)  # the types a default may have
DEFAULT_COLUMN = 34  # the width of "--key=default" in the --help listing, before the comment
HELP_WIDTH = 110  # the --help lines are wrapped to this width


class ConfigError(ValueError):
    """An unknown config key, a value of the wrong type, or a config file that does not run."""


def has_expected_type(value, default):
    if type(value) is not type(default):
        return False
    if isinstance(default, tuple):
        return len(value) == len(default)
    return True


def check_value(key, value, default, choices=None):
    """`value` as the type of `default`, or a ConfigError naming the key."""
    kind = type(default)
    is_int = isinstance(value, int) and (not isinstance(value, bool))
    if (kind is float) and is_int:
        value = float(value)
    if (kind is tuple) and isinstance(value, list):
        value = tuple(value)
    if not has_expected_type(value, default):
        raise ConfigError(f"{key}={value!r}: expected {kind.__name__} like the default {default!r}")
    if choices and (value not in choices):
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(choices)}")
    return value


def parse_flag(key, text, default):
    """The text of --key=text as a value of the default's type."""
    if isinstance(default, bool):
        table = {"true": True, "1": True, "false": False, "0": False}
        if text.lower() not in table:
            raise ConfigError(f"--{key}={text}: expected a bool (True/False/true/false/1/0)")
        return table[text.lower()]
    if isinstance(default, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--{key}={text}: not a {type(default).__name__} literal") from None


# -----------------------------------------------------------------------------
# Config files


def failing_line(error, path):
    """The line of `path` where running it raised `error` (the innermost frame in that file)."""
    frames = traceback.extract_tb(error.__traceback__)
    lines = [frame.lineno for frame in frames if frame.filename == path]
    return lines[-1] if lines else "?"


def run_config_file(path):
    """The namespace the config file leaves; a ConfigError naming the file and line if it fails."""
    with open(path) as f:
        source = f.read()
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        text = (e.text or "").strip()
        shown = f": {text}" if text else ""
        raise ConfigError(f"config file {path}, line {e.lineno}: {e.msg}{shown}") from None
    namespace = {}
    try:
        exec(code, namespace)
    except Exception as e:
        line = failing_line(e, path)
        raise ConfigError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    return namespace


def is_setting(name, value):
    """Config files may import modules and define helpers: only plain public values are settings."""
    if name.startswith("_"):
        return False
    if callable(value):
        return False
    return type(value).__name__ != "module"


def config_file_items(path):
    """The top-level assignments of a Python config file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    namespace = run_config_file(path)
    return [(name, value) for name, value in namespace.items() if is_setting(name, value)]


# -----------------------------------------------------------------------------
# Defaults <- config files <- flags


def is_default(name, value):
    """A program's defaults are its lowercase public globals of a plain type: not the constants it
    imports (FT_MODES), nor its modules, classes and functions."""
    if name.startswith("_"):
        return False
    if not name.islower():
        return False
    return type(value) in SETTING_TYPES


def defaults_in(namespace):
    """The defaults among a program's globals: `DEFAULTS = configurator.defaults_in(globals())`."""
    return {name: value for name, value in namespace.items() if is_default(name, value)}


def similar_keys(key, known):
    """Up to three known keys spelled like `key` (a typo's likely meaning), for the unknown-key error."""
    return difflib.get_close_matches(key, list(known), n=3, cutoff=0.7)


def flag_item(arg, known):
    """--key=text -> (key, value); an unknown key gets the value None (the caller reports it)."""
    if "=" not in arg:
        raise ConfigError(f"{arg}: flags take the form --key=value (--help lists the settings)")
    key, text = arg[2:].split("=", 1)
    if key not in known:
        return key, None
    return key, parse_flag(key, text, known[key])


def configure(argv, defaults, choices=None, optional=None):
    """Defaults <- config files (positional args) <- --key=value flags; returns the resolved config
    dict. `optional` keys (with their defaults, for the type check) are accepted but appear only
    where set."""
    cfg = dict(defaults)
    choices = choices or {}
    known = {**(optional or {}), **defaults}
    for arg in argv:
        if arg.startswith("--"):
            items = [flag_item(arg, known)]
            where = ""
        else:
            items = config_file_items(arg)
            where = f" in {arg}"
        for key, value in items:
            if key not in known:
                close = similar_keys(key, known)
                hint = f" (similar: {', '.join(close)})" if close else ""
                raise ConfigError(f"unknown config key {key!r}{where}{hint}")
            try:
                cfg[key] = check_value(key, value, known[key], choices.get(key))
            except ConfigError as e:
                raise ConfigError(f"{arg}: {e}" if where else str(e)) from None
    return cfg


# -----------------------------------------------------------------------------
# --help: the settings with their defaults and the comments beside them in the source


def wants_help(argv):
    return any(arg in HELP_FLAGS for arg in argv)


def assigned_names(node):
    """The names an assignment binds: `a = 1` -> [a]; `a, b = 1, 2` -> [a, b]; `a: int = 1` -> [a]."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names = []
    for target in targets:
        elements = target.elts if isinstance(target, ast.Tuple) else [target]
        names += [element.id for element in elements if isinstance(element, ast.Name)]
    return names


def line_comments(source):
    """{line number: comment text} of the source, and the set of lines that hold a comment alone."""
    comments = {}
    alone = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
            if not token.line[: token.start[1]].strip():
                alone.add(token.start[0])
    return comments, alone


def setting_comments(path, class_name=None):
    """[(section, name, comment)] for each assignment at the top level of the Python file `path` (or
    in the body of its class `class_name`, e.g. a dataclass's fields), in source order. The comment
    is the one at the end of the statement; the section is a comment alone on the line just above,
    carried on to the next section."""
    with open(path) as f:
        source = f.read()
    body = ast.parse(source).body
    if class_name is not None:
        classes = [node for node in body if isinstance(node, ast.ClassDef)]
        classes = [node for node in classes if node.name == class_name]
        body = classes[0].body if classes else []
    comments, alone = line_comments(source)
    section = ""
    found = []
    for node in body:
        if not isinstance(node, ast.Assign | ast.AnnAssign):
            continue
        if (node.lineno - 1) in alone:
            section = comments[node.lineno - 1]
        trailing = comments.get(node.end_lineno, "")
        if node.end_lineno in alone:  # a comment line inside a multi-line statement
            trailing = ""
        for name in assigned_names(node):
            found.append((section, name, trailing))
    return found


def shown_value(value):
    """A default as one would type it after --key=: strings without quotes, tuples without spaces,
    floats in their shortest exact form (989e12 -> 9.89e+14)."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        return "(" + ",".join(shown_value(v) for v in value) + ")"
    if isinstance(value, float):
        short = f"{value:.6g}"
        if not any(mark in short for mark in ".en"):  # 4.0 -> "4" -> "4.0": still reads as a float
            short += ".0"
        if float(short) == value:
            return min(short, repr(value), key=len)
    return repr(value)


def setting_line(key, value, comment):
    """`  --key=default  comment`, the comment in a column of its own, wrapped to HELP_WIDTH."""
    flag = f"  --{key}={shown_value(value)}"
    if not comment:
        return flag
    return textwrap.fill(
        comment,
        width=HELP_WIDTH,
        initial_indent=f"{flag.ljust(DEFAULT_COLUMN)}  ",
        subsequent_indent=" " * (DEFAULT_COLUMN + 2),
    )


def first_paragraph(path):
    """The first paragraph of the module docstring of the Python file `path` ('' without one)."""
    with open(path) as f:
        docstring = ast.get_docstring(ast.parse(f.read())) or ""
    return docstring.strip().split("\n\n")[0]


def settings_lines(comments, defaults, choices):
    """The listing of `defaults` in source order, grouped by the section comments of the source."""
    lines = []
    section = None
    listed = set()
    for key_section, key, comment in comments:
        if (key not in defaults) or (key in listed):
            continue
        if key_section != section:
            section = key_section
            lines += ["", f"{section}:" if section else "settings:"]
        if (not comment) and (key in choices):
            comment = " | ".join(choices[key])
        lines.append(setting_line(key, defaults[key], comment))
        listed.add(key)
    unlisted = [key for key in defaults if key not in listed]  # defaults not assigned in the source
    if unlisted:
        lines += ["", "other settings:"]
        lines += [setting_line(key, defaults[key], "") for key in unlisted]
    return lines


def model_field_lines(model_class):
    """A config dataclass's fields as --model_<field>=default, with the comments in its source."""
    comments = setting_comments(inspect.getsourcefile(model_class), model_class.__name__)
    comment_of = {name: comment for _, name, comment in comments}
    lines = [
        "",
        f"model fields ({model_class.__name__}; the defaults are the base model's): set one with",
        "--model_<field>=value; it applies on top of model_preset, and only where given:",
    ]
    for field in dataclasses.fields(model_class):
        comment = comment_of.get(field.name, "")
        lines.append(setting_line("model_" + field.name, field.default, comment))
    return lines


def usage(program_path, defaults, choices=None, model_class=None):
    """The --help text of the program in `program_path`, whose top-level assignments hold
    `defaults`: its docstring's first paragraph, how settings are given, then every setting with its
    default and comment."""
    program = os.path.basename(program_path)
    lines = [
        f"usage: python {program} [CONFIG_FILE ...] [--key=value ...]",
        "",
        first_paragraph(program_path),
        "",
        "Settings are resolved in order: the defaults below, then each config file (plain Python",
        "assignments such as `batch_size = 32`, e.g. config/pretrain_synthetic.py), then --key=value",
        "flags. A value must have the default's type: --lr=1e-4, --betas=(0.9,0.95), --compile=True.",
    ]
    lines += settings_lines(setting_comments(program_path), defaults, choices or {})
    if model_class is not None:
        lines += model_field_lines(model_class)
    return "\n".join(lines)


def resolve_device(name):
    """--device: 'auto' (CUDA when torch sees a GPU, else the CPU), 'cpu', 'cuda', 'cuda:N' or
    another torch device type."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name} but torch sees no CUDA GPU: use --device=cpu (or auto)")
    if (device.index is not None) and (device.index >= torch.cuda.device_count()):
        count = torch.cuda.device_count()
        raise ConfigError(f"device={name} but torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device
