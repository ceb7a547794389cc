"""LoRA's variants on a layer: DoRA (against PEFT, finite differences and its own formula),
LoraEmbedding, and several named adapters on one layer (which run, which learn, merging, state)."""

from __future__ import annotations

import copy
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

import graphlora as gl
from graphlora.lora import DoraUpdate
from graphlora.lora.functional import column_norms
from graphlora.ops import dropout_mask
from graphlora.testing import gradcheck
from graphlora.testing import strategies as gst

DORA = gst.lora_configs(dora=True, inits=("gaussian", "kaiming"))


def _dora_by_hand(
    x: np.ndarray,
    w: np.ndarray,
    bias: Any,
    a: np.ndarray,
    b: np.ndarray,
    m: np.ndarray,
    s: float,
    xd: np.ndarray | None = None,
) -> np.ndarray:
    """DoRA's layer written out in NumPy, PEFT's way: ``x W + bias + (m/n - 1) xd W + (m/n) s xd A B``."""
    xd = x if xd is None else xd
    ratio = m / np.sqrt(np.sum((w + s * (a @ b)) ** 2, axis=0))
    out = x @ w + (ratio - 1) * (xd @ w) + ratio * ((xd @ a) @ b) * s
    return out if bias is None else out + bias


# --- DoRA ---------------------------------------------------------------------------------------


def test_a_new_dora_layer_equals_its_base_bit_for_bit() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 6, 4, gl.LoraConfig(rank=2, use_dora=True, seed=0))
    update = layer.update
    assert isinstance(update, DoraUpdate)
    weight = np.array(g.value(layer.frozen_weight))
    # m starts as each output's weight norm: 4 numbers, the columns of W [in, out]
    np.testing.assert_array_equal(g.value(update.magnitude), np.sqrt((weight**2).sum(axis=0)))
    assert layer.trainable_params() == [layer.lora_a, layer.lora_b, update.magnitude]
    assert layer.num_trainable == 2 * (6 + 4) + 4
    x = g.constant(np.random.default_rng(1).normal(size=(3, 6)))
    np.testing.assert_array_equal(g.value(layer.forward(g, x)), g.value(layer.base_forward(g, x)))


