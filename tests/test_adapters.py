"""A model's adapter set: apply_lora(adapter_name=), set_adapter, disable_adapters,
delete_adapter and add_weighted_adapter, against PEFT on the same model and against their maths."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

import graphlora as gl
from graphlora.lora.functional import combine_adapters, scaled_delta
from graphlora.testing import strategies as gst


class Toy:
    """An embedding and two linear layers, named as the PyTorch twin below."""

    def __init__(self, g: gl.Graph, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.emb = gl.Embedding.new(g, 7, 6, rng=rng, name="emb")
        self.fc1 = gl.Linear.new(g, 6, 5, rng=rng, name="fc1")
        self.fc2 = gl.Linear.new(g, 5, 4, rng=rng, name="fc2")

    def forward(self, g: gl.Graph, ids: Any) -> gl.NodeId:
        return self.fc2.forward(g, g.tanh(self.fc1.forward(g, self.emb.forward(g, ids))))


IDS = np.array([[0, 6, 3], [2, 2, 1]])


def _run(g: gl.Graph, model: Toy) -> np.ndarray:
    with g.no_grad():
        return np.array(g.value(model.forward(g, IDS)))


def _base_output() -> np.ndarray:
    """What the model computes without LoRA (the same seed draws the same weights)."""
    g = gl.Graph()
    return _run(g, Toy(g))


def _model_with_two_adapters() -> tuple[gl.Graph, Toy]:
    """``default`` (rank 2) on emb and fc1; ``other`` (rank 2) on fc1 and fc2; B drawn."""
    g = gl.Graph()
    model = Toy(g)
    gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0, seed=1), ["emb", "fc1"])
    gl.apply_lora(
        model, gl.LoraConfig(rank=2, alpha=2.0, seed=2), ["fc1", "fc2"], adapter_name="other"
    )
    rng = np.random.default_rng(3)
    for layer in gl.nn.lora_layers(model).values():
        for update in layer.adapters.values():
            g.set_value(update.lora_a, rng.normal(size=update.lora_a.shape))
            g.set_value(update.lora_b, rng.normal(size=update.lora_b.shape))
    return g, model


def test_a_second_adapter_is_added_inactive_and_frozen() -> None:
    g = gl.Graph()
    model = Toy(g)
    first = gl.apply_lora(model, gl.LoraConfig(rank=2, seed=1), ["fc1"])
    base = _run(g, model)
    added = gl.apply_lora(
        model, gl.LoraConfig(rank=3, seed=2), ["fc1", "fc2"], adapter_name="other"
    )
    assert list(added) == ["fc1", "fc2"] and added["fc1"] is first["fc1"]
    assert isinstance(model.fc2, gl.LoraLinear)
    assert model.fc1.active_adapters == ["default"] and list(model.fc1.adapters) == [
        "default",
        "other",
    ]
    assert model.fc2.active_adapters == ["default"]  # the model's active set, which fc2 lacks
    np.testing.assert_array_equal(_run(g, model), base)  # other's B is 0, and it is inactive
    trainable = gl.nn.parameters(model)
    assert trainable == model.fc1.adapters["default"].params()
    gl.set_adapter(model, "other")
    assert gl.nn.parameters(model) == [
        *model.fc1.adapters["other"].params(),
        *model.fc2.adapters["other"].params(),
    ]
    assert not any(leaf.requires_grad for leaf in model.fc1.adapters["default"].params())


def test_several_active_adapters_add_up_across_the_model() -> None:
    g, model = _model_with_two_adapters()
    gl.set_adapter(model, ["default", "other"])
    both = _run(g, model)
    # by hand: each layer adds the updates of the adapters it holds
    ids = IDS
    emb, fc1, fc2 = model.emb, model.fc1, model.fc2
    assert isinstance(emb, gl.LoraEmbedding) and isinstance(fc1, gl.LoraLinear)
    assert isinstance(fc2, gl.LoraLinear)
    h = g.value(emb.frozen_weight)[ids] + emb.merge(g)[ids] - g.value(emb.frozen_weight)[ids]
    h = np.tanh(h @ fc1.merge(g) + g.value(fc1.bias))
    np.testing.assert_allclose(both, h @ fc2.merge(g) + g.value(fc2.bias), rtol=1e-12)


def test_disable_adapters_runs_the_base_and_restores_on_leaving() -> None:
    g, model = _model_with_two_adapters()
    with_adapters = _run(g, model)
    step = g.compile(g.sum(model.forward(g, IDS)))
    with gl.disable_adapters(model):
        bare = _run(g, model)
        with pytest.raises(gl.GraphError, match="end_replays was called"):
            step()
    np.testing.assert_array_equal(bare, _base_output())
    np.testing.assert_array_equal(_run(g, model), with_adapters)
    model.fc1.merge_(g)
    with pytest.raises(gl.GraphError, match=r"disable_adapters: \['fc1'\] are merged; unmerge_"):
        gl.disable_adapters(model).__enter__()
    assert not model.fc2.disabled


def test_delete_adapter_removes_it_everywhere_and_leaves_none_active() -> None:
    g, model = _model_with_two_adapters()
    gl.delete_adapter(model, "default")
    assert "default" not in model.emb.adapters and list(model.fc1.adapters) == ["other"]
    assert model.fc1.active_adapters == [] and model.fc2.active_adapters == []
    assert gl.nn.parameters(model) == []
    np.testing.assert_array_equal(_run(g, model), _base_output())
    gl.set_adapter(model, "other")
    assert model.fc2.active_adapter == "other" and model.emb.active_adapter is None


def test_model_level_refusals_name_the_adapters_and_change_nothing() -> None:
    g, model = _model_with_two_adapters()
    before = _run(g, model)
    cases: list[tuple[Any, type[Exception], str]] = [
        (
            lambda: gl.set_adapter(model, ["other", "x"]),
            ValueError,
            r"set_adapter: unknown adapter\(s\) \['x'\]; the model has \['default', 'other'\]",
        ),
        (
            lambda: gl.delete_adapter(model, "x"),
            ValueError,
            r"delete_adapter: unknown adapter 'x'; the model has \['default', 'other'\]",
        ),
        (
            lambda: gl.apply_lora(model, gl.LoraConfig(rank=2), ["fc1"], adapter_name="other"),
            ValueError,
            r"apply_lora: \['fc1'\] already carry a LoRA adapter named 'other'",
        ),
        (
            lambda: gl.apply_lora(
                model, gl.LoraConfig(rank=2, init="pissa"), ["fc1"], adapter_name="p"
            ),
            ValueError,
            r"apply_lora: init='pissa' replaces the base weight, which the adapters of \['fc1'\]",
        ),
        (
            lambda: gl.apply_lora(model, gl.VeraConfig(rank=2), ["emb"], adapter_name="d"),
            ValueError,
            r"apply_lora: \['emb'\]: the 'vera' variant supports linear layers, not embedding layers",
        ),
        (
            lambda: gl.set_adapter(object(), "x"),
            TypeError,
            r"set_adapter: model must be a layer or a model \(an object, list or dict holding layers\)",
        ),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    model.fc1.merge_(g)
    with pytest.raises(gl.GraphError, match=r"set_adapter: \['fc1'\] are merged"):
        gl.set_adapter(model, "other")
    with pytest.raises(gl.GraphError, match=r"delete_adapter: \['fc1'\] are merged"):
        gl.delete_adapter(model, "other")
    model.fc1.unmerge_(g)
    np.testing.assert_array_equal(_run(g, model), before)
    assert model.fc1.active_adapters == ["default"] and list(model.fc2.adapters) == ["other"]


# --- weighted combinations ------------------------------------------------------------------------


@given(data=st.data())
def test_combine_adapters_cat_is_the_exact_weighted_sum_and_svd_the_best_of_its_rank(
    data: st.DataObject,
) -> None:
    n_in, n_out = (
        data.draw(st.integers(2, 6), label="in"),
        data.draw(st.integers(2, 6), label="out"),
    )
    ranks = data.draw(st.lists(st.integers(1, 2), min_size=1, max_size=3), label="ranks")
    adapters = [
        {"A": data.draw(gst.arrays((n_in, r))), "B": data.draw(gst.arrays((r, n_out)))}
        for r in ranks
    ]
    weights = data.draw(
        st.lists(st.floats(-2, 2), min_size=len(ranks), max_size=len(ranks)), label="w"
    )
    scalings = data.draw(
        st.lists(st.floats(0.1, 4), min_size=len(ranks), max_size=len(ranks)), label="s"
    )
    target = sum(
        w * scaled_delta(a["A"], a["B"], s)
        for a, w, s in zip(adapters, weights, scalings, strict=True)
    )
    cat = combine_adapters(adapters, weights, "cat", scalings=scalings)
    assert cat["A"].shape == (n_in, sum(ranks))
    np.testing.assert_allclose(cat["A"] @ cat["B"], target, rtol=1e-10, atol=1e-10)
    rank = data.draw(st.integers(1, min(n_in, n_out)), label="svd rank")
    svd = combine_adapters(adapters, weights, "svd", scalings=scalings, rank=rank)
    sigma = np.linalg.svd(target, compute_uv=False)
    error = np.linalg.norm(svd["A"] @ svd["B"] - target)  # Eckart-Young: the discarded part
    np.testing.assert_allclose(error, np.sqrt(np.sum(sigma[rank:] ** 2)), rtol=1e-6, atol=1e-9)


def test_combine_adapters_linear_weights_a_by_the_signed_root_and_keeps_cross_terms() -> None:
    rng = np.random.default_rng(0)
    one = {"A": rng.normal(size=(4, 2)), "B": rng.normal(size=(2, 3))}
    two = {"A": rng.normal(size=(4, 2)), "B": rng.normal(size=(2, 3))}
    w, s = [0.3, -0.7], [2.0, 0.5]
    out = combine_adapters([one, two], w, "linear", scalings=s)
    r1, r2 = np.sqrt(0.3 * 2.0), np.sqrt(0.7 * 0.5)  # exactly, not rounded to float32 as PEFT
    np.testing.assert_array_equal(out["A"], np.sum([r1 * one["A"], -r2 * two["A"]], axis=0))
    np.testing.assert_array_equal(out["B"], np.sum([r1 * one["B"], r2 * two["B"]], axis=0))
    product = r1 * r1 * one["A"] @ one["B"] - r2 * r2 * two["A"] @ two["B"]
    cross = r1 * r2 * (one["A"] @ two["B"]) - r2 * r1 * (two["A"] @ one["B"])
    np.testing.assert_allclose(out["A"] @ out["B"], product + cross, rtol=1e-12)
    with pytest.raises(
        ValueError,
        match=r"combine_adapters: 'linear' needs adapters of one rank, got ranks \[2, 1\]",
    ):
        combine_adapters([one, {"A": one["A"][:, :1], "B": one["B"][:1]}], w, "linear")


def test_add_weighted_adapter_adds_an_inactive_frozen_adapter_of_scaling_1() -> None:
    g, model = _model_with_two_adapters()
    before = _run(g, model)
    added = gl.add_weighted_adapter(g, model, ["default", "other"], [0.5, 2.0], "mix", "cat")
    assert list(added) == ["emb", "fc1", "fc2"]
    fc1 = model.fc1
    assert isinstance(fc1, gl.LoraLinear)
    mix = fc1.adapters["mix"]
    assert (mix.rank, mix.scaling, mix.config.alpha) == (4, 1.0, 4.0)
    assert model.emb.adapters["mix"].rank == 4  # padded: emb holds only default (rank 2)
    assert not any(leaf.requires_grad for leaf in mix.params())
    np.testing.assert_array_equal(_run(g, model), before)
    expected = 0.5 * fc1.delta(g, "default") + 2.0 * fc1.delta(g, "other")
    np.testing.assert_allclose(fc1.delta(g, "mix"), expected, rtol=1e-12)


def test_add_weighted_adapter_refusals_change_nothing() -> None:
    g, model = _model_with_two_adapters()
    gl.apply_lora(model, gl.LoraConfig(rank=3, seed=4), ["fc2"], adapter_name="r3")
    gl.apply_lora(model, gl.LoraConfig(rank=2, use_dora=True, seed=5), ["fc2"], adapter_name="dora")
    known = r"\['default', 'other', 'r3', 'dora'\]"
    cases: list[tuple[tuple[Any, ...], dict[str, Any], type[Exception], str]] = [
        (
            (["default", "x"], [1, 1], "new"),
            {},
            ValueError,
            rf"unknown adapter\(s\) \['x'\]; the model has {known}",
        ),
        ((["default"], [1], "other"), {}, ValueError, "the model already has an adapter 'other'"),
        (
            (["default", "other"], [1], "new"),
            {},
            ValueError,
            r"2 adapters \['default', 'other'\] but 1 weights \[1\]",
        ),
        (
            (["default", "other"], [1, float("nan")], "new"),
            {},
            ValueError,
            "weights must be finite",
        ),
        (
            (["default", "other"], [1, 1], "new", "bogus"),
            {},
            ValueError,
            r"combination_type must be one of \['svd', 'linear', 'cat', 'ties', .*\], got 'bogus'",
        ),
        ((["default", "other"], [1, 1], "new", "ties"), {}, ValueError, r"'ties' needs a density"),
        (
            (["default", "other"], [1, 1], "new", "dare_linear"),
            {"density": 0},
            ValueError,
            r"'dare_linear' needs a density in \(0, 1\], got 0.0",
        ),
        (
            (["default", "other"], [1, 1], "new", "ties_svd"),
            {"density": 1.5},
            ValueError,
            r"'ties_svd' needs a density in \[0, 1\], got 1.5",
        ),
        (
            (["default", "other"], [1, 1], "new", "svd"),
            {"density": 0.5},
            ValueError,
            r"density is for \['ties', .*\]; 'svd' does not prune, got density=0.5",
        ),
        (
            (["default", "other"], [1, 1], "new", "ties"),
            {"density": 0.5, "majority_sign_method": "most"},
            ValueError,
            "majority_sign_method must be 'total' or 'frequency', got 'most'",
        ),
        (
            (["default", "r3"], [1, 1], "new", "dare_ties"),
            {"density": 0.5},
            ValueError,
            r"'dare_ties' needs adapters of one rank; they have ranks \{'default': 2, 'r3': 3\}",
        ),
        (
            (["default", "other"], [1, 1], "new", "ties"),
            {"density": "half"},
            TypeError,
            "density must be a real scalar",
        ),
        (
            (["default", "r3"], [1, 1], "new", "linear"),
            {},
            ValueError,
            r"'linear' needs adapters of one rank; they have ranks \{'default': 2, 'r3': 3\}",
        ),
        (
            (["default", "dora"], [1, 1], "new"),
            {},
            ValueError,
            r"adapters \['dora'\] use DoRA, VeRA or init='pissa'",
        ),
        (
            (["default", "other"], [1, 1], "new"),
            {"svd_rank": 5},
            ValueError,
            r"svd rank 5 exceeds min\(in, out\) of layer\(s\) \['fc2'\]",
        ),
    ]
    before = {name: list(layer.adapters) for name, layer in gl.nn.lora_layers(model).items()}
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match="add_weighted_adapter: " + match):
            gl.add_weighted_adapter(g, model, *args, **kwargs)
    assert {
        name: list(layer.adapters) for name, layer in gl.nn.lora_layers(model).items()
    } == before


def _torch_toy(g: gl.Graph, model: Toy) -> Any:
    """Toy in PyTorch (float64), with ``model``'s base weights."""
    torch = pytest.importorskip("torch")

    class TorchToy(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(7, 6)
            self.fc1 = torch.nn.Linear(6, 5)
            self.fc2 = torch.nn.Linear(5, 4)

        def forward(self, ids: Any) -> Any:
            return self.fc2(torch.tanh(self.fc1(self.emb(ids))))

    base = TorchToy().double()
    with torch.no_grad():
        for name in ("emb", "fc1", "fc2"):
            layer = getattr(model, name)
            weight = np.array(g.value(getattr(layer, "frozen_weight", None) or layer.weight))
            getattr(base, name).weight.copy_(torch.tensor(weight if name == "emb" else weight.T))
            if name != "emb":
                getattr(base, name).bias.copy_(torch.tensor(np.array(g.value(layer.bias))))
    return base


def _peft_twin(g: gl.Graph, model: Toy) -> Any:
    """PEFT's model with ``model``'s weights and adapters (``default`` and ``other``), float64."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = _torch_toy(g, model)
    theirs = peft.get_peft_model(
        base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "fc1"])
    )
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["fc1", "fc2"]))
    with torch.no_grad():  # our values into PEFT's adapters
        for name, layer in gl.nn.lora_layers(model).items():
            module = theirs.base_model.model.get_submodule(name)
            for adapter, update in layer.adapters.items():
                a, b = (
                    torch.tensor(np.array(g.value(n)).T) for n in (update.lora_a, update.lora_b)
                )
                if name == "emb":
                    module.lora_embedding_A[adapter].copy_(a)
                    module.lora_embedding_B[adapter].copy_(b)
                else:
                    module.lora_A[adapter].weight.copy_(a)
                    module.lora_B[adapter].weight.copy_(b)
    return theirs


@pytest.mark.crosscheck
def test_adapter_sets_and_weighted_adapters_equal_peft() -> None:
    torch = pytest.importorskip("torch")
    g, model = _model_with_two_adapters()
    theirs = _peft_twin(g, model)

    def compare() -> None:
        with torch.no_grad():
            expected = theirs(torch.tensor(IDS)).numpy()
        np.testing.assert_allclose(_run(g, model), expected, rtol=1e-10, atol=1e-12)

    compare()
    for names in ("other", ["default", "other"]):
        theirs.base_model.set_adapter(names)
        gl.set_adapter(model, names)
        compare()
    with theirs.disable_adapter(), gl.disable_adapters(model):
        compare()
    # weights whose w * scaling has a float32-exact root, since PEFT rounds those to float32
    for combination, kwargs in [("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 1})]:
        name = f"{combination}{kwargs.get('svd_rank', '')}"
        theirs.base_model.add_weighted_adapter(
            ["default", "other"], [0.125, -4.0], name, combination, **kwargs
        )
        gl.add_weighted_adapter(
            g, model, ["default", "other"], [0.125, -4.0], name, combination, **kwargs
        )
        theirs.base_model.set_adapter(name)
        gl.set_adapter(model, name)
        compare()
    theirs.base_model.delete_adapter("other")
    gl.delete_adapter(model, "other")
    theirs.base_model.set_adapter("default")
    gl.set_adapter(model, "default")
    compare()


def test_the_model_state_dict_names_every_adapter_as_peft_and_loads_back() -> None:
    g, model = _model_with_two_adapters()
    gl.apply_lora(model, gl.LoraConfig(rank=2, use_dora=True, seed=4), ["fc2"], adapter_name="d")
    state = gl.nn.state_dict(g, model)
    lora_keys = sorted(k for k in state if "lora" in k)
    assert lora_keys == [
        "emb.lora_embedding_A.default",
        "emb.lora_embedding_B.default",
        "fc1.lora_A.default",
        "fc1.lora_A.other",
        "fc1.lora_B.default",
        "fc1.lora_B.other",
        "fc2.lora_A.d",
        "fc2.lora_A.other",
        "fc2.lora_B.d",
        "fc2.lora_B.other",
        "fc2.lora_magnitude_vector.d",
    ]
    g2 = gl.Graph()
    twin = Toy(g2, seed=9)
    gl.apply_lora(twin, gl.LoraConfig(rank=2, alpha=4.0), ["emb", "fc1"])
    gl.apply_lora(twin, gl.LoraConfig(rank=2, alpha=2.0), ["fc1", "fc2"], adapter_name="other")
    gl.apply_lora(twin, gl.LoraConfig(rank=2, use_dora=True), ["fc2"], adapter_name="d")
    gl.nn.load_state_dict(g2, twin, state)
    for names in ("default", "other", "d", ["default", "other", "d"]):
        gl.set_adapter(model, names)
        gl.set_adapter(twin, names)
        np.testing.assert_array_equal(_run(g2, twin), _run(g, model))


def test_ties_and_magnitude_pruning_by_hand() -> None:
    from graphlora.lora.functional import magnitude_prune, merge_task_tensors

    t1, t2 = np.array([3.0, -1.0, 0.5, -2.0]), np.array([-1.0, -4.0, 2.0, 1.0])
    # keep int(0.5 * 4) = 2 magnitudes each: t1 keeps 3 and -2, t2 keeps -4 and 2
    np.testing.assert_array_equal(magnitude_prune(t1, 0.5), [3.0, 0.0, 0.0, -2.0])
    np.testing.assert_array_equal(magnitude_prune(t1, 0.0), [0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(magnitude_prune(t1, 0.3), [3.0, 0.0, 0.0, 0.0])  # int(1.2)
    # magnitude_prune: 1 * [3, 0, 0, -2] + 0.5 * [0, -4, 2, 0]
    np.testing.assert_array_equal(
        merge_task_tensors([t1, t2], [1.0, 0.5], "magnitude_prune", density=0.5),
        [3.0, -2.0, 1.0, -2.0],
    )
    # no pruning; the elected signs (of the unweighted sums 2, -5, 2.5, -1) are + - + -:
    # element 0 keeps only t1's 3, element 1 averages -1 and 0.5 * -4, element 2 averages
    # 0.5 and 0.5 * 2, element 3 keeps only t1's -2
    np.testing.assert_array_equal(
        merge_task_tensors([t1, t2], [1.0, 0.5], "ties"), [3.0, -1.5, 0.75, -2.0]
    )
    np.testing.assert_array_equal(
        merge_task_tensors([t1, t2], [1.0, 0.5], "linear"), [2.5, -3.0, 1.5, -1.5]
    )
    np.testing.assert_array_equal(merge_task_tensors([t1, t2], [1.0, 0.5]), [2.5, -3.0, 1.5, -1.5])
    # 5, -1, -1: the total elects +, the frequency -
    three = [np.array([5.0]), np.array([-1.0]), np.array([-1.0])]
    np.testing.assert_array_equal(merge_task_tensors(three, [1, 1, 1], "ties"), [5.0])
    np.testing.assert_array_equal(
        merge_task_tensors(three, [1, 1, 1], "ties", majority_sign_method="frequency"), [-1.0]
    )
    # all pruned: every count is 0, divided by 1, not by 0
    np.testing.assert_array_equal(
        merge_task_tensors([t1, t2], [1.0, 1.0], "ties", density=0.0), np.zeros(4)
    )


def test_dare_keeps_a_random_density_and_rescales_it() -> None:
    from graphlora.lora.functional import merge_task_tensors, random_prune

    tensor = np.random.default_rng(0).normal(size=(200, 100))
    pruned = random_prune(tensor, 0.3, np.random.default_rng(5))
    mask = np.random.default_rng(5).random(tensor.shape) < 0.3  # the same draws
    np.testing.assert_array_equal(pruned[mask], tensor[mask] / 0.3)
    np.testing.assert_array_equal(pruned[~mask], 0.0)
    # the random part: about 30% kept (4 standard deviations of a binomial), mean preserved
    kept = np.count_nonzero(pruned) / tensor.size
    assert abs(kept - 0.3) < 4 * np.sqrt(0.3 * 0.7 / tensor.size)
    ones = random_prune(np.ones(20_000), 0.3, np.random.default_rng(6))
    assert abs(ones.mean() - 1.0) < 4 * np.sqrt(0.7 / 0.3 / 20_000)
    # density 1 keeps everything, so DARE is then linear / TIES exactly
    rng = np.random.default_rng(1)
    t = [rng.normal(size=(4, 3)) for _ in range(3)]
    w = [0.5, -1.0, 2.0]
    np.testing.assert_array_equal(
        merge_task_tensors(t, w, "dare_linear", density=1.0, rng=rng),
        merge_task_tensors(t, w, "linear"),
    )
    np.testing.assert_array_equal(
        merge_task_tensors(t, w, "dare_ties", density=1.0, rng=rng),
        merge_task_tensors(t, w, "ties"),
    )
    with pytest.raises(ValueError, match="merge_task_tensors: 'dare_ties' prunes at random"):
        merge_task_tensors(t, w, "dare_ties", density=0.5)
    with pytest.raises(ValueError, match="merge_task_tensors: unknown method 'mean'"):
        merge_task_tensors(t, w, "mean")
    with pytest.raises(ValueError, match="merge_task_tensors: majority_sign_method must"):
        merge_task_tensors(t, w, "ties", majority_sign_method="max")


def _reference_merge(
    tensors: list[np.ndarray], weights: list[float], method: str, density: float, vote: str
) -> np.ndarray:
    """TIES and magnitude pruning element by element, with loops (distinct magnitudes)."""
    pruned = []
    for t in tensors:
        keep = int(density * t.size) if method != "linear" else t.size
        order = sorted(range(t.size), key=lambda i: -abs(t.flat[i]))
        p = np.zeros_like(t)
        for i in order[:keep]:
            p.flat[i] = t.flat[i]
        pruned.append(p)
    out = np.zeros_like(tensors[0])
    for i in range(out.size):
        values = [p.flat[i] for p in pruned]
        if method != "ties":
            out.flat[i] = sum(w * v for w, v in zip(weights, values, strict=True))
            continue
        if vote == "total":
            elected = 1.0 if sum(values) >= 0 else -1.0
        else:
            elected = 1.0 if sum(np.sign(v) for v in values) >= 0 else -1.0
        chosen = [w * v for w, v in zip(weights, values, strict=True) if np.sign(v) == elected]
        out.flat[i] = sum(chosen) / max(len(chosen), 1)
    return out


@given(
    shape=gst.shapes(min_dims=1, max_dims=2, max_side=4),
    n=st.integers(1, 3),
    data=st.data(),
    method=st.sampled_from(["linear", "ties", "magnitude_prune"]),
    density=st.floats(0.0, 1.0),
    vote=st.sampled_from(["total", "frequency"]),
)
def test_merge_task_tensors_equals_a_loop(
    shape: tuple[int, ...], n: int, data: Any, method: str, density: float, vote: str
) -> None:
    from graphlora.lora.functional import merge_task_tensors

    size = int(np.prod(shape))
    tensors = []
    for _ in range(n):  # distinct magnitudes, so which values survive pruning is defined
        magnitudes = data.draw(st.permutations(range(1, size + 1)))
        signs = data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=size, max_size=size))
        tensors.append((np.array(magnitudes, dtype=float) * signs / 4).reshape(shape))
    weights = data.draw(
        st.lists(st.sampled_from([-2.0, -0.5, 0.25, 1.0, 3.0]), min_size=n, max_size=n)
    )
    got = merge_task_tensors(tensors, weights, method, density=density, majority_sign_method=vote)
    expected = _reference_merge(tensors, weights, method, density, vote)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_dare_merges_are_seeded() -> None:
    g, model = _model_with_two_adapters()
    args = (g, model, ["default", "other"], [1.0, 1.0])
    gl.add_weighted_adapter(*args, "a", "dare_linear", density=0.5, seed=7)
    gl.add_weighted_adapter(*args, "b", "dare_linear", density=0.5, seed=7)
    gl.add_weighted_adapter(*args, "c", "dare_linear", density=0.5, seed=8)
    fc1 = model.fc1
    assert isinstance(fc1, gl.LoraLinear)
    np.testing.assert_array_equal(fc1.delta(g, "a"), fc1.delta(g, "b"))
    assert not np.array_equal(fc1.delta(g, "a"), fc1.delta(g, "c"))


@pytest.mark.crosscheck
@pytest.mark.filterwarnings("ignore:The density 1.0 is greater than or equal to 1")
@pytest.mark.parametrize(
    ("combination", "density", "vote"),
    [
        ("ties", 0.5, "total"),
        ("ties", 0.7, "frequency"),
        ("ties_svd", 0.5, "total"),
        ("ties_svd", 0.3, "frequency"),
        ("magnitude_prune", 0.5, "total"),
        ("magnitude_prune_svd", 0.4, "total"),
        ("dare_linear", 1.0, "total"),
        ("dare_ties", 1.0, "frequency"),
        ("dare_linear_svd", 1.0, "total"),
        ("dare_ties_svd", 1.0, "total"),
    ],
)
def test_pruning_merges_equal_peft(combination: str, density: float, vote: str) -> None:
    torch = pytest.importorskip("torch")
    g, model = _model_with_two_adapters()
    theirs = _peft_twin(g, model)
    args = (["default", "other"], [0.125, -4.0], "mix", combination)
    kwargs: dict[str, Any] = {"density": density, "majority_sign_method": vote}
    theirs.base_model.add_weighted_adapter(*args, **kwargs)
    gl.add_weighted_adapter(g, model, *args, **kwargs)
    theirs.base_model.set_adapter("mix")
    gl.set_adapter(model, "mix")
    with torch.no_grad():
        expected = theirs(torch.tensor(IDS)).numpy()
    np.testing.assert_allclose(_run(g, model), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.crosscheck
def test_dare_prunes_as_peft_in_distribution() -> None:
    torch = pytest.importorskip("torch")
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    from graphlora.lora.functional import merge_task_tensors

    tensor = np.random.default_rng(0).normal(size=(300, 200))
    torch.manual_seed(0)
    theirs = merge_utils.dare_linear([torch.tensor(tensor)], torch.tensor([1.0]), 0.25).numpy()
    ours = merge_task_tensors(
        [tensor], [1.0], "dare_linear", density=0.25, rng=np.random.default_rng(0)
    )
    for pruned in (theirs, ours):
        kept = pruned != 0
        np.testing.assert_allclose(pruned[kept], tensor[kept] / 0.25, rtol=1e-15)
        assert abs(kept.mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / tensor.size)


MIXED_IDS = np.array([[0, 6, 3], [2, 2, 1], [5, 4, 0], [1, 3, 6], [6, 6, 2]])
MIXED = ["default", "__base__", "other", "d", "default"]


def _alone(g: gl.Graph, model: Toy, name: str, ids: np.ndarray) -> np.ndarray:
    """The model's output on ``ids`` with only adapter ``name`` running (or none)."""
    if name == "__base__":
        with gl.disable_adapters(model), g.no_grad():
            return np.array(g.value(model.forward(g, ids)))
    gl.set_adapter(model, name)
    with g.no_grad():
        return np.array(g.value(model.forward(g, ids)))


def test_a_mixed_batch_runs_each_sample_through_its_own_adapter() -> None:
    g, model = _model_with_two_adapters()
    gl.apply_lora(model, gl.LoraConfig(rank=2, use_dora=True, seed=4), ["fc2"], adapter_name="d")
    fc2 = model.fc2
    assert isinstance(fc2, gl.LoraLinear)
    g.set_value(fc2.adapters["d"].lora_b, np.random.default_rng(5).normal(size=(2, 4)))
    with gl.mixed_batch(model, MIXED), g.no_grad():
        mixed = np.array(g.value(model.forward(g, MIXED_IDS)))
    for i, name in enumerate(MIXED):
        np.testing.assert_allclose(
            mixed[i], _alone(g, model, name, MIXED_IDS[i : i + 1])[0], rtol=1e-13, atol=1e-14
        )
    assert all(layer.batch_adapters is None for layer in gl.nn.lora_layers(model).values())
    # the ops are recorded in the layer's scopes, as forward's
    with gl.mixed_batch(model, MIXED), g.no_grad():
        before = len(g.tape)
        model.fc1.forward(g, g.constant(np.ones((5, 6))))
    assert {node.scope for node in g.tape[before:]} == {"fc1", "fc1/frozen", "fc1/lora"}


def test_mixed_batch_refusals_change_nothing() -> None:
    g, model = _model_with_two_adapters()
    unknown = r"mixed_batch: unknown adapter\(s\) \['x'\]; the model"
    with pytest.raises(ValueError, match=unknown), gl.mixed_batch(model, ["default", "x"]):
        pass
    with (
        pytest.raises(TypeError, match="adapter_names must be a list"),
        gl.mixed_batch(model, "default"),
    ):
        pass
    fc1 = model.fc1
    assert isinstance(fc1, gl.LoraLinear)
    with gl.mixed_batch(model, ["default", "other"]):
        with pytest.raises(
            gl.GraphError,
            match=r"^LoraEmbedding.forward: emb: a mixed-adapter batch is for inference; "
            r"record it under graph.no_grad\(\)$",
        ):
            model.forward(g, IDS)
        with (
            g.no_grad(),
            pytest.raises(
                gl.ShapeError,
                match=r"^LoraEmbedding.forward: emb: mixed_batch names 2 adapters, one per "
                r"sample along the input's first axis, but the input has shape \(5, 3\)$",
            ),
        ):
            model.forward(g, MIXED_IDS)
        for x, shape in ((np.ones(6), r"\(\)"), (np.ones((3, 6)), r"\(3,\)")):
            with (  # no batch axis; 3 samples for 2 names
                g.no_grad(),
                pytest.raises(
                    gl.ShapeError,
                    match=rf"^LoraLinear.forward: fc1: mixed_batch names 2 adapters, .*{shape}$",
                ),
            ):
                fc1.forward(g, g.constant(x))
        with gl.disable_adapters(model), g.no_grad():  # disabled wins, as in PEFT
            np.testing.assert_array_equal(g.value(model.forward(g, IDS)), _base_output())
    fc1.batch_adapters = ("default", "other")  # as if merged inside the block
    fc1.merge_(g)
    with (
        g.no_grad(),
        pytest.raises(
            gl.GraphError,
            match=r"^LoraLinear.forward: fc1 has merged adapters \['default'\]; "
            r"unmerge before a mixed-adapter batch$",
        ),
    ):
        fc1.forward(g, g.constant(np.ones((2, 6))))
    fc1.batch_adapters = None
    fc1.unmerge_(g)
    gl.merge_adapter(model)
    with (
        pytest.raises(gl.GraphError, match=r"mixed_batch: .*merged"),
        gl.mixed_batch(model, ["default", "other"]),
    ):
        pass
    assert all(layer.batch_adapters is None for layer in gl.nn.lora_layers(model).values())


@pytest.mark.crosscheck
def test_a_mixed_batch_equals_peft() -> None:
    torch = pytest.importorskip("torch")
    g, model = _model_with_two_adapters()
    theirs = _peft_twin(g, model)
    names = ["other", "default", "__base__", "other", "default"]
    theirs.eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(MIXED_IDS), adapter_names=names).numpy()
    with gl.mixed_batch(model, names), g.no_grad():
        got = np.array(g.value(model.forward(g, MIXED_IDS)))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)


