"""Elementwise nonlinearities and normalised exponentials: ``relu tanh sigmoid exp log softplus
silu erf gelu``, ``softmax log_softmax`` (along one axis, numerically stable)."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import scipy.special

from graphlora._checks import one_axis
from graphlora.ops.kernels import block_length, blocks
from graphlora.ops.registry import Array, Grads, Params, Vjp, builtin
from graphlora.ops.sampling import Draw, elementwise

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _relu(x: Array) -> tuple[Array, Vjp]:
    """``max(x, 0)``.  VJP: ``(g * (x > 0),)`` (the kink at 0 gets gradient 0, as in PyTorch)."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * (x > 0),)

    return np.maximum(x, 0), vjp


relu = builtin(_relu, sample=elementwise(away=0.05), torch=lambda t, x: t.relu(x), smooth=False)


def _tanh(x: Array) -> tuple[Array, Vjp]:
    """``tanh(x)``.  VJP: ``(g * (1 - out**2),)``."""
    out = np.tanh(x)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * (1 - out * out),)

    return out, vjp


tanh = builtin(_tanh, sample=elementwise(), torch=lambda t, x: t.tanh(x))


def _sigmoid(x: Array) -> tuple[Array, Vjp]:
    """``1 / (1 + exp(-x))``, overflow-free.  VJP: ``(g * out * (1 - out),)``."""
    out = scipy.special.expit(x)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * out * (1 - out),)

    return out, vjp


sigmoid = builtin(_sigmoid, sample=elementwise(), torch=lambda t, x: t.sigmoid(x))


def _exp(x: Array) -> tuple[Array, Vjp]:
    """``exp(x)``.  VJP: ``(g * out,)``."""
    out = np.exp(x)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * out,)

    return out, vjp


exp = builtin(_exp, sample=elementwise(high=3.0), torch=lambda t, x: t.exp(x))


def _log(x: Array) -> tuple[Array, Vjp]:
    """Natural logarithm (``x <= 0`` gives NaN or -inf, as in NumPy).  VJP: ``(g / x,)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g / x,)

    return np.log(x), vjp


log = builtin(_log, sample=elementwise(low=0.25), torch=lambda t, x: t.log(x))


def _softplus(x: Array) -> tuple[Array, Vjp]:
    """``log(1 + exp(x))``, computed stably (PyTorch returns ``x`` itself above 20, which
    differs by under 2.1e-9).  VJP: ``(g * sigmoid(x),)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * scipy.special.expit(x),)

    return np.logaddexp(0.0, x), vjp


softplus = builtin(_softplus, sample=elementwise(), torch=lambda t, x: t.nn.functional.softplus(x))


def _silu(x: Array) -> tuple[Array, Vjp]:
    """SiLU (swish), ``x * sigmoid(x)``.
    VJP: ``(g * s * (1 + x (1 - s)),)`` with ``s = sigmoid(x)``."""
    s = scipy.special.expit(x)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * (s * (1 + x * (1 - s))),)

    return x * s, vjp


silu = builtin(_silu, sample=elementwise(), torch=lambda t, x: t.nn.functional.silu(x))


