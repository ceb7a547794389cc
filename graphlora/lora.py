"""LoRA layers made of graph nodes: ``LoraConfig``, ``LoraLinear`` and its fused op, ``[in, out]``.

A LoRA layer keeps a pretrained weight ``W [in, out]`` frozen and learns a low-rank update: it
computes ``base(x) + update(x)``, with ``base(x) = x @ W + bias`` and, for plain LoRA,
``update(x) = ((drop(x) @ A) * scaling) @ B`` (``A [in, rank]``, ``B [rank, out]``). ``B`` starts
at zero, so a new layer computes exactly what the base layer does. ``A @ B`` (a full ``[in, out]``
matrix) is never built in forward or backward: the low-rank path goes through the ``[..., rank]``
bottleneck, which is what makes LoRA cheap. The update is an object of its own (``LoraUpdate``),
the seam where LoRA's variants plug in. ``merge_`` folds the update into ``W`` for inference and
``unmerge_`` restores ``W`` bit for bit. ``lora_linear`` is the whole layer as one op, recorded
with ``graph.apply`` like any user op: the engine knows nothing of LoRA.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.sparse.linalg

from graphlora import _checks
from graphlora.errors import GraphError, NonFiniteError, ShapeError
from graphlora.functional import linear_init, lora_scaling, scaled_delta
from graphlora.graph import Graph, NodeId, check_graph
from graphlora.ops import Array, Draw, Grads, Params, Sample, Vjp, dropout_mask, op
from graphlora.ops.linalg import rows

__all__ = ["INITS", "LoraConfig", "LoraLinear", "LoraUpdate", "lora_linear"]

INITS = ("gaussian", "kaiming", "pissa")
"""The accepted values of ``LoraConfig.init``."""

_DENSE_SVD_LIMIT = 1024  # above this min(in, out), PiSSA uses a truncated SVD (scipy svds)


@dataclass(frozen=True)
class LoraConfig:
    """How to build a LoRA adapter. Names and defaults follow PEFT where PEFT has them.

    Every field is checked at construction; a bad one raises ``TypeError`` or ``ValueError`` naming
    the field, the value and what is accepted.
    """

    rank: int = 8
    """The adapter's rank ``r`` (PEFT: ``r``): A is ``[in, r]``, B is ``[r, out]``. An int >= 1."""
    alpha: float = 8.0
    """The scale numerator (PEFT: ``lora_alpha``): the update is ``A @ B * alpha / r``. > 0."""
    dropout: float = 0.0
    """Dropout probability on the LoRA input only (PEFT: ``lora_dropout``), in ``[0, 1)``."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    init: str = "gaussian"
    """How to start A and B: ``"gaussian"``, ``"kaiming"`` or ``"pissa"`` (see ``LoraLinear``)."""
    init_std: float = 0.01
    """Standard deviation of A under ``init="gaussian"``. > 0."""
    seed: int | None = None
    """Seed of the generator for A's init and the dropout masks; ``None`` draws fresh entropy."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool):
            raise TypeError(f"LoraConfig: rank must be an int, got {self.rank!r}")
        if self.rank < 1:
            raise ValueError(f"LoraConfig: rank must be a positive int, got {self.rank}")
        for name in ("alpha", "dropout", "init_std"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(
                value, (int, float, np.integer, np.floating)
            ):
                raise TypeError(f"LoraConfig: {name} must be a real number, got {value!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoraConfig: alpha must be finite and > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.use_rslora, (bool, np.bool_)):
            raise TypeError(f"LoraConfig: use_rslora must be a bool, got {self.use_rslora!r}")
        if self.init not in INITS:
            raise ValueError(
                f"LoraConfig: init must be one of {', '.join(map(repr, INITS))}, got {self.init!r}"
            )
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"LoraConfig: init_std must be finite and > 0, got {self.init_std}")
        if self.seed is not None and (
            not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool)
        ):
            raise TypeError(f"LoraConfig: seed must be an int or None, got {self.seed!r}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"LoraConfig: seed must be >= 0, got {self.seed}")

    @property
    def scaling(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``."""
        return lora_scaling(self.rank, self.alpha, use_rslora=self.use_rslora)


# --- the whole layer as one op ----------------------------------------------------------------


def _check_lora_linear(
    x: Array,
    w: Array,
    a: Array,
    b: Array,
    bias: Array | None = None,
    *,
    scaling: object = 1.0,
    mask: object = None,
    dropout: object = 0.0,
    rng: object = None,
) -> Params | None:
    where = "lora_linear"
    try:
        (n_in, n_out), (a_in, rank), (b_rank, b_out) = w.shape, a.shape, b.shape
        fits = x.shape[-1] == n_in == a_in and rank == b_rank and b_out == n_out
    except (ValueError, IndexError):  # not matrices, or a 0-d x
        fits = False
    if not fits:
        raise ShapeError(
            f"{where}: shapes do not fit x [..., in], w [in, out], a [in, r], b [r, out]: "
            f"x {x.shape}, w {w.shape}, a {a.shape}, b {b.shape}"
        )
    if bias is not None and bias.shape != (n_out,):
        raise ShapeError(f"{where}: bias has shape {bias.shape}, expected ({n_out},)")
    if type(scaling) is float and dropout == 0.0 and mask is None:
        return None  # the layer's usual call: nothing to convert
    p = _checks.probability(where, "dropout", dropout)
    if p > 0.0 and mask is not None:
        raise ValueError(f"{where}: give a dropout mask or a dropout probability, not both")
    mask_array = None
    if mask is not None:
        mask_array = np.asarray(mask, dtype=x.dtype)
        if mask_array.shape != x.shape:
            raise ShapeError(f"{where}: mask has shape {mask_array.shape}, x has shape {x.shape}")
    return {
        "scaling": _checks.real_scalar(where, "scaling", scaling),
        "mask": mask_array,
        "dropout": p,
        "rng": _checks.check_rng(where, rng) if p > 0.0 else None,
    }


def _lora_linear_inputs(draw: Draw) -> tuple[Array | None, ...]:
    batch = draw.choice([(), (3,), (2, 2)])
    n_in, n_out, rank = draw.shape(min_dims=3, max_dims=3, min_side=1, max_side=4)
    bias = draw.floats((n_out,)) if draw.choice([False, True]) else None
    shapes = [(*batch, n_in), (n_in, n_out), (n_in, rank), (rank, n_out)]
    return (*(draw.floats(shape) for shape in shapes), bias)


def _lora_linear_params(draw: Draw, x: Array, *weights: Array | None) -> Params:
    params: Params = {"scaling": draw.choice([0.5, 2.0])}
    if draw.choice([False, True]):
        params["mask"] = draw.bools(x.shape) * 2.0  # inverted dropout with p = 0.5
    return params


def _torch_lora_linear(
    t: Any, x: Any, w: Any, a: Any, b: Any, bias: Any = None, *, scaling: float, mask: Any = None
) -> Any:
    xd = x if mask is None else x * t.from_numpy(mask)
    out = x @ w if bias is None else x @ w + bias
    return out + ((xd @ a) * scaling) @ b


@op(
    check=_check_lora_linear,
    sample=Sample(_lora_linear_inputs, _lora_linear_params),
    torch=_torch_lora_linear,
)
def lora_linear(
    x: Array,
    w: Array,
    a: Array,
    b: Array,
    bias: Array | None = None,
    *,
    scaling: float = 1.0,
    mask: Array | None = None,
    dropout: float = 0.0,
    rng: _checks.Rng = None,
) -> tuple[Array, Vjp]:
    """A LoRA linear layer as one op: ``x @ w (+ bias) + ((xd @ a) * scaling) @ b``.

    ``x [..., in]``, ``w [in, out]``, ``a [in, r]``, ``b [r, out]``, ``bias [out]``; ``xd`` is
    ``x * mask`` (a scaled dropout mask of ``x``'s shape), or ``x`` with a fresh dropout mask
    drawn from ``rng`` when ``dropout > 0`` (drawn again on each run of a compiled step; the
    caller decides whether to pass a ``dropout``: ``LoraLinear`` passes none under ``no_grad``).
    The same maths as ``LoraLinear.forward``'s separate ops, in one node: fewer Python calls, and
    only the ``[..., r]`` bottleneck ``hs = (xd @ a) * scaling`` kept for backward, never ``a @ b``.
    Record it with ``graph.apply(lora_linear, x, w, a, b, bias, scaling=...)``.
    VJP: ``(g wᵀ + (g bᵀ s) aᵀ * mask, xᵀ g, xdᵀ (g bᵀ) s, hsᵀ g, sum(g))`` over the batch.
    """
    if dropout > 0.0:
        mask = dropout_mask(x.shape, x.dtype, dropout, _checks.as_generator("lora_linear", rng))
    xd = x if mask is None else x * mask
    hs = (xd @ a) * scaling  # (..., r)
    out = x @ w  # (..., out)
    if bias is not None:
        out += bias
    out += hs @ b

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        g2 = g if g.ndim == 2 else rows(g)  # (N, out): the batch axes folded
        g_h = (g2 @ b.T) * scaling if needs[0] or needs[2] else None  # (N, r)
        gx = gw = ga = gb = gbias = None
        if needs[0]:
            assert g_h is not None
            low = g_h @ a.T if mask is None else (g_h @ a.T) * rows(mask)
            gx = (g2 @ w.T + low).reshape(x.shape)
        if needs[1]:
            gw = rows(x).T @ g2
        if needs[2]:
            assert g_h is not None
            ga = (xd if xd.ndim == 2 else rows(xd)).T @ g_h
        if needs[3]:
            gb = (hs if hs.ndim == 2 else rows(hs)).T @ g2
        if needs[4]:  # False when there is no bias
            gbias = g2.sum(axis=0)
        return gx, gw, ga, gb, gbias

    return out, vjp


# --- the update: the seam for LoRA's variants ---------------------------------------------------


@dataclass(eq=False)
class LoraUpdate:
    """The update of plain LoRA and rsLoRA: ``((drop(x) @ A) * scaling) @ B``.

    A LoRA layer computes ``base(x) + update(x)``; the update is an object with these methods, so
    that a variant is one class beside this one and touches neither ``LoraLinear.forward`` nor the
    engine. ``record`` records the update op by op (to read, draw and check); ``fused`` records
    the whole layer as one op; ``delta`` is the update as a weight ``[in, out]``, for merging.
    """

    lora_a: NodeId
    """``A [in, rank]``, a parameter."""
    lora_b: NodeId
    """``B [rank, out]``, a parameter (zero at init, except PiSSA)."""
    scaling: float
    """``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA)."""
    dropout: float
    """Dropout probability on the update's input."""
    rng: np.random.Generator
    """The generator of the dropout masks."""

    def params(self) -> list[NodeId]:
        """``[lora_a, lora_b]``: what an optimizer should update."""
        return [self.lora_a, self.lora_b]

    def record(self, graph: Graph, x: NodeId, layer: LoraLinear) -> NodeId:
        """``((drop(x) @ A) * scaling) @ B``, op by op (dropout only while gradients are
        recorded)."""
        h = x if self.dropout == 0.0 else graph.dropout(x, self.dropout, rng=self.rng)
        low = graph.scale(graph.matmul(h, self.lora_a), self.scaling)  # (..., rank)
        return graph.matmul(low, self.lora_b)  # (..., out)

    def fused(self, graph: Graph, x: NodeId, layer: LoraLinear) -> NodeId:
        """The whole layer, ``base(x) + update(x)``, as one ``lora_linear`` node."""
        if self.dropout and graph.grad_enabled:
            return graph.apply(
                lora_linear,
                x,
                layer.frozen_weight,
                self.lora_a,
                self.lora_b,
                layer.bias,
                scaling=self.scaling,
                dropout=self.dropout,
                rng=self.rng,
            )
        return graph.apply(
            lora_linear,
            x,
            layer.frozen_weight,
            self.lora_a,
            self.lora_b,
            layer.bias,
            scaling=self.scaling,
        )

    def delta(self, graph: Graph) -> Array:
        """The update as a weight: ``(A @ B) * scaling``, ``[in, out]``."""
        return scaled_delta(graph.value(self.lora_a), graph.value(self.lora_b), self.scaling)


# --- the layer --------------------------------------------------------------------------------


@dataclass(eq=False)
class LoraLinear:
    """A linear layer ``y = base(x) + update(x)``: ``x @ W + bias`` with a frozen ``W``, plus
    ``((drop(x) @ A) * scaling) @ B``.

    Build it with ``LoraLinear.new`` (from dimensions) or ``LoraLinear.from_linear`` (from existing
    weights), never with the constructor. Its fields are NodeIds of one ``Graph`` plus sizes;
    every method takes that graph. ``lora_a``, ``lora_b``, ``scaling`` and ``rng`` are those of
    its update (``update``).

    Inits (``config.init``): ``"gaussian"``: A ~ N(0, init_std²); ``"kaiming"``: A ~ U(±1/√in),
    PyTorch's ``nn.Linear`` default as used by PEFT; ``"pissa"`` (Meng et al. 2024): A and B from
    the top-``rank`` singular triplets of W, and W replaced by the residual, so the output at init
    is unchanged. B = 0 for gaussian and kaiming.
    """

    frozen_weight: NodeId
    """``W [in, out]``, a constant."""
    bias: NodeId | None
    """``[out]``, a constant, or ``None``."""
    update: LoraUpdate
    """The low-rank update: A, B, scaling, dropout."""
    in_features: int
    out_features: int
    rank: int
    config: LoraConfig
    merged: bool = False
    """True between ``merge_`` and ``unmerge_``: W then holds ``W + A @ B * scaling``."""
    name: str = "lora"
    """A label, used as the prefix of the leaves' names."""
    fan_in_fan_out: bool = False
    """True when the base weight comes from a framework that stores it ``[in, out]`` too (GPT-2's
    ``Conv1D``): adapter files then say ``fan_in_fan_out: true``, as PEFT needs."""
    _unmerged_weight: Array | None = dataclasses.field(default=None, repr=False)

    @property
    def lora_a(self) -> NodeId:
        """``A [in, rank]``, a parameter."""
        return self.update.lora_a

    @property
    def lora_b(self) -> NodeId:
        """``B [rank, out]``, a parameter (zero at init, except PiSSA)."""
        return self.update.lora_b

    @property
    def scaling(self) -> float:
        """``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA)."""
        return self.update.scaling

    @property
    def rng(self) -> np.random.Generator:
        """The generator of the dropout masks."""
        return self.update.rng

    @rng.setter
    def rng(self, generator: np.random.Generator) -> None:
        self.update.rng = generator

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def new(
        cls,
        graph: Graph,
        in_features: int,
        out_features: int,
        config: LoraConfig,
        *,
        bias: bool = True,
        rng: _checks.Rng = None,
        name: str = "lora",
    ) -> LoraLinear:
        """A layer with a fresh frozen weight, initialised like ``torch.nn.Linear``.

        ``W`` and ``bias`` are drawn from U(-1/√in, 1/√in), then A and B by ``config.init``.
        ``rng`` (a Generator or a seed; default: ``config.seed``) draws all of them and then
        the dropout masks.

        Raises
        ------
        TypeError, ValueError
            For sizes that are not positive ints, or ``rank > min(in_features, out_features)``.
        """
        where = "LoraLinear.new"
        check_graph(where, graph)
        _check_config(where, config)
        generator = _generator(where, rng, config)
        weight, bias_value = linear_init(
            in_features, out_features, bias=bias, rng=generator, where=where
        )
        return cls._build(where, graph, weight, bias_value, config, generator, name)

    @classmethod
    def from_linear(
        cls,
        graph: Graph,
        weight: NodeId | npt.ArrayLike,
        bias: NodeId | npt.ArrayLike | None = None,
        config: LoraConfig | None = None,
        *,
        rng: _checks.Rng = None,
        name: str = "lora",
        fan_in_fan_out: bool = False,
    ) -> LoraLinear:
        """A layer over existing weights ``weight [in, out]`` and ``bias [out]``.

        Arrays become new constants; a NodeId is used as it is and frozen (``requires_grad_``) if
        it was a parameter, as PEFT freezes the base model. With ``init="pissa"`` the layer uses a
        new constant holding the residual and leaves a given weight node's value as it was.
        ``config`` defaults to ``LoraConfig()``; ``rng`` as in ``new``.

        Raises
        ------
        ShapeError
            For a weight that is not 2-D or is empty, or a bias that is not ``[out]``.
        TypeError
            For data that is not floating point, or a config that is not a LoraConfig.
        ValueError
            For ``rank > min(in, out)``.
        """
        where = "LoraLinear.from_linear"
        check_graph(where, graph)
        config = LoraConfig() if config is None else config
        _check_config(where, config)
        weight_value = _float_matrix(where, graph, weight, "weight")
        bias_value = None
        if bias is not None:
            bias_value = _float_array(where, graph, bias, "bias")
            if bias_value.shape != (weight_value.shape[1],):
                raise ShapeError(
                    f"{where}: bias has shape {bias_value.shape} but weight {weight_value.shape} "
                    f"needs ({weight_value.shape[1]},)"
                )
        generator = _generator(where, rng, config)
        layer = cls._build(
            where,
            graph,
            weight_value,
            bias_value,
            config,
            generator,
            name,
            weight_node=weight if isinstance(weight, NodeId) else None,
            bias_node=bias if isinstance(bias, NodeId) else None,
        )
        layer.fan_in_fan_out = _checks.flag(where, "fan_in_fan_out", fan_in_fan_out)
        for node in (weight, bias):  # freeze the base layer, as PEFT does
            if isinstance(node, NodeId) and node.requires_grad:
                graph.requires_grad_(node, False)
        return layer

    @classmethod
    def _build(
        cls,
        where: str,
        graph: Graph,
        weight: Array,
        bias: Array | None,
        config: LoraConfig,
        rng: np.random.Generator,
        name: str,
        weight_node: NodeId | None = None,
        bias_node: NodeId | None = None,
    ) -> LoraLinear:
        """Draw A and B, make the leaves, and assemble the layer (arguments already checked)."""
        in_features, out_features = weight.shape
        rank = config.rank
        if rank > min(in_features, out_features):
            raise ValueError(
                f"{where}: rank {rank} exceeds min(in_features, out_features) = "
                f"{min(in_features, out_features)} for weight {weight.shape}"
            )
        if not isinstance(name, str):
            raise TypeError(f"{where}: name must be a str, got {type(name).__name__}")
        if not name or "/" in name:
            raise ValueError(f"{where}: name must be non-empty and without '/', got {name!r}")
        scaling = config.scaling
        if config.init == "pissa":
            a, b, weight = _pissa(weight.astype(np.float64), rank, scaling)
            weight_node = None  # the layer holds the residual, in a new constant
        else:
            if config.init == "gaussian":
                a = rng.normal(0.0, config.init_std, size=(in_features, rank))
            else:  # kaiming: U(-1/sqrt(in), 1/sqrt(in)), torch's kaiming_uniform_(a=sqrt(5))
                bound = 1.0 / math.sqrt(in_features)
                a = rng.uniform(-bound, bound, size=(in_features, rank))
            b = np.zeros((rank, out_features))
        with graph.scope(name):  # so that drawings group the layer's nodes
            if weight_node is None:
                with graph.scope("frozen"):
                    weight_node = graph.constant(weight, name=f"{name}.weight")
            if bias_node is None and bias is not None:
                bias_node = graph.constant(bias, name=f"{name}.bias")
            with graph.scope("lora"):
                lora_a = graph.parameter(a, name=f"{name}.lora_A")
                lora_b = graph.parameter(b, name=f"{name}.lora_B")
        return cls(
            frozen_weight=weight_node,
            bias=bias_node,
            update=LoraUpdate(lora_a, lora_b, scaling, config.dropout, rng),
            in_features=in_features,
            out_features=out_features,
            rank=rank,
            config=config,
            name=name,
        )

    def with_bias(self, graph: Graph, bias: NodeId | npt.ArrayLike) -> LoraLinear:
        """This layer with a frozen bias ``[out]`` (a new constant, or a given NodeId frozen).

        Shares A, B and W with this layer. Refused while merged.
        """
        where = "LoraLinear.with_bias"
        check_graph(where, graph)
        if self.merged:
            raise GraphError(f"{where}: {self.name} is merged; unmerge_ it first")
        value = _float_array(where, graph, bias, "bias")
        if value.shape != (self.out_features,):
            raise ShapeError(
                f"{where}: bias has shape {value.shape} but the layer needs ({self.out_features},)"
            )
        if isinstance(bias, NodeId):
            if bias.requires_grad:
                graph.requires_grad_(bias, False)
            node = bias
        else:
            node = graph.constant(value, name=f"{self.name}.bias")
        return dataclasses.replace(self, bias=node)

    # --- computing ----------------------------------------------------------------------------

    def forward(self, graph: Graph, x: NodeId, *, fused: bool = False) -> NodeId:
        """``x [..., in] -> [..., out]``: ``base(x) + update(x)``, that is
        ``x @ W + bias + ((drop(x) @ A) * scaling) @ B``.

        Dropout acts on the LoRA input only and only while gradients are recorded. After
        ``merge_`` it is just ``base(x)``, with the merged W. A wrong input width records nothing.

        By default every step is its own node (``matmul``, ``scale``, ``add``, ...), to read,
        draw and check. ``fused=True`` records the same maths as one ``lora_linear`` node:
        faster at small sizes, and it keeps only the ``[..., rank]`` bottleneck for backward.
        """
        where = "LoraLinear.forward"
        if type(graph) is not Graph:
            check_graph(where, graph)
        shape = graph.check(x, where, "x").shape
        if len(shape) == 0 or shape[-1] != self.in_features:
            raise ShapeError(
                f"{where}: {self.name} takes [..., {self.in_features}] but the input "
                f"has shape {shape}"
            )
        if self.merged:
            with graph.scope(self.name):
                return self.base(graph, x)
        if fused:
            return self.update.fused(graph, x, self)
        with graph.scope(self.name):  # drawings show the two paths side by side
            y = self.base(graph, x)  # (..., out)
            with graph.scope("lora"):
                update = self.update.record(graph, x, self)  # (..., out)
            return graph.add(y, update)

    def base(self, graph: Graph, x: NodeId) -> NodeId:
        """The frozen path, ``x @ W + bias`` (in the scope ``"frozen"``)."""
        with graph.scope("frozen"):
            y = graph.matmul(x, self.frozen_weight)  # (..., out)
            return y if self.bias is None else graph.add(y, self.bias)

    def trainable_params(self) -> list[NodeId]:
        """``[lora_a, lora_b]``: what an optimizer should update."""
        return self.update.params()

    def named_leaves(self) -> list[tuple[str, NodeId]]:
        """The layer's leaves by name, for ``graphlora.nn.state_dict``: the frozen ``weight``
        and ``bias`` under the base layer's names, then ``lora_A.default`` and ``lora_B.default``
        (PEFT's names, with the adapter's name)."""
        leaves = [("weight", self.frozen_weight)]
        if self.bias is not None:
            leaves.append(("bias", self.bias))
        return [*leaves, ("lora_A.default", self.lora_a), ("lora_B.default", self.lora_b)]

    def delta(self, graph: Graph) -> Array:
        """The update ``A @ B * scaling`` as a new ``[in, out]`` array."""
        check_graph("LoraLinear.delta", graph)
        return self.update.delta(graph)

    def merge(self, graph: Graph) -> Array:
        """The merged weight ``W + A @ B * scaling`` as a new array; changes nothing.

        When already merged, W holds the merged weight and a copy of it is returned.

        Raises
        ------
        GraphError
            If the merged weight would hold NaN or Inf (nothing is changed).
        """
        check_graph("LoraLinear.merge", graph)
        weight = graph.value(self.frozen_weight)
        if self.merged:
            return np.array(weight)
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, as one error
            merged = weight + self.update.delta(graph)
        bad = int(np.size(merged) - np.count_nonzero(np.isfinite(merged)))
        if bad:
            raise NonFiniteError(
                f"LoraLinear.merge: merging {self.name} would give {bad} non-finite weights "
                "(NaN or Inf in W, A or B); nothing was changed"
            )
        return merged

    def merge_(self, graph: Graph) -> None:
        """Fold the update into W in place (``merged`` becomes True), for fast inference.

        The unmerged W is kept aside so that ``unmerge_`` restores it bit for bit (floating-point
        ``(W + D) - D`` is not always ``W``); this costs one weight's memory while merged.
        Merging a merged layer warns and does nothing, as in PEFT.
        """
        check_graph("LoraLinear.merge_", graph)
        if self.merged:
            warnings.warn(f"{self.name} is already merged; nothing to do", stacklevel=2)
            return
        merged = self.merge(graph)
        self._unmerged_weight = np.array(graph.value(self.frozen_weight))
        graph.set_value(self.frozen_weight, merged)
        self.merged = True
        graph.end_replays()  # a compiled step would still run the low-rank path

    def unmerge_(self, graph: Graph) -> None:
        """Restore the exact W from before ``merge_`` (``merged`` becomes False).

        Unmerging a layer that is not merged warns and does nothing, as in PEFT.
        """
        check_graph("LoraLinear.unmerge_", graph)
        if not self.merged:
            warnings.warn(f"{self.name} is not merged; nothing to do", stacklevel=2)
            return
        assert self._unmerged_weight is not None
        graph.set_value(self.frozen_weight, self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False
        graph.end_replays()

    # --- state --------------------------------------------------------------------------------

    def state_dict(self, graph: Graph) -> dict[str, Array]:
        """``{"lora_a": A, "lora_b": B}`` as copies."""
        check_graph("LoraLinear.state_dict", graph)
        return {
            "lora_a": np.array(graph.value(self.lora_a)),
            "lora_b": np.array(graph.value(self.lora_b)),
        }

    def load_state_dict(self, graph: Graph, state: Mapping[str, Any]) -> None:
        """Load A and B from ``{"lora_a": ..., "lora_b": ...}``, all or nothing.

        Checks keys, shapes, dtypes (floating point; converted to the graph's dtype) and
        finiteness of everything before assigning anything.

        Raises
        ------
        GraphError
            While merged: W holds the old update, so unmerge_ first.
        ValueError
            For missing or unexpected keys, or NaN/Inf values.
        ShapeError, TypeError
            For wrong shapes, or data that is not floating point.
        """
        where = "LoraLinear.load_state_dict"
        check_graph(where, graph)
        if self.merged:
            raise GraphError(f"{where}: {self.name} is merged; unmerge_ it before loading")
        if not isinstance(state, Mapping):
            raise TypeError(f"{where}: state must be a mapping, got {type(state).__name__}")
        expected = {
            "lora_a": (self.in_features, self.rank),
            "lora_b": (self.rank, self.out_features),
        }
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(map(str, set(state) - set(expected)))
        if missing or unexpected:
            raise ValueError(
                f"{where}: keys must be exactly 'lora_a' and 'lora_b'; missing {missing}, "
                f"unexpected {unexpected}"
            )
        values = {}
        for key, shape in expected.items():
            if isinstance(state[key], NodeId):
                raise TypeError(f"{where}: {key} must be an array, got {state[key]!r}")
            array = _float_array(where, graph, state[key], key)
            if array.shape != shape:
                raise ShapeError(f"{where}: {key} has shape {array.shape}, expected {shape}")
            if not np.isfinite(array).all():
                raise ValueError(f"{where}: {key} holds NaN or Inf")
            values[key] = array
        graph.set_value(self.lora_a, values["lora_a"])
        graph.set_value(self.lora_b, values["lora_b"])

    # --- reporting ----------------------------------------------------------------------------

    @property
    def num_trainable(self) -> int:
        """Trainable parameters: ``rank * (in + out)``."""
        return self.rank * (self.in_features + self.out_features)

    @property
    def num_frozen(self) -> int:
        """Frozen parameters: ``in * out`` (+ ``out`` with a bias)."""
        return self.in_features * self.out_features + (
            0 if self.bias is None else self.out_features
        )

    def __repr__(self) -> str:
        return (
            f"LoraLinear(name={self.name!r}, in_features={self.in_features}, "
            f"out_features={self.out_features}, rank={self.rank}, scaling={self.scaling:g}, "
            f"bias={self.bias is not None}, dropout={self.config.dropout:g}, "
            f"merged={self.merged}, trainable={self.num_trainable:,}, frozen={self.num_frozen:,})"
        )


# --- helpers ----------------------------------------------------------------------------------


def _check_config(where: str, config: object) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"{where}: config must be a LoraConfig, got {type(config).__name__}")


def _generator(where: str, rng: object, config: LoraConfig) -> np.random.Generator:
    """``rng`` (a Generator or a seed), or a Generator seeded with ``config.seed``."""
    return _checks.as_generator(where, config.seed if rng is None else rng)


def _float_array(where: str, graph: Graph, value: object, arg: str) -> Array:
    """The floating-point data of a NodeId of ``graph`` or of an array, or a clear error."""
    if isinstance(value, NodeId):
        return np.asarray(graph.value(value))
    return _checks.float_array(where, arg, value)


def _float_matrix(where: str, graph: Graph, value: object, arg: str) -> Array:
    array = _float_array(where, graph, value, arg)
    if array.ndim != 2 or array.size == 0:
        raise ShapeError(
            f"{where}: {arg} must be a non-empty 2-D [in, out] matrix, got shape {array.shape}"
        )
    return array


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