@given(layer=gst.lora_layers(config=DORA), data=st.data())
def test_dora_forward_is_its_formula(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g, lora = layer
    x = data.draw(gst.arrays((3, lora.in_features)), label="x")
    update = lora.update
    assert isinstance(update, DoraUpdate)
    bias = None if lora.bias is None else g.value(lora.bias)
    expected = _dora_by_hand(
        x,
        g.value(lora.frozen_weight),
        bias,
        g.value(lora.lora_a),
        g.value(lora.lora_b),
        g.value(update.magnitude),
        lora.scaling,
    )
    np.testing.assert_allclose(
        g.value(lora.forward(g, g.constant(x))), expected, rtol=1e-10, atol=1e-10
    )


@given(layer=gst.lora_layers(config=DORA, max_features=4), data=st.data())
def test_dora_gradients_wrt_x_and_magnitude_match_finite_differences(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g0, lora = layer
    x = data.draw(gst.arrays((2, lora.in_features)), label="x")
    update = lora.update
    assert isinstance(update, DoraUpdate)

    def fn(g: gl.Graph, x: gl.NodeId, m: gl.NodeId) -> gl.NodeId:
        twin = gl.LoraLinear.from_linear(g, g0.value(lora.frozen_weight), None, lora.config)
        twin.load_state_dict(g, {**lora.state_dict(g0), "magnitude": np.zeros(lora.out_features)})
        twin.adapters["default"] = DoraUpdate(
            twin.lora_a, twin.lora_b, lora.config, lora.rng, magnitude=m
        )
        y = twin.forward(g, x)
        return g.sum(g.mul(y, y))

    assert gradcheck(fn, x, np.array(g0.value(update.magnitude)))


@given(layer=gst.lora_layers(config=DORA, max_features=4), data=st.data())
def test_dora_gradients_wrt_a_and_b_are_those_of_a_detached_norm(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    """PEFT detaches ||W + sAB||: the gradients of A and B are the finite differences of the
    layer with the norm held at its value, not of the layer itself."""
    g, lora = layer
    x = data.draw(gst.arrays((2, lora.in_features)), label="x")
    update = lora.update
    assert isinstance(update, DoraUpdate)
    w, m, s = (
        np.array(g.value(lora.frozen_weight)),
        np.array(g.value(update.magnitude)),
        lora.scaling,
    )
    a, b = np.array(g.value(lora.lora_a)), np.array(g.value(lora.lora_b))
    norm = column_norms(w + s * (a @ b))  # held fixed
    bias = 0.0 if lora.bias is None else np.array(g.value(lora.bias))

    def loss(a: np.ndarray, b: np.ndarray) -> float:
        y = (m / norm) * (x @ w + s * (x @ a) @ b) + bias
        return float(np.sum(y * y))

    y = lora.forward(g, g.constant(x))
    g.backward(g.sum(g.mul(y, y)))
    for value, grad, f in (
        (a, g.grad(lora.lora_a), lambda v: loss(v, b)),
        (b, g.grad(lora.lora_b), lambda v: loss(a, v)),
    ):
        numeric = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            step = np.zeros_like(value)
            step[i] = 1e-6
            numeric[i] = (f(value + step) - f(value - step)) / 2e-6
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)


@given(layer=gst.lora_layers(config=DORA), data=st.data())
def test_dora_merge_computes_the_forward_and_unmerge_is_bit_exact(
    layer: tuple[gl.Graph, gl.LoraLinear], data: st.DataObject
) -> None:
    g, lora = layer
    x = g.constant(data.draw(gst.arrays((3, lora.in_features)), label="x"))
    before = np.array(g.value(lora.frozen_weight))
    unmerged = np.array(g.value(lora.forward(g, x)))
    lora.merge_(g)
    np.testing.assert_allclose(g.value(lora.forward(g, x)), unmerged, rtol=1e-9, atol=1e-9)
    lora.unmerge_(g)
    np.testing.assert_array_equal(g.value(lora.frozen_weight), before)


def test_dora_with_dropout_drops_the_input_of_both_terms() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 5, 3, gl.LoraConfig(rank=2, dropout=0.5, use_dora=True, seed=2))
    g.set_value(layer.lora_b, np.random.default_rng(3).normal(size=(2, 3)))
    x = np.random.default_rng(4).normal(size=(4, 5))
    mask = dropout_mask(x.shape, x.dtype, 0.5, copy.deepcopy(layer.rng))  # the mask it will draw
    update = layer.update
    assert isinstance(update, DoraUpdate)
    y = layer.forward(g, g.constant(x))
    expected = _dora_by_hand(
        x,
        g.value(layer.frozen_weight),
        g.value(layer.bias),
        g.value(layer.lora_a),
        g.value(layer.lora_b),
        g.value(update.magnitude),
        layer.scaling,
        xd=x * mask,
    )
    np.testing.assert_allclose(g.value(y), expected, rtol=1e-12)
    with g.no_grad():  # no dropout: the update's base term is the layer's own x @ W
        np.testing.assert_allclose(
            g.value(layer.forward(g, g.constant(x))),
            _dora_by_hand(
                x,
                g.value(layer.frozen_weight),
                g.value(layer.bias),
                g.value(layer.lora_a),
                g.value(layer.lora_b),
                g.value(update.magnitude),
                layer.scaling,
            ),
            rtol=1e-12,
        )


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_compiled_dora_step_trains_exactly_as_recording(dropout: float) -> None:
    def train(compiled: bool) -> list[np.ndarray]:
        g = gl.Graph()
        config = gl.LoraConfig(rank=2, dropout=dropout, use_dora=True, use_rslora=True, seed=5)
        layer = gl.LoraLinear.new(g, 6, 4, config)
        x = g.constant(np.random.default_rng(6).normal(size=(8, 6)))
        t = g.constant(np.random.default_rng(7).normal(size=(8, 4)))
        opt = gl.optim.Adam(g, layer.trainable_params(), lr=0.05)
        if compiled:
            step = g.compile(g.mse_loss(layer.forward(g, x), t))
        else:  # draw the dropout mask the recording that was compiled drew
            step = None
            layer.forward(g, x)
        for _ in range(5):
            opt.zero_grad()
            if step is None:
                g.reset()
                g.backward(g.mse_loss(layer.forward(g, x), t))
            else:
                step()
            opt.step()
        return [np.array(g.value(p)) for p in layer.trainable_params()]

    for ours, recorded in zip(train(True), train(False), strict=True):
        np.testing.assert_array_equal(ours, recorded)


def test_dora_fused_forward_records_op_by_op() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 4, 3, gl.LoraConfig(rank=2, use_dora=True, seed=0))
    x = g.constant(np.ones((2, 4)))
    fused = layer.forward(g, x, fused=True)
    assert "lora_linear" not in {node.op for node in g.tape}
    np.testing.assert_array_equal(g.value(fused), g.value(layer.forward(g, x)))


