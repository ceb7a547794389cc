"""Models as trees of plain objects: layers (``Linear``, ``Embedding``, ``LayerNorm``, ``MLP``),
a GPT-2-architecture ``GPT`` that reads transformers' checkpoints, the tree functions that work
on any model (``named_modules``, ``parameters``, ``state_dict``, ``load_state_dict``), and
``apply_lora``, which puts LoRA adapters on any model's ``Linear`` layers.
"""

from __future__ import annotations

from graphlora.nn.adapters import apply_lora, lora_layers, matches
from graphlora.nn.gpt import GPT, GPTConfig
from graphlora.nn.layers import ACTIVATIONS, MLP, Embedding, LayerNorm, Linear, call
from graphlora.nn.tree import (
    LoadResult,
    is_module,
    load_state_dict,
    named_leaves,
    named_modules,
    parameters,
    state_dict,
    trainable_parameters,
)

__all__ = [
    "ACTIVATIONS",
    "GPT",
    "MLP",
    "Embedding",
    "GPTConfig",
    "LayerNorm",
    "Linear",
    "LoadResult",
    "apply_lora",
    "call",
    "is_module",
    "load_state_dict",
    "lora_layers",
    "matches",
    "named_leaves",
    "named_modules",
    "parameters",
    "state_dict",
    "trainable_parameters",
]