def test_generate_serves_two_adapters_in_one_batch() -> None:
    config = gl.LlamaConfig(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    g = gl.Graph()
    llama = gl.Llama.new(g, config, rng=0)
    gl.apply_lora(llama, gl.LoraConfig(rank=2, seed=1), ["q_proj", "v_proj"])
    gl.apply_lora(llama, gl.LoraConfig(rank=2, seed=2), ["q_proj", "v_proj"], adapter_name="b")
    rng = np.random.default_rng(0)
    for layer in gl.nn.lora_layers(llama).values():
        for update in layer.adapters.values():
            g.set_value(update.lora_b, rng.normal(size=update.lora_b.shape))
    ids = np.array([[1, 2, 3], [4, 5, 6], [4, 5, 6]])
    with gl.mixed_batch(llama, ["default", "b", "__base__"]):
        together = llama.generate(g, ids, max_new_tokens=4)
    gl.set_adapter(llama, "default")
    first = llama.generate(g, ids[:1], max_new_tokens=4)
    gl.set_adapter(llama, "b")
    second = llama.generate(g, ids[1:2], max_new_tokens=4)
    with gl.disable_adapters(llama):
        third = llama.generate(g, ids[2:], max_new_tokens=4)
    np.testing.assert_array_equal(together, np.concatenate([first, second, third]))
    assert not np.array_equal(second, third)  # the adapter changed what sample 2 generates


def _dora_toy() -> tuple[gl.Graph, Toy]:
    """DoRA (rank 2) on emb and fc1, every A, B and magnitude drawn."""
    g = gl.Graph()
    model = Toy(g)
    gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0, use_dora=True, seed=1), ["emb", "fc1"])
    rng = np.random.default_rng(3)
    for layer in gl.nn.lora_layers(model).values():
        update = layer.adapters["default"]
        for leaf in (update.lora_a, update.lora_b):
            g.set_value(leaf, rng.normal(size=leaf.shape))
        g.set_value(update.magnitude, np.array(g.value(update.magnitude)) * rng.uniform(0.5, 1.5))
    return g, model


