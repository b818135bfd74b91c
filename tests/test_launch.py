"""launch/tpu.py: the exact gcloud commands, the input errors, and the `run` loop's restarts.

No network and no gcloud: commands are compared as lists, and the loop runs with fake probes.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch import tpu

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO = "https://github.com/you/lumiere_jax"

V5E = ["--name", "lumiere-v5e", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-8",
       "--spot", "--repo", REPO, "--ref", "v0.1", "--config", "configs/shapes_t2i.py",
       "--workdir", "gs://my-bucket/runs/t2i", "--config.train.steps=100"]
V5P = ["--name", "lumiere-v5p", "--zone", "us-east5-a", "--accelerator-type", "v5p-128",
       "--queued", "--num-slices", "2", "--spot", "--project", "my-proj", "--repo", REPO,
       "--config", "configs/lumiere_base.py", "--workdir", "gs://my-bucket/runs/base"]

INSTALL_V01 = (
    'set -eo pipefail; export PATH="$HOME/.local/bin:$PATH"; '
    "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; "
    f"[ -d ~/lumiere/.git ] || git clone --quiet {REPO} ~/lumiere; cd ~/lumiere; "
    "git fetch --quiet origin {ref}; git checkout --quiet --force FETCH_HEAD; "
    "[ -x .venv/bin/python ] || uv venv --quiet --python 3.11 .venv; "
    'uv pip install --quiet --python .venv/bin/python -e . "jax[tpu]" "gcsfs"')


def train_script(job_args: str) -> str:
    return ("cd ~/lumiere; if [ ! -f ~/lumiere-train.exit ] && "
            'kill -0 "$(cat ~/lumiere-train.pid 2>/dev/null)" 2>/dev/null; '
            'then echo "lumiere train is already running here; see ~/lumiere-train.log" >&2; '
            "exit 1; fi; rm -f ~/lumiere-train.exit ~/lumiere-train.sigterm; "
            """nohup sh -c 'trap "touch ~/lumiere-train.sigterm" TERM; """
            f".venv/bin/lumiere train {job_args}; echo $? > ~/lumiere-train.exit' "
            ">> ~/lumiere-train.log 2>&1 < /dev/null & echo $! > ~/lumiere-train.pid")


def parse(argv: list[str], command: str = "run"):
    return tpu.parse_args([command, *argv])


# ---------------------------------------------------------------------------- (a) v5e-8


def test_v5e_single_host_spot_commands():
    args = parse(V5E)
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lumiere-v5e", "--zone", "us-west4-a",
           "--worker=all", "--command"]
    assert tpu.create_commands(args) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "lumiere-v5e", "--zone", "us-west4-a",
        "--accelerator-type", "v5litepod-8", "--version", "v2-alpha-tpuv5-lite", "--spot"]]
    assert tpu.install_commands(args) == [ssh + [INSTALL_V01.format(ref="v0.1")]]
    assert tpu.train_commands(args) == [ssh + [train_script(
        "--config configs/shapes_t2i.py --workdir gs://my-bucket/runs/t2i "
        "--config.train.steps=100")]]
    assert tpu.delete_commands(args) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "lumiere-v5e", "--zone", "us-west4-a",
        "--quiet"]]
    assert tpu.state_command(args) == [
        "gcloud", "compute", "tpus", "tpu-vm", "describe", "lumiere-v5e", "--zone", "us-west4-a",
        "--format=value(state)"]
    assert tpu.job_command(args) == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "lumiere-v5e", "--zone", "us-west4-a",
        "--worker=0", "--command",
        "if [ -f ~/lumiere-train.sigterm ]; then echo stopped; "
        "elif [ -f ~/lumiere-train.exit ]; then cat ~/lumiere-train.exit; "
        'elif kill -0 "$(cat ~/lumiere-train.pid 2>/dev/null)" 2>/dev/null; then echo running; '
        "else echo gone; fi"]


