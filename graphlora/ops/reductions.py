"""Reductions over axes: ``sum mean max min logsumexp var`` (``axis`` None, an int or a tuple;
``keepdims``)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np

from graphlora._checks import axes, flag
from graphlora.errors import ShapeError
from graphlora.ops.registry import Array, Grads, Params, Vjp, builtin
from graphlora.ops.sampling import Draw, Sample, elementwise


def expand_reduced(g: Array, shape: tuple[int, ...], axis: tuple[int, ...] | None) -> Array:
    """Put back the axes a reduction removed and broadcast ``g`` to ``shape``."""
    if axis is not None and g.ndim != len(shape):
        g = np.expand_dims(g, axis)
    return np.broadcast_to(g, shape)


def reduction_check(
    name: str, x: Array, *, axis: object = None, keepdims: object = False
) -> Params | None:
    """The check of a reduction, bound to its name with ``partial``: ``axis`` normalised to a
    sorted tuple (or None), a bool ``keepdims``."""
    if axis is None and keepdims is False:
        return None  # over every axis: nothing to normalise
    return {"axis": axes(name, axis, x.shape), "keepdims": flag(name, "keepdims", keepdims)}


def reduction_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    """``axis`` as None, one axis or a tuple of distinct axes; ``keepdims`` either way."""
    choices: list[Any] = [None]
    if x.ndim:
        choices += list(range(-x.ndim, x.ndim))
        choices += [tuple(a for a in range(x.ndim) if a != skip) for skip in range(x.ndim)]
        choices += [()]
    return {"axis": draw.choice(choices), "keepdims": draw.choice([False, True])}


def torch_reduce(
    reduce: Any, x: Any, axis: tuple[int, ...] | None, keepdims: bool
) -> Any:  # pragma: no mutate block
    """``reduce`` (``torch.sum``, ``torch.amax``, ...) with NumPy's meaning of ``axis``: torch
    reads an empty ``dim`` as every axis, NumPy as none."""
    if axis is None:
        out = reduce(x)
        return out.reshape((1,) * x.ndim) if keepdims else out
    if axis == ():
        return x * 1
    return reduce(x, dim=axis, keepdim=keepdims)


def _sum(
    x: Array, *, axis: tuple[int, ...] | None = None, keepdims: bool = False
) -> tuple[Array, Vjp]:
    """Sum over ``axis`` (a sorted tuple, or ``None`` for all).  VJP: ``g`` broadcast back."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (expand_reduced(g, x.shape, axis),)

    return np.asarray(np.sum(x, axis=axis, keepdims=keepdims)), vjp


sum = builtin(
    _sum,
    check=partial(reduction_check, "sum"),
    sample=elementwise(params=reduction_params),
    torch=lambda t, x, axis, keepdims: torch_reduce(t.sum, x, axis, keepdims),
)


