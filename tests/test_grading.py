"""``python -m graphlora check``: the exercise stubs report what is not done, the reference
solutions pass, and planted mistakes fail with the input and element that disagree."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphlora.__main__ import main
from graphlora.teach.grading import EXERCISES, check_file

pytestmark = pytest.mark.slow  # each check starts a child process

ROOT = Path(__file__).resolve().parent.parent
STUBS = sorted((ROOT / "docs" / "exercises").glob("*.py"))
SOLUTIONS = Path(__file__).resolve().parent / "exercise_solutions"


def test_there_are_five_exercises_each_with_a_solution() -> None:
    assert [p.name for p in STUBS] == [
        "01_broadcasting.py",
        "02_softmax.py",
        "03_lora_layer.py",
        "04_merge.py",
        "05_dora.py",
    ]
    assert sorted(p.name for p in SOLUTIONS.glob("*.py")) == [p.name for p in STUBS]
    assert len(EXERCISES) == 5


@pytest.mark.parametrize("stub", STUBS, ids=[p.stem for p in STUBS])
def test_a_stub_says_what_is_not_done(stub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(stub)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "not done yet: " in out
    assert out.rstrip().endswith("some checks failed")


@pytest.mark.parametrize("stub", STUBS, ids=[p.stem for p in STUBS])
def test_the_reference_solution_passes(stub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(SOLUTIONS / stub.name)]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out and out.rstrip().endswith("all checks passed")


MISTAKES = [
    (  # the broadcast sum forgets the stretched axes
        "01_broadcasting.py",
        " + stretched",
        "",
        "ValueError: cannot reshape array of size 30 into shape (2,1,3) (in 01_broadcasting.py",
    ),
    (  # softmax's VJP forgets the subtraction
        "02_softmax.py",
        "out * (g - np.sum(g * out, axis=axis, keepdims=True))",
        "out * g",
        "gradient of input 0 (x) (shape (5,)) disagrees at element",
    ),
    (  # dL/dx without the low-rank path: the mistake `explain` once printed
        "03_lora_layer.py",
        "grad_x = g @ w.T + (grad_h * s) @ a.T",
        "grad_x = g @ w.T",
        "gradient of input 0 (x) (shape (4, 5)) disagrees at element",
    ),
    (  # dL/dA without the scaling
        "03_lora_layer.py",
        "grad_a = x.T @ (grad_h * s)",
        "grad_a = x.T @ grad_h",
        "gradient of input 1 (A) (shape (5, 2)) disagrees at element",
    ),
    (  # merging without the scaling
        "04_merge.py",
        "return w + (a @ b) * s",
        "return w + a @ b",
        "x @ merge(W, A, B, s): element",
    ),
    (  # dL/dm forgets to divide by the norm
        "05_dora.py",
        "axis=0) / norm",
        "axis=0)",
        "gradient of input 1 (m) (shape (3,)) disagrees at element",
    ),
    (  # the gradient of A through the norm, which PEFT detaches, is not DoRA's
        "05_dora.py",
        "grad_a = s * grad_adapted @ b.T",
        "grad_a = s * grad_adapted @ b.T + 1.0",
        "dL/dA (with the norm detached): element (",
    ),
]


@pytest.mark.parametrize(("name", "old", "new", "message"), MISTAKES)
def test_a_planted_mistake_fails_naming_where(
    name: str, old: str, new: str, message: str, tmp_path: Path
) -> None:
    source = (SOLUTIONS / name).read_text(encoding="utf-8")
    assert old in source
    wrong = tmp_path / name
    wrong.write_text(source.replace(old, new), encoding="utf-8")
    report = check_file(wrong)
    assert not report.passed
    assert message in report.text(), report.text()
    if "gradient of input" in message:
        assert "yours" in report.text() and "finite difference" in report.text()


def test_a_file_that_is_no_exercise_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "mine.py"
    other.write_text("x = 1\n", encoding="utf-8")
    assert main(["check", str(other)]) == 2
    assert "names no exercise; it needs a line EXERCISE = " in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing.py")]) == 2
    assert "is not a file" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text('EXERCISE = "merge"\n1 / 0\n', encoding="utf-8")
    assert main(["check", str(broken)]) == 1
    assert "ZeroDivisionError: division by zero (broken.py, line 2)" in capsys.readouterr().out


# --- a grader students cannot fool or hang -----------------------------------------------------------

STUB = (ROOT / "docs" / "exercises" / "02_softmax.py").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (  # the grader's own checks are out of reach: graphlora cannot be imported there
            "import graphlora.teach.grading as grading\n"
            "grading.check_vjp = lambda *a, **k: True\n"
            "grading._close = lambda *a, **k: None\n",
            1,
            "FAILED  the file runs\n          Refused: softmax is done by hand with NumPy: the "
            "file may not import graphlora (graded without graphlora, torch, jax, autograd, "
            "tensorflow, tinygrad, mlx) (02_softmax.py, line ",
        ),
        ("import sys\nsys.exit(0)\n", 1, "FAILED  the file runs\n          SystemExit: 0"),
        ("raise SystemExit(0)\n", 1, "FAILED  the file runs\n          SystemExit: 0"),
        (
            "def softmax(x, axis=-1):\n    import os\n    os._exit(0)\n",
            1,
            "the file ended the grader's process (exit status 0); a file to grade must not exit",
        ),
        (
            "def softmax(x, axis=-1):\n    raise SystemExit(3)\n",
            1,
            "SystemExit: 3 (in 02_softmax.py, line ",
        ),
        (
            "def softmax(x, axis=-1):\n    return {'out': x}, None\n",
            1,
            "the grader cannot read",
        ),
    ],
)
def test_what_a_file_does_to_its_own_process_does_not_change_the_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, status: int, message: str
) -> None:
    file = tmp_path / "02_softmax.py"
    file.write_text(STUB + "\n" + extra, encoding="utf-8")
    assert main(["check", str(file)]) == status
    out = capsys.readouterr().out
    assert message in out, out
    assert "all checks passed" not in out


def test_an_endless_loop_is_stopped_at_the_time_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "02_softmax.py"
    file.write_text(STUB + "\ndef softmax(x, axis=-1):\n    while True:\n        pass\n")
    assert main(["check", str(file), "--timeout", "3"]) == 1
    out = capsys.readouterr().out
    assert "timed out: the file ran for more than 3 s (the time limit, --timeout)" in out
    assert out.count("FAILED") == 4  # the forward and the three VJP checks
    loop = tmp_path / "loop.py"
    loop.write_text('EXERCISE = "merge"\nwhile True:\n    pass\n')
    assert main(["check", str(loop), "--timeout", "2"]) == 1
    assert "FAILED  the file runs\n          timed out" in capsys.readouterr().out


def test_a_file_that_is_not_utf8_or_a_bad_timeout_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "latin.py"
    file.write_bytes(b'EXERCISE = "merge"\n# caf\xe9\n')
    assert main(["check", str(file)]) == 1
    out = capsys.readouterr().out
    assert f"FAILED  the file is UTF-8 text\n          {file}: 'utf-8' codec can't decode" in out
    for bad in ("0", "-1", "nan"):
        assert main(["check", str(file), "--timeout", bad]) == 2
        assert f"timeout must be a positive number of seconds, got {float(bad)}" in (
            capsys.readouterr().err
        )


SOLUTION = {p.name: p.read_text(encoding="utf-8") for p in SOLUTIONS.glob("*.py")}


@pytest.mark.parametrize(
    ("name", "old", "new", "message"),
    [
        (  # graphlora's own unbroadcast solves exercise 1: refused, where it is imported
            "01_broadcasting.py",
            "def unbroadcast(g, shape):",
            "from graphlora.ops.kernels import unbroadcast\n\n\ndef unbroadcast_unused(g, shape):",
            "Refused: broadcasting is done by hand with NumPy: the file may not import "
            "graphlora (graded without graphlora, torch, jax, autograd, tensorflow, tinygrad, "
            "mlx) (01_broadcasting.py, line 17)",
        ),
        (  # the engine computing exercise 3's gradients, imported inside a function
            "03_lora_layer.py",
            "def backward(g, x, w, a, b, s):",
            "def backward(g, x, w, a, b, s):\n    import graphlora as gl\n    del gl\n\n\n"
            "def backward_unused(g, x, w, a, b, s):",
            "Refused: lora_layer is done by hand with NumPy: the file may not import graphlora",
        ),
        (  # another library's autograd is no more by hand
            "02_softmax.py",
            "import numpy as np",
            "import numpy as np\nimport torch",
            "the file may not import torch",
        ),
        (  # merging into W in place: the frozen weight is lost, and the grader says so
            "04_merge.py",
            "return w + (a @ b) * s",
            "w += (a @ b) * s\n    return w",
            "merge changed its input w (argument 1) in place: leave every input as it was and "
            "return new arrays",
        ),
        (  # a VJP that writes into the incoming gradient
            "02_softmax.py",
            "return out * (g - np.sum(g * out, axis=axis, keepdims=True))",
            "g -= np.sum(g * out, axis=axis, keepdims=True)\n    return out * g",
            "vjp changed its input g (argument 1) in place",
        ),
    ],
)
def test_shortcuts_and_changed_inputs_are_refused_by_name(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    old: str,
    new: str,
    message: str,
) -> None:
    source = SOLUTION[name]
    assert old in source
    file = tmp_path / name
    file.write_text(source.replace(old, new, 1), encoding="utf-8")
    assert main(["check", str(file)]) == 1
    out = capsys.readouterr().out
    assert message in out, out
    assert "all checks passed" not in out
