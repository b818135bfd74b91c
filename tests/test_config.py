"""Tests for lumiere_jax.config: loading, overrides, errors, validation, records, absl wiring."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from absl import flags
from ml_collections import config_dict

from lumiere_jax import config as cfg

# A small config in the shape of the project's files: groups, a variant argument, a linked
# field, a None default, typed and required placeholders.
BASE_CONFIG = '''
"""Tiny test config. Run: lumiere train --config {path}:tiny"""
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict()
    config.data.frames = 16
    config.data.resolution = 64 if arg == "tiny" else 128
    config.model = ml_collections.ConfigDict()
    config.model.channels = (16, 32)
    config.model.frames = config.data.get_ref("frames")
    config.model.name = "stunet"
    config.model.dropout = None
    config.model.levels = [1, 2]
    config.train = ml_collections.ConfigDict()
    config.train.steps = 100
    config.train.lr = 1e-3
    config.train.use_ema = True
    config.train.betas = (0.9, 0.99)
    config.train.max_steps = config_dict.placeholder(int)
    config.train.optimizer = ml_collections.ConfigDict()
    config.train.optimizer.kind = "adamw"
    config.train.optimizer.schedule = ml_collections.ConfigDict()
    config.train.optimizer.schedule.warmup = 10
    return config
'''


def write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


@pytest.fixture
def base_path(tmp_path):
    return write(tmp_path, "base.py", BASE_CONFIG)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(cfg.ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------- loading


def test_load_default_and_variant(base_path):
    default = cfg.load_config(base_path)
    tiny = cfg.load_config(base_path + ":tiny")
    assert default.data.resolution == 128
    assert tiny.data.resolution == 64
    assert default.model.channels == (16, 32)
    assert default.train.max_steps is None
    assert default.is_locked and default.train.optimizer.schedule.is_locked


def test_overrides_parse_to_field_types(base_path):
    config = cfg.load_config(
        base_path,
        [
            "train.steps=7",
            "train.lr=3",  # an int text for a float field becomes a float
            "train.use_ema=false",
            "model.name=unet with spaces",
            "model.channels=(8, 16, 24)",
            "train.betas=0.5,1",  # comma form; ints become floats like the elements
            "model.levels=3",  # bare scalar -> one-element list
            "model.dropout=0.25",  # default None: any literal
            "train.max_steps=500",  # placeholder(int)
            "train.optimizer.schedule.warmup=0",
            "seed=-3",
        ],
    )
    assert config.train.steps == 7 and type(config.train.steps) is int
    assert config.train.lr == 3.0 and type(config.train.lr) is float
    assert config.train.use_ema is False
    assert config.model.name == "unet with spaces"
    assert config.model.channels == (8, 16, 24)
    assert config.train.betas == (0.5, 1.0) and type(config.train.betas[1]) is float
    assert config.model.levels == [3]
    assert config.model.dropout == 0.25
    assert config.train.max_steps == 500
    assert config.train.optimizer.schedule.warmup == 0
    assert config.seed == -3


@pytest.mark.parametrize(
    "text, expected", [("true", True), ("False", False), ("1", True), ("0", False),
                       ("yes", True), ("NO", False)],
)
def test_bool_words(base_path, text, expected):
    assert cfg.load_config(base_path, [f"train.use_ema={text}"]).train.use_ema is expected


def test_none_handling(base_path):
    config = cfg.load_config(base_path, ["train.max_steps=500", "train.max_steps=none"])
    assert config.train.max_steps is None  # the last override wins
    assert cfg.load_config(base_path, ["model.dropout=adamw"]).model.dropout == "adamw"
    # A typed placeholder still checks its type; a plain int field does not take None.
    assert "train.max_steps expects an int, got 'abc'" in error_of(
        cfg.load_config, base_path, ["train.max_steps=abc"]
    )
    assert "train.steps expects an int, got 'none'" in error_of(
        cfg.load_config, base_path, ["train.steps=none"]
    )


def test_linked_field_follows_override(base_path):
    config = cfg.load_config(base_path, ["data.frames=80"])
    assert config.model.frames == 80


def test_locked_config_refuses_new_keys(base_path):
    config = cfg.load_config(base_path)
    with pytest.raises(AttributeError, match="stepz"):
        config.train.stepz = 3
    config.train.steps = 5  # existing keys stay settable
    assert config.train.steps == 5


def test_get_config_may_return_a_dict(tmp_path):
    path = write(tmp_path, "plain.py", "def get_config():\n    return {'a': 1, 'b': {'c': 2.0}}\n")
    config = cfg.load_config(path, ["b.c=4"])
    assert config.a == 1 and config.b.c == 4.0 and config.is_locked


def test_module_is_not_left_registered(tmp_path):
    path = write(
        tmp_path,
        "dc.py",
        """
        from __future__ import annotations  # string annotations: dataclasses look up the module

        import dataclasses
        import ml_collections

        @dataclasses.dataclass
        class Size:
            h: int = 3

        def get_config():
            return ml_collections.ConfigDict({'h': Size().h})
        """,
    )
    assert cfg.load_config(path).h == 3
    assert not [name for name in sys.modules if name.startswith("lumiere_config_")]


def test_parse_config_arg():
    parsed = cfg.parse_config_arg("res=64,tiny,channels=(8, 16),name=x", res=128, tiny=False,
                                  channels=(16, 32), name="base", lr=1e-3)
    assert (parsed.res, parsed.tiny, parsed.channels, parsed.name, parsed.lr) == (
        64, True, (8, 16), "x", 1e-3)
    assert cfg.parse_config_arg(None, res=128).res == 128
    assert "Did you mean 'res'" in error_of(cfg.parse_config_arg, "rez=3", res=128)
    assert "bare 'res' is not a bool" in error_of(cfg.parse_config_arg, "res", res=128)
    assert "res expects an int, got 'big'" in error_of(cfg.parse_config_arg, "res=big", res=128)


# ----------------------------------------------------------------------------- load errors


def test_missing_file(tmp_path):
    message = error_of(cfg.load_config, str(tmp_path / "nope.py"))
    assert "config file not found" in message and "nope.py" in message


def test_file_without_get_config(tmp_path):
    path = write(tmp_path, "empty.py", "X = 1\n")
    assert error_of(cfg.load_config, path) == f"{path}: defines no get_config() function"


def test_get_config_that_raises(tmp_path):
    path = write(tmp_path, "boom.py", "def get_config(arg=None):\n    raise KeyError(arg)\n")
    message = error_of(cfg.load_config, path + ":big")
    assert message == f"{path}: get_config('big') raised KeyError: 'big'"


def test_file_that_fails_to_import(tmp_path):
    path = write(tmp_path, "bad.py", "import not_a_module_anywhere\n")
    message = error_of(cfg.load_config, path)
    assert message.startswith(f"{path}: importing the config file failed: ModuleNotFoundError")


def test_argument_mismatch(tmp_path):
    no_arg = write(tmp_path, "no_arg.py", "def get_config():\n    return {'a': 1}\n")
    needs_arg = write(tmp_path, "needs_arg.py", "def get_config(arg):\n    return {'a': arg}\n")
    assert "takes no argument, but ':x' was given" in error_of(cfg.load_config, no_arg + ":x")
    assert "get_config needs an argument" in error_of(cfg.load_config, needs_arg)
    assert cfg.load_config(needs_arg + ":v").a == "v"


def test_get_config_returning_none(tmp_path):
    path = write(tmp_path, "none.py", "def get_config():\n    pass\n")
    assert "returned NoneType" in error_of(cfg.load_config, path)


def test_unknown_keys_name_close_matches_and_valid_keys(base_path):
    top = error_of(cfg.load_config, base_path, ["trian.steps=3"])
    assert top == (
        f"{base_path}: override 'trian.steps=3': unknown config key 'trian.steps': no 'trian' at "
        "the top level. Did you mean 'train'? Valid keys at the top level: data, model, seed, "
        "train."
    )
    deep = error_of(cfg.load_config, base_path, ["train.optimizer.schedule.warmpu=3"])
    assert "no 'warmpu' in 'train.optimizer.schedule'. Did you mean 'warmup'?" in deep
    assert "Valid keys in 'train.optimizer.schedule': warmup." in deep
    unrelated = error_of(cfg.load_config, base_path, ["train.zzz=3"])
    assert "Did you mean" not in unrelated
    assert "Valid keys in 'train': betas, lr, max_steps, optimizer, steps, use_ema" in unrelated


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.channels=abc", "model.channels expects a tuple, got 'abc'"),
        ("train.steps=1.5", "train.steps expects an int, got '1.5'"),
        ("data.frames=abc", "data.frames expects an int, got 'abc'"),
        ("train.lr=fast", "train.lr expects a float, got 'fast'"),
        ("train.use_ema=maybe", "train.use_ema expects a bool, got 'maybe'"),
        ("model.channels=(1, 'a')", "model.channels expects a tuple of int, got \"(1, 'a')\""),
        ("train.optimizer=sgd", "train.optimizer expects a group of settings, got 'sgd'; "
         "override its keys instead: train.optimizer.kind, train.optimizer.schedule"),
        ("train.steps.x=1", "'train.steps' holds a value (int), not a group of settings"),
        ("train..steps=1", "bad config key 'train..steps'"),
        ("train.steps", "bad override 'train.steps': expected key=value"),
    ],
)
def test_bad_override_values(base_path, override, expected):
    assert expected in error_of(cfg.load_config, base_path, [override])


def test_required_placeholder(tmp_path):
    path = write(
        tmp_path,
        "req.py",
        """
        import ml_collections
        from ml_collections import config_dict

        def get_config():
            config = ml_collections.ConfigDict()
            config.data = ml_collections.ConfigDict()
            config.data.dir = config_dict.required_placeholder(str)
            config.data.size = 3
            return config
        """,
    )
    message = error_of(cfg.load_config, path)
    assert message == (
        f"{path}: required config value(s) not set: data.dir. Pass --config.data.dir=... "
        "(or set them in the file)."
    )
    config = cfg.load_config(path, ["data.dir=/tmp/shards"])
    assert config.data.dir == "/tmp/shards" and config.is_locked


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "check, good, bad",
    [
        (cfg.positive_int, [1, 10**9, np.int32(3)], [0, -1, 1.0, True, "3", None]),
        (cfg.non_negative_int, [0, 5], [-1, 0.0, False]),
        (cfg.positive_number, [1e-9, 2], [0, -0.5, True]),
        (cfg.non_negative_number, [0, 0.0, 3.5], [-1e-9]),
        (cfg.probability, [0, 0.0, 0.1, 1, 1.0], [-0.01, 1.01, "0.5", None]),
        (cfg.in_range(2, 4), [2, 3.5, 4], [1.99, 4.01]),
        (cfg.one_of("ddpm", "ddim"), ["ddim"], ["DDIM", None]),
        (cfg.non_empty, [(1,), "a"], [(), "", None]),
        (cfg.optional(cfg.positive_int), [None, 3], [0]),
        (cfg.each(cfg.positive_int), [(1, 2), [3], ()], [(1, 0), 5]),
    ],
)
def test_checks(check, good, bad):
    assert [check(v) for v in good] == [None] * len(good)
    assert all(isinstance(check(v), str) for v in bad)


def test_require(base_path):
    config = cfg.load_config(base_path, ["train.steps=-2"])
    assert cfg.require(config, "model.channels", cfg.non_empty, cfg.each(cfg.positive_int)) == (
        16, 32)
    assert error_of(cfg.require, config, "train.steps", cfg.positive_int) == (
        "config train.steps = -2: must be a positive int")
    assert "Did you mean 'steps'" in error_of(cfg.require, config, "train.step", cfg.positive_int)


def test_validate_config_reports_every_problem(base_path):
    config = cfg.load_config(base_path, ["train.steps=0", "model.channels=(16, -1)"])
    schema = {
        "train.steps": cfg.positive_int,
        "model.channels": (cfg.non_empty, cfg.each(cfg.positive_int)),
        "train.lr": cfg.positive_number,
        "train.lrr": cfg.positive_number,
    }
    message = error_of(cfg.validate_config, config, schema)
    assert message.splitlines() == [
        "invalid config:",
        "  - config train.steps = 0: must be a positive int",
        "  - config model.channels = (16, -1): element 1 (-1) must be a positive int",
        "  - unknown config key 'train.lrr': no 'lrr' in 'train'. Did you mean 'lr'? Valid keys "
        "in 'train': betas, lr, max_steps, optimizer, steps, use_ema.",
    ]
    cfg.validate_config(cfg.load_config(base_path), {"train.steps": cfg.positive_int})


def test_validate_config_without_schema_checks_required_values():
    config = config_dict.ConfigDict()
    config.workdir = config_dict.required_placeholder(str)
    config.size = 2
    assert "workdir: required value is not set" in error_of(cfg.validate_config, config)
    config.workdir = "runs/x"
    cfg.validate_config(config)


# ------------------------------------------------------------------ records and differences


def test_resolved_config_round_trip(base_path, tmp_path):
    config = cfg.load_config(base_path + ":tiny", ["train.max_steps=9", "model.dropout=0.5"])
    path = cfg.write_resolved_config(config, tmp_path / "run" / "nested")
    assert str(path) == str(tmp_path / "run" / "nested" / "config.json")
    data = json.loads(path.read_text())
    assert data["model"]["channels"] == [16, 32] and data["data"]["resolution"] == 64
    assert list(data) == sorted(data)

    restored = cfg.read_resolved_config(tmp_path / "run" / "nested")
    assert restored.is_locked
    assert restored.model.channels == (16, 32) and restored.model.levels == (1, 2)
    assert restored.train.max_steps == 9 and restored.model.frames == 16
    assert cfg.config_diff(config, restored) == []
    assert cfg.flatten_config(restored) == cfg.flatten_config(config)


def test_read_resolved_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        cfg.read_resolved_config(tmp_path)
    (tmp_path / "config.json").write_text('{"a": ')
    assert "is not valid JSON" in error_of(cfg.read_resolved_config, tmp_path)


def test_resolved_config_is_replaced_whole(base_path, tmp_path, monkeypatch):
    """config.json is rewritten on every (resumed) start by process 0 while the other
    processes read it: a write cut short (a kill before the rename, here a failing fsync)
    leaves the previous file, and no temporary behind."""
    run = tmp_path / "run"
    config = cfg.load_config(base_path + ":tiny")
    cfg.write_resolved_config(config, run)
    before = (run / "config.json").read_bytes()
    changed = cfg.load_config(base_path + ":tiny", ["train.max_steps=123"])

    def killed(fd):
        raise OSError("killed mid-write")

    monkeypatch.setattr("os.fsync", killed)
    with pytest.raises(OSError, match="killed mid-write"):
        cfg.write_resolved_config(changed, run)
    monkeypatch.undo()
    assert (run / "config.json").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    cfg.write_resolved_config(changed, run)
    assert cfg.read_resolved_config(run).train.max_steps == 123


def test_resolved_config_never_read_half_written(base_path, tmp_path):
    """A reader racing a process that rewrites config.json in a loop only ever sees a whole
    file (what a resumed multi-process run does: process 1 checks the config that process 0
    is rewriting). With a truncate-then-write this fails within a few hundred reads."""
    config = cfg.load_config(base_path + ":tiny")
    cfg.write_resolved_config(config, tmp_path)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from lumiere_jax import config as cfg
        config = cfg.load_config({base_path + ':tiny'!r})
        for _ in range(400):
            cfg.write_resolved_config(config, {str(tmp_path)!r})
        """)])
    reads = 0
    try:
        while writer.poll() is None:
            assert cfg.read_resolved_config(tmp_path).data.resolution == 64
            reads += 1
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0 and reads > 0


