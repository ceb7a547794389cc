"""PEFT's ``modules_to_save``: a whole module (a classification head, a norm) trained with an
adapter as a full copy and saved in the adapter's file.

``apply_lora(..., LoraConfig(modules_to_save=["head"]))`` replaces each matching module by a
``ModulesToSave`` that holds the frozen original (``original_module``) and one trainable copy
per adapter (``modules_to_save[<adapter>]``): PEFT's ``ModulesToSaveWrapper``, under the same
names, so a model's leaves read ``head.modules_to_save.default.weight`` as PEFT's parameters do.
The copy of the active adapter runs and trains; with adapters disabled, or no copy active, the
original runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphlora.engine.graph import Graph, NodeId
from graphlora.errors import ShapeError
from graphlora.nn.layers import Linear
from graphlora.nn.tree import find_modules, is_module, named_leaves, named_modules

__all__ = ["ModulesToSave", "clone_module", "saved_modules", "torch_leaves"]


@dataclass(eq=False)
class ModulesToSave:
    """A module trained and saved whole with its adapters (PEFT's ``ModulesToSaveWrapper``)."""

    original_module: Any
    """The module as it was, frozen; it runs when no copy is active or adapters are off."""
    modules_to_save: dict[str, Any] = field(default_factory=dict)
    """One copy per adapter, its leaves parameters while that adapter is active."""
    name: str = "modules_to_save"
    active: str | None = None
    """The adapter whose copy runs, or None."""
    disabled: bool = False
    """True while the model's adapters are disabled: the original runs."""
    batch_adapters: tuple[str, ...] | None = None
    """Inside ``graphlora.mixed_batch``: the adapter of each sample, whose copy (or, without
    one, the original) runs on it."""

    def forward(self, graph: Graph, *args: Any, **kwargs: Any) -> Any:
        """The running module's ``forward``: the active adapter's copy, else the original.
        Inside ``mixed_batch``, each sample (the first axis of the output) comes from its own
        adapter's copy, as PEFT's mixed batches: every module used runs on the whole batch and
        keeps its samples' rows."""
        names = self.batch_adapters
        if names is None or self.disabled:
            return self.running().forward(graph, *args, **kwargs)
        picks = [self.modules_to_save.get(name, self.original_module) for name in names]
        out = None
        for module in dict.fromkeys(picks):  # each module once, in the order first used
            y = module.forward(graph, *args, **kwargs)
            if out is None:
                out = y
                continue
            rows = np.array([pick is module for pick in picks])
            if not y.shape or y.shape[0] != len(names):
                raise ShapeError(
                    f"ModulesToSave.forward: {self.name}: mixed_batch names {len(names)} "
                    f"adapters, one per sample, but the output has shape {y.shape}"
                )
            out = graph.where(rows.reshape((-1,) + (1,) * (len(y.shape) - 1)), y, out)
        return out

    def running(self) -> Any:
        """The module ``forward`` runs."""
        if self.disabled or self.active is None:
            return self.original_module
        return self.modules_to_save[self.active]

    def activate(self, graph: Graph, names: list[str] | tuple[str, ...]) -> None:
        """Run the copy of the one adapter among ``names`` that has one (none: the original);
        only that copy's leaves require gradients (none while disabled).

        Raises
        ------
        ValueError
            When several of ``names`` have copies here (PEFT runs one copy at a time).
        """
        held = [name for name in names if name in self.modules_to_save]
        if len(held) > 1:
            raise ValueError(
                f"set_adapter: {self.name} holds modules_to_save copies for {held}; only one can "
                "be active at a time (as PEFT)"
            )
        self.active = held[0] if held else None
        for adapter, module in self.modules_to_save.items():
            train = adapter == self.active and not self.disabled
            for _, leaf in named_leaves(module):
                if leaf.requires_grad != train:
                    graph.requires_grad_(leaf, train)
        graph.end_replays()

    @property
    def graph(self) -> Graph:
        """The graph the module's leaves belong to."""
        return next(leaf for _, leaf in named_leaves(self.original_module)).graph

    def refresh(self) -> None:
        """``activate`` the active copy again, after ``disabled`` changed: only the running
        copy's leaves require gradients."""
        self.activate(self.graph, [] if self.active is None else [self.active])

    def trainable_params(self) -> list[NodeId]:
        """The running copy's leaves (none when the original runs)."""
        if self.disabled or self.active is None:
            return []
        return [leaf for _, leaf in named_leaves(self.modules_to_save[self.active])]


def clone_module(graph: Graph, module: Any, name: str) -> Any:
    """A copy of ``module`` whose leaves are new parameters of ``graph`` holding the same values
    (named ``<name>.<leaf>``); its child modules are copied the same way."""

    def clone(value: Any, prefix: str) -> Any:
        if isinstance(value, NodeId):
            return graph.parameter(np.array(graph.value(value)), name=prefix)
        if is_module(value):
            new = copy.copy(value)
            for attr, child in vars(value).items():
                if not attr.startswith("_"):
                    object.__setattr__(new, attr, clone(child, f"{prefix}.{attr}"))
            return new
        if isinstance(value, (list, tuple)):
            return type(value)(clone(v, f"{prefix}.{i}") for i, v in enumerate(value))
        if isinstance(value, dict):
            return {k: clone(v, f"{prefix}.{k}") for k, v in value.items()}
        return value

    return clone(module, name)


def saved_modules(model: object) -> dict[str, ModulesToSave]:
    """``{dotted name: ModulesToSave}`` for every wrapped module of ``model``."""
    return {name: wrapper for name, wrapper, _ in find_modules(model, (ModulesToSave,))}


def torch_leaves(module: Any) -> dict[str, tuple[NodeId, bool]]:
    """``module``'s leaves by PyTorch's names (relative to it), each with whether PyTorch stores
    it transposed: a ``Linear``'s weight, unless it comes from an ``[in, out]`` framework layer
    (``fan_in_fan_out``)."""
    transposed = {
        id(child.weight)
        for _, child in named_modules(module)
        if isinstance(child, Linear) and not child.fan_in_fan_out
    }
    return {name: (leaf, id(leaf) in transposed) for name, leaf in named_leaves(module)}
