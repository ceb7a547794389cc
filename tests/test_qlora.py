"""QLoRA in the layers: double quantization, the 4-bit base inside ``NF4Linear`` and
``LoraLinear`` (plain LoRA, rsLoRA, DoRA), releasing the float leaves, ``quantize_`` and
``from_pretrained(..., quantize="nf4")``, merging and saving; checked against a float layer over
the dequantized weight, finite differences, and (crosscheck) bitsandbytes, transformers and PEFT.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import graphlora as gl
from graphlora.lora import nf4 as nf4_module
from graphlora.nf4 import (
    DYNAMIC_MAP,
    NF4_LEVELS,
    NestedAbsmax,
    NF4Config,
    NF4Linear,
    NF4Weight,
    nf4_linear,
)
from graphlora.testing import gradcheck

st_numpy = pytest.importorskip("safetensors.numpy")

TINY = gl.LlamaConfig(
    vocab_size=23,
    hidden_size=16,
    intermediate_size=20,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(seed: int = 0, dtype: Any = np.float64) -> tuple[gl.Graph, Any]:
    rng = np.random.default_rng(seed)
    g = gl.Graph(dtype)
    return g, gl.Llama(g, TINY, lambda name, shape: rng.normal(0, 0.3, size=shape))


# --- the 8-bit map and double quantization -------------------------------------------------------


def test_the_dynamic_map_by_hand() -> None:
    # exponent 10^0 with 64 parts of [0.1, 1]: the largest magnitude is the last part's middle
    top = (np.float32(0.9859375) + np.float32(1.0)) / np.float32(2)
    assert DYNAMIC_MAP.shape == (256,) and DYNAMIC_MAP.dtype == np.float32
    assert DYNAMIC_MAP[0] == -top and DYNAMIC_MAP[-1] == 1.0 and DYNAMIC_MAP[-2] == top
    assert np.all(np.diff(DYNAMIC_MAP) > 0)  # sorted, no two equal
    assert 0.0 in DYNAMIC_MAP
    # the smallest magnitudes: 10^-6 times the middle of [0.1, 1] (one part)
    smallest = np.float32(1e-6) * np.float32(0.55)
    assert np.min(np.abs(DYNAMIC_MAP[DYNAMIC_MAP != 0])) == smallest
    # 2 (signs) x (1 + 2 + ... + 64) values, and 0 and 1
    assert 2 * sum(2**i for i in range(7)) + 2 == 256


@settings(max_examples=60)
@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 700),
        elements=st.floats(0, 4, width=32, allow_subnormal=False),
    )
)
def test_double_quantization_rounds_each_absmax_to_the_nearest_code(absmax: np.ndarray) -> None:
    nested = NestedAbsmax.quantize(absmax)
    assert nested.codes.shape == absmax.shape
    assert nested.scales.shape == (math.ceil(absmax.size / 256),)
    offset = np.float32(nested.offset)
    assert offset == np.float32(absmax.astype(np.float64).mean())
    back = nested.dequantize()
    blocks = np.arange(absmax.size) // 256
    normed = (absmax - offset) / np.where(nested.scales > 0, nested.scales, 1)[blocks]
    chosen = DYNAMIC_MAP[nested.codes]
    best = np.abs(normed[:, None] - DYNAMIC_MAP[None, :]).min(axis=1)  # brute force
    # nearest, up to the float32 rounding of the division
    assert np.all(np.abs(normed - chosen) <= best + 1e-6)
    step = np.diff(DYNAMIC_MAP).max() / 2 * nested.scales[blocks] + 1e-6
    assert np.all(np.abs(back - absmax) <= step)


def test_double_quantization_keeps_a_weight_close_and_counts_its_bytes() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, size=(128, 256))
    plain = NF4Weight.quantize(w)
    nested = NF4Weight.quantize(w, double_quant=True)
    assert not plain.double_quant and nested.double_quant
    np.testing.assert_array_equal(nested.codes, plain.codes)  # the 4-bit codes are the same
    # bytes by hand: 32768 values in 512 blocks of 64
    assert plain.nbytes == 32768 // 2 + 512 * 4
    assert nested.nbytes == 32768 // 2 + 512 + 2 * 4 + 4  # 8-bit absmax, 2 scales, an offset
    error = np.abs(nested.block_absmax() - plain.block_absmax()) / plain.block_absmax()
    assert error.max() < 0.01  # the absmax values move by well under 1 %
    assert "double_quant=True" in repr(nested) and "double_quant" not in repr(plain)


def test_nested_absmax_refuses_parts_that_do_not_fit() -> None:
    equal = NestedAbsmax.quantize(np.ones(300, np.float32))
    assert equal.dequantize().tolist() == [1.0] * 300  # all equal: all the offset
    good = NestedAbsmax.quantize(np.linspace(0, 1, 300, dtype=np.float32))
    cases = [
        (good.codes.astype(np.int16), good.scales, 0.0, TypeError, "codes must be a 1-D uint8"),
        (good.codes, good.scales.astype(np.float64), 0.0, TypeError, "scales must be a float32"),
        (good.codes, good.scales[:1], 0.0, gl.ShapeError, "need scales (2,), got (1,)"),
        (good.codes, -good.scales, 0.0, ValueError, "scales must be finite and >= 0"),
        (good.codes, good.scales, math.inf, ValueError, "offset finite"),
    ]
    for codes, scales, offset, error, message in cases:
        with pytest.raises(error, match="^NestedAbsmax: .*" + re.escape(message)):
            NestedAbsmax(codes, scales, offset)
    weight = NF4Weight.quantize(np.ones((4, 8)), block_size=4, double_quant=True)
    with pytest.raises(gl.ShapeError, match=re.escape("absmax (8,), got (8, 2) and (300,)")):
        NF4Weight(weight.codes, good, (4, 8), 4)
    with pytest.raises(TypeError, match="absmax must be a float32 array or a NestedAbsmax"):
        NF4Weight(weight.codes, [1.0] * 8, (4, 8), 4)  # type: ignore[arg-type]


def test_nf4_config_is_checked_and_quantize_names_are_read() -> None:
    assert NF4Config.of("f", "nf4") == NF4Config(64, False)
    assert NF4Config.of("f", None) is None
    custom = NF4Config(128, True)
    assert NF4Config.of("f", custom) is custom
    with pytest.raises(ValueError, match=r"^f: quantize must be None, 'nf4' or a gl.nf4.NF4Config"):
        NF4Config.of("f", "int8")
    with pytest.raises(ValueError, match="NF4Config: block_size must be even"):
        NF4Config(63)
    with pytest.raises(TypeError, match="NF4Config: double_quant must be a bool"):
        NF4Config(64, 1)  # type: ignore[arg-type]


# --- the ops, a few rows at a time ----------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 18])
def test_the_nf4_ops_give_the_same_numbers_whatever_the_chunk(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    weight = NF4Weight.quantize(rng.normal(size=(9, 13)), block_size=4, double_quant=True)
    dense = weight.dequantize(np.float64)
    x = rng.normal(size=(2, 3, 13))
    a, b = rng.normal(size=(13, 2)), rng.normal(size=(2, 9))
    monkeypatch.setattr(nf4_module, "CHUNK_VALUES", chunk)
    seen = [(start, stop) for start, stop, _ in weight.rows()]
    assert seen[0][0] == 0 and seen[-1][1] == 9
    assert all(stop - start == max(1, chunk // 13) for start, stop in seen[:-1])
    g = gl.Graph()
    xs = g.parameter(x)
    y = g.apply(nf4_linear, xs, weight=weight)
    np.testing.assert_allclose(g.value(y), x @ dense.T, rtol=1e-12, atol=1e-12)
    norm = g.apply(
        nf4_module.nf4_adapted_norm, g.constant(a), g.constant(b), weight=weight, scaling=0.5
    )
    expected = np.linalg.norm(dense.T + 0.5 * a @ b, axis=0)
    np.testing.assert_allclose(g.value(norm), expected, rtol=1e-12)
    g.backward(g.sum(g.mul(y, y)))
    np.testing.assert_allclose(g.grad(xs), 2 * (x @ dense.T) @ dense, rtol=1e-10)
    an, bn = g.parameter(a), g.parameter(b)
    norms = g.apply(nf4_module.nf4_adapted_norm, an, bn, weight=weight, scaling=0.5)
    g.backward(g.sum(norms))
    adapted = dense.T + 0.5 * a @ b  # [in, out]
    unit = adapted / np.linalg.norm(adapted, axis=0)
    np.testing.assert_allclose(g.grad(an), 0.5 * unit @ b.T, rtol=1e-10)
    np.testing.assert_allclose(g.grad(bn), 0.5 * a.T @ unit, rtol=1e-10)


def test_nf4_linear_refuses_what_does_not_fit_and_records_nothing() -> None:
    g = gl.Graph()
    x = g.constant(np.ones((2, 5)))
    a, b = g.constant(np.ones((4, 2))), g.constant(np.ones((2, 4)))
    before = len(g)
    with pytest.raises(gl.ShapeError, match=re.escape("nf4_linear: x (2, 5) needs a weight")):
        g.apply(nf4_linear, x, weight=NF4Weight.quantize(np.ones((5, 4))))
    with pytest.raises(gl.ShapeError, match=re.escape("nf4_linear: weight must be 2-D")):
        g.apply(nf4_linear, x, weight=NF4Weight.quantize(np.ones(5)))
    with pytest.raises(TypeError, match="nf4_linear: weight must be an NF4Weight, got ndarray"):
        g.apply(nf4_linear, x, weight=np.ones((4, 5)))
    message = "nf4_adapted_norm: a [in, r] and b [r, out] must fit a weight [out, in] = (4, 5)"
    with pytest.raises(gl.ShapeError, match=re.escape(message)):
        g.apply(
            nf4_module.nf4_adapted_norm,
            a,
            b,
            weight=NF4Weight.quantize(np.ones((4, 5))),
        )
    assert len(g) == before


# --- Graph.release --------------------------------------------------------------------------------


def test_release_removes_a_leaf_and_its_value_and_refuses_what_the_tape_reads() -> None:
    g = gl.Graph()
    w = g.parameter(np.ones((3, 2)), "w")
    keep = g.parameter(np.ones(2), "keep")
    y = g.matmul(g.constant(np.ones((1, 3))), w)
    assert g.readers(w) == (y,)
    with pytest.raises(gl.GraphError, match=r"Graph.release: NodeId\(0.*read by 1 recorded op"):
        g.release(w)
    assert w in g.leaves and float(g.value(w).sum()) == 6.0  # nothing changed
    with pytest.raises(gl.GraphError, match="is a recorded op, not a leaf"):
        g.release(y)
    g.reset()
    assert g.readers(w) == ()
    g.release(w)
    assert w not in g.leaves and g.parameters() == [keep]
    with pytest.raises(gl.StaleNodeError, match="was released from the graph"):
        g.value(w)
    with pytest.raises(gl.StaleNodeError, match="was released from its graph"):
        _ = w.shape
    with pytest.raises(gl.StaleNodeError, match="was released"):
        g.release(w)
    with pytest.raises(gl.StaleNodeError, match="was released"):
        g.add(w, keep)


def test_a_release_inside_scratch_leaves_the_block_s_own_dropping_right() -> None:
    g = gl.Graph()
    old = g.constant(np.ones(2), "old")
    kept = g.constant(np.ones(2), "kept")
    with g.scratch():
        inside = g.constant(np.zeros(2), "inside")
        g.release(old)
        later = g.constant(np.zeros(2), "later")
    assert g.leaves == (kept,)
    for node in (inside, later):
        with pytest.raises(gl.StaleNodeError, match="scratch"):
            g.value(node)


# --- the layers -----------------------------------------------------------------------------------


def _float_twin(g: gl.Graph, layer: Any, config: gl.LoraConfig) -> Any:
    """A float LoraLinear over the dequantized base with the same adapter values."""
    twin = gl.LoraLinear.from_linear(g, layer.base.dequantize(np.float64).T, None, config)
    for mine, theirs in zip(layer.trainable_params(), twin.trainable_params(), strict=True):
        g.set_value(theirs, g.value(mine))
    return twin


CONFIGS = {
    "lora": gl.LoraConfig(rank=3, alpha=6.0, init="random", seed=1),
    "rslora": gl.LoraConfig(rank=3, alpha=6.0, use_rslora=True, init="random", seed=1),
    "dora": gl.LoraConfig(rank=3, alpha=6.0, use_dora=True, init="random", seed=1),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("double_quant", [False, True])
def test_a_lora_layer_over_nf4_equals_one_over_the_dequantized_weight(
    name: str, double_quant: bool
) -> None:
    config = CONFIGS[name]
    rng = np.random.default_rng(0)
    g = gl.Graph()
    w = g.parameter(rng.normal(0, 0.5, size=(12, 10)), "w")
    layer = gl.LoraLinear.from_linear(
        g, w, None, config, quantize=NF4Config(4, double_quant=double_quant)
    )
    assert layer.frozen_weight is None and isinstance(layer.base, NF4Weight)
    assert layer.base.shape == (10, 12) and layer.base.double_quant == double_quant
    assert w not in g.leaves  # the float weight is released
    assert layer.num_frozen == 120 and "nf4=True" in repr(layer)
    twin = _float_twin(g, layer, config)
    x = rng.normal(size=(4, 12))
    y, y_twin = layer.forward(g, g.constant(x)), twin.forward(g, g.constant(x))
    np.testing.assert_allclose(g.value(y), g.value(y_twin), rtol=1e-12, atol=1e-12)
    g.backward(g.sum(g.mul(y, y)))
    g.backward(g.sum(g.mul(y_twin, y_twin)))
    for mine, theirs in zip(layer.trainable_params(), twin.trainable_params(), strict=True):
        np.testing.assert_allclose(g.grad(mine), g.grad(theirs), rtol=1e-10, atol=1e-12)
    # and the input gradient, through the 4-bit base, against finite differences
    values = [np.array(g.value(p)) for p in layer.trainable_params()]

    def fn(h: gl.Graph, xs: gl.NodeId, *params: gl.NodeId) -> gl.NodeId:
        copy = gl.LoraLinear.from_linear(h, layer.base, None, config)
        for leaf, value in zip(copy.trainable_params(), params, strict=True):
            h.set_value(leaf, h.value(value))
        out = copy.forward(h, xs)
        return h.sum(h.mul(out, out))

    assert gradcheck(fn, x, *values, wrt=[0])


def test_a_layer_over_an_nf4_weight_refuses_a_second_quantize_and_bad_weights() -> None:
    g = gl.Graph()
    weight = NF4Weight.quantize(np.ones((4, 6)))
    with pytest.raises(ValueError, match="already an NF4Weight; drop quantize"):
        gl.LoraLinear.from_linear(g, weight, None, gl.LoraConfig(rank=2), quantize="nf4")
    with pytest.raises(
        gl.ShapeError, match=re.escape("non-empty [out, in] matrix, got shape (24,)")
    ):
        gl.LoraLinear.from_linear(g, NF4Weight.quantize(np.ones(24)), None, gl.LoraConfig(rank=2))
    with pytest.raises(ValueError, match="quantize must be None, 'nf4'"):
        gl.LoraLinear.from_linear(g, np.ones((4, 6)), None, gl.LoraConfig(rank=2), quantize=4)
    w = g.parameter(np.ones((6, 4)))
    g.mul(w, w)  # on the tape
    before = len(g.leaves)
    with pytest.raises(
        gl.GraphError, match=re.escape("read by recorded ops; reset() before quantizing")
    ):
        gl.LoraLinear.from_linear(g, w, None, gl.LoraConfig(rank=2), quantize="nf4")
    assert len(g.leaves) == before and w.requires_grad  # nothing changed


def test_merging_over_nf4_dequantizes_a_copy_and_merge_in_place_says_dequantize_first() -> None:
    rng = np.random.default_rng(2)
    g = gl.Graph()
    w = rng.normal(size=(8, 6))
    config = gl.LoraConfig(rank=2, init="random", seed=0)
    layer = gl.LoraLinear.from_linear(g, w, rng.normal(size=6), config, quantize="nf4")
    dense = layer.base.dequantize(np.float64).T
    expected = dense + g.value(layer.lora_a) @ g.value(layer.lora_b) * layer.scaling
    np.testing.assert_allclose(layer.merge(g), expected, rtol=1e-12)
    message = (
        f"LoraLinear.merge_: {layer.name} holds its base weight in NF4, which cannot take the "
        "adapters in place; dequantize it first (layer.dequantize_(graph)), or use merge() or "
        "save_merged, which dequantize a copy"
    )
    with pytest.raises(gl.GraphError, match="^" + re.escape(message) + "$"):
        layer.merge_(g)
    x = g.constant(rng.normal(size=(3, 8)))
    before = np.array(g.value(layer.forward(g, x)))
    layer.dequantize_(g)
    assert layer.nf4 is None and layer.frozen_weight is not None
    np.testing.assert_array_equal(g.value(layer.frozen_weight), dense)
    np.testing.assert_allclose(g.value(layer.forward(g, x)), before, rtol=1e-12)
    layer.merge_(g)
    np.testing.assert_allclose(g.value(layer.forward(g, x)), before, rtol=1e-12)
    layer.dequantize_(g)  # a float base: nothing to do
    assert layer.merged


def test_save_merged_writes_the_dequantized_merged_weights(tmp_path: Path) -> None:
    g, model = _llama()
    adapters = gl.apply_lora(model, gl.LoraConfig(rank=2, init="random"), quantize="nf4")
    path = gl.save_merged(tmp_path / "merged.safetensors", g, model)
    saved = st_numpy.load_file(str(path))
    for name, layer in adapters.items():
        np.testing.assert_allclose(saved[f"{name}.weight"], layer.merge(g).T, rtol=1e-12)


# --- models ---------------------------------------------------------------------------------------


def test_quantize_turns_every_linear_but_the_head_to_nf4_and_releases_the_weights() -> None:
    g, model = _llama()
    ids = np.array([[1, 2, 3, 4, 5]])
    floats = {name: np.array(g.value(layer.weight)) for name, layer in _linears(model)}
    before = gl.nn.trainable_parameters(model).split("||")[1]
    leaves = len(g.leaves)
    quantized = gl.nf4.quantize_(model)
    assert sorted(quantized) == sorted(floats)
    assert len(quantized) == 2 * len(LINEARS)
    assert len(g.leaves) == leaves - len(quantized)  # one weight leaf each; no bias here
    assert isinstance(model.lm_head, gl.Linear)  # the head stays float, as bitsandbytes
    assert gl.nn.trainable_parameters(model).split("||")[1] == before  # still counted
    for name, layer in quantized.items():
        assert isinstance(layer, NF4Linear) and layer.name == name
        expected = NF4Weight.quantize(floats[name].T)
        np.testing.assert_array_equal(layer.weight.codes, expected.codes)
        np.testing.assert_allclose(layer.dequantize(), floats[name], atol=0.5)
    # the forward over the 4-bit layers equals a float model over the dequantized weights
    twin_g, twin = _llama()
    for name, layer in quantized.items():
        twin_layer = dict(_linears(twin))[name]
        twin_g.set_value(twin_layer.weight, layer.dequantize())
    np.testing.assert_allclose(
        g.value(model.forward(g, ids)), twin_g.value(twin.forward(twin_g, ids)), rtol=1e-10
    )


def _linears(model: Any) -> list[tuple[str, Any]]:
    return [
        (name, module)
        for name, module in gl.nn.named_modules(model)
        if isinstance(module, (gl.Linear, NF4Linear)) and name != "lm_head"
    ]


def test_quantize_refuses_before_changing_anything() -> None:
    g, model = _llama()
    q = model.model.layers[1].mlp.up_proj
    g.sum(q.weight)  # on the tape
    leaves = len(g.leaves)
    with pytest.raises(gl.GraphError, match=r"quantize_: the weights of \['model.layers.1.mlp"):
        gl.nf4.quantize_(model)
    assert len(g.leaves) == leaves and isinstance(model.model.layers[0].mlp.up_proj, gl.Linear)
    with pytest.raises(ValueError, match="quantize_: quantize must be 'nf4'"):
        gl.nf4.quantize_(model, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="quantize_: skip must be a list of layer names"):
        gl.nf4.quantize_(model, skip="lm_head")
    g.reset()
    assert len(gl.nf4.quantize_(model, skip=["lm_head", "down_proj"])) == 2 * 6


def test_apply_lora_quantizes_only_its_targets_and_refuses_lora_layers() -> None:
    _, model = _llama()
    adapters = gl.apply_lora(model, gl.LoraConfig(rank=2), ["q_proj", "v_proj"], quantize="nf4")
    assert all(layer.nf4 is not None for layer in adapters.values())
    assert isinstance(model.model.layers[0].self_attn.k_proj, gl.Linear)  # not targeted
    with pytest.raises(ValueError, match=r"quantize applies to base layers, and \[.*q_proj"):
        gl.apply_lora(model, gl.LoraConfig(rank=2), ["q_proj"], adapter_name="b", quantize="nf4")
    g2, other = _llama()
    gl.nf4.quantize_(other)
    more = gl.apply_lora(other, gl.LoraConfig(rank=2, use_dora=True), ["o_proj", "down_proj"])
    assert all(isinstance(layer.base, NF4Weight) for layer in more.values())
    g2.backward(g2.mean(other.forward(g2, np.array([[1, 2, 3]]))))
    assert all(g2.grad(p) is not None for layer in more.values() for p in layer.trainable_params())
    assert gl.nn.parameters(other) == [p for v in more.values() for p in v.trainable_params()]


def _save_llama(path: Path, seed: int = 0) -> None:
    g, model = _llama(seed)
    model.save_pretrained(g, path)


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_pretrained_quantizes_as_it_reads(tmp_path: Path, double_quant: bool) -> None:
    _save_llama(tmp_path / "llama")
    config = NF4Config(64, double_quant)
    g = gl.Graph()
    model = gl.from_pretrained(g, tmp_path / "llama", quantize=config)
    g_float = gl.Graph()
    reference = gl.from_pretrained(g_float, tmp_path / "llama")
    gl.nf4.quantize_(reference, config)
    for (name, mine), (_, theirs) in zip(_linears(model), _linears(reference), strict=True):
        assert isinstance(mine, NF4Linear)
        np.testing.assert_array_equal(mine.weight.codes, theirs.weight.codes, err_msg=name)
        np.testing.assert_array_equal(mine.weight.block_absmax(), theirs.weight.block_absmax())
    assert isinstance(model.lm_head, gl.Linear)
    assert not any(
        leaf.name and leaf.name.endswith("proj.weight") for leaf in g.leaves
    )  # no float copy of a linear weight was ever kept
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(
        g.value(model.forward(g, ids)), g_float.value(reference.forward(g_float, ids))
    )


def test_gpt_reads_as_nf4_with_its_conv1d_weights_quantized_out_in(tmp_path: Path) -> None:
    config = gl.GPTConfig(vocab_size=17, block_size=8, n_layer=1, n_head=2, n_embd=8)
    g = gl.Graph()
    gpt = gl.GPT.new(g, config, rng=0)
    gpt.save_pretrained(g, tmp_path / "gpt")
    g2 = gl.Graph()
    quantized = gl.from_pretrained(g2, tmp_path / "gpt", quantize="nf4")
    layer = quantized.transformer.h[0].attn.c_attn
    assert isinstance(layer, NF4Linear) and layer.fan_in_fan_out
    assert layer.weight.shape == (24, 8)  # [out, in], as bitsandbytes quantizes Conv1D too
    expected = NF4Weight.quantize(g.value(gpt.transformer.h[0].attn.c_attn.weight).T)
    np.testing.assert_array_equal(layer.weight.codes, expected.codes)
    adapters = gl.apply_lora(quantized, gl.LoraConfig(rank=2))
    assert adapters["transformer.h.0.attn.c_attn"].fan_in_fan_out


def test_training_an_adapter_over_nf4_replays_bit_for_bit() -> None:
    def train(replay: bool) -> list[float]:
        g, model = _llama(dtype=np.float32)
        adapters = gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0, seed=0), quantize="nf4")
        assert all(isinstance(layer.base, NF4Weight) for layer in adapters.values())
        opt = gl.optim.AdamW(g, gl.nn.parameters(model), lr=1e-2)
        ids, labels = np.array([[1, 2, 3, 4, 5, 6]]), np.array([2, 3, 4, 5, 6, 7])

        def loss() -> gl.NodeId:
            logits = model.forward(g, ids)
            return g.cross_entropy(g.reshape(logits, (6, TINY.vocab_size)), labels)

        step = g.compile(loss()) if replay else None
        losses = []
        for _ in range(8):
            if step is not None:
                losses.append(float(step()))
            else:
                out = loss()
                losses.append(float(g.value(out)))
                g.backward(out)
                g.reset()
            opt.step()
            opt.zero_grad()
        return losses

    recorded, replayed = train(False), train(True)
    assert recorded == replayed
    assert replayed[-1] < replayed[0]


# --- against bitsandbytes, transformers and PEFT --------------------------------------------------


@pytest.mark.crosscheck
@pytest.mark.parametrize(("shape", "block"), [((64, 192), 64), ((5, 7), 64), ((33, 100), 128)])
def test_codes_and_absmax_equal_bitsandbytes(shape: tuple[int, int], block: int) -> None:
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    w = (np.random.default_rng(0).normal(size=shape) * 0.02).astype(np.float32)
    packed, state = functional.quantize_4bit(torch.from_numpy(w), blocksize=block, quant_type="nf4")
    ours = NF4Weight.quantize(w, block_size=block)
    theirs = packed.numpy().ravel()
    np.testing.assert_array_equal(ours.codes.ravel()[: theirs.size], theirs)
    np.testing.assert_array_equal(ours.absmax, state.absmax.numpy())
    np.testing.assert_array_equal(
        functional.dequantize_4bit(packed, state).numpy(), ours.dequantize()
    )
    np.testing.assert_array_equal(functional.get_4bit_type("nf4", "cpu").numpy(), NF4_LEVELS)
    np.testing.assert_array_equal(functional.create_dynamic_map().numpy(), DYNAMIC_MAP)


@pytest.mark.crosscheck
def test_double_quantization_agrees_with_bitsandbytes_to_a_code_step() -> None:
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    w = (np.random.default_rng(0).normal(size=(2000, 300)) * 0.02).astype(np.float32)
    packed, state = functional.quantize_4bit(
        torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    ours = NF4Weight.quantize(w, double_quant=True)
    assert isinstance(ours.absmax, NestedAbsmax)
    np.testing.assert_array_equal(ours.codes.ravel(), packed.numpy().ravel())
    absmax = NF4Weight.quantize(w).absmax
    assert isinstance(absmax, np.ndarray)
    # the offset: PyTorch's float32 mean, ours exact then rounded: at most one unit apart
    offset = float(state.offset)
    assert abs(ours.absmax.offset - offset) <= np.spacing(np.float32(offset))
    theirs = (functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
    mine = ours.block_absmax()
    # bitsandbytes' CPU search may take the neighbour of the nearest code near a tie: where the
    # codes differ, ours is the nearer one, and the two are one code step apart at most
    same = ours.absmax.codes == state.absmax.numpy()
    assert same.mean() > 0.99
    assert np.all(np.abs(mine - absmax) <= np.abs(theirs - absmax) + 1e-7)
    blocks = np.arange(mine.size) // 256
    step = np.diff(DYNAMIC_MAP).max() * ours.absmax.scales[blocks]
    assert np.all(np.abs(mine - theirs) <= step * (1 + 1e-5) + 1e-9)


def _hf_llama_folder(path: Path) -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.crosscheck
@pytest.mark.parametrize("double_quant", [False, True])
def test_from_pretrained_nf4_holds_the_codes_transformers_load_in_4bit_holds(
    tmp_path: Path, double_quant: bool
) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    _hf_llama_folder(tmp_path / "hf")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", quantization_config=quantization, device_map="cpu"
    )
    g = gl.Graph(np.float32)
    ours = gl.from_pretrained(g, tmp_path / "hf", quantize=NF4Config(64, double_quant))
    count = 0
    for name, module in theirs.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        mine = dict(gl.nn.named_modules(ours))[name]
        assert isinstance(mine, NF4Linear), name
        np.testing.assert_array_equal(
            mine.weight.codes.ravel(), module.weight.data.numpy().ravel(), err_msg=name
        )
        if not double_quant:
            np.testing.assert_array_equal(mine.weight.absmax, module.weight.quant_state.absmax)
        count += 1
    assert count == 2 * 7  # every linear layer but the head, as ours
    assert type(theirs.lm_head).__name__ == "Linear" and isinstance(ours.lm_head, gl.Linear)


@pytest.mark.crosscheck
def test_an_adapter_trained_over_nf4_loads_onto_the_float_model_in_peft(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = _hf_llama_folder(tmp_path / "hf").double()
    g = gl.Graph()
    ours = gl.from_pretrained(g, tmp_path / "hf", quantize="nf4")
    adapters = gl.apply_lora(ours, gl.LoraConfig(rank=4, alpha=8.0, seed=0))
    opt = gl.optim.AdamW(g, gl.nn.parameters(ours), lr=1e-2)
    ids, labels = np.array([[3, 1, 4, 1, 5, 9, 2, 6]]), np.array([1, 4, 1, 5, 9, 2, 6, 5])
    for _ in range(5):
        logits = ours.forward(g, ids)
        g.backward(g.cross_entropy(g.reshape(logits, (8, 40)), labels))
        g.reset()
        opt.step()
        opt.zero_grad()
    assert all(np.abs(g.value(layer.lora_b)).max() > 0 for layer in adapters.values())
    gl.save_adapter(tmp_path / "adapter", g, ours)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == sorted(adapters)
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(ids)).logits.numpy()
    # the same adapter on graphlora's float model gives PEFT's logits
    g_float = gl.Graph()
    float_model = gl.from_pretrained(g_float, tmp_path / "hf")
    gl.apply_lora(float_model, gl.LoraConfig(rank=4, alpha=8.0))
    gl.load_adapter(tmp_path / "adapter", g_float, float_model)
    np.testing.assert_allclose(
        g_float.value(float_model.forward(g_float, ids)), theirs, rtol=1e-6, atol=1e-6
    )
    # over the 4-bit base the logits differ from the float model's by the quantization error
    difference = np.abs(g.value(ours.forward(g, ids)) - theirs).max()
    assert 1e-4 < difference < 0.1 * np.abs(theirs).max()


def test_pissa_over_a_quantized_base_quantizes_the_residual_and_releases_the_weight() -> None:
    rng = np.random.default_rng(4)
    g = gl.Graph()
    w = g.parameter(rng.normal(size=(10, 8)), "w")
    value = np.array(g.value(w))
    config = gl.LoraConfig(rank=2, init="pissa")
    layer = gl.LoraLinear.from_linear(g, w, None, config, quantize="nf4")
    assert w not in g.leaves and isinstance(layer.base, NF4Weight)
    delta = g.value(layer.lora_a) @ g.value(layer.lora_b) * layer.scaling
    residual = value - delta  # PiSSA's residual, then quantized
    np.testing.assert_array_equal(layer.base.codes, NF4Weight.quantize(residual.T).codes)
    # over the float weight, PiSSA leaves the given parameter frozen and in the graph
    w2 = g.parameter(value, "w2")
    gl.LoraLinear.from_linear(g, w2, None, config)
    assert w2 in g.leaves and not w2.requires_grad


def test_save_pretrained_of_a_4_bit_model_writes_the_dequantized_float_weights(
    tmp_path: Path,
) -> None:
    g, model = _llama()
    gl.nf4.quantize_(model, skip=[])
    adapters = gl.apply_lora(model, gl.LoraConfig(rank=2), ["q_proj"])
    model.save_pretrained(g, tmp_path / "saved")
    g2 = gl.Graph()
    again = gl.from_pretrained(g2, tmp_path / "saved")
    for name, module in _linears(again):
        source = dict(gl.nn.named_modules(model))[name]
        base = source.base if name in adapters else source.weight
        np.testing.assert_array_equal(g2.value(module.weight), base.dequantize(np.float64).T)
    ids = np.array([[1, 2, 3]])
    with gl.disable_adapters(model):
        expected = np.array(g.value(model.forward(g, ids)))
    np.testing.assert_allclose(g2.value(again.forward(g2, ids)), expected, rtol=1e-12)


# --- what the mutation run asked for: every branch and message seen -------------------------------


def test_dynamic_map_and_its_linspace_are_what_bitsandbytes_builds_by_hand() -> None:
    np.testing.assert_array_equal(nf4_module.dynamic_map(), DYNAMIC_MAP)  # rebuilt, not cached
    # torch.linspace(0.1, 1, 3) in float32: the middle point from the nearer end's float32 step
    points = nf4_module._linspace32(0.1, 1.0, 3)
    np.testing.assert_array_equal(points.astype(np.float32), np.float32([0.1, 0.55, 1.0]))
    for count in (2, 5, 9, 17, 33, 65):
        points = nf4_module._linspace32(0.1, 1.0, count)
        exact = np.linspace(0.1, 1.0, count)
        assert points[0] == np.float32(0.1) and points[-1] == 1.0
        assert np.all(np.abs(points - exact) <= np.spacing(np.float32(1.0)))
    # the 7 exponents of the signed map, 1 + 2 + ... + 64 values each sign
    magnitudes = np.abs(DYNAMIC_MAP[(DYNAMIC_MAP != 0) & (DYNAMIC_MAP != 1)])
    decades = np.floor(np.log10(magnitudes)).astype(int)
    counts = dict(zip(*np.unique(decades, return_counts=True), strict=True))
    assert counts == {-7: 2, -6: 4, -5: 8, -4: 16, -3: 32, -2: 64, -1: 128}
    # the middles of an even split of [0.1, 1]: the first of the 2-part split, scaled by 1e-5
    assert np.isclose(DYNAMIC_MAP, 1e-5 * 0.325, rtol=1e-6, atol=0).sum() == 1


def test_refusals_name_the_function_the_argument_and_what_was_given() -> None:
    good = NestedAbsmax.quantize(np.linspace(0, 1, 300, dtype=np.float32))
    weight = NF4Weight.quantize(np.ones((2, 4)), block_size=4)
    cases: list[tuple[Any, type[Exception], str]] = [
        (
            lambda: nf4_module.normal_float_levels("a"),
            TypeError,
            "normal_float_levels: offset must be a real scalar (int or float), got str: 'a'",
        ),
        (
            lambda: NestedAbsmax(good.codes, good.scales, "x"),
            TypeError,
            "NestedAbsmax: offset must be a real scalar (int or float), got str: 'x'",
        ),
        (
            lambda: NestedAbsmax(good.codes.astype(np.int16), good.scales, 0.0),
            TypeError,
            "NestedAbsmax: codes must be a 1-D uint8 array, got an ndarray of shape (300,) and "
            "dtype int16",
        ),
        (
            lambda: NestedAbsmax(good.codes.reshape(3, 100), good.scales, 0.0),
            TypeError,
            "NestedAbsmax: codes must be a 1-D uint8 array, got an ndarray of shape (3, 100)",
        ),
        (
            lambda: NestedAbsmax(good.codes, [1.0, 2.0], 0.0),
            TypeError,
            "NestedAbsmax: scales must be a float32 array, got list: [1.0, 2.0]",
        ),
        (
            lambda: NF4Weight(weight.codes.astype(np.int8), weight.absmax, (2, 4), 4),
            TypeError,
            "NF4Weight: codes must be a uint8 array, got an ndarray of shape (2, 2) and dtype int8",
        ),
        (
            lambda: NF4Weight(weight.codes, [1.0, 1.0], (2, 4), 4),
            TypeError,
            "NF4Weight: absmax must be a float32 array or a NestedAbsmax, got list: [1.0, 1.0]",
        ),
        (
            lambda: NF4Weight(weight.codes, np.float32([1.0, np.nan]), (2, 4), 4),
            ValueError,
            "NF4Weight: absmax must hold finite values >= 0",
        ),
        (
            lambda: NF4Weight(weight.codes[:, :1], weight.absmax, (2, 4), 4),
            gl.ShapeError,
            "NF4Weight: a weight of shape (2, 4) in blocks of 4 needs codes (2, 2)",
        ),
        (
            lambda: NF4Weight.quantize(np.ones(4), block_size="8"),
            TypeError,
            "NF4Weight.quantize: block_size must be an int, got '8'",
        ),
        (
            lambda: NF4Weight.quantize(np.ones(4), double_quant=1),
            TypeError,
            "NF4Weight.quantize: double_quant must be a bool, got int",
        ),
        (lambda: NF4Weight.quantize("w"), TypeError, "NF4Weight.quantize: weight"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match="^" + re.escape(message)):
            call()
    g = gl.Graph()
    a, b = g.constant(np.ones((4, 2))), g.constant(np.ones((2, 2)))
    norm = nf4_module.nf4_adapted_norm
    q = NF4Weight.quantize(np.ones((2, 4)))
    with pytest.raises(TypeError, match=re.escape("nf4_adapted_norm: scaling must be a real")):
        g.apply(norm, a, b, weight=q, scaling="x")
    with pytest.raises(TypeError, match=r"^nf4_adapted_norm: weight must be an NF4Weight"):
        g.apply(norm, a, b, weight=np.ones((2, 4)), scaling=1.0)
    flat = g.constant(np.ones(4))
    with pytest.raises(gl.ShapeError, match=r"^nf4_adapted_norm: a \[in, r\] and b \[r, out\]"):
        g.apply(norm, flat, b, weight=q, scaling=1.0)  # a is 1-D, b fits
    with pytest.raises(gl.ShapeError, match=r"^nf4_adapted_norm: a \[in, r\] and b \[r, out\]"):
        g.apply(norm, a, g.constant(np.ones(2)), weight=q, scaling=1.0)  # b is 1-D, a fits
    with pytest.raises(gl.ShapeError, match=r"^nf4_matmul: x \(4,\) needs a weight"):
        g.apply(nf4_module.nf4_matmul, flat, weight=NF4Weight.quantize(np.ones((3, 2))))


def test_the_edges_of_quantizing() -> None:
    top = float(np.finfo(np.float32).max)
    at_top = NF4Weight.quantize(np.array([top, -top / 2]), block_size=2)  # float32's largest
    assert at_top.absmax.tolist() == [top] and at_top.level_indices().tolist() == [[15, 2]]
    with pytest.raises(ValueError, match="beyond float32's range"):
        NF4Weight.quantize(np.array([2.0 * top]), block_size=2)
    q = NF4Weight.quantize(np.arange(6.0).reshape(2, 3), block_size=4)
    assert q.dequantize().dtype == np.float32 and q.dequantize(np.float64).dtype == np.float64
    assert repr(q) == "NF4Weight(shape=(2, 3), block_size=4, blocks=2, nbytes=12)"
    three = NF4Weight.quantize(np.ones((2, 3)), block_size=2)  # codes [3 blocks, 1 byte]
    assert repr(three) == "NF4Weight(shape=(2, 3), block_size=2, blocks=3, nbytes=15)"
    nested = NF4Weight.quantize(np.arange(6.0).reshape(2, 3), block_size=4, double_quant=True)
    assert repr(nested) == (
        "NF4Weight(shape=(2, 3), block_size=4, blocks=2, double_quant=True, nbytes=14)"
    )
    assert nested.block_absmax().dtype == np.float32 and nested.dequantize().dtype == np.float32
    empty = NestedAbsmax.quantize(np.zeros(0, np.float32))
    assert empty.codes.shape == (0,) and empty.scales.shape == (0,) and empty.offset == 0.0
    # a block of absmax values all equal to their mean: all code 0.0, all back exactly
    same = NestedAbsmax.quantize(np.full(10, 0.5, np.float32))
    assert same.dequantize().tolist() == [0.5] * 10 and set(DYNAMIC_MAP[same.codes]) == {0.0}
    # a value exactly between two levels takes the lower (as bitsandbytes)
    between = np.float32((DYNAMIC_MAP[200] + DYNAMIC_MAP[201]) / 2)
    tie = NestedAbsmax.quantize(np.array([0.0, 2 * between, 2.0], np.float32))  # offset ~
    assert tie.codes.dtype == np.uint8


def test_rows_of_a_one_column_weight_come_one_chunk_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = NF4Weight.quantize(np.arange(1.0, 6.0).reshape(5, 1), block_size=2)
    monkeypatch.setattr(nf4_module, "CHUNK_VALUES", 2)
    assert [(start, stop) for start, stop, _ in q.rows()] == [(0, 2), (2, 4), (4, 5)]
    monkeypatch.setattr(nf4_module, "CHUNK_VALUES", 1)
    chunks = list(q.rows())
    assert [(start, stop) for start, stop, _ in chunks] == [(i, i + 1) for i in range(5)]
    np.testing.assert_array_equal(np.concatenate([r for _, _, r in chunks]), q.dequantize())
    empty = NF4Weight.quantize(np.zeros((3, 0)), block_size=2)
    monkeypatch.setattr(nf4_module, "CHUNK_VALUES", 4)
    assert [(start, stop) for start, stop, _ in empty.rows()] == [(0, 3)]


def test_the_adapted_norm_s_gradient_at_small_and_zero_norms() -> None:
    # W's rows (outputs) 0.3 and 0: one norm below 1, one exactly 0 (no derivative: 0 there)
    q = NF4Weight.quantize(np.array([[0.3, 0.0, 0.0], [0.0, 0.0, 0.0]]), block_size=2)
    a, b = np.zeros((3, 1)), np.zeros((1, 2))
    g = gl.Graph()
    an, bn = g.parameter(a), g.parameter(b)
    norm = g.apply(nf4_module.nf4_adapted_norm, an, bn, weight=q, scaling=2.0)
    np.testing.assert_allclose(g.value(norm), [0.3, 0.0], rtol=1e-7)
    g.backward(g.sum(g.mul(norm, g.constant([1.0, 5.0]))))
    # d||w + 2 A b|| / dA at A = 0, b = 0: 2 (w / ||w||) b^T = 0 since b = 0; for b: 2 A^T w/|w|
    np.testing.assert_array_equal(g.grad(an), np.zeros((3, 1)))
    np.testing.assert_array_equal(g.grad(bn), np.zeros((1, 2)))
    a2 = np.array([[1.0], [0.0], [0.0]])
    h = gl.Graph()
    a2n, b2n = h.parameter(a2), h.parameter(b)
    norm2 = h.apply(nf4_module.nf4_adapted_norm, a2n, b2n, weight=q, scaling=2.0)
    h.backward(h.sum(h.mul(norm2, h.constant([1.0, 5.0]))))
    # column 0: w = (0.3, 0, 0), unit (1, 0, 0): dB[0, 0] = 2 * a . unit = 2; column 1: norm 0
    np.testing.assert_allclose(h.grad(b2n), [[2.0, 0.0]], rtol=1e-6)


def test_the_engine_s_release_and_readers_name_themselves() -> None:
    g, other = gl.Graph(), gl.Graph()
    foreign = other.constant(np.ones(2))
    for call, name, arg in [
        (g.release, "Graph.release", "leaf"),
        (g.readers, "Graph.readers", "node"),
    ]:
        with pytest.raises(TypeError, match=f"^{re.escape(name)}: {arg} must be a NodeId, got int"):
            call(3)  # type: ignore[arg-type]
        with pytest.raises(gl.ForeignNodeError, match=f"^{re.escape(name)}: {arg} NodeId"):
            call(foreign)
    leaf = g.constant(np.ones(2))
    g.release(leaf)
    message = (
        f"value: node {leaf!r} was released from the graph (Graph.release, as quantizing a layer "
        "does) and no longer exists"
    )
    with pytest.raises(gl.StaleNodeError, match="^" + re.escape(message) + "$"):
        g.value(leaf)


def test_a_layer_over_a_given_nf4_weight_keeps_it_and_its_settings() -> None:
    g = gl.Graph(np.float32)
    rng = np.random.default_rng(5)
    weight = NF4Weight.quantize(rng.normal(size=(1, 6)), block_size=4, double_quant=True)
    layer = gl.LoraLinear.from_linear(g, weight, None, gl.LoraConfig(rank=1), name="one")
    assert layer.base is weight  # not quantized again
    assert layer.base_weight(g).dtype == np.float32 and layer.base_weight(g).shape == (6, 1)
    x = g.constant(rng.normal(size=(2, 6)))
    assert g.value(layer.forward(g, x)).dtype == np.float32
    # PiSSA over a given NF4 weight: the residual is quantized with the same settings
    square = NF4Weight.quantize(rng.normal(size=(6, 6)), block_size=4, double_quant=True)
    pissa = gl.LoraLinear.from_linear(g, square, None, gl.LoraConfig(rank=2, init="pissa"))
    assert isinstance(pissa.base, NF4Weight) and pissa.base is not square
    assert pissa.base.block_size == 4 and pissa.base.double_quant
    # quantize= with a block size of its own is honoured
    sized = gl.LoraLinear.from_linear(
        g, rng.normal(size=(8, 4)), None, gl.LoraConfig(rank=2), quantize=NF4Config(8)
    )
    assert sized.base.block_size == 8 and not sized.base.double_quant
    with pytest.raises(ValueError, match=r"^LoraLinear.from_linear: quantize must be None"):
        gl.LoraLinear.from_linear(
            g, rng.normal(size=(8, 4)), None, quantize="int4"
        )  # checked first
    # dequantize_: a float constant in the layer's scope, under the layer's name
    layer.dequantize_(g)
    assert layer.frozen_weight is not None
    assert layer.frozen_weight.name == "one.weight" and layer.frozen_weight.scope == "one/frozen"
    assert layer.frozen_weight.dtype == np.float32
    with pytest.raises(TypeError, match=r"^LoraLinear.dequantize_: graph must be a Graph"):
        layer.dequantize_(None)  # type: ignore[arg-type]
    biased = gl.LoraLinear.from_linear(g, weight, np.ones(1), gl.LoraConfig(rank=1), name="b")
    assert biased.bias is not None and biased.bias.name == "b.bias"
    assert np.allclose(
        g.value(biased.base_forward(g, x)), g.value(layer.base_forward(g, x)) + 1.0, atol=1e-6
    )
