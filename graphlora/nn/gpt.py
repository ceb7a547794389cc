"""A GPT-2-architecture language model, with transformers' attribute names and maths, that reads
the checkpoints transformers' ``save_pretrained`` writes for GPT-2.

The tree (``named_modules``) is transformers' ``GPT2LMHeadModel``'s: ``transformer.wte``,
``transformer.wpe``, ``transformer.h.N.ln_1``, ``.attn.c_attn``, ``.attn.c_proj``, ``.ln_2``,
``.mlp.c_fc``, ``.mlp.c_proj``, ``transformer.ln_f`` and ``lm_head``, tied to ``wte``. Each
block is pre-norm: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``, with causal attention and
GELU in its tanh form, as GPT-2. Weights are ``[in, out]``, as GPT-2's ``Conv1D`` stores them, so
a checkpoint loads without transposes and adapter files say ``fan_in_fan_out: true``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.random import Generator

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.lora.nf4 import NF4Config
from graphlora.nn import checkpoint, generation
from graphlora.nn.checkpoint import Weights
from graphlora.nn.generation import Data, Generates
from graphlora.nn.layers import (
    Embedding,
    LayerNorm,
    Linear,
    NF4Linear,
    TiedHead,
    check_length,
    linear_layer,
    quantized_linears,
    token_ids,
)

__all__ = ["GPT", "GPTConfig"]


@dataclass(frozen=True)
class GPTConfig:
    """The sizes of a GPT (GPT-2's names where nanoGPT's differ: ``layer_norm_epsilon``).

    Every field is checked at construction; a bad one raises ``TypeError`` or ``ValueError``.
    """

    vocab_size: int = 50257
    """Tokens: the rows of ``wte`` and the logits' last axis."""
    block_size: int = 1024
    """The longest sequence, the rows of ``wpe`` (transformers: ``n_positions``)."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads; ``n_embd`` must divide by it."""
    n_embd: int = 768
    """The width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches, while training."""
    bias: bool = True
    """Biases in the Linear and LayerNorm layers (GPT-2 has them)."""
    layer_norm_epsilon: float = 1e-5
    """The ``eps`` of every layer norm."""
    seed: int | None = None
    """The seed of the dropout masks (``None``: fresh entropy): two models built with the same
    seed draw the same masks, step for step."""

    def __post_init__(self) -> None:
        where = "GPTConfig"
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _checks.positive_int(where, name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"{where}: n_embd {self.n_embd} must divide by n_head {self.n_head}")
        _checks.probability(where, "dropout", self.dropout)
        _checks.flag(where, "bias", self.bias)
        _checks.real(where, "layer_norm_epsilon", self.layer_norm_epsilon, 0.0)
        _checks.seed(where, "seed", self.seed)

    @property
    def head_dim(self) -> int:
        """The width of one attention head, ``n_embd // n_head``."""
        return self.n_embd // self.n_head

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every leaf's dotted name and shape, in the order they are made (and saved)."""
        c = self.n_embd
        shapes: dict[str, tuple[int, ...]] = {
            "transformer.wte.weight": (self.vocab_size, c),
            "transformer.wpe.weight": (self.block_size, c),
        }
        bias = {"bias": (c,)} if self.bias else {}
        for i in range(self.n_layer):
            layer = f"transformer.h.{i}"
            for name, (n_in, n_out) in {
                "ln_1": (c, c),
                "attn.c_attn": (c, 3 * c),
                "attn.c_proj": (c, c),
                "ln_2": (c, c),
                "mlp.c_fc": (c, 4 * c),
                "mlp.c_proj": (4 * c, c),
            }.items():
                if name.startswith("ln"):
                    shapes[f"{layer}.{name}.weight"] = (c,)
                    shapes.update({f"{layer}.{name}.{k}": v for k, v in bias.items()})
                else:
                    shapes[f"{layer}.{name}.weight"] = (n_in, n_out)
                    if self.bias:
                        shapes[f"{layer}.{name}.bias"] = (n_out,)
        shapes["transformer.ln_f.weight"] = (c,)
        shapes.update({f"transformer.ln_f.{k}": v for k, v in bias.items()})
        return shapes


# --- the modules, under transformers' names ------------------------------------------------------


def _linear(
    graph: Graph, weights: Weights, name: str, shape: tuple[int, int], bias: bool
) -> Linear | NF4Linear:
    b = weights(f"{name}.bias", shape[1:]) if bias else None
    return linear_layer(graph, weights(f"{name}.weight", shape), b, name=name, fan_in_fan_out=True)


