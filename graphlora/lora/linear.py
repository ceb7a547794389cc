"""``LoraLinear``: a linear layer with LoRA adapters, ``y = base(x) + update(x)``, ``[in, out]``.

A LoRA layer keeps a pretrained weight ``W [in, out]`` frozen and learns a low-rank update: it
computes ``base(x) + update(x)``, with ``base(x) = x @ W + bias`` and, for plain LoRA,
``update(x) = ((drop(x) @ A) * scaling) @ B`` (``A [in, rank]``, ``B [rank, out]``). ``B`` starts
at zero, so a new layer computes exactly what the base layer does. ``A @ B`` (a full ``[in, out]``
matrix) is never built in forward or backward: the low-rank path goes through the ``[..., rank]``
bottleneck, which is what makes LoRA cheap. The update is an object of its own (``LoraUpdate``,
``DoraUpdate``), the seam where LoRA's variants plug in; a layer may hold several named ones
(``LoraLayer``). ``merge_`` folds the active ones into ``W`` for inference and ``unmerge_``
restores ``W`` bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.errors import GraphError, ShapeError
from graphlora.lora.config import LoraConfig, VeraConfig
from graphlora.lora.functional import linear_init
from graphlora.lora.layer import LoraLayer, check_adapter_name, float_data
from graphlora.lora.nf4 import NF4Config, NF4Weight
from graphlora.lora.variants import (
    adapter_generator,
    check_adapter_config,
    check_rank,
    draw_update,
    make_update,
)
from graphlora.ops import Array

__all__ = ["LoraLinear"]


@dataclass(eq=False, repr=False)
class LoraLinear(LoraLayer):
    """A linear layer ``y = base(x) + update(x)``: ``x @ W + bias`` with a frozen ``W``, plus, for
    each active adapter, ``((drop(x) @ A) * scaling) @ B`` (DoRA: see ``DoraUpdate``).

    Build it with ``LoraLinear.new`` (from dimensions) or ``LoraLinear.from_linear`` (from existing
    weights), never with the constructor. Its fields are NodeIds of one ``Graph`` plus sizes;
    every method takes that graph. ``lora_a``, ``lora_b``, ``rank``, ``scaling``, ``config`` and
    ``rng`` are those of its active adapter (with several active: of the first).

    Inits (``config.init``, as PEFT's ``init_lora_weights``): ``"kaiming"`` (the default, PEFT's
    ``True``): A ~ U(±1/√in), PyTorch's ``nn.Linear`` default as used by PEFT; ``"gaussian"``:
    A ~ N(0, init_std²), ``init_std`` 1/r unless given (PEFT's); ``"random"`` (PEFT's ``False``):
    A as kaiming and B ~ U(±1/√r), so the output changes from the start; ``"pissa"`` (Meng et al.
    2024): A and B from the top-``rank`` singular triplets of W, and W replaced by the residual,
    so the output at init is unchanged. B = 0 for kaiming and gaussian.
    """

    bias: NodeId | None
    """``[out]``, a constant, or ``None``."""
    in_features: int
    out_features: int
    fan_in_fan_out: bool = False
    """True when the base weight comes from a framework that stores it ``[in, out]`` too (GPT-2's
    ``Conv1D``): adapter files then say ``fan_in_fan_out: true``, as PEFT needs."""

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
        adapter_name: str = "default",
    ) -> LoraLinear:
        """A layer with a fresh frozen weight, initialised like ``torch.nn.Linear``.

        ``W`` and ``bias`` are drawn from U(-1/√in, 1/√in), then A and B by ``config.init``.
        ``rng`` (a Generator or a seed; default: ``config.seed``) draws all of them and then
        the dropout masks.

        Raises
        ------
        TypeError, ValueError
            For sizes that are not positive ints, or ``init="pissa"`` with ``rank > min(in, out)``.
        """
        where = "LoraLinear.new"
        check_graph(where, graph)
        check_adapter_config(where, config)
        generator = adapter_generator(where, config, rng)
        weight, bias_value = linear_init(
            in_features, out_features, bias=bias, rng=generator, where=where
        )
        return cls._build(where, graph, weight, bias_value, config, generator, name, adapter_name)

    @classmethod
    def from_linear(
        cls,
        graph: Graph,
        weight: NodeId | NF4Weight | npt.ArrayLike,
        bias: NodeId | npt.ArrayLike | None = None,
        config: LoraConfig | VeraConfig | None = None,
        *,
        rng: _checks.Rng = None,
        name: str = "lora",
        fan_in_fan_out: bool = False,
        adapter_name: str = "default",
        shared: object = None,
        quantize: str | NF4Config | None = None,
    ) -> LoraLinear:
        """A layer over existing weights ``weight [in, out]`` and ``bias [out]``.

        Arrays become new constants; a NodeId is used as it is and frozen (``requires_grad_``) if
        it was a parameter, as PEFT freezes the base model. With ``init="pissa"`` the layer uses a
        new constant holding the residual and leaves a given weight node's value as it was.

        A 4-bit base (QLoRA): ``weight`` an ``NF4Weight`` (``[out, in]``, as ``NF4Linear``
        holds it), or ``quantize="nf4"`` (or a ``gl.nf4.NF4Config``) to quantize the given
        weight, whose leaf, if it is one, is then released from the graph. The layer keeps the
        codes only (``frozen_weight`` is None, ``base`` the ``NF4Weight``); PiSSA's residual is
        quantized in its place.
        ``config`` defaults to ``LoraConfig()`` (a ``VeraConfig`` gives a VeRA layer); ``rng`` as
        in ``new``. The adapter is named ``adapter_name`` and active. ``shared`` is what the
        variant's layers share (VeRA's projections, made by ``apply_lora`` for all the layers it
        adapts; by default the layer makes its own).

        Raises
        ------
        ShapeError
            For a weight that is not 2-D or is empty, or a bias that is not ``[out]``.
        TypeError
            For data that is not floating point, or a config that is not a LoraConfig.
        ValueError
            For ``init="pissa"`` with ``rank > min(in, out)``, or ``quantize`` of an ``NF4Weight``.
        GraphError
            For ``quantize`` of a weight leaf a recorded op still reads (``reset()`` first).
        """
        where = "LoraLinear.from_linear"
        check_graph(where, graph)
        config = LoraConfig() if config is None else config
        check_adapter_config(where, config)
        fan_in_fan_out = _checks.flag(where, "fan_in_fan_out", fan_in_fan_out)  # before any leaf
        quantized = NF4Config.of(where, quantize)
        if isinstance(weight, NF4Weight):
            if quantized is not None:
                raise ValueError(f"{where}: weight is already an NF4Weight; drop quantize")
            if len(weight.shape) != 2 or 0 in weight.shape:
                raise ShapeError(
                    f"{where}: an NF4 weight must be a non-empty [out, in] matrix, got shape "
                    f"{weight.shape}"
                )
            quantized = NF4Config(weight.block_size, weight.double_quant)
            weight_value = weight.dequantize(graph.dtype).T
        else:
            weight_value = _float_matrix(where, graph, weight, "weight")
        if quantized is not None and isinstance(weight, NodeId) and graph.readers(weight):
            raise GraphError(
                f"{where}: {weight!r} is read by recorded ops; reset() before quantizing it"
            )
        bias_value = None
        if bias is not None:
            bias_value = float_data(where, "bias", bias, graph)
            if bias_value.shape != (weight_value.shape[1],):
                raise ShapeError(
                    f"{where}: bias has shape {bias_value.shape} but weight {weight_value.shape} "
                    f"needs ({weight_value.shape[1]},)"
                )
        generator = adapter_generator(where, config, rng)
        layer = cls._build(
            where,
            graph,
            weight_value,
            bias_value,
            config,
            generator,
            name,
            adapter_name,
            weight_node=weight if isinstance(weight, NodeId) else None,
            bias_node=bias if isinstance(bias, NodeId) else None,
            shared=shared,
            quantize=quantized,
            nf4=weight if isinstance(weight, NF4Weight) else None,
        )
        layer.fan_in_fan_out = fan_in_fan_out
        for node in (weight, bias):  # freeze the base layer, as PEFT does
            released = node is weight and quantized is not None
            if isinstance(node, NodeId) and not released and node.requires_grad:
                graph.requires_grad_(node, False)
        return layer

    @classmethod
    def _build(
        cls,
        where: str,
        graph: Graph,
        weight: Array,
        bias: Array | None,
        config: LoraConfig | VeraConfig,
        rng: np.random.Generator,
        name: str,
        adapter_name: str,
        weight_node: NodeId | None = None,
        bias_node: NodeId | None = None,
        shared: object = None,
        quantize: NF4Config | None = None,
        nf4: NF4Weight | None = None,
    ) -> LoraLinear:
        """Draw the adapter, make the leaves, and assemble the layer (arguments already
        checked). With ``quantize`` the base is held in NF4: ``nf4`` if given, else ``weight``
        quantized (and a given ``weight_node`` released)."""
        in_features, out_features = weight.shape
        check_rank(where, config, weight.shape, "linear")
        _checks.label(where, "name", name)
        adapter_name = check_adapter_name(where, adapter_name)
        draft = draw_update(where, config, weight, rng, "linear")
        residual = draft.residual
        base, given = weight, weight_node
        if residual is not None:
            base, weight_node, nf4 = residual, None, None  # PiSSA: the layer holds the residual
        if quantize is not None:
            if nf4 is None:
                nf4 = NF4Weight.quantize(
                    base.T, quantize.block_size, double_quant=quantize.double_quant
                )
            if given is not None:
                graph.release(given)  # the codes replace it
            weight_node = None
        with graph.scope(name):  # so that drawings group the layer's nodes
            if weight_node is None and nf4 is None:
                with graph.scope("frozen"):
                    weight_node = graph.constant(base, name=f"{name}.weight")
            if bias_node is None and bias is not None:
                bias_node = graph.constant(bias, name=f"{name}.bias")
        update = make_update(
            graph, draft, base, rng, name=name, adapter=adapter_name, shared=shared
        )
        return cls(
            frozen_weight=weight_node,
            bias=bias_node,
            in_features=in_features,
            out_features=out_features,
            adapters={adapter_name: update},
            name=name,
            nf4=nf4,
            _graph=graph,
            _active=(adapter_name,),
        )

    def with_bias(self, graph: Graph, bias: NodeId | npt.ArrayLike) -> LoraLinear:
        """This layer with a frozen bias ``[out]`` (a new constant, or a given NodeId frozen).

        Shares the adapters and W with this layer. Refused while merged.
        """
        where = "LoraLinear.with_bias"
        check_graph(where, graph)
        self.refuse_merged(where)
        value = float_data(where, "bias", bias, graph)
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
        return dataclasses.replace(self, bias=node, adapters=dict(self.adapters))

    # --- computing ----------------------------------------------------------------------------

    def forward(self, graph: Graph, x: NodeId, *, fused: bool = False) -> NodeId:
        """``x [..., in] -> [..., out]``: ``base(x) + update(x)``, that is
        ``x @ W + bias + ((drop(x) @ A) * scaling) @ B``, with one update per active adapter.

        Dropout acts on the LoRA input only and only while gradients are recorded. After
        ``merge_``, with adapters disabled or none active, it is just ``base(x)``. A wrong input
        width records nothing.

        By default every step is its own node (``matmul``, ``scale``, ``add``, ...), to read,
        draw and check. ``fused=True`` records the same maths as one ``lora_linear`` node:
        faster at small sizes, and it keeps only the ``[..., rank]`` bottleneck for backward. It
        applies to one active plain-LoRA adapter; DoRA and several active adapters are always
        recorded op by op.
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
        if self.batch_adapters is not None:
            return self._mixed_forward(graph, x, shape)
        updates = self.running()
        if fused and len(updates) == 1:
            node = updates[0].fused(graph, x, self)
            if node is not None:
                return node
        # Drawings show the two paths side by side, in the scopes name/frozen (or name/merged)
        # and name/lora: entered without with statements, which cost a microsecond a call here
        outer = graph.enter_scope(self.name)
        try:
            inside = graph.enter_scope("merged" if self.merged_adapters else "frozen")
            xw = self.base_matmul(graph, x)  # (..., out)
            y = xw if self.bias is None else graph.add(xw, self.bias)
            graph.leave_scope(inside)
            partial = xw  # the output so far without the bias, which DoRA rescales
            for i, update in enumerate(updates):
                graph.enter_scope("lora")
                low_rank = update.record(graph, x, self, partial)  # (..., out)
                graph.leave_scope(inside)
                y = graph.add(y, low_rank)
                if i + 1 < len(updates) and any(later.reads_output for later in updates[i + 1 :]):
                    partial = graph.add(partial, low_rank)
            return y
        finally:
            graph.leave_scope(outer)

    def _mixed_forward(self, graph: Graph, x: NodeId, shape: tuple[int, ...]) -> NodeId:
        """Inside ``mixed_batch``: ``base(x)``, each sample plus its own adapter's update.
        Each named adapter's update is computed for the whole batch and kept for its rows."""
        where = "LoraLinear.forward"
        rows = self.batch_rows(where, graph, shape[:-1])  # the axes before the features
        with graph.scope(self.name):
            with graph.scope("frozen"):
                xw = self.base_matmul(graph, x)  # (..., out)
                y = xw if self.bias is None else graph.add(xw, self.bias)
            for update, mask in rows:
                with graph.scope("lora"):
                    low_rank = update.record(graph, x, self, xw)  # (..., out)
                keep = mask.reshape((-1,) + (1,) * (len(shape) - 1))
                y = graph.where(keep, graph.add(y, low_rank), y)
            return y

    def base_forward(self, graph: Graph, x: NodeId) -> NodeId:
        """The frozen path, ``x @ W + bias`` (in the scope ``"frozen"``)."""
        with graph.scope("frozen"):
            y = self.base_matmul(graph, x)  # (..., out)
            return y if self.bias is None else graph.add(y, self.bias)

    def base_leaves(self) -> list[tuple[str, NodeId]]:
        """The frozen ``weight`` (unless held in NF4) and ``bias`` under the base layer's
        names."""
        leaves = super().base_leaves()
        return leaves if self.bias is None else [*leaves, ("bias", self.bias)]

    # --- reporting ----------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"LoraLinear(name={self.name!r}, in_features={self.in_features}, "
            f"out_features={self.out_features}, {self._adapters_repr()}, "
            f"bias={self.bias is not None}, merged={self.merged}, "
            f"{'nf4=True, ' if self.nf4 is not None else ''}"
            f"trainable={self.num_trainable:,}, frozen={self.num_frozen:,})"
        )


# --- helpers ----------------------------------------------------------------------------------


def _float_matrix(where: str, graph: Graph, value: object, arg: str) -> Array:
    array = float_data(where, arg, value, graph)
    if array.ndim != 2 or array.size == 0:
        raise ShapeError(
            f"{where}: {arg} must be a non-empty 2-D [in, out] matrix, got shape {array.shape}"
        )
    return array
