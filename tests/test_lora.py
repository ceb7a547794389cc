"""LoraConfig and LoraLinear: the maths, the inits, merging, state, and every validation path."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from refusals import Refusal, assert_refusals

import graphlora as gl
from graphlora.lora import lora_linear
from graphlora.testing import gradcheck
from graphlora.testing import strategies as gst


def _x(
    graph: gl.Graph, layer: gl.LoraLinear, data: st.DataObject, batch: tuple[int, ...] = ()
) -> gl.NodeId:
    shape = batch or data.draw(st.sampled_from([(3,), (2, 3)]))
    return graph.constant(data.draw(gst.arrays((*shape, layer.in_features)), label="x"))


def _numpy_forward(graph: gl.Graph, layer: gl.LoraLinear, x: np.ndarray) -> np.ndarray:
    """The layer's maths written out in NumPy, with the update materialised."""
    w = graph.value(layer.frozen_weight)
    a, b = graph.value(layer.lora_a), graph.value(layer.lora_b)
    y = x @ (w + a @ b * layer.scaling)
    return y if layer.bias is None else y + graph.value(layer.bias)


# --- LoraConfig ---------------------------------------------------------------------------------


def test_config_defaults_follow_peft() -> None:
    cfg = gl.LoraConfig()
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora) == (8, 8.0, 0.0, False)
    assert (cfg.init, cfg.init_std, cfg.seed) == ("kaiming", None, None)  # PEFT's True
    assert cfg.scaling == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 4  # type: ignore[misc]


