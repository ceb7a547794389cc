"""Layers: ``Linear`` (and ``NF4Linear``, its frozen 4-bit form), ``Embedding``, ``LayerNorm``,
``RMSNorm``, and ``MLP`` made of them.

Each layer is a plain dataclass of NodeIds of one ``Graph`` with a ``forward(graph, x, *,
fused=False)`` that records its ops: every layer, LoRA layers included, takes ``fused`` (one
node instead of several where the layer has a fused form; ignored where it has none), so a model
calls any layer the same way. ``new`` builds one with fresh weights initialised as PyTorch
initialises the same layer. Weights are laid out the way the maths reads: ``Linear.weight`` is
``[in, out]``.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.errors import ShapeError
from graphlora.lora import LoraLinear
from graphlora.lora.functional import linear_init
from graphlora.lora.nf4 import NF4Config, NF4Weight, nf4_linear
from graphlora.nn.tree import named_modules, parameters, trainable_parameters

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "Embedding",
    "LayerNorm",
    "Linear",
    "NF4Linear",
    "RMSNorm",
    "TiedHead",
    "linear_layer",
    "quantized_linears",
]

ACTIVATIONS: dict[str, Callable[[Graph, NodeId], NodeId]] = {
    "relu": Graph.relu,
    "tanh": Graph.tanh,
    "sigmoid": Graph.sigmoid,
    "gelu": lambda graph, x: graph.gelu(x),
}
"""The activations ``MLP`` accepts, by name."""


@dataclass(eq=False)
class Linear:
    """``y = x @ weight + bias``: a trainable ``weight [in, out]``, an optional ``bias [out]``."""

    weight: NodeId
    bias: NodeId | None
    in_features: int
    out_features: int
    name: str = "linear"
    fan_in_fan_out: bool = False
    """True when the framework the weights come from stores them ``[in, out]`` too (GPT-2's
    ``Conv1D``); adapter files then say so, as PEFT's ``fan_in_fan_out``."""

    @classmethod
    def new(
        cls,
        graph: Graph,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        rng: _checks.Rng = None,
        name: str = "linear",
    ) -> Linear:
        """A layer initialised like ``torch.nn.Linear``: weight and bias ~ U(-1/√in, 1/√in)."""
        check_graph("Linear.new", graph)
        generator = _checks.as_generator("Linear.new", rng)
        weight, bias_value = linear_init(
            in_features, out_features, bias=bias, rng=generator, where="Linear.new"
        )
        return cls.from_arrays(graph, weight, bias_value, name=name)

    @classmethod
    def from_arrays(
        cls,
        graph: Graph,
        weight: npt.ArrayLike,
        bias: npt.ArrayLike | None = None,
        *,
        name: str = "linear",
        fan_in_fan_out: bool = False,
    ) -> Linear:
        """A layer over given ``weight [in, out]`` and ``bias [out]`` (copied into parameters).

        Raises
        ------
        ShapeError
            For a weight that is not 2-D, or a bias that is not ``[out]``.
        """
        where = "Linear.from_arrays"
        check_graph(where, graph)
        weight_node = graph.parameter(
            _checks.float_array(where, "weight", weight), f"{name}.weight"
        )
        if len(weight_node.shape) != 2:
            raise ShapeError(f"{where}: weight must be [in, out], got shape {weight_node.shape}")
        in_features, out_features = weight_node.shape
        bias_array = _bias(where, bias, weight_node.shape)
        bias_node = None if bias_array is None else graph.parameter(bias_array, f"{name}.bias")
        return cls(weight_node, bias_node, in_features, out_features, name, fan_in_fan_out)

    def forward(self, graph: Graph, x: NodeId, *, fused: bool = False) -> NodeId:
        """``x [..., in] -> [..., out]``: ``matmul`` then ``add`` (the bias), or with
        ``fused=True`` one ``linear`` node, which saves a pass and an array of the output's size.
        """
        if isinstance(x, NodeId) and (x.shape[-1:] != (self.in_features,)):
            raise ShapeError(
                f"Linear.forward: {self.name} takes [..., {self.in_features}] but the input has "
                f"shape {x.shape}"
            )
        if fused:
            return graph.linear(x, self.weight, self.bias)
        y = graph.matmul(x, self.weight)
        return y if self.bias is None else graph.add(y, self.bias)

    def nodes(self) -> list[NodeId]:
        """Every leaf of the layer."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]


@dataclass(eq=False)
class NF4Linear:
    """A frozen linear layer held in 4 bits, as bitsandbytes' ``Linear4bit``: ``y = x @ Wᵀ +
    bias`` with ``W = weight.dequantize()``, the ``NF4Weight`` ``[out, in]`` (PyTorch's layout,
    so the codes are bitsandbytes'), dequantized a few rows at a time inside the ``nf4_linear``
    op in forward and backward. The weight is no leaf and gets no gradient; ``bias`` is a leaf
    as in ``Linear``. ``apply_lora`` puts adapters over it (QLoRA)."""

    weight: NF4Weight
    bias: NodeId | None
    in_features: int
    out_features: int
    graph: Graph
    name: str = "linear"
    fan_in_fan_out: bool = False
    """As ``Linear``'s: the framework stores the float weight ``[in, out]`` (GPT-2's
    ``Conv1D``); the codes are of ``[out, in]`` all the same, as bitsandbytes'."""

    @classmethod
    def from_arrays(
        cls,
        graph: Graph,
        weight: npt.ArrayLike,
        bias: npt.ArrayLike | None = None,
        *,
        name: str = "linear",
        fan_in_fan_out: bool = False,
        quantize: str | NF4Config = "nf4",
    ) -> NF4Linear:
        """A layer over ``weight [in, out]`` (quantized as ``[out, in]``) and ``bias [out]``
        (a parameter, as ``Linear``'s).

        Raises
        ------
        ShapeError
            For a weight that is not 2-D and non-empty, or a bias that is not ``[out]``.
        ValueError
            For a bad ``quantize`` or non-finite weights.
        """
        where = "NF4Linear.from_arrays"
        check_graph(where, graph)
        config = NF4Config.of(where, quantize) or NF4Config()
        array = _checks.float_array(where, "weight", weight)
        if array.ndim != 2 or array.size == 0:
            raise ShapeError(f"{where}: weight must be [in, out], got shape {array.shape}")
        in_features, out_features = array.shape
        bias_array = _bias(where, bias, array.shape)
        nf4 = NF4Weight.quantize(array.T, config.block_size, double_quant=config.double_quant)
        bias_node = None if bias_array is None else graph.parameter(bias_array, f"{name}.bias")
        return cls(nf4, bias_node, in_features, out_features, graph, name, fan_in_fan_out)

    def forward(self, graph: Graph, x: NodeId, *, fused: bool = False) -> NodeId:
        """``x [..., in] -> [..., out]``: ``nf4_linear`` then ``add`` (the bias); ``fused`` is
        ignored (there is no fused form)."""
        if isinstance(x, NodeId) and (x.shape[-1:] != (self.in_features,)):
            raise ShapeError(
                f"NF4Linear.forward: {self.name} takes [..., {self.in_features}] but the input "
                f"has shape {x.shape}"
            )
        y = graph.apply(nf4_linear, x, weight=self.weight)
        return y if self.bias is None else graph.add(y, self.bias)

    def dequantize(self, dtype: npt.DTypeLike = np.float64) -> npt.NDArray[Any]:
        """The float weight in the graph's layout, ``[in, out]``."""
        weight: npt.NDArray[Any] = self.weight.dequantize(dtype).T
        return weight

    def nodes(self) -> list[NodeId]:
        """Every leaf of the layer: the bias, if any."""
        return [] if self.bias is None else [self.bias]

    def __repr__(self) -> str:
        return (
            f"NF4Linear(name={self.name!r}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight={self.weight!r})"
        )


