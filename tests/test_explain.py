"""graphlora.explain: every gradient it prints is the engine's, and equals the formula beside it."""

from __future__ import annotations

import numpy as np
import pytest

from graphlora.__main__ import main
from graphlora.explain import explain, walk_through


def test_every_step_by_hand_equals_the_engine() -> None:
    steps, inputs, s = walk_through()
    assert s == 2.0
    names = [step.name for step in steps]
    assert names[:6] == ["base", "h", "h_s", "delta", "y", "L"]
    assert {"dL/dA", "dL/dB", "dL/dW", "dL/dx"} <= set(names)
    for step in steps:
        if step.name in ("dL/dW", "dL/dx"):
            assert step.engine is None  # frozen weight and constant input: no work done
        else:
            assert step.engine is not None
            np.testing.assert_allclose(
                step.by_hand, step.engine, rtol=1e-14, atol=1e-14, err_msg=step.name
            )
    x, a, b = inputs["x"], inputs["A"], inputs["B"]
    g_y = next(st.by_hand for st in steps if st.name.startswith("g_y"))
    d_b = next(st for st in steps if st.name == "dL/dB")
    np.testing.assert_allclose(d_b.engine, (x @ a).T @ g_y * s)  # the formula it prints
    assert d_b.formula == "h_sᵀ · g_delta = (x A)ᵀ · g_y · s"
    d_a = next(st for st in steps if st.name == "dL/dA")
    np.testing.assert_allclose(d_a.engine, x.T @ (g_y @ b.T) * s)


def test_printed_walk_through(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    assert "dL/dB = h_sᵀ · g_delta = (x A)ᵀ · g_y · s" in out
    assert "dL/dW = not computed: W is frozen, so xᵀ · g_y is skipped" in out
    assert out.rstrip().endswith("largest difference between hand and engine: 0.0e+00")
    lines: list[str] = []
    assert explain(lines.append) == 0.0
    printed_b = lines[lines.index("\ndL/dB = h_sᵀ · g_delta = (x A)ᵀ · g_y · s") + 2]
    engine_b = next(st.engine for st in walk_through()[0] if st.name == "dL/dB")
    numbers = [float(v) for v in printed_b.replace("engine:", "").strip(" []").split(",")]
    np.testing.assert_allclose(numbers, engine_b.ravel(), rtol=1e-4)
