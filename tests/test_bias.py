"""PEFT's biases: ``lora_bias`` (a trainable bias on B) and ``bias="lora_only"`` / ``"all"`` (the
model's own biases trained with the adapter and saved in its file): by hand, against finite
differences, and against PEFT (crosscheck) for outputs, gradients, merging and files both ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import graphlora as gl

X = np.random.default_rng(7).normal(size=(3, 6))


def _model(**config: Any) -> tuple[gl.Graph, Any]:
    """An MLP 6 -> 5 -> 4, LoRA rank 2 on both layers with ``config``; A, B (and B's bias)
    drawn."""
    g = gl.Graph()
    model = gl.MLP(g, [6, 5, 4], rng=0)
    gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0, seed=1, **config))
    rng = np.random.default_rng(2)
    for layer in model.layers:
        update = layer.update
        g.set_value(update.lora_b, rng.normal(size=update.lora_b.shape))
        if update.lora_bias is not None:
            g.set_value(update.lora_bias, rng.normal(size=update.lora_bias.shape))
    return g, model


def _run(g: gl.Graph, model: Any, x: np.ndarray = X) -> np.ndarray:
    with g.no_grad():
        return np.array(g.value(model.forward(g, g.constant(x))))


def test_lora_bias_adds_b_times_scaling_and_merges_into_the_bias() -> None:
    g, model = _model(lora_bias=True)
    layer = model.layers[0]
    update = layer.update
    assert [name for name, _ in update.named_leaves("default")] == [
        "lora_A.default",
        "lora_B.default",
        "lora_B.default.bias",
    ]
    assert update.params()[-1] is update.lora_bias and update.lora_bias.requires_grad
    w, bias = np.array(g.value(layer.frozen_weight)), np.array(g.value(layer.bias))
    a, b, c = (np.array(g.value(n)) for n in (update.lora_a, update.lora_b, update.lora_bias))
    s = 4.0 / 2
    h = X @ w + bias + (X @ a @ b + c) * s  # by hand: ((x A) B + c) * scaling
    with g.no_grad():
        np.testing.assert_allclose(g.value(layer.forward(g, g.constant(X))), h, rtol=1e-12)
    before = _run(g, model)
    np.testing.assert_allclose(layer.merge_bias(g), bias + c * s, rtol=1e-15)
    gl.merge_adapter(model)
    np.testing.assert_allclose(g.value(layer.bias), bias + c * s, rtol=1e-15)
    np.testing.assert_allclose(_run(g, model), before, rtol=1e-12)
    gl.unmerge_adapter(model)
    np.testing.assert_array_equal(g.value(layer.bias), bias)  # bit for bit
    np.testing.assert_array_equal(g.value(layer.frozen_weight), w)


def test_lora_bias_starts_at_zero_and_its_gradient_is_checked() -> None:
    g = gl.Graph()
    model = gl.MLP(g, [6, 5, 4], rng=0)
    gl.apply_lora(model, gl.LoraConfig(rank=2, seed=1, lora_bias=True))
    bias = model.layers[1].update.lora_bias
    np.testing.assert_array_equal(g.value(bias), np.zeros(4))
    g.set_value(model.layers[1].update.lora_b, np.random.default_rng(3).normal(size=(2, 4)))
    g.set_value(bias, np.array([0.3, -0.2, 0.1, 0.5]))

    def loss() -> gl.NodeId:
        return g.sum(g.tanh(model.forward(g, g.constant(X))))

    g.backward(loss())
    grad = np.array(g.grad(bias))
    g.reset()
    numeric = np.zeros(4)
    for i in range(4):  # central differences, float64
        for sign in (1.0, -1.0):
            value = np.array(g.value(bias))
            value[i] += sign * 1e-6
            g.set_value(bias, value)
            with g.no_grad():
                numeric[i] += sign * float(g.value(loss())) / 2e-6
            value[i] -= sign * 1e-6
            g.set_value(bias, value)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_lora_bias_refusals() -> None:
    with pytest.raises(ValueError, match="LoraConfig: lora_bias=True needs plain LoRA"):
        gl.LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match="LoraConfig: lora_bias=True needs plain LoRA"):
        gl.LoraConfig(lora_bias=True, init="pissa")
    with pytest.raises(TypeError, match="LoraConfig: lora_bias must be a bool"):
        gl.LoraConfig(lora_bias="yes")  # type: ignore[arg-type]
    g = gl.Graph()
    with pytest.raises(ValueError, match="lora_bias=True is for linear layers, not embeddings"):
        gl.LoraEmbedding.from_embedding(g, np.ones((5, 3)), gl.LoraConfig(lora_bias=True))
    g = gl.Graph()
    model = gl.MLP(g, [6, 5], rng=0, bias=False)
    gl.apply_lora(model, gl.LoraConfig(rank=2, lora_bias=True))
    weight = np.array(g.value(model.layers[0].frozen_weight))
    with pytest.raises(
        gl.GraphError, match=r"layers\.0 has no bias to take its adapters' lora_bias"
    ):
        gl.merge_adapter(model)
    np.testing.assert_array_equal(g.value(model.layers[0].frozen_weight), weight)
    assert not model.layers[0].merged


def _weight(g: gl.Graph, layer: Any) -> np.ndarray:
    """A layer's base weight ``[in, out]``, LoRA or not."""
    return np.array(g.value(getattr(layer, "frozen_weight", None) or layer.weight))


def _torch_twin(g: gl.Graph, model: Any) -> Any:
    torch = pytest.importorskip("torch")

    class TorchMLP(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(
                [torch.nn.Linear(*_weight(g, layer).shape).double() for layer in model.layers]
            )

        def forward(self, h: Any) -> Any:
            return self.layers[1](torch.relu(self.layers[0](h)))

    twin = TorchMLP()
    with torch.no_grad():
        for base, layer in zip(twin.layers, model.layers, strict=True):
            base.weight.copy_(torch.tensor(_weight(g, layer).T))
            base.bias.copy_(torch.tensor(np.array(g.value(layer.bias))))
    return twin


@pytest.mark.crosscheck
def test_lora_bias_equals_peft_both_ways(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    g, model = _model(lora_bias=True)
    gl.save_adapter(tmp_path / "ours", g, model)
    theirs = peft.PeftModel.from_pretrained(
        _torch_twin(g, model), str(tmp_path / "ours"), is_trainable=True
    )
    assert theirs.peft_config["default"].lora_bias is True
    xt = torch.tensor(X)
    np.testing.assert_allclose(_run(g, model), theirs(xt).detach().numpy(), rtol=1e-12)
    # gradients of every trainable leaf, B's bias among them
    loss = model.forward(g, g.constant(X))
    g.backward(g.sum(g.mul(loss, loss)))
    (theirs(xt) ** 2).sum().backward()
    for i, layer in enumerate(model.layers):
        peft_layer = theirs.base_model.model.layers[i]
        np.testing.assert_allclose(
            g.grad(layer.update.lora_bias),
            peft_layer.lora_B["default"].bias.grad.numpy(),
            rtol=1e-10,
        )
        np.testing.assert_allclose(
            g.grad(layer.update.lora_a),
            peft_layer.lora_A["default"].weight.grad.numpy().T,
            rtol=1e-10,
        )
    g.reset()
    # merged as PEFT merges: weight and bias
    merged = theirs.merge_and_unload()
    gl.merge_adapter(model)
    for i, layer in enumerate(model.layers):
        np.testing.assert_allclose(
            g.value(layer.bias), merged.layers[i].bias.detach().numpy(), rtol=1e-12
        )
    gl.unmerge_adapter(model)
    # PEFT's file into graphlora
    peft_model = peft.get_peft_model(
        _torch_twin(g, model),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["layers.0", "layers.1"], lora_bias=True),
    )
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    g2 = gl.Graph()
    fresh = gl.MLP(g2, [6, 5, 4], rng=0)
    gl.apply_adapter(tmp_path / "peft", g2, fresh)
    assert fresh.layers[0].update.config.lora_bias
    with torch.no_grad():
        np.testing.assert_allclose(_run(g2, fresh), peft_model(xt).numpy(), rtol=1e-12)


@pytest.mark.parametrize(
    ("mode", "trained"),
    [
        ("none", []),
        ("lora_only", ["layers.0.bias"]),
        ("all", ["layers.0.bias", "layers.1.bias"]),
    ],
)
def test_bias_modes_train_the_models_own_biases(mode: str, trained: list[str]) -> None:
    g = gl.Graph()
    model = gl.MLP(g, [6, 5, 4], rng=0)
    gl.apply_lora(model, gl.LoraConfig(rank=2, bias=mode), ["layers.0"])
    names = [n for n, leaf in gl.nn.named_leaves(model) if leaf.requires_grad]
    assert (
        names
        == ["layers.0.bias", "layers.0.lora_A.default", "layers.0.lora_B.default", *trained[1:]]
        if trained
        else names == ["layers.0.lora_A.default", "layers.0.lora_B.default"]
    )
    assert sorted(gl.nn.adapters.trained_biases(model)) == trained


def test_bias_refusals(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="LoraConfig: bias must be one of 'none', 'lora_only', 'all'"
    ):
        gl.LoraConfig(bias="some")
    g = gl.Graph()
    model = gl.MLP(g, [6, 5, 4], rng=0)
    gl.apply_lora(model, gl.LoraConfig(rank=2, bias="all"), ["layers.0"])
    with pytest.raises(
        ValueError,
        match=r"^save_adapter: adapter 'default' has bias='all', whose file holds every bias "
        r"of the model: pass the model, not a mapping of layers$",
    ):
        gl.save_adapter(tmp_path / "x", g, gl.nn.lora_layers(model))
    assert not (tmp_path / "x").exists()


@pytest.mark.crosscheck
@pytest.mark.parametrize("mode", ["lora_only", "all"])
def test_bias_modes_equal_peft_both_ways(mode: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    g = gl.Graph()
    model = gl.MLP(g, [6, 5, 4], rng=0)
    gl.apply_lora(
        model, gl.LoraConfig(rank=2, alpha=4.0, bias=mode, init="random", seed=1), ["layers.0"]
    )
    theirs = peft.get_peft_model(
        _torch_twin(g, model),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["layers.0"], bias=mode),
    )
    ours_trained = sorted(n for n, leaf in gl.nn.named_leaves(model) if leaf.requires_grad)
    peft_trained = sorted(
        n.removeprefix("base_model.model.").replace("base_layer.", "").removesuffix(".weight")
        for n, p in theirs.named_parameters()
        if p.requires_grad
    )
    assert ours_trained == peft_trained
    rng = np.random.default_rng(5)
    for _, leaf in gl.nn.named_leaves(model):  # as after training: every trained leaf moved
        if leaf.requires_grad:
            g.set_value(leaf, np.array(g.value(leaf)) + rng.normal(size=leaf.shape))
    gl.save_adapter(tmp_path / "ours", g, model)
    theirs.save_pretrained(str(tmp_path / "peft"))
    st = pytest.importorskip("safetensors.numpy")
    keys = [
        sorted(st.load_file(str(tmp_path / d / "adapter_model.safetensors")))
        for d in ("ours", "peft")
    ]
    assert keys[0] == keys[1]
    loaded = peft.PeftModel.from_pretrained(
        _torch_twin(g, model), str(tmp_path / "ours"), is_trainable=True
    )
    with torch.no_grad():
        np.testing.assert_allclose(_run(g, model), loaded(torch.tensor(X)).numpy(), rtol=1e-12)
    out = model.forward(g, g.constant(X))  # the trained biases' gradients equal PEFT's
    g.backward(g.sum(g.mul(out, out)))
    (loaded(torch.tensor(X)) ** 2).sum().backward()
    grads = {
        n.removeprefix("base_model.model.").replace("base_layer.", ""): p.grad
        for n, p in loaded.named_parameters()
        if n.endswith(".bias") and p.grad is not None
    }
    assert sorted(grads) == sorted(gl.nn.adapters.trained_biases(model))
    for name, leaf in gl.nn.adapters.trained_biases(model).items():
        np.testing.assert_allclose(g.grad(leaf), grads[name].numpy(), rtol=1e-10)
    g.reset()
    # and back: PEFT's adapter (its biases moved too) into a fresh graphlora model
    saved = set(peft.get_peft_model_state_dict(loaded))  # what the file holds: move only those
    moved = [n for n, _ in loaded.named_parameters() if n.replace(".default", "") in saved]
    assert len(moved) == len(saved)  # A, B and the biases the file holds
    with torch.no_grad():
        for name, p in loaded.named_parameters():
            if name in moved:
                p.add_(0.1)
    loaded.save_pretrained(str(tmp_path / "back"))
    g2 = gl.Graph()
    fresh = gl.MLP(g2, [6, 5, 4], rng=0)
    gl.apply_adapter(tmp_path / "back", g2, fresh)
    with torch.no_grad():
        np.testing.assert_allclose(_run(g2, fresh), loaded(torch.tensor(X)).numpy(), rtol=1e-12)


def test_what_an_adapter_file_holds_of_the_models_biases(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    g = gl.Graph()
    model = gl.MLP(g, [6, 5, 4, 3], rng=0)
    gl.apply_lora(model, gl.LoraConfig(rank=2), ["layers.0", "layers.1"])
    gl.apply_lora(
        model, gl.LoraConfig(rank=2, bias="lora_only"), ["layers.1", "layers.2"], adapter_name="b"
    )
    assert gl.nn.adapters.trained_biases(model) == {}  # "default" is active, with bias="none"
    assert sorted(gl.nn.adapters.trained_biases(model, "b")) == ["layers.1.bias", "layers.2.bias"]
    # saved from the model, and from a mapping of its LoRA layers: b's layers' biases only
    gl.save_adapter(tmp_path / "m", g, model, adapter_name="b")
    gl.save_adapter(tmp_path / "l", g, gl.nn.lora_layers(model), adapter_name="b")
    for folder in ("m", "l"):
        tensors = st.load_file(str(tmp_path / folder / "b" / "adapter_model.safetensors"))
        biases = sorted(k for k in tensors if k.endswith("bias"))
        assert biases == [
            "base_model.model.layers.1.base_layer.bias",
            "base_model.model.layers.2.base_layer.bias",
        ], folder
        np.testing.assert_array_equal(
            tensors["base_model.model.layers.2.base_layer.bias"], g.value(model.layers[2].bias)
        )
    # loading into a mapping of layers sets their biases too
    g2 = gl.Graph()
    twin = gl.MLP(g2, [6, 5, 4, 3], rng=9)
    gl.apply_lora(
        twin, gl.LoraConfig(rank=2, bias="lora_only"), ["layers.1", "layers.2"], adapter_name="b"
    )
    gl.load_adapter(tmp_path / "l", g2, gl.nn.lora_layers(twin), adapter_name="b")
    np.testing.assert_array_equal(g2.value(twin.layers[2].bias), g.value(model.layers[2].bias))


def test_merge_bias_refusals_say_what_and_why() -> None:
    g = gl.Graph()
    model = gl.MLP(g, [6, 5], rng=0, bias=False)
    gl.apply_lora(model, gl.LoraConfig(rank=2, lora_bias=True))
    with pytest.raises(
        gl.GraphError,
        match=r"^LoraLinear.merge_bias: layers\.0 has no bias to take its adapters' lora_bias; "
        r"it cannot be merged \(as PEFT\)$",
    ):
        model.layers[0].merge_bias(g)
    g, model = _model(lora_bias=True)
    layer = model.layers[0]
    g.set_value(layer.update.lora_bias, np.full(5, 1e308))
    with pytest.raises(
        gl.NonFiniteError,
        match=r"^LoraLinear.merge_bias: merging layers\.0 would give a non-finite bias; nothing "
        r"was changed$",
    ):
        layer.merge_bias(g, ["default"])
    with pytest.raises(TypeError, match=r"^LoraLinear.merge_bias: graph must be a Graph"):
        layer.merge_bias(None)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"^LoraLinear.merge_bias: layers\.0 has no adapter \['x'\]"
    ):
        layer.merge_bias(g, ["x"])
    assert layer.merge_bias(g, []) is not None  # nothing named: the bias as it is
    np.testing.assert_array_equal(layer.merge_bias(g, []), g.value(layer.bias))
