"""The op catalogue: every differentiable operation as ONE function over NumPy arrays.

Each op computes its forward value and returns it together with its VJP (vector-Jacobian product)
closure, ``(out, vjp)``. ``vjp(g, needs)`` takes the gradient ``g`` of the loss with respect to
``out`` and a tuple ``needs`` saying which inputs want a gradient; it returns one gradient per
input, ``None`` for every input that does not want one, so a frozen input costs nothing. The
docstring of each op states its VJP in one line. The functions here assume valid arguments:
``Graph`` methods check ids, shapes and arguments before calling them. ``OPS`` lists them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import scipy.special

__all__ = [
    "OPS",
    "Array",
    "Grads",
    "Op",
    "Vjp",
    "add",
    "cross_entropy",
    "div",
    "dropout",
    "dropout_mask",
    "exp",
    "gelu",
    "log",
    "log_softmax",
    "lora_linear",
    "matmul",
    "mean",
    "mse_loss",
    "mul",
    "neg",
    "pow",
    "relu",
    "reshape",
    "scale",
    "sigmoid",
    "softmax",
    "sub",
    "sum",
    "swap",
    "tanh",
    "transpose",
    "unbroadcast",
]

Array: TypeAlias = npt.NDArray[Any]
"""A NumPy array of the graph's floating dtype."""
Grads: TypeAlias = tuple[Array | None, ...]
"""One gradient per input of an op; ``None`` where the input wants none."""
Vjp: TypeAlias = Callable[[Array, tuple[bool, ...]], Grads]
"""``vjp(g, needs) -> grads``: the backward half of an op."""
Op: TypeAlias = Callable[..., tuple[Array, Vjp]]
"""``op(*arrays, *params) -> (out, vjp)``: an op over arrays."""

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def unbroadcast(g: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``g`` over the axes that NumPy broadcasting added or stretched, giving ``shape``."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return np.asarray(g.sum(axis=tuple(range(lead)) + stretched)).reshape(shape)


def swap(a: Array) -> Array:
    """Transpose the last two axes (``a.T`` for a matrix)."""
    return a.T if a.ndim == 2 else np.swapaxes(a, -1, -2)


# --- elementwise arithmetic with NumPy broadcasting -------------------------------------------


def add(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``a + b``.  VJP: ``(g, g)``, each un-broadcast to its input's shape."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (
            unbroadcast(g, a.shape) if needs[0] else None,
            unbroadcast(g, b.shape) if needs[1] else None,
        )

    return a + b, vjp


def sub(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``a - b``.  VJP: ``(g, -g)``, un-broadcast."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (
            unbroadcast(g, a.shape) if needs[0] else None,
            unbroadcast(-g, b.shape) if needs[1] else None,
        )

    return a - b, vjp


def mul(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``a * b``.  VJP: ``(g * b, g * a)``, un-broadcast."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (
            unbroadcast(g * b, a.shape) if needs[0] else None,
            unbroadcast(g * a, b.shape) if needs[1] else None,
        )

    return a * b, vjp


def div(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Elementwise ``a / b``.  VJP: ``(g / b, -g * a / b**2)``, un-broadcast."""
    out = a / b

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        g_over_b = g / b
        return (
            unbroadcast(g_over_b, a.shape) if needs[0] else None,
            unbroadcast(-g_over_b * out, b.shape) if needs[1] else None,  # -g a / b² = -(g / b) out
        )

    return out, vjp


def scale(x: Array, c: float) -> tuple[Array, Vjp]:
    """``c * x`` for a Python scalar ``c``.  VJP: ``(c * g,)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * c,)

    return x * c, vjp


def neg(x: Array) -> tuple[Array, Vjp]:
    """``-x``.  VJP: ``(-g,)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (-g,)

    return -x, vjp


def pow(x: Array, p: float) -> tuple[Array, Vjp]:
    """``x ** p`` for a scalar exponent ``p``.  VJP: ``(g * p * x ** (p - 1),)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        if p == 0:
            return (np.zeros_like(x),)
        return (g * (p * x ** (p - 1)),)

    return x**p, vjp


# --- linear algebra ---------------------------------------------------------------------------


def matmul(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Matrix product ``a @ b`` (NumPy rules: batched, broadcast, 1-D promoted).

    VJP: ``(g @ b.T, a.T @ g)`` over the last two axes, un-broadcast over the batch axes.
    """

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        if a.ndim == 2 and b.ndim == 2:  # the common case: (n, k) @ (k, m) -> (n, m)
            return (g @ b.T if needs[0] else None, a.T @ g if needs[1] else None)
        # Promote 1-D operands as NumPy does, so one formula covers every case.
        a2 = a[np.newaxis, :] if a.ndim == 1 else a  # (..., n, k)
        b2 = b[:, np.newaxis] if b.ndim == 1 else b  # (..., k, m)
        g2 = g[..., np.newaxis] if b.ndim == 1 else g
        g2 = g2[..., np.newaxis, :] if a.ndim == 1 else g2  # (..., n, m)
        ga = gb = None
        if needs[0]:
            ga = unbroadcast(g2 @ swap(b2), a2.shape).reshape(a.shape)
        if needs[1]:
            if b2.ndim == 2:
                # Fold the batch axes into one matrix product: (k, B*n) @ (B*n, m) -> (k, m).
                a_flat = a2.reshape(-1, a2.shape[-1])  # b has no batch axes: all are a's
                gb = (a_flat.T @ g2.reshape(-1, g2.shape[-1])).reshape(b.shape)
            else:
                gb = unbroadcast(swap(a2) @ g2, b2.shape).reshape(b.shape)
        return ga, gb

    return np.asarray(a @ b), vjp


# --- reductions and shape ---------------------------------------------------------------------


def _expand_reduced(g: Array, shape: tuple[int, ...], axis: tuple[int, ...] | None) -> Array:
    """Put back the axes a reduction removed and broadcast ``g`` to ``shape``."""
    if axis is not None and g.ndim != len(shape):
        g = np.expand_dims(g, axis)
    return np.broadcast_to(g, shape)


def sum(x: Array, axis: tuple[int, ...] | None = None, keepdims: bool = False) -> tuple[Array, Vjp]:
    """Sum over ``axis`` (normalised tuple, or ``None`` for all).  VJP: ``g`` broadcast back."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (_expand_reduced(g, x.shape, axis),)

    return np.asarray(np.sum(x, axis=axis, keepdims=keepdims)), vjp


def mean(
    x: Array, axis: tuple[int, ...] | None = None, keepdims: bool = False
) -> tuple[Array, Vjp]:
    """Mean over ``axis``.  VJP: ``g / n`` broadcast back, ``n`` the number of elements averaged."""
    count = x.size if axis is None else math.prod(x.shape[i] for i in axis)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (_expand_reduced(g / count, x.shape, axis),)

    return np.asarray(np.mean(x, axis=axis, keepdims=keepdims)), vjp


def reshape(x: Array, shape: tuple[int, ...]) -> tuple[Array, Vjp]:
    """``x.reshape(shape)``.  VJP: ``(g.reshape(x.shape),)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g.reshape(x.shape),)

    return x.reshape(shape), vjp


def transpose(x: Array, axes: tuple[int, ...] | None = None) -> tuple[Array, Vjp]:
    """``np.transpose(x, axes)``.  VJP: ``(np.transpose(g, argsort(axes)),)``."""
    inverse = None if axes is None else tuple(int(i) for i in np.argsort(axes))

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (np.transpose(g, inverse),)

    return np.transpose(x, axes), vjp


# --- elementwise nonlinearities ---------------------------------------------------------------


def relu(x: Array) -> tuple[Array, Vjp]:
    """``max(x, 0)``.  VJP: ``(g * (x > 0),)`` (the kink at 0 gets gradient 0, as in PyTorch)."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * (x > 0),)

    return np.maximum(x, 0), vjp


def tanh(x: Array) -> tuple[Array, Vjp]:
    """``tanh(x)``.  VJP: ``(g * (1 - out**2),)``."""
    out = np.tanh(x)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * (1 - out * out),)

    return out, vjp


def sigmoid(x: Array) -> tuple[Array, Vjp]:
    """``1 / (1 + exp(-x))``, overflow-free.  VJP: ``(g * out * (1 - out),)``."""
    out = scipy.special.expit(x)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * out * (1 - out),)

    return out, vjp


