"""The op catalogue as test cases. Each op's inputs come from its own registry entry (its
``Sample``, drawn by ``strategies.op_examples``) and its PyTorch call from there too; the one
thing kept here is an independent NumPy reference for each op, one row each: the oracle the op is
tested against. Shared by the op tests and the gradcheck mutation test."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.special
from hypothesis import strategies as st

import graphlora as gl
from graphlora import ops
from graphlora.lora import lora_linear
from graphlora.lora.nf4 import nf4_adapted_norm, nf4_linear, nf4_matmul
from graphlora.testing import strategies as gst

Reference = Callable[..., np.ndarray]  # reference(*inputs, **params), complex-safe

# Every op under test: the catalogue, and the fused LoRA op that lives beside the LoRA layer.
TESTED: dict[str, ops.OpDef] = {
    **ops.OPS,
    "lora_linear": lora_linear,
    "nf4_matmul": nf4_matmul,
    "nf4_linear": nf4_linear,
    "nf4_adapted_norm": nf4_adapted_norm,
}


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - np.max(x.real, axis=axis, keepdims=True, initial=-np.inf))
    return e / np.sum(e, axis=axis, keepdims=True)


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - np.max(x.real, axis=axis, keepdims=True, initial=-np.inf)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))


def _dropout(x: np.ndarray, p: float, rng: int) -> np.ndarray:
    keep = np.random.default_rng(rng).random(x.shape) >= p
    return np.where(keep, x / (1 - p), 0)


def _cross_entropy(
    logits: np.ndarray, labels: np.ndarray, ignore_index: int = -100, label_smoothing: float = 0.0
) -> np.ndarray:
    classes = logits.shape[-1]
    logp = _log_softmax(logits.reshape(-1, classes), axis=1)
    flat = labels.reshape(-1)
    kept = flat != ignore_index
    nll = -np.sum(logp[kept, flat[kept]]) / kept.sum()
    smooth = -np.sum(logp[kept]) / kept.sum() / classes
    return (1 - label_smoothing) * nll + label_smoothing * smooth


def _reduce(fn: Callable[..., np.ndarray]) -> Reference:
    def reference(x: np.ndarray, axis: Any = None, keepdims: bool = False) -> np.ndarray:
        return fn(x, axis=axis, keepdims=keepdims)

    return reference


def _axes(x: np.ndarray, axis: Any) -> tuple[int, ...]:
    """``axis`` (None, an int or a tuple) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(x.ndim))
    return tuple(sorted(int(a) % x.ndim for a in ((axis,) if np.ndim(axis) == 0 else axis)))


def _extreme(pick: Callable[..., np.ndarray]) -> Reference:
    """max or min, complex-safe: the element at the arg-max (arg-min) of the real part."""

    def reference(x: np.ndarray, axis: Any = None, keepdims: bool = False) -> np.ndarray:
        axes = _axes(x, axis)
        if not axes:
            return x.copy()
        kept = [a for a in range(x.ndim) if a not in axes]
        moved = np.transpose(x, kept + list(axes))
        moved = moved.reshape([x.shape[a] for a in kept] + [int(np.prod(moved.shape[len(kept) :]))])
        out = np.take_along_axis(moved, pick(moved.real, axis=-1)[..., None], axis=-1)[..., 0]
        if keepdims:
            out = out.reshape([1 if a in axes else x.shape[a] for a in range(x.ndim)])
        return out

    return reference


def _logsumexp(x: np.ndarray, axis: Any = -1, keepdims: bool = False) -> np.ndarray:
    axes = _axes(x, axis)
    top = np.max(x.real, axis=axes, keepdims=True, initial=-np.inf)
    out = np.log(np.sum(np.exp(x - top), axis=axes, keepdims=True)) + top
    return out if keepdims else np.squeeze(out, axis=axes)


def _var(x: np.ndarray, axis: Any = None, keepdims: bool = False, ddof: int = 0) -> np.ndarray:
    axes = _axes(x, axis)
    count = int(np.prod([x.shape[a] for a in axes]))
    centred = x - np.sum(x, axis=axes, keepdims=True) / count
    return np.sum(centred * centred, axis=axes, keepdims=keepdims) / (count - ddof)


