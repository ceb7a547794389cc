"""QLoRA's 4-bit NormalFloat (NF4): a frozen weight kept as 4-bit codes, dequantized where it is
used.

A weight is cut into blocks of ``block_size`` values (64, as QLoRA). Each block keeps its absolute
maximum (``absmax``, float32) and, for each value, the index (0-15) of the nearest of 16 levels
in ``[-1, 1]`` after dividing by that maximum; two indices share a byte. The levels
(``NF4_LEVELS``, the QLoRA paper's) are quantiles of the standard normal distribution, so that
normally distributed weights use every level about equally often; ``normal_float_levels``
derives them. QLoRA's double quantization (of the ``absmax`` values themselves) is not done.

``nf4_matmul`` is the op a frozen NF4 base weight is used through: ``x @ dequantize(weight)``,
with a gradient for ``x`` only; forward and backward each dequantize again, so the full-precision
weight is never kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.stats

from graphlora import _checks
from graphlora.errors import ShapeError
from graphlora.ops import Array, Draw, Grads, Params, Sample, Vjp, op
from graphlora.ops.linalg import check_dense

__all__ = ["NF4_LEVELS", "NF4Weight", "nf4_matmul", "normal_float_levels"]

NF4_LEVELS: npt.NDArray[np.float32] = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
"""The 16 NF4 levels of the QLoRA paper (Dettmers et al., 2023), as published, in float32."""

_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # the 15 boundaries between levels


def normal_float_levels(offset: float = 0.9677083) -> npt.NDArray[np.float64]:
    """The NF4 levels derived as in the QLoRA paper: 8 positive and 7 negative quantiles of
    N(0, 1), between probability ``offset`` and 1/2, with an exact 0, scaled to ``[-1, 1]``.

    The default ``offset`` is QLoRA's; ``NF4_LEVELS`` holds the result as published.

    Raises
    ------
    ValueError
        For an ``offset`` outside ``(0.5, 1)``, where the quantiles are not finite and distinct.
    """
    where = "normal_float_levels"
    top = _checks.real_scalar(where, "offset", offset)
    if not 0.5 < top < 1.0:
        raise ValueError(f"{where}: offset must be in (0.5, 1), got {offset!r}")
    positive = scipy.stats.norm.ppf(np.linspace(top, 0.5, 9)[:-1])
    negative = -scipy.stats.norm.ppf(np.linspace(top, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([negative, [0.0], positive]))
    scaled: npt.NDArray[np.float64] = levels / levels.max()
    return scaled


MAX_BLOCK_SIZE = 4096
"""The largest block bitsandbytes quantizes in (its blocks are 64 to 4096 values)."""


def _block_size(where: str, block_size: object) -> int:
    """An even int in ``[2, MAX_BLOCK_SIZE]``."""
    size = _checks.positive_int(where, "block_size", block_size)
    if size % 2 or size > MAX_BLOCK_SIZE:
        raise ValueError(
            f"{where}: block_size must be even (two codes a byte) and at most {MAX_BLOCK_SIZE}, "
            f"got {size}"
        )
    return size


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """A weight in NF4: ``codes`` (two 4-bit level indices a byte, the first in the high half),
    ``absmax`` (one float32 per block), the weight's ``shape`` and the ``block_size``.

    Make one with ``NF4Weight.quantize(w)``; ``dequantize()`` gives the array back (each value
    the nearest level times its block's ``absmax``).
    """

    codes: npt.NDArray[np.uint8]
    absmax: npt.NDArray[np.float32]
    shape: tuple[int, ...]
    block_size: int

    @classmethod
    def quantize(cls, weight: npt.ArrayLike, block_size: int = 64) -> NF4Weight:
        """``weight`` (any shape, finite) in NF4, in blocks of ``block_size`` values (even) taken
        in C order; the last block is padded with zeros.

        Raises
        ------
        ValueError
            For non-finite values (in float32, where the absmax values are kept), or a
            ``block_size`` that is not an even int in ``[2, 4096]`` (bitsandbytes' largest).
        """
        where = "NF4Weight.quantize"
        w = _checks.float_array(where, "weight", weight)
        size = _block_size(where, block_size)
        if not np.isfinite(w).all():
            raise ValueError(f"{where}: weight holds NaN or Inf; NF4 stores finite values only")
        if w.size and np.abs(w).max() > np.finfo(np.float32).max:
            raise ValueError(
                f"{where}: weight holds values up to {np.abs(w).max():.3g}, beyond float32's "
                f"range ({np.finfo(np.float32).max:.3g}), where NF4 keeps its absmax values"
            )
        blocks = -(-w.size // size)
        flat = np.zeros(blocks * size, dtype=np.float32)
        flat[: w.size] = w.ravel()
        grouped = flat.reshape(blocks, size)
        absmax = np.abs(grouped).max(axis=1) if blocks else np.zeros(0, np.float32)
        scaled = grouped / np.where(absmax > 0, absmax, 1.0)[:, None]  # in [-1, 1]
        # The nearest level; a value exactly between two takes the lower, as bitsandbytes.
        codes = np.searchsorted(_MIDPOINTS, scaled, side="left").astype(np.uint8)
        packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).astype(np.uint8)
        return cls(packed, absmax.astype(np.float32), w.shape, size)

    def __post_init__(self) -> None:
        """Refuse parts that do not fit together (a hand-made or damaged weight), by name."""
        where = "NF4Weight"
        size = _block_size(where, self.block_size)
        shape = self.shape
        if not isinstance(shape, tuple) or not all(_checks.is_int(n) and n >= 0 for n in shape):
            raise TypeError(f"{where}: shape must be a tuple of ints >= 0, got {shape!r}")
        blocks = -(-math.prod(shape) // size)
        codes, absmax = self.codes, self.absmax
        if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
            raise TypeError(f"{where}: codes must be a uint8 array, got {_checks.describe(codes)}")
        if not isinstance(absmax, np.ndarray) or absmax.dtype != np.float32:
            raise TypeError(
                f"{where}: absmax must be a float32 array, got {_checks.describe(absmax)}"
            )
        if codes.shape != (blocks, size // 2) or absmax.shape != (blocks,):
            raise ShapeError(
                f"{where}: a weight of shape {shape} in blocks of {size} needs codes "
                f"{(blocks, size // 2)} and absmax {(blocks,)}, got {codes.shape} and "
                f"{absmax.shape}"
            )
        if not (np.isfinite(absmax).all() and (absmax >= 0).all()):
            raise ValueError(f"{where}: absmax must hold finite values >= 0")

    def level_indices(self) -> npt.NDArray[np.uint8]:
        """Every value's level index (0-15), one per value, in blocks: ``[blocks, block_size]``."""
        indices = np.empty((self.codes.shape[0], self.block_size), dtype=np.uint8)
        indices[:, 0::2] = self.codes >> 4
        indices[:, 1::2] = self.codes & 0x0F
        return indices

    def dequantize(self, dtype: npt.DTypeLike = np.float32) -> Array:
        """The weight back, in ``dtype``: each value's level times its block's ``absmax``."""
        values = NF4_LEVELS[self.level_indices()] * self.absmax[:, None]
        size = int(np.prod(self.shape))
        out: Array = values.ravel()[:size].reshape(self.shape).astype(dtype)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held: the codes and the ``absmax`` values."""
        return int(self.codes.nbytes + self.absmax.nbytes)

    def __repr__(self) -> str:
        return (
            f"NF4Weight(shape={self.shape}, block_size={self.block_size}, "
            f"blocks={self.absmax.size}, nbytes={self.nbytes})"
        )


def _check_nf4_matmul(x: Array, *, weight: object) -> None:
    where = "nf4_matmul"
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"{where}: weight must be an NF4Weight, got {type(weight).__name__}")
    check_dense(where, x, weight.shape)


def _nf4_inputs(draw: Draw) -> tuple[Array | None, ...]:
    *batch, n_in = draw.shape(min_dims=1, max_dims=3)
    return (draw.floats((*batch, n_in)),)


def _nf4_params(draw: Draw, x: Array) -> Params:
    n_out = draw.choice([0, 1, 3, 5])
    w = draw.floats((x.shape[-1], n_out))
    return {"weight": NF4Weight.quantize(w, block_size=draw.choice([2, 4, 64]))}


def _nf4_matmul(x: Array, *, weight: Any) -> tuple[Array, Vjp]:
    """``x @ W`` with ``W = weight.dequantize()``, an ``NF4Weight`` ``[in, out]``, in ``x``'s
    dtype: a frozen 4-bit base weight, as in QLoRA. Record it with
    ``graph.apply(nf4_matmul, x, weight=weight)``.

    VJP: ``(g Wᵀ,)``, ``W`` dequantized again (nothing is kept); the weight gets no gradient.
    """
    out: Array = x @ weight.dequantize(x.dtype)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g @ weight.dequantize(g.dtype).T,)

    return out, vjp


nf4_matmul = op(check=_check_nf4_matmul, sample=Sample(_nf4_inputs, _nf4_params))(_nf4_matmul)