@given(rank=st.integers(1, 64), alpha=st.floats(0.1, 64.0))
def test_scaling_standard_and_rslora(rank: int, alpha: float) -> None:
    assert gl.LoraConfig(rank=rank, alpha=alpha).scaling == alpha / rank
    assert gl.LoraConfig(rank=rank, alpha=alpha, use_rslora=True).scaling == alpha / math.sqrt(rank)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"LoraConfig: rank must be a positive int, got 0"),
        ({"rank": 2.0}, TypeError, r"LoraConfig: rank must be an int, got 2.0"),
        ({"rank": True}, TypeError, r"LoraConfig: rank must be an int, got True"),
        ({"alpha": 0.0}, ValueError, r"LoraConfig: alpha must be finite and > 0, got 0.0"),
        ({"alpha": math.inf}, ValueError, r"LoraConfig: alpha must be finite and > 0, got inf"),
        ({"alpha": "8"}, TypeError, r"LoraConfig: alpha must be a real number, got '8'"),
        ({"dropout": 1.0}, ValueError, r"LoraConfig: dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, ValueError, r"LoraConfig: dropout must be in \[0, 1\), got -0.1"),
        ({"use_rslora": 1}, TypeError, r"LoraConfig: use_rslora must be a bool, got 1"),
        (
            {"init": "xavier"},
            ValueError,
            r"LoraConfig: init must be one of 'kaiming', 'gaussian', 'random', 'pissa', got 'xavier'",
        ),
        ({"init_std": 0}, ValueError, r"LoraConfig: init_std must be finite and > 0, got 0"),
        (
            {"init_std": math.nan},
            ValueError,
            r"LoraConfig: init_std must be finite and > 0, got nan",
        ),
        ({"seed": -1}, ValueError, r"LoraConfig: seed must be >= 0, got -1"),
        ({"seed": 1.5}, TypeError, r"LoraConfig: seed must be an int or None, got 1.5"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        gl.LoraConfig(**kwargs)


# --- the layer's maths --------------------------------------------------------------------------


@given(
    layer=gst.lora_layers(config=gst.lora_configs(inits=("gaussian", "kaiming")), trained=False),
    data=st.data(),
)
def test_new_layer_equals_its_base(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g, lora = layer
    assert not np.any(g.value(lora.lora_b))
    x = _x(g, lora, data)
    expected = g.value(x) @ g.value(lora.frozen_weight)
    if lora.bias is not None:
        expected = expected + g.value(lora.bias)
    np.testing.assert_array_equal(g.value(lora.forward(g, x)), expected)


@given(layer=gst.lora_layers(), data=st.data())
def test_forward_matches_the_materialised_maths(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g, lora = layer
    x = _x(g, lora, data)
    np.testing.assert_allclose(
        g.value(lora.forward(g, x)), _numpy_forward(g, lora, g.value(x)), rtol=1e-12, atol=1e-12
    )


@given(layer=gst.lora_layers(), data=st.data())
def test_only_lora_a_and_b_receive_gradients(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g, lora = layer
    y = lora.forward(g, _x(g, lora, data))
    g.backward(g.sum(g.mul(y, y)))
    assert g.grad(lora.frozen_weight) is None
    if lora.bias is not None:
        assert g.grad(lora.bias) is None
    assert g.grad(lora.lora_a) is not None
    assert g.grad(lora.lora_b) is not None
    assert lora.trainable_params() == [lora.lora_a, lora.lora_b]
    assert not lora.frozen_weight.requires_grad


@given(layer=gst.lora_layers(), data=st.data())
def test_backward_matches_the_hand_derived_formulas(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g, lora = layer
    x = _x(g, lora, data, batch=(4,))
    seed = data.draw(gst.arrays((4, lora.out_features)), label="seed")
    g.backward(lora.forward(g, x), grad=seed)
    xv, a, b, s = g.value(x), g.value(lora.lora_a), g.value(lora.lora_b), lora.scaling
    np.testing.assert_allclose(
        g.grad(lora.lora_a), xv.T @ (seed @ b.T) * s, rtol=1e-10, atol=1e-12
    )  # dL/dA = xᵀ (g Bᵀ) s
    np.testing.assert_allclose(
        g.grad(lora.lora_b), (xv @ a * s).T @ seed, rtol=1e-10, atol=1e-12
    )  # dL/dB = (x A s)ᵀ g


@given(layer=gst.lora_layers(max_features=4), data=st.data())
def test_gradcheck_wrt_a_b_and_x(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g0, lora = layer
    x = data.draw(gst.arrays((2, lora.in_features)), label="x")
    weight = np.array(g0.value(lora.frozen_weight))
    bias = None if lora.bias is None else np.array(g0.value(lora.bias))

    def fn(g: gl.Graph, x: gl.NodeId, a: gl.NodeId, b: gl.NodeId) -> gl.NodeId:
        base = gl.LoraLinear.from_linear(g, weight, bias, lora.config)
        update = dataclasses.replace(base.update, lora_a=a, lora_b=b)
        layer = dataclasses.replace(base, adapters={"default": update})
        y = layer.forward(g, x)
        return g.sum(g.mul(y, y))

    a, b = np.array(g0.value(lora.lora_a)), np.array(g0.value(lora.lora_b))
    assert gradcheck(fn, x, a, b)
    assert gradcheck(fn, x, a, b, mode="fast")


def test_the_low_rank_path_never_materialises_a_times_b() -> None:
    g = gl.Graph()
    lora = gl.LoraLinear.new(g, 6, 5, gl.LoraConfig(rank=2, seed=0))
    y = lora.forward(g, g.constant(np.ones((3, 6))))
    g.backward(g.sum(y))
    assert (6, 5) not in [node.shape for node in g.tape]  # no [in, out] node besides W
    matmuls = [node.shape for node in g.tape if node.op == "matmul"]
    assert matmuls == [(3, 5), (3, 2), (3, 5)]  # x W, x A, (x A s) B


# --- merging ------------------------------------------------------------------------------------


@given(layer=gst.lora_layers(), data=st.data())
def test_merge_is_pure_and_equals_w_plus_ab_scaled(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g, lora = layer
    w_before = np.array(g.value(lora.frozen_weight))
    merged = lora.merge(g)
    expected = w_before + g.value(lora.lora_a) @ g.value(lora.lora_b) * lora.scaling
    np.testing.assert_allclose(merged, expected, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(g.value(lora.frozen_weight), w_before)
    assert not lora.merged


@given(layer=gst.lora_layers(), data=st.data())
def test_merged_and_unmerged_forward_agree(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g, lora = layer
    x = _x(g, lora, data)
    before = np.array(g.value(lora.forward(g, x)))
    lora.merge_(g)
    assert lora.merged
    with g.no_grad():
        after = g.value(lora.forward(g, x))
    np.testing.assert_allclose(after, before, rtol=1e-12, atol=1e-12)
    assert g.tape[-1].op == ("add" if lora.bias is not None else "matmul")  # just x W (+ b)


def test_unmerge_is_bit_exact_after_1000_cycles() -> None:
    g = gl.Graph()
    lora = gl.LoraLinear.new(g, 16, 12, gl.LoraConfig(rank=4, alpha=7.0, seed=3))
    g.set_value(lora.lora_b, np.random.default_rng(1).normal(size=(4, 12)))
    original = np.array(g.value(lora.frozen_weight))
    drift = original.copy()
    delta = lora.delta(g)
    for _ in range(1000):
        lora.merge_(g)
        lora.unmerge_(g)
        drift = (drift + delta) - delta  # what PEFT's W += D; W -= D does
    np.testing.assert_array_equal(g.value(lora.frozen_weight), original)
    assert not lora.merged
    assert not np.array_equal(drift, original)  # the naive way does drift: the test has teeth


def test_merge_twice_or_unmerge_unmerged_warns_and_does_nothing() -> None:
    g = gl.Graph()
    lora = gl.LoraLinear.new(g, 4, 4, gl.LoraConfig(rank=2, seed=0))
    with pytest.warns(UserWarning, match="^lora is not merged; nothing to do$"):
        lora.unmerge_(g)
    lora.merge_(g)
    merged = np.array(g.value(lora.frozen_weight))
    with pytest.warns(UserWarning, match="^lora is already merged; nothing to do$"):
        lora.merge_(g)
    np.testing.assert_array_equal(g.value(lora.frozen_weight), merged)
    np.testing.assert_array_equal(lora.merge(g), merged)
    lora.unmerge_(g)
    lora.set_adapter(g, [])
    with pytest.warns(UserWarning, match="^lora has no adapter running; nothing to merge$"):
        lora.merge_(g)
    assert not lora.merged


def test_merge_refuses_non_finite_weights() -> None:
    g = gl.Graph()
    lora = gl.LoraLinear.new(g, 4, 4, gl.LoraConfig(rank=2, seed=0))
    g.set_value(lora.lora_b, np.full((2, 4), np.inf))
    w = np.array(g.value(lora.frozen_weight))
    with pytest.raises(
        gl.GraphError, match=r"LoraLinear.merge: merging lora would give 16 non-finite weights"
    ):
        lora.merge_(g)
    assert not lora.merged
    np.testing.assert_array_equal(g.value(lora.frozen_weight), w)


# --- inits --------------------------------------------------------------------------------------


def test_gaussian_init_statistics() -> None:
    g = gl.Graph()
    lora = gl.LoraLinear.new(
        g, 400, 300, gl.LoraConfig(rank=50, init="gaussian", init_std=0.02, seed=0)
    )
    a = g.value(lora.lora_a)
    assert a.shape == (400, 50)
    # 20,000 normal draws: the sample std is within 2% of 0.02, the mean near 0.
    assert abs(a.std() / 0.02 - 1) < 0.02
    assert abs(a.mean()) < 5 * 0.02 / math.sqrt(a.size)
    assert not np.any(g.value(lora.lora_b))


def test_kaiming_init_bound_and_variance() -> None:
    g = gl.Graph()
    lora = gl.LoraLinear.new(g, 256, 64, gl.LoraConfig(rank=32, init="kaiming", seed=0))
    a = g.value(lora.lora_a)
    bound = 1 / math.sqrt(256)  # torch's kaiming_uniform_(a=sqrt(5)) on fan_in = in_features
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.99 * bound
    assert abs(a.var() / (bound**2 / 3) - 1) < 0.05  # U(-b, b) has variance b²/3
    assert not np.any(g.value(lora.lora_b))


def test_new_frozen_weight_is_initialised_like_torch_linear() -> None:
    g = gl.Graph()
    lora = gl.LoraLinear.new(g, 100, 200, gl.LoraConfig(rank=4, seed=0))
    w, b = g.value(lora.frozen_weight), g.value(lora.bias)  # type: ignore[arg-type]
    assert np.abs(w).max() <= 0.1
    assert np.abs(b).max() <= 0.1
    assert abs(w.var() / (0.01 / 3) - 1) < 0.05
    g2 = gl.Graph()
    again = gl.LoraLinear.new(g2, 100, 200, gl.LoraConfig(rank=4, seed=0))
    np.testing.assert_array_equal(g2.value(again.frozen_weight), w)  # seeded: reproducible


@given(
    layer=gst.lora_layers(config=gst.lora_configs(inits=("pissa",)), trained=False),
    data=st.data(),
)
def test_pissa_keeps_the_output_and_takes_the_top_singular_subspace(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g, lora = layer
    residual = g.value(lora.frozen_weight)
    update = g.value(lora.lora_a) @ g.value(lora.lora_b) * lora.scaling
    original = residual + update
    u, s, vh = np.linalg.svd(original, full_matrices=False)
    truncated = (u[:, : lora.rank] * s[: lora.rank]) @ vh[: lora.rank]
    np.testing.assert_allclose(update, truncated, atol=1e-10)
    x = _x(g, lora, data)
    base = g.value(x) @ original
    if lora.bias is not None:
        base = base + g.value(lora.bias)
    np.testing.assert_allclose(g.value(lora.forward(g, x)), base, atol=1e-10)


def test_pissa_on_a_large_weight_uses_a_truncated_svd() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(1100, 1030))
    g = gl.Graph()
    lora = gl.LoraLinear.from_linear(
        g, weight, config=gl.LoraConfig(rank=3, alpha=6.0, init="pissa")
    )
    u, s, vh = np.linalg.svd(weight, full_matrices=False)
    top = (u[:, :3] * s[:3]) @ vh[:3]
    np.testing.assert_allclose(lora.delta(g), top, atol=1e-8)
    np.testing.assert_allclose(g.value(lora.frozen_weight), weight - lora.delta(g), atol=1e-12)


# --- dropout ------------------------------------------------------------------------------------


def test_dropout_acts_on_the_lora_input_only_and_not_under_no_grad() -> None:
    g = gl.Graph()
    cfg = gl.LoraConfig(rank=3, alpha=3.0, dropout=0.5, seed=0)
    lora = gl.LoraLinear.new(g, 8, 5, cfg, rng=np.random.default_rng(11))
    b = np.random.default_rng(2).normal(size=(3, 5))
    g.set_value(lora.lora_b, b)
    x = g.constant(np.random.default_rng(3).normal(size=(64, 8)))
    with g.no_grad():
        clean = np.array(g.value(lora.forward(g, x)))
    np.testing.assert_allclose(clean, _numpy_forward(g, lora, g.value(x)), rtol=1e-12)

    replay = copy.deepcopy(lora.rng)  # the same generator state: the mask the layer will draw
    keep = replay.random((64, 8)) >= 0.5
    dropped = np.where(keep, g.value(x) / 0.5, 0.0)
    y = lora.forward(g, x)
    w, a, s = g.value(lora.frozen_weight), g.value(lora.lora_a), lora.scaling
    expected = g.value(x) @ w + (dropped @ a * s) @ b + g.value(lora.bias)  # type: ignore[arg-type]
    np.testing.assert_allclose(g.value(y), expected, rtol=1e-12)
    seed = np.ones((64, 5))
    g.backward(y, grad=seed)
    np.testing.assert_allclose(
        g.grad(lora.lora_a), dropped.T @ (seed @ b.T) * s, rtol=1e-12
    )  # through the mask


# --- state dicts --------------------------------------------------------------------------------


@given(layer=gst.lora_layers())
def test_state_dict_round_trip(layer: tuple[gl.Graph, gl.LoraLinear]) -> None:
    g, lora = layer
    state = lora.state_dict(g)
    assert set(state) == {"lora_a", "lora_b"}
    state["lora_a"] += 1.0  # a copy: the layer is unchanged
    assert not np.array_equal(state["lora_a"], g.value(lora.lora_a))
    other = gl.LoraLinear.from_linear(g, g.value(lora.frozen_weight), None, lora.config)
    other.load_state_dict(g, state)
    np.testing.assert_array_equal(g.value(other.lora_a), state["lora_a"])
    np.testing.assert_array_equal(g.value(other.lora_b), state["lora_b"])


def test_load_state_dict_is_all_or_nothing() -> None:
    g = gl.Graph()
    lora = gl.LoraLinear.new(g, 5, 4, gl.LoraConfig(rank=2, seed=0))
    good = {"lora_a": np.ones((5, 2)), "lora_b": np.ones((2, 4))}
    before = lora.state_dict(g)
    bad_cases = [
        (
            {"lora_a": good["lora_a"]},
            ValueError,
            r"keys must be exactly 'lora_a' and 'lora_b'; missing \['lora_b'\], unexpected \[\]",
        ),
        ({**good, "extra": 1}, ValueError, r"missing \[\], unexpected \['extra'\]"),
        (
            {**good, "lora_b": np.ones((4, 2))},
            gl.ShapeError,
            r"lora_b has shape \(4, 2\), expected \(2, 4\)",
        ),
        (
            {**good, "lora_b": np.ones((2, 4), dtype=int)},
            TypeError,
            r"lora_b holds int64 data; it needs floating-point data",
        ),
        ({**good, "lora_b": np.full((2, 4), np.nan)}, ValueError, r"lora_b holds NaN or Inf"),
        ({**good, "lora_a": lora.lora_a}, TypeError, r"lora_a must be an array, got NodeId"),
        ([("lora_a", 1)], TypeError, r"state must be a mapping, got list"),
    ]
    for state, error, match in bad_cases:
        with pytest.raises(error, match=r"LoraLinear.load_state_dict: .*" + match):
            lora.load_state_dict(g, state)  # type: ignore[arg-type]
        for key, value in lora.state_dict(g).items():
            np.testing.assert_array_equal(value, before[key])
    lora.merge_(g)
    with pytest.raises(
        gl.GraphError,
        match=r"^LoraLinear.load_state_dict: lora is merged \(adapters \['default'\]\); unmerge_ it first$",
    ):
        lora.load_state_dict(g, good)
    lora.unmerge_(g)
    lora.load_state_dict(g, {k: v.astype(np.float32) for k, v in good.items()})  # converted
    np.testing.assert_array_equal(g.value(lora.lora_a), good["lora_a"])


# --- construction and validation ----------------------------------------------------------------


def test_from_linear_with_nodes_freezes_them_and_uses_them() -> None:
    g = gl.Graph()
    w = g.parameter(np.ones((4, 3)))
    b = g.parameter(np.zeros(3))
    lora = gl.LoraLinear.from_linear(g, w, b, gl.LoraConfig(rank=2, seed=0))
    assert lora.frozen_weight is w
    assert lora.bias is b
    assert not w.requires_grad
    assert not b.requires_grad
    assert w.op == "constant"


def test_from_linear_validation() -> None:
    g = gl.Graph()
    cfg = gl.LoraConfig(rank=3)
    cases: list[tuple[Any, Any, type[Exception], str]] = [
        (
            np.ones(4),
            None,
            gl.ShapeError,
            r"weight must be a non-empty 2-D \[in, out\] matrix, got shape \(4,\)",
        ),
        (
            np.ones((0, 4)),
            None,
            gl.ShapeError,
            r"weight must be a non-empty 2-D .* got shape \(0, 4\)",
        ),
        (
            np.ones((4, 4), dtype=int),
            None,
            TypeError,
            r"weight must hold floating-point data, got dtype int64",
        ),
        (
            np.ones((4, 5)),
            np.ones(4),
            gl.ShapeError,
            r"bias has shape \(4,\) but weight \(4, 5\) needs \(5,\)",
        ),
        ([[1.0], [2.0, 3.0]], None, gl.ShapeError, r"weight is not a regular array"),
    ]
    for weight, bias, error, match in cases:
        before = len(g)
        with pytest.raises(error, match=r"LoraLinear.from_linear: " + match):
            gl.LoraLinear.from_linear(g, weight, bias, cfg)
        assert len(g) == before
    with pytest.raises(
        TypeError,
        match=r"LoraLinear\.from_linear: config must be a LoraConfig or a VeraConfig, got dict",
    ):
        gl.LoraLinear.from_linear(g, np.ones((4, 4)), None, {"rank": 2})  # type: ignore[arg-type]


def test_new_validation() -> None:
    g = gl.Graph()
    with pytest.raises(ValueError, match=r"LoraLinear.new: in_features must be >= 1, got 0"):
        gl.LoraLinear.new(g, 0, 4, gl.LoraConfig(rank=1))
    with pytest.raises(TypeError, match=r"LoraLinear.new: out_features must be an int, got 4.0"):
        gl.LoraLinear.new(g, 4, 4.0, gl.LoraConfig(rank=1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"LoraLinear.new: rank 8 exceeds min.*init='pissa'"):
        gl.LoraLinear.new(g, 4, 16, gl.LoraConfig(init="pissa"))
    with pytest.raises(
        TypeError,
        match=r"LoraLinear.new: rng must be a np.random.Generator, an int seed or None, got str",
    ):
        gl.LoraLinear.new(g, 4, 4, gl.LoraConfig(rank=1), rng="3")  # type: ignore[arg-type]
    assert len(g) == 0
    seeded = gl.LoraLinear.new(g, 4, 4, gl.LoraConfig(rank=1), rng=3)  # a seed is a generator
    again = gl.LoraLinear.new(g, 4, 4, gl.LoraConfig(rank=1), rng=np.random.default_rng(3))
    np.testing.assert_array_equal(g.value(seeded.lora_a), g.value(again.lora_a))


def test_forward_rejects_a_wrong_width_and_records_nothing() -> None:
    g = gl.Graph()
    lora = gl.LoraLinear.new(g, 16, 8, gl.LoraConfig(rank=2, seed=0), name="q_proj")
    x = g.constant(np.ones((4, 10)))
    before = len(g)
    with pytest.raises(
        gl.ShapeError,
        match=re.escape(
            "LoraLinear.forward: q_proj takes [..., 16] but the input has shape (4, 10)"
        ),
    ):
        lora.forward(g, x)
    assert len(g) == before


def test_with_bias() -> None:
    g = gl.Graph()
    lora = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0), bias=False)
    assert lora.bias is None
    biased = lora.with_bias(g, [1.0, -1.0])
    assert biased.lora_a is lora.lora_a
    assert biased.bias is not None
    x = g.constant(np.zeros((1, 3)))
    np.testing.assert_array_equal(g.value(biased.forward(g, x)), [[1.0, -1.0]])
    with pytest.raises(
        gl.ShapeError,
        match=r"LoraLinear.with_bias: bias has shape \(3,\) but the layer needs \(2,\)",
    ):
        lora.with_bias(g, np.ones(3))
    assert biased.bias.name == "lora.bias"
    assert not biased.bias.requires_grad
    with g.scope("outer"):
        assert biased.base_forward(g, x).scope == "outer/frozen"  # the frozen path, drawn apart
    biased.add_adapter(g, "other", gl.LoraConfig(rank=1, seed=1))
    assert list(lora.adapters) == ["default"]  # the adapter set is the new layer's own
    with pytest.raises(TypeError) as info:
        lora.with_bias(3, np.ones(2))  # type: ignore[arg-type]
    assert str(info.value) == "LoraLinear.with_bias: graph must be a Graph, got int"
    with pytest.raises(TypeError) as info:
        lora.with_bias(g, "one")
    assert str(info.value) == (
        "LoraLinear.with_bias: bias must hold floating-point data, got dtype <U3"
    )
    lora.merge_(g)
    with pytest.raises(gl.GraphError, match=r"LoraLinear\.with_bias: lora is merged"):
        lora.with_bias(g, np.ones(2))


def test_repr_reports_sizes_and_parameter_counts() -> None:
    g = gl.Graph()
    lora = gl.LoraLinear.new(g, 64, 32, gl.LoraConfig(rank=4, alpha=8.0, seed=0), name="fc")
    assert repr(lora) == (
        "LoraLinear(name='fc', in_features=64, out_features=32, rank=4, scaling=2, dropout=0, "
        "bias=True, merged=False, trainable=384, frozen=2,080)"
    )  # trainable = 4 * (64 + 32), frozen = 64 * 32 + 32


def test_float32_layer() -> None:
    g = gl.Graph(np.float32)
    lora = gl.LoraLinear.new(g, 8, 4, gl.LoraConfig(rank=2, seed=0, init="pissa"))
    y = lora.forward(g, g.constant(np.ones((2, 8))))
    g.backward(g.sum(y))
    assert g.value(y).dtype == np.float32
    assert g.grad(lora.lora_a).dtype == np.float32  # type: ignore[union-attr]


# --- PyTorch cross-check ------------------------------------------------------------------------


@pytest.mark.crosscheck
@given(layer=gst.lora_layers(), data=st.data())
def test_matches_the_same_maths_in_torch(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    torch = pytest.importorskip("torch")
    g, lora = layer
    x = _x(g, lora, data, batch=(3,))
    seed = data.draw(gst.arrays((3, lora.out_features)), label="seed")
    y = lora.forward(g, x)
    g.backward(y, grad=seed)
    # PyTorch's nn.Linear stores [out, in]; PEFT computes base(x) + lora_B(lora_A(x)) * scaling.
    w = torch.tensor(g.value(lora.frozen_weight).T.copy())
    a = torch.tensor(g.value(lora.lora_a).T.copy(), requires_grad=True)  # [r, in]
    b = torch.tensor(g.value(lora.lora_b).T.copy(), requires_grad=True)  # [out, r]
    xt = torch.tensor(g.value(x).copy())
    out = (
        torch.nn.functional.linear(xt, w)
        + torch.nn.functional.linear(torch.nn.functional.linear(xt, a), b) * lora.scaling
    )
    if lora.bias is not None:
        out = out + torch.tensor(g.value(lora.bias).copy())
    out.backward(torch.tensor(seed))
    np.testing.assert_allclose(g.value(y), out.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.grad(lora.lora_a), a.grad.numpy().T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.grad(lora.lora_b), b.grad.numpy().T, rtol=1e-10, atol=1e-12)


@given(layer=gst.lora_layers(config=gst.lora_configs(dropout=True)), data=st.data())
def test_fused_forward_is_the_same_maths(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g, lora = layer
    x = _x(g, lora, data)
    seed = data.draw(gst.arrays((*x.shape[:-1], lora.out_features)), label="seed")
    state = copy.deepcopy(lora.rng)  # both draw the same dropout mask from the same state
    y = lora.forward(g, x)
    g.backward(y, grad=seed)
    grads = [np.array(g.grad(n)) for n in lora.trainable_params()]
    g.zero_grad()
    lora.rng = state
    fused = lora.forward(g, x, fused=True)
    assert fused.op == "lora_linear"
    g.backward(fused, grad=seed)
    np.testing.assert_allclose(g.value(fused), g.value(y), rtol=1e-12, atol=1e-12)
    for node, expected in zip(lora.trainable_params(), grads, strict=True):
        np.testing.assert_allclose(g.grad(node), expected, rtol=1e-12, atol=1e-12)
    assert g.grad(lora.frozen_weight) is None
    with g.no_grad():
        np.testing.assert_allclose(
            g.value(lora.forward(g, x, fused=True)),
            _numpy_forward(g, lora, g.value(x)),
            rtol=1e-12,
            atol=1e-12,
        )


@pytest.mark.parametrize("fused", [False, True])
def test_forward_refuses_a_layer_of_another_graph(fused: bool) -> None:
    g, other = gl.Graph(), gl.Graph()
    layer = gl.LoraLinear.new(other, 3, 2, gl.LoraConfig(rank=1, seed=0))
    x = g.constant(np.ones((2, 3)))
    with pytest.raises(gl.ForeignNodeError, match="belongs to another Graph"):
        layer.forward(g, x, fused=fused)
    assert g.tape == ()  # nothing recorded


# --- the fused op, beside the layer ---------------------------------------------------------------


def test_lora_linear_checks_shapes_first() -> None:
    g = gl.Graph()
    x, w = g.constant(np.ones((2, 4))), g.constant(np.ones((4, 3)))
    a, b = g.parameter(np.ones((4, 2))), g.parameter(np.ones((2, 3)))
    wrong_b = g.parameter(np.ones((3, 3)))

    def refused(error: type[Exception], match: str, **kwargs: Any) -> None:
        before = len(g)
        args = kwargs.pop("args", (x, w, a, b))
        with pytest.raises(error, match=match):
            g.apply(lora_linear, *args, **kwargs)
        assert len(g) == before

    refused(
        gl.ShapeError,
        re.escape(
            "lora_linear: shapes do not fit x [..., in], w [in, out], a [in, r], b [r, out]: x (2, 4), w (4, 3), a (4, 2), b (3, 3)"
        ),
        args=(x, w, a, wrong_b),
    )
    refused(
        gl.ShapeError,
        re.escape(
            "lora_linear: shapes do not fit x [..., in], w [in, out], a [in, r], b [r, out]: x (2, 4), w (4,), a (4, 2), b (2, 3)"
        ),
        args=(x, g.constant(np.ones(4)), a, b),  # a weight that is not a matrix
    )
    refused(
        gl.ShapeError,
        re.escape("lora_linear: bias has shape (4,), expected (3,)"),
        args=(x, w, a, b, g.constant(np.ones(4))),
    )
    refused(
        gl.ShapeError,
        re.escape("lora_linear: mask has shape (4,), x has shape (2, 4)"),
        mask=np.ones(4),
    )
    refused(TypeError, r"lora_linear: scaling must be a real scalar", scaling="2")
    refused(ValueError, re.escape("lora_linear: dropout must be in [0, 1), got 1.0"), dropout=1.0)
    refused(
        ValueError,
        "lora_linear: give a dropout mask or a dropout probability, not both",
        mask=np.ones((2, 4)),
        dropout=0.5,
    )
    refused(
        TypeError,
        "lora_linear: rng must be a np.random.Generator, an int seed or None, got str",
        dropout=0.5,
        rng="7",
    )
    refused(
        TypeError,
        r"lora_linear: b must be a NodeId, got an ndarray",
        args=(x, w, a, np.ones((2, 3))),
    )
    out = g.apply(lora_linear, x, w, a, b, scaling=0.5)
    assert out.op == "lora_linear"
    np.testing.assert_allclose(
        g.value(out), np.full((2, 3), 4.0 + (4.0 * 0.5) * 2)
    )  # x W + ((x A) s) B
    masked = g.apply(
        lora_linear, x, w, a, b, scaling=0.5, mask=np.array([[2.0, 0, 0, 0], [0, 0, 0, 0]])
    )
    np.testing.assert_allclose(g.value(masked), [[6.0] * 3, [4.0] * 3])  # the mask applied


def test_lora_linear_dropout_draws_as_the_dropout_op_does() -> None:
    g = gl.Graph()
    x, w = g.constant(np.ones((3, 4))), g.constant(np.zeros((4, 2)))
    a, b = g.parameter(np.ones((4, 1))), g.parameter(np.ones((1, 2)))
    fused = g.apply(lora_linear, x, w, a, b, dropout=0.5, rng=11)
    separate = g.matmul(g.matmul(g.dropout(x, 0.5, rng=11), a), b)  # the same mask from seed 11
    np.testing.assert_array_equal(g.value(fused), g.value(separate))
    assert not np.array_equal(g.value(fused), np.full((3, 2), 4.0))  # 4.0: nothing dropped


def test_the_engine_knows_nothing_of_lora() -> None:
    package = Path(gl.__file__).parent
    engine = [
        "_checks.py",
        *[f"engine/{p.name}" for p in (package / "engine").glob("*.py")],
        *[f"ops/{p.name}" for p in (package / "ops").glob("*.py")],
    ]
    assert "engine/graph.py" in engine and "engine/replay.py" in engine
    for name in engine:
        source = (package / name).read_text(encoding="utf-8")
        assert re.search(r"(?<!graph)lora", source, flags=re.IGNORECASE) is None, name
    assert not hasattr(gl.Graph, "lora_linear")


# --- behaviours a mutation of the layer would change (mutation testing found them unchecked) ---


def test_from_linear_uses_an_array_bias_the_default_config_and_the_given_generator() -> None:
    g = gl.Graph()
    w, bias = np.arange(16.0).reshape(4, 4) / 10, np.array([10.0, -10.0, 1.0, 0.0])
    wide = gl.LoraLinear.from_linear(g, w, bias)  # the default config is LoraConfig(): rank 8
    assert wide.rank == 8 and g.value(wide.lora_a).shape == (4, 8)  # above min(in, out): as PEFT
    big = gl.LoraLinear.from_linear(g, np.ones((8, 8)))
    assert big.config == gl.LoraConfig() and big.rank == 8 and big.bias is None
    config = gl.LoraConfig(rank=2, init="gaussian", init_std=0.5)
    layer = gl.LoraLinear.from_linear(g, w, bias, config, rng=np.random.default_rng(7))
    expected_a = np.random.default_rng(7).normal(0.0, 0.5, size=(4, 2))
    np.testing.assert_array_equal(g.value(layer.lora_a), expected_a)  # drawn by that generator
    x = np.ones((3, 4))
    np.testing.assert_array_equal(g.value(layer.forward(g, g.constant(x))), x @ w + bias)


def test_with_bias_uses_a_given_parameter_node_and_freezes_it() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0), bias=False)
    node = g.parameter([1.0, -1.0])
    biased = layer.with_bias(g, node)
    assert biased.bias is node and not node.requires_grad
    x = g.constant(np.ones((1, 3)))
    np.testing.assert_array_equal(
        g.value(biased.forward(g, x)), g.value(layer.forward(g, x)) + np.array([1.0, -1.0])
    )


def test_forward_takes_1d_input_refuses_0d_and_leaves_the_outer_scope_as_it_was() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0), name="q")
    assert layer.forward(g, g.constant([1.0, 2.0, 3.0])).shape == (2,)
    with pytest.raises(gl.ShapeError, match=r"q takes \[\.\.\., 3\] but the input has shape \(\)"):
        layer.forward(g, g.constant(1.0))
    with g.scope("model"):
        inner = layer.forward(g, g.constant(np.ones((2, 3))))
        after = g.scale(inner, 1.0)
    assert inner.scope == "model/q" and after.scope == "model"
    assert g.scale(inner, 1.0).scope is None


def test_a_forward_that_raises_midway_leaves_the_scope_it_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0), name="q")
    update = layer.adapters["default"]
    seen: list[str | None] = []

    def refuse(graph: gl.Graph, *args: object) -> gl.NodeId:
        seen.append(graph.neg(graph.constant(1.0)).scope)
        raise RuntimeError("refused")

    monkeypatch.setattr(update, "record", refuse)
    x = g.constant(np.ones((1, 3)))
    with g.scope("model"):
        with pytest.raises(RuntimeError, match="refused"):
            layer.forward(g, x)
        assert g.neg(x).scope == "model"
    assert seen == ["model/q/lora"]
    assert g.neg(x).scope is None


def test_merging_an_overflowing_update_raises_without_a_runtime_warning() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 2, 2, gl.LoraConfig(rank=1, seed=0), name="q")
    g.set_value(layer.lora_a, [[1e200], [1e200]])
    g.set_value(layer.lora_b, [[1e200, 1e200]])
    before = np.array(g.value(layer.frozen_weight))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would fail here
        with pytest.raises(gl.NonFiniteError, match="merging q would give 4 non-finite weights"):
            layer.merge_(g)
    np.testing.assert_array_equal(g.value(layer.frozen_weight), before)
    assert not layer.merged


def test_the_lora_linear_op_applies_a_given_mask() -> None:
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(2, 3)), rng.normal(size=(3, 2))
    a, b = rng.normal(size=(3, 1)), rng.normal(size=(1, 2))
    mask = np.array([[2.0, 0.0, 2.0], [0.0, 2.0, 0.0]])
    out, _ = lora_linear(x, w, a, b, scaling=0.5, mask=mask)
    np.testing.assert_allclose(out, x @ w + (((x * mask) @ a) * 0.5) @ b, rtol=1e-15)


def test_repr_of_several_adapters_of_dora_of_none_active_and_of_an_embedding() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0))
    layer.add_adapter(g, "other", gl.LoraConfig(rank=2, seed=1, use_dora=True))
    assert repr(layer) == (
        "LoraLinear(name='lora', in_features=3, out_features=2, rank=1, scaling=8, dropout=0, "
        "adapters=['default', 'other'], active=['default'], bias=True, merged=False, "
        "trainable=5, frozen=8)"
    )  # trainable = 1 * (3 + 2); the other adapter is frozen while inactive: not counted
    layer.set_adapter(g, "other")
    assert "rank=2, scaling=4, dropout=0, dora=True, adapters=['default', 'other'], " in repr(layer)
    alone = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0))
    alone.set_adapter(g, [])
    assert "out_features=2, active=None, adapters=['default'], active=[], bias" in repr(alone)
    table = gl.LoraEmbedding.from_embedding(
        g, np.ones((5, 3)), gl.LoraConfig(rank=2, alpha=2.0, seed=0)
    )
    assert repr(table) == (
        "LoraEmbedding(name='lora', num_embeddings=5, embedding_dim=3, rank=2, scaling=1, "
        "merged=False, trainable=16, frozen=15)"
    )  # no dropout shown: an embedding update uses none; trainable = 2 * (5 + 3)
    with pytest.raises(TypeError) as info:
        layer.set_adapter(3, "default")  # type: ignore[arg-type]
    assert str(info.value) == "LoraLinear.set_adapter: graph must be a Graph, got int"
    with pytest.raises(TypeError) as info:
        layer.set_adapter(g, 3)  # type: ignore[arg-type]
    assert str(info.value).startswith("LoraLinear.set_adapter: adapter_names must be a name or ")