def _layer_norm(
    x: np.ndarray, weight: Any = None, bias: Any = None, eps: float = 1e-5
) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    y = centred / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _rms_norm(x: np.ndarray, weight: Any = None, eps: float = 1e-6) -> np.ndarray:
    y = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def _rope(
    x: np.ndarray, positions: np.ndarray, theta: float = 10000.0, scaling: Any = None
) -> np.ndarray:
    """Each pair (i, i + d/2) turned by a 2x2 rotation matrix, one frequency at a time; Llama 3's
    scaling written out from its definition (Meta's apply_scaling) branch by branch."""
    d = x.shape[-1]
    out = np.zeros(np.broadcast_shapes(x.shape, (*positions.shape, d)), dtype=x.dtype)
    for i in range(d // 2):
        f = theta ** (-2.0 * i / d)
        if scaling is not None:
            factor, low = scaling["factor"], scaling["low_freq_factor"]
            high, old = scaling["high_freq_factor"], scaling["original_max_position_embeddings"]
            wavelength = 2 * np.pi / f
            if wavelength < old / high:
                pass
            elif wavelength > old / low:
                f = f / factor
            else:
                smooth = (old / wavelength - low) / (high - low)
                f = (1 - smooth) * f / factor + smooth * f
        angle = positions * f
        c, s = np.cos(angle), np.sin(angle)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = c * a - s * b
        out[..., i + d // 2] = s * a + c * b
    return out


def _attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: Any = None,
    causal: bool = False,
    scale: Any = None,
) -> np.ndarray:
    s = (1 / np.sqrt(q.shape[-1]) if q.shape[-1] else 1.0) if scale is None else scale
    scores = (q @ np.swapaxes(k, -1, -2)) * s
    keep = np.ones(scores.shape[-2:], dtype=bool) if mask is None else mask
    if causal:
        keep = keep & np.tri(q.shape[-2], k.shape[-2], dtype=bool)
    top = np.max(np.where(keep, scores.real, -np.inf), axis=-1, keepdims=True, initial=-np.inf)
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.where(keep, np.exp(scores - top), 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    return (weights / np.where(total.real > 0, total, 1.0)) @ v


def _qkv_attention(
    qkv: np.ndarray,
    mask: Any = None,
    n_head: int = 1,
    causal: bool = False,
    scale: Any = None,
) -> np.ndarray:
    *lead, t, width = qkv.shape
    c = width // 3
    heads = [  # q, k, v: (..., H, T, C / H)
        np.swapaxes(part.reshape(*lead, t, n_head, c // n_head), -2, -3)
        for part in np.split(qkv, 3, axis=-1)
    ]
    return np.swapaxes(_attention(*heads, mask, causal, scale), -2, -3).reshape(*lead, t, c)


def _lora_linear(
    x: np.ndarray,
    w: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    bias: np.ndarray | None = None,
    scaling: float = 1.0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    xd = x if mask is None else x * mask
    out = x @ w if bias is None else x @ w + bias
    return out + ((xd @ a) * scaling) @ b


# One row per op: the same maths written plainly in NumPy (complex-safe, for complex steps).
REFERENCES: dict[str, Reference] = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "scale": lambda x, c: c * x,
    "neg": lambda x: -x,
    "pow": lambda x, p: x**p,
    "matmul": lambda a, b: a @ b,
    "linear": lambda x, weight, bias=None: x @ weight if bias is None else x @ weight + bias,
    "sum": _reduce(np.sum),
    "mean": _reduce(np.mean),
    "reshape": lambda x, shape: x.reshape(shape),
    "transpose": lambda x, axes=None: np.transpose(x, axes),
    "relu": lambda x: np.where(x.real > 0, x, 0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "exp": np.exp,
    "log": np.log,
    "softplus": lambda x: np.log(1 + np.exp(x)),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "erf": scipy.special.erf,
    "sqrt": np.sqrt,
    "abs": lambda x: np.where(x.real >= 0, x, -x),
    "maximum": lambda a, b: np.where(a.real > b.real, a, b),
    "minimum": lambda a, b: np.where(a.real < b.real, a, b),
    "where": lambda cond, a, b: np.where(cond, a, b),
    "max": _extreme(np.argmax),
    "min": _extreme(np.argmin),
    "logsumexp": _logsumexp,
    "var": _var,
    "getitem": lambda x, index: x[index],
    "concat": lambda *xs, axis=0: np.concatenate(xs, axis=axis),
    "stack": lambda *xs, axis=0: np.stack(xs, axis=axis),
    "embedding": lambda weight, ids: weight[ids],
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "rope": _rope,
    "scaled_dot_product_attention": _attention,
    "qkv_attention": _qkv_attention,
    "gelu": _gelu,
    "softmax": lambda x, axis=-1: _softmax(x, axis),
    "log_softmax": lambda x, axis=-1: _log_softmax(x, axis),
    "mse_loss": lambda p, t: np.mean((p - t) ** 2),
    "cross_entropy": _cross_entropy,
    "dropout": _dropout,
    "lora_linear": _lora_linear,
    "nf4_matmul": lambda x, weight: x @ weight.dequantize(np.float64),
    "nf4_linear": lambda x, weight: x @ weight.dequantize(np.float64).T,
    "nf4_adapted_norm": lambda a, b, weight, scaling: np.sqrt(
        np.sum((weight.dequantize(np.float64).T + scaling * (a @ b)) ** 2, axis=0)
    ),
}


def draw_example(data: st.DataObject, name: str, *, empty: bool = False) -> gst.Example:
    return data.draw(gst.op_examples(TESTED[name], empty=empty), label=f"{name} example")


def record(g: gl.Graph, name: str, inputs: Sequence[Any], params: dict[str, Any]) -> gl.NodeId:
    """The op on ``g`` through its ``Graph`` method (catalogue ops) or ``graph.apply``."""
    if name not in ops.OPS:
        return g.apply(TESTED[name], *inputs, **params)
    method = getattr(g, name)
    if TESTED[name].variadic:
        return method(list(inputs), **params)  # type: ignore[no-any-return]
    return method(*inputs, **params)  # type: ignore[no-any-return]


def nodes_for(g: gl.Graph, example: gst.Example, *, trained: bool = True) -> list[Any]:
    """The example's inputs on ``g``: each float array a parameter (or a constant), data as it
    is, ``None`` left as it is."""
    leaf = g.parameter if trained else g.constant
    return [leaf(value) if i in example.floats else value for i, value in enumerate(example.inputs)]


def reference(name: str, inputs: Sequence[Any], params: dict[str, Any]) -> np.ndarray:
    return np.asarray(REFERENCES[name](*inputs, **params))
