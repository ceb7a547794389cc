"""VeRA (Kopiczko et al. 2024) as PEFT computes it: one variant class, ``VeraUpdate``.

Every layer adapted by one ``apply_lora`` shares a pair of frozen random matrices, ``A [in_max,
rank]`` and ``B [rank, out_max]`` (PEFT's ``vera_A`` and ``vera_B``, stored ``[rank, in_max]`` and
``[out_max, rank]``), sized for the largest layer; each layer uses their top-left corner and
trains two vectors of its own:

    update(x) = lambda_b * ((lambda_d * (drop(x) @ A[:in])) @ B[:, :out])

with ``lambda_d [rank]`` (starting at ``d_initial``) and ``lambda_b [out]`` (starting at zero, so
the layer starts equal to the base). The update as a weight is
``(A[:in] * lambda_d) @ B[:, :out] * lambda_b``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

import numpy as np

from graphlora.engine.graph import Graph, NodeId
from graphlora.lora.config import VeraConfig
from graphlora.ops import Array

__all__ = ["VeraProjection", "VeraUpdate"]


@dataclass(eq=False)
class VeraProjection:
    """The frozen random matrices the layers of one VeRA adapter share, in graphlora's layout."""

    vera_a: NodeId
    """``A [in_max, rank]``, a constant (PEFT: ``vera_A``, stored ``[rank, in_max]``)."""
    vera_b: NodeId
    """``B [rank, out_max]``, a constant (PEFT: ``vera_B``, stored ``[out_max, rank]``)."""

    @classmethod
    def new(cls, graph: Graph, config: VeraConfig, shapes: list[tuple[int, int]]) -> VeraProjection:
        """Matrices for layers of ``shapes`` (``[in, out]`` each), drawn as PEFT draws them:
        Kaiming-uniform over PyTorch's fan-in (``U(+-sqrt(6 / in_max))`` for A,
        ``U(+-sqrt(6 / rank))`` for B), from ``projection_prng_key`` with NumPy's generator."""
        in_max = max(shape[0] for shape in shapes)
        out_max = max(shape[1] for shape in shapes)
        rank = config.rank
        generator = np.random.default_rng(config.projection_prng_key)
        bound_a, bound_b = math.sqrt(6.0 / in_max), math.sqrt(6.0 / rank)
        a = generator.uniform(-bound_a, bound_a, size=(rank, in_max)).T  # drawn as PEFT's shape
        b = generator.uniform(-bound_b, bound_b, size=(out_max, rank)).T
        with graph.scope("vera"):
            return cls(graph.constant(a, name="vera_A"), graph.constant(b, name="vera_B"))