def test_state_dict_names_a_wrong_graph() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0))
    with pytest.raises(TypeError) as info:
        layer.state_dict(3)  # type: ignore[arg-type]
    assert str(info.value) == "LoraLinear.state_dict: graph must be a Graph, got int"


# --- refusals and choices of both LoRA layers, with their exact messages -----------------------


def _both_layers() -> list[tuple[gl.Graph, Any]]:
    g = gl.Graph()
    linear = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0))
    table = gl.LoraEmbedding.from_embedding(g, np.ones((5, 3)), gl.LoraConfig(rank=2, seed=0))
    return [(g, linear), (g, table)]


@pytest.mark.parametrize("which", [0, 1], ids=["LoraLinear", "LoraEmbedding"])
@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("add_adapter", lambda layer, graph: layer.add_adapter(graph, "x", gl.LoraConfig(rank=1))),
        ("set_adapter", lambda layer, graph: layer.set_adapter(graph, "default")),
        ("delete_adapter", lambda layer, graph: layer.delete_adapter(graph, "default")),
        ("delta", lambda layer, graph: layer.delta(graph)),
        ("merge", lambda layer, graph: layer.merge(graph)),
        ("merge_", lambda layer, graph: layer.merge_(graph)),
        ("unmerge_", lambda layer, graph: layer.unmerge_(graph)),
        ("state_dict", lambda layer, graph: layer.state_dict(graph)),
        ("load_state_dict", lambda layer, graph: layer.load_state_dict(graph, {})),
    ],
)
def test_every_layer_method_names_itself_when_given_no_graph(
    which: int, method: str, call: Callable[[Any, Any], object]
) -> None:
    g, layer = _both_layers()[which]
    before = layer.state_dict(g)
    with pytest.raises(TypeError) as info:
        call(layer, 3)
    assert str(info.value) == f"{type(layer).__name__}.{method}: graph must be a Graph, got int"
    after = layer.state_dict(g)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[key], after[key]) for key in before)


