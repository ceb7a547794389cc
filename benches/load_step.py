"""Section l of the benchmarks: the GPT LoRA step of section f, quiet and on a busy machine.

Each case is timed twice in one run: on the machine as it is, then while this bench keeps one
busy process per core this process may use (a spinning loop each, started before and stopped
after). With one busy process per core a single thread gets about half a core, so 2x is the
floor; NumPy's BLAS threads, each waiting for a time slice, can make a step far slower.

Three thread settings, each for the op-by-op and the replayed step:

- ``auto``: graphlora's default (``graphlora.blas``): one BLAS thread for small products, the
  cores other processes leave free for large ones;
- ``all``: every product on all the allowed cores (``gl.set_num_threads(cores)``), as NumPy's
  BLAS does by default;
- ``one``: every product on one thread (``gl.set_num_threads(1)``).

    python benches/load_step.py            # both sizes
    python benches/load_step.py --quick    # the small size, few rounds
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import gpt_step

import graphlora as gl
from graphlora import blas

SETTINGS: dict[str, Callable[[], int | None]] = {
    "auto": lambda: None,
    "all": blas.allowed_cores,
    "one": lambda: 1,
}


def _spin(stop: Any) -> None:
    """A busy process: spins until ``stop`` is set."""
    while not stop.is_set():
        pass


class Load:
    """``with Load(n):`` keeps ``n`` busy processes running inside the block."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.context = multiprocessing.get_context("spawn")
        self.stop = self.context.Event()
        self.workers: list[Any] = []

    def __enter__(self) -> Load:
        self.workers = [
            self.context.Process(target=_spin, args=(self.stop,), daemon=True)
            for _ in range(self.count)
        ]
        for worker in self.workers:
            worker.start()
        time.sleep(1.0)  # let them start spinning (and /proc/loadavg see them)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()


def _time(step: Callable[[], None], rounds: int, min_batch: float) -> list[float]:
    """Seconds per step in each of ``rounds`` rounds (each at least ``min_batch`` seconds)."""
    step()
    times = []
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while True:
            step()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_batch:
                break
        times.append(elapsed / count)
    return times


def section_l(rounds: int, min_batch: float, quick: bool) -> list[dict[str, Any]]:
    """Each size, setting and way of running: its median step time quiet and loaded."""
    names = ["small"] if quick else ["small", "medium"]
    cores = blas.allowed_cores()
    steps = {
        (name, replay): gpt_step.graphlora_step(gpt_step.SIZES[name], replay)[0]
        for name in names
        for replay in (False, True)
    }
    quiet: dict[tuple[str, bool, str], list[float]] = {}
    loaded: dict[tuple[str, bool, str], list[float]] = {}
    for phase, store in (("quiet", quiet), ("loaded", loaded)):
        load = Load(cores) if phase == "loaded" else None
        if load is not None:
            load.__enter__()
        try:
            for (name, replay), step in steps.items():
                for setting, count in SETTINGS.items():
                    with gl.threads(count()):
                        store[name, replay, setting] = _time(step, rounds, min_batch)
        finally:
            if load is not None:
                load.__exit__()
    rows = []
    for (name, replay, setting), times in quiet.items():
        q, lo = statistics.median(times), statistics.median(loaded[name, replay, setting])
        rows.append(
            {
                "size": name,
                "run": "replayed" if replay else "op by op",
                "threads": setting,
                "cores": cores,
                "seconds": {"quiet": q, "loaded": lo},
                "loaded_over_quiet": lo / q,
            }
        )
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    cores = rows[0]["cores"] if rows else 0
    print(f"\n(l) the GPT LoRA step quiet and with {cores} busy processes (one per allowed core)")
    print(
        f"{'size':7} {'run':9} {'threads':8} {'quiet ms':>9} {'loaded ms':>10} {'loaded/quiet':>13}"
    )
    for row in rows:
        s = row["seconds"]
        print(
            f"{row['size']:7} {row['run']:9} {row['threads']:8} {1e3 * s['quiet']:9.2f} "
            f"{1e3 * s['loaded']:10.2f} {row['loaded_over_quiet']:12.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds, min_batch = (3, 0.05) if args.quick else (7, 0.2)
    report(section_l(rounds, min_batch, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