def test_dora_state_dict_has_the_magnitude_and_loads_all_or_nothing() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 4, 3, gl.LoraConfig(rank=2, use_dora=True, seed=0))
    state = layer.state_dict(g)
    assert sorted(state) == ["lora_a", "lora_b", "magnitude"]
    with pytest.raises(
        ValueError,
        match=r"keys must be exactly 'lora_a', 'lora_b' and 'magnitude'; missing \['magnitude'\]",
    ):
        layer.load_state_dict(g, {"lora_a": state["lora_a"], "lora_b": state["lora_b"]})
    with pytest.raises(gl.ShapeError, match=r"magnitude has shape \(4,\), expected \(3,\)"):
        layer.load_state_dict(g, {**state, "lora_a": state["lora_a"] + 1, "magnitude": np.ones(4)})
    np.testing.assert_array_equal(g.value(layer.lora_a), state["lora_a"])  # nothing loaded
    layer.load_state_dict(g, {**state, "magnitude": state["magnitude"] * 2})
    np.testing.assert_array_equal(g.value(layer.update.magnitude), state["magnitude"] * 2)


@pytest.mark.crosscheck
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_dora_forward_and_gradients_equal_peft(rslora: bool, bias: bool) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    root = torch.nn.Module()
    root.add_module("proj", torch.nn.Linear(6, 5, bias=bias).double())
    config = peft.LoraConfig(
        r=2,
        lora_alpha=3,
        target_modules=["proj"],
        use_dora=True,
        use_rslora=rslora,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(root, config)
    theirs = model.base_model.model.proj
    with torch.no_grad():
        theirs.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 5).double())
    g = gl.Graph()
    weight = theirs.base_layer.weight.detach().numpy().T
    layer = gl.LoraLinear.from_linear(
        g,
        weight,
        theirs.base_layer.bias.detach().numpy() if bias else None,
        gl.LoraConfig(rank=2, alpha=3.0, use_rslora=rslora, use_dora=True),
        name="proj",
    )
    update = layer.update
    assert isinstance(update, DoraUpdate)
    # B = 0 at PEFT's init would hide B's part of the norm; init_lora_weights=False draws it
    g.set_value(layer.lora_a, theirs.lora_A["default"].weight.detach().numpy().T)
    g.set_value(layer.lora_b, theirs.lora_B["default"].weight.detach().numpy().T)
    g.set_value(update.magnitude, theirs.lora_magnitude_vector["default"].weight.detach().numpy())
    x = np.random.default_rng(0).normal(size=(3, 4, 6))
    xt = torch.tensor(x, requires_grad=True)
    out = theirs(xt)
    (out**3).sum().backward()
    xn = g.parameter(x)
    y = layer.forward(g, xn)
    g.backward(g.sum(g.pow(y, 3)))
    np.testing.assert_allclose(g.value(y), out.detach().numpy(), rtol=1e-10, atol=1e-12)
    pairs = [
        (g.grad(xn), xt.grad.numpy()),
        (g.grad(layer.lora_a), theirs.lora_A["default"].weight.grad.numpy().T),
        (g.grad(layer.lora_b), theirs.lora_B["default"].weight.grad.numpy().T),
        (g.grad(update.magnitude), theirs.lora_magnitude_vector["default"].weight.grad.numpy()),
    ]
    for ours, peft_grad in pairs:
        np.testing.assert_allclose(ours, peft_grad, rtol=1e-10, atol=1e-10)
    merged = layer.merge(g)
    model.merge_adapter()
    np.testing.assert_allclose(merged, theirs.base_layer.weight.detach().numpy().T, rtol=1e-12)


