"""LoRA maths on plain NumPy arrays, with no graph: the functional twin of ``LoraLinear``.

An adapter is a dict ``{"A": [in, rank], "B": [rank, out]}`` (other keys are ignored). Every
function here computes in the same order as the layer, so the two agree to the last bit: the
update is ``(A @ B) * scaling`` and the forward pass is ``x @ W + bias + ((x @ A) * scaling) @ B``
with ``scaling = alpha / rank`` (or ``alpha / sqrt(rank)`` with ``use_rslora``). These two
formulas, ``lora_scaling`` and ``scaled_delta``, are the ones the layer, the adapter files and the
command line use. Note that PEFT's ``lora_alpha`` defaults to 8 while ``alpha`` here defaults to
1.0, the plain ``A @ B / rank``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora import _checks
from graphlora.errors import ShapeError
from graphlora.ops.registry import Array

__all__ = [
    "column_norms",
    "combine_adapters",
    "init_lora_adapter",
    "linear_init",
    "lora_delta",
    "lora_linear",
    "lora_scaling",
    "merge_lora_weight",
    "scaled_delta",
    "tree_lora_delta",
    "unmerge_lora_weight",
]

Adapter = Mapping[str, Array]


def linear_init(
    in_features: int,
    out_features: int,
    *,
    bias: bool = True,
    rng: _checks.Rng = None,
    where: str = "linear_init",
) -> tuple[Array, Array | None]:
    """A weight ``[in, out]`` and bias ``[out]`` drawn as ``torch.nn.Linear`` draws them:
    uniform in ``±1/sqrt(in)`` (the bias ``None`` when ``bias`` is False).

    Raises
    ------
    TypeError, ValueError
        For sizes that are not ints, or below 1 (``where`` names the caller).
    """
    for arg, value in (("in_features", in_features), ("out_features", out_features)):
        _checks.positive_int(where, arg, value)
    generator = _checks.as_generator(where, rng)
    bound = 1.0 / math.sqrt(in_features)
    weight = generator.uniform(-bound, bound, size=(in_features, out_features))
    return weight, generator.uniform(-bound, bound, size=out_features) if bias else None


def lora_scaling(rank: int, alpha: float = 1.0, *, use_rslora: bool = False) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def scaled_delta(a: Array, b: Array, scaling: float) -> Array:
    """The weight update of an adapter: ``(A @ B) * scaling``, ``[in, out]``."""
    delta: Array = (a @ b) * scaling
    return delta


def column_norms(weight: Array) -> Array:
    """The length of each column of ``weight [in, out]``, ``[out]``: DoRA's norm of each output's
    weights (PEFT's ``torch.linalg.norm(W, dim=1)`` on its ``[out, in]`` layout)."""
    norms: Array = np.sqrt(np.sum(weight * weight, axis=0))
    return norms


def init_lora_adapter(
    weight: npt.ArrayLike,
    rank: int,
    init_std: float = 0.01,
    dtype: npt.DTypeLike | None = None,
    rng: np.random.Generator | int | None = None,
) -> dict[str, Array]:
    """A fresh adapter for ``weight [in, out]``: ``A ~ N(0, init_std²)`` and ``B = 0``.

    Parameters
    ----------
    weight
        The frozen weight, ``[in, out]``; only its shape and dtype are used.
    rank
        ``1 <= rank <= min(in, out)``.
    dtype
        Floating dtype of A and B; default: the weight's.
    rng
        A ``np.random.Generator`` or an int seed (``None``: fresh entropy).
    """
    where = "init_lora_adapter"
    w = _matrix(where, "weight", weight)
    _check_rank(where, rank, w.shape)
    if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
        raise ValueError(f"{where}: init_std must be finite and > 0, got {init_std!r}")
    out_dtype = w.dtype if dtype is None else np.dtype(dtype)
    if out_dtype.kind != "f":
        raise TypeError(f"{where}: dtype must be floating point, got {out_dtype}")
    generator = _checks.as_generator(where, rng)
    in_features, out_features = w.shape
    return {
        "A": generator.normal(0.0, init_std, size=(in_features, rank)).astype(out_dtype),
        "B": np.zeros((rank, out_features), dtype=out_dtype),
    }


def lora_delta(adapter: Adapter, alpha: float = 1.0, *, use_rslora: bool = False) -> Array:
    """The weight update ``(A @ B) * scaling``, ``[in, out]``."""
    a, b = _adapter("lora_delta", adapter)
    return scaled_delta(a, b, lora_scaling(a.shape[1], alpha, use_rslora=use_rslora))


def lora_linear(
    x: npt.ArrayLike,
    frozen_weight: npt.ArrayLike,
    adapter: Adapter,
    alpha: float = 1.0,
    *,
    bias: npt.ArrayLike | None = None,
    use_rslora: bool = False,
) -> Array:
    """``x [..., in] -> [..., out]``: ``x @ W (+ bias) + ((x @ A) * scaling) @ B``; no ``A @ B``."""
    where = "lora_linear"
    w = _matrix(where, "frozen_weight", frozen_weight)
    a, b = _adapter(where, adapter, w.shape)
    x_array = np.asarray(x)
    if x_array.ndim == 0 or x_array.shape[-1] != w.shape[0]:
        raise ShapeError(
            f"{where}: x has shape {x_array.shape} but W {w.shape} takes [..., {w.shape[0]}]"
        )
    scaling = lora_scaling(a.shape[1], alpha, use_rslora=use_rslora)
    y: Array = x_array @ w
    if bias is not None:
        bias_array = np.asarray(bias)
        if bias_array.shape != (w.shape[1],):
            raise ShapeError(
                f"{where}: bias has shape {bias_array.shape}, expected ({w.shape[1]},)"
            )
        y = y + bias_array
    return y + ((x_array @ a) * scaling) @ b


def merge_lora_weight(
    weight: npt.ArrayLike, adapter: Adapter, alpha: float = 1.0, *, use_rslora: bool = False
) -> Array:
    """``W + (A @ B) * scaling`` as a new array."""
    w = _matrix("merge_lora_weight", "weight", weight)
    _adapter("merge_lora_weight", adapter, w.shape)
    return w + lora_delta(adapter, alpha, use_rslora=use_rslora)


def unmerge_lora_weight(
    merged: npt.ArrayLike, adapter: Adapter, alpha: float = 1.0, *, use_rslora: bool = False
) -> Array:
    """``W_merged - (A @ B) * scaling`` as a new array.

    In floating point this can differ from the original W in the last bit; ``LoraLinear.unmerge_``
    keeps the original and is exact.
    """
    w = _matrix("unmerge_lora_weight", "merged", merged)
    _adapter("unmerge_lora_weight", adapter, w.shape)
    return w - lora_delta(adapter, alpha, use_rslora=use_rslora)


def combine_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    scalings: Sequence[float] | None = None,
    rank: int | None = None,
) -> dict[str, Array]:
    """One adapter ``{"A", "B"}`` (scaling 1) from several, weighted: PEFT's
    ``add_weighted_adapter`` maths. ``scalings`` are the adapters' own (default 1 each).

    - ``"linear"``: ``A = sum sign(w s) sqrt(|w s|) A_i``, ``B = sum sqrt(|w s|) B_i``; equal
      ranks only. ``A @ B`` has cross terms ``A_i B_j``: it is not ``sum w s A_i B_i`` unless
      there is one adapter.
    - ``"cat"``: ``A = [w_1 s_1 A_1, w_2 s_2 A_2, ...]`` along the rank, ``B = [B_1; B_2; ...]``:
      ``A @ B = sum w_i s_i A_i B_i`` exactly, rank the sum of the ranks (``rank`` pads it with
      zeros).
    - ``"svd"``: ``D = sum w_i s_i A_i B_i``, then its top ``rank`` singular triplets (default:
      the largest rank), as PEFT on PyTorch's ``[out, in]`` layout: ``B = (U_r S_r)ᵀ``,
      ``A = Vh_rᵀ``. The best rank-``rank`` approximation of ``D``.

    Raises
    ------
    ValueError
        For an unknown type, lengths that differ, ``"linear"`` over unequal ranks, or a rank
        out of range.
    """
    where = "combine_adapters"
    pairs = [_adapter(where, adapter) for adapter in adapters]
    scales = [1.0] * len(pairs) if scalings is None else [float(s) for s in scalings]
    if not pairs or not len(pairs) == len(weights) == len(scales):
        raise ValueError(
            f"{where}: need one weight and one scaling per adapter, got {len(pairs)} adapters, "
            f"{len(weights)} weights and {len(scales)} scalings"
        )
    ranks = [a.shape[1] for a, _ in pairs]
    ws = [float(w) * s for w, s in zip(weights, scales, strict=True)]  # w s, as PEFT
    if combination_type == "linear":
        if len(set(ranks)) > 1:
            raise ValueError(f"{where}: 'linear' needs adapters of one rank, got ranks {ranks}")
        roots = [math.sqrt(abs(x)) for x in ws]
        a = np.sum(
            [r * (1 if x >= 0 else -1) * a for r, x, (a, _) in zip(roots, ws, pairs, strict=True)],
            0,
        )
        b = np.sum([r * b for r, (_, b) in zip(roots, pairs, strict=True)], axis=0)
        return {"A": a, "B": b}
    if combination_type == "cat":
        total = sum(ranks) if rank is None else rank
        if total < sum(ranks):
            raise ValueError(f"{where}: rank {total} is below the sum of the ranks {ranks}")
        a = np.zeros((pairs[0][0].shape[0], total), dtype=np.result_type(*pairs[0]))
        b = np.zeros((total, pairs[0][1].shape[1]), dtype=a.dtype)
        start = 0
        for (a_i, b_i), w, s in zip(pairs, weights, scales, strict=True):
            a[:, start : start + a_i.shape[1]] = a_i * float(w) * s  # PEFT: A * weight * scaling
            b[start : start + a_i.shape[1]] = b_i
            start += a_i.shape[1]
        return {"A": a, "B": b}
    if combination_type != "svd":
        raise ValueError(
            f"{where}: combination_type must be 'svd', 'linear' or 'cat', got {combination_type!r}"
        )
    deltas = [scaled_delta(a, b, s) for s, (a, b) in zip(scales, pairs, strict=True)]
    delta = np.sum([float(w) * d for w, d in zip(weights, deltas, strict=True)], axis=0)
    new_rank = max(ranks) if rank is None else rank
    if not 1 <= new_rank <= min(delta.shape):
        raise ValueError(f"{where}: rank must be in [1, {min(delta.shape)}], got {new_rank}")
    u, sigma, vh = np.linalg.svd(delta.T, full_matrices=False)  # PyTorch's [out, in] layout
    return {"A": vh[:new_rank].T.copy(), "B": (u[:, :new_rank] * sigma[:new_rank]).T.copy()}


