"""A model is a tree of plain objects: walk it, list its leaves, save and load its state.

No base class is needed. A *module* is any object with a ``forward`` method (a layer, a block, a
whole model); its children are the modules held by its public attributes, directly or in lists,
tuples and dicts, in attribute order, so names come out as PyTorch's do:
``transformer.h.0.attn.c_attn``. A module's own *leaves* are the NodeIds among its public
attributes (``weight``, ``bias``), or what its ``named_leaves()`` method lists when it has one
(a LoRA layer lists its frozen weight and its adapters). A module or leaf reached twice (tied
weights) is listed once, under the first name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.errors import GraphError
from graphlora.lora.nf4 import NF4Weight
from graphlora.ops import Array

__all__ = [
    "LoadResult",
    "check_model",
    "is_model",
    "is_module",
    "load_state_dict",
    "named_leaves",
    "named_modules",
    "parameters",
    "state_dict",
    "trainable_parameters",
]


def is_module(value: object) -> bool:
    """True for a layer or model: an object (not a class) with a ``forward`` method."""
    return not isinstance(value, type) and callable(getattr(value, "forward", None))


@dataclass(frozen=True)
class Place:
    """Where a module sits in its parent, so that it can be replaced (``apply_lora``)."""

    parent: Any
    key: str | int
    kind: str  # "attribute", "list" or "dict"; "tuple" cannot be replaced

    def replace(self, new: object) -> None:
        """Put ``new`` where the module was."""
        if self.kind == "attribute":
            setattr(self.parent, str(self.key), new)
        elif self.kind in ("list", "dict"):
            self.parent[self.key] = new
        else:
            raise TypeError(f"a module held in a tuple cannot be replaced (at {self.key!r})")


def is_model(value: object) -> bool:
    """True for what ``named_modules`` can walk: a module, or any object, list, tuple or dict
    that may hold modules (a model needs no ``forward`` of its own)."""
    if isinstance(value, (list, tuple, dict)) or is_module(value):
        return True
    return not isinstance(value, type) and hasattr(value, "__dict__")


def check_model(where: str, model: object) -> None:
    """Refuse what cannot be a model, naming ``where`` and the type."""
    if not is_model(model):
        raise TypeError(
            f"{where}: model must be a layer or a model (an object, list or dict holding layers), "
            f"got {type(model).__name__}"
        )


def _root_children(model: object) -> Iterator[tuple[str, object, Place]]:
    """The modules under the root: its attributes', or a list's, tuple's or dict's items."""
    if isinstance(model, (list, tuple, dict)) and not is_module(model):
        items = model.items() if isinstance(model, dict) else enumerate(model)
        kind = "dict" if isinstance(model, dict) else type(model).__name__
        for key, item in items:
            yield from _collect(str(key), item, Place(model, key, kind))
    else:
        yield from _children(model)


def _children(module: object) -> Iterator[tuple[str, object, Place]]:
    """The modules held by ``module``'s public attributes, with their relative names."""
    attributes = getattr(module, "__dict__", {})
    for attr, value in attributes.items():
        if attr.startswith("_"):
            continue
        yield from _collect(attr, value, Place(module, attr, "attribute"))


def _collect(name: str, value: object, place: Place) -> Iterator[tuple[str, object, Place]]:
    if is_module(value):
        yield name, value, place
    elif isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        for i, item in enumerate(value):
            yield from _collect(f"{name}.{i}", item, Place(value, i, kind))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _collect(f"{name}.{key}", item, Place(value, key, "dict"))


def walk(model: object) -> Iterator[tuple[str, object, Place | None]]:
    """``(name, module, place)`` for the model and every module under it, each once."""
    seen: set[int] = set()
    stack: list[tuple[str, object, Place | None]] = [("", model, None)]
    while stack:
        name, module, place = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module, place
        found = _root_children(module) if place is None else _children(module)
        children = [
            (f"{name}.{child}" if name else child, value, where) for child, value, where in found
        ]
        stack.extend(reversed(children))  # depth first, in attribute order


def named_modules(model: object) -> Iterator[tuple[str, object]]:
    """``(dotted name, module)`` for ``model`` (named ``""``) and every module under it, in
    attribute order, depth first, each once: as ``torch.nn.Module.named_modules``.

    ``model`` needs no ``forward`` of its own: an object, list or dict holding layers is a model.

    Raises
    ------
    TypeError
        When ``model`` cannot hold modules (a number, a string, an array, a class).
    """
    check_model("named_modules", model)
    for name, module, _ in walk(model):
        yield name, module