def test_add_adapter_refusals_say_what_is_wrong() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0))
    cases: list[Refusal] = [
        (
            ValueError,
            "LoraLinear.add_adapter: adapter_name 'a/b' must be letters, digits, '_' and '-' "
            "(no dots)",
            lambda: layer.add_adapter(g, "a/b", gl.LoraConfig(rank=1)),
        ),
        (
            TypeError,
            "LoraLinear.add_adapter: config must be a LoraConfig or a VeraConfig, got dict",
            lambda: layer.add_adapter(g, "x", {}),  # type: ignore[arg-type]
        ),
        (
            ValueError,
            "LoraLinear.add_adapter: rank 3 exceeds min(in_features, out_features) = 2 for "
            "weight (3, 2); init='pissa' takes that many singular vectors of the weight",
            lambda: layer.add_adapter(g, "x", gl.LoraConfig(rank=3, init="pissa")),
        ),
        (
            ValueError,
            "LoraLinear.add_adapter: init='pissa' replaces the base weight by a residual, which "
            "every adapter of lora shares; use it for a layer's first adapter only "
            "(LoraLinear.from_linear, or apply_lora on a plain Linear)",
            lambda: layer.add_adapter(g, "x", gl.LoraConfig(rank=1, init="pissa")),
        ),
        (
            ValueError,
            "LoraLinear.set_adapter: adapter names repeat: ['default', 'default']",
            lambda: layer.set_adapter(g, ["default", "default"]),
        ),
        (
            ValueError,
            "LoraLinear.delta: lora has no adapter 'nope'; it holds ['default']",
            lambda: layer.delta(g, "nope"),
        ),
    ]
    before = len(g.leaves)
    assert_refusals(cases)
    assert list(layer.adapters) == ["default"]
    assert len(g.leaves) == before  # a refused call makes no leaf


