"""Small module helpers: ``Linear``, ``MLP``, and ``apply_lora`` to put LoRA adapters on a model.

A model here is a plain object holding NodeIds of one ``Graph``; ``forward(graph, x)`` records its
ops. ``apply_lora`` freezes a model's weights and swaps the targeted ``Linear`` layers for
``LoraLinear`` layers over the same weights, so the model's forward then trains only the adapters.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from graphlora import _checks
from graphlora.errors import ShapeError
from graphlora.functional import linear_init
from graphlora.graph import Graph, NodeId, check_graph
from graphlora.lora import LoraConfig, LoraLinear

__all__ = ["ACTIVATIONS", "MLP", "Linear", "apply_lora", "trainable_parameters"]

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

    @classmethod
    def new(
        cls,
        graph: Graph,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        rng: np.random.Generator | int | None = None,
        name: str = "linear",
    ) -> Linear:
        """A layer initialised like ``torch.nn.Linear``: weight and bias ~ U(-1/√in, 1/√in)."""
        check_graph("Linear.new", graph)
        generator = _checks.as_generator("Linear.new", rng)
        weight, bias_value = linear_init(
            in_features, out_features, bias=bias, rng=generator, where="Linear.new"
        )
        bias_node = None
        if bias_value is not None:
            bias_node = graph.parameter(bias_value, name=f"{name}.bias")
        return cls(
            graph.parameter(weight, name=f"{name}.weight"),
            bias_node,
            in_features,
            out_features,
            name,
        )

    def forward(self, graph: Graph, x: NodeId) -> NodeId:
        """``x [..., in] -> [..., out]``."""
        if isinstance(x, NodeId) and (x.shape[-1:] != (self.in_features,)):
            raise ShapeError(
                f"Linear.forward: {self.name} takes [..., {self.in_features}] but the input has "
                f"shape {x.shape}"
            )
        y = graph.matmul(x, self.weight)
        return y if self.bias is None else graph.add(y, self.bias)

    def nodes(self) -> list[NodeId]:
        """Every leaf of the layer."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]


Layer = Linear | LoraLinear


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
        rng: np.random.Generator | int | None = None,
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
        self.layers: list[Layer] = [
            Linear.new(graph, n_in, n_out, bias=bias, rng=generator, name=f"layers.{i}")
            for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes))
        ]

    def forward(self, graph: Graph, x: NodeId, *, fused: bool = False) -> NodeId:
        """Run every layer, with the activation between layers.

        ``fused=True`` records each ``LoraLinear`` as one ``lora_linear`` node (see
        ``LoraLinear.forward``); plain ``Linear`` layers are unaffected.
        """
        act = ACTIVATIONS[self.activation]
        for i, layer in enumerate(self.layers):
            if isinstance(layer, LoraLinear):
                x = layer.forward(graph, x, fused=fused)
            else:
                x = layer.forward(graph, x)
            if i < len(self.layers) - 1:
                x = act(graph, x)
        return x

    def named_layers(self) -> dict[str, Layer]:
        """``{"layers.0": ..., ...}``: a ``Linear`` or, after ``apply_lora``, a ``LoraLinear``."""
        return {f"layers.{i}": layer for i, layer in enumerate(self.layers)}

    def parameters(self) -> list[NodeId]:
        """The leaves that currently receive gradients (after ``apply_lora``: only A and B)."""
        return [node for node in _leaves(self.layers) if node.requires_grad]

    def print_trainable_parameters(self) -> None:
        """Print PEFT's one-line report: trainable, all, and the trainable percentage."""
        print(trainable_parameters(self))

    def __repr__(self) -> str:
        inner = ",\n".join(f"  ({name}): {layer!r}" for name, layer in self.named_layers().items())
        return f"MLP(activation={self.activation!r},\n{inner}\n)"


def _leaves(layers: Sequence[Layer]) -> list[NodeId]:
    nodes: list[NodeId] = []
    for layer in layers:
        if isinstance(layer, LoraLinear):
            nodes += [layer.frozen_weight, layer.lora_a, layer.lora_b]
            nodes += [] if layer.bias is None else [layer.bias]
        else:
            nodes += layer.nodes()
    return nodes


def trainable_parameters(model: MLP) -> str:
    """``"trainable params: 1,234 || all params: 5,678 || trainable%: 21.7328"``, as PEFT."""
    leaves = _leaves(model.layers)
    total = sum(math.prod(node.shape) for node in leaves)
    trainable = sum(math.prod(node.shape) for node in leaves if node.requires_grad)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"


def apply_lora(
    model: MLP,
    config: LoraConfig,
    targets: Sequence[str] | None = None,
    *,
    rng: np.random.Generator | None = None,
) -> dict[str, LoraLinear]:
    """Freeze the model's weights and put a LoRA adapter on the targeted ``Linear`` layers.

    Parameters
    ----------
    model
        An ``MLP``; its layers are replaced in place.
    config
        The adapters' config.
    targets
        Layer names (from ``model.named_layers()``); ``None``: every ``Linear`` layer.
    rng
        Generator for the adapters' init, in layer order (default: from ``config.seed``).

    Returns
    -------
    dict
        ``{name: LoraLinear}`` for the new adapters. The model's forward now uses them.

    Raises
    ------
    ValueError
        For an unknown target or one that already carries an adapter (nothing is changed).
    """
    if not isinstance(model, MLP):
        raise TypeError(f"apply_lora: model must be an MLP, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"apply_lora: config must be a LoraConfig, got {type(config).__name__}")
    named = model.named_layers()
    if targets is None:
        names = [name for name, layer in named.items() if isinstance(layer, Linear)]
    elif isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"apply_lora: targets must be a list of layer names, got {targets!r}")
    else:
        names = list(targets)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"apply_lora: unknown target(s) {unknown}; the model has {list(named)}")
    adapted = [n for n in names if isinstance(named[n], LoraLinear)]
    if adapted:
        raise ValueError(f"apply_lora: {adapted} already carry a LoRA adapter")
    too_small = [n for n in names if config.rank > min(named[n].in_features, named[n].out_features)]
    if too_small:
        raise ValueError(
            f"apply_lora: rank {config.rank} exceeds min(in, out) of layer(s) {too_small}"
        )
    graph = model.graph
    generator = _checks.as_generator("apply_lora", config.seed if rng is None else rng)
    adapters: dict[str, LoraLinear] = {}
    for i, (name, layer) in enumerate(named.items()):
        if name in names:
            assert isinstance(layer, Linear)
            lora = LoraLinear.from_linear(
                graph, layer.weight, layer.bias, config, rng=generator, name=name
            )
            model.layers[i] = adapters[name] = lora
        elif isinstance(layer, Linear):
            for node in layer.nodes():
                graph.requires_grad_(node, False)
    return adapters
