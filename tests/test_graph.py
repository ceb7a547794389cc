"""The Graph: leaves, values, ids, reset, backward semantics, user ops and every rejected call."""

from __future__ import annotations

import re
import tracemalloc
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import graphlora as gl
from graphlora import ops
from graphlora.testing import strategies as gst


def rejected(
    g: gl.Graph, error: type[BaseException], match: str, call: Callable[[], object]
) -> BaseException:
    """Assert that ``call`` raises ``error`` matching ``match`` and records nothing."""
    before = len(g)
    with pytest.raises(error, match=match) as info:
        call()
    assert len(g) == before, "a rejected call changed the graph"
    return info.value


# --- construction and leaves -------------------------------------------------------------------


def test_dtypes() -> None:
    assert gl.Graph().dtype == np.float64
    assert gl.Graph(np.float32).dtype == np.float32
    assert gl.Graph("float32").dtype == np.float32
    assert gl.Graph(None).dtype == np.float64  # as in NumPy, None means the default
    for bad in (np.float16, np.int64, complex, "nonsense", object):
        with pytest.raises(ValueError, match=r"Graph: dtype must be np\.float32 or np\.float64"):
            gl.Graph(bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_data_takes_the_graph_dtype_and_integer_data_keeps_its_kind(dtype: Any) -> None:
    g = gl.Graph(dtype)
    source = np.array([[1, 2], [3, 4]])
    ids = g.constant(source)  # token ids, labels: integer data stays integer
    mask = g.constant([True, False])  # bool data stays bool
    p = g.parameter([True, False], name="mask")  # parameters are always float
    floats = g.constant(np.array([0.5, 1.5], dtype=np.float64))
    source[0, 0] = 100  # the graph holds its own copy
    assert g.value(ids).dtype == np.int64
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(g.value(ids), [[1, 2], [3, 4]])
    assert g.value(mask).dtype == np.bool_
    assert g.value(p).dtype == dtype
    np.testing.assert_array_equal(g.value(p), [1.0, 0.0])
    assert g.value(floats).dtype == dtype
    assert g.value(g.constant(2.5)).shape == ()
    assert p.name == "mask"
    assert p.requires_grad
    assert not ids.requires_grad
    assert ids.is_leaf
    assert len(g) == 5


def test_a_float_op_reads_integer_and_bool_data_in_the_graph_dtype() -> None:
    g = gl.Graph(np.float32)
    ids = g.constant(np.array([1, 2, 3]))
    mask = g.constant(np.array([True, False, True]))
    w = g.parameter(np.full(3, 0.5))
    y = g.mul(g.add(ids, mask), w)  # (ids + mask) * w, all in float32
    assert g.value(y).dtype == np.float32
    np.testing.assert_array_equal(g.value(y), [1.0, 1.0, 2.0])
    g.backward(g.sum(y))
    np.testing.assert_array_equal(g.grad(w), [2.0, 2.0, 4.0])
    assert g.grad(ids) is None


def test_data_leaves_take_only_data_of_their_kind_and_never_a_gradient() -> None:
    g = gl.Graph()
    ids = g.constant(np.array([1, 2]))
    g.set_value(ids, np.array([3, 4]))
    np.testing.assert_array_equal(g.value(ids), [3, 4])
    rejected(
        g,
        TypeError,
        r"set_value: NodeId\(0, op='constant'.* holds int64 data; the new value must too, got dtype float64",
        lambda: g.set_value(ids, [0.5, 1.5]),
    )
    rejected(
        g,
        gl.GraphError,
        r"requires_grad_: NodeId\(0, .* holds int64 data, which has no gradient",
        lambda: g.requires_grad_(ids),
    )
    np.testing.assert_array_equal(g.value(ids), [3, 4])


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (np.array([1 + 2j]), TypeError, r"constant: value must hold real numbers.*complex128"),
        (["a", "b"], TypeError, r"constant: value must hold real numbers.*<U1"),
        (None, TypeError, r"constant: value must hold real numbers.*object"),
        ([[1.0, 2.0], [3.0]], gl.ShapeError, r"constant: value is not a regular array"),
        ({"a": 1}, TypeError, r"constant: value must hold real numbers.*object"),
    ],
)
def test_leaves_reject_bad_data(value: object, error: type[Exception], match: str) -> None:
    g = gl.Graph()
    rejected(g, error, match, lambda: g.constant(value))  # type: ignore[arg-type]


def test_leaf_from_a_node_or_with_a_bad_name_is_refused() -> None:
    g = gl.Graph()
    x = g.constant(1.0)
    rejected(
        g, TypeError, r"parameter: value must be array-like, got NodeId", lambda: g.parameter(x)
    )  # type: ignore[arg-type]
    rejected(
        g,
        TypeError,
        r"parameter: name must be a str or None, got int",
        lambda: g.parameter(1.0, name=3),
    )  # type: ignore[arg-type]


def test_value_and_grad_are_read_only_views() -> None:
    g = gl.Graph()
    w = g.parameter(np.ones(3))
    g.backward(g.sum(g.mul(w, w)))
    with pytest.raises(ValueError, match="read-only"):
        g.value(w)[0] = 5.0
    grad = g.grad(w)
    assert grad is not None
    with pytest.raises(ValueError, match="read-only"):
        grad[0] = 5.0
    np.testing.assert_array_equal(g.value(w), np.ones(3))
    np.testing.assert_array_equal(g.grad(w), 2 * np.ones(3))


def test_set_value_checks_and_keeps_the_old_value_on_error() -> None:
    g = gl.Graph(np.float32)
    w = g.parameter(np.zeros((2, 3)))
    g.set_value(w, np.ones((2, 3), dtype=np.int64))
    assert g.value(w).dtype == np.float32
    np.testing.assert_array_equal(g.value(w), np.ones((2, 3)))
    rejected(
        g,
        gl.ShapeError,
        r"set_value: new value has shape \(3, 2\) but NodeId\(0, op='parameter'.* has shape \(2, 3\)",
        lambda: g.set_value(w, np.zeros((3, 2))),
    )
    rejected(
        g,
        TypeError,
        r"set_value: value must hold real numbers",
        lambda: g.set_value(w, np.ones((2, 3)) * 1j),
    )
    np.testing.assert_array_equal(g.value(w), np.ones((2, 3)))
    y = g.scale(w, 2.0)
    rejected(
        g,
        gl.GraphError,
        r"set_value: .*op='scale'.* only constants and parameters",
        lambda: g.set_value(y, np.zeros((2, 3))),
    )


def test_set_values_checks_everything_before_setting_anything() -> None:
    g = gl.Graph(np.float32)
    w = g.parameter(np.zeros((2, 3)))
    ids = g.constant(np.array([1, 2]))
    mask = g.constant(np.array([True, False]))
    good: list[tuple[str, gl.NodeId, object]] = [
        ("w", w, np.ones((3, 2))),
        ("ids", ids, np.array([4, 5])),
        ("mask", mask, np.array([False, True])),
    ]
    y = g.scale(w, 2.0)
    other = gl.Graph().parameter(np.zeros(2))
    bad_cases: list[tuple[int, object, type[BaseException], str]] = [
        (0, np.ones((2, 3)), gl.ShapeError, r"f: w has shape \(2, 3\), expected \(3, 2\)"),
        (0, np.ones((3, 2), dtype=np.int64), TypeError, "f: w holds int64 data; it needs floating"),
        (0, np.full((3, 2), np.inf), ValueError, "f: w holds NaN or Inf"),
        (0, w, TypeError, r"f: w must be an array, got NodeId\(0"),
        (0, [[1.0], [2.0, 3.0]], gl.ShapeError, "f: w is not a regular array"),
        (1, np.array([4.0, 5.0]), TypeError, "f: ids holds float64 data; it needs int64 data"),
        (2, np.array([1, 0]), TypeError, "f: mask holds int64 data; it needs bool data"),
    ]
    for index, value, error, match in bad_cases:
        items = list(good)
        items[index] = (items[index][0], items[index][1], value)
        rejected(g, error, match, lambda items=items: g.set_values("f", items, transposed={"w"}))
        np.testing.assert_array_equal(g.value(w), np.zeros((2, 3)))
        np.testing.assert_array_equal(g.value(ids), [1, 2])
    for leaf, error, match in [
        (y, gl.GraphError, r"f: w is NodeId\(.*op='scale'.*the output of an op, not a leaf"),
        (other, gl.GraphError, r"f: w NodeId\(0, .* belongs to another Graph"),
    ]:
        items = [*good[1:], ("w", leaf, np.ones((3, 2)))]
        rejected(g, error, match, lambda items=items: g.set_values("f", items, transposed={"w"}))
        np.testing.assert_array_equal(g.value(ids), [1, 2])
    g.set_values("f", [*good[:1], ("ids", ids, np.array([4, 5], dtype=np.int32))], transposed={"w"})
    np.testing.assert_array_equal(g.value(w), np.ones((2, 3)))
    assert g.value(w).dtype == np.float32 and g.value(w).flags.c_contiguous
    assert g.value(ids).dtype == np.int64  # a data leaf keeps its own dtype
    g.set_values("f", [("w", w, np.arange(6.0).reshape(2, 3))])  # not transposed: as given
    np.testing.assert_array_equal(g.value(w), np.arange(6.0).reshape(2, 3))


