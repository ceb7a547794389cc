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
    "COMBINATIONS",
    "column_norms",
    "combine_adapters",
    "init_lora_adapter",
    "linear_init",
    "lora_delta",
    "lora_linear",
    "lora_scaling",
    "magnitude_prune",
    "majority_sign_mask",
    "merge_lora_weight",
    "merge_task_tensors",
    "random_prune",
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


#: Every ``combination_type`` of :func:`combine_adapters` (PEFT's names).
COMBINATIONS = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
#: The task-arithmetic merges behind each type (``_svd`` types use the same on the updates).
_MERGE = {
    "svd": "linear",
    "linear": "linear",
    "ties": "ties",
    "ties_svd": "ties",
    "dare_ties": "dare_ties",
    "dare_ties_svd": "dare_ties",
    "dare_linear": "dare_linear",
    "dare_linear_svd": "dare_linear",
    "magnitude_prune": "magnitude_prune",
    "magnitude_prune_svd": "magnitude_prune",
}
#: The types that prune, so need a ``density``; those that elect a sign.
PRUNING = tuple(t for t in COMBINATIONS if _MERGE.get(t, "linear") != "linear")
ELECTING = tuple(t for t in COMBINATIONS if "ties" in t)


def magnitude_prune(tensor: Array, density: float) -> Array:
    """``tensor`` with all but its ``int(density * size)`` largest magnitudes set to zero, as
    PEFT's ``magnitude_based_pruning``. Among equal magnitudes at the cut, which survive is not
    specified (as with ``torch.topk``)."""
    keep = int(density * tensor.size)
    flat = np.abs(tensor).reshape(-1)
    mask = np.zeros(flat.size, dtype=bool)
    if keep > 0:
        mask[np.argpartition(-flat, keep - 1)[:keep]] = True
    pruned: Array = tensor * mask.reshape(tensor.shape)
    return pruned


def random_prune(tensor: Array, density: float, rng: np.random.Generator) -> Array:
    """DARE's drop and rescale: each value kept with probability ``density`` (``rng``'s uniform
    draw below it), the kept ones divided by ``density`` so the expectation is ``tensor``."""
    mask = rng.random(tensor.shape) < density
    pruned: Array = tensor * mask / density
    return pruned


def majority_sign_mask(stacked: Array, method: str = "total") -> Array:
    """TIES's sign election over ``stacked`` task tensors (axis 0): ``True`` where a tensor's
    sign is the elected one. ``"total"`` elects the sign of the sum, ``"frequency"`` the sign
    held by more tensors; a tie (sum zero) elects ``+``. Zeros never match."""
    sign = np.sign(stacked)
    votes = stacked.sum(axis=0) if method == "total" else sign.sum(axis=0)
    mask: Array = sign == np.where(votes >= 0, 1, -1)
    return mask


def merge_task_tensors(
    tensors: Sequence[Array],
    weights: Sequence[float],
    method: str = "linear",
    *,
    density: float = 1.0,
    majority_sign_method: str = "total",
    rng: np.random.Generator | None = None,
) -> Array:
    """One tensor from several of one shape, as PEFT's ``merge_utils``:

    - ``"linear"`` (task arithmetic): ``sum w_i T_i``.
    - ``"magnitude_prune"``: each ``T_i`` keeps its ``density`` largest magnitudes, then the
      weighted sum.
    - ``"dare_linear"``: each ``T_i`` keeps a random ``density`` of its values, rescaled by
      ``1 / density``, then the weighted sum.
    - ``"ties"`` / ``"dare_ties"``: pruned as magnitude / DARE; a sign is elected per element
      from the *unweighted* pruned tensors (``majority_sign_method``); the weighted values of
      that sign are averaged (summed, divided by how many there are, at least 1).

    A ``density`` of 1 prunes nothing (PEFT warns; this does not).
    """
    where = "merge_task_tensors"
    if method not in ("linear", "magnitude_prune", "dare_linear", "ties", "dare_ties"):
        raise ValueError(f"{where}: unknown method {method!r}")
    check_majority(where, majority_sign_method)
    if method != "linear" and density < 1:
        if method.startswith("dare"):
            if rng is None:
                raise ValueError(f"{where}: {method!r} prunes at random; pass rng")
            tensors = [random_prune(t, density, rng) for t in tensors]
        else:
            tensors = [magnitude_prune(t, density) for t in tensors]
    stacked = np.stack(tensors)
    weighted = stacked * np.asarray(weights, dtype=stacked.dtype).reshape(
        (-1,) + (1,) * (stacked.ndim - 1)
    )
    if not method.endswith("ties"):
        merged: Array = weighted.sum(axis=0)
        return merged
    mask = majority_sign_mask(stacked, majority_sign_method)
    merged = (weighted * mask).sum(axis=0) / np.maximum(mask.sum(axis=0), 1)
    return merged


