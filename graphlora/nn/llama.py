"""A Llama-architecture language model (Llama, Mistral, Qwen2), with transformers' module names
and maths, that reads the checkpoints transformers' ``save_pretrained`` writes for them.

The tree (``named_modules``) is transformers' ``LlamaForCausalLM``'s: ``model.embed_tokens``,
``model.layers.N.input_layernorm``, ``.self_attn.q_proj|k_proj|v_proj|o_proj``,
``.post_attention_layernorm``, ``.mlp.gate_proj|up_proj|down_proj``, ``model.norm`` and
``lm_head`` (a Linear, or tied to ``embed_tokens``). Each layer is pre-norm with RMS norms:
``x + attn(norm(x))``, then ``x + mlp(norm(x))``; attention rotates q and k by their positions
(``rope``) and shares each key/value head among ``num_attention_heads / num_key_value_heads``
query heads (grouped-query attention: the query heads are grouped on an axis of their own, so
that k and v broadcast over it, never copied); the MLP is SwiGLU, ``down(silu(gate(x)) * up(x))``.
Linear weights are ``[in, out]`` in the graph and ``[out, in]`` in the files (``nn.Linear``), so
adapter files say ``fan_in_fan_out: false``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.lora.nf4 import NF4Config
from graphlora.nn import checkpoint, generation
from graphlora.nn.checkpoint import Weights
from graphlora.nn.generation import Data, Generates
from graphlora.nn.layers import (
    Embedding,
    Linear,
    NF4Linear,
    RMSNorm,
    TiedHead,
    check_length,
    linear_layer,
    quantized_linears,
    token_ids,
)
from graphlora.ops.positional import check_scaling

__all__ = ["MODEL_TYPES", "Llama", "LlamaConfig"]

MODEL_TYPES = ("llama", "mistral", "qwen2")
"""The ``model_type`` values of ``config.json`` that ``Llama`` reads."""

_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class LlamaConfig:
    """The sizes of a Llama-family model, under transformers' names. The defaults are
    SmolLM-135M's shape.

    Every field is checked at construction; a bad one raises ``TypeError`` or ``ValueError``.
    """

    vocab_size: int = 49152
    """Tokens: the rows of ``embed_tokens`` and the logits' last axis."""
    hidden_size: int = 576
    """The width of the residual stream."""
    intermediate_size: int = 1536
    """The width inside the MLP."""
    num_hidden_layers: int = 30
    """Decoder layers."""
    num_attention_heads: int = 9
    """Query heads."""
    num_key_value_heads: int | None = 3
    """Key/value heads (``None``: as many as query heads); each serves
    ``num_attention_heads / num_key_value_heads`` query heads."""
    head_dim: int | None = None
    """The width of one head (``None``: ``hidden_size / num_attention_heads``)."""
    max_position_embeddings: int = 2048
    """The longest sequence."""
    rms_norm_eps: float = 1e-5
    """The ``eps`` of every RMS norm."""
    rope_theta: float = 10000.0
    """The base of the rotary frequencies."""
    rope_scaling: Mapping[str, Any] | None = None
    """transformers' ``rope_parameters``/``rope_scaling`` for ``rope_type`` ``"llama3"``;
    ``None`` (or ``"default"``): no scaling. Other types are refused."""
    tie_word_embeddings: bool = True
    """True: ``lm_head`` is ``embed_tokens``'s weight; False: a weight of its own."""
    attention_bias: bool = False
    """Llama's: biases on q, k, v and o."""
    qkv_bias: bool = False
    """Qwen2's: biases on q, k and v only."""
    mlp_bias: bool = False
    """Biases on the MLP's three projections."""
    sliding_window: int | None = None
    """Each query sees at most this many keys (itself included) on the sliding layers."""
    layer_types: tuple[str, ...] | None = None
    """``"full_attention"`` or ``"sliding_attention"`` per layer; ``None``: every layer slides
    when ``sliding_window`` is set (Mistral)."""
    model_type: str = "llama"
    """``"llama"``, ``"mistral"`` or ``"qwen2"``: what ``save_pretrained`` writes."""

    def __post_init__(self) -> None:
        where = "LlamaConfig"
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            _checks.positive_int(where, name, getattr(self, name))
        for name in ("num_key_value_heads", "head_dim", "sliding_window"):
            if getattr(self, name) is not None:
                _checks.positive_int(where, name, getattr(self, name))
        heads, kv = self.num_attention_heads, self.key_value_heads
        if heads % kv:
            raise ValueError(
                f"{where}: num_attention_heads {heads} must be a multiple of "
                f"num_key_value_heads {kv}"
            )
        if self.head_dim is None and self.hidden_size % heads:
            raise ValueError(
                f"{where}: hidden_size {self.hidden_size} must divide by num_attention_heads "
                f"{heads} (or give head_dim)"
            )
        if self.head_size % 2:
            raise ValueError(f"{where}: head_dim {self.head_size} must be even for rotary pairs")
        _checks.real(where, "rms_norm_eps", self.rms_norm_eps, 0.0)
        theta = _checks.real(where, "rope_theta", self.rope_theta, 0.0)
        if theta <= 0:
            raise ValueError(f"{where}: rope_theta must be > 0, got {self.rope_theta}")
        check_scaling(where, self.rope_scaling)  # refused here, by name, not at the first forward
        for name in ("tie_word_embeddings", "attention_bias", "qkv_bias", "mlp_bias"):
            _checks.flag(where, name, getattr(self, name))
        if self.layer_types is not None and (
            not isinstance(self.layer_types, tuple)
            or len(self.layer_types) != self.num_hidden_layers
            or any(kind not in _LAYER_TYPES for kind in self.layer_types)
        ):
            raise ValueError(
                f"{where}: layer_types must be a tuple of {self.num_hidden_layers} entries "
                f"from {_LAYER_TYPES}, got {self.layer_types!r}"
            )
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"{where}: model_type must be one of {MODEL_TYPES}, got {self.model_type!r}"
            )

    @property
    def key_value_heads(self) -> int:
        """``num_key_value_heads``, or ``num_attention_heads`` when it is ``None``."""
        kv = self.num_key_value_heads
        return self.num_attention_heads if kv is None else kv

    @property
    def head_size(self) -> int:
        """``head_dim``, or ``hidden_size / num_attention_heads`` when it is ``None``."""
        return (
            self.hidden_size // self.num_attention_heads if self.head_dim is None else self.head_dim
        )

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer``, or ``None`` for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every leaf's dotted name and shape (Linear weights ``[in, out]``), in the order they
        are made."""
        c, d = self.hidden_size, self.head_size
        q, kv, f = self.num_attention_heads * d, self.key_value_heads * d, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, c)}
        for i in range(self.num_hidden_layers):
            layer = f"model.layers.{i}"
            shapes[f"{layer}.input_layernorm.weight"] = (c,)
            for name, (n_in, n_out), bias in (
                ("self_attn.q_proj", (c, q), self.attention_bias or self.qkv_bias),
                ("self_attn.k_proj", (c, kv), self.attention_bias or self.qkv_bias),
                ("self_attn.v_proj", (c, kv), self.attention_bias or self.qkv_bias),
                ("self_attn.o_proj", (q, c), self.attention_bias),
                ("mlp.gate_proj", (c, f), self.mlp_bias),
                ("mlp.up_proj", (c, f), self.mlp_bias),
                ("mlp.down_proj", (f, c), self.mlp_bias),
            ):
                shapes[f"{layer}.{name}.weight"] = (n_in, n_out)
                if bias:
                    shapes[f"{layer}.{name}.bias"] = (n_out,)
            shapes[f"{layer}.post_attention_layernorm.weight"] = (c,)
        shapes["model.norm.weight"] = (c,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (c, self.vocab_size)
        return shapes

    def to_json(self) -> dict[str, Any]:
        """The ``config.json`` transformers writes for this model (what ``save_pretrained``
        writes)."""
        architecture = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
        }
        found: dict[str, Any] = {
            "architectures": [architecture[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "sliding_window": self.sliding_window,
        }
        if self.head_dim is not None:
            found["head_dim"] = self.head_dim
        if self.model_type == "llama":
            found.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "qwen2":
            found.update(
                use_sliding_window=self.sliding_window is not None,
                max_window_layers=0,
            )
            if self.layer_types is not None:
                found["layer_types"] = list(self.layer_types)
        return found


# --- the modules, under transformers' names ------------------------------------------------------


def _linear(
    graph: Graph, weights: Weights, name: str, shape: tuple[int, int], bias: bool
) -> Linear | NF4Linear:
    b = weights(f"{name}.bias", shape[1:]) if bias else None
    return linear_layer(graph, weights(f"{name}.weight", shape), b, name=name)


def _norm(graph: Graph, weights: Weights, name: str, config: LlamaConfig) -> RMSNorm:
    weight = weights(f"{name}.weight", (config.hidden_size,))
    return RMSNorm(graph.parameter(weight, f"{name}.weight"), config.rms_norm_eps, name)


def _heads(graph: Graph, x: NodeId, heads: int, group: int, d: int) -> NodeId:
    """``[..., T, heads * group * d]`` -> ``[..., heads, group, T, d]``."""
    *lead, t, _ = x.shape
    if t == 1:  # one token (generation): moving an axis of size 1 is a reshape alone
        return graph.reshape(x, (*lead, heads, group, 1, d))
    split = graph.reshape(x, (*lead, t, heads, group, d))
    n = len(lead)
    return graph.transpose(split, (*range(n), n + 1, n + 2, n, n + 3))


class LlamaAttention:
    """Grouped-query attention with rotary positions: ``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``."""

    def __init__(
        self, graph: Graph, weights: Weights, name: str, config: LlamaConfig, layer: int
    ) -> None:
        c, d = config.hidden_size, config.head_size
        q, kv = config.num_attention_heads * d, config.key_value_heads * d
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj: Any = _linear(graph, weights, f"{name}.q_proj", (c, q), qkv_bias)
        self.k_proj: Any = _linear(graph, weights, f"{name}.k_proj", (c, kv), qkv_bias)
        self.v_proj: Any = _linear(graph, weights, f"{name}.v_proj", (c, kv), qkv_bias)
        self.o_proj: Any = _linear(graph, weights, f"{name}.o_proj", (q, c), config.attention_bias)
        self.config = config
        self.layer = layer

    def forward(
        self,
        graph: Graph,
        x: NodeId,
        positions: Data,
        mask: Data | None,
        *,
        causal: bool = False,
        cache: generation.Cache | None = None,
        fused: bool = False,
    ) -> NodeId:
        """``x [..., T, C] -> [..., T, C]``: queries grouped ``[..., kv heads, group, T, d]``,
        keys and values ``[..., kv heads, 1, T, d]``, both rotated at ``positions`` (``[..., T]``
        or ``[T]``, an array or an integer data node), attention with ``mask`` (``[..., 1, 1,
        Tq, Tk]``, over the head axes: ``generation.for_heads``) and/or ``causal``."""
        config = self.config
        kv, d = config.key_value_heads, config.head_size
        group = config.num_attention_heads // kv
        q = _heads(graph, self.q_proj.forward(graph, x, fused=fused), kv, group, d)
        k = _heads(graph, self.k_proj.forward(graph, x, fused=fused), kv, 1, d)
        v = _heads(graph, self.v_proj.forward(graph, x, fused=fused), kv, 1, d)
        q = graph.rope(q, positions, theta=config.rope_theta, scaling=config.rope_scaling)
        k = graph.rope(k, positions, theta=config.rope_theta, scaling=config.rope_scaling)
        y = generation.attend(
            graph, q, k, v, layer=self.layer, cache=cache, mask=mask, causal=causal
        )  # (..., kv, group, T, d)
        *lead, _, _, t, _ = y.shape
        if t > 1:  # back to [..., T, heads, d] (for one token, the reshape alone does it)
            n = len(lead)
            y = graph.transpose(y, (*range(n), n + 2, n, n + 1, n + 3))
        y = graph.reshape(y, (*lead, t, config.num_attention_heads * d))
        return self.o_proj.forward(graph, y, fused=fused)  # type: ignore[no-any-return]


class LlamaMLP:
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, graph: Graph, weights: Weights, name: str, config: LlamaConfig) -> None:
        c, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj: Any = _linear(graph, weights, f"{name}.gate_proj", (c, f), bias)
        self.up_proj: Any = _linear(graph, weights, f"{name}.up_proj", (c, f), bias)
        self.down_proj: Any = _linear(graph, weights, f"{name}.down_proj", (f, c), bias)

    def forward(self, graph: Graph, x: NodeId, *, fused: bool = False) -> NodeId:
        """``x [..., C] -> [..., C]``."""
        gate = graph.silu(self.gate_proj.forward(graph, x, fused=fused))
        h = graph.mul(gate, self.up_proj.forward(graph, x, fused=fused))
        return self.down_proj.forward(graph, h, fused=fused)  # type: ignore[no-any-return]


class LlamaDecoderLayer:
    """``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``."""

    def __init__(
        self, graph: Graph, weights: Weights, name: str, config: LlamaConfig, layer: int
    ) -> None:
        self.input_layernorm = _norm(graph, weights, f"{name}.input_layernorm", config)
        self.self_attn = LlamaAttention(graph, weights, f"{name}.self_attn", config, layer)
        self.post_attention_layernorm = _norm(
            graph, weights, f"{name}.post_attention_layernorm", config
        )
        self.mlp = LlamaMLP(graph, weights, f"{name}.mlp", config)

    def forward(
        self,
        graph: Graph,
        x: NodeId,
        positions: Data,
        mask: Data | None,
        *,
        causal: bool = False,
        cache: generation.Cache | None = None,
        fused: bool = False,
    ) -> NodeId:
        """``x [..., T, C] -> [..., T, C]``."""
        h = self.input_layernorm.forward(graph, x)
        h = self.self_attn.forward(
            graph, h, positions, mask, causal=causal, cache=cache, fused=fused
        )
        x = graph.add(x, h)
        h = self.mlp.forward(graph, self.post_attention_layernorm.forward(graph, x), fused=fused)
        return graph.add(x, h)


class LlamaModel:
    """The decoder without its head: ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(self, graph: Graph, weights: Weights, config: LlamaConfig) -> None:
        shape = (config.vocab_size, config.hidden_size)
        name = "model.embed_tokens"
        self.embed_tokens = Embedding(
            graph.parameter(weights(f"{name}.weight", shape), f"{name}.weight"), *shape, name
        )
        self.layers = [
            LlamaDecoderLayer(graph, weights, f"model.layers.{i}", config, i)
            for i in range(config.num_hidden_layers)
        ]
        self.norm = _norm(graph, weights, "model.norm", config)

    def forward(
        self,
        graph: Graph,
        ids: Data,
        positions: Data,
        masks: Sequence[Data | None],
        *,
        causal: bool = False,
        cache: generation.Cache | None = None,
        fused: bool = False,
    ) -> NodeId:
        """Token ids ``[..., T]`` at ``positions`` -> normed hidden states ``[..., T, C]``;
        ``masks`` holds each layer's attention mask (``[..., Tq, Tk]`` or ``None``)."""
        x = self.embed_tokens.forward(graph, ids)
        for layer, mask in zip(self.layers, masks, strict=True):
            x = layer.forward(graph, x, positions, mask, causal=causal, cache=cache, fused=fused)
        return self.norm.forward(graph, x)