# --- ids: stale, foreign, wrong kind -----------------------------------------------------------


def test_reset_drops_ops_keeps_leaves_and_makes_old_ids_stale() -> None:
    g = gl.Graph()
    x = g.constant(np.ones((2, 2)))
    w = g.parameter(np.eye(2), name="w")
    y = g.matmul(x, w)
    g.backward(g.sum(y))
    assert len(g) == 4
    assert g.resets == 0
    g.reset()
    assert len(g) == 2
    assert g.tape == ()
    assert g.resets == 1  # one reset, counted once
    np.testing.assert_array_equal(g.value(w), np.eye(2))
    assert g.grad(w) is not None  # gradients are kept until zero_grad
    for use in (lambda: g.value(y), lambda: g.grad(y), lambda: g.relu(y), lambda: g.add(x, y)):
        rejected(g, gl.StaleNodeError, r"was recorded before the last reset\(\)", use)
    assert "stale" in repr(y)
    with pytest.raises(gl.StaleNodeError):
        _ = y.shape
    z = g.matmul(x, w)  # recording goes on after a reset
    assert z.id > y.id  # ids are never reused
    np.testing.assert_array_equal(g.value(z), np.ones((2, 2)))


def test_reset_frees_the_dropped_ops_arrays_as_the_next_recording_goes() -> None:
    g = gl.Graph()
    w = g.parameter(np.ones(1_000_000), name="w")  # 8 MB an op: over the 4 MiB from which
    # the next recording frees them
    size = 8_000_000

    def held() -> int:
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        start = held()
        first = [g.exp(w), g.tanh(w)]
        arrays = [weakref.ref(g.value(node).base) for node in first]  # the engine's own arrays
        assert held() - start >= 2 * size
        g.reset()
        assert "stale" in repr(first[0])
        assert held() - start >= 2 * size  # kept for the next recording to reuse
        g.neg(w)  # one op made: the oldest dropped one freed
        assert 2 * size <= held() - start < 3 * size
        assert arrays[0]() is None and arrays[1]() is not None  # the oldest first
        g.reset()  # the rest of the first recording goes now; the neg waits
        assert size <= held() - start < 2 * size
        g.reset()  # a second reset frees whatever is left at once
        assert held() - start < size
    finally:
        tracemalloc.stop()


def test_reset_keeps_a_recording_of_exactly_4_mib_for_the_next_one() -> None:
    g = gl.Graph()
    w = g.parameter(np.ones(1 << 19), name="w")  # 8 bytes a value: 4 MiB exactly an op
    under = g.parameter(np.ones((1 << 19) - 1), name="under")
    for leaf, kept in ((w, True), (under, False)):
        y = g.exp(leaf)
        array = weakref.ref(g.value(y).base)
        g.reset()  # from 4 MiB on, left for the next recording to free
        assert (array() is not None) is kept
        assert y.inputs == ()  # either way the dropped op holds no inputs
        g.reset()


def test_reset_frees_a_small_recording_at_once() -> None:
    g = gl.Graph()
    w = g.parameter(np.ones(100_000), name="w")  # 0.8 MB an op: 1.6 MB in all, under 4 MiB
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        g.exp(w)
        g.tanh(w)
        assert tracemalloc.get_traced_memory()[0] - start >= 1_600_000
        g.reset()
        assert tracemalloc.get_traced_memory()[0] - start < 800_000
    finally:
        tracemalloc.stop()


def test_foreign_ids_are_refused() -> None:
    g, other = gl.Graph(), gl.Graph()
    a = g.constant(1.0)
    b = other.constant(1.0)
    rejected(
        g,
        gl.ForeignNodeError,
        r"add: b NodeId\(0, op='constant'.* belongs to another Graph",
        lambda: g.add(a, b),
    )
    rejected(g, gl.ForeignNodeError, r"value: node .* belongs to another Graph", lambda: g.value(b))


@pytest.mark.parametrize("bad", [None, 3, np.ones(2), "x"])
def test_non_nodes_are_type_errors_naming_the_argument(bad: object) -> None:
    g = gl.Graph()
    a = g.constant(np.ones(2))
    rejected(g, TypeError, r"add: b must be a NodeId, got ", lambda: g.add(a, bad))  # type: ignore[arg-type]
    rejected(g, TypeError, r"matmul: a must be a NodeId, got ", lambda: g.matmul(bad, a))  # type: ignore[arg-type]
    rejected(g, TypeError, r"backward: loss must be a NodeId", lambda: g.backward(bad))  # type: ignore[arg-type]


def test_reprs() -> None:
    g = gl.Graph(np.float32)
    w = g.parameter(np.zeros((3, 2)), name="w")
    y = g.relu(w)
    assert repr(w) == "NodeId(0, op='parameter', shape=(3, 2), name='w')"
    assert repr(y) == "NodeId(1, op='relu', shape=(3, 2))"
    assert repr(g) == "Graph(dtype=float32, constants=0, parameters=1, ops=1)"


# --- backward ------------------------------------------------------------------------------------


def test_a_node_used_twice_and_backward_called_twice_accumulate() -> None:
    g = gl.Graph()
    x = g.parameter(np.array([1.0, -2.0, 3.0]))
    y = g.mul(x, x)  # x used twice in one op
    loss = g.sum(g.add(y, y))  # y used twice: d/dx = 4x
    g.backward(loss)
    np.testing.assert_allclose(g.grad(x), 4 * g.value(x))
    g.backward(loss)  # a second call adds, it does not assign
    np.testing.assert_allclose(g.grad(x), 8 * g.value(x))
    g.zero_grad()
    assert g.grad(x) is None


def test_shared_gradient_buffers_are_never_corrupted() -> None:
    # add hands the same gradient array to both inputs; accumulating into one must not
    # change the other, within one pass and across passes.
    g = gl.Graph()
    a = g.parameter(np.zeros(3))
    b = g.parameter(np.zeros(3))
    s = g.add(a, b)
    loss = g.sum(g.add(g.add(s, a), a))  # a reached three times, b once
    for calls in (1, 2, 3):
        g.backward(loss)
        np.testing.assert_array_equal(g.grad(a), 3.0 * calls * np.ones(3))
        np.testing.assert_array_equal(g.grad(b), 1.0 * calls * np.ones(3))


def test_only_leaves_keep_gradients_unless_retained() -> None:
    g = gl.Graph()
    w = g.parameter(np.array([1.0, 2.0]))
    y = g.scale(w, 3.0)
    loss = g.sum(g.mul(y, y))
    g.backward(loss)
    assert g.grad(y) is None
    g.backward(loss, retain_grads=True)
    np.testing.assert_allclose(g.grad(y), 2 * g.value(y))
    np.testing.assert_allclose(g.grad(loss), 1.0)
    np.testing.assert_allclose(g.grad(w), 2 * 18 * g.value(w))  # two passes of 18 w


def test_backward_seeds_and_their_errors() -> None:
    g = gl.Graph()
    w = g.parameter(np.array([1.0, 2.0]))
    y = g.mul(w, w)
    rejected(
        g,
        gl.ShapeError,
        r"backward: loss NodeId.* has 2 elements; reduce it",
        lambda: g.backward(y),
    )
    rejected(
        g,
        gl.ShapeError,
        r"backward: grad has shape \(3,\) but loss .* has shape \(2,\)",
        lambda: g.backward(y, grad=np.ones(3)),
    )
    assert g.grad(w) is None
    g.backward(y, grad=[1.0, 10.0])
    np.testing.assert_allclose(g.grad(w), [2.0, 40.0])
    frozen = g.exp(g.constant(1.0))
    rejected(
        g,
        gl.GraphError,
        r"backward: .* does not depend on any parameter",
        lambda: g.backward(frozen),
    )