def test_dora_on_an_embedding_by_hand_and_by_finite_differences() -> None:
    g, model = _dora_toy()
    emb = model.emb
    assert isinstance(emb, gl.LoraEmbedding)
    update = emb.adapters["default"]
    w, a, b, m = (
        np.array(g.value(n))
        for n in (emb.frozen_weight, update.lora_a, update.lora_b, update.magnitude)
    )
    s = 4.0 / 2
    norm = np.sqrt(((w + s * a @ b) ** 2).sum(axis=0))  # per embedding dimension, over the vocab
    ids = IDS
    expected = (m / norm) * (w[ids] + s * a[ids] @ b)
    with g.no_grad():
        np.testing.assert_allclose(g.value(emb.forward(g, ids)), expected, rtol=1e-12)
    # merging gives the same table rows
    merged = emb.merge(g)
    np.testing.assert_allclose(merged[ids], expected, rtol=1e-12)
    # gradients of A, B and m against central differences, with the norm held fixed (detached,
    # as in PEFT): the loss below recomputes the output from the values with the norm frozen
    leaves = [update.lora_a, update.lora_b, update.magnitude]
    out = emb.forward(g, ids)
    g.backward(g.sum(g.mul(out, out)))
    grads = [np.array(g.grad(leaf)) for leaf in leaves]
    g.reset()

    def loss(values: list[np.ndarray]) -> float:
        a_, b_, m_ = values
        rows = (m_ / norm) * (w[ids] + s * a_[ids] @ b_)
        return float(np.sum(rows * rows))

    values = [a, b, m]
    for k, grad in enumerate(grads):
        numeric = np.zeros_like(grad)
        for index in np.ndindex(grad.shape):
            for sign in (1.0, -1.0):
                moved = [v.copy() for v in values]
                moved[k][index] += sign * 1e-6
                numeric[index] += sign * loss(moved) / 2e-6
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.crosscheck
def test_dora_on_an_embedding_equals_peft_both_ways(tmp_path: Any) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    g, model = _dora_toy()
    theirs = _dora_peft(g, model)
    ids = torch.tensor(IDS)
    out = model.forward(g, IDS)
    g.backward(g.sum(g.mul(out, out)))
    expected = theirs(ids)
    np.testing.assert_allclose(g.value(out), expected.detach().numpy(), rtol=1e-10)
    (expected**2).sum().backward()
    for name in ("emb", "fc1"):
        update = getattr(model, name).adapters["default"]
        module = theirs.base_model.model.get_submodule(name)
        if name == "emb":
            grads = (
                module.lora_embedding_A["default"].grad,
                module.lora_embedding_B["default"].grad,
            )
        else:
            grads = (module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad)
        np.testing.assert_allclose(g.grad(update.lora_a), grads[0].numpy().T, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g.grad(update.lora_b), grads[1].numpy().T, rtol=1e-9, atol=1e-12)
        magnitude = module.lora_magnitude_vector["default"].weight.grad.numpy()
        np.testing.assert_allclose(g.grad(update.magnitude), magnitude, rtol=1e-9, atol=1e-12)
    g.reset()
    gl.save_adapter(tmp_path / "ours", g, model)
    loaded = peft.PeftModel.from_pretrained(
        _dora_peft(g, model, adapters=False), str(tmp_path / "ours")
    )
    with torch.no_grad():
        np.testing.assert_allclose(_run(g, model), loaded(ids).numpy(), rtol=1e-12)
    theirs.save_pretrained(str(tmp_path / "peft"))
    g2 = gl.Graph()
    fresh = Toy(g2)
    gl.apply_adapter(tmp_path / "peft", g2, fresh)
    with torch.no_grad():
        np.testing.assert_allclose(_run(g2, fresh), theirs(ids).numpy(), rtol=1e-12)
    merged = theirs.merge_and_unload()
    gl.merge_adapter(model)
    np.testing.assert_allclose(
        g.value(model.emb.frozen_weight), merged.emb.weight.detach().numpy(), rtol=1e-12
    )


