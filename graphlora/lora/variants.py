"""Choosing a variant: the ``Update`` protocol every variant class follows, and the ONE place
that reads a config to pick the class (``choose_update``).

A LoRA layer computes ``base(x) + update(x)``; the update is an object of a variant class (plain
LoRA and rsLoRA: ``LoraUpdate``; DoRA: ``DoraUpdate``; LoRA on an embedding: ``EmbeddingUpdate``;
VeRA: ``VeraUpdate``), one class per variant and layer kind, as PEFT's ``LoraVariant`` classes.
Layers, adapter files, ``apply_lora`` and weighted merges ask the update (its leaves and their
PEFT names, forward, delta, merge, whether it combines) and never test which class it is; a new
variant is a class and a row of ``VARIANTS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId
from graphlora.lora.config import LoraConfig, VeraConfig
from graphlora.lora.updates import DoraEmbeddingUpdate, DoraUpdate, EmbeddingUpdate, LoraUpdate
from graphlora.lora.vera import VeraUpdate
from graphlora.ops import Array

__all__ = [
    "VARIANTS",
    "Draft",
    "Update",
    "adapter_generator",
    "check_adapter_config",
    "check_rank",
    "choose_update",
    "draw_update",
    "make_update",
    "rank_bounded",
    "rewrites_base",
    "variant_name",
]

AdapterConfig = LoraConfig | VeraConfig


class Update(Protocol):
    """What a layer, ``graphlora.io`` and ``graphlora.nn`` ask of an adapter's update."""

    variant: ClassVar[str]
    layer_kind: ClassVar[str]
    combinable: ClassVar[bool]
    reads_output: ClassVar[bool]
    peft_flags: ClassVar[dict[str, bool]]
    peft_type: ClassVar[str]
    rng: np.random.Generator

    @property
    def config(self) -> AdapterConfig: ...
    @property
    def rank(self) -> int: ...
    @property
    def dropout(self) -> float: ...
    @property
    def lora_a(self) -> NodeId: ...
    @property
    def lora_b(self) -> NodeId: ...
    @property
    def scaling(self) -> float: ...
    def params(self) -> list[NodeId]: ...
    def named_leaves(self, adapter: str) -> list[tuple[str, NodeId]]: ...
    def state_leaves(self) -> dict[str, NodeId]: ...
    def file_leaves(self, prefix: str) -> list[tuple[str, NodeId, bool]]: ...
    def file_shared(self) -> list[tuple[str, NodeId, bool]]: ...
    def describe(self) -> str: ...
    @classmethod
    def peft_config(cls, updates: Any, fan_in_fan_out: bool) -> dict[str, Any]: ...
    def record(self, graph: Graph, x: Any, layer: Any, base: NodeId) -> NodeId: ...
    def fused(self, graph: Graph, x: NodeId, layer: Any) -> NodeId | None: ...
    def delta(self, graph: Graph) -> Array: ...
    def merged_weight(self, graph: Graph, weight: Array, base: Array) -> Array: ...
    def bias_delta(self, graph: Graph) -> Array | None: ...


VARIANTS: dict[tuple[str, str], Any] = {
    ("lora", "linear"): LoraUpdate,
    ("lora", "embedding"): EmbeddingUpdate,
    ("dora", "linear"): DoraUpdate,
    ("dora", "embedding"): DoraEmbeddingUpdate,
    ("vera", "linear"): VeraUpdate,
}
"""Each variant's class per layer kind (as PEFT's ``DoraLinearVariant``, ...)."""


def check_adapter_config(where: str, config: object) -> AdapterConfig:
    """``config`` if it is an adapter config (``LoraConfig`` or ``VeraConfig``), else a
    ``TypeError`` naming ``where``."""
    if not isinstance(config, (LoraConfig, VeraConfig)):
        raise TypeError(
            f"{where}: config must be a LoraConfig or a VeraConfig, got {type(config).__name__}"
        )
    return config


