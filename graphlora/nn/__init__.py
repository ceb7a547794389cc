"""Models as trees of plain objects: layers (``Linear``, ``Embedding``, ``LayerNorm``, ``MLP``,
``RMSNorm``), a GPT-2-architecture ``GPT`` and a Llama-architecture ``Llama`` (Llama, Mistral,
Qwen2) that read transformers' checkpoints (``from_pretrained`` picks the class), with
``generate``; the tree functions that work on any model (``named_modules``, ``parameters``,
``state_dict``, ``load_state_dict``), and
``apply_lora``, which puts LoRA adapters on any model's ``Linear`` and ``Embedding`` layers, with
the functions that manage several adapters (``set_adapter``, ``disable_adapters``,
``delete_adapter``, ``add_weighted_adapter``), and LoRA+'s ``create_loraplus_optimizer``.
"""

from __future__ import annotations

from graphlora.nn.adapters import (
    COMBINATION_TYPES,
    add_weighted_adapter,
    apply_lora,
    delete_adapter,
    disable_adapter_layers,
    disable_adapters,
    enable_adapter_layers,
    lora_layers,
    matches,
    merge_adapter,
    mixed_batch,
    set_adapter,
    unmerge_adapter,
)
from graphlora.nn.gpt import GPT, GPTConfig
from graphlora.nn.layers import ACTIVATIONS, MLP, Embedding, LayerNorm, Linear, NF4Linear, RMSNorm
from graphlora.nn.llama import Llama, LlamaConfig
from graphlora.nn.loraplus import create_loraplus_optimizer, loraplus_groups
from graphlora.nn.pretrained import from_pretrained
from graphlora.nn.saved import ModulesToSave, saved_modules
from graphlora.nn.tokenizer import Tokenizer
from graphlora.nn.tree import (
    LoadResult,
    check_model,
    is_model,
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
    "COMBINATION_TYPES",
    "GPT",
    "MLP",
    "Embedding",
    "GPTConfig",
    "LayerNorm",
    "Linear",
    "Llama",
    "LlamaConfig",
    "LoadResult",
    "ModulesToSave",
    "NF4Linear",
    "RMSNorm",
    "Tokenizer",
    "add_weighted_adapter",
    "apply_lora",
    "check_model",
    "create_loraplus_optimizer",
    "delete_adapter",
    "disable_adapter_layers",
    "disable_adapters",
    "enable_adapter_layers",
    "from_pretrained",
    "is_model",
    "is_module",
    "load_state_dict",
    "lora_layers",
    "loraplus_groups",
    "matches",
    "merge_adapter",
    "mixed_batch",
    "named_leaves",
    "named_modules",
    "parameters",
    "saved_modules",
    "set_adapter",
    "state_dict",
    "trainable_parameters",
    "unmerge_adapter",
]
