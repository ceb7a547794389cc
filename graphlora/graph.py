"""The Graph: leaves, the tape of recorded ops, and reverse-mode backward.

A ``Graph`` owns every node. Leaves (``constant``, ``parameter``) live as long as the graph; each op
call runs NumPy forward at once and appends a node with its VJP closure to the tape. The tape is
append-only, so its order is already a topological order: ``backward`` walks it in reverse from the
loss, with no search and no recursion. A node requires a gradient iff one of its inputs does; a VJP
is never called for a node that does not, and it is told which inputs want a gradient, so frozen
inputs cost nothing. ``reset`` drops the recorded ops (a training loop calls it once per step) and
keeps the leaves; or ``compile`` makes the recorded step into a ``Replay``, which runs the same op
functions again on the leaves' new values without recording them. Every method checks its
arguments before NumPy runs, so a rejected call records nothing and its message names the op and
the offending shapes or values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora import ops
from graphlora.errors import (
    ForeignNodeError,
    GraphError,
    NonFiniteError,
    ShapeError,
    StaleNodeError,
)
from graphlora.ops import Array, Grads, Vjp

__all__ = ["Graph", "NodeId", "Replay"]

_LEAF = -1  # the epoch of a leaf: leaves survive every reset
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_REAL_KINDS = "biuf"  # bool, signed and unsigned int, float: the kinds that convert to a float


class NodeId:
    """A handle to one node of a ``Graph``: a leaf or a recorded op.

    Treat it as an id: read the node's value with ``graph.value(node)`` and its gradient with
    ``graph.grad(node)``. It also carries the node's record, so that using it costs no lookup.
    A NodeId recorded before ``graph.reset()`` is stale and is refused with ``StaleNodeError``.
    """

    __slots__ = (
        "_args",
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
        op: str,
        name: str | None,
        value: Array,
        requires_grad: bool,
        inputs: tuple[NodeId, ...],
        needs: tuple[bool, ...],
        vjp: Vjp | None,
        fn: ops.Op | None = None,
        args: tuple[Any, ...] = (),
    ) -> None:
        self._graph = graph
        self._epoch = epoch  # _LEAF, or the graph's epoch when the op was recorded
        self._index = index  # position on the tape (ops) or in the leaf list (leaves)
        self._id = graph._next_id  # unique within the graph, never reused, shown to people
        graph._next_id += 1
        self._op = op
        self._name = name
        self._value: Array | None = value
        self._requires_grad = requires_grad
        self._inputs = inputs  # the input nodes (for drawing and backward)
        self._scope = graph._scope  # the name scope it was made in, e.g. "proj/lora"
        self._needs = needs  # needs[i]: does input i want a gradient?
        self._vjp = vjp
        self._fn = fn  # the op function and its other arguments, to run it again (compile)
        self._args = args
        self._grad: Array | None = None  # accumulated gradient, kept across backward calls
        self._grad_owned = False  # True when _grad is a buffer only this node holds
        self._g: Array | None = None  # gradient flowing in during one backward pass
        self._g_owned = False

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
        return self._epoch == _LEAF

    @property
    def requires_grad(self) -> bool:
        """True for parameters and for ops recorded with gradients that depend on one."""
        return self._requires_grad

    @property
    def inputs(self) -> tuple[NodeId, ...]:
        """The input nodes of an op (empty for leaves)."""
        return self._inputs

    @property
    def scope(self) -> str | None:
        """The ``Graph.scope`` the node was made in (``"proj/lora"``), or ``None``."""
        return self._scope

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the node's value."""
        if self._value is None:
            raise StaleNodeError(f"{self!r} was recorded before a reset; its value is gone")
        return self._value.shape

    def __repr__(self) -> str:
        name = f", name={self._name!r}" if self._name is not None else ""
        if self._value is None:
            return f"NodeId({self._id}, op={self._op!r}{name}, stale)"
        return f"NodeId({self._id}, op={self._op!r}, shape={self._value.shape}{name})"


Scalar = float | int | np.floating[Any] | np.integer[Any]


