"""Putting LoRA on a model and managing its adapters, as PEFT does on a PyTorch model.

``apply_lora`` finds the targeted layers with PEFT's matching rule, freezes every other leaf and
swaps each target for a LoRA layer over the same weights (``Linear`` -> ``LoraLinear``,
``Embedding`` -> ``LoraEmbedding``), or adds a named adapter to a layer that already has one.
``set_adapter``, ``disable_adapters``, ``delete_adapter`` and ``add_weighted_adapter`` work on
every LoRA layer of a model at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.errors import GraphError
from graphlora.lora import LoraConfig, LoraEmbedding, LoraLayer, LoraLinear, VeraConfig
from graphlora.lora.functional import (
    COMBINATIONS,
    PRUNING,
    check_density,
    check_majority,
    combine_adapters,
)
from graphlora.lora.layer import adapter_list, check_adapter_name
from graphlora.lora.nf4 import NF4Config
from graphlora.lora.variants import (
    Draft,
    adapter_generator,
    check_adapter_config,
    choose_update,
    make_update,
    rank_bounded,
    rewrites_base,
)
from graphlora.nn.layers import Embedding, Linear, NF4Linear
from graphlora.nn.saved import ModulesToSave, clone_module, saved_modules
from graphlora.nn.tree import check_model, find_modules, named_leaves, walk
from graphlora.nn.tree import named_modules as named_modules_of

__all__ = [
    "COMBINATION_TYPES",
    "add_weighted_adapter",
    "apply_lora",
    "delete_adapter",
    "disable_adapters",
    "lora_layers",
    "matches",
    "mixed_batch",
    "set_adapter",
    "trained_biases",
]

COMBINATION_TYPES = COMBINATIONS
"""The ``combination_type`` values ``add_weighted_adapter`` accepts."""


def matches(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regular expression that must match the whole name; in a list,
    a target matches a name equal to it or ending with ``"." + target``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def lora_layers(model: object) -> dict[str, LoraLayer]:
    """``{dotted name: LoRA layer}`` for every ``LoraLinear`` and ``LoraEmbedding`` in
    ``model``."""
    return {name: layer for name, layer, _ in find_modules(model, (LoraLinear, LoraEmbedding))}


def apply_lora(
    model: object,
    config: LoraConfig | VeraConfig,
    target_modules: str | Sequence[str] | None = None,
    *,
    adapter_name: str = "default",
    rng: _checks.Rng = None,
    quantize: str | NF4Config | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> dict[str, LoraLayer]:
    """Freeze ``model``'s leaves and put a LoRA adapter on the targeted layers.

    The first adapter of a model is active. Applying another ``adapter_name`` adds it, inactive,
    beside the existing ones (PEFT's ``add_adapter``); ``set_adapter`` switches.

    Parameters
    ----------
    model
        Any model: an object whose attributes, lists and dicts hold layers (``MLP``, ``GPT``,
        your own). Its targeted ``Linear`` and ``Embedding`` layers are replaced in place by
        ``LoraLinear`` and ``LoraEmbedding``; targeted LoRA layers get the new adapter.
    config
        The adapters' config: a ``LoraConfig`` (LoRA, rsLoRA, DoRA) or a ``VeraConfig`` (VeRA:
        its frozen random projections are made once, sized for the largest targeted layer, and
        shared by every layer this call adapts).
    target_modules
        PEFT's ``target_modules``: a list of names, each matching a layer whose dotted name
        equals it or ends with ``"." + name`` (``"c_attn"`` matches every
        ``transformer.h.N.attn.c_attn``), or one string, a regular expression that must match
        a whole name. ``None``: the model's ``default_lora_targets`` if it has them (``GPT``:
        ``c_attn``, as PEFT), else every linear layer. ``"all-linear"``: every linear layer but
        the model's output head (``lm_head``), as PEFT.
    adapter_name
        The adapter's name (PEFT's ``"default"`` unless given).
    rng
        Generator or seed for the adapters' init, in layer order (default: ``config.seed``).
    quantize
        ``"nf4"`` (or a ``gl.nf4.NF4Config``): QLoRA's base. The targeted ``Linear`` layers'
        weights are quantized to NF4 and their float leaves released; the adapters train over
        the 4-bit base. Targeted ``NF4Linear`` layers (``from_pretrained(...,
        quantize="nf4")``, ``gl.nf4.quantize_``) get adapters over their NF4 base with or
        without it. Targeted embeddings stay float.
    exclude_modules
        PEFT's ``exclude_modules``: layers matched by these names (as ``target_modules``: a list,
        or one regular expression) get no adapter.
    layers_to_transform, layers_pattern
        PEFT's: with a list of targets, only the layers whose block index (the number after
        ``layers_pattern``, e.g. ``"layers"`` or ``"h"``, or else after the name's second-to-last
        part before a number) is ``layers_to_transform`` (an int or a list of ints).
    rank_pattern, alpha_pattern
        PEFT's: ``{pattern: rank}`` and ``{pattern: alpha}`` for the layers whose name matches
        a pattern (equal to it, or ending with ``"." + pattern`` read as a regular expression);
        the others take ``config``'s. LoRA only.

    Returns
    -------
    dict
        ``{dotted name: layer}`` for the layers that got the adapter. The model's forward now
        uses them.

    Raises
    ------
    ValueError
        For a target that matches no layer (the message lists them), a layer that already holds
        an adapter of that name, PiSSA with a rank above a layer's ``min(in, out)`` (any other
        rank is accepted, as PEFT), DoRA on an embedding, ``init="pissa"`` for a second adapter,
        or ``quantize`` for layers that are LoRA layers already. Nothing is changed.
    GraphError
        With ``quantize``, for a targeted weight a recorded op still reads (``reset()`` first).
    """
    where = "apply_lora"
    check_model(where, model)
    check_adapter_config(where, config)
    adapter_name = check_adapter_name(where, adapter_name)
    quantized = NF4Config.of(where, quantize)
    layers = find_modules(model, (Linear, NF4Linear, Embedding, LoraLinear, LoraEmbedding))
    names = [name for name, _, _ in layers]
    linear_names = [n for n, layer, _ in layers if isinstance(layer, _LINEAR)]
    targets: Any = target_modules
    if layers_to_transform is not None and isinstance(targets, str):  # as PEFT
        raise ValueError(
            f"{where}: layers_to_transform needs a list of target_modules, not {targets!r}"
        )
    if targets is None:
        targets = list(getattr(model, "default_lora_targets", linear_names))
    elif targets == "all-linear":  # PEFT's: every linear layer but the output head
        head = getattr(model, "output_layer", None)
        targets = [name for name in linear_names if name != head]
    elif not isinstance(targets, str) and not (
        isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets)
    ):
        raise TypeError(
            f"{where}: target_modules must be a list of layer names or one regular expression, "
            f"got {targets!r}"
        )
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            raise ValueError(f"{where}: target_modules {targets!r} is no regex: {error}") from None
        unmatched = [] if any(matches(n, targets) for n in names) else [targets]
    else:
        unmatched = [t for t in targets if not any(matches(n, [t]) for n in names)]
    if not linear_names and target_modules is None:
        raise ValueError(f"{where}: the model has no Linear layer to put an adapter on")
    if unmatched:
        kinds = "Linear" if len(linear_names) == len(names) else "Linear and Embedding"
        raise ValueError(
            f"{where}: unknown target(s) {unmatched}; the model has the {kinds} layers {names}"
        )
    chosen = _select(where, layers, targets, exclude_modules, layers_to_transform, layers_pattern)
    configs = _layer_configs(where, config, [n for n, _, _ in chosen], rank_pattern, alpha_pattern)
    _check_targets(where, chosen, configs, adapter_name)
    if quantized is not None:
        _check_quantizable(where, chosen)
    to_save = _modules_to_save(where, model, config, {n for n, _, _ in chosen})
    existing = lora_layers(model)
    active = tuple(next(iter(existing.values())).active_adapters) if existing else (adapter_name,)
    graph = _graph(chosen[0][1])
    generator = adapter_generator(where, config, rng)
    # what the variant's layers share (VeRA's projections, sized for the largest linear target)
    linear_shapes = [_shape(layer) for _, layer, _ in chosen if isinstance(layer, _LINEAR)]
    kind = choose_update(where, config, "linear")
    shared = kind.prepare(graph, config, linear_shapes) if linear_shapes else None
    adapted: dict[str, LoraLayer] = {}
    for name, layer, place in chosen:
        config = configs[name]
        if isinstance(layer, LoraLayer):
            layer.add_adapter(graph, adapter_name, config, rng=generator, shared=shared)
            adapted[name] = layer
            continue
        assert place is not None
        lora: LoraLayer
        if isinstance(layer, Embedding):
            lora = LoraEmbedding.from_embedding(
                graph, layer.weight, config, rng=generator, name=name, adapter_name=adapter_name
            )
        else:
            lora = LoraLinear.from_linear(
                graph,
                layer.weight,
                layer.bias,
                config,
                rng=generator,
                name=name,
                fan_in_fan_out=layer.fan_in_fan_out,
                adapter_name=adapter_name,
                shared=shared,
                quantize=quantized if isinstance(layer, Linear) else None,
            )
        lora.activate(graph, active)  # the model's active adapters, as PEFT
        place.replace(lora)
        adapted[name] = lora
    for name, module, place in to_save:  # PEFT's modules_to_save: a trainable copy each
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module, name=name)
            place.replace(module)
        if adapter_name not in module.modules_to_save:
            leaf_prefix = f"{name}.modules_to_save.{adapter_name}"  # the copy's name in the tree
            copied = clone_module(graph, module.original_module, leaf_prefix)
            module.modules_to_save[adapter_name] = copied
        module.activate(graph, active)
    trained = {leaf for layer in lora_layers(model).values() for leaf in layer.trainable_params()}
    trained |= {leaf for w in saved_modules(model).values() for leaf in w.trainable_params()}
    trained |= set(trained_biases(model).values())
    for _, leaf in named_leaves(model):
        if leaf not in trained and leaf.requires_grad:
            graph.requires_grad_(leaf, False)
    for leaf in trained - {leaf for _, leaf in named_leaves(model) if leaf.requires_grad}:
        graph.requires_grad_(leaf, True)  # the biases PEFT's bias="lora_only" / "all" trains
    return adapted


def _modules_to_save(
    where: str, model: object, config: object, targets: set[str]
) -> list[tuple[str, Any, Any]]:
    """The modules ``config.modules_to_save`` names (a dotted name ending with an entry, as
    PEFT), with their places: each entry must match, none may be or hold a LoRA layer, and a
    module inside another that matches is saved as part of it."""
    entries = getattr(config, "modules_to_save", None) or ()
    if not entries:
        return []
    found = []
    for name, module, place in walk(model):
        if place is None or ".modules_to_save." in f".{name}." or ".original_module" in name:
            continue
        if any(name.endswith(entry) for entry in entries):
            found.append((name, module, place))
    outer = [f for f in found if not any(f[0].startswith(o[0] + ".") for o in found)]
    unmatched = [e for e in entries if not any(n.endswith(e) for n, _, _ in found)]
    if unmatched:
        raise ValueError(f"{where}: modules_to_save {unmatched} match no module of the model")
    leafless = sorted(n for n, m, _ in outer if not any(True for _ in named_leaves(m)))
    if leafless:
        raise ValueError(f"{where}: modules_to_save {leafless} have no leaves to train")
    both = sorted(
        n
        for n, m, _ in outer
        if n in targets
        or isinstance(m, LoraLayer)
        or any(t.startswith(n + ".") for t in targets)
        or any(isinstance(c, LoraLayer) for _, c in named_modules_of(m))
    )
    if both:
        raise ValueError(
            f"{where}: {both} are both LoRA layers (or targets) and modules_to_save; a module is "
            "one or the other"
        )
    return outer


def trained_biases(model: object, adapter_name: str | None = None) -> dict[str, NodeId]:
    """The model's own biases that train with its adapters, by dotted name, as PEFT's ``bias``:
    with ``"lora_only"`` the bias of each layer holding such an adapter, with ``"all"`` every
    leaf named ``*.bias`` outside the adapters. The adapters considered are the active ones, or
    ``adapter_name`` alone (what its file holds)."""
    layers = lora_layers(model)
    modes: dict[str, set[str]] = {}  # layer name -> the bias modes of its adapters considered
    for name, layer in layers.items():
        names = layer.active_adapters if adapter_name is None else [adapter_name]
        modes[name] = {
            getattr(layer.adapters[a].config, "bias", "none") for a in names if a in layer.adapters
        }
    every = set().union(*modes.values()) if modes else set()
    adapter_leaves = {
        leaf for layer in layers.values() for u in layer.adapters.values() for leaf in u.params()
    }
    biases = {}
    for name, leaf in named_leaves(model):
        if name.rsplit(".", 1)[-1] != "bias" or leaf in adapter_leaves:
            continue
        owner = name.rsplit(".", 1)[0]
        if "all" in every or "lora_only" in modes.get(owner, set()):
            biases[name] = leaf
    return biases


_LINEAR = (Linear, NF4Linear, LoraLinear)


def pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's lookup in ``rank_pattern`` and ``alpha_pattern``: an exact key, else the first key
    matching the end of ``name`` as a regex (after a dot), else ``default``."""
    if name in pattern:
        return pattern[name]
    for key, value in pattern.items():
        with contextlib.suppress(re.error):
            if re.match(rf"(.*\.)?({key})$", name):
                return value
    return default


