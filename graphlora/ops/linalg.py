"""Linear algebra: ``matmul`` (2-D, batched with broadcast batch axes, 1-D promoted as NumPy) and
``linear`` (a dense layer, ``x @ weight + bias``, as one op)."""

from __future__ import annotations

import math

import numpy as np

from graphlora import blas
from graphlora.errors import ShapeError
from graphlora.ops.kernels import column_sum, swap, unbroadcast
from graphlora.ops.registry import Array, Grads, Vjp, builtin
from graphlora.ops.sampling import Draw, Sample

dot = np.ndarray.dot
"""The product of two matrices (arrays, not scalars): ``ndarray.dot``, the BLAS product ``@``
calls, without the ufunc dispatch ``@`` goes through, nor the ``__array_function__`` dispatch
``np.dot`` goes through (about 0.4 and 0.2 us a call: at small sizes, half a product's time)."""


def rows(v: Array) -> Array:
    """``v`` as a matrix of rows: every axis but the last folded into one (sizes may be 0)."""
    return v if v.ndim == 2 else v.reshape(math.prod(v.shape[:-1]), v.shape[-1])


def _check_matmul(a: Array, b: Array) -> None:
    shape_a, shape_b = a.shape, b.shape
    if len(shape_a) == 2 and len(shape_b) == 2 and shape_a[1] == shape_b[0]:
        return  # two matrices that fit: the common case, decided in a few reads
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(
            f"matmul: cannot multiply {a.shape} by {b.shape}: operands must have at least "
            "one axis (use scale or mul for scalars)"
        )
    inner_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if a.shape[-1] != inner_b:
        raise ShapeError(
            f"matmul: cannot multiply {a.shape} by {b.shape}: inner dimensions "
            f"{a.shape[-1]} != {inner_b}"
        )
    if a.ndim > 2 and b.ndim > 2:  # only then are there batch axes on both sides
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])  # a few microseconds: not for matrices
        except ValueError:
            raise ShapeError(
                f"matmul: cannot multiply {a.shape} by {b.shape}: batch axes "
                f"{a.shape[:-2]} and {b.shape[:-2]} do not broadcast together"
            ) from None


def _matmul_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    n, k, m = draw.shape(min_dims=3, max_dims=3)
    batch_a, batch_b = draw.broadcastable(2, max_dims=2)
    a_shape: tuple[int, ...] = (*batch_a, n, k)
    b_shape: tuple[int, ...] = (*batch_b, k, m)
    form = draw.choice(["matrices", "vector @ matrix", "matrix @ vector"])
    if form == "vector @ matrix":
        a_shape = (k,)
    elif form == "matrix @ vector":
        b_shape = (k,)
    return draw.floats(a_shape), draw.floats(b_shape)


def _matmul_fits(a: Array, b: Array) -> bool:  # pragma: no mutate block
    return 1 <= a.ndim <= 2 and 1 <= b.ndim <= 2 and a.shape[-1] == b.shape[-2 if b.ndim > 1 else 0]


def _matmul(a: Array, b: Array) -> tuple[Array, Vjp]:
    """Matrix product ``a @ b`` (NumPy rules: batched, broadcast, 1-D promoted).

    VJP: ``(g @ b.T, a.T @ g)`` over the last two axes, un-broadcast over the batch axes.
    Two matrices are multiplied with ``ndarray.dot``: the same BLAS product as ``@``, reached in
    about half the time at small sizes (``@`` goes through the ufunc machinery).
    """
    if a.ndim == 2 and b.ndim == 2:  # the common case: (n, k) @ (k, m) -> (n, m)
        work = a.size * b.shape[1]  # multiply-adds, for the BLAS threads
        blas.fit(work)

        def matrices_vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
            blas.fit(work)
            return (dot(g, b.T) if needs[0] else None, dot(a.T, g) if needs[1] else None)

        return dot(a, b), matrices_vjp
    folded = a.ndim > 2 and b.ndim == 2  # (..., n, k) @ (k, m): one matrix product of rows
    work = a.size * b.shape[-1] if b.ndim > 1 else a.size
    blas.fit(work)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        blas.fit(work)
        if folded:  # the batch axes folded into the rows: one BLAS call each, not one a batch
            g_rows = rows(g)  # (N, m)
            return (
                dot(g_rows, b.T).reshape(a.shape) if needs[0] else None,
                dot(rows(a).T, g_rows) if needs[1] else None,
            )
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
                gb = dot(rows(a2).T, rows(g2)).reshape(b.shape)  # b has no batch axes: all a's
            else:
                gb = unbroadcast(swap(a2) @ g2, b.shape)  # b batched: b2 is b
        return ga, gb

    if folded:
        return dot(rows(a), b).reshape(*a.shape[:-1], b.shape[1]), vjp
    return np.asarray(a @ b), vjp


matmul = builtin(
    _matmul,
    check=_check_matmul,
    sample=Sample(_matmul_inputs, fits=_matmul_fits),
    torch=lambda t, a, b: t.matmul(a, b),
)


def check_dense(name: str, x: Array, weight_shape: tuple[int, ...]) -> None:
    """Refuse a weight that is not ``[in, out]`` with ``in`` = ``x``'s last axis (or a 0-d x),
    naming the op ``name`` and both shapes: the check of ``linear`` and of other dense ops."""
    if x.ndim == 0 or len(weight_shape) != 2 or x.shape[-1] != weight_shape[0]:
        raise ShapeError(
            f"{name}: x {x.shape} needs a weight [in, out] with in = x's last axis, got "
            f"{weight_shape}"
        )


def _check_linear(x: Array, weight: Array, bias: Array | None = None) -> None:
    check_dense("linear", x, weight.shape)
    if bias is not None and bias.shape != weight.shape[1:]:
        raise ShapeError(
            f"linear: bias has shape {bias.shape}; the weight {weight.shape} needs "
            f"{weight.shape[1:]}"
        )


def _linear_fits(x: Array, weight: Array) -> bool:  # pragma: no mutate block
    return x.ndim >= 1 and weight.ndim == 2 and weight.shape[0] == x.shape[-1]


def _linear_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    *batch, n_in, n_out = draw.shape(min_dims=2, max_dims=4)
    bias = draw.floats((n_out,)) if draw.choice([False, True]) else None
    return draw.floats((*batch, n_in)), draw.floats((n_in, n_out)), bias


def _linear(x: Array, weight: Array, bias: Array | None = None) -> tuple[Array, Vjp]:
    """A dense layer as one op, ``x @ weight + bias``: ``x [..., in]``, ``weight [in, out]``
    (graphlora's layout; PyTorch's ``F.linear`` takes ``[out, in]``), ``bias [out]``. One
    matrix product over every row at once, the bias added in place.

    VJP: ``(g weightᵀ, xᵀ g, sum(g))``, the batch axes folded into the rows.
    """
    work = x.size * weight.shape[1]  # multiply-adds, for the BLAS threads
    blas.fit(work)
    out = dot(rows(x), weight)  # (N, out)
    if bias is not None:
        out += bias

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        blas.fit(work)
        g2 = rows(g)  # (N, out)
        gx = dot(g2, weight.T).reshape(x.shape) if needs[0] else None
        gw = dot(rows(x).T, g2) if needs[1] else None
        gb = column_sum(g2) if needs[2] else None
        return gx, gw, gb

    return out.reshape(*x.shape[:-1], weight.shape[1]), vjp


linear = builtin(
    _linear,
    check=_check_linear,
    sample=Sample(_linear_inputs, fits=_linear_fits),
    torch=lambda t, x, weight, bias=None: t.nn.functional.linear(x, weight.T, bias),
)