@dataclass(eq=False)
class VeraUpdate:
    """VeRA: ``update(x) = lambda_b * ((lambda_d * (drop(x) @ A[:in])) @ B[:, :out])``, with A
    and B frozen and shared (``projection``) and ``lambda_d``, ``lambda_b`` trained.

    A VeRA layer has no ``lora_a``, ``lora_b`` or ``scaling``: they raise ``AttributeError``.
    """

    lambda_d: NodeId
    """``[rank]``, a parameter (PEFT: ``vera_lambda_d``), starting at ``d_initial``."""
    lambda_b: NodeId
    """``[out]``, a parameter (PEFT: ``vera_lambda_b``), starting at zero."""
    projection: VeraProjection
    """The shared frozen A and B."""
    config: VeraConfig
    """The adapter's config."""
    rng: np.random.Generator
    """The generator of the dropout masks."""
    in_features: int
    out_features: int

    reads_output: ClassVar[bool] = False
    variant: ClassVar[str] = "vera"
    layer_kind: ClassVar[str] = "linear"
    combinable: ClassVar[bool] = False  # lambda_b * B diag(lambda_d) A: not linear in its leaves
    peft_flags: ClassVar[dict[str, bool]] = {}
    peft_type: ClassVar[str] = "VERA"

    @classmethod
    def draw(
        cls, config: VeraConfig, weight: Array, rng: np.random.Generator
    ) -> tuple[tuple[int, int], None]:
        """Nothing random per layer: the layer's ``[in, out]``, and no residual weight."""
        in_features, out_features = weight.shape
        return (int(in_features), int(out_features)), None

    @classmethod
    def prepare(
        cls, graph: Graph, config: VeraConfig, shapes: list[tuple[int, int]]
    ) -> VeraProjection:
        """The projections the layers of ``shapes`` share."""
        return VeraProjection.new(graph, config, shapes)

    @classmethod
    def create(
        cls,
        graph: Graph,
        config: VeraConfig,
        payload: tuple[int, int],
        rng: np.random.Generator,
        *,
        weight: Array,
        name: str,
        suffix: str,
        shared: object = None,
    ) -> VeraUpdate:
        """The layer's ``lambda_d`` and ``lambda_b``, over ``shared`` projections (or new ones
        sized for this layer alone)."""
        in_features, out_features = payload
        if shared is None:
            shared = VeraProjection.new(graph, config, [payload])
        assert isinstance(shared, VeraProjection)
        with graph.scope(name), graph.scope("lora"):
            lambda_d = graph.parameter(
                np.full(config.rank, float(config.d_initial)), name=f"{name}.vera_lambda_d{suffix}"
            )
            lambda_b = graph.parameter(np.zeros(out_features), name=f"{name}.vera_lambda_b{suffix}")
        return cls(lambda_d, lambda_b, shared, config, rng, in_features, out_features)

    @classmethod
    def peft_config(cls, updates: Mapping[str, VeraUpdate], fan_in_fan_out: bool) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` of a VeRA adapter held by the layers named in
        ``updates``, or a ``ValueError`` when PEFT could not express it: layers with different
        configs or projections, or ``save_projection=False`` (PEFT would draw other projections
        from the key with PyTorch's generator)."""
        where = "save_adapter"
        configs = {update.config for update in updates.values()}
        if len(configs) > 1:
            raise ValueError(f"{where}: the VeRA layers differ in their VeraConfig; PEFT has one")
        projections = {id(update.projection) for update in updates.values()}
        if len(projections) > 1:
            raise ValueError(
                f"{where}: the VeRA layers hold different projections (adapted by separate "
                "apply_lora calls); PEFT shares one pair: save them separately"
            )
        (config,) = configs
        if not config.save_projection:
            raise ValueError(
                f"{where}: a VeRA adapter with save_projection=False cannot be saved: PEFT "
                "would draw other vera_A and vera_B from projection_prng_key with PyTorch's "
                "generator; use VeraConfig(save_projection=True)"
            )
        return {
            "peft_type": "VERA",
            "task_type": None,
            "base_model_name_or_path": None,
            "r": int(config.rank),
            "target_modules": sorted(updates),
            "projection_prng_key": int(config.projection_prng_key),
            "save_projection": True,
            "vera_dropout": float(config.dropout),
            "d_initial": float(config.d_initial),
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "modules_to_save": None,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "inference_mode": True,
        }

    # --- what a layer asks of its updates -----------------------------------------------------

    @property
    def rank(self) -> int:
        """The projections' rank."""
        return self.config.rank

    @property
    def dropout(self) -> float:
        """Dropout probability on the update's input."""
        return self.config.dropout

    def _absent(self, what: str) -> NoReturn:
        raise AttributeError(
            f"a VeRA adapter has no {what}: its A and B are the frozen shared vera_A and vera_B "
            "(projection), and it trains lambda_d and lambda_b"
        )

    @property
    def lora_a(self) -> NodeId:
        """Absent: VeRA's A is frozen and shared."""
        self._absent("lora_a")

    @property
    def lora_b(self) -> NodeId:
        """Absent: VeRA's B is frozen and shared."""
        self._absent("lora_b")

    @property
    def scaling(self) -> float:
        """Absent: VeRA scales by its trained vectors."""
        self._absent("scaling")

    def params(self) -> list[NodeId]:
        """``[lambda_d, lambda_b]``: what an optimizer should update."""
        return [self.lambda_d, self.lambda_b]

    def named_leaves(self, adapter: str) -> list[tuple[str, NodeId]]:
        """``vera_lambda_d.<adapter>``, ``vera_lambda_b.<adapter>``."""
        return [
            (f"vera_lambda_d.{adapter}", self.lambda_d),
            (f"vera_lambda_b.{adapter}", self.lambda_b),
        ]

    def state_leaves(self) -> dict[str, NodeId]:
        """``lambda_d``, ``lambda_b``."""
        return {"lambda_d": self.lambda_d, "lambda_b": self.lambda_b}

    def file_leaves(self, prefix: str) -> list[tuple[str, NodeId, bool]]:
        """``<prefix>.vera_lambda_b`` and ``<prefix>.vera_lambda_d``, as they are."""
        return [
            (f"{prefix}.vera_lambda_b", self.lambda_b, False),
            (f"{prefix}.vera_lambda_d", self.lambda_d, False),
        ]

    def file_shared(self) -> list[tuple[str, NodeId, bool]]:
        """``base_model.vera_A`` and ``base_model.vera_B``, stored transposed."""
        return [
            ("base_model.vera_A", self.projection.vera_a, True),
            ("base_model.vera_B", self.projection.vera_b, True),
        ]

    def describe(self) -> str:
        """Rank and dropout, and that it is VeRA."""
        return f"vera rank={self.rank}, dropout={self.dropout:g}"

    def _corners(self, graph: Graph) -> tuple[NodeId, NodeId]:
        """``A[:in]`` and ``B[:, :out]``, this layer's part of the shared projections."""
        a, b = self.projection.vera_a, self.projection.vera_b
        if a.shape[0] != self.in_features:
            a = graph.getitem(a, slice(self.in_features))
        if b.shape[1] != self.out_features:
            b = graph.getitem(b, (slice(None), slice(self.out_features)))
        return a, b

    def record(self, graph: Graph, x: NodeId, layer: object, base: NodeId) -> NodeId:
        """``lambda_b * ((lambda_d * (drop(x) @ A)) @ B)``, op by op."""
        h = graph.dropout(x, self.dropout, rng=self.rng) if self.dropout else x
        a, b = self._corners(graph)
        low = graph.mul(graph.matmul(h, a), self.lambda_d)  # (..., rank)
        return graph.mul(graph.matmul(low, b), self.lambda_b)  # (..., out)

    def fused(self, graph: Graph, x: NodeId, layer: object) -> NodeId | None:
        """None: VeRA is recorded op by op."""
        return None

    def delta(self, graph: Graph) -> Array:
        """The update as a weight: ``(A[:in] * lambda_d) @ B[:, :out] * lambda_b``."""
        a = np.asarray(graph.value(self.projection.vera_a))[: self.in_features]
        b = np.asarray(graph.value(self.projection.vera_b))[:, : self.out_features]
        delta: Array = (a * graph.value(self.lambda_d)) @ b * graph.value(self.lambda_b)
        return delta

    def merged_weight(self, graph: Graph, weight: Array, base: Array) -> Array:
        """``weight + delta``."""
        merged: Array = weight + self.delta(graph)
        return merged

    def bias_delta(self, graph: Graph) -> Array | None:
        """None: VeRA adds nothing to the layer's bias."""
        return None
