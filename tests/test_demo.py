"""graphlora.demo: the planted-update recovery claim holds, the digits adaptation works, and both
are deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest

from graphlora import demo


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