def _erf(x: Array) -> tuple[Array, Vjp]:
    """The error function.  VJP: ``(g * 2 / sqrt(pi) * exp(-x**2),)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * (_TWO_OVER_SQRT_PI * np.exp(-(x * x))),)

    return scipy.special.erf(x), vjp


erf = builtin(_erf, sample=elementwise(), torch=lambda t, x: t.erf(x))


def _check_gelu(x: Array, *, approximate: object = "none") -> Params:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return {"approximate": approximate}


def _gelu_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    return {"approximate": draw.choice(["none", "tanh"])}


def _gelu(x: Array, *, approximate: str) -> tuple[Array, Vjp]:  # always given by the check
    """GELU, ``x * Phi(x)`` (exact erf form) or its ``"tanh"`` approximation, as in PyTorch.

    VJP (exact): ``(g * (Phi(x) + x * phi(x)),)``; (tanh): the derivative of
    ``0.5 x (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x**3)``.
    """
    # Written with in-place passes over one or two buffers: at transformer sizes these arrays
    # are megabytes, and each temporary NumPy makes costs a pass and an allocation.
    if approximate == "tanh":
        # h = (1 + tanh(u)) / 2 with u = sqrt(2/pi) (x + 0.044715 x**3), so that out = x h, and
        # backward needs h alone: 1 - tanh(u)**2 = 4 h (1 - h). h is the logistic 1 / (1 +
        # exp(-2u)), which is tanh's identity: NumPy's float32 exp costs half its tanh on a CPU
        # with AVX2 but not AVX-512 (the forward: a third less), and h keeps its precision where
        # tanh(u) is near -1. Flat, and block by block, so that each block stays in cache
        # through the passes.
        flat = x.reshape(-1)
        h, out = np.empty_like(flat), np.empty_like(flat)
        with np.errstate(over="ignore"):  # exp(-2u) = inf: h = 0, as 1 + tanh(u) = 0
            for block in blocks(flat):
                xb, hb = flat[block], h[block]
                np.square(xb, out=hb)  # becomes -2u, then h, in place
                hb *= -2 * _SQRT_2_OVER_PI * 0.044715
                hb -= 2 * _SQRT_2_OVER_PI
                hb *= xb
                np.exp(hb, out=hb)
                hb += 1.0
                np.reciprocal(hb, out=hb)
                np.multiply(xb, hb, out=out[block])

        def vjp_tanh(g: Array, needs: tuple[bool, ...]) -> Grads:
            # d(x h)/dx = h + x 2 h (1 - h) du/dx, du/dx = sqrt(2/pi) (1 + 3 0.044715 x**2)
            g_flat = g.reshape(-1)
            grad = np.empty_like(flat)
            spare = np.empty_like(flat[: block_length(flat)])  # one block's scratch, reused
            for block in blocks(flat):
                xb, hb, gb = flat[block], h[block], grad[block]
                x_du = np.square(xb, out=spare[: xb.size])  # becomes 2 x du/dx
                x_du *= 2 * _SQRT_2_OVER_PI * 3 * 0.044715
                x_du += 2 * _SQRT_2_OVER_PI
                x_du *= xb
                np.subtract(1.0, hb, out=gb)  # becomes h + h (1 - h) 2 x du/dx, in place
                gb *= hb
                gb *= x_du
                gb += hb
                gb *= g_flat[block]
            return (grad.reshape(x.shape),)

        return out.reshape(x.shape), vjp_tanh

    cdf = scipy.special.ndtr(x)  # Phi(x) = (1 + erf(x / sqrt 2)) / 2

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        grad = np.square(x, out=np.empty_like(x))  # becomes Phi(x) + x phi(x)
        grad *= -0.5
        np.exp(grad, out=grad)
        grad *= _INV_SQRT_2PI
        grad *= x
        grad += cdf
        grad *= g
        return (grad,)

    return x * cdf, vjp


gelu = builtin(
    _gelu,
    check=_check_gelu,
    sample=elementwise(params=_gelu_params),
    torch=lambda t, x, approximate: t.nn.functional.gelu(x, approximate=approximate),
)


def _check_axis(name: str, x: Array, *, axis: object = -1) -> None:
    one_axis(name, axis, x.shape)  # a valid axis; negative ones are NumPy's to read


def _axis_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    return {"axis": draw.choice(list(range(-x.ndim, x.ndim)))}


def _softmax(x: Array, *, axis: int = -1) -> tuple[Array, Vjp]:
    """Softmax along ``axis`` (stable).  VJP: ``(out * (g - sum(g * out, axis)),)``."""
    if x.shape[axis] == 0:
        out = x.copy()
    else:  # scipy.special.softmax's algorithm, without its per-call overhead
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        out = e / e.sum(axis=axis, keepdims=True)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (out * (g - np.sum(g * out, axis=axis, keepdims=True)),)

    return out, vjp


softmax = builtin(
    _softmax,
    check=partial(_check_axis, "softmax"),
    sample=elementwise(min_dims=1, params=_axis_params),
    torch=lambda t, x, axis: t.softmax(x, dim=axis),
)


def log_softmax_parts(x: Array, axis: int) -> tuple[Array, Array, Array]:
    """``scipy.special.log_softmax``'s algorithm to the last bit, without its per-call overhead
    (about half its time on a ``(64, 10)`` array): ``out = x - max - log(total)`` with ``total =
    sum(exp(x - max))`` and a non-finite max taken as 0; returns ``out``, ``exp(x - max)`` and
    ``total``, so that a caller that needs the softmax too divides instead of taking exp again."""
    if x.shape[axis] == 0:
        return x.copy(), x.copy(), x.sum(axis=axis, keepdims=True)  # zeros
    top = x.max(axis=axis, keepdims=True)
    if not np.isfinite(top).all():
        top = np.where(np.isfinite(top), top, 0.0)
    out: Array = x - top
    exps = np.exp(out)
    total = exps.sum(axis=axis, keepdims=True)
    out -= np.log(total)
    return out, exps, total


def stable_log_softmax(x: Array, axis: int) -> Array:
    """``log_softmax_parts``'s ``out``: ``x - logsumexp(x, axis)``, as scipy to the last bit."""
    return log_softmax_parts(x, axis)[0]


def _log_softmax(x: Array, *, axis: int = -1) -> tuple[Array, Vjp]:
    """``x - logsumexp(x, axis)`` (stable).  VJP: ``(g - exp(out) * sum(g, axis),)``."""
    out = stable_log_softmax(x, axis)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g - np.exp(out) * np.sum(g, axis=axis, keepdims=True),)

    return out, vjp


log_softmax = builtin(
    _log_softmax,
    check=partial(_check_axis, "log_softmax"),
    sample=elementwise(min_dims=1, params=_axis_params),
    torch=lambda t, x, axis: t.log_softmax(x, dim=axis),
)
