"""Where an op's inputs are safe to test: the ``Draw`` protocol that tests and the Hypothesis
strategies draw with, the ``Sample`` an op carries in its registry row, and the common samples
(``elementwise``, ``broadcasting``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from graphlora.ops.registry import Array, Params, Shape

__all__ = ["Draw", "Sample", "broadcasting", "elementwise"]

T = TypeVar("T")


class Draw(Protocol):  # pragma: no mutate block
    """What a ``Sample`` draws with: small choices, shapes and arrays.

    ``graphlora.testing.strategies.op_examples`` gives one backed by Hypothesis, so that failing
    examples shrink; the op modules themselves never import Hypothesis.
    """

    def choice(self, options: Sequence[T]) -> T:
        """One of ``options``."""
        ...

    def shape(
        self,
        *,
        min_dims: int = 0,
        max_dims: int = 3,
        min_side: int | None = None,
        max_side: int = 4,
    ) -> Shape:
        """A shape; ``min_side=None`` lets sides be 0 when zero-size arrays are being drawn."""
        ...

    def broadcastable(self, count: int = 2, *, min_dims: int = 0, max_dims: int = 3) -> list[Shape]:
        """``count`` shapes that broadcast together under NumPy's rules."""
        ...

    def floats(
        self, shape: Shape, low: float = -3.0, high: float = 3.0, away: float = 0.0
    ) -> Array:
        """Finite floats in ``[low, high]`` with ``|x| >= away``."""
        ...

    def distinct(self, shape: Shape, low: float = -3.0, high: float = 3.0) -> Array:
        """Floats in ``[low, high]``, no two closer than 0.01: no ties (for max, maximum)."""
        ...

    def ints(self, shape: Shape, low: int, high: int) -> Array:
        """Integers in ``[low, high)``."""
        ...

    def bools(self, shape: Shape) -> Array:
        """Booleans."""
        ...


def _no_params(draw: Draw, *inputs: Array | None) -> Params:  # pragma: no mutate block
    return {}


@dataclass(frozen=True)
class Sample:
    """Where an op's inputs are safe to test (finite values and gradients, away from kinks).

    ``inputs(draw)`` draws the float inputs (``None`` for an optional input left out);
    ``params(draw, *inputs)`` draws the rest for those inputs: data inputs (labels, masks) by
    name, and keyword arguments. ``fits(*inputs)`` says whether given float arrays are safe
    inputs, so that random programs (``strategies.expressions``) can chain ops; ``None`` keeps
    the op out of them.
    """

    inputs: Callable[[Draw], tuple[Array | None, ...]]
    params: Callable[..., Params] = _no_params
    fits: Callable[..., bool] | None = None


def elementwise(
    low: float = -math.inf,
    high: float = math.inf,
    away: float = 0.0,
    params: Callable[..., Params] = _no_params,
    min_dims: int = 0,
) -> Sample:  # pragma: no mutate block
    """One float input of any shape, safe on ``[low, high]`` away from 0 by ``away``; drawn in
    that range clipped to ``[-3, 3]``."""

    def inputs(draw: Draw) -> tuple[Array | None, ...]:
        shape = draw.shape(min_dims=min_dims)
        return (draw.floats(shape, max(low, -3.0), min(high, 3.0), away),)

    def fits(x: Array) -> bool:
        if x.ndim < min_dims:
            return False
        if x.size == 0:
            return True
        return bool(x.min() >= low and x.max() <= high and np.abs(x).min() >= away)

    return Sample(inputs, params, fits)


def broadcasting(away_b: float = 0.0) -> Sample:  # pragma: no mutate block
    """Two float inputs whose shapes broadcast; the second away from 0 by ``away_b``."""

    def inputs(draw: Draw) -> tuple[Array | None, ...]:
        shape_a, shape_b = draw.broadcastable(2)
        return draw.floats(shape_a), draw.floats(shape_b, away=away_b)

    def fits(a: Array, b: Array) -> bool:
        try:
            np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            return False
        return b.size == 0 or bool(np.abs(b).min() >= away_b)

    return Sample(inputs, fits=fits)