def _select(
    where: str,
    layers: list[tuple[str, Any, Any]],
    targets: str | Sequence[str],
    exclude: object,
    indexes: object,
    patterns: object,
) -> list[tuple[str, Any, Any]]:
    """The targeted layers, as PEFT's ``check_target_module_exists``: matched by ``targets``,
    not by ``exclude``, and (with a list of targets) in the blocks ``indexes`` names."""
    if exclude is not None:
        exclude = _names(where, "exclude_modules", exclude)
    if indexes is not None:
        indexes = [indexes] if _checks.is_int(indexes) else indexes
        if not (isinstance(indexes, Sequence) and all(_checks.is_int(i) for i in indexes)):
            raise TypeError(f"{where}: layers_to_transform must be an int or a list of ints")
    if patterns is not None:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not (isinstance(patterns, Sequence) and all(isinstance(p, str) for p in patterns)):
            raise TypeError(f"{where}: layers_pattern must be a str or a list of str")
    chosen = []
    for name, layer, place in layers:
        if not matches(name, targets):
            continue
        if exclude is not None and matches(name, exclude):
            continue
        if indexes:
            found = _block_index(name, patterns)
            if found is None or found not in indexes:
                continue
        chosen.append((name, layer, place))
    if not chosen:
        raise ValueError(
            f"{where}: no layer is left to adapt after exclude_modules {exclude!r} and "
            f"layers_to_transform {indexes!r}"
        )
    return chosen