def test_backward_of_a_leaf_and_of_a_size_one_array() -> None:
    g = gl.Graph()
    w = g.parameter(np.array([[2.0]]))
    g.backward(w)
    np.testing.assert_array_equal(g.grad(w), [[1.0]])
    g.backward(g.reshape(g.scale(w, 3.0), (1,)))
    np.testing.assert_array_equal(g.grad(w), [[4.0]])


def test_no_grad_records_values_only() -> None:
    g = gl.Graph()
    w = g.parameter(np.ones(3))
    with g.no_grad():
        assert not g.grad_enabled
        y = g.sum(g.scale(w, 2.0))
        d = g.dropout(w, 0.5, rng=0)
    assert g.grad_enabled
    assert d is w  # dropout is the identity when no gradient is recorded
    assert not y.requires_grad
    assert y.inputs[0].op == "scale"  # drawn as usual
    assert y._vjp is None  # but no closure is kept
    assert float(g.value(y)) == 6.0
    rejected(
        g,
        gl.GraphError,
        r"does not depend on any parameter \(or was recorded under no_grad",
        lambda: g.backward(y),
    )


def test_parameters_lists_trainable_leaves() -> None:
    g = gl.Graph()
    g.constant(1.0)
    a = g.parameter(1.0)
    b = g.parameter(2.0)
    assert g.parameters() == [a, b]
    assert g.leaves[1:] == (a, b)


# --- no work for what needs no gradient --------------------------------------------------------


def _counting_op(calls: list[tuple[bool, ...]]) -> ops.Op:
    def product(a: ops.Array, b: ops.Array) -> tuple[ops.Array, ops.Vjp]:
        def vjp(g: ops.Array, needs: tuple[bool, ...]) -> ops.Grads:
            calls.append(needs)
            return (g * b if needs[0] else None, g * a if needs[1] else None)

        return a * b, vjp

    return product


def test_constants_get_none_and_their_vjp_work_is_skipped() -> None:
    calls: list[tuple[bool, ...]] = []
    product = _counting_op(calls)
    g = gl.Graph()
    x = g.constant(np.array([1.0, 2.0]))
    frozen = g.constant(np.array([3.0, 4.0]))
    w = g.parameter(np.array([5.0, 6.0]))
    dead = g.apply(product, x, frozen)  # needs no gradient: its VJP must never run
    live = g.apply(product, x, w)
    g.backward(g.sum(g.add(g.apply(product, dead, w), live)))
    assert calls == [(False, True), (False, True)]  # told to skip x and dead; dead never run
    assert g.grad(x) is None
    assert g.grad(frozen) is None
    np.testing.assert_allclose(g.grad(w), g.value(dead) + g.value(x))


def test_matmul_with_a_frozen_weight_computes_only_the_input_gradient() -> None:
    x, w = np.ones((4, 3)), np.ones((3, 2))
    _, vjp = ops.matmul(x, w)
    grads = vjp(np.ones((4, 2)), (True, False))
    assert grads[1] is None
    assert grads[0] is not None
    assert vjp(np.ones((4, 2)), (False, True))[0] is None


# --- user-defined ops --------------------------------------------------------------------------


def test_apply_records_a_user_op_with_kwargs() -> None:
    def cube(x: ops.Array, *, factor: float) -> tuple[ops.Array, ops.Vjp]:
        def vjp(g: ops.Array, needs: tuple[bool, ...]) -> ops.Grads:
            return (g * 3 * factor * x**2,)

        return factor * x**3, vjp

    g = gl.Graph(np.float32)
    x = g.parameter(np.array([1.0, 2.0]))
    y = g.apply(cube, x, factor=2.0)
    assert y.op == "cube"
    assert g.value(y).dtype == np.float32
    g.backward(g.sum(y))
    np.testing.assert_allclose(g.grad(x), [6.0, 24.0])


def test_apply_rejects_bad_ops_and_bad_vjps_without_changing_gradients() -> None:
    g = gl.Graph()
    x = g.parameter(np.ones(2))
    rejected(g, TypeError, r"apply: op must be callable, got int", lambda: g.apply(3, x))  # type: ignore[arg-type]
    rejected(
        g,
        TypeError,
        r"apply: bad must return a pair \(out, vjp\)",
        lambda: g.apply(lambda_named("bad", lambda a: a), x),
    )
    rejected(
        g,
        TypeError,
        r"apply: cplx: its output must hold real numbers",
        lambda: g.apply(lambda_named("cplx", lambda a: (a * 1j, lambda gr, needs: (gr,))), x),
    )

    g.backward(g.sum(x))
    before = np.array(g.grad(x))

    def wrong_count(a: ops.Array) -> tuple[ops.Array, ops.Vjp]:
        return a, lambda gr, needs: (gr, gr)

    def wrong_shape(a: ops.Array) -> tuple[ops.Array, ops.Vjp]:
        return a, lambda gr, needs: (gr[:1],)

    for op, error, match in [
        (wrong_count, gl.GraphError, r"wrong_count: its VJP must return a tuple of 1 gradients"),
        (
            wrong_shape,
            gl.ShapeError,
            r"wrong_shape: its VJP returned a gradient of shape \(1,\) for input 0 of shape \(2,\)",
        ),
    ]:
        loss = g.sum(g.add(g.apply(op, x), x))
        with pytest.raises(error, match=match):
            g.backward(loss)
        np.testing.assert_array_equal(g.grad(x), before)  # all-or-nothing
        g.backward(g.sum(x))  # and the graph still works afterwards
        before = before + 1
        np.testing.assert_array_equal(g.grad(x), before)


