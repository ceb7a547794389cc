"""Quantizing a model in memory: its ``Linear`` layers become ``NF4Linear`` (QLoRA's 4-bit base),
their float weights released from the graph. ``gl.nf4.quantize_`` is the public name."""

from __future__ import annotations

from collections.abc import Sequence

from graphlora.errors import GraphError
from graphlora.lora.nf4 import NF4Config, NF4Weight
from graphlora.nn.layers import Linear, NF4Linear
from graphlora.nn.tree import check_model, find_modules

__all__ = ["quantize_model"]


def quantize_model(
    model: object, quantize: str | NF4Config, *, skip: Sequence[str] = ("lm_head",)
) -> dict[str, NF4Linear]:
    """See ``gl.nf4.quantize_``: every ``Linear`` of ``model`` not named in ``skip`` (its
    dotted name equal to an entry or ending with ``"." + entry``) becomes an ``NF4Linear``, and
    its weight leaf is released. Everything is checked before anything changes."""
    where = "quantize_"
    check_model(where, model)
    config = NF4Config.of(where, quantize)
    if config is None:
        raise ValueError(f"{where}: quantize must be 'nf4' or a gl.nf4.NF4Config, got None")
    if isinstance(skip, str) or not all(isinstance(entry, str) for entry in skip):
        raise TypeError(f"{where}: skip must be a list of layer names, got {skip!r}")
    chosen = [
        (name, layer, place)
        for name, layer, place in find_modules(model, (Linear,))
        if not any(name == entry or name.endswith("." + entry) for entry in skip)
    ]
    in_tuples = [name for name, _, place in chosen if place is None or place.kind == "tuple"]
    if in_tuples:
        raise TypeError(f"{where}: {in_tuples} sit in tuples, which cannot be changed; use lists")
    read = [name for name, layer, _ in chosen if layer.weight.graph.readers(layer.weight)]
    if read:
        raise GraphError(
            f"{where}: the weights of {read} are read by recorded ops; reset() before quantizing"
        )
    quantized: dict[str, NF4Linear] = {}
    for name, layer, place in chosen:
        assert place is not None
        graph = layer.weight.graph
        weight = NF4Weight.quantize(
            graph.value(layer.weight).T, config.block_size, double_quant=config.double_quant
        )
        new = NF4Linear(
            weight,
            layer.bias,
            layer.in_features,
            layer.out_features,
            graph,
            layer.name,
            layer.fan_in_fan_out,
        )
        place.replace(new)
        quantized[name] = new
        if layer.weight.is_leaf:  # not when two layers share it and the first released it
            graph.release(layer.weight)
    return quantized