def test_an_adapters_draws_come_from_rng_else_from_its_config_seed() -> None:
    def a_of(rng: Any = None, seed: int = 0) -> np.ndarray:
        g = gl.Graph()
        layer = gl.LoraLinear.new(g, 6, 4, gl.LoraConfig(rank=2, seed=0))
        update = layer.add_adapter(g, "x", gl.LoraConfig(rank=2, seed=seed), rng=rng)
        return np.array(g.value(update.lora_a))

    np.testing.assert_array_equal(a_of(seed=3), a_of(rng=np.random.default_rng(3)))
    assert not np.array_equal(a_of(seed=3), a_of(seed=4))
    assert not np.array_equal(a_of(seed=3, rng=np.random.default_rng(4)), a_of(seed=3))


def test_after_deleting_every_adapter_the_next_one_added_is_active() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0))
    second = layer.add_adapter(g, "second", gl.LoraConfig(rank=1, seed=1))
    assert layer.active_adapters == ["default"]  # a later adapter starts inactive
    assert not second.lora_a.requires_grad
    layer.delete_adapter(g, "default")
    layer.delete_adapter(g, "second")
    assert layer.active_adapters == []
    third = layer.add_adapter(g, "third", gl.LoraConfig(rank=1, seed=2))
    assert layer.active_adapters == ["third"]  # the layer's only adapter runs
    assert layer.trainable_params() == [third.lora_a, third.lora_b]


