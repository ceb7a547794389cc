"""Text generation for the language models (``GPT``, ``Llama``): attention masks from padding,
positions from the mask, a key/value cache, and the sampling loop ``generate``.

A model that generates offers three things: ``context_length`` (the longest sequence),
``vocab_size``, and ``forward_cached(graph, ids, positions, keep, cache)``, its forward pass over
new tokens only (``ids [B, t]`` at ``positions [B, t]``; ``keep [B, past + t]`` says which keys
are real tokens rather than padding) that reads and extends ``cache`` and returns the last
position's logits ``[B, V]`` as a node. ``generate`` runs each pass inside ``Graph.scratch()``, so
the graph is left exactly as it was found, and nothing is recorded for a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.errors import ShapeError

__all__ = [
    "Generates",
    "KVCache",
    "attend",
    "attention_mask",
    "check_mask",
    "generate",
    "positions_from_mask",
]

Array = npt.NDArray[Any]


class KVCache:
    """The keys and values each attention layer has seen so far, as arrays ``[..., T, d]``
    (already rotated, for rotary models), by layer index."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[Array, Array]] = {}

    @property
    def length(self) -> int:
        """The number of cached positions (0 before the first pass)."""
        if not self.layers:
            return 0
        return int(next(iter(self.layers.values()))[0].shape[-2])


def attend(
    graph: Graph,
    q: NodeId,
    k: NodeId,
    v: NodeId,
    *,
    layer: int,
    cache: KVCache | None,
    mask: Array | None,
    causal: bool,
) -> NodeId:
    """``scaled_dot_product_attention(q, k, v, mask, causal=causal)``; with a ``cache``, the new
    ``k`` and ``v`` are appended to the layer's cached ones first, and the cache keeps the
    result (so each new token costs O(T), not O(T^2))."""
    if cache is not None:
        past = cache.layers.get(layer)
        if past is not None:
            k = graph.concat([graph.constant(past[0]), k], axis=-2)
            v = graph.concat([graph.constant(past[1]), v], axis=-2)
        cache.layers[layer] = (graph.value(k), graph.value(v))
    return graph.scaled_dot_product_attention(q, k, v, mask, causal=causal)


def check_mask(where: str, attention_mask: object, shape: tuple[int, ...]) -> Array:
    """``attention_mask`` as a bool array of ``shape`` (the ids'): 1/True for a real token,
    0/False for padding, as transformers' ``attention_mask``."""
    try:
        mask = np.asarray(attention_mask)
    except (TypeError, ValueError) as error:
        raise ShapeError(f"{where}: attention_mask is not a regular array: {error}") from None
    if mask.shape != shape:
        raise ShapeError(
            f"{where}: attention_mask has shape {mask.shape}; the ids {shape} need the same"
        )
    if mask.dtype.kind not in "biu" or (mask.size and not np.isin(mask, (0, 1)).all()):
        raise ValueError(f"{where}: attention_mask must hold only 0 and 1 (or bools)")
    return mask.astype(bool)


def positions_from_mask(keep: Array) -> Array:
    """Each token's position counted over real tokens only, as transformers' ``generate``:
    ``cumsum(mask) - 1``, and 1 where the mask is 0 (padding, whose position never matters)."""
    positions = np.cumsum(keep, axis=-1) - 1
    positions[~keep] = 1
    return positions.astype(np.int64)


def attention_mask(keep: Array, queries: int, window: int | None) -> Array:
    """The bool mask ``[..., Tq, Tk]`` for the last ``queries`` of ``Tk = keep.shape[-1]`` slots:
    key ``j`` is kept for query slot ``i`` when ``j <= i``, ``keep[..., j]``, and, with a sliding
    ``window``, ``i - j < window``."""
    slots = keep.shape[-1]
    i = np.arange(slots - queries, slots)[:, None]
    j = np.arange(slots)[None, :]
    band = j <= i
    if window is not None:
        band &= i - j < window
    mask: Array = band & keep[..., None, :]
    return mask


class _Generating(Protocol):
    @property
    def context_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def forward_cached(
        self, graph: Graph, ids: Array, positions: Array, keep: Array, cache: KVCache
    ) -> NodeId: ...


