"""``NodeId``: the handle and record of one node of a ``Graph`` (a leaf or a recorded op).

A NodeId is what users hold (read its value with ``graph.value(node)``) and the record the graph
keeps of the node: its value, inputs, op function and VJP, and accumulated gradient. The graph
(``graphlora.engine.graph``) fills and reads these records; everything else uses the public
properties and the two methods a compiled step needs (``rerunner``, ``replayer``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from graphlora.errors import GraphError, NonFiniteError, StaleNodeError
from graphlora.ops.registry import Array, Op, Vjp, check_of

if TYPE_CHECKING:
    from graphlora.engine.graph import Graph

__all__ = ["DROPPED", "LEAF", "RELEASED", "Input", "NodeId", "anomaly", "needs_grad", "read_only"]

LEAF = -1  # the epoch of a leaf: leaves survive every reset
DROPPED = -2  # the epoch of a node a scratch() block dropped at its end
RELEASED = -3  # the epoch of a leaf Graph.release removed


class NodeId:
    """A handle to one node of a ``Graph``: a leaf or a recorded op.

    Treat it as an id: read the node's value with ``graph.value(node)`` and its gradient with
    ``graph.grad(node)``. It also carries the node's record, so that using it costs no lookup.
    A NodeId recorded before ``graph.reset()`` is stale and is refused with ``StaleNodeError``.
    """

    __slots__ = (
        "_casts",
        "_epoch",
        "_fn",
        "_g",
        "_g_owned",
        "_grad",
        "_grad_owned",
        "_graph",
        "_id",
        "_index",
        "_inputs",
        "_name",
        "_needs",
        "_op",
        "_params",
        "_requires_grad",
        "_scope",
        "_value",
        "_vjp",
    )

    def __init__(
        self,
        graph: Graph,
        epoch: int,
        index: int,
        id_: int,
        scope: str | None,
        op: str,
        name: str | None,
        value: Array,
        requires_grad: bool,
        inputs: tuple[Input, ...] = (),
        needs: tuple[bool, ...] = (),
        vjp: Vjp | None = None,
        fn: Op | None = None,
        params: dict[str, Any] | None = None,
        casts: tuple[int, ...] = (),
    ) -> None:
        self._graph = graph
        self._epoch = epoch  # LEAF, or the graph's epoch when the op was recorded
        self._index = index  # position on the tape (ops) or in the leaf list (leaves)
        self._id = id_  # unique within the graph, never reused, shown to people
        self._op = op
        self._name = name
        self._value: Array | None = value
        self._requires_grad = requires_grad
        self._inputs = inputs  # input nodes; data given as arrays; None for an input left out
        self._scope = scope  # the name scope it was made in, e.g. "block/mlp"
        self._needs = needs  # needs[i]: does input i want a gradient?
        self._vjp = vjp
        self._fn = fn  # the op function and its checked parameters, to run it again (compile)
        self._params = params
        self._casts = casts  # inputs of integer/bool data that the op reads as floats
        self._grad: Array | None = None  # accumulated gradient, kept across backward calls
        self._grad_owned = False  # True when _grad is a buffer only this node holds
        self._g: Array | None = None  # gradient flowing in during one backward pass
        self._g_owned = False

    @property
    def graph(self) -> Graph:
        """The graph the node belongs to."""
        return self._graph

    @property
    def id(self) -> int:
        """A number unique within the graph (never reused, not even after ``reset``)."""
        return self._id

    @property
    def op(self) -> str:
        """The op that produced the node: ``"constant"``, ``"parameter"``, ``"matmul"``, ..."""
        return self._op

    @property
    def name(self) -> str | None:
        """The name given to a leaf, or ``None``."""
        return self._name

    @property
    def is_leaf(self) -> bool:
        """True for constants and parameters."""
        return self._epoch == LEAF

    @property
    def requires_grad(self) -> bool:
        """True for parameters and for ops recorded with gradients that depend on one."""
        return self._requires_grad

    @property
    def inputs(self) -> tuple[NodeId, ...]:
        """The input nodes of an op (empty for leaves)."""
        return tuple(node for node in self._inputs if type(node) is NodeId)

    @property
    def scope(self) -> str | None:
        """The ``Graph.scope`` the node was made in (``"block/mlp"``), or ``None``."""
        return self._scope

    @property
    def params(self) -> dict[str, Any]:
        """The op's non-node arguments as recorded (``{"c": 2.0}`` for ``scale``), as a new dict;
        empty for leaves and after a reset."""
        return dict(self._params or {})

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the node's value."""
        return self._live().shape

    @property
    def dtype(self) -> np.dtype[Any]:
        """The dtype of the node's value: the graph's float dtype, or a data leaf's own."""
        return self._live().dtype

    def _stale(self) -> bool:
        """Recorded before the last ``reset`` (its value may linger a while: see ``reset``)."""
        return self._epoch != LEAF and self._epoch != self._graph.resets

    def _live(self) -> Array:
        """The node's value, or a ``StaleNodeError`` if it was recorded before a reset."""
        if self._stale():
            if self._epoch == RELEASED:
                raise StaleNodeError(f"{self!r} was released from its graph; its value is gone")
            raise StaleNodeError(f"{self!r} was recorded before a reset; its value is gone")
        assert self._value is not None  # live nodes always hold one
        return self._value

    # --- what a compiled step (graphlora.engine.replay) uses ---------------------------------

    def rerunner(self) -> Callable[[], tuple[Array, Vjp]]:
        """A function that runs this op again on its inputs' current values, with the op function
        and the checked parameters it was recorded with (``Graph.compile``'s replays)."""
        fn, inputs, params, casts = self._fn, self._inputs, self._params or {}, self._casts
        if fn is None:
            raise GraphError(f"rerunner: {self!r} is a leaf or was dropped; there is no op to run")
        if all(type(n) is NodeId for n in inputs) and not params and not casts:  # common calls
            if len(inputs) == 1:
                (x,) = inputs
                assert isinstance(x, NodeId)
                return lambda: fn(x._value)
            if len(inputs) == 2:
                a, b = inputs
                assert isinstance(a, NodeId) and isinstance(b, NodeId)
                return lambda: fn(a._value, b._value)

        if not casts:
            return lambda: fn(*[n._value if type(n) is NodeId else n for n in inputs], **params)
        dtype = self._graph.dtype
        return lambda: fn(*_current(inputs, casts, dtype), **params)

    def _rechecker(self) -> Callable[[], object] | None:
        """The op's check on its inputs' current values, when an input is a data leaf (token
        ids, labels, a mask: what ``set_value`` feeds a compiled step) and the op has a check:
        an id out of range is refused on a replay as on a recording. ``None`` otherwise."""
        check = None if self._fn is None else check_of(self._fn)
        inputs, casts, params = self._inputs, self._casts, self._params or {}
        fed = any(
            type(n) is NodeId and n._epoch == LEAF and i not in casts and n.dtype.kind != "f"
            for i, n in enumerate(inputs)
        )
        if check is None or not fed:
            return None
        dtype = self._graph.dtype
        return lambda: check(*_current(inputs, casts, dtype), **params)

    def replayer(self) -> Callable[[bool], None]:
        """A function ``step(check_finite)`` that runs this op again (``rerunner``) and keeps the
        new value, and VJP, as the node's own: what a compiled step runs for each op. With
        ``check_finite``, a non-finite value raises ``NonFiniteError`` before anything is kept."""
        run, node = self.rerunner(), self
        recheck = self._rechecker()

        def step(check_finite: bool) -> None:
            if recheck is not None:
                recheck()
            out, vjp = run()
            if type(out) is not np.ndarray:  # NumPy gives scalars for 0-d results; keep arrays
                out = np.asarray(out)
            if check_finite and not np.isfinite(out).all():
                raise NonFiniteError(anomaly(node._op, node._inputs, out, "forward output", node))
            node._value = out  # the old value goes at once: a run holds one value per node
            if node._requires_grad:
                node._vjp = vjp

        return step

    def __repr__(self) -> str:
        name = f", name={self._name!r}" if self._name is not None else ""
        if self._stale():
            return f"NodeId({self._id}, op={self._op!r}{name}, stale)"
        assert self._value is not None
        return f"NodeId({self._id}, op={self._op!r}, shape={self._value.shape}{name})"


