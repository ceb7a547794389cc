"""Graph.compile: a replayed step gives exactly what recording the same calls again gives."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphlora as gl
from graphlora.optim import SGD, Adam
from graphlora.testing import strategies as gst


def _record(
    expr: gst.Expression, inputs: list[np.ndarray], trained: list[bool]
) -> tuple[gl.Graph, list[gl.NodeId], gl.NodeId]:
    g = gl.Graph()
    nodes = [g.parameter(a) if t else g.constant(a) for a, t in zip(inputs, trained, strict=True)]
    return g, nodes, expr.fn(g, *nodes)


@settings(max_examples=100)
@given(expr=gst.expressions(), data=st.data())
def test_a_replay_equals_a_new_recording_to_the_last_bit(
    expr: gst.Expression, data: st.DataObject
) -> None:
    # Some inputs constants, so that some ops keep no closure; at least one parameter.
    size = len(expr.inputs)
    trained = data.draw(st.lists(st.booleans(), min_size=size, max_size=size))
    trained[0] = True
    g, nodes, loss = _record(expr, list(expr.inputs), trained)
    step = g.compile(loss)
    assert len(step) == len(g.tape)
    # New values at the same points of the catalogue's safe domains: each input scaled by a
    # factor near 1, so logs stay positive and divisions stay away from zero.
    factor = data.draw(st.floats(0.9, 1.1))
    new_inputs = [a * factor for a in expr.inputs]
    for node, a in zip(nodes, new_inputs, strict=True):
        g.set_value(node, a)
    g.zero_grad()

    fresh, fresh_nodes, fresh_loss = _record(expr, new_inputs, trained)
    if fresh_loss.requires_grad:
        fresh.backward(fresh_loss)
        replayed = np.array(step())
    else:  # the loss does not depend on the parameter: forward only
        replayed = np.array(step(backward=False))
    np.testing.assert_array_equal(replayed, fresh.value(fresh_loss))
    for old, new in zip(g.tape, fresh.tape, strict=True):  # every recorded value, refreshed
        np.testing.assert_array_equal(g.value(old), fresh.value(new))
    for node, fresh_node in zip(nodes, fresh_nodes, strict=True):
        got, want = g.grad(node), fresh.grad(fresh_node)
        assert (got is None) == (want is None)
        if got is not None:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_a_lora_layer_by_replay_equals_training_by_recording(
    fused: bool, dropout: float, dtype: type
) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5))
    x_data, t_data = rng.standard_normal((4, 6)), rng.standard_normal((4, 5))
    config = gl.LoraConfig(rank=2, alpha=4.0, dropout=dropout, seed=3, init="gaussian")

    def setup() -> tuple[gl.Graph, gl.LoraLinear, gl.NodeId, gl.NodeId, Adam]:
        g = gl.Graph(dtype)
        layer = gl.LoraLinear.from_linear(g, w, np.zeros(5), config)
        g.set_value(layer.lora_b, 0.1 * np.ones((2, 5)))
        return g, layer, g.constant(x_data), g.constant(t_data), Adam(g, layer.trainable_params())

    g1, layer1, x1, t1, opt1 = setup()  # records every step
    g2, layer2, x2, t2, opt2 = setup()  # records once, then replays
    step = g2.compile(g2.mse_loss(layer2.forward(g2, x2, fused=fused), t2))
    layer1.forward(g1, x1, fused=fused)  # the recording that g2 compiled drew one dropout mask
    g1.reset()
    for _ in range(5):
        loss1 = g1.mse_loss(layer1.forward(g1, x1, fused=fused), t1)
        g1.backward(loss1)
        value1 = np.array(g1.value(loss1))
        opt1.step()
        opt1.zero_grad()
        g1.reset()
        value2 = np.array(step())
        opt2.step()
        opt2.zero_grad()
        np.testing.assert_array_equal(value2, value1)  # dropout masks drawn alike
    for p1, p2 in zip(layer1.trainable_params(), layer2.trainable_params(), strict=True):
        np.testing.assert_array_equal(g1.value(p1), g2.value(p2))
    assert not np.array_equal(g2.value(layer2.lora_b), 0.1 * np.ones((2, 5)))  # it trained


def test_a_replay_reads_leaves_updated_in_place_and_by_set_value() -> None:
    g = gl.Graph()
    w = g.parameter([1.0, 2.0])
    x = g.constant([3.0, 4.0])
    step = g.compile(g.sum(g.mul(w, x)))
    assert float(step()) == 11.0
    np.testing.assert_array_equal(g.grad(w), [3.0, 4.0])
    opt = SGD(g, [w], lr=1.0)
    opt.step()  # w -= grad, in place: [-2, -2]
    opt.zero_grad()
    g.set_value(x, [1.0, 1.0])
    assert float(step()) == -4.0
    np.testing.assert_array_equal(g.grad(w), [1.0, 1.0])


def test_a_replay_accumulates_gradients_as_backward_does() -> None:
    g = gl.Graph()
    w = g.parameter([1.0, -2.0])
    step = g.compile(g.sum(g.mul(w, w)))
    step()
    step()
    np.testing.assert_array_equal(g.grad(w), [4.0, -8.0])  # 2 w, twice


def test_backward_false_refreshes_values_and_leaves_gradients_alone() -> None:
    g = gl.Graph()
    w = g.parameter([1.0, 2.0])
    squares = g.mul(w, w)
    step = g.compile(g.sum(squares))
    g.set_value(w, [3.0, 4.0])
    assert float(step(backward=False)) == 25.0
    np.testing.assert_array_equal(g.value(squares), [9.0, 16.0])
    assert g.grad(w) is None


def test_every_op_before_the_loss_is_run_again_and_none_after_it() -> None:
    g = gl.Graph()
    w = g.parameter([1.0, 2.0])
    side = g.neg(w)  # recorded before the loss, not one of its inputs
    loss = g.sum(w)
    after = g.scale(w, 2.0)  # recorded after the loss
    step = g.compile(loss)
    g.set_value(w, [5.0, 6.0])
    step()
    np.testing.assert_array_equal(g.value(side), [-5.0, -6.0])
    np.testing.assert_array_equal(g.value(after), [2.0, 4.0])  # as it was recorded


def test_a_seed_given_to_compile_is_used_every_run_and_never_written() -> None:
    g = gl.Graph()
    w = g.parameter([1.0, 2.0])
    seed = np.array([1.0, 10.0])
    step = g.compile(w, grad=seed)  # the loss is the leaf itself: its gradient is the seed
    step()
    step()
    np.testing.assert_array_equal(g.grad(w), [2.0, 20.0])
    np.testing.assert_array_equal(seed, [1.0, 10.0])
    y = g.mul(w, w)
    g.zero_grad()
    g.compile(y, grad=seed)()
    np.testing.assert_array_equal(g.grad(w), [2.0, 40.0])


def test_a_user_op_replays_through_its_checks() -> None:
    def cube(x: np.ndarray) -> tuple[np.ndarray, object]:
        return x**3, lambda g, needs: (3 * x**2 * g,)

    g = gl.Graph()
    w = g.parameter([1.0, 2.0])
    step = g.compile(g.sum(g.apply(cube, w)))
    g.set_value(w, [2.0, 3.0])
    assert float(step()) == 35.0
    np.testing.assert_array_equal(g.grad(w), [12.0, 27.0])


def test_dropout_with_an_int_seed_draws_the_same_mask_every_run() -> None:
    g = gl.Graph()
    w = g.parameter(np.ones(50))
    dropped = g.dropout(w, 0.5, rng=7)
    step = g.compile(g.sum(dropped))
    first = np.array(g.value(dropped))
    step()
    np.testing.assert_array_equal(g.value(dropped), first)
    generator = np.random.default_rng(7)
    h = gl.Graph()
    v = h.parameter(np.ones(50))
    masked = h.dropout(v, 0.5, rng=generator)
    step = h.compile(h.sum(masked))
    first = np.array(h.value(masked))
    step()  # a Generator goes on drawing: a new mask
    assert not np.array_equal(h.value(masked), first)


def test_a_reset_ends_a_replay() -> None:
    g = gl.Graph()
    w = g.parameter([1.0])
    step = g.compile(g.sum(w))
    g.reset()
    with pytest.raises(gl.StaleNodeError, match=r"Replay: .*reset"):
        step()


def test_freezing_a_leaf_ends_a_replay() -> None:
    g = gl.Graph()
    w, v = g.parameter([1.0]), g.parameter([2.0])
    step = g.compile(g.sum(g.mul(w, v)))
    g.requires_grad_(v, True)  # no change: the replay still runs
    step()
    g.requires_grad_(v, False)
    with pytest.raises(gl.GraphError, match="requires_grad_"):
        step()


def test_a_replay_of_a_loss_without_parameters_runs_forward_only() -> None:
    g = gl.Graph()
    x = g.constant([1.0, 2.0])
    step = g.compile(g.sum(x))
    g.set_value(x, [3.0, 4.0])
    assert float(step(backward=False)) == 7.0
    with pytest.raises(gl.GraphError, match="does not depend on any parameter"):
        step()


def test_compile_checks_its_arguments() -> None:
    g = gl.Graph()
    w = g.parameter([1.0, 2.0])
    with pytest.raises(gl.ShapeError, match=r"compile: loss .* has 2 elements"):
        g.compile(w)
    with pytest.raises(gl.ShapeError, match="compile: grad has shape"):
        g.compile(w, grad=np.ones(3))
    with pytest.raises(TypeError, match="compile: loss must be a NodeId"):
        g.compile("loss")  # type: ignore[arg-type]
    other = gl.Graph()
    with pytest.raises(gl.ForeignNodeError, match="compile"):
        other.compile(g.sum(w))


def test_a_failed_run_changes_no_gradient_and_keeps_the_values_it_did_not_reach() -> None:
    g = gl.Graph()
    w = g.parameter([1.0, 2.0])
    doubled = g.scale(w, 2.0)
    logs = g.log(doubled)
    loss = g.sum(logs)
    step = g.compile(loss)
    step()
    grad_before = np.array(g.grad(w))
    g.set_value(w, [-1.0, 2.0])
    with (
        g.detect_anomaly(),
        np.errstate(invalid="ignore"),
        pytest.raises(gl.NonFiniteError, match="'log'"),
    ):
        step()
    np.testing.assert_array_equal(g.value(doubled), [-2.0, 4.0])  # reached: new
    np.testing.assert_array_equal(g.value(logs), np.log([2.0, 4.0]))  # refused: old
    np.testing.assert_array_equal(g.value(loss), np.log(8.0))
    np.testing.assert_array_equal(g.grad(w), grad_before)
    g.set_value(w, [1.0, 4.0])  # and it runs again
    np.testing.assert_allclose(step(), np.log(16.0))


def test_repr_and_loss() -> None:
    g = gl.Graph()
    w = g.parameter([1.0])
    loss = g.sum(g.neg(w))
    step = g.compile(loss)
    assert step.loss is loss
    assert repr(step) == f"Replay(2 ops, loss={loss!r})"


def test_merging_or_unmerging_a_layer_ends_a_replay() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0))
    g.set_value(layer.lora_b, [[1.0, 1.0]])
    x = g.constant(np.ones((1, 3)))
    step = g.compile(g.sum(layer.forward(g, x)))
    layer.merge_(g)  # the recorded low-rank path would be added twice
    with pytest.raises(
        gl.GraphError,
        match=r"merged or unmerged its weights or changed its adapters\), after compile",
    ):
        step()
    step = g.compile(g.sum(layer.forward(g, x)))
    layer.unmerge_(g)
    with pytest.raises(
        gl.GraphError,
        match=r"merged or unmerged its weights or changed its adapters\), after compile",
    ):
        step()


def test_compile_from_a_start_replays_only_the_ops_after_it() -> None:
    g = gl.Graph()
    w = g.parameter(np.array([1.0, 2.0]))
    before = g.exp(w)  # recorded before the step: not run again
    start = len(g.tape)
    x = g.constant(np.array([3.0, 4.0]))
    out = g.sum(g.mul(w, x))
    step = g.compile(out, start=start)
    assert len(step) == 2
    g.buffers(x)[0][:] = [10.0, 20.0]
    g.set_value(w, [5.0, 6.0])
    assert float(step()) == 5.0 * 10.0 + 6.0 * 20.0
    np.testing.assert_array_equal(g.grad(w), [10.0, 20.0])
    np.testing.assert_array_equal(g.value(before), np.exp([1.0, 2.0]))  # kept its value
    assert len(g.compile(out)) == 3
    for bad in (-1, 4, 1.0, True):
        with pytest.raises(ValueError, match="compile: start must be a tape position from 0 to 3"):
            g.compile(out, start=bad)  # type: ignore[arg-type]
    assert len(g.compile(w, grad=np.ones(2), start=0)) == 0  # a leaf: nothing to run
    with pytest.raises(ValueError, match="from 0 to 0"):
        g.compile(w, grad=np.ones(2), start=1)
