"""graphlora.optim: update rules step by step against PyTorch's documented formulas (and against
torch.optim where installed), skipping, validation, state dicts, and the scipy.optimize bridge."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import graphlora as gl
from graphlora.optim import SGD, Adam, AdamW, minimize

GRADS = [np.array([0.5, -1.0, 2.0]), np.array([-0.3, 0.8, 1.5]), np.array([1.2, 0.1, -0.7])]
START = np.array([1.0, -2.0, 0.5])


def _run(make: Any, steps: int = 3) -> np.ndarray:
    """Apply ``steps`` updates with known gradients: loss = sum(p * c) has gradient c."""
    g = gl.Graph()
    p = g.parameter(START)
    opt = make(g, [p])
    for c in GRADS[:steps]:
        g.backward(g.sum(g.mul(p, g.constant(c))))
        opt.step()
        opt.zero_grad()
        g.reset()
    return np.array(g.value(p))


def _sgd_formula(
    lr: float, momentum: float = 0.0, wd: float = 0.0, nesterov: bool = False
) -> np.ndarray:
    p, buf = START.copy(), None
    for grad in GRADS:
        d = grad + wd * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


def _adam_formula(
    lr: float, b1: float, b2: float, eps: float, wd: float, decoupled: bool
) -> np.ndarray:
    p, m, v = START.copy(), np.zeros(3), np.zeros(3)
    for t, grad in enumerate(GRADS, start=1):
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            grad = grad + wd * p
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad**2
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


@pytest.mark.parametrize(
    ("kwargs"),
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.8, "nesterov": True},
        {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.01},
    ],
)
def test_sgd_follows_the_formula(kwargs: dict[str, Any]) -> None:
    got = _run(lambda g, ps: SGD(g, ps, **kwargs))
    expected = _sgd_formula(
        kwargs["lr"],
        kwargs.get("momentum", 0.0),
        kwargs.get("weight_decay", 0.0),
        kwargs.get("nesterov", False),
    )
    np.testing.assert_allclose(got, expected, rtol=1e-14)


@pytest.mark.parametrize("cls", [Adam, AdamW])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_and_adamw_follow_the_formulas(cls: Any, wd: float) -> None:
    got = _run(lambda g, ps: cls(g, ps, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd))
    expected = _adam_formula(0.01, 0.8, 0.95, 1e-6, wd, decoupled=cls is AdamW)
    np.testing.assert_allclose(got, expected, rtol=1e-13)
    if wd:  # decoupled and L2 decay really differ
        other = _adam_formula(0.01, 0.8, 0.95, 1e-6, wd, decoupled=cls is not AdamW)
        assert not np.allclose(got, other, rtol=1e-9)


def test_adamw_default_weight_decay_is_pytorchs() -> None:
    g = gl.Graph()
    assert AdamW(g, [g.parameter(1.0)]).weight_decay == 0.01
    assert Adam(g, [g.parameter(1.0)]).weight_decay == 0.0


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}),
        ("Adam", {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
        ("AdamW", {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}),
    ],
)
@pytest.mark.crosscheck
def test_matches_torch_optim(name: str, kwargs: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    ours = _run(lambda g, ps: getattr(gl.optim, name)(g, ps, **kwargs))
    p = torch.tensor(START, requires_grad=True)
    opt = getattr(torch.optim, name)([p], **kwargs)
    for c in GRADS:
        opt.zero_grad()
        (p * torch.tensor(c)).sum().backward()
        opt.step()
    np.testing.assert_allclose(ours, p.detach().numpy(), rtol=1e-12)


@pytest.mark.parametrize("used_first", [True, False])
def test_a_parameter_without_gradient_is_skipped_wherever_it_stands(used_first: bool) -> None:
    g = gl.Graph()
    first, second = g.parameter(np.ones(2)), g.parameter(np.ones(2))
    used, unused = (first, second) if used_first else (second, first)
    opt = Adam(g, [first, second], lr=0.1)
    g.backward(g.sum(used))
    opt.step()  # a gradient-less parameter before the used one does not stop the step
    assert opt.steps == ([1, 0] if used_first else [0, 1])
    np.testing.assert_array_equal(g.value(unused), np.ones(2))
    np.testing.assert_allclose(g.value(used), [0.9, 0.9])  # Adam's first step: lr * g / |g|
    assert opt.state[1 if used_first else 0] == {}


def test_zero_grad_touches_only_its_parameters() -> None:
    g = gl.Graph()
    a, b = g.parameter(1.0), g.parameter(2.0)
    g.backward(g.add(a, b))
    SGD(g, [a], lr=0.1).zero_grad()
    assert g.grad(a) is None
    assert g.grad(b) is not None


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda g, p: SGD(g, [p], lr=-0.1), ValueError, r"SGD: lr must be >= 0, got -0.1"),
        (
            lambda g, p: SGD(g, [p], lr=0.1, nesterov=True),
            ValueError,
            r"SGD: nesterov=True needs momentum > 0",
        ),
        (
            lambda g, p: SGD(g, [p], lr=0.1, momentum=-1),
            ValueError,
            r"SGD: momentum must be >= 0, got -1",
        ),
        (
            lambda g, p: SGD(g, [p], lr="fast"),
            TypeError,
            r"SGD: lr must be a real number, got 'fast'",
        ),
        (
            lambda g, p: Adam(g, [p], betas=(0.9, 1.0)),
            ValueError,
            r"Adam: betas\[1\] must be in \[0, 1\), got 1.0",
        ),
        (
            lambda g, p: Adam(g, [p], betas=(-0.1, 0.9)),
            ValueError,
            r"Adam: betas\[0\] must be in \[0, 1\), got -0.1",
        ),
        (lambda g, p: Adam(g, [p], betas=0.9), TypeError, r"Adam: betas must be a pair"),
        (lambda g, p: AdamW(g, [p], eps=math.nan), ValueError, r"AdamW: eps must be >= 0, got nan"),
        (lambda g, p: Adam(g, []), ValueError, r"Adam: params is empty"),
        (
            lambda g, p: Adam(g, [p, p]),
            ValueError,
            r"Adam: params lists a parameter more than once",
        ),
        (
            lambda g, p: Adam(g, [g.constant(1.0)]),
            gl.GraphError,
            r"Adam: params\[0\] NodeId.* is not a parameter",
        ),
        (
            lambda g, p: Adam(g, [gl.Graph().parameter(1.0)]),
            gl.ForeignNodeError,
            r"Adam: params\[0\]",
        ),
        (lambda g, p: Adam(g, [np.ones(2)]), TypeError, r"Adam: params\[0\] must be a NodeId"),
    ],
)
def test_bad_hyperparameters_and_params(make: Any, error: type[Exception], match: str) -> None:
    g = gl.Graph()
    p = g.parameter(np.ones(2))
    with pytest.raises(error, match=match):
        make(g, p)


def test_state_dict_round_trip_continues_identically() -> None:
    def setup() -> tuple[gl.Graph, gl.NodeId, Adam]:
        g = gl.Graph()
        p = g.parameter(START)
        return g, p, Adam(g, [p], lr=0.05)

    def step(g: gl.Graph, p: gl.NodeId, opt: Adam, c: np.ndarray) -> None:
        g.backward(g.sum(g.mul(g.mul(p, p), g.constant(c))))
        opt.step()
        opt.zero_grad()
        g.reset()

    g1, p1, opt1 = setup()
    for c in GRADS[:2]:
        step(g1, p1, opt1, c)
    saved = opt1.state_dict()
    g2, p2, opt2 = setup()
    g2.set_value(p2, g1.value(p1))
    opt2.load_state_dict(saved)
    saved["state"][0]["exp_avg"] += 100.0  # a copy: changing it changes neither optimizer
    step(g1, p1, opt1, GRADS[2])
    step(g2, p2, opt2, GRADS[2])
    np.testing.assert_array_equal(g1.value(p1), g2.value(p2))
    assert opt2.steps == [3]


def test_a_bad_state_dict_changes_nothing() -> None:
    g = gl.Graph()
    p = g.parameter(START)
    opt = Adam(g, [p], lr=0.05)
    g.backward(g.sum(p))
    opt.step()
    good = opt.state_dict()
    cases = [
        ({**good, "optimizer": "SGD"}, ValueError, r"this is a 'SGD' state, not 'Adam'"),
        ({**good, "steps": [1, 1]}, ValueError, r"state is for 2 parameters, this optimizer has 1"),
        (
            {**good, "hyperparameters": {**good["hyperparameters"], "lr": -1.0}},
            ValueError,
            r"lr must be >= 0",
        ),
        (
            {**good, "state": [{"exp_avg": np.ones(2), "exp_avg_sq": np.ones(3)}]},
            gl.ShapeError,
            r"state\[0\]\['exp_avg'\] is float64 \(2,\)",
        ),
        (
            {**good, "state": [{"exp_avg": np.ones(3)}]},
            ValueError,
            r"state\[0\] has keys \['exp_avg'\]",
        ),
        ({"steps": [1]}, ValueError, r"expected a mapping with keys"),
    ]
    for state, error, match in cases:
        with pytest.raises(error, match=match):
            opt.load_state_dict(state)
        assert opt.lr == 0.05
        assert opt.steps == [1]
        np.testing.assert_array_equal(opt.state[0]["exp_avg"], good["state"][0]["exp_avg"])


def test_repr() -> None:
    g = gl.Graph()
    assert (
        repr(SGD(g, [g.parameter(1.0)], lr=0.1))
        == "SGD(1 parameters, lr=0.1, momentum=0.0, weight_decay=0.0, nesterov=False)"
    )


# --- minimize --------------------------------------------------------------------------------------


def test_minimize_solves_least_squares_to_1e8() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(50, 2))
    g = gl.Graph()
    w = g.parameter(np.zeros((6, 2)))
    b = g.parameter(np.zeros(2))
    xs, ys = g.constant(x), g.constant(y)
    result = minimize(g, lambda g: g.mse_loss(g.add(g.matmul(xs, w), b), ys), [w, b], tol=1e-14)
    assert result.success
    design = np.hstack([x, np.ones((50, 1))])
    exact = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(g.value(w), exact[:6], atol=1e-8)
    np.testing.assert_allclose(g.value(b), exact[6], atol=1e-8)
    assert len(g.tape) == 0  # reset after
    assert g.grad(w) is None


def test_minimize_fits_a_lora_adapter_and_takes_scipy_options() -> None:
    rng = np.random.default_rng(1)
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 8, 6, gl.LoraConfig(rank=2, seed=0), bias=False)
    delta = rng.normal(size=(8, 2)) @ rng.normal(size=(2, 6))
    x = rng.normal(size=(40, 8))
    xs, ys = g.constant(x), g.constant(x @ (g.value(layer.frozen_weight) + delta))
    result = minimize(
        g,
        lambda g: g.mse_loss(layer.forward(g, xs), ys),
        layer.trainable_params(),
        method="BFGS",
        options={"gtol": 1e-12, "maxiter": 5000},
    )
    assert result.fun < 1e-12
    np.testing.assert_allclose(layer.delta(g), delta, atol=1e-5)


def test_minimize_restores_the_parameters_when_the_loss_fails() -> None:
    g = gl.Graph()
    w = g.parameter(np.array([1.0, 2.0]))
    calls = []

    def loss(graph: gl.Graph) -> gl.NodeId:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return graph.sum(graph.mul(w, w))

    with pytest.raises(RuntimeError, match="boom"):
        minimize(g, loss, [w])
    np.testing.assert_array_equal(g.value(w), [1.0, 2.0])
    with pytest.raises(gl.GraphError, match=r"minimize: params\[0\] .* is not a parameter"):
        minimize(g, loss, [g.constant(1.0)])


def test_params_may_be_any_iterable() -> None:
    g = gl.Graph()
    a, b = g.parameter(1.0), g.parameter(2.0)
    opt = SGD(g, (p for p in (a, b)), lr=0.5)  # type: ignore[arg-type]
    assert opt.params == [a, b]
    assert opt.steps == [0, 0]


def _total(g: gl.Graph, nodes: list[gl.NodeId]) -> gl.NodeId:
    total = nodes[0]
    for node in nodes[1:]:
        total = g.add(total, node)
    return total


def _run_groups(make: Any, steps: int = 3) -> list[np.ndarray]:
    """Three parameters (START scaled by 1, 2, 3), known gradients, ``make(g, [p0, p1, p2])``."""
    g = gl.Graph()
    ps = [g.parameter(START * k) for k in (1, 2, 3)]
    opt = make(g, ps)
    for c in GRADS[:steps]:
        g.backward(g.sum(_total(g, [g.mul(p, g.constant(c * k)) for k, p in enumerate(ps, 1)])))
        opt.step()
        opt.zero_grad()
        g.reset()
    return [np.array(g.value(p)) for p in ps]


GROUPS: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = [
    ("SGD", {"lr": 0.1, "momentum": 0.9}, [{"lr": 0.5}, {"momentum": 0.0, "weight_decay": 0.1}]),
    ("Adam", {"lr": 0.01}, [{"lr": 0.05, "betas": (0.5, 0.9)}, {"weight_decay": 0.2}]),
    ("AdamW", {"lr": 0.01}, [{"lr": 0.16}, {"weight_decay": 0.0, "eps": 1e-3}]),
]


@pytest.mark.parametrize(("name", "defaults", "overrides"), GROUPS)
def test_parameter_groups_are_separate_optimizers(
    name: str, defaults: dict[str, Any], overrides: list[dict[str, Any]]
) -> None:
    """Grouped, each parameter moves exactly as under an optimizer of its group's settings."""
    cls = getattr(gl.optim, name)
    grouped = _run_groups(
        lambda g, ps: cls(
            g, [{"params": [ps[0]], **overrides[0]}, {"params": ps[1:], **overrides[1]}], **defaults
        )
    )
    alone = [
        _run_groups(lambda g, ps, k=k: cls(g, ps, **{**defaults, **overrides[min(k, 1)]}))[k]
        for k in range(3)
    ]
    for got, expected in zip(grouped, alone, strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.crosscheck
@pytest.mark.parametrize(("name", "defaults", "overrides"), GROUPS)
def test_parameter_groups_match_torch_optim(
    name: str, defaults: dict[str, Any], overrides: list[dict[str, Any]]
) -> None:
    torch = pytest.importorskip("torch")
    cls = getattr(gl.optim, name)
    ours = _run_groups(
        lambda g, ps: cls(
            g, [{"params": [ps[0]], **overrides[0]}, {"params": ps[1:], **overrides[1]}], **defaults
        )
    )
    ps = [torch.tensor(START * k, requires_grad=True) for k in (1, 2, 3)]
    opt = getattr(torch.optim, name)(
        [{"params": [ps[0]], **overrides[0]}, {"params": ps[1:], **overrides[1]}], **defaults
    )
    for c in GRADS:
        opt.zero_grad()
        sum((p * torch.tensor(c * k)).sum() for k, p in enumerate(ps, 1)).backward()
        opt.step()
    for got, p in zip(ours, ps, strict=True):
        np.testing.assert_allclose(got, p.detach().numpy(), rtol=1e-12)
    # a schedule: the groups' learning rates changed between steps, as torch's
    assert [group["lr"] for group in opt.param_groups] == [
        {**defaults, **o}["lr"] for o in overrides
    ]


def test_a_changed_group_lr_takes_effect_and_a_bad_one_changes_nothing() -> None:
    g = gl.Graph()
    p, q = g.parameter(np.ones(2)), g.parameter(np.ones(2))
    opt = SGD(g, [{"params": [p]}, {"params": [q], "lr": 0.5}], lr=0.1)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.5
    opt.param_groups[0]["lr"] = 0.25
    g.backward(g.sum(g.add(p, q)))
    opt.step()
    np.testing.assert_array_equal(g.value(p), [0.75, 0.75])
    np.testing.assert_array_equal(g.value(q), [0.5, 0.5])
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"SGD.step: parameter group 1: lr must be >= 0, got -1"):
        opt.step()
    np.testing.assert_array_equal(g.value(p), [0.75, 0.75])  # group 0 was not stepped either
    assert opt.steps == [1, 1]


