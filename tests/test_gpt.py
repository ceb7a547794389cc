"""GPT: transformers' GPT-2 names and maths, checkpoints written by save_pretrained read with
safetensors (refusing what does not fit, half-loading nothing), LoRA on it, and adapter files that
PEFT loads onto transformers' GPT2LMHeadModel, and the reverse."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import graphlora as gl
from graphlora.testing import gradcheck

st_numpy = pytest.importorskip("safetensors.numpy")

TINY = gl.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=4)


def _write_checkpoint(
    directory: Path, config: gl.GPTConfig, *, prefix: str = "transformer.", **changes: Any
) -> dict[str, np.ndarray]:
    """A directory as transformers' save_pretrained writes it for GPT-2, with random weights;
    ``changes`` edit the config.json (``None`` removes a key)."""
    rng = np.random.default_rng(0)
    tensors = {
        name.replace("transformer.", prefix, 1): rng.normal(0, 0.3, size=shape).astype(np.float32)
        for name, shape in config.shapes().items()
    }
    raw = {
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_inner": None,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "tie_word_embeddings": True,
    }
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))
    st_numpy.save_file(tensors, str(directory / "model.safetensors"))
    return tensors


# --- config and structure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_embd": 6, "n_head": 4}, ValueError, "GPTConfig: n_embd 6 must divide by n_head 4"),
        ({"n_layer": 0}, ValueError, "GPTConfig: n_layer must be >= 1, got 0"),
        ({"vocab_size": 2.5}, TypeError, "GPTConfig: vocab_size must be an int, got 2.5"),
        ({"seed": -1}, ValueError, "GPTConfig: seed must be >= 0, got -1"),
        ({"seed": 1.0}, TypeError, "GPTConfig: seed must be an int or None, got 1.0"),
        ({"dropout": 1.0}, ValueError, r"GPTConfig: dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_config_refuses_bad_sizes(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        gl.GPTConfig(**kwargs)


def test_the_tree_has_transformers_names_and_the_head_is_tied() -> None:
    g = gl.Graph()
    model = gl.GPT.new(g, TINY, rng=0)
    names = [name for name, _ in gl.nn.named_modules(model)]
    assert names[:8] == [
        "",
        "transformer",
        "transformer.wte",
        "transformer.wpe",
        "transformer.h.0",
        "transformer.h.0.ln_1",
        "transformer.h.0.attn",
        "transformer.h.0.attn.c_attn",
    ]
    assert names[-2:] == ["transformer.ln_f", "lm_head"]
    state = gl.nn.state_dict(g, model)
    assert {k: v.shape for k, v in state.items()} == TINY.shapes()  # lm_head has no leaf of its own
    assert model.lm_head.forward(g, g.constant(np.eye(4))).shape == (4, 11)


def test_forward_shapes_and_refusals() -> None:
    g = gl.Graph()
    model = gl.GPT.new(g, TINY, rng=0)
    assert model.forward(g, np.array([[1, 2, 3]])).shape == (1, 3, 11)
    assert model.forward(g, np.array([1, 2, 3, 4])).shape == (4, 11)  # unbatched
    with pytest.raises(
        ValueError, match=r"GPT\.forward: a sequence of 9 tokens is longer than block_size 8"
    ):
        model.forward(g, np.zeros((1, 9), dtype=int))
    with pytest.raises(ValueError, match=r"embedding: id 11 is out of range for 11 embeddings"):
        model.forward(g, np.array([[0, 11]]))


def test_gradients_of_a_tiny_gpt_pass_gradcheck() -> None:
    ids = np.array([[1, 3, 5], [2, 2, 7]])
    g0 = gl.Graph()
    state = gl.nn.state_dict(g0, gl.GPT.new(g0, TINY, rng=1))
    names = [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.ln_2.weight",
        "transformer.wpe.weight",
    ]

    def loss(g: gl.Graph, *nodes: gl.NodeId) -> gl.NodeId:
        replica = gl.GPT.new(g, TINY, rng=1)  # the same weights: the same seed
        modules = dict(gl.nn.named_modules(replica))
        for name, node in zip(names, nodes, strict=True):  # these weights are the checked inputs
            owner, attr = name.rsplit(".", 1)
            setattr(modules[owner], attr, node)
        return g.cross_entropy(replica.forward(g, ids), ids)

    assert gradcheck(loss, *(state[n] for n in names), mode="fast")


def test_a_replayed_lora_training_step_equals_recording_it_again() -> None:
    ids = np.array([[1, 3, 5, 7], [2, 2, 7, 0]])

    def train(replay: bool) -> list[np.ndarray]:
        g = gl.Graph()
        model = gl.GPT.new(g, TINY, rng=2)
        gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0, seed=0, init="kaiming"))
        opt = gl.optim.Adam(g, gl.nn.parameters(model), lr=0.05)
        tokens = g.constant(ids[:, :-1])
        targets = g.constant(ids[:, 1:])
        step = (
            g.compile(g.cross_entropy(model.forward(g, tokens, fused=True), targets))
            if replay
            else None
        )
        for _ in range(3):
            if step is not None:
                step()
            else:
                g.backward(g.cross_entropy(model.forward(g, tokens, fused=True), targets))
                g.reset()
            opt.step()
            opt.zero_grad()
        return [np.array(g.value(p)) for p in gl.nn.parameters(model)]

    for recorded, replayed in zip(train(False), train(True), strict=True):
        np.testing.assert_array_equal(recorded, replayed)


# --- reading checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_from_pretrained_reads_what_was_written(tmp_path: Path, prefix: str) -> None:
    tensors = _write_checkpoint(tmp_path / "gpt", TINY, prefix=prefix)
    g = gl.Graph(np.float32)
    model = gl.GPT.from_pretrained(g, tmp_path / "gpt")
    assert model.config == TINY  # dropout 0 whatever the file's *_pdrop: transformers' eval()
    trained = gl.GPT.from_pretrained(gl.Graph(), tmp_path / "gpt", dropout=0.25, seed=3)
    assert trained.config == gl.GPTConfig(**{**TINY.__dict__, "dropout": 0.25, "seed": 3})
    state = gl.nn.state_dict(g, model)
    for name, array in tensors.items():
        key = name if name.startswith("transformer.") else f"transformer.{name}"
        np.testing.assert_array_equal(state[key], array)
    assert all(leaf.requires_grad for _, leaf in gl.nn.named_leaves(model))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "llama"}, r"is a 'llama' model; graphlora reads GPT-2 \('gpt2'\)"),
        (
            {"activation_function": "relu"},
            r"has activation_function='relu'; graphlora's GPT supports 'gelu_new'",
        ),
        ({"add_cross_attention": True}, "has add_cross_attention=True"),
        ({"tie_word_embeddings": False}, "has tie_word_embeddings=False"),
        ({"n_inner": 7}, "has n_inner=7; graphlora's GPT is 4 x n_embd wide"),
        ({"n_head": 3}, "n_embd 4 must divide by n_head 3"),
        ({"n_embd": {}}, r"config.json: GPTConfig: n_embd must be an int, got \{\}"),
        (
            {"n_layer": 10**9},
            r"the config says n_layer=1000000000 but .*model.safetensors holds layers 0..1$",
        ),
        ({"n_layer": 1}, r"the config says n_layer=1 but .* holds layers 0..1$"),
        ({"attn_pdrop": [0.1], "n_inner": None}, None),  # read as eval(): the *_pdrop are not used
    ],
)
def test_from_pretrained_refuses_configs_it_cannot_honour(
    tmp_path: Path, change: dict[str, Any], match: str | None
) -> None:
    _write_checkpoint(tmp_path / "gpt", TINY, **change)
    g = gl.Graph()
    if match is None:
        assert gl.GPT.from_pretrained(g, tmp_path / "gpt").config == TINY
        return
    with pytest.raises(ValueError, match=r"^GPT.from_pretrained: .*" + match):
        gl.GPT.from_pretrained(g, tmp_path / "gpt")
    assert len(g) == 0  # nothing half-loaded


def test_from_pretrained_refuses_missing_and_misshaped_tensors_and_pickles(tmp_path: Path) -> None:
    g = gl.Graph()
    with pytest.raises(FileNotFoundError, match=r"GPT\.from_pretrained: .* is not a directory"):
        gl.GPT.from_pretrained(g, tmp_path / "nowhere")
    tensors = _write_checkpoint(tmp_path / "gpt", TINY)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.wpe.weight"] = np.zeros((9, 4), np.float32)
    tensors["transformer.h.0.extra.weight"] = np.zeros(2, np.float32)
    st_numpy.save_file(tensors, str(tmp_path / "gpt" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit its config") as info:
        gl.GPT.from_pretrained(g, tmp_path / "gpt")
    message = str(info.value)
    assert "missing ['transformer.h.1.mlp.c_fc.bias']" in message
    assert "unexpected ['transformer.h.0.extra.weight']" in message
    assert "wrong shapes ['transformer.wpe.weight (9, 4) (needs (8, 4))']" in message
    assert len(g) == 0
    (tmp_path / "gpt" / "model.safetensors").unlink()
    (tmp_path / "gpt" / "pytorch_model.bin").write_bytes(b"\x80\x04not opened")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is a pickle file"):
        gl.GPT.from_pretrained(g, tmp_path / "gpt")
    (tmp_path / "gpt" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        gl.GPT.from_pretrained(g, tmp_path / "gpt")
    assert len(g) == 0


def test_from_pretrained_refuses_non_float_and_doubled_tensors_before_any_leaf(
    tmp_path: Path,
) -> None:
    tensors = _write_checkpoint(tmp_path / "gpt", TINY)
    tensors["transformer.h.0.ln_1.bias"] = np.zeros(4, np.int32)
    tensors["wte.weight"] = tensors["transformer.wte.weight"]  # the same weight under two keys
    st_numpy.save_file(tensors, str(tmp_path / "gpt" / "model.safetensors"))
    g = gl.Graph()
    with pytest.raises(ValueError, match=r"does not fit its config") as info:
        gl.GPT.from_pretrained(g, tmp_path / "gpt")
    message = str(info.value)
    assert message.startswith("GPT.from_pretrained: ")
    assert "not a float type ['transformer.h.0.ln_1.bias (I32)']" in message
    assert "two keys for one weight ['transformer.wte.weight and wte.weight']" in message
    assert len(g) == 0
    (tmp_path / "gpt" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match=r"GPT\.from_pretrained: .* is not a readable safetensors"):
        gl.GPT.from_pretrained(g, tmp_path / "gpt")
    assert len(g) == 0


@pytest.mark.parametrize("bad", ["nan", "inf", "truncated", "huge header", "pickle", "deep json"])
def test_from_pretrained_refuses_hostile_files_before_any_leaf(tmp_path: Path, bad: str) -> None:
    tensors = _write_checkpoint(tmp_path / "gpt", TINY)
    file = tmp_path / "gpt" / "model.safetensors"
    if bad in ("nan", "inf"):
        tensors["transformer.h.1.mlp.c_fc.weight"][2, 3] = np.nan if bad == "nan" else -np.inf
        st_numpy.save_file(tensors, str(file))
        match = r"model.safetensors holds NaN or Inf in \['transformer.h.1.mlp.c_fc.weight'\]$"
    elif bad == "truncated":
        file.write_bytes(file.read_bytes()[:-10])
        match = "is not a readable safetensors file"
    elif bad == "huge header":
        file.write_bytes((2**62).to_bytes(8, "little") + b"{}")
        match = "is not a readable safetensors file"
    elif bad == "pickle":
        file.write_bytes(pickle.dumps({"transformer.wte.weight": [1.0]}))
        match = "is not a readable safetensors file"
    else:
        (tmp_path / "gpt" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
        match = "config.json is nested too deeply to be a config"
    g = gl.Graph()
    with pytest.raises(ValueError, match=r"^GPT\.from_pretrained: .*" + match):
        gl.GPT.from_pretrained(g, tmp_path / "gpt")
    assert len(g) == 0


def _save_bfloat16(tensors: dict[str, np.ndarray], file: Path) -> dict[str, np.ndarray]:
    """Write ``tensors`` as a bfloat16 safetensors file by hand (its format: an 8-byte header
    length, a JSON header, the data), keeping each float32's top 16 bits; return the values
    that bfloat16 holds, as float32."""
    header: dict[str, Any] = {}
    chunks, offset, held = [], 0, {}
    for name, value in tensors.items():
        top = (np.ascontiguousarray(value, np.float32).view("<u4") >> 16).astype("<u2")
        held[name] = (top.astype("<u4") << 16).view("<f4")
        data = top.tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))
    return held


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_pretrained_reads_a_bfloat16_checkpoint_exactly(tmp_path: Path, dtype: Any) -> None:
    tensors = _write_checkpoint(tmp_path / "gpt", TINY)
    held = _save_bfloat16(tensors, tmp_path / "gpt" / "model.safetensors")
    assert any(not np.array_equal(held[n], tensors[n]) for n in tensors)  # bfloat16 rounds
    g = gl.Graph(dtype)
    state = gl.nn.state_dict(g, gl.GPT.from_pretrained(g, tmp_path / "gpt"))
    for name, value in held.items():
        assert state[name].dtype == dtype
        np.testing.assert_array_equal(state[name], value)  # widened exactly
    held["transformer.wpe.weight"][1, 2] = np.inf
    _save_bfloat16(held, tmp_path / "gpt" / "model.safetensors")
    h = gl.Graph()
    with pytest.raises(ValueError, match=r"holds NaN or Inf in \['transformer.wpe.weight'\]"):
        gl.GPT.from_pretrained(h, tmp_path / "gpt")
    assert len(h) == 0


@pytest.mark.crosscheck
def test_a_bfloat16_checkpoint_reads_as_pytorch_widens_it(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    tensors = _write_checkpoint(tmp_path / "gpt", TINY)
    stored = {name: torch.tensor(value).to(torch.bfloat16) for name, value in tensors.items()}
    st_torch.save_file(stored, str(tmp_path / "gpt" / "model.safetensors"))
    g = gl.Graph(np.float32)
    state = gl.nn.state_dict(g, gl.GPT.from_pretrained(g, tmp_path / "gpt"))
    for name, value in stored.items():
        np.testing.assert_array_equal(state[name], value.float().numpy())


# --- against transformers and PEFT --------------------------------------------------------------------


def _hf_model(config: Any) -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    with torch.no_grad():  # biases and layer norms away from their init, so that they count
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


HF_TINY = {"vocab_size": 40, "n_positions": 12, "n_embd": 8, "n_layer": 2, "n_head": 2}


@pytest.mark.crosscheck
def test_logits_equal_transformers_gpt2_in_float64(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = _hf_model(HF_TINY)
    model.save_pretrained(tmp_path / "hf")
    g = gl.Graph()
    ours = gl.GPT.from_pretrained(g, tmp_path / "hf")
    ids = np.array([[1, 5, 7, 3, 39, 0, 12], [2, 2, 2, 2, 2, 2, 2]])
    with g.no_grad():  # dropout off, as transformers' eval()
        logits = g.value(ours.forward(g, ids))
    with torch.no_grad():
        expected = model.double()(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.crosscheck
def test_a_gpt2_small_sized_checkpoint_loads_and_runs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # 124M parameters
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    model.save_pretrained(tmp_path / "small")
    ids = np.array([[464, 2068, 7586, 21831, 18045]])
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    del model
    g = gl.Graph(np.float32)
    ours = gl.GPT.from_pretrained(g, tmp_path / "small")
    assert gl.nn.trainable_parameters(ours).startswith("trainable params: 124,439,808 ||")
    with g.no_grad():
        logits = g.value(ours.forward(g, ids))
    assert logits.shape == (1, 5, 50257)
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)  # float32 on both sides


@pytest.mark.crosscheck
def test_peft_loads_a_graphlora_gpt_adapter_and_gives_the_same_logits(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = _hf_model(HF_TINY)
    model.save_pretrained(tmp_path / "hf")
    g = gl.Graph()
    ours = gl.GPT.from_pretrained(g, tmp_path / "hf")
    adapters = gl.apply_lora(ours, gl.LoraConfig(rank=2, alpha=4.0, seed=0), ["c_attn", "mlp.c_fc"])
    rng = np.random.default_rng(1)
    for layer in adapters.values():  # trained-looking adapters
        g.set_value(layer.lora_b, rng.normal(0, 0.5, size=(2, layer.out_features)))
    gl.save_adapter(tmp_path / "adapter", g, ours)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert config["target_modules"] == sorted(adapters)
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        base = model.double()(torch.from_numpy(ids)).logits.numpy()
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(ids)).logits.numpy()
    with g.no_grad():
        logits = g.value(ours.forward(g, ids))
    np.testing.assert_allclose(logits, expected, rtol=1e-9, atol=1e-12)
    assert np.abs(base - expected).max() > 1e-3  # the adapter really changes the logits


@pytest.mark.crosscheck
def test_graphlora_loads_a_peft_gpt2_adapter(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = _hf_model(HF_TINY)
    model.save_pretrained(tmp_path / "hf")
    peft_config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    peft_model = peft.get_peft_model(model, peft_config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = np.array([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        expected = peft_model.double().eval()(torch.from_numpy(ids)).logits.numpy()
    g = gl.Graph()
    ours = gl.GPT.from_pretrained(g, tmp_path / "hf")
    gl.apply_lora(ours, gl.LoraConfig(rank=2, alpha=8.0))
    gl.load_adapter(tmp_path / "peft", g, ours)
    with g.no_grad():
        logits = g.value(ours.forward(g, ids))
    np.testing.assert_allclose(logits, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.crosscheck
def test_dora_on_conv1d_and_lora_on_the_token_embedding_both_ways_with_peft(
    tmp_path: Path,
) -> None:
    """GPT-2's Conv1D stores [in, out] (fan_in_fan_out): DoRA's norms must run over the right
    axis; wte is tied to the head, which keeps the base table as in PEFT."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = _hf_model(HF_TINY)
    model.save_pretrained(tmp_path / "hf")
    g = gl.Graph()
    ours = gl.GPT.from_pretrained(g, tmp_path / "hf")
    gl.apply_lora(ours, gl.LoraConfig(rank=2, alpha=4.0, use_dora=True, seed=0), ["c_attn"])
    gl.apply_lora(ours, gl.LoraConfig(rank=2, alpha=4.0, seed=1), ["wte"], adapter_name="emb")
    gl.set_adapter(ours, ["default", "emb"])
    rng = np.random.default_rng(1)
    for layer in gl.nn.lora_layers(ours).values():
        for update in layer.adapters.values():
            for leaf in update.params():
                g.set_value(leaf, g.value(leaf) + rng.normal(0, 0.3, size=leaf.shape))
    gl.save_adapter(tmp_path / "adapter", g, ours)
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    with g.no_grad():
        logits = g.value(ours.forward(g, ids))
    peft_model = peft.PeftModel.from_pretrained(model.double(), tmp_path / "adapter")
    peft_model.load_adapter(tmp_path / "adapter" / "emb", adapter_name="emb")
    peft_model.base_model.set_adapter(["default", "emb"])
    with torch.no_grad():
        expected = peft_model.eval()(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-9, atol=1e-12)
    # and back: PEFT's files into a fresh GPT with the same adapters
    peft_model.save_pretrained(tmp_path / "peft")
    g2 = gl.Graph()
    twin = gl.GPT.from_pretrained(g2, tmp_path / "hf")
    gl.apply_lora(twin, gl.LoraConfig(rank=2, alpha=4.0, use_dora=True), ["c_attn"])
    gl.apply_lora(twin, gl.LoraConfig(rank=2, alpha=4.0), ["wte"], adapter_name="emb")
    gl.set_adapter(twin, ["default", "emb"])
    gl.load_adapter(tmp_path / "peft", g2, twin)
    gl.load_adapter(tmp_path / "peft", g2, twin, adapter_name="emb")
    with g2.no_grad():
        np.testing.assert_allclose(g2.value(twin.forward(g2, ids)), expected, rtol=1e-9, atol=1e-12)