def test_write_refuses_values_json_cannot_hold(tmp_path):
    config = config_dict.ConfigDict({"a": {"scale": np.float32(0.5), "fn": object()}})
    assert "config a.fn holds a object" in error_of(cfg.write_resolved_config, config, tmp_path)
    config.a.fn = "gelu"
    cfg.write_resolved_config(config, tmp_path)
    assert cfg.read_resolved_config(tmp_path).a.scale == 0.5


def test_config_diff_names_what_differs():
    a = config_dict.ConfigDict(
        {"train": {"steps": 10, "lr": 1.0, "flag": True}, "model": {"ch": (1, 2)}, "old": 1,
         "empty": {}})
    b = {"train": {"steps": 20, "lr": 1, "flag": 1}, "model": {"ch": [1, 2]}, "new": "x",
         "empty": {}}
    assert cfg.config_diff(a, b) == [
        'new: (missing) -> "x"',
        "old: 1 -> (missing)",
        "train.flag: true -> 1",
        "train.lr: 1.0 -> 1",
        "train.steps: 10 -> 20",
    ]
    assert cfg.config_diff(a, b, ignore=("train", "old", "new")) == []
    assert cfg.config_diff(a, b, ignore=("train.step",)) != cfg.config_diff(
        a, b, ignore=("train.steps",))