def test_a_group_replaced_by_a_plain_dict_is_read_at_the_next_step() -> None:
    g = gl.Graph()
    p = g.parameter(np.ones(2))
    opt = SGD(g, [p], lr=0.1)
    opt.param_groups[0] = {**opt.param_groups[0], "lr": 0.5}  # a dict, not the group itself
    g.backward(g.sum(p))
    opt.step()
    np.testing.assert_array_equal(g.value(p), [0.5, 0.5])
    opt.param_groups[0] = {**opt.param_groups[0], "lr": -0.5}
    with pytest.raises(ValueError, match=r"SGD.step: parameter group 0: lr must be >= 0"):
        opt.step()
    np.testing.assert_array_equal(g.value(p), [0.5, 0.5])


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        (lambda p, q: [{"params": [p]}, q], TypeError, r"params\[1\] must be a parameter group"),
        (
            lambda p, q: [{"params": [p], "momentun": 0.9}],
            ValueError,
            r"unknown keys \['momentun'\]",
        ),
        (lambda p, q: [{"params": [p]}, {"params": [p]}], ValueError, "more than once"),
        (
            lambda p, q: [{"params": [p], "lr": -2}],
            ValueError,
            "parameter group 0: lr must be >= 0",
        ),
        (lambda p, q: [{"params": "p"}], TypeError, r"group 0's 'params' must be a list"),
        (lambda p, q: [{"params": []}], ValueError, "params is empty"),
        (lambda p, q: p, TypeError, "params must be a list of parameters or of parameter groups"),
    ],
)
def test_bad_parameter_groups(params: Any, error: type[Exception], match: str) -> None:
    g = gl.Graph()
    p, q = g.parameter(np.ones(2)), g.parameter(np.ones(2))
    with pytest.raises(error, match="^SGD: .*" + match):
        SGD(g, params(p, q), lr=0.1)


