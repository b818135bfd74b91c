"""Run `lumiere train` on Cloud TPU: create, install, train, watch, resume after preemption, delete.

  python -m launch.tpu run --name lumiere-v5e --zone us-west4-a --accelerator-type v5litepod-8 \\
      --spot --repo https://github.com/you/lumiere_jax --ref main \\
      --config configs/shapes_t2i.py --workdir gs://your-bucket/runs/t2i --config.train.steps=20000

Subcommands: create, install, train, logs, run, delete. Each takes --dry-run, which prints the
gcloud commands (one per line, shell-quoted) instead of running them. The commands are built by
pure functions so tests can check them exactly; running them is a thin subprocess layer, and the
`run` loop takes its probes and runner as arguments for the same reason. Guide: docs/tpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

Command = list[str]

# Default runtime (TPU VM image) per generation; override with --runtime-version.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
GENERATION_ALIASES = {"v5e": "v5litepod"}  # gcloud spells v5e accelerator types v5litepod-N
# The size suffix counts TensorCores on v4 and v5p (2 per chip) but chips on v5e and v6e.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5litepod": 1, "v6e": 1}
# Slices up to this many chips sit on one host; larger slices have 4 chips per host.
SINGLE_HOST_MAX_CHIPS = {"v4": 4, "v5p": 4, "v5litepod": 8, "v6e": 8}
CHIPS_PER_POD_HOST = 4

# On every worker. `~` is left unquoted in the scripts below so the remote shell expands it.
REMOTE_DIR = "~/lumiere"
LOG_FILE = "~/lumiere-train.log"
EXIT_FILE = "~/lumiere-train.exit"
PID_FILE = "~/lumiere-train.pid"
STOP_FILE = "~/lumiere-train.sigterm"  # `lumiere train` exits 0 on SIGTERM too (a spot notice)
# jax 0.10 needs Python >= 3.11 and the TPU images ship 3.10, so the venv comes from uv.
PYTHON_VERSION = "3.11"
# gcsfs: etils.epath reads configs and writes the resolved config to gs:// through it.
TPU_REQUIREMENTS = ("jax[tpu]", "gcsfs")
UV_INSTALLER = "https://astral.sh/uv/install.sh"

READY_STATES = {"READY", "ACTIVE"}  # TPU VM / queued resource
LOST_STATES = {"PREEMPTED", "SUSPENDED", "FAILED"}  # delete and recreate
MISSING = "MISSING"
# What worker 0's job probe prints, besides an exit code.
JOB_RUNNING, JOB_STOPPED, JOB_GONE = "running", "stopped", "gone"


class LaunchError(Exception):
    """Bad input or a job that cannot go on; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Topology:
    accelerator_type: str  # as gcloud spells it
    generation: str
    chips: int
    hosts: int  # per slice

    def describe(self, num_slices: int) -> str:
        hosts = (f"{self.hosts} hosts of {self.chips // self.hosts} chips" if self.hosts > 1
                 else "1 host")
        text = f"{self.accelerator_type}: {self.chips} chips on {hosts}"
        if num_slices > 1:
            text += f", x{num_slices} slices = {self.hosts * num_slices} hosts"
        kind = "multi-host" if self.hosts * num_slices > 1 else "single-host"
        return f"{text} ({kind}); runtime {RUNTIME_VERSIONS[self.generation]} by default"