def _own_leaves(module: object) -> Iterator[tuple[str, NodeId]]:
    listed = getattr(module, "named_leaves", None)
    if callable(listed):
        yield from listed()
        return
    for attr, value in getattr(module, "__dict__", {}).items():
        if not attr.startswith("_") and isinstance(value, NodeId):
            yield attr, value


def named_leaves(model: object) -> Iterator[tuple[str, NodeId]]:
    """``(dotted name, leaf)`` for every leaf of every module: ``layers.0.weight``, ... A leaf
    reached twice (tied weights) is listed once."""
    seen: set[NodeId] = set()
    for name, module in named_modules(model):
        for leaf_name, leaf in _own_leaves(module):
            if leaf in seen:
                continue
            seen.add(leaf)
            yield (f"{name}.{leaf_name}" if name else leaf_name), leaf


def parameters(model: object) -> list[NodeId]:
    """The leaves of ``model`` that receive gradients (after ``apply_lora``: the adapters), in
    order: what an optimizer should update."""
    return [leaf for _, leaf in named_leaves(model) if leaf.requires_grad]


def trainable_parameters(model: object) -> str:
    """``"trainable params: 1,234 || all params: 5,678 || trainable%: 21.7328"``, as PEFT."""
    leaves = [leaf for _, leaf in named_leaves(model)]
    total = sum(math.prod(node.shape) for node in leaves) + _quantized_count(model)
    trainable = sum(math.prod(node.shape) for node in leaves if node.requires_grad)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"


def _quantized_count(model: object) -> int:
    """The values of the 4-bit weights (``NF4Weight``) the modules hold, which are no leaves."""
    return sum(
        math.prod(value.shape)
        for _, module in named_modules(model)
        for attr, value in getattr(module, "__dict__", {}).items()
        if isinstance(value, NF4Weight) and not attr.startswith("_")
    )


def state_dict(graph: Graph, model: object) -> dict[str, Array]:
    """``{dotted name: a copy of the leaf's value}`` for every leaf of ``model``."""
    check_graph("state_dict", graph)
    return {name: np.array(graph.value(leaf)) for name, leaf in named_leaves(model)}


@dataclass(frozen=True)
class LoadResult:
    """What ``load_state_dict`` left out: names the model has and the state lacks, and names the
    state has and the model lacks (both empty with ``strict=True``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def load_state_dict(
    graph: Graph, model: object, state: Mapping[str, Any], *, strict: bool = True
) -> LoadResult:
    """Set ``model``'s leaves from ``state`` (as ``state_dict`` returns it), all or nothing.

    Every name, shape and kind of data is checked before any leaf changes: float leaves take
    floating-point arrays (converted to the graph's dtype), integer and bool leaves their own
    kind. With ``strict`` (the default), the names must match exactly; without, names on one
    side only are left alone and returned.

    Raises
    ------
    ValueError
        For missing or unexpected names (``strict``).
    ShapeError, TypeError
        For an array of the wrong shape or kind.
    GraphError
        When a merged LoRA layer's weight would be overwritten (unmerge it first).
    """
    where = "load_state_dict"
    check_graph(where, graph)
    if not isinstance(state, Mapping):
        raise TypeError(f"{where}: state must be a mapping of names to arrays")
    leaves = dict(named_leaves(model))
    missing = sorted(set(leaves) - set(state))
    unexpected = sorted(str(key) for key in set(state) - set(leaves))
    if strict and (missing or unexpected):
        raise ValueError(
            f"{where}: names differ; missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    merged = _merged_leaves(model)
    loading = [(name, leaf, state[name]) for name, leaf in leaves.items() if name in state]
    for name, leaf, _ in loading:
        if leaf in merged:
            raise GraphError(f"{where}: {name} belongs to a merged LoRA layer; unmerge_ it first")
    graph.set_values(where, loading)
    return LoadResult(missing, unexpected)


def _merged_leaves(model: object) -> set[NodeId]:
    """The frozen weights of merged LoRA layers: loading into them would be undone by unmerge."""
    found: set[NodeId] = set()
    for _, module in named_modules(model):
        weight = getattr(module, "frozen_weight", None)
        if getattr(module, "merged", False) and isinstance(weight, NodeId):
            found.add(weight)
    return found


def find_modules(model: object, kinds: tuple[type, ...]) -> list[tuple[str, Any, Place | None]]:
    """``(name, module, place)`` for the modules of ``model`` that are instances of ``kinds``."""
    return [
        (name, module, place) for name, module, place in walk(model) if isinstance(module, kinds)
    ]