def test_grouped_state_dict_round_trip_and_refusals() -> None:
    def setup() -> tuple[gl.Graph, list[gl.NodeId], Adam]:
        g = gl.Graph()
        ps = [g.parameter(START * k) for k in (1, 2, 3)]
        return g, ps, Adam(g, [{"params": ps[:1], "lr": 0.2}, {"params": ps[1:]}], lr=0.05)

    def step(g: gl.Graph, ps: list[gl.NodeId], opt: Adam, c: np.ndarray) -> None:
        g.backward(g.sum(_total(g, [g.mul(g.mul(p, p), g.constant(c)) for p in ps])))
        opt.step()
        opt.zero_grad()
        g.reset()

    g1, ps1, opt1 = setup()
    step(g1, ps1, opt1, GRADS[0])
    opt1.param_groups[1]["lr"] = 0.01  # a schedule's change travels with the state
    step(g1, ps1, opt1, GRADS[1])
    saved = opt1.state_dict()
    assert [grp["params"] for grp in saved["param_groups"]] == [[0], [1, 2]]
    assert [grp["lr"] for grp in saved["param_groups"]] == [0.2, 0.01]
    g2, ps2, opt2 = setup()
    for a, b in zip(ps1, ps2, strict=True):
        g2.set_value(b, g1.value(a))
    bad = [
        ({**saved, "param_groups": saved["param_groups"][:1]}, "must list 2 groups"),
        (
            {**saved, "param_groups": [saved["param_groups"][0], {"params": [2, 1], "lr": 0.1}]},
            r"param_groups\[1\] must hold parameters \[1, 2\]",
        ),
        (
            {
                **saved,
                "param_groups": [saved["param_groups"][0], {**saved["param_groups"][1], "eps": -1}],
            },
            r"param_groups\[1\]: eps must be >= 0",
        ),
        (
            {k: v for k, v in saved.items() if k != "param_groups"},
            "the state has no 'param_groups'; this optimizer has 2 groups",
        ),
    ]
    for state, match in bad:
        with pytest.raises(ValueError, match="^Adam.load_state_dict: .*" + match):
            opt2.load_state_dict(state)
        assert [grp["lr"] for grp in opt2.param_groups] == [0.2, 0.05]
        assert opt2.steps == [0, 0, 0]
    opt2.load_state_dict(saved)
    assert [grp["lr"] for grp in opt2.param_groups] == [0.2, 0.01]
    step(g1, ps1, opt1, GRADS[2])
    step(g2, ps2, opt2, GRADS[2])
    for a, b in zip(ps1, ps2, strict=True):
        np.testing.assert_array_equal(g1.value(a), g2.value(b))
    assert repr(opt2).startswith("Adam(3 parameters, 2 groups, lr=0.05")


