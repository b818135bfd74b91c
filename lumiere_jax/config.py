"""Experiment configs: load `configs/*.py`, apply command-line overrides, validate, record.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict` and says in its
docstring how to run it and what to expect (big_vision style). On the command line:

    lumiere train --config configs/base.py:tiny --config.train.steps=300

`load_config("configs/base.py:tiny", ["train.steps=300"])` does the same in code: the text
after the first ':' is passed to `get_config`, each override is parsed to the type of the field
it replaces, and the result is locked so a misspelt key fails instead of adding a field.

Why not `ml_collections.config_flags.DEFINE_config_file` alone (checked on ml_collections 1.1):
an unknown key (`--config.trian.steps=3`) ends in an uncaught KeyError/AttributeError traceback
without the list of valid keys; a bad value gives only "invalid literal for int() with base 10";
fields whose default is None cannot be overridden at all; a missing file surfaces only when the
config is first used. Here the CLI defines a plain `--config` string flag (`define_config_flags`),
`absl_flags_parser` moves `--config.a.b=v` into a `--config_override` list before absl parses,
and `config_from_flags` loads it with the errors below.

None-able fields: a field whose default is None takes any literal (or text) on override; declare a
typed optional field with `ml_collections.config_dict.placeholder(int)` (override `=none` to
clear it), and a value the user must give with `config_dict.required_placeholder(str)`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.abc
import importlib.util
import inspect
import json
import numbers
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from absl import app, flags
from etils import epath
from ml_collections import config_dict
from ml_collections.config_dict import ConfigDict, FieldReference

from lumiere_jax.data.remote import write_atomic

RESOLVED_CONFIG_NAME = "config.json"
_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1", "yes")
_FALSE_WORDS = ("false", "0", "no")


class ConfigError(ValueError):
    """A config could not be loaded, overridden or validated; the message says what to fix."""


# ----------------------------------------------------------------------------------------------
# Loading.


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `path.py` or `path.py:arg`, applies `a.b.c=value` overrides, returns it locked."""
    # A URL's scheme ("gs://") is part of the path, not the separator before the argument.
    scheme = spec[: spec.index("://") + 3] if "://" in spec else ""
    path, colon, arg = spec[len(scheme):].partition(":")
    path = scheme + path
    config = _call_get_config(path, arg if colon else None)
    for override in overrides:
        try:
            apply_override(config, override)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    missing = missing_required_keys(config)
    if missing:
        flags_hint = " ".join(f"--config.{key}=..." for key in missing)
        raise ConfigError(
            f"{path}: required config value(s) not set: {', '.join(missing)}. "
            f"Pass {flags_hint} (or set them in the file)."
        )
    return config.lock()


class _SourceTextLoader(importlib.abc.Loader):
    """Runs a config file's source text read through epath (a gs:// config)."""

    def __init__(self, path: str, source: str):
        self.path, self.source = path, source

    def exec_module(self, module) -> None:
        module.__file__ = self.path
        exec(compile(self.source, self.path, "exec"), module.__dict__)


def _call_get_config(path: str, arg: str | None) -> ConfigDict:
    """Imports the file at `path` and returns `get_config()` / `get_config(arg)` as a ConfigDict."""
    file = epath.Path(path)
    if not path or not file.is_file():
        raise ConfigError(f"config file not found: {path!r} (give a path like configs/name.py)")
    module_name = "lumiere_config_" + re.sub(r"\W", "_", file.stem)
    if "://" in path:  # gs://: Python's file loader reads local files only
        module_spec = importlib.util.spec_from_loader(
            module_name, _SourceTextLoader(path, file.read_text()), origin=path)
    else:
        module_spec = importlib.util.spec_from_file_location(module_name, str(file))
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{path}: not a Python file that can be imported (use a .py file)")
    module = importlib.util.module_from_spec(module_spec)
    # Registered only while it runs: dataclasses and pickling look the module up by name.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(
            f"{path}: importing the config file failed: {type(e).__name__}: {e}"
        ) from e
    finally:
        sys.modules.pop(module_name, None)

    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{path}: defines no get_config() function")
    args = () if arg is None else (arg,)
    try:
        inspect.signature(get_config).bind(*args)
    except TypeError:
        if arg is None:
            raise ConfigError(
                f"{path}: get_config needs an argument; use {path}:<arg> (see the file's docstring)"
            ) from None
        raise ConfigError(
            f"{path}: get_config takes no argument, but ':{arg}' was given; use {path} alone"
        ) from None
    try:
        config = get_config(*args)
    except Exception as e:
        call = f"get_config({arg!r})" if args else "get_config()"
        raise ConfigError(f"{path}: {call} raised {type(e).__name__}: {e}") from e

    if isinstance(config, config_dict.FrozenConfigDict):
        config = config.as_configdict()
    elif isinstance(config, Mapping):
        config = ConfigDict(dict(config))
    if not isinstance(config, ConfigDict):
        raise ConfigError(
            f"{path}: get_config returned {type(config).__name__}, expected an "
            "ml_collections.ConfigDict (did you forget `return config`?)"
        )
    return config


