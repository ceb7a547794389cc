"""Hypothesis strategies for property-testing gradients: shapes, arrays and LoRA layers.

Every strategy draws small, finite data so that a failing example is short to read. They are
the ones graphlora's own test suite uses. Needs Hypothesis: ``pip install 'graphlora[test]'``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora.graph import Graph
from graphlora.lora import INITS, LoraConfig, LoraLinear

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
    "lora_configs",
    "lora_layers",
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


@st.composite
def lora_configs(
    draw: st.DrawFn,
    *,
    max_rank: int = 4,
    inits: tuple[str, ...] = INITS,
    dropout: bool = False,
) -> LoraConfig:
    """Valid ``LoraConfig``s: rank ``1..max_rank``, any alpha, rsLoRA or not, a seed.

    ``dropout=True`` also draws a dropout probability (otherwise it is 0, so outputs are exact).
    """
    return LoraConfig(
        rank=draw(st.integers(1, max_rank)),
        alpha=draw(st.floats(0.5, 32.0)),
        dropout=draw(st.sampled_from([0.1, 0.5])) if dropout else 0.0,
        use_rslora=draw(st.booleans()),
        init=draw(st.sampled_from(inits)),
        init_std=draw(st.floats(0.01, 1.0)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def lora_layers(
    draw: st.DrawFn,
    *,
    dtype: npt.DTypeLike = np.float64,
    max_features: int = 6,
    config: st.SearchStrategy[LoraConfig] | None = None,
    bias: bool | None = None,
    trained: bool = True,
) -> tuple[Graph, LoraLinear]:
    """A new ``Graph`` and a ``LoraLinear`` in it, built ``from_linear`` over drawn weights.

    With ``trained`` (the default) B is set to drawn values, as after some training, so the
    low-rank path contributes to the output; otherwise B keeps its init.
    """
    cfg = draw(lora_configs() if config is None else config)
    side = st.integers(cfg.rank, max(max_features, cfg.rank))
    in_features, out_features = draw(side), draw(side)
    graph = Graph(dtype)
    weight = draw(arrays((in_features, out_features), min_value=-1.0, max_value=1.0))
    with_bias = draw(st.booleans()) if bias is None else bias
    bias_value = draw(arrays((out_features,))) if with_bias else None
    layer = LoraLinear.from_linear(graph, weight, bias_value, cfg)
    if trained:
        graph.set_value(
            layer.lora_b, draw(arrays((cfg.rank, out_features), min_value=-1.0, max_value=1.0))
        )
    return graph, layer