def _bias(where: str, bias: object, weight_shape: tuple[int, ...]) -> npt.NDArray[Any] | None:
    """``bias`` as a float array ``[out]`` for a weight ``[in, out]``, or None; else an error
    naming ``where`` and both shapes."""
    if bias is None:
        return None
    array = _checks.float_array(where, "bias", bias)
    if array.shape != weight_shape[1:]:
        raise ShapeError(
            f"{where}: bias has shape {array.shape}, weight {weight_shape} needs "
            f"({weight_shape[1]},)"
        )
    return array


_QUANTIZING: contextvars.ContextVar[tuple[NF4Config, tuple[str, ...]] | None] = (
    contextvars.ContextVar("quantizing", default=None)
)


@contextmanager
def quantized_linears(config: NF4Config | None, skip: Sequence[str] = ()) -> Iterator[None]:
    """Within the block, ``linear_layer`` makes ``NF4Linear`` layers (``config``) instead of
    ``Linear`` ones, except those whose name is in ``skip`` or ends with ``"." + name``: how
    ``from_pretrained(..., quantize="nf4")`` quantizes each weight as it reads it. ``None``
    changes nothing."""
    token = _QUANTIZING.set(None if config is None else (config, tuple(skip)))
    try:
        yield
    finally:
        _QUANTIZING.reset(token)