def _names(where: str, arg: str, value: object) -> str | list[str]:
    """A regex or a list of names (``target_modules``' kinds), else a TypeError."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"{where}: {arg} {value!r} is no regex: {error}") from None
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{where}: {arg} must be a list of layer names or one regular expression")


def _block_index(name: str, patterns: Sequence[str] | None) -> int | None:
    """The block index in ``name`` (``model.layers.3.mlp`` -> 3), as PEFT finds it."""
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        found = None
        for pattern in patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if found is not None:
                break
    return None if found is None else int(found.group("idx"))


def _layer_configs(
    where: str,
    config: LoraConfig | VeraConfig,
    names: list[str],
    ranks: object,
    alphas: object,
) -> dict[str, Any]:
    """Each chosen layer's config: ``config`` with its rank and alpha from the patterns."""
    if ranks is None and alphas is None:
        return dict.fromkeys(names, config)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{where}: rank_pattern and alpha_pattern are for LoRA, not VeRA")
    checked: list[dict[str, Any]] = []
    for arg, pattern in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        if pattern is None:
            checked.append({})
            continue
        if not isinstance(pattern, Mapping) or not all(isinstance(k, str) for k in pattern):
            raise TypeError(f"{where}: {arg} must be a dict of layer-name patterns to values")
        checked.append(dict(pattern))
    configs = {}
    for name in names:
        rank = pattern_value(checked[0], name, config.rank)
        alpha = pattern_value(checked[1], name, config.alpha)
        try:
            configs[name] = dataclasses.replace(config, rank=rank, alpha=alpha)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: layer {name!r}: {error}") from None
    return configs