def exp(x: Array) -> tuple[Array, Vjp]:
    """``exp(x)``.  VJP: ``(g * out,)``."""
    out = np.exp(x)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * out,)

    return out, vjp


def log(x: Array) -> tuple[Array, Vjp]:
    """Natural logarithm.  VJP: ``(g / x,)``."""

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g / x,)

    return np.log(x), vjp


def gelu(x: Array, approximate: str = "none") -> tuple[Array, Vjp]:
    """GELU, ``x * Phi(x)`` (exact erf form) or its ``"tanh"`` approximation, as in PyTorch.

    VJP (exact): ``(g * (Phi(x) + x * phi(x)),)``; (tanh): the derivative of
    ``0.5 x (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x**3)``.
    """
    if approximate == "tanh":
        t = np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
        out = 0.5 * x * (1 + t)

        def vjp_tanh(g: Array, needs: tuple[bool, ...]) -> Grads:
            du = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
            return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du),)

        return out, vjp_tanh

    cdf = scipy.special.ndtr(x)  # Phi(x) = (1 + erf(x / sqrt 2)) / 2

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        pdf = _INV_SQRT_2PI * np.exp(-0.5 * x * x)
        return (g * (cdf + x * pdf),)

    return x * cdf, vjp


def softmax(x: Array, axis: int = -1) -> tuple[Array, Vjp]:
    """Softmax along ``axis`` (stable).  VJP: ``(out * (g - sum(g * out, axis)),)``."""
    out = scipy.special.softmax(x, axis=axis)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (out * (g - np.sum(g * out, axis=axis, keepdims=True)),)

    return out, vjp