def linear_layer(
    graph: Graph,
    weight: npt.ArrayLike,
    bias: npt.ArrayLike | None,
    *,
    name: str,
    fan_in_fan_out: bool = False,
) -> Linear | NF4Linear:
    """A ``Linear`` over ``weight [in, out]`` and ``bias``, or inside ``quantized_linears`` an
    ``NF4Linear`` (the float weight then lives only as long as it takes to quantize it)."""
    found = _QUANTIZING.get()
    if found is not None:
        config, skip = found
        if not any(name == s or name.endswith("." + s) for s in skip):
            return NF4Linear.from_arrays(
                graph, weight, bias, name=name, fan_in_fan_out=fan_in_fan_out, quantize=config
            )
    return Linear.from_arrays(graph, weight, bias, name=name, fan_in_fan_out=fan_in_fan_out)


def token_ids(where: str, ids: object) -> NodeId | npt.NDArray[np.integer[Any]]:
    """``ids`` checked as a language model's input ``[..., T]``: an integer data node or array
    with at least one axis (a lone id is refused: a model needs a sequence), not ragged."""
    if isinstance(ids, NodeId):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{where}: ids must be integers, got dtype {ids.dtype}")
        if not ids.shape:
            raise ShapeError(f"{where}: ids must be [..., T] with at least one axis, got {ids!r}")
        return ids
    try:
        array = np.asarray(ids)
    except (TypeError, ValueError) as error:
        raise ShapeError(f"{where}: ids are not a regular array (ragged lists?): {error}") from None
    if array.dtype.kind == "f" and array.size == 0:
        array = array.astype(np.int64)  # an empty list reads as float64
    if array.dtype.kind not in "iu":
        raise TypeError(f"{where}: ids must be integers, got dtype {array.dtype}")
    if not array.shape:
        raise ShapeError(
            f"{where}: ids must be [..., T] with at least one axis, got the lone id {ids!r}; "
            "pass [id]"
        )
    return array


def check_length(where: str, length: int, limit: int, field: str) -> None:
    """Refuse a sequence of ``length`` tokens longer than a model's context ``limit`` (its
    config's ``field``), naming both."""
    if length > limit:
        raise ValueError(f"{where}: a sequence of {length} tokens is longer than {field} {limit}")


@dataclass(eq=False)
class Embedding:
    """A lookup table: ``weight [V, D]``; ``forward(graph, ids)`` picks rows by integer ids."""

    weight: NodeId
    num_embeddings: int
    embedding_dim: int
    name: str = "embedding"

    @classmethod
    def new(
        cls,
        graph: Graph,
        num_embeddings: int,
        embedding_dim: int,
        *,
        rng: _checks.Rng = None,
        name: str = "embedding",
    ) -> Embedding:
        """A table initialised like ``torch.nn.Embedding``: N(0, 1)."""
        where = "Embedding.new"
        check_graph(where, graph)
        rows = _checks.positive_int(where, "num_embeddings", num_embeddings)
        width = _checks.positive_int(where, "embedding_dim", embedding_dim)
        weight = _checks.as_generator(where, rng).standard_normal((rows, width))
        return cls(graph.parameter(weight, f"{name}.weight"), rows, width, name)

    def forward(self, graph: Graph, ids: NodeId | npt.ArrayLike, *, fused: bool = False) -> NodeId:
        """``ids [...] -> [..., D]`` (ids: an integer data node or array, each in ``[0, V)``)."""
        return graph.embedding(self.weight, ids)


@dataclass(eq=False)
class LayerNorm:
    """Layer norm over the last axis with a ``weight`` (ones) and optional ``bias`` (zeros)."""

    weight: NodeId
    bias: NodeId | None
    eps: float = 1e-5
    name: str = "ln"

    @classmethod
    def new(
        cls, graph: Graph, dim: int, *, eps: float = 1e-5, bias: bool = True, name: str = "ln"
    ) -> LayerNorm:
        """A fresh layer norm over ``dim`` features, as ``torch.nn.LayerNorm``."""
        where = "LayerNorm.new"
        check_graph(where, graph)
        width = _checks.positive_int(where, "dim", dim)
        eps = _checks.real(where, "eps", eps, 0.0)
        bias_node = graph.parameter(np.zeros(width), f"{name}.bias") if bias else None
        return cls(graph.parameter(np.ones(width), f"{name}.weight"), bias_node, eps, name)

    def forward(self, graph: Graph, x: NodeId, *, fused: bool = False) -> NodeId:
        """``x [..., dim]``, normalised over the last axis."""
        return graph.layer_norm(x, self.weight, self.bias, eps=self.eps)


