"""Hypothesis strategies for property-testing gradients: shapes and arrays.

Every strategy draws small, finite data so that a failing example is short to read. They are
the ones graphlora's own test suite uses. Needs Hypothesis: ``pip install 'graphlora[test]'``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as exc:  # pragma: no cover - exercised only without Hypothesis
    raise ImportError(
        "graphlora.testing.strategies needs Hypothesis; install the test extra: "
        "pip install 'graphlora[test]'"
    ) from exc

__all__ = [
    "arrays",
    "broadcastable_shapes",
    "matmul_shapes",
    "shapes",
]

Shape = tuple[int, ...]


def shapes(
    *, min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 4
) -> st.SearchStrategy[Shape]:
    """Array shapes with ``min_dims..max_dims`` axes of ``min_side..max_side`` elements each."""
    return hnp.array_shapes(
        min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
    )


def arrays(
    shape: Shape | st.SearchStrategy[Shape] | None = None,
    *,
    dtype: npt.DTypeLike = np.float64,
    elements: st.SearchStrategy[float] | None = None,
    min_value: float = -3.0,
    max_value: float = 3.0,
) -> st.SearchStrategy[np.ndarray[Any, Any]]:
    """Arrays of bounded, finite floats.

    Parameters
    ----------
    shape
        A shape, a strategy of shapes, or ``None`` for ``shapes()``.
    dtype
        ``np.float64`` (default) or ``np.float32``.
    elements
        A strategy for the elements; default: finite floats in ``[min_value, max_value]``.
    """
    if elements is None:
        elements = st.floats(
            min_value,
            max_value,
            allow_nan=False,
            allow_infinity=False,
            width=32 if np.dtype(dtype) == np.float32 else 64,
        )
    return hnp.arrays(dtype, shapes() if shape is None else shape, elements=elements)


def broadcastable_shapes(
    *, max_dims: int = 3, max_side: int = 4
) -> st.SearchStrategy[tuple[Shape, Shape]]:
    """Pairs of shapes that broadcast together under NumPy's rules (either may be the larger)."""
    return hnp.mutually_broadcastable_shapes(
        num_shapes=2, min_dims=0, max_dims=max_dims, max_side=max_side
    ).map(lambda drawn: (drawn.input_shapes[0], drawn.input_shapes[1]))


@st.composite
def matmul_shapes(
    draw: st.DrawFn, *, max_batch_dims: int = 2, max_side: int = 4, allow_1d: bool = True
) -> tuple[Shape, Shape]:
    """Pairs ``(a_shape, b_shape)`` that ``np.matmul`` accepts.

    Covers ``[n, k] @ [k, m]``, batched ``[..., n, k] @ [k, m]``, batch axes broadcast on both
    sides, and (with ``allow_1d``) 1-D operands promoted as in NumPy.
    """
    side = st.integers(1, max_side)
    n, k, m = draw(side), draw(side), draw(side)
    batch_a, batch_b = draw(
        hnp.mutually_broadcastable_shapes(
            num_shapes=2, min_dims=0, max_dims=max_batch_dims, max_side=3
        ).map(lambda drawn: drawn.input_shapes)
    )
    a_shape: Shape = (*batch_a, n, k)
    b_shape: Shape = (*batch_b, k, m)
    if allow_1d and draw(st.booleans()):
        if draw(st.booleans()):
            a_shape = (k,)
        else:
            b_shape = (k,)
    return a_shape, b_shape
