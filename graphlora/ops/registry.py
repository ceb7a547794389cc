"""The op registry: the array types, ``OpDef`` and the ``op`` decorator, and the catalogue ``OPS``.

An op is a function over arrays that returns ``(out, vjp)``. The ``op`` decorator wraps it in an
``OpDef`` that also carries its argument check (run before NumPy), the kinds of its inputs (float,
or integer/bool data such as labels and masks), where its inputs are safe to test (a ``Sample``,
``graphlora.ops.sampling``) and, where PyTorch has the same op, how to call it there. ``builtin``
does the same and adds the op to ``OPS``, the catalogue that ``Graph``'s methods, the tests and the
Hypothesis strategies read.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt

from graphlora.errors import GraphError, ShapeError

if TYPE_CHECKING:
    from graphlora.ops.sampling import Sample

__all__ = [
    "OPS",
    "Array",
    "Grads",
    "Op",
    "OpDef",
    "Params",
    "Shape",
    "Slot",
    "Vjp",
    "broadcast_check",
    "builtin",
    "check_kinds",
    "op",
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
    required, optional, data_slots, floats_only, fixed
        How many inputs must be given; which may be ``None``; the positions of the integer/bool
        data inputs; whether there are none; and, for an op of one or two float inputs none of
        which is optional, that number (else -1): the recording's fast paths.
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
        "fixed",
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
        plain = self.floats_only and not any(self.optional) and len(self.slots) in (1, 2)
        self.fixed = len(self.slots) if plain else -1
        if check is not None:
            # a callable that takes no weak reference cannot be re-checked by replays
            with contextlib.suppress(TypeError):
                _CHECKS[forward] = check

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

_CHECKS: weakref.WeakKeyDictionary[Callable[..., Any], Callable[..., Params | None]] = (
    weakref.WeakKeyDictionary()
)


def check_of(forward: Callable[..., Any]) -> Callable[..., Params | None] | None:
    """The check of the op whose function is ``forward`` (``None`` for a plain function or an op
    with nothing to check): what a replay runs again when an op's data leaves may have changed."""
    try:
        return _CHECKS.get(forward)
    except TypeError:
        return None


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