def _mean(
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


mean = builtin(
    _mean,
    check=partial(reduction_check, "mean"),
    sample=elementwise(params=reduction_params),
    torch=lambda t, x, axis, keepdims: torch_reduce(t.mean, x, axis, keepdims),
)


def _check_extreme(
    name: str, x: Array, *, axis: object = None, keepdims: object = False
) -> Params | None:
    """The check of ``max``/``min`` (bound to the name with ``partial``): a reduction, over no
    axis of size 0 (NumPy and PyTorch refuse those: there is nothing to take the largest of)."""
    params = reduction_check(name, x, axis=axis, keepdims=keepdims)
    reduced = range(x.ndim) if params is None or params["axis"] is None else params["axis"]
    empty = [a for a in reduced if x.shape[a] == 0]
    if empty:  # over every axis (axis None), an empty x has one of size 0 among them
        raise ShapeError(
            f"{name}: cannot reduce over an axis of size 0 (axis {empty} of shape "
            f"{x.shape}); there is no {name} of nothing"
        )
    return params


def _distinct_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    return (draw.distinct(draw.shape()),)


def _spread(x: Array) -> bool:  # pragma: no mutate block
    """No two elements within 0.01 of each other: far from the ties where max has a kink."""
    return x.size > 0 and (x.size == 1 or bool(np.diff(np.sort(x, axis=None)).min() >= 0.01))


def _extreme_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    """As ``reduction_params``, over no axis of size 0."""
    if x.size:
        return reduction_params(draw, x)
    nonempty = tuple(a for a in range(x.ndim) if x.shape[a])
    return {
        "axis": draw.choice([nonempty, *((a,) for a in nonempty)]),
        "keepdims": draw.choice([False, True]),
    }


def _extreme(x: Array, out: Array, axis: tuple[int, ...] | None, keepdims: bool) -> Vjp:
    """The VJP of max and min: ``g`` to the elements equal to the result, shared evenly among
    ties (as ``torch.amax``)."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        kept_out = out if keepdims or axis is None else np.expand_dims(out, axis)
        hit = x == kept_out
        count = np.sum(hit, axis=axis, keepdims=True).astype(g.dtype)
        return (expand_reduced(g, x.shape, axis) * hit / count,)

    return vjp


def _max(
    x: Array, *, axis: tuple[int, ...] | None = None, keepdims: bool = False
) -> tuple[Array, Vjp]:
    """The largest element over ``axis``.  VJP: ``g`` to the elements equal to the result,
    shared evenly among ties (as ``torch.amax``)."""
    out = np.asarray(np.max(x, axis=axis, keepdims=keepdims))
    return out, _extreme(x, out, axis, keepdims)


max = builtin(
    _max,
    check=partial(_check_extreme, "max"),
    sample=Sample(_distinct_inputs, _extreme_params, fits=_spread),
    torch=lambda t, x, axis=None, keepdims=False: torch_reduce(t.amax, x, axis, keepdims),
)


def _min(
    x: Array, *, axis: tuple[int, ...] | None = None, keepdims: bool = False
) -> tuple[Array, Vjp]:
    """The smallest element over ``axis``.  VJP: ``g`` to the elements equal to the result,
    shared evenly among ties (as ``torch.amin``)."""
    out = np.asarray(np.min(x, axis=axis, keepdims=keepdims))
    return out, _extreme(x, out, axis, keepdims)


min = builtin(
    _min,
    check=partial(_check_extreme, "min"),
    sample=Sample(_distinct_inputs, _extreme_params, fits=_spread),
    torch=lambda t, x, axis=None, keepdims=False: torch_reduce(t.amin, x, axis, keepdims),
)


def _check_logsumexp(x: Array, *, axis: object = -1, keepdims: object = False) -> Params:
    return {
        "axis": axes("logsumexp", axis, x.shape),
        "keepdims": flag("logsumexp", "keepdims", keepdims),
    }


def _torch_logsumexp(
    t: Any, x: Any, axis: Any = -1, keepdims: bool = False
) -> Any:  # pragma: no mutate block
    dims = tuple(range(x.ndim)) if axis is None else axis
    if dims == ():
        return x * 1
    return t.logsumexp(x, dim=dims, keepdim=keepdims)


def _logsumexp(
    x: Array, *, axis: tuple[int, ...] | None, keepdims: bool
) -> tuple[Array, Vjp]:  # the defaults are the check's, which always gives both
    """``log(sum(exp(x)))`` over ``axis`` (default the last), computed stably; -inf over no
    elements, as PyTorch.  VJP: ``g * exp(x - out)`` (the softmax), broadcast back."""
    if x.size == 0:  # some axis has size 0: over it, no elements; beside it, no rows
        out = np.full(np.sum(x, axis=axis, keepdims=keepdims).shape, -np.inf, dtype=x.dtype)
    else:
        top = np.max(x, axis=axis, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)  # a row of -inf (or +inf) is its own answer
        with np.errstate(divide="ignore"):
            kept = np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True)) + top
        out = kept if keepdims else np.asarray(np.squeeze(kept, axis=axis))

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        if x.size == 0:
            return (np.zeros_like(x),)
        kept_out = out if keepdims or axis is None else np.expand_dims(out, axis)
        return (expand_reduced(g, x.shape, axis) * np.exp(x - kept_out),)

    return out, vjp


logsumexp = builtin(
    _logsumexp,
    check=_check_logsumexp,
    sample=elementwise(params=reduction_params),
    torch=_torch_logsumexp,
)


def _check_var(
    x: Array, *, axis: object = None, keepdims: object = False, ddof: object = 0
) -> Params:
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise ValueError(f"var: ddof must be an int >= 0, got {ddof!r}")
    return {
        "axis": axes("var", axis, x.shape),
        "keepdims": flag("var", "keepdims", keepdims),
        "ddof": int(ddof),
    }


def _var_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    params = reduction_params(draw, x)
    reduced = range(x.ndim) if params["axis"] is None else np.atleast_1d(params["axis"])
    count = math.prod(x.shape[a] for a in reduced)
    params["ddof"] = draw.choice([0, 1] if count >= 2 else [0])
    return params


def _torch_var(
    t: Any, x: Any, axis: Any = None, keepdims: bool = False, ddof: int = 0
) -> Any:  # pragma: no mutate block
    if axis is None:
        out = t.var(x, correction=ddof)
        return out.reshape((1,) * x.ndim) if keepdims else out
    if axis == ():
        return x * 0
    return t.var(x, dim=axis, correction=ddof, keepdim=keepdims)


def _var(
    x: Array, *, axis: tuple[int, ...] | None, keepdims: bool, ddof: int
) -> tuple[Array, Vjp]:  # the defaults are the check's, which always gives all three
    """Variance over ``axis``: ``sum((x - mean)**2) / max(n - ddof, 0)``, as NumPy and PyTorch
    (inf where ``n <= ddof`` and the values differ, NaN where they do not or ``n`` is 0).
    VJP: ``g * 2 (x - mean) / (n - ddof)``, broadcast back: PyTorch's, which does not clamp
    (for ``n < ddof`` it is finite and of the opposite sign, for ``n == ddof`` infinite)."""
    count = x.size if axis is None else math.prod(x.shape[a] for a in axis)
    centred = x - np.mean(x, axis=axis, keepdims=True) if count else x
    dof = count - ddof if count > ddof else 0  # (max is the op of that name here)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.asarray(np.sum(centred * centred, axis=axis, keepdims=keepdims) / dof)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        if count == 0:
            return (np.zeros_like(x),)
        with np.errstate(invalid="ignore", divide="ignore"):
            factor = np.divide(2.0, count - ddof, dtype=x.dtype)  # PyTorch's, even for n < ddof
            return (expand_reduced(g, x.shape, axis) * (centred * factor),)

    return out, vjp


var = builtin(_var, check=_check_var, sample=elementwise(params=_var_params), torch=_torch_var)
