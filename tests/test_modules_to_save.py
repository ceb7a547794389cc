"""PEFT's modules_to_save: a whole module trained as a copy per adapter and saved in the
adapter's file; by hand, and against PEFT (names, outputs, switching, files both ways)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import graphlora as gl

X = np.random.default_rng(7).normal(size=(3, 6))


class Toy:
    """fc1 (LoRA's target), a layer norm and a head (the modules to save)."""

    def __init__(self, g: gl.Graph) -> None:
        self.fc1 = gl.Linear.new(g, 6, 5, rng=0, name="fc1")
        self.norm = gl.LayerNorm.new(g, 5, name="norm")
        self.head = gl.Linear.new(g, 5, 3, rng=1, name="head")

    def forward(self, g: gl.Graph, x: Any) -> gl.NodeId:
        return self.head.forward(g, self.norm.forward(g, g.tanh(self.fc1.forward(g, x))))


def _run(g: gl.Graph, model: Toy) -> np.ndarray:
    with g.no_grad():
        return np.array(g.value(model.forward(g, g.constant(X))))


def _model(**extra: Any) -> tuple[gl.Graph, Toy]:
    g = gl.Graph()
    model = Toy(g)
    config = gl.LoraConfig(rank=2, alpha=4.0, init="random", seed=1, modules_to_save=["head"])
    gl.apply_lora(model, config, ["fc1"], **extra)
    return g, model


def test_the_copy_trains_and_runs_and_the_original_stays() -> None:
    g, model = _model()
    head = model.head
    assert isinstance(head, gl.nn.ModulesToSave)
    trained = [n for n, leaf in gl.nn.named_leaves(model) if leaf.requires_grad]
    assert trained == [
        "fc1.lora_A.default",
        "fc1.lora_B.default",
        "head.modules_to_save.default.weight",
        "head.modules_to_save.default.bias",
    ]
    copied = head.modules_to_save["default"]
    original = np.array(g.value(head.original_module.weight))
    np.testing.assert_array_equal(g.value(copied.weight), original)  # a copy, at first
    assert copied.weight is not head.original_module.weight
    before = _run(g, model)
    g.set_value(copied.weight, original + 1.0)  # as after training
    hidden = None
    with g.no_grad():
        hidden = g.value(model.norm.forward(g, g.tanh(model.fc1.forward(g, g.constant(X)))))
    expected = hidden @ (original + 1.0) + g.value(copied.bias)
    np.testing.assert_allclose(_run(g, model), expected, rtol=1e-12)
    with gl.disable_adapters(model):  # the original runs, nothing trains
        assert gl.nn.parameters(model) == []
        with g.no_grad():
            base = np.array(g.value(model.forward(g, g.constant(X))))
    assert not np.allclose(base, before)  # LoRA's B is drawn: the base differs
    np.testing.assert_array_equal(g.value(head.original_module.weight), original)
    assert len(gl.nn.parameters(model)) == 4  # back on leaving


def _two_adapter_model() -> tuple[gl.Graph, Toy]:
    g, model = _model()
    gl.apply_lora(
        model,
        gl.LoraConfig(rank=2, alpha=4.0, init="random", seed=2, modules_to_save=["head"]),
        ["fc1"],
        adapter_name="other",
    )
    rng = np.random.default_rng(6)
    head = model.head
    assert isinstance(head, gl.nn.ModulesToSave)
    for copy in head.modules_to_save.values():  # as after training: the copies differ
        g.set_value(copy.weight, np.array(g.value(copy.weight)) + rng.normal(size=(5, 3)))
    return g, model


def test_a_second_adapter_gets_its_own_copy() -> None:
    g, model = _two_adapter_model()
    head = model.head
    assert isinstance(head, gl.nn.ModulesToSave)
    assert list(head.modules_to_save) == ["default", "other"] and head.active == "default"
    g.set_value(head.modules_to_save["other"].bias, np.array([9.0, 9.0, 9.0]))
    gl.set_adapter(model, "other")
    assert head.active == "other"
    assert [n for n in (n for n, leaf in gl.nn.named_leaves(model) if leaf.requires_grad)] == [
        "fc1.lora_A.other",
        "fc1.lora_B.other",
        "head.modules_to_save.other.weight",
        "head.modules_to_save.other.bias",
    ]
    with pytest.raises(ValueError, match="set_adapter: head holds modules_to_save copies for"):
        gl.set_adapter(model, ["default", "other"])
    assert head.active == "other"
    gl.delete_adapter(model, "other")
    assert list(head.modules_to_save) == ["default"] and head.active is None


def test_modules_to_save_refusals_change_nothing() -> None:
    g = gl.Graph()
    model = Toy(g)
    before = [n for n, _ in gl.nn.named_leaves(model)]
    cases = [
        (["nothing"], ["fc1"], r"modules_to_save \['nothing'\] match no module"),
        (["fc1"], ["fc1"], r"\['fc1'\] are both LoRA layers \(or targets\) and modules_to_save"),
    ]
    for saved, targets, match in cases:
        config = gl.LoraConfig(rank=2, modules_to_save=saved)
        with pytest.raises(ValueError, match="apply_lora: " + match):
            gl.apply_lora(model, config, targets)
        assert [n for n, _ in gl.nn.named_leaves(model)] == before
    with pytest.raises(TypeError, match="LoraConfig: modules_to_save must be a list"):
        gl.LoraConfig(modules_to_save="head")  # type: ignore[arg-type]
    g2, two = _model()
    with pytest.raises(
        ValueError,
        match=r"^save_adapter: adapter 'default' has modules_to_save, whose copies its file holds: "
        r"pass the model, not a mapping of layers$",
    ):
        gl.save_adapter(Path("unused"), g2, gl.nn.lora_layers(two))


def _torch_twin(g: gl.Graph, model: Toy) -> Any:
    torch = pytest.importorskip("torch")

    class TorchToy(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(6, 5)
            self.norm = torch.nn.LayerNorm(5)
            self.head = torch.nn.Linear(5, 3)

        def forward(self, x: Any) -> Any:
            return self.head(self.norm(torch.tanh(self.fc1(x))))

    twin = TorchToy().double()
    fc1 = model.fc1
    head = model.head.original_module if isinstance(model.head, gl.nn.ModulesToSave) else model.head
    with torch.no_grad():
        twin.fc1.weight.copy_(torch.tensor(np.array(g.value(fc1.frozen_weight)).T))
        twin.fc1.bias.copy_(torch.tensor(np.array(g.value(fc1.bias))))
        twin.head.weight.copy_(torch.tensor(np.array(g.value(head.weight)).T))
        twin.head.bias.copy_(torch.tensor(np.array(g.value(head.bias))))
    return twin


@pytest.mark.crosscheck
def test_modules_to_save_equal_peft_both_ways(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    st = pytest.importorskip("safetensors.numpy")
    g, model = _model()
    theirs = peft.get_peft_model(
        _torch_twin(g, model),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], modules_to_save=["head"]),
    )
    ours_trained = [n for n, leaf in gl.nn.named_leaves(model) if leaf.requires_grad]
    peft_trained = [
        n.removeprefix("base_model.model.").removesuffix(".weight")
        if "lora_" in n
        else n.removeprefix("base_model.model.")
        for n, p in theirs.named_parameters()
        if p.requires_grad
    ]
    assert sorted(ours_trained) == sorted(peft_trained)
    rng = np.random.default_rng(3)
    for _, leaf in gl.nn.named_leaves(model):  # as after training
        if leaf.requires_grad:
            g.set_value(leaf, np.array(g.value(leaf)) + rng.normal(size=leaf.shape))
    gl.save_adapter(tmp_path / "ours", g, model)
    theirs.save_pretrained(str(tmp_path / "peft"))
    keys = [
        sorted(st.load_file(str(tmp_path / d / "adapter_model.safetensors")))
        for d in ("ours", "peft")
    ]
    assert keys[0] == keys[1]
    loaded = peft.PeftModel.from_pretrained(
        _torch_twin(g, model), str(tmp_path / "ours"), is_trainable=True
    )
    xt = torch.tensor(X)
    out = model.forward(g, g.constant(X))  # the copy's gradients equal PEFT's
    g.backward(g.sum(g.mul(out, out)))
    (loaded(xt) ** 2).sum().backward()
    copy = model.head.modules_to_save["default"]
    theirs_copy = loaded.base_model.model.head.modules_to_save["default"]
    np.testing.assert_allclose(g.grad(copy.weight), theirs_copy.weight.grad.numpy().T, rtol=1e-10)
    np.testing.assert_allclose(g.grad(copy.bias), theirs_copy.bias.grad.numpy(), rtol=1e-10)
    g.reset()
    with torch.no_grad():
        np.testing.assert_allclose(_run(g, model), loaded(xt).numpy(), rtol=1e-12)
        with loaded.disable_adapter(), gl.disable_adapters(model):
            np.testing.assert_allclose(_run(g, model), loaded(xt).numpy(), rtol=1e-12)
    # PEFT's file, its head moved, into a fresh graphlora model
    with torch.no_grad():
        loaded.base_model.model.head.modules_to_save["default"].weight.add_(0.5)
    loaded.save_pretrained(str(tmp_path / "back"))
    g2 = gl.Graph()
    fresh = Toy(g2)
    g2.set_value(fresh.fc1.weight, np.array(g.value(model.fc1.frozen_weight)))
    gl.apply_adapter(tmp_path / "back", g2, fresh)
    assert isinstance(fresh.head, gl.nn.ModulesToSave)
    with torch.no_grad():
        np.testing.assert_allclose(_run(g2, fresh), loaded(xt).numpy(), rtol=1e-12)


class Nested:
    """A body, an embedding, a norm and an MLP head (whose layers sit in a list)."""

    def __init__(self, g: gl.Graph) -> None:
        self.emb = gl.Embedding.new(g, 7, 6, rng=2, name="emb")
        self.body = gl.Linear.new(g, 6, 5, rng=0, name="body")
        self.norm = gl.LayerNorm.new(g, 5, name="norm")
        self.head = gl.MLP(g, [5, 4, 3], rng=1)

    def forward(self, g: gl.Graph, ids: Any) -> gl.NodeId:
        return self.head.forward(
            g, self.norm.forward(g, self.body.forward(g, self.emb.forward(g, ids)))
        )


def test_copies_of_nested_modules_embeddings_and_norms_round_trip(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    g = gl.Graph()
    model = Nested(g)
    saved = ["head", "layers.0", "norm", "emb"]  # layers.0 is inside head: head is wrapped whole
    gl.apply_lora(model, gl.LoraConfig(rank=2, modules_to_save=saved), ["body"])
    assert sorted(gl.nn.saved_modules(model)) == ["emb", "head", "norm"]
    names = {n: leaf.name for n, leaf in gl.nn.named_leaves(model) if leaf.requires_grad}
    assert all(tree == node for tree, node in names.items() if "modules_to_save" in tree)
    assert "head.modules_to_save.default.layers.1.bias" in names
    rng = np.random.default_rng(0)
    for _, leaf in gl.nn.named_leaves(model):  # as after training
        if leaf.requires_grad:
            g.set_value(leaf, np.array(g.value(leaf)) + rng.normal(size=leaf.shape))
    gl.save_adapter(tmp_path / "a", g, model)
    tensors = st.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    copies = {n: w.modules_to_save["default"] for n, w in gl.nn.saved_modules(model).items()}
    layer0 = copies["head"].layers[0]
    np.testing.assert_array_equal(  # a Linear's weight as PyTorch stores it, [out, in]
        tensors["base_model.model.head.layers.0.weight"], g.value(layer0.weight).T
    )
    np.testing.assert_array_equal(  # an embedding's and a norm's as they are
        tensors["base_model.model.emb.weight"], g.value(copies["emb"].weight)
    )
    np.testing.assert_array_equal(
        tensors["base_model.model.norm.bias"], g.value(copies["norm"].bias)
    )
    g2 = gl.Graph()
    fresh = Nested(g2)
    gl.apply_adapter(tmp_path / "a", g2, fresh)
    ids = np.array([[0, 3, 6]])
    with g.no_grad(), g2.no_grad():
        np.testing.assert_allclose(
            g2.value(fresh.forward(g2, ids)), g.value(model.forward(g, ids)), rtol=1e-12
        )


def test_the_wrapper_itself() -> None:
    g, model = _two_adapter_model()
    head = model.head
    assert isinstance(head, gl.nn.ModulesToSave)
    with pytest.raises(
        ValueError,
        match=r"^set_adapter: head holds modules_to_save copies for \['default', 'other'\]; only "
        r"one can be active at a time \(as PEFT\)$",
    ):
        head.activate(g, ["default", "other"])
    x = g.constant(np.ones((2, 5)))
    with g.no_grad():  # forward's keyword arguments reach the running module
        np.testing.assert_array_equal(
            g.value(head.forward(g, x, fused=True)), g.value(head.running().forward(g, x))
        )
    assert len(head.trainable_params()) == 2
    head.disabled = True
    assert head.trainable_params() == [] and head.running() is head.original_module
    head.disabled = False
    head.active = None
    assert head.trainable_params() == []


def test_choosing_the_modules_refuses_what_cannot_be_saved() -> None:
    class Act:
        def forward(self, g: gl.Graph, x: gl.NodeId) -> gl.NodeId:
            return g.tanh(x)

    g = gl.Graph()
    model = Nested(g)
    model.act = Act()  # type: ignore[attr-defined]
    cases = [
        (["act"], ["body"], r"modules_to_save \['act'\] have no leaves to train"),
        (
            ["head"],
            ["head.layers.0"],
            r"\['head'\] are both LoRA layers \(or targets\) and modules_to_save; a module is one "
            r"or the other$",
        ),
    ]
    for entries, targets, match in cases:
        with pytest.raises(ValueError, match=r"^apply_lora: " + match):
            gl.apply_lora(model, gl.LoraConfig(rank=2, modules_to_save=entries), targets)
        assert not gl.nn.saved_modules(model) and not gl.nn.lora_layers(model)
    gl.apply_lora(model, gl.LoraConfig(rank=2), ["head.layers.0"])
    with pytest.raises(ValueError, match=r"^apply_lora: \['head'\] are both LoRA layers"):
        gl.apply_lora(
            model, gl.LoraConfig(rank=2, modules_to_save=["head"]), ["body"], adapter_name="b"
        )
    g = gl.Graph()
    model = Nested(g)
    gl.apply_lora(model, gl.LoraConfig(rank=2, modules_to_save=["head"]), ["body"])
    # "layers.0" now only names modules inside head's wrapper, which are not candidates
    with pytest.raises(ValueError, match=r"^apply_lora: modules_to_save \['layers.0'\] match no"):
        gl.apply_lora(
            model, gl.LoraConfig(rank=2, modules_to_save=["layers.0"]), ["body"], adapter_name="b"
        )


def test_an_adapter_saves_only_its_own_copies(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    g = gl.Graph()
    model = Nested(g)
    gl.apply_lora(model, gl.LoraConfig(rank=2, modules_to_save=["head"]), ["body"])
    gl.apply_lora(
        model, gl.LoraConfig(rank=2, modules_to_save=["norm"]), ["body"], adapter_name="b"
    )
    gl.save_adapter(tmp_path / "x", g, model, adapter_name="b")
    keys = sorted(st.load_file(str(tmp_path / "x" / "b" / "adapter_model.safetensors")))
    assert [k for k in keys if "lora_" not in k] == [
        "base_model.model.norm.bias",
        "base_model.model.norm.weight",
    ]


def test_a_copy_is_deep_and_forward_passes_keywords() -> None:
    class Scaled:
        """A module holding layers in a dict, a private leaf, and a keyword in forward."""

        def __init__(self, g: gl.Graph) -> None:
            self.parts = {"a": gl.Linear.new(g, 5, 3, rng=1, name="a")}
            self._private = g.parameter(np.ones(3))

        def forward(self, g: gl.Graph, x: gl.NodeId, *, scale: float) -> gl.NodeId:
            return g.scale(self.parts["a"].forward(g, x), scale)

    class Model:
        def __init__(self, g: gl.Graph) -> None:
            self.fc1 = gl.Linear.new(g, 6, 5, rng=0, name="fc1")
            self.head = Scaled(g)

        def forward(self, g: gl.Graph, x: Any) -> gl.NodeId:
            return self.head.forward(g, self.fc1.forward(g, x), scale=2.0)

    g = gl.Graph()
    model = Model(g)
    gl.apply_lora(model, gl.LoraConfig(rank=2, modules_to_save=["head"]), ["fc1"])
    head = model.head
    assert isinstance(head, gl.nn.ModulesToSave)
    copy = head.modules_to_save["default"]
    original = head.original_module
    assert copy.parts["a"].weight is not original.parts["a"].weight  # the dict's layer copied
    assert copy.parts["a"].weight.name == "head.modules_to_save.default.parts.a.weight"
    assert copy._private is original._private  # private attributes are not the module's leaves
    x = g.constant(np.ones((2, 6)))
    with g.no_grad():
        np.testing.assert_allclose(
            g.value(model.forward(g, x)),
            2.0 * g.value(original.parts["a"].forward(g, model.fc1.forward(g, x))),
            rtol=1e-12,
        )


MIXED_X = np.random.default_rng(8).normal(size=(4, 6))
MIXED = ["other", "__base__", "default", "other"]


def test_a_mixed_batch_gives_each_sample_its_adapters_copy() -> None:
    g, model = _two_adapter_model()
    with gl.mixed_batch(model, MIXED), g.no_grad():
        mixed = np.array(g.value(model.forward(g, g.constant(MIXED_X))))
    for i, name in enumerate(MIXED):
        x = g.constant(MIXED_X[i : i + 1])
        if name == "__base__":
            with gl.disable_adapters(model), g.no_grad():
                alone = g.value(model.forward(g, x))
        else:
            gl.set_adapter(model, name)
            with g.no_grad():
                alone = g.value(model.forward(g, x))
        np.testing.assert_allclose(mixed[i], alone[0], rtol=1e-13, atol=1e-14)
    head = model.head
    assert isinstance(head, gl.nn.ModulesToSave) and head.batch_adapters is None
    head.batch_adapters = ("default", "other")  # an output whose first axis is not the batch
    with (
        g.no_grad(),
        pytest.raises(
            gl.ShapeError,
            match=r"^ModulesToSave.forward: head: mixed_batch names 2 adapters, one per sample, but "
            r"the output has shape \(3,\)$",
        ),
    ):
        head.forward(g, g.constant(np.ones(5)))


@pytest.mark.crosscheck
def test_a_mixed_batch_with_modules_to_save_equals_peft(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    g, model = _two_adapter_model()
    gl.save_adapter(tmp_path / "a", g, model)
    theirs = peft.PeftModel.from_pretrained(_torch_twin(g, model), str(tmp_path / "a"))
    theirs.load_adapter(str(tmp_path / "a" / "other"), adapter_name="other")
    theirs.eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(MIXED_X), adapter_names=MIXED).numpy()
    with gl.mixed_batch(model, MIXED), g.no_grad():
        got = np.array(g.value(model.forward(g, g.constant(MIXED_X))))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)
