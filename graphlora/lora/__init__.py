"""LoRA made of graph nodes: ``LoraConfig``, the layers ``LoraLinear`` and ``LoraEmbedding``, the
updates they hold (``LoraUpdate``, ``DoraUpdate``, ``EmbeddingUpdate``: one class per variant)
and ``lora_linear``, a whole LoRA linear layer as one op. The engine knows nothing of LoRA: all of
it is built from ops and leaves.
"""

from __future__ import annotations

from graphlora.lora import functional, nf4
from graphlora.lora.config import INITS, LoraConfig
from graphlora.lora.embedding import LoraEmbedding
from graphlora.lora.fused import lora_linear
from graphlora.lora.layer import LoraLayer
from graphlora.lora.linear import LoraLinear
from graphlora.lora.updates import DoraUpdate, EmbeddingUpdate, LoraUpdate

__all__ = [
    "INITS",
    "DoraUpdate",
    "EmbeddingUpdate",
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraUpdate",
    "functional",
    "lora_linear",
    "nf4",
]
