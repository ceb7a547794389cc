"""The BLAS thread policy (graphlora.blas): each product's choice by its size and the machine's
load, a fixed count, the ops that ask, and the real BLAS library following."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import graphlora as gl
from graphlora import blas
from graphlora.lora.fused import lora_linear


class FakeLibrary:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def set_num_threads(self, count: int) -> None:
        self.calls.append(count)


@pytest.fixture
def library(monkeypatch: pytest.MonkeyPatch) -> FakeLibrary:
    """A stand-in BLAS library, a quiet 4-core machine, and the policy's state reset."""
    fake = FakeLibrary()
    monkeypatch.setattr(blas, "_libraries", [fake])
    monkeypatch.setattr(blas, "_fixed", None)
    monkeypatch.setattr(blas, "_now", None)
    monkeypatch.setattr(blas, "_spare", (-1e9, 1))
    monkeypatch.setattr(blas, "allowed_cores", lambda: 4)
    monkeypatch.setattr(blas, "_running", lambda: 1.0)
    monkeypatch.setattr(blas, "_own_running", lambda: None)  # as without /proc/self/task
    return fake


def test_small_products_run_on_one_thread_and_large_ones_on_the_spare_cores(
    library: FakeLibrary,
) -> None:
    blas.fit(blas.SMALL_WORK - 1)
    blas.fit(100)  # unchanged: the library is not called again
    blas.fit(blas.SMALL_WORK)
    blas.fit(blas.SMALL_WORK * 8)
    assert library.calls == [1, 4]


