"""Choosing where adapters go, as PEFT does: ``"all-linear"``, ``exclude_modules``,
``layers_to_transform`` / ``layers_pattern`` and per-layer ``rank_pattern`` / ``alpha_pattern``;
by hand on small models, and against PEFT on transformers' Llama (crosscheck)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import graphlora as gl

TINY = gl.LlamaConfig(
    vocab_size=23,
    hidden_size=16,
    intermediate_size=20,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama() -> tuple[gl.Graph, Any]:
    rng = np.random.default_rng(0)
    g = gl.Graph()
    return g, gl.Llama(g, TINY, lambda name, shape: rng.normal(0, 0.3, size=shape))


def _part(name: str) -> str:
    return "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def test_all_linear_takes_every_linear_layer_but_the_head() -> None:
    _, model = _llama()
    adapted = gl.apply_lora(model, gl.LoraConfig(rank=2), "all-linear")
    expected = [f"model.layers.{i}.{_part(p)}.{p}" for i in range(3) for p in PROJECTIONS]
    assert sorted(adapted) == sorted(expected)  # 21 layers; lm_head is not among them
    assert isinstance(model.lm_head, gl.Linear)
    _, mlp = gl.Graph(), gl.MLP(gl.Graph(), [4, 3, 2], rng=0)
    assert sorted(gl.apply_lora(mlp, gl.LoraConfig(rank=1), "all-linear")) == [
        "layers.0",
        "layers.1",
    ]


def test_exclude_and_layer_indexes_narrow_the_targets() -> None:
    _, model = _llama()
    adapted = gl.apply_lora(
        model,
        gl.LoraConfig(rank=2),
        ["q_proj", "o_proj", "down_proj"],
        exclude_modules=["o_proj"],
        layers_to_transform=[0, 2],
    )
    assert sorted(adapted) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.2.self_attn.q_proj",
    ]
    _, again = _llama()
    one = gl.apply_lora(
        again, gl.LoraConfig(rank=2), ["v_proj"], layers_to_transform=1, layers_pattern="layers"
    )
    assert list(one) == ["model.layers.1.self_attn.v_proj"]
    with pytest.raises(
        ValueError, match=r"^apply_lora: layers_to_transform needs a list of target"
    ):
        gl.apply_lora(again, gl.LoraConfig(rank=2), "all-linear", layers_to_transform=[0])
    _, regex = _llama()
    excluded = gl.apply_lora(
        regex, gl.LoraConfig(rank=2), r".*\.(q|v)_proj", exclude_modules=r".*layers\.0\..*"
    )
    assert sorted(excluded) == [
        f"model.layers.{i}.self_attn.{p}" for i in (1, 2) for p in ("q_proj", "v_proj")
    ]


def test_rank_and_alpha_patterns_give_each_layer_its_own() -> None:
    _, model = _llama()
    adapted = gl.apply_lora(
        model,
        gl.LoraConfig(rank=2, alpha=4.0),
        ["q_proj", "v_proj"],
        rank_pattern={"q_proj": 6, r"layers\.2\.self_attn\.v_proj": 3},
        alpha_pattern={"v_proj": 12.0},
    )
    for name, layer in adapted.items():
        rank = 6 if name.endswith("q_proj") else 3 if ".2." in name else 2
        alpha = 12.0 if name.endswith("v_proj") else 4.0
        assert (layer.rank, layer.scaling) == (rank, alpha / rank), name


def test_bad_choices_are_refused_before_anything_changes() -> None:
    g, model = _llama()
    leaves = len(g.leaves)
    cases = [
        (
            {"exclude_modules": ["q_proj"]},
            ValueError,
            "apply_lora: no layer is left to adapt after exclude_modules ['q_proj']",
        ),
        ({"layers_to_transform": "0"}, TypeError, "apply_lora: layers_to_transform must be an int"),
        ({"layers_pattern": 3}, TypeError, "apply_lora: layers_pattern must be a str or a list"),
        ({"exclude_modules": 3}, TypeError, "apply_lora: exclude_modules must be a list of layer"),
        ({"exclude_modules": "("}, ValueError, "apply_lora: exclude_modules '(' is no regex"),
        ({"rank_pattern": ["q_proj"]}, TypeError, "apply_lora: rank_pattern must be a dict"),
        (
            {"rank_pattern": {"q_proj": 0}},
            ValueError,
            "apply_lora: layer 'model.layers.0.self_attn",
        ),
        ({"layers_to_transform": [7]}, ValueError, "apply_lora: no layer is left to adapt"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match="^" + re.escape(message)):
            gl.apply_lora(model, gl.LoraConfig(rank=2), ["q_proj"], **kwargs)
    with pytest.raises(
        ValueError, match=r"^apply_lora: rank_pattern and alpha_pattern are for LoRA"
    ):
        gl.apply_lora(model, gl.VeraConfig(rank=4), ["q_proj"], rank_pattern={"q_proj": 2})
    assert len(g.leaves) == leaves and not gl.nn.lora_layers(model)


# --- against PEFT -------------------------------------------------------------------------------


def _hf_llama(path: Path) -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sizes = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
    )
    config = transformers.LlamaConfig(**{name: getattr(TINY, name) for name in sizes})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    model.save_pretrained(path)
    return model


CHOICES: dict[str, dict[str, Any]] = {
    "all-linear": {"target_modules": "all-linear"},
    "all-linear, exclude": {"target_modules": "all-linear", "exclude_modules": ["o_proj"]},
    "list, exclude, layers": {
        "target_modules": PROJECTIONS,
        "exclude_modules": ["o_proj", "up_proj"],
        "layers_to_transform": [0, 2],
    },
    "list, layers_pattern, patterns": {
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "layers_to_transform": 1,
        "layers_pattern": "layers",
        "rank_pattern": {"q_proj": 5, "down_proj": 1},
        "alpha_pattern": {r"layers\.1\.self_attn\.v_proj": 11},
    },
    "regex, exclude regex": {
        "target_modules": r".*\.(q|k|v)_proj",
        "exclude_modules": r".*\.k_proj",
        "rank_pattern": {"v_proj": 3},
    },
}


@pytest.mark.crosscheck
@pytest.mark.parametrize("choice", list(CHOICES))
def test_the_layers_ranks_and_scalings_are_peft_s(tmp_path: Path, choice: str) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    hf = _hf_llama(tmp_path / "hf")
    options = CHOICES[choice]
    theirs = peft.get_peft_model(
        hf, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **options)
    )
    expected = {
        name.removeprefix("base_model.model."): (module.r["default"], module.scaling["default"])
        for name, module in theirs.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    g = gl.Graph()
    ours = gl.from_pretrained(g, tmp_path / "hf")
    targets = options.pop("target_modules")
    adapted = gl.apply_lora(ours, gl.LoraConfig(rank=2, alpha=4.0), targets, **options)
    assert {n: (layer.rank, layer.scaling) for n, layer in adapted.items()} == expected
    # PEFT's file of these adapters loads into them, and the logits agree
    theirs.save_pretrained(str(tmp_path / "adapter"))
    gl.load_adapter(tmp_path / "adapter", g, ours)
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        logits = theirs(torch.from_numpy(ids)).logits.numpy()
    # (PEFT runs the adapters in float32, the dtype it made them in)
    np.testing.assert_allclose(g.value(ours.forward(g, ids)), logits, rtol=1e-6, atol=1e-6)
