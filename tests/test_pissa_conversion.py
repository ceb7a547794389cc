"""Converting a trained PiSSA adapter to plain LoRA on save (PEFT's
``path_initial_model_for_weight_conversion``): by hand, and against PEFT's own conversion."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import graphlora as gl

X = np.random.default_rng(7).normal(size=(3, 6))


def _run(g: gl.Graph, model: Any) -> np.ndarray:
    with g.no_grad():
        return np.array(g.value(model.forward(g, g.constant(X))))


def _trained_pissa(tmp_path: Path, use_rslora: bool = False) -> tuple[gl.Graph, Any, np.ndarray]:
    """An MLP 6 -> 5 -> 4 with a PiSSA adapter saved at init (``tmp_path / "init"``) and then
    moved as by training; returns the original weights too."""
    g = gl.Graph()
    model = gl.MLP(g, [6, 5, 4], rng=0)
    originals = [np.array(g.value(layer.weight)) for layer in model.layers]
    config = gl.LoraConfig(rank=2, alpha=3.0, init="pissa", use_rslora=use_rslora)
    gl.apply_lora(model, config, rank_pattern={"layers.1": 3}, alpha_pattern={"layers.1": 5.0})
    gl.save_adapter(tmp_path / "init", g, model)
    rng = np.random.default_rng(1)
    for leaf in gl.nn.parameters(model):
        g.set_value(leaf, np.array(g.value(leaf)) + 0.3 * rng.normal(size=leaf.shape))
    return g, model, np.array(originals, dtype=object)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_converted_adapter_on_the_original_weights_gives_the_trained_model(
    tmp_path: Path, use_rslora: bool
) -> None:
    g, model, originals = _trained_pissa(tmp_path, use_rslora)
    gl.save_adapter(
        tmp_path / "lora", g, model, path_initial_model_for_weight_conversion=tmp_path / "init"
    )
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    factor = math.sqrt(2) if use_rslora else 2.0
    assert config["init_lora_weights"] is True
    assert (config["r"], config["rank_pattern"]) == (4, {"layers.1": 6})
    assert config["lora_alpha"] == pytest.approx(3.0 * factor)
    assert config["alpha_pattern"]["layers.1"] == pytest.approx(5.0 * factor)
    g2 = gl.Graph()
    fresh = gl.MLP(g2, [6, 5, 4], rng=0)  # the original weights, not PiSSA's residual
    for layer, weight in zip(fresh.layers, originals, strict=True):
        np.testing.assert_array_equal(g2.value(layer.weight), weight)
    gl.apply_adapter(tmp_path / "lora", g2, fresh)
    assert [layer.update.rank for layer in fresh.layers] == [4, 6]
    np.testing.assert_allclose(_run(g2, fresh), _run(g, model), rtol=1e-10, atol=1e-12)
    # by hand: W + s (A B - A0 B0) for the first layer
    first = model.layers[0]
    init = gl.io.read_adapter(tmp_path / "init")
    a0, b0 = init.a["layers.0"].T, init.b["layers.0"].T
    s = first.update.scaling
    a, b = np.array(g.value(first.lora_a)), np.array(g.value(first.lora_b))
    np.testing.assert_allclose(
        fresh.layers[0].merge(g2), originals[0] + s * (a @ b - a0 @ b0), rtol=1e-10, atol=1e-12
    )


def test_conversion_refusals_write_nothing(tmp_path: Path) -> None:
    g, model, _ = _trained_pissa(tmp_path)
    plain = gl.MLP(g, [6, 5, 4], rng=0)
    gl.apply_lora(plain, gl.LoraConfig(rank=2))
    gl.save_adapter(tmp_path / "plain", g, plain)
    cases = [
        (plain, tmp_path / "init", "converts a plain LoRA adapter made with init='pissa'"),
        (model, tmp_path / "plain", "does not hold a PiSSA adapter's initial state"),
    ]
    for which, initial, match in cases:
        with pytest.raises(ValueError, match="save_adapter: .*" + match):
            gl.save_adapter(
                tmp_path / "out", g, which, path_initial_model_for_weight_conversion=initial
            )
        assert not (tmp_path / "out").exists()


@pytest.mark.crosscheck
def test_the_conversion_equals_peft(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    st = pytest.importorskip("safetensors.numpy")
    g, model, originals = _trained_pissa(tmp_path)
    gl.save_adapter(tmp_path / "trained", g, model)
    gl.save_adapter(
        tmp_path / "ours", g, model, path_initial_model_for_weight_conversion=tmp_path / "init"
    )

    class TorchMLP(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)])

        def forward(self, h: Any) -> Any:
            return self.layers[1](torch.relu(self.layers[0](h)))

    def original(dtype: Any) -> Any:
        twin = TorchMLP().to(dtype)
        with torch.no_grad():
            for base, layer, weight in zip(twin.layers, model.layers, originals, strict=True):
                base.weight.copy_(torch.tensor(weight.T))
                base.bias.copy_(torch.tensor(np.array(g.value(layer.bias))))
        return twin

    # PEFT loads the trained PiSSA adapter (rebuilding the residual itself, which it does in
    # float32 only) and converts it: its tensors are ours rounded to float32
    theirs = peft.PeftModel.from_pretrained(original(torch.float32), str(tmp_path / "trained"))
    theirs.save_pretrained(
        str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    ours_t = st.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_t = st.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(ours_t) == sorted(peft_t)
    for key in ours_t:
        np.testing.assert_allclose(ours_t[key], peft_t[key], rtol=1e-6, atol=1e-7)
    ours_c = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_c = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert ours_c[field] == peft_c[field], field
    loaded = peft.PeftModel.from_pretrained(original(torch.float64), str(tmp_path / "ours"))
    with torch.no_grad():
        np.testing.assert_allclose(
            loaded(torch.tensor(X)).numpy(), _run(g, model), rtol=1e-10, atol=1e-12
        )


def test_the_initial_state_must_match_the_adapter(tmp_path: Path) -> None:
    g, model, _ = _trained_pissa(tmp_path)
    other = gl.MLP(g, [6, 5, 4], rng=0)
    gl.apply_lora(other, gl.LoraConfig(rank=1, init="pissa"), ["layers.0"])
    gl.save_adapter(tmp_path / "other", g, other)
    with pytest.raises(
        ValueError,
        match=r"^save_adapter: .*other holds the layers \['layers.0'\] and ranks \{'layers.0': 1\}; "
        r"the adapter has \['layers.0', 'layers.1'\]$",
    ):
        gl.save_adapter(
            tmp_path / "out", g, model, path_initial_model_for_weight_conversion=tmp_path / "other"
        )
    same_layers = gl.MLP(g, [6, 5, 4], rng=0)
    gl.apply_lora(same_layers, gl.LoraConfig(rank=1, init="pissa"))
    gl.save_adapter(tmp_path / "rank1", g, same_layers)
    with pytest.raises(ValueError, match=r"^save_adapter: .*rank1 holds the layers"):
        gl.save_adapter(
            tmp_path / "out", g, model, path_initial_model_for_weight_conversion=tmp_path / "rank1"
        )
    dora = gl.MLP(g, [6, 5, 4], rng=0)
    gl.apply_lora(dora, gl.LoraConfig(rank=2, init="pissa", use_dora=True))
    with pytest.raises(ValueError, match="converts a plain LoRA adapter made with init='pissa'"):
        gl.save_adapter(
            tmp_path / "out", g, dora, path_initial_model_for_weight_conversion=tmp_path / "init"
        )
    gl.apply_lora(model, gl.LoraConfig(rank=2), adapter_name="second")
    with pytest.raises(
        ValueError, match=r"^save_adapter: converting PiSSA to LoRA takes one adapter"
    ):
        gl.save_adapter(
            tmp_path / "out", g, model, path_initial_model_for_weight_conversion=tmp_path / "init"
        )
    assert not (tmp_path / "out").exists()
