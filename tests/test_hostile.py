"""Hostile input: every refusal names the function and the value, and changes nothing."""

from __future__ import annotations

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