def _graph(layer: Any) -> Graph:
    """The graph of a base or LoRA layer."""
    if isinstance(layer, (LoraLayer, NF4Linear)):
        return layer.graph
    graph: Graph = layer.weight.graph
    return graph


def _shape(layer: Any) -> tuple[int, int]:
    """The weight's shape in graphlora's layout (``[in, out]``, ``[V, D]``) of a base or LoRA
    layer."""
    if isinstance(layer, LoraLayer):
        return layer.weight_shape
    if isinstance(layer, NF4Linear):
        return layer.in_features, layer.out_features
    rows, cols = layer.weight.shape
    return rows, cols


def _check_quantizable(where: str, chosen: list[tuple[str, Any, Any]]) -> None:
    """With ``quantize``: refuse LoRA layers (their base is theirs) and weights the tape
    reads, before anything changes."""
    adapted = [n for n, layer, _ in chosen if isinstance(layer, LoraLayer)]
    if adapted:
        raise ValueError(
            f"{where}: quantize applies to base layers, and {adapted} are LoRA layers already; "
            "quantize the model first (gl.nf4.quantize_) or leave quantize out"
        )
    read = [
        n
        for n, layer, _ in chosen
        if isinstance(layer, Linear) and layer.weight.graph.readers(layer.weight)
    ]
    if read:
        raise GraphError(
            f"{where}: the weights of {read} are read by recorded ops; reset() before quantizing"
        )