def _current(inputs: tuple[Input, ...], casts: tuple[int, ...], dtype: Any) -> list[Any]:
    """An op's inputs as it reads them now: nodes' current values, data given as arrays and
    left-out inputs as recorded, and integer/bool data that the op reads as floats converted as
    when recorded."""
    found: list[Any] = [n._value if type(n) is NodeId else n for n in inputs]
    for i in casts:
        found[i] = np.asarray(found[i]).astype(dtype)
    return found


Input = NodeId | Array | None
"""What an op node keeps of each input: its node, data given as a plain array, or ``None``."""


def anomaly(
    op: str,
    inputs: tuple[Input, ...],
    values: Array,
    what: str,
    node: NodeId | None = None,
    flow: tuple[NodeId, Array] | None = None,
) -> str:
    """The message of a ``NonFiniteError``: the op, its inputs' shapes, which were non-finite."""
    count = int(values.size - np.count_nonzero(np.isfinite(values)))
    live = [(i, n) for i, n in enumerate(inputs) if type(n) is NodeId and n._value is not None]
    shapes = ", ".join(str(n.shape) for _, n in live)
    bad = [f"input {i} ({n!r})" for i, n in live if not np.isfinite(np.asarray(n._value)).all()]
    where = f"op {op!r}" if node is None else f"op {op!r} at {node!r}"
    message = (
        f"anomaly: the {what} of {where} holds {count} non-finite value(s) (NaN or Inf); "
        f"input shapes: {shapes or 'none'}; non-finite inputs: {', '.join(bad) or 'none'}"
    )
    if flow is not None:  # a gradient: the input it flows to and the incoming one
        target, g = flow
        message += (
            f"; the gradient flowing to {target!r} is the bad one; the incoming gradient was "
            f"{'finite' if np.isfinite(g).all() else 'already non-finite'}"
        )
    return message


def needs_grad(where: str, loss: NodeId) -> None:
    """Raise unless a gradient can flow back from ``loss``."""
    if not loss._requires_grad:
        raise GraphError(
            f"{where}: {loss!r} does not depend on any parameter (or was recorded under "
            "no_grad()), so there is no gradient to compute"
        )


def read_only(array: Array) -> Array:
    """A view of ``array`` that cannot be written through."""
    view: Array = array.view()
    view.flags.writeable = False
    return view
