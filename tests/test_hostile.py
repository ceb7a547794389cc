"""Hostile input: every refusal names the function and the value, and changes nothing."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import graphlora as gl

# --- replays check what set_value feeds them ------------------------------------------------------


@given(
    vocab=st.integers(1, 6),
    classes=st.integers(1, 5),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    bad=st.sampled_from(["id_low", "id_high", "label_low", "label_high"]),
)
def test_a_replay_refuses_ids_and_labels_out_of_range_as_a_recording_does(
    vocab: int, classes: int, n: int, seed: int, bad: str
) -> None:
    rng = np.random.default_rng(seed)
    g = gl.Graph()
    w = g.parameter(rng.normal(size=(vocab, classes)))
    ids = g.constant(rng.integers(0, vocab, n))
    labels = g.constant(rng.integers(0, classes, n))
    step = g.compile(g.cross_entropy(g.embedding(w, ids), labels))
    step()
    grad = np.array(g.grad(w))
    new_ids, new_labels = rng.integers(0, vocab, n), rng.integers(0, classes, n)
    at = int(rng.integers(0, n))
    if bad.startswith("id"):
        new_ids[at] = -1 if bad == "id_low" else vocab
        message = rf"embedding: id {new_ids[at]} is out of range for {vocab} embeddings"
    else:
        new_labels[at] = -1 if bad == "label_low" else classes
        message = rf"cross_entropy: labels must lie in \[0, {classes}\) .*got \[{new_labels[at]}\]"
    g.set_value(ids, new_ids)
    g.set_value(labels, new_labels)
    with pytest.raises(ValueError, match=message):
        step()
    np.testing.assert_array_equal(g.grad(w), grad)  # no gradient changed
    with pytest.raises(ValueError, match=message):  # as a new recording refuses it
        g.cross_entropy(g.embedding(w, ids), labels)
    new_ids[at] %= vocab
    new_labels[at] %= classes
    g.set_value(ids, new_ids)
    g.set_value(labels, new_labels)
    g.zero_grad()
    loss = float(step())
    again = g.cross_entropy(g.embedding(w, ids), labels)
    assert loss == float(g.value(again))


# --- numbers --------------------------------------------------------------------------------------


@given(n=st.integers(0, 4), extra=st.integers(0, 3), seed=st.integers(0, 99))
def test_var_past_its_degrees_of_freedom_is_numpy_s(n: int, extra: int, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(2, n))
    ddof = n + extra  # n - ddof <= 0
    g = gl.Graph()
    node = g.parameter(x)
    out = g.var(node, axis=1, ddof=ddof)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_array_equal(g.value(out), np.var(x, axis=1, ddof=ddof))


@pytest.mark.crosscheck
@given(n=st.integers(0, 4), extra=st.integers(0, 3), seed=st.integers(0, 99))
def test_var_past_its_degrees_of_freedom_is_torch_s(n: int, extra: int, seed: int) -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(seed).normal(size=(2, n))
    ddof = n + extra  # n - ddof <= 0
    g = gl.Graph()
    node = g.parameter(x)
    out = g.var(node, axis=1, ddof=ddof)
    t = torch.tensor(x, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = t.var(dim=1, correction=ddof)
    np.testing.assert_array_equal(g.value(out), expected.detach().numpy())
    if n:
        g.backward(out, grad=np.ones(2))
        expected.backward(torch.ones(2, dtype=torch.float64))
        np.testing.assert_allclose(g.grad(node), t.grad.numpy(), rtol=1e-12)


def test_getitem_names_bad_slices() -> None:
    g = gl.Graph()
    x = g.parameter(np.arange(6.0).reshape(2, 3))
    for index, error, message in [
        (slice(None, None, 0), ValueError, "getitem: a slice's step must not be 0"),
        (
            (slice(0, 1), slice(np.array([1]), None)),
            TypeError,
            "getitem: a slice's start must be an int or None, got ndarray",
        ),
        (slice(0, 1.5), TypeError, "getitem: a slice's stop must be an int or None, got float"),
        (
            slice(False, None),
            TypeError,
            "getitem: a slice's start must be an int or None, got bool",
        ),
    ]:
        before = len(g)
        with pytest.raises(error, match="^" + re.escape(message)):
            g.getitem(x, index)
        assert len(g) == before
    np.testing.assert_array_equal(
        g.value(g.getitem(x, slice(None, None, -2))), np.arange(6.0).reshape(2, 3)[::-2]
    )


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_attention_refuses_a_scale_that_is_not_finite(scale: float) -> None:
    g = gl.Graph()
    qkv = g.parameter(np.ones((1, 2, 6)))
    q = g.parameter(np.ones((2, 3)))
    with pytest.raises(ValueError, match=rf"^qkv_attention: scale must be finite, got {scale}$"):
        g.qkv_attention(qkv, n_head=1, scale=scale)
    with pytest.raises(
        ValueError, match=rf"^scaled_dot_product_attention: scale must be finite, got {scale}$"
    ):
        g.scaled_dot_product_attention(q, q, q, scale=scale)


def test_a_weighted_merge_that_overflows_adds_nothing() -> None:
    g = gl.Graph()
    model = gl.MLP(g, [3, 4], rng=0)
    gl.apply_lora(model, gl.LoraConfig(rank=2, seed=1), ["layers.0"])
    layer = model.layers[0]
    g.set_value(layer.lora_b, np.full((2, 4), 1e300))
    with pytest.raises(
        ValueError, match=r"^add_weighted_adapter: weights \[1e\+308\] overflow: layer 'layers.0'"
    ):
        gl.add_weighted_adapter(g, model, ["default"], [1e308], "big", combination_type="linear")
    assert list(layer.adapters) == ["default"]


# --- models ---------------------------------------------------------------------------------------

TINY_GPT = gl.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (
            3,
            gl.ShapeError,
            "ids must be [..., T] with at least one axis, got the lone id 3; pass [id]",
        ),
        (
            np.array(3),
            gl.ShapeError,
            "ids must be [..., T] with at least one axis, got the lone id",
        ),
        ([[1, 2], [3]], gl.ShapeError, "ids are not a regular array (ragged lists?)"),
        ([1.5, 2.0], TypeError, "ids must be integers, got dtype float64"),
        ([True, False], TypeError, "ids must be integers, got dtype bool"),
        ([[1, 2, 3, 4, 0]], ValueError, "a sequence of 5 tokens is longer than block_size 4"),
    ],
)
def test_gpt_refuses_ids_that_are_not_a_sequence_and_records_nothing(
    ids: object, error: type[BaseException], message: str
) -> None:
    g = gl.Graph()
    model = gl.GPT.new(g, TINY_GPT, rng=0)
    before = len(g)
    with pytest.raises(error, match="^" + re.escape(f"GPT.forward: {message}")):
        model.forward(g, ids)
    assert len(g) == before
    lone = g.constant(np.array(2))
    with pytest.raises(gl.ShapeError, match=r"^GPT.forward: ids must be \[\.\.\., T\]"):
        model.forward(g, lone)
    assert model.forward(g, []).shape == (0, 5)  # an empty sequence is a sequence


def test_gpt_dropout_draws_the_same_masks_from_the_same_seed() -> None:
    def losses(seed: int) -> list[float]:
        g = gl.Graph()
        config = gl.GPTConfig(**{**TINY_GPT.__dict__, "dropout": 0.5, "seed": seed})
        model = gl.GPT.new(g, config, rng=0)
        ids = np.array([[1, 2, 3, 4]])
        return [float(g.value(g.sum(model.forward(g, ids)))) for _ in range(3)]

    first = losses(7)
    assert first == losses(7)
    assert first != losses(8)
    assert len(set(first)) == 3  # a new mask each pass


class _Plain:
    """A model with no forward of its own: an object holding layers."""


def test_a_plain_object_or_a_dict_of_layers_is_a_model() -> None:
    g = gl.Graph()
    plain = _Plain()
    plain.fc = gl.Linear.new(g, 3, 2, rng=0, name="fc")  # type: ignore[attr-defined]
    tree = {"fc": gl.Linear.new(g, 3, 2, rng=1), "blocks": [gl.Linear.new(g, 2, 2, rng=2)]}
    assert list(gl.apply_lora(plain, gl.LoraConfig(rank=1), ["fc"])) == ["fc"]
    assert isinstance(plain.fc, gl.LoraLinear)  # type: ignore[attr-defined]
    assert list(gl.apply_lora(tree, gl.LoraConfig(rank=1), ["fc", "blocks.0"])) == [
        "fc",
        "blocks.0",
    ]
    assert [name for name, _ in gl.nn.named_modules(tree)] == ["", "fc", "blocks.0"]
    assert [name for name, _ in gl.nn.named_leaves(tree)][:4] == [
        "fc.weight",
        "fc.bias",
        "fc.lora_A.default",
        "fc.lora_B.default",
    ]
    assert isinstance(tree["blocks"][0], gl.LoraLinear)  # type: ignore[index]
    for bad in [3, "model", np.ones(2), gl.Linear]:
        with pytest.raises(
            TypeError,
            match=r"^apply_lora: model must be a layer or a model \(an object, list or dict "
            rf"holding layers\), got {type(bad).__name__}$",
        ):
            gl.apply_lora(bad, gl.LoraConfig(rank=1))


def test_nothing_of_an_adapter_trains_inside_disable_adapters() -> None:
    g = gl.Graph()
    model = gl.MLP(g, [3, 4, 2], rng=0)
    gl.apply_lora(model, gl.LoraConfig(rank=2), ["layers.0", "layers.1"])
    gl.apply_lora(model, gl.LoraConfig(rank=1), ["layers.0"], adapter_name="other")
    g.requires_grad_(model.layers[1].lora_a, False)  # frozen by hand: stays frozen after
    before = {name: leaf.requires_grad for name, leaf in gl.nn.named_leaves(model)}
    assert before["layers.0.lora_A.default"] and before["layers.0.lora_B.other"] is False
    with gl.disable_adapters(model):
        assert not any(leaf.requires_grad for _, leaf in gl.nn.named_leaves(model))
        x = g.constant(np.ones((1, 3)))
        with pytest.raises(gl.GraphError, match="does not depend on any parameter"):
            g.backward(g.sum(model.forward(g, x)))
    assert {name: leaf.requires_grad for name, leaf in gl.nn.named_leaves(model)} == before


def test_a_replay_rechecks_with_the_recorded_parameters_and_only_ops_fed_by_data() -> None:
    g = gl.Graph()
    logits = g.parameter(np.random.default_rng(0).normal(size=(3, 4)))
    labels = g.constant(np.array([0, -1, 2]))
    step = g.compile(g.cross_entropy(logits, labels, ignore_index=-1))
    g.set_value(labels, [-1, 3, -1])  # -1 is ignored, as recorded: not refused
    assert float(step()) == float(g.value(g.cross_entropy(logits, labels, ignore_index=-1)))
    g.set_value(labels, [-100, 3, 1])
    with pytest.raises(
        ValueError, match=r"labels must lie in \[0, 4\) .*ignore_index -1\), got \[-100\]"
    ):
        step()

    calls = []

    def counted(x: np.ndarray, ids: np.ndarray) -> None:
        calls.append(ids.copy())
        if ids.size and ids.max() >= x.shape[0]:
            raise ValueError(f"pick: id {ids.max()} is out of range")

    def _pick(x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, object]:
        return x[ids], lambda grad, needs: (np.zeros_like(x), None)

    def _twice(x: np.ndarray) -> tuple[np.ndarray, object]:
        return 2 * x, lambda grad, needs: (2 * grad,)

    pick = gl.ops.op(check=counted, data={"ids": "int"})(_pick)
    twice = gl.ops.op(check=lambda x: calls.append("twice"))(_twice)
    g = gl.Graph()  # a new tape: a replay runs every op recorded before its loss
    table = g.constant(np.arange(6).reshape(3, 2))  # integers, read as floats: a cast input
    ids = g.constant(np.array([0, 2]))
    w = g.parameter(np.ones((2, 2)))
    out = g.sum(g.mul(g.apply(twice, w), g.apply(pick, table, ids)))
    step = g.compile(out)
    calls.clear()
    step()
    assert len(calls) == 1 and list(calls[0]) == [0, 2]  # not the op fed by floats alone
    g.set_value(ids, [1, 1])
    assert float(step()) == 2 * (2 + 3) * 2
    g.set_value(ids, [1, 3])
    with pytest.raises(ValueError, match="pick: id 3 is out of range"):
        step()
