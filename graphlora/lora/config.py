"""``LoraConfig`` and ``VeraConfig``: how to build one adapter, with PEFT's names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphlora import _checks
from graphlora.lora.functional import lora_scaling

__all__ = ["BIASES", "INITS", "LoraConfig", "VeraConfig"]

INITS = ("kaiming", "gaussian", "random", "pissa")
"""The accepted values of ``LoraConfig.init``."""
BIASES = ("none", "lora_only", "all")
"""The accepted values of ``LoraConfig.bias`` (PEFT's ``bias``)."""


@dataclass(frozen=True)
class LoraConfig:
    """How to build a LoRA adapter. Names and defaults follow PEFT where PEFT has them.

    Every field is checked at construction; a bad one raises ``TypeError`` or ``ValueError`` naming
    the field, the value and what is accepted.
    """

    rank: int = 8
    """The adapter's rank ``r`` (PEFT: ``r``): A is ``[in, r]``, B is ``[r, out]``. An int >= 1."""
    alpha: float = 8.0
    """The scale numerator (PEFT: ``lora_alpha``): the update is ``A @ B * alpha / r``. > 0."""
    dropout: float = 0.0
    """Dropout probability on the LoRA input only (PEFT: ``lora_dropout``), in ``[0, 1)``."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    init: str = "kaiming"
    """How to start A and B, as PEFT's ``init_lora_weights``: ``"kaiming"`` (PEFT's default,
    ``True``), ``"gaussian"``, ``"random"`` (PEFT's ``False``: B is not zero, so the adapter
    changes the output from the start) or ``"pissa"`` (see ``LoraLinear``)."""
    init_std: float | None = None
    """Standard deviation of A under ``init="gaussian"``; ``None``: ``1 / rank``, as PEFT."""
    seed: int | None = None
    """Seed of the generator for A's init and the dropout masks; ``None`` draws fresh entropy."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024): also learn a magnitude per output, ``[out]`` (see ``DoraUpdate``);
    on an embedding, per embedding dimension (``DoraEmbeddingUpdate``)."""
    lora_bias: bool = False
    """PEFT's ``lora_bias``: B gets a trainable bias ``[out]`` (zero at init), so the update is
    ``((x @ A) @ B + b) * scaling``; merging adds ``b * scaling`` to the layer's bias. Plain
    LoRA on linear layers with a ``"kaiming"`` or ``"random"`` init only, as PEFT."""
    bias: str = "none"
    """PEFT's ``bias``: which of the model's own biases train with the adapter and are saved in
    its file: ``"none"``, ``"lora_only"`` (the adapted layers' biases) or ``"all"`` (every leaf
    named ``bias``)."""
    modules_to_save: tuple[str, ...] | None = None
    """PEFT's ``modules_to_save``: modules (a classification head, ...) trained whole with the
    adapter, as a copy per adapter, and saved in its file; a module matches when its dotted name
    ends with an entry, as in PEFT. An entry that matches nothing is refused by ``apply_lora``
    (PEFT ignores it). A list is kept as a tuple."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool):
            raise TypeError(f"LoraConfig: rank must be an int, got {self.rank!r}")
        if self.rank < 1:
            raise ValueError(f"LoraConfig: rank must be a positive int, got {self.rank}")
        for name in ("alpha", "dropout", "init_std"):
            value = getattr(self, name)
            if name == "init_std" and value is None:
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(
                value, (int, float, np.integer, np.floating)
            ):
                raise TypeError(f"LoraConfig: {name} must be a real number, got {value!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoraConfig: alpha must be finite and > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout}")
        for name in ("use_rslora", "use_dora", "lora_bias"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"LoraConfig: {name} must be a bool, got {getattr(self, name)!r}")
        if self.init not in INITS:
            raise ValueError(
                f"LoraConfig: init must be one of {', '.join(map(repr, INITS))}, got {self.init!r}"
            )
        if self.init_std is not None and not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ValueError(f"LoraConfig: init_std must be finite and > 0, got {self.init_std}")
        _checks.seed("LoraConfig", "seed", self.seed)
        if self.modules_to_save is not None:
            names = self.modules_to_save
            if not isinstance(names, (list, tuple)) or not all(
                isinstance(n, str) and n for n in names
            ):
                raise TypeError(
                    f"LoraConfig: modules_to_save must be a list of module names, got {names!r:.60}"
                )
            object.__setattr__(self, "modules_to_save", tuple(names))
        if self.bias not in BIASES:
            raise ValueError(
                f"LoraConfig: bias must be one of {', '.join(map(repr, BIASES))}, got {self.bias!r}"
            )
        if self.lora_bias and (self.use_dora or self.init not in ("kaiming", "random")):
            raise ValueError(
                "LoraConfig: lora_bias=True needs plain LoRA with init 'kaiming' or 'random', as "
                f"PEFT; got use_dora={self.use_dora}, init={self.init!r}"
            )

    @property
    def scaling(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``."""
        return lora_scaling(self.rank, self.alpha, use_rslora=self.use_rslora)


@dataclass(frozen=True)
class VeraConfig:
    """How to build a VeRA adapter (Kopiczko et al. 2024), with PEFT's ``VeraConfig`` names.

    VeRA trains two vectors per layer, ``lambda_d [rank]`` and ``lambda_b [out]``, around a pair
    of frozen random matrices that every adapted layer shares (``vera_A``, ``vera_B``, sized for
    the largest layer): ``update(x) = lambda_b * ((lambda_d * (drop(x) @ A)) @ B)``. Every field
    is checked at construction; a bad one raises ``TypeError`` or ``ValueError`` naming it.
    """

    rank: int = 256
    """The shared projections' rank (PEFT: ``r``): A is ``[in, rank]``, B ``[rank, out]``."""
    d_initial: float = 0.1
    """The starting value of every entry of ``lambda_d``; ``lambda_b`` starts at zero, so the
    layer starts equal to the base."""
    projection_prng_key: int = 0
    """The seed of the shared projections (drawn with NumPy: PEFT's come from PyTorch's
    generator, so the same key gives other matrices; files carry them, see
    ``save_projection``)."""
    save_projection: bool = True
    """Write ``vera_A`` and ``vera_B`` into adapter files. graphlora refuses to save without
    them: PEFT would draw other matrices from the key with PyTorch's generator."""
    dropout: float = 0.0
    """Dropout probability on the update's input (PEFT: ``vera_dropout``), in ``[0, 1)``."""
    seed: int | None = None
    """Seed of the dropout masks' generator; ``None`` draws fresh entropy."""

    def __post_init__(self) -> None:
        where = "VeraConfig"
        _checks.positive_int(where, "rank", self.rank)
        if not math.isfinite(_checks.real_scalar(where, "d_initial", self.d_initial)):
            raise ValueError(f"{where}: d_initial must be finite, got {self.d_initial}")
        key = self.projection_prng_key
        if not isinstance(key, (int, np.integer)) or isinstance(key, bool):
            raise TypeError(f"{where}: projection_prng_key must be an int, got {key!r}")
        if key < 0:
            raise ValueError(f"{where}: projection_prng_key must be >= 0, got {key}")
        _checks.flag(where, "save_projection", self.save_projection)
        _checks.probability(where, "dropout", self.dropout)
        _checks.seed(where, "seed", self.seed)
