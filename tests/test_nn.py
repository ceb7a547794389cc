"""graphlora.nn: Linear, MLP, apply_lora and the trainable-parameter report."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import graphlora as gl
from graphlora.nn import trainable_parameters
from graphlora.testing import gradcheck


def test_linear_forward_and_gradients() -> None:
    g = gl.Graph()
    layer = gl.Linear.new(g, 3, 2, rng=0, name="fc")
    x = g.constant(np.arange(6.0).reshape(2, 3))
    y = layer.forward(g, x)
    np.testing.assert_allclose(g.value(y), g.value(x) @ g.value(layer.weight) + g.value(layer.bias))  # type: ignore[arg-type]
    g.backward(g.sum(y))
    np.testing.assert_allclose(
        g.grad(layer.weight), g.value(x).sum(axis=0)[:, None] * np.ones((3, 2))
    )
    assert layer.weight.name == "fc.weight"
    assert np.abs(g.value(layer.weight)).max() <= 1 / np.sqrt(3)
    with pytest.raises(
        gl.ShapeError,
        match=r"Linear.forward: fc takes \[\.\.\., 3\] but the input has shape \(2, 4\)",
    ):
        layer.forward(g, g.constant(np.ones((2, 4))))
    with pytest.raises(ValueError, match=r"Linear\.new: out_features must be >= 1, got 0"):
        gl.Linear.new(g, 3, 0)


@given(sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4), seed=st.integers(0, 99))
def test_mlp_structure_and_gradcheck(sizes: list[int], seed: int) -> None:
    g = gl.Graph()
    model = gl.MLP(g, sizes, activation="tanh", rng=seed)
    assert list(model.named_layers()) == [f"layers.{i}" for i in range(len(sizes) - 1)]
    assert len(model.parameters()) == 2 * (len(sizes) - 1)
    params = [np.array(g.value(p)) for p in model.parameters()]
    x = np.random.default_rng(seed).normal(size=(2, sizes[0]))

    def fn(graph: gl.Graph, *nodes: gl.NodeId) -> gl.NodeId:
        other = gl.MLP(graph, sizes, activation="tanh", rng=seed)
        for layer, (w, b) in zip(
            other.layers, zip(nodes[::2], nodes[1::2], strict=True), strict=True
        ):
            assert isinstance(layer, gl.Linear)
            layer.weight, layer.bias = w, b
        return graph.sum(other.forward(graph, graph.constant(x)))

    assert gradcheck(fn, *params)


def test_mlp_validation() -> None:
    g = gl.Graph()
    with pytest.raises(
        ValueError, match=r"MLP: sizes needs at least two widths \(in, out\), got \[4\]"
    ):
        gl.MLP(g, [4])
    with pytest.raises(
        ValueError,
        match=r"MLP: activation must be one of \['gelu', 'relu', 'sigmoid', 'tanh'\], got 'swish'",
    ):
        gl.MLP(g, [4, 2], activation="swish")


def test_apply_lora_leaves_only_lora_parameters_trainable() -> None:
    g = gl.Graph()
    model = gl.MLP(g, [8, 16, 4], rng=0)
    x = g.constant(np.random.default_rng(1).normal(size=(5, 8)))
    before = np.array(g.value(model.forward(g, x)))
    assert (
        trainable_parameters(model)
        == "trainable params: 212 || all params: 212 || trainable%: 100.0000"
    )
    adapters = gl.apply_lora(model, gl.LoraConfig(rank=2, seed=0))
    assert list(adapters) == ["layers.0", "layers.1"]
    assert all(model.named_layers()[name] is layer for name, layer in adapters.items())
    expected_trainable = 2 * (8 + 16) + 2 * (16 + 4)
    assert sum(p.shape[0] * p.shape[1] for p in model.parameters()) == expected_trainable
    assert set(model.parameters()) == {
        n for lora in adapters.values() for n in lora.trainable_params()
    }
    assert (
        trainable_parameters(model)
        == f"trainable params: {expected_trainable} || all params: {212 + expected_trainable} || trainable%: {100 * 88 / 300:.4f}"
    )
    g.reset()
    after = model.forward(g, x)
    np.testing.assert_allclose(g.value(after), before, rtol=1e-12)  # B = 0: same function
    g.backward(g.sum(g.mul(after, after)))
    grads = {node for node in g.leaves if g.grad(node) is not None}
    assert grads == set(model.parameters())


def test_apply_lora_to_chosen_targets_freezes_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    g = gl.Graph()
    model = gl.MLP(g, [6, 6, 6, 3], rng=0)
    adapters = gl.apply_lora(model, gl.LoraConfig(rank=2, seed=0), target_modules=["layers.1"])
    assert list(adapters) == ["layers.1"]
    assert isinstance(model.layers[0], gl.Linear)
    assert not model.layers[0].weight.requires_grad
    assert model.parameters() == adapters["layers.1"].trainable_params()
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: 24 || all params: ")
    assert "(layers.1): LoraLinear(name='layers.1'" in repr(model)


def test_apply_lora_validation_changes_nothing() -> None:
    g = gl.Graph()
    model = gl.MLP(g, [6, 2, 6], rng=0)
    cases = [
        (
            ["layers.9"],
            ValueError,
            r"apply_lora: unknown target\(s\) \['layers.9'\]; the model has the Linear layers \['layers.0', 'layers.1'\]",
        ),
        (3, TypeError, r"apply_lora: target_modules must be a list of layer names or one regular"),
        ("layers\\.[2-9]", ValueError, r"apply_lora: unknown target\(s\) \['layers\\\\.\[2-9\]'\]"),
        (
            None,
            ValueError,
            r"apply_lora: rank 3 exceeds min\(in, out\) of layer\(s\) \['layers.0', 'layers.1'\]",
        ),
    ]
    for targets, error, match in cases:
        with pytest.raises(error, match=match):
            gl.apply_lora(model, gl.LoraConfig(rank=3, init="pissa"), target_modules=targets)
        assert len(model.parameters()) == 4
        assert len(g) == 4
    gl.apply_lora(model, gl.LoraConfig(rank=1), target_modules=["layers.0"])
    with pytest.raises(
        ValueError, match=r"apply_lora: \['layers.0'\] already carry a LoRA adapter"
    ):
        gl.apply_lora(model, gl.LoraConfig(rank=1), target_modules=["layers.0"])


def test_model_load_state_dict_checks_names_and_merges_before_changing_anything() -> None:
    g = gl.Graph()
    model = gl.MLP(g, [3, 4, 2], rng=0)
    gl.apply_lora(model, gl.LoraConfig(rank=2, seed=1), ["layers.0"])
    before = gl.nn.state_dict(g, model)
    assert sorted(before) == [
        "layers.0.bias",
        "layers.0.lora_A.default",
        "layers.0.lora_B.default",
        "layers.0.weight",
        "layers.1.bias",
        "layers.1.weight",
    ]
    new = {name: value + 1.0 for name, value in before.items()}

    def unchanged() -> None:
        for name, value in gl.nn.state_dict(g, model).items():
            np.testing.assert_array_equal(value, before[name])

    with pytest.raises(
        ValueError,
        match=r"^load_state_dict: names differ; missing \['layers.1.bias'\], unexpected \['x'\]$",
    ):
        gl.nn.load_state_dict(
            g, model, {**{k: v for k, v in new.items() if k != "layers.1.bias"}, "x": 1}
        )
    unchanged()
    with pytest.raises(
        gl.ShapeError, match=r"^load_state_dict: layers.1.weight has shape \(2, 4\)"
    ):
        gl.nn.load_state_dict(g, model, {**new, "layers.1.weight": np.ones((2, 4))})
    unchanged()
    with pytest.raises(ValueError, match=r"^load_state_dict: layers.1.bias holds NaN or Inf$"):
        gl.nn.load_state_dict(g, model, {**new, "layers.1.bias": np.full(2, np.nan)})
    unchanged()
    with pytest.raises(
        TypeError, match=r"^load_state_dict: state must be a mapping of names to arrays$"
    ):
        gl.nn.load_state_dict(g, model, [("x", 1)])  # type: ignore[arg-type]
    layer = model.layers[0]
    layer.merge_(g)
    with pytest.raises(
        gl.GraphError,
        match=r"^load_state_dict: layers.0.weight belongs to a merged LoRA layer; unmerge_ it first$",
    ):
        gl.nn.load_state_dict(g, model, new)
    layer.unmerge_(g)
    result = gl.nn.load_state_dict(
        g, model, {"layers.1.bias": new["layers.1.bias"], "y": 0}, strict=False
    )
    assert result.unexpected_keys == ["y"]
    assert result.missing_keys == sorted(set(before) - {"layers.1.bias"})
    np.testing.assert_array_equal(g.value(model.layers[1].bias), before["layers.1.bias"] + 1)
    np.testing.assert_allclose(g.value(layer.frozen_weight), before["layers.0.weight"])
    gl.nn.load_state_dict(g, model, new)
    for name, value in gl.nn.state_dict(g, model).items():
        np.testing.assert_array_equal(value, new[name])
