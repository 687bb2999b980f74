"""train.py's settings, as nanoGPT's configurator: the defaults (train.py's lowercase globals), then
config files (plain Python assignments, in the order given), then --key=value flags. A key must be
a setting, and a value must have the type of its default.
"""

import ast
import difflib
import sys
import traceback


class ConfigError(ValueError):
    """An unknown setting, a value of the wrong type, or a config file that does not run."""


def run_config_file(path):
    """The public values a config file assigns; a ConfigError naming the file and line if it fails."""
    try:
        with open(path) as f:
            code = compile(f.read(), path, "exec")
        namespace = {}
        exec(code, namespace)
    except OSError as error:
        raise ConfigError(f"config file {path}: {error.strerror}") from None
    except Exception as error:  # a syntax error, or an error while it runs
        frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == path]
        line = getattr(error, "lineno", None) or (frames[-1].lineno if frames else "?")
        raise ConfigError(f"config file {path}, line {line}: {type(error).__name__}: {error}") from None
    settings = (bool, int, float, str, tuple, list)  # not the modules or functions it imports
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, settings)}


def parse_flag(key, text, default):
    """The text of --key=text as a value of the default's type."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"--{key}={text}: not a bool (True, False, 1 or 0)")
        return text.lower() in ("true", "1")
    if isinstance(default, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--{key}={text}: not a {type(default).__name__}") from None


def check_type(key, value, default):
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if type(value) is not type(default):
        raise ConfigError(f"{key}={value!r}: expected {type(default).__name__}, like its default {default!r}")
    return value


def configure(argv, defaults, optional=None):
    """Defaults <- config files <- --key=value flags -> the settings dict. `optional` settings (with
    their defaults, for the type check) appear in it only where they are set. -h / --help prints
    every setting with its default and exits."""
    known = {**defaults, **(optional or {})}
    if ("-h" in argv) or ("--help" in argv):
        print("usage: python train.py [CONFIG_FILE ...] [--key=value ...]; the settings and their defaults:")
        print("\n".join(f"  --{key}={value}" for key, value in known.items()))
        sys.exit(0)
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            items = run_config_file(arg).items()
        elif "=" in arg:
            key, text = arg[2:].split("=", 1)
            items = [(key, parse_flag(key, text, known[key]) if key in known else None)]
        else:
            raise ConfigError(f"{arg}: flags take the form --key=value (--help lists the settings)")
        for key, value in items:
            if key not in known:
                similar = difflib.get_close_matches(key, known, n=3)
                hint = f" (similar: {', '.join(similar)})" if similar else ""
                raise ConfigError(f"{arg}: unknown setting {key!r}{hint}")
            where = "" if arg.startswith("--") else f"config file {arg}: "
            cfg[key] = check_type(where + key, value, known[key])
    return cfg
