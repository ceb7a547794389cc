"""graphlora.teach.demo: the planted-update recovery claim holds, the digits adaptation works, and both
are deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

import graphlora as gl
from graphlora.optim import minimize
from graphlora.teach import demo, demo_gpt


@pytest.fixture(scope="module")
def task() -> demo.LowRankTask:
    return demo.plant_low_rank_task(
        in_features=24, out_features=16, planted_rank=3, samples=256, noise=0.01, seed=3
    )


def test_the_planted_task_is_what_it_says(task: demo.LowRankTask) -> None:
    assert np.linalg.matrix_rank(task.update) == 3
    np.testing.assert_allclose(np.linalg.svd(task.update, compute_uv=False)[:3], [2.0, 1.5, 1.0])
    residual = task.targets - task.inputs @ (task.base + task.update)
    assert abs(residual.std() - 0.01) < 0.001


def test_lora_recovers_the_update_at_the_planted_rank_and_not_below(task: demo.LowRankTask) -> None:
    at_rank = demo.run_low_rank(task, rank=3, steps=300)
    below = demo.run_low_rank(task, rank=1, steps=300)
    assert at_rank.relative_error < 0.02  # the stated bound
    assert below.relative_error > 0.5  # rank 1 cannot hold three directions
    np.testing.assert_allclose(at_rank.learned_singular_values[:3], [2.0, 1.5, 1.0], atol=0.02)
    assert at_rank.final_loss < 2e-4  # down to the noise floor, 1e-4
    assert at_rank.merge_max_difference < 1e-12
    assert (at_rank.trainable, at_rank.total) == (3 * 40, 24 * 16 + 3 * 40)


def test_the_best_possible_error_is_eckart_young_and_no_fit_beats_it(
    task: demo.LowRankTask,
) -> None:
    for rank in (1, 2):
        result = demo.run_low_rank(task, rank=rank, steps=200)
        u, sigma, vh = np.linalg.svd(task.update)
        best = (u[:, :rank] * sigma[:rank]) @ vh[:rank]  # the truncated SVD
        expected = np.linalg.norm(best - task.update) / np.linalg.norm(task.update)
        assert abs(result.best_error - expected) < 1e-12
        assert result.relative_error >= result.best_error - 1e-12


def _whitened_rrr(task: demo.LowRankTask, rank: int, start: np.ndarray) -> np.ndarray:
    """Reduced-rank regression the other way round: whiten by (XᵀX)^(1/2), truncate the SVD of
    the whitened least-squares fit, and map back (the textbook form)."""
    x, residual = task.inputs, task.targets - task.inputs @ start
    values, vectors = np.linalg.eigh(x.T @ x)
    root = (vectors * np.sqrt(values)) @ vectors.T
    inverse_root = (vectors / np.sqrt(values)) @ vectors.T
    fit = np.linalg.solve(x.T @ x, x.T @ residual)
    u, sigma, vt = np.linalg.svd(root @ fit, full_matrices=False)
    return inverse_root @ ((u[:, :rank] * sigma[:rank]) @ vt[:rank])


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_rank_bounds_by_hand_and_the_other_way_round(task: demo.LowRankTask, rank: int) -> None:
    bounds = demo.rank_bounds(task, rank)
    norm = np.linalg.norm(task.update)
    # Eckart-Young from the planted singular values 2, 1.5, 1: what the top `rank` leave out.
    assert bounds.eckart_young == pytest.approx(
        np.sqrt(np.sum(np.array([2.0, 1.5, 1.0])[rank:] ** 2)) / norm, abs=1e-12
    )
    m = _whitened_rrr(task, rank, task.base)
    loss = np.mean((task.targets - task.inputs @ (task.base + m)) ** 2)
    assert bounds.least_loss == pytest.approx(loss, rel=1e-10)
    assert bounds.noisy_optimum == pytest.approx(
        np.linalg.norm(m - task.update) / norm, rel=1e-8, abs=1e-12
    )
    assert bounds.noisy_optimum >= bounds.eckart_young - 1e-12


def test_rank_bounds_is_what_training_reaches(task: demo.LowRankTask) -> None:
    # By the engine: a rank-2 adapter over W0, solved to high precision with L-BFGS-B, ends at
    # the least loss, and its update is the reduced-rank regression's.
    g = gl.Graph()
    layer = gl.LoraLinear.from_linear(
        g, task.base, None, gl.LoraConfig(rank=2, alpha=2.0, init="random", seed=1)
    )
    x, y = g.constant(task.inputs), g.constant(task.targets)
    result = minimize(
        g, lambda g: g.mse_loss(layer.forward(g, x), y), layer.trainable_params(), tol=1e-14
    )
    bounds = demo.rank_bounds(task, 2)
    assert result.fun >= bounds.least_loss * (1 - 1e-12)
    assert result.fun == pytest.approx(bounds.least_loss, rel=1e-6)
    learned = layer.merge(g) - task.base
    error = np.linalg.norm(learned - task.update) / np.linalg.norm(task.update)
    assert error == pytest.approx(bounds.noisy_optimum, rel=1e-4)


@given(
    sizes=st.tuples(st.integers(2, 7), st.integers(2, 7)),
    planted=st.integers(1, 3),
    rank=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_no_update_of_the_rank_fits_the_samples_better(
    sizes: tuple[int, int], planted: int, rank: int, seed: int
) -> None:
    n_in, n_out = sizes
    planted, rank = min(planted, n_in, n_out), min(rank, n_in, n_out)
    task = demo.plant_low_rank_task(n_in, n_out, planted, samples=3 * n_in, noise=0.1, seed=seed)
    bounds = demo.rank_bounds(task, rank)

    def loss(m: np.ndarray) -> float:
        return float(np.mean((task.targets - task.inputs @ (task.base + m)) ** 2))

    rng = np.random.default_rng(seed)
    u, sigma, vt = np.linalg.svd(task.update)
    candidates = [
        (u[:, :rank] * sigma[:rank]) @ vt[:rank],  # Eckart-Young's best: not the best fit
        rng.standard_normal((n_in, rank)) @ rng.standard_normal((rank, n_out)),
        np.zeros((n_in, n_out)),
    ]
    for m in candidates:
        assert bounds.least_loss <= loss(m) * (1 + 1e-9) + 1e-15
    assert bounds.noisy_optimum >= bounds.eckart_young - 1e-9


def test_rank_bounds_refuses_what_it_cannot_bound(task: demo.LowRankTask) -> None:
    with pytest.raises(
        ValueError, match=r"rank_bounds: rank must be from 1 to min\(in, out\) = 16, got 17"
    ):
        demo.rank_bounds(task, 17)
    with pytest.raises(
        ValueError, match=r"rank_bounds: start has shape \(3, 3\), W0 has shape \(24, 16\)"
    ):
        demo.rank_bounds(task, 1, np.zeros((3, 3)))


def test_the_demo_reaches_the_best_fit_to_its_samples() -> None:
    # The default demo: training ends at the reduced-rank regression's optimum (0.0033, loss
    # 9.902e-05), not at Eckart-Young's 0 that the exact dW* would allow.
    task = demo.plant_low_rank_task()
    result = demo.run_low_rank(task, rank=4)
    assert result.best_error < 1e-12
    assert result.noisy_best_error == pytest.approx(result.relative_error, rel=1e-4)
    assert result.least_loss == pytest.approx(result.final_loss, rel=1e-6)
    assert round(result.relative_error, 4) == 0.0033


def test_pissa_bounds_start_from_the_residual(task: demo.LowRankTask) -> None:
    result = demo.run_low_rank(task, rank=2, steps=50, init="pissa")
    u, sigma, vt = np.linalg.svd(task.base, full_matrices=False)
    residual = task.base - (u[:, :2] * sigma[:2]) @ vt[:2]  # W_res: W0 less its top-2 part
    target = task.base + task.update - residual  # what the adapter must now hold
    tu, ts, tvt = np.linalg.svd(target)
    best = residual + (tu[:, :2] * ts[:2]) @ tvt[:2] - task.base
    expected = np.linalg.norm(best - task.update) / np.linalg.norm(task.update)
    assert result.best_error == pytest.approx(expected, rel=1e-10)
    assert result.best_error > 0.3  # W0's top part is gone from the frozen weight: far from 0
    assert result.relative_error >= result.noisy_best_error - 1e-9
    # PiSSA's update, merged W - W0, is A B s less W0's top part: up to 2 * rank values shown
    learned = result.layer.merge(result.graph) - task.base
    np.testing.assert_allclose(
        result.learned_singular_values, scipy.linalg.svdvals(learned)[:4], rtol=1e-12
    )


def test_zero_a_and_b_learn_nothing(task: demo.LowRankTask) -> None:
    result = demo.run_low_rank(task, rank=2, steps=20, init="zeros")
    assert len(set(result.losses)) == 1  # no gradient reaches A or B: the loss never moves
    assert not result.learned_singular_values.any()
    assert result.relative_error == pytest.approx(1.0)
    with pytest.raises(ValueError, match="run_low_rank: init must be one of kaiming, gaussian"):
        demo.run_low_rank(task, rank=2, steps=1, init="ones")


@pytest.mark.parametrize(
    ("options", "scaling"),
    [({"init": "pissa"}, 1.0), ({"alpha": 8.0, "use_rslora": True}, 8.0 / np.sqrt(2))],
)
def test_alpha_rslora_and_init_reach_the_layer(
    task: demo.LowRankTask, options: dict[str, object], scaling: float
) -> None:
    result = demo.run_low_rank(task, rank=2, steps=5, **options)  # type: ignore[arg-type]
    assert result.layer.scaling == pytest.approx(scaling)
    assert result.layer.config.init == options.get("init", "kaiming")
    # the learned update is the merged weight minus W0, also for PiSSA, which moves W0's part
    np.testing.assert_allclose(
        np.linalg.svd(result.layer.merge(result.graph) - task.base, compute_uv=False)[:2],
        result.learned_singular_values[:2],
    )


def test_runs_are_deterministic_for_a_seed(task: demo.LowRankTask) -> None:
    first = demo.run_low_rank(task, rank=2, steps=20, seed=5)
    second = demo.run_low_rank(task, rank=2, steps=20, seed=5)
    assert first.losses == second.losses
    again = demo.plant_low_rank_task(
        in_features=24, out_features=16, planted_rank=3, samples=256, noise=0.01, seed=3
    )
    np.testing.assert_array_equal(again.targets, task.targets)


def test_bad_task_sizes_are_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"plant_low_rank_task: planted_rank 9 exceeds min\(in_features, out_features\) = 8",
    ):
        demo.plant_low_rank_task(in_features=8, out_features=16, planted_rank=9)
    with pytest.raises(ValueError, match=r"plant_low_rank_task: samples must be >= 1, got 0"):
        demo.plant_low_rank_task(samples=0)
    with pytest.raises(ValueError, match=r"run_low_rank: steps must be >= 1, got 0"):
        demo.run_low_rank(demo.plant_low_rank_task(), steps=0)


def test_digits_adaptation() -> None:
    pytest.importorskip("sklearn")
    result = demo.run_digits(rank=4, steps=150, seed=0)
    assert result.base_accuracy > 0.95
    assert result.before_accuracy < 0.4  # digits 5-9 read as 0-4: near chance (0.2)
    assert result.after_accuracy > 0.9
    assert result.base_after_accuracy == result.base_accuracy  # the frozen base is untouched
    assert result.trainable == 4 * (64 + 32) + 4 * (32 + 5)


def test_digits_on_supplied_data_without_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    centres = rng.uniform(0, 1, size=(10, 64))
    images = np.clip(centres[labels] + 0.05 * rng.normal(size=(300, 64)), 0, 1)
    result = demo.run_digits(rank=2, steps=100, data=(images, labels))
    assert result.after_accuracy > 0.9


# --- the GPT demo --------------------------------------------------------------------------------


def test_the_stdlib_texts_and_the_character_codec() -> None:
    prose, code = demo_gpt.stdlib_texts()
    assert len(prose) > 100_000 and "assert" in prose
    assert len(code) > 50_000 and "def dedent(" in code  # textwrap's source
    ids = demo_gpt.encode("def f():\n\treturn 'é'")
    assert ids.dtype == np.int64 and ids.max() < len(demo_gpt.CHARS)
    assert demo_gpt.decode(ids) == "def f():\n    return '?'"


@pytest.fixture(scope="module")
def gpt_result() -> demo_gpt.GptResult:
    prose, code = demo_gpt.stdlib_texts()
    return demo_gpt.run_gpt(
        steps=300, lora_steps=200, seed=0, texts=(prose[:60_000], code[:40_000])
    )


@pytest.mark.slow
def test_lora_adapts_the_gpt_to_code_and_leaves_the_base_as_it_was(
    gpt_result: demo_gpt.GptResult,
) -> None:
    r = gpt_result
    assert np.mean(r.pretrain_losses[-20:]) < np.mean(r.pretrain_losses[:20]) - 1.0  # it learned
    assert r.adapted_loss["code"] < r.base_loss["code"] - 0.2  # the adapters learned the code
    assert r.removed_loss == r.base_loss  # the base weights never moved
    assert r.trainable == "trainable params: 16,384 || all params: 126,720 || trainable%: 12.9293"
    assert r.samples["base"].startswith("def ") and len(r.samples["adapted"]) == 4 + 120


@pytest.mark.slow
def test_the_gpt_demo_is_deterministic_for_a_seed(gpt_result: demo_gpt.GptResult) -> None:
    prose, code = demo_gpt.stdlib_texts()
    again = demo_gpt.run_gpt(
        steps=300, lora_steps=200, seed=0, texts=(prose[:60_000], code[:40_000])
    )
    assert again.base_loss == gpt_result.base_loss
    assert again.samples == gpt_result.samples
