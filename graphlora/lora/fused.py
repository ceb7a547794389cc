"""``lora_linear``: a whole LoRA linear layer, ``x @ W + bias + ((drop(x) @ A) * s) @ B``, one op.

It is recorded with ``graph.apply`` like any user op (the engine knows nothing of LoRA), keeps
only the ``[..., rank]`` bottleneck for backward, and is checked by the same registry-driven tests
as the built-in ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphlora import _checks, blas
from graphlora.errors import ShapeError
from graphlora.ops import (
    Array,
    Draw,
    Grads,
    Params,
    Sample,
    Vjp,
    column_sum,
    dropout_mask,
    op,
)
from graphlora.ops.linalg import dot, rows

__all__ = ["lora_linear"]


def _check_lora_linear(
    x: Array,
    w: Array,
    a: Array,
    b: Array,
    bias: Array | None = None,
    *,
    scaling: object = 1.0,
    mask: object = None,
    dropout: object = 0.0,
    rng: object = None,
) -> Params | None:
    where = "lora_linear"
    try:
        (n_in, n_out), (a_in, rank), (b_rank, b_out) = w.shape, a.shape, b.shape
        fits = x.shape[-1] == n_in == a_in and rank == b_rank and b_out == n_out
    except (ValueError, IndexError):  # not matrices, or a 0-d x
        fits = False
    if not fits:
        raise ShapeError(
            f"{where}: shapes do not fit x [..., in], w [in, out], a [in, r], b [r, out]: "
            f"x {x.shape}, w {w.shape}, a {a.shape}, b {b.shape}"
        )
    if bias is not None and bias.shape != (n_out,):
        raise ShapeError(f"{where}: bias has shape {bias.shape}, expected ({n_out},)")
    if type(scaling) is float and dropout == 0.0 and mask is None and rng is None:
        return None  # the layer's usual call: nothing to convert
    p = _checks.probability(where, "dropout", dropout)
    if p > 0.0 and mask is not None:
        raise ValueError(f"{where}: give a dropout mask or a dropout probability, not both")
    mask_array = None
    if mask is not None:
        mask_array = np.asarray(mask, dtype=x.dtype)
        if mask_array.shape != x.shape:
            raise ShapeError(f"{where}: mask has shape {mask_array.shape}, x has shape {x.shape}")
    return {
        "scaling": _checks.real_scalar(where, "scaling", scaling),
        "mask": mask_array,
        "dropout": p,
        "rng": _checks.check_rng(where, rng),  # refused even without dropout, as attention
    }


def _lora_linear_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    batch = draw.choice([(), (3,), (2, 2)])
    n_in, n_out, rank = draw.shape(min_dims=3, max_dims=3, min_side=1, max_side=4)
    bias = draw.floats((n_out,)) if draw.choice([False, True]) else None
    shapes = [(*batch, n_in), (n_in, n_out), (n_in, rank), (rank, n_out)]
    return (*(draw.floats(shape) for shape in shapes), bias)


def _lora_linear_params(
    draw: Draw, x: Array, *weights: Array | None
) -> Params:  # pragma: no mutate block
    params: Params = {"scaling": draw.choice([0.5, 2.0])}
    if draw.choice([False, True]):
        params["mask"] = draw.bools(x.shape) * 2.0  # inverted dropout with p = 0.5
    return params


def _torch_lora_linear(
    t: Any, x: Any, w: Any, a: Any, b: Any, bias: Any = None, *, scaling: float, mask: Any = None
) -> Any:  # pragma: no mutate block
    xd = x if mask is None else x * t.from_numpy(mask)
    out = x @ w if bias is None else x @ w + bias
    return out + ((xd @ a) * scaling) @ b


def _lora_linear(
    x: Array,
    w: Array,
    a: Array,
    b: Array,
    bias: Array | None = None,
    *,
    scaling: float = 1.0,
    mask: Array | None = None,
    dropout: float = 0.0,
    rng: _checks.Rng = None,
) -> tuple[Array, Vjp]:
    """A LoRA linear layer as one op: ``x @ w (+ bias) + ((xd @ a) * scaling) @ b``.

    ``x [..., in]``, ``w [in, out]``, ``a [in, r]``, ``b [r, out]``, ``bias [out]``; ``xd`` is
    ``x * mask`` (a scaled dropout mask of ``x``'s shape), or ``x`` with a fresh dropout mask
    drawn from ``rng`` when ``dropout > 0`` (drawn again on each run of a compiled step; the
    caller decides whether to pass a ``dropout``: ``LoraLinear`` passes none under ``no_grad``).
    The same maths as ``LoraLinear.forward``'s separate ops, in one node: fewer Python calls, and
    only the ``[..., r]`` bottleneck ``hs = (xd @ a) * scaling`` kept for backward, never ``a @ b``.
    Record it with ``graph.apply(lora_linear, x, w, a, b, bias, scaling=...)``.
    VJP: ``(g wᵀ + (g bᵀ s) aᵀ * mask, xᵀ g, xdᵀ (g bᵀ) s, hsᵀ g, sum(g))``, the batch axes
    folded into the rows.
    """
    if dropout > 0.0:
        mask = dropout_mask(x.shape, x.dtype, dropout, rng)
    xd = x if mask is None else x * mask
    batched = x.ndim != 2  # batch axes, folded into the rows for one matrix product, as linear
    x2, xd2 = (rows(x), rows(xd)) if batched else (x, xd)  # (N, in)
    work = x.size * w.shape[1]  # multiply-adds of x @ w, for the BLAS threads
    blas.fit(work)
    hs = dot(xd2, a) * scaling  # (N, r)
    out = dot(x2, w)  # (N, out)
    if bias is not None:
        out += bias
    out += dot(hs, b)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        blas.fit(work)
        g2 = rows(g) if batched else g  # (N, out)
        g_h = dot(g2, b.T) * scaling if needs[0] or needs[2] else None  # (N, r)
        gx = gw = ga = gb = gbias = None
        if needs[0]:
            assert g_h is not None
            low = dot(g_h, a.T)
            if mask is not None:
                low *= rows(mask)
            gx = dot(g2, w.T)
            gx += low
            gx = gx.reshape(x.shape)
        if needs[1]:
            gw = dot(x2.T, g2)
        if needs[2]:
            assert g_h is not None
            ga = dot(xd2.T, g_h)
        if needs[3]:
            gb = dot(hs.T, g2)
        if needs[4]:  # False when there is no bias
            gbias = column_sum(g2)
        return gx, gw, ga, gb, gbias

    return (out.reshape(*x.shape[:-1], w.shape[1]) if batched else out), vjp


lora_linear = op(
    check=_check_lora_linear,
    sample=Sample(_lora_linear_inputs, _lora_linear_params),
    torch=_torch_lora_linear,
)(_lora_linear)
