"""graphlora.teach.demo: the planted-update recovery claim holds, the digits adaptation works, and both
are deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest

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
