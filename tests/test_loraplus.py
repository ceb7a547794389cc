"""LoRA+ (create_loraplus_optimizer): its four parameter groups by hand and against PEFT's own
helper on the same model, and the training it gives against torch.optim over PEFT's groups."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import graphlora as gl

IDS = np.array([[0, 6, 3], [2, 2, 1]])


class Toy:
    """An embedding, a layer norm and two linear layers, named as the PyTorch twin below."""

    def __init__(self, g: gl.Graph) -> None:
        rng = np.random.default_rng(0)
        self.emb = gl.Embedding.new(g, 7, 6, rng=rng, name="emb")
        self.ln = gl.LayerNorm.new(g, 6, name="ln")
        self.fc1 = gl.Linear.new(g, 6, 5, rng=rng, name="fc1")
        self.fc2 = gl.Linear.new(g, 5, 4, rng=rng, name="fc2")

    def forward(self, g: gl.Graph, ids: Any) -> gl.NodeId:
        hidden = g.tanh(self.fc1.forward(g, self.ln.forward(g, self.emb.forward(g, ids))))
        return self.fc2.forward(g, hidden)


def _model() -> tuple[gl.Graph, Toy]:
    """LoRA on emb and fc1, DoRA on fc2 (a 1-D magnitude), the layer norm trainable; B drawn."""
    g = gl.Graph()
    model = Toy(g)
    gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0, seed=1), ["emb", "fc1"])
    gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=2.0, use_dora=True, seed=2), ["fc2"])
    g.requires_grad_(model.ln.weight)
    g.requires_grad_(model.ln.bias)
    rng = np.random.default_rng(3)
    for layer in gl.nn.lora_layers(model).values():
        for update in layer.adapters.values():
            g.set_value(update.lora_b, rng.normal(size=update.lora_b.shape))
    return g, model


EXPECTED_GROUPS = {
    "groupA": ["fc1.lora_A.default", "fc2.lora_A.default"],
    "embedding": ["emb.lora_embedding_A.default", "emb.lora_embedding_B.default"],
    "groupB": ["fc1.lora_B.default", "fc2.lora_B.default", "fc2.lora_magnitude_vector.default"],
    "groupB_no_decay": ["ln.weight", "ln.bias"],
}


def test_the_four_groups_by_hand() -> None:
    g, model = _model()
    groups = gl.nn.loraplus_groups(model)
    assert {key: [name for name, _ in leaves] for key, leaves in groups.items()} == EXPECTED_GROUPS
    opt = gl.create_loraplus_optimizer(
        g, model, gl.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1
    )
    settings = [(group["lr"], group["weight_decay"]) for group in opt.param_groups]
    assert settings == [(1e-3, 0.1), (1e-6, 0.1), (1e-3 * 16.0, 0.1), (1e-3 * 16.0, 0.0)]
    assert [len(group["params"]) for group in opt.param_groups] == [2, 2, 3, 2]


def test_lora_b_moves_ratio_times_as_fast_under_sgd() -> None:
    """Under plain SGD one step moves each leaf by its group's lr times its gradient."""
    g, model = _model()
    opt = gl.create_loraplus_optimizer(g, model, gl.optim.SGD, lr=0.01, loraplus_lr_ratio=4.0)
    before = {name: np.array(g.value(leaf)) for name, leaf in gl.nn.named_leaves(model)}
    g.backward(g.sum(g.mul(model.forward(g, IDS), model.forward(g, IDS))))
    grads = {
        name: np.array(g.grad(leaf))
        for name, leaf in gl.nn.named_leaves(model)
        if leaf.requires_grad
    }
    opt.step()
    rates = {"groupA": 0.01, "embedding": 1e-6, "groupB": 0.04, "groupB_no_decay": 0.04}
    for key, names in EXPECTED_GROUPS.items():
        for name in names:
            leaf = dict(gl.nn.named_leaves(model))[name]
            np.testing.assert_allclose(
                g.value(leaf), before[name] - rates[key] * grads[name], rtol=1e-12, atol=1e-15
            )


def test_refusals() -> None:
    g, model = _model()
    with pytest.raises(TypeError, match="create_loraplus_optimizer: optimizer_cls must be"):
        gl.create_loraplus_optimizer(g, model, dict, lr=0.1, loraplus_lr_ratio=2.0)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="create_loraplus_optimizer: loraplus_lr_ratio must be >= 0"
    ):
        gl.create_loraplus_optimizer(g, model, gl.optim.SGD, lr=0.1, loraplus_lr_ratio=-2.0)
    g2 = gl.Graph()
    frozen = Toy(g2)
    for _, leaf in gl.nn.named_leaves(frozen):
        g2.requires_grad_(leaf, False)
    with pytest.raises(ValueError, match="create_loraplus_optimizer: the model has no trainable"):
        gl.create_loraplus_optimizer(g2, frozen, gl.optim.SGD, lr=0.1, loraplus_lr_ratio=2.0)