def lambda_named(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    fn.__name__ = name
    return fn


# --- every op refuses bad arguments with a message naming it and the values ---------------------


def test_shape_errors_name_the_op_and_the_shapes() -> None:
    g = gl.Graph()
    a = g.constant(np.ones((32, 64)))
    b = g.constant(np.ones((32, 8)))
    rejected(
        g,
        gl.ShapeError,
        re.escape("matmul: cannot multiply (32, 64) by (32, 8): inner dimensions 64 != 32"),
        lambda: g.matmul(a, b),
    )
    for left, right, inner in (  # shapes the check's quick accept for two matrices must not pass
        ((2, 3), (4, 3), "3 != 4"),
        ((2, 3, 4), (3, 5), "4 != 3"),
        ((2, 3), (3, 4, 5), "3 != 4"),
    ):
        first, second = g.constant(np.ones(left)), g.constant(np.ones(right))
        rejected(
            g,
            gl.ShapeError,
            re.escape(f"matmul: cannot multiply {left} by {right}: inner dimensions {inner}"),
            lambda first=first, second=second: g.matmul(first, second),
        )
    for op in ("add", "sub", "mul", "div"):
        rejected(
            g,
            gl.ShapeError,
            re.escape(f"{op}: shapes (32, 64) and (32, 8) do not broadcast together"),
            lambda op=op: getattr(g, op)(a, b),
        )
    s = g.constant(2.0)
    rejected(
        g,
        gl.ShapeError,
        r"matmul: cannot multiply \(32, 64\) by \(\): operands must have at least one axis",
        lambda: g.matmul(a, s),
    )
    batch_a, batch_b = g.constant(np.ones((2, 3, 4))), g.constant(np.ones((5, 4, 3)))
    rejected(
        g,
        gl.ShapeError,
        r"matmul: .*batch axes \(2,\) and \(5,\) do not broadcast",
        lambda: g.matmul(batch_a, batch_b),
    )
    rejected(
        g,
        gl.ShapeError,
        r"mse_loss: pred has shape \(32, 64\) but target has shape \(32, 8\)",
        lambda: g.mse_loss(a, b),
    )


def test_axis_shape_and_permutation_errors() -> None:
    g = gl.Graph()
    x = g.constant(np.ones((2, 3)))
    rejected(
        g,
        gl.ShapeError,
        r"sum: axis 2 is out of range for shape \(2, 3\)",
        lambda: g.sum(x, axis=2),
    )
    rejected(
        g, gl.ShapeError, r"mean: axis \(0, -2\) repeats an axis", lambda: g.mean(x, axis=(0, -2))
    )
    rejected(
        g,
        TypeError,
        r"sum: axis must be an int or a tuple of ints, got 1.5",
        lambda: g.sum(x, axis=1.5),
    )  # type: ignore[arg-type]
    rejected(
        g, TypeError, r"mean: keepdims must be a bool, got str", lambda: g.mean(x, keepdims="yes")
    )  # type: ignore[arg-type]
    rejected(
        g,
        gl.ShapeError,
        r"reshape: cannot reshape \(2, 3\) \(6 elements\) into \(4, -1\)",
        lambda: g.reshape(x, (4, -1)),
    )
    rejected(
        g,
        gl.ShapeError,
        r"reshape: cannot reshape \(2, 3\) \(6 elements\) into \(5,\)",
        lambda: g.reshape(x, 5),
    )
    rejected(
        g,
        gl.ShapeError,
        r"reshape: shape \(-1, -1\) may hold at most one -1",
        lambda: g.reshape(x, (-1, -1)),
    )
    rejected(
        g,
        gl.ShapeError,
        r"transpose: axes \(0, 0\) is not a permutation of the 2 axes",
        lambda: g.transpose(x, (0, 0)),
    )
    rejected(
        g,
        gl.ShapeError,
        r"transpose: axes \(0,\) is not a permutation",
        lambda: g.transpose(x, (0,)),
    )
    rejected(
        g,
        gl.ShapeError,
        r"softmax: axis 2 is out of range for shape \(2, 3\)",
        lambda: g.softmax(x, axis=2),
    )
    rejected(
        g, gl.ShapeError, r"log_softmax: axis -3 is out of range", lambda: g.log_softmax(x, axis=-3)
    )
    rejected(
        g, TypeError, r"softmax: axis must be an int, got NoneType", lambda: g.softmax(x, axis=None)
    )  # type: ignore[arg-type]
    assert g.value(g.reshape(x, (3, -1))).shape == (3, 2)
    assert g.value(g.transpose(x, (-1, 0))).shape == (3, 2)


def test_scalar_and_option_errors() -> None:
    g = gl.Graph()
    x = g.constant(np.ones(3))
    for bad in (np.ones(2), "2", True, None):
        rejected(
            g,
            TypeError,
            r"scale: c must be a real scalar \(int or float\), got",
            lambda bad=bad: g.scale(x, bad),
        )
        rejected(g, TypeError, r"pow: p must be a real scalar", lambda bad=bad: g.pow(x, bad))
    rejected(
        g,
        ValueError,
        r"gelu: approximate must be 'none' or 'tanh', got 'erf'",
        lambda: g.gelu(x, "erf"),
    )
    for p in (-0.1, 1.0, 2.0):
        rejected(
            g, ValueError, rf"dropout: p must be in \[0, 1\), got {p}", lambda p=p: g.dropout(x, p)
        )
    rejected(
        g,
        TypeError,
        r"dropout: rng must be a np.random.Generator, an int seed or None, got str",
        lambda: g.dropout(x, 0.5, rng="seed"),
    )  # type: ignore[arg-type]
    assert g.dropout(x, 0.0) is x


def test_cross_entropy_errors() -> None:
    g = gl.Graph()
    logits = g.constant(np.zeros((3, 4)))
    empty_classes = g.constant(np.zeros((3, 0)))
    rejected(
        g,
        gl.ShapeError,
        r"cross_entropy: logits must be \[\.\.\., C\] with the C >= 1 classes on the last axis, got shape \(3, 0\)",
        lambda: g.cross_entropy(empty_classes, [0, 0, 0]),
    )
    rejected(
        g,
        TypeError,
        r"cross_entropy: labels must be integers, got dtype float64",
        lambda: g.cross_entropy(logits, [0.0, 1.0, 2.0]),
    )
    rejected(
        g,
        gl.ShapeError,
        r"cross_entropy: labels must have shape \(3,\) to match logits \(3, 4\), got \(2,\)",
        lambda: g.cross_entropy(logits, [0, 1]),
    )
    rejected(
        g,
        ValueError,
        r"cross_entropy: labels must lie in \[0, 4\) for 4 classes \(or equal ignore_index -100\), got \[4, -1\]",
        lambda: g.cross_entropy(logits, [0, 4, -1]),
    )
    rejected(
        g,
        TypeError,
        r"cross_entropy: labels must be integers, got dtype float64",
        lambda: g.cross_entropy(logits, logits),
    )
    rejected(
        g,
        ValueError,
        r"cross_entropy: label_smoothing must be in \[0, 1",
        lambda: g.cross_entropy(logits, [0, 1, 3], label_smoothing=-0.5),
    )
    assert float(g.value(g.cross_entropy(logits, [0, 1, 3]))) == pytest.approx(np.log(4))
    labels = g.constant(np.array([0, 1, 3]))  # labels as a data leaf
    assert float(g.value(g.cross_entropy(logits, labels))) == pytest.approx(np.log(4))
    row = g.constant(np.array([[0.0, 1.0, -1.0]]))  # a one-row batch
    expected = -np.log(np.exp(1.0) / np.exp([0.0, 1.0, -1.0]).sum())
    assert float(g.value(g.cross_entropy(row, [1]))) == pytest.approx(expected)


def test_cross_entropy_ignores_rows_and_smooths_labels_as_torch_documents() -> None:
    g = gl.Graph()
    x = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0]])
    logits = g.parameter(x)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    loss = g.cross_entropy(logits, [0, -100, 2])  # the middle row is ignored
    assert float(g.value(loss)) == pytest.approx(-(logp[0, 0] + logp[2, 2]) / 2, rel=1e-14)
    g.backward(loss)
    grad = g.grad(logits)
    assert grad is not None
    np.testing.assert_array_equal(grad[1], 0.0)
    smoothed = g.cross_entropy(logits, [0, 1, 2], label_smoothing=0.3)
    target = 0.7 * np.eye(3) + 0.1  # (1 - e) on the label, e / C on every class
    assert float(g.value(smoothed)) == pytest.approx(-(target * logp).sum() / 3, rel=1e-14)
    nothing = g.cross_entropy(logits, [-100, -100, -100])  # every row ignored: NaN, as torch
    assert np.isnan(g.value(nothing))


@given(x=gst.arrays((200, 50)), p=st.sampled_from([0.1, 0.5, 0.8]), seed=st.integers(0, 1000))
def test_dropout_mask_statistics_and_gradient(x: np.ndarray, p: float, seed: int) -> None:
    g = gl.Graph()
    ones = g.parameter(np.ones_like(x))
    y = g.dropout(ones, p, rng=np.random.default_rng(seed))
    kept = g.value(y) != 0
    # 10,000 Bernoulli(1 - p) draws: the kept fraction is within 5 standard deviations.
    assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / kept.size)
    np.testing.assert_allclose(g.value(y)[kept], 1 / (1 - p))
    g.backward(g.sum(y))
    np.testing.assert_array_equal(g.grad(ones), g.value(y))  # the gradient flows through the mask
    again = g.dropout(ones, p, rng=seed)
    np.testing.assert_array_equal(g.value(again), g.value(g.dropout(ones, p, rng=seed)))


def test_scopes_label_nodes_and_nest() -> None:
    g = gl.Graph()
    x = g.parameter(np.ones(2))
    with g.scope("block"):
        y = g.relu(x)
        with g.scope("inner"):
            z = g.exp(y)
        v = g.relu(z)  # back in the outer scope
    w = g.neg(z)
    assert (x.scope, y.scope, z.scope, v.scope, w.scope) == (
        None,
        "block",
        "block/inner",
        "block",
        None,
    )
    assert g.scope("block") is g.scope("block")  # made once, entered cheaply on every call
    for bad in ("", "a/b"):
        with pytest.raises(ValueError, match="scope: name must be a non-empty str without '/'"):
            g.scope(bad).__enter__()
    with pytest.raises(TypeError, match="scope: name must be a str, got int"):
        g.scope(3).__enter__()  # type: ignore[arg-type]


def test_enter_scope_and_leave_scope_label_as_the_with_statement_does() -> None:
    g = gl.Graph()
    x = g.parameter(np.ones(2))
    with g.scope("block"):
        with g.scope("inner"):
            by_with = g.exp(x)
        outer = g.enter_scope("inner")
        by_call = g.exp(x)
        assert outer == "block"
        inside = g.enter_scope("deeper")
        deeper = g.relu(x)
        g.leave_scope(inside)
        back = g.relu(x)
        g.leave_scope(outer)
        after = g.neg(x)
    top = g.enter_scope("top")
    first = g.neg(x)
    g.leave_scope(top)
    assert top is None
    assert (by_with.scope, by_call.scope, deeper.scope, back.scope, after.scope) == (
        "block/inner",
        "block/inner",
        "block/inner/deeper",
        "block/inner",
        "block",
    )
    assert (first.scope, g.neg(x).scope) == ("top", None)
    made = g.scope("inner")
    g.leave_scope(g.enter_scope("inner"))
    assert g.scope("inner") is made  # entered by a call, a name makes no second scope
    with g.scope("block"):  # the joined names are made once and shared by both ways in
        assert g.enter_scope("inner") == "block"
        assert g.relu(x).scope == "block/inner"
        g.leave_scope("block")
    with pytest.raises(ValueError, match="non-empty str") as info:
        g.enter_scope("a/b")
    assert str(info.value) == "enter_scope: name must be a non-empty str without '/', got 'a/b'"
    with pytest.raises(TypeError) as typed:
        g.enter_scope(3)  # type: ignore[arg-type]
    assert str(typed.value) == "enter_scope: name must be a str, got int"
    with pytest.raises(TypeError) as told:
        g.leave_scope(3)  # type: ignore[arg-type]
    assert str(told.value) == (
        "leave_scope: outer must be what enter_scope returned, a str or None, got int: 3"
    )
    assert g.neg(x).scope is None  # a refused name or outer changes nothing


