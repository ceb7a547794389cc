"""``LoraLayer``: what every LoRA layer does with its adapters, whatever its base layer.

A LoRA layer holds a frozen weight and one or more named adapters (``adapters``: name ->
update), of which some are *active*: they run in ``forward``, their leaves require gradients,
``merge_`` folds them into the weight. The first adapter added is active; ``set_adapter`` picks
others (several: their updates add), ``delete_adapter`` removes one, ``disabled`` runs the base
layer alone. Names and behaviour follow PEFT's ``LoraLayer``. ``LoraLinear`` and ``LoraEmbedding``
add their base computation and construction.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.errors import GraphError, NonFiniteError, ShapeError
from graphlora.lora.config import LoraConfig, VeraConfig
from graphlora.lora.nf4 import NF4Weight, nf4_adapted_norm, nf4_linear
from graphlora.lora.variants import (
    Update,
    adapter_generator,
    check_adapter_config,
    check_rank,
    choose_update,
    draw_update,
    make_update,
    rewrites_base,
)
from graphlora.ops import Array

__all__ = ["LoraLayer", "check_adapter_name", "float_data"]

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def check_adapter_name(where: str, name: object) -> str:
    """``name`` if it can name an adapter (letters, digits, ``_`` and ``-``: it becomes part of
    PEFT's tensor keys and a folder name), else ``TypeError``/``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"{where}: adapter_name must be a str, got {_checks.describe(name)}")
    if not _ADAPTER_NAME.match(name):
        raise ValueError(
            f"{where}: adapter_name {name!r} must be letters, digits, '_' and '-' (no dots)"
        )
    return name


@dataclass(eq=False, repr=False, kw_only=True)
class LoraLayer:
    """The adapter set of a LoRA layer: several named adapters, which of them run, merging and
    state. The fields every LoRA layer has are here (keyword-only); subclasses are dataclasses
    that add their base layer's fields and ``forward``."""

    frozen_weight: NodeId | None
    """The frozen base weight, a constant: ``W [in, out]`` (linear), ``W [V, D]`` (embedding);
    ``None`` when the base is held in NF4 (``nf4``)."""
    adapters: dict[str, Update]
    """The adapters by name (PEFT's: ``"default"`` unless named), in the order they were added."""
    name: str = "lora"
    """A label, used as the prefix of the leaves' names."""
    merged_adapters: list[str] = dataclasses.field(default_factory=list)
    """The adapters folded into ``W`` by ``merge_`` (empty when not merged)."""
    disabled: bool = False
    """True inside ``graphlora.disable_adapters``: ``forward`` runs the base layer alone."""
    batch_adapters: tuple[str, ...] | None = None
    """Inside ``graphlora.mixed_batch``: the adapter of each sample (``"__base__"`` for none),
    which ``forward`` runs instead of the active ones."""
    nf4: NF4Weight | None = None
    """The base weight in NF4, ``[out, in]`` as bitsandbytes keeps it (QLoRA), or ``None`` for a
    float base (``frozen_weight``)."""
    _graph: Graph | None = None  # the graph of an NF4 layer, which has no base leaf to ask
    _active: tuple[str, ...] = ()
    _unmerged_weight: Array | None = None
    _unmerged_bias: Array | None = None
    _layer_kind: ClassVar[str] = "linear"

    # --- the base weight ----------------------------------------------------------------------

    @property
    def base(self) -> NodeId | NF4Weight:
        """The frozen base weight: the ``NF4Weight`` of a 4-bit base (``dequantize()`` gives
        the float weight, ``[out, in]``), else the constant ``W`` (``frozen_weight``)."""
        if self.nf4 is not None:
            return self.nf4
        assert self.frozen_weight is not None
        return self.frozen_weight

    @property
    def graph(self) -> Graph:
        """The graph the layer's leaves belong to."""
        if self.frozen_weight is not None:
            return self.frozen_weight.graph
        assert self._graph is not None
        return self._graph

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The base weight's shape in the layer's layout: ``[in, out]`` (``[V, D]``)."""
        if self.nf4 is not None:
            rows, cols = self.nf4.shape
            return cols, rows
        assert self.frozen_weight is not None
        rows, cols = self.frozen_weight.shape
        return rows, cols

    def base_weight(self, graph: Graph) -> Array:
        """The base weight as a float array in the layer's layout (a 4-bit base dequantized,
        whole: for merging and drawing adapters, never for ``forward``)."""
        if self.nf4 is not None:
            weight: Array = self.nf4.dequantize(graph.dtype).T
            return weight
        assert self.frozen_weight is not None
        return np.asarray(graph.value(self.frozen_weight))

    def base_matmul(self, graph: Graph, x: NodeId) -> NodeId:
        """``x @ W``: a ``matmul`` by the frozen weight, or ``nf4_linear`` over a 4-bit base."""
        if self.nf4 is not None:
            return graph.apply(nf4_linear, x, weight=self.nf4)
        assert self.frozen_weight is not None
        return graph.matmul(x, self.frozen_weight)

    def adapted_norm(self, graph: Graph, a: NodeId, b: NodeId, scaling: float) -> NodeId:
        """``||W + s A B||`` per output (over the base's first axis), ``[out]``: DoRA's weight
        norm, op by op over a float base, one ``nf4_adapted_norm`` over a 4-bit base."""
        if self.nf4 is not None:
            return graph.apply(nf4_adapted_norm, a, b, weight=self.nf4, scaling=scaling)
        assert self.frozen_weight is not None
        adapted = graph.add(self.frozen_weight, graph.scale(graph.matmul(a, b), scaling))
        return graph.sqrt(graph.sum(graph.mul(adapted, adapted), axis=0))

    # --- which adapters run -------------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters, in the order their updates are added."""
        return list(self._active)

    @property
    def active_adapter(self) -> str | None:
        """The first active adapter this layer holds, or None."""
        return next((name for name in self._active if name in self.adapters), None)

    def running(self) -> list[Update]:
        """The updates ``forward`` adds: the active ones, none while merged or disabled."""
        if self.merged_adapters or self.disabled:
            return []
        active, adapters = self._active, self.adapters
        if len(active) == 1:  # the common case, without a comprehension's cost
            found = adapters.get(active[0])
            return [] if found is None else [found]
        return [adapters[name] for name in active if name in adapters]

    def batch_rows(
        self, where: str, graph: Graph, shape: tuple[int, ...]
    ) -> list[tuple[Update, Array]]:
        """Inside ``mixed_batch``: ``(update, rows)`` for each adapter of this layer that some
        sample names, ``rows`` a bool mask over the samples, the first axis of an input of
        ``shape``; none while disabled.

        Raises
        ------
        GraphError
            While gradients are recorded (a mixed batch is for inference) or while merged.
        ShapeError
            When the input's first axis does not hold one sample per name.
        """
        names = self.batch_adapters
        assert names is not None
        if self.disabled:
            return []
        if graph.grad_enabled:
            raise GraphError(
                f"{where}: {self.name}: a mixed-adapter batch is for inference; record it under "
                "graph.no_grad()"
            )
        if self.merged_adapters:
            raise GraphError(
                f"{where}: {self.name} has merged adapters {self.merged_adapters}; unmerge before "
                "a mixed-adapter batch"
            )
        if not shape or shape[0] != len(names):
            raise ShapeError(
                f"{where}: {self.name}: mixed_batch names {len(names)} adapters, one per sample "
                f"along the input's first axis, but the input has shape {shape}"
            )
        return [
            (self.adapters[name], np.array([n == name for n in names]))
            for name in dict.fromkeys(names)
            if name in self.adapters
        ]

    @property
    def update(self) -> Update:
        """The update of the active adapter (with several: of the first)."""
        name = self.active_adapter
        if name is None:
            known = sorted(self.adapters)
            raise GraphError(
                f"{self.name}: no active adapter (it holds {known}); call set_adapter first"
            )
        return self.adapters[name]

    @property
    def lora_a(self) -> NodeId:
        """``A [in, rank]`` of the active adapter, a parameter."""
        return self.update.lora_a

    @property
    def lora_b(self) -> NodeId:
        """``B [rank, out]`` of the active adapter, a parameter."""
        return self.update.lora_b

    @property
    def scaling(self) -> float:
        """``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA) of the active adapter."""
        return self.update.scaling

    @property
    def rank(self) -> int:
        """The rank of the active adapter."""
        return self.update.rank

    @property
    def config(self) -> LoraConfig | VeraConfig:
        """The config of the active adapter."""
        return self.update.config

    @property
    def rng(self) -> np.random.Generator:
        """The generator of the active adapter's dropout masks."""
        return self.update.rng

    @rng.setter
    def rng(self, generator: np.random.Generator) -> None:
        self.update.rng = generator

    @property
    def merged(self) -> bool:
        """True between ``merge_`` and ``unmerge_``: the weight then holds the merged adapters."""
        return bool(self.merged_adapters)

    # --- adding, choosing and deleting adapters -----------------------------------------------

    def add_adapter(
        self,
        graph: Graph,
        adapter_name: str,
        config: LoraConfig | VeraConfig,
        *,
        rng: _checks.Rng = None,
        shared: object = None,
    ) -> Update:
        """Add a new adapter ``adapter_name``, inactive (as PEFT's ``add_adapter``; the first
        adapter of a layer is active), its leaves not requiring gradients until ``set_adapter``.

        Raises
        ------
        ValueError
            For a name the layer already holds, ``init="pissa"``
            (PiSSA rewrites the base weight, which the adapters share: it is for a new layer's
            first adapter), or a variant the layer kind does not support (DoRA or VeRA on an
            embedding). Nothing is changed.
        """
        where = f"{type(self).__name__}.add_adapter"
        check_graph(where, graph)
        adapter_name = check_adapter_name(where, adapter_name)
        self._check_new_adapter(where, adapter_name, config)
        generator = adapter_generator(where, config, rng)
        weight = self.base_weight(graph)
        draft = draw_update(where, config, weight, generator, self._layer_kind)
        update = make_update(
            graph,
            draft,
            weight,
            generator,
            name=self.name,
            adapter=adapter_name,
            shared=shared,
        )
        self.attach(graph, adapter_name, update)
        return update

    def _check_new_adapter(self, where: str, adapter_name: str, config: object) -> None:
        """Refuse an adapter this layer cannot take (nothing is changed)."""
        config = check_adapter_config(where, config)
        if adapter_name in self.adapters:
            raise ValueError(
                f"{where}: {self.name} already holds an adapter {adapter_name!r} "
                f"(it holds {sorted(self.adapters)})"
            )
        check_rank(where, config, self.weight_shape, self._layer_kind)
        if rewrites_base(config):
            raise ValueError(
                f"{where}: init='pissa' replaces the base weight by a residual, which every "
                f"adapter of {self.name} shares; use it for a layer's first adapter only "
                "(LoraLinear.from_linear, or apply_lora on a plain Linear)"
            )
        choose_update(f"{where}: {self.name}", config, self._layer_kind)

    def attach(self, graph: Graph, adapter_name: str, update: Update) -> None:
        """Add a made ``update`` under ``adapter_name`` (what ``add_weighted_adapter`` builds):
        active if it is the layer's first adapter. The name is the caller's to check."""
        first = not self.adapters and not self._active
        self.adapters[adapter_name] = update
        if first:
            self._active = (adapter_name,)
        self.activate(graph, self._active)

    def set_adapter(self, graph: Graph, adapter_names: str | Sequence[str]) -> None:
        """Make ``adapter_names`` (one name or several, whose updates then add) the active ones:
        only their leaves require gradients. As PEFT's ``set_adapter``.

        Raises
        ------
        ValueError
            For a name the layer does not hold (the message lists those it holds).
        GraphError
            While merged: the weight holds the merged adapters; unmerge_ first.
        """
        where = f"{type(self).__name__}.set_adapter"
        check_graph(where, graph)
        names = adapter_list(where, adapter_names)
        unknown = [name for name in names if name not in self.adapters]
        if unknown:
            raise ValueError(
                f"{where}: {self.name} has no adapter {unknown}; it holds {sorted(self.adapters)}"
            )
        self.refuse_merged(where)
        self.activate(graph, names)

    def activate(self, graph: Graph, names: Sequence[str]) -> None:
        """Make ``names`` active without checking them: names this layer lacks are kept and
        skipped, as PEFT's model-wide ``set_adapter`` keeps them on layers that lack them (use
        ``set_adapter`` to refuse unknown names)."""
        self._active = tuple(names)
        for name, update in self.adapters.items():
            wanted = name in self._active
            for leaf in update.params():
                if leaf.requires_grad != wanted:
                    graph.requires_grad_(leaf, wanted)
        graph.end_replays()  # a compiled step would still run the adapters it recorded

    def delete_adapter(self, graph: Graph, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``. If it was active, the other active ones stay active;
        if it was the only one, none is active until ``set_adapter``. Its leaves stay in the
        graph (leaves live as long as the graph) but no longer belong to the layer.

        Raises
        ------
        ValueError
            For a name the layer does not hold.
        GraphError
            While merged.
        """
        where = f"{type(self).__name__}.delete_adapter"
        check_graph(where, graph)
        if adapter_name not in self.adapters:
            raise ValueError(
                f"{where}: {self.name} has no adapter {adapter_name!r}; it holds "
                f"{sorted(self.adapters)}"
            )
        self.refuse_merged(where)
        update = self.adapters.pop(adapter_name)
        for leaf in update.params():
            if leaf.requires_grad:
                graph.requires_grad_(leaf, False)
        self._active = tuple(name for name in self._active if name != adapter_name)
        graph.end_replays()

    def refuse_merged(self, where: str, label: str | None = None) -> None:
        """Raise ``GraphError`` while merged: the weight holds the merged adapters, so a change
        to the adapters (or a load) must wait for ``unmerge_``. ``label`` names the layer as the
        caller knows it (default: its ``name``)."""
        if self.merged_adapters:
            raise GraphError(
                f"{where}: {label or self.name} is merged (adapters {self.merged_adapters}); "
                "unmerge_ it first"
            )

    # --- leaves -------------------------------------------------------------------------------

    def trainable_params(self) -> list[NodeId]:
        """The leaves of the active adapters: ``[lora_a, lora_b]`` each (DoRA: and its
        ``magnitude``). What an optimizer should update."""
        return [
            leaf
            for name in self._active
            if name in self.adapters
            for leaf in self.adapters[name].params()
        ]

    def base_leaves(self) -> list[tuple[str, NodeId]]:
        """The frozen base layer's leaves by name (a 4-bit base weight is no leaf)."""
        return [] if self.frozen_weight is None else [("weight", self.frozen_weight)]

    def named_leaves(self) -> list[tuple[str, NodeId]]:
        """The layer's leaves by name, for ``graphlora.nn.state_dict``: the base layer's under
        its names (``weight``, ``bias``), then every adapter's under PEFT's names
        (``lora_A.default``, ``lora_B.default``, ...)."""
        leaves = self.base_leaves()
        for name, update in self.adapters.items():
            leaves.extend(update.named_leaves(name))
        return leaves

    # --- merging ------------------------------------------------------------------------------

    def delta(self, graph: Graph, adapter_name: str | None = None) -> Array:
        """An adapter's update as a weight, ``(A @ B) * scaling`` (default: the active one's)."""
        check_graph(f"{type(self).__name__}.delta", graph)
        return self._adapter(f"{type(self).__name__}.delta", adapter_name).delta(graph)

    def merge(self, graph: Graph, adapter_names: str | Sequence[str] | None = None) -> Array:
        """The weight with adapters folded in, as a new array; changes nothing.

        ``adapter_names`` (default: the running ones, the active adapters unless disabled or
        merged) are folded in order: plain LoRA adds ``A @ B * scaling``; DoRA rescales the
        columns (its ``merged_weight``, its norm taken from the weight before any merge, as
        ``forward`` takes it). On a merged layer the weight already holds the merged adapters;
        names among them are not folded in twice.

        Raises
        ------
        ValueError
            For a name the layer does not hold.
        NonFiniteError
            If the merged weight would hold NaN or Inf (nothing is changed).
        """
        where = f"{type(self).__name__}.merge"
        check_graph(where, graph)
        updates = self._to_merge(where, adapter_names)
        weight = self.base_weight(graph)
        original = weight if self._unmerged_weight is None else self._unmerged_weight
        merged = weight
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # reported below
            for update in updates:
                merged = update.merged_weight(graph, merged, original)
        if merged is weight:
            return np.array(weight)
        bad = int(np.size(merged) - np.count_nonzero(np.isfinite(merged)))
        if bad:
            raise NonFiniteError(
                f"{where}: merging {self.name} would give {bad} non-finite weights "
                "(NaN or Inf in the weight or the adapters); nothing was changed"
            )
        return merged

    def merge_bias(
        self, graph: Graph, adapter_names: str | Sequence[str] | None = None
    ) -> Array | None:
        """The layer's bias with the adapters' bias updates added (``lora_bias``: ``b *
        scaling``), as a new array; None for a layer without a bias that none adds to. The
        adapters as ``merge``'s; changes nothing.

        Raises
        ------
        GraphError
            When an adapter has B's bias but the layer has none to take it (as PEFT).
        NonFiniteError
            If the merged bias would hold NaN or Inf.
        """
        where = f"{type(self).__name__}.merge_bias"
        check_graph(where, graph)
        deltas = [
            delta
            for update in self._to_merge(where, adapter_names)
            if (delta := update.bias_delta(graph)) is not None
        ]
        bias = getattr(self, "bias", None)
        if bias is None:
            if deltas:
                raise GraphError(
                    f"{where}: {self.name} has no bias to take its adapters' lora_bias; it "
                    "cannot be merged (as PEFT)"
                )
            return None
        merged: Array = np.array(graph.value(bias))
        for delta in deltas:
            merged = merged + delta
        if not np.isfinite(merged).all():
            raise NonFiniteError(
                f"{where}: merging {self.name} would give a non-finite bias; nothing was changed"
            )
        return merged

    def _to_merge(self, where: str, adapter_names: object) -> list[Update]:
        """The updates ``merge`` folds in: those named (checked), else the running ones; never
        one already merged."""
        if adapter_names is None:
            return self.running()
        names = adapter_list(where, adapter_names)
        unknown = [name for name in names if name not in self.adapters]
        if unknown:
            raise ValueError(
                f"{where}: {self.name} has no adapter {unknown}; it holds {sorted(self.adapters)}"
            )
        return [self.adapters[name] for name in names if name not in self.merged_adapters]

    def merge_(self, graph: Graph, adapter_names: str | Sequence[str] | None = None) -> None:
        """Fold adapters into the weight in place (``merged`` becomes True), for fast inference;
        ``forward`` then runs the base layer alone. ``adapter_names`` (default: the active
        ones) as PEFT's ``merge(adapter_names=...)``: a merged layer takes further adapters on
        top of those it holds.

        The weight from before the first merge is kept aside so that ``unmerge_`` restores it
        bit for bit (floating-point ``(W + D) - D`` is not always ``W``); this costs one
        weight's memory while merged. Merging nothing new (every named adapter merged already,
        or no adapter running) warns and does nothing, as in PEFT.

        Raises
        ------
        ValueError
            For a name the layer does not hold.
        GraphError
            Over a 4-bit base, which cannot take the adapters in place.
        NonFiniteError
            As ``merge`` (nothing is changed).
        """
        where = f"{type(self).__name__}.merge_"
        check_graph(where, graph)
        if self.frozen_weight is None:
            raise GraphError(
                f"{where}: {self.name} holds its base weight in NF4, which cannot take the "
                "adapters in place; dequantize it first (layer.dequantize_(graph)), or use "
                "merge() or save_merged, which dequantize a copy"
            )
        if adapter_names is None:
            if self.merged_adapters:
                warnings.warn(f"{self.name} is already merged; nothing to do", stacklevel=2)
                return
            names = [name for name in self._active if name in self.adapters]
            if self.disabled or not names:
                warnings.warn(f"{self.name} has no adapter running; nothing to merge", stacklevel=2)
                return
        else:
            requested = adapter_list(where, adapter_names)
            self._to_merge(where, requested)  # refuses unknown names first
            names = [name for name in requested if name not in self.merged_adapters]
            if not names:
                warnings.warn(
                    f"{self.name}: {requested} are merged already; nothing to do", stacklevel=2
                )
                return
        merged = self.merge(graph, names)
        bias = getattr(self, "bias", None)
        merged_bias = self.merge_bias(graph, names)
        if self._unmerged_weight is None:
            self._unmerged_weight = np.array(graph.value(self.frozen_weight))
            if bias is not None:
                self._unmerged_bias = np.array(graph.value(bias))
        graph.set_value(self.frozen_weight, merged)
        if bias is not None and merged_bias is not None:
            graph.set_value(bias, merged_bias)
        self.merged_adapters = [*self.merged_adapters, *names]
        graph.end_replays()  # a compiled step would still run the low-rank path

    def unmerge_(self, graph: Graph) -> None:
        """Restore the exact weight from before ``merge_`` (``merged`` becomes False).

        Unmerging a layer that is not merged warns and does nothing, as in PEFT.
        """
        check_graph(f"{type(self).__name__}.unmerge_", graph)
        if not self.merged_adapters:
            warnings.warn(f"{self.name} is not merged; nothing to do", stacklevel=2)
            return
        assert self._unmerged_weight is not None and self.frozen_weight is not None
        graph.set_value(self.frozen_weight, self._unmerged_weight)
        bias = getattr(self, "bias", None)
        if bias is not None and self._unmerged_bias is not None:
            graph.set_value(bias, self._unmerged_bias)
        self._unmerged_weight = None
        self._unmerged_bias = None
        self.merged_adapters = []
        graph.end_replays()

    def dequantize_(self, graph: Graph) -> None:
        """Give a 4-bit base back as a float constant (the dequantized weight, in the graph's
        dtype), so that ``merge_`` can fold the adapters into it; a float base is left as it
        is. Compiled steps end (they run the NF4 op they recorded)."""
        check_graph(f"{type(self).__name__}.dequantize_", graph)
        if self.nf4 is None:
            return
        with graph.scope(self.name), graph.scope("frozen"):
            self.frozen_weight = graph.constant(self.base_weight(graph), f"{self.name}.weight")
        self.nf4 = None
        graph.end_replays()

    # --- state --------------------------------------------------------------------------------

    def _adapter(self, where: str, adapter_name: str | None) -> Update:
        if adapter_name is None:
            return self.update
        if adapter_name not in self.adapters:
            raise ValueError(
                f"{where}: {self.name} has no adapter {adapter_name!r}; it holds "
                f"{sorted(self.adapters)}"
            )
        return self.adapters[adapter_name]

    def state_dict(self, graph: Graph, adapter_name: str | None = None) -> dict[str, Array]:
        """An adapter's ``{"lora_a": A, "lora_b": B}`` (DoRA: and ``"magnitude"``) as copies
        (default: the active adapter's)."""
        where = f"{type(self).__name__}.state_dict"
        check_graph(where, graph)
        update = self._adapter(where, adapter_name)
        return {key: np.array(graph.value(leaf)) for key, leaf in update.state_leaves().items()}

    def load_state_dict(
        self, graph: Graph, state: Mapping[str, Any], adapter_name: str | None = None
    ) -> None:
        """Load an adapter (default: the active one) from what ``state_dict`` gives, all or
        nothing.

        Checks keys, shapes, dtypes (floating point; converted to the graph's dtype) and
        finiteness of everything before assigning anything.

        Raises
        ------
        GraphError
            While merged: the weight holds the old update, so unmerge_ first.
        ValueError
            For missing or unexpected keys, or NaN/Inf values.
        ShapeError, TypeError
            For wrong shapes, or data that is not floating point.
        """
        where = f"{type(self).__name__}.load_state_dict"
        check_graph(where, graph)
        self.refuse_merged(where)
        if not isinstance(state, Mapping):
            raise TypeError(f"{where}: state must be a mapping, got {type(state).__name__}")
        update = self._adapter(where, adapter_name)
        expected = update.state_leaves()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(map(str, set(state) - set(expected)))
        if missing or unexpected:
            raise ValueError(
                f"{where}: keys must be exactly {_listing(sorted(expected))}; missing {missing}, "
                f"unexpected {unexpected}"
            )
        graph.set_values(where, ((key, leaf, state[key]) for key, leaf in expected.items()))

    # --- reporting ----------------------------------------------------------------------------

    @property
    def num_trainable(self) -> int:
        """Trainable parameters: those of the active adapters (``rank * (in + out)`` each,
        DoRA ``+ out``)."""
        return sum(int(np.prod(leaf.shape)) for leaf in self.trainable_params())

    @property
    def num_frozen(self) -> int:
        """Frozen parameters: those of the base layer (``in * out``, ``+ out`` with a bias),
        a 4-bit base weight included."""
        held = 0 if self.nf4 is None else math.prod(self.nf4.shape)
        return held + sum(int(np.prod(leaf.shape)) for _, leaf in self.base_leaves())

    def _adapters_repr(self) -> str:
        """The active adapter's rank, scaling and dropout, and the adapter set when it is more
        than one plain adapter named ``default``."""
        name = self.active_adapter
        if name is None:
            text = "active=None"
        else:
            update = self.adapters[name]
            text = update.describe()
        if list(self.adapters) != ["default"] or self._active != ("default",):
            text += f", adapters={list(self.adapters)}, active={list(self._active)}"
        return text


def adapter_list(where: str, adapter_names: object) -> list[str]:
    """One adapter name or a sequence of them, as a list of checked names."""
    if isinstance(adapter_names, str):
        return [check_adapter_name(where, adapter_names)]
    if not isinstance(adapter_names, Sequence):
        raise TypeError(
            f"{where}: adapter_names must be a name or a list of names, got "
            f"{_checks.describe(adapter_names)}"
        )
    names = [check_adapter_name(where, name) for name in adapter_names]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: adapter names repeat: {names}")
    return names


def float_data(where: str, arg: str, value: object, graph: Graph) -> Array:
    """The floating-point data of a NodeId of ``graph`` or of an array, or a clear error."""
    if isinstance(value, NodeId):
        return np.asarray(graph.value(value))
    return _checks.float_array(where, arg, value)


def _listing(names: Sequence[str]) -> str:
    """``'a' and 'b'``, ``'a', 'b' and 'c'``."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"
