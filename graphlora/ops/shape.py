"""Shape and indexing: ``reshape transpose``, ``getitem`` (NumPy's basic and integer-array
indexing), ``concat stack``, ``embedding`` (rows picked by integer ids)."""

from __future__ import annotations

from typing import Any

import numpy as np

from graphlora._checks import int_tuple, one_axis, resolve_shape
from graphlora.errors import ShapeError
from graphlora.ops.registry import Array, Grads, Params, Vjp, builtin
from graphlora.ops.sampling import Draw, Sample, elementwise


def _check_reshape(x: Array, *, shape: object) -> Params:
    return {"shape": resolve_shape("reshape", shape, x.shape)}


def _reshape_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    targets: list[Any] = [(-1,), (1, x.size), tuple(reversed(x.shape))]
    if x.size:
        targets.append((x.size, -1))
    return {"shape": draw.choice(targets)}


def _reshape(x: Array, *, shape: tuple[int, ...]) -> tuple[Array, Vjp]:
    """``x.reshape(shape)`` (one entry may be ``-1``).  VJP: ``(g.reshape(x.shape),)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g.reshape(x.shape),)

    return x.reshape(shape), vjp


reshape = builtin(
    _reshape,
    check=_check_reshape,
    sample=elementwise(params=_reshape_params),
    torch=lambda t, x, shape: x.reshape(shape),
)


def _check_transpose(x: Array, *, axes: object = None) -> Params:
    if axes is None:
        return {"axes": None}
    perm = int_tuple("transpose", "axes", axes)
    ndim = x.ndim
    if sorted(a % ndim if -ndim <= a < ndim else a for a in perm) != list(range(ndim)):
        raise ShapeError(
            f"transpose: axes {perm} is not a permutation of the {ndim} axes of shape {x.shape}"
        )
    return {"axes": tuple(a % ndim for a in perm)}


def _transpose_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    reverse = tuple(range(x.ndim))[::-1]
    rotate = (*range(1, x.ndim), 0) if x.ndim else ()
    return {"axes": draw.choice([None, reverse, rotate])}


def _torch_transpose(
    t: Any, x: Any, axes: tuple[int, ...] | None
) -> Any:  # pragma: no mutate block
    return x.permute(tuple(reversed(range(x.ndim))) if axes is None else axes)


def _transpose(x: Array, *, axes: tuple[int, ...] | None = None) -> tuple[Array, Vjp]:
    """``np.transpose(x, axes)`` (``None`` reverses the axes).
    VJP: ``(np.transpose(g, argsort(axes)),)``."""
    inverse = None if axes is None else sorted(range(len(axes)), key=axes.__getitem__)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (np.transpose(g, inverse),)

    return np.transpose(x, axes), vjp


transpose = builtin(
    _transpose,
    check=_check_transpose,
    sample=elementwise(params=_transpose_params),
    torch=_torch_transpose,
)


# --- indexing -------------------------------------------------------------------------------------


def _index(index: object) -> Any:
    """``index`` with lists made arrays, as NumPy reads them (a tuple stays a tuple of parts)."""
    if isinstance(index, tuple):
        return tuple(np.asarray(part) if isinstance(part, list) else part for part in index)
    return np.asarray(index) if isinstance(index, list) else index


def _check_getitem(x: Array, *, index: Any) -> Params:
    index = _index(index)
    parts = index if isinstance(index, tuple) else (index,)
    for part in parts:
        if isinstance(part, np.ndarray) and part.dtype.kind not in "iub":
            raise TypeError(
                f"getitem: index arrays must hold integers or bools, got dtype {part.dtype}"
            )
        if not (
            part is None
            or part is Ellipsis
            or isinstance(part, (slice, np.ndarray))
            or (isinstance(part, (int, np.integer)) and not isinstance(part, bool))
        ):
            raise TypeError(
                f"getitem: an index is made of ints, slices, None, ..., and integer or bool "
                f"arrays, got {type(part).__name__}: {part!r:.40}"
            )
        if isinstance(part, slice):
            for field in ("start", "stop", "step"):
                bound = getattr(part, field)
                if bound is not None and (
                    isinstance(bound, (bool, np.bool_)) or not isinstance(bound, (int, np.integer))
                ):
                    raise TypeError(
                        f"getitem: a slice's {field} must be an int or None, got "
                        f"{type(bound).__name__}: {bound!r:.40}"
                    )
            if part.step == 0:
                raise ValueError(f"getitem: a slice's step must not be 0, got {part!r}")
    try:  # on a zero-strided stand-in of x's shape: the same checks as NumPy, no copy of x
        np.broadcast_to(np.zeros((), np.int8), x.shape)[index]
    except IndexError as error:
        raise ShapeError(
            f"getitem: index {index!r:.60} does not fit shape {x.shape}: {error}"
        ) from None
    return {"index": index}


def _getitem_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    if x.ndim == 0:
        return {"index": draw.choice([(), Ellipsis, None])}
    side = x.shape[0]
    choices: list[object] = [
        slice(None, None, -1),
        (Ellipsis, slice(0, None, 2)),
        (None, slice(1, None)),
    ]
    if side:
        choices += [side - 1, -side, np.array([0, side - 1, 0])]  # repeated: gradients add up
    if x.size:
        choices.append((slice(None), *[0] * (x.ndim - 1)))
    return {"index": draw.choice(choices)}


def _torch_getitem(t: Any, x: Any, index: Any) -> Any:  # pragma: no mutate block
    """``x[index]`` in PyTorch, for any NumPy index (PyTorch has no negative steps): the flat
    positions NumPy's index picks, gathered from the flattened tensor."""
    positions = np.arange(int(np.prod(x.shape)), dtype=np.int64).reshape(tuple(x.shape))[index]
    return x.reshape(-1)[t.from_numpy(np.array(positions))]  # a copy: no negative strides