# --- LoRA on an embedding -------------------------------------------------------------------------


def _embedding(seed: int = 0, rank: int = 2) -> tuple[gl.Graph, gl.LoraEmbedding]:
    g = gl.Graph()
    table = np.random.default_rng(seed).normal(size=(7, 5))
    layer = gl.LoraEmbedding.from_embedding(
        g, table, gl.LoraConfig(rank=rank, alpha=4.0, seed=seed)
    )
    return g, layer


def test_a_new_lora_embedding_starts_with_a_zero_a_and_equals_its_table() -> None:
    g, layer = _embedding()
    assert np.all(g.value(layer.lora_a) == 0) and g.value(layer.lora_a).shape == (7, 2)
    assert g.value(layer.lora_b).shape == (2, 5) and np.any(g.value(layer.lora_b) != 0)
    ids = np.array([[0, 6], [3, 3]])
    np.testing.assert_array_equal(g.value(layer.forward(g, ids)), g.value(layer.frozen_weight)[ids])
    assert layer.num_trainable == 2 * (7 + 5) and layer.num_frozen == 35


@given(data=st.data())
def test_lora_embedding_is_a_lookup_in_the_merged_table_and_its_gradients_check(
    data: st.DataObject,
) -> None:
    vocab, width = data.draw(st.integers(1, 5), label="V"), data.draw(st.integers(1, 5), label="D")
    rank = data.draw(st.integers(1, min(vocab, width)), label="rank")
    g = gl.Graph()
    table = data.draw(gst.arrays((vocab, width)), label="table")
    layer = gl.LoraEmbedding.from_embedding(g, table, gl.LoraConfig(rank=rank, alpha=2.0, seed=0))
    g.set_value(layer.lora_a, data.draw(gst.arrays((vocab, rank)), label="A"))
    ids = data.draw(
        gst.arrays((3,), elements=st.integers(0, vocab - 1), dtype=np.int64), label="ids"
    )
    np.testing.assert_allclose(
        g.value(layer.forward(g, ids)), layer.merge(g)[ids], rtol=1e-12, atol=1e-12
    )

    def fn(g: gl.Graph, a: gl.NodeId, b: gl.NodeId) -> gl.NodeId:
        twin = gl.LoraEmbedding.from_embedding(g, table, layer.config)
        twin.adapters["default"] = type(layer.update)(a, b, layer.config, layer.rng)
        y = twin.forward(g, ids)
        return g.sum(g.mul(y, y))

    assert gradcheck(fn, np.array(g.value(layer.lora_a)), np.array(g.value(layer.lora_b)))