class Graph:
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
        self._epoch = 0
        self._next_id = 0
        self._grad_enabled = True
        self._check_finite = _flag("Graph", "check_finite", check_finite)
        self._scope: str | None = None
        self._one = np.ones((), self._dtype)  # the seed of a scalar loss, shared
        self._one.flags.writeable = False
        self._version = 0  # counts the changes that end every compiled step (_end_replays)

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
        self, root: NodeId | None = None, *, show_values: bool = False, show_grads: bool = False
    ) -> str:
        """The graph as Graphviz DOT text: constants, parameters and ops in distinct styles.

        Every node shows its shape; edges run in the direction data flows. With ``root``, only
        it and its ancestors are drawn. Nodes made in a ``scope`` are grouped in a labelled
        cluster, so a ``LoraLinear``'s frozen and low-rank paths appear side by side.
        ``show_values`` and ``show_grads`` add each node's value and gradient (numbers when
        few, else their range and norm). ``graphlora.viz.render`` turns the text into an image.
        """
        from graphlora import viz

        return viz.to_dot(self, root, show_values=show_values, show_grads=show_grads)

    def summary(self) -> str:
        """A text table of every leaf and recorded op: id, op, name, input ids, shape, dtype,
        whether it requires a gradient, and the norm of its gradient (``-`` if it has none)."""
        from graphlora import viz

        return viz.summary(self)

    # --- leaves and values --------------------------------------------------------------------

    def constant(self, value: npt.ArrayLike, name: str | None = None) -> NodeId:
        """Add a leaf that never receives a gradient (inputs, targets, frozen weights).

        Parameters
        ----------
        value
            Array-like of real numbers; copied and converted to the graph's dtype.
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
        """Add a leaf that receives a gradient. Same arguments and errors as ``constant``."""
        return self._leaf("parameter", value, name, requires_grad=True)

    def _leaf(
        self, kind: str, value: npt.ArrayLike, name: str | None, requires_grad: bool
    ) -> NodeId:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{kind}: name must be a str or None, got {type(name).__name__}")
        array = self._as_array(value, kind, "value")
        node = NodeId(
            self, _LEAF, len(self._leaves), kind, name, array, requires_grad, (), (), None
        )
        self._leaves.append(node)
        return node

    def _as_array(self, value: object, where: str, arg: str) -> Array:
        """Convert array-like real data to a fresh array of the graph's dtype, or raise."""
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
        return np.array(array, dtype=self._dtype)

    def value(self, node: NodeId) -> Array:
        """The node's value as a read-only view (copy it to modify it)."""
        node = self._check(node, "value", "node")
        assert node._value is not None  # live nodes always hold a value
        return _read_only(node._value)

    def grad(self, node: NodeId) -> Array | None:
        """The node's accumulated gradient as a read-only view, or ``None`` if it got none.

        Leaves keep their gradients until ``zero_grad()``; recorded ops keep one only when
        ``backward(..., retain_grads=True)`` was used.
        """
        node = self._check(node, "grad", "node")
        if node._grad is None:
            return None
        return _read_only(node._grad)

    def set_value(self, leaf: NodeId, value: npt.ArrayLike) -> None:
        """Replace a leaf's value with a copy of ``value``, converted to the graph's dtype.

        Raises
        ------
        GraphError
            When ``leaf`` is a recorded op rather than a constant or parameter.
        ShapeError
            When the shape differs from the leaf's; the old value is kept.
        TypeError
            For data that is not real numbers; the old value is kept.
        """
        leaf = self._check(leaf, "set_value", "leaf")
        if leaf._epoch != _LEAF:
            raise GraphError(
                f"set_value: {leaf!r} is the output of an op; only constants and parameters "
                "can be set"
            )
        array = self._as_array(value, "set_value", "value")
        assert leaf._value is not None
        if array.shape != leaf._value.shape:
            raise ShapeError(
                f"set_value: new value has shape {array.shape} but {leaf!r} has shape "
                f"{leaf._value.shape}"
            )
        leaf._value = array

    def requires_grad_(self, leaf: NodeId, requires_grad: bool = True) -> None:
        """Turn a leaf into a parameter (``True``) or freeze it into a constant (``False``).

        Ops recorded before the change keep what they recorded; the change applies from the next
        op on (call it between steps, after ``reset``). A frozen leaf keeps no gradient.

        Raises
        ------
        GraphError
            When ``leaf`` is a recorded op.
        """
        leaf = self._check(leaf, "requires_grad_", "leaf")
        flag = _flag("requires_grad_", "requires_grad", requires_grad)
        if leaf._epoch != _LEAF:
            raise GraphError(
                f"requires_grad_: {leaf!r} is the output of an op; only leaves can be frozen or "
                "unfrozen"
            )
        if flag != leaf._requires_grad:
            self._end_replays()
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
        checked = [self._check(node, "zero_grad", "nodes") for node in nodes]
        for node in checked:
            node._grad = None

    def reset(self) -> None:
        """Drop every recorded op and keep every leaf with its value, gradient and id.

        NodeIds of the dropped ops become stale: using one raises ``StaleNodeError``.
        """
        for node in self._tape:  # free the memory even while someone still holds the ids
            node._value = node._grad = node._g = None
            node._vjp = None
            node._inputs = node._args = ()
        self._tape = []
        self._epoch += 1

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Label the nodes made inside the block with ``name`` (nested scopes join with ``/``).

        Scopes change no computation; drawings group a scope's nodes (``to_dot``), and
        ``LoraLinear`` puts its frozen and low-rank paths in ``"<name>/frozen"`` and
        ``"<name>/lora"``.
        """
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"scope: name must be a non-empty str without '/', got {name!r}")
        previous = self._enter_scope(name)
        try:
            yield
        finally:
            self._scope = previous

    def _enter_scope(self, name: str) -> str | None:
        """Nest ``name`` in the current scope; return the scope to restore on the way out.

        The cheap core of ``scope`` for hot paths (``LoraLinear.forward``), without the checks
        and the context manager.
        """
        previous = self._scope
        self._scope = name if previous is None else f"{previous}/{name}"
        return previous

    def _end_replays(self) -> None:
        """End every compiled step: something changed that a replay would silently ignore (where
        gradients flow, or a Python decision taken while recording, such as a merged layer)."""
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

    # --- checking and recording ---------------------------------------------------------------

    def _check(self, node: object, op: str, arg: str) -> NodeId:
        """Return ``node`` if it is a live NodeId of this graph, or raise naming ``op``/``arg``."""
        if type(node) is not NodeId:
            raise TypeError(f"{op}: {arg} must be a NodeId, got {_describe(node)}")
        if node._graph is not self:
            raise ForeignNodeError(f"{op}: {arg} {node!r} belongs to another Graph")
        if node._epoch != self._epoch and node._epoch != _LEAF:
            raise StaleNodeError(
                f"{op}: {arg} {node!r} was recorded before the last reset() and no longer exists"
            )
        return node

    def _push(
        self,
        op: str,
        fn: ops.Op,
        inputs: tuple[NodeId, ...],
        values: tuple[Array | None, ...],
        args: tuple[Any, ...] = (),
    ) -> NodeId:
        """Run ``fn(*values, *args)`` and append its node to the tape.

        ``values`` are the inputs' values (checked by the caller) and ``args`` the op's other
        arguments; the node keeps ``fn`` and ``args``, so ``compile`` can run the op again on new
        values. The closure is kept only if a gradient can flow.
        """
        out, vjp = fn(*values, *args)
        if type(out) is not np.ndarray:  # NumPy gives scalars for 0-d results; keep arrays
            out = np.asarray(out)
        if self._check_finite and not np.isfinite(out).all():
            raise NonFiniteError(_anomaly(op, inputs, out, "forward output"))
        needs = tuple([node._requires_grad for node in inputs])
        tape = self._tape
        kept = vjp if self._grad_enabled and True in needs else None  # None: no gradient flows
        node = NodeId(
            self,
            self._epoch,
            len(tape),
            op,
            None,
            out,
            kept is not None,
            inputs,
            needs,
            kept,
            fn,
            args,
        )
        tape.append(node)
        return node

    def _broadcast(self, op: str, a: NodeId, b: NodeId) -> tuple[Array, Array]:
        """Values of ``a`` and ``b`` after checking that their shapes broadcast together."""
        va, vb = a._value, b._value
        assert va is not None and vb is not None
        if va.shape != vb.shape:
            try:
                np.broadcast_shapes(va.shape, vb.shape)
            except ValueError:
                raise ShapeError(
                    f"{op}: shapes {va.shape} and {vb.shape} do not broadcast together"
                ) from None
        return va, vb

    def _unary(self, op: str, x: NodeId) -> tuple[NodeId, Array]:
        x = self._check(x, op, "x")
        assert x._value is not None
        return x, x._value

    # --- the op catalogue: elementwise arithmetic ---------------------------------------------

    def add(self, a: NodeId, b: NodeId) -> NodeId:
        """``a + b`` with NumPy broadcasting; gradients are summed back to each input's shape."""
        a, b = self._check(a, "add", "a"), self._check(b, "add", "b")
        return self._push("add", ops.add, (a, b), self._broadcast("add", a, b))

    def sub(self, a: NodeId, b: NodeId) -> NodeId:
        """``a - b`` with NumPy broadcasting."""
        a, b = self._check(a, "sub", "a"), self._check(b, "sub", "b")
        return self._push("sub", ops.sub, (a, b), self._broadcast("sub", a, b))

    def mul(self, a: NodeId, b: NodeId) -> NodeId:
        """Elementwise ``a * b`` with NumPy broadcasting."""
        a, b = self._check(a, "mul", "a"), self._check(b, "mul", "b")
        return self._push("mul", ops.mul, (a, b), self._broadcast("mul", a, b))

    def div(self, a: NodeId, b: NodeId) -> NodeId:
        """Elementwise ``a / b`` with NumPy broadcasting (division by zero follows NumPy)."""
        a, b = self._check(a, "div", "a"), self._check(b, "div", "b")
        return self._push("div", ops.div, (a, b), self._broadcast("div", a, b))

    def scale(self, x: NodeId, c: Scalar) -> NodeId:
        """``c * x`` for a real scalar ``c`` (a Python or NumPy number, not an array)."""
        x, vx = self._unary("scale", x)
        return self._push("scale", ops.scale, (x,), (vx,), (_real_scalar("scale", "c", c),))

    def neg(self, x: NodeId) -> NodeId:
        """``-x``."""
        x, vx = self._unary("neg", x)
        return self._push("neg", ops.neg, (x,), (vx,))

    def pow(self, x: NodeId, p: Scalar) -> NodeId:
        """``x ** p`` for a real scalar exponent ``p``."""
        x, vx = self._unary("pow", x)
        return self._push("pow", ops.pow, (x,), (vx,), (_real_scalar("pow", "p", p),))

    # --- linear algebra -----------------------------------------------------------------------

    def matmul(self, a: NodeId, b: NodeId) -> NodeId:
        """Matrix product ``a @ b`` with NumPy's rules.

        ``[n, k] @ [k, m] -> [n, m]``; batched ``[..., n, k] @ [k, m]`` or ``[..., n, k] @
        [..., k, m]`` with batch axes broadcast on both sides; a 1-D operand is promoted as in
        NumPy. Scalars (0-D) are refused: use ``scale`` or ``mul``.
        """
        a, b = self._check(a, "matmul", "a"), self._check(b, "matmul", "b")
        va, vb = a._value, b._value
        assert va is not None and vb is not None
        if va.ndim == 0 or vb.ndim == 0:
            raise ShapeError(
                f"matmul: cannot multiply {va.shape} by {vb.shape}: operands must have at least "
                "one axis (use scale or mul for scalars)"
            )
        inner_b = vb.shape[0] if vb.ndim == 1 else vb.shape[-2]
        if va.shape[-1] != inner_b:
            raise ShapeError(
                f"matmul: cannot multiply {va.shape} by {vb.shape}: inner dimensions "
                f"{va.shape[-1]} != {inner_b}"
            )
        if va.ndim > 2 and vb.ndim > 2:
            try:
                np.broadcast_shapes(va.shape[:-2], vb.shape[:-2])
            except ValueError:
                raise ShapeError(
                    f"matmul: cannot multiply {va.shape} by {vb.shape}: batch axes "
                    f"{va.shape[:-2]} and {vb.shape[:-2]} do not broadcast together"
                ) from None
        return self._push("matmul", ops.matmul, (a, b), (va, vb))

    # --- reductions and shape -----------------------------------------------------------------

    def sum(
        self, x: NodeId, axis: int | Sequence[int] | None = None, keepdims: bool = False
    ) -> NodeId:
        """Sum over ``axis`` (``None``: all axes; an int or a tuple of ints), as ``np.sum``."""
        x, vx = self._unary("sum", x)
        axes = _normalize_axes("sum", axis, vx.shape)
        return self._push("sum", ops.sum, (x,), (vx,), (axes, _flag("sum", "keepdims", keepdims)))

    def mean(
        self, x: NodeId, axis: int | Sequence[int] | None = None, keepdims: bool = False
    ) -> NodeId:
        """Mean over ``axis`` (``None``: all axes; an int or a tuple of ints), as ``np.mean``."""
        x, vx = self._unary("mean", x)
        axes = _normalize_axes("mean", axis, vx.shape)
        return self._push(
            "mean", ops.mean, (x,), (vx,), (axes, _flag("mean", "keepdims", keepdims))
        )

    def reshape(self, x: NodeId, shape: int | Sequence[int]) -> NodeId:
        """``x.reshape(shape)``; one entry may be ``-1``."""
        x, vx = self._unary("reshape", x)
        return self._push("reshape", ops.reshape, (x,), (vx,), (_resolve_shape(shape, vx.shape),))

    def transpose(self, x: NodeId, axes: Sequence[int] | None = None) -> NodeId:
        """``np.transpose(x, axes)``; ``axes=None`` reverses the axes."""
        x, vx = self._unary("transpose", x)
        perm = None
        if axes is not None:
            perm = _int_tuple("transpose", "axes", axes)
            if sorted(a % vx.ndim if -vx.ndim <= a < vx.ndim else a for a in perm) != list(
                range(vx.ndim)
            ):
                raise ShapeError(
                    f"transpose: axes {perm} is not a permutation of the {vx.ndim} axes of "
                    f"shape {vx.shape}"
                )
            perm = tuple(a % vx.ndim for a in perm)
        return self._push("transpose", ops.transpose, (x,), (vx,), (perm,))

    # --- nonlinearities -----------------------------------------------------------------------

    def relu(self, x: NodeId) -> NodeId:
        """``max(x, 0)``; the gradient at 0 is 0, as in PyTorch."""
        x, vx = self._unary("relu", x)
        return self._push("relu", ops.relu, (x,), (vx,))

    def tanh(self, x: NodeId) -> NodeId:
        """Hyperbolic tangent."""
        x, vx = self._unary("tanh", x)
        return self._push("tanh", ops.tanh, (x,), (vx,))

    def sigmoid(self, x: NodeId) -> NodeId:
        """Logistic sigmoid ``1 / (1 + exp(-x))``, without overflow."""
        x, vx = self._unary("sigmoid", x)
        return self._push("sigmoid", ops.sigmoid, (x,), (vx,))

    def exp(self, x: NodeId) -> NodeId:
        """Elementwise ``exp(x)``."""
        x, vx = self._unary("exp", x)
        return self._push("exp", ops.exp, (x,), (vx,))

    def log(self, x: NodeId) -> NodeId:
        """Natural logarithm (``x <= 0`` gives NaN or -inf, as in NumPy)."""
        x, vx = self._unary("log", x)
        return self._push("log", ops.log, (x,), (vx,))

    def gelu(self, x: NodeId, approximate: str = "none") -> NodeId:
        """GELU: exact ``x * Phi(x)`` (default, as PyTorch) or ``approximate="tanh"``."""
        x, vx = self._unary("gelu", x)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
        return self._push("gelu", ops.gelu, (x,), (vx,), (approximate,))

    def softmax(self, x: NodeId, axis: int = -1) -> NodeId:
        """Softmax along ``axis``, numerically stable."""
        x, vx = self._unary("softmax", x)
        return self._push(
            "softmax", ops.softmax, (x,), (vx,), (_one_axis("softmax", axis, vx.shape),)
        )

    def log_softmax(self, x: NodeId, axis: int = -1) -> NodeId:
        """``log(softmax(x))`` along ``axis``, computed stably as ``x - logsumexp(x)``."""
        x, vx = self._unary("log_softmax", x)
        axis = _one_axis("log_softmax", axis, vx.shape)
        return self._push("log_softmax", ops.log_softmax, (x,), (vx,), (axis,))

    # --- losses and dropout -------------------------------------------------------------------

    def mse_loss(self, pred: NodeId, target: NodeId) -> NodeId:
        """Mean squared error ``mean((pred - target)**2)``; the shapes must be equal."""
        pred = self._check(pred, "mse_loss", "pred")
        target = self._check(target, "mse_loss", "target")
        vp, vt = pred._value, target._value
        assert vp is not None and vt is not None
        if vp.shape != vt.shape:
            raise ShapeError(
                f"mse_loss: pred has shape {vp.shape} but target has shape {vt.shape}; "
                "they must be equal"
            )
        return self._push("mse_loss", ops.mse_loss, (pred, target), (vp, vt))

    def cross_entropy(self, logits: NodeId, labels: npt.ArrayLike) -> NodeId:
        """Mean cross-entropy of ``logits [N, C]`` against integer class ``labels [N]``.

        ``labels`` is an integer array (not a node: labels get no gradient), each in ``[0, C)``.
        """
        logits, vl = self._unary("cross_entropy", logits)
        if vl.ndim != 2 or vl.shape[0] == 0 or vl.shape[1] == 0:
            raise ShapeError(
                f"cross_entropy: logits must have shape (N, C) with N, C >= 1, got {vl.shape}"
            )
        if isinstance(labels, NodeId):
            raise TypeError(
                "cross_entropy: labels must be an integer array, not a NodeId (graph values are "
                "floating point and labels get no gradient)"
            )
        try:
            label_array = np.asarray(labels)
        except (TypeError, ValueError) as error:
            raise TypeError(f"cross_entropy: labels must be an integer array: {error}") from None
        if label_array.dtype.kind not in "iu":
            raise TypeError(
                f"cross_entropy: labels must be integers, got dtype {label_array.dtype}"
            )
        n, classes = vl.shape
        if label_array.shape != (n,):
            raise ShapeError(
                f"cross_entropy: labels must have shape ({n},) to match logits {vl.shape}, "
                f"got {label_array.shape}"
            )
        bad = label_array[(label_array < 0) | (label_array >= classes)]
        if bad.size:
            raise ValueError(
                f"cross_entropy: labels must lie in [0, {classes}) for {classes} classes, got "
                f"{bad[:5].tolist()}{' ...' if bad.size > 5 else ''}"
            )
        return self._push("cross_entropy", ops.cross_entropy, (logits,), (vl,), (label_array,))

    def dropout(self, x: NodeId, p: float, rng: np.random.Generator | int | None = None) -> NodeId:
        """Inverted dropout: zero each element with probability ``p`` and scale the rest by
        ``1 / (1 - p)``, so the expected value is unchanged.

        The rule: dropout acts only while gradients are recorded (training). With ``p == 0`` or
        inside ``no_grad()`` it is the identity and returns ``x`` itself, recording nothing.

        Parameters
        ----------
        p
            Drop probability in ``[0, 1)``.
        rng
            A ``np.random.Generator``, an int seed (the same seed draws the same mask), or
            ``None`` for fresh entropy. The global NumPy random state is never used.
        """
        x, vx = self._unary("dropout", x)
        p = _real_scalar("dropout", "p", p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout: p must be in [0, 1), got {p}")
        if p == 0.0 or not self._grad_enabled:
            return x
        return self._push("dropout", _dropout, (x,), (vx,), (p, _rng("dropout", rng)))

    # --- fused ---------------------------------------------------------------------------------

    def lora_linear(
        self,
        x: NodeId,
        w: NodeId,
        a: NodeId,
        b: NodeId,
        bias: NodeId | None = None,
        *,
        scaling: Scalar = 1.0,
        mask: npt.ArrayLike | None = None,
        dropout: float = 0.0,
        rng: np.random.Generator | int | None = None,
    ) -> NodeId:
        """A LoRA linear layer as one op: ``x @ w + ((xd @ a) * scaling) @ b (+ bias)``.

        ``x [..., in]``, ``w [in, out]``, ``a [in, r]``, ``b [r, out]``, ``bias [out]``; ``xd``
        is ``x * mask`` when a dropout ``mask`` of ``x``'s shape is given, or ``dropout(x)``
        when a probability ``dropout`` is given: the mask is then drawn from ``rng`` as
        ``Graph.dropout`` draws it (and only while gradients are recorded), and drawn again by
        each run of a ``compile``d step. The same maths as the separate ops that
        ``LoraLinear.forward`` records, in one node: fewer Python calls, and only the ``[..., r]``
        bottleneck kept for backward, so it is faster and lighter.
        """
        where = "lora_linear"
        check = self._check
        x, w = check(x, where, "x"), check(w, where, "w")
        a, b = check(a, where, "a"), check(b, where, "b")
        vx, vw, va, vb = x._value, w._value, a._value, b._value
        assert vx is not None and vw is not None and va is not None and vb is not None
        if not (
            vx.ndim >= 1
            and vw.ndim == va.ndim == vb.ndim == 2
            and vx.shape[-1] == vw.shape[0] == va.shape[0]
            and va.shape[1] == vb.shape[0]
            and vb.shape[1] == vw.shape[1]
        ):
            raise ShapeError(
                f"{where}: shapes do not fit x [..., in], w [in, out], a [in, r], b [r, out]: "
                f"x {vx.shape}, w {vw.shape}, a {va.shape}, b {vb.shape}"
            )
        inputs: tuple[NodeId, ...] = (x, w, a, b)
        if bias is not None:
            bias = check(bias, where, "bias")
            vbias = bias._value
            assert vbias is not None
            if vbias.shape != (vw.shape[1],):
                raise ShapeError(
                    f"{where}: bias has shape {vbias.shape}, expected ({vw.shape[1]},)"
                )
            inputs = (x, w, a, b, bias)
        mask_array = None
        if mask is not None:
            mask_array = self._as_array(mask, where, "mask")
            if mask_array.shape != vx.shape:
                raise ShapeError(
                    f"{where}: mask has shape {mask_array.shape}, x has shape {vx.shape}"
                )
        s = _real_scalar(where, "scaling", scaling)
        p = _real_scalar(where, "dropout", dropout)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{where}: dropout must be in [0, 1), got {p}")
        if p > 0.0 and mask is not None:
            raise ValueError(f"{where}: give a dropout mask or a dropout probability, not both")
        if p > 0.0 and self._grad_enabled:  # rng is checked only where it is used, as in dropout
            rng = _rng(where, rng)
        return self._lora_linear(inputs, s, p, rng, mask_array)

    def _lora_linear(
        self,
        inputs: tuple[NodeId, ...],
        scaling: float,
        p: float,
        rng: np.random.Generator | int | None,
        mask: Array | None,
    ) -> NodeId:
        """Record ``lora_linear`` on checked ``(x, w, a, b)`` or ``(x, w, a, b, bias)`` and
        checked arguments (``LoraLinear.forward`` comes here directly, its weights being its
        own)."""
        values = tuple([node._value for node in inputs])
        lead = (None,) if len(inputs) == 4 else ()  # the bias argument, when it is no input
        if p > 0.0 and self._grad_enabled:
            args = (*lead, scaling, p, rng)
            return self._push("lora_linear", _lora_linear_dropout, inputs, values, args)
        args = (*lead, scaling, mask)
        return self._push("lora_linear", ops.lora_linear, inputs, values, args)

    # --- user-defined ops ---------------------------------------------------------------------

    def apply(self, op: ops.Op, *nodes: NodeId, **kwargs: Any) -> NodeId:
        """Record a user-defined op.

        ``op(*arrays, **kwargs)`` receives the nodes' values and returns ``(out, vjp)``;
        ``vjp(g, needs)`` returns one gradient (or ``None``) per input, each of that input's shape.
        The output is converted to the graph's dtype; the gradients are checked in ``backward``.

        Raises
        ------
        TypeError
            If ``op`` is not callable or does not return ``(array, callable)``.
        """
        if not callable(op):
            raise TypeError(f"apply: op must be callable, got {type(op).__name__}")
        name = getattr(op, "__name__", type(op).__name__)
        checked = tuple(self._check(node, name, f"input {i}") for i, node in enumerate(nodes))
        shapes = [node.shape for node in checked]

        def run(*values: Array) -> tuple[Array, Vjp]:
            result = op(*values, **kwargs)
            if not (isinstance(result, tuple) and len(result) == 2 and callable(result[1])):
                raise TypeError(f"apply: {name} must return a pair (out, vjp), got {result!r:.80}")
            out = self._as_array(result[0], f"apply: {name}", "its output")
            return out, _checked_vjp(name, result[1], shapes)

        return self._push(name, run, checked, tuple(node._value for node in checked))

    # --- replay -------------------------------------------------------------------------------

    def compile(self, loss: NodeId, grad: npt.ArrayLike | None = None) -> Replay:
        """Make the step recorded so far into a ``Replay`` that runs it again without recording.

        ``step = graph.compile(loss)`` keeps the ops recorded up to and including ``loss``. Each
        ``step()`` runs the same op functions with the same arguments on the leaves' current
        values, refreshes every recorded node's value, then runs ``backward(loss, grad)``. The
        values and gradients are exactly those of recording the same calls again, without the
        cost of recording them: no checks, no new NodeIds.

        Data that changes from step to step must come in through leaves (``set_value``, or an
        optimizer's update); other arguments (a ``scale`` factor, ``cross_entropy`` labels, a
        dropout mask given as an array) are fixed when recorded, and so are the decisions Python
        took while recording, as in a trace. Dropout draws a new mask on each run from the
        Generator it was given, as a new recording would. Ops recorded after ``loss`` are not run
        again. ``reset`` ends the replay (running it then raises ``StaleNodeError``), and so do
        freezing or unfreezing a leaf and merging or unmerging a LoRA layer (``GraphError``).

        Raises
        ------
        ShapeError
            As ``backward`` does for ``loss`` and ``grad``.
        """
        loss = self._check(loss, "compile", "loss")
        seed = self._seed("compile", loss, grad)
        nodes = () if loss._epoch == _LEAF else tuple(self._tape[: loss._index + 1])
        return Replay(self, loss, seed, nodes)

    # --- backward -----------------------------------------------------------------------------

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
        loss = self._check(loss, "backward", "loss")
        seed = self._seed("backward", loss, grad)
        _needs_grad("backward", loss)
        self._backward(loss, seed, seed is not self._one, retain_grads)  # the shared 1: not owned

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
        if loss._epoch == _LEAF:
            reached.append(loss)
        else:
            tape = self._tape
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
                    for source, gi in zip(node._inputs, node._vjp(g, node._needs), strict=True):
                        if gi is None:
                            continue
                        if type(gi) is not np.ndarray:  # a 0-d result of NumPy arithmetic
                            gi = np.asarray(gi)
                        if check_finite and not np.isfinite(gi).all():
                            raise NonFiniteError(
                                _anomaly(node._op, node._inputs, gi, "gradient", node, g, source)
                            )
                        previous = source._g
                        if previous is None:
                            source._g, source._g_owned = gi, False
                            if source._epoch == _LEAF:
                                reached.append(source)
                        elif source._g_owned:
                            previous += gi  # a buffer only this node holds: add in place
                        else:
                            source._g, source._g_owned = _added(previous, gi), True
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


class Replay:
    """A recorded step that runs again: forward over the leaves' current values, then backward.

    Made by ``Graph.compile(loss)``; see there for what it keeps and when it ends.

    Examples
    --------
    >>> import numpy as np, graphlora as gl
    >>> g = gl.Graph()
    >>> w = g.parameter(np.ones(3))
    >>> loss = g.sum(g.mul(w, w))
    >>> step = g.compile(loss)
    >>> g.set_value(w, [1.0, 2.0, 3.0])
    >>> float(step())
    14.0
    >>> g.grad(w)
    array([2., 4., 6.])
    """

    __slots__ = ("_epoch", "_graph", "_loss", "_nodes", "_runs", "_seed", "_version")

    def __init__(self, graph: Graph, loss: NodeId, seed: Array, nodes: tuple[NodeId, ...]) -> None:
        self._graph = graph
        self._loss = loss
        self._seed = seed if seed is graph._one else _read_only(seed)  # never written: not owned
        self._nodes = nodes
        self._runs = tuple(_rerun(node) for node in nodes)
        self._epoch = graph._epoch
        self._version = graph._version

    @property
    def loss(self) -> NodeId:
        """The node ``backward`` starts from."""
        return self._loss

    def __len__(self) -> int:
        """The number of ops each run computes."""
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"Replay({len(self._nodes)} ops, loss={self._loss!r})"

    def __call__(self, *, backward: bool = True) -> Array:
        """Run the step: every op again, then (unless ``backward=False``) backward from the loss.

        Returns the loss's new value, read-only. If an op raises (in anomaly mode, say), no
        gradient changes and the leaves are untouched; the ops before it hold their new values,
        it and the ops after it their old ones (each value is replaced as soon as it is computed,
        so that a run needs no more memory than the recording did).

        Raises
        ------
        StaleNodeError
            After ``graph.reset()``.
        GraphError
            After ``requires_grad_`` changed a leaf or ``merge_``/``unmerge_`` a LoRA layer, or
            for ``backward`` when the loss depends on no parameter.
        """
        graph, loss, nodes = self._graph, self._loss, self._nodes
        if graph._epoch != self._epoch:
            raise StaleNodeError(
                f"Replay: the step of {loss!r} was recorded before the last reset(); record it "
                "again and compile that"
            )
        if graph._version != self._version:
            raise GraphError(
                "Replay: a leaf was frozen or unfrozen (requires_grad_), or a LoRA layer merged "
                "or unmerged, after compile; a replay would not see it: record the step again "
                "and compile that"
            )
        if backward:
            _needs_grad("Replay", loss)
        check_finite = graph._check_finite
        for node, run in zip(nodes, self._runs, strict=True):
            out, vjp = run()
            if type(out) is not np.ndarray:
                out = np.asarray(out)
            if check_finite and not np.isfinite(out).all():
                raise NonFiniteError(_anomaly(node._op, node._inputs, out, "forward output", node))
            node._value = out  # the old value goes at once: a run holds one value per node
            if node._requires_grad:
                node._vjp = vjp
        if backward:
            graph._backward(loss, self._seed, False, False)
        assert loss._value is not None
        return _read_only(loss._value)


def _rerun(node: NodeId) -> Callable[[], tuple[Array, Vjp]]:
    """A function that runs ``node``'s op again on its inputs' current values."""
    fn, inputs, args = node._fn, node._inputs, node._args
    assert fn is not None
    if len(inputs) == 1 and not args:  # the common shapes of call, without star-unpacking
        (x,) = inputs
        return lambda: fn(x._value)
    if len(inputs) == 2 and not args:
        a, b = inputs
        return lambda: fn(a._value, b._value)
    return lambda: fn(*[source._value for source in inputs], *args)


def _anomaly(
    op: str,
    inputs: tuple[NodeId, ...],
    values: Array,
    what: str,
    node: NodeId | None = None,
    g: Array | None = None,
    target: NodeId | None = None,
) -> str:
    """The message of a ``NonFiniteError``: the op, its inputs' shapes, which were non-finite."""
    count = int(values.size - np.count_nonzero(np.isfinite(values)))
    shapes = ", ".join(str(n._value.shape) for n in inputs if n._value is not None)
    bad = [
        f"input {i} ({n!r})"
        for i, n in enumerate(inputs)
        if n._value is not None and not np.isfinite(n._value).all()
    ]
    where = f"op {op!r}" if node is None else f"op {op!r} at {node!r}"
    message = (
        f"anomaly: the {what} of {where} holds {count} non-finite value(s) (NaN or Inf); "
        f"input shapes: {shapes or 'none'}; non-finite inputs: {', '.join(bad) or 'none'}"
    )
    if target is not None and g is not None:
        message += (
            f"; the gradient flowing to {target!r} is the bad one; the incoming gradient was "
            f"{'finite' if np.isfinite(g).all() else 'already non-finite'}"
        )
    return message


def _needs_grad(where: str, loss: NodeId) -> None:
    """Raise unless a gradient can flow back from ``loss``."""
    if not loss._requires_grad:
        raise GraphError(
            f"{where}: {loss!r} does not depend on any parameter (or was recorded under "
            "no_grad()), so there is no gradient to compute"
        )


def _describe(value: object) -> str:
    """A short description of a wrong argument: its type, and its shape or a short repr."""
    if isinstance(value, np.ndarray):
        return f"an ndarray of shape {value.shape} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__}: {text if len(text) <= 60 else text[:57] + '...'}"


def check_graph(where: str, graph: object) -> Graph:
    """``graph`` if it is a ``Graph``; else a ``TypeError`` naming ``where`` (for module code)."""
    if not isinstance(graph, Graph):
        raise TypeError(f"{where}: graph must be a Graph, got {type(graph).__name__}")
    return graph


def _read_only(array: Array) -> Array:
    """A view of ``array`` that cannot be written through."""
    view: Array = array.view()
    view.flags.writeable = False
    return view


def _added(a: Array, b: Array) -> Array:
    """``a + b`` as a new array (NumPy returns a scalar for two 0-d arrays)."""
    total = a + b
    return total if type(total) is np.ndarray else np.asarray(total)


def _checked_vjp(name: str, vjp: Vjp, shapes: list[tuple[int, ...]]) -> Vjp:
    """Wrap a user VJP so that a wrong number, shape or kind of gradients is a clear error."""

    def checked(g: Array, needs: tuple[bool, ...]) -> Grads:
        grads = vjp(g, needs)
        if not isinstance(grads, (tuple, list)) or len(grads) != len(shapes):
            raise GraphError(
                f"{name}: its VJP must return a tuple of {len(shapes)} gradients (one per input, "
                f"None allowed), got {grads!r:.80}"
            )
        result: list[Array | None] = []
        for i, (gi, shape, need) in enumerate(zip(grads, shapes, needs, strict=True)):
            if gi is None or not need:
                result.append(None)
                continue
            array = np.asarray(gi, dtype=g.dtype)
            if array.shape != shape:
                raise ShapeError(
                    f"{name}: its VJP returned a gradient of shape {array.shape} for input {i} "
                    f"of shape {shape}"
                )
            result.append(array)
        return tuple(result)

    return checked


# --- argument checks shared by the op methods -------------------------------------------------


def _real_scalar(op: str, arg: str, value: object) -> float:
    """``value`` as a Python float if it is a real scalar (not a bool, array or string)."""
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"{op}: {arg} must be a real scalar (int or float), got {type(value).__name__}: "
            f"{value!r:.60}"
        )
    return float(value)


