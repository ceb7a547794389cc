"""What every op is made of: the array types, ``OpDef`` and the ``op`` decorator, the catalogue
``OPS``, the ``Sample`` of safe inputs that tests draw from, and ``unbroadcast``.

An op is a function over arrays that returns ``(out, vjp)``. The ``op`` decorator wraps it in an
``OpDef`` that also carries its argument check (run before NumPy), the kinds of its inputs (float,
or integer/bool data such as labels and masks), where its inputs are safe to test (``Sample``) and,
where PyTorch has the same op, how to call it there. ``builtin`` does the same and adds the op to
``OPS``, the catalogue that ``Graph``'s methods, the tests and the Hypothesis strategies read.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

from graphlora.errors import GraphError, ShapeError

__all__ = [
    "OPS",
    "Array",
    "Draw",
    "Grads",
    "Op",
    "OpDef",
    "Params",
    "Sample",
    "Slot",
    "Vjp",
    "block_length",
    "blocks",
    "broadcast_check",
    "broadcasting",
    "builtin",
    "check_kinds",
    "elementwise",
    "op",
    "row_sum",
    "swap",
    "unbroadcast",
    "wrap_function",
]

Array: TypeAlias = npt.NDArray[Any]
"""A NumPy array (of the graph's floating dtype, or integer/bool data)."""
Grads: TypeAlias = tuple[Array | None, ...]
"""One gradient per input of an op; ``None`` where the input wants none."""
Vjp: TypeAlias = Callable[[Array, tuple[bool, ...]], Grads]
"""``vjp(g, needs) -> grads``: the backward half of an op."""
Op: TypeAlias = Callable[..., tuple[Array, Vjp]]
"""``op(*arrays, **params) -> (out, vjp)``: an op over arrays."""
Params: TypeAlias = dict[str, Any]
"""An op's keyword arguments (axis, keepdims, ...), checked and normalised."""
Shape: TypeAlias = tuple[int, ...]
T = TypeVar("T")


def unbroadcast(g: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``g`` over the axes that NumPy broadcasting added or stretched, giving ``shape``."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return np.asarray(g.sum(axis=tuple(range(lead)) + stretched)).reshape(shape)


BLOCK_BYTES = 1 << 18
"""The size of a block of ``blocks``: a few buffers of it fit in a core's L2 cache."""


def block_length(x: Array) -> int:
    """How many of ``x``'s elements make a block of ``BLOCK_BYTES``."""
    return BLOCK_BYTES // x.itemsize


def blocks(x: Array) -> list[slice]:
    """Slices cutting flat ``x`` into blocks of ``block_length(x)`` (the last may be shorter).

    A chain of in-place passes over megabytes (GELU's eight) reads and writes memory on every
    pass; run block by block, each block stays in cache from one pass to the next, which takes a
    third off the chain's time at transformer sizes."""
    step = block_length(x)
    return [slice(start, start + step) for start in range(0, x.size, step)]


def row_sum(x: Array) -> Array:
    """``x.sum(axis=-1, keepdims=True)`` of a float array, as a product with a column of ones.

    NumPy's reduction runs its inner loop once per row, which for rows of a few dozen to a few
    hundred (attention scores, a layer's features) costs three to four times what BLAS takes for
    the same sums; NaN and inf come through as in ``sum``, and no elements sum to 0.
    """
    return x @ np.ones((x.shape[-1], 1), dtype=x.dtype)


def column_sum(x: Array) -> Array:
    """``x.sum`` over every axis but the last, ``[D]``, as a product of a row of ones with ``x``'s
    rows: for the gradient of a norm's weight or of a dense layer's bias, of a few hundred
    features, two to three times faster than NumPy's reduction over the batch axes. NaN and inf
    come through as in ``sum``."""
    count = math.prod(x.shape[:-1])
    return np.ones(count, dtype=x.dtype) @ x.reshape(count, x.shape[-1])


def swap(a: Array) -> Array:
    """Transpose the last two axes (``a.T`` for a matrix)."""
    return a.T if a.ndim == 2 else np.swapaxes(a, -1, -2)  # .T: a third of swapaxes' cost


# --- drawing safe inputs, for tests and strategies ----------------------------------------------


class Draw(Protocol):  # pragma: no mutate block
    """What a ``Sample`` draws with: small choices, shapes and arrays.

    ``graphlora.testing.strategies.op_examples`` gives one backed by Hypothesis, so that failing
    examples shrink; the op modules themselves never import Hypothesis.
    """

    def choice(self, options: Sequence[T]) -> T:
        """One of ``options``."""
        ...

    def shape(
        self,
        *,
        min_dims: int = 0,
        max_dims: int = 3,
        min_side: int | None = None,
        max_side: int = 4,
    ) -> Shape:
        """A shape; ``min_side=None`` lets sides be 0 when zero-size arrays are being drawn."""
        ...

    def broadcastable(self, count: int = 2, *, min_dims: int = 0, max_dims: int = 3) -> list[Shape]:
        """``count`` shapes that broadcast together under NumPy's rules."""
        ...

    def floats(
        self, shape: Shape, low: float = -3.0, high: float = 3.0, away: float = 0.0
    ) -> Array:
        """Finite floats in ``[low, high]`` with ``|x| >= away``."""
        ...

    def distinct(self, shape: Shape, low: float = -3.0, high: float = 3.0) -> Array:
        """Floats in ``[low, high]``, no two closer than 0.01: no ties (for max, maximum)."""
        ...

    def ints(self, shape: Shape, low: int, high: int) -> Array:
        """Integers in ``[low, high)``."""
        ...

    def bools(self, shape: Shape) -> Array:
        """Booleans."""
        ...


def _no_params(draw: Draw, *inputs: Array | None) -> Params:  # pragma: no mutate block
    return {}


@dataclass(frozen=True)
class Sample:
    """Where an op's inputs are safe to test (finite values and gradients, away from kinks).

    ``inputs(draw)`` draws the float inputs (``None`` for an optional input left out);
    ``params(draw, *inputs)`` draws the rest for those inputs: data inputs (labels, masks) by
    name, and keyword arguments. ``fits(*inputs)`` says whether given float arrays are safe
    inputs, so that random programs (``strategies.expressions``) can chain ops; ``None`` keeps
    the op out of them.
    """

    inputs: Callable[[Draw], tuple[Array | None, ...]]
    params: Callable[..., Params] = _no_params
    fits: Callable[..., bool] | None = None


def elementwise(
    low: float = -math.inf,
    high: float = math.inf,
    away: float = 0.0,
    params: Callable[..., Params] = _no_params,
    min_dims: int = 0,
) -> Sample:  # pragma: no mutate block
    """One float input of any shape, safe on ``[low, high]`` away from 0 by ``away``; drawn in
    that range clipped to ``[-3, 3]``."""

    def inputs(draw: Draw) -> tuple[Array | None, ...]:
        shape = draw.shape(min_dims=min_dims)
        return (draw.floats(shape, max(low, -3.0), min(high, 3.0), away),)

    def fits(x: Array) -> bool:
        if x.ndim < min_dims:
            return False
        if x.size == 0:
            return True
        return bool(x.min() >= low and x.max() <= high and np.abs(x).min() >= away)

    return Sample(inputs, params, fits)


def broadcasting(away_b: float = 0.0) -> Sample:  # pragma: no mutate block
    """Two float inputs whose shapes broadcast; the second away from 0 by ``away_b``."""

    def inputs(draw: Draw) -> tuple[Array | None, ...]:
        shape_a, shape_b = draw.broadcastable(2)
        return draw.floats(shape_a), draw.floats(shape_b, away=away_b)

    def fits(a: Array, b: Array) -> bool:
        try:
            np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            return False
        return b.size == 0 or bool(np.abs(b).min() >= away_b)

    return Sample(inputs, fits=fits)


# --- the op definition ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One positional input of an op: its name, kind (``"float"``, ``"int"`` or ``"bool"``) and
    whether it may be ``None`` (an optional weight, mask, ...)."""

    name: str
    kind: str = "float"
    optional: bool = False


_KINDS = {"float": "f", "int": "iu", "bool": "b"}
_KIND_WORDS = {"int": "integers", "bool": "a bool array"}


class OpDef:
    """An op: its forward-and-VJP function with everything else that belongs to it.

    Calling an ``OpDef`` runs its check and then its function: ``ops.sum(x, axis=0)`` returns
    ``(out, vjp)``. ``Graph`` records it with ``graph.apply(op, *nodes, **params)`` (each built-in
    op has a one-line ``Graph`` method that does this). A replay calls ``forward`` directly, with
    the parameters already checked.

    Attributes
    ----------
    name
        The op's name, as ``NodeId.op`` shows it.
    forward
        ``forward(*arrays, **params) -> (out, vjp)``.
    check
        ``check(*arrays, **params)``: raises on bad arguments (naming the op and the values);
        returns the parameters in the form ``forward`` takes, or ``None`` to keep them as given.
        ``None`` for an op with nothing to check.
    slots
        The positional inputs, from ``forward``'s signature (``()`` with ``variadic``).
    required, optional, data_slots, floats_only
        How many inputs must be given; which may be ``None``; the positions of the integer/bool
        data inputs; whether there are none (the recording's fast path).
    variadic
        True when ``forward`` takes any number of float inputs (``concat(*xs, axis)``).
    sample
        Where its inputs are safe to test, or ``None``.
    torch
        ``torch(torch_module, *tensors, **params)``: the same op in PyTorch, for cross-checks.
    smooth
        False for ops that are only piecewise differentiable (relu, dropout), so tests compare
        their gradients with exact secants instead of complex-step derivatives.
    """

    __slots__ = (
        "__dict__",  # for __doc__ and __wrapped__, so that help() shows the op's own
        "check",
        "data_slots",
        "floats_only",
        "forward",
        "name",
        "optional",
        "required",
        "sample",
        "slots",
        "smooth",
        "torch",
        "variadic",
    )

    def __init__(
        self,
        forward: Op,
        *,
        name: str | None = None,
        check: Callable[..., Params | None] | None = None,
        data: Mapping[str, str] | None = None,
        sample: Sample | None = None,
        torch: Callable[..., Any] | None = None,
        smooth: bool = True,
    ) -> None:
        self.forward = forward
        self.name = name or forward.__name__
        self.__name__ = self.name
        self.__doc__ = forward.__doc__
        self.__wrapped__ = forward
        self.check = check
        self.sample = sample
        self.torch = torch
        self.smooth = smooth
        self.slots, self.variadic = _slots(forward, dict(data or {}))
        self.required = sum(1 for slot in self.slots if not slot.optional)
        self.optional = tuple(slot.optional for slot in self.slots)
        self.data_slots = tuple(i for i, slot in enumerate(self.slots) if slot.kind != "float")
        self.floats_only = not self.variadic and not self.data_slots

    def __call__(self, *arrays: Any, **params: Any) -> tuple[Array, Vjp]:
        """Check the arguments, then run the op: ``(out, vjp)``."""
        if not self.variadic:
            slots = self.slots
            if not self.required <= len(arrays) <= len(slots):
                names = ", ".join(slot.name for slot in slots)
                raise TypeError(
                    f"{self.name}: takes the inputs ({names}), got {len(arrays)} of them"
                )
            check_kinds(self, arrays)
        return self.forward(*arrays, **self.checked(arrays, params))

    def checked(self, values: Sequence[Any], params: Params) -> Params:
        """``params`` after the op's check: as given, or as the check normalised them."""
        if self.check is None:
            return params
        found = self.check(*values, **params)
        return params if found is None else found

    def __repr__(self) -> str:
        return f"<op {self.name}>"


def _slots(forward: Op, data: dict[str, str]) -> tuple[tuple[Slot, ...], bool]:
    """The positional inputs of ``forward``: parameters before ``*``; a default of ``None``
    makes one optional; ``data`` gives the kind of the non-float ones."""
    slots = []
    variadic = False
    for parameter in inspect.signature(forward).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            variadic = True
        elif parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            kind = data.pop(parameter.name, "float")
            if kind not in _KINDS:
                raise ValueError(f"op: input {parameter.name!r} has unknown kind {kind!r}")
            optional = parameter.default is None
            slots.append(Slot(parameter.name, kind, optional))
    if data:
        raise ValueError(f"op: data names {sorted(data)} are not inputs of {forward.__name__}")
    return tuple(slots), variadic


def check_kinds(op: OpDef, values: Sequence[Any]) -> None:
    """Refuse data inputs of the wrong kind (float ids, non-bool masks)."""
    for i in op.data_slots:
        value = values[i] if i < len(values) else None
        if value is None:
            continue
        slot = op.slots[i]
        dtype = np.asarray(value).dtype
        if dtype.kind not in _KINDS[slot.kind]:
            raise TypeError(
                f"{op.name}: {slot.name} must be {_KIND_WORDS[slot.kind]}, got dtype {dtype}"
            )


def op(
    *,
    check: Callable[..., Params | None] | None = None,
    data: Mapping[str, str] | None = None,
    sample: Sample | None = None,
    torch: Callable[..., Any] | None = None,
    smooth: bool = True,
    name: str | None = None,
) -> Callable[[Op], OpDef]:
    """Make a function ``f(*arrays, **params) -> (out, vjp)`` into an ``OpDef``: as a decorator,
    ``@op(...)``, or applied after the function, ``cube = op(...)(_cube)``. The op is named after
    the function, without a leading underscore, unless ``name`` says otherwise.

    Inputs are ``f``'s parameters before ``*`` (a default of ``None`` makes one optional);
    ``data`` names the inputs that hold integer or bool data (``{"labels": "int"}``), which take
    NodeIds of data leaves or plain arrays and get no gradient. The rest are keyword parameters,
    which ``check`` (called as ``f`` is) validates and normalises before NumPy runs.
    Record it with ``graph.apply(f, *nodes, **params)``.

    Examples
    --------
    >>> import numpy as np, graphlora as gl
    >>> @gl.ops.op(sample=gl.ops.elementwise())
    ... def cube(x):
    ...     '''``x ** 3``.  VJP: ``(3 x**2 g,)``.'''
    ...     return x**3, lambda g, needs: (3 * x**2 * g,)
    >>> g = gl.Graph()
    >>> y = g.apply(cube, g.parameter([1.0, 2.0]))
    >>> g.value(y)
    array([1., 8.])
    """

    def define(f: Op) -> OpDef:
        return OpDef(
            f,
            name=name or f.__name__.removeprefix("_"),
            check=check,
            data=data,
            sample=sample,
            torch=torch,
            smooth=smooth,
        )

    return define


OPS: dict[str, OpDef] = {}
"""The built-in op catalogue, by the name of its ``Graph`` method."""


def builtin(
    forward: Op,
    *,
    check: Callable[..., Params | None] | None = None,
    data: Mapping[str, str] | None = None,
    sample: Sample | None = None,
    torch: Callable[..., Any] | None = None,
    smooth: bool = True,
) -> OpDef:  # pragma: no mutate block
    """``op(...)(forward)`` for graphlora's own ops, which also adds the op to ``OPS``.

    Built-in ops are registered by a call after their function (``relu = builtin(_relu,
    ...)``), as HIPS autograd registers its VJPs, rather than by a decorator: mutation testing
    (mutmut) leaves decorated functions out, and an op's forward and VJP are what it must reach.
    """
    definition = op(check=check, data=data, sample=sample, torch=torch, smooth=smooth)(forward)
    if definition.name in OPS:
        raise ValueError(f"builtin: {definition.name!r} is already in the catalogue")
    OPS[definition.name] = definition
    return definition


def broadcast_check(name: str, a: Array, b: Array) -> None:
    """The check of a binary op with NumPy broadcasting, bound to the op's name with ``partial``:
    the two shapes must broadcast."""
    # Checks are module-level functions bound with partial, not closures made at import, so
    # that mutation testing (which swaps functions as they are called) reaches their bodies.
    if a.shape != b.shape:
        try:
            np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise ShapeError(
                f"{name}: shapes {a.shape} and {b.shape} do not broadcast together"
            ) from None


def wrap_function(
    fn: Op, name: str, shapes: Sequence[tuple[int, ...]], as_output: Callable[[object], Array]
) -> Op:
    """A plain user function ``fn(*arrays, **params) -> (out, vjp)`` made safe to record: its
    output goes through ``as_output`` (to the graph's dtype), and its VJP's gradients are checked
    against ``shapes``, the inputs' shapes, so that a wrong number or shape is a clear error."""

    def run(*arrays: Array, **params: Any) -> tuple[Array, Vjp]:
        result = fn(*arrays, **params)
        if not (isinstance(result, tuple) and len(result) == 2 and callable(result[1])):
            raise TypeError(f"apply: {name} must return a pair (out, vjp), got {result!r:.80}")
        return as_output(result[0]), _checked_vjp(name, result[1], shapes)

    return run


def _checked_vjp(name: str, vjp: Vjp, shapes: Sequence[tuple[int, ...]]) -> Vjp:
    """Wrap a user VJP so that a wrong number, shape or kind of gradients is a clear error."""

    def checked(g: Array, needs: tuple[bool, ...]) -> Grads:
        grads = vjp(g, needs)
        if not isinstance(grads, (tuple, list)) or len(grads) != len(shapes):
            raise GraphError(
                f"{name}: its VJP must return a tuple of {len(shapes)} gradients (one per input, "
                f"None allowed), got {grads!r:.80}"
            )
        result: list[Array | None] = []
        for i, gi in enumerate(grads):  # as many as shapes and needs: checked above
            if gi is None or not needs[i]:
                result.append(None)
                continue
            array = np.asarray(gi, dtype=g.dtype)
            if array.shape != shapes[i]:
                raise ShapeError(
                    f"{name}: its VJP returned a gradient of shape {array.shape} for input {i} "
                    f"of shape {shapes[i]}"
                )
            result.append(array)
        return tuple(result)

    return checked
