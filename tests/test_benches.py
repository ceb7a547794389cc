"""benches/run.py still runs and reports every section (a smoke run; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmark_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    assert "(a) LoRA training step" in done.stdout
    report = json.loads(out.read_text())
    assert {
        "a_lora_step",
        "b_op_overhead",
        "c_tape_scaling",
        "d_peak_memory",
        "e_mlp_step",
        "f_gpt_step",
        "h_qlora_step",
        "l_load",
    } <= set(report)
    loads = report["l_load"]  # the small size, op by op and replayed, under three settings
    assert {(r["run"], r["threads"]) for r in loads} == {
        (run, threads) for run in ("op by op", "replayed") for threads in ("auto", "all", "one")
    }
    assert all(r["seconds"]["quiet"] > 0 and r["seconds"]["loaded"] > 0 for r in loads)
    (qlora,) = report["h_qlora_step"]  # the small shape only, in a quick run
    assert set(qlora["cases"]) == {"float32", "nf4", "nf4 + double quant"}
    for case in qlora["cases"].values():
        assert case["peak_bytes"] > 0 and case["step_seconds"] > 0 and case["weight_bytes"] > 0
    # the weights alone: NF4 holds well under half the bytes of float32
    assert qlora["ratio_to_float32"]["nf4"]["weight_bytes"] < 0.5
    for row in report["a_lora_step"]:
        assert {
            "numpy",
            "numpy tuned",
            "graphlora",
            "gl fused",
            "gl replay",
            "fused replay",
        } <= set(row["ratio"])
        assert row["ratio"]["numpy"] == 1.0
    assert {row["op"] for row in report["b_op_overhead"]} == {
        "add",
        "mul",
        "matmul",
        "tanh",
        "sum",
        "relu",
    }
    assert [row["nodes"] for row in report["c_tape_scaling"]] == [1001, 10001]
    (gpt,) = report["f_gpt_step"]  # the small size only, in a quick run
    assert {"graphlora", "gl replay"} <= set(gpt["seconds"])
    assert gpt["peak_bytes"]["graphlora"] > 0
    # with PyTorch: each graphlora side's ratio to PyTorch's faster setting in each of 3 rounds
    with_torch = any(name.startswith("torch") for name in gpt["seconds"])
    by_round = gpt["ratio_by_round"]
    assert set(by_round) == ({"graphlora", "gl replay"} if with_torch else set())
    assert all(len(ratios) == 3 and min(ratios) > 0 for ratios in by_round.values())
