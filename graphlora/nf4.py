"""``gl.nf4``: QLoRA's 4-bit NormalFloat in one place. The format and its ops live in
``graphlora.lora.nf4`` (``NF4Weight``, ``nf4_linear``, ...); quantizing a model's layers in
memory (``quantize_``) in ``graphlora.nn``, which holds the layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from graphlora.lora.nf4 import (
    CHUNK_VALUES,
    DYNAMIC_MAP,
    MAX_BLOCK_SIZE,
    NESTED_BLOCK_SIZE,
    NF4_LEVELS,
    NestedAbsmax,
    NF4Config,
    NF4Weight,
    dynamic_map,
    nf4_adapted_norm,
    nf4_linear,
    nf4_matmul,
    normal_float_levels,
)
from graphlora.nn.layers import NF4Linear
from graphlora.nn.quantize import quantize_model

__all__ = [
    "CHUNK_VALUES",
    "DYNAMIC_MAP",
    "MAX_BLOCK_SIZE",
    "NESTED_BLOCK_SIZE",
    "NF4_LEVELS",
    "NF4Config",
    "NF4Linear",
    "NF4Weight",
    "NestedAbsmax",
    "dynamic_map",
    "nf4_adapted_norm",
    "nf4_linear",
    "nf4_matmul",
    "normal_float_levels",
    "quantize_",
]


def quantize_(
    model: object,
    quantize: str | NF4Config = "nf4",
    *,
    skip: Sequence[str] = ("lm_head",),
) -> dict[str, NF4Linear]:
    """Quantize every ``Linear`` layer of ``model`` in place, as ``from_pretrained(...,
    quantize=...)`` does while reading: each becomes an ``NF4Linear`` holding its weight in NF4
    (``[out, in]``, bitsandbytes' blocks) and its bias as it was, and its float weight leaf is
    released from the graph (``Graph.release``). Embeddings, norms, LoRA layers and the layers
    named in ``skip`` (the output head, which bitsandbytes keeps in float too; a name matches a
    layer whose dotted name equals it or ends with ``"." + name``) are left alone. Returns
    ``{dotted name: NF4Linear}``.

    Raises
    ------
    GraphError
        If a weight is still read by an op on the graph's tape (``reset()`` first).
    TypeError
        For layers held in tuples, which cannot be replaced.
    Nothing is changed when it raises.
    """
    return quantize_model(model, quantize, skip=skip)
