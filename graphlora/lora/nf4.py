"""QLoRA's 4-bit NormalFloat (NF4): a frozen weight kept as 4-bit codes, dequantized where it is
used, as bitsandbytes' ``load_in_4bit`` keeps a model's linear layers.

A weight is cut into blocks of ``block_size`` values (64, as QLoRA) taken in C order; a layer's
weight is quantized in PyTorch's ``[out, in]`` layout, so its blocks are those bitsandbytes
makes and its codes are bitsandbytes' codes. Each block keeps its absolute maximum (``absmax``,
float32) and, for each value, the index (0-15) of the nearest of 16 levels in ``[-1, 1]`` after
dividing by that maximum; two indices share a byte, the first in the high half. The levels
(``NF4_LEVELS``, the QLoRA paper's) are quantiles of the standard normal distribution with an
exact zero (``normal_float_levels`` derives them): they are dense near zero, where most weights
are, but they are not used equally often (the docs' QLoRA page measures how unequally).

QLoRA's double quantization (``double_quant=True``) stores the ``absmax`` values themselves in 8
bits: their mean is subtracted and the rest is quantized in blocks of 256 to the nearest value of
bitsandbytes' signed dynamic map (``DYNAMIC_MAP``), with one float32 scale per block
(``NestedAbsmax``).

Ops: ``nf4_linear`` (``x @ Wᵀ`` for a layer's ``[out, in]`` weight, as ``torch.nn.functional.
linear``), ``nf4_matmul`` (``x @ W`` for a weight stored ``[in, out]``) and ``nf4_adapted_norm``
(DoRA's column norms of ``W + s A B`` over an NF4 base). Each dequantizes the weight a few rows
at a time (at most ``CHUNK_VALUES`` values at once) in forward and again in backward: the float
weight is never held whole, and the weight gets no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.stats

from graphlora import _checks, blas
from graphlora.errors import ShapeError
from graphlora.ops import Array, Draw, Grads, Params, Sample, Vjp, op
from graphlora.ops.linalg import check_dense

__all__ = [
    "CHUNK_VALUES",
    "DYNAMIC_MAP",
    "NF4_LEVELS",
    "NF4Config",
    "NF4Weight",
    "NestedAbsmax",
    "dynamic_map",
    "nf4_adapted_norm",
    "nf4_linear",
    "nf4_matmul",
    "normal_float_levels",
]

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

NESTED_BLOCK_SIZE = 256
"""The block of QLoRA's double quantization: 256 ``absmax`` values share one float32 scale."""

CHUNK_VALUES = 1 << 18
"""The most values the NF4 ops dequantize at once (1 MiB in float32): whole rows of the weight,
at least one."""

# Each byte's two levels, the high half's first: dequantizing is one lookup per byte.
_PAIRS: npt.NDArray[np.float32] = np.stack(
    [NF4_LEVELS[np.arange(256) >> 4], NF4_LEVELS[np.arange(256) & 0x0F]], axis=1
)


