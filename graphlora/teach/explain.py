"""``python -m graphlora explain``: one tiny LoRA layer through forward and backward, by hand.

Every forward value and every gradient is printed with the formula that produced it, computed once
by hand with NumPy and once by the engine, so a learner can follow (and check) the maths of LoRA
and of reverse-mode autograd line by line.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graphlora.engine.graph import Graph, NodeId
from graphlora.lora import LoraConfig, LoraLinear
from graphlora.ops import Array

__all__ = ["Step", "explain", "walk_through"]


@dataclass(frozen=True)
class Step:
    """One line of the walk-through: a quantity, its formula, its value by hand and by engine."""

    phase: str  # "forward" or "backward"
    name: str  # e.g. "dL/dB"
    formula: str  # e.g. "(x A)ᵀ · g_y · s"
    by_hand: Array
    engine: Array
    note: str = ""  # e.g. how the engine was made to compute what the layer itself skips


def _layer(g: Graph) -> LoraLinear:
    """The tiny layer: W (3, 2) frozen, A (3, 1) and B (1, 2) as after some training, s = 2."""
    config = LoraConfig(rank=1, alpha=2.0, seed=0)  # scaling s = alpha / rank = 2
    w = np.array([[0.5, -0.25], [0.0, 1.0], [-0.5, 0.75]])
    layer = LoraLinear.from_linear(g, w, None, config, name="layer")
    g.set_value(layer.lora_a, [[0.25], [-0.5], [1.0]])
    g.set_value(layer.lora_b, [[1.0, -2.0]])
    return layer


_X = [[1.0, 2.0, -1.0], [0.5, 0.0, 2.0]]  # (2, 3)
_T = [[1.0, 0.0], [0.0, 1.0]]  # the target (2, 2)


def walk_through() -> tuple[list[Step], dict[str, Array], float]:
    """Build the tiny layer, run it, and return the steps, the inputs, and the scaling.

    ``x`` is a parameter here, so that the engine computes ``dL/dx`` to check the hand formula
    against (in a model, ``dL/dx`` is what flows on to the layers below). The layer's ``W`` is
    frozen, so the engine skips ``dL/dW``; the hand value is checked against a copy of the layer
    whose ``W`` is a parameter.
    """
    g = Graph()
    layer = _layer(g)
    w = np.array(layer.base_weight(g))
    x = g.parameter(_X, name="x")
    t = g.constant(_T, name="t")
    s = layer.scaling

    y = layer.forward(g, x)
    loss = g.mse_loss(y, t)
    g.backward(loss, retain_grads=True)
    base, h, hs, delta = g.tape[:4]  # the ops in recording order: x W, x A, (x A) s, (..) B
    xv, av, bv, tv = g.value(x), g.value(layer.lora_a), g.value(layer.lora_b), g.value(t)

    def grad(graph: Graph, node: NodeId) -> Array:
        value = graph.grad(node)
        assert value is not None, f"the engine holds no gradient for {node!r}"
        return np.array(value)

    steps: list[Step] = []

    def forward(name: str, formula: str, by_hand: Array, node: NodeId) -> None:
        steps.append(Step("forward", name, formula, by_hand, np.array(g.value(node))))

    def backward(name: str, formula: str, by_hand: Array, engine: Array, note: str = "") -> None:
        steps.append(Step("backward", name, formula, by_hand, engine, note))

    forward("base", "x @ W", xv @ w, base)
    forward("h", "x @ A", xv @ av, h)
    forward("h_s", "h * s", xv @ av * s, hs)
    forward("delta", "h_s @ B", (xv @ av * s) @ bv, delta)
    y_hand = xv @ w + (xv @ av * s) @ bv
    forward("y", "base + delta", y_hand, y)
    forward("L", "mean((y - t)²)", np.mean((y_hand - tv) ** 2), loss)

    g_y = 2 * (y_hand - tv) / y_hand.size
    g_h = g_y @ bv.T * s
    backward("g_y = dL/dy", "2 (y - t) / n, n = y's elements (mean's count)", g_y, grad(g, y))
    backward("g_delta", "g_y  (add passes g on)", g_y, grad(g, delta))
    backward(
        "dL/dB", "h_sᵀ · g_delta = (x A)ᵀ · g_y · s", (xv @ av * s).T @ g_y, grad(g, layer.lora_b)
    )
    backward("g_h_s", "g_delta · Bᵀ", g_y @ bv.T, grad(g, hs))
    backward("g_h", "g_h_s · s", g_h, grad(g, h))
    backward("dL/dA", "xᵀ · g_h = xᵀ · (g_y · Bᵀ) · s", xv.T @ g_h, grad(g, layer.lora_a))
    backward(
        "dL/dx",
        "g_y · Wᵀ (through the base) + g_h · Aᵀ (through the adapter)",
        g_y @ w.T + g_h @ av.T,
        grad(g, x),
        "x is made a parameter here, so that the engine computes it",
    )
    twin = Graph()  # the same layer with W unfrozen, only to check the skipped gradient
    copy = _layer(twin)
    assert copy.frozen_weight is not None  # a float base
    twin.requires_grad_(copy.frozen_weight, True)
    twin.backward(twin.mse_loss(copy.forward(twin, twin.constant(_X)), twin.constant(_T)))
    backward(
        "dL/dW",
        "xᵀ · g_y",
        xv.T @ g_y,
        grad(twin, copy.frozen_weight),
        "the layer never computes it: W is frozen, so its matmul skips xᵀ · g_y. Checked "
        "here against a copy of the layer whose W is a parameter",
    )
    return steps, {"x": xv, "W": w, "A": av, "B": bv, "t": tv}, s


def _text(array: Array, indent: str = "") -> str:
    """The array's numbers, each row on its own line after the first, aligned under ``indent``."""
    text = np.array2string(np.asarray(array), precision=4, suppress_small=True, separator=", ")
    return text.replace("\n", "\n" + indent)


def explain(write: Callable[[str], None] = print) -> float:
    """Print the walk-through; return the largest hand-vs-engine difference (0 is right)."""
    steps, inputs, s = walk_through()
    write("graphlora explain: one LoRA layer, y = x @ W + ((x @ A) * s) @ B, L = mean((y - t)²)")
    write(f"rank r = 1, alpha = 2, so s = alpha / r = {s:g}. W is frozen; A and B are trained.")
    write("B starts at zero in a new layer (so dL/dA = 0 at first); here it holds values as after")
    write("some training, so that every gradient is non-zero.\n")
    for name, value in inputs.items():
        write(f"{name} {value.shape} =\n{_text(value)}")
    notes = {
        "forward": "each value by hand, then by the engine",
        "backward": "g_v means dL/dv; the engine walks the tape in reverse",
    }
    worst = 0.0
    for phase, note in notes.items():
        write(f"\n--- {phase} ({note})")
        for step in (st for st in steps if st.phase == phase):
            write(f"\n{step.name} = {step.formula}")
            if step.note:
                write(
                    textwrap.fill(step.note, 96, initial_indent="  note: ", subsequent_indent="  ")
                )
            write(f"  by hand: {_text(step.by_hand, ' ' * 11)}")
            write(f"  engine:  {_text(step.engine, ' ' * 11)}")
            worst = max(worst, float(np.max(np.abs(step.by_hand - step.engine))))
    write(f"\nlargest difference between hand and engine, over every line: {worst:.1e}")
    return worst