def _rng(where: str, rng: object) -> np.random.Generator | int | None:
    """Check a dropout ``rng`` argument: a Generator, an int seed or None (fresh entropy)."""
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return int(rng)
    raise TypeError(
        f"{where}: rng must be a np.random.Generator, an int seed or None, got {type(rng).__name__}"
    )


def _generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    """The Generator to draw from: ``rng`` itself, or a new one from a seed (or entropy).

    Made on each run, so that a seed draws the same mask every time, in a recording and in each
    run of a compiled step alike.
    """
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _dropout(x: Array, p: float, rng: np.random.Generator | int | None) -> tuple[Array, Vjp]:
    """``ops.dropout`` with ``rng`` as ``Graph.dropout`` takes it."""
    return ops.dropout(x, p, _generator(rng))


def _lora_linear_dropout(
    x: Array,
    w: Array,
    a: Array,
    b: Array,
    bias: Array | None,
    scaling: float,
    p: float,
    rng: np.random.Generator | int | None,
) -> tuple[Array, Vjp]:
    """``ops.lora_linear`` with a dropout mask drawn as ``ops.dropout`` draws it."""
    mask = ops.dropout_mask(x.shape, x.dtype, p, _generator(rng))
    return ops.lora_linear(x, w, a, b, bias, scaling, mask)