def _check_targets(
    where: str,
    chosen: list[tuple[str, Any, Any]],
    configs: Mapping[str, Any],
    adapter_name: str,
) -> None:
    """Refuse, before anything changes, a target that cannot take this adapter."""
    holding = [n for n, layer, _ in chosen if adapter_name in getattr(layer, "adapters", {})]
    if holding:
        raise ValueError(
            f"{where}: {holding} already carry a LoRA adapter named {adapter_name!r}; give "
            "another adapter_name to add a second one"
        )
    config = configs[chosen[0][0]]
    too_small = [
        n
        for n, layer, _ in chosen
        if rank_bounded(configs[n]) and configs[n].rank > min(_shape(layer))
    ]
    if too_small:
        raise ValueError(
            f"{where}: rank {configs[too_small[0]].rank} exceeds min(in, out) of layer(s) "
            f"{too_small}; "
            "init='pissa' takes that many singular vectors of each weight"
        )
    embeddings = [n for n, layer, _ in chosen if isinstance(layer, (Embedding, LoraEmbedding))]
    if embeddings:
        choose_update(f"{where}: {embeddings}", config, "embedding")
        if rewrites_base(config):
            raise ValueError(
                f"{where}: init='pissa' is for linear layers; {embeddings} are embeddings"
            )
    adapted = [n for n, layer, _ in chosen if isinstance(layer, LoraLayer)]
    if adapted and rewrites_base(config):
        raise ValueError(
            f"{where}: init='pissa' replaces the base weight, which the adapters of {adapted} "
            "share; use it for a layer's first adapter only"
        )
    in_tuples = [
        n
        for n, layer, place in chosen
        if not isinstance(layer, LoraLayer) and (place is None or place.kind == "tuple")
    ]
    if in_tuples:
        raise TypeError(f"{where}: {in_tuples} sit in tuples, which cannot be changed; use lists")