# ----------------------------------------------------------------------------------- absl


def test_move_config_overrides():
    argv = ["prog", "train", "--config", "c.py", "--config.a.b=1", "--config.lr", "-1e-3",
            "-config.s=x=y", "--workdir=w", "--", "--config.z=1"]
    assert cfg.move_config_overrides(argv) == [
        "prog", "train", "--config", "c.py", "--config_override=a.b=1",
        "--config_override=lr=-1e-3", "--config_override=s=x=y", "--workdir=w", "--",
        "--config.z=1"]
    assert "--config.a needs a value" in error_of(cfg.move_config_overrides, ["p", "--config.a"])
    assert "needs a value" in error_of(cfg.move_config_overrides, ["p", "--config.a", "--x=1"])


def test_flags_parsed_through_absl_flag_values(base_path):
    flag_values = flags.FlagValues()
    config_flags = cfg.define_config_flags(flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "run directory", flag_values=flag_values)
    rest = cfg.parse_flags(
        ["prog", "train", f"--config={base_path}:tiny", "--config.train.steps=3",
         "--workdir", "w", "--config.model.channels", "(4, 8)"],
        flag_values,
    )
    assert rest == ["prog", "train"] and flag_values.workdir == "w"
    assert config_flags.overrides.value == ["train.steps=3", "model.channels=(4, 8)"]
    config = cfg.config_from_flags(config_flags.spec.value, config_flags.overrides.value)
    assert (config.train.steps, config.model.channels, config.data.resolution) == (3, (4, 8), 64)

    flag_values.unparse_flags()
    cfg.parse_flags(["prog", f"--config={base_path}", "--config.trian.steps=3"], flag_values)
    message = error_of(cfg.config_from_flags, flag_values.config, flag_values.config_override)
    assert "unknown config key 'trian.steps'" in message and "Did you mean 'train'?" in message
    # The long forms are accepted too, and a missing --config is named.
    assert cfg.config_from_flags(base_path, ["--config.seed=4"]).seed == 4
    assert error_of(cfg.config_from_flags, None, []).startswith("--config is required")