def test_a_node_of_the_fast_recording_path_is_the_node_of_the_general_one() -> None:
    # _record makes its NodeId without __init__ on the fast path: every slot must be set as
    # __init__ sets it (the general path, taken here by the op's fixed arity turned off)
    from graphlora.engine.node import NodeId
    from graphlora.ops import arithmetic

    def record(fixed: int) -> gl.NodeId:
        g = gl.Graph()
        a, b = g.parameter(np.ones(2)), g.constant(np.full(2, 2.0))
        g.relu(a)  # one op before, so the index and id are not 0
        saved = arithmetic.add.fixed
        arithmetic.add.fixed = fixed
        try:
            with g.scope("s"):
                return g.add(a, b)
        finally:
            arithmetic.add.fixed = saved

    fast, general = record(2), record(-1)
    for slot in NodeId.__slots__:
        got, want = getattr(fast, slot), getattr(general, slot)
        if slot == "_graph":
            assert type(got) is gl.Graph
        elif slot == "_value":
            np.testing.assert_array_equal(got, want)
        elif slot == "_vjp":
            assert callable(got) and callable(want)
        elif slot == "_inputs":
            assert [i.id for i in got] == [i.id for i in want]
        else:
            assert got == want, slot
    assert (fast.id, fast._index, fast.scope, fast.requires_grad) == (3, 1, "s", True)


def test_scalar_gradients_stay_arrays_when_they_accumulate() -> None:
    # Found by the state machine: 0-d + 0-d gives a NumPy scalar, not an array.
    g = gl.Graph()
    w = g.parameter(0.5)
    g.backward(w)
    g.backward(g.exp(w))
    g.backward(g.exp(w))
    grad = g.grad(w)
    assert isinstance(grad, np.ndarray)
    assert grad.shape == ()
    np.testing.assert_allclose(grad, 1 + 2 * np.exp(0.5))


# --- behaviours a mutation of the engine would change (mutation testing found them unchecked) ---


def test_a_second_reset_makes_the_nodes_between_stale_and_backward_still_works() -> None:
    g = gl.Graph()
    w = g.parameter([1.0, 2.0])
    g.reset()
    between = g.scale(w, 3.0)
    g.reset()
    with pytest.raises(gl.StaleNodeError):
        g.value(between)
    g.backward(g.sum(g.scale(w, 3.0)))
    np.testing.assert_array_equal(g.grad(w), [3.0, 3.0])


def test_a_float32_size_1_loss_keeps_its_gradient_shape_and_dtype() -> None:
    g = gl.Graph(np.float32)
    w = g.parameter([[1.0, 2.0]])
    loss = g.matmul(w, g.constant([[1.0], [1.0]]))  # shape (1, 1)
    g.backward(loss, retain_grads=True)
    assert g.grad(loss).shape == (1, 1) and g.grad(loss).dtype == np.float32
    assert g.grad(w).dtype == np.float32
    np.testing.assert_array_equal(g.grad(w), [[1.0, 1.0]])


def test_zero_grad_of_some_nodes_clears_only_those() -> None:
    g = gl.Graph()
    x, y = g.parameter([1.0]), g.parameter([2.0])
    g.backward(g.sum(g.mul(x, y)))
    g.zero_grad([x])
    assert g.grad(x) is None
    np.testing.assert_array_equal(g.grad(y), [1.0])


def test_after_a_vjp_raises_mid_backward_a_second_backward_gives_clean_gradients() -> None:
    calls = {"n": 0}

    @gl.ops.op()
    def flaky(x: np.ndarray) -> tuple[np.ndarray, Any]:
        def vjp(g: np.ndarray, needs: tuple[bool, ...]) -> tuple[np.ndarray]:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("the first backward fails")
            return (g * 2.0,)

        return x * 2.0, vjp

    g = gl.Graph()
    w = g.parameter([1.0, 2.0])
    loss = g.sum(g.add(g.apply(flaky, w), w))  # w gets a gradient from two paths
    with pytest.raises(RuntimeError, match="the first backward fails"):
        g.backward(loss)
    assert g.grad(w) is None  # nothing was committed
    g.backward(loss)
    np.testing.assert_array_equal(g.grad(w), [3.0, 3.0])


# --- the exact messages of refused calls, and the state they leave ----------------------------
# The messages are part of the contract (docs/errors.md shows them): each test below pins one.


def _foreign_and_stale(g: gl.Graph) -> tuple[gl.NodeId, gl.NodeId]:
    foreign = gl.Graph(g.dtype).parameter([1.0])  # of the same dtype: refused as foreign alone
    x = g.parameter([1.0, 2.0])
    stale = g.relu(x)
    g.reset()
    return foreign, stale


@pytest.mark.parametrize(
    ("method", "arg", "call"),
    [
        ("value", "node", lambda g, n: g.value(n)),
        ("grad", "node", lambda g, n: g.grad(n)),
        ("buffers", "leaf", lambda g, n: g.buffers(n)),
        ("set_value", "leaf", lambda g, n: g.set_value(n, [0.0])),
        ("requires_grad_", "leaf", lambda g, n: g.requires_grad_(n)),
        ("zero_grad", "nodes", lambda g, n: g.zero_grad([n])),
        ("check", "node", lambda g, n: g.check(n)),
    ],
)
def test_node_refusals_name_method_and_argument(
    method: str, arg: str, call: Callable[[gl.Graph, Any], object]
) -> None:
    g = gl.Graph()
    foreign, stale = _foreign_and_stale(g)
    with pytest.raises(TypeError) as info:
        call(g, 3)
    assert str(info.value) == f"{method}: {arg} must be a NodeId, got int: 3"
    with pytest.raises(gl.errors.ForeignNodeError) as foreign_info:
        call(g, foreign)
    assert str(foreign_info.value) == f"{method}: {arg} {foreign!r} belongs to another Graph"
    if method not in ("buffers", "set_value", "requires_grad_"):  # these refuse any op output
        with pytest.raises(gl.errors.StaleNodeError) as stale_info:
            call(g, stale)
        assert str(stale_info.value) == (
            f"{method}: {arg} {stale!r} was recorded before the last reset() and no longer exists"
        )


@pytest.mark.parametrize("first", [True, False])
def test_an_ops_inputs_are_refused_in_either_place(first: bool) -> None:
    # one- and two-input ops take a fast path: a foreign, stale or non-node input in either
    # place falls to the general path, which refuses it by name; a data node is read as floats
    g = gl.Graph(np.float32)
    foreign, stale = _foreign_and_stale(g)
    good = g.parameter(np.ones(2, np.float32))
    for bad, error, told in (
        (foreign, gl.ForeignNodeError, f"{foreign!r} belongs to another Graph"),
        (stale, gl.StaleNodeError, f"{stale!r} was recorded before the last reset()"),
    ):
        arg = "a" if first else "b"
        with pytest.raises(error) as info:
            g.add(bad, good) if first else g.add(good, bad)
        assert str(info.value).startswith(f"add: {arg} {told}")
        with pytest.raises(error) as unary:
            g.relu(bad)
        assert str(unary.value).startswith(f"relu: x {told}")
    with pytest.raises(TypeError, match=f"add: {'a' if first else 'b'} must be a NodeId, got int"):
        g.add(3, good) if first else g.add(good, 3)  # type: ignore[arg-type]
    assert len(g.tape) == 0  # nothing was recorded
    data = g.constant(np.array([2, 3]))  # integer data, read as the graph's floats
    total = g.add(data, good) if first else g.add(good, data)
    assert g.value(total).dtype == np.float32
    np.testing.assert_array_equal(g.value(total), [3.0, 4.0])
    assert g.value(g.neg(data)).dtype == np.float32


