"""Elementwise arithmetic: ``add sub mul div`` (NumPy broadcasting, gradients un-broadcast),
``scale neg pow``."""

from __future__ import annotations

import numpy as np

from graphlora._checks import real_scalar
from graphlora.ops._core import (
    Array,
    Draw,
    Grads,
    Params,
    Sample,
    Vjp,
    broadcast_check,
    broadcasting,
    builtin,
    elementwise,
    unbroadcast,
)


@builtin(check=broadcast_check("add"), sample=broadcasting(), torch=lambda t, a, b: a + b)
def add(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``a + b``.  VJP: ``(g, g)``, each un-broadcast to its input's shape."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (
            unbroadcast(g, a.shape) if needs[0] else None,
            unbroadcast(g, b.shape) if needs[1] else None,
        )

    return a + b, vjp


@builtin(check=broadcast_check("sub"), sample=broadcasting(), torch=lambda t, a, b: a - b)
def sub(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``a - b``.  VJP: ``(g, -g)``, un-broadcast."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (
            unbroadcast(g, a.shape) if needs[0] else None,
            unbroadcast(-g, b.shape) if needs[1] else None,
        )

    return a - b, vjp


@builtin(check=broadcast_check("mul"), sample=broadcasting(), torch=lambda t, a, b: a * b)
def mul(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``a * b``.  VJP: ``(g * b, g * a)``, un-broadcast."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (
            unbroadcast(g * b, a.shape) if needs[0] else None,
            unbroadcast(g * a, b.shape) if needs[1] else None,
        )

    return a * b, vjp


@builtin(check=broadcast_check("div"), sample=broadcasting(away_b=0.5), torch=lambda t, a, b: a / b)
def div(a: Array, b: Array) -> tuple[Array, Vjp]:
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


def _check_scale(x: Array, *, c: object) -> Params | None:
    return None if type(c) is float else {"c": real_scalar("scale", "c", c)}


def _scale_params(draw: Draw, x: Array) -> Params:
    return {"c": draw.choice([-1.5, -0.5, 0.5, 2.0])}


@builtin(check=_check_scale, sample=elementwise(params=_scale_params), torch=lambda t, x, c: x * c)
def scale(x: Array, *, c: float) -> tuple[Array, Vjp]:
    """``c * x`` for a real scalar ``c``.  VJP: ``(c * g,)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * c,)

    return x * c, vjp


@builtin(sample=elementwise(), torch=lambda t, x: -x)
def neg(x: Array) -> tuple[Array, Vjp]:
    """``-x``.  VJP: ``(-g,)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (-g,)

    return -x, vjp


def _check_pow(x: Array, *, p: object) -> Params | None:
    return None if type(p) is float else {"p": real_scalar("pow", "p", p)}


def _pow_params(draw: Draw, x: Array) -> Params:
    positive = x.size == 0 or bool(x.min() >= 0.25)  # fractional and negative powers need x > 0
    return {"p": draw.choice([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0] if positive else [2.0, 3.0])}


def _pow_inputs(draw: Draw) -> tuple[Array | None, ...]:
    return (draw.floats(draw.shape(), 0.5, 2.0),)


@builtin(
    check=_check_pow,
    sample=Sample(_pow_inputs, _pow_params, fits=lambda x: True),
    torch=lambda t, x, p: x**p,
)
def pow(x: Array, *, p: float) -> tuple[Array, Vjp]:
    """``x ** p`` for a real scalar exponent ``p``.  VJP: ``(g * p * x ** (p - 1),)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        if p == 0:
            return (np.zeros_like(x),)
        return (g * (p * x ** (p - 1)),)

    return x**p, vjp
