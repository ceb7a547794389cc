"""PEFT's adapter switches outside a context manager and merging in turn: persistent
``disable_adapter_layers`` / ``enable_adapter_layers``, ``merge_adapter(adapter_names)`` (a merged
layer takes further adapters on top), ``unmerge_adapter``; by hand, and against PEFT
(crosscheck)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import graphlora as gl


def _model(seed: int = 0) -> tuple[gl.Graph, Any, np.ndarray]:
    """An MLP 6 -> 5 -> 4 with adapters ``a`` (rank 2) and ``b`` (rank 3), every value drawn."""
    g = gl.Graph()
    model = gl.MLP(g, [6, 5, 4], rng=seed)
    gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0, init="random", seed=1), adapter_name="a")
    gl.apply_lora(model, gl.LoraConfig(rank=3, alpha=3.0, init="random", seed=2), adapter_name="b")
    x = np.random.default_rng(seed).normal(size=(3, 6))
    return g, model, x


def _deltas(g: gl.Graph, layer: Any, names: list[str]) -> np.ndarray:
    return sum(
        (
            g.value(layer.adapters[n].lora_a)
            @ g.value(layer.adapters[n].lora_b)
            * layer.adapters[n].scaling
            for n in names
        ),
        start=np.zeros(layer.weight_shape),
    )


def test_merging_in_turn_equals_merging_at_once_and_unmerges_bit_for_bit() -> None:
    g, model, x = _model()
    originals = [np.array(g.value(layer.frozen_weight)) for layer in model.layers]
    gl.merge_adapter(model, ["a"])
    for layer, w in zip(model.layers, originals, strict=True):
        assert layer.merged_adapters == ["a"]
        np.testing.assert_allclose(g.value(layer.frozen_weight), w + _deltas(g, layer, ["a"]))
    gl.merge_adapter(model, "b")  # on top
    for layer, w in zip(model.layers, originals, strict=True):
        assert layer.merged_adapters == ["a", "b"]
        np.testing.assert_allclose(
            g.value(layer.frozen_weight), w + _deltas(g, layer, ["a", "b"]), rtol=1e-12
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.layers[0].merge_(g, ["a", "b"])
    assert "['a', 'b'] are merged already; nothing to do" in str(caught[0].message)
    merged_out = np.array(g.value(model.forward(g, g.constant(x))))
    gl.unmerge_adapter(model)
    for layer, w in zip(model.layers, originals, strict=True):
        assert not layer.merged
        np.testing.assert_array_equal(g.value(layer.frozen_weight), w)  # bit for bit
    gl.set_adapter(model, ["a", "b"])
    np.testing.assert_allclose(g.value(model.forward(g, g.constant(x))), merged_out, rtol=1e-12)
    # merging the active ones by default, and merge() names what it folds without changing it
    layer = model.layers[1]
    w = np.array(g.value(layer.frozen_weight))
    np.testing.assert_allclose(layer.merge(g, ["b"]), w + _deltas(g, layer, ["b"]))
    np.testing.assert_array_equal(g.value(layer.frozen_weight), w)
    gl.merge_adapter(model)
    assert layer.merged_adapters == ["a", "b"]


def test_merging_refuses_unknown_names_before_changing_anything() -> None:
    g, model, _ = _model()
    before = [np.array(g.value(layer.frozen_weight)) for layer in model.layers]
    with pytest.raises(ValueError, match=re.escape("merge_adapter: unknown adapter(s) ['c']")):
        gl.merge_adapter(model, ["a", "c"])
    with pytest.raises(
        ValueError, match=re.escape("LoraLinear.merge_: layers.0 has no adapter ['c']")
    ):
        model.layers[0].merge_(g, ["c"])
    with pytest.raises(
        ValueError, match=re.escape("LoraLinear.merge: layers.0 has no adapter ['c']")
    ):
        model.layers[0].merge(g, "c")
    layer = model.layers[1]
    g.set_value(layer.adapters["b"].lora_b, np.full((3, 4), np.inf))
    with pytest.raises(gl.NonFiniteError, match=r"merging layers\.1 would give"):
        gl.merge_adapter(model, ["b"])
    for layer, w in zip(model.layers, before, strict=True):
        assert not layer.merged
        np.testing.assert_array_equal(g.value(layer.frozen_weight), w)


def test_adapter_layers_stay_disabled_until_enabled() -> None:
    g, model, x = _model()
    gl.set_adapter(model, ["a", "b"])
    adapted = np.array(g.value(model.forward(g, g.constant(x))))
    trained = gl.nn.parameters(model)
    assert len(trained) == 2 * 2 * 2  # A and B of a and b, on two layers
    gl.disable_adapter_layers(model)
    with gl.disable_adapters(model):  # the context manager inside leaves it disabled
        pass
    base = model.layers[1].base_forward(g, g.relu(model.layers[0].base_forward(g, g.constant(x))))
    np.testing.assert_array_equal(g.value(model.forward(g, g.constant(x))), g.value(base))
    assert gl.nn.parameters(model) == [] and all(layer.disabled for layer in model.layers)
    gl.enable_adapter_layers(model)
    np.testing.assert_array_equal(g.value(model.forward(g, g.constant(x))), adapted)
    assert gl.nn.parameters(model) == trained
    gl.merge_adapter(model)
    with pytest.raises(
        gl.GraphError, match=r"^disable_adapter_layers: \['layers.0', 'layers.1'\] are merged"
    ):
        gl.disable_adapter_layers(model)


@pytest.mark.crosscheck
def test_merging_in_turn_and_disabling_as_peft(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    g, model, x = _model()
    for name in ("a", "b"):
        gl.save_adapter(tmp_path / name, g, model, adapter_name=name)

    class TorchMLP(torch.nn.Module):  # type: ignore[misc, name-defined]
        """graphlora's MLP in PyTorch, under the same names (layers.0, layers.1)."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(
                [torch.nn.Linear(*layer.weight_shape).double() for layer in model.layers]
            )

        def forward(self, h: Any) -> Any:
            return self.layers[1](torch.relu(self.layers[0](h)))

    torch_model = TorchMLP()
    with torch.no_grad():
        for base, layer in zip(torch_model.layers, model.layers, strict=True):
            base.weight.copy_(torch.tensor(np.array(g.value(layer.frozen_weight)).T))
            base.bias.copy_(torch.tensor(np.array(g.value(layer.bias))))
    theirs = peft.PeftModel.from_pretrained(
        torch_model, str(tmp_path / "a" / "a"), adapter_name="a"
    )
    theirs.load_adapter(str(tmp_path / "b" / "b"), adapter_name="b")
    xt = torch.tensor(x)
    theirs.base_model.merge_adapter(["a"])
    theirs.base_model.merge_adapter(["b"])
    gl.merge_adapter(model, ["a"])
    gl.merge_adapter(model, ["b"])
    for i, layer in enumerate(model.layers):
        weight = theirs.base_model.model.layers[i].base_layer.weight.detach().numpy()
        np.testing.assert_allclose(g.value(layer.frozen_weight), weight.T, rtol=1e-12, atol=1e-14)
        assert theirs.base_model.model.layers[i].merged_adapters == layer.merged_adapters
    theirs.base_model.unmerge_adapter()
    gl.unmerge_adapter(model)
    theirs.base_model.disable_adapter_layers()
    gl.disable_adapter_layers(model)
    with torch.no_grad():
        np.testing.assert_allclose(
            g.value(model.forward(g, g.constant(x))), theirs(xt).numpy(), rtol=1e-12
        )
    assert not any(p.requires_grad for n, p in theirs.named_parameters() if "lora_" in n)
    assert gl.nn.parameters(model) == []
    theirs.base_model.enable_adapter_layers()
    gl.enable_adapter_layers(model)
    with torch.no_grad():
        np.testing.assert_allclose(
            g.value(model.forward(g, g.constant(x))), theirs(xt).numpy(), rtol=1e-12
        )


