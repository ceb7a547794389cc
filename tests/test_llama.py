"""Llama, Mistral and Qwen2: transformers' names and maths (against a NumPy reference written
head by head here, and against transformers itself), checkpoints read all or nothing (single,
sharded, bfloat16/float16), forward with padding masks, generation with a KV cache, and whole
models written back for transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import graphlora as gl
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


def _model(config: gl.LlamaConfig = TINY, *, seed: int = 0, std: float = 0.3) -> tuple[Any, Any]:
    """A graph and a Llama with random weights (norm weights and biases random too)."""
    rng = np.random.default_rng(seed)
    g = gl.Graph()
    model = gl.Llama(g, config, lambda name, shape: rng.normal(0, std, size=shape))
    return g, model


# --- a NumPy reference, head by head ---------------------------------------------------------------


def _reference_logits(
    g: gl.Graph,
    model: gl.Llama,
    ids: np.ndarray,
    positions: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """Llama's forward for ids [B, T] written out with loops over heads: each query head h uses
    key/value head h // group (transformers' repeat_kv), rotate_half rotary embeddings, a causal
    mask with padding and sliding windows, SwiGLU, RMS norms."""
    c = model.config
    state = gl.nn.state_dict(g, model)
    batch, t = ids.shape
    positions = np.broadcast_to(np.arange(t), (batch, t)) if positions is None else positions
    keep = np.ones((batch, t), bool) if keep is None else keep
    d, heads, kv = c.head_size, c.num_attention_heads, c.key_value_heads

    def norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + c.rms_norm_eps) * w

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        y = x @ state[f"{name}.weight"]
        return y + state[f"{name}.bias"] if f"{name}.bias" in state else y

    def rotate(x: np.ndarray, pos: np.ndarray) -> np.ndarray:  # x [T, d], pos [T]
        inv = 1.0 / c.rope_theta ** (np.arange(0, d, 2) / d)
        angles = np.concatenate([pos[:, None] * inv, pos[:, None] * inv], axis=-1)
        rotated = np.concatenate([-x[:, d // 2 :], x[:, : d // 2]], axis=-1)
        return x * np.cos(angles) + rotated * np.sin(angles)

    x = state["model.embed_tokens.weight"][ids]
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}"
        h = norm(x, state[f"{p}.input_layernorm.weight"])
        q = linear(h, f"{p}.self_attn.q_proj")
        k = linear(h, f"{p}.self_attn.k_proj")
        v = linear(h, f"{p}.self_attn.v_proj")
        window = c.window(layer)
        out = np.zeros((batch, t, heads * d))
        for b in range(batch):
            for head in range(heads):
                share = head // (heads // kv)
                qh = rotate(q[b, :, head * d : (head + 1) * d], positions[b])
                kh = rotate(k[b, :, share * d : (share + 1) * d], positions[b])
                vh = v[b, :, share * d : (share + 1) * d]
                scores = qh @ kh.T / np.sqrt(d)
                i, j = np.arange(t)[:, None], np.arange(t)[None, :]
                allowed = (j <= i) & keep[b][None, :]
                if window is not None:
                    allowed &= i - j < window
                scores = np.where(allowed, scores, -np.inf)
                top = np.max(scores, axis=-1, keepdims=True)
                top[~np.isfinite(top)] = 0.0
                weights = np.exp(scores - top)
                total = weights.sum(-1, keepdims=True)
                weights = weights / np.where(total == 0, 1.0, total)
                out[b, :, head * d : (head + 1) * d] = weights @ vh
        x = x + linear(out, f"{p}.self_attn.o_proj")
        h = norm(x, state[f"{p}.post_attention_layernorm.weight"])
        gate = linear(h, f"{p}.mlp.gate_proj")
        x = x + linear(
            gate / (1 + np.exp(-gate)) * linear(h, f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj"
        )
    x = norm(x, state["model.norm.weight"])
    head = (
        state["model.embed_tokens.weight"].T if c.tie_word_embeddings else state["lm_head.weight"]
    )
    return np.asarray(x @ head)


CONFIGS = {
    "llama GQA": TINY,
    "tied, biases, head_dim": gl.LlamaConfig(
        vocab_size=19,
        hidden_size=12,
        intermediate_size=10,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=6,
        max_position_embeddings=16,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
    ),
    "qwen2 biases, sliding window": gl.LlamaConfig(
        vocab_size=17,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        qkv_bias=True,
        sliding_window=3,
        layer_types=("full_attention", "sliding_attention"),
        model_type="qwen2",
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@given(data=st.data())
def test_forward_equals_a_head_by_head_numpy_reference(name: str, data: st.DataObject) -> None:
    config = CONFIGS[name]
    g, model = _model(config, seed=data.draw(st.integers(0, 9), label="seed"))
    batch = data.draw(st.integers(1, 2), label="batch")
    t = data.draw(st.integers(1, 7), label="T")
    ids = np.array(
        data.draw(
            st.lists(
                st.lists(st.integers(0, config.vocab_size - 1), min_size=t, max_size=t),
                min_size=batch,
                max_size=batch,
            ),
            label="ids",
        )
    )
    logits = g.value(model.forward(g, ids))
    np.testing.assert_allclose(logits, _reference_logits(g, model, ids), rtol=1e-10, atol=1e-12)


@given(data=st.data())
def test_left_padding_with_its_mask_gives_each_row_its_unpadded_logits(
    data: st.DataObject,
) -> None:
    g, model = _model(CONFIGS["qwen2 biases, sliding window"])
    t = data.draw(st.integers(1, 6), label="T")
    pads = data.draw(st.lists(st.integers(0, 4), min_size=2, max_size=2), label="pads")
    rows = [data.draw(st.lists(st.integers(0, 16), min_size=t, max_size=t)) for _ in pads]
    width = t + max(pads)
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for b, row in enumerate(rows):
        ids[b, width - t :] = row
        mask[b, width - t :] = 1
    logits = g.value(model.forward(g, ids, attention_mask=mask))
    for b, row in enumerate(rows):
        alone = g.value(model.forward(g, np.array(row)))
        np.testing.assert_allclose(logits[b, width - t :], alone, rtol=1e-10, atol=1e-12)
    keep = mask.astype(bool)
    positions = np.cumsum(keep, -1) - 1
    np.testing.assert_allclose(
        logits[keep],
        _reference_logits(g, model, ids, np.where(keep, positions, 1), keep)[keep],
        rtol=1e-10,
        atol=1e-12,
    )


def test_the_tree_has_transformers_names() -> None:
    g, model = _model()
    names = [name for name, _ in gl.nn.named_modules(model)]
    assert names[:8] == [
        "",
        "model",
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.0.input_layernorm",
        "model.layers.0.self_attn",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]
    assert names[-2:] == ["model.norm", "lm_head"]
    state = gl.nn.state_dict(g, model)
    assert {name: value.shape for name, value in state.items()} == TINY.shapes()
    assert state["model.layers.1.self_attn.k_proj.weight"].shape == (16, 8)  # 2 kv heads of 4


@pytest.mark.parametrize("name", ["tied, biases, head_dim", "qwen2 biases, sliding window"])
def test_gradients_of_a_tiny_llama_pass_gradcheck(name: str) -> None:
    config = CONFIGS[name]
    ids = np.array([[1, 5, 2, 7], [3, 3, 0, 1]])
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]])
    g0, model0 = _model(config, std=0.5)
    state = gl.nn.state_dict(g0, model0)
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.norm.weight",
    ]

    def loss(g: gl.Graph, *nodes: gl.NodeId) -> gl.NodeId:
        replica = gl.Llama(g, config, lambda name, shape: state[name])
        modules = dict(gl.nn.named_modules(replica))
        for name, node in zip(names, nodes, strict=True):
            owner, attr = name.rsplit(".", 1)
            setattr(modules[owner], attr, node)
        logits = replica.forward(g, ids, attention_mask=mask)
        return g.cross_entropy(g.reshape(logits, (-1, config.vocab_size)), ids.ravel())

    assert gradcheck(loss, *(state[n] for n in names), mode="fast")


def test_config_refuses_heads_that_do_not_group_and_odd_heads() -> None:
    with pytest.raises(ValueError, match="num_attention_heads 4 must be a multiple of"):
        gl.LlamaConfig(num_attention_heads=4, num_key_value_heads=3, hidden_size=16)
    with pytest.raises(ValueError, match="head_dim 3 must be even"):
        gl.LlamaConfig(num_attention_heads=2, num_key_value_heads=1, hidden_size=6)
    with pytest.raises(ValueError, match="rope_type 'yarn' is not implemented"):
        gl.LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="llama3 rope scaling needs low_freq_factor"):
        gl.LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 2.0})


def test_forward_refuses_long_sequences_bad_ids_and_masks() -> None:
    g, model = _model()
    with pytest.raises(ValueError, match="33 tokens is longer than max_position_embeddings 32"):
        model.forward(g, np.zeros(33, np.int64))
    with pytest.raises(ValueError, match="embedding: id 23 is out of range"):
        model.forward(g, np.array([1, 23]))
    with pytest.raises(gl.ShapeError, match="attention_mask has shape \\(3,\\)"):
        model.forward(g, np.array([1, 2]), attention_mask=np.ones(3))
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        model.forward(g, np.array([1, 2]), attention_mask=np.array([1, 2]))


# --- checkpoints ----------------------------------------------------------------------------------


def _config_json(config: gl.LlamaConfig, **changes: Any) -> dict[str, Any]:
    raw = config.to_json()
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def _write(
    directory: Path,
    config: gl.LlamaConfig = TINY,
    *,
    dtype: Any = np.float32,
    shards: int = 1,
    **changes: Any,
) -> dict[str, np.ndarray]:
    """A folder as transformers writes it: weights [out, in], config.json; ``shards`` > 1 writes
    model-0000k-of-0000n.safetensors files and their index."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in config.shapes().items():
        stored = shape[::-1] if name.endswith("_proj.weight") or name == "lm_head.weight" else shape
        tensors[name] = rng.normal(0, 0.3, size=stored).astype(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(_config_json(config, **changes)))
    if shards == 1:
        st_numpy.save_file(tensors, str(directory / "model.safetensors"))
        return tensors
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::shards]}
        st_numpy.save_file(part, str(directory / file))
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return tensors


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_from_pretrained_reads_single_and_sharded_files(
    tmp_path: Path, shards: int, dtype: Any
) -> None:
    tensors = _write(tmp_path, dtype=dtype, shards=shards)
    g = gl.Graph()
    model = gl.from_pretrained(g, tmp_path)
    assert isinstance(model, gl.Llama)
    assert model.config == TINY
    state = gl.nn.state_dict(g, model)
    for name, value in tensors.items():
        expected = value.T if name.endswith("_proj.weight") or name == "lm_head.weight" else value
        np.testing.assert_array_equal(state[name], expected.astype(np.float64))
    assert state["model.norm.weight"].dtype == np.float64


