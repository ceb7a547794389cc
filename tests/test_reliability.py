"""Reliability: anomaly mode, long tapes without recursion, no memory growth across training steps,
graphs in threads, and no internal error escaping from bad input."""

from __future__ import annotations

import gc
import threading
import tracemalloc

import numpy as np
import pytest

import graphlora as gl
from graphlora.optim import Adam

# --- anomaly mode ----------------------------------------------------------------------------------


def test_anomaly_mode_names_the_first_op_that_makes_nan_and_records_nothing() -> None:
    g = gl.Graph(check_finite=True)
    assert g.check_finite
    x = g.parameter([1.0, -1.0], name="x")
    y = g.scale(x, 2.0)
    before = len(g)
    with pytest.raises(gl.NonFiniteError) as info, np.errstate(invalid="ignore"):
        g.log(y)
    assert len(g) == before
    message = str(info.value)
    assert (
        "anomaly: the forward output of op 'log' holds 1 non-finite value(s) (NaN or Inf)"
        in message
    )
    assert "input shapes: (2,)" in message
    assert "non-finite inputs: none" in message
    assert isinstance(info.value, FloatingPointError)


def test_anomaly_mode_says_which_inputs_were_already_non_finite() -> None:
    g = gl.Graph()
    a = g.parameter([1.0, np.nan])
    b = g.parameter([1.0, 2.0])
    assert np.isnan(g.value(g.add(a, b))).any()  # off by default: NaN flows silently
    with (
        g.detect_anomaly(),
        pytest.raises(
            gl.NonFiniteError, match=r"non-finite inputs: input 0 \(NodeId\(0, op='parameter'"
        ),
    ):
        g.add(a, b)
    assert not g.check_finite  # restored after the block


def test_anomaly_mode_catches_a_non_finite_gradient_and_changes_no_gradient() -> None:
    g = gl.Graph()
    x = g.parameter([0.0, 4.0])
    g.backward(g.sum(x))
    with g.detect_anomaly():
        root = g.pow(x, 0.5)  # finite forward: sqrt(0) = 0, but d sqrt / dx = inf at 0
        with pytest.raises(gl.NonFiniteError) as info, np.errstate(divide="ignore"):
            g.backward(g.sum(root))
    message = str(info.value)
    assert "anomaly: the gradient of op 'pow' at NodeId(" in message
    assert "the gradient flowing to NodeId(0, op='parameter'" in message
    assert "the incoming gradient was finite" in message
    np.testing.assert_array_equal(g.grad(x), [1.0, 1.0])  # as before the failed backward


def test_merge_refuses_non_finite_weights_with_the_anomaly_error() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 3, gl.LoraConfig(rank=1, seed=0))
    g.set_value(layer.lora_b, [[np.nan, 0.0, 0.0]])
    with pytest.raises(
        gl.NonFiniteError, match=r"LoraLinear\.merge: merging lora would give 3 non-finite weights"
    ):
        layer.merge(g)
    assert not layer.merged


# --- scale and leaks -------------------------------------------------------------------------------


@pytest.mark.slow
def test_backward_over_a_million_node_tape() -> None:
    g = gl.Graph()
    x = g.parameter(2.0)
    y = x
    for _ in range(1_000_000):
        y = g.scale(y, 1.0)
    g.backward(y)  # no recursion: the tape is walked in a loop
    assert float(g.grad(x)) == 1.0  # type: ignore[arg-type]
    g.reset()
    assert len(g) == 1


def test_a_tape_costs_well_under_a_kilobyte_a_node() -> None:
    # Documented in docs/errors.md: about 670 bytes a node for a chain of small ops.
    gc.collect()
    tracemalloc.start()
    g = gl.Graph()
    x = g.parameter(1.0)
    y = x
    for _ in range(20_000):
        y = g.scale(y, 1.0)
    used, _ = tracemalloc.get_traced_memory()
    g.backward(y)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert used / 20_000 < 1024
    assert peak - used < 64 * 1024  # backward frees each node's gradient as it goes


def test_a_thousand_training_steps_with_reset_do_not_grow_memory() -> None:
    rng = np.random.default_rng(0)
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 32, 16, gl.LoraConfig(rank=4, seed=0))
    x = g.constant(rng.normal(size=(8, 32)))
    t = g.constant(rng.normal(size=(8, 16)))
    opt = Adam(g, layer.trainable_params(), lr=1e-3)

    def step(i: int) -> None:
        g.set_value(x, rng.normal(size=(8, 32)))  # new data each step, into the same leaf
        loss = g.mse_loss(layer.forward(g, x, fused=i % 2 == 1), t)
        g.backward(loss)
        opt.step()
        opt.zero_grad()
        g.reset()

    for i in range(100):
        step(i)
    gc.collect()
    tracemalloc.start()
    for i in range(100):
        step(i)
    after_100, _ = tracemalloc.get_traced_memory()
    for i in range(900):
        step(i)
    gc.collect()
    after_1000, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert after_1000 - after_100 < 16 * 1024, f"grew by {after_1000 - after_100} bytes"
    assert len(g) == len(g.leaves) == 6


def test_separate_graphs_in_separate_threads() -> None:
    def train(seed: int, out: dict[int, np.ndarray]) -> None:
        rng = np.random.default_rng(seed)
        g = gl.Graph()
        layer = gl.LoraLinear.new(g, 16, 8, gl.LoraConfig(rank=2, seed=seed))
        x, t = g.constant(rng.normal(size=(4, 16))), g.constant(rng.normal(size=(4, 8)))
        opt = Adam(g, layer.trainable_params(), lr=1e-2)
        for _ in range(200):
            g.backward(g.mse_loss(layer.forward(g, x), t))
            opt.step()
            opt.zero_grad()
            g.reset()
        out[seed] = layer.delta(g)

    sequential: dict[int, np.ndarray] = {}
    for seed in range(4):
        train(seed, sequential)
    threaded: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=train, args=(seed, threaded)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in range(4):
        np.testing.assert_array_equal(threaded[seed], sequential[seed])