def test_v5e_dry_run_prints_each_command_on_one_line(capsys):
    for command, builder in [("create", tpu.create_commands), ("install", tpu.install_commands),
                             ("train", tpu.train_commands), ("delete", tpu.delete_commands)]:
        assert tpu.main([command, "--dry-run", *V5E]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == ("# v5litepod-8: 8 chips on 1 host (single-host); "
                            "runtime v2-alpha-tpuv5-lite by default")
        assert lines[1:] == [shlex.join(c) for c in builder(parse(V5E, command))]


def test_v5e_single_host_workdir_may_be_local():
    argv = [a if not a.startswith("gs://") else "runs/t2i" for a in V5E]
    (command,) = tpu.train_commands(parse(argv))
    assert "--workdir runs/t2i" in command[-1]


# ---------------------------------------------------------------------------- (b) v5p-128 x2


def test_v5p_multi_slice_queued_commands():
    args = parse(V5P)
    project = ["--project", "my-proj"]
    assert tpu.create_commands(args) == [[
        "gcloud", "compute", "tpus", "queued-resources", "create", "lumiere-v5p-qr",
        "--node-count", "2", "--node-prefix", "lumiere-v5p", "--zone", "us-east5-a",
        "--accelerator-type", "v5p-128", "--runtime-version", "v2-alpha-tpuv5", "--spot",
        *project]]
    ssh = [["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, "--zone", "us-east5-a",
            "--worker=all", "--command"] for node in ("lumiere-v5p-0", "lumiere-v5p-1")]
    install = INSTALL_V01.format(ref="main")
    assert tpu.install_commands(args) == [s + [install] + project for s in ssh]
    train = train_script("--config configs/lumiere_base.py --workdir gs://my-bucket/runs/base")
    assert tpu.train_commands(args) == [s + [train] + project for s in ssh]
    assert tpu.delete_commands(args) == [[
        "gcloud", "compute", "tpus", "queued-resources", "delete", "lumiere-v5p-qr",
        "--zone", "us-east5-a", "--force", "--quiet", *project]]
    assert tpu.state_command(args) == [
        "gcloud", "compute", "tpus", "queued-resources", "describe", "lumiere-v5p-qr",
        "--zone", "us-east5-a", "--format=value(state.state)", *project]
    assert tpu.logs_commands(parse(V5P + ["--slice", "1", "--worker", "3"], "logs")) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "lumiere-v5p-1", "--zone", "us-east5-a",
        "--worker=3", "--command", "tail -n 100 -f ~/lumiere-train.log", *project]]


def test_v5p_single_slice_queued_uses_node_id_and_runtime_override():
    argv = ["--name", "p", "--zone", "z", "--accelerator-type", "v5p-128", "--queued",
            "--runtime-version", "v2-alpha-tpuv5-custom"]
    assert tpu.create_commands(parse(argv, "create")) == [[
        "gcloud", "compute", "tpus", "queued-resources", "create", "p-qr", "--node-id", "p",
        "--zone", "z", "--accelerator-type", "v5p-128", "--runtime-version",
        "v2-alpha-tpuv5-custom"]]


