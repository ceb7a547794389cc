"""``python -m graphlora check FILE``: grade an exercise from ``docs/exercises/``.

Each exercise file says which exercise it is (``EXERCISE = "softmax"``) and fills in functions
whose bodies start as ``raise NotImplementedError``. The grader runs the file in a child process
with a time limit, calls its functions there on inputs drawn here, checks what they return, and
says for each check whether it passed; a failed gradient names the input, the
element, your value and the finite difference (the library's own ``gradcheck``), so that a wrong
formula shows where it is wrong.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphlora import _checks
from graphlora.engine.graph import Graph
from graphlora.errors import GradcheckError
from graphlora.lora import LoraConfig, LoraLinear
from graphlora.ops import Array, Grads
from graphlora.teach.remote import Child, ChildGone, StudentError
from graphlora.testing.gradcheck import check_vjp

__all__ = ["DEFAULT_TIMEOUT", "EXERCISES", "Report", "check_file"]


@dataclass
class Report:
    """What grading a file found: one line per check, and whether all passed."""

    exercise: str
    lines: list[str] = field(default_factory=list)
    passed: bool = True

    def ok(self, what: str) -> None:
        self.lines.append(f"  ok      {what}")

    def fail(self, what: str, why: str) -> None:
        self.passed = False
        self.lines.append(f"  FAILED  {what}\n          {why}")

    def text(self) -> str:
        """The report as printed."""
        verdict = "all checks passed" if self.passed else "some checks failed"
        return "\n".join([f"exercise {self.exercise}:", *self.lines, verdict]) + "\n"


def _run(report: Report, what: str, check: Callable[[], None], names: tuple[str, ...]) -> None:
    """Run one check; turn what goes wrong into a sentence a student can act on."""
    try:
        check()
    except StudentError as error:  # the student's code raised, in the child: show where
        if error.kind == "NotImplementedError":
            done = error.message or "a function still raises NotImplementedError"
            report.fail(what, f"not done yet: {done}")
        elif error.kind == "InputChanged":
            report.fail(what, error.message)
        else:
            at = f" (in {error.file}, line {error.line})" if error.file else ""
            report.fail(what, f"{error.kind}: {error.message}{at}")
    except ChildGone as error:
        report.fail(what, str(error))
    except GradcheckError as error:
        report.fail(what, _named(str(error), names))
    except AssertionError as error:
        report.fail(what, str(error))
    except Exception as error:  # what the student's code returned broke a check: say what
        report.fail(what, f"{type(error).__name__}: {error}")
    else:
        report.ok(what)


def _named(message: str, names: tuple[str, ...]) -> str:
    """``gradient of input 2`` -> ``gradient of input 2 (B)``, with the inputs' names."""
    message = re.sub(r"^(check_vjp|gradcheck)[^:]*: ", "", message)
    message = message.replace("analytic", "yours").replace("numeric", "finite difference")
    return re.sub(
        r"input (\d+)",
        lambda m: (
            f"input {m.group(1)} ({names[int(m.group(1))]})"
            if int(m.group(1)) < len(names)
            else m.group(0)
        ),
        message,
    )


def _close(label: str, yours: Any, expected: Array, rtol: float = 1e-9) -> None:
    """Assert ``yours`` equals ``expected``, naming the worst element when not."""
    yours = np.asarray(yours, dtype=np.float64)
    if yours.shape != expected.shape:
        raise AssertionError(f"{label}: yours has shape {yours.shape}, expected {expected.shape}")
    error = np.abs(yours - expected) - rtol * (1.0 + np.abs(expected))
    if not (error <= 0).all():
        worst = np.unravel_index(
            int(np.argmax(np.where(np.isnan(error), np.inf, error))), error.shape
        )
        raise AssertionError(
            f"{label}: element {tuple(int(i) for i in worst)} is {float(yours[worst])!r}, "
            f"expected {float(expected[worst])!r}"
        )


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- the exercises ---------------------------------------------------------------------------


def _broadcasting(module: Any, report: Report) -> None:
    add = module.add
    rng = _rng()
    for a_shape, b_shape in [((3, 4), (4,)), ((2, 1, 3), (5, 1)), ((1,), (2, 3)), ((), (3,))]:
        a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
        _run(
            report,
            f"the VJP of a {a_shape} + b {b_shape}",
            functools.partial(_vjp_checks, add, a, b),
            ("a", "b"),
        )


