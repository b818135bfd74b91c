"""Training jobs in their own processes: two-process jax.distributed runs, kill -9 and SIGTERM
mid-run, and restoring a checkpoint on meshes of other sizes."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

T2I = "configs/shapes_t2i.py:smoke"
# Fixed decay horizon: the runs below stop, resume and compare at different lengths.
COMMON = ["--config.train.decay_steps=10", "--config.train.sample_every=0"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = jax_cache_dir()
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def jax_cache_dir() -> str:
    import jax
    return jax.config.jax_compilation_cache_dir


def _train_cmd(workdir, *flags: str) -> list[str]:
    return [sys.executable, "-m", "lumiere_jax.cli", "train", "--config", T2I,
            "--workdir", str(workdir), *COMMON, *flags]


def _run(cmd, devices: int, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=_env(devices), cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, _said(result.stderr)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.csv")) as f:
        rows = [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]
    assert len({step for step, _ in rows}) == len(rows), "a step was logged twice"
    return dict(rows)


# Process 1 of a two-process run compiling its train step `seconds` later than process 0.
SLOW_COMPILE = ("import sys, time\n"
                "from lumiere_jax.train import trainer\n"
                "flops = trainer.step_flops\n"
                "def slow(*args):\n"
                "    time.sleep({seconds})\n"
                "    return flops(*args)\n"
                "trainer.step_flops = slow\n"
                "from lumiere_jax import cli\n"
                "cli.run()\n")


def _said(err: str) -> str:
    """What a process's stderr says: its last Python traceback (an abort's stack dump that
    follows would push it out of the tail), then the tail, without stack addresses."""
    text = "\n".join(line for line in err.splitlines() if not line.lstrip().startswith("@"))
    start = text.rfind("Traceback (most recent call last)")
    return (text[start:start + 3000] + "\n...\n" if start >= 0 else "") + text[-1500:]


def _two_processes(workdir, steps: int, slow_compile: float = 0) -> None:
    port = _free_port()
    cmds = [_train_cmd(workdir, f"--config.train.steps={steps}", "--config.mesh.data=-1",
                       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                       f"--process_id={i}") for i in range(2)]
    if slow_compile:
        cmds[1][1:3] = ["-c", SLOW_COMPILE.format(seconds=slow_compile)]
    procs = [subprocess.Popen(cmd, env=_env(2), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in cmds]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    except subprocess.TimeoutExpired:  # kill both, and show what each had said
        for p in procs:
            p.kill()
        outputs = [p.communicate() for p in procs]
    if any(p.returncode != 0 for p in procs):
        pytest.fail("two-process training failed; return codes "
                    f"{[p.returncode for p in procs]}; stderr of process 0, then 1:\n"
                    + "\n-----\n".join(_said(err) for _, err in outputs))


def test_two_processes_train_resume_and_match_one_process(tmp_path):
    """2 processes x 2 devices (jax.distributed on 127.0.0.1) train 4 steps, stop, resume to
    6; a single process on 4 devices trains 6 steps. Same data (each process loads its half of
    every global batch), same losses: the all-reduce order differs (gloo across processes),
    so they agree to fp32 rounding, not bitwise.

    Process 1 compiles 40 s later than process 0 in the first run: CPU collectives (gloo)
    give the devices 30 s to meet at their first collective, so without the trainer's
    barrier process 0 fails ("Gloo context initialization failed")."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    _two_processes(multi, 4, slow_compile=40)
    assert sorted(_losses(multi)) == [1, 2, 3, 4]
    _two_processes(multi, 6)  # resumes from the step-4 checkpoint
    _run(_train_cmd(single, "--config.train.steps=6", "--config.mesh.data=-1"), devices=4)
    got, want = _losses(multi), _losses(single)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), step
    # Only process 0 logs: no step twice in metrics.csv (checked by _losses).


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """10 steps in one go (this process, one device)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(_train_cmd(workdir, "--config.train.steps=10", "--config.train.ckpt_every=1"),
         devices=1)
    return _losses(workdir)


def _start(workdir, *flags):
    return subprocess.Popen(_train_cmd(workdir, "--config.train.steps=10", *flags),
                            env=_env(1), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, _said(proc.stderr.read())
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _complete_steps(workdir) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() \
        else []


def test_kill_9_mid_run_then_resume_gives_the_same_loss_at_every_step(tmp_path,
                                                                      uninterrupted):
    """Saving every step (async), killed with SIGKILL once step 5 is on disk, wherever the
    save of a later step stands; the rerun resumes from the newest complete step. Bitwise:
    one device, the same compiled program, the step's RNG derived from the step."""
    proc = _start(tmp_path, "--config.train.ckpt_every=1")
    _wait_for(lambda: any(s >= 5 for s in _complete_steps(tmp_path)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_complete_steps(tmp_path)) < 10
    _run(_train_cmd(tmp_path, "--config.train.steps=10", "--config.train.ckpt_every=1"),
         devices=1)
    assert _losses(tmp_path) == uninterrupted


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path, uninterrupted):
    """No periodic checkpoints: SIGTERM alone makes the run save (the step it reached) and
    exit 0; the rerun continues from exactly there."""
    proc = _start(tmp_path, "--config.train.ckpt_every=1000")
    _wait_for(lambda: (tmp_path / "metrics.csv").exists() and len(_losses(tmp_path)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, _said(err)
    saved = _complete_steps(tmp_path)
    assert len(saved) == 1 and 3 <= saved[0] < 10
    assert json.loads(out)["preempted_at"] == saved[0]
    assert max(_losses(tmp_path)) == saved[0]
    _run(_train_cmd(tmp_path, "--config.train.steps=10", "--config.train.ckpt_every=1000"),
         devices=1)
    assert _losses(tmp_path) == uninterrupted


CHECKSUM = """
import sys
import jax
from lumiere_jax import config as config_lib
from lumiere_jax.train import trainer
config = config_lib.read_resolved_config(sys.argv[1])
for item in sys.argv[2:]:
    key, value = item.split("=")
    config.mesh[key] = int(value)
state, frozen, step = trainer.load_train_state(config, sys.argv[1])
leaves = jax.tree.leaves(state.params)
split = sum(x.addressable_shards[0].data.shape != x.shape for x in leaves)
print(step, trainer.state_checksum(state, frozen), split)
"""


def test_save_on_8_devices_restore_on_2_and_1(tmp_path):
    """A run on 8 devices (fsdp=4 x tensor=2) restored on a 2-device and a 1-device mesh:
    every array identical (sha256 over all of them), placed on the new mesh."""
    _run(_train_cmd(tmp_path, "--config.train.steps=2", "--config.mesh.fsdp=4",
                    "--config.mesh.tensor=2"), devices=8)
    results = {}
    for devices, mesh in ((8, ["fsdp=4", "tensor=2"]), (2, ["fsdp=2", "tensor=1"]),
                         (1, ["fsdp=1", "tensor=1"])):
        out = _run([sys.executable, "-c", CHECKSUM, str(tmp_path), *mesh], devices).stdout
        step, checksum, split = out.strip().splitlines()[-1].split()
        results[devices] = (step, checksum)
        # Placed on the new mesh (arrays split over its devices), not gathered on one.
        assert (int(split) > 0) == (devices > 1), (devices, split)
    assert results[8] == results[2] == results[1]
    assert results[8][0] == "2"