APP = '''
"""Tiny absl app for tests."""
from absl import app
from lumiere_jax import config as cfg

CONFIG = cfg.define_config_flags()


def main(argv):
    try:
        config = cfg.config_from_flags(CONFIG.spec.value, CONFIG.overrides.value)
    except cfg.ConfigError as e:
        raise app.UsageError(str(e))
    print("steps", config.train.steps, "args", argv[1:])


if __name__ == "__main__":
    app.run(main, flags_parser=cfg.absl_flags_parser)
'''


def test_absl_app_in_subprocess(base_path, tmp_path):
    app_path = write(tmp_path, "app.py", APP)

    def run(*args):
        return subprocess.run([sys.executable, app_path, *args], capture_output=True, text=True,
                              timeout=60)

    ok = run("sample", "--config", base_path, "--config.train.steps=3")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "steps 3 args ['sample']"

    typo = run("--config", base_path, "--config.trian.steps=3")
    assert typo.returncode == 1
    assert "Did you mean 'train'? Valid keys at the top level: data, model, seed, train." in (
        typo.stderr)
    assert "Traceback" not in typo.stderr

    no_value = run("--config", base_path, "--config.train.steps")
    assert no_value.returncode == 1
    assert "FATAL Flags parsing error: --config.train.steps needs a value" in no_value.stderr
