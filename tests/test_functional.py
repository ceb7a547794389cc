"""graphlora.lora.functional: the pure-NumPy twin agrees with LoraLinear to the last bit, and validates."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import graphlora as gl
from graphlora.lora import functional as F
from graphlora.testing import strategies as gst


def _adapter_of(g: gl.Graph, layer: gl.LoraLinear) -> dict[str, np.ndarray]:
    return {"A": np.array(g.value(layer.lora_a)), "B": np.array(g.value(layer.lora_b))}


@given(layer=gst.lora_layers(), data=st.data())
def test_twin_agrees_with_the_layer_exactly(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g, lora = layer
    adapter = _adapter_of(g, lora)
    cfg = lora.config
    x = data.draw(gst.arrays((3, lora.in_features)), label="x")
    w = np.array(g.value(lora.frozen_weight))
    bias = None if lora.bias is None else np.array(g.value(lora.bias))
    twin = F.lora_linear(x, w, adapter, cfg.alpha, bias=bias, use_rslora=cfg.use_rslora)
    np.testing.assert_array_equal(twin, g.value(lora.forward(g, g.constant(x))))
    merged = F.merge_lora_weight(w, adapter, cfg.alpha, use_rslora=cfg.use_rslora)
    np.testing.assert_array_equal(merged, lora.merge(g))
    np.testing.assert_array_equal(
        F.lora_delta(adapter, cfg.alpha, use_rslora=cfg.use_rslora), lora.delta(g)
    )
    np.testing.assert_allclose(
        F.unmerge_lora_weight(merged, adapter, cfg.alpha, use_rslora=cfg.use_rslora), w, atol=1e-12
    )


@given(weight=gst.arrays(gst.shapes(min_dims=2, max_dims=2, max_side=6)), seed=st.integers(0, 100))
def test_init_lora_adapter(weight: np.ndarray, seed: int) -> None:
    rank = min(weight.shape)
    adapter = F.init_lora_adapter(weight, rank, init_std=0.5, rng=seed)
    assert adapter["A"].shape == (weight.shape[0], rank)
    assert adapter["B"].shape == (rank, weight.shape[1])
    assert not np.any(adapter["B"])
    np.testing.assert_array_equal(
        adapter["A"], F.init_lora_adapter(weight, rank, init_std=0.5, rng=seed)["A"]
    )
    assert F.init_lora_adapter(weight, 1, dtype=np.float32)["A"].dtype == np.float32
    np.testing.assert_array_equal(
        F.lora_linear(np.ones((2, weight.shape[0])), weight, adapter),
        np.ones((2, weight.shape[0])) @ weight,
    )


def test_init_lora_adapter_statistics() -> None:
    adapter = F.init_lora_adapter(np.zeros((500, 300)), 40, init_std=0.05, rng=0)
    assert abs(adapter["A"].std() / 0.05 - 1) < 0.02


def test_lora_delta_is_alpha_over_rank_times_ab() -> None:
    a = np.arange(6.0).reshape(3, 2)
    b = np.arange(8.0).reshape(2, 4)
    np.testing.assert_allclose(F.lora_delta({"A": a, "B": b}, alpha=4.0), 2.0 * a @ b)
    np.testing.assert_allclose(
        F.lora_delta({"A": a, "B": b}, alpha=4.0, use_rslora=True), 4.0 / math.sqrt(2) * a @ b
    )
    assert F.lora_scaling(4, 8.0) == 2.0


def test_tree_lora_delta_over_nested_structures() -> None:
    rng = np.random.default_rng(0)

    def adapter(n: int, r: int, m: int) -> dict[str, np.ndarray]:
        return {"A": rng.normal(size=(n, r)), "B": rng.normal(size=(r, m))}

    tree = {"attn": [adapter(4, 2, 3), adapter(3, 1, 3)], "mlp": (adapter(5, 2, 2),)}
    deltas = F.tree_lora_delta(tree, alpha=2.0)
    assert isinstance(deltas["attn"], list)
    assert isinstance(deltas["mlp"], tuple)
    np.testing.assert_array_equal(deltas["attn"][1], F.lora_delta(tree["attn"][1], 2.0))
    np.testing.assert_array_equal(deltas["mlp"][0], F.lora_delta(tree["mlp"][0], 2.0))
    tagged = {"q": {**tree["mlp"][0], "name": "q_proj"}}  # not an adapter by the default rule
    with pytest.raises(
        TypeError, match=r"tree_lora_delta: \['q'\]\['A'\] is a ndarray, neither an adapter"
    ):
        F.tree_lora_delta(tagged)
    custom = F.tree_lora_delta(tagged, is_leaf=lambda node: isinstance(node, dict) and "A" in node)
    np.testing.assert_array_equal(custom["q"], F.lora_delta(tree["mlp"][0]))
    with pytest.raises(
        TypeError, match=r"tree_lora_delta: \['attn'\]\[0\] is a int, neither an adapter"
    ):
        F.tree_lora_delta({"attn": [3]})


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: F.lora_delta({"A": np.ones((3, 2))}),
            TypeError,
            r"lora_delta: adapter must be a dict with the keys 'A' and 'B', got \{'A'",
        ),
        (
            lambda: F.lora_delta({"A": np.ones((3, 2)), "B": np.ones((3, 4))}),
            gl.ShapeError,
            r"lora_delta: A \(3, 2\) and B \(3, 4\) disagree on the rank \(2 != 3\)",
        ),
        (
            lambda: F.lora_delta({"A": np.ones((3, 2), dtype=int), "B": np.ones((2, 4))}),
            TypeError,
            r"lora_delta: adapter\['A'\] must hold floating-point data, got dtype int64",
        ),
        (
            lambda: F.merge_lora_weight(
                np.ones((3, 5)), {"A": np.ones((3, 2)), "B": np.ones((2, 4))}
            ),
            gl.ShapeError,
            r"merge_lora_weight: A \(3, 2\) @ B \(2, 4\) is \(3, 4\) but the weight is \(3, 5\)",
        ),
        (
            lambda: F.lora_linear(
                np.ones((2, 5)), np.ones((3, 4)), {"A": np.ones((3, 2)), "B": np.ones((2, 4))}
            ),
            gl.ShapeError,
            r"lora_linear: x has shape \(2, 5\) but W \(3, 4\) takes \[\.\.\., 3\]",
        ),
        (
            lambda: F.lora_linear(
                np.ones((2, 3)),
                np.ones((3, 4)),
                {"A": np.ones((3, 2)), "B": np.ones((2, 4))},
                bias=np.ones(3),
            ),
            gl.ShapeError,
            r"lora_linear: bias has shape \(3,\), expected \(4,\)",
        ),
        (
            lambda: F.init_lora_adapter(np.ones((3, 4)), 4),
            ValueError,
            r"init_lora_adapter: rank must be in \[1, 3\] for weight \(3, 4\), got 4",
        ),
        (
            lambda: F.init_lora_adapter(np.ones((3, 4)), 2.0),
            TypeError,
            r"init_lora_adapter: rank must be an int, got 2.0",
        ),
        (
            lambda: F.init_lora_adapter(np.ones(4), 1),
            gl.ShapeError,
            r"init_lora_adapter: weight must be a non-empty 2-D matrix, got shape \(4,\)",
        ),
        (
            lambda: F.init_lora_adapter(np.ones((3, 4)), 1, init_std=-1.0),
            ValueError,
            r"init_lora_adapter: init_std must be finite and > 0, got -1.0",
        ),
        (
            lambda: F.init_lora_adapter(np.ones((3, 4)), 1, dtype=np.int32),
            TypeError,
            r"init_lora_adapter: dtype must be floating point, got int32",
        ),
    ],
)
def test_validation(call: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_linear_init_is_torch_linear_uniform() -> None:
    weight, bias = F.linear_init(100, 50, rng=np.random.default_rng(0))
    assert weight.shape == (100, 50)
    assert bias is not None
    assert bias.shape == (50,)
    assert np.abs(weight).max() <= 0.1
    assert abs(weight.var() / (0.01 / 3) - 1) < 0.05  # U(-1/√100, 1/√100) has variance 0.01/3
    assert F.linear_init(3, 2, bias=False)[1] is None
    with pytest.raises(ValueError, match="linear_init: out_features must be >= 1, got 0"):
        F.linear_init(3, 0)
    with pytest.raises(TypeError, match=r"linear_init: in_features must be an int, got 2\.5"):
        F.linear_init(2.5, 3)  # type: ignore[arg-type]
