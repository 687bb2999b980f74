"""Settings for train.py, nanoGPT style: the defaults, then config files (plain Python assignments), then
--key=value flags. Every key must exist among the defaults, and every value must have the default's type.

    cfg = configure(["config/pretrain_synthetic.py", "--batch_size=32"], defaults, choices)
"""

import ast
import os


class ConfigError(ValueError):
    """An unknown config key or a value of the wrong type."""


def check_value(key, value, default, choices=None):
    """`value` as the type of `default`, or a ConfigError naming the key."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if type(value) is not kind or (kind is tuple and len(value) != len(default)):
        raise ConfigError(f"{key}={value!r}: expected {kind.__name__} like the default {default!r}")
    if choices and value not in choices:
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


def config_file_items(path):
    """The top-level assignments of a Python config file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    namespace = {}
    exec(open(path).read(), namespace)
    return [
        (k, v)
        for k, v in namespace.items()
        if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"
    ]


def configure(argv, defaults, choices=None, optional=None):
    """Defaults <- config files (positional args) <- --key=value flags; returns the resolved config dict.
    `optional` keys (with their defaults, for the type check) are accepted but appear only where set."""
    cfg, choices, known = dict(defaults), choices or {}, {**(optional or {}), **defaults}
    for arg in argv:
        if not arg.startswith("--"):
            items, where = config_file_items(arg), f" in {arg}"
        elif "=" not in arg:
            raise ConfigError(f"{arg}: flags take the form --key=value")
        else:
            key, text = arg[2:].split("=", 1)
            items, where = [(key, parse_flag(key, text, known[key]) if key in known else None)], ""
        for key, value in items:
            if key not in known:
                close = [k for k in known if k.split("_")[0] == key.split("_")[0]][:6]
                hint = f" (similar: {', '.join(close)})" if close else ""
                raise ConfigError(f"unknown config key {key!r}{where}{hint}")
            cfg[key] = check_value(key, value, known[key], choices.get(key))
    return cfg
