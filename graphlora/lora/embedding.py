"""``LoraEmbedding``: LoRA on an embedding table, ``y = W[ids] + (A[ids] * scaling) @ B``.

An embedding lookup ``W[ids]`` is ``one_hot(ids) @ W``, a linear layer whose input is one-hot, so
LoRA applies unchanged: ``A [V, rank]``, ``B [rank, D]`` and the delta ``(A @ B) * scaling``
``[V, D]``; looking rows up in A replaces the product ``x @ A``. PEFT names the two
``lora_embedding_A`` (stored ``[rank, V]``) and ``lora_embedding_B`` (stored ``[D, rank]``),
starts A at zero and B from N(0, 1), and puts no dropout on this update; so does this layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.errors import ShapeError
from graphlora.lora.config import LoraConfig, VeraConfig
from graphlora.lora.layer import LoraLayer, check_adapter_name, float_data
from graphlora.lora.variants import (
    Update,
    adapter_generator,
    check_adapter_config,
    check_rank,
    draw_update,
    make_update,
    rewrites_base,
)
from graphlora.ops import Array

__all__ = ["LoraEmbedding"]


@dataclass(eq=False, repr=False)
class LoraEmbedding(LoraLayer):
    """An embedding ``ids [...] -> [..., D]`` with LoRA adapters: ``W[ids] + (A[ids] * s) @ B``.

    Build it with ``LoraEmbedding.from_embedding`` (or ``apply_lora`` on a model's
    ``Embedding``). Several adapters, merging, state and DoRA (a magnitude per embedding
    dimension, as PEFT's) work as for ``LoraLinear``; ``init="pissa"`` is for linear layers only.
    """

    num_embeddings: int
    embedding_dim: int
    _layer_kind: ClassVar[str] = "embedding"

    @classmethod
    def from_embedding(
        cls,
        graph: Graph,
        weight: NodeId | npt.ArrayLike,
        config: LoraConfig | VeraConfig | None = None,
        *,
        rng: _checks.Rng = None,
        name: str = "lora",
        adapter_name: str = "default",
    ) -> LoraEmbedding:
        """A LoRA embedding over the table ``weight [V, D]`` (a NodeId, used as it is and
        frozen, or an array, copied into a new constant), with one active adapter.

        Raises
        ------
        ShapeError
            For a table that is not 2-D and non-empty.
        TypeError, ValueError
            For a bad config or ``init="pissa"``.
        """
        where = "LoraEmbedding.from_embedding"
        check_graph(where, graph)
        config = LoraConfig() if config is None else config
        check_adapter_config(where, config)
        table = float_data(where, "weight", weight, graph)
        if table.ndim != 2 or table.size == 0:
            raise ShapeError(f"{where}: weight must be a non-empty [V, D] table, got {table.shape}")
        check_rank(where, config, table.shape, "embedding")
        if rewrites_base(config):
            raise ValueError(f"{where}: init='pissa' is for linear layers only")
        _checks.label(where, "name", name)
        adapter_name = check_adapter_name(where, adapter_name)
        generator = adapter_generator(where, config, rng)
        draft = draw_update(where, config, table, generator, "embedding")
        if isinstance(weight, NodeId):
            node = weight
            if node.requires_grad:  # freeze the base layer, as PEFT does
                graph.requires_grad_(node, False)
        else:
            with graph.scope(name), graph.scope("frozen"):
                node = graph.constant(table, name=f"{name}.weight")
        update = make_update(graph, draft, table, generator, name=name, adapter=adapter_name)
        rows, width = table.shape
        return cls(
            rows,
            width,
            frozen_weight=node,
            adapters={adapter_name: update},
            name=name,
            _active=(adapter_name,),
        )

    def forward(self, graph: Graph, ids: NodeId | npt.ArrayLike, *, fused: bool = False) -> NodeId:
        """``ids [...] -> [..., D]``: ``W[ids]`` plus each active adapter's ``(A[ids] * s) @ B``
        (ids: an integer data node or array, each in ``[0, V)``)."""
        assert self.frozen_weight is not None  # an embedding's table is never in NF4
        rows: list[tuple[Update, Array]] = []
        if self.batch_adapters is not None:  # mixed_batch: each sample its own adapter
            shape = ids.shape if isinstance(ids, NodeId) else np.shape(ids)
            rows = self.batch_rows("LoraEmbedding.forward", graph, tuple(shape))
        with graph.scope(self.name):  # ids given as a list: each embedding op reads them
            with graph.scope("frozen"):
                y = graph.embedding(self.frozen_weight, ids)  # (..., D)
            base = y
            for update, mask in rows:
                with graph.scope("lora"):
                    low_rank = update.record(graph, ids, self, base)  # (..., D)
                keep = mask.reshape((-1,) + (1,) * (len(y.shape) - 1))
                y = graph.where(keep, graph.add(y, low_rank), y)
            for update in self.running() if self.batch_adapters is None else []:
                with graph.scope("lora"):
                    low_rank = update.record(graph, ids, self, y)  # (..., D)
                y = graph.add(y, low_rank)
            return y

    def __repr__(self) -> str:
        return (
            f"LoraEmbedding(name={self.name!r}, num_embeddings={self.num_embeddings}, "
            f"embedding_dim={self.embedding_dim}, {self._adapters_repr()}, "
            f"merged={self.merged}, trainable={self.num_trainable:,}, frozen={self.num_frozen:,})"
        )
