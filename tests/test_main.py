"""The command line: ``python -m graphlora`` runs its worked example; bad usage is a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from graphlora.__main__ import main


def test_module_runs_the_worked_example() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "graphlora"], capture_output=True, text=True, check=True, timeout=120
    )
    assert "NodeId(2, op='parameter', shape=(2,), name='b')" in done.stdout
    assert "largest difference from the engine: 0.0e+00" in done.stdout


def test_example_command_prints_values_and_gradients(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["example"]) == 0
    out = capsys.readouterr().out
    assert out.count("grad:") == 5  # w, b and the three ops; the constants x, target get none
    assert "dL/dw by hand" in out


def test_help_and_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "example" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