def test_a_busy_machine_leaves_fewer_cores(
    library: FakeLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(blas.time, "monotonic", lambda: clock[0])
    running = [3.0]  # ourselves and two busy processes
    monkeypatch.setattr(blas, "_running", lambda: running[0])
    blas.fit(blas.SMALL_WORK)
    assert library.calls == [2]  # 4 cores less the 2 others
    running[0] = 9.0  # far busier, but not read again before LOAD_INTERVAL
    clock[0] += blas.LOAD_INTERVAL / 2
    blas.fit(blas.SMALL_WORK)
    assert library.calls == [2]
    clock[0] += blas.LOAD_INTERVAL
    blas.fit(blas.SMALL_WORK)
    assert library.calls == [2, 1]  # never fewer than one
    running[0] = 1.0  # quiet again: every core
    clock[0] += blas.LOAD_INTERVAL
    blas.fit(blas.SMALL_WORK)
    assert library.calls == [2, 1, 4]
    running[0] = 4.0  # our own four threads still spinning count as ours, not others'
    clock[0] += blas.LOAD_INTERVAL
    blas.fit(blas.SMALL_WORK)
    assert library.calls == [2, 1, 4]


def test_a_fixed_count_holds_for_every_product(library: FakeLibrary) -> None:
    gl.set_num_threads(3)
    assert gl.get_num_threads() == 3
    blas.fit(1)
    blas.fit(blas.SMALL_WORK * 100)
    assert library.calls == [3]
    with gl.threads(1):
        assert gl.get_num_threads() == 1
        blas.fit(blas.SMALL_WORK * 100)
    assert gl.get_num_threads() == 3 and library.calls == [3, 1, 3]
    with gl.threads(None):
        blas.fit(1)
    assert library.calls == [3, 1, 3, 1, 3]
    gl.set_num_threads(None)
    assert gl.get_num_threads() is None
    for bad, error, match in [
        (0, ValueError, "count must be >= 1, got 0"),
        (2.0, TypeError, "count must be an int or None, got 2.0"),
        (True, TypeError, "count must be an int or None, got True"),
    ]:
        with pytest.raises(error, match=f"^set_num_threads: {match}$"):
            gl.set_num_threads(bad)  # type: ignore[arg-type]
    assert gl.get_num_threads() is None


def test_the_ops_that_multiply_matrices_ask_for_their_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[int] = []
    monkeypatch.setattr(blas, "fit", asked.append)
    g = gl.Graph()
    rng = np.random.default_rng(0)

    def p(*shape: int) -> gl.NodeId:
        return g.parameter(rng.normal(size=shape))

    cases: list[tuple[Any, int]] = [
        (lambda: g.matmul(p(3, 4), p(4, 5)), 3 * 4 * 5),
        (lambda: g.matmul(p(2, 3, 4), p(4, 5)), 2 * 3 * 4 * 5),
        (lambda: g.matmul(p(2, 3, 4), p(2, 4, 5)), 2 * 3 * 4 * 5),  # b batched too
        (lambda: g.matmul(p(3, 4), p(4)), 3 * 4),
        (lambda: g.linear(p(2, 3, 4), p(4, 6)), 2 * 3 * 4 * 6),
        (lambda: g.apply(lora_linear, p(3, 4), p(4, 5), p(4, 2), p(2, 5), scaling=1.0), 3 * 4 * 5),
        (lambda: g.scaled_dot_product_attention(p(2, 3, 4), p(2, 5, 4), p(2, 5, 4)), 2 * 3 * 4 * 5),
    ]
    for make, work in cases:
        asked.clear()
        out = make()
        assert asked == [work]  # forward
        g.backward(g.sum(out))
        assert asked == [work, work]  # and backward
        g.reset()
    # The NF4 ops multiply by a few rows of the weight at a time: each chunk's product counts.
    from graphlora.lora.nf4 import CHUNK_VALUES, NF4Weight, nf4_linear, nf4_matmul

    wide = NF4Weight.quantize(rng.normal(size=(3, 2 * CHUNK_VALUES)))  # [out, in]: a row a chunk
    narrow = NF4Weight.quantize(rng.normal(size=(6, 4)))  # every row in one chunk
    two = NF4Weight.quantize(rng.normal(size=(3, 100_000)))  # two whole rows a chunk
    column = NF4Weight.quantize(rng.normal(size=(CHUNK_VALUES + 8, 1)))  # CHUNK_VALUES rows
    for ops, weight, x, work in [
        (nf4_linear, wide, p(5, 2 * CHUNK_VALUES), 5 * 1 * 2 * CHUNK_VALUES),
        (nf4_linear, narrow, p(2, 3, 4), 2 * 3 * 6 * 4),
        (nf4_matmul, narrow, p(5, 6), 5 * 6 * 4),
        (nf4_linear, two, p(1, 100_000), 1 * 2 * 100_000),
        (nf4_linear, column, p(2, 1), 2 * CHUNK_VALUES * 1),
    ]:
        asked.clear()
        out = g.apply(ops, x, weight=weight)
        g.backward(g.sum(out))
        assert asked == [work, work], ops
        g.reset()


def test_the_machine_as_read() -> None:
    import os

    assert blas.allowed_cores() == len(os.sched_getaffinity(0))
    assert blas.running_from("0.52 0.58 0.59 3/467 12345\n") == 3.0
    assert blas.running_from("1.00 1.00 1.00 17/2000 99") == 17.0
    assert blas._running() >= 1.0  # this process at least, read from /proc/loadavg
    assert blas.state_from(b"123 (a (b) c) R 1 2 3") == b"R"
    assert blas.state_from(b"7 (python3) S 1 2") == b"S"
    assert (blas._own_running() or 0) >= 1  # this test's thread, reading, at least


def test_this_process_running_threads_are_not_others(
    library: FakeLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blas, "_running", lambda: 4.0)  # four running threads in all
    monkeypatch.setattr(blas, "_own_running", lambda: 3)  # three of them ours (spinning)
    blas.fit(blas.SMALL_WORK)
    assert library.calls == [3]  # 4 cores less the 1 other


def test_the_real_blas_library_follows(monkeypatch: pytest.MonkeyPatch) -> None:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(blas, "_libraries", None)  # found again, from threadpoolctl
    monkeypatch.setattr(blas, "_now", None)

    def counts() -> set[int]:
        return {
            lib["num_threads"]
            for lib in threadpoolctl.threadpool_info()
            if lib["user_api"] == "blas"
        }

    try:
        with gl.threads(1):
            assert counts() == {1}
            a = np.ones((300, 300))
            g = gl.Graph()
            np.testing.assert_allclose(g.value(g.matmul(g.constant(a), g.constant(a))), a @ a)
        assert gl.get_num_threads() is None
        blas.fit(1)
        assert counts() == {1}
        blas.fit(blas.SMALL_WORK)
        assert counts() == {blas.spare_cores()}
    finally:
        blas.fit(1)