def test_v5p_run_dry_run_lists_the_whole_loop(capsys):
    assert tpu.main(["run", "--dry-run", *V5P]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("# v5p-128: 64 chips on 16 hosts of 4 chips, x2 slices = 32 hosts "
                        "(multi-host); runtime v2-alpha-tpuv5 by default")
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert [c[3:5] for c in commands] == [["queued-resources", "create"]] + [["tpu-vm", "ssh"]] * 4
    assert all("--worker=all" in c for c in commands[1:])
    assert any("queued-resources delete" in line for line in lines if line.startswith("#"))


@pytest.mark.parametrize("accelerator_type, spelled, chips, hosts", [
    ("v5litepod-8", "v5litepod-8", 8, 1), ("v5e-8", "v5litepod-8", 8, 1),
    ("v5litepod-4", "v5litepod-4", 4, 1), ("v5litepod-16", "v5litepod-16", 16, 4),
    ("v5p-8", "v5p-8", 4, 1), ("v5p-128", "v5p-128", 64, 16), ("v4-8", "v4-8", 4, 1),
    ("v4-32", "v4-32", 16, 4), ("v6e-8", "v6e-8", 8, 1), ("v6e-64", "v6e-64", 64, 16)])
def test_topology(accelerator_type, spelled, chips, hosts):
    topo = tpu.topology(accelerator_type)
    assert (topo.accelerator_type, topo.chips, topo.hosts) == (spelled, chips, hosts)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("command, change, message", [
    ("create", {"--accelerator-type": "v9-8"}, "--accelerator-type 'v9-8' is not a TPU type"),
    ("create", {"--accelerator-type": "v5p-7"}, "a multiple of 2"),
    ("create", {"--accelerator-type": "v5litepod-18"}, "a multiple of 4 chips"),
    ("create", {"--num-slices": "0"}, "--num-slices must be at least 1 (got 0)"),
    ("create", {"--num-slices": "2", "--queued": None}, "add --queued"),
    ("train", {"--workdir": "runs/base"}, "--workdir runs/base: a multi-host job (32 hosts) "
                                          "needs a gs:// workdir"),
    ("train", {"--config": None}, "train needs --config"),
    ("train", {"--workdir": None}, "train needs --workdir"),
    ("install", {"--repo": None}, "install needs --repo"),
    ("run", {"--repo": None}, "install needs --repo"),
    ("logs", {"--slice": "2"}, "--slice 2 is not in [0, 2)"),
])
def test_bad_input_names_the_flag(command, change, message, capsys):
    argv = list(V5P)
    for flag, value in change.items():
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + (2 if argv[i + 1:i + 2] and not argv[i + 1].startswith("--") else 1)]
        if value is not None:
            argv += [flag, value]
    assert tpu.main([command, "--dry-run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_multi_host_single_slice_needs_gs_workdir():
    argv = ["--name", "n", "--zone", "z", "--accelerator-type", "v5litepod-16",
            "--config", "c.py", "--workdir", "/tmp/run"]
    with pytest.raises(tpu.LaunchError, match=r"a multi-host job \(4 hosts\) needs a gs://"):
        tpu.train_commands(parse(argv, "train"))


def test_preemptible_is_not_for_queued_resources():
    argv = ["--name", "n", "--zone", "z", "--accelerator-type", "v4-8", "--queued",
            "--preemptible"]
    with pytest.raises(tpu.LaunchError, match="--preemptible does not apply"):
        tpu.create_commands(parse(argv, "create"))
    argv.remove("--queued")  # a plain TPU VM may be preemptible
    (command,) = tpu.create_commands(parse(argv, "create"))
    assert command[-3:] == ["--version", "tpu-ubuntu2204-base", "--preemptible"]


def test_stray_arguments_are_refused():
    with pytest.raises(SystemExit):
        tpu.parse_args(["train", *V5E, "--config.train.steps", "100"])


def test_command_line_dry_run_in_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "launch.tpu", "train", "--dry-run", *V5E],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("# v5litepod-8: 8 chips on 1 host")
    command = shlex.split(lines[1])
    assert command[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lumiere-v5e",
                           "--zone", "us-west4-a", "--worker=all"]
    assert command[9:] == ["--command", train_script(
        "--config configs/shapes_t2i.py --workdir gs://my-bucket/runs/t2i "
        "--config.train.steps=100")]


# ---------------------------------------------------------------------------- the run loop


class FakeCloud:
    """Scripted states and job probes; records which commands `run` executed."""

    def __init__(self, states, jobs):
        self.states, self.jobs, self.executed, self.sleeps = list(states), list(jobs), [], 0

    def probe_state(self, args):
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def probe_job(self, args):
        return self.jobs.pop(0) if len(self.jobs) > 1 else self.jobs[0]

    def execute(self, commands):
        for command in commands:
            words = command[3:5]
            if words[1] != "ssh":
                self.executed.append(" ".join(words))
            else:
                script = command[command.index("--command") + 1]
                self.executed.append("train" if "lumiere train" in script else "install")

    def sleep(self, seconds):
        self.sleeps += 1
        assert self.sleeps < 100, "the loop did not end"

    def run(self, argv):
        return tpu.run_loop(parse(argv), execute=self.execute, probe_state=self.probe_state,
                            probe_job=self.probe_job, sleep=self.sleep)


def test_run_recreates_after_preemption_and_trains_again():
    cloud = FakeCloud(["READY", "PREEMPTED", "READY", "READY"], ["gone", "gone", "0"])
    assert cloud.run(V5E) == 0
    assert cloud.executed == ["install", "train", "tpu-vm delete", "tpu-vm create", "install",
                              "train"]


def test_run_creates_a_missing_tpu_and_waits_for_the_queue():
    cloud = FakeCloud(["MISSING", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "ACTIVE",
                       "ACTIVE"], ["gone", "running", "0"])
    assert cloud.run(V5P) == 0
    assert cloud.executed == ["queued-resources create", "install", "install", "train", "train"]


def test_run_recreates_a_suspended_queued_resource():
    cloud = FakeCloud(["ACTIVE", "SUSPENDED", "ACTIVE", "ACTIVE"], ["gone", "gone", "0"])
    assert cloud.run(V5P) == 0
    assert cloud.executed[4:8] == ["queued-resources delete", "queued-resources create",
                                   "install", "install"]


def test_run_deletes_the_tpu_when_done_if_asked():
    cloud = FakeCloud(["READY"], ["gone", "running", "0"])
    assert cloud.run(V5E + ["--delete-when-done"]) == 0
    assert cloud.executed == ["install", "train", "tpu-vm delete"]


def test_run_gives_up_after_max_restarts():
    cloud = FakeCloud(["READY", "PREEMPTED"], ["gone"])
    with pytest.raises(tpu.LaunchError, match="--max-restarts 2 are used up; run again"):
        cloud.run(V5E + ["--max-restarts", "2"])
    assert cloud.executed.count("tpu-vm create") == 2


def test_run_attaches_to_a_running_job_and_reports_a_crash():
    cloud = FakeCloud(["READY"], ["running", "running", "1", "1"])
    with pytest.raises(tpu.LaunchError, match="exited with code 1; see its log"):
        cloud.run(V5E)
    assert cloud.executed == []
    assert cloud.sleeps == 3  # the crash is reported after one more poll, not at once


def test_run_waits_a_poll_before_blaming_a_crash_on_the_code():
    """A preempted host can crash the job before the TPU's state reads PREEMPTED."""
    cloud = FakeCloud(["READY", "READY", "READY", "PREEMPTED", "READY", "READY"],
                      ["gone", "running", "1", "gone", "0"])
    assert cloud.run(V5E) == 0
    assert cloud.executed == ["install", "train", "tpu-vm delete", "tpu-vm create", "install",
                              "train"]


@pytest.mark.parametrize("how", ["stopped", "gone"])
def test_run_restarts_training_stopped_on_a_healthy_tpu(how):
    """SIGTERM (exit 0, but not finished) or a reboot: train again once the state stays READY."""
    cloud = FakeCloud(["READY"], ["gone", "running", how, how, "running", "0"])
    assert cloud.run(V5E) == 0
    assert cloud.executed == ["install", "train", "train"]


def test_main_runs_the_commands_through_the_runner():
    executed = []
    assert tpu.main(["delete", *V5P], execute=executed.extend) == 0
    assert executed == tpu.delete_commands(parse(V5P, "delete"))
