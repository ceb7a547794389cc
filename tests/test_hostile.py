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
def test_var_past_its_degrees_of_freedom_is_numpy_s_and_torch_s(
    n: int, extra: int, seed: int
) -> None:
    x = np.random.default_rng(seed).normal(size=(2, n))
    ddof = n + extra  # n - ddof <= 0
    g = gl.Graph()
    node = g.parameter(x)
    out = g.var(node, axis=1, ddof=ddof)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_array_equal(g.value(out), np.var(x, axis=1, ddof=ddof))
    torch = pytest.importorskip("torch")
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