def _getitem(x: Array, *, index: Any) -> tuple[Array, Vjp]:
    """``x[index]``, NumPy's basic and integer-array (and bool) indexing.
    VJP: ``g`` put back at ``index`` in zeros of ``x``'s shape, repeated indices adding up."""
    parts = index if isinstance(index, tuple) else (index,)
    advanced = any(isinstance(part, np.ndarray) for part in parts)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        grad = np.zeros(x.shape, dtype=g.dtype)
        if advanced:
            np.add.at(grad, index, g)  # the same element picked twice gets both gradients
        else:
            grad[index] = g
        return (grad,)

    return np.asarray(x[index]), vjp


getitem = builtin(
    _getitem,
    check=_check_getitem,
    sample=elementwise(params=_getitem_params),
    torch=_torch_getitem,
)


def _check_concat(*xs: Array, axis: object = 0) -> Params:
    if not xs:
        raise ValueError("concat: needs at least one node to join")
    first = xs[0]
    if first.ndim == 0:
        raise ShapeError("concat: cannot join 0-d values; reshape them to (1,) first")
    normal = one_axis("concat", axis, first.shape)
    for i, x in enumerate(xs):
        if (
            x.ndim != first.ndim
            or x.shape[:normal] + x.shape[normal + 1 :]
            != first.shape[:normal] + first.shape[normal + 1 :]
        ):
            raise ShapeError(
                f"concat: input {i} has shape {x.shape}, which does not fit {first.shape} "
                f"except along axis {normal}"
            )
    return {"axis": normal}


def _concat_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    shape = draw.shape(min_dims=1)
    axis = draw.choice(range(len(shape)))
    count = draw.choice([1, 2, 3])
    sides = [
        draw.choice(range(4)) if draw.choice([False, True]) else shape[axis] for _ in range(count)
    ]
    return tuple(draw.floats((*shape[:axis], side, *shape[axis + 1 :])) for side in sides)


def _concat_axes(*xs: Array) -> list[int]:  # pragma: no mutate block
    """The axes along which ``xs`` can be joined."""
    first = xs[0]
    return [
        a
        for a in range(first.ndim)
        if all(
            x.ndim == first.ndim
            and x.shape[:a] + x.shape[a + 1 :] == first.shape[:a] + first.shape[a + 1 :]
            for x in xs
        )
    ]