@pytest.mark.parametrize("place", [0, 1, 2])
def test_an_op_with_an_optional_input_refuses_each_input_by_name(place: int) -> None:
    # ops with an optional input (linear's bias, a norm's weight) take the second fast path
    g = gl.Graph(np.float32)
    foreign, stale = _foreign_and_stale(g)
    x = g.parameter(np.ones((2, 3), np.float32))
    w = g.parameter(np.full((3, 4), 2.0, np.float32))
    b = g.parameter(np.arange(4, dtype=np.float32))
    names = ("x", "weight", "bias")
    for bad, error, told in (
        (foreign, gl.ForeignNodeError, f"{foreign!r} belongs to another Graph"),
        (stale, gl.StaleNodeError, f"{stale!r} was recorded before the last reset()"),
    ):
        args = [x, w, b]
        args[place] = bad
        with pytest.raises(error) as info:
            g.linear(*args)
        assert str(info.value).startswith(f"linear: {names[place]} {told}")
    for place_name, call in (("x", lambda: g.linear(3, w)), ("weight", lambda: g.linear(x, 3))):
        with pytest.raises(TypeError, match=f"linear: {place_name} must be a NodeId, got int"):
            call()  # type: ignore[no-untyped-call]
    others = gl.Graph(np.float32)  # every input foreign, or every input data to read as floats
    with pytest.raises(gl.ForeignNodeError, match="linear: x "):
        g.linear(others.constant(np.ones((2, 3))), others.constant(np.ones((3, 4))))
    assert len(g.tape) == 0
    assert stale.inputs == ()  # a dropped op holds no inputs
    counts = g.linear(g.constant(np.ones((1, 3), int)), g.constant(np.full((3, 2), 2, int)))
    assert g.value(counts).dtype == np.float32
    np.testing.assert_array_equal(g.value(counts), [[6.0, 6.0]])
    biased = np.full((2, 4), 6.0) + np.arange(4)
    np.testing.assert_array_equal(g.value(g.linear(x, w, b)), biased)
    np.testing.assert_array_equal(g.value(g.linear(x, w)), np.full((2, 4), 6.0))
    np.testing.assert_array_equal(g.value(g.linear(x, w, None)), np.full((2, 4), 6.0))
    data = g.constant(np.array([[1, 0, 0], [0, 0, 2]]))  # integer data, read as floats
    fed = g.linear(data, w, b)
    assert g.value(fed).dtype == np.float32
    np.testing.assert_array_equal(g.value(fed), [[2.0, 3.0, 4.0, 5.0], [4.0, 5.0, 6.0, 7.0]])
    v = np.array([[3.0, 4.0]], np.float32)
    norm = g.rms_norm(g.constant(v), g.parameter(np.array([1.0, 2.0], np.float32)), eps=0.5)
    want = v / np.sqrt((v**2).mean() + 0.5) * [1.0, 2.0]  # the eps given, not the default
    np.testing.assert_allclose(g.value(norm), want, rtol=1e-6)
    g.backward(g.sum(g.linear(x, w)))  # the bias left out wants no gradient
    assert g.grad(b) is None
    np.testing.assert_array_equal(g.grad(w), np.full((3, 4), 2.0))


def test_common_calls_take_the_fast_recording_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    # what the fast paths are for: recording one- and two-input ops on float nodes, and
    # backward from a scalar loss, never reach the general code (which gives the same results)
    g = gl.Graph()
    w, x = g.parameter(np.ones((2, 2))), g.constant(np.full((2, 2), 2.0))
    before = g.relu(w)

    def general(*args: object) -> None:
        raise AssertionError("the general path was taken")

    for name in ("_inputs", "_push", "_seed", "check"):
        monkeypatch.setattr(gl.Graph, name, general)
    loss = g.sum(g.scale(g.add(g.matmul(x, w), g.neg(before)), 3))
    g.backward(loss)
    monkeypatch.undo()
    np.testing.assert_array_equal(g.grad(w), np.full((2, 2), 3 * (4.0 - 1.0)))  # 3 (xᵀ1 - 1)
    data = g.constant(np.array([[1, 2], [3, 4]]))
    monkeypatch.setattr(gl.Graph, "_inputs", general)
    with pytest.raises(AssertionError, match="general path"):  # and the check above can tell
        g.add(data, w)


def test_two_input_ops_with_parameters_are_checked_and_run_with_them() -> None:
    seen: list[tuple[Any, ...]] = []

    def _check(a: np.ndarray, b: np.ndarray, *, w: object) -> dict[str, Any]:
        seen.append((a.shape, b.shape, w))
        return {"w": float(w)}  # type: ignore[arg-type]  # the parameters as forward takes them

    def _blend(a: np.ndarray, b: np.ndarray, *, w: float) -> tuple[np.ndarray, Any]:
        assert type(w) is float
        return a * w + b, lambda g_, needs: (g_ * w, g_)

    blend = ops.op(check=_check)(_blend)
    looked: list[np.ndarray] = []

    def _look(x: np.ndarray) -> None:
        looked.append(x)

    def _twice(x: np.ndarray) -> tuple[np.ndarray, Any]:
        return 2 * x, lambda g_, needs: (2 * g_,)

    twice = ops.op(check=_look)(_twice)  # one input, a check, no parameters
    g = gl.Graph()
    a, b = g.parameter(np.ones((2, 3))), g.parameter(np.full((2, 3), 2.0))
    out = g.apply(blend, a, b, w=3)
    assert seen == [((2, 3), (2, 3), 3)]
    np.testing.assert_array_equal(g.value(out), np.full((2, 3), 5.0))
    assert out.params == {"w": 3.0} and type(out.params["w"]) is float
    doubled = g.apply(twice, a)
    assert len(looked) == 1 and looked[0] is g.buffers(a)[0]  # checked on a's own value
    np.testing.assert_array_equal(g.value(doubled), np.full((2, 3), 2.0))
    g.backward(g.sum(out))
    np.testing.assert_array_equal(g.grad(a), np.full((2, 3), 3.0))
    np.testing.assert_array_equal(g.grad(b), np.ones((2, 3)))


def test_backward_from_a_scalar_loss_refuses_and_seeds_as_the_general_path() -> None:
    g = gl.Graph()
    foreign, _ = _foreign_and_stale(g)
    w = g.parameter(np.array([1.0, 2.0]))
    stale_loss = g.sum(w)
    g.reset()
    with pytest.raises(gl.ForeignNodeError):
        g.backward(gl.Graph().sum(foreign))
    with pytest.raises(gl.StaleNodeError):
        g.backward(stale_loss)
    loss = g.sum(g.mul(w, w))
    g.backward(loss, 2.0)  # a seed given: not the shared 1
    np.testing.assert_array_equal(g.grad(w), [4.0, 8.0])
    g.zero_grad()
    for _ in range(2):  # the loss keeps its own gradient; the shared seed is never written
        g.backward(loss, retain_grads=True)
    np.testing.assert_array_equal(g.grad(loss), 2.0)
    np.testing.assert_array_equal(g.grad(w), [4.0, 8.0])
    g.zero_grad()
    g.backward(g.sum(g.mul(w, w)))
    np.testing.assert_array_equal(g.grad(w), [2.0, 4.0])  # a 1, still


def test_leaf_only_methods_refuse_an_op_output_with_its_message() -> None:
    g = gl.Graph()
    y = g.relu(g.parameter([1.0]))
    with pytest.raises(gl.errors.GraphError) as info:
        g.buffers(y)
    assert str(info.value) == f"buffers: {y!r} is the output of an op, not a leaf"
    with pytest.raises(gl.errors.GraphError) as info:
        g.set_value(y, [0.0])
    assert str(info.value) == (
        f"set_value: {y!r} is the output of an op; only constants and parameters can be set"
    )
    with pytest.raises(gl.errors.GraphError) as info:
        g.requires_grad_(y, False)
    assert str(info.value) == (
        f"requires_grad_: {y!r} is the output of an op; only leaves can be frozen or unfrozen"
    )


def test_flag_refusals_name_their_function_and_argument() -> None:
    with pytest.raises(TypeError) as info:
        gl.Graph(check_finite="yes")  # type: ignore[arg-type]
    assert str(info.value) == "Graph: check_finite must be a bool, got str"
    g = gl.Graph()
    x = g.parameter([1.0])
    with pytest.raises(TypeError) as info:
        g.requires_grad_(x, 1)  # type: ignore[arg-type]
    assert str(info.value) == "requires_grad_: requires_grad must be a bool, got int"
    assert x.requires_grad  # nothing changed


