"""Shape: ``reshape transpose``."""

from __future__ import annotations

from typing import Any

import numpy as np

from graphlora._checks import int_tuple, resolve_shape
from graphlora.errors import ShapeError
from graphlora.ops._core import Array, Draw, Grads, Params, Vjp, builtin, elementwise


def _check_reshape(x: Array, *, shape: object) -> Params:
    return {"shape": resolve_shape("reshape", shape, x.shape)}


def _reshape_params(draw: Draw, x: Array) -> Params:
    targets: list[Any] = [(-1,), (1, x.size), tuple(reversed(x.shape))]
    if x.size:
        targets.append((x.size, -1))
    return {"shape": draw.choice(targets)}


@builtin(
    check=_check_reshape,
    sample=elementwise(params=_reshape_params),
    torch=lambda t, x, shape: x.reshape(shape),
)
def reshape(x: Array, *, shape: tuple[int, ...]) -> tuple[Array, Vjp]:
    """``x.reshape(shape)`` (one entry may be ``-1``).  VJP: ``(g.reshape(x.shape),)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g.reshape(x.shape),)

    return x.reshape(shape), vjp


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


def _transpose_params(draw: Draw, x: Array) -> Params:
    reverse = tuple(range(x.ndim))[::-1]
    rotate = (*range(1, x.ndim), 0) if x.ndim else ()
    return {"axes": draw.choice([None, reverse, rotate])}


def _torch_transpose(t: Any, x: Any, axes: tuple[int, ...] | None) -> Any:
    return x.permute(tuple(reversed(range(x.ndim))) if axes is None else axes)


@builtin(
    check=_check_transpose,
    sample=elementwise(params=_transpose_params),
    torch=_torch_transpose,
)
def transpose(x: Array, *, axes: tuple[int, ...] | None = None) -> tuple[Array, Vjp]:
    """``np.transpose(x, axes)`` (``None`` reverses the axes).
    VJP: ``(np.transpose(g, argsort(axes)),)``."""
    inverse = None if axes is None else tuple(int(i) for i in np.argsort(axes))

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (np.transpose(g, inverse),)

    return np.transpose(x, axes), vjp