@dataclass(eq=False)
class RMSNorm:
    """RMS norm over the last axis with a ``weight`` (ones), as Llama's ``LlamaRMSNorm``:
    ``x / sqrt(mean(x**2) + eps) * weight``."""

    weight: NodeId
    eps: float = 1e-6
    name: str = "norm"

    @classmethod
    def new(cls, graph: Graph, dim: int, *, eps: float = 1e-6, name: str = "norm") -> RMSNorm:
        """A fresh RMS norm over ``dim`` features, as ``torch.nn.RMSNorm``."""
        where = "RMSNorm.new"
        check_graph(where, graph)
        width = _checks.positive_int(where, "dim", dim)
        eps = _checks.real(where, "eps", eps, 0.0)
        return cls(graph.parameter(np.ones(width), f"{name}.weight"), eps, name)

    def forward(self, graph: Graph, x: NodeId, *, fused: bool = False) -> NodeId:
        """``x [..., dim]``, normalised over the last axis (one ``rms_norm`` op)."""
        return graph.rms_norm(x, self.weight, eps=self.eps)


class TiedHead:
    """A language model's head tied to its token embedding: ``logits = x @ embedding.weightᵀ``
    (GPT-2's ``lm_head``, and Llama's where ``tie_word_embeddings`` is set)."""

    def __init__(self, embedding: Embedding) -> None:
        self._embedding = embedding  # not a child: the weight is the embedding's

    def forward(self, graph: Graph, x: NodeId, *, fused: bool = False) -> NodeId:
        """``x [..., C] -> [..., vocab]`` (one product: ``fused`` changes nothing)."""
        return graph.matmul(x, graph.transpose(self._embedding.weight))

    def named_leaves(self) -> list[tuple[str, NodeId]]:
        """None of its own: its weight is the embedding's."""
        return []


class MLP:
    """A multilayer perceptron: ``Linear`` layers, an activation between them (not after the last).

    Parameters
    ----------
    graph
        The graph that holds the weights.
    sizes
        Layer widths, input first: ``(64, 32, 10)`` makes two layers, ``layers.0`` and ``layers.1``.
    activation
        A name from ``ACTIVATIONS``.
    rng
        Generator or seed for the weights.
    """

    def __init__(
        self,
        graph: Graph,
        sizes: Sequence[int],
        activation: str = "relu",
        rng: _checks.Rng = None,
        *,
        bias: bool = True,
    ) -> None:
        if not isinstance(sizes, Sequence) or len(sizes) < 2:
            raise ValueError(f"MLP: sizes needs at least two widths (in, out), got {sizes!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"MLP: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        check_graph("MLP", graph)
        generator = _checks.as_generator("MLP", rng)
        self.graph = graph
        self.activation = activation
        self.layers: list[Linear | LoraLinear] = [
            Linear.new(graph, n_in, n_out, bias=bias, rng=generator, name=f"layers.{i}")
            for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes))
        ]

    def forward(self, graph: Graph, x: NodeId, *, fused: bool = False) -> NodeId:
        """Run every layer, with the activation between layers.

        ``fused=True`` records each ``LoraLinear`` as one ``lora_linear`` node (see
        ``LoraLinear.forward``) and each plain ``Linear`` as one ``linear`` node.
        """
        act = ACTIVATIONS[self.activation]
        for i, layer in enumerate(self.layers):
            x = layer.forward(graph, x, fused=fused)
            if i < len(self.layers) - 1:
                x = act(graph, x)
        return x

    def named_layers(self) -> dict[str, Linear | LoraLinear]:
        """``{"layers.0": ..., ...}``: a ``Linear`` or, after ``apply_lora``, a ``LoraLinear``."""
        return {name: layer for name, layer in named_modules(self) if name}  # type: ignore[misc]

    def parameters(self) -> list[NodeId]:
        """The leaves that currently receive gradients (after ``apply_lora``: only A and B)."""
        return parameters(self)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's one-line report: trainable, all, and the trainable percentage."""
        print(trainable_parameters(self))

    def __repr__(self) -> str:
        inner = ",\n".join(f"  ({name}): {layer!r}" for name, layer in self.named_layers().items())
        return f"MLP(activation={self.activation!r},\n{inner}\n)"