# ----------------------------------------------------------------------------------------------
# Keys and overrides.


def get_value(config: ConfigDict, key: str) -> Any:
    """`config` at dotted `key`; an unknown key raises ConfigError with did-you-mean."""
    parent, leaf = _parent_of(config, key)
    return parent[leaf]


def _parent_of(config: ConfigDict, key: str) -> tuple[ConfigDict, str]:
    """The group holding dotted `key` and the key's last part; checks that every part exists."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"bad config key {key!r}: expected names joined by dots, e.g. a.b.c")
    node = config
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not isinstance(node, ConfigDict):
            raise ConfigError(
                f"unknown config key {key!r}: {prefix!r} holds a value ({type(node).__name__}), "
                "not a group of settings"
            )
        if part not in node:
            raise ConfigError(_unknown_key_message(node, key, part, prefix))
        if depth < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _unknown_key_message(node: ConfigDict, key: str, part: str, prefix: str) -> str:
    keys = sorted(str(k) for k in node.keys())
    where = f"in {prefix!r}" if prefix else "at the top level"
    message = f"unknown config key {key!r}: no {part!r} {where}."
    close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
    if close:
        message += f" Did you mean {' or '.join(repr(c) for c in close)}?"
    return message + f" Valid keys {where}: {', '.join(keys) or '(none)'}."


def apply_override(config: ConfigDict, override: str) -> None:
    """Sets `config` from one `a.b.c=value` string, parsing value to the field's type."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"bad override {override!r}: expected key=value, e.g. train.steps=100")
    try:
        parent, leaf = _parent_of(config, key)
        field = dict(parent.items(preserve_field_references=True))[leaf]
        value = parse_override_value(text, field, key)
        parent[leaf] = value
    except ConfigError as e:
        raise ConfigError(f"override {override!r}: {e}") from None
    except TypeError as e:  # ml_collections' own type check, should parsing let one through.
        raise ConfigError(f"override {override!r}: {e}") from None


def parse_override_value(text: str, field: Any, key: str) -> Any:
    """Parses command-line `text` to the type of `field` (a value or a FieldReference)."""
    if isinstance(field, FieldReference):
        field_type, nullable = field.get_type(), True
        current = None if field.empty() else _resolve(field, key)
    else:
        field_type, nullable, current = type(field), field is None, field
    if nullable and text.strip().lower() in _NONE_WORDS:
        return None
    if field_type is type(None):  # Default None and no declared type: take any literal.
        try:
            return ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            return text

    def bad(expected: str, hint: str = "") -> ConfigError:
        return ConfigError(f"{key} expects {expected}, got {text!r}{hint}")

    if isinstance(field_type, type) and issubclass(field_type, ConfigDict):
        leaves = ", ".join(f"{key}.{k}" for k in sorted(current.keys())) if current else ""
        raise bad("a group of settings", f"; override its keys instead: {leaves}")
    if field_type is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise bad("a bool", " (true/false/1/0/yes/no)")
    if field_type is int:
        try:
            return int(text)
        except ValueError:
            raise bad("an int") from None
    if field_type is float:
        try:
            return float(text)
        except ValueError:
            raise bad("a float") from None
    if field_type is str:
        return text
    if field_type in (tuple, list):
        return _parse_sequence(text, field_type, current, bad)
    type_name = getattr(field_type, "__name__", str(field_type))
    raise bad(
        f"a {type_name}", "; this type cannot be set from the command line: set it in the "
        "config file, or make the field a str, number, bool or tuple"
    )


