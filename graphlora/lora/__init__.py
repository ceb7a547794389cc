"""LoRA made of graph nodes: ``LoraConfig`` and ``VeraConfig``, the layers ``LoraLinear`` and
``LoraEmbedding``, the updates they hold (``LoraUpdate``, ``DoraUpdate``, ``EmbeddingUpdate``,
``VeraUpdate``: one class per variant and layer kind, chosen in ``variants``)
and ``lora_linear``, a whole LoRA linear layer as one op. The engine knows nothing of LoRA: all of
it is built from ops and leaves.
"""

from __future__ import annotations

from graphlora.engine import describe
from graphlora.lora import functional, nf4
from graphlora.lora.config import INITS, LoraConfig, VeraConfig
from graphlora.lora.embedding import LoraEmbedding
from graphlora.lora.fused import lora_linear
from graphlora.lora.layer import LoraLayer
from graphlora.lora.linear import LoraLinear
from graphlora.lora.updates import DoraUpdate, EmbeddingUpdate, LoraUpdate
from graphlora.lora.variants import VARIANTS, Update, choose_update
from graphlora.lora.vera import VeraProjection, VeraUpdate

# How drawings title a LoRA layer's scopes; a merged layer's weight, made in ``frozen``, is drawn
# with the merged path it now feeds.
describe.title_scopes(
    {
        "frozen": "frozen path: x @ W",
        "lora": "low-rank path: ((x @ A) * s) @ B",
        "merged": "merged: x @ (W + A @ B * s)",
    },
    folds={"frozen": "merged"},
)

__all__ = [
    "INITS",
    "VARIANTS",
    "DoraUpdate",
    "EmbeddingUpdate",
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraUpdate",
    "Update",
    "VeraConfig",
    "VeraProjection",
    "VeraUpdate",
    "choose_update",
    "functional",
    "lora_linear",
    "nf4",
]
