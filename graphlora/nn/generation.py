"""Text generation for the language models (``GPT``, ``Llama``): attention masks from padding,
positions from the mask, a key/value cache, and the sampling loop ``generate``.

A model that generates offers ``context_length`` (the longest sequence), ``vocab_size``,
``head_axes`` (how many head axes its attention has ahead of ``[T, d]``), ``windows`` (each
layer's sliding window, or ``None``) and ``forward_cached(graph, ids, positions, masks, cache)``,
its forward pass over new tokens only (``ids [B, t]`` at ``positions [B, t]``, each layer's
attention ``masks`` entry over the cached keys and the new ones) that reads and extends ``cache``
and returns the last position's logits ``[B, V]`` as a node.

``generate`` runs the prompt through once (a ``KVCache`` of arrays), then records one token's
step over a ``StaticCache`` (keys and values in leaves of a fixed size, the new token's ids,
positions and masks in data leaves) and replays that step for every further token
(``Graph.compile(..., start=...)``), updating the leaves in place: each token then costs the
ops' own work, not their recording, and O(T). All of it inside ``Graph.scratch()``: the graph is
left exactly as it was found, and nothing is recorded for a gradient.
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
    "Cache",
    "Data",
    "Generates",
    "KVCache",
    "StaticCache",
    "attend",
    "attention_mask",
    "check_mask",
    "for_heads",
    "generate",
    "positions_from_mask",
]

Array = npt.NDArray[Any]
Data = NodeId | npt.NDArray[Any]
"""Token ids, positions or a mask: an array, or a data node (what a replayed step reads)."""


class KVCache:
    """The keys and values of the prompt's pass, as arrays ``[..., T, d]`` (already rotated,
    for rotary models), by layer index: what a ``StaticCache`` starts from."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[Array, Array]] = {}


class StaticCache:
    """Keys and values in constant leaves of a fixed number of ``slots`` (``[..., slots, d]``),
    filled from a ``KVCache`` of the prompt: a step over it keeps its shapes from token to
    token, so it can be recorded once and replayed. ``attend`` joins a layer's leaf and the new
    key (attention masks the slots not filled yet) and notes the new key's node; ``commit``
    writes the new keys and values into a slot once their step has run."""

    def __init__(self, graph: Graph, cache: KVCache, slots: int) -> None:
        self.graph = graph
        self.keys: dict[int, tuple[NodeId, NodeId]] = {}
        self.new: dict[int, tuple[NodeId, NodeId]] = {}
        for layer, pair in cache.layers.items():
            leaves = []
            for past in pair:
                buffer = np.zeros((*past.shape[:-2], slots, past.shape[-1]), past.dtype)
                buffer[..., : past.shape[-2], :] = past
                leaves.append(graph.constant(buffer))
            self.keys[layer] = (leaves[0], leaves[1])

    def commit(self, slot: int) -> None:
        """Write each layer's new key and value (of the step just run) into ``slot``."""
        graph = self.graph
        for layer, pair in self.new.items():
            for leaf, node in zip(self.keys[layer], pair, strict=True):
                graph.buffers(leaf)[0][..., slot, :] = graph.value(node)[..., 0, :]


Cache = KVCache | StaticCache
"""What ``attend`` extends: the prompt's arrays, or a replayed step's leaves."""


def attend(
    graph: Graph,
    q: NodeId,
    k: NodeId,
    v: NodeId,
    *,
    layer: int,
    cache: Cache | None,
    mask: Data | None,
    causal: bool,
) -> NodeId:
    """``scaled_dot_product_attention(q, k, v, mask, causal=causal)``. A ``KVCache`` (the
    prompt's pass) keeps the layer's ``k`` and ``v``; with a ``StaticCache`` (a token's step),
    they are appended to the layer's leaves first (``commit`` stores them afterwards), so that
    each new token costs O(T), not O(T^2)."""
    if isinstance(cache, StaticCache):
        cache.new[layer] = (k, v)
        past_k, past_v = cache.keys[layer]
        k = graph.concat([past_k, k], axis=-2)
        v = graph.concat([past_v, v], axis=-2)
    elif cache is not None:
        cache.layers[layer] = (graph.value(k), graph.value(v))
    return graph.scaled_dot_product_attention(q, k, v, mask, causal=causal)