def _lora_layers_of(where: str, model: object) -> dict[str, LoraLayer]:
    check_model(where, model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{where}: the model has no LoRA layer (apply_lora first)")
    return layers


def _known(layers: dict[str, LoraLayer]) -> list[str]:
    """Every adapter name held by some layer, in the order first seen."""
    return list(dict.fromkeys(name for layer in layers.values() for name in layer.adapters))


def _refuse_merged(where: str, layers: dict[str, LoraLayer]) -> None:
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise GraphError(f"{where}: {merged} are merged; unmerge_ them first")


def set_adapter(model: object, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` (one name, or several whose updates then add) the active adapters of
    every LoRA layer of ``model``: they run in ``forward`` and only their leaves require
    gradients. As PEFT's ``set_adapter``; a layer without one of the names runs the others.

    Raises
    ------
    ValueError
        For a name no layer holds (the message lists the model's adapters).
    GraphError
        While a layer is merged (PEFT would unmerge it silently; here nothing changes).
    """
    where = "set_adapter"
    layers = _lora_layers_of(where, model)
    names = adapter_list(where, adapter_name)
    known = _known(layers)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{where}: unknown adapter(s) {unknown}; the model has {known}")
    _refuse_merged(where, layers)
    wrappers = saved_modules(model)
    for name, wrapper in wrappers.items():
        held = [n for n in names if n in wrapper.modules_to_save]
        if len(held) > 1:
            raise ValueError(
                f"{where}: {name} holds modules_to_save copies for {held}; only one can be "
                "active at a time (as PEFT)"
            )
    for layer in layers.values():
        layer.activate(layer.graph, names)
    for wrapper in wrappers.values():
        wrapper.activate(wrapper.graph, names)


@contextmanager
def disable_adapters(model: object) -> Iterator[None]:
    """``with disable_adapters(model):`` runs every LoRA layer of ``model`` as its base layer
    alone, with every adapter leaf frozen (as PEFT: nothing of an adapter trains in there); on
    leaving, the adapters run again and train as before. Compiled steps (``Replay``) end on
    entering and on leaving, since they would run what they recorded.

    Raises
    ------
    GraphError
        While a layer is merged: its weight holds the adapters.
    """
    where = "disable_adapters"
    layers = _lora_layers_of(where, model)
    _refuse_merged(where, layers)
    previous = [(layer, layer.disabled) for layer in layers.values()]
    graphs = {id(g): g for g in (layer.graph for layer in layers.values())}
    trained = [  # frozen inside, as PEFT: nothing of an adapter trains while it is off
        leaf
        for layer in layers.values()
        for update in layer.adapters.values()
        for leaf in update.params()
        if leaf.requires_grad
    ]
    wrappers = [(w, w.disabled) for w in saved_modules(model).values()]
    _switch_off(layers, saved_modules(model))
    try:
        yield
    finally:
        for layer, disabled in previous:
            layer.disabled = disabled
        for wrapper, disabled in wrappers:
            wrapper.disabled = disabled
            wrapper.refresh()
        for leaf in trained:
            leaf.graph.requires_grad_(leaf, True)
        for graph in graphs.values():
            graph.end_replays()


@contextmanager
def mixed_batch(model: object, adapter_names: Sequence[str]) -> Iterator[None]:
    """``with mixed_batch(model, ["a", "__base__", "b"]):`` runs each sample of a batch through
    its own adapter, as PEFT's ``model(x, adapter_names=[...])``: sample ``i`` (the first axis of
    every LoRA layer's input) gets adapter ``adapter_names[i]`` wherever a layer has it, and
    ``"__base__"`` the base model alone. How one model serves several adapters at once.

    For inference only, as in PEFT: a layer refuses a mixed batch while gradients are recorded
    (use ``graph.no_grad()``), while merged, or for an input whose first axis is not one sample
    per name. Unlike PEFT, DoRA adapters may be mixed too. Each named adapter's update is
    computed for the whole batch and kept for its samples (PEFT computes it on the sub-batch):
    the same numbers, more arithmetic. A ``modules_to_save`` module gives each sample its
    adapter's copy (the original for ``"__base__"``), as PEFT's. Compiled steps (``Replay``)
    end on entering and leaving.

    Raises
    ------
    ValueError
        For names that are not ``"__base__"`` or one of the model's adapters (the message
        lists them), or an empty list.
    GraphError
        While a layer is merged.
    """
    where = "mixed_batch"
    layers = _lora_layers_of(where, model)
    if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, Sequence):
        raise TypeError(
            f"{where}: adapter_names must be a list of adapter names, one per sample, got "
            f"{adapter_names!r:.60}"
        )
    names = tuple(adapter_names)
    known = _known(layers)
    unknown = sorted({n for n in names if n != "__base__" and n not in known}, key=str)
    if not names or unknown:
        raise ValueError(
            f"{where}: unknown adapter(s) {unknown or list(names)}; the model has {known} "
            "(and '__base__' for none)"
        )
    _refuse_merged(where, layers)
    held: list[Any] = [*layers.values(), *saved_modules(model).values()]
    previous = [(module, module.batch_adapters) for module in held]
    graphs = {id(g): g for g in (layer.graph for layer in layers.values())}
    for graph in graphs.values():
        graph.end_replays()
    for module in held:
        module.batch_adapters = names
    try:
        yield
    finally:
        for module, batch in previous:
            module.batch_adapters = batch
        for graph in graphs.values():
            graph.end_replays()


def disable_adapter_layers(model: object) -> None:
    """PEFT's ``disable_adapter_layers``: from now on every LoRA layer of ``model`` runs its base
    layer alone, every adapter leaf frozen, until ``enable_adapter_layers``. Compiled steps end.

    Raises
    ------
    GraphError
        While a layer is merged: its weight holds the adapters.
    """
    where = "disable_adapter_layers"
    layers = _lora_layers_of(where, model)
    _refuse_merged(where, layers)
    _switch_off(layers, saved_modules(model))


def _switch_off(layers: Mapping[str, LoraLayer], wrappers: Mapping[str, ModulesToSave]) -> None:
    """Every layer runs its base alone, every adapter leaf frozen (as PEFT: nothing of an
    adapter trains while it is off), every modules_to_save wrapper its original; compiled steps
    end."""
    for wrapper in wrappers.values():
        wrapper.disabled = True
        wrapper.refresh()
    for layer in layers.values():
        layer.disabled = True
        for update in layer.adapters.values():
            for leaf in update.params():
                if leaf.requires_grad:
                    leaf.graph.requires_grad_(leaf, False)
        layer.graph.end_replays()


def enable_adapter_layers(model: object) -> None:
    """PEFT's ``enable_adapter_layers``: every LoRA layer of ``model`` runs its active adapters
    again, and their leaves train. Compiled steps end."""
    layers = _lora_layers_of("enable_adapter_layers", model)
    for layer in layers.values():
        layer.disabled = False
        layer.activate(layer.graph, layer.active_adapters)
    for wrapper in saved_modules(model).values():
        wrapper.disabled = False
        wrapper.refresh()


def merge_adapter(model: object, adapter_names: str | Sequence[str] | None = None) -> None:
    """PEFT's ``merge_adapter``: fold ``adapter_names`` (default: the active adapters) into the
    weights of every LoRA layer that holds them, in place (``LoraLayer.merge_``). A layer merged
    already takes the further adapters on top; ``unmerge_adapter`` restores every weight
    exactly.

    Raises
    ------
    ValueError
        For a name no layer holds.
    NonFiniteError, GraphError
        As ``LoraLayer.merge_`` (nothing is changed on any layer).
    """
    where = "merge_adapter"
    layers = _lora_layers_of(where, model)
    names = None if adapter_names is None else adapter_list(where, adapter_names)
    if names is not None:
        unknown = [n for n in names if n not in _known(layers)]
        if unknown:
            raise ValueError(
                f"{where}: unknown adapter(s) {unknown}; the model has {_known(layers)}"
            )
    plans = []
    for layer in layers.values():
        wanted = [
            n
            for n in (layer.active_adapters if names is None else names)
            if n in layer.adapters and n not in layer.merged_adapters
        ]
        if wanted:
            layer.merge(layer.graph, wanted)  # refuses a non-finite result before any change
            plans.append((layer, wanted))
    for layer, wanted in plans:
        layer.merge_(layer.graph, wanted)


def unmerge_adapter(model: object) -> None:
    """PEFT's ``unmerge_adapter``: every merged LoRA layer of ``model`` gets its weight from
    before the first merge back, bit for bit."""
    for layer in _lora_layers_of("unmerge_adapter", model).values():
        if layer.merged:
            layer.unmerge_(layer.graph)


def delete_adapter(model: object, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every LoRA layer of ``model``. The other active
    adapters stay active; if it was the only active one, none is active until ``set_adapter``
    (PEFT would activate the first remaining one).

    Raises
    ------
    ValueError
        For a name no layer holds (the message lists the model's adapters).
    GraphError
        While a layer is merged.
    """
    where = "delete_adapter"
    layers = _lora_layers_of(where, model)
    adapter_name = check_adapter_name(where, adapter_name)
    known = _known(layers)
    if adapter_name not in known:
        raise ValueError(f"{where}: unknown adapter {adapter_name!r}; the model has {known}")
    _refuse_merged(where, layers)
    for layer in layers.values():
        graph = layer.graph
        if adapter_name in layer.adapters:
            layer.delete_adapter(graph, adapter_name)
        else:
            layer.activate(graph, [name for name in layer.active_adapters if name != adapter_name])
    for wrapper in saved_modules(model).values():
        if wrapper.modules_to_save.pop(adapter_name, None) is not None:
            wrapper.refresh()


def add_weighted_adapter(
    graph: Graph,
    model: object,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> dict[str, LoraLayer]:
    """Add a new adapter ``adapter_name`` that combines ``adapters`` with ``weights``, as PEFT's
    ``add_weighted_adapter``, on every LoRA layer holding at least one of them. The new adapter
    is inactive and frozen; ``set_adapter`` runs it.

    ``combination_type`` (see ``graphlora.lora.functional.combine_adapters`` for the maths):

    - ``"linear"``: A and B are weighted sums, each adapter's A weighted by
      ``sign(w s) sqrt(|w s|)`` and B by ``sqrt(|w s|)`` (``s`` its scaling). The ranks must be
      equal; the product is *not* the weighted sum of the updates (cross terms remain).
    - ``"cat"``: A and B concatenated along the rank, A weighted by ``w s``: exactly
      ``sum w_i s_i A_i B_i``, with rank the sum of the ranks.
    - ``"svd"``: the weighted sum of the updates, cut to rank ``svd_rank`` (default: the largest
      rank) by a singular value decomposition: the best approximation of that rank.
    - ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: as ``"linear"``,
      but A and B are each pruned to ``density`` (by magnitude; at random and rescaled by
      ``1 / density`` for DARE) and, for the TIES types, only the values of the sign elected by
      ``majority_sign_method`` (``"total"`` or ``"frequency"``) are kept and averaged.
    - ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``: the
      same merges on the weighted updates, then cut to rank ``svd_rank`` as ``"svd"``.

    ``density`` is required by the pruning types and refused by the others (PEFT ignores it
    there). DARE draws its masks from ``numpy.random.default_rng(seed)``, layer by layer in
    model order, A's before B's; PEFT draws from PyTorch's global generator, so the two prune
    different values (in distribution alike).

    The new adapter has ``rank = alpha = new rank`` (scaling 1), the first adapter's dropout and
    no rsLoRA. One adapter is always combined linearly, as in PEFT. The weights are used exactly,
    in the graph's dtype; PEFT rounds them to float32 for ``"linear"`` and ``"svd"``, and keeps
    the first adapter's ``use_rslora``, which then scales its result by ``sqrt(new rank)``.

    Returns
    -------
    dict
        ``{dotted name: layer}`` for the layers that got the new adapter.

    Raises
    ------
    ValueError
        For unknown adapters (the message lists the model's), an existing ``adapter_name``,
        weights that are not one finite number per adapter, an unknown ``combination_type``,
        ``"linear"`` (or another type that merges A and B) over unequal ranks (both given),
        DoRA or PiSSA adapters, an SVD rank above a layer's ``min(in, out)``, a density missing,
        out of range or given to a type that does not prune, or an unknown
        ``majority_sign_method``. Nothing is changed.
    GraphError
        While a layer is merged.
    """
    where = "add_weighted_adapter"
    check_graph(where, graph)
    layers = _lora_layers_of(where, model)
    names = adapter_list(where, adapters)
    adapter_name = check_adapter_name(where, adapter_name)
    known = _known(layers)
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise ValueError(f"{where}: unknown adapter(s) {unknown or names}; the model has {known}")
    if adapter_name in known:
        raise ValueError(f"{where}: the model already has an adapter {adapter_name!r}")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{where}: weights must be a list of numbers, got {weights!r}")
    if len(weights) != len(names):
        raise ValueError(
            f"{where}: {len(names)} adapters {names} but {len(weights)} weights {list(weights)}"
        )
    values = [_checks.real_scalar(where, "weights", w) for w in weights]
    if not all(np.isfinite(values)):
        raise ValueError(f"{where}: weights must be finite, got {values}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"{where}: combination_type must be one of {list(COMBINATION_TYPES)}, got "
            f"{combination_type!r}"
        )
    if svd_rank is not None:
        svd_rank = _checks.positive_int(where, "svd_rank", svd_rank)
    if combination_type in PRUNING or density is not None:
        density = check_density(where, combination_type, density)
    check_majority(where, majority_sign_method)
    rng = np.random.default_rng(seed)
    if len(names) == 1:
        combination_type = "linear"  # as PEFT: one adapter is only re-weighted
    holders = {n: layer for n, layer in layers.items() if any(a in layer.adapters for a in names)}
    _refuse_merged(where, holders)
    updates = {(n, a): layer.adapters[a] for n, layer in holders.items() for a in layer.adapters}
    odd = sorted(
        {a for (_, a), u in updates.items() if a in names and not u.combinable}
        | {a for (_, a), u in updates.items() if a in names and rewrites_base(u.config)}
    )
    if odd:
        raise ValueError(
            f"{where}: adapters {odd} use DoRA, VeRA or init='pissa', whose weights do not "
            "combine linearly (a magnitude or trained scales; a base weight that depends on the "
            "rank)"
        )
    ranks = {a: max(u.rank for (_, b), u in updates.items() if b == a) for a in names}
    one_rank = combination_type != "cat" and not combination_type.endswith("svd")
    if one_rank and len(set(ranks.values())) > 1:
        raise ValueError(
            f"{where}: {combination_type!r} needs adapters of one rank; they have ranks {ranks}"
        )
    if one_rank:
        new_rank = next(iter(ranks.values()))
    elif combination_type == "cat":
        new_rank = sum(ranks.values())
    else:
        new_rank = svd_rank or max(ranks.values())
        too_small = [n for n, layer in holders.items() if new_rank > min(layer.weight_shape)]
        if too_small:
            raise ValueError(
                f"{where}: svd rank {new_rank} exceeds min(in, out) of layer(s) {too_small}"
            )
    first = next(u for (_, a), u in updates.items() if a == names[0])
    assert isinstance(first.config, LoraConfig)  # combinable: LoRA's
    config = LoraConfig(
        rank=new_rank,
        alpha=float(new_rank),
        dropout=first.config.dropout,
        init=first.config.init,
        init_std=first.config.init_std,
        seed=first.config.seed,
    )
    combined = {}
    for n, layer in holders.items():
        present = [
            (layer.adapters[a], w)
            for a, w in zip(names, values, strict=True)
            if a in layer.adapters
        ]
        with np.errstate(over="ignore", invalid="ignore"):
            adapter = combine_adapters(
                [{"A": graph.value(u.lora_a), "B": graph.value(u.lora_b)} for u, _ in present],
                [w for _, w in present],
                combination_type,
                scalings=[u.scaling for u, _ in present],
                rank=new_rank,
                density=density if combination_type in PRUNING else None,
                majority_sign_method=majority_sign_method,
                rng=rng,
            )
        if not (np.isfinite(adapter["A"]).all() and np.isfinite(adapter["B"]).all()):
            raise ValueError(
                f"{where}: weights {values} overflow: layer {n!r}'s combined adapter holds NaN "
                "or Inf; nothing was added"
            )
        combined[n] = (adapter["A"], adapter["B"], present[0][0])
    for n, layer in holders.items():
        a_value, b_value, source = combined[n]
        kind = "embedding" if isinstance(layer, LoraEmbedding) else "linear"
        draft = Draft(choose_update(where, config, kind), config, (a_value, b_value), None)
        update = make_update(
            graph,
            draft,
            layer.base_weight(graph),
            source.rng,
            name=layer.name,
            adapter=adapter_name,
        )
        layer.attach(graph, adapter_name, update)
    return holders
