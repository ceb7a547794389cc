"""The demo behind ``python -m graphlora demo``: LoRA recovering a planted low-rank update.

A frozen base map ``W0 [in, out]`` is given, and data come from ``W0 + dW*`` where ``dW*`` has a
known, small rank (plus a little noise). A ``LoraLinear`` over ``W0`` is trained with Adam on that
data alone. If LoRA works as advertised, the learned update ``A @ B * scaling`` recovers ``dW*``:
the relative error is small at the planted rank and clearly worse below it, and the learned update's
singular values match the planted ones. ``run_digits`` does the same on real data: an MLP trained on
handwritten digits 0-4 is LoRA-adapted to digits 5-9 (needs scikit-learn).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId
from graphlora.lora import INITS, LoraConfig, LoraLinear
from graphlora.nn import MLP, apply_lora
from graphlora.ops import Array
from graphlora.optim import Adam

__all__ = [
    "DEMO_INITS",
    "DigitsResult",
    "LowRankResult",
    "LowRankTask",
    "RankBounds",
    "plant_low_rank_task",
    "plot_digits",
    "plot_results",
    "rank_bounds",
    "run_digits",
    "run_low_rank",
]

DEMO_INITS = (*INITS, "zeros")
"""The demo's inits: ``LoraConfig``'s, and ``"zeros"`` (A and B both zero: nothing can learn,
which is why LoRA starts A random and only B at zero)."""


def progress(steps: int, label: str, enabled: bool) -> Iterator[int]:
    """``range(steps)`` with a progress bar on stderr: tqdm when installed, else plain lines."""
    if not enabled:
        yield from range(steps)
        return
    try:
        from tqdm import tqdm
    except ImportError:
        every = max(steps // 10, 1)
        for step in range(steps):
            if step % every == 0 or step == steps - 1:
                print(f"{label}: step {step + 1}/{steps}", file=sys.stderr, flush=True)
            yield step
        return
    yield from tqdm(range(steps), desc=label, leave=False, file=sys.stderr)


@dataclass(frozen=True)
class LowRankTask:
    """A frozen base map, a planted update of known rank, and data drawn from their sum."""

    base: Array  # W0 [in, out]
    update: Array  # dW* [in, out], of rank len(singular_values)
    singular_values: Array  # dW*'s nonzero singular values, descending
    inputs: Array  # X [samples, in]
    targets: Array  # Y = X (W0 + dW*) + noise  [samples, out]


def plant_low_rank_task(
    in_features: int = 64,
    out_features: int = 32,
    planted_rank: int = 4,
    samples: int = 512,
    noise: float = 0.01,
    seed: int = 0,
) -> LowRankTask:
    """Draw ``W0``, a rank-``planted_rank`` update ``dW*`` (singular values 2, 1.5, 1, ...), data.

    Raises
    ------
    ValueError
        For sizes below 1, ``planted_rank > min(in_features, out_features)`` or ``noise < 0``.
    """
    for name, value in (
        ("in_features", in_features),
        ("out_features", out_features),
        ("planted_rank", planted_rank),
        ("samples", samples),
    ):
        if value < 1:
            raise ValueError(f"plant_low_rank_task: {name} must be >= 1, got {value}")
    if planted_rank > min(in_features, out_features):
        raise ValueError(
            f"plant_low_rank_task: planted_rank {planted_rank} exceeds min(in_features, "
            f"out_features) = {min(in_features, out_features)}"
        )
    if not noise >= 0:
        raise ValueError(f"plant_low_rank_task: noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(in_features)
    base = rng.uniform(-bound, bound, size=(in_features, out_features))
    # Orthonormal singular vectors, so the planted singular values are exactly these numbers.
    u, _ = np.linalg.qr(rng.standard_normal((in_features, planted_rank)))
    v, _ = np.linalg.qr(rng.standard_normal((out_features, planted_rank)))
    singular_values = np.maximum(2.0 - 0.5 * np.arange(planted_rank), 0.25)
    update = (u * singular_values) @ v.T
    inputs = rng.standard_normal((samples, in_features))
    targets = inputs @ (base + update) + noise * rng.standard_normal((samples, out_features))
    return LowRankTask(base, update, singular_values, inputs, targets)


@dataclass(frozen=True)
class RankBounds:
    """What the best update of one rank can do on a ``LowRankTask``, added to a frozen weight
    ``start`` (``W0``, or PiSSA's residual ``W_res``). Errors are relative to ``||dW*||_F``, of
    the update ``start + M - W0`` with ``M`` of that rank."""

    eckart_young: float
    """The least error of any such update, knowing ``dW*`` exactly: ``M`` the truncated SVD of
    ``W0 + dW* - start`` (Eckart-Young). Zero from the planted rank on when ``start`` is ``W0``."""
    noisy_optimum: float
    """The error of the ``M`` with the least training loss on the task's own noisy samples
    (reduced-rank regression): where training ends once it reaches the least loss. Not a bound
    on the error: an adapter stopped earlier, having fitted less of the noise, can be nearer
    ``dW*``."""
    least_loss: float
    """That ``M``'s training loss (MSE over every element): no update of this rank has a smaller
    one. It lies below ``noise²``, because a fit to finitely many samples also fits part of their
    noise."""


def rank_bounds(task: LowRankTask, rank: int, start: Array | None = None) -> RankBounds:
    """The bounds of ``RankBounds`` for updates of rank ``rank`` added to ``start`` (default
    ``task.base``).

    Reduced-rank regression: with ``R = Y - X start`` the targets left to fit, the least-squares
    fit ``D = argmin ||R - X D||`` has fitted values ``F = X D``; projecting ``D`` on the top
    ``rank`` right singular vectors ``V_r`` of ``F`` gives the rank-``rank`` ``M = D V_r V_rᵀ``
    with the least ``||R - X M||_F``. With fewer samples than inputs ``D`` is the least-norm
    fit, and so is ``M``.

    Raises
    ------
    ValueError
        For a rank outside ``1 .. min(in, out)`` or a ``start`` not of ``W0``'s shape.
    """
    in_features, out_features = task.base.shape
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"rank_bounds: rank must be from 1 to min(in, out) = "
            f"{min(in_features, out_features)}, got {rank}"
        )
    start = task.base if start is None else np.asarray(start, dtype=np.float64)
    if start.shape != task.base.shape:
        raise ValueError(
            f"rank_bounds: start has shape {start.shape}, W0 has shape {task.base.shape}"
        )
    norm = np.linalg.norm(task.update)
    # Eckart-Young: the best rank-r approximation keeps the top r singular values; what is left
    # is the root of the sum of the squares of the others.
    sigma = scipy.linalg.svdvals(task.base + task.update - start)
    eckart_young = np.sqrt(np.sum(sigma[rank:] ** 2)) / norm
    residual = task.targets - task.inputs @ start
    fit = scipy.linalg.lstsq(task.inputs, residual)[0]  # [in, out]
    _, _, vt = scipy.linalg.svd(task.inputs @ fit, full_matrices=False)
    top = vt[:rank].T  # [out, r]
    m = fit @ top @ top.T
    noisy = np.linalg.norm(start + m - task.base - task.update) / norm
    least = np.mean((residual - task.inputs @ m) ** 2)
    return RankBounds(float(eckart_young), float(noisy), float(least))


@dataclass
class LowRankResult:
    """What one LoRA fit of a ``LowRankTask`` learned."""

    rank: int
    losses: list[float]  # the training loss at every step
    relative_error: float  # ||learned update - dW*||_F / ||dW*||_F
    best_error: float  # the least relative error of any rank-r update (Eckart-Young)
    noisy_best_error: float  # the error of the best fit to these samples (reduced-rank regression)
    least_loss: float  # that fit's training loss: the least any rank-r update can reach
    learned_singular_values: Array  # of the learned update, merged W - W0, descending
    planted_singular_values: Array
    merge_max_difference: float  # max |merged forward - unmerged forward|
    trainable: int  # rank * (in + out)
    total: int  # in * out frozen + trainable
    graph: Graph = field(repr=False)  # the graph that holds the trained layer
    layer: LoraLinear = field(repr=False)  # the trained layer, named "proj"
    init: str = "kaiming"  # how A and B started (DEMO_INITS)
    alpha: float | None = None  # LoRA's alpha; None: the rank (scaling 1)
    use_rslora: bool = False  # scaled by alpha / sqrt(r) instead of alpha / r

    @property
    def final_loss(self) -> float:
        """The loss after the last step."""
        return self.losses[-1]


def run_low_rank(
    task: LowRankTask,
    rank: int = 4,
    steps: int = 300,
    lr: float = 0.02,
    seed: int = 0,
    show_progress: bool = False,
    *,
    alpha: float | None = None,
    use_rslora: bool = False,
    init: str = "kaiming",
) -> LowRankResult:
    """Fit ``LoraLinear.from_linear(W0, rank)`` to the task's data with Adam (full batch, MSE).

    ``alpha`` defaults to the rank (scaling 1); ``use_rslora`` and ``init`` as in ``LoraConfig``,
    or ``init="zeros"``: A and B both start at zero, so neither ever gets a gradient (B's is
    ``(x A s)ᵀ g``, A's ``xᵀ (g Bᵀ) s``) and nothing is learned. The bounds (``rank_bounds``)
    are for the layer's frozen weight: ``W0``, or PiSSA's residual. The learned singular values
    are all those the update can have: ``rank`` of them, ``2 rank`` under PiSSA (its update,
    merged ``W`` minus ``W0``, is ``A B s`` less W0's top part), at least the planted ones.
    """
    if steps < 1:
        raise ValueError(f"run_low_rank: steps must be >= 1, got {steps}")
    if init not in DEMO_INITS:
        raise ValueError(f"run_low_rank: init must be one of {', '.join(DEMO_INITS)}, got {init!r}")
    g = Graph()
    config = LoraConfig(
        rank=rank,
        alpha=float(rank) if alpha is None else alpha,
        use_rslora=use_rslora,
        init="kaiming" if init == "zeros" else init,
        seed=seed,
    )
    layer = LoraLinear.from_linear(g, task.base, None, config, name="proj")
    if init == "zeros":
        g.set_value(layer.lora_a, np.zeros((task.base.shape[0], rank)))
    assert layer.frozen_weight is not None
    bounds = rank_bounds(task, rank, np.array(g.value(layer.frozen_weight)))
    x = g.constant(task.inputs, name="x")
    y = g.constant(task.targets, name="y")
    losses = _fit(
        g,
        layer.trainable_params(),
        lambda: g.mse_loss(layer.forward(g, x), y),
        steps,
        lr,
        f"rank {rank}",
        show_progress,
    )

    learned = layer.merge(g) - task.base  # what the layer adds to W0 (PiSSA also moves W0's part)
    relative_error = np.linalg.norm(learned - task.update) / np.linalg.norm(task.update)
    with g.no_grad():
        unmerged = np.array(g.value(layer.forward(g, x)))
        layer.merge_(g)
        merged = np.array(g.value(layer.forward(g, x)))
        layer.unmerge_(g)
    planted = len(task.singular_values)
    shown = max(2 * rank if init == "pissa" else rank, planted)
    return LowRankResult(
        rank=rank,
        losses=losses,
        relative_error=float(relative_error),
        best_error=bounds.eckart_young,
        noisy_best_error=bounds.noisy_optimum,
        least_loss=bounds.least_loss,
        learned_singular_values=scipy.linalg.svdvals(learned)[:shown],
        planted_singular_values=task.singular_values,
        merge_max_difference=float(np.abs(merged - unmerged).max()),
        trainable=layer.num_trainable,
        total=layer.num_frozen + layer.num_trainable,
        graph=g,
        layer=layer,
        init=init,
        alpha=alpha,
        use_rslora=use_rslora,
    )


@dataclass
class DigitsResult:
    """Accuracies of the digits demo."""

    base_accuracy: float  # the base MLP on digits 0-4 (its own task)
    before_accuracy: float  # the base MLP on digits 5-9, before adaptation
    after_accuracy: float  # with LoRA adapters trained on 5-9
    base_after_accuracy: float  # digits 0-4 with the adapters merged out again (unchanged base)
    trainable: int
    total: int
    losses: list[float] = field(default_factory=list)
    layers: list[tuple[str, int, int, int]] = field(default_factory=list)
    """Each adapted layer: its name, in and out features, and its adapter's parameters."""


def _load_digits() -> tuple[Array, Array]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            f"the digits task needs scikit-learn: {_checks.install_hint('digits')}"
        ) from None
    digits = load_digits()
    return np.asarray(digits.data) / 16.0, np.asarray(digits.target)


def _fit(
    g: Graph,
    params: Sequence[NodeId],
    loss_fn: Callable[[], NodeId],
    steps: int,
    lr: float,
    label: str,
    show_progress: bool,
) -> list[float]:
    """Full-batch Adam on ``params``: record ``loss_fn()`` once, then replay it (forward and
    backward) and step, ``steps`` times; the losses."""
    optimizer = Adam(g, params, lr=lr)
    step = g.compile(loss_fn())
    losses = []
    for _ in progress(steps, label, show_progress):
        losses.append(float(step()))
        optimizer.step()
        optimizer.zero_grad()
    g.reset()
    return losses


def _accuracy(g: Graph, model: MLP, x: Array, labels: Array) -> float:
    with g.no_grad():
        logits = g.value(model.forward(g, g.constant(x)))
    g.reset()
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def run_digits(
    rank: int = 4,
    steps: int = 300,
    lr: float = 0.01,
    hidden: int = 32,
    seed: int = 0,
    show_progress: bool = False,
    data: tuple[Array, Array] | None = None,
) -> DigitsResult:
    """Train an MLP on digits 0-4, then LoRA-adapt it to digits 5-9 (labels 5-9 read as 0-4).

    ``data`` (images ``[N, 64]`` in [0, 1], labels ``[N]``) defaults to scikit-learn's bundled
    handwritten digits.
    """
    images, targets = _load_digits() if data is None else data
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(targets))
    test = np.zeros(len(targets), dtype=bool)
    test[order[: len(order) // 5]] = True  # a fixed 20% held out

    def split(low: int) -> tuple[Array, Array, Array, Array]:
        task = (targets >= low) & (targets < low + 5)
        train, held = task & ~test, task & test
        return images[train], targets[train] - low, images[held], targets[held] - low

    xa, ya, xa_test, ya_test = split(0)
    xb, yb, xb_test, yb_test = split(5)
    g = Graph()
    model = MLP(g, [images.shape[1], hidden, 5], activation="relu", rng=rng)
    inputs_a, inputs_b = g.constant(xa), g.constant(xb)
    _fit(
        g,
        model.parameters(),
        lambda: g.cross_entropy(model.forward(g, inputs_a), ya),
        steps,
        lr,
        "base on 0-4",
        show_progress,
    )
    base_accuracy = _accuracy(g, model, xa_test, ya_test)
    before = _accuracy(g, model, xb_test, yb_test)
    adapters = apply_lora(model, LoraConfig(rank=rank, alpha=2.0 * rank, seed=seed))
    losses = _fit(
        g,
        model.parameters(),
        lambda: g.cross_entropy(model.forward(g, inputs_b), yb),
        steps,
        lr,
        "LoRA on 5-9",
        show_progress,
    )
    after = _accuracy(g, model, xb_test, yb_test)
    # The base is untouched: with the adapters' B zeroed, digits 0-4 score as before.
    saved = {name: layer.state_dict(g) for name, layer in adapters.items()}
    for layer in adapters.values():
        g.set_value(layer.lora_b, np.zeros(g.value(layer.lora_b).shape))
    base_after = _accuracy(g, model, xa_test, ya_test)
    for name, layer in adapters.items():
        layer.load_state_dict(g, saved[name])
    trainable = sum(layer.num_trainable for layer in adapters.values())
    total = sum(layer.num_trainable + layer.num_frozen for layer in adapters.values())
    layers = [(name, *layer.weight_shape, layer.num_trainable) for name, layer in adapters.items()]
    return DigitsResult(base_accuracy, before, after, base_after, trainable, total, losses, layers)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend_below(ax: Any, gap: float = 0.16) -> None:
    """The legend under the axes (``gap`` of their height below), where it hides no curve."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -gap), ncol=2, fontsize="small")


def plot_results(
    path: str, results: Sequence[LowRankResult], planted_rank: int, noise: float | None = None
) -> None:
    """Save the loss curves by adapter rank (with the noise floor ``noise²``), the planted vs
    learned singular values (numbered from 1, as the printed table) and, for several ranks, the
    relative error by rank (trainable parameters under each) beside the best fit to the samples
    and the least error knowing ``dW*``, on a scale that shows 0 and 0.003 apart (matplotlib).
    The title records the adapter's init, alpha and scaling."""
    plt = _pyplot()
    panels = 3 if len(results) > 1 else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.8))
    curves, values = axes[0], axes[1]
    for result in results:
        curves.semilogy(result.losses, label=f"adapter rank {result.rank}")
    if noise is not None and noise > 0:
        curves.axhline(noise**2, color="grey", linestyle="--", label="noise floor (noise²)")
    curves.set(
        xlabel="Adam step",
        ylabel="training loss (MSE)",
        title=f"Loss curves (planted rank {planted_rank})",
    )
    _legend_below(curves)
    chosen = next((r for r in results if r.rank == planted_rank), results[-1])
    planted = chosen.planted_singular_values
    learned = chosen.learned_singular_values
    index = np.arange(1, max(len(planted), len(learned)) + 1)
    values.bar(index - 0.2, np.pad(planted, (0, len(index) - len(planted))), 0.4, label="planted")
    values.bar(index + 0.2, np.pad(learned, (0, len(index) - len(learned))), 0.4, label="learned")
    values.set_xticks(index)
    values.set(
        xlabel="singular value number",
        ylabel="singular value",
        title=f"Singular values: planted rank {planted_rank}, adapter rank {chosen.rank}",
    )
    _legend_below(values)
    if panels == 3:
        errors = axes[2]
        ranks = [r.rank for r in results]
        errors.plot(ranks, [r.relative_error for r in results], "o-", label="learned")
        errors.plot(
            ranks, [r.noisy_best_error for r in results], "^:", label="best fit to these samples"
        )
        errors.plot(ranks, [r.best_error for r in results], "s--", label="least, knowing dW*")
        errors.set_xscale("log", base=2)
        errors.set_yscale("symlog", linthresh=1e-3)  # 0 and 0.003 apart, 0.1 and 0.7 too
        errors.set_ylim(bottom=0)
        errors.set_xticks(ranks, [f"{r.rank}\n{r.trainable:,}" for r in results])
        errors.minorticks_off()
        errors.set(
            xlabel="adapter rank (trainable parameters under it)",
            ylabel="relative error ||update - dW*|| / ||dW*||",
            title="Error by rank",
        )
        _legend_below(errors, 0.26)
    scaling = "alpha / sqrt(r)" if chosen.use_rslora else "alpha / r"
    alpha = "the rank" if chosen.alpha is None else f"{chosen.alpha:g}"
    fig.suptitle(f"LoRA: init {chosen.init}, alpha {alpha}, scaling {scaling}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_digits(path: str, result: DigitsResult) -> None:
    """Save the digits demo's LoRA loss curve and its four held-out accuracies (matplotlib)."""
    plt = _pyplot()
    fig, (curve, bars) = plt.subplots(1, 2, figsize=(10, 4))
    curve.plot(result.losses)
    curve.set(xlabel="Adam step", ylabel="training loss (cross-entropy)", title="LoRA on 5-9")
    names = ["0-4\nbase", "5-9\nbefore", "5-9\nadapted", "0-4\nadapters off"]
    accuracies = [
        result.base_accuracy,
        result.before_accuracy,
        result.after_accuracy,
        result.base_after_accuracy,
    ]
    bars.bar(names, accuracies)
    for i, accuracy in enumerate(accuracies):
        bars.annotate(f"{accuracy:.3f}", (i, accuracy), ha="center", va="bottom")
    bars.set(ylim=(0, 1.1), ylabel="held-out accuracy", title="Accuracy on held-out images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
