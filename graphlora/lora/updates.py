"""The update of a LoRA layer, ``update(x)`` in ``base(x) + update(x)``: one class per variant.

``LoraUpdate`` is plain LoRA and rsLoRA (rsLoRA is only a scaling), ``DoraUpdate`` is DoRA,
``EmbeddingUpdate`` is LoRA on an embedding table. Each records its forward op by op (``record``),
lists its leaves under PEFT's names (``named_leaves``) and gives what merging needs (``delta``,
``merged_weight``). The layers (``LoraLinear``, ``LoraEmbedding``) hold one update per named
adapter and never look inside one; a new variant is a new class here.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.sparse.linalg

from graphlora.engine.graph import Graph, NodeId
from graphlora.lora.config import LoraConfig
from graphlora.lora.functional import column_norms, scaled_delta
from graphlora.lora.fused import lora_linear
from graphlora.ops import Array

if TYPE_CHECKING:
    from graphlora.lora.layer import LoraLayer

__all__ = ["DoraEmbeddingUpdate", "DoraUpdate", "EmbeddingUpdate", "LoraUpdate", "draw_adapter"]

_DENSE_SVD_LIMIT = 1024  # above this min(in, out), PiSSA uses a truncated SVD (scipy svds)


@dataclass(eq=False)
class LoraUpdate:
    """Plain LoRA and rsLoRA: ``update(x) = ((drop(x) @ A) * scaling) @ B``.

    ``record`` records it op by op (to read, draw and check); ``fused`` records the whole layer as
    one ``lora_linear`` node; ``delta`` is the update as a weight ``[in, out]``.
    """

    lora_a: NodeId
    """``A [in, rank]``, a parameter."""
    lora_b: NodeId
    """``B [rank, out]``, a parameter (zero at init, except PiSSA)."""
    config: LoraConfig
    """The adapter's config: its rank, alpha, dropout, rsLoRA, init."""
    rng: np.random.Generator
    """The generator of the dropout masks."""
    reads_output: ClassVar[bool] = False
    """Whether ``record`` reads ``base``, the layer's output so far (DoRA does)."""
    variant: ClassVar[str] = "lora"
    """The variant's name (``"lora"``, ``"dora"``): which ``LoraConfig`` chooses it."""
    layer_kind: ClassVar[str] = "linear"
    """The kind of layer the class serves (``"linear"`` or ``"embedding"``)."""
    combinable: ClassVar[bool] = True
    """Whether ``add_weighted_adapter`` can combine it (its update is linear in A and B)."""
    peft_flags: ClassVar[dict[str, bool]] = {"use_dora": False}
    """The keys of PEFT's ``adapter_config.json`` that announce the variant."""
    peft_type: ClassVar[str] = "LORA"
    """PEFT's ``peft_type`` of the variant's files."""
    lora_bias: NodeId | None = dataclasses.field(default=None, kw_only=True)
    """B's bias ``[out]``, a parameter, with ``config.lora_bias`` (PEFT's ``lora_B.bias``);
    else None."""
    scaling: float = dataclasses.field(init=False)
    """``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA), from ``config``."""
    dropout: float = dataclasses.field(init=False)
    """Dropout probability on the update's input, from ``config``."""

    def __post_init__(self) -> None:
        self.scaling = self.config.scaling
        self.dropout = self.config.dropout

    @classmethod
    def draw(
        cls, config: LoraConfig, weight: Array, rng: np.random.Generator
    ) -> tuple[tuple[Array, Array], Array | None]:
        """A and B drawn by ``config`` for the frozen ``weight``, and for PiSSA the residual
        weight the layer must hold instead (else None)."""
        a, b, residual = draw_adapter(config, weight, rng, embedding=cls.layer_kind == "embedding")
        return (a, b), residual

    @classmethod
    def prepare(cls, graph: Graph, config: object, shapes: list[tuple[int, int]]) -> None:
        """What the adapted layers of one ``apply_lora`` share (nothing, for LoRA)."""
        return None

    @classmethod
    def create(
        cls,
        graph: Graph,
        config: LoraConfig,
        payload: tuple[Array, Array],
        rng: np.random.Generator,
        *,
        weight: Array,
        name: str,
        suffix: str,
        shared: object = None,
    ) -> LoraUpdate:
        """The update with A and B (``payload``) made as parameters named
        ``<name>.lora_A<suffix>``, ``<name>.lora_B<suffix>`` (and any leaves of its own);
        ``weight`` is the layer's frozen weight ``[in, out]`` (dequantized, for a 4-bit base)."""
        a, b = payload

        def named(leaf: str) -> str:
            return f"{name}.{leaf}{suffix}"

        with graph.scope(name), graph.scope("lora"):
            lora_a = graph.parameter(a, name=named("lora_A"))
            lora_b = graph.parameter(b, name=named("lora_B"))
            extra = cls._own_leaves(graph, config, lora_a, lora_b, weight, named)
        return cls(lora_a, lora_b, config, rng, **extra)

    @classmethod
    def _own_leaves(
        cls,
        graph: Graph,
        config: LoraConfig,
        a: NodeId,
        b: NodeId,
        weight: Array,
        named: Callable[[str], str],
    ) -> dict[str, NodeId]:
        """The leaves the variant adds to A and B, by field (``named(leaf)`` names one): B's
        bias with ``lora_bias``, zero at init as PEFT's."""
        if not config.lora_bias:
            return {}
        out = graph.value(b).shape[-1]
        zeros = np.zeros(out, dtype=graph.dtype)
        return {"lora_bias": graph.parameter(zeros, name=f"{named('lora_B')}.bias")}

    @property
    def rank(self) -> int:
        """The adapter's rank ``r``."""
        return self.config.rank

    def params(self) -> list[NodeId]:
        """``[lora_a, lora_b]`` (and B's bias): what an optimizer should update."""
        bias = [] if self.lora_bias is None else [self.lora_bias]
        return [self.lora_a, self.lora_b, *bias]

    def named_leaves(self, adapter: str) -> list[tuple[str, NodeId]]:
        """The leaves under PEFT's names: ``lora_A.<adapter>``, ``lora_B.<adapter>`` (and
        ``lora_B.<adapter>.bias``)."""
        bias = [] if self.lora_bias is None else [(f"lora_B.{adapter}.bias", self.lora_bias)]
        return [(f"lora_A.{adapter}", self.lora_a), (f"lora_B.{adapter}", self.lora_b), *bias]

    @classmethod
    def peft_config(cls, updates: Mapping[str, LoraUpdate], fan_in_fan_out: bool) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` of a LoRA adapter held by the layers named in
        ``updates``: ``r`` and ``lora_alpha`` the most common rank and alpha, the others in
        ``rank_pattern`` and ``alpha_pattern``; a ``ValueError`` when the layers differ in what
        PEFT has one of (``use_rslora``, dropout, DoRA, PiSSA)."""
        where = "save_adapter"
        names = list(updates)
        for field in ("use_rslora", "dropout", "lora_bias", "bias", "modules_to_save"):
            seen = {getattr(update.config, field) for update in updates.values()}
            if len(seen) > 1:
                raise ValueError(
                    f"{where}: the layers differ in {field} ({sorted(seen)}); PEFT has one"
                )
        for key in sorted({key for update in updates.values() for key in update.peft_flags}):
            seen = {update.peft_flags.get(key, False) for update in updates.values()}
            if len(seen) > 1:  # the variants' own keys (use_dora): one per file
                raise ValueError(
                    f"{where}: the layers differ in {key} ({sorted(seen)}); PEFT has one"
                )
        pissa = {update.config.init == "pissa" for update in updates.values()}
        if len(pissa) > 1:
            raise ValueError(f"{where}: some layers use init='pissa' and some do not; PEFT has one")
        ranks = [updates[n].rank for n in names]
        alphas = [float(updates[n].config.alpha) for n in names]
        r, alpha = _most_common(ranks), _most_common(alphas)
        first_update = next(iter(updates.values()))
        first = first_update.config
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "r": int(r),
            "lora_alpha": json_number(alpha),
            "lora_dropout": first.dropout,
            "use_rslora": first.use_rslora,
            "target_modules": sorted(names),
            "fan_in_fan_out": fan_in_fan_out,
            "bias": first.bias,
            "lora_bias": first.lora_bias,
            # PEFT inits A and B on load and then overwrites them, except PiSSA, which also
            # rewrites the base weight into the residual that the saved A and B expect.
            "init_lora_weights": "pissa" if True in pissa else True,
            "inference_mode": True,
            "modules_to_save": list(first.modules_to_save) if first.modules_to_save else None,
            **first_update.peft_flags,  # the variant's own keys: use_dora
            "rank_pattern": {n: int(k) for n, k in zip(names, ranks, strict=True) if k != r},
            "alpha_pattern": {
                n: json_number(a) for n, a in zip(names, alphas, strict=True) if a != alpha
            },
        }

    def state_leaves(self) -> dict[str, NodeId]:
        """The leaves under ``LoraLayer.state_dict``'s keys: ``lora_a``, ``lora_b`` (and
        ``lora_bias``)."""
        bias = {} if self.lora_bias is None else {"lora_bias": self.lora_bias}
        return {"lora_a": self.lora_a, "lora_b": self.lora_b, **bias}

    def file_leaves(self, prefix: str) -> list[tuple[str, NodeId, bool]]:
        """The leaves under PEFT's file keys (``prefix`` is ``base_model.model.<layer>``), each
        with whether the file stores it transposed (PyTorch's ``[out, in]`` layout)."""
        bias = [] if self.lora_bias is None else [(f"{prefix}.lora_B.bias", self.lora_bias, False)]
        return [
            (f"{prefix}.lora_A.weight", self.lora_a, True),
            (f"{prefix}.lora_B.weight", self.lora_b, True),
            *bias,
        ]

    def file_shared(self) -> list[tuple[str, NodeId, bool]]:
        """Leaves every layer of the adapter shares, under their file keys (none for LoRA)."""
        return []

    def describe(self) -> str:
        """The adapter's part of the layer's repr: rank, scaling, dropout."""
        return f"rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout:g}"

    def record(self, graph: Graph, x: NodeId, layer: LoraLayer, base: NodeId) -> NodeId:
        """``((drop(x) @ A) * scaling) @ B``, op by op (dropout only while gradients are
        recorded). ``base`` is the layer's output so far without its bias (``x @ W`` plus the
        updates of the adapters before this one), which plain LoRA does not need."""
        h = graph.dropout(x, self.dropout, rng=self.rng) if self.dropout else x
        low = graph.scale(graph.matmul(h, self.lora_a), self.scaling)  # (..., rank)
        out = graph.matmul(low, self.lora_b)  # (..., out)
        if self.lora_bias is None:
            return out
        return graph.add(out, graph.scale(self.lora_bias, self.scaling))  # + b * scaling

    def fused(self, graph: Graph, x: NodeId, layer: LoraLayer) -> NodeId | None:
        """The whole layer, ``base(x) + update(x)``, as one ``lora_linear`` node; None over a
        4-bit base or with B's bias (recorded op by op)."""
        weight, bias = layer.frozen_weight, getattr(layer, "bias", None)
        if weight is None or self.lora_bias is not None:
            return None
        if self.dropout and graph.grad_enabled:
            return graph.apply(
                lora_linear,
                x,
                weight,
                self.lora_a,
                self.lora_b,
                bias,
                scaling=self.scaling,
                dropout=self.dropout,
                rng=self.rng,
            )
        return graph.apply(
            lora_linear, x, weight, self.lora_a, self.lora_b, bias, scaling=self.scaling
        )

    def delta(self, graph: Graph) -> Array:
        """The update as a weight: ``(A @ B) * scaling``, ``[in, out]``."""
        return scaled_delta(graph.value(self.lora_a), graph.value(self.lora_b), self.scaling)

    def merged_weight(self, graph: Graph, weight: Array, base: Array) -> Array:
        """``weight`` with this update folded in: ``weight + (A @ B) * scaling``. ``base`` is the
        layer's weight before any adapter was merged (plain LoRA does not need it)."""
        merged: Array = weight + self.delta(graph)
        return merged

    def bias_delta(self, graph: Graph) -> Array | None:
        """What merging adds to the layer's bias: ``b * scaling`` with B's bias, else None."""
        if self.lora_bias is None:
            return None
        delta: Array = graph.value(self.lora_bias) * self.scaling
        return delta


@dataclass(eq=False)
class DoraUpdate(LoraUpdate):
    """DoRA (Liu et al. 2024), as PEFT computes it: the adapted weight ``W' = W + s A B`` is split
    into a direction, each output's column ``W'[:, j] / ||W'[:, j]||``, and a trainable magnitude
    ``m [out]`` (at init the norms themselves, so the layer starts equal to the base):

        layer(x) = x @ (W' * m / ||W'||) + bias
        update(x) = (m / ||W'||) * (x @ W + s (x @ A) @ B) - x @ W

    ``||W'||`` holds the column norms and, as in PEFT, is *detached*: it scales the output but no
    gradient flows through it, so A and B learn the direction and ``m`` the magnitude. With
    dropout, ``x`` is the dropped input in both terms of the update (PEFT's ``base_result``).
    After other active adapters, ``x @ W`` is the output so far (PEFT's ``result``, without the
    bias): DoRA rescales their updates too, which is what merging them in turn gives.
    """

    reads_output: ClassVar[bool] = True
    variant: ClassVar[str] = "dora"
    combinable: ClassVar[bool] = False  # a magnitude rescales the columns: not linear in A, B
    peft_flags: ClassVar[dict[str, bool]] = {"use_dora": True}
    magnitude: NodeId = dataclasses.field(kw_only=True)
    """``m [out]``, a parameter: each output's length (PEFT: ``lora_magnitude_vector``)."""

    @classmethod
    def _own_leaves(
        cls,
        graph: Graph,
        config: LoraConfig,
        a: NodeId,
        b: NodeId,
        weight: Array,
        named: Callable[[str], str],
    ) -> dict[str, NodeId]:
        """``magnitude``, starting as ``||W + s A B||`` per output, so the layer starts as the
        base."""
        delta = scaled_delta(graph.value(a), graph.value(b), config.scaling)
        norms = column_norms(weight + delta)
        return {"magnitude": graph.parameter(norms, name=named("lora_magnitude_vector"))}

    def params(self) -> list[NodeId]:
        """``[lora_a, lora_b, magnitude]``."""
        return [self.lora_a, self.lora_b, self.magnitude]

    def named_leaves(self, adapter: str) -> list[tuple[str, NodeId]]:
        """Plain LoRA's leaves and ``lora_magnitude_vector.<adapter>``."""
        return [
            *super().named_leaves(adapter),
            (f"lora_magnitude_vector.{adapter}", self.magnitude),
        ]

    def state_leaves(self) -> dict[str, NodeId]:
        """Plain LoRA's and ``magnitude``."""
        return {**super().state_leaves(), "magnitude": self.magnitude}

    def file_leaves(self, prefix: str) -> list[tuple[str, NodeId, bool]]:
        """Plain LoRA's and ``<prefix>.lora_magnitude_vector`` (as it is, ``[out]``)."""
        return [
            *super().file_leaves(prefix),
            (f"{prefix}.lora_magnitude_vector", self.magnitude, False),
        ]

    def describe(self) -> str:
        """Plain LoRA's, and ``dora=True``."""
        return f"{super().describe()}, dora=True"

    def record(self, graph: Graph, x: NodeId, layer: LoraLayer, base: NodeId) -> NodeId:
        """``(m / ||W + s A B||) * (base + s (x @ A) @ B) - base``, op by op; with dropout,
        ``base`` is ``drop(x) @ W`` and ``x`` is ``drop(x)``."""
        h = graph.dropout(x, self.dropout, rng=self.rng) if self.dropout else x
        low = graph.scale(graph.matmul(h, self.lora_a), self.scaling)  # (..., rank)
        lora = graph.matmul(low, self.lora_b)  # (..., out)
        with graph.no_grad():  # PEFT detaches the norm: no gradient flows through it
            norm = layer.adapted_norm(graph, self.lora_a, self.lora_b, self.scaling)  # (out,)
        ratio = graph.div(self.magnitude, norm)  # (out,): m / ||W'||
        hw = base if h is x else layer.base_matmul(graph, h)  # (..., out)
        return graph.sub(graph.mul(ratio, graph.add(hw, lora)), hw)

    def fused(self, graph: Graph, x: NodeId, layer: LoraLayer) -> NodeId | None:
        """None: DoRA is recorded op by op only."""
        return None

    def merged_weight(self, graph: Graph, weight: Array, base: Array) -> Array:
        """``(weight + s A B) * m / ||base + s A B||``: the norm from the unmerged weight, as
        ``forward`` computes it (and as PEFT merges several DoRA adapters in turn)."""
        delta = self.delta(graph)
        ratio = graph.value(self.magnitude) / column_norms(base + delta)
        merged: Array = (weight + delta) * ratio
        return merged


@dataclass(eq=False)
class EmbeddingUpdate(LoraUpdate):
    """LoRA on an embedding table ``W [V, D]``: ``update(ids) = (A[ids] * scaling) @ B``, with
    ``A [V, rank]`` (PEFT: ``lora_embedding_A``, stored ``[rank, V]``) and ``B [rank, D]`` (PEFT:
    ``lora_embedding_B``, stored ``[D, rank]``). Looking rows up in A is ``one_hot(ids) @ A``, so
    the delta is ``(A @ B) * scaling`` as for a linear layer. As in PEFT, A starts at zero and B
    from N(0, 1), and there is no dropout on an embedding's update."""

    layer_kind: ClassVar[str] = "embedding"

    def describe(self) -> str:
        """Rank and scaling (an embedding's update has no dropout)."""
        return f"rank={self.rank}, scaling={self.scaling:g}"

    def file_leaves(self, prefix: str) -> list[tuple[str, NodeId, bool]]:
        """``<prefix>.lora_embedding_A`` / ``_B``, stored transposed (``[rank, V]``, ...)."""
        return [
            (f"{prefix}.lora_embedding_A", self.lora_a, True),
            (f"{prefix}.lora_embedding_B", self.lora_b, True),
        ]

    def named_leaves(self, adapter: str) -> list[tuple[str, NodeId]]:
        """``lora_embedding_A.<adapter>``, ``lora_embedding_B.<adapter>``."""
        return [
            (f"lora_embedding_A.{adapter}", self.lora_a),
            (f"lora_embedding_B.{adapter}", self.lora_b),
        ]

    def record(
        self, graph: Graph, x: NodeId | npt.ArrayLike, layer: LoraLayer, base: NodeId
    ) -> NodeId:
        """``(A[ids] * scaling) @ B``, op by op: ``x`` is the integer ids."""
        low = graph.scale(graph.embedding(self.lora_a, x), self.scaling)  # (..., rank)
        return graph.matmul(low, self.lora_b)  # (..., D)

    def fused(self, graph: Graph, x: NodeId, layer: LoraLayer) -> NodeId | None:
        """None: an embedding's update is recorded op by op."""
        return None


@dataclass(eq=False)
class DoraEmbeddingUpdate(DoraUpdate, EmbeddingUpdate):
    """DoRA on an embedding table ``W [V, D]``, as PEFT's ``DoraEmbeddingVariant``: a magnitude
    per embedding dimension, ``m [D]``, and the norm of each column of ``W + s A B`` over the
    vocabulary (detached, as for a linear layer):

        layer(ids) = (m / ||W + s A B||) * (W[ids] + s A[ids] @ B)

    ``A [V, rank]`` and ``B [rank, D]`` as ``EmbeddingUpdate``'s (``lora_embedding_A``/``_B``);
    the magnitude is ``lora_magnitude_vector``. No dropout, as on any embedding update.
    """

    layer_kind: ClassVar[str] = "embedding"

    def describe(self) -> str:
        """Rank and scaling, and ``dora=True``."""
        return f"rank={self.rank}, scaling={self.scaling:g}, dora=True"

    def record(
        self, graph: Graph, x: NodeId | npt.ArrayLike, layer: LoraLayer, base: NodeId
    ) -> NodeId:
        """``(m / ||W + s A B||) * (base + (A[ids] * s) @ B) - base``, op by op: ``x`` is the
        integer ids and ``base`` the table's rows ``W[ids]`` (plus earlier adapters)."""
        low = graph.scale(graph.embedding(self.lora_a, x), self.scaling)  # (..., rank)
        lora = graph.matmul(low, self.lora_b)  # (..., D)
        with graph.no_grad():  # PEFT detaches the norm: no gradient flows through it
            norm = layer.adapted_norm(graph, self.lora_a, self.lora_b, self.scaling)  # (D,)
        ratio = graph.div(self.magnitude, norm)  # (D,): m / ||W'||
        return graph.sub(graph.mul(ratio, graph.add(base, lora)), base)


def _most_common(values: list[Any]) -> Any:
    """The most frequent value; the first one seen among equally frequent ones."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def json_number(value: float) -> float | int:
    """Integral floats as ints (PEFT writes ``lora_alpha: 16``); others as they are."""
    return int(value) if float(value).is_integer() else float(value)


def draw_adapter(
    config: LoraConfig, weight: Array, rng: np.random.Generator, *, embedding: bool = False
) -> tuple[Array, Array, Array | None]:
    """A and B drawn by ``config`` for the frozen ``weight``, and for PiSSA the residual weight
    the layer must hold instead of ``weight`` (else None)."""
    in_features, out_features = weight.shape
    rank = config.rank
    if embedding:
        if config.init == "random":  # PEFT's embeddings before any init: both ~ N(0, 1)
            a = rng.standard_normal((in_features, rank))
            return a, rng.standard_normal((rank, out_features)), None
        # PEFT's init for embeddings: A = 0, B ~ N(0, 1)
        return np.zeros((in_features, rank)), rng.standard_normal((rank, out_features)), None
    if config.init == "pissa":
        return _pissa(weight.astype(np.float64), rank, config.scaling)
    if config.init == "gaussian":  # PEFT: std 1 / r
        std = 1.0 / rank if config.init_std is None else config.init_std
        return rng.normal(0.0, std, size=(in_features, rank)), np.zeros((rank, out_features)), None
    # kaiming: U(-1/sqrt(in), 1/sqrt(in)), torch's kaiming_uniform_(a=sqrt(5)) on A [r, in]
    bound = 1.0 / math.sqrt(in_features)
    a = rng.uniform(-bound, bound, size=(in_features, rank))
    if config.init == "random":  # B as torch's nn.Linear(r, out) draws it: U(-1/sqrt(r), ...)
        edge = 1.0 / math.sqrt(rank)
        return a, rng.uniform(-edge, edge, size=(rank, out_features)), None
    return a, np.zeros((rank, out_features)), None


def _top_singular_triplets(weight: Array, rank: int) -> tuple[Array, Array, Array]:
    """``U_r [in, r]``, ``S_r [r]`` (descending) and ``Vh_r [r, out]`` of ``weight``."""
    if min(weight.shape) <= _DENSE_SVD_LIMIT or rank >= min(weight.shape) - 1:
        u, s, vh = scipy.linalg.svd(weight, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    # A large matrix: compute only the top `rank` triplets (svds returns them ascending).
    u_k, s_k, vh_k = scipy.sparse.linalg.svds(weight, k=rank, random_state=0)
    order = np.argsort(s_k)[::-1]
    return u_k[:, order], s_k[order], vh_k[order]


def _pissa(weight: Array, rank: int, scaling: float) -> tuple[Array, Array, Array]:
    """PiSSA: ``A = U_r sqrt(S_r/s)``, ``B = sqrt(S_r/s) Vh_r``, residual ``W - U_r S_r Vh_r``."""
    u, s, vh = _top_singular_triplets(weight, rank)
    root = np.sqrt(s / scaling)  # so that (A @ B) * scaling = U_r S_r Vh_r
    a = u * root  # (in, r)
    b = root[:, np.newaxis] * vh  # (r, out)
    residual = weight - (a @ b) * scaling
    return a, b, residual