def test_merging_nothing_new_warns_and_bad_names_are_refused() -> None:
    g, model, _ = _model()
    layer = model.layers[0]
    layer.merge_(g, ["a"])
    for call in (lambda: layer.merge_(g), lambda: layer.merge_(g, ["a"])):  # nothing new
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert len(caught) == 1 and "nothing to do" in str(caught[0].message)
    gl.unmerge_adapter(model)
    gl.disable_adapter_layers(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.merge_(g)
    assert "has no adapter running" in str(caught[0].message)
    for call, where in ((layer.merge_, "merge_"), (layer.merge, "merge")):
        with pytest.raises(TypeError, match=f"^LoraLinear.{where}: adapter_names must be a name"):
            call(g, 3)


def test_a_dora_adapter_merged_after_another_takes_its_norm_from_the_unmerged_weight() -> None:
    g = gl.Graph()
    w = np.random.default_rng(3).normal(size=(6, 5))
    layer = gl.LoraLinear.from_linear(g, w, None, gl.LoraConfig(rank=2, init="random", seed=1))
    layer.add_adapter(g, "d", gl.LoraConfig(rank=2, use_dora=True, init="random", seed=2))
    layer.set_adapter(g, ["default", "d"])
    at_once = layer.merge(g)  # both, in order, as forward runs them
    layer.merge_(g, ["default"])
    layer.merge_(g, ["d"])
    np.testing.assert_allclose(g.value(layer.frozen_weight), at_once, rtol=1e-12)
    # by hand: DoRA's norm is of W + its own delta, W the weight before any merge
    delta = layer.delta(g, "default")
    own = layer.delta(g, "d")
    ratio = g.value(layer.adapters["d"].magnitude) / np.linalg.norm(w + own, axis=0)
    np.testing.assert_allclose(at_once, (w + delta + own) * ratio, rtol=1e-12)
