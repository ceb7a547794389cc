"""The command line: the demo (the default), the worked example, and clear errors for bad usage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphlora as gl
from graphlora.__main__ import main


def test_module_runs_the_demo_by_default() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "graphlora"], capture_output=True, text=True, check=True, timeout=120
    )
    assert "graphlora demo: LoRA recovers a planted low-rank update" in done.stdout
    assert "relative error ||A B s - dW*||_F / ||dW*||_F: 0.0033" in done.stdout
    assert "trainable parameters: 384 of 2,432 (15.79%)" in done.stdout
    # The README shows this run's output as it is (the merge difference is rounding: below 1e-12)
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    shown = readme.split("```text\ngraphlora demo: ")[1].split("```")[0]
    ran = done.stdout.split("graphlora demo: ", 1)[1]
    merge = "max |merged - unmerged| output difference: "
    assert [line for line in shown.splitlines() if not line.startswith(merge)] == [
        line for line in ran.splitlines() if not line.startswith(merge)
    ]
    assert float(ran.split(merge)[1].split()[0]) < 1e-12


def test_demo_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "demo",
                "--in-features",
                "20",
                "--out-features",
                "12",
                "--planted-rank",
                "2",
                "--rank",
                "2",
                "--steps",
                "200",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    table = out.split("singular values  planted  learned (A B s)\n")[1].splitlines()[:2]
    rows = [[float(v) for v in line.split()] for line in table]
    assert [row[0] for row in rows] == [1, 2]
    for _, planted, learned in rows:  # the learned update's singular values beside the planted
        assert abs(planted - learned) < 0.02
    error = float(out.split("relative error ||A B s - dW*||_F / ||dW*||_F: ")[1].split()[0])
    assert error < 0.02
    difference = float(out.split("max |merged - unmerged| output difference: ")[1].split()[0])
    assert difference < 1e-12


def test_rank_sweep_shows_the_elbow_at_the_planted_rank(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "demo",
                "--rank-sweep",
                "1,2,4",
                "--planted-rank",
                "2",
                "--in-features",
                "16",
                "--out-features",
                "8",
                "--steps",
                "200",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = [
        line.split() for line in capsys.readouterr().out.splitlines() if line[:4].strip().isdigit()
    ]
    errors = {int(row[0]): float(row[4]) for row in rows}
    assert set(errors) == {1, 2, 4}
    for row in rows:  # final >= best-fit loss; every error >= the least error knowing dW*
        assert float(row[2]) >= float(row[3]) * 0.999
        assert min(float(row[4]), float(row[5])) >= float(row[6]) - 1e-4
    assert float(rows[0][6]) > 0.3 and float(rows[1][6]) < 1e-4  # 0 from the planted rank on
    assert errors[1] > 0.3
    assert errors[2] < 0.02
    assert errors[4] < 0.02


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "curves.png"
    assert main(["demo", "--steps", "20", "--plot", str(target), "--no-progress"]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {target}" in capsys.readouterr().out
    sweep = tmp_path / "sweep.png"
    argv = ["demo", "--steps", "5", "--rank-sweep", "1,2,4", "--rslora", "--alpha", "8"]
    assert main([*argv, "--plot", str(sweep), "--no-progress"]) == 0
    assert sweep.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figure_records_how_the_adapter_was_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from graphlora.teach import demo

    titles: list[str] = []
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "savefig",
        lambda fig, *a, **k: titles.append(fig._suptitle.get_text()),
    )
    task = demo.plant_low_rank_task(in_features=8, out_features=6, planted_rank=2)
    runs = [
        demo.run_low_rank(task, r, steps=2, alpha=8.0, use_rslora=True, init="zeros")
        for r in (1, 2)
    ]
    demo.plot_results("unused.png", runs, planted_rank=2)
    default = [demo.run_low_rank(task, r, steps=2) for r in (1, 2)]
    demo.plot_results("unused.png", default, planted_rank=2)
    assert titles == [
        "LoRA: init zeros, alpha 8, scaling alpha / sqrt(r)",
        "LoRA: init kaiming, alpha the rank, scaling alpha / r",
    ]


def test_the_digits_demo_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    target = tmp_path / "digits.png"
    assert (
        main(["demo", "--task", "digits", "--steps", "20", "--plot", str(target), "--no-progress"])
        == 0
    )
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {target}" in capsys.readouterr().out


@pytest.mark.slow
def test_the_gpt_demo_plots_its_two_curves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "gpt.png"
    argv = ["demo", "--task", "gpt", "--steps", "10", "--lora-steps", "5", "--no-progress"]
    assert main([*argv, "--plot", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {target}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "steps", "lora_steps"),
    [
        ([], 3000, 1000),
        (["--quick"], 600, 200),
        (["--quick", "--steps", "50"], 50, 200),  # what is given wins over --quick
        (["--lora-steps", "7"], 3000, 7),
    ],
)
def test_quick_shortens_the_gpt_demo_for_a_lab(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    steps: int,
    lora_steps: int,
) -> None:
    from graphlora.teach import demo_gpt

    asked: dict[str, object] = {}

    def stop(**kwargs: object) -> None:
        asked.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(demo_gpt, "run_gpt", stop)
    with pytest.raises(SystemExit):
        main(["demo", "--task", "gpt", "--no-progress", *extra])
    assert (asked["steps"], asked["lora_steps"]) == (steps, lora_steps)
    assert f"{steps} AdamW steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--no-progress"])
    assert "--quick does not apply to --task lowrank" in capsys.readouterr().err


def test_plot_without_matplotlib_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as info:
        main(["demo", "--plot", "x.png"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib: pip install 'graphlora[plot]'" in err
    assert "(from a clone: pip install -e '.[plot]')" in err


def test_progress_falls_back_to_plain_lines_without_tqdm(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["demo", "--steps", "20"]) == 0
    err = capsys.readouterr().err
    assert "rank 4: step 1/20" in err
    assert "rank 4: step 20/20" in err


def test_digits_task(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    assert main(["demo", "--task", "digits", "--steps", "150", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "accuracy on held-out images (a fixed fifth of each digit set, never trained on):" in out
    after = float(out.split("digits 5-9 with the adapters:")[1].split()[0])
    assert after > 0.9
    # rank 4 on the 32 -> 5 head: 4 * (32 + 5) = 148 parameters against its weight's 32 * 5 = 160
    assert "  layers.0: 64 -> 32, adapter 384 against 2,048\n" in out
    assert (
        "  layers.1: 32 -> 5, adapter 148 against 160: over half the weight, little saving on a "
        "layer this narrow\n"
    ) in out


def test_the_saving_notes_at_their_boundaries() -> None:
    from graphlora.__main__ import _saving

    assert _saving(80, 160) == ""  # half: a saving worth having
    assert _saving(81, 160) == ": over half the weight, little saving on a layer this narrow"
    assert _saving(159, 160) == ": over half the weight, little saving on a layer this narrow"
    assert _saving(160, 160) == ": as many as the weight itself or more, no saving"


@pytest.mark.parametrize(
    ("rank", "line"),
    [
        (10, None),  # 10 * (64 + 32) = 960: under half of 64 * 32 = 2,048
        (11, "  rank 11: 1,056 trainable against W0's 2,048: over half the weight, little saving"),
        (21, "  rank 21: 2,016 trainable against W0's 2,048: over half the weight, little saving"),
        (
            22,
            "  rank 22: 2,112 trainable against W0's 2,048: as many as the weight itself or more, no saving",
        ),
    ],
)
def test_a_rank_that_saves_little_is_said(
    rank: int, line: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--rank", str(rank), "--steps", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    if line is None:
        assert "saving" not in out
    else:
        assert line in out


def test_example_command_prints_values_and_gradients(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["example"]) == 0
    out = capsys.readouterr().out
    assert out.count("grad:") == 5  # w, b and the three ops; the constants x, target get none
    assert "largest difference from the engine: 0.0e+00" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (
            ["demo", "--rank-sweep", "1,x"],
            "expected comma-separated positive ints such as 1,2,4,8, got '1,x'",
        ),
        (["demo", "--rank-sweep", "0,2"], "ranks must be >= 1, got '0,2'"),
        (["demo", "--steps", "-5"], "argument --steps: must be > 0, got '-5'"),
        (["demo", "--lr", "fast"], "argument --lr: expected a float, got 'fast'"),
        (["demo", "--task", "mnist"], "invalid choice: 'mnist'"),
        (["demo", "--seed", "-1"], "argument --seed: must be >= 0, got '-1'"),
        (["demo", "--seed", "x"], "argument --seed: expected an int, got 'x'"),
        (
            ["demo", "--task", "gpt", "--rank", "100"],
            "--rank 100 exceeds 64, the width of the demo's GPT",
        ),
        (["check", "f.py", "--timeout", "soon"], "argument --timeout: invalid float value"),
    ],
)
def test_bad_usage_is_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_impossible_sizes_are_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--rank", "40", "--out-features", "16", "--no-progress"]) == 2
    assert "graphlora demo: error: rank 40 exceeds min(in, out) = 16" in capsys.readouterr().err
    assert main(["demo", "--planted-rank", "40", "--out-features", "16", "--no-progress"]) == 2
    assert "planted_rank 40 exceeds min(in_features, out_features) = 16" in capsys.readouterr().err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--rank-sweep R1,R2,..." in out
    assert "--plot FILE.png" in out


def test_the_demo_takes_alpha_rslora_and_init(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--steps", "5", "--no-progress", "--alpha", "8", "--rslora", "--init", "pissa"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "LoRA: init pissa, alpha 8, scaling alpha / sqrt(r)" in out
    # PiSSA's frozen weight is W0 less its top part: the adapter must hold that part again
    assert "relative error ||W_res + A B s - W0 - dW*||_F / ||dW*||_F: " in out
    assert (
        "the least error of any rank-4 adapter, knowing dW* exactly (Eckart-Young): 0.5070" in out
    )
    with pytest.raises(SystemExit):
        main(["demo", "--init", "xavier"])
    assert "invalid choice: 'xavier'" in capsys.readouterr().err


def test_help_shows_every_default() -> None:
    from graphlora.__main__ import _parser

    parser = _parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    demo_parser = subparsers.choices["demo"]  # type: ignore[attr-defined]
    for action in demo_parser._actions:
        if action.dest == "help":
            continue
        assert action.help and "default" in action.help, action.option_strings
        if action.default not in (None, False, True):
            assert str(action.default) in action.help, (action.option_strings, action.help)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "gpt", "--lr", "0.1"], "--lr does not apply to --task gpt"),
        (
            ["--task", "digits", "--plot", "x.png", "--rank-sweep", "1,2"],
            "--rank-sweep does not apply to --task digits",
        ),
        (["--lora-steps", "5"], "--lora-steps does not apply to --task lowrank"),
        (["--task", "gpt", "--no-progress", "--noise", "0.5"], "--noise does not apply"),
    ],
)
def test_options_a_task_does_not_read_are_refused_not_ignored(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_save_adapter_without_safetensors_fails_before_training(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import graphlora.__main__ as cli
    from graphlora.teach import demo

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained before finding safetensors missing")

    monkeypatch.setattr(demo, "run_low_rank", no_training)
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--save-adapter", str(tmp_path / "a")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--save-adapter needs the safetensors package: pip install 'graphlora[adapters]'" in err
    assert "(from a clone: pip install -e '.[adapters]')" in err


def _first_line_then_close(command: list[str]) -> tuple[bytes, int, str]:
    """Run ``graphlora COMMAND``, read its first line and close the pipe (as ``| head -1``):
    the first line, the exit status and what it wrote to stderr."""
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "graphlora", *command],  # -u: each line written at once
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()
    status = process.wait(timeout=120)
    err = process.stderr.read().decode()
    process.stderr.close()
    return first, status, err


@pytest.mark.slow
@pytest.mark.parametrize("command", [["demo", "--steps", "50", "--no-progress"], ["example"]])
def test_a_closed_pipe_ends_quietly_with_status_0(command: list[str]) -> None:
    """As ``graphlora demo | head -1``: the reader goes away after the first line."""
    first, status, err = _first_line_then_close(command)
    assert first.startswith(b"graphlora")
    assert status == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_the_example_leaves_numpy_print_options_as_they_were(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = np.get_printoptions()
    assert main(["example"]) == 0
    assert "largest difference from the engine" in capsys.readouterr().out
    assert np.get_printoptions() == before


@pytest.mark.slow
def test_the_gpt_demo_reports_both_texts(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["demo", "--task", "gpt", "--steps", "40", "--lora-steps", "20", "--no-progress"]) == 0
    )
    out = capsys.readouterr().out
    assert "graphlora demo: a character-level GPT, pretrained on prose, LoRA-adapted to code" in out
    assert "trainable params: 16,384 || all params: 126,720" in out
    rows = {
        line.split("  ")[1].strip(): line
        for line in out.splitlines()
        if line.startswith("  base model") or line.startswith("  adapters zeroed")
    }
    assert len(rows) == 2
    assert rows["base model"].split()[-4:] == rows["adapters zeroed again"].split()[-4:]
    assert "sample, adapted (prompt 'def ', temperature 0.8):\n  | def " in out


def test_save_adapter_refuses_an_existing_directory_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "f").write_text("x")
    for target, message in [
        (tmp_path / "a", f"--save-adapter: {tmp_path / 'a'} already exists; pass --overwrite"),
        (tmp_path / "f", f"--save-adapter: {tmp_path / 'f'} is a file, not a directory"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["demo", "--save-adapter", str(target), "--no-progress"])
        assert info.value.code == 2
        err = capsys.readouterr()
        assert message in err.err
        assert err.out == ""  # nothing trained


@pytest.mark.slow
def test_inspect_in_a_closed_pipe_ends_quietly_with_status_0(tmp_path: Path) -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 4, 3, gl.LoraConfig(rank=2), name="proj")
    gl.save_adapter(tmp_path / "a", g, {"proj": layer})
    for _ in range(3):  # it failed one run in two
        first, status, err = _first_line_then_close(["inspect", str(tmp_path / "a")])
        assert first.startswith(b"adapter: ")
        assert status == 0 and "Broken pipe" not in err and "Traceback" not in err, err