def test_lora_embedding_merge_unmerge_is_bit_exact_and_refusals_change_nothing() -> None:
    g, layer = _embedding()
    g.set_value(layer.lora_a, np.random.default_rng(1).normal(size=(7, 2)))
    before = np.array(g.value(layer.frozen_weight))
    ids = np.array([1, 4, 4])
    unmerged = np.array(g.value(layer.forward(g, ids)))
    layer.merge_(g)
    np.testing.assert_allclose(g.value(layer.forward(g, ids)), unmerged, rtol=1e-12)
    layer.unmerge_(g)
    np.testing.assert_array_equal(g.value(layer.frozen_weight), before)
    for config, match in [
        (
            gl.VeraConfig(rank=2),
            "the 'vera' variant supports linear layers, not embedding layers",
        ),
        (gl.LoraConfig(rank=2, init="pissa"), "init='pissa' is for linear layers only"),
        (
            gl.LoraConfig(rank=6, init="pissa"),
            r"rank 6 exceeds min\(num_embeddings, embedding_dim\) = 5",
        ),
    ]:
        with pytest.raises(ValueError, match="LoraEmbedding.from_embedding: " + match):
            gl.LoraEmbedding.from_embedding(g, before, config)
    with pytest.raises(
        ValueError,
        match=r"LoraEmbedding.add_adapter: lora: the 'vera' variant supports linear layers, not embedding layers",
    ):
        layer.add_adapter(g, "other", gl.VeraConfig(rank=2))
    assert list(layer.adapters) == ["default"]


