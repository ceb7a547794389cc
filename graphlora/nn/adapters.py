"""Putting LoRA on a model: ``apply_lora`` finds the targeted layers with PEFT's matching rule,
freezes every other leaf and swaps each target for a ``LoraLinear`` over the same weights."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from graphlora import _checks
from graphlora.graph import Graph
from graphlora.lora import LoraConfig, LoraLinear
from graphlora.nn.layers import Linear
from graphlora.nn.tree import find_modules, is_module, named_leaves

__all__ = ["apply_lora", "lora_layers", "matches"]


def matches(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regular expression that must match the whole name; in a list,
    a target matches a name equal to it or ending with ``"." + target``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def lora_layers(model: object) -> dict[str, LoraLinear]:
    """``{dotted name: LoraLinear}`` for every LoRA layer in ``model``."""
    return {name: layer for name, layer, _ in find_modules(model, (LoraLinear,))}


def apply_lora(
    model: object,
    config: LoraConfig,
    target_modules: str | Sequence[str] | None = None,
    *,
    rng: _checks.Rng = None,
) -> dict[str, LoraLinear]:
    """Freeze ``model``'s leaves and put a LoRA adapter on the targeted ``Linear`` layers.

    Parameters
    ----------
    model
        Any model: an object whose attributes, lists and dicts hold layers (``MLP``, ``GPT``,
        your own). Its targeted layers are replaced in place.
    config
        The adapters' config.
    target_modules
        PEFT's ``target_modules``: a list of names, each matching a layer whose dotted name
        equals it or ends with ``"." + name`` (``"c_attn"`` matches every
        ``transformer.h.N.attn.c_attn``), or one string, a regular expression that must match
        a whole name. ``None``: the model's ``default_lora_targets`` if it has them (``GPT``:
        ``c_attn``, as PEFT), else every ``Linear`` layer.
    rng
        Generator or seed for the adapters' init, in layer order (default: ``config.seed``).

    Returns
    -------
    dict
        ``{dotted name: LoraLinear}`` for the new adapters. The model's forward now uses them.

    Raises
    ------
    ValueError
        For a target that matches no ``Linear`` layer (the message lists them), a layer that
        already carries an adapter, or a rank above a layer's ``min(in, out)``. Nothing is changed.
    """
    where = "apply_lora"
    if not is_module(model):
        raise TypeError(
            f"{where}: model must be a layer or model (an object with a forward method), got "
            f"{type(model).__name__}"
        )
    if not isinstance(config, LoraConfig):
        raise TypeError(f"{where}: config must be a LoraConfig, got {type(config).__name__}")
    linears = find_modules(model, (Linear,))
    names = [name for name, _, _ in linears]
    targets: Any = target_modules
    if targets is None:
        targets = list(getattr(model, "default_lora_targets", names))
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
    if not names:
        raise ValueError(f"{where}: the model has no Linear layer to put an adapter on")
    if unmatched:
        adapted = [t for t in unmatched if any(matches(n, [t]) for n in lora_layers(model))]
        if adapted:
            raise ValueError(f"{where}: {adapted} already carry a LoRA adapter")
        raise ValueError(
            f"{where}: unknown target(s) {unmatched}; the model has the Linear layers {names}"
        )
    chosen = [(name, layer, place) for name, layer, place in linears if matches(name, targets)]
    too_small = [
        n for n, layer, _ in chosen if config.rank > min(layer.in_features, layer.out_features)
    ]
    if too_small:
        raise ValueError(
            f"{where}: rank {config.rank} exceeds min(in, out) of layer(s) {too_small}"
        )
    in_tuples = [name for name, _, place in chosen if place is None or place.kind == "tuple"]
    if in_tuples:
        raise TypeError(f"{where}: {in_tuples} sit in tuples, which cannot be changed; use lists")
    graph: Graph = chosen[0][1].weight.graph
    generator = _checks.as_generator(where, config.seed if rng is None else rng)
    adapters: dict[str, LoraLinear] = {}
    for name, layer, place in chosen:
        assert place is not None
        lora = LoraLinear.from_linear(
            graph,
            layer.weight,
            layer.bias,
            config,
            rng=generator,
            name=name,
            fan_in_fan_out=layer.fan_in_fan_out,
        )
        place.replace(lora)
        adapters[name] = lora
    trained = {leaf for lora in adapters.values() for leaf in lora.trainable_params()}
    for _, leaf in named_leaves(model):
        if leaf not in trained and leaf.requires_grad:
            graph.requires_grad_(leaf, False)
    return adapters