def topology(accelerator_type: str) -> Topology:
    """Chips and hosts of an accelerator type: only to tell single- from multi-host jobs."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator_type or "")
    if not match:
        raise LaunchError(
            f"--accelerator-type {accelerator_type!r} is not a TPU type this tool knows: give "
            f"GENERATION-SIZE with GENERATION one of v4, v5p, v5litepod (or v5e), v6e, e.g. "
            f"v5litepod-8 or v5p-128")
    generation = GENERATION_ALIASES.get(match[1], match[1])
    size = int(match[2])
    cores_per_chip = CORES_PER_CHIP[generation]
    if size == 0 or size % cores_per_chip:
        raise LaunchError(f"--accelerator-type {accelerator_type}: the size of a {match[1]} "
                          f"slice counts TensorCores, a multiple of {cores_per_chip}")
    chips = size // cores_per_chip
    if chips <= SINGLE_HOST_MAX_CHIPS[generation]:
        hosts = 1
    elif chips % CHIPS_PER_POD_HOST:
        raise LaunchError(f"--accelerator-type {accelerator_type}: a multi-host slice has a "
                          f"multiple of {CHIPS_PER_POD_HOST} chips")
    else:
        hosts = chips // CHIPS_PER_POD_HOST
    return Topology(f"{generation}-{size}", generation, chips, hosts)


# ---------------------------------------------------------------------------- validation

def check_slices(args: argparse.Namespace) -> None:
    if args.num_slices < 1:
        raise LaunchError(f"--num-slices must be at least 1 (got {args.num_slices})")
    if args.num_slices > 1 and not args.queued:
        raise LaunchError(f"--num-slices {args.num_slices}: multi-slice TPUs exist only as "
                          "queued resources; add --queued")


def check_create(args: argparse.Namespace) -> Topology:
    check_slices(args)
    if args.queued and args.preemptible:
        raise LaunchError("--preemptible does not apply to queued resources; use --spot")
    return topology(args.accelerator_type)


def check_install(args: argparse.Namespace) -> None:
    check_slices(args)
    if not args.repo:
        raise LaunchError("install needs --repo GIT_URL: the repository every worker clones "
                          "(e.g. https://github.com/you/lumiere_jax), with --ref BRANCH|TAG|SHA")


def check_train(args: argparse.Namespace) -> Topology:
    check_slices(args)
    if not args.config:
        raise LaunchError("train needs --config FILE.py[:ARG] (a path in the repository, e.g. "
                          "configs/lumiere_base.py, or a gs:// path)")
    if not args.workdir:
        raise LaunchError("train needs --workdir DIR (a gs:// path for multi-host jobs)")
    if not args.accelerator_type:
        raise LaunchError("train needs --accelerator-type (to tell single- from multi-host)")
    topo = topology(args.accelerator_type)
    if topo.hosts * args.num_slices > 1 and not args.workdir.startswith("gs://"):
        raise LaunchError(
            f"--workdir {args.workdir}: a multi-host job ({topo.hosts * args.num_slices} hosts) "
            "needs a gs:// workdir, since every host must see the same checkpoints; create a "
            "bucket (gsutil mb -l REGION gs://BUCKET) and pass --workdir gs://BUCKET/runs/NAME")
    return topo


# ---------------------------------------------------------------------------- commands

def queued_resource_id(args: argparse.Namespace) -> str:
    return args.queued_resource_id or f"{args.name}-qr"


def node_names(args: argparse.Namespace) -> list[str]:
    """TPU VM names: a multi-slice queued resource names its slices PREFIX-0, PREFIX-1, ..."""
    if args.num_slices > 1:
        return [f"{args.name}-{i}" for i in range(args.num_slices)]
    return [args.name]


def gcloud(args: argparse.Namespace, *words: str) -> Command:
    command = ["gcloud", "compute", "tpus", *words]
    return command + (["--project", args.project] if args.project else [])


def ssh(args: argparse.Namespace, node: str, worker: str, script: str) -> Command:
    return gcloud(args, "tpu-vm", "ssh", node, "--zone", args.zone, f"--worker={worker}",
                  "--command", script)


def create_commands(args: argparse.Namespace) -> list[Command]:
    topo = check_create(args)
    runtime = args.runtime_version or RUNTIME_VERSIONS[topo.generation]
    if not args.queued:
        return [gcloud(args, "tpu-vm", "create", args.name, "--zone", args.zone,
                       "--accelerator-type", topo.accelerator_type, "--version", runtime,
                       *(["--spot"] if args.spot else []),
                       *(["--preemptible"] if args.preemptible else []))]
    nodes = (["--node-count", str(args.num_slices), "--node-prefix", args.name]
             if args.num_slices > 1 else ["--node-id", args.name])
    return [gcloud(args, "queued-resources", "create", queued_resource_id(args), *nodes,
                   "--zone", args.zone, "--accelerator-type", topo.accelerator_type,
                   "--runtime-version", runtime, *(["--spot"] if args.spot else []))]


def install_script(repo: str, ref: str) -> str:
    """Clone (or update) the repository at `ref`; install it, jax[tpu] and gcsfs in a venv."""
    return "; ".join([
        "set -eo pipefail",
        'export PATH="$HOME/.local/bin:$PATH"',
        f"command -v uv >/dev/null || curl -LsSf {UV_INSTALLER} | sh",
        f"[ -d {REMOTE_DIR}/.git ] || git clone --quiet {shlex.quote(repo)} {REMOTE_DIR}",
        f"cd {REMOTE_DIR}",
        f"git fetch --quiet origin {shlex.quote(ref)}",
        "git checkout --quiet --force FETCH_HEAD",
        f"[ -x .venv/bin/python ] || uv venv --quiet --python {PYTHON_VERSION} .venv",
        "uv pip install --quiet --python .venv/bin/python -e . "
        + " ".join(f'"{r}"' for r in TPU_REQUIREMENTS),
    ])


def install_commands(args: argparse.Namespace) -> list[Command]:
    check_install(args)
    script = install_script(args.repo, args.ref)
    return [ssh(args, node, "all", script) for node in node_names(args)]


def train_script(config: str, workdir: str, overrides: Sequence[str]) -> str:
    """Start training in the background (it outlives the ssh session) unless it is running.

    `lumiere train` finds the other hosts itself on Cloud TPU and resumes from the workdir's
    latest checkpoint, so the same script serves a first start and every restart.
    """
    train = shlex.join([".venv/bin/lumiere", "train", "--config", config, "--workdir", workdir,
                        *overrides])
    job = f'trap "touch {STOP_FILE}" TERM; {train}; echo $? > {EXIT_FILE}'
    return (f"cd {REMOTE_DIR}; "
            f'if [ ! -f {EXIT_FILE} ] && kill -0 "$(cat {PID_FILE} 2>/dev/null)" 2>/dev/null; then '
            f'echo "lumiere train is already running here; see {LOG_FILE}" >&2; exit 1; fi; '
            f"rm -f {EXIT_FILE} {STOP_FILE}; "
            f"nohup sh -c {shlex.quote(job)} >> {LOG_FILE} 2>&1 < /dev/null & "
            f"echo $! > {PID_FILE}")


def train_commands(args: argparse.Namespace) -> list[Command]:
    check_train(args)
    script = train_script(args.config, args.workdir, args.overrides)
    return [ssh(args, node, "all", script) for node in node_names(args)]


def logs_commands(args: argparse.Namespace) -> list[Command]:
    check_slices(args)
    if not 0 <= args.slice < args.num_slices:
        raise LaunchError(f"--slice {args.slice} is not in [0, {args.num_slices}) (--num-slices)")
    node = node_names(args)[args.slice]
    return [ssh(args, node, args.worker, f"tail -n 100 -f {LOG_FILE}")]


def delete_commands(args: argparse.Namespace) -> list[Command]:
    check_slices(args)
    if args.queued:  # --force deletes the queued resource's TPU VMs too
        return [gcloud(args, "queued-resources", "delete", queued_resource_id(args),
                       "--zone", args.zone, "--force", "--quiet")]
    return [gcloud(args, "tpu-vm", "delete", args.name, "--zone", args.zone, "--quiet")]


def state_command(args: argparse.Namespace) -> Command:
    if args.queued:
        return gcloud(args, "queued-resources", "describe", queued_resource_id(args),
                      "--zone", args.zone, "--format=value(state.state)")
    return gcloud(args, "tpu-vm", "describe", args.name, "--zone", args.zone,
                  "--format=value(state)")


def job_command(args: argparse.Namespace) -> Command:
    """Worker 0's job: `running`, `stopped` (by SIGTERM), `gone` (no job), or its exit code."""
    script = (f"if [ -f {STOP_FILE} ]; then echo {JOB_STOPPED}; "
              f"elif [ -f {EXIT_FILE} ]; then cat {EXIT_FILE}; "
              f'elif kill -0 "$(cat {PID_FILE} 2>/dev/null)" 2>/dev/null; then echo {JOB_RUNNING}; '
              f"else echo {JOB_GONE}; fi")
    return ssh(args, node_names(args)[0], "0", script)


