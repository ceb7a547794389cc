"""Attention as one fused op: ``scaled_dot_product_attention``, and ``qkv_attention``, the same
over the heads of a packed ``q | k | v`` projection."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from graphlora import blas
from graphlora._checks import Rng, check_rng, flag, positive_int, probability, real_scalar
from graphlora.errors import ShapeError
from graphlora.ops.kernels import row_sum, swap, unbroadcast
from graphlora.ops.registry import Array, Grads, Params, Vjp, builtin
from graphlora.ops.regularization import dropout_mask
from graphlora.ops.sampling import Draw, Sample


def _check_attention(
    where: str,
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    *,
    causal: object = False,
    scale: object = None,
    dropout: object = 0.0,
    rng: object = None,
) -> Params:
    shapes = f"q {q.shape}, k {k.shape}, v {v.shape}"
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ShapeError(f"{where}: q, k and v must be [..., T, d], got {shapes}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ShapeError(
            f"{where}: shapes do not fit q [..., Tq, d], k [..., Tk, d], v [..., Tk, dv]: {shapes}"
        )
    try:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ShapeError(f"{where}: the batch axes do not broadcast together: {shapes}") from None
    if mask is not None:
        try:
            np.broadcast_shapes(mask.shape, (*batch, q.shape[-2], k.shape[-2]))
        except ValueError:
            raise ShapeError(
                f"{where}: mask of shape {mask.shape} does not broadcast to [..., Tq, Tk] = "
                f"{(*batch, q.shape[-2], k.shape[-2])}"
            ) from None
    if scale is not None:
        scale = real_scalar(where, "scale", scale)
        if not math.isfinite(scale):
            raise ValueError(f"{where}: scale must be finite, got {scale}")
    p = probability(where, "dropout", dropout)
    return {
        "causal": flag(where, "causal", causal),
        "scale": scale,
        "dropout": p,
        "rng": check_rng(where, rng),  # refused even without dropout: a typo shows at once
    }


def _attention_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    batch = draw.shape(max_dims=2, max_side=2)
    tq, tk, d, dv = draw.shape(min_dims=4, max_dims=4, max_side=3)
    return (
        draw.floats((*batch, tq, d)),
        draw.floats((*batch, tk, d)),
        draw.floats((*batch, tk, dv)),
    )


def _attention_fits(q: Array, k: Array, v: Array) -> bool:  # pragma: no mutate block
    if min(q.ndim, k.ndim, v.ndim) < 2 or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        return False
    try:
        np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        return False
    return True


def _attention_params(
    draw: Draw, q: Array, k: Array, v: Array
) -> Params:  # pragma: no mutate block
    params: Params = {
        "causal": draw.choice([False, True]),
        "scale": draw.choice([None, 0.5]),
    }
    if draw.choice([False, True]):
        params["mask"] = draw.bools((q.shape[-2], k.shape[-2]))
    return params


def _torch_attention(
    t: Any, q: Any, k: Any, v: Any, mask: Any = None, causal: bool = False, scale: Any = None
) -> Any:  # pragma: no mutate block
    if causal:  # PyTorch takes a mask or is_causal, not both: fold the causal part in
        tril = t.ones(q.shape[-2], k.shape[-2], dtype=t.bool).tril()
        mask = tril if mask is None else mask & tril
    return t.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _causal_bias(keys: int, queries: int, dtype: np.dtype[Any]) -> Array:
    """The causal mask as ``[Tk, Tq]`` scores to add: -inf where key ``j`` is dropped for query
    ``i`` (``j > i``, below the diagonal), else 0; read-only."""
    bias = np.zeros((keys, queries), dtype)
    bias[np.tri(keys, queries, -1, dtype=bool)] = -np.inf
    bias.flags.writeable = False
    return bias


# Kept for the next call of the same sizes (a model calls with one T throughout), as nanoGPT keeps
# its ``bias`` buffer. Wrapped here, not decorated, so that mutation testing reaches the function.
_cached_causal_bias = functools.lru_cache(maxsize=8)(_causal_bias)


def _scaled_dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    *,
    causal: bool,
    scale: float | None,
    dropout: float,
    rng: Rng,
) -> tuple[Array, Vjp]:  # the keywords' defaults are the check's, which always gives them
    """Attention ``softmax(q kᵀ * scale + masked) v`` for ``q [..., Tq, d]``, ``k [..., Tk, d]``,
    ``v [..., Tk, dv]`` (batch axes broadcast): ``[..., Tq, dv]``.

    ``scale`` defaults to ``1 / sqrt(d)``. ``mask`` (bool, broadcast to ``[..., Tq, Tk]``) keeps
    the scores where it is True; ``causal`` keeps key ``j`` for query ``i`` only if ``j <= i``
    (top-left aligned, as PyTorch's ``is_causal``); both may be given. A dropped score has -inf
    added, as in PyTorch, so a dropped NaN or +inf score still makes its query's output NaN. A
    query that keeps no key gets zeros, and no gradient, as in PyTorch. With ``dropout``, the
    attention weights are dropped out (inverted, a mask drawn from ``rng`` as ``dropout`` draws
    it), as PyTorch's ``dropout_p``. Keeps only the attention weights ``P`` (and the mask) for
    backward, besides the output, which the graph holds anyway.
    VJP: ``gv = Pᵀ g``; ``gS = P (g vᵀ - rowsum(P g vᵀ))``, where ``rowsum(P g vᵀ) =
    rowsum(g out)`` is computed the cheaper way; ``gq = gS k s``; ``gk = gSᵀ q s``.
    """
    s = (1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0) if scale is None else scale
    # The scores are kept transposed, [..., Tk, Tq], one buffer worked on in place: the softmax
    # then reduces over axis -2, which NumPy does as whole-row passes, several times faster than
    # along the short last axis; BLAS reads the transposes in the products without a copy.
    work = q.size * k.shape[-2]  # multiply-adds of the scores, for the BLAS threads
    blas.fit(work)
    with np.errstate(invalid="ignore", over="ignore"):  # inf and NaN as in PyTorch, silently
        scores = k @ swap(q)  # (..., Tk, Tq)
        scores *= s
        # A dropped score has -inf added, as PyTorch masks: -inf where the score is finite or -inf,
        # NaN where it is NaN or +inf, which then makes the query's output NaN, as there.
        if mask is not None:  # a [Tk] mask: [1, Tk]
            np.add(scores, -np.inf, out=scores, where=~swap(np.atleast_2d(mask)))
        if causal:
            scores += _cached_causal_bias(k.shape[-2], q.shape[-2], scores.dtype)
        if scores.shape[-2]:
            # fmax, faster than max, skips NaN; a query holding NaN comes out all NaN either way
            top = np.fmax.reduce(scores, axis=-2, keepdims=True)  # (..., 1, Tq)
            kept_none = top == -np.inf  # a query that keeps nothing: all -inf (+inf, NaN: stay)
            if kept_none.any():
                top[kept_none] = 0.0
            scores -= top
            weights = np.exp(scores, out=scores)
            total = np.ones((1, weights.shape[-2]), dtype=weights.dtype) @ weights  # sums over keys
            empty = total == 0  # a NaN total stays, and makes its query's weights NaN
            if empty.any():
                total[empty] = 1.0  # a query that keeps nothing: its weights stay all zeros
            weights /= total
        else:
            weights = scores  # no keys at all: an empty row, and zeros out
        drop = None
        if dropout > 0.0:  # drawn as [Tq, Tk]
            drop = swap(dropout_mask(swap(weights).shape, weights.dtype, dropout, rng))
        used = weights if drop is None else weights * drop  # (..., Tk, Tq)
        out = swap(used) @ v  # (..., Tq, dv)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        blas.fit(work)
        gq = gk = gv = None
        with np.errstate(invalid="ignore", over="ignore"):
            if needs[2]:
                gv = unbroadcast(used @ g, v.shape)
            if needs[0] or needs[1]:
                gs = v @ swap(g)  # (..., Tk, Tq): dL/d(used), then dL/d(scores) in place
                if drop is not None:
                    gs *= drop
                # rowsum(P * gs) = rowsum(g * out): a [Tq, dv] product instead of a [Tq, Tk] one
                gs -= swap(row_sum(g * out))
                gs *= weights
                gs *= s
                if needs[0]:
                    gq = unbroadcast(swap(gs) @ k, q.shape)
                if needs[1]:
                    gk = unbroadcast(gs @ q, k.shape)
        return gq, gk, gv, None

    return out, vjp


scaled_dot_product_attention = builtin(
    _scaled_dot_product_attention,
    check=functools.partial(_check_attention, "scaled_dot_product_attention"),
    data={"mask": "bool"},
    sample=Sample(_attention_inputs, _attention_params, fits=_attention_fits),
    torch=_torch_attention,
)


def heads(qkv: Array, n_head: int) -> tuple[Array, Array, Array]:
    """``q, k, v`` of a packed ``[..., T, 3C]`` projection (``q | k | v``, each with its heads
    side by side, as GPT-2's ``c_attn`` makes them), as ``[..., n_head, T, C / n_head]`` views."""
    *lead, t, width = qkv.shape
    split = qkv.reshape(*lead, t, 3, n_head, width // (3 * n_head))
    q, k, v = (np.swapaxes(split[..., i, :, :], -2, -3) for i in range(3))
    return q, k, v


def _check_qkv_attention(
    qkv: Array,
    mask: Array | None = None,
    *,
    n_head: object,
    causal: object = False,
    scale: object = None,
    dropout: object = 0.0,
    rng: object = None,
) -> Params:
    where = "qkv_attention"
    count = positive_int(where, "n_head", n_head)
    if qkv.ndim < 2 or qkv.shape[-1] % (3 * count):
        raise ShapeError(
            f"{where}: qkv must be [..., T, 3C] with C a multiple of n_head {count}, got "
            f"{qkv.shape}"
        )
    params = _check_attention(
        where, *heads(qkv, count), mask, causal=causal, scale=scale, dropout=dropout, rng=rng
    )
    return {"n_head": count, **params}


def _qkv_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    batch = draw.shape(max_dims=2, max_side=2)
    t, n_head, d = draw.shape(min_dims=3, max_dims=3, max_side=3)
    return (draw.floats((*batch, t, 3 * max(n_head, 1) * d)),)


def _qkv_fits(qkv: Array) -> bool:  # pragma: no mutate block
    return qkv.ndim >= 2 and qkv.shape[-1] % 3 == 0


def _qkv_params(draw: Draw, qkv: Array) -> Params:  # pragma: no mutate block
    width = qkv.shape[-1] // 3
    n_head = draw.choice([n for n in range(1, 4) if width % n == 0])
    return {"n_head": n_head, **_attention_params(draw, *heads(qkv, n_head))}


def _torch_qkv_attention(
    t: Any,
    qkv: Any,
    mask: Any = None,
    n_head: int = 1,
    causal: bool = False,
    scale: Any = None,
) -> Any:  # pragma: no mutate block
    *lead, tokens, width = qkv.shape
    c = width // 3

    def split_heads(y: Any) -> Any:  # as transformers' GPT-2: view, then transpose
        return y.reshape(*lead, tokens, n_head, c // n_head).transpose(-2, -3)

    q, k, v = (split_heads(y) for y in qkv.tensor_split(3, dim=-1))  # 3 even of width 0
    out = _torch_attention(t, q, k, v, mask, causal, scale)
    return out.transpose(-2, -3).reshape(*lead, tokens, c)


def _qkv_attention(
    qkv: Array,
    mask: Array | None = None,
    *,
    n_head: int,
    causal: bool,
    scale: float | None,
    dropout: float,
    rng: Rng,
) -> tuple[Array, Vjp]:  # the keywords' defaults are the check's, which always gives them
    """Multi-head attention over a packed projection ``qkv [..., T, 3C]``: ``q | k | v`` along
    the last axis, each ``n_head`` heads side by side (GPT-2's ``c_attn`` output), to ``[..., T,
    C]``, the heads side by side again. ``scaled_dot_product_attention`` on each head's views,
    with its ``mask`` (broadcast to ``[..., n_head, T, T]``), ``causal``, ``scale`` and
    ``dropout``: what ``split``, ``reshape`` and ``transpose`` around that op compute, as one
    node, whose gradient is written into one ``[..., T, 3C]`` array.
    VJP: attention's, on the heads of ``g``, each head's ``gq, gk, gv`` put in place.
    """
    *lead, t, width = qkv.shape
    out, vjp = _scaled_dot_product_attention(
        *heads(qkv, n_head), mask, causal=causal, scale=scale, dropout=dropout, rng=rng
    )  # (..., H, T, C / H)

    def vjp_packed(g: Array, needs: tuple[bool, ...]) -> Grads:
        by_head = np.swapaxes(g.reshape(*lead, t, n_head, width // (3 * n_head)), -2, -3)
        grad = np.empty_like(qkv)
        q_part, k_part, v_part = heads(grad, n_head)  # views: written in place, then returned
        q_part[...], k_part[...], v_part[...], _ = vjp(by_head, (True, True, True, False))
        return grad, None

    return np.swapaxes(out, -2, -3).reshape(*lead, t, width // 3), vjp_packed


qkv_attention = builtin(
    _qkv_attention,
    check=_check_qkv_attention,
    data={"mask": "bool"},
    sample=Sample(_qkv_inputs, _qkv_params, fits=_qkv_fits),
    torch=_torch_qkv_attention,
)
