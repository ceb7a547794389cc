"""The speed helpers the ops share: ``unbroadcast`` (gradients back to an input's shape), ``swap``
(the last two axes), ``blocks`` (cache-sized slices for chains of in-place passes) and ``row_sum`` /
``column_sum`` (sums as products with ones, faster than NumPy's reductions at a few hundred
features).
"""

from __future__ import annotations

import math

import numpy as np

from graphlora.ops.registry import Array

__all__ = ["BLOCK_BYTES", "block_length", "blocks", "column_sum", "row_sum", "swap", "unbroadcast"]


def unbroadcast(g: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``g`` over the axes that NumPy broadcasting added or stretched, giving ``shape``."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return np.asarray(g.sum(axis=tuple(range(lead)) + stretched)).reshape(shape)


BLOCK_BYTES = 1 << 18
"""The size of a block of ``blocks``: a few buffers of it fit in a core's L2 cache."""


def block_length(x: Array) -> int:
    """How many of ``x``'s elements make a block of ``BLOCK_BYTES``."""
    return BLOCK_BYTES // x.itemsize


def blocks(x: Array) -> list[slice]:
    """Slices cutting flat ``x`` into blocks of ``block_length(x)`` (the last may be shorter).

    A chain of in-place passes over megabytes (GELU's eight) reads and writes memory on every
    pass; run block by block, each block stays in cache from one pass to the next, which takes a
    third off the chain's time at transformer sizes."""
    step = block_length(x)
    return [slice(start, start + step) for start in range(0, x.size, step)]


def row_sum(x: Array) -> Array:
    """``x.sum(axis=-1, keepdims=True)`` of a float array, as a product with a column of ones.

    NumPy's reduction runs its inner loop once per row, which for rows of a few dozen to a few
    hundred (attention scores, a layer's features) costs three to four times what BLAS takes for
    the same sums; NaN and inf come through as in ``sum``, and no elements sum to 0.
    """
    return x @ np.ones((x.shape[-1], 1), dtype=x.dtype)


def column_sum(x: Array) -> Array:
    """``x.sum`` over every axis but the last, ``[D]``, as a product of a row of ones with ``x``'s
    rows: for the gradient of a norm's weight or of a dense layer's bias, of a few hundred
    features, two to three times faster than NumPy's reduction over the batch axes. NaN and inf
    come through as in ``sum``."""
    count = math.prod(x.shape[:-1])
    return np.ones(count, dtype=x.dtype) @ x.reshape(count, x.shape[-1])


def swap(a: Array) -> Array:
    """Transpose the last two axes (``a.T`` for a matrix)."""
    return a.T if a.ndim == 2 else np.swapaxes(a, -1, -2)  # .T: a third of swapaxes' cost
