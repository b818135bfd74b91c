"""SIGTERM -> save at the next step boundary, agreed by every process, then stop cleanly.

Cloud TPU spot/preemptible VMs get SIGTERM shortly before they are taken away. The handler only
sets a flag; the training loop asks `should_stop()` at each step boundary, which all processes
answer together (the flag is OR-ed across processes), so every host saves the same step and
leaves the loop at the same point. A second SIGTERM while stopping changes nothing.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionGuard:
    """Context manager: installs the SIGTERM handler, restores the previous one on exit."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._signals = signals
        self._previous: dict[int, object] = {}
        self._requested = threading.Event()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self._requested.set()

    def request(self) -> None:
        """What the signal does; for tests and for callers with their own notices."""
        self._requested.set()

    @property
    def requested(self) -> bool:
        """Whether this process got the signal (no agreement; use should_stop in the loop)."""
        return self._requested.is_set()

    def should_stop(self, after: Any = None) -> bool:
        """True on every process once any process got the signal. Collective: every process
        must call it at the same step.

        after: arrays of the work in flight (e.g. the step's outputs), finished first. CPU
        collectives (gloo) pair up by order across processes; with the step's all-reduces still
        running, the agreement's gather could pair with one of them and hang both processes
        (seen on a loaded 2-core machine). The gather waits for the step anyway, so waiting
        first costs nothing."""
        local = np.asarray([self._requested.is_set()], np.int32)
        if jax.process_count() == 1:
            return bool(local[0])
        jax.block_until_ready(after)
        return bool(np.max(multihost_utils.process_allgather(local)))