def for_heads(mask: Array, axes: int) -> Array:
    """``mask [..., Tq, Tk]`` with ``axes`` axes of one inserted before ``[Tq, Tk]``, so that it
    broadcasts over attention's head axes (``[..., heads, Tq, Tk]``)."""
    return mask.reshape(*mask.shape[:-2], *(1,) * axes, *mask.shape[-2:])


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


_mask_of = attention_mask  # for generate, whose argument of that name hides it


class _Generating(Protocol):
    @property
    def context_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def head_axes(self) -> int: ...

    @property
    def windows(self) -> list[int | None]: ...

    def forward_cached(
        self, graph: Graph, ids: Data, positions: Data, masks: Sequence[Data], cache: Cache
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
    attention_mask: npt.ArrayLike | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    seed: int | None,
    where: str,
) -> Array:
    """Continue each row of ``ids`` (``[B, T]``, or one sequence ``[T]``) by ``max_new_tokens``
    tokens; see ``Generates.generate`` (each argument as there; ``where`` names the caller).
    Returns int64 ``[B, T + max_new_tokens]`` (or ``[T + ...]``)."""
    check_graph(where, graph)
    if isinstance(ids, NodeId):
        raise TypeError(f"{where}: ids must be an integer array, not a NodeId")
    array = np.asarray(ids)
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
    prompt, batch = rows.shape[1], rows.shape[0]
    windows, axes = model.windows, model.head_axes
    running = np.ones(batch, bool)

    def chosen(logits: Array, step: int) -> bool:
        """Put the step's tokens in ``out``; False once every row has ended."""
        token = np.where(running, _choose(logits, temperature, top_k, top_p, rng), pad)
        out[:, prompt + step] = token
        if eos:
            running[np.isin(token, eos)] = False
        return bool(running.any())

    cache = KVCache()
    positions = positions_from_mask(keep)
    with graph.scratch():  # the prompt, once: its keys and values into the cache
        made = {w: for_heads(_mask_of(keep, prompt, w), axes) for w in set(windows)}
        node = model.forward_cached(graph, rows, positions, [made[w] for w in windows], cache)
        going = chosen(np.array(graph.value(node)), 0)
    if max_new_tokens == 1 or not going:
        return out[0] if single else out

    # The keys the last step's token attends to besides its own: slots 0 .. prompt + new - 3.
    slots = prompt + int(max_new_tokens) - 2
    seen = np.ones((batch, slots), bool)
    seen[:, :prompt] = keep
    with graph.scratch():  # one token's step, recorded once, replayed for the others
        start = len(graph.tape)
        static = StaticCache(graph, cache, slots)
        token_leaf = graph.constant(out[:, prompt : prompt + 1])
        position_leaf = graph.constant(positions[:, -1:] + 1)
        masks = {w: graph.constant(_step_mask(seen, prompt, w, axes)) for w in set(windows)}
        node = model.forward_cached(
            graph, token_leaf, position_leaf, [masks[w] for w in windows], static
        )
        run = graph.compile(node, np.ones(node.shape), start=start)
        logits = np.array(graph.value(node))
        for step in range(1, int(max_new_tokens)):
            if not chosen(logits, step):
                break
            if step == max_new_tokens - 1:
                break
            static.commit(prompt + step - 1)
            graph.buffers(token_leaf)[0][:, 0] = out[:, prompt + step]
            graph.buffers(position_leaf)[0][:] += 1
            for w, leaf in masks.items():
                graph.buffers(leaf)[0][...] = _step_mask(seen, prompt + step, w, axes)
            logits = np.array(run(backward=False))
    return out[0] if single else out


def _step_mask(seen: Array, slot: int, window: int | None, axes: int) -> Array:
    """The mask of the token at ``slot`` over a ``StaticCache``'s slots and itself: ``[B, 1,
    slots + 1]`` over the head axes. A filled slot ``j < slot`` is kept where ``seen`` (not
    padding) and, with a ``window``, ``slot - j < window``; the token itself always."""
    j = np.arange(seen.shape[1])
    kept = seen & (j < slot)
    if window is not None:
        kept &= slot - j < window
    row = np.concatenate([kept, np.ones((seen.shape[0], 1), bool)], axis=1)
    return for_heads(row[:, None, :], axes)