@pytest.mark.crosscheck
def test_lora_embedding_equals_peft() -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    root = torch.nn.Module()
    root.add_module("emb", torch.nn.Embedding(7, 5).double())
    model = peft.get_peft_model(root, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb"]))
    theirs = model.base_model.model.emb
    with torch.no_grad():  # PEFT starts A at 0 too; give it values so that the update shows
        theirs.lora_embedding_A["default"].normal_()
    g = gl.Graph()
    layer = gl.LoraEmbedding.from_embedding(
        g, theirs.base_layer.weight.detach().numpy(), gl.LoraConfig(rank=2, alpha=4.0)
    )
    g.set_value(layer.lora_a, theirs.lora_embedding_A["default"].detach().numpy().T)
    g.set_value(layer.lora_b, theirs.lora_embedding_B["default"].detach().numpy().T)
    ids = np.array([[0, 6, 2], [2, 2, 5]])
    out = theirs(torch.tensor(ids))
    (out**2).sum().backward()
    y = layer.forward(g, ids)
    g.backward(g.sum(g.mul(y, y)))
    np.testing.assert_allclose(g.value(y), out.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(
        g.grad(layer.lora_a), theirs.lora_embedding_A["default"].grad.numpy().T, rtol=1e-12
    )
    np.testing.assert_allclose(
        g.grad(layer.lora_b), theirs.lora_embedding_B["default"].grad.numpy().T, rtol=1e-12
    )


# --- several adapters on one layer ----------------------------------------------------------------


def _two_adapters() -> tuple[gl.Graph, gl.LoraLinear]:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 6, 4, gl.LoraConfig(rank=2, alpha=4.0, seed=0))
    layer.add_adapter(g, "other", gl.LoraConfig(rank=3, alpha=3.0, use_dora=True, seed=1))
    rng = np.random.default_rng(2)
    for update in layer.adapters.values():
        g.set_value(update.lora_b, rng.normal(size=update.lora_b.shape))
    return g, layer


def test_an_added_adapter_is_inactive_and_frozen_until_set() -> None:
    g, layer = _two_adapters()
    default, other = layer.adapters["default"], layer.adapters["other"]
    assert layer.active_adapters == ["default"] and layer.rank == 2
    assert layer.trainable_params() == default.params()
    assert not any(leaf.requires_grad for leaf in other.params())
    x = g.constant(np.random.default_rng(3).normal(size=(5, 6)))
    y = layer.forward(g, x)
    g.backward(g.sum(g.mul(y, y)))
    assert all(g.grad(leaf) is None for leaf in other.params())
    layer.set_adapter(g, "other")
    assert layer.rank == 3 and layer.lora_a is other.lora_a
    assert [leaf.requires_grad for leaf in default.params() + other.params()] == [False] * 2 + [
        True
    ] * 3


def test_active_adapters_add_their_updates_and_only_they_learn() -> None:
    g, layer = _two_adapters()
    layer.add_adapter(g, "third", gl.LoraConfig(rank=1, alpha=2.0, seed=3))
    g.set_value(layer.adapters["third"].lora_b, np.full((1, 4), 0.5))
    x = g.constant(np.random.default_rng(3).normal(size=(5, 6)))
    base = np.array(g.value(layer.base_forward(g, x)))
    each = {}
    for name in ("default", "third"):
        layer.set_adapter(g, name)
        each[name] = np.array(g.value(layer.forward(g, x))) - base
    layer.set_adapter(g, ["default", "third"])
    y = layer.forward(g, x)
    np.testing.assert_allclose(g.value(y), base + each["default"] + each["third"], rtol=1e-12)
    g.backward(g.sum(g.mul(y, y)))
    assert len(layer.trainable_params()) == 4
    assert all(g.grad(leaf) is not None for leaf in layer.trainable_params())
    assert all(g.grad(leaf) is None for leaf in layer.adapters["other"].params())


@pytest.mark.parametrize("order", [["default", "other"], ["other", "default"]])
def test_dora_among_active_adapters_rescales_what_comes_before_as_merging_does(
    order: list[str],
) -> None:
    """After other adapters, DoRA rescales the output so far (PEFT's ``result``): the forward
    is then what merging the adapters in turn gives."""
    g, layer = _two_adapters()
    layer.set_adapter(g, order)
    x = g.constant(np.random.default_rng(3).normal(size=(5, 6)))
    y = np.array(g.value(layer.forward(g, x)))
    w, bias = np.array(g.value(layer.frozen_weight)), np.array(g.value(layer.bias))
    lora, dora = layer.adapters["default"], layer.adapters["other"]
    assert isinstance(dora, DoraUpdate)
    d_lora = layer.delta(g, "default")
    d_dora = layer.delta(g, "other")
    ratio = g.value(dora.magnitude) / column_norms(w + d_dora)  # the norm of W + its own delta
    if order[0] == "default":
        merged = (w + d_lora + d_dora) * ratio
    else:
        merged = (w + d_dora) * ratio + d_lora
    np.testing.assert_allclose(y, g.value(x) @ merged + bias, rtol=1e-10)
    layer.merge_(g)
    assert layer.merged_adapters == order
    np.testing.assert_allclose(g.value(layer.frozen_weight), merged, rtol=1e-12)
    np.testing.assert_allclose(g.value(layer.forward(g, x)), y, rtol=1e-10)
    assert lora is layer.adapters["default"]


@pytest.mark.parametrize(
    "order", [["default", "other", "third"], ["third", "default", "other"], ["default", "third"]]
)
def test_three_active_adapters_give_what_merging_them_in_turn_gives(order: list[str]) -> None:
    """A DoRA adapter anywhere after others rescales all of them; plain adapters after it are
    added to what it gave. The layer records one node for the output so far only where a later
    DoRA needs it."""
    g, layer = _two_adapters()
    layer.add_adapter(g, "third", gl.LoraConfig(rank=2, alpha=2.0, init="random", seed=4))
    layer.set_adapter(g, order)
    x = g.constant(np.random.default_rng(3).normal(size=(5, 6)))
    before = len(g.tape)
    y = np.array(g.value(layer.forward(g, x)))
    adds = sum(node.op == "add" and node.scope == layer.name for node in g.tape[before:])
    dora_at = order.index("other") if "other" in order else 0
    # in the layer's own scope: one add per adapter, and for each adapter before the DoRA one
    # the output so far that DoRA rescales
    assert adds == len(order) + dora_at
    layer.merge_(g)
    assert layer.merged_adapters == order
    np.testing.assert_allclose(g.value(layer.forward(g, x)), y, rtol=1e-10)


def test_adapter_refusals_name_the_known_adapters_and_change_nothing() -> None:
    g, layer = _two_adapters()
    with pytest.raises(
        ValueError,
        match=r"LoraLinear.set_adapter: lora has no adapter \['nope'\]; it holds \['default', 'other'\]",
    ):
        layer.set_adapter(g, ["default", "nope"])
    with pytest.raises(
        ValueError, match=r"LoraLinear.add_adapter: lora already holds an adapter 'other'"
    ):
        layer.add_adapter(g, "other", gl.LoraConfig(rank=2))
    with pytest.raises(ValueError, match=r"add_adapter: init='pissa' replaces the base weight"):
        layer.add_adapter(g, "third", gl.LoraConfig(rank=2, init="pissa"))
    with pytest.raises(ValueError, match=r"adapter_name 'a.b' must be letters, digits"):
        layer.add_adapter(g, "a.b", gl.LoraConfig(rank=2))
    with pytest.raises(
        ValueError,
        match=r"LoraLinear.delete_adapter: lora has no adapter 'nope'; it holds \['default', 'other'\]",
    ):
        layer.delete_adapter(g, "nope")
    with pytest.raises(ValueError, match=r"LoraLinear.state_dict: lora has no adapter 'nope'"):
        layer.state_dict(g, "nope")
    layer.merge_(g)
    with pytest.raises(
        gl.GraphError,
        match=r"LoraLinear.set_adapter: lora is merged \(adapters \['default'\]\); unmerge_ it first",
    ):
        layer.set_adapter(g, "other")
    with pytest.raises(gl.GraphError, match=r"delete_adapter: lora is merged"):
        layer.delete_adapter(g, "default")
    layer.unmerge_(g)
    assert list(layer.adapters) == ["default", "other"] and layer.active_adapters == ["default"]


def test_deleting_the_active_adapter_leaves_none_active() -> None:
    g, layer = _two_adapters()
    x = g.constant(np.random.default_rng(3).normal(size=(5, 6)))
    a = layer.lora_a
    layer.delete_adapter(g, "default")
    assert list(layer.adapters) == ["other"] and layer.active_adapters == []
    assert not a.requires_grad and layer.trainable_params() == []
    np.testing.assert_array_equal(g.value(layer.forward(g, x)), g.value(layer.base_forward(g, x)))
    with pytest.raises(
        gl.GraphError,
        match=r"lora: no active adapter \(it holds \['other'\]\); call set_adapter first",
    ):
        _ = layer.lora_a
    with pytest.warns(UserWarning, match="lora has no adapter running; nothing to merge"):
        layer.merge_(g)
    assert "active=None" in repr(layer)
    layer.set_adapter(g, "other")
    assert layer.active_adapter == "other"


def test_changing_the_active_adapters_ends_compiled_steps() -> None:
    g, layer = _two_adapters()
    x = g.constant(np.ones((2, 6)))
    step = g.compile(g.sum(layer.forward(g, x)))
    layer.set_adapter(g, "other")
    with pytest.raises(gl.GraphError, match="changed its adapters"):
        step()


def test_dora_over_pissa_keeps_the_original_weights_column_norms_and_leaves_are_named() -> None:
    g = gl.Graph()
    w = np.random.default_rng(0).normal(size=(6, 4))
    config = gl.LoraConfig(rank=2, seed=0, use_dora=True, init="pissa")
    layer = gl.LoraLinear.from_linear(g, w, config=config)
    update = layer.adapters["default"]
    assert isinstance(update, DoraUpdate)
    # the base holds the residual W - A @ B * s; the magnitude is of W itself, as PEFT's
    np.testing.assert_allclose(g.value(update.magnitude), np.linalg.norm(w, axis=0), rtol=1e-12)
    assert (update.lora_a.name, update.lora_b.name, update.magnitude.name) == (
        "lora.lora_A",
        "lora.lora_B",
        "lora.lora_magnitude_vector",
    )
    other = layer.add_adapter(g, "other", gl.LoraConfig(rank=1, seed=1, use_dora=True))
    assert isinstance(other, DoraUpdate)
    assert (other.lora_a.name, other.magnitude.name) == (
        "lora.lora_A.other",
        "lora.lora_magnitude_vector.other",
    )