class Generates:
    """What ``GPT`` and ``Llama`` share: ``generate``, over their ``context_length``,
    ``vocab_size`` and ``forward_cached``."""

    def generate(
        self,
        graph: Graph,
        ids: npt.ArrayLike,
        max_new_tokens: int,
        *,
        attention_mask: npt.ArrayLike | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> npt.NDArray[np.int64]:
        """Continue each prompt of ``ids`` (``[B, T]``, or one ``[T]``) by ``max_new_tokens``
        tokens, with a key/value cache (each new token costs O(T)).

        Greedy at ``temperature`` 0 (token for token transformers' ``generate(do_sample=False)``);
        otherwise sampled from a NumPy generator seeded with ``seed``, after transformers'
        warpers in their order: temperature, ``top_k``, ``top_p``. Left-padded rows (with their
        ``attention_mask``) take positions from the mask. A row that produces an
        ``eos_token_id`` (an id or a list) is filled with ``pad_token_id`` (default: the first
        eos id) to the common length. Runs under ``Graph.scratch()``: the graph is left as it was
        found and nothing is recorded for a gradient; active LoRA adapters (and merged ones)
        apply.

        Returns
        -------
        ndarray
            int64 ``[B, T + max_new_tokens]`` (``[T + max_new_tokens]`` for one prompt): the
            prompts, then the new tokens.

        Raises
        ------
        ValueError
            For a prompt plus ``max_new_tokens`` longer than the context, ids out of range, bad
            sampling settings or a mask that is not 0/1.
        ShapeError, TypeError
            For ids that are not integers ``[B, T]``/``[T]``, or a mask of another shape.
        """
        return generate(
            self,  # type: ignore[arg-type]
            graph,
            ids,
            max_new_tokens,
            attention_mask=attention_mask,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
            where=f"{type(self).__name__}.generate",
        )


def _eos(where: str, eos_token_id: object, vocab: int) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    ids = eos_token_id if isinstance(eos_token_id, Sequence) else [eos_token_id]
    found = []
    for token in ids:
        if not _checks.is_int(token) or not 0 <= int(token) < vocab:
            raise ValueError(
                f"{where}: eos_token_id must be an id in [0, {vocab}) or a list of them, got "
                f"{eos_token_id!r}"
            )
        found.append(int(token))
    return tuple(found)


def _choose(
    logits: Array,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    rng: np.random.Generator,
) -> Array:
    """The next token of each row: the argmax at temperature 0 (the first on ties, as
    ``torch.argmax``), else a draw after transformers' warpers, in their order: temperature,
    top-k (ties with the k-th kept), top-p (the smallest set of most likely tokens whose mass
    reaches ``top_p``, at least one; of tokens tied at its edge, the higher id stays)."""
    if temperature == 0.0:
        chosen: Array = np.argmax(logits, axis=-1)
        return chosen
    scores = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k, None]
        scores[scores < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending
        ranked = np.take_along_axis(scores, order, axis=-1)
        probs = np.exp(ranked - ranked[:, -1:])
        cumulative = np.cumsum(probs / probs.sum(axis=-1, keepdims=True), axis=-1)
        drop = cumulative <= 1.0 - top_p
        drop[:, -1] = False  # the most likely token always stays
        np.put_along_axis(scores, order, np.where(drop, -np.inf, ranked), axis=-1)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    draws = rng.random((probs.shape[0], 1))
    picked: Array = np.minimum(
        (np.cumsum(probs, axis=-1) < draws).sum(axis=-1), probs.shape[-1] - 1
    )
    return picked


def generate(
    model: _Generating,
    graph: Graph,
    ids: npt.ArrayLike,
    max_new_tokens: int,
    *,
    attention_mask: npt.ArrayLike | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    where: str = "generate",
) -> Array:
    """Continue each row of ``ids`` (``[B, T]``, or one sequence ``[T]``) by ``max_new_tokens``
    tokens; see ``GPT.generate``. Returns int64 ``[B, T + max_new_tokens]`` (or ``[T + ...]``)."""
    check_graph(where, graph)
    array = np.asarray(ids) if not isinstance(ids, NodeId) else None
    if array is None:
        raise TypeError(f"{where}: ids must be an integer array, not a NodeId")
    if array.dtype.kind not in "iu" or array.ndim not in (1, 2) or array.shape[-1] == 0:
        raise ShapeError(
            f"{where}: ids must be integers [B, T] or [T] with T >= 1, got dtype {array.dtype} "
            f"and shape {array.shape}"
        )
    vocab = model.vocab_size
    if array.size and (array.min() < 0 or array.max() >= vocab):
        bad = int(array.min()) if array.min() < 0 else int(array.max())
        raise ValueError(f"{where}: id {bad} is out of range for a vocabulary of {vocab}")
    if not _checks.is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"{where}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    single = array.ndim == 1
    rows = array.reshape(1, -1).astype(np.int64) if single else array.astype(np.int64)
    length = rows.shape[1] + int(max_new_tokens)
    if length > model.context_length:
        raise ValueError(
            f"{where}: a prompt of {rows.shape[1]} tokens plus max_new_tokens {max_new_tokens} "
            f"is {length} tokens, longer than the model's context of {model.context_length}"
        )
    keep = (
        np.ones(rows.shape, bool)
        if attention_mask is None
        else check_mask(where, attention_mask, array.shape).reshape(rows.shape)
    )
    temperature = _checks.real(where, "temperature", temperature, 0.0)
    if top_k is not None:
        top_k = _checks.positive_int(where, "top_k", top_k)
    if top_p is not None:
        top_p = _checks.real(where, "top_p", top_p, 0.0)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"{where}: top_p must be in (0, 1], got {top_p}")
    eos = _eos(where, eos_token_id, vocab)
    if pad_token_id is None:
        pad = eos[0] if eos else 0
    elif _checks.is_int(pad_token_id) and 0 <= pad_token_id < vocab:
        pad = int(pad_token_id)
    else:
        raise ValueError(
            f"{where}: pad_token_id must be an id in [0, {vocab}), got {pad_token_id!r}"
        )
    rng = np.random.default_rng(_checks.seed(where, "seed", seed))

    out = np.full((rows.shape[0], length), pad, dtype=np.int64)
    out[:, : rows.shape[1]] = rows
    if max_new_tokens == 0:
        return out[0] if single else out
    cache = KVCache()
    positions = positions_from_mask(keep)
    running = np.ones(rows.shape[0], bool)
    new, at = rows, positions
    for step in range(int(max_new_tokens)):
        with graph.scratch():
            logits = np.array(graph.value(model.forward_cached(graph, new, at, keep, cache)))
        token = _choose(logits, temperature, top_k, top_p, rng)
        token = np.where(running, token, pad)
        out[:, rows.shape[1] + step] = token
        if eos:
            running &= ~np.isin(token, eos)
            if not running.any():
                break
        new, at = token[:, None], positions[:, -1:] + 1 + step
        keep = np.concatenate([keep, np.ones((rows.shape[0], 1), bool)], axis=1)
    return out[0] if single else out