def _log_softmax(x: Array, axis: int) -> Array:
    """``scipy.special.log_softmax``'s algorithm to the last bit, without its per-call overhead
    (about half its time on a ``(64, 10)`` array): ``x - max - log(sum(exp(x - max)))``, with a
    non-finite max taken as 0."""
    top = x.max(axis=axis, keepdims=True)
    if not np.isfinite(top).all():
        top = np.where(np.isfinite(top), top, 0.0)
    shifted = x - top
    out: Array = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    return out


def log_softmax(x: Array, axis: int = -1) -> tuple[Array, Vjp]:
    """``x - logsumexp(x, axis)`` (stable).  VJP: ``(g - exp(out) * sum(g, axis),)``."""
    out = _log_softmax(x, axis)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g - np.exp(out) * np.sum(g, axis=axis, keepdims=True),)

    return out, vjp


# --- losses -----------------------------------------------------------------------------------


def mse_loss(pred: Array, target: Array) -> tuple[Array, Vjp]:
    """``mean((pred - target)**2)``.  VJP: ``(2 g d / n, -2 g d / n)``, ``d = pred - target``."""
    diff = pred - target

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        g_pred = diff * (2.0 * float(g) / diff.size)  # g is the loss's (scalar) gradient
        return (g_pred if needs[0] else None, -g_pred if needs[1] else None)

    flat = diff.ravel()
    return np.asarray(np.dot(flat, flat) / diff.size, dtype=diff.dtype), vjp  # mean of squares


def cross_entropy(logits: Array, labels: npt.NDArray[np.integer[Any]]) -> tuple[Array, Vjp]:
    """Mean of ``-log_softmax(logits)[i, labels[i]]`` over the rows of ``logits [N, C]``.

    VJP: ``(g * (softmax(logits) - onehot(labels)) / N,)``.
    """
    n = logits.shape[0]
    rows = np.arange(n)
    logp = _log_softmax(logits, 1)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        grad = np.exp(logp)
        grad[rows, labels] -= 1
        grad *= g / n
        return (grad,)

    return np.asarray(-(logp[rows, labels].sum() / n)), vjp


