"""Reductions over axes: ``sum mean`` (``axis`` None, an int or a tuple; ``keepdims``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from graphlora._checks import axes, flag
from graphlora.ops._core import Array, Draw, Grads, Params, Vjp, builtin, elementwise


def expand_reduced(g: Array, shape: tuple[int, ...], axis: tuple[int, ...] | None) -> Array:
    """Put back the axes a reduction removed and broadcast ``g`` to ``shape``."""
    if axis is not None and g.ndim != len(shape):
        g = np.expand_dims(g, axis)
    return np.broadcast_to(g, shape)


def reduction_check(name: str) -> Callable[..., Params | None]:
    """The check of a reduction: ``axis`` normalised to a sorted tuple (or None), a bool
    ``keepdims``."""

    def check(x: Array, *, axis: object = None, keepdims: object = False) -> Params | None:
        if axis is None and keepdims is False:
            return None  # over every axis: nothing to normalise
        return {"axis": axes(name, axis, x.shape), "keepdims": flag(name, "keepdims", keepdims)}

    return check


def reduction_params(draw: Draw, x: Array) -> Params:
    """``axis`` as None, one axis or a tuple of distinct axes; ``keepdims`` either way."""
    choices: list[Any] = [None]
    if x.ndim:
        choices += list(range(-x.ndim, x.ndim))
        choices += [tuple(a for a in range(x.ndim) if a != skip) for skip in range(x.ndim)]
        choices += [()]
    return {"axis": draw.choice(choices), "keepdims": draw.choice([False, True])}


def torch_reduce(reduce: Any, x: Any, axis: tuple[int, ...] | None, keepdims: bool) -> Any:
    """``reduce`` (``torch.sum``, ``torch.amax``, ...) with NumPy's meaning of ``axis``: torch
    reads an empty ``dim`` as every axis, NumPy as none."""
    if axis is None:
        out = reduce(x)
        return out.reshape((1,) * x.ndim) if keepdims else out
    if axis == ():
        return x * 1
    return reduce(x, dim=axis, keepdim=keepdims)


@builtin(
    check=reduction_check("sum"),
    sample=elementwise(params=reduction_params),
    torch=lambda t, x, axis, keepdims: torch_reduce(t.sum, x, axis, keepdims),
)
def sum(
    x: Array, *, axis: tuple[int, ...] | None = None, keepdims: bool = False
) -> tuple[Array, Vjp]:
    """Sum over ``axis`` (a sorted tuple, or ``None`` for all).  VJP: ``g`` broadcast back."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (expand_reduced(g, x.shape, axis),)

    return np.asarray(np.sum(x, axis=axis, keepdims=keepdims)), vjp


@builtin(
    check=reduction_check("mean"),
    sample=elementwise(params=reduction_params),
    torch=lambda t, x, axis, keepdims: torch_reduce(t.mean, x, axis, keepdims),
)
def mean(
    x: Array, *, axis: tuple[int, ...] | None = None, keepdims: bool = False
) -> tuple[Array, Vjp]:
    """Mean over ``axis`` (NaN over no elements, as NumPy and PyTorch).  VJP: ``g / n``
    broadcast back, ``n`` the number of elements averaged."""
    count = x.size if axis is None else math.prod(x.shape[i] for i in axis)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        if count == 0:  # nothing was averaged: x is empty too
            return (np.zeros_like(x),)
        return (expand_reduced(g / count, x.shape, axis),)

    with np.errstate(invalid="ignore"):  # 0 / 0 over no elements: NaN, without np.mean's warning
        return np.asarray(np.sum(x, axis=axis, keepdims=keepdims) / count), vjp
