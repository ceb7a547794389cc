"""``from_pretrained``: read any checkpoint folder transformers' ``save_pretrained`` wrote for an
architecture graphlora has, choosing the class from ``config.json``'s ``model_type``."""

from __future__ import annotations

import os

from graphlora.engine.graph import Graph, check_graph
from graphlora.lora.nf4 import NF4Config
from graphlora.nn import checkpoint
from graphlora.nn.gpt import GPT
from graphlora.nn.llama import MODEL_TYPES, Llama

__all__ = ["ARCHITECTURES", "from_pretrained"]

ARCHITECTURES = {"gpt2": "GPT", **dict.fromkeys(MODEL_TYPES, "Llama")}
"""``model_type`` -> the class that reads it."""


def from_pretrained(
    graph: Graph, path: str | os.PathLike[str], *, quantize: str | NF4Config | None = None
) -> GPT | Llama:
    """The model in the folder ``path`` (``config.json`` and ``model.safetensors``, or a sharded
    ``model.safetensors.index.json``), as ``gl.GPT`` (``model_type`` ``"gpt2"``) or ``gl.Llama``
    (``"llama"``, ``"mistral"``, ``"qwen2"``), its weights in the graph's dtype (float16 and
    bfloat16 files included).

    ``quantize="nf4"`` (or a ``gl.nf4.NF4Config(block_size, double_quant)``) reads it as
    bitsandbytes' ``load_in_4bit`` does (QLoRA's base): every linear layer becomes a frozen
    ``NF4Linear`` whose weight is quantized as it is read, so no float copy of the model ever
    exists; embeddings, norms and the output head stay float.

    Everything is checked before any leaf is made: the model type, the config (heads that do not
    group, a rope type or activation graphlora does not implement, ...), and every tensor's
    name, shape, dtype and finiteness; a refused folder leaves the graph as it was. Pickles are
    never read.

    Raises
    ------
    FileNotFoundError
        For a missing folder, ``config.json`` or weights file.
    ValueError
        For another model type, a config graphlora cannot honour, or weights that do not fit.
    """
    where = "from_pretrained"
    check_graph(where, graph)
    quantized = NF4Config.of(where, quantize)
    directory = checkpoint.folder(where, path)
    file = directory / "config.json"
    kind = checkpoint.read_json(where, file).get("model_type")
    if kind == "gpt2":
        return GPT.from_pretrained(graph, directory, quantize=quantized)
    if kind in MODEL_TYPES:
        return Llama.from_pretrained(graph, directory, quantize=quantized)
    raise ValueError(
        f"{where}: {file} has model_type {kind!r}; graphlora reads {sorted(ARCHITECTURES)}"
    )
