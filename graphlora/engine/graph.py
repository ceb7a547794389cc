"""The Graph: leaves, the tape of recorded ops, and reverse-mode backward.

A ``Graph`` owns every node. Leaves (``constant``, ``parameter``) live as long as the graph; each op
call runs NumPy forward at once and appends a node with its VJP closure to the tape. The tape is
append-only, so its order is already a topological order: ``backward`` walks it in reverse from the
loss, with no search and no recursion. A node requires a gradient iff one of its inputs does; a VJP
is never called for a node that does not, and it is told which inputs want a gradient, so no work
is done for a frozen input's own gradient. ``reset`` drops the recorded ops (a training loop calls
it once per step) and keeps the leaves; ``compile`` makes the recorded step into a ``Replay``
(``graphlora.engine.replay``).

Every op goes through one recording path, ``apply``: the op's own check (``graphlora.ops``) runs
before NumPy does, so a rejected call records nothing and its message names the op and the
offending shapes or values. The op methods below are one line each.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from graphlora import _checks
from graphlora.engine.methods import OpMethods
from graphlora.engine.node import (
    DROPPED,
    LEAF,
    RELEASED,
    Input,
    NodeId,
    anomaly,
    needs_grad,
    read_only,
)
from graphlora.errors import (
    ForeignNodeError,
    GraphError,
    NonFiniteError,
    ShapeError,
    StaleNodeError,
)
from graphlora.ops import OpDef
from graphlora.ops.registry import Array, Op, check_kinds, wrap_function

if TYPE_CHECKING:
    from graphlora.engine.replay import Replay

__all__ = ["Graph", "NodeId", "check_graph"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_new = object.__new__
_REAL_KINDS = "biuf"  # bool, signed and unsigned int, float: the kinds that convert to a float
_DATA_KINDS = "biu"  # what a constant keeps as it is: token ids, labels, masks


class _Scope:
    """The context manager of ``Graph.scope``: one per name and graph, made once and reused, so
    that entering a scope on every call of a layer costs little."""

    __slots__ = ("_graph", "_joined", "_name", "_outer")

    def __init__(self, graph: Graph, name: str) -> None:
        self._graph, self._name = graph, name
        self._outer: list[str | None] = []  # the scopes to go back to, innermost last
        self._joined: dict[str | None, str] = {None: name}  # outer scope -> "outer/name"

    def __enter__(self) -> None:
        graph = self._graph
        outer = graph._scope
        self._outer.append(outer)
        graph._scope = self._joined.get(outer) or self.join(outer)

    def join(self, outer: str | None) -> str:
        """``outer/name``, made once for each outer scope."""
        joined = self._joined[outer] = f"{outer}/{self._name}"
        return joined

    def __exit__(self, *exc: object) -> None:
        self._graph._scope = self._outer.pop()


class Graph(OpMethods):
    """A tape-based reverse-mode autograd graph over NumPy arrays.

    Parameters
    ----------
    dtype
        The floating dtype of every value and gradient: ``np.float64`` (default) or ``np.float32``.
    check_finite
        Anomaly mode for the graph's whole life (see ``detect_anomaly``).

    Raises
    ------
    ValueError
        For any other dtype.

    Examples
    --------
    >>> import numpy as np, graphlora as gl
    >>> g = gl.Graph()
    >>> x = g.constant(np.ones((4, 3)))
    >>> w = g.parameter(np.zeros((3, 2)), name="w")
    >>> loss = g.mean(g.matmul(x, w))
    >>> g.backward(loss)
    >>> g.grad(w).shape
    (3, 2)
    """

    def __init__(self, dtype: npt.DTypeLike = np.float64, *, check_finite: bool = False) -> None:
        try:
            resolved = np.dtype(dtype)
        except TypeError:
            resolved = np.dtype(object)
        if resolved not in _DTYPES:
            raise ValueError(f"Graph: dtype must be np.float32 or np.float64, got {dtype!r}")
        self._dtype: np.dtype[Any] = resolved
        self._leaves: list[NodeId] = []
        self._tape: list[NodeId] = []
        self._retired: list[NodeId] = []  # the ops of the last reset, oldest last
        self._held = 0  # bytes of the recorded ops' values
        self._epoch = 0
        self._next_id = 0
        self._grad_enabled = True
        self._check_finite = _checks.flag("Graph", "check_finite", check_finite)
        self._scope: str | None = None
        self._scopes: dict[str, _Scope] = {}  # by name, made on first use
        self._one = np.ones((), self._dtype)  # the seed of a scalar loss, shared
        self._one.flags.writeable = False
        self._version = 0  # counts the changes that end every compiled step (end_replays)

    # --- properties and inspection ------------------------------------------------------------

    @property
    def dtype(self) -> np.dtype[Any]:
        """The floating dtype of every value and gradient in this graph."""
        return self._dtype

    @property
    def grad_enabled(self) -> bool:
        """False inside ``no_grad()``: ops then record values only."""
        return self._grad_enabled

    @property
    def leaves(self) -> tuple[NodeId, ...]:
        """Every constant and parameter, in creation order."""
        return tuple(self._leaves)

    @property
    def tape(self) -> tuple[NodeId, ...]:
        """The ops recorded since the last reset, in recording (topological) order."""
        return tuple(self._tape)

    @property
    def resets(self) -> int:
        """How many times ``reset()`` has run: the ops recorded before the last one are stale."""
        return self._epoch

    def replay_token(self) -> tuple[int, int]:
        """``(resets, ended)``: a compiled step made now stays valid while both are unchanged
        (``ended`` counts ``end_replays`` calls, which ``requires_grad_`` and layers make)."""
        return self._epoch, self._version

    def _new_id(self) -> int:
        """The next node id: unique within the graph, never reused."""
        found = self._next_id
        self._next_id = found + 1
        return found

    def parameters(self) -> list[NodeId]:
        """Every leaf that requires a gradient, in creation order."""
        return [leaf for leaf in self._leaves if leaf._requires_grad]

    def __len__(self) -> int:
        """The number of live nodes: leaves plus recorded ops."""
        return len(self._leaves) + len(self._tape)

    def __repr__(self) -> str:
        params = sum(1 for leaf in self._leaves if leaf._requires_grad)
        return (
            f"Graph(dtype={self._dtype}, constants={len(self._leaves) - params}, "
            f"parameters={params}, ops={len(self._tape)})"
        )

    def to_dot(
        self,
        root: NodeId | None = None,
        *,
        show_values: bool = False,
        show_grads: bool = False,
        legend: bool = False,
    ) -> str:
        """The graph as Graphviz DOT text, styled by node kind and grouped by scope (``root``:
        it and its ancestors only); see ``graphlora.engine.describe.to_dot``."""
        from graphlora.engine import describe

        return describe.to_dot(
            self, root, show_values=show_values, show_grads=show_grads, legend=legend
        )

    def summary(self) -> str:
        """A text table of every leaf and recorded op: id, op, name, input ids, shape, dtype,
        whether it requires a gradient, and the norm of its gradient (``-`` if it has none)."""
        from graphlora.engine import describe

        return describe.summary(self)

    # --- leaves and values --------------------------------------------------------------------

    def constant(self, value: npt.ArrayLike, name: str | None = None) -> NodeId:
        """Add a leaf that never receives a gradient (inputs, targets, frozen weights, data).

        Parameters
        ----------
        value
            Array-like of real numbers, copied. Floats take the graph's dtype; integer and bool
            data (token ids, labels, masks) keep their kind, and an op that reads them as
            numbers computes in the graph's dtype.
        name
            An optional label shown in reprs and drawings.

        Raises
        ------
        TypeError
            For complex, string, object or NodeId input, or a name that is not a string.
        ShapeError
            For ragged nested sequences.
        """
        return self._leaf("constant", value, name, requires_grad=False)

    def parameter(self, value: npt.ArrayLike, name: str | None = None) -> NodeId:
        """Add a leaf that receives a gradient, always of the graph's float dtype. Same arguments
        and errors as ``constant``."""
        return self._leaf("parameter", value, name, requires_grad=True)

    def _leaf(
        self, kind: str, value: npt.ArrayLike, name: str | None, requires_grad: bool
    ) -> NodeId:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{kind}: name must be a str or None, got {type(name).__name__}")
        array = self._as_array(value, kind, "value", keep_data=not requires_grad)
        node = NodeId(
            self,
            LEAF,
            len(self._leaves),
            self._new_id(),
            self._scope,
            kind,
            name,
            array,
            requires_grad,
        )
        self._leaves.append(node)
        return node

    def _as_array(self, value: object, where: str, arg: str, keep_data: bool = False) -> Array:
        """Real data as a fresh array of the graph's dtype (integer and bool data kept as they
        are with ``keep_data``), or raise."""
        if isinstance(value, NodeId):
            raise TypeError(
                f"{where}: {arg} must be array-like, got {value!r}; read a node with graph.value()"
            )
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise ShapeError(
                f"{where}: {arg} is not a regular array (ragged nesting?): {exc}"
            ) from None
        if array.dtype.kind not in _REAL_KINDS:
            raise TypeError(
                f"{where}: {arg} must hold real numbers (bool, int or float) to convert to "
                f"{self._dtype}, got dtype {array.dtype}"
            )
        if keep_data and array.dtype.kind in _DATA_KINDS:
            return np.array(array, order="C")
        return np.array(array, dtype=self._dtype, order="C")  # C order: the same rounding

    def value(self, node: NodeId) -> Array:
        """The node's value as a read-only view (copy it to modify it)."""
        node = self.check(node, "value")
        assert node._value is not None  # live nodes always hold a value
        return read_only(node._value)

    def grad(self, node: NodeId) -> Array | None:
        """The node's accumulated gradient as a read-only view, or ``None`` if it got none.

        Leaves keep their gradients until ``zero_grad()``; recorded ops keep one only when
        ``backward(..., retain_grads=True)`` was used.
        """
        node = self.check(node, "grad")
        if node._grad is None:
            return None
        return read_only(node._grad)

    def buffers(self, leaf: NodeId) -> tuple[Array, Array | None]:
        """A leaf's own value array (writable: update it in place) and its accumulated gradient
        (``None`` if it has none; always for a constant), without copies: what an optimizer's
        step works on.

        Raises
        ------
        GraphError
            When ``leaf`` is the output of an op.
        """
        if type(leaf) is not NodeId or leaf._graph is not self:
            self.check(leaf, "buffers", "leaf")
        if leaf._epoch != LEAF:
            raise GraphError(f"buffers: {leaf!r} is the output of an op, not a leaf")
        return leaf._value, leaf._grad  # type: ignore[return-value]  # a leaf's is never None

    def set_value(self, leaf: NodeId, value: npt.ArrayLike) -> None:
        """Replace a leaf's value with a copy of ``value``, converted to the graph's dtype (a data
        leaf keeps its kind: integer data for an integer leaf, bool for bool).

        Raises
        ------
        GraphError
            When ``leaf`` is a recorded op rather than a constant or parameter.
        ShapeError
            When the shape differs from the leaf's; the old value is kept.
        TypeError
            For data that is not real numbers, or not of a data leaf's kind; the old value is kept.
        """
        leaf = self.check(leaf, "set_value", "leaf")
        if leaf._epoch != LEAF:
            raise GraphError(
                f"set_value: {leaf!r} is the output of an op; only constants and parameters "
                "can be set"
            )
        assert leaf._value is not None
        old = leaf._value
        array = self._as_array(value, "set_value", "value", keep_data=old.dtype.kind != "f")
        if array.dtype.kind != old.dtype.kind:  # a float leaf's value was read as floats
            raise TypeError(
                f"set_value: {leaf!r} holds {old.dtype} data; the new value must too, got "
                f"dtype {array.dtype}"
            )
        if array.shape != old.shape:
            raise ShapeError(
                f"set_value: new value has shape {array.shape} but {leaf!r} has shape {old.shape}"
            )
        leaf._value = array

    def set_values(
        self,
        where: str,
        items: Iterable[tuple[str, NodeId, object]],
        *,
        transposed: Collection[str] = (),
    ) -> None:
        """Set several leaves all or nothing: every ``(label, leaf, value)`` is checked before
        any leaf changes. The one loader behind every ``load_state_dict`` and adapter file.

        A float leaf takes floating-point data (converted to the graph's dtype), an integer or
        bool leaf data of its own kind; shapes must match; float values must be finite. Labels
        in ``transposed`` name values stored the other way round (``[out, in]`` for an
        ``[in, out]`` leaf): they are checked against the reversed shape, and reported as
        stored, then transposed. Errors name ``where`` and the label.

        Raises
        ------
        GraphError
            When a leaf is not a live constant or parameter of this graph.
        ShapeError
            For a ragged value or one of the wrong shape.
        TypeError
            For a node given as a value, or data of the wrong kind.
        ValueError
            For NaN or Inf in a float value.
        """
        checked: list[tuple[NodeId, Array]] = []
        for label, leaf, value in items:
            leaf = self.check(leaf, where, label)
            if leaf._epoch != LEAF:
                raise GraphError(f"{where}: {label} is {leaf!r}, the output of an op, not a leaf")
            if isinstance(value, NodeId):
                raise TypeError(f"{where}: {label} must be an array, got {value!r}")
            try:
                array = np.asarray(value)
            except (ValueError, TypeError) as exc:
                raise ShapeError(f"{where}: {label} is not a regular array: {exc}") from None
            flip = label in transposed
            shape = leaf.shape[::-1] if flip else leaf.shape
            kind = leaf.dtype.kind
            if array.dtype.kind != kind:
                need = "floating-point data" if kind == "f" else f"{leaf.dtype} data"
                raise TypeError(f"{where}: {label} holds {array.dtype} data; it needs {need}")
            if array.shape != shape:
                raise ShapeError(f"{where}: {label} has shape {array.shape}, expected {shape}")
            if kind == "f" and not np.isfinite(array).all():
                raise ValueError(f"{where}: {label} holds NaN or Inf")
            array = array.T if flip else array
            checked.append((leaf, np.array(array, dtype=leaf.dtype, order="C")))
        for leaf, array in checked:
            leaf._value = array

    def requires_grad_(self, leaf: NodeId, requires_grad: bool = True) -> None:
        """Turn a leaf into a parameter (``True``) or freeze it into a constant (``False``).

        Ops recorded before the change keep what they recorded; the change applies from the next
        op on (call it between steps, after ``reset``). A frozen leaf keeps no gradient.

        Raises
        ------
        GraphError
            When ``leaf`` is a recorded op, or integer/bool data (which has no gradient).
        """
        leaf = self.check(leaf, "requires_grad_", "leaf")
        flag = _checks.flag("requires_grad_", "requires_grad", requires_grad)
        if leaf._epoch != LEAF:
            raise GraphError(
                f"requires_grad_: {leaf!r} is the output of an op; only leaves can be frozen or "
                "unfrozen"
            )
        assert leaf._value is not None
        if flag and leaf._value.dtype.kind != "f":
            raise GraphError(
                f"requires_grad_: {leaf!r} holds {leaf._value.dtype} data, which has no gradient"
            )
        if flag != leaf._requires_grad:
            self.end_replays()
        leaf._requires_grad = flag
        leaf._op = "parameter" if flag else "constant"
        if not flag:
            leaf._grad = None

    def zero_grad(self, nodes: Iterable[NodeId] | None = None) -> None:
        """Forget accumulated gradients: of ``nodes``, or of every node (the default).

        Each such ``grad()`` becomes ``None``.
        """
        if nodes is None:
            for node in self._leaves:
                node._grad = None
            for node in self._tape:
                node._grad = None
            return
        checked = nodes if type(nodes) is list else list(nodes)
        epoch = self._epoch
        for node in checked:  # check them all before changing any
            if (
                type(node) is not NodeId
                or node._graph is not self
                or (node._epoch != LEAF and node._epoch != epoch)
            ):
                self.check(node, "zero_grad", "nodes")
        for node in checked:
            node._grad = None

    def reset(self) -> None:
        """Drop every recorded op and keep every leaf with its value, gradient and id.

        NodeIds of the dropped ops become stale: using one raises ``StaleNodeError``. Their
        arrays are freed at once if they take less than 4 MiB; larger ones are freed as the next
        recording goes, one per op it makes, oldest first. A training loop that records a step,
        resets and records the next then reuses the same memory, where freeing it all at once
        would hand it back to the system and take it again page by page (a third of a GPT step's
        time in the README's performance section). A second ``reset()`` frees what is left.
        """
        retired = self._retired
        for node in retired:  # what the last recording did not release
            _release(node)
        retired.clear()
        if self._held < _REUSE_BYTES:
            for node in self._tape:  # free it all now (_release, inlined: a small step's cost)
                node._value = node._grad = node._g = node._vjp = node._fn = node._params = None
                node._inputs = ()
        else:
            for node in self._tape:
                node._grad = node._g = node._params = None
                node._inputs = ()
            self._retired = self._tape[::-1]  # the values: released one per op the next records
        self._tape, self._held = [], 0
        self._epoch += 1

    def scope(self, name: str) -> _Scope:
        """``with graph.scope(name):`` labels the nodes made inside (nested scopes join with
        ``/``).

        Scopes change no computation; drawings group a scope's nodes (``to_dot``), so that a
        layer's paths can be drawn side by side. Cheap enough to use on every call of a layer;
        ``enter_scope`` and ``leave_scope`` do the same without the with statement's cost, for
        a layer whose small steps count it.
        """
        found = self._scopes.get(name) if type(name) is str else None
        return self._new_scope("scope", name) if found is None else found

    def _new_scope(self, where: str, name: object) -> _Scope:
        """The scope of a name used for the first time, checked (``where`` names the caller)."""
        checked = _checks.label(where, "name", name)
        found = self._scopes[checked] = _Scope(self, checked)
        return found

    def enter_scope(self, name: str) -> str | None:
        """Enter the scope ``name`` as ``with scope(name):`` does, and return the scope to go
        back to: give it to ``leave_scope`` in a ``finally``. The same labels, without the with
        statement's cost (about a quarter of a microsecond each way): for layers that enter
        scopes on every call, where a small step's time counts.

        Raises
        ------
        TypeError, ValueError
            For a name that is not a non-empty str without ``/`` (nothing is entered).
        """
        scope = self._scopes.get(name) if type(name) is str else None
        if scope is None:
            scope = self._new_scope("enter_scope", name)
        outer = self._scope
        self._scope = scope._joined.get(outer) or scope.join(outer)
        return outer

    def leave_scope(self, outer: str | None) -> None:
        """Go back to ``outer``, what ``enter_scope`` returned.

        Raises
        ------
        TypeError
            For anything but a str or None (the scope is left as it was).
        """
        if outer is not None and type(outer) is not str:
            raise TypeError(
                "leave_scope: outer must be what enter_scope returned, a str or None, got "
                f"{_checks.describe(outer)}"
            )
        self._scope = outer

    def end_replays(self) -> None:
        """End every compiled step (``Replay``) of this graph: running one then raises
        ``GraphError``. Call it when something changed that a replay would silently ignore:
        where gradients flow, or a Python decision taken while recording (a merged layer)."""
        self._version += 1

    @property
    def check_finite(self) -> bool:
        """True while anomaly mode is on (``Graph(check_finite=True)`` or ``detect_anomaly()``)."""
        return self._check_finite

    @contextmanager
    def detect_anomaly(self) -> Iterator[None]:
        """Anomaly mode within the block: the first op whose output, or whose gradient in
        ``backward``, holds NaN or Inf raises ``NonFiniteError`` naming the op, its inputs and
        their shapes, and which of them were already non-finite. A refused forward op records
        nothing; a refused backward changes no gradient. Off by default; when off it costs one
        flag test per op.
        """
        previous = self._check_finite
        self._check_finite = True
        try:
            yield
        finally:
            self._check_finite = previous

    @contextmanager
    def no_grad(self) -> Iterator[None]:
        """Within this block ops record values only: no closures, no gradients, no dropout."""
        previous = self._grad_enabled
        self._grad_enabled = False
        try:
            yield
        finally:
            self._grad_enabled = previous

    @contextmanager
    def scratch(self) -> Iterator[None]:
        """Within this block ops record values only, as in ``no_grad``, and at its end every node
        made inside (ops and leaves) is dropped: the graph is left exactly as the block found it,
        its tape, leaves and gradients. What a sampling loop or an evaluation needs: read the
        values inside (``value``); a NodeId made inside is stale afterwards (``StaleNodeError``).
        Arrays taken from ``value`` inside stay valid (they are views of arrays the block no
        longer holds). After a ``reset()`` inside, what was recorded since is dropped; a step
        compiled inside ends with the block (running it raises ``StaleNodeError``), while steps
        compiled before it go on. Blocks nest.
        """
        tape, first, epoch = len(self._tape), self._next_id, self._epoch
        try:
            with self.no_grad():
                yield
        finally:
            # the leaves made inside: those from id `first` on (a release inside may have
            # removed older ones, so count by id, not by position)
            leaves = bisect.bisect_left(self._leaves, first, key=lambda leaf: leaf._id)
            dropped = self._leaves[leaves:]
            del self._leaves[leaves:]
            start = tape if self._epoch == epoch else 0  # after a reset inside: all its ops
            ops = self._tape[start:]
            del self._tape[start:]
            self._held -= sum(node._value.nbytes for node in ops if node._value is not None)
            dropped += ops
            for node in dropped:
                node._epoch = DROPPED
                _release(node)

    def readers(self, node: NodeId) -> tuple[NodeId, ...]:
        """The ops on the tape that take ``node`` as an input, in recording order."""
        self.check(node, "Graph.readers", "node")
        return tuple(op for op in self._tape if any(i is node for i in op._inputs))

    def release(self, leaf: NodeId) -> None:
        """Remove ``leaf`` from the graph and free its value and gradient: what quantizing a
        layer does to the float weight it replaces (``gl.nf4.quantize_``). Only a leaf no
        recorded op reads can go (``reset()`` first); using its NodeId afterwards raises
        ``StaleNodeError``, and it is no longer among ``leaves`` or ``parameters()``.

        Raises
        ------
        TypeError, ForeignNodeError, StaleNodeError
            For a node that is not a live node of this graph.
        GraphError
            For an op's output, or a leaf an op on the tape reads (nothing is changed).
        """
        where = "Graph.release"
        self.check(leaf, where, "leaf")
        if leaf._epoch != LEAF:
            raise GraphError(f"{where}: {leaf!r} is a recorded op, not a leaf; only leaves go")
        users = self.readers(leaf)
        if users:
            raise GraphError(
                f"{where}: {leaf!r} is read by {len(users)} recorded op(s), the first "
                f"{users[0]!r}; reset() first"
            )
        position = next(i for i, node in enumerate(self._leaves) if node is leaf)
        del self._leaves[position]
        leaf._epoch = RELEASED
        _release(leaf)

    # --- checking and recording ---------------------------------------------------------------

    def check(self, node: object, where: str = "check", arg: str = "node") -> NodeId:
        """``node`` if it is a live NodeId of this graph; else ``TypeError``, ``ForeignNodeError``
        or ``StaleNodeError`` naming ``where`` and ``arg`` (for code built on the graph)."""
        if type(node) is not NodeId:
            raise TypeError(f"{where}: {arg} must be a NodeId, got {_checks.describe(node)}")
        if node._graph is not self:
            raise ForeignNodeError(f"{where}: {arg} {node!r} belongs to another Graph")
        if node._epoch != self._epoch and node._epoch != LEAF:
            if node._epoch == RELEASED:
                raise StaleNodeError(
                    f"{where}: {arg} {node!r} was released from the graph (Graph.release, as "
                    "quantizing a layer does) and no longer exists"
                )
            if node._epoch == DROPPED:
                raise StaleNodeError(
                    f"{where}: {arg} {node!r} was made inside a scratch() block, which dropped it "
                    "at its end"
                )
            raise StaleNodeError(
                f"{where}: {arg} {node!r} was recorded before the last reset() and no longer exists"
            )
        return node

    def apply(self, op: OpDef | Op, *nodes: Any, **params: Any) -> NodeId:
        """Record an op on ``nodes`` (the one path every op takes) and return its output node.

        ``op`` is an ``OpDef`` (``graphlora.ops``' ops, or one made with ``ops.op``): its check
        runs first, its data inputs take integer/bool NodeIds or plain arrays (kept with the
        node, and fixed in a replay), and its output and gradients are trusted as the
        built-ins' are. Or ``op`` is a plain function ``op(*arrays, **params) -> (out, vjp)``;
        ``vjp(g, needs)`` returns one gradient (or ``None``) per input, each of that input's
        shape; its output is converted to the graph's dtype and its gradients are checked in
        ``backward``. Integer and bool nodes given where an op expects floats are read in the
        graph's dtype.

        Raises
        ------
        TypeError
            If ``op`` is not callable or does not return ``(array, callable)``, or an input is
            not a NodeId; and whatever the op's check raises (``ShapeError``, ``ValueError``).
        """
        if isinstance(op, OpDef):
            return self._record(op, nodes, params)
        if not callable(op):
            raise TypeError(f"apply: op must be callable, got {type(op).__name__}")
        name = getattr(op, "__name__", type(op).__name__)
        inputs, values, casts = self._inputs(name, None, nodes)
        shapes = [value.shape for value in values if value is not None]
        run = wrap_function(
            op, name, shapes, lambda out: self._as_array(out, f"apply: {name}", "its output")
        )
        needs = tuple([type(node) is NodeId and node._requires_grad for node in inputs])
        return self._push(name, run, tuple(inputs), values, params, casts, needs)

    def _record(self, op: OpDef, args: tuple[Any, ...], params: dict[str, Any]) -> NodeId:
        """Check ``args`` and ``params`` against ``op``, then run it and append its node."""
        if len(args) == op.fixed:  # one or two float inputs, as most calls: the fastest path
            epoch, dtype = self._epoch, self._dtype
            a, b = args[0], args[-1]  # the same node for an op of one input
            if (
                type(a) is NodeId
                and type(b) is NodeId
                and a._graph is self
                and b._graph is self
                and (a._epoch == epoch or a._epoch == LEAF)
                and (b._epoch == epoch or b._epoch == LEAF)
                and a._value.dtype is dtype  # type: ignore[union-attr]
                and b._value.dtype is dtype  # type: ignore[union-attr]
            ):
                check, fn = op.check, op.forward
                needs: tuple[bool, ...]
                if op.fixed == 2:  # direct calls: a call with *values costs more
                    va, vb = a._value, b._value
                    if check is not None:
                        found = check(va, vb, **params) if params else check(va, vb)
                        if found is not None:  # None: the parameters as they are
                            params = found
                    out, vjp = fn(va, vb, **params) if params else fn(va, vb)
                    needs = (a._requires_grad, b._requires_grad)
                else:
                    va = a._value
                    if check is not None:
                        found = check(va, **params) if params else check(va)
                        if found is not None:
                            params = found
                    out, vjp = fn(va, **params) if params else fn(va)
                    needs = (a._requires_grad,)
                if type(out) is not np.ndarray:  # NumPy gives scalars for 0-d results
                    out = np.asarray(out)
                if self._check_finite and not np.isfinite(out).all():
                    raise NonFiniteError(anomaly(op.name, args, out, "forward output"))
                tape = self._tape
                flows = self._grad_enabled and True in needs
                # NodeId's __init__, inlined: its call costs a tenth of a microsecond, a tenth of
                # this path (every slot is set, as there; a test holds the two to the same)
                node = _new(NodeId)
                node._graph, node._epoch, node._index = self, epoch, len(tape)
                node._id = self._next_id
                self._next_id += 1
                node._op, node._name, node._value, node._requires_grad = op.name, None, out, flows
                node._inputs, node._scope, node._needs = args, self._scope, needs
                node._vjp = vjp if flows else None
                node._fn, node._params, node._casts = fn, params, ()
                node._grad, node._grad_owned, node._g, node._g_owned = None, False, None, False
                tape.append(node)
                self._held += out.nbytes
                if self._retired:  # free one op of the last reset (see reset)
                    _release(self._retired.pop())
                return node
        elif op.floats_only and len(args) == len(op.slots):  # optional inputs given or not
            values: list[Array | None] = []
            wants: list[bool] = []
            dtype, epoch = self._dtype, self._epoch
            for arg in args:
                if (
                    type(arg) is NodeId
                    and arg._graph is self
                    and (arg._epoch == epoch or arg._epoch == LEAF)
                    and arg._value.dtype is dtype  # type: ignore[union-attr]
                ):
                    values.append(arg._value)
                    wants.append(arg._requires_grad)
                elif arg is None and op.optional[len(values)]:
                    values.append(None)
                    wants.append(False)
                else:
                    break  # something to refuse or convert: the general path below
            else:
                check = op.check
                if check is not None:
                    found = check(*values, **params) if params else check(*values)
                    if found is not None:  # None: the parameters as they are
                        params = found
                return self._push(op.name, op.forward, args, values, params, (), tuple(wants))
        inputs, values, casts = self._inputs(op.name, op, args)
        if op.data_slots:
            check_kinds(op, values)
        params = op.checked(values, params)
        flags = tuple([type(node) is NodeId and node._requires_grad for node in inputs])
        return self._push(op.name, op.forward, tuple(inputs), values, params, casts, flags)

    def _inputs(
        self, name: str, op: OpDef | None, args: Sequence[Any]
    ) -> tuple[list[Input], list[Array | None], tuple[int, ...]]:
        """The checked inputs of a call and their values (read in the graph's dtype where an op
        takes floats), and which of them were converted."""
        slots = None if op is None or op.variadic else op.slots
        if slots is not None and len(args) != len(slots):
            assert op is not None
            if len(args) > len(slots) or len(args) < op.required:
                names = ", ".join(slot.name for slot in slots)
                raise TypeError(f"{name}: takes the inputs ({names}), got {len(args)} of them")
            args = (*args, *([None] * (len(slots) - len(args))))
        inputs: list[Input] = []
        values: list[Array | None] = []
        casts: list[int] = []
        epoch = self._epoch
        for i, arg in enumerate(args):
            slot = None if slots is None else slots[i]
            if type(arg) is NodeId:
                if arg._graph is not self or (arg._epoch != epoch and arg._epoch != LEAF):
                    self.check(arg, name, f"input {i}" if slot is None else slot.name)
                value = arg._value
                assert value is not None
                if value.dtype.kind != "f" and (slot is None or slot.kind == "float"):
                    value = value.astype(self._dtype)  # data read as numbers: the graph's dtype
                    casts.append(i)
                inputs.append(arg)
                values.append(value)
            elif arg is None and slot is not None and slot.optional:
                inputs.append(None)
                values.append(None)
            elif slot is not None and slot.kind != "float":  # data as a plain array, kept as is
                try:
                    array = np.array(arg)
                except (TypeError, ValueError) as error:
                    raise TypeError(f"{name}: {slot.name} must be an array: {error}") from None
                inputs.append(array)
                values.append(array)
            else:
                label = f"input {i}" if slot is None else slot.name
                raise TypeError(f"{name}: {label} must be a NodeId, got {_checks.describe(arg)}")
        return inputs, values, tuple(casts)

    def _push(
        self,
        op: str,
        fn: Op,
        inputs: tuple[Input, ...],
        values: Sequence[Array | None],
        params: dict[str, Any],
        casts: tuple[int, ...],
        needs: tuple[bool, ...],
    ) -> NodeId:
        """Run ``fn(*values, **params)`` on checked arguments and append its node to the tape.

        ``needs[i]`` tells whether input ``i`` wants a gradient. The node keeps ``fn`` and
        ``params``, so ``compile`` can run the op again on new values; the closure is kept only
        if a gradient can flow.
        """
        out, vjp = fn(*values, **params) if params else fn(*values)
        if type(out) is not np.ndarray:  # NumPy gives scalars for 0-d results; keep arrays
            out = np.asarray(out)
        if self._check_finite and not np.isfinite(out).all():
            raise NonFiniteError(anomaly(op, inputs, out, "forward output"))
        tape = self._tape
        kept = vjp if self._grad_enabled and True in needs else None  # None: no gradient flows
        node = NodeId(
            self,
            self._epoch,
            len(tape),
            self._new_id(),
            self._scope,
            op,
            None,
            out,
            kept is not None,
            inputs,
            needs,
            kept,
            fn,
            params,
            casts,
        )
        tape.append(node)
        self._held += out.nbytes
        retired = self._retired
        if retired:  # free one op of the last reset (see reset)
            _release(retired.pop())
        return node

    # --- replay and backward ------------------------------------------------------------------

    def compile(self, loss: NodeId, grad: npt.ArrayLike | None = None, *, start: int = 0) -> Replay:
        """Make the step recorded so far into a ``Replay``: ``step()`` runs the ops recorded up to
        and including ``loss`` again on the leaves' current values, then ``backward(loss, grad)``,
        without recording them again; the values and gradients are exactly those of a new
        recording. See ``Replay`` for what stays fixed (non-node arguments, Python's decisions)
        and what ends a replay (``reset``, ``requires_grad_``, ``end_replays``).

        ``start`` (a tape position, ``len(graph.tape)`` taken before the step was recorded)
        leaves the ops before it out of the replay: they keep their values, and a step recorded
        after other work replays only itself (generation replays one token's step this way).

        Raises
        ------
        ShapeError
            As ``backward`` does for ``loss`` and ``grad``.
        ValueError
            For a ``start`` that is not a tape position at or before ``loss``.
        """
        from graphlora.engine.replay import Replay

        loss = self.check(loss, "compile", "loss")
        self._seed("compile", loss, grad)  # refused here with compile's name
        end = 0 if loss._epoch == LEAF else loss._index + 1
        if not _checks.is_int(start) or not 0 <= start <= end:
            raise ValueError(
                f"compile: start must be a tape position from 0 to {end} (the loss's), got "
                f"{start!r}"
            )
        nodes = tuple(self._tape[start:end])
        return Replay(self, loss, self.backward_step(loss, grad), nodes)

    def backward_step(self, loss: NodeId, grad: npt.ArrayLike | None = None) -> Callable[[], None]:
        """``backward(loss, grad)`` checked once, as a function to run again after each new
        forward (what a compiled step calls): the same walk and accumulation, none of the
        checks."""
        loss = self.check(loss, "backward_step", "loss")
        seed = self._seed("backward_step", loss, grad)
        seed = seed if seed is self._one else read_only(seed)  # never written: not owned
        return lambda: self._backward(loss, seed, False, False)

    def backward(
        self, loss: NodeId, grad: npt.ArrayLike | None = None, *, retain_grads: bool = False
    ) -> None:
        """Accumulate d(loss)/d(leaf) into every parameter that ``loss`` depends on.

        Walks the tape in reverse from ``loss``. Gradients add up across uses of a node and across
        calls until ``zero_grad()``. The gradients are committed only when the whole walk has
        succeeded, so a VJP that raises leaves every gradient as it was.

        Parameters
        ----------
        loss
            A node of size 1, or any node when ``grad`` is given.
        grad
            The seed d(out)/d(loss), of the node's shape; defaults to ones for a size-1 loss.
        retain_grads
            Also keep (and accumulate) the gradients of recorded ops, for inspection with
            ``grad()``. By default only leaves keep theirs, as in PyTorch.

        Raises
        ------
        ShapeError
            If ``loss`` has more than one element and no ``grad`` is given, or ``grad`` has
            another shape.
        GraphError
            If ``loss`` does not depend on any parameter (or was recorded under ``no_grad()``).
        """
        if (  # the common call, a scalar loss of this step that a parameter feeds: no more checks
            grad is None
            and type(loss) is NodeId
            and loss._graph is self
            and loss._epoch == self._epoch
            and loss._requires_grad
            and loss._value.shape == ()  # type: ignore[union-attr]
        ):
            self._backward(loss, self._one, False, retain_grads)  # the shared 1: not owned
            return
        loss = self.check(loss, "backward", "loss")
        seed = self._seed("backward", loss, grad)
        needs_grad("backward", loss)
        self._backward(loss, seed, seed is not self._one, retain_grads)

    def _seed(self, where: str, loss: NodeId, grad: npt.ArrayLike | None) -> Array:
        """The gradient that starts a backward walk from ``loss``, checked against its shape."""
        assert loss._value is not None
        if grad is None:
            if loss._value.size != 1:
                raise ShapeError(
                    f"{where}: loss {loss!r} has {loss._value.size} elements; reduce it to one "
                    "(sum, mean) or pass grad= with its shape"
                )
            seed = self._one if loss._value.ndim == 0 else np.ones(loss._value.shape, self._dtype)
        else:
            seed = self._as_array(grad, where, "grad")
            if seed.shape != loss._value.shape:
                raise ShapeError(
                    f"{where}: grad has shape {seed.shape} but loss {loss!r} has shape "
                    f"{loss._value.shape}"
                )
        return seed

    def _backward(self, loss: NodeId, seed: Array, owned: bool, retain_grads: bool) -> None:
        """The walk of ``backward`` from a checked ``loss`` and ``seed``; ``owned`` tells whether
        the walk may write into ``seed``."""
        loss._g, loss._g_owned = seed, owned
        reached: list[NodeId] = []  # every node given a gradient in this pass, to commit
        check_finite = self._check_finite
        if loss._epoch == LEAF:
            reached.append(loss)
        else:
            tape, ndarray, leaf = self._tape, np.ndarray, LEAF  # locals: read for every gradient
            try:  # the tape in reverse from the loss, without copying it
                for node in islice(reversed(tape), len(tape) - 1 - loss._index, None):
                    g = node._g
                    if g is None:
                        continue
                    if retain_grads:
                        reached.append(node)
                    else:
                        node._g = None
                    assert node._vjp is not None
                    inputs, i = node._inputs, -1
                    for gi in node._vjp(g, node._needs):  # by position: zip(strict=True) costs
                        i += 1  # 0.3 us a node; a wrong count is told below
                        if gi is None:  # every input that is not a node gets None
                            continue
                        if type(gi) is not ndarray:  # a 0-d result of NumPy arithmetic
                            gi = np.asarray(gi)
                        try:  # costs nothing unless raised
                            sink: NodeId = inputs[i]  # type: ignore[assignment]  # only nodes
                        except IndexError:
                            raise _miscounted(node, None) from None  # more than its inputs
                        if check_finite and not np.isfinite(gi).all():
                            raise NonFiniteError(
                                anomaly(node._op, node._inputs, gi, "gradient", node, (sink, g))
                            )
                        previous = sink._g
                        if previous is None:
                            sink._g, sink._g_owned = gi, False
                            if sink._epoch == leaf:
                                reached.append(sink)
                        elif sink._g_owned:
                            previous += gi  # a buffer only this node holds: add in place
                        else:
                            sink._g, sink._g_owned = _added(previous, gi), True
                    if i != len(inputs) - 1:
                        raise _miscounted(node, i + 1)
            except BaseException:
                for node in tape[: loss._index + 1]:
                    node._g = None
                for node in reached:
                    node._g = None
                raise
        for node in reached:  # commit: add this pass's gradient to the accumulated one
            g, node._g = node._g, None
            assert g is not None
            if node._grad is None:
                node._grad, node._grad_owned = g, node._g_owned
            elif node._grad_owned:
                node._grad += g
            else:
                node._grad, node._grad_owned = _added(node._grad, g), True


