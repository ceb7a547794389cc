"""Make the figures of the tutorials from the library: ``python docs/make_figures.py``.

``figures/lora-graph.png``: a LoRA layer's graph with its gradients (B = 0, so dL/dA = 0) and a
legend, drawn by ``Graph.to_dot`` and Graphviz.
``figures/demo-curves.png``: the demo's loss curves by rank with the noise floor, the recovered
singular values, and the error against adapter size beside the best of each rank.
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


def main() -> int:
    FIGURES.mkdir(exist_ok=True)
    demo_curves(FIGURES / "demo-curves.png")
    print(f"wrote {FIGURES / 'demo-curves.png'}")
    if shutil.which("dot") is None:
        print("Graphviz's dot is not installed: skipped lora-graph.png", file=sys.stderr)
        return 0
    lora_graph(FIGURES / "lora-graph.png")
    print(f"wrote {FIGURES / 'lora-graph.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
