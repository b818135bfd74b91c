"""Joining a multi-process (multi-host) JAX job, before anything touches a device.

Three ways, in order:
  1. explicit: a coordinator address, process count and id (flags, or the environment
     variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID);
  2. auto-detected: on a Cloud TPU VM with several workers (TPU_WORKER_HOSTNAMES lists more
     than one) or a multi-slice job (MEGASCALE_COORDINATOR_ADDRESS), or under SLURM / Open MPI,
     `jax.distributed.initialize()` finds everything itself;
  3. otherwise one process: nothing to do.
"""

from __future__ import annotations

import itertools
import os

import jax
from absl import logging

_AUTO_ENV = ("MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
_barriers = itertools.count()  # every process passes the same barriers in the same order


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def multi_host_environment() -> bool:
    """Whether the environment describes a multi-process job JAX can detect by itself."""
    workers = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return len(workers) > 1 or any(os.environ.get(name) for name in _AUTO_ENV)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the job if there is one to join; returns whether this is a multi-process job.

    Call once, first thing: JAX refuses to initialise after it has used a device.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                f"a coordinator address ({coordinator_address}) needs the process count and this "
                "process's id: --num_processes and --process_id (or JAX_NUM_PROCESSES and "
                "JAX_PROCESS_ID)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif num_processes not in (None, 1) or process_id not in (None, 0):
        raise ValueError(f"--num_processes={num_processes} / --process_id={process_id} need "
                         "--coordinator_address (host:port of process 0)")
    elif multi_host_environment():
        jax.distributed.initialize()
    else:
        return False
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Every process waits here until all have arrived; nothing to do in a one-process job.

    Through the coordination service, not a device collective. On CPU, XLA's gloo
    collectives give a group of devices 30 s to assemble at its first collective and then
    fail ("Gloo context initialization failed: ... GetKeyValue() timed out"), so processes
    that reach a new program minutes apart (one compiled slower, or finished its share of
    a sweep sooner) must meet here first.
    """
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp

    key = f"lumiere_jax.{name}.{next(_barriers)}"
    ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)
