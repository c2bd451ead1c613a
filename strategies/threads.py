"""How many intra-op threads one aggregation may use: no more than the cores nobody else is using.

torch (and numba, which the fused AME kernel runs on) start one intra-op thread per
core. On a host where another process keeps a core busy, a parallel kernel's threads
wait at every barrier for the one that was descheduled: measured (issue 21) FedSoup's
default round took 4–55× Flower's single-threaded numpy FedAvg with torch's default
threads and one core busy, 0.5× on a quiet host. So each aggregation picks its thread
count from the cores this process may run on (``os.sched_getaffinity``) minus the load
of everything else, never more than the caller's own setting, and puts both libraries
back as they were when it ends.

The load of everything else is the larger of

- the runnable tasks right now (``/proc/loadavg``'s 4th field) minus this thread:
  a busy process that started a second ago counts at once;
- the 1-minute load average (``os.getloadavg``): a process that is busy in bursts
  counts although it may be asleep at the instant of the sample.

Over-counting only costs parallelism (one thread is what Flower's numpy FedAvg
uses); under-counting costs the stalls above.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator

import torch

__all__ = ["choose_threads", "busy_cores", "available_cores", "aggregation_threads"]


def choose_threads(cores: int, busy: float, limit: int) -> int:
    """``cores`` minus the ``busy`` load (rounded to the nearest core), within ``[1, limit]``."""
    idle = math.floor(cores - busy + 0.5)
    return max(1, min(limit, idle))


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores() -> float:
    """The load of everything but this thread: max(runnable now − 1, 1-minute load average)."""
    running = 0.0
    try:
        with open("/proc/loadavg", encoding="ascii") as file:
            running = float(file.read().split()[3].split("/")[0]) - 1.0
    except (OSError, IndexError, ValueError):
        pass
    try:
        average = os.getloadavg()[0]
    except (AttributeError, OSError):
        average = 0.0
    return max(running, average, 0.0)


@contextlib.contextmanager
def aggregation_threads() -> Iterator[int]:
    """Run the block on :func:`choose_threads` torch (and numba, if loaded) threads; restore both after."""
    torch_threads = torch.get_num_threads()
    threads = choose_threads(available_cores(), busy_cores(), torch_threads)
    numba = sys.modules.get("numba")  # only if already loaded: the plain soup never needs it
    numba_threads = numba.get_num_threads() if numba is not None else None
    torch.set_num_threads(threads)
    if numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield threads
    finally:
        torch.set_num_threads(torch_threads)
        if numba is not None:
            numba.set_num_threads(numba_threads)