def _linspace32(start: float, stop: float, count: int) -> npt.NDArray[np.float64]:
    """``torch.linspace(start, stop, count, dtype=torch.float32)`` value for value: a float32
    step, the points counted from the nearer end."""
    first, last = float(np.float32(start)), float(np.float32(stop))
    step = float(np.float32((last - first) / (count - 1)))
    i = np.arange(count, dtype=np.float64)
    points = np.where(i < count // 2, first + step * i, last - step * (count - 1 - i))
    return points.astype(np.float32).astype(np.float64)


def dynamic_map() -> npt.NDArray[np.float32]:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), the 256 values the
    double quantization rounds to: for each exponent ``10^-6 .. 10^0``, the midpoints of an even
    split of ``[0.1, 1]`` into 1, 2, 4, ... 64 parts, with both signs, and 0 and 1; in float32 and
    sorted."""
    values: list[npt.NDArray[np.float32]] = []
    for i in range(7):
        bounds = _linspace32(0.1, 1.0, 2**i + 1).astype(np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (i - 6))
        values += [scale * means, -scale * means]
    values.append(np.array([0.0, 1.0], dtype=np.float32))
    return np.sort(np.concatenate(values)).astype(np.float32)


DYNAMIC_MAP = dynamic_map()
"""The 256 values of the double quantization's codes (bitsandbytes' dynamic map)."""
DYNAMIC_MAP.flags.writeable = False
_DYNAMIC_MIDPOINTS = (DYNAMIC_MAP[1:] + DYNAMIC_MAP[:-1]) / 2


def _block_size(where: str, block_size: object) -> int:
    """An even int in ``[2, MAX_BLOCK_SIZE]``."""
    size = _checks.positive_int(where, "block_size", block_size)
    if size % 2 or size > MAX_BLOCK_SIZE:
        raise ValueError(
            f"{where}: block_size must be even (two codes a byte) and at most {MAX_BLOCK_SIZE}, "
            f"got {size}"
        )
    return size


def _nearest_in_blocks(
    values: Array, size: int, midpoints: Array
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Block-wise quantization, NF4's and the double quantization's: ``values`` (flat, in
    float32, the last block padded with zeros) in blocks of ``size``, each divided by its
    absolute maximum (a block of zeros stays zero) and rounded to the nearest level, the levels
    given by the ``midpoints`` between them (a value exactly between two takes the lower, as
    bitsandbytes). Returns the level indices ``[blocks, size]`` and the maxima ``[blocks]``."""
    blocks = -(-values.size // size)
    padded = np.zeros(blocks * size, dtype=np.float32)
    padded[: values.size] = values
    grouped = padded.reshape(blocks, size)
    absmax = np.abs(grouped).max(axis=1, initial=np.float32(0))
    scaled = np.divide(
        grouped, absmax[:, None], out=np.zeros_like(grouped), where=absmax[:, None] > 0
    )
    return np.searchsorted(midpoints, scaled).astype(np.uint8), absmax


@dataclass(frozen=True)
class NF4Config:
    """How to quantize a base: ``block_size`` values per ``absmax`` (64, as QLoRA and
    bitsandbytes) and whether to quantize the ``absmax`` values too (``double_quant``,
    bitsandbytes' ``bnb_4bit_use_double_quant``; off by default there and here).

    ``quantize="nf4"`` wherever a function takes ``quantize`` is ``NF4Config()``.
    """

    block_size: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        where = "NF4Config"
        _block_size(where, self.block_size)
        _checks.flag(where, "double_quant", self.double_quant)

    @classmethod
    def of(cls, where: str, quantize: object) -> NF4Config | None:
        """``None`` for ``None``, ``NF4Config()`` for ``"nf4"``, a given ``NF4Config`` as it
        is; anything else is refused, naming ``where``."""
        if quantize is None or isinstance(quantize, NF4Config):
            return quantize
        if quantize == "nf4":
            return cls()
        raise ValueError(
            f"{where}: quantize must be None, 'nf4' or a gl.nf4.NF4Config, got {quantize!r}"
        )


@dataclass(frozen=True, eq=False)
class NestedAbsmax:
    """The ``absmax`` values in 8 bits (QLoRA's double quantization, as bitsandbytes'
    ``compress_statistics``): ``offset`` (their mean, float32) is subtracted, and the rest is
    kept as ``codes`` (one uint8 each, an index into ``DYNAMIC_MAP``) and ``scales`` (the
    absolute maximum of each block of 256, float32). ``dequantize()`` gives
    ``DYNAMIC_MAP[codes] * scales + offset``, in float32."""

    codes: npt.NDArray[np.uint8]
    scales: npt.NDArray[np.float32]
    offset: float

    @classmethod
    def quantize(cls, absmax: npt.NDArray[np.float32]) -> NestedAbsmax:
        """``absmax`` (float32, finite, >= 0) in 8 bits: each value minus the mean, divided by
        its block's absolute maximum, rounded to the nearest value of ``DYNAMIC_MAP``."""
        offset = np.float32(absmax.sum(dtype=np.float64) / max(absmax.size, 1))
        centred = absmax - offset
        # a block of values all equal to the mean is a block of zeros: code 0.0
        codes, scales = _nearest_in_blocks(centred, NESTED_BLOCK_SIZE, _DYNAMIC_MIDPOINTS)
        return cls(codes.ravel()[: centred.size], scales, float(offset))

    def __post_init__(self) -> None:
        where = "NestedAbsmax"
        codes, scales = self.codes, self.scales
        if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.ndim != 1:
            raise TypeError(
                f"{where}: codes must be a 1-D uint8 array, got {_checks.describe(codes)}"
            )
        if not isinstance(scales, np.ndarray) or scales.dtype != np.float32:
            raise TypeError(
                f"{where}: scales must be a float32 array, got {_checks.describe(scales)}"
            )
        blocks = -(-codes.size // NESTED_BLOCK_SIZE)
        if scales.shape != (blocks,):
            raise ShapeError(
                f"{where}: {codes.size} codes in blocks of {NESTED_BLOCK_SIZE} need scales "
                f"({blocks},), got {scales.shape}"
            )
        offset = _checks.real_scalar(where, "offset", self.offset)
        if not (np.isfinite(scales).all() and (scales >= 0).all() and math.isfinite(offset)):
            raise ValueError(f"{where}: scales must be finite and >= 0, offset finite")

    def dequantize(self) -> npt.NDArray[np.float32]:
        """The ``absmax`` values back, float32 (as bitsandbytes: the code times its block's
        scale, plus the offset)."""
        blocks = np.arange(self.codes.size) // NESTED_BLOCK_SIZE
        out: npt.NDArray[np.float32] = DYNAMIC_MAP[self.codes] * self.scales[blocks]
        out += np.float32(self.offset)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held: one per code, four per scale, four for the offset."""
        return int(self.codes.nbytes + self.scales.nbytes + 4)


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """A weight in NF4: ``codes`` (two 4-bit level indices a byte, the first in the high half,
    ``[blocks, block_size / 2]``), ``absmax`` (one float32 per block, or with double
    quantization a ``NestedAbsmax``), the weight's ``shape`` and the ``block_size``.

    Make one with ``NF4Weight.quantize(w)``; ``dequantize()`` gives the array back (each value
    the nearest level times its block's ``absmax``). A layer's weight is quantized ``[out,
    in]``, as PyTorch stores it, so that its codes are bitsandbytes'.
    """

    codes: npt.NDArray[np.uint8]
    absmax: npt.NDArray[np.float32] | NestedAbsmax
    shape: tuple[int, ...]
    block_size: int

    @classmethod
    def quantize(
        cls, weight: npt.ArrayLike, block_size: int = 64, *, double_quant: bool = False
    ) -> NF4Weight:
        """``weight`` (any shape, finite) in NF4, in blocks of ``block_size`` values (even) taken
        in C order; the last block is padded with zeros. ``double_quant=True`` keeps the
        ``absmax`` values in 8 bits too (``NestedAbsmax``).

        Raises
        ------
        ValueError
            For non-finite values (in float32, where the absmax values are kept), or a
            ``block_size`` that is not an even int in ``[2, 4096]`` (bitsandbytes' largest).
        """
        where = "NF4Weight.quantize"
        w = _checks.float_array(where, "weight", weight)
        size = _block_size(where, block_size)
        nested = _checks.flag(where, "double_quant", double_quant)
        if not np.isfinite(w).all():
            raise ValueError(f"{where}: weight holds NaN or Inf; NF4 stores finite values only")
        if w.size and np.abs(w).max() > np.finfo(np.float32).max:
            raise ValueError(
                f"{where}: weight holds values up to {np.abs(w).max():.3g}, beyond float32's "
                f"range ({np.finfo(np.float32).max:.3g}), where NF4 keeps its absmax values"
            )
        codes, absmax = _nearest_in_blocks(w.ravel(), size, _MIDPOINTS)
        packed = (codes[:, 0::2] << np.uint8(4)) | codes[:, 1::2]
        return cls(packed, NestedAbsmax.quantize(absmax) if nested else absmax, w.shape, size)

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
        if isinstance(absmax, NestedAbsmax):
            absmax_shape = absmax.codes.shape
        elif isinstance(absmax, np.ndarray) and absmax.dtype == np.float32:
            absmax_shape = absmax.shape
            if not (np.isfinite(absmax).all() and (absmax >= 0).all()):
                raise ValueError(f"{where}: absmax must hold finite values >= 0")
        else:
            raise TypeError(
                f"{where}: absmax must be a float32 array or a NestedAbsmax, got "
                f"{_checks.describe(absmax)}"
            )
        if codes.shape != (blocks, size >> 1) or absmax_shape != (blocks,):
            raise ShapeError(
                f"{where}: a weight of shape {shape} in blocks of {size} needs codes "
                f"{(blocks, size // 2)} and absmax {(blocks,)}, got {codes.shape} and "
                f"{absmax_shape}"
            )

    @property
    def double_quant(self) -> bool:
        """Whether the ``absmax`` values are kept in 8 bits (``NestedAbsmax``)."""
        return isinstance(self.absmax, NestedAbsmax)

    def block_absmax(self) -> npt.NDArray[np.float32]:
        """Every block's ``absmax`` in float32 (dequantized, with double quantization)."""
        absmax = self.absmax
        return absmax.dequantize() if isinstance(absmax, NestedAbsmax) else absmax

    def level_indices(self) -> npt.NDArray[np.uint8]:
        """Every value's level index (0-15), one per value, in blocks: ``[blocks, block_size]``."""
        indices = np.empty((self.codes.shape[0], self.block_size), dtype=np.uint8)
        indices[:, 0::2] = self.codes >> 4
        indices[:, 1::2] = self.codes & 0x0F
        return indices

    def _values(
        self, start: int, stop: int, scales: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        """The dequantized values ``start`` to ``stop`` of the flattened weight (float32),
        dequantizing only the blocks they lie in; ``scales`` is ``block_absmax()``."""
        size = self.block_size
        first, last = start // size, -(-stop // size)
        pairs = np.take(_PAIRS, self.codes[first:last], axis=0)  # [blocks, size / 2, 2]
        block_values = pairs.reshape(last - first, size)
        block_values *= scales[first:last, None]
        out: npt.NDArray[np.float32] = block_values.ravel()[
            start - first * size : stop - first * size
        ]
        return out

    def rows(self) -> Iterator[tuple[int, int, npt.NDArray[np.float32]]]:
        """A 2-D weight's rows dequantized a few at a time, ``(start, stop, rows)`` in float32
        with at most ``CHUNK_VALUES`` values (at least one row): what the NF4 ops multiply by
        (NumPy widens them exactly where the other operand is float64)."""
        count, width = self.shape
        step = max(1, CHUNK_VALUES // max(width, 1))
        scales = self.block_absmax()
        for start in range(0, count, step):
            stop = min(count, start + step)
            block = self._values(start * width, stop * width, scales)
            yield start, stop, block.reshape(stop - start, width)

    def dequantize(self, dtype: npt.DTypeLike = np.float32) -> Array:
        """The weight back, in ``dtype``: each value's level times its block's ``absmax``."""
        values = self._values(0, math.prod(self.shape), self.block_absmax())
        out: Array = values.reshape(self.shape).astype(dtype)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held: the codes and the ``absmax`` values (with double quantization, their
        codes, scales and offset)."""
        return int(self.codes.nbytes + self.absmax.nbytes)

    def __repr__(self) -> str:
        nested = ", double_quant=True" if self.double_quant else ""
        return (
            f"NF4Weight(shape={self.shape}, block_size={self.block_size}, "
            f"blocks={self.codes.shape[0]}{nested}, nbytes={self.nbytes})"
        )


# --- multiplying by an NF4 weight, a few rows at a time -------------------------------------------


def chunk_work(rows: int, weight: NF4Weight) -> int:
    """The multiply-adds of one product of ``rows`` rows by a chunk of ``weight.rows()``: what
    the NF4 ops give ``blas.fit`` for their BLAS threads."""
    count, width = weight.shape
    return rows * min(count, max(1, CHUNK_VALUES // max(width, 1))) * width


def _times_transposed(x: Array, weight: NF4Weight) -> Array:
    """``x [..., C] @ Mᵀ`` for the NF4 matrix ``M [R, C]``: ``[..., R]``."""
    count, width = weight.shape
    flat = x.reshape(math.prod(x.shape[:-1]), width)
    blas.fit(chunk_work(flat.shape[0], weight))
    out = np.empty((flat.shape[0], count), dtype=x.dtype)
    for start, stop, rows in weight.rows():
        out[:, start:stop] = flat @ rows.T
    return out.reshape(*x.shape[:-1], count)


def _times(x: Array, weight: NF4Weight) -> Array:
    """``x [..., R] @ M`` for the NF4 matrix ``M [R, C]``: ``[..., C]``."""
    count, width = weight.shape
    flat = x.reshape(math.prod(x.shape[:-1]), count)
    blas.fit(chunk_work(flat.shape[0], weight))
    out = np.zeros((flat.shape[0], width), dtype=x.dtype)
    for start, stop, rows in weight.rows():
        out += flat[:, start:stop] @ rows
    return out.reshape(*x.shape[:-1], width)


def _nf4(where: str, weight: object) -> NF4Weight:
    """``weight`` if it is a 2-D NF4Weight, else a TypeError/ShapeError naming ``where``."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"{where}: weight must be an NF4Weight, got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ShapeError(f"{where}: weight must be 2-D, got shape {weight.shape}")
    return weight


def _check_nf4_matmul(x: Array, *, weight: object) -> None:
    check_dense("nf4_matmul", x, _nf4("nf4_matmul", weight).shape)


def _check_nf4_linear(x: Array, *, weight: object) -> None:
    shape = _nf4("nf4_linear", weight).shape
    if x.ndim == 0 or x.shape[-1] != shape[1]:
        raise ShapeError(
            f"nf4_linear: x {x.shape} needs a weight [out, in] with in = x's last axis, got {shape}"
        )


def _nf4_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    *batch, n_in = draw.shape(min_dims=1, max_dims=3)
    return (draw.floats((*batch, n_in)),)


def _nf4_draw(draw: Draw, shape: tuple[int, int]) -> NF4Weight:  # pragma: no mutate block
    w = draw.floats(shape)
    return NF4Weight.quantize(
        w, block_size=draw.choice([2, 4, 64]), double_quant=draw.choice([False, True])
    )


def _nf4_matmul_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    return {"weight": _nf4_draw(draw, (x.shape[-1], draw.choice([0, 1, 3, 5])))}


def _nf4_linear_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    return {"weight": _nf4_draw(draw, (draw.choice([0, 1, 3, 5]), x.shape[-1]))}


def _nf4_matmul(x: Array, *, weight: Any) -> tuple[Array, Vjp]:
    """``x @ W`` with ``W = weight.dequantize()``, an ``NF4Weight`` stored ``[in, out]``, in
    ``x``'s dtype, a few rows of ``W`` at a time. Record it with
    ``graph.apply(nf4_matmul, x, weight=weight)``.

    VJP: ``(g Wᵀ,)``, ``W`` dequantized again (nothing is kept); the weight gets no gradient.
    """
    out = _times(x, weight)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (_times_transposed(g, weight),)

    return out, vjp


def _nf4_linear(x: Array, *, weight: Any) -> tuple[Array, Vjp]:
    """``x @ Wᵀ`` with ``W = weight.dequantize()``, an ``NF4Weight`` ``[out, in]`` (a layer's
    weight as PyTorch and bitsandbytes store it), in ``x``'s dtype, a few rows of ``W`` at a
    time: a frozen 4-bit base layer, as in QLoRA. Record it with
    ``graph.apply(nf4_linear, x, weight=weight)``.

    VJP: ``(g W,)``, ``W`` dequantized again (nothing is kept); the weight gets no gradient.
    """
    out = _times_transposed(x, weight)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (_times(g, weight),)

    return out, vjp


nf4_matmul = op(check=_check_nf4_matmul, sample=Sample(_nf4_inputs, _nf4_matmul_params))(
    _nf4_matmul
)
nf4_linear = op(check=_check_nf4_linear, sample=Sample(_nf4_inputs, _nf4_linear_params))(
    _nf4_linear
)


def _check_adapted_norm(a: Array, b: Array, *, weight: object, scaling: object = 1.0) -> Params:
    where = "nf4_adapted_norm"
    shape = _nf4(where, weight).shape
    if a.ndim != 2 or b.ndim != 2 or a.shape != (shape[1], b.shape[0]) or b.shape[1] != shape[0]:
        raise ShapeError(
            f"{where}: a [in, r] and b [r, out] must fit a weight [out, in] = {shape}, got a "
            f"{a.shape} and b {b.shape}"
        )
    return {"weight": weight, "scaling": _checks.real_scalar(where, "scaling", scaling)}


def _adapted_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    n_in, rank, n_out = draw.shape(min_dims=3, max_dims=3, min_side=1, max_side=4)
    return draw.floats((n_in, rank), -0.5, 0.5), draw.floats((rank, n_out), -0.5, 0.5)


def _adapted_params(draw: Draw, a: Array, b: Array) -> Params:  # pragma: no mutate block
    # W in [4, 8] and |s A B| <= 2: every norm is far from 0, where it has no derivative
    w = draw.floats((b.shape[1], a.shape[0]), 4.0, 8.0)
    return {
        "weight": NF4Weight.quantize(
            w, block_size=draw.choice([2, 4, 64]), double_quant=draw.choice([False, True])
        ),
        "scaling": draw.choice([1.0, 0.5, 2.0]),
    }


def _adapted_rows(
    a: Array, b: Array, weight: NF4Weight, scaling: float
) -> Iterator[tuple[int, int, Array]]:
    """The rows of ``Wᵀ + s (A B)ᵀ`` (``[out, in]``), a few at a time."""
    for start, stop, rows in weight.rows():
        yield start, stop, rows + scaling * (a @ b[:, start:stop]).T


def _nf4_adapted_norm(a: Array, b: Array, *, weight: Any, scaling: float) -> tuple[Array, Vjp]:
    """DoRA's weight norm over an NF4 base: ``||W + s A B||`` per output (the norm of each
    column of the ``[in, out]`` adapted weight), ``[out]``, with ``W`` the dequantized
    ``weight [out, in]`` transposed; the adapted weight is made a few rows at a time, never
    whole. Record it with ``graph.apply(nf4_adapted_norm, a, b, weight=weight, scaling=s)``.

    VJP: with ``u = g / norm`` per output (0 where a norm is 0) and ``V = (W + s A B) * u``
    (each column scaled), ``(s V Bᵀ, s Aᵀ V)``.
    """
    norms = np.empty(b.shape[1], dtype=a.dtype)
    for start, stop, rows in _adapted_rows(a, b, weight, scaling):
        norms[start:stop] = np.linalg.norm(rows, axis=1)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        unit = np.divide(g, norms, out=np.zeros_like(norms), where=norms > 0)
        grad_a = np.zeros_like(a) if needs[0] else None
        grad_b = np.empty_like(b) if needs[1] else None
        for start, stop, rows in _adapted_rows(a, b, weight, scaling):
            scaled = rows * unit[start:stop, None]  # [rows, in]
            if grad_a is not None:
                grad_a += scaling * (scaled.T @ b[:, start:stop].T)
            if grad_b is not None:
                grad_b[:, start:stop] = scaling * (a.T @ scaled.T)
        return grad_a, grad_b

    return norms, vjp


nf4_adapted_norm = op(check=_check_adapted_norm, sample=Sample(_adapted_inputs, _adapted_params))(
    _nf4_adapted_norm
)