def test_requires_grad_renames_the_leaf_and_a_frozen_leaf_keeps_no_gradient() -> None:
    g = gl.Graph()
    x = g.parameter([1.0, -2.0])
    g.backward(g.sum(g.mul(x, x)))
    np.testing.assert_array_equal(g.grad(x), [2.0, -4.0])
    g.requires_grad_(x, False)
    assert (x.op, x.requires_grad, g.grad(x)) == ("constant", False, None)
    g.requires_grad_(x, True)
    assert (x.op, x.requires_grad, g.grad(x)) == ("parameter", True, None)
    c = g.constant([3.0])
    g.requires_grad_(c)
    assert c.op == "parameter"
    assert c in g.parameters()


def test_values_are_read_in_the_graph_dtype_and_in_c_order() -> None:
    g = gl.Graph(np.float32)
    x = g.parameter([1.0, 2.0])
    g.set_value(x, np.array([3, 4]))  # integers into a float leaf: read as its floats
    assert g.value(x).dtype == np.float32
    np.testing.assert_array_equal(g.value(x), [3.0, 4.0])
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    ids = np.asfortranarray(np.arange(6).reshape(2, 3))
    for leaf in (g.parameter(fortran), g.constant(ids)):
        assert g.value(leaf).flags.c_contiguous  # C order: the same rounding in every sum
        np.testing.assert_array_equal(g.value(leaf), np.arange(6).reshape(2, 3))
    assert g.value(g.constant(ids)).dtype == ids.dtype  # data keeps its kind
    y = g.relu(x)
    g.backward(y, grad=np.array([1, 2]))  # an integer seed: read as the graph's floats
    assert g.grad(x).dtype == np.float32
    np.testing.assert_array_equal(g.grad(x), [1.0, 2.0])


def test_zero_grad_takes_any_iterable_and_checks_every_node_before_clearing_any() -> None:
    g = gl.Graph()
    x, y = g.parameter([1.0]), g.parameter([2.0])
    z = g.relu(x)
    g.backward(g.sum(g.add(g.mul(x, y), z)), retain_grads=True)
    g.zero_grad(node for node in (x,))  # a generator: read once
    assert g.grad(x) is None
    assert g.grad(y) is not None
    assert g.grad(z) is not None  # an op's retained gradient is cleared only when named
    g.zero_grad((z,))
    assert g.grad(z) is None
    before = g.buffers(y)[1]
    foreign = gl.Graph().parameter([1.0])
    with pytest.raises(gl.errors.ForeignNodeError):
        g.zero_grad([y, foreign])
    assert g.buffers(y)[1] is before  # refused as a whole: y kept its gradient
    g.reset()
    with pytest.raises(gl.errors.StaleNodeError):
        g.zero_grad([y, z])
    assert g.buffers(y)[1] is before


def test_a_custom_op_is_named_after_a_callable_without_a_name() -> None:
    class Double:
        def __call__(self, a: np.ndarray) -> tuple[np.ndarray, Any]:
            return 2 * a, lambda g_, needs: (2 * g_,)

    g = gl.Graph()
    y = g.apply(Double(), g.parameter([1.0]))
    assert y.op == "Double"
    with pytest.raises(TypeError) as info:
        g.apply(Double(), 3)
    assert str(info.value) == "Double: input 0 must be a NodeId, got int: 3"


def test_apply_reads_integer_inputs_in_the_graph_dtype_in_a_replay_too() -> None:
    def shift(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, Any]:
        assert a.dtype == b.dtype == np.float32  # both read as the graph's floats
        return a + b, lambda g_, needs: (g_, g_)

    g = gl.Graph(np.float32)
    w = g.parameter([0.5, 0.25])
    ids = g.constant(np.array([1, 2]))
    loss = g.sum(g.apply(shift, w, ids))
    g.backward(loss)
    np.testing.assert_array_equal(g.grad(w), [1.0, 1.0])
    assert g.grad(ids) is None
    step = g.compile(loss)
    g.set_value(ids, np.array([3, 4]))
    assert float(step()) == pytest.approx(7.75)


def test_an_op_call_with_the_wrong_number_of_inputs_names_them() -> None:
    g = gl.Graph()
    x = g.parameter(np.ones((2, 3)))
    with pytest.raises(TypeError) as info:
        g.apply(ops.relu, x, x)
    assert str(info.value) == "relu: takes the inputs (x), got 2 of them"
    with pytest.raises(TypeError) as info:
        g.apply(ops.layer_norm)
    assert str(info.value) == "layer_norm: takes the inputs (x, weight, bias), got 0 of them"
    # optional inputs left out are None: layer_norm(x) is layer_norm(x, None, None)
    np.testing.assert_array_equal(
        g.value(g.apply(ops.layer_norm, x)), g.value(g.layer_norm(x, None, None))
    )
    with pytest.raises(TypeError) as info:
        g.apply(ops.embedding, x, [[0], [1, 2]])  # ragged: not an array
    assert str(info.value).startswith("embedding: ids must be an array: ")


def test_backward_skips_nodes_the_loss_does_not_reach_and_walks_only_up_to_the_loss() -> None:
    g = gl.Graph()
    x = g.parameter([1.0, -1.0])
    b = g.scale(x, 2.0)
    g.relu(x)  # recorded between b and the loss, not on the loss's path
    loss = g.sum(b)
    g.exp(x)  # recorded after the loss
    g.backward(loss, retain_grads=True)
    np.testing.assert_array_equal(g.grad(x), [2.0, 2.0])
    np.testing.assert_array_equal(g.grad(b), [1.0, 1.0])


@pytest.mark.parametrize(
    ("extra", "told"), [((), "1"), ((None, None), "3"), ((None, 1.0), "more than 2")]
)
def test_an_op_whose_vjp_gives_the_wrong_number_of_gradients_fails_in_backward(
    extra: tuple[Any, ...], told: str
) -> None:
    def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, Any]:
        return a * b, lambda g_, needs: (g_ * b, *extra)  # not two gradients

    pair = ops.op()(_pair)  # an OpDef is trusted like a built-in: no per-call check
    g = gl.Graph()
    x, y = g.parameter([1.0]), g.parameter([2.0])
    product = g.apply(pair, x, y)
    with pytest.raises(gl.errors.GraphError) as info:
        g.backward(g.sum(product))
    assert str(info.value) == (
        f"backward: the VJP of {product!r} returned {told} gradient(s) for its 2 input(s)"
    )
    assert g.grad(x) is None  # nothing committed
    assert g.grad(y) is None
    g.backward(g.sum(g.mul(x, y)))  # and the graph goes on
    np.testing.assert_array_equal(g.grad(x), [2.0])
    g.zero_grad()
    before = g.neg(x)  # given a gradient by the loss below before its count is found wrong
    with pytest.raises(gl.errors.GraphError, match="returned"):
        g.backward(g.apply(pair, before, y))
    g.backward(g.sum(before))  # nothing of the failed walk is left on the nodes it reached
    np.testing.assert_array_equal(g.grad(x), [-1.0])


def test_an_index_error_inside_a_vjp_is_the_vjps_own() -> None:
    def _first(a: np.ndarray) -> tuple[np.ndarray, Any]:
        return a * 1.0, lambda g_, needs: (g_[5],)  # an IndexError of its own

    first = ops.op()(_first)
    g = gl.Graph()
    x = g.parameter([1.0])
    with pytest.raises(IndexError):
        g.backward(g.sum(g.apply(first, x)))
    assert g.grad(x) is None


def test_a_loss_with_more_than_one_element_needs_grad_with_this_message() -> None:
    g = gl.Graph()
    loss = g.relu(g.parameter([1.0, 2.0]))
    with pytest.raises(gl.errors.ShapeError) as info:
        g.backward(loss)
    assert str(info.value) == (
        f"backward: loss {loss!r} has 2 elements; reduce it to one (sum, mean) or pass grad= "
        "with its shape"
    )
    with pytest.raises(TypeError) as type_info:
        g.backward(loss, grad="x")
    assert str(type_info.value).startswith("backward: grad ")


def test_check_graph_names_the_caller_and_the_type() -> None:
    from graphlora.engine.graph import check_graph

    with pytest.raises(TypeError) as info:
        check_graph("LoraLinear.forward", 3)
    assert str(info.value) == "LoraLinear.forward: graph must be a Graph, got int"


