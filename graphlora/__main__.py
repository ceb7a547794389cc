"""The ``python -m graphlora`` command line (also installed as the ``graphlora`` script).

``example`` (the default) builds a tiny graph, runs backward, and prints every node's value and
gradient next to the same gradients worked out by hand, so a newcomer sees the engine at work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

import graphlora as gl

__all__ = ["main"]


def _example() -> int:
    """A linear layer ``y = x @ w + b`` with a mean squared error against a target."""
    np.set_printoptions(precision=4, suppress=True)
    g = gl.Graph()
    x = g.constant([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], name="x")  # (batch 2, in 3)
    w = g.parameter([[0.1, -0.2], [0.3, 0.0], [-0.1, 0.2]], name="w")  # (in 3, out 2)
    b = g.parameter([0.5, -0.5], name="b")  # (out 2,)
    target = g.constant([[1.0, 0.0], [0.0, 1.0]], name="target")
    y = g.add(g.matmul(x, w), b)  # (2, 2): b is broadcast over the batch
    loss = g.mse_loss(y, target)
    g.backward(loss, retain_grads=True)  # keep every node's gradient, to print it

    print("graphlora: a worked example of y = x @ w + b, loss = mean((y - target)**2)\n")
    print(g)
    for node in (*g.leaves, *g.tape):
        print(f"\n{node!r}\nvalue:\n{g.value(node)}")
        grad = g.grad(node)
        if grad is not None:
            print(f"grad:\n{grad}")

    # The same gradients by hand: dL/dy = 2 (y - t) / n, dL/dw = x.T @ dL/dy, dL/db = sum(dL/dy).
    dy = 2 * (g.value(y) - g.value(target)) / g.value(y).size
    by_hand_w, by_hand_b = g.value(x).T @ dy, dy.sum(axis=0)
    engine_w, engine_b = g.grad(w), g.grad(b)
    assert engine_w is not None and engine_b is not None
    print("\nBy hand: dL/dy = 2 (y - target) / 4, dL/dw = x.T @ dL/dy, dL/db = dL/dy summed")
    print(f"dL/dw by hand:\n{by_hand_w}")
    print(f"dL/db by hand:\n{by_hand_b}")
    difference = max(np.abs(by_hand_w - engine_w).max(), np.abs(by_hand_b - engine_b).max())
    print(f"largest difference from the engine: {difference:.1e}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="graphlora",
        description="graphlora: a tape-based autograd engine on NumPy with LoRA layers.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("example", help="build a tiny graph and print its values and gradients")
    args = parser.parse_args(argv)
    assert args.command in (None, "example")  # argparse refuses any other command
    return _example()


if __name__ == "__main__":
    sys.exit(main())