def _flag(op: str, arg: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {arg} must be a bool, got {type(value).__name__}")
    return bool(value)


def _int_tuple(op: str, arg: str, value: object) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints) as a tuple of Python ints."""
    items = (value,) if isinstance(value, (int, np.integer)) else value
    if not isinstance(items, (tuple, list)) or not all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in items
    ):
        raise TypeError(f"{op}: {arg} must be an int or a tuple of ints, got {value!r:.60}")
    return tuple(int(i) for i in items)


def _one_axis(op: str, axis: object, shape: tuple[int, ...]) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{op}: axis must be an int, got {type(axis).__name__}")
    if not -len(shape) <= axis < len(shape):
        raise ShapeError(f"{op}: axis {axis} is out of range for shape {shape}")
    return int(axis) % len(shape)


def _normalize_axes(op: str, axis: object, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """``axis`` as a sorted tuple of non-negative axes, or ``None`` for all axes."""
    if axis is None:
        return None
    axes = _int_tuple(op, "axis", axis)
    ndim = len(shape)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ShapeError(f"{op}: axis {a} is out of range for shape {shape}")
    normalized = tuple(sorted(a % ndim for a in axes))
    if len(set(normalized)) != len(normalized):
        raise ShapeError(f"{op}: axis {axes} repeats an axis")
    return normalized


def _resolve_shape(shape: object, old: tuple[int, ...]) -> tuple[int, ...]:
    """The target of a reshape, with a ``-1`` entry worked out; refuses impossible shapes."""
    new = _int_tuple("reshape", "shape", shape)
    size = math.prod(old)
    unknown = [i for i, n in enumerate(new) if n == -1]
    if len(unknown) > 1 or any(n < -1 for n in new):
        raise ShapeError(f"reshape: shape {new} may hold at most one -1 and no other negatives")
    known = math.prod(n for n in new if n != -1)
    if unknown:
        if known == 0 or size % known:
            raise ShapeError(f"reshape: cannot reshape {old} ({size} elements) into {new}")
        new = (*new[: unknown[0]], size // known, *new[unknown[0] + 1 :])
    elif known != size:
        raise ShapeError(f"reshape: cannot reshape {old} ({size} elements) into {new}")
    return new
