"""Elementwise arithmetic: ``add sub mul div maximum minimum`` (NumPy broadcasting, gradients
un-broadcast), ``where``, ``scale neg pow abs sqrt``."""

from __future__ import annotations

from functools import partial

import numpy as np

from graphlora._checks import real_scalar
from graphlora.errors import ShapeError
from graphlora.ops.kernels import unbroadcast
from graphlora.ops.registry import Array, Grads, Params, Vjp, broadcast_check, builtin
from graphlora.ops.sampling import Draw, Sample, broadcasting, elementwise


def _add(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``a + b``.  VJP: ``(g, g)``, each un-broadcast to its input's shape."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        if a.shape == b.shape:  # nothing broadcast: g itself, for both
            return (g if needs[0] else None, g if needs[1] else None)
        return (
            unbroadcast(g, a.shape) if needs[0] else None,
            unbroadcast(g, b.shape) if needs[1] else None,
        )

    return a + b, vjp


add = builtin(
    _add, check=partial(broadcast_check, "add"), sample=broadcasting(), torch=lambda t, a, b: a + b
)


def _sub(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``a - b``.  VJP: ``(g, -g)``, un-broadcast."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (
            unbroadcast(g, a.shape) if needs[0] else None,
            unbroadcast(-g, b.shape) if needs[1] else None,
        )

    return a - b, vjp


sub = builtin(
    _sub, check=partial(broadcast_check, "sub"), sample=broadcasting(), torch=lambda t, a, b: a - b
)


def _mul(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``a * b``.  VJP: ``(g * b, g * a)``, un-broadcast."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (
            unbroadcast(g * b, a.shape) if needs[0] else None,
            unbroadcast(g * a, b.shape) if needs[1] else None,
        )

    return a * b, vjp


mul = builtin(
    _mul, check=partial(broadcast_check, "mul"), sample=broadcasting(), torch=lambda t, a, b: a * b
)


def _div(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``a / b`` (division by zero follows NumPy).  VJP: ``(g / b, -g a / b²)``,
    un-broadcast."""
    out = a / b

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        g_over_b = g / b
        return (
            unbroadcast(g_over_b, a.shape) if needs[0] else None,
            unbroadcast(-g_over_b * out, b.shape) if needs[1] else None,  # -g a / b² = -(g / b) out
        )

    return out, vjp


div = builtin(
    _div,
    check=partial(broadcast_check, "div"),
    sample=broadcasting(away_b=0.5),
    torch=lambda t, a, b: a / b,
)


def _check_scale(x: Array, *, c: object) -> Params | None:
    return None if type(c) is float else {"c": real_scalar("scale", "c", c)}


def _scale_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    return {"c": draw.choice([-1.5, -0.5, 0.5, 2.0])}


def _scale(x: Array, *, c: float) -> tuple[Array, Vjp]:
    """``c * x`` for a real scalar ``c``.  VJP: ``(c * g,)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * c,)

    return x * c, vjp


scale = builtin(
    _scale,
    check=_check_scale,
    sample=elementwise(params=_scale_params),
    torch=lambda t, x, c: x * c,
)


def _neg(x: Array) -> tuple[Array, Vjp]:
    """``-x``.  VJP: ``(-g,)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (-g,)

    return -x, vjp


neg = builtin(_neg, sample=elementwise(), torch=lambda t, x: -x)


def _check_pow(x: Array, *, p: object) -> Params | None:
    return None if type(p) is float else {"p": real_scalar("pow", "p", p)}


def _pow_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    positive = x.size == 0 or bool(x.min() >= 0.25)  # fractional and negative powers need x > 0
    return {"p": draw.choice([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0] if positive else [2.0, 3.0])}


def _pow_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    return (draw.floats(draw.shape(), 0.5, 2.0),)


def _pow(x: Array, *, p: float) -> tuple[Array, Vjp]:
    """``x ** p`` for a real scalar exponent ``p``.  VJP: ``(g * p * x ** (p - 1),)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        if p == 0:
            return (np.zeros_like(x),)
        return (g * (p * x ** (p - 1)),)

    return x**p, vjp


pow = builtin(
    _pow,
    check=_check_pow,
    sample=Sample(_pow_inputs, _pow_params, fits=lambda x: True),
    torch=lambda t, x, p: x**p,
)


def _distinct_pair(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    """Two broadcasting inputs with no ties between them (a tie is a kink of max/min)."""
    shape_a, shape_b = draw.broadcastable(2)
    size_a = int(np.prod(shape_a))
    values = draw.distinct((size_a + int(np.prod(shape_b)),))
    return values[:size_a].reshape(shape_a), values[size_a:].reshape(shape_b)


def _no_ties(a: Array, b: Array) -> bool:  # pragma: no mutate block
    try:
        return bool(np.all(np.abs(a - b) >= 0.01))
    except ValueError:  # shapes that do not broadcast
        return False


def _maximum(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``max(a, b)`` with NumPy broadcasting; where ``a == b`` each gets half the
    gradient, as PyTorch.  VJP: ``(g * ([a > b] + [a == b] / 2), g * ([b > a] + [a == b] / 2))``,
    un-broadcast."""
    out = np.maximum(a, b)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        share = (a > b) + g.dtype.type(0.5) * (a == b)  # a's share of the gradient
        return (
            unbroadcast(g * share, a.shape) if needs[0] else None,
            unbroadcast(g * (1.0 - share), b.shape) if needs[1] else None,
        )

    return out, vjp


maximum = builtin(
    _maximum,
    check=partial(broadcast_check, "maximum"),
    sample=Sample(_distinct_pair, fits=_no_ties),
    torch=lambda t, a, b: t.maximum(a, b),
)


def _minimum(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``min(a, b)`` with NumPy broadcasting; ties share the gradient, as PyTorch.
    VJP: ``(g * ([a < b] + [a == b] / 2), g * ([b < a] + [a == b] / 2))``, un-broadcast."""
    out = np.minimum(a, b)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        share = (a < b) + g.dtype.type(0.5) * (a == b)
        return (
            unbroadcast(g * share, a.shape) if needs[0] else None,
            unbroadcast(g * (1.0 - share), b.shape) if needs[1] else None,
        )

    return out, vjp


minimum = builtin(
    _minimum,
    check=partial(broadcast_check, "minimum"),
    sample=Sample(_distinct_pair, fits=_no_ties),
    torch=lambda t, a, b: t.minimum(a, b),
)


def _check_where(cond: Array, a: Array, b: Array) -> None:
    try:
        np.broadcast_shapes(cond.shape, a.shape, b.shape)
    except ValueError:
        raise ShapeError(
            f"where: shapes cond {cond.shape}, a {a.shape} and b {b.shape} do not broadcast "
            "together"
        ) from None


def _where_params(draw: Draw, a: Array, b: Array) -> Params:  # pragma: no mutate block
    return {"cond": draw.bools(np.broadcast_shapes(a.shape, b.shape))}


def _where(cond: Array, a: Array, b: Array) -> tuple[Array, Vjp]:
    """``a`` where ``cond`` (a bool mask) is True, else ``b``, all three broadcast together.
    VJP: ``(None, g * cond, g * ~cond)``, un-broadcast."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        zero = np.zeros((), dtype=g.dtype)
        return (
            None,
            unbroadcast(np.where(cond, g, zero), a.shape) if needs[1] else None,
            unbroadcast(np.where(cond, zero, g), b.shape) if needs[2] else None,
        )

    return np.where(cond, a, b), vjp


where = builtin(
    _where,
    check=_check_where,
    data={"cond": "bool"},
    sample=Sample(broadcasting().inputs, _where_params, broadcasting().fits),
    torch=lambda t, cond, a, b: t.where(cond, a, b),
)


def _abs(x: Array) -> tuple[Array, Vjp]:
    """``|x|``.  VJP: ``(g * sign(x),)`` (0 at 0, as PyTorch)."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * np.sign(x),)

    return np.abs(x), vjp


abs = builtin(_abs, sample=elementwise(away=0.05), torch=lambda t, x: t.abs(x), smooth=False)


def _sqrt(x: Array) -> tuple[Array, Vjp]:
    """``sqrt(x)`` (NaN below 0, as NumPy).  VJP: ``(g / (2 out),)`` (inf at 0, as PyTorch)."""
    out = np.sqrt(x)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        with np.errstate(divide="ignore"):
            return (g / (2 * out),)

    return out, vjp


sqrt = builtin(_sqrt, sample=elementwise(low=0.25), torch=lambda t, x: t.sqrt(x))
