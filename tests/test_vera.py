"""VeRA, the variant that proves the seam: its config, its layer (forward and gradients by hand,
by finite differences and against PEFT), merging, files both ways with PEFT, and refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

import graphlora as gl
from graphlora.lora import VeraProjection, VeraUpdate
from graphlora.testing import gradcheck


class Two:
    """Two linear layers, 6 -> 5 -> 7, as a plain model."""

    def __init__(self, g: gl.Graph, seed: int = 0) -> None:
        self.fc1 = gl.Linear.new(g, 6, 5, rng=seed, name="fc1")
        self.fc2 = gl.Linear.new(g, 5, 7, rng=seed + 1, name="fc2")

    def forward(self, g: gl.Graph, x: gl.NodeId) -> gl.NodeId:
        return self.fc2.forward(g, self.fc1.forward(g, x))


def _vera(rank: int = 4, seed: int = 0, **config: Any) -> tuple[gl.Graph, Two, dict[str, Any]]:
    g = gl.Graph()
    model = Two(g, seed)
    layers = gl.apply_lora(model, gl.VeraConfig(rank=rank, **config), ["fc1", "fc2"])
    return g, model, layers


def _trained(g: gl.Graph, layers: dict[str, Any], seed: int = 1) -> None:
    """Move every lambda away from its init, so that both vectors count."""
    rng = np.random.default_rng(seed)
    for layer in layers.values():
        update = layer.update
        g.set_value(update.lambda_d, rng.normal(size=update.lambda_d.shape))
        g.set_value(update.lambda_b, rng.normal(size=update.lambda_b.shape))


def _by_hand(x: np.ndarray, w: np.ndarray, bias: np.ndarray, a: np.ndarray, b: np.ndarray,
             d: np.ndarray, lb: np.ndarray) -> np.ndarray:  # fmt: skip
    """``x W + bias + lambda_b * ((lambda_d * (x A)) B)``, A and B already cut to the layer."""
    return x @ w + bias + lb * ((d * (x @ a)) @ b)


# --- the config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"rank": 0}, ValueError, "VeraConfig: rank must be >= 1, got 0"),
        ({"rank": 2.0}, TypeError, "VeraConfig: rank must be an int, got 2.0"),
        ({"d_initial": math.inf}, ValueError, "VeraConfig: d_initial must be finite, got inf"),
        ({"d_initial": "1"}, TypeError, "VeraConfig: d_initial must be a real scalar"),
        ({"projection_prng_key": -1}, ValueError, "projection_prng_key must be >= 0, got -1"),
        ({"projection_prng_key": True}, TypeError, "projection_prng_key must be an int"),
        ({"save_projection": 1}, TypeError, "VeraConfig: save_projection must be a bool"),
        ({"dropout": 1.0}, ValueError, r"VeraConfig: dropout must be in \[0, 1\), got 1.0"),
        ({"seed": "x"}, TypeError, "VeraConfig: seed must be an int or None, got 'x'"),
    ],
)
def test_vera_config_refuses_bad_fields_by_name(
    fields: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        gl.VeraConfig(**fields)


def test_vera_config_defaults_are_peft_s() -> None:
    config = gl.VeraConfig()
    assert (config.rank, config.d_initial, config.projection_prng_key) == (256, 0.1, 0)
    assert config.save_projection is True and config.dropout == 0.0


# --- the layer ------------------------------------------------------------------------------


def test_a_vera_layer_trains_two_vectors_over_one_shared_projection() -> None:
    g, model, layers = _vera(rank=3)
    fc1, fc2 = layers["fc1"], layers["fc2"]
    u1, u2 = fc1.update, fc2.update
    assert u1.projection is u2.projection  # one pair for every layer of the apply_lora call
    assert u1.projection.vera_a.shape == (6, 3)  # [in_max, rank]: fc1's 6 inputs
    assert u1.projection.vera_b.shape == (3, 7)  # [rank, out_max]: fc2's 7 outputs
    assert not u1.projection.vera_a.requires_grad and not u1.projection.vera_b.requires_grad
    assert fc1.trainable_params() == [u1.lambda_d, u1.lambda_b]
    assert fc1.num_trainable == 3 + 5 and fc2.num_trainable == 3 + 7
    np.testing.assert_array_equal(g.value(u1.lambda_d), np.full(3, 0.1))
    np.testing.assert_array_equal(g.value(u2.lambda_b), np.zeros(7))
    trained = {leaf for leaf in gl.nn.parameters(model) if leaf.requires_grad}
    assert trained == {u1.lambda_d, u1.lambda_b, u2.lambda_d, u2.lambda_b}
    assert gl.nn.trainable_parameters(model).startswith("trainable params: 18 ||")
    assert "vera rank=3" in repr(fc1)


@pytest.mark.parametrize("field", ["lora_a", "lora_b", "scaling"])
def test_a_vera_layer_has_no_lora_a_lora_b_or_scaling(field: str) -> None:
    _, _, layers = _vera()
    with pytest.raises(AttributeError, match=f"a VeRA adapter has no {field}"):
        getattr(layers["fc1"], field)


def test_the_projections_are_drawn_as_peft_s_bounds_from_the_key() -> None:
    g, _, layers = _vera(rank=64, projection_prng_key=5)
    projection = layers["fc1"].update.projection
    a, b = np.asarray(g.value(projection.vera_a)), np.asarray(g.value(projection.vera_b))
    # Kaiming-uniform over PyTorch's fan-in: in_max for A [rank, in], rank for B [out, rank]
    assert np.abs(a).max() <= math.sqrt(6 / 6) and np.abs(a).max() > 0.9 * math.sqrt(6 / 6)
    assert np.abs(b).max() <= math.sqrt(6 / 64) and np.abs(b).max() > 0.9 * math.sqrt(6 / 64)
    g2, _, again = _vera(rank=64, projection_prng_key=5)
    np.testing.assert_array_equal(g2.value(again["fc1"].update.projection.vera_a), a)
    g3, _, other = _vera(rank=64, projection_prng_key=6)
    assert not np.array_equal(g3.value(other["fc1"].update.projection.vera_a), a)


def test_a_new_vera_model_equals_its_base_and_its_forward_is_the_formula() -> None:
    g, model, layers = _vera(rank=4)
    x = np.random.default_rng(3).normal(size=(2, 3, 6))
    fc1, fc2 = layers["fc1"], layers["fc2"]
    w1, bias1 = np.asarray(g.value(fc1.frozen_weight)), np.asarray(g.value(fc1.bias))
    w2, bias2 = np.asarray(g.value(fc2.frozen_weight)), np.asarray(g.value(fc2.bias))
    base = (x @ w1 + bias1) @ w2 + bias2
    np.testing.assert_array_equal(g.value(model.forward(g, g.constant(x))), base)
    _trained(g, layers)
    a = np.asarray(g.value(fc1.update.projection.vera_a))
    b = np.asarray(g.value(fc1.update.projection.vera_b))
    u1, u2 = fc1.update, fc2.update
    h = _by_hand(x, w1, bias1, a[:6], b[:, :5], g.value(u1.lambda_d), g.value(u1.lambda_b))
    out = _by_hand(h, w2, bias2, a[:5], b[:, :7], g.value(u2.lambda_d), g.value(u2.lambda_b))
    np.testing.assert_allclose(g.value(model.forward(g, g.constant(x))), out, rtol=1e-12)


@given(
    rank=st.integers(1, 5),
    batch=st.integers(1, 3),
    in_features=st.integers(1, 4),
    out_features=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_vera_gradients_match_finite_differences(
    rank: int, batch: int, in_features: int, out_features: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    # shared projections larger than the layer: it uses their top-left corner
    a = rng.normal(size=(in_features + 1, rank))
    b = rng.normal(size=(rank, out_features + 2))
    config = gl.VeraConfig(rank=rank)

    def fn(graph: gl.Graph, x: gl.NodeId, d: gl.NodeId, lb: gl.NodeId) -> gl.NodeId:
        projection = VeraProjection(graph.constant(a), graph.constant(b))
        update = VeraUpdate(
            d, lb, projection, config, np.random.default_rng(0), in_features, out_features
        )
        y = update.record(graph, x, None, x)
        return graph.sum(graph.pow(y, 3))

    x = rng.normal(size=(batch, in_features))
    d, lb = rng.normal(size=rank), rng.normal(size=out_features)
    assert gradcheck(fn, x, d, lb)
    g = gl.Graph()
    y = g.value(fn(g, g.constant(x), g.parameter(d), g.parameter(lb)))
    expected = np.sum((lb * ((d * (x @ a[:in_features])) @ b[:, :out_features])) ** 3)
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_vera_merge_computes_the_forward_and_unmerge_is_bit_exact() -> None:
    g, model, layers = _vera(rank=4)
    _trained(g, layers)
    x = g.constant(np.random.default_rng(4).normal(size=(3, 6)))
    before = np.array(g.value(model.forward(g, x)))
    layer = layers["fc1"]
    update = layer.update
    a = np.asarray(g.value(update.projection.vera_a))[:6]
    b = np.asarray(g.value(update.projection.vera_b))[:, :5]
    delta = (a * g.value(update.lambda_d)) @ b * g.value(update.lambda_b)
    np.testing.assert_allclose(layer.delta(g), delta, rtol=1e-13)
    weight = np.array(g.value(layer.frozen_weight))
    for each in layers.values():
        each.merge_(g)
    np.testing.assert_allclose(g.value(layer.frozen_weight), weight + delta, rtol=1e-13)
    np.testing.assert_allclose(g.value(model.forward(g, x)), before, rtol=1e-12)
    for each in layers.values():
        each.unmerge_(g)
    np.testing.assert_array_equal(g.value(layer.frozen_weight), weight)


def test_a_compiled_vera_step_trains_the_lambdas() -> None:
    g, model, layers = _vera(rank=3, dropout=0.25, seed=2)
    x = g.constant(np.random.default_rng(5).normal(size=(4, 6)))
    loss = g.mean(g.pow(model.forward(g, x), 2))
    step = g.compile(loss)
    params = [leaf for layer in layers.values() for leaf in layer.trainable_params()]
    optimizer = gl.optim.SGD(g, params, lr=0.1)
    first = float(step())
    for _ in range(20):
        optimizer.step()
        g.zero_grad()
        last = float(step())
    assert last < first
    assert np.any(g.value(layers["fc1"].update.lambda_b) != 0)


def test_vera_refusals_name_the_variant_and_change_nothing() -> None:
    g = gl.Graph()
    table = gl.Embedding.new(g, 7, 5, rng=0, name="emb")

    class WithEmbedding:
        def __init__(self) -> None:
            self.emb = table
            self.fc = gl.Linear.new(g, 5, 3, rng=1, name="fc")

        def forward(self, graph: gl.Graph, ids: Any) -> gl.NodeId:
            return self.fc.forward(graph, self.emb.forward(graph, ids))

    model = WithEmbedding()
    leaves = len(g.leaves)
    with pytest.raises(
        ValueError, match=r"the 'vera' variant supports linear layers, not embedding layers"
    ):
        gl.apply_lora(model, gl.VeraConfig(rank=2), ["emb", "fc"])
    assert len(g.leaves) == leaves and model.fc.__class__ is gl.Linear
    g2, m2, _ = _vera(rank=2)
    gl.apply_lora(m2, gl.LoraConfig(rank=2), ["fc1"], adapter_name="plain")
    with pytest.raises(ValueError, match=r"adapters \['default'\] use DoRA, VeRA or init='pissa'"):
        gl.add_weighted_adapter(g2, m2, ["default", "plain"], [1.0, 1.0], "sum")


def test_a_vera_rank_may_exceed_the_layer_s_width() -> None:
    _, _, layers = _vera(rank=16)  # as PEFT's default r=256 on small layers
    assert layers["fc1"].update.projection.vera_a.shape == (6, 16)
    assert layers["fc1"].rank == 16


# --- files ----------------------------------------------------------------------------------


def test_vera_files_round_trip_in_graphlora(tmp_path: Path) -> None:
    g, model, layers = _vera(rank=3, projection_prng_key=2)
    _trained(g, layers)
    gl.save_adapter(tmp_path / "v", g, model)
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["r"] == 3
    assert config["save_projection"] is True and config["projection_prng_key"] == 2
    assert config["target_modules"] == ["fc1", "fc2"] and config["fan_in_fan_out"] is False
    g2, model2, layers2 = _vera(rank=3, projection_prng_key=9, seed=4)
    gl.load_adapter(tmp_path / "v", g2, model2)
    for name in ("fc1", "fc2"):
        ours, theirs = layers[name].update, layers2[name].update
        for leaf, other in zip(ours.params(), theirs.params(), strict=True):
            np.testing.assert_array_equal(g.value(leaf), g2.value(other))
    projection, loaded = layers["fc1"].update.projection, layers2["fc1"].update.projection
    np.testing.assert_array_equal(g.value(projection.vera_a), g2.value(loaded.vera_a))
    np.testing.assert_array_equal(g.value(projection.vera_b), g2.value(loaded.vera_b))


def test_saving_vera_without_its_projections_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    g, model, _ = _vera(rank=2, save_projection=False)
    with pytest.raises(ValueError, match=r"^save_adapter: a VeRA adapter") as info:
        gl.save_adapter(tmp_path / "v", g, model)
    assert str(info.value) == (
        "save_adapter: a VeRA adapter with save_projection=False cannot be saved: PEFT would "
        "draw other vera_A and vera_B from projection_prng_key with PyTorch's generator; use "
        "VeraConfig(save_projection=True)"
    )
    assert not (tmp_path / "v").exists()


def test_loading_vera_refuses_mismatches_and_changes_nothing(tmp_path: Path) -> None:
    g, model, layers = _vera(rank=3)
    _trained(g, layers)
    gl.save_adapter(tmp_path / "v", g, model)
    g2, model2, layers2 = _vera(rank=2, seed=3)
    before = [np.array(g2.value(leaf)) for leaf in g2.leaves]
    with pytest.raises(ValueError, match="layer 'fc1': the file has r 3, the layer 2"):
        gl.load_adapter(tmp_path / "v", g2, model2)
    g3 = gl.Graph()
    plain = Two(g3)
    gl.apply_lora(plain, gl.LoraConfig(rank=2), ["fc1", "fc2"])
    with pytest.raises(ValueError, match="is not a LoRA adapter config"):
        gl.load_adapter(tmp_path / "v", g3, plain)
    weights = tmp_path / "v" / "adapter_model.safetensors"
    st_numpy = pytest.importorskip("safetensors.numpy")
    tensors = st_numpy.load_file(str(weights))
    del tensors["base_model.vera_B"]
    st_numpy.save_file(tensors, str(weights))
    g4, model4, _ = _vera(rank=3, seed=5)
    with pytest.raises(ValueError, match="saved with save_projection=False"):
        gl.load_adapter(tmp_path / "v", g4, model4)
    for leaf, value in zip(g2.leaves, before, strict=True):
        np.testing.assert_array_equal(g2.value(leaf), value)
    assert layers2["fc1"].update.rank == 2


# --- against PEFT ---------------------------------------------------------------------------


def _torch_two(torch: Any, g: gl.Graph, model: Two) -> Any:
    """The same two layers in PyTorch (float64), weights transposed to ``[out, in]``."""

    class TorchTwo(torch.nn.Module):  # type: ignore[misc,name-defined]
        def forward(self, x: Any) -> Any:
            return self.fc2(self.fc1(x))

    root = TorchTwo()
    for name in ("fc1", "fc2"):
        layer = getattr(model, name)
        weight = np.asarray(g.value(layer.weight))
        linear = torch.nn.Linear(*weight.shape).double()
        with torch.no_grad():
            linear.weight.copy_(torch.tensor(weight.T))
            linear.bias.copy_(torch.tensor(np.asarray(g.value(layer.bias))))
        root.add_module(name, linear)
    return root


@pytest.mark.crosscheck
def test_vera_forward_gradients_and_files_equal_peft_s(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    g = gl.Graph()
    model = Two(g, seed=0)
    root = _torch_two(torch, g, model)
    layers = gl.apply_lora(model, gl.VeraConfig(rank=4, projection_prng_key=1), ["fc1", "fc2"])
    _trained(g, layers)
    gl.save_adapter(tmp_path / "ours", g, model)
    theirs = peft.PeftModel.from_pretrained(root, tmp_path / "ours", is_trainable=True).double()
    x = np.random.default_rng(6).normal(size=(2, 3, 6))
    xt = torch.tensor(x, requires_grad=True)
    out = theirs(xt)
    (out**3).sum().backward()
    xn = g.parameter(x)
    y = model.forward(g, xn)
    g.backward(g.sum(g.pow(y, 3)))
    np.testing.assert_allclose(g.value(y), out.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.grad(xn), xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    for name in ("fc1", "fc2"):
        module = getattr(theirs.base_model.model, name)
        update = layers[name].update
        for ours, key in ((update.lambda_d, "vera_lambda_d"), (update.lambda_b, "vera_lambda_b")):
            peft_grad = getattr(module, key)["default"].grad.numpy()
            np.testing.assert_allclose(g.grad(ours), peft_grad, rtol=1e-10, atol=1e-10)
    # merging: PEFT's merged weight is ours, transposed
    merged = layers["fc1"].merge(g)
    theirs.merge_adapter()
    fc1 = theirs.base_model.model.fc1.base_layer
    np.testing.assert_allclose(merged, fc1.weight.detach().numpy().T, rtol=1e-12)


@pytest.mark.crosscheck
def test_graphlora_loads_a_vera_adapter_peft_saved(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    g = gl.Graph()
    model = Two(g, seed=2)
    root = _torch_two(torch, g, model)
    config = peft.VeraConfig(r=3, target_modules=["fc1", "fc2"], projection_prng_key=4)
    theirs = peft.get_peft_model(root, config).double()
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            module = getattr(theirs.base_model.model, name)
            module.vera_lambda_b["default"].normal_()
            module.vera_lambda_d["default"].normal_()
    theirs.save_pretrained(tmp_path / "peft")
    gl.apply_lora(model, gl.VeraConfig(rank=3, projection_prng_key=4), ["fc1", "fc2"])
    gl.load_adapter(tmp_path / "peft", g, model)
    x = np.random.default_rng(7).normal(size=(4, 6))
    with torch.no_grad():
        expected = theirs(torch.tensor(x)).numpy()
    np.testing.assert_allclose(
        g.value(model.forward(g, g.constant(x))), expected, rtol=1e-6, atol=1e-7
    )  # PEFT saved its float32 projections: equal to float32's rounding


@pytest.mark.crosscheck
def test_a_peft_vera_file_without_projections_is_refused_with_the_way_out(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    g = gl.Graph()
    model = Two(g, seed=3)
    root = _torch_two(torch, g, model)
    config = peft.VeraConfig(r=2, target_modules=["fc1", "fc2"], save_projection=False)
    peft.get_peft_model(root, config).save_pretrained(tmp_path / "peft")
    gl.apply_lora(model, gl.VeraConfig(rank=2), ["fc1", "fc2"])
    before = [np.array(g.value(leaf)) for leaf in g.leaves]
    with pytest.raises(ValueError, match="save the adapter with save_projection=True"):
        gl.load_adapter(tmp_path / "peft", g, model)
    for leaf, value in zip(g.leaves, before, strict=True):
        np.testing.assert_array_equal(g.value(leaf), value)


# --- what mutation testing asked for: names, scopes, the config file, the chooser ------------


def test_vera_leaves_are_named_and_scoped_for_drawings_and_state() -> None:
    g, _, layers = _vera(rank=3)
    update = layers["fc1"].update
    assert update.projection.vera_a.name == "vera_A" and update.projection.vera_b.name == "vera_B"
    assert update.projection.vera_a.scope == "vera" and update.projection.vera_b.scope == "vera"
    assert (
        update.lambda_d.name == "fc1.vera_lambda_d" and update.lambda_b.name == "fc1.vera_lambda_b"
    )
    assert update.lambda_d.scope == "fc1/lora" and update.lambda_b.scope == "fc1/lora"
    gl.apply_lora(_vera(rank=2)[1], gl.VeraConfig(rank=2), ["fc1"], adapter_name="second")
    state = layers["fc1"].state_dict(g)
    assert sorted(state) == ["lambda_b", "lambda_d"]
    np.testing.assert_array_equal(state["lambda_d"], np.full(3, 0.1))
    layers["fc1"].load_state_dict(g, {"lambda_d": np.ones(3), "lambda_b": np.full(5, 2.0)})
    np.testing.assert_array_equal(g.value(update.lambda_b), np.full(5, 2.0))
    assert [name for name, _ in layers["fc1"].named_leaves()] == [
        "weight",
        "bias",
        "vera_lambda_d.default",
        "vera_lambda_b.default",
    ]


def test_the_projections_take_both_signs_up_to_their_bounds() -> None:
    g, _, layers = _vera(rank=64, projection_prng_key=5)
    projection = layers["fc1"].update.projection
    a, b = np.asarray(g.value(projection.vera_a)), np.asarray(g.value(projection.vera_b))
    for matrix, bound in ((a, math.sqrt(6 / 6)), (b, math.sqrt(6 / 64))):
        assert matrix.min() < -0.9 * bound and matrix.max() > 0.9 * bound
        assert np.abs(matrix).max() <= bound


def test_a_lone_vera_layer_makes_a_projection_of_its_own_size() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.from_linear(g, np.ones((24, 3)), None, gl.VeraConfig(rank=200))
    projection = layer.update.projection
    assert projection.vera_a.shape == (24, 200) and projection.vera_b.shape == (200, 3)
    a = np.asarray(g.value(projection.vera_a))
    bound = math.sqrt(6 / 24)  # 0.5: A's values lie within it, on both sides
    assert a.min() < -0.9 * bound and 0.9 * bound < a.max() <= bound


def test_vera_dropout_drops_the_input_with_the_layer_s_generator() -> None:
    x = np.random.default_rng(8).normal(size=(16, 6))

    def output(seed: int, dropout: float) -> np.ndarray:
        g = gl.Graph()
        config = gl.VeraConfig(rank=3, dropout=dropout, seed=seed)
        layers = gl.apply_lora(Two(g), config, ["fc1", "fc2"])
        _trained(g, layers)
        return np.array(g.value(layers["fc1"].forward(g, g.constant(x))))

    assert np.array_equal(output(4, 0.5), output(4, 0.5))  # the seed decides the masks
    assert not np.allclose(output(4, 0.5), output(4, 0.0))  # and there are masks


def test_vera_refuses_what_it_has_not_with_its_message() -> None:
    _, _, layers = _vera()
    with pytest.raises(AttributeError) as info:
        _ = layers["fc1"].lora_b
    assert str(info.value) == (
        "a VeRA adapter has no lora_b: its A and B are the frozen shared vera_A and vera_B "
        "(projection), and it trains lambda_d and lambda_b"
    )


def test_the_vera_config_file_is_peft_s_field_for_field(tmp_path: Path) -> None:
    g, model, _ = _vera(rank=3, projection_prng_key=7, d_initial=0.25, dropout=0.125)
    gl.save_adapter(tmp_path / "v", g, model)
    written = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert written == {
        "peft_type": "VERA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": 3,
        "target_modules": ["fc1", "fc2"],
        "projection_prng_key": 7,
        "save_projection": True,
        "vera_dropout": 0.125,
        "d_initial": 0.25,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def test_vera_layers_of_two_apply_lora_calls_do_not_share_a_file(tmp_path: Path) -> None:
    g = gl.Graph()
    model = Two(g)
    gl.apply_lora(model, gl.VeraConfig(rank=2), ["fc1"])
    gl.apply_lora(model, gl.VeraConfig(rank=2), ["fc2"])
    with pytest.raises(ValueError, match=r"^save_adapter: the VeRA layers") as info:
        gl.save_adapter(tmp_path / "v", g, model)
    assert str(info.value) == (
        "save_adapter: the VeRA layers hold different projections (adapted by separate "
        "apply_lora calls); PEFT shares one pair: save them separately"
    )
    g2 = gl.Graph()
    other = Two(g2)
    gl.apply_lora(other, gl.VeraConfig(rank=2), ["fc1"])
    gl.apply_lora(other, gl.VeraConfig(rank=2, d_initial=0.5), ["fc2"])
    with pytest.raises(ValueError, match="the VeRA layers differ in their VeraConfig"):
        gl.save_adapter(tmp_path / "v", g2, other)
    assert not (tmp_path / "v").exists()


def test_the_chooser_names_the_variant_the_kinds_and_the_caller() -> None:
    from graphlora.lora.variants import choose_update, variant_name

    with pytest.raises(ValueError, match=r"^here: ") as info:
        choose_update("here", gl.LoraConfig(), "conv")
    assert str(info.value) == (
        "here: the 'lora' variant supports embedding and linear layers, not conv layers"
    )
    with pytest.raises(
        TypeError, match=r"^here: config must be a LoraConfig or a VeraConfig, got int$"
    ):
        choose_update("here", 3, "linear")
    with pytest.raises(
        TypeError, match=r"^variant_name: config must be a LoraConfig or a VeraConfig"
    ):
        variant_name(3)
    assert [
        variant_name(c) for c in (gl.LoraConfig(), gl.LoraConfig(use_dora=True), gl.VeraConfig())
    ] == ["lora", "dora", "vera"]