def run_plan(args: argparse.Namespace) -> list[Command | str]:
    """What `run` does, for --dry-run: commands, and comments for the watch loop."""
    return [*create_commands(args), *install_commands(args), *train_commands(args),
            f"# then every {args.poll_seconds:g}s: {shlex.join(state_command(args))}",
            f"# and: {shlex.join(job_command(args))}",
            f"# if {'/'.join(sorted(LOST_STATES))} (at most {args.max_restarts} times): "
            "delete, create, install, train (resumes from the workdir's latest checkpoint):",
            *(f"#   {shlex.join(c)}" for c in delete_commands(args)),
            *(["# when training has finished (--delete-when-done):"]
              + [shlex.join(c) for c in delete_commands(args)] if args.delete_when_done else [])]


# ---------------------------------------------------------------------------- running

def log(message: str) -> None:
    print(f"[launch.tpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def execute(commands: Sequence[Command]) -> None:
    for command in commands:
        log(f"$ {shlex.join(command)}")
        subprocess.run(command, check=True)


def probe_state(args: argparse.Namespace) -> str:
    """The TPU's (or queued resource's) state; MISSING if it does not exist."""
    result = subprocess.run(state_command(args), capture_output=True, text=True)
    if result.returncode == 0:
        return result.stdout.strip() or "UNKNOWN"
    if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
        return MISSING
    log(f"could not read the state (will retry): {result.stderr.strip()}")
    return "UNKNOWN"  # a network blip must not end a long watch


def probe_job(args: argparse.Namespace) -> str:
    result = subprocess.run(job_command(args), capture_output=True, text=True)
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "UNKNOWN"


def run_loop(args: argparse.Namespace, *, execute: Callable[[Sequence[Command]], None] = execute,
             probe_state: Callable[[argparse.Namespace], str] = probe_state,
             probe_job: Callable[[argparse.Namespace], str] = probe_job,
             sleep: Callable[[float], None] = time.sleep) -> int:
    """Create if missing, install, train, watch; recreate and resume after each preemption."""
    check_create(args)
    check_install(args)
    check_train(args)
    restarts, started, settling = 0, False, False

    def count_restart(why: str) -> None:
        nonlocal restarts
        if restarts >= args.max_restarts:
            raise LaunchError(f"{why}, and --max-restarts {args.max_restarts} are used up; run "
                              f"again to resume from the latest checkpoint in {args.workdir}")
        restarts += 1
        log(f"{why}: restart {restarts} of {args.max_restarts}, resuming from {args.workdir}")

    while True:
        state = probe_state(args)
        if state == MISSING:
            log(f"{args.name} does not exist: creating it")
            execute(create_commands(args))
            started = False
        elif state in LOST_STATES:
            count_restart(f"{args.name} is {state}")
            execute(delete_commands(args))
            execute(create_commands(args))
            started = False
        elif state in READY_STATES:
            job = probe_job(args)
            if not started:
                if job == JOB_RUNNING:
                    log("training is already running: watching it")
                else:
                    execute(install_commands(args))
                    execute(train_commands(args))
                started, settling = True, False
            elif job == JOB_RUNNING:
                settling = False
            elif job == "0":
                log(f"training finished; the run is in {args.workdir}")
                if args.delete_when_done:
                    execute(delete_commands(args))
                return 0
            elif job in (JOB_STOPPED, JOB_GONE) or job.isdigit():
                if not settling:  # give the state a poll to catch up: a preempted TPU, or a
                    settling = True  # host of it, can stop the job before it reads PREEMPTED
                elif not job.isdigit():  # SIGTERM'd, or the VM rebooted, but the TPU is fine
                    count_restart(f"training is {job} on worker 0")
                    execute(train_commands(args))
                    settling = False
                else:
                    where = (f" --queued --num-slices {args.num_slices}"
                             if args.num_slices > 1 else "")
                    raise LaunchError(f"training exited with code {job}; see its log: python -m "
                                      f"launch.tpu logs --name {args.name} --zone {args.zone}"
                                      f"{where}")
        sleep(args.poll_seconds)


# ---------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument
    add("--name", required=True, help="TPU VM name (multi-slice: the prefix of the slices)")
    add("--zone", required=True, help="e.g. us-west4-a (v5e), us-east5-a (v5p)")
    add("--project", help="Google Cloud project (default: gcloud's configured one)")
    add("--accelerator-type", help="e.g. v5litepod-8, v5p-128, v4-32, v6e-8")
    add("--runtime-version", help="TPU VM image (default: per generation, see RUNTIME_VERSIONS)")
    preemption = common.add_mutually_exclusive_group()
    preemption.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, "
                            "preemptible at any time")
    preemption.add_argument("--preemptible", action="store_true", help="legacy preemptible TPU "
                            "VM (24 h limit; not with --queued)")
    add("--queued", action="store_true", help="create through a queued resource")
    add("--queued-resource-id", help="default: NAME-qr")
    add("--num-slices", type=int, default=1, help="multi-slice (needs --queued)")
    add("--repo", help="git URL every worker clones (install, run)")
    add("--ref", default="main", help="branch, tag or full commit SHA to install")
    add("--config", help="config for `lumiere train`: a path in the repo, or gs://")
    add("--workdir", help="run directory for `lumiere train` (gs:// when multi-host)")
    add("--worker", default="0", help="logs: which worker")
    add("--slice", type=int, default=0, help="logs: which slice")
    add("--max-restarts", type=int, default=5, help="run: recreations after preemption")
    add("--delete-when-done", action="store_true", help="run: delete the TPU after training "
        "finishes (it bills while it exists, idle or not)")
    add("--poll-seconds", type=float, default=300, help="run: seconds between state checks")
    add("--dry-run", action="store_true", help="print the commands instead of running them")
    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu", description=__doc__.split("\n\n")[0],
        epilog="Extra --config.KEY=VALUE flags are passed to `lumiere train`.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in [("create", "create the TPU VM or queued resource"),
                       ("install", "install the project and jax[tpu] on every worker"),
                       ("train", "start `lumiere train` on every worker, in the background"),
                       ("logs", "follow a worker's training log"),
                       ("run", "create, install, train, watch, resume after preemption"),
                       ("delete", "delete the TPU VM or queued resource")]:
        commands.add_parser(name, parents=[common], help=text, description=text)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags, with the --config.KEY=VALUE overrides for `lumiere train` in `.overrides`."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not re.fullmatch(r"--config\.[\w.]+=.*", a)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides are "
                     "written --config.KEY=VALUE)")
    args.overrides = [a for a in extra if a not in unknown]
    return args


PLANS = {"create": create_commands, "install": install_commands, "train": train_commands,
         "logs": logs_commands, "run": run_plan, "delete": delete_commands}


def main(argv: Sequence[str] | None = None, **run_hooks) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plan = PLANS[args.command](args)
        if args.dry_run:
            if args.accelerator_type:
                print(f"# {topology(args.accelerator_type).describe(args.num_slices)}")
            for line in plan:
                print(line if isinstance(line, str) else shlex.join(line))
            return 0
        if args.command == "run":
            return run_loop(args, **run_hooks)
        run_hooks.get("execute", execute)(plan)
        return 0
    except LaunchError as e:
        print(f"launch.tpu: error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"launch.tpu: command failed (exit {e.returncode}): {shlex.join(e.cmd)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C ends `logs` (and `run`, leaving the TPU as it is)
        return 130


if __name__ == "__main__":
    sys.exit(main())