def combine_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    scalings: Sequence[float] | None = None,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    rng: np.random.Generator | None = None,
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
    - ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: as ``"linear"``
      (the same signed square-root weights, equal ranks), but A and B are each merged by
      :func:`merge_task_tensors` with that method instead of summed.
    - ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``:
      as ``"svd"``, but the updates ``s_i A_i B_i`` are merged with weights ``w_i`` by
      :func:`merge_task_tensors` before the decomposition.

    The pruning types need ``density`` in ``[0, 1]`` (``(0, 1]`` for DARE, which divides by
    it); DARE draws its masks from ``rng``, A's before B's.

    Raises
    ------
    ValueError
        For an unknown type, lengths that differ, ``"linear"`` over unequal ranks, or a rank
        out of range; a pruning type without a density in range, a density for a type that
        does not prune, or an unknown ``majority_sign_method``.
    """
    where = "combine_adapters"
    pairs = [_adapter(where, adapter) for adapter in adapters]
    scales = [1.0] * len(pairs) if scalings is None else [float(s) for s in scalings]
    if not pairs or not len(pairs) == len(weights) == len(scales):
        raise ValueError(
            f"{where}: need one weight and one scaling per adapter, got {len(pairs)} adapters, "
            f"{len(weights)} weights and {len(scales)} scalings"
        )
    if combination_type not in COMBINATIONS:
        raise ValueError(
            f"{where}: combination_type must be one of {list(COMBINATIONS)}, got "
            f"{combination_type!r}"
        )
    method = _MERGE.get(combination_type, "")
    density = check_density(where, combination_type, density)
    check_majority(where, majority_sign_method)
    if method.startswith("dare") and rng is None:
        rng = np.random.default_rng()

    def merge(tensors: list[Array], weights: list[float]) -> Array:
        return merge_task_tensors(
            tensors,
            weights,
            method,
            density=density,
            majority_sign_method=majority_sign_method,
            rng=rng,
        )

    ranks = [a.shape[1] for a, _ in pairs]
    ws = [float(w) * s for w, s in zip(weights, scales, strict=True)]  # w s, as PEFT
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
    if not combination_type.endswith("svd"):
        if len(set(ranks)) > 1:
            raise ValueError(
                f"{where}: {combination_type!r} needs adapters of one rank, got ranks {ranks}"
            )
        roots = [math.sqrt(abs(x)) for x in ws]
        signs = [1 if x >= 0 else -1 for x in ws]
        a_weights = [r * sign for r, sign in zip(roots, signs, strict=True)]
        a = merge([a for a, _ in pairs], a_weights)
        b = merge([b for _, b in pairs], roots)
        return {"A": a, "B": b}
    deltas = [scaled_delta(a, b, s) for s, (a, b) in zip(scales, pairs, strict=True)]
    delta = merge(deltas, [float(w) for w in weights])
    new_rank = max(ranks) if rank is None else rank
    if not 1 <= new_rank <= min(delta.shape):
        raise ValueError(f"{where}: rank must be in [1, {min(delta.shape)}], got {new_rank}")
    u, sigma, vh = np.linalg.svd(delta.T, full_matrices=False)  # PyTorch's [out, in] layout
    return {"A": vh[:new_rank].T.copy(), "B": (u[:, :new_rank] * sigma[:new_rank]).T.copy()}


def check_majority(where: str, method: str) -> None:
    """Refuse a ``majority_sign_method`` other than ``"total"`` and ``"frequency"``."""
    if method not in ("total", "frequency"):
        raise ValueError(
            f"{where}: majority_sign_method must be 'total' or 'frequency', got {method!r}"
        )


def check_density(where: str, combination_type: str, density: float | None) -> float:
    """``density`` checked for ``combination_type``: required in ``[0, 1]`` (``(0, 1]`` for
    DARE) by the pruning types, refused by the others; 1.0 for those."""
    if combination_type not in PRUNING:
        if density is not None:
            raise ValueError(
                f"{where}: density is for {list(PRUNING)}; {combination_type!r} does not prune, "
                f"got density={density!r}"
            )
        return 1.0
    if density is None:
        raise ValueError(f"{where}: {combination_type!r} needs a density in [0, 1]")
    value = _checks.real_scalar(where, "density", density)
    low_ok = value > 0 if combination_type.startswith("dare") else value >= 0
    if not (low_ok and value <= 1):
        interval = "(0, 1]" if combination_type.startswith("dare") else "[0, 1]"
        raise ValueError(
            f"{where}: {combination_type!r} needs a density in {interval}, got {value}"
        )
    return value


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