def _softmax(module: Any, report: Report) -> None:
    softmax = module.softmax
    rng = _rng()
    x = rng.standard_normal((2, 5))

    def forward() -> None:
        out, _ = softmax(x, axis=-1)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        _close("softmax(x)", out, e / e.sum(axis=-1, keepdims=True))
        big, _ = softmax(np.array([1000.0, 0.0]), axis=-1)
        _close("softmax([1000, 0]) (subtract the max before exp)", big, np.array([1.0, 0.0]))

    _run(report, "the forward values, and no overflow at 1000", forward, ("x",))
    for shape, axis in [((5,), -1), ((2, 5), -1), ((3, 4), 0)]:
        point = rng.standard_normal(shape)
        _run(
            report,
            f"the VJP on shape {shape}, axis {axis}",
            functools.partial(_vjp_checks, softmax, point, axis=axis),
            ("x",),
        )


def _lora_parts() -> tuple[Array, Array, Array, Array, float]:
    rng = _rng()
    x, w = rng.standard_normal((4, 5)), rng.standard_normal((5, 3))
    a, b = rng.standard_normal((5, 2)), rng.standard_normal((2, 3))
    return x, w, a, b, 1.5


def _as_op(
    forward: Callable[..., Array], backward: Callable[..., tuple[Any, ...]], w: Array, s: float
) -> Any:
    """The student's forward and backward as one op ``(x, a, b) -> (y, vjp)`` (W frozen)."""

    def op(x: Array, a: Array, b: Array) -> tuple[Array, Any]:
        y = np.asarray(forward(x, w, a, b, s), dtype=np.float64)

        def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
            grads = backward(g, x, w, a, b, s)
            return tuple(grad if need else None for grad, need in zip(grads, needs, strict=True))

        return y, vjp

    return op


def _lora_layer(module: Any, report: Report) -> None:
    x, w, a, b, s = _lora_parts()

    def forward() -> None:
        g = Graph()
        layer = LoraLinear.from_linear(g, w, None, LoraConfig(rank=2, alpha=3.0))  # s = 1.5
        g.set_value(layer.lora_a, a)
        g.set_value(layer.lora_b, b)
        _close(
            "y", module.forward(x, w, a, b, s), np.array(g.value(layer.forward(g, g.constant(x))))
        )

    _run(report, "forward equals the engine's LoraLinear", forward, ())
    op = _as_op(module.forward, module.backward, w, s)
    _run(
        report,
        "backward: dL/dx, dL/dA, dL/dB against finite differences",
        lambda: _assert_true(check_vjp(op, x, a, b)),
        ("x", "A", "B"),
    )


def _merge(module: Any, report: Report) -> None:
    x, w, a, b, s = _lora_parts()

    def merged_forward() -> None:
        merged = module.merge(w, a, b, s)
        _close("x @ merge(W, A, B, s)", x @ merged, x @ w + ((x @ a) * s) @ b)

    def round_trip() -> None:
        back = module.unmerge(module.merge(w, a, b, s), a, b, s)
        _close("unmerge(merge(W))", back, w, rtol=1e-12)

    _run(report, "the merged weight computes the same outputs", merged_forward, ())
    _run(report, "unmerge gives W back (to rounding)", round_trip, ())


def _dora(module: Any, report: Report) -> None:
    x, w, a, b, s = _lora_parts()
    m = np.linalg.norm(w + s * a @ b, axis=0) * np.array([0.5, 1.0, 2.0])
    g = Graph()
    layer = LoraLinear.from_linear(g, w, None, LoraConfig(rank=2, alpha=3.0, use_dora=True))
    magnitude = layer.update.state_leaves()["magnitude"]
    for node, value in ((layer.lora_a, a), (layer.lora_b, b), (magnitude, m)):
        g.set_value(node, value)
    xn = g.parameter(x)
    y = layer.forward(g, xn)
    g.backward(g.sum(g.mul(y, y)))
    upstream = 2 * np.array(g.value(y))  # dL/dy of L = sum(y**2)

    _run(
        report,
        "forward equals the engine's DoRA layer",
        lambda: _close("y", module.forward(x, w, a, b, m, s), np.array(g.value(y))),
        (),
    )

    def magnitude_and_input() -> None:  # the norm does not depend on x or m: exact derivatives
        def op(x: Array, m: Array) -> tuple[Array, Any]:
            def vjp(grad: Array, needs: tuple[bool, ...]) -> Grads:
                dx, _, _, dm = module.backward(grad, x, w, a, b, m, s)
                return dx if needs[0] else None, dm if needs[1] else None

            return np.asarray(module.forward(x, w, a, b, m, s), dtype=np.float64), vjp

        _assert_true(check_vjp(op, x, m))

    _run(report, "dL/dx and dL/dm against finite differences", magnitude_and_input, ("x", "m"))

    def low_rank() -> None:  # the norm is detached: compare with the engine, not finite differences
        _, da, db, _ = module.backward(upstream, x, w, a, b, m, s)
        _close("dL/dA (with the norm detached)", da, np.array(g.grad(layer.lora_a)))
        _close("dL/dB (with the norm detached)", db, np.array(g.grad(layer.lora_b)))

    _run(report, "dL/dA and dL/dB with the norm detached, as PEFT", low_rank, ())