def dropout_mask(
    shape: tuple[int, ...], dtype: npt.DTypeLike, p: float, rng: np.random.Generator
) -> Array:
    """The mask of inverted dropout: ``0`` with probability ``p``, else ``1 / (1 - p)``."""
    mask: Array = ((rng.random(shape) >= p) * (1.0 / (1.0 - p))).astype(dtype, copy=False)
    return mask


def dropout(x: Array, p: float, rng: np.random.Generator) -> tuple[Array, Vjp]:
    """Inverted dropout: zero each element with probability ``p``, scale the rest by ``1/(1-p)``.

    VJP: ``(g * mask / (1 - p),)`` with the same mask.
    """
    mask = dropout_mask(x.shape, x.dtype, p, rng)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * mask,)

    return x * mask, vjp


# --- fused ---------------------------------------------------------------------------------------


def _rows(v: Array) -> Array:
    """``v`` as a matrix of rows: the batch axes folded into one."""
    return v if v.ndim == 2 else v.reshape(-1, v.shape[-1])


def lora_linear(
    x: Array,
    w: Array,
    a: Array,
    b: Array,
    bias: Array | None = None,
    scaling: float = 1.0,
    mask: Array | None = None,
) -> tuple[Array, Vjp]:
    """A whole LoRA linear layer in one op: ``x @ w + ((xd @ a) * scaling) @ b (+ bias)``.

    ``x [..., in]``, ``w [in, out]``, ``a [in, r]``, ``b [r, out]``, ``bias [out]``;
    ``xd = x * mask`` (a dropout mask, scaled) or ``x``. Keeps only ``hs = (xd @ a) * scaling``
    (``[..., r]``) for backward, never ``a @ b``.
    VJP: ``(g wᵀ + (g bᵀ s) aᵀ * mask, xᵀ g, xdᵀ (g bᵀ) s, hsᵀ g, sum(g))`` over the batch.
    """
    xd = x if mask is None else x * mask
    hs = (xd @ a) * scaling  # (..., r)
    out = x @ w + hs @ b  # (..., out)
    if bias is not None:
        out += bias

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        g2 = g if g.ndim == 2 else g.reshape(-1, g.shape[-1])  # (N, out): batch axes folded
        g_h = (g2 @ b.T) * scaling if needs[0] or needs[2] else None  # (N, r)
        gx = gw = ga = gb = None
        if needs[0]:
            assert g_h is not None
            low = g_h @ a.T if mask is None else (g_h @ a.T) * _rows(mask)
            gx = (g2 @ w.T + low).reshape(x.shape)
        if needs[1]:
            gw = _rows(x).T @ g2
        if needs[2]:
            assert g_h is not None
            ga = _rows(xd).T @ g_h
        if needs[3]:
            gb = _rows(hs).T @ g2
        grads: Grads = (gx, gw, ga, gb)
        if bias is not None:
            grads += (g2.sum(axis=0) if needs[4] else None,)
        return grads

    return out, vjp


OPS: dict[str, Op] = {
    "add": add,
    "sub": sub,
    "mul": mul,
    "div": div,
    "scale": scale,
    "neg": neg,
    "pow": pow,
    "matmul": matmul,
    "sum": sum,
    "mean": mean,
    "reshape": reshape,
    "transpose": transpose,
    "relu": relu,
    "tanh": tanh,
    "sigmoid": sigmoid,
    "exp": exp,
    "log": log,
    "gelu": gelu,
    "softmax": softmax,
    "log_softmax": log_softmax,
    "mse_loss": mse_loss,
    "cross_entropy": cross_entropy,
    "dropout": dropout,
    "lora_linear": lora_linear,
}
"""Every op in the catalogue, by the name of its ``Graph`` method."""