def test_base_leaves_are_named_as_in_the_base_layer() -> None:
    (g, linear), (_, table) = _both_layers()
    assert linear.base_leaves() == [("weight", linear.frozen_weight), ("bias", linear.bias)]
    assert table.base_leaves() == [("weight", table.frozen_weight)]
    plain = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0), bias=False)
    assert plain.base_leaves() == [("weight", plain.frozen_weight)]


def test_from_embedding_refusals_and_defaults() -> None:
    g = gl.Graph()
    config = gl.LoraConfig(rank=2, seed=0)
    where = "LoraEmbedding.from_embedding"
    cases: list[Refusal] = [
        (
            gl.ShapeError,
            f"{where}: weight must be a non-empty [V, D] table, got (3,)",
            lambda: gl.LoraEmbedding.from_embedding(g, np.ones(3), config),
        ),
        (
            gl.ShapeError,
            f"{where}: weight must be a non-empty [V, D] table, got (0, 3)",
            lambda: gl.LoraEmbedding.from_embedding(g, np.ones((0, 3)), config),
        ),
        (
            TypeError,
            f"{where}: config must be a LoraConfig or a VeraConfig, got dict",
            lambda: gl.LoraEmbedding.from_embedding(g, np.ones((5, 3)), {}),  # type: ignore[arg-type]
        ),
        (
            ValueError,
            f"{where}: rank 4 exceeds min(num_embeddings, embedding_dim) = 3 for weight (5, 3); "
            "init='pissa' takes that many singular vectors of the weight",
            lambda: gl.LoraEmbedding.from_embedding(
                g, np.ones((5, 3)), gl.LoraConfig(rank=4, init="pissa")
            ),
        ),
        (
            ValueError,
            f"{where}: name must be a non-empty str without '/', got 'a/b'",
            lambda: gl.LoraEmbedding.from_embedding(g, np.ones((5, 3)), config, name="a/b"),
        ),
        (
            ValueError,
            f"{where}: adapter_name '' must be letters, digits, '_' and '-' (no dots)",
            lambda: gl.LoraEmbedding.from_embedding(g, np.ones((5, 3)), config, adapter_name=""),
        ),
        (
            TypeError,
            f"{where}: weight must hold floating-point data, got dtype <U1",
            lambda: gl.LoraEmbedding.from_embedding(g, np.full((5, 3), "a"), config),
        ),
    ]
    before = len(g.leaves)
    assert_refusals(cases)
    assert len(g.leaves) == before  # nothing was made
    big = gl.LoraEmbedding.from_embedding(g, np.ones((10, 9)), name="tok")  # default config
    assert big.adapters["default"].rank == gl.LoraConfig().rank
    assert big.active_adapters == ["default"]
    assert big.frozen_weight.name == "tok.weight"
    assert big.frozen_weight.scope == "tok/frozen"
    assert not big.frozen_weight.requires_grad