def test_from_pretrained_dispatches_gpt2_and_refuses_other_types(tmp_path: Path) -> None:
    g0 = gl.Graph()
    config = gl.GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=2)
    gl.GPT.new(g0, config, rng=0).save_pretrained(g0, tmp_path / "gpt")
    g = gl.Graph()
    assert isinstance(gl.from_pretrained(g, tmp_path / "gpt"), gl.GPT)
    _write(tmp_path / "bert", model_type="bert")
    with pytest.raises(ValueError, match="has model_type 'bert'; graphlora reads"):
        gl.from_pretrained(g, tmp_path / "bert")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'; graphlora's Llama implements 'silu'"),
        ({"num_key_value_heads": 3}, "num_attention_heads 4 must be a multiple of"),
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            "rope_type 'dynamic' is not implemented",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
            "rope_type 'yarn' is not implemented",
        ),
        ({"pretraining_tp": 2}, "pretraining_tp=2"),
        ({"num_hidden_layers": 10**9}, "num_hidden_layers=1000000000 but .* holds layers 0..1"),
        ({"hidden_size": {}}, "hidden_size must be an int"),
    ],
)
def test_from_pretrained_refuses_configs_before_any_leaf(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    _write(tmp_path, **changes)
    g = gl.Graph()
    with pytest.raises(ValueError, match=message):
        gl.from_pretrained(g, tmp_path)
    assert len(g) == 0


@pytest.mark.parametrize("bad", ["missing shard", "wrong index", "outside", "shape", "nan"])
def test_from_pretrained_refuses_bad_shards_and_tensors_before_any_leaf(
    tmp_path: Path, bad: str
) -> None:
    _write(tmp_path, shards=2)
    index = tmp_path / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    first = "model-00001-of-00002.safetensors"
    if bad == "missing shard":
        (tmp_path / first).unlink()
        error: type[Exception] = FileNotFoundError
        message = "names shards that are not there"
    elif bad == "wrong index":
        key = next(k for k, v in raw["weight_map"].items() if v == first)
        raw["weight_map"][key] = "model-00002-of-00002.safetensors"
        error, message = ValueError, "does not match its shards"
    elif bad == "outside":
        key = next(iter(raw["weight_map"]))
        raw["weight_map"][key] = "../model.safetensors"
        error, message = ValueError, "not a .safetensors file in the folder"
    else:
        tensors = st_numpy.load_file(str(tmp_path / first))
        name = next(iter(tensors))
        tensors[name] = (
            np.full_like(tensors[name], np.nan) if bad == "nan" else tensors[name][..., :1]
        )
        st_numpy.save_file(tensors, str(tmp_path / first))
        error = ValueError
        message = "holds NaN or Inf" if bad == "nan" else "wrong shapes"
    index.write_text(json.dumps(raw))
    g = gl.Graph()
    with pytest.raises(error, match=message):
        gl.from_pretrained(g, tmp_path)
    assert len(g) == 0


def test_save_pretrained_round_trips_and_refuses_to_overwrite(tmp_path: Path) -> None:
    g, model = _model(CONFIGS["qwen2 biases, sliding window"])
    model.save_pretrained(g, tmp_path / "out")
    g2 = gl.Graph()
    again = gl.from_pretrained(g2, tmp_path / "out")
    assert again.config == model.config
    ids = np.array([[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(g2.value(again.forward(g2, ids)), g.value(model.forward(g, ids)))
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        model.save_pretrained(g, tmp_path / "out")
    model.save_pretrained(g, tmp_path / "out", overwrite=True)


def test_save_pretrained_writes_merged_adapters_folded_in(tmp_path: Path) -> None:
    g, model = _model()
    gl.apply_lora(model, gl.LoraConfig(rank=2), ["v_proj", "up_proj"])
    for leaf in gl.nn.parameters(model):
        g.set_value(leaf, np.random.default_rng(2).normal(0, 0.3, size=leaf.shape))
    ids = np.array([[3, 1, 4, 1, 5]])
    adapted = np.array(g.value(model.forward(g, ids)))
    for _, layer in gl.nn.lora_layers(model).items():
        layer.merge_(g)
    model.save_pretrained(g, tmp_path / "merged")
    g2 = gl.Graph()
    again = gl.from_pretrained(g2, tmp_path / "merged")
    np.testing.assert_allclose(g2.value(again.forward(g2, ids)), adapted, rtol=1e-12, atol=1e-12)


# --- generation -----------------------------------------------------------------------------------


def _greedy_without_cache(g: gl.Graph, model: Any, ids: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding by running the whole sequence again for each token."""
    out = ids
    for _ in range(steps):
        logits = g.value(model.forward(g, out))
        out = np.concatenate([out, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_with_the_cache_equals_recomputing_everything(name: str) -> None:
    g, model = _model(CONFIGS[name], std=0.5)
    ids = np.array([[1, 2, 3], [4, 0, 4]])
    tape, leaves = g.tape, g.leaves
    out = model.generate(g, ids, 6)
    assert (g.tape, g.leaves) == (tape, leaves)  # the graph as generate found it
    g.reset()
    np.testing.assert_array_equal(out, _greedy_without_cache(g, model, ids, 6))
    assert out.dtype == np.int64


def test_generation_on_gpt_equals_recomputing_everything() -> None:
    g = gl.Graph()
    config = gl.GPTConfig(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=8)
    model = gl.GPT.new(g, config, rng=3)
    for leaf in g.leaves:  # larger weights: less tied logits
        g.set_value(leaf, g.value(leaf) * 20)
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    tape, leaves = g.tape, g.leaves
    out = model.generate(g, ids, 5)
    assert (g.tape, g.leaves) == (tape, leaves)
    np.testing.assert_array_equal(out, _greedy_without_cache(g, model, ids, 5))


def test_left_padded_generation_continues_each_row_as_alone() -> None:
    g, model = _model(std=0.5)
    ids = np.array([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = model.generate(g, ids, 4, attention_mask=mask)
    alone = model.generate(g, np.array([5, 6]), 4)
    np.testing.assert_array_equal(out[0, 2:], alone)
    np.testing.assert_array_equal(out[1], model.generate(g, ids[1], 4))


def test_rows_that_reach_eos_are_padded_and_sampling_is_seeded() -> None:
    g, model = _model(std=0.5)
    ids = np.array([[1, 2], [3, 4]])
    free = model.generate(g, ids, 6)
    eos = int(free[0, 3])  # the second new token of row 0
    out = model.generate(g, ids, 6, eos_token_id=eos, pad_token_id=22)
    stop = list(free[0, 2:]).index(eos) + 2
    np.testing.assert_array_equal(out[0, : stop + 1], free[0, : stop + 1])
    assert (out[0, stop + 1 :] == 22).all()
    assert out.shape == (2, 8)
    a = model.generate(g, ids, 6, temperature=1.0, seed=5)
    b = model.generate(g, ids, 6, temperature=1.0, seed=5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.generate(g, ids, 6, temperature=0.7, top_k=1), free)
    np.testing.assert_array_equal(
        model.generate(g, ids, 6, temperature=0.7, top_p=1e-9, seed=1), free
    )


def test_sampling_draws_from_the_softmax() -> None:
    from graphlora.nn.generation import _choose

    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]]))
    rng = np.random.default_rng(0)
    counts = np.bincount(
        [int(_choose(logits, 1.0, None, None, rng)[0]) for _ in range(4000)], minlength=4
    )
    np.testing.assert_allclose(counts / 4000, [0.1, 0.2, 0.3, 0.4], atol=0.03)
    top2 = np.bincount(
        [int(_choose(logits, 1.0, 2, None, rng)[0]) for _ in range(2000)], minlength=4
    )
    assert top2[:2].sum() == 0
    nucleus = np.bincount(
        [int(_choose(logits, 1.0, None, 0.65, rng)[0]) for _ in range(2000)], minlength=4
    )
    assert nucleus[:2].sum() == 0 and nucleus[2] > 0  # 0.4 + 0.3 covers 0.65, 0.4 alone not


def test_generate_refuses_bad_arguments_by_name() -> None:
    g, model = _model()
    ids = np.array([[1, 2]])
    for kwargs, error, message in [
        (
            {"max_new_tokens": 31},
            ValueError,
            "a prompt of 2 tokens plus max_new_tokens 31 is 33 tokens, longer than the model's context of 32",
        ),
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be an int >= 0"),
        ({"temperature": -1.0}, ValueError, "temperature must be >= 0"),
        ({"top_p": 0.0}, ValueError, "top_p must be in \\(0, 1\\]"),
        ({"top_k": 0}, ValueError, "top_k must be >= 1"),
        ({"eos_token_id": 23}, ValueError, "eos_token_id must be an id in \\[0, 23\\)"),
        ({"pad_token_id": -1}, ValueError, "pad_token_id must be an id in \\[0, 23\\)"),
        ({"attention_mask": [[1]]}, gl.ShapeError, "attention_mask has shape \\(1, 1\\)"),
    ]:
        args = {"max_new_tokens": 2, **kwargs}
        with pytest.raises(error, match=f"Llama.generate: {message}"):
            model.generate(g, ids, **args)
    with pytest.raises(gl.ShapeError, match="ids must be integers \\[B, T\\] or \\[T\\]"):
        model.generate(g, np.zeros((1, 0), np.int64), 2)
    with pytest.raises(ValueError, match="id 23 is out of range for a vocabulary of 23"):
        model.generate(g, np.array([23]), 2)
    np.testing.assert_array_equal(model.generate(g, ids, 0), ids)


# --- against transformers and PEFT ----------------------------------------------------------------

# transformers computes the rotary tables (and the RMS norms' statistics) in float32 even in a
# float64 model, so its float64 logits carry float32 rounding: about 1e-7 here. The comparisons
# below allow 1e-6, and compare everything else exactly where the maths is exact.
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}

HF = {
    "llama": {},
    "llama tied, biases, llama3 rope, head_dim": {
        "tie_word_embeddings": True,
        "attention_bias": True,
        "mlp_bias": True,
        "head_dim": 6,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    },
    "mistral sliding window": {"model_type": "mistral", "sliding_window": 4},
    "qwen2": {"model_type": "qwen2"},
    "qwen2 sliding layers": {
        "model_type": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 3,
        "max_window_layers": 1,
    },
}


def _hf_llama(kind: str, *, seed: int = 0, std: float = 0.3) -> Any:
    """A transformers model of ``HF[kind]``'s type with random weights (norms and biases too),
    in float64, in eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    changes = dict(HF[kind])
    model_type = changes.pop("model_type", "llama")
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    config = config_class(
        vocab_size=40,
        hidden_size=12,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=6 if "head_dim" not in changes else 4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        **changes,
    )
    torch.manual_seed(seed)
    model = model_class(config).double().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, std)
    return model


@pytest.mark.crosscheck
@pytest.mark.parametrize("kind", list(HF))
def test_logits_equal_transformers(tmp_path: Path, kind: str) -> None:
    torch = pytest.importorskip("torch")
    model = _hf_llama(kind)
    model.save_pretrained(tmp_path / "hf")
    g = gl.Graph()
    ours = gl.from_pretrained(g, tmp_path / "hf")
    assert isinstance(ours, gl.Llama)
    ids = np.array([[1, 5, 7, 3, 39, 0, 12, 8, 8], [2, 2, 2, 2, 2, 2, 2, 2, 2]])
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(g.value(ours.forward(g, ids)), expected, **TOLERANCE)
    mask = np.array([[1] * 9, [0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 1)
    with torch.no_grad():
        expected = model(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
        ).logits.numpy()
    logits = g.value(ours.forward(g, ids, attention_mask=mask))
    np.testing.assert_allclose(logits[mask == 1], expected[mask == 1], **TOLERANCE)


@pytest.mark.crosscheck
@pytest.mark.parametrize("kind", ["llama", "mistral sliding window", "qwen2"])
def test_greedy_generation_equals_transformers_token_for_token(tmp_path: Path, kind: str) -> None:
    torch = pytest.importorskip("torch")
    model = _hf_llama(kind, std=0.5)
    model.save_pretrained(tmp_path / "hf")
    g = gl.Graph()
    ours = gl.from_pretrained(g, tmp_path / "hf")
    ids = np.array([[0, 0, 5, 6, 7], [9, 3, 1, 4, 1]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = ours.generate(g, ids, 12, attention_mask=mask, eos_token_id=7, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=7,
            pad_token_id=0,
        ).numpy()
    full = np.full_like(out, 0)
    full[:, : expected.shape[1]] = expected  # transformers stops when every row has ended
    # Equal where the choice is clear: every step's top-2 gap above 1e-4 (float32 rotary tables).
    logits = g.value(
        ours.forward(g, out, attention_mask=np.concatenate([mask, np.ones((2, 12), int)], 1))
    )
    ranked = np.sort(logits[:, 4:-1], axis=-1)
    assert (ranked[..., -1] - ranked[..., -2]).min() > 1e-4
    np.testing.assert_array_equal(out, full)


@pytest.mark.crosscheck
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load_as_pytorch_widens_them(tmp_path: Path, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    model = _hf_llama("llama").to(getattr(torch, dtype))
    model.save_pretrained(tmp_path / "hf")
    g = gl.Graph(np.float32)
    ours = gl.from_pretrained(g, tmp_path / "hf")
    state = gl.nn.state_dict(g, ours)
    for name, param in model.state_dict().items():
        widened = param.float().numpy()
        np.testing.assert_array_equal(
            state[name],
            widened.T if name.endswith("_proj.weight") or name == "lm_head.weight" else widened,
        )
    ids = np.array([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model.float()(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(g.value(ours.forward(g, ids)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.crosscheck
def test_a_sharded_checkpoint_transformers_wrote_loads(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = _hf_llama("qwen2")
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) >= 2
    g = gl.Graph()
    ours = gl.from_pretrained(g, tmp_path / "hf")
    ids = np.array([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(g.value(ours.forward(g, ids)), expected, **TOLERANCE)


@pytest.mark.crosscheck
@pytest.mark.parametrize(
    "kind", ["llama tied, biases, llama3 rope, head_dim", "qwen2 sliding layers"]
)
def test_transformers_loads_what_save_pretrained_writes(tmp_path: Path, kind: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _hf_llama(kind).save_pretrained(tmp_path / "hf")
    g = gl.Graph()
    ours = gl.from_pretrained(g, tmp_path / "hf")
    gl.apply_lora(ours, gl.LoraConfig(rank=2), ["q_proj", "down_proj"])
    for leaf in gl.nn.parameters(ours):
        g.set_value(leaf, np.random.default_rng(0).normal(0, 0.3, size=leaf.shape))
    for layer in gl.nn.lora_layers(ours).values():
        layer.merge_(g)
    ours.save_pretrained(g, tmp_path / "merged")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").double().eval()
    ids = np.array([[5, 4, 3, 2, 1, 0, 9]])
    with torch.no_grad():
        expected = again(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(g.value(ours.forward(g, ids)), expected, **TOLERANCE)


@pytest.mark.crosscheck
def test_transformers_loads_a_gpt_save_pretrained_writes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    g = gl.Graph()
    config = gl.GPTConfig(vocab_size=30, block_size=10, n_layer=2, n_head=2, n_embd=8)
    ours = gl.GPT.new(g, config, rng=0)
    ours.save_pretrained(g, tmp_path / "gpt")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt").double().eval()
    ids = np.array([[5, 4, 3, 2, 1, 0, 9]])
    with torch.no_grad():
        expected = again(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(g.value(ours.forward(g, ids)), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.crosscheck
@pytest.mark.parametrize(
    "targets",
    [
        ["q_proj", "v_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ],
)
def test_lora_on_llama_equals_peft_both_ways_with_gradients(
    tmp_path: Path, targets: list[str]
) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = _hf_llama("llama")
    model.save_pretrained(tmp_path / "hf")
    g = gl.Graph()
    ours = gl.from_pretrained(g, tmp_path / "hf")
    adapters = gl.apply_lora(ours, gl.LoraConfig(rank=2, alpha=4.0, seed=0), targets)
    rng = np.random.default_rng(1)
    for layer in adapters.values():
        g.set_value(layer.lora_b, rng.normal(0, 0.5, size=(2, layer.out_features)))
    gl.save_adapter(tmp_path / "adapter", g, ours)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter", is_trainable=True)
    peft_model.eval()
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    labels = np.array([1, 4, 1, 5, 9, 2, 6, 5])
    out = peft_model(torch.from_numpy(ids)).logits
    loss = torch.nn.functional.cross_entropy(out[0], torch.from_numpy(labels))
    loss.backward()
    logits = ours.forward(g, ids)
    ours_loss = g.cross_entropy(g.reshape(logits, (8, 40)), labels)
    g.backward(ours_loss)
    np.testing.assert_allclose(g.value(logits), out.detach().numpy(), **TOLERANCE)
    assert abs(float(g.value(ours_loss)) - float(loss)) < 1e-6
    grads = dict(peft_model.named_parameters())
    for name, layer in adapters.items():
        theirs = grads[f"base_model.model.{name}.lora_A.default.weight"].grad.numpy()
        np.testing.assert_allclose(g.grad(layer.lora_a), theirs.T, **TOLERANCE)
        theirs = grads[f"base_model.model.{name}.lora_B.default.weight"].grad.numpy()
        np.testing.assert_allclose(g.grad(layer.lora_b), theirs.T, **TOLERANCE)
    # and back: PEFT's file into a fresh graphlora model
    peft_model.save_pretrained(tmp_path / "peft")
    g2 = gl.Graph()
    again = gl.from_pretrained(g2, tmp_path / "hf")
    gl.apply_lora(again, gl.LoraConfig(rank=2, alpha=4.0), targets)
    gl.load_adapter(tmp_path / "peft", g2, again)
    np.testing.assert_allclose(
        g2.value(again.forward(g2, ids)), g.value(logits), rtol=1e-12, atol=1e-12
    )


def test_apply_adapter_builds_the_layers_a_file_describes(tmp_path: Path) -> None:
    g, model = _model()
    gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0), ["q_proj"])
    gl.apply_lora(model, gl.LoraConfig(rank=3, alpha=1.0), ["down_proj"])
    for leaf in gl.nn.parameters(model):
        g.set_value(leaf, np.random.default_rng(4).normal(0, 0.3, size=leaf.shape))
    gl.save_adapter(tmp_path / "adapter", g, model)
    ids = np.array([[1, 2, 3, 4]])
    expected = g.value(model.forward(g, ids))
    g2, fresh = _model()
    layers = gl.apply_adapter(tmp_path / "adapter", g2, fresh)
    assert sorted(layers) == sorted(gl.nn.lora_layers(model))
    assert {name: layer.rank for name, layer in layers.items()} == {
        name: layer.rank for name, layer in gl.nn.lora_layers(model).items()
    }
    np.testing.assert_array_equal(g2.value(fresh.forward(g2, ids)), expected)
    g3, vera = _model()
    gl.apply_lora(vera, gl.VeraConfig(rank=4), ["q_proj", "v_proj"])
    gl.save_adapter(tmp_path / "vera", g3, vera)
    g4, other = _model()
    with pytest.raises(ValueError, match="is not a LoRA adapter config"):
        gl.apply_adapter(tmp_path / "vera", g4, other)
    assert not gl.nn.lora_layers(other)


@pytest.mark.crosscheck
def test_apply_adapter_reads_peft_rank_patterns_and_dora(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = _hf_llama("llama")
    model.save_pretrained(tmp_path / "hf")
    config = peft.LoraConfig(
        r=2,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"up_proj": 4},
        alpha_pattern={"v_proj": 3},
        use_dora=True,
    )
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = np.array([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        expected = peft_model.double().eval()(torch.from_numpy(ids)).logits.numpy()
    g = gl.Graph()
    ours = gl.from_pretrained(g, tmp_path / "hf")
    layers = gl.apply_adapter(tmp_path / "peft", g, ours)
    assert layers["model.layers.1.mlp.up_proj"].rank == 4
    np.testing.assert_allclose(g.value(ours.forward(g, ids)), expected, **TOLERANCE)


@pytest.mark.crosscheck
def test_gpt_greedy_generation_and_padding_equal_transformers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=24, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "hf")
    g = gl.Graph()
    ours = gl.from_pretrained(g, tmp_path / "hf")
    ids = np.array([[0, 0, 5, 6, 7], [9, 3, 1, 4, 1]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 1)
    with torch.no_grad():
        expected = model(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
        ).logits.numpy()
    logits = g.value(ours.forward(g, ids, attention_mask=mask))
    np.testing.assert_allclose(logits[mask == 1], expected[mask == 1], rtol=1e-9, atol=1e-12)
    out = ours.generate(g, ids, 10, attention_mask=mask)
    with torch.no_grad():
        theirs = model.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(out, theirs)


# --- sampling and generate's arguments, exactly ---------------------------------------------------


def _sample_by_hand(
    logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, u: np.ndarray
) -> np.ndarray:
    """transformers' warpers written out row by row, largest first: divide by the temperature,
    keep the k largest (ties with the k-th kept), keep the fewest largest whose probabilities
    reach top_p; then the token where the running sum of the kept probabilities (in id order)
    first exceeds the uniform draw u. Of tokens tied at top_p's edge, the higher id stays."""
    out = []
    for row, draw in zip(logits, u[:, 0], strict=True):
        scores = row / temperature
        keep = np.ones(len(row), bool)
        if top_k is not None:
            kth = sorted(scores, reverse=True)[min(top_k, len(row)) - 1]
            keep &= scores >= kth
        if top_p is not None:
            probs = np.exp(scores - scores.max()) * keep
            probs /= probs.sum()
            mass, chosen = 0.0, np.zeros(len(row), bool)
            for i in sorted(range(len(row)), key=lambda i: (-probs[i], -i)):  # ties: higher id
                chosen[i] = True
                mass += probs[i]
                if mass >= top_p:
                    break
            keep &= chosen
        probs = np.where(keep, np.exp(scores - scores[keep].max()), 0.0)
        probs /= probs.sum()
        out.append(int(np.searchsorted(np.cumsum(probs), draw, side="right")))
    return np.array(out)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.5, None, None), (2.0, 2, None), (0.7, None, 0.6), (1.3, 3, 0.8)],
)
def test_sampling_equals_the_warpers_written_out(
    temperature: float, top_k: int | None, top_p: float | None
) -> None:
    from graphlora.nn.generation import _choose

    logits = np.array([[0.3, 2.0, -1.0, 1.5, 0.9], [1.0, 1.0, 0.0, -2.0, 3.0]])
    for seed in range(40):
        u = np.random.default_rng(seed).random((2, 1))
        found = _choose(logits, temperature, top_k, top_p, np.random.default_rng(seed))
        np.testing.assert_array_equal(found, _sample_by_hand(logits, temperature, top_k, top_p, u))
    np.testing.assert_array_equal(_choose(logits, 0.0, None, None, np.random.default_rng()), [1, 4])


def test_generate_s_edges() -> None:
    g, model = _model()
    prompt = np.array([1, 2, 3])
    one = model.generate(g, prompt, 1)
    assert one.shape == (4,) and one[:3].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(model.generate(g, prompt, 0), prompt)
    full = model.generate(g, prompt, 29)  # 3 + 29 = the context of 32: allowed
    assert full.shape == (32,)
    np.testing.assert_array_equal(full[:4], one)
    np.testing.assert_array_equal(
        model.generate(g, prompt, 3, attention_mask=np.array([1, 1, 1])), full[:6]
    )
    free = model.generate(g, prompt, 6)
    eos = int(free[3])  # the first new token: every later one is padding
    np.testing.assert_array_equal(
        model.generate(g, prompt, 6, eos_token_id=[22, eos])[4:], [22] * 5
    )
    np.testing.assert_array_equal(model.generate(g, prompt, 6, eos_token_id=eos)[4:], [eos] * 5)
    np.testing.assert_array_equal(
        model.generate(g, prompt, 6, eos_token_id=np.int64(eos), pad_token_id=np.int64(0))[4:],
        [0] * 5,
    )
    with pytest.raises(ValueError, match="id -1 is out of range for a vocabulary of 23"):
        model.generate(g, np.array([-1, 22]), 1)
    with pytest.raises(ValueError, match="pad_token_id must be an id in \\[0, 23\\), got 23"):
        model.generate(g, prompt, 1, pad_token_id=23)
    with pytest.raises(ValueError, match=r"eos_token_id must be an id .*, got \[1, True\]"):
        model.generate(g, prompt, 1, eos_token_id=[1, True])
    for ids, error, message in [
        (
            g.constant(prompt),
            TypeError,
            "Llama.generate: ids must be an integer array, not a NodeId",
        ),
        (prompt.astype(float), gl.ShapeError, "got dtype float64 and shape \\(3,\\)"),
        (prompt.reshape(1, 1, 3), gl.ShapeError, "got dtype int64 and shape \\(1, 1, 3\\)"),
    ]:
        with pytest.raises(error, match=message):
            model.generate(g, ids, 1)
    with pytest.raises(ValueError, match=r"^Llama\.generate: seed must be"):
        model.generate(g, prompt, 1, temperature=1.0, seed=-1)
    with pytest.raises(
        ValueError, match=r"^Llama\.generate: id 23 is out of range for a vocabulary"
    ):
        model.generate(g, np.array([1, 23]), 1)
    with pytest.raises(TypeError, match=r"^Llama\.generate: top_p must be a real number"):
        model.generate(g, prompt, 1, top_p="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Llama\.generate: graph must be a Graph"):
        model.generate(None, prompt, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Llama\.generate: top_p must be in \(0, 1\], got 1\.5"):
        model.generate(g, prompt, 1, top_p=1.5)
    np.testing.assert_array_equal(
        model.generate(g, prompt, 4, temperature=0.9, top_p=1.0, seed=2),
        model.generate(g, prompt, 4, temperature=0.9, seed=2),
    )


def test_positions_count_real_tokens_and_masks_are_checked() -> None:
    from graphlora.nn.generation import attention_mask, check_mask, positions_from_mask

    keep = np.array([[False, False, True, True], [True, True, True, True]])
    np.testing.assert_array_equal(positions_from_mask(keep), [[1, 1, 0, 1], [0, 1, 2, 3]])
    np.testing.assert_array_equal(positions_from_mask(keep[0]), [1, 1, 0, 1])
    assert positions_from_mask(keep).dtype == np.int64
    band = attention_mask(np.ones(5, bool), 2, 2)  # the last 2 of 5 slots, window 2
    np.testing.assert_array_equal(band, [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    with pytest.raises(gl.ShapeError, match="where: attention_mask is not a regular array"):
        check_mask("where", [[1, 0], [1]], (2, 2))
    with pytest.raises(ValueError, match="where: attention_mask must hold only 0 and 1"):
        check_mask("where", np.ones(2) * 0.5, (2,))
    assert check_mask("where", np.array([1.0, 0.0]) == 1, (2,)).tolist() == [True, False]
    g, model = _model()
    np.testing.assert_array_equal(model.generate(g, np.array([1]), 1, eos_token_id=0)[:1], [1])


def test_a_compiled_training_step_goes_on_after_generating() -> None:
    g, model = _model()
    gl.apply_lora(model, gl.LoraConfig(rank=2), ["q_proj"])
    ids = np.array([[1, 2, 3, 4]])
    loss = g.cross_entropy(g.reshape(model.forward(g, ids), (-1, 23)), np.array([2, 3, 4, 5]))
    step = g.compile(loss)
    first = float(step())
    model.generate(g, ids, 5)
    assert float(step()) == first  # the same leaves: the same loss, and no GraphError


def test_generation_s_lengths_and_long_prompts_under_a_sliding_window() -> None:
    config = CONFIGS["qwen2 biases, sliding window"]  # window 3 on layer 1
    g, model = _model(config, std=0.5)
    ids = np.array([[1, 5, 2, 7, 3, 3, 9], [4, 4, 0, 1, 6, 2, 8]])  # 7 tokens > the window
    full = model.generate(g, ids, 6)
    g.reset()
    np.testing.assert_array_equal(full, _greedy_without_cache(g, model, ids, 6))
    for count in (1, 2, 3):
        out = model.generate(g, ids, count)
        assert out.shape == (2, 7 + count)
        np.testing.assert_array_equal(out, full[:, : 7 + count])
    g2, tiny = _model()
    with pytest.raises(ValueError, match=r"^Llama\.generate: id 23 is out of range"):
        tiny.generate(g2, np.array([0, 23]), 1)


def test_a_bfloat16_adapter_file_loads_widened_exactly(tmp_path: Path) -> None:
    from test_gpt import _save_bfloat16

    g, model = _model()
    gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0), ["q_proj", "v_proj"])
    for leaf in gl.nn.parameters(model):
        g.set_value(leaf, np.random.default_rng(5).normal(0, 0.3, size=leaf.shape))
    gl.save_adapter(tmp_path / "adapter", g, model)
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    held = _save_bfloat16(dict(st_numpy.load_file(str(file))), file)
    g2, fresh = _model()
    layers = gl.apply_adapter(tmp_path / "adapter", g2, fresh)
    layer = layers["model.layers.0.self_attn.q_proj"]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    np.testing.assert_array_equal(g2.value(layer.lora_a), held[key].T)
    file.write_bytes(file.read_bytes()[:-8])  # truncated
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        gl.apply_adapter(tmp_path / "adapter", *_model())


@pytest.mark.crosscheck
def test_a_peft_adapter_saved_in_bfloat16_loads_as_pytorch_widens_it(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = _hf_llama("llama")
    model.save_pretrained(tmp_path / "hf")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.to(torch.bfloat16).save_pretrained(tmp_path / "peft")
    g = gl.Graph(np.float32)
    layers = gl.apply_adapter(tmp_path / "peft", g, gl.from_pretrained(g, tmp_path / "hf"))
    named = dict(peft_model.named_parameters())
    for name, layer in layers.items():
        a = named[f"base_model.model.{name}.lora_A.default.weight"].float().detach().numpy()
        np.testing.assert_array_equal(g.value(layer.lora_a), a.T)
