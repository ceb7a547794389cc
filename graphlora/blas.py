"""How many threads NumPy's BLAS may use for each matrix product (through threadpoolctl).

A second BLAS thread pays for itself only on large products, and only when a core is free for
it: on a busy machine (a CI runner, a shared server, a student's laptop compiling something) a
multi-threaded product waits for a time slice and a step can take ten times longer than on one
thread. So by default each product chooses (``fit``): one thread below ``SMALL_WORK``
multiply-adds, else as many as the cores this process may use (``os.sched_getaffinity``) that
other processes' running threads leave free: ``/proc/loadavg``'s running count less this
process's own running threads (``/proc/self/task``), read at most every ``LOAD_INTERVAL``
seconds (``os.getloadavg`` where there is no ``/proc``).

``set_num_threads(n)`` fixes the count instead (``None``: back to choosing), and ``with
threads(n):`` fixes it for a block.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "LOAD_INTERVAL",
    "SMALL_WORK",
    "allowed_cores",
    "fit",
    "get_num_threads",
    "running_from",
    "set_num_threads",
    "spare_cores",
    "state_from",
    "threads",
]

SMALL_WORK = 1 << 22
"""Multiply-adds below which a product runs on one thread (about 4 million: ``[128, 192] @ [192,
128]`` is below, ``[256, 256] @ [256, 256]`` above; measured on two cores, a second thread is
slower below and up to 1.9x faster above)."""
LOAD_INTERVAL = 0.5
"""Seconds between two readings of how busy the machine is."""

_fixed: int | None = None  # set_num_threads' count, or None: each product chooses
_now: int | None = None  # what the BLAS libraries were last set to by this module
_spare: tuple[float, int] = (-1e9, 1)  # (when read, cores free for this process)
_libraries: list[Any] | None = None  # threadpoolctl's controllers of the BLAS libraries


def allowed_cores() -> int:
    """The cores this process may run on (its affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)  # pragma: no cover - no affinity outside Linux


def running_from(loadavg: str) -> float:
    """The threads running or waiting to run, from ``/proc/loadavg``'s text (its fourth field,
    ``running/total``)."""
    return float(loadavg.split()[3].split("/")[0])


def _running() -> float:
    """How many threads are running or waiting to run now (``/proc/loadavg``), else the
    one-minute load average."""
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            return running_from(handle.read())
    except (OSError, IndexError, ValueError):  # pragma: no cover - no /proc outside Linux
        return os.getloadavg()[0]


def state_from(stat: bytes) -> bytes:
    """A thread's state letter from its ``/proc/.../stat`` line (``R`` when running)."""
    end = stat.rindex(b")")  # the command name, in parentheses, may hold spaces
    return stat[end + 2 : end + 3]


def _own_running() -> int | None:
    """How many of this process's threads are running now (its BLAS threads still spinning,
    another library's), from ``/proc/self/task``; None where there is no such folder."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:  # pragma: no cover - no /proc outside Linux
        return None
    count = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat", "rb") as handle:
                count += state_from(handle.read()) == b"R"
        except (OSError, ValueError):  # a thread that just ended
            continue
    return max(1, count)


def spare_cores() -> int:
    """The cores free for this process's BLAS threads: its allowed cores less the threads other
    processes are running (this process's own running threads, its BLAS threads still spinning
    among them, are not counted), at least 1. Read at most every ``LOAD_INTERVAL`` seconds."""
    global _spare
    now = time.monotonic()
    if now - _spare[0] >= LOAD_INTERVAL:
        own = _own_running()
        others = _running() - (own if own is not None else (_now or 1))
        _spare = (now, max(1, min(allowed_cores(), int(allowed_cores() - others + 0.5))))
    return _spare[1]


def _set(count: int) -> None:
    """Set every BLAS library NumPy loaded to ``count`` threads."""
    global _libraries, _now
    if _libraries is None:
        from threadpoolctl import ThreadpoolController

        _libraries = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    for library in _libraries:
        library.set_num_threads(count)
    _now = count


def fit(work: int) -> None:
    """Set the BLAS threads for a product of ``work`` multiply-adds: the fixed count if there is
    one, else one thread below ``SMALL_WORK`` and the spare cores above."""
    if _fixed is not None:
        want = _fixed
    elif work < SMALL_WORK:
        want = 1
    else:
        want = spare_cores()
    if want != _now:
        _set(want)


def set_num_threads(count: int | None) -> None:
    """Fix the number of BLAS threads every product uses (``None``: each product chooses, as
    ``fit`` says; the default).

    Raises
    ------
    TypeError, ValueError
        For a count that is not an int >= 1 or None.
    """
    global _fixed
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"set_num_threads: count must be an int or None, got {count!r}")
        if count < 1:
            raise ValueError(f"set_num_threads: count must be >= 1, got {count}")
    _fixed = count
    if count is not None:
        _set(count)


def get_num_threads() -> int | None:
    """The fixed number of BLAS threads, or ``None`` when each product chooses."""
    return _fixed


@contextmanager
def threads(count: int | None) -> Iterator[None]:
    """``with threads(n):`` fixes the BLAS threads to ``n`` inside the block (``None``: each
    product chooses), and restores what was set before on leaving."""
    before = _fixed
    set_num_threads(count)
    try:
        yield
    finally:
        set_num_threads(before)