def check_graph(where: str, graph: object) -> Graph:
    """``graph`` if it is a ``Graph``; else a ``TypeError`` naming ``where`` (for module code)."""
    if not isinstance(graph, Graph):
        raise TypeError(f"{where}: graph must be a Graph, got {type(graph).__name__}")
    return graph


_REUSE_BYTES = 1 << 22
"""From this many bytes of recorded values on (4 MiB), ``reset`` leaves them for the next
recording to free op by op; below it glibc keeps freed memory anyway, and freeing at once is
cheaper."""


def _release(node: NodeId) -> None:
    """Free what a dropped op holds, even while someone still holds its id."""
    node._value = node._grad = node._g = None
    node._vjp = node._fn = node._params = None
    node._inputs = ()


def _miscounted(node: NodeId, count: int | None) -> GraphError:
    """The error for a VJP that returned ``count`` gradients (None: more than its inputs)."""
    inputs = len(node._inputs)
    told = f"more than {inputs}" if count is None else str(count)
    return GraphError(
        f"backward: the VJP of {node!r} returned {told} gradient(s) for its {inputs} input(s)"
    )


def _added(a: Array, b: Array) -> Array:
    """``a + b`` as a new array (NumPy returns a scalar for two 0-d arrays)."""
    total = a + b
    return total if type(total) is np.ndarray else np.asarray(total)