def _norm(graph: Graph, weights: Weights, name: str, dim: int, config: GPTConfig) -> LayerNorm:
    weight = graph.parameter(weights(f"{name}.weight", (dim,)), f"{name}.weight")
    bias = graph.parameter(weights(f"{name}.bias", (dim,)), f"{name}.bias") if config.bias else None
    return LayerNorm(weight, bias, config.layer_norm_epsilon, name)


class CausalSelfAttention:
    """Multi-head causal self-attention: ``c_attn`` makes q, k and v at once, ``c_proj`` mixes
    the heads back."""

    def __init__(
        self,
        graph: Graph,
        weights: Weights,
        name: str,
        config: GPTConfig,
        rng: Generator,
        layer: int = 0,
    ) -> None:
        c = config.n_embd
        self.c_attn: Any = _linear(graph, weights, f"{name}.c_attn", (c, 3 * c), config.bias)
        self.c_proj: Any = _linear(graph, weights, f"{name}.c_proj", (c, c), config.bias)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.rng = rng
        self.layer = layer

    def forward(
        self,
        graph: Graph,
        x: NodeId,
        *,
        mask: Data | None = None,
        cache: generation.Cache | None = None,
        fused: bool = False,
    ) -> NodeId:
        """``x [..., T, C] -> [..., T, C]``: q, k and v split into heads, attention on each, the
        heads side by side again (one ``qkv_attention`` op, causal, or with ``mask [..., 1, Tq,
        Tk]`` when given: ``generation.for_heads``). With a ``cache`` (generation), the heads'
        keys and values are kept and attention runs over them all."""
        qkv = self.c_attn.forward(graph, x, fused=fused)  # (..., T, 3C)
        if cache is None:
            y = graph.qkv_attention(
                qkv,
                mask,
                n_head=self.n_head,
                causal=mask is None,
                dropout=self.dropout,
                rng=self.rng,
            )
        else:
            *lead, t, width = qkv.shape
            n, d = len(lead), width // (3 * self.n_head)
            q, k, v = (
                graph.transpose(
                    graph.reshape(part, (*lead, t, self.n_head, d)), (*range(n), n + 1, n, n + 2)
                )
                for part in graph.split(qkv, 3, axis=-1)
            )  # (..., H, T, d)
            heads = generation.attend(
                graph,
                q,
                k,
                v,
                layer=self.layer,
                cache=cache,
                mask=mask,
                causal=False,
            )
            y = graph.reshape(
                graph.transpose(heads, (*range(n), n + 1, n, n + 2)), (*lead, t, width // 3)
            )
        return graph.dropout(self.c_proj.forward(graph, y, fused=fused), self.dropout, self.rng)


class GPTMLP:
    """The feed-forward half of a block: ``c_proj(gelu_tanh(c_fc(x)))``, 4x wide inside."""

    def __init__(
        self, graph: Graph, weights: Weights, name: str, config: GPTConfig, rng: Generator
    ) -> None:
        c = config.n_embd
        self.c_fc: Any = _linear(graph, weights, f"{name}.c_fc", (c, 4 * c), config.bias)
        self.c_proj: Any = _linear(graph, weights, f"{name}.c_proj", (4 * c, c), config.bias)
        self.dropout = config.dropout
        self.rng = rng

    def forward(self, graph: Graph, x: NodeId, *, fused: bool = False) -> NodeId:
        """``x [..., C] -> [..., C]``."""
        h = graph.gelu(
            self.c_fc.forward(graph, x, fused=fused), approximate="tanh"
        )  # GPT-2's gelu_new
        return graph.dropout(self.c_proj.forward(graph, h, fused=fused), self.dropout, self.rng)


class Block:
    """A pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(
        self,
        graph: Graph,
        weights: Weights,
        name: str,
        config: GPTConfig,
        rng: Generator,
        layer: int = 0,
    ) -> None:
        c = config.n_embd
        self.ln_1 = _norm(graph, weights, f"{name}.ln_1", c, config)
        self.attn = CausalSelfAttention(graph, weights, f"{name}.attn", config, rng, layer)
        self.ln_2 = _norm(graph, weights, f"{name}.ln_2", c, config)
        self.mlp = GPTMLP(graph, weights, f"{name}.mlp", config, rng)

    def forward(
        self,
        graph: Graph,
        x: NodeId,
        *,
        mask: Data | None = None,
        cache: generation.Cache | None = None,
        fused: bool = False,
    ) -> NodeId:
        """``x [..., T, C] -> [..., T, C]`` (``mask`` and ``cache``: see the attention's)."""
        h = self.attn.forward(
            graph, self.ln_1.forward(graph, x), mask=mask, cache=cache, fused=fused
        )
        x = graph.add(x, h)
        return graph.add(x, self.mlp.forward(graph, self.ln_2.forward(graph, x), fused=fused))


class GPTModel:
    """The transformer without its head: embeddings, blocks, the final layer norm (transformers:
    ``GPT2Model``)."""

    def __init__(self, graph: Graph, weights: Weights, config: GPTConfig) -> None:
        c = config.n_embd
        self.wte = _embedding(graph, weights, "transformer.wte", (config.vocab_size, c))
        self.wpe = _embedding(graph, weights, "transformer.wpe", (config.block_size, c))
        self.rng = np.random.default_rng(config.seed)  # the dropout masks', shared by the blocks
        self.h = [
            Block(graph, weights, f"transformer.h.{i}", config, self.rng, i)
            for i in range(config.n_layer)
        ]
        self.ln_f = _norm(graph, weights, "transformer.ln_f", c, config)
        self.dropout = config.dropout

    def forward(
        self,
        graph: Graph,
        ids: NodeId | npt.ArrayLike,
        *,
        positions: Data | None = None,
        mask: Data | None = None,
        cache: generation.Cache | None = None,
        fused: bool = False,
    ) -> NodeId:
        """Token ids ``[..., T]`` -> hidden states ``[..., T, C]``, at ``positions`` (``[...,
        T]``; ``None``: 0 .. T-1) with attention ``mask`` (``[..., Tq, Tk]``; ``None``: causal)
        and the generation ``cache``."""
        tokens = self.wte.forward(graph, ids)  # (..., T, C)
        if positions is None:
            t = tokens.shape[-2]
            where = graph.getitem(self.wpe.weight, slice(0, t))  # (T, C): rows 0..T-1
        else:
            where = graph.embedding(self.wpe.weight, positions)  # (..., T, C)
        x = graph.dropout(graph.add(tokens, where), self.dropout, self.rng)
        for block in self.h:
            x = block.forward(graph, x, mask=mask, cache=cache, fused=fused)
        return self.ln_f.forward(graph, x)


def _embedding(graph: Graph, weights: Weights, name: str, shape: tuple[int, int]) -> Embedding:
    return Embedding(
        graph.parameter(weights(f"{name}.weight", shape), f"{name}.weight"), *shape, name
    )


class GPT(Generates):
    """A GPT-2-architecture language model (transformers' ``GPT2LMHeadModel``).

    Build one with ``GPT.new(graph, config)`` (fresh weights, initialised as GPT-2) or
    ``GPT.from_pretrained(graph, path)`` (a checkpoint written by transformers'
    ``save_pretrained``). ``forward(graph, ids)`` returns logits ``[..., T, vocab]``.
    ``apply_lora`` puts adapters on ``c_attn`` by default, as PEFT does for GPT-2.
    """

    default_lora_targets = ("c_attn",)
    """The layers ``apply_lora`` adapts when given no ``target_modules`` (PEFT's for GPT-2)."""
    output_layer = "lm_head"
    """The output head, which ``apply_lora``'s ``"all-linear"`` leaves out (as PEFT)."""

    def __init__(self, graph: Graph, config: GPTConfig, weights: Weights) -> None:
        check_graph("GPT", graph)
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = GPTModel(graph, weights, config)
        self.lm_head = TiedHead(self.transformer.wte)

    @classmethod
    def new(cls, graph: Graph, config: GPTConfig, *, rng: _checks.Rng = None) -> GPT:
        """A model with fresh weights, drawn as GPT-2 draws them: N(0, 0.02) for embeddings and
        Linear weights, N(0, 0.02 / sqrt(2 n_layer)) for the projections into the residual
        stream, zero biases, unit layer-norm weights."""
        generator = _checks.as_generator("GPT.new", rng)
        residual = 0.02 / math.sqrt(2 * config.n_layer) if isinstance(config, GPTConfig) else 0.0

        def weights(name: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
            if name.endswith(".bias"):
                return np.zeros(shape)
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                return np.ones(shape)
            std = residual if name.endswith("c_proj.weight") else 0.02
            return generator.normal(0.0, std, size=shape)

        return cls(graph, config, weights)

    @classmethod
    def from_pretrained(
        cls,
        graph: Graph,
        path: str | os.PathLike[str],
        *,
        dropout: float = 0.0,
        seed: int | None = None,
        quantize: str | NF4Config | None = None,
    ) -> GPT:
        """Read a GPT-2 checkpoint written by transformers' ``save_pretrained``: ``config.json``
        and ``model.safetensors`` in the directory ``path``, with safetensors' NumPy API.

        Everything is checked before anything is made: the model type, the config fields
        graphlora's GPT does not have (other activations, cross-attention, untied heads, ...),
        ``n_layer`` against the layers the file holds, every tensor's name, shape and dtype, and
        that every value is finite. Then the tensors are read one at a time into the graph's
        dtype, so that loading holds one copy of the weights (and one tensor in flight).
        Keys may carry transformers' ``transformer.`` prefix or not (``GPT2Model``); its
        attention-mask buffers (``attn.bias``, ``attn.masked_bias``) and a saved ``lm_head``
        (tied) are skipped. The base weights come as parameters; ``apply_lora`` freezes them.

        The model loads as transformers' ``eval()`` gives it: ``dropout`` 0 whatever the
        config's ``*_pdrop`` fields say. Pass ``dropout`` (and a ``seed`` for its masks) to train
        with dropout.

        ``quantize="nf4"`` (or a ``gl.nf4.NF4Config``) reads the model as bitsandbytes'
        ``load_in_4bit`` does: every linear layer becomes an ``NF4Linear``, its weight
        quantized as it is read (so no float copy of the model exists); embeddings, norms and
        the head stay float.

        Raises
        ------
        FileNotFoundError
            For a missing directory or file.
        ValueError
            For another model type, a config graphlora cannot honour, a pickle checkpoint
            (refused unopened), a file safetensors cannot read, missing, unexpected,
            duplicate, mis-shaped, non-float or non-finite tensors.
        """
        where = "GPT.from_pretrained"
        check_graph(where, graph)
        _checks.probability(where, "dropout", dropout)
        _checks.seed(where, "seed", seed)
        quantized = NF4Config.of(where, quantize)
        directory = checkpoint.folder(where, path)
        config = _read_config(where, directory, dropout, seed)
        with (
            quantized_linears(quantized),
            checkpoint.open_model(
                where,
                directory,
                config.shapes,
                layers=(r"(?:transformer\.)?h\.(\d+)\.", config.n_layer, "n_layer"),
                rename=_strip,
                skip=_skipped,
                about=f"its config {config}",
            ) as weights,
        ):
            return cls(graph, config, weights)

    head_axes = 1
    """Attention's head axes ahead of ``[T, d]``: ``[heads]``."""

    @property
    def context_length(self) -> int:
        """The longest sequence: ``block_size``."""
        return self.config.block_size

    @property
    def windows(self) -> list[int | None]:
        """Each layer's sliding window: none (GPT-2 attends to everything before)."""
        return [None] * self.config.n_layer

    @property
    def vocab_size(self) -> int:
        """The logits' last axis."""
        return self.config.vocab_size

    def forward(
        self,
        graph: Graph,
        ids: NodeId | npt.ArrayLike,
        attention_mask: npt.ArrayLike | None = None,
        *,
        fused: bool = False,
    ) -> NodeId:
        """Token ids ``[..., T]`` (an integer data node or array; ``T <= block_size``) -> logits
        ``[..., T, vocab_size]``. ``fused=True`` records each Linear and LoRA layer as one op.

        ``attention_mask`` (``[..., T]``, 1 for a token, 0 for padding, as transformers') lets
        left-padded rows give the logits they give alone: positions count real tokens only (as
        transformers' ``generate``), and no token attends to padding.

        Raises
        ------
        ValueError
            For a sequence longer than ``block_size``, ids outside ``[0, vocab_size)``, or a
            mask that is not 0/1.
        ShapeError, TypeError
            For ids that are not an integer array of at least one axis (a lone id, ragged
            lists, floats), or a mask of another shape.
        """
        where = "GPT.forward"
        checked = token_ids(where, ids)
        length = checked.shape[-1]
        check_length(where, length, self.config.block_size, "block_size")
        if attention_mask is None:
            hidden = self.transformer.forward(graph, checked, fused=fused)
        else:
            keep = generation.check_mask(where, attention_mask, tuple(checked.shape))
            hidden = self.transformer.forward(
                graph,
                checked,
                positions=generation.positions_from_mask(keep),
                mask=generation.for_heads(
                    generation.attention_mask(keep, length, None), self.head_axes
                ),
                fused=fused,
            )
        return self.lm_head.forward(graph, hidden)

    def forward_cached(
        self,
        graph: Graph,
        ids: Data,
        positions: Data,
        masks: Sequence[Data],
        cache: generation.Cache,
    ) -> NodeId:
        """The pass ``generate`` makes: new tokens ``ids [B, t]`` at ``positions [B, t]``,
        attention with ``masks[0]`` (every layer's: over the cached keys and the new ones, ``[B,
        1, t, past + t]``), the cache extended; the last position's logits ``[B, vocab]``."""
        hidden = self.transformer.forward(
            graph, ids, positions=positions, mask=masks[0], cache=cache
        )
        return self.lm_head.forward(graph, graph.getitem(hidden, (slice(None), -1)))

    def save_pretrained(
        self, graph: Graph, path: str | os.PathLike[str], *, overwrite: bool = False
    ) -> None:
        """Write ``config.json`` and ``model.safetensors`` as transformers' ``save_pretrained``
        writes GPT-2, so that its ``from_pretrained`` loads the model with the same logits:
        merged adapters folded in (``merge_``), unmerged ones left out (``save_adapter`` writes
        those). The folder is written beside ``path`` and renamed into place.

        Raises
        ------
        ValueError
            For a model without biases (transformers' GPT-2 has them).
        FileExistsError
            For an existing ``path`` without ``overwrite=True``.
        """
        where = "GPT.save_pretrained"
        check_graph(where, graph)
        config = self.config
        if not config.bias:
            raise ValueError(f"{where}: transformers' GPT-2 has biases; this model has none")
        checkpoint.save_pretrained(
            where,
            self,
            graph,
            path,
            {
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "vocab_size": config.vocab_size,
                "n_positions": config.block_size,
                "n_embd": config.n_embd,
                "n_layer": config.n_layer,
                "n_head": config.n_head,
                "n_inner": None,
                "activation_function": "gelu_new",
                "layer_norm_epsilon": config.layer_norm_epsilon,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                "tie_word_embeddings": True,
            },
            expected=config.shapes(),
            overwrite=overwrite,
        )

    def __repr__(self) -> str:
        return f"GPT({self.config})"


def _skipped(name: str) -> bool:
    """transformers' attention-mask buffers, and a saved ``lm_head`` (GPT-2's is tied)."""
    return name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight"


def _strip(key: str) -> str:
    """A checkpoint key under graphlora's names: with transformers' ``transformer.`` prefix."""
    return key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"


_SUPPORTED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "add_cross_attention": (False, None),
    "scale_attn_weights": (True, None),
    "scale_attn_by_inverse_layer_idx": (False, None),
    "tie_word_embeddings": (True, None),
}


def _read_config(where: str, directory: Path, dropout: object, seed: object) -> GPTConfig:
    """The GPTConfig of a transformers ``config.json``, refusing what graphlora cannot honour."""
    file = directory / "config.json"
    raw = checkpoint.read_json(where, file)
    if raw.get("model_type") != "gpt2":
        kind = raw.get("model_type")
        raise ValueError(f"{where}: {file} is a {kind!r} model; graphlora reads GPT-2 ('gpt2')")
    for key, accepted in _SUPPORTED.items():
        if raw.get(key, accepted[0]) not in accepted:
            raise ValueError(
                f"{where}: {file} has {key}={raw[key]!r}; graphlora's GPT supports {accepted[0]!r}"
            )
    values = {
        "vocab_size": raw.get("vocab_size"),
        "block_size": raw.get("n_positions"),
        "n_layer": raw.get("n_layer"),
        "n_head": raw.get("n_head"),
        "n_embd": raw.get("n_embd"),
        "layer_norm_epsilon": raw.get("layer_norm_epsilon", 1e-5),
        "dropout": dropout,
        "seed": seed,
    }
    try:
        config = GPTConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {file}: {error}") from None
    inner = raw.get("n_inner")
    if inner is not None and inner != 4 * config.n_embd:
        raise ValueError(
            f"{where}: {file} has n_inner={inner!r}; graphlora's GPT is 4 x n_embd wide"
        )
    return config