class Llama(Generates):
    """A Llama-family language model (transformers' ``LlamaForCausalLM``,
    ``MistralForCausalLM``, ``Qwen2ForCausalLM``).

    Build one with ``Llama.new(graph, config)`` (fresh weights) or ``gl.from_pretrained(graph,
    path)``. ``forward(graph, ids, attention_mask=None)`` returns logits ``[..., T, vocab]``;
    ``generate`` continues prompts. ``apply_lora`` puts adapters on ``q_proj`` and ``v_proj`` by
    default, as PEFT does for Llama.
    """

    default_lora_targets = ("q_proj", "v_proj")
    """The layers ``apply_lora`` adapts when given no ``target_modules`` (PEFT's for Llama)."""
    output_layer = "lm_head"
    """The output head, which ``apply_lora``'s ``"all-linear"`` leaves out (as PEFT)."""

    def __init__(self, graph: Graph, config: LlamaConfig, weights: Weights) -> None:
        check_graph("Llama", graph)
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama: config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.model = LlamaModel(graph, weights, config)
        self.lm_head: Any
        if config.tie_word_embeddings:
            self.lm_head = TiedHead(self.model.embed_tokens)
        else:
            shape = (config.hidden_size, config.vocab_size)
            self.lm_head = _linear(graph, weights, "lm_head", shape, False)

    head_axes = 2
    """Attention's head axes ahead of ``[T, d]``: ``[kv heads, group]``."""

    @property
    def context_length(self) -> int:
        """The longest sequence: ``max_position_embeddings``."""
        return self.config.max_position_embeddings

    @property
    def windows(self) -> list[int | None]:
        """Each layer's sliding window, or ``None`` for full attention."""
        return [self.config.window(i) for i in range(self.config.num_hidden_layers)]

    @property
    def vocab_size(self) -> int:
        """The logits' last axis."""
        return self.config.vocab_size

    @classmethod
    def new(cls, graph: Graph, config: LlamaConfig, *, rng: _checks.Rng = None) -> Llama:
        """A model with fresh weights, drawn as transformers draws them: N(0, 0.02) for
        embeddings and Linear weights, zero biases, unit norm weights."""
        generator = _checks.as_generator("Llama.new", rng)

        def weights(name: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
            if name.endswith(".bias"):
                return np.zeros(shape)
            if "norm" in name:
                return np.ones(shape)
            return generator.normal(0.0, 0.02, size=shape)

        return cls(graph, config, weights)

    @classmethod
    def from_pretrained(
        cls,
        graph: Graph,
        path: str | os.PathLike[str],
        *,
        quantize: str | NF4Config | None = None,
    ) -> Llama:
        """Read a Llama, Mistral or Qwen2 checkpoint written by transformers' ``save_pretrained``
        (see ``gl.from_pretrained``, which dispatches here on ``model_type``).

        ``quantize="nf4"`` (or a ``gl.nf4.NF4Config``) reads the model as bitsandbytes'
        ``load_in_4bit`` does: every linear layer becomes an ``NF4Linear``, its weight
        quantized as it is read (so no float copy of the model exists); embeddings, norms and
        the head stay float.
        """
        where = "Llama.from_pretrained"
        check_graph(where, graph)
        quantized = NF4Config.of(where, quantize)
        directory = checkpoint.folder(where, path)
        config = read_config(where, directory)
        with (
            quantized_linears(quantized, skip=("lm_head",)),
            checkpoint.open_model(
                where,
                directory,
                config.shapes,
                layers=(r"model\.layers\.(\d+)\.", config.num_hidden_layers, "num_hidden_layers"),
                skip=_skipped if config.tie_word_embeddings else _rotary_buffer,
                transpose=_transposed,
                about=f"its config {config}",
            ) as weights,
        ):
            return cls(graph, config, weights)

    def forward(
        self,
        graph: Graph,
        ids: NodeId | npt.ArrayLike,
        attention_mask: npt.ArrayLike | None = None,
        *,
        fused: bool = False,
    ) -> NodeId:
        """Token ids ``[..., T]`` -> logits ``[..., T, vocab_size]``.

        ``attention_mask`` (``[..., T]``, 1 for a token, 0 for padding, as transformers') lets
        left-padded rows give the logits they give alone: positions count real tokens only, and
        no token attends to padding. ``fused=True`` records each Linear and LoRA layer as one op.

        Raises
        ------
        ValueError
            For a sequence longer than ``max_position_embeddings``, ids outside
            ``[0, vocab_size)``, or a mask that is not 0/1.
        ShapeError, TypeError
            For ids that are not an integer array of at least one axis, or a mask of another
            shape.
        """
        where = "Llama.forward"
        checked = token_ids(where, ids)
        shape = tuple(checked.shape)
        check_length(where, shape[-1], self.context_length, "max_position_embeddings")
        config = self.config
        layers = range(config.num_hidden_layers)
        if attention_mask is None:
            positions = np.arange(shape[-1])
            masks = [
                None
                if (w := config.window(i)) is None or w >= shape[-1]
                else generation.for_heads(
                    generation.attention_mask(np.ones(shape[-1:], bool), shape[-1], w),
                    self.head_axes,
                )
                for i in layers
            ]
            causal = True
        else:
            keep = generation.check_mask(where, attention_mask, shape)
            positions = generation.positions_from_mask(keep)
            made = {
                w: generation.for_heads(
                    generation.attention_mask(keep, shape[-1], w), self.head_axes
                )
                for w in set(self.windows)
            }
            masks = [made[w] for w in self.windows]
            causal = False
        x = self.model.forward(graph, checked, positions, masks, causal=causal, fused=fused)
        return self.lm_head.forward(graph, x, fused=fused)  # type: ignore[no-any-return]

    def forward_cached(
        self,
        graph: Graph,
        ids: Data,
        positions: Data,
        masks: Sequence[Data],
        cache: generation.Cache,
    ) -> NodeId:
        """The pass ``generate`` makes: new tokens ``ids [B, t]`` at ``positions [B, t]``, each
        layer's attention with its ``masks`` entry (over the cached keys and the new ones,
        ``[B, 1, 1, t, past + t]``), the cache extended; the last position's logits
        ``[B, vocab]``."""
        x = self.model.forward(graph, ids, positions, masks, cache=cache)
        return self.lm_head.forward(graph, graph.getitem(x, (slice(None), -1)))  # type: ignore[no-any-return]

    def save_pretrained(
        self, graph: Graph, path: str | os.PathLike[str], *, overwrite: bool = False
    ) -> None:
        """Write ``config.json`` and ``model.safetensors`` as transformers' ``save_pretrained``
        does, so that its ``from_pretrained`` loads the model with the same logits; see
        ``gl.nn.save_pretrained``."""
        checkpoint.save_pretrained(
            "Llama.save_pretrained",
            self,
            graph,
            path,
            self.config.to_json(),
            expected=self.config.shapes(),
            transpose=_transposed,
            overwrite=overwrite,
        )

    def __repr__(self) -> str:
        return f"Llama({self.config})"


def _transposed(name: str) -> bool:
    """The leaves stored ``[out, in]`` in the files: every Linear weight."""
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def _rotary_buffer(name: str) -> bool:
    """Old checkpoints' ``rotary_emb.inv_freq`` buffers (recomputed here)."""
    return name.endswith(".rotary_emb.inv_freq")


def _skipped(name: str) -> bool:
    """A rotary buffer, and a saved ``lm_head`` when it is tied."""
    return _rotary_buffer(name) or name == "lm_head.weight"


def read_config(where: str, directory: Path) -> LlamaConfig:
    """The LlamaConfig of a transformers ``config.json``, refusing by name what graphlora cannot
    honour (another activation, a rope type it does not implement, heads that do not group)."""
    file = directory / "config.json"
    raw = checkpoint.read_json(where, file)
    kind = raw.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"{where}: {file} is a {kind!r} model; Llama reads {MODEL_TYPES}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(
            f"{where}: {file} has hidden_act={act!r}; graphlora's Llama implements 'silu'"
        )
    for key, accepted in (("pretraining_tp", 1), ("partial_rotary_factor", 1.0)):
        if raw.get(key, accepted) not in (accepted, None):
            raise ValueError(
                f"{where}: {file} has {key}={raw[key]!r}; graphlora's Llama supports {accepted!r}"
            )
    parameters = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    if isinstance(parameters, Mapping):
        theta = parameters.get("rope_theta", theta)
        scaling = parameters
    sliding = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if kind == "qwen2":
        if not raw.get("use_sliding_window", False):
            sliding, layer_types = None, None
        elif layer_types is None:
            first = raw.get("max_window_layers", 28)
            count = raw.get("num_hidden_layers")
            if isinstance(count, int) and isinstance(first, int) and 0 < count <= 10_000:
                layer_types = [
                    "sliding_attention" if i >= first else "full_attention" for i in range(count)
                ]
    elif kind == "llama":
        sliding, layer_types = None, None
    values = {
        "vocab_size": raw.get("vocab_size"),
        "hidden_size": raw.get("hidden_size"),
        "intermediate_size": raw.get("intermediate_size"),
        "num_hidden_layers": raw.get("num_hidden_layers"),
        "num_attention_heads": raw.get("num_attention_heads"),
        "num_key_value_heads": raw.get("num_key_value_heads"),
        "head_dim": raw.get("head_dim"),
        "max_position_embeddings": raw.get("max_position_embeddings", 2048),
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
        "rope_theta": 10000.0 if theta is None else theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": raw.get("tie_word_embeddings", False),  # the three types' default
        "attention_bias": raw.get("attention_bias", False) if kind == "llama" else False,
        "qkv_bias": kind == "qwen2",
        "mlp_bias": raw.get("mlp_bias", False) if kind == "llama" else False,
        "sliding_window": sliding,
        "layer_types": None if layer_types is None else _tuple(layer_types),
        "model_type": kind,
    }
    try:
        config = LlamaConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {file}: {error}") from None
    return config


def _tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value