def _assert_true(value: bool) -> None:
    assert value


def _vjp_checks(op: Any, *arrays: Array, **params: Any) -> None:
    """``check_vjp``: the gradient against finite differences, and the VJP's contract."""
    _assert_true(check_vjp(op, *arrays, **params))


EXERCISES: dict[str, tuple[str, Callable[[Any, Report], None]]] = {
    "broadcasting": ("a broadcasting add and its VJP", _broadcasting),
    "softmax": ("softmax and its VJP", _softmax),
    "lora_layer": ("one LoRA layer's forward and backward by hand", _lora_layer),
    "merge": ("merging and unmerging an adapter", _merge),
    "dora": ("DoRA's update, forward and backward", _dora),
}
"""The exercises by name: what each is, and its checks."""


class _Functions:
    """The student's module as the checks see it: each attribute a function run in the child."""

    def __init__(self, child: Child) -> None:
        self._child = child

    def __getattr__(self, name: str) -> Callable[..., Any]:
        child = self._child

        def call(*args: Any, **kwargs: Any) -> Any:
            return child.call(name, *args, **kwargs)

        return call


DEFAULT_TIMEOUT = 10.0
"""Seconds a file may run in all (``graphlora check --timeout``)."""


def check_file(path: str | Path, *, timeout: float = DEFAULT_TIMEOUT) -> Report:
    """Grade one exercise file; never raises for the student's mistakes, only reports them.

    The file runs in a child process (``graphlora.teach.remote``), which is stopped after
    ``timeout`` seconds: this process draws the inputs, computes the references and compares,
    so nothing the file does to its own process changes the verdict. The file may not import
    graphlora or a library that differentiates for it (``FORBIDDEN``), and a function of it that
    writes into its inputs fails its check, naming the input. A file that does not decode, does
    not import, exits or runs out of time is reported as FAILED.

    Raises
    ------
    FileNotFoundError
        For a path that is not a file.
    ValueError
        For a file that names no known exercise (``EXERCISE = "..."``), or a ``timeout`` that
        is not a positive number.
    """
    where = "check"
    limit = _checks.real_scalar(where, "timeout", timeout)
    if not (math.isfinite(limit) and limit > 0):
        raise ValueError(f"{where}: timeout must be a positive number of seconds, got {timeout}")
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"{where}: {target} is not a file")
    try:
        source = target.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        report = Report(str(target))
        report.fail("the file is UTF-8 text", f"{target}: {error}; save it as UTF-8")
        return report
    found = re.search(r"^EXERCISE\s*=\s*[\"'](\w+)[\"']", source, flags=re.MULTILINE)
    if found is None or found.group(1) not in EXERCISES:
        raise ValueError(
            f'{where}: {target} names no exercise; it needs a line EXERCISE = "<name>" with one '
            f"of {sorted(EXERCISES)}"
        )
    name = found.group(1)
    report = Report(f"{name} ({EXERCISES[name][0]})")
    try:
        child = Child(target, f"exercise_{name}", limit, FORBIDDEN)
    except StudentError as error:
        at = f" ({error.file}, line {error.line})" if error.line else ""
        report.fail("the file runs", f"{error.kind}: {error.message}{at}")
        return report
    except ChildGone as error:
        report.fail("the file runs", str(error))
        return report
    with child:
        EXERCISES[name][1](_Functions(child), report)
    return report


FORBIDDEN = ("graphlora", "torch", "jax", "autograd", "tensorflow", "tinygrad", "mlx")
"""What an exercise file may not import: every exercise is done by hand with NumPy, so neither
graphlora's own solutions (``ops.kernels.unbroadcast``, the engine's gradients) nor another
library's automatic differentiation may do the work."""
