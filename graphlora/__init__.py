"""graphlora: a tape-based autograd graph engine on NumPy, with LoRA layers built from its nodes.

Start with ``Graph``: add constants and parameters, call ops, then ``backward``. See the README.
"""

from __future__ import annotations

import sys

from graphlora import blas, nf4, nn, ops, optim
from graphlora.blas import get_num_threads, set_num_threads, threads
from graphlora.engine.graph import Graph, NodeId
from graphlora.engine.replay import Replay
from graphlora.errors import (
    ForeignNodeError,
    GradcheckError,
    GraphError,
    NonFiniteError,
    ShapeError,
    StaleNodeError,
)
from graphlora.io import apply_adapter, load_adapter, save_adapter, save_merged
from graphlora.lora import LoraConfig, LoraEmbedding, LoraLinear, VeraConfig, functional
from graphlora.nn import (
    GPT,
    MLP,
    Embedding,
    GPTConfig,
    LayerNorm,
    Linear,
    Llama,
    LlamaConfig,
    RMSNorm,
    Tokenizer,
    add_weighted_adapter,
    apply_lora,
    create_loraplus_optimizer,
    delete_adapter,
    disable_adapter_layers,
    disable_adapters,
    enable_adapter_layers,
    from_pretrained,
    merge_adapter,
    mixed_batch,
    set_adapter,
    unmerge_adapter,
)
from graphlora.teach import viz

# The documented re-exports keep their module paths too: ``import graphlora.functional``
# and ``graphlora.viz.render`` work as before the move.
sys.modules[f"{__name__}.functional"] = functional
sys.modules[f"{__name__}.viz"] = viz

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "MLP",
    "Embedding",
    "ForeignNodeError",
    "GPTConfig",
    "GradcheckError",
    "Graph",
    "GraphError",
    "LayerNorm",
    "Linear",
    "Llama",
    "LlamaConfig",
    "LoraConfig",
    "LoraEmbedding",
    "LoraLinear",
    "NodeId",
    "NonFiniteError",
    "RMSNorm",
    "Replay",
    "ShapeError",
    "StaleNodeError",
    "Tokenizer",
    "VeraConfig",
    "__version__",
    "add_weighted_adapter",
    "apply_adapter",
    "apply_lora",
    "blas",
    "create_loraplus_optimizer",
    "delete_adapter",
    "disable_adapter_layers",
    "disable_adapters",
    "enable_adapter_layers",
    "from_pretrained",
    "functional",
    "get_num_threads",
    "load_adapter",
    "merge_adapter",
    "mixed_batch",
    "nf4",
    "nn",
    "ops",
    "optim",
    "save_adapter",
    "save_merged",
    "set_adapter",
    "set_num_threads",
    "threads",
    "unmerge_adapter",
    "viz",
]
