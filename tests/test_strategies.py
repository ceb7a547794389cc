"""graphlora.testing.strategies: every strategy draws what it promises; random expressions pass
gradcheck in both modes, reach the whole catalogue, and print as runnable code."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphlora as gl
from graphlora import ops
from graphlora.testing import gradcheck
from graphlora.testing import strategies as gst


@given(shape=gst.shapes(max_dims=3, max_side=4), data=st.data())
def test_arrays_are_finite_and_bounded(shape: tuple[int, ...], data: st.DataObject) -> None:
    array = data.draw(gst.arrays(shape, min_value=-2.0, max_value=5.0))
    assert array.shape == shape
    assert len(shape) <= 3
    assert all(1 <= side <= 4 for side in shape)
    assert np.isfinite(array).all()
    assert array.min(initial=-2.0) >= -2.0
    assert array.max(initial=5.0) <= 5.0
    assert data.draw(gst.arrays(shape, dtype=np.float32)).dtype == np.float32


@given(shapes=gst.broadcastable_shapes())
def test_broadcastable_shapes_broadcast(shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    np.broadcast_shapes(*shapes)


@given(shapes=gst.matmul_shapes())
def test_matmul_shapes_are_accepted_by_numpy(
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
) -> None:
    a, b = shapes
    assert np.matmul(np.ones(a), np.ones(b)).ndim >= 0


@given(config=gst.lora_configs(max_rank=3, dropout=True))
def test_lora_configs_are_valid(config: gl.LoraConfig) -> None:
    assert 1 <= config.rank <= 3
    assert config.dropout in (0.1, 0.5)
    assert gl.LoraConfig(**{f: getattr(config, f) for f in config.__dataclass_fields__}) == config


@given(layer=gst.lora_layers(dtype=np.float32))
def test_lora_layers_are_consistent(layer: tuple[gl.Graph, gl.LoraLinear]) -> None:
    g, lora = layer
    assert g.dtype == np.float32
    assert g.value(lora.lora_a).shape == (lora.in_features, lora.rank)
    assert g.value(lora.lora_b).shape == (lora.rank, lora.out_features)
    assert lora.rank <= min(lora.in_features, lora.out_features)


@settings(max_examples=300)
@given(expr=gst.expressions())
def test_random_expressions_pass_gradcheck_in_both_modes(expr: gst.Expression) -> None:
    assert gradcheck(expr.fn, *expr.inputs)
    assert gradcheck(expr.fn, *expr.inputs, mode="fast")


@pytest.mark.slow
def test_expressions_reach_every_op_in_the_catalogue() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=400, database=None)
    @given(expr=gst.expressions())
    def collect(expr: gst.Expression) -> None:
        seen.update(expr.ops)

    collect()
    assert set(ops.OPS) <= set(seen), f"never drawn: {set(ops.OPS) - set(seen)}"


@given(expr=gst.expressions(max_ops=4))
def test_expression_repr_is_runnable_code(expr: gst.Expression) -> None:
    namespace: dict[str, object] = {"np": np}
    exec(repr(expr), namespace)
    inputs = [namespace[f"x{i}"] for i in range(len(expr.inputs))]
    for given_input, printed in zip(expr.inputs, inputs, strict=True):
        np.testing.assert_array_equal(given_input, printed)  # printed to the last bit
    g = gl.Graph()
    nodes = [g.constant(a) for a in expr.inputs]
    via_repr = namespace["f"](g, *nodes)  # type: ignore[operator]
    np.testing.assert_array_equal(g.value(via_repr), g.value(expr.fn(g, *nodes)))
    body = [line for line in repr(expr).splitlines() if line.startswith("    v")]
    assert len(body) == len(expr.ops)


def test_importing_strategies_without_hypothesis_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "try:\n    import graphlora.testing.strategies\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "install the test extra: pip install 'graphlora[test]'" in out.stdout