def test_the_anomaly_message_names_shapes_bad_inputs_and_the_incoming_gradient() -> None:
    g2 = gl.Graph(check_finite=True)
    x2 = g2.parameter([0.0, 1.0])
    with pytest.raises(gl.errors.NonFiniteError) as info, np.errstate(divide="ignore"):
        g2.log(x2)  # log(0) = -inf
    assert str(info.value) == (
        "anomaly: the forward output of op 'log' holds 1 non-finite value(s) (NaN or Inf); "
        "input shapes: (2,); non-finite inputs: none"
    )
    g3 = gl.Graph(check_finite=True)
    a = g3.parameter([4.0, 1.0])
    r = g3.sqrt(g3.sub(a, g3.constant([4.0, 0.0])))  # sqrt(0): a finite output, infinite slope
    with pytest.raises(gl.errors.NonFiniteError) as grad_info:
        g3.backward(g3.sum(r))
    message = str(grad_info.value)
    assert message.startswith("anomaly: the gradient of op 'sqrt' at ")
    assert "input shapes: (2,); non-finite inputs: none" in message
    assert message.endswith("is the bad one; the incoming gradient was finite")


def test_a_stale_node_names_itself_when_its_shape_is_read() -> None:
    g = gl.Graph()
    y = g.relu(g.parameter([1.0]))
    g.reset()
    with pytest.raises(gl.errors.StaleNodeError) as info:
        _ = y.shape
    assert str(info.value) == f"{y!r} was recorded before a reset; its value is gone"


def test_a_scalar_loss_seeds_gradients_in_the_graph_dtype_and_the_seed_is_read_only() -> None:
    g = gl.Graph(np.float32)
    x = g.parameter([1.0, 2.0])
    g.backward(g.sum(g.mul(x, x)))
    assert g.grad(x).dtype == np.float32

    def doubles_in_place(a: np.ndarray) -> tuple[np.ndarray, Any]:
        def vjp(grad: np.ndarray, needs: tuple[bool, ...]) -> tuple[np.ndarray]:
            grad *= 2  # writes into the gradient it was given: refused, not silently shared
            return (np.broadcast_to(grad, a.shape),)

        return a.sum(), vjp

    with pytest.raises(ValueError, match="read-only"):
        g.backward(g.apply(doubles_in_place, x))
    g.backward(g.sum(x))  # the shared seed of a scalar loss is still 1
    np.testing.assert_array_equal(g.grad(x), [3.0, 5.0])


def test_zero_grad_of_everything_clears_retained_op_gradients_too() -> None:
    g = gl.Graph()
    x = g.parameter([1.0])
    y = g.exp(x)
    g.backward(g.sum(y), retain_grads=True)
    assert g.grad(y) is not None
    g.zero_grad()
    assert g.grad(x) is None
    assert g.grad(y) is None


def test_a_scope_name_that_is_not_a_string_is_a_type_error_with_its_message() -> None:
    g = gl.Graph()
    with pytest.raises(TypeError, match=r"^scope: name must be") as info:
        g.scope(["block"])  # type: ignore[arg-type]  # unhashable too
    assert str(info.value) == "scope: name must be a str, got list"


def test_a_stale_input_to_a_plain_function_is_named_by_its_position() -> None:
    g = gl.Graph()
    stale = g.relu(g.parameter([1.0]))
    g.reset()
    with pytest.raises(gl.errors.StaleNodeError) as info:
        g.apply(lambda a: (a, lambda grad, needs: (grad,)), stale)
    assert str(info.value).startswith(f"<lambda>: input 0 {stale!r} was recorded before")


def test_a_replay_reads_integer_data_as_the_graph_dtype_as_the_recording_did() -> None:
    g = gl.Graph(np.float32)
    x = g.parameter([0.5, 0.25])
    k = g.constant(np.array([2, 4]))
    loss = g.sum(g.mul(x, k))  # mul reads k's integers as float32
    recorded = g.value(loss).copy()
    step = g.compile(loss)
    replayed = step()
    assert replayed.dtype == np.float32
    np.testing.assert_array_equal(replayed, recorded)


def test_many_small_ops_together_over_4_mib_are_kept_for_the_next_recording() -> None:
    g = gl.Graph()
    w = g.parameter(np.ones(100_000))  # 0.8 MB an op; six of them, 4.8 MB, are over 4 MiB
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(6):
            g.exp(w)
        g.reset()
        assert tracemalloc.get_traced_memory()[0] - start >= 4_800_000  # kept, counted together
        g.reset()
        assert tracemalloc.get_traced_memory()[0] - start < 800_000
    finally:
        tracemalloc.stop()


def test_gradients_of_0d_products_are_arrays() -> None:
    g = gl.Graph()
    x, y = g.parameter(0.5), g.parameter(2.0)
    g.backward(g.mul(x, y))  # 0-d * 0-d in the VJP: NumPy gives a scalar, kept an array
    for node, expected in ((x, 2.0), (y, 0.5)):
        grad = g.grad(node)
        assert isinstance(grad, np.ndarray)
        assert grad.shape == ()
        assert float(grad) == expected


def test_anomaly_messages_list_every_input_shape_and_every_bad_input() -> None:
    g = gl.Graph(check_finite=True)
    a = g.constant([np.inf, 1.0])
    b = g.constant([np.nan, 2.0])
    with pytest.raises(gl.errors.NonFiniteError) as info:
        g.add(a, b)
    assert str(info.value) == (
        "anomaly: the forward output of op 'add' holds 1 non-finite value(s) (NaN or Inf); "
        f"input shapes: (2,), (2,); non-finite inputs: input 0 ({a!r}), input 1 ({b!r})"
    )
    table = g.constant([[np.inf, 0.0], [1.0, 2.0]])
    with pytest.raises(gl.errors.NonFiniteError) as info:
        g.embedding(table, np.array([0]))  # ids given as a plain array: not a node, not listed
    assert str(info.value).endswith(f"input shapes: (2, 2); non-finite inputs: input 0 ({table!r})")
    with pytest.raises(gl.errors.NonFiniteError) as info:
        g.apply(lambda: (np.array(np.inf), lambda grad, needs: ()))
    assert str(info.value).endswith("input shapes: none; non-finite inputs: none")


def test_anomaly_says_when_the_incoming_gradient_was_already_non_finite() -> None:
    g = gl.Graph(check_finite=True)
    x = g.parameter([1.0, 2.0])
    y = g.exp(x)
    with pytest.raises(gl.errors.NonFiniteError) as info:
        g.backward(y, grad=[np.inf, 1.0])  # a seed given by hand is not checked
    assert str(info.value).endswith(
        f"the gradient flowing to {x!r} is the bad one; the incoming gradient was already "
        "non-finite"
    )


# --- scratch ---------------------------------------------------------------------------------------


def test_scratch_leaves_the_graph_as_it_found_it() -> None:
    g = gl.Graph()
    w = g.parameter(np.array([1.0, 2.0]), "w")
    loss = g.sum(g.mul(w, w))
    g.backward(loss)
    tape, leaves, grad = g.tape, g.leaves, g.grad(w).copy()
    with g.scratch():
        assert not g.grad_enabled
        c = g.constant(np.ones(2))
        inner = g.add(w, c)
        seen = g.value(inner)
        np.testing.assert_array_equal(seen, [2.0, 3.0])
        with g.scratch():  # nested: drops only its own
            deeper = g.mul(inner, inner)
        assert g.tape[-1] is inner
    assert g.grad_enabled
    assert (g.tape, g.leaves) == (tape, leaves)
    np.testing.assert_array_equal(g.grad(w), grad)
    np.testing.assert_array_equal(seen, [2.0, 3.0])  # values read inside stay valid
    for node in (c, inner, deeper):
        with pytest.raises(
            gl.StaleNodeError,
            match=r"was made inside a scratch\(\) block, which dropped it at its end$",
        ):
            g.value(node)
    g.backward(g.sum(g.mul(w, w)))  # the graph goes on as before
    np.testing.assert_array_equal(g.grad(w), 2 * grad)


def test_scratch_drops_its_ops_even_when_the_block_raises_and_after_a_reset() -> None:
    g = gl.Graph()
    w = g.parameter(np.ones(3))
    kept = g.neg(w)

    def fails() -> None:
        with g.scratch():
            g.exp(w)
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fails()
    assert g.tape == (kept,)
    with g.scratch():
        g.reset()
        g.exp(w)
    assert g.tape == () and g.leaves == (w,)


def test_a_step_compiled_inside_scratch_ends_with_it_and_others_go_on() -> None:
    g = gl.Graph()
    w = g.parameter(np.ones(2))
    outer = g.compile(g.sum(g.mul(w, w)))
    with g.scratch():
        loss = g.sum(w)
        step = g.compile(loss)
        assert float(step(backward=False)) == 2.0
    assert float(outer()) == 2.0  # compiled before the block: goes on
    with pytest.raises(gl.StaleNodeError, match=r"Replay: loss .* was made inside a scratch"):
        step(backward=False)