def _parse_sequence(text: str, field_type: type, current: Any, bad: Callable) -> Any:
    """`(16, 32)`, `16,32` or a bare `16` (one element), checked against the current elements."""
    hint = " (a Python literal such as (16, 32) or ('a', 'b'); quote strings)"
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise bad(f"a {field_type.__name__}", hint) from None
    if not isinstance(value, (tuple, list)):
        value = (value,)
    element_types = {type(x) for x in current or ()}
    if len(element_types) == 1 and next(iter(element_types)) in (bool, int, float, str):
        (element_type,) = element_types
        converted = []
        for x in value:
            if element_type is float and isinstance(x, int) and not isinstance(x, bool):
                x = float(x)
            if type(x) is not element_type:
                raise bad(f"a {field_type.__name__} of {element_type.__name__}", hint)
            converted.append(x)
        value = converted
    return field_type(value)


def _resolve(field: Any, key: str) -> Any:
    """The value of a field that may be a reference; an unset required one raises ConfigError."""
    if not isinstance(field, FieldReference):
        return field
    try:
        return field.get()
    except config_dict.RequiredValueError:
        raise ConfigError(f"required config value {key!r} is not set") from None


def missing_required_keys(config: ConfigDict) -> list[str]:
    """Dotted keys of `required_placeholder` fields that still have no value."""
    missing = []

    def visit(node: ConfigDict, prefix: str) -> None:
        for key, field in node.items(preserve_field_references=True):
            path = f"{prefix}{key}"
            try:
                value = _resolve(field, path)
            except ConfigError:
                missing.append(path)
                continue
            if isinstance(value, ConfigDict):
                visit(value, path + ".")

    visit(config, "")
    return missing


def parse_config_arg(arg: str | None, **defaults: Any) -> ConfigDict:
    """Parses a config file's `arg` such as "res=64,tiny,channels=(16,32)" against `defaults`.

    For `get_config(arg)`: every key must be one of `defaults` and is parsed to its type; a bare
    name sets a bool default to True. Commas inside brackets do not split.
    """
    result = ConfigDict(defaults)
    for token in _split_top_level_commas(arg or ""):
        key, sep, text = token.partition("=")
        key = key.strip()
        if not sep:
            if key in result and isinstance(result[key], bool):
                text = "true"
            else:
                kind = "unknown" if key not in result else "not a bool"
                raise ConfigError(
                    f"config argument {arg!r}: bare {key!r} is {kind}; write key=value with one "
                    f"of: {', '.join(sorted(defaults))}"
                )
        try:
            apply_override(result, f"{key}={text}")
        except ConfigError as e:
            raise ConfigError(f"config argument {arg!r}: {e}") from None
    return result.lock()


def _split_top_level_commas(text: str) -> list[str]:
    tokens, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            tokens.append(text[start:i])
            start = i + 1
    tokens.append(text[start:])
    return [t.strip() for t in tokens if t.strip()]


# ----------------------------------------------------------------------------------------------
# Validation: small declarative rules. A check returns None when fine, else what is wrong.

Check = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(value: Any) -> str | None:
    return None if _is_int(value) and value > 0 else "must be a positive int"


def non_negative_int(value: Any) -> str | None:
    return None if _is_int(value) and value >= 0 else "must be an int >= 0"