def _is_adapter(node: object) -> bool:
    return isinstance(node, Mapping) and set(node) == {"A", "B"}


def tree_lora_delta(
    adapters: Any,
    alpha: float = 1.0,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    use_rslora: bool = False,
) -> Any:
    """``lora_delta`` of every adapter in a nested structure of dicts, lists and tuples.

    A node is an adapter when ``is_leaf(node)`` is true (default: a mapping whose keys are exactly
    ``{"A", "B"}``; pass your own to accept adapters that carry more keys, such as a name). The
    result has the same structure, each adapter replaced by its delta.

    Raises
    ------
    TypeError
        For a node that is neither an adapter nor a dict, list or tuple.
    """
    leaf = _is_adapter if is_leaf is None else is_leaf

    def walk(node: Any, path: str) -> Any:
        if leaf(node):
            return lora_delta(node, alpha, use_rslora=use_rslora)
        if isinstance(node, Mapping):
            return {key: walk(value, f"{path}[{key!r}]") for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            items = [walk(value, f"{path}[{i}]") for i, value in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        raise TypeError(
            f"tree_lora_delta: {path or 'the tree'} is a {type(node).__name__}, neither an "
            "adapter {'A': ..., 'B': ...} nor a dict, list or tuple"
        )

    return walk(adapters, "")


# --- checks -----------------------------------------------------------------------------------


def _matrix(where: str, arg: str, value: object) -> Array:
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise TypeError(f"{where}: {arg} must hold floating-point data, got dtype {array.dtype}")
    if array.ndim != 2 or array.size == 0:
        raise ShapeError(f"{where}: {arg} must be a non-empty 2-D matrix, got shape {array.shape}")
    return array


def _check_rank(where: str, rank: object, shape: tuple[int, ...]) -> None:
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool):
        raise TypeError(f"{where}: rank must be an int, got {rank!r}")
    if not 1 <= rank <= min(shape):
        raise ValueError(
            f"{where}: rank must be in [1, {min(shape)}] for weight {shape}, got {rank}"
        )


def _adapter(
    where: str, adapter: object, weight_shape: tuple[int, ...] | None = None
) -> tuple[Array, Array]:
    """``A`` and ``B`` of an adapter, checked against each other and the weight's shape."""
    if not (isinstance(adapter, Mapping) and "A" in adapter and "B" in adapter):
        raise TypeError(
            f"{where}: adapter must be a dict with the keys 'A' and 'B', got {adapter!r:.80}"
        )
    a = _matrix(where, "adapter['A']", adapter["A"])
    b = _matrix(where, "adapter['B']", adapter["B"])
    if a.shape[1] != b.shape[0]:
        raise ShapeError(
            f"{where}: A {a.shape} and B {b.shape} disagree on the rank "
            f"({a.shape[1]} != {b.shape[0]})"
        )
    if weight_shape is not None and (a.shape[0], b.shape[1]) != weight_shape:
        raise ShapeError(
            f"{where}: A {a.shape} @ B {b.shape} is {(a.shape[0], b.shape[1])} but the weight "
            f"is {weight_shape}"
        )
    return a, b
