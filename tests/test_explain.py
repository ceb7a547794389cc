"""graphlora.teach.explain: every gradient it prints is the engine's, and equals the formula beside it."""

from __future__ import annotations

import numpy as np
import pytest

from graphlora.__main__ import main
from graphlora.teach.explain import explain, walk_through


def test_every_step_by_hand_equals_the_engine() -> None:
    steps, inputs, s = walk_through()
    assert s == 2.0
    names = [step.name for step in steps]
    assert names[:6] == ["base", "h", "h_s", "delta", "y", "L"]
    assert {"dL/dA", "dL/dB", "dL/dW", "dL/dx"} <= set(names)
    for step in steps:
        np.testing.assert_allclose(
            step.by_hand, step.engine, rtol=1e-14, atol=1e-14, err_msg=step.name
        )
    x, w, a, b = inputs["x"], inputs["W"], inputs["A"], inputs["B"]
    g_y = next(st.by_hand for st in steps if st.name.startswith("g_y"))
    d_b = next(st for st in steps if st.name == "dL/dB")
    np.testing.assert_allclose(d_b.engine, (x @ a).T @ g_y * s)  # the formula it prints
    assert d_b.formula == "h_sᵀ · g_delta = (x A)ᵀ · g_y · s"
    d_a = next(st for st in steps if st.name == "dL/dA")
    np.testing.assert_allclose(d_a.engine, x.T @ (g_y @ b.T) * s)
    # dL/dx takes both paths: leaving out the adapter's would be wrong by this much
    d_x = next(st for st in steps if st.name == "dL/dx")
    np.testing.assert_allclose(d_x.engine, g_y @ w.T + (g_y @ b.T * s) @ a.T)
    assert np.abs(d_x.engine - g_y @ w.T).max() > 1.0
    np.testing.assert_allclose(d_x.engine[0], [-6.75, 13.75, -15.625])


def test_dl_dx_by_hand_is_the_finite_difference_of_the_loss() -> None:
    """A second opinion that does not use the engine's backward at all."""
    steps, inputs, _ = walk_through()
    d_x = next(st.by_hand for st in steps if st.name == "dL/dx")
    x, w, a, b, t = (inputs[k] for k in ("x", "W", "A", "B", "t"))

    def loss(xv: np.ndarray) -> float:
        return float(np.mean((xv @ w + (xv @ a * 2.0) @ b - t) ** 2))

    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = 1e-6
        numeric[i] = (loss(x + step) - loss(x - step)) / 2e-6
    np.testing.assert_allclose(d_x, numeric, rtol=1e-6)


def test_printed_walk_through(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    assert "dL/dB = h_sᵀ · g_delta = (x A)ᵀ · g_y · s" in out
    assert "dL/dW = xᵀ · g_y\n  note: the layer never computes it: W is frozen" in out
    assert "dL/dx = g_y · Wᵀ (through the base) + g_h · Aᵀ (through the adapter)" in out
    assert out.rstrip().endswith(
        "largest difference between hand and engine, over every line: 0.0e+00"
    )
    lines: list[str] = []
    assert explain(lines.append) == 0.0
    printed_b = lines[lines.index("\ndL/dB = h_sᵀ · g_delta = (x A)ᵀ · g_y · s") + 2]
    engine_b = next(st.engine for st in walk_through()[0] if st.name == "dL/dB")
    numbers = [float(v) for v in printed_b.replace("engine:", "").strip(" []").split(",")]
    np.testing.assert_allclose(numbers, engine_b.ravel(), rtol=1e-4)