def variant_name(config: object) -> str:
    """The variant a config asks for: the one place that reads its variant fields."""
    config = check_adapter_config("variant_name", config)
    if isinstance(config, VeraConfig):
        return "vera"
    return "dora" if config.use_dora else "lora"


def choose_update(where: str, config: object, layer_kind: str) -> Any:
    """The update class for ``config`` on a layer of ``layer_kind``, or a ``ValueError`` that
    names the variant and the kinds it supports (``TypeError`` for a config of no variant)."""
    variant = variant_name(check_adapter_config(where, config))
    if layer_kind == "embedding" and getattr(config, "lora_bias", False):
        raise ValueError(f"{where}: lora_bias=True is for linear layers, not embeddings (as PEFT)")
    found = VARIANTS.get((variant, layer_kind))
    if found is None:
        kinds = sorted(kind for name, kind in VARIANTS if name == variant)
        raise ValueError(
            f"{where}: the {variant!r} variant supports {' and '.join(kinds)} layers, not "
            f"{layer_kind} layers"
        )
    return found


def adapter_generator(where: str, config: AdapterConfig, rng: object) -> np.random.Generator:
    """The generator that draws an adapter and its dropout masks: ``rng`` (a Generator or a
    seed), else one seeded with ``config.seed``."""
    return _checks.as_generator(where, config.seed if rng is None else rng)


def check_rank(where: str, config: AdapterConfig, shape: tuple[int, ...], layer_kind: str) -> None:
    """Refuse a rank above ``min(shape)`` where it cannot exist: PiSSA's A and B are the top-rank
    singular vectors of the weight, which has only ``min(shape)``. Any other rank is accepted,
    as PEFT accepts it (A and B of rank above ``min(in, out)`` are merely redundant)."""
    if rank_bounded(config) and config.rank > min(shape):
        dims = (
            "num_embeddings, embedding_dim"
            if layer_kind == "embedding"
            else "in_features, out_features"
        )
        raise ValueError(
            f"{where}: rank {config.rank} exceeds min({dims}) = {min(shape)} for weight {shape}; "
            "init='pissa' takes that many singular vectors of the weight"
        )


def rank_bounded(config: object) -> bool:
    """Whether the rank may not exceed ``min(in, out)``: for PiSSA only, whose A and B are the
    weight's singular vectors (LoRA, DoRA and VeRA take any rank, as PEFT)."""
    return rewrites_base(config)


def rewrites_base(config: object) -> bool:
    """Whether building the adapter rewrites the base weight (PiSSA's residual)."""
    return isinstance(config, LoraConfig) and config.init == "pissa"


@dataclass(frozen=True)
class Draft:
    """An adapter drawn for a layer before its leaves exist: its class, config, what the class
    drew (``payload``), and the residual weight the layer must hold instead of its own (PiSSA),
    or None."""

    kind: Any
    config: AdapterConfig
    payload: Any
    residual: Array | None


def draw_update(
    where: str, config: object, weight: Array, rng: np.random.Generator, layer_kind: str
) -> Draft:
    """Choose the variant for ``config`` and draw its adapter for the frozen ``weight``."""
    config = check_adapter_config(where, config)
    kind = choose_update(where, config, layer_kind)
    payload, residual = kind.draw(config, weight, rng)
    return Draft(kind, config, payload, residual)


def make_update(
    graph: Graph,
    draft: Draft,
    weight: Array,
    rng: np.random.Generator,
    *,
    name: str,
    adapter: str,
    shared: object = None,
) -> Update:
    """The drafted update with its leaves, named after the layer ``name`` and the adapter;
    ``weight`` is the layer's frozen weight ``[in, out]``, ``shared`` what ``prepare`` made for
    all layers."""
    suffix = "" if adapter == "default" else f".{adapter}"
    update: Update = draft.kind.create(
        graph,
        draft.config,
        draft.payload,
        rng,
        weight=weight,
        name=name,
        suffix=suffix,
        shared=shared,
    )
    return update