def positive_number(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else "must be a number > 0"


def non_negative_number(value: Any) -> str | None:
    return None if _is_number(value) and value >= 0 else "must be a number >= 0"


def probability(value: Any) -> str | None:
    return None if _is_number(value) and 0 <= value <= 1 else "must be a probability in [0, 1]"


def non_empty(value: Any) -> str | None:
    return None if value is not None and len(value) > 0 else "must not be empty"


def in_range(low: float, high: float) -> Check:
    """A number in [low, high]."""

    def check(value: Any) -> str | None:
        return None if _is_number(value) and low <= value <= high else f"must be in [{low}, {high}]"

    return check


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check


def optional(check: Check) -> Check:
    """`check`, but None is allowed too."""
    return lambda value: None if value is None else check(value)


def each(check: Check) -> Check:
    """`check` applied to every element of a tuple/list."""

    def check_each(value: Any) -> str | None:
        if not isinstance(value, (tuple, list)):
            return "must be a tuple or list"
        for i, element in enumerate(value):
            problem = check(element)
            if problem:
                return f"element {i} ({element!r}) {problem}"
        return None

    return check_each


def require(config: ConfigDict, key: str, *checks: Check) -> Any:
    """Returns `config[key]` after checking it exists and passes `checks`; else ConfigError."""
    value = _resolve(get_value(config, key), key)
    for check in checks:
        problem = check(value)
        if problem:
            raise ConfigError(f"config {key} = {value!r}: {problem}")
    return value


def validate_config(
    config: ConfigDict, schema: Mapping[str, Check | Sequence[Check]] | None = None
) -> None:
    """Checks required placeholders are set and every `schema` rule holds; reports all problems.

    schema: dotted key -> check or checks, e.g. {"train.batch_size": positive_int,
    "train.cfg_dropout": probability, "model.channels": (non_empty, each(positive_int))}.
    """
    problems = [f"{key}: required value is not set" for key in missing_required_keys(config)]
    for key, checks in (schema or {}).items():
        checks = (checks,) if callable(checks) else tuple(checks)
        try:
            require(config, key, *checks)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------------------------
# Recording a run's config and comparing configs.


def flatten_config(config: ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """Dotted key -> JSON-ready value (tuples as lists); an empty group maps to {}."""
    flat: dict[str, Any] = {}

    def visit(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, (ConfigDict, Mapping)) and len(value):
                visit(value, path + ".")
            else:
                flat[path] = _to_json_value(value, path)

    visit(_to_json_value(config, ""), "")
    return flat


def _to_json_value(value: Any, key: str) -> Any:
    """ConfigDict/Mapping -> dict, tuple/list -> list, numpy scalars -> Python; others refused.

    key: where `value` sits ("" for the root), for error messages.
    """

    def child(k: Any) -> str:
        return f"{key}.{k}" if key else str(k)

    if isinstance(value, ConfigDict):
        return {
            str(k): _to_json_value(_resolve(field, child(k)), child(k))
            for k, field in value.items(preserve_field_references=True)
        }
    if isinstance(value, Mapping):
        return {str(k): _to_json_value(v, child(k)) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_json_value(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy/jax scalar
        return value.item()
    raise ConfigError(
        f"config {key} holds a {type(value).__name__} ({value!r}), which cannot be "
        "recorded as JSON; store a str, number, bool, None or tuple instead"
    )


def resolved_config_path(workdir: str | epath.PathLike) -> epath.Path:
    return epath.Path(workdir) / RESOLVED_CONFIG_NAME


def write_resolved_config(config: ConfigDict, workdir: str | epath.PathLike) -> epath.Path:
    """Writes `workdir/config.json` (sorted keys, indented) and returns its path.

    On several hosts, call it from process 0 only. `workdir` may be local or gs://. Written
    atomically (data.remote.write_atomic).
    """
    text = json.dumps(_to_json_value(config, ""), indent=2, sort_keys=True) + "\n"
    path = resolved_config_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: the other processes of a resumed run read it while process 0
    # rewrites it, and a crash mid-write must not leave a run that cannot resume.
    write_atomic(path, text)
    return path


def read_resolved_config(workdir: str | epath.PathLike) -> ConfigDict:
    """Reads `workdir/config.json` back as a locked ConfigDict (JSON lists become tuples)."""
    path = resolved_config_path(workdir)
    if not path.exists():
        raise FileNotFoundError(
            f"no {RESOLVED_CONFIG_NAME} in {workdir}: not a run directory, or the run never started"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); was it written partly?") from None

    def lists_to_tuples(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: lists_to_tuples(v) for k, v in value.items()}
        if isinstance(value, list):
            return tuple(lists_to_tuples(v) for v in value)
        return value

    return ConfigDict(lists_to_tuples(data)).lock()


def config_diff(
    a: ConfigDict | Mapping[str, Any],
    b: ConfigDict | Mapping[str, Any],
    ignore: Sequence[str] = (),
) -> list[str]:
    """Lines "key: value_in_a -> value_in_b" for every key whose value differs, sorted by key.

    A key missing on one side shows as (missing). `ignore` holds keys or group prefixes
    (e.g. "train.steps", "logging") allowed to differ, such as the length of a resumed run.
    """
    flat_a, flat_b = flatten_config(a), flatten_config(b)

    def ignored(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in ignore)

    def show(flat: dict[str, Any], key: str) -> str:
        return json.dumps(flat[key], sort_keys=True) if key in flat else "(missing)"

    lines = []
    for key in sorted(set(flat_a) | set(flat_b)):
        # Compared as JSON text so that 1, 1.0 and true stay different.
        if not ignored(key) and show(flat_a, key) != show(flat_b, key):
            lines.append(f"{key}: {show(flat_a, key)} -> {show(flat_b, key)}")
    return lines


# ----------------------------------------------------------------------------------------------
# absl: `--config file.py[:arg]` plus `--config.a.b=value` overrides.


class ConfigFlags(NamedTuple):
    spec: flags.FlagHolder  # str: path.py or path.py:arg
    overrides: flags.FlagHolder  # list[str]: a.b.c=value


def define_config_flags(
    name: str = "config", default: str | None = None, flag_values: flags.FlagValues = flags.FLAGS
) -> ConfigFlags:
    """Defines `--{name}` (the config spec) and `--{name}_override` (repeatable a.b=value).

    Parse argv with `absl_flags_parser` (or `parse_flags`) so `--{name}.a.b=value` works too,
    then call `config_from_flags(flags.spec.value, flags.overrides.value)`.
    """
    spec = flags.DEFINE_string(
        name, default, "Config file, path.py or path.py:arg (see the file's docstring).",
        flag_values=flag_values,
    )
    overrides = flags.DEFINE_multi_string(
        f"{name}_override", [],
        f"Config override key=value; --{name}.a.b=value is the short form.",
        flag_values=flag_values,
    )
    return ConfigFlags(spec, overrides)


def move_config_overrides(argv: Sequence[str], name: str = "config") -> list[str]:
    """Rewrites `--{name}.a.b=v` and `--{name}.a.b v` as `--{name}_override=a.b=v`.

    absl rejects flags it does not know, so the dotted forms must become a defined flag
    before parsing. Arguments after `--` are left alone.
    """
    pattern = re.compile(rf"--?{re.escape(name)}\.([^=]+)(?:=(.*))?", re.DOTALL)
    result, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            result.extend(argv[i:])
            break
        match = pattern.fullmatch(arg)
        if match is None:
            result.append(arg)
        else:
            key, value = match.group(1), match.group(2)
            if value is None:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(f"{arg} needs a value: write {arg}=VALUE")
                value = argv[i + 1]
                i += 1
            result.append(f"--{name}_override={key}={value}")
        i += 1
    return result


def parse_flags(
    argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS, name: str = "config"
) -> list[str]:
    """Parses argv (program name first) into `flag_values`; returns the remaining arguments."""
    return flag_values(move_config_overrides(argv, name))


def absl_flags_parser(argv: list[str]) -> list[str]:
    """For `app.run(main, flags_parser=absl_flags_parser)`: absl parsing plus `--config.a.b=v`."""
    try:
        rewritten = move_config_overrides(argv)
    except ConfigError as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\n")
        sys.exit(1)
    return app.parse_flags_with_usage(rewritten)


def config_from_flags(
    flag_value: str | None, argv_overrides: Sequence[str], name: str = "config"
) -> ConfigDict:
    """The config for `--{name}=flag_value` and overrides `a.b=v` (or `--{name}.a.b=v`)."""
    if not flag_value:
        raise ConfigError(f"--{name} is required: pass --{name}=configs/<name>.py[:arg]")
    prefix = re.compile(rf"--?{re.escape(name)}\.")
    overrides = [prefix.sub("", o, count=1) if prefix.match(o) else o for o in argv_overrides]
    return load_config(flag_value, overrides)