def test_from_embedding_uses_a_given_table_node_frozen_and_draws_b_from_rng() -> None:
    g = gl.Graph()
    table = g.parameter(np.arange(15.0).reshape(5, 3))
    config = gl.LoraConfig(rank=2, seed=0)
    layer = gl.LoraEmbedding.from_embedding(g, table, config, rng=np.random.default_rng(9))
    assert layer.frozen_weight is table
    assert not table.requires_grad
    again = gl.LoraEmbedding.from_embedding(g, table, config, rng=np.random.default_rng(9))
    seeded = gl.LoraEmbedding.from_embedding(g, table, gl.LoraConfig(rank=2, seed=9))
    b = g.value(layer.adapters["default"].lora_b)
    np.testing.assert_array_equal(b, g.value(again.adapters["default"].lora_b))
    np.testing.assert_array_equal(b, g.value(seeded.adapters["default"].lora_b))
    assert not np.array_equal(
        b,
        g.value(gl.LoraEmbedding.from_embedding(g, table, config).adapters["default"].lora_b),
    )
    ids = np.array([[0, 4]])
    with g.scope("outer"):
        y = layer.forward(g, ids.tolist())  # ids as a list work as an array does
    assert y.scope == "outer/lora"
    scopes = {node.scope for node in g.tape}
    assert {"outer/lora/frozen", "outer/lora/lora"} <= scopes


def test_a_linear_layer_draws_its_frozen_and_low_rank_paths_apart() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 4, 3, gl.LoraConfig(rank=2, seed=0), name="proj")
    x = g.constant(np.ones((2, 4)))
    with g.scope("block"):
        y = layer.forward(g, x)
    assert y.scope == "block/proj"  # the sum of the two paths
    ops = {(node.op, node.scope) for node in g.tape}
    assert ops == {
        ("matmul", "block/proj/frozen"),  # x @ W
        ("add", "block/proj/frozen"),  # + bias
        ("matmul", "block/proj/lora"),  # x @ A, then (..) @ B
        ("scale", "block/proj/lora"),
        ("add", "block/proj"),
    }
    layer.merge_(g)
    g.reset()
    assert layer.forward(g, x).scope == "proj/merged"  # merged: one path, named so


def test_lora_linear_defaults_to_scaling_1_and_reads_a_mask_in_the_graph_dtype() -> None:
    g = gl.Graph(np.float32)
    rng = np.random.default_rng(0)
    x, w, a, b = (g.constant(rng.normal(size=shape)) for shape in ((2, 4), (4, 3), (4, 2), (2, 3)))
    plain = g.apply(lora_linear, x, w, a, b)
    np.testing.assert_array_equal(
        g.value(plain), g.value(g.apply(lora_linear, x, w, a, b, scaling=1.0))
    )
    mask = np.array([[1.0, 0.0, 2.0, 0.0], [0.0, 2.0, 0.0, 1.0]])  # float64, as dropout gives
    masked = g.apply(lora_linear, x, w, a, b, mask=mask)
    assert g.value(masked).dtype == np.float32
    xv, wv, av, bv = (g.value(n) for n in (x, w, a, b))
    np.testing.assert_allclose(
        g.value(masked), xv @ wv + ((xv * mask.astype(np.float32)) @ av) @ bv, rtol=1e-6
    )


def test_forward_names_a_wrong_graph_and_a_wrong_input() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0))
    with pytest.raises(TypeError) as info:
        layer.forward(3, g.constant(np.ones(3)))  # type: ignore[arg-type]
    assert str(info.value) == "LoraLinear.forward: graph must be a Graph, got int"
    with pytest.raises(TypeError) as info:
        layer.forward(g, 3)  # type: ignore[arg-type]
    assert str(info.value) == "LoraLinear.forward: x must be a NodeId, got int: 3"


def test_from_linear_defaults_and_refusals_with_their_messages() -> None:
    g = gl.Graph()
    w = np.ones((3, 2))
    config = gl.LoraConfig(rank=1, seed=0)
    layer = gl.LoraLinear.from_linear(g, w, config=config)
    assert (layer.name, layer.fan_in_fan_out) == ("lora", False)
    assert layer.frozen_weight.name == "lora.weight"
    where = "LoraLinear.from_linear"
    cases: list[Refusal] = [
        (TypeError, f"{where}: graph must be a Graph, got int", lambda: layer.from_linear(3, w)),  # type: ignore[arg-type]
        (
            TypeError,
            f"{where}: bias must hold floating-point data, got dtype <U2",
            lambda: layer.from_linear(g, w, "ab", config=config),
        ),
        (
            TypeError,
            f"{where}: fan_in_fan_out must be a bool, got int",
            lambda: layer.from_linear(g, w, config=config, fan_in_fan_out=1),  # type: ignore[arg-type]
        ),
        (
            TypeError,
            f"{where}: name must be a str, got int",
            lambda: layer.from_linear(g, w, config=config, name=3),  # type: ignore[arg-type]
        ),
        (
            ValueError,
            f"{where}: name must be a non-empty str without '/', got 'a/b'",
            lambda: layer.from_linear(g, w, config=config, name="a/b"),
        ),
        (
            ValueError,
            f"{where}: name must be a non-empty str without '/', got ''",
            lambda: layer.from_linear(g, w, config=config, name=""),
        ),
        (
            TypeError,
            f"{where}: rng must be a np.random.Generator, an int seed or None, got str",
            lambda: layer.from_linear(g, w, config=config, rng="x"),  # type: ignore[arg-type]
        ),
    ]
    before = len(g.leaves)
    assert_refusals(cases)
    assert len(g.leaves) == before


def test_pissas_truncated_svd_gives_the_top_triplets_descending_and_reproducibly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from graphlora.lora import updates

    monkeypatch.setattr(updates, "_DENSE_SVD_LIMIT", 4)  # so that an 8 x 6 matrix takes svds
    w = np.random.default_rng(0).normal(size=(8, 6))
    u_all, s_all, vh_all = np.linalg.svd(w, full_matrices=False)
    for rank in range(1, 7):  # up to min(shape), where svds cannot go: the dense SVD does
        u, s, vh = updates._top_singular_triplets(w, rank)
        np.testing.assert_allclose(s, s_all[:rank], rtol=1e-10)  # the largest, descending
        signs = np.sign(np.sum(u * u_all[:, :rank], axis=0))
        np.testing.assert_allclose(u * signs, u_all[:, :rank], atol=1e-8)
        np.testing.assert_allclose(vh * signs[:, None], vh_all[:rank], atol=1e-8)
        again = updates._top_singular_triplets(w, rank)
        assert all(np.array_equal(x, y) for x, y in zip((u, s, vh), again, strict=True))