def test_a_state_from_before_groups_still_loads() -> None:
    g = gl.Graph()
    p = g.parameter(START)
    opt = SGD(g, [p], lr=0.1, momentum=0.9)
    g.backward(g.sum(g.mul(p, g.constant(GRADS[0]))))
    opt.step()
    old = {k: v for k, v in opt.state_dict().items() if k != "param_groups"}
    old["hyperparameters"] = {**old["hyperparameters"], "lr": 0.3}
    twin = SGD(g, [p], lr=0.1, momentum=0.9)
    twin.load_state_dict(old)
    assert twin.lr == 0.3 and twin.param_groups[0]["lr"] == 0.3
    np.testing.assert_array_equal(twin.state[0]["momentum_buffer"], GRADS[0])


def test_group_and_state_refusals_name_what_is_wrong() -> None:
    g = gl.Graph()
    p, q = g.parameter(np.ones(2)), g.parameter(np.ones(2))
    with pytest.raises(TypeError, match=r"^SGD: params must be a list .*, got str$"):
        SGD(g, "pq", lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^SGD: params must be a list .*, got NodeId$"):
        SGD(g, p, lr=0.1)  # type: ignore[arg-type]
    single = SGD(g, [{"params": p, "lr": 0.5}, {"params": [q]}], lr=0.1)  # one NodeId
    assert single.params == [p, q] and single.param_groups[0]["params"] == [p]
    opt = SGD(g, [{"params": [p]}, {"params": [q], "lr": 0.5}], lr=0.1)
    good = opt.state_dict()
    cases = [
        (
            {**good, "param_groups": {"params": [0]}},
            r"must list 2 groups, as this optimizer has; got dict",
        ),
        (
            {**good, "param_groups": [{"lr": 0.1}, good["param_groups"][1]]},
            r"param_groups\[0\] must hold parameters \[0\]",
        ),
    ]
    for state, match in cases:
        with pytest.raises(ValueError, match=r"^SGD.load_state_dict: .*" + match):
            opt.load_state_dict(state)


def test_a_groups_settings_are_checked_once_until_they_change(monkeypatch: Any) -> None:
    g = gl.Graph()
    p, q = g.parameter(np.ones(2)), g.parameter(np.ones(2))
    opt = SGD(g, [{"params": [p]}, {"params": [q], "lr": 0.5}], lr=0.1)
    checked: list[str] = []
    original = opt._checked
    monkeypatch.setattr(
        opt, "_checked", lambda where, hyper: checked.append(where) or original(where, hyper)
    )
    for _ in range(3):
        g.backward(g.sum(g.add(p, q)))
        opt.step()
        opt.zero_grad()
        g.reset()
    assert checked == []  # checked when made, unchanged since
    expected = 1.0 - 3 * 0.5
    for change, lr in (
        (lambda group: group.__setitem__("lr", 0.25), 0.25),
        (lambda group: group.update(lr=0.125), 0.125),
        (lambda group: group.__ior__({"lr": 0.0625}), 0.0625),
    ):
        checked.clear()
        change(opt.param_groups[1])
        for _ in range(2):  # checked once, at the first step after the change
            g.backward(g.sum(g.add(p, q)))
            opt.step()
            opt.zero_grad()
            g.reset()
            expected -= lr
        assert checked == ["SGD.step: parameter group 1"]
    np.testing.assert_allclose(g.value(q), expected)
    group = opt.param_groups[1]
    assert group.setdefault("lr", 9.0) == 0.0625 and group.setdefault("x", 1) == 1
    assert group.pop("x") == 1
    for change in (
        lambda group: group.pop("lr"),
        lambda group: group.__delitem__("lr"),
        lambda group: group.popitem(),
        lambda group: group.clear(),
    ):
        group = opt.param_groups[0]
        saved = dict(group)
        change(group)
        g.backward(g.sum(g.add(p, q)))
        with pytest.raises(TypeError, match=r"^SGD.step: parameter group 0: \w+ must be"):
            opt.step()
        opt.zero_grad()
        g.reset()
        group.update(saved)


def test_three_groups_number_their_parameters_in_order() -> None:
    g = gl.Graph()
    ps = [g.parameter(np.ones(2)) for _ in range(4)]
    opt = SGD(g, [{"params": ps[:2]}, {"params": ps[2:3]}, {"params": ps[3:]}], lr=0.1)
    assert [grp["params"] for grp in opt.state_dict()["param_groups"]] == [[0, 1], [2], [3]]
    state = opt.state_dict()
    state["param_groups"][2]["params"] = [2]
    with pytest.raises(
        ValueError,
        match=r"^SGD.load_state_dict: param_groups\[2\] must hold parameters \[3\], as this "
        r"optimizer's group does$",
    ):
        opt.load_state_dict(state)