def _dora_peft(g: gl.Graph, model: Toy, adapters: bool = True) -> Any:
    """PEFT's Toy with ``model``'s base weights and, with ``adapters``, its DoRA adapter."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = _torch_toy(g, model)
    if not adapters:
        return base
    theirs = peft.get_peft_model(
        base, peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["emb", "fc1"])
    )
    with torch.no_grad():
        for name in ("emb", "fc1"):
            update = getattr(model, name).adapters["default"]
            module = theirs.base_model.model.get_submodule(name)
            a, b = (torch.tensor(np.array(g.value(n)).T) for n in (update.lora_a, update.lora_b))
            if name == "emb":
                module.lora_embedding_A["default"].copy_(a)
                module.lora_embedding_B["default"].copy_(b)
            else:
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
            module.lora_magnitude_vector["default"].weight.copy_(
                torch.tensor(np.array(g.value(update.magnitude)))
            )
    return theirs


def test_ties_takes_density_zero_and_dare_does_not() -> None:
    g, model = _model_with_two_adapters()
    gl.add_weighted_adapter(g, model, ["default", "other"], [1.0, 1.0], "none", "ties", density=0.0)
    fc1 = model.fc1
    assert isinstance(fc1, gl.LoraLinear)
    np.testing.assert_array_equal(fc1.delta(g, "none"), 0.0)  # everything pruned
    with pytest.raises(ValueError, match=r"'dare_ties' needs a density in \(0, 1\], got 0.0"):
        gl.add_weighted_adapter(
            g, model, ["default", "other"], [1.0, 1.0], "d", "dare_ties", density=0.0
        )


def test_a_mixed_batch_through_a_dora_embedding_with_ids_as_a_node() -> None:
    g = gl.Graph()
    model = Toy(g)
    gl.apply_lora(model, gl.LoraConfig(rank=2, use_dora=True, seed=1), ["emb"], adapter_name="d")
    gl.apply_lora(model, gl.LoraConfig(rank=2, seed=2), ["emb"], adapter_name="p")
    rng = np.random.default_rng(4)
    for update in model.emb.adapters.values():
        g.set_value(update.lora_a, rng.normal(size=update.lora_a.shape))
    names = ["p", "d", "__base__"]
    ids = IDS[[0, 1, 0]]
    with gl.mixed_batch(model, names), g.no_grad():
        before = len(g.tape)
        mixed = np.array(g.value(model.emb.forward(g, g.constant(ids))))
        scopes = {node.scope for node in g.tape[before:]}
    assert scopes == {"emb", "emb/frozen", "emb/lora"}
    for i, name in enumerate(names):
        if name == "__base__":
            with gl.disable_adapters(model), g.no_grad():
                alone = g.value(model.emb.forward(g, ids[i : i + 1]))
        else:
            gl.set_adapter(model, name)
            with g.no_grad():
                alone = g.value(model.emb.forward(g, ids[i : i + 1]))
        np.testing.assert_allclose(mixed[i], alone[0], rtol=1e-13, atol=1e-14)


def test_lora_bias_leaves_are_named_after_b() -> None:
    g = gl.Graph(dtype=np.float32)
    model = gl.MLP(g, [4, 3], rng=0)
    gl.apply_lora(model, gl.LoraConfig(rank=2, lora_bias=True))
    gl.apply_lora(model, gl.LoraConfig(rank=2, lora_bias=True), adapter_name="b")
    layer = model.layers[0]
    assert layer.adapters["default"].lora_bias.name == "layers.0.lora_B.bias"
    assert layer.adapters["b"].lora_bias.name == "layers.0.lora_B.b.bias"
    assert g.value(layer.adapters["b"].lora_bias).dtype == np.float32


def test_majority_sign_mask_elects_by_total_by_default() -> None:
    from graphlora.lora.functional import majority_sign_mask

    stacked = np.array([[5.0, -1.0], [-1.0, -1.0], [-1.0, 3.0]])
    np.testing.assert_array_equal(
        majority_sign_mask(stacked), [[True, False], [False, False], [False, True]]
    )
    np.testing.assert_array_equal(
        majority_sign_mask(stacked, "frequency"), [[False, True], [True, True], [True, False]]
    )