def test_merge_reports_inf_minus_inf_and_a_zero_dora_norm_as_one_error_and_no_warning() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.from_linear(g, np.ones((2, 2)), config=gl.LoraConfig(rank=1, alpha=1))
    weight = np.ones((2, 2))
    weight[0, 0] = np.inf
    g.set_value(layer.frozen_weight, weight)
    g.set_value(layer.lora_a, [[-1e308], [0.0]])  # A @ B overflows to -inf at [0, 0]
    g.set_value(layer.lora_b, [[1e308, 0.0]])
    dora = gl.LoraLinear.from_linear(
        g, np.array([[0.0, 1.0], [0.0, 1.0]]), config=gl.LoraConfig(rank=1, alpha=1, use_dora=True)
    )
    g.set_value(dora.adapters["default"].magnitude, [1.0, 1.0])  # column 0's norm is 0: 1 / 0
    for merging, count in ((layer, 1), (dora, 2)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # inf - inf and 1 / 0 give no RuntimeWarning
            with pytest.raises(gl.NonFiniteError) as info:
                merging.merge(g)
        assert str(info.value) == (
            f"LoraLinear.merge: merging lora would give {count} non-finite weights (NaN or Inf "
            "in the weight or the adapters); nothing was changed"
        )
    g.set_value(layer.frozen_weight, np.ones((2, 2)))
    g.set_value(layer.lora_a, [[1.0], [0.0]])
    g.set_value(layer.lora_b, [[2.0, 0.0]])
    layer.merge_(g)
    copy_of_merged = layer.merge(g)  # merged: a copy of the weight, which holds the update
    np.testing.assert_array_equal(copy_of_merged, [[3.0, 1.0], [1.0, 1.0]])
    copy_of_merged[0, 0] = 42.0
    assert g.value(layer.frozen_weight)[0, 0] == 3.0


def test_more_lora_refusals_with_their_messages() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0))
    table = np.ones((5, 3))
    config = gl.LoraConfig(rank=2)
    cases: list[Refusal] = [
        (
            TypeError,
            "LoraLinear.new: graph must be a Graph, got int",
            lambda: gl.LoraLinear.new(3, 3, 2, config),  # type: ignore[arg-type]
        ),
        (
            TypeError,
            "LoraLinear.new: config must be a LoraConfig or a VeraConfig, got dict",
            lambda: gl.LoraLinear.new(g, 3, 2, {}),  # type: ignore[arg-type]
        ),
        (
            TypeError,
            "LoraEmbedding.from_embedding: name must be a str, got int",
            lambda: gl.LoraEmbedding.from_embedding(g, table, config, name=3),  # type: ignore[arg-type]
        ),
        (
            TypeError,
            "LoraEmbedding.from_embedding: rng must be a np.random.Generator, an int seed or "
            "None, got str",
            lambda: gl.LoraEmbedding.from_embedding(g, table, config, rng="x"),  # type: ignore[arg-type]
        ),
        (
            ValueError,
            "LoraLinear.set_adapter: adapter_name 'a/b' must be letters, digits, '_' and '-' "
            "(no dots)",
            lambda: layer.set_adapter(g, ["a/b"]),
        ),
        (
            TypeError,
            "LoraLinear.set_adapter: adapter_names must be a name or a list of names, got int: 3",
            lambda: layer.set_adapter(g, 3),  # type: ignore[arg-type]
        ),
        (
            ValueError,
            "LoraLinear.load_state_dict: lora has no adapter 'nope'; it holds ['default']",
            lambda: layer.load_state_dict(g, {}, "nope"),
        ),
    ]
    before = len(g.leaves)
    assert_refusals(cases)
    assert len(g.leaves) == before


def test_an_embeddings_later_adapter_starts_as_peft_does_and_is_named() -> None:
    g = gl.Graph()
    layer = gl.LoraEmbedding.from_embedding(g, np.ones((5, 3)), gl.LoraConfig(rank=2), name="tok")
    assert layer.name == "tok"
    update = layer.add_adapter(g, "x", gl.LoraConfig(rank=2, seed=1))
    assert not g.value(update.lora_a).any()  # an embedding's A starts at zero, its B drawn
    assert g.value(update.lora_b).any()
    assert (update.lora_a.name, update.lora_b.name) == ("tok.lora_A.x", "tok.lora_B.x")
    assert [name for name, _ in layer.named_leaves()] == [
        "weight",
        "lora_embedding_A.default",
        "lora_embedding_B.default",
        "lora_embedding_A.x",
        "lora_embedding_B.x",
    ]


def test_with_no_adapter_active_a_new_one_stays_inactive_and_merge_copies_the_weight() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0))
    layer.set_adapter(g, [])
    layer.add_adapter(g, "other", gl.LoraConfig(rank=1, seed=1))
    assert layer.active_adapters == []  # only a layer's very first adapter starts active
    merged = layer.merge(g)  # nothing running: a copy of W
    np.testing.assert_array_equal(merged, g.value(layer.frozen_weight))
    merged[0, 0] += 1.0
    assert g.value(layer.frozen_weight)[0, 0] != merged[0, 0]
    layer.set_adapter(g, "default")
    layer.merge_(g)
    layer.unmerge_(g)
    assert layer.merged_adapters == []


def test_load_state_dict_loads_the_named_adapter_not_the_active_one() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 3, 2, gl.LoraConfig(rank=1, seed=0))
    other = layer.add_adapter(g, "other", gl.LoraConfig(rank=1, seed=1))
    state = {"lora_a": np.full((3, 1), 7.0), "lora_b": np.full((1, 2), 5.0)}
    active_a = np.array(g.value(layer.lora_a))
    layer.load_state_dict(g, state, "other")
    np.testing.assert_array_equal(g.value(other.lora_a), state["lora_a"])
    np.testing.assert_array_equal(g.value(layer.lora_a), active_a)


def test_lora_linear_takes_an_int_scaling_as_its_float() -> None:
    rng = np.random.default_rng(4)
    x, w, a, b = (rng.normal(size=s) for s in [(2, 3, 4), (4, 5), (4, 2), (2, 5)])
    by_int, _ = lora_linear(x, w, a, b, scaling=2)
    by_float, _ = lora_linear(x, w, a, b, scaling=2.0)
    np.testing.assert_array_equal(by_int, by_float)
    np.testing.assert_allclose(by_float, x @ w + 2.0 * (x @ a) @ b, rtol=1e-12)


def test_lora_linear_with_dropout_keeps_a_float32_graph_float32() -> None:
    g = gl.Graph(np.float32)
    rng = np.random.default_rng(5)
    x = g.constant(rng.normal(size=(3, 4)))
    w = g.constant(rng.normal(size=(4, 5)))
    a, b = g.parameter(rng.normal(size=(4, 2))), g.parameter(rng.normal(size=(2, 5)))
    out = g.apply(lora_linear, x, w, a, b, scaling=0.5, dropout=0.25, rng=3)
    g.backward(g.sum(out))
    assert g.value(out).dtype == np.float32
    assert g.grad(a).dtype == np.float32 and g.grad(b).dtype == np.float32


@pytest.mark.crosscheck
@pytest.mark.parametrize(
    ("init", "peft_init"), [("kaiming", True), ("gaussian", "gaussian"), ("random", False)]
)
def test_inits_draw_from_peft_s_distributions(init: str, peft_init: object) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    n_in, n_out, rank = 400, 300, 16
    torch.manual_seed(0)
    model = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(n_in, n_out)),
        peft.LoraConfig(r=rank, target_modules=["0"], init_lora_weights=peft_init),
    )
    assert peft.LoraConfig().init_lora_weights is True  # PEFT's default: graphlora's "kaiming"
    assert (peft.LoraConfig().r, peft.LoraConfig().lora_alpha) == (8, 8)
    layer = model.base_model.model[0]
    theirs_a = layer.lora_A["default"].weight.detach().numpy().T  # [in, r]
    theirs_b = layer.lora_B["default"].weight.detach().numpy().T  # [r, out]
    g = gl.Graph()
    ours = gl.LoraLinear.new(g, n_in, n_out, gl.LoraConfig(rank=rank, init=init, seed=0))
    for mine, theirs in ((g.value(ours.lora_a), theirs_a), (g.value(ours.lora_b), theirs_b)):
        assert mine.shape == theirs.shape
        if not theirs.any():
            assert not mine.any()
            continue
        # same distribution: spread within 5% and the same bound (uniform) or none (normal)
        assert abs(mine.std() / theirs.std() - 1) < 0.05
        assert abs(np.abs(mine).max() / np.abs(theirs).max() - 1) < 0.05 or init == "gaussian"
