"""LoRA+: B's learning rate a ratio times A's, as PEFT's ``create_loraplus_optimizer``.

LoRA+ (Hayou, Ghosh & Yu, 2024) argues that A and B should not share a learning rate: B starts at
zero and, in wide layers, needs a larger step than A to learn features efficiently. PEFT's helper
sorts a model's trainable leaves into four parameter groups and hands them to an optimizer class;
this is the same sorting, over graphlora's optimizers and their parameter groups.
"""

from __future__ import annotations

from typing import Any

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.lora.embedding import LoraEmbedding
from graphlora.nn.layers import LayerNorm
from graphlora.nn.tree import check_model, find_modules, named_leaves
from graphlora.optim import Optimizer

__all__ = ["create_loraplus_optimizer", "loraplus_groups"]


def loraplus_groups(model: object) -> dict[str, list[tuple[str, NodeId]]]:
    """The model's trainable leaves sorted as PEFT's LoRA+ sorts them, by dotted name, in the
    optimizer's group order:

    - ``"groupA"``: what no rule below takes (``lora_A``, other trainable matrices);
    - ``"embedding"``: every trainable leaf of a LoRA embedding layer;
    - ``"groupB"``: the other ``lora_B`` leaves and 1-D leaves (DoRA's magnitudes, biases,
      norm weights) that take weight decay;
    - ``"groupB_no_decay"``: those that do not (a name containing ``bias``, a ``LayerNorm``'s
      leaves; like transformers, an ``RMSNorm`` is not exempt).
    """
    check_model("loraplus_groups", model)
    embedding = {
        leaf
        for _, layer, _ in find_modules(model, (LoraEmbedding,))
        for _, leaf in layer.named_leaves()
    }
    norms = find_modules(model, (LayerNorm,))
    no_decay = {leaf for _, n, _ in norms for leaf in (n.weight, n.bias) if leaf is not None}
    groups: dict[str, list[tuple[str, NodeId]]] = {
        "groupA": [],
        "embedding": [],
        "groupB": [],
        "groupB_no_decay": [],
    }
    for name, leaf in named_leaves(model):
        if not leaf.requires_grad:
            continue
        if leaf in embedding:
            group = "embedding"
        elif "lora_B" in name or len(leaf.shape) == 1:
            group = "groupB_no_decay" if "bias" in name or leaf in no_decay else "groupB"
        else:
            group = "groupA"
        groups[group].append((name, leaf))
    return groups


def create_loraplus_optimizer(
    graph: Graph,
    model: object,
    optimizer_cls: type[Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **kwargs: Any,
) -> Optimizer:
    """An optimizer over ``model``'s trainable leaves in LoRA+'s four groups
    (:func:`loraplus_groups`), in PEFT's order and with PEFT's settings:

    ========================  =========================  =========================
    group                     learning rate              weight decay
    ========================  =========================  =========================
    ``groupA``                ``lr``                     ``loraplus_weight_decay``
    ``embedding``             ``loraplus_lr_embedding``  ``loraplus_weight_decay``
    ``groupB``                ``lr * loraplus_lr_ratio`` ``loraplus_weight_decay``
    ``groupB_no_decay``       ``lr * loraplus_lr_ratio`` 0
    ========================  =========================  =========================

    ``kwargs`` go to ``optimizer_cls`` (``betas``, ``eps``, ...; a ``weight_decay`` there is
    overridden by the groups', as in PEFT). Empty groups are kept, so the groups are always
    these four, in this order.

    Raises
    ------
    ValueError, TypeError
        For a negative or non-finite ``lr``, ratio or embedding rate, an optimizer class that is
        not one of graphlora's, or a model with no trainable leaves.
    """
    where = "create_loraplus_optimizer"
    check_graph(where, graph)
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(
            f"{where}: optimizer_cls must be a graphlora optimizer class (gl.optim.AdamW, ...), "
            f"got {optimizer_cls!r}"
        )
    lr = _checks.real(where, "lr", lr, 0.0)
    ratio = _checks.real(where, "loraplus_lr_ratio", loraplus_lr_ratio, 0.0)
    embedding_lr = _checks.real(where, "loraplus_lr_embedding", loraplus_lr_embedding, 0.0)
    decay = _checks.real(where, "loraplus_weight_decay", loraplus_weight_decay, 0.0)
    groups = loraplus_groups(model)
    if not any(groups.values()):
        raise ValueError(f"{where}: the model has no trainable leaves (apply_lora first)")
    settings = {
        "groupA": (lr, decay),
        "embedding": (embedding_lr, decay),
        "groupB": (lr * ratio, decay),
        "groupB_no_decay": (lr * ratio, 0.0),
    }
    param_groups = [
        {"params": [leaf for _, leaf in groups[key]], "lr": rate, "weight_decay": wd}
        for key, (rate, wd) in settings.items()
    ]
    return optimizer_cls(graph, param_groups, lr=lr, **kwargs)  # type: ignore[call-arg]
