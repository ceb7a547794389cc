"""Normalisation over the last axis, each one fused op: ``layer_norm rms_norm``."""

from __future__ import annotations

from typing import Any

import numpy as np

from graphlora._checks import real
from graphlora.errors import ShapeError
from graphlora.ops.kernels import column_sum, row_sum
from graphlora.ops.registry import Array, Grads, Params, Vjp, builtin
from graphlora.ops.sampling import Draw, Sample


def _last_axis_mean(v: Array) -> Array:
    """The mean over the last axis, kept (NaN over no elements, without NumPy's warning)."""
    total = row_sum(v)
    return total / v.shape[-1] if v.shape[-1] else np.full_like(total, np.nan)


def _check_norm(name: str, x: Array, weights: dict[str, Array | None], eps: object) -> Params:
    if x.ndim == 0:
        raise ShapeError(f"{name}: x must have at least one axis (normalised: the last), got ()")
    for label, value in weights.items():
        if value is not None and value.shape != x.shape[-1:]:
            raise ShapeError(
                f"{name}: {label} has shape {value.shape}; x {x.shape} needs {x.shape[-1:]}"
            )
    return {"eps": real(name, "eps", eps, 0.0)}


def _check_layer_norm(
    x: Array, weight: Array | None = None, bias: Array | None = None, *, eps: object = 1e-5
) -> Params:
    return _check_norm("layer_norm", x, {"weight": weight, "bias": bias}, eps)


def _norm_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    shape = draw.shape(min_dims=1)
    optional = [draw.floats(shape[-1:]) if draw.choice([False, True]) else None for _ in "wb"]
    return (draw.floats(shape), *optional)


def _eps(draw: Draw, *inputs: Array | None) -> Params:  # pragma: no mutate block
    return {"eps": draw.choice([1e-5, 0.1])}


def _torch_layer_norm(
    t: Any, x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5
) -> Any:  # pragma: no mutate block
    return t.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _layer_norm(
    x: Array, weight: Array | None = None, bias: Array | None = None, *, eps: float
) -> tuple[Array, Vjp]:
    """Layer norm over the last axis: ``xhat * weight + bias``, ``xhat = (x - mean) / sqrt(var +
    eps)`` (biased variance, as PyTorch). Keeps ``xhat`` and ``1 / sqrt(var + eps)`` for backward.
    VJP: ``gx = r (gh - mean(gh) - xhat mean(gh xhat))`` with ``gh = g * weight``;
    ``gweight = sum(g xhat)``, ``gbias = sum(g)`` over the other axes."""
    mean = _last_axis_mean
    with np.errstate(invalid="ignore", divide="ignore"):  # no features: NaN, as PyTorch
        xhat = x - mean(x)  # centred, then scaled in place
        rstd = 1.0 / np.sqrt(mean(np.square(xhat)) + eps)  # eps = 0, a constant row: inf
        xhat *= rstd  # (..., D); 0 * inf: NaN, as PyTorch, without a warning
    out = xhat if weight is None else xhat * weight
    if bias is not None:
        out = out + bias if out is xhat else np.add(out, bias, out=out)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        gx = gw = gb = None
        if needs[0]:
            gh = g if weight is None else g * weight
            gx = xhat * -mean(gh * xhat)  # then + gh - mean(gh), times rstd, in place
            gx += gh
            gx -= mean(gh)
            gx *= rstd  # where rstd is inf, xhat and so gx are NaN: no 0 * inf
        if needs[1]:
            gw = column_sum(g * xhat)
        if needs[2]:
            gb = column_sum(g)
        return gx, gw, gb

    return out, vjp


layer_norm = builtin(
    _layer_norm,
    check=_check_layer_norm,
    sample=Sample(_norm_inputs, _eps, fits=lambda x: x.ndim >= 1),
    torch=_torch_layer_norm,
)


def _check_rms_norm(x: Array, weight: Array | None = None, *, eps: object = 1e-6) -> Params:
    return _check_norm("rms_norm", x, {"weight": weight}, eps)


def _rms_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    shape = draw.shape(min_dims=1)
    return draw.floats(shape), draw.floats(shape[-1:]) if draw.choice([False, True]) else None


def _rms_norm(x: Array, weight: Array | None = None, *, eps: float) -> tuple[Array, Vjp]:
    """RMS norm over the last axis: ``x / sqrt(mean(x**2) + eps) * weight``.
    VJP: ``gx = r (gh - xhat mean(gh xhat))`` with ``gh = g * weight``, ``xhat = x r``;
    ``gweight = sum(g xhat)`` over the other axes."""
    mean = _last_axis_mean
    with np.errstate(invalid="ignore", divide="ignore"):  # eps = 0, a row of zeros: NaN
        rrms = 1.0 / np.sqrt(mean(x * x) + eps)
        xhat = x * rrms
    out = xhat if weight is None else xhat * weight

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        gx = gw = None
        if needs[0]:
            gh = g if weight is None else g * weight
            gx = rrms * (gh - xhat * mean(gh * xhat))  # where rrms is inf, xhat is NaN: no 0 * inf
        if needs[1]:
            gw = column_sum(g * xhat)
        return gx, gw

    return out, vjp


rms_norm = builtin(
    _rms_norm,
    check=_check_rms_norm,
    sample=Sample(_rms_inputs, _eps, fits=lambda x: x.ndim >= 1),
    torch=lambda t, x, weight=None, eps=1e-6: t.nn.functional.rms_norm(
        x, x.shape[-1:], weight, eps
    ),
)