def _concat_fits(*xs: Array) -> bool:  # pragma: no mutate block
    return bool(_concat_axes(*xs))


def _concat_params(draw: Draw, *xs: Array) -> Params:  # pragma: no mutate block
    return {"axis": draw.choice(_concat_axes(*xs))}


def _concat(*xs: Array, axis: int) -> tuple[Array, Vjp]:  # axis: always the check's
    """Join along ``axis`` (``np.concatenate``).  VJP: ``g`` cut back into the inputs' pieces."""
    cuts = np.cumsum([x.shape[axis] for x in xs])[:-1]

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        pieces = np.split(g, cuts, axis=axis)
        return tuple(piece if needs[i] else None for i, piece in enumerate(pieces))  # one each

    return np.concatenate(xs, axis=axis), vjp


concat = builtin(
    _concat,
    check=_check_concat,
    sample=Sample(_concat_inputs, _concat_params, fits=_concat_fits),
    torch=lambda t, *xs, axis=0: t.cat(xs, dim=axis),
)


def _check_stack(*xs: Array, axis: object = 0) -> Params:
    if not xs:
        raise ValueError("stack: needs at least one node to stack")
    first = xs[0]
    for i, x in enumerate(xs):
        if x.shape != first.shape:
            raise ShapeError(f"stack: input {i} has shape {x.shape}, input 0 has {first.shape}")
    return {"axis": one_axis("stack", axis, (len(xs), *first.shape))}  # stacked on axis 0


def _stack_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    shape = draw.shape()
    return tuple(draw.floats(shape) for _ in range(draw.choice([1, 2, 3])))


def _stack_params(draw: Draw, *xs: Array) -> Params:  # pragma: no mutate block
    return {"axis": draw.choice(range(-xs[0].ndim - 1, xs[0].ndim + 1))}


def _stack(*xs: Array, axis: int) -> tuple[Array, Vjp]:  # axis: always the check's
    """Stack along a new ``axis`` (``np.stack``).  VJP: ``g`` taken apart along that axis."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return tuple(np.take(g, i, axis=axis) if need else None for i, need in enumerate(needs))

    return np.stack(xs, axis=axis), vjp


stack = builtin(
    _stack,
    check=_check_stack,
    sample=Sample(_stack_inputs, _stack_params, fits=lambda *xs: len({x.shape for x in xs}) == 1),
    torch=lambda t, *xs, axis=0: t.stack(xs, dim=axis),
)


def _check_embedding(weight: Array, ids: Array) -> None:
    if weight.ndim != 2:
        raise ShapeError(f"embedding: weight must be [V, D], got shape {weight.shape}")
    count = weight.shape[0]
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= count:
            bad = low if low < 0 else high
            raise ValueError(
                f"embedding: id {bad} is out of range for {count} embeddings (ids must lie in "
                f"[0, {count}))"
            )


def _embedding_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    count = draw.shape(min_dims=1, max_dims=1, min_side=1)[0]
    width = draw.shape(min_dims=1, max_dims=1)[0]
    return (draw.floats((count, width)),)


def _embedding_params(draw: Draw, weight: Array) -> Params:  # pragma: no mutate block
    return {"ids": draw.ints(draw.shape(max_dims=2), 0, weight.shape[0])}


def _embedding(weight: Array, ids: Array) -> tuple[Array, Vjp]:
    """Rows of ``weight [V, D]`` picked by integer ``ids [...]``: ``[..., D]``.
    VJP: ``(g scatter-added into the rows of ids, None)``: a row picked twice gets both."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        grad = np.zeros(weight.shape, dtype=g.dtype)
        np.add.at(grad, ids.ravel(), g.reshape(ids.size, weight.shape[1]))
        return grad, None

    return np.take(weight, ids, axis=0), vjp


embedding = builtin(
    _embedding,
    check=_check_embedding,
    data={"ids": "int"},
    sample=Sample(
        _embedding_inputs, _embedding_params, fits=lambda w: w.ndim == 2 and w.shape[0] > 0
    ),
    torch=lambda t, weight, ids: t.nn.functional.embedding(ids, weight),
)
