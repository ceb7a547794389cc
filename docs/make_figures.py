"""Make the figures of the tutorials from the library: ``python docs/make_figures.py``.

``figures/lora-graph.png``: a LoRA layer's graph with its gradients (B = 0, so dL/dA = 0) and a
legend, drawn by ``Graph.to_dot`` and Graphviz.
``figures/demo-curves.png``: the demo's loss curves by rank with the noise floor, the recovered
singular values, and the error against adapter size beside the best of each rank.
``figures/rslora-ranks.png``: loss curves by rank at a fixed alpha, scaled by alpha / r and by
alpha / sqrt(r) (docs/lora-from-scratch.md, section 4).
Needs matplotlib, and Graphviz's ``dot`` for the first figure (skipped with a note without it).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

import graphlora as gl
from graphlora.teach import demo, viz

FIGURES = Path(__file__).resolve().parent / "figures"


def lora_graph(target: Path) -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 4, 3, gl.LoraConfig(rank=2, seed=0), name="proj")
    x = g.constant(np.ones((2, 4)), name="x")
    loss = g.mse_loss(layer.forward(g, x), g.constant(np.zeros((2, 3)), name="target"))
    g.backward(loss)
    viz.render(g.to_dot(loss, show_grads=True, legend=True), target)


def demo_curves(target: Path) -> None:
    task = demo.plant_low_rank_task(seed=0)
    results = [demo.run_low_rank(task, rank=r) for r in (1, 2, 4, 8)]
    demo.plot_results(str(target), results, planted_rank=4, noise=0.01)


def rslora_ranks(target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = demo.plant_low_rank_task(
        in_features=256, out_features=256, planted_rank=64, samples=1024, seed=0
    )
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, rslora in zip(axes, (False, True), strict=True):
        for rank in (4, 16, 64, 256):
            result = demo.run_low_rank(
                wide, rank, steps=200, lr=3e-4, alpha=16.0, use_rslora=rslora
            )
            ax.semilogy(result.losses, label=f"rank {rank}, scaling {result.layer.scaling:.3g}")
        ax.axhline(0.01**2, color="grey", linestyle="--", label="noise floor (noise²)")
        name = "alpha / sqrt(r) (rsLoRA)" if rslora else "alpha / r (LoRA)"
        ax.set(xlabel="Adam step (lr 3e-4)", title=f"scaling {name}, alpha 16")
        ax.legend(fontsize="small")
    axes[0].set_ylabel("training loss (MSE)")
    fig.suptitle("256 -> 256 layer, planted update of rank 64")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def main() -> int:
    FIGURES.mkdir(exist_ok=True)
    demo_curves(FIGURES / "demo-curves.png")
    print(f"wrote {FIGURES / 'demo-curves.png'}")
    rslora_ranks(FIGURES / "rslora-ranks.png")
    print(f"wrote {FIGURES / 'rslora-ranks.png'}")
    if shutil.which("dot") is None:
        print("Graphviz's dot is not installed: skipped lora-graph.png", file=sys.stderr)
        return 0
    lora_graph(FIGURES / "lora-graph.png")
    print(f"wrote {FIGURES / 'lora-graph.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