@pytest.mark.crosscheck
def test_groups_and_training_equal_peft() -> None:
    """LoRA on all three layers, the layer norm trainable: PEFT's helper makes the same groups
    with the same settings, and three AdamW steps move every leaf alike."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    g = gl.Graph()
    model = Toy(g)
    gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0, seed=1), ["emb", "fc1", "fc2"])
    g.requires_grad_(model.ln.weight)
    g.requires_grad_(model.ln.bias)

    class TorchToy(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(7, 6)
            self.ln = torch.nn.LayerNorm(6)
            self.fc1 = torch.nn.Linear(6, 5)
            self.fc2 = torch.nn.Linear(5, 4)

        def forward(self, ids: Any) -> Any:
            return self.fc2(torch.tanh(self.fc1(self.ln(self.emb(ids)))))

    base = TorchToy().double()
    with torch.no_grad():
        for name in ("emb", "fc1", "fc2"):
            layer = getattr(model, name)
            weight = np.array(g.value(layer.frozen_weight))
            getattr(base, name).weight.copy_(torch.tensor(weight if name == "emb" else weight.T))
            if name != "emb":
                getattr(base, name).bias.copy_(torch.tensor(np.array(g.value(layer.bias))))
    theirs = peft.get_peft_model(
        base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "fc1", "fc2"])
    )
    inner = theirs.base_model.model
    inner.ln.weight.requires_grad_(True)
    inner.ln.bias.requires_grad_(True)
    leaves = dict(gl.nn.named_leaves(model))
    params = dict(theirs.named_parameters())

    def torch_name(name: str) -> str:
        full = "base_model.model." + name
        return full if full in params else full + ".weight"

    with torch.no_grad():
        for name, leaf in leaves.items():
            if leaf.requires_grad:
                value = np.array(g.value(leaf))
                params[torch_name(name)].copy_(
                    torch.tensor(value.T)  # PyTorch holds every matrix transposed
                )
    kwargs: dict[str, Any] = {"lr": 0.01, "loraplus_lr_ratio": 8.0, "loraplus_weight_decay": 0.1}
    torch_opt = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, loraplus_lr_embedding=0.002, betas=(0.8, 0.9), **kwargs
    )
    opt = gl.create_loraplus_optimizer(
        g, model, gl.optim.AdamW, loraplus_lr_embedding=0.002, betas=(0.8, 0.9), **kwargs
    )
    names_of = {id(p): n for n, p in params.items()}
    groups = gl.nn.loraplus_groups(model)
    for ours, (key, members), mine in zip(
        torch_opt.param_groups, groups.items(), opt.param_groups, strict=True
    ):
        assert sorted(names_of[id(p)] for p in ours["params"]) == sorted(
            torch_name(name) for name, _ in members
        ), key
        assert (ours["lr"], ours["weight_decay"]) == (mine["lr"], mine["weight_decay"]), key
    for _ in range(3):
        out = model.forward(g, IDS)
        g.backward(g.sum(g.mul(out, out)))
        opt.step()
        opt.zero_grad()
        g.reset()
        torch_opt.zero_grad()
        (theirs(torch.tensor(IDS)) ** 2).sum().backward()
        torch_opt.step()
    for name, leaf in leaves.items():
        if leaf.requires_grad:
            value = params[torch_name(name)].detach().numpy()
            np.testing.assert_allclose(g.value(leaf), value.T, rtol=1e-10, atol=1e-12)


def test_every_argument_is_checked_by_name() -> None:
    g, model = _model()
    for kwargs, match in [
        ({"lr": -1.0}, "lr must be >= 0, got -1"),
        ({"loraplus_lr_embedding": -1.0}, "loraplus_lr_embedding must be >= 0, got -1"),
        ({"loraplus_weight_decay": -1.0}, "loraplus_weight_decay must be >= 0, got -1"),
    ]:
        args: dict[str, Any] = {"lr": 0.1, "loraplus_lr_ratio": 2.0, **kwargs}
        with pytest.raises(ValueError, match=r"^create_loraplus_optimizer: " + match):
            gl.create_loraplus_optimizer(g, model, gl.optim.SGD, **args)
    with pytest.raises(TypeError, match=r"^create_loraplus_optimizer: graph must be a Graph"):
        gl.create_loraplus_optimizer(None, model, gl.optim.SGD, lr=0.1, loraplus_lr_ratio=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^loraplus_groups: model must be a layer or a model"):
        gl.nn.loraplus_groups(3)


def test_a_trained_linear_bias_is_a_b_group_leaf_without_decay() -> None:
    g = gl.Graph()
    model = gl.MLP(g, [6, 5, 4], rng=0)
    gl.apply_lora(model, gl.LoraConfig(rank=2, bias="all"), ["layers.0"])
    groups = gl.nn.loraplus_groups(model)
    assert [n for n, _ in groups["groupB_no_decay"]] == ["layers.0.bias", "layers.1.bias"]
    assert [n for n, _ in groups["groupB"]] == ["layers.0.lora_B.default"]
