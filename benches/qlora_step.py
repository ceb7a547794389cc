"""Section h of the benchmarks: what a 4-bit base saves (QLoRA). A LoRA step (rank 8, 1 x 128
tokens, float32, replayed) over a float32 base and over an NF4 base (with and without double
quantization), at GPT-2 small's shape (adapters on ``c_attn``, PEFT's GPT-2 default) and at
SmolLM-135M's shape (``q_proj`` and ``v_proj``), random weights, read from a checkpoint folder as
a user would (``gl.from_pretrained(..., quantize=...)``: the NF4 cases never hold a float copy of
a linear weight).

Peak memory: each case in a process of its own, which reads the model, puts the adapters on and
runs 2 steps; the rise of the resident high-water mark over all of that (``/proc/self/clear_refs``,
Linux only), and the bytes the weights hold. Step time: the three cases side by side in one
process, their steps interleaved round by round (medians of the rounds), since these machines
are shared and noisy. Each NF4 case is reported as a ratio to the float32 base of its shape.

    python benches/qlora_step.py            # both shapes
    python benches/qlora_step.py --quick    # a small shape only, few rounds"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import graphlora as gl
from graphlora.optim import SGD

SHAPES: dict[str, dict[str, Any]] = {
    "gpt2-small": {
        "kind": "gpt",
        "config": {
            "vocab_size": 50257,
            "block_size": 1024,
            "n_layer": 12,
            "n_head": 12,
            "n_embd": 768,
        },
        "targets": ["c_attn"],
    },
    "smollm-135m": {
        "kind": "llama",
        "config": {
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
        },
        "targets": ["q_proj", "v_proj"],
    },
    "quick": {
        "kind": "llama",
        "config": {
            "vocab_size": 512,
            "hidden_size": 128,
            "intermediate_size": 344,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,
        },
        "targets": ["q_proj", "v_proj"],
    },
}
BASES = {
    "float32": None,
    "nf4": gl.nf4.NF4Config(),
    "nf4 + double quant": gl.nf4.NF4Config(double_quant=True),
}
TOKENS, RANK, ALPHA = 128, 8, 16.0


def write_checkpoint(shape: dict[str, Any], folder: Path) -> None:
    """Random weights (transformers' init: N(0, 0.02)) saved as transformers would."""
    g = gl.Graph(np.float32)
    if shape["kind"] == "gpt":
        gl.GPT.new(g, gl.GPTConfig(**shape["config"]), rng=0).save_pretrained(g, folder)
    else:
        gl.Llama.new(g, gl.LlamaConfig(**shape["config"]), rng=0).save_pretrained(g, folder)


def _weight_bytes(g: gl.Graph, model: Any) -> int:
    """Bytes of the model's leaves and of its NF4 weights (codes and absmax)."""
    held = sum(np.asarray(g.value(leaf)).nbytes for leaf in g.leaves)
    for _, module in gl.nn.named_modules(model):
        for value in vars(module).values():
            if isinstance(value, gl.nf4.NF4Weight):
                held += value.nbytes
    return held


def build(shape_name: str, base: str, folder: Path | str) -> tuple[gl.Graph, Any, Any]:
    """Read the model, put the adapters on, and compile one step: ``(graph, model, step)``, where
    ``step()`` runs forward, backward and SGD on the adapters."""
    shape = SHAPES[shape_name]
    g = gl.Graph(np.float32)
    model = gl.from_pretrained(g, folder, quantize=BASES[base])
    gl.apply_lora(model, gl.LoraConfig(rank=RANK, alpha=ALPHA, seed=0), shape["targets"])
    vocab = shape["config"]["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, TOKENS + 1))
    opt = SGD(g, gl.nn.parameters(model), lr=1e-3)
    logits = model.forward(g, ids[:, :-1], fused=True)
    run = g.compile(g.cross_entropy(g.reshape(logits, (TOKENS, vocab)), ids[0, 1:]))

    def step() -> None:
        run()
        opt.step()
        opt.zero_grad()

    return g, model, step


def _worker(shape_name: str, base: str, folder: str) -> None:
    """In a process of its own: read, adapt, 2 steps; print the peak memory and weight bytes."""
    import resident  # benches/resident.py, beside this file

    before = resident.start()
    g, model, step = build(shape_name, base, folder)
    for _ in range(2):
        step()
    peak = resident.rise(before)
    print(json.dumps({"peak_bytes": peak, "weight_bytes": _weight_bytes(g, model)}))


def _measure(shape_name: str, base: str, folder: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", shape_name, base, str(folder)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def section_h(
    rounds_of: Callable[..., dict[str, list[float]]], rounds: int, quick: bool
) -> list[dict[str, Any]]:
    """One row per shape: each base's peak memory, weight bytes and step time, and the NF4
    bases' ratios to the float32 base."""
    rows = []
    for shape_name in ["quick"] if quick else ["gpt2-small", "smollm-135m"]:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / shape_name
            write_checkpoint(SHAPES[shape_name], folder)
            cases = {base: _measure(shape_name, base, folder) for base in BASES}
            steps = {base: build(shape_name, base, folder)[2] for base in BASES}
            samples = rounds_of(steps, rounds=rounds, min_batch=0.0)
            del steps
        for base, times in samples.items():
            cases[base]["step_seconds"] = statistics.median(times)
        float_case = cases["float32"]
        ratios = {
            base: {
                key: case[key] / float_case[key]
                for key in ("peak_bytes", "weight_bytes", "step_seconds")
            }
            for base, case in cases.items()
            if base != "float32"
        }
        rows.append({"shape": shape_name, "cases": cases, "ratio_to_float32": ratios})
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n(h) QLoRA: a LoRA step (rank {RANK}, 1 x {TOKENS} tokens, float32, replayed) over a "
        "float32 and an NF4 base; peak memory of reading the model and 2 steps, step time "
        "interleaved"
    )
    for row in rows:
        print(f"{row['shape']}:")
        for base, case in row["cases"].items():
            ratio = row["ratio_to_float32"].get(base)
            against = (
                ""
                if ratio is None
                else f"  ({ratio['peak_bytes']:.2f}x memory, {ratio['weight_bytes']:.2f}x "
                f"weights, {ratio['step_seconds']:.2f}x time)"
            )
            print(
                f"  {base:20} peak {case['peak_bytes'] / 2**20:7.1f} MiB, weights "
                f"{case['weight_bytes'] / 2**20:7.1f} MiB, step "
                f"{1e3 * case['step_seconds']:8.1f} ms{against}"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], sys.argv[4])
        sys.exit(0)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import rounds_of  # type: ignore[import-not-found]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    report(section_h(rounds_of, 3 if args.quick else 7, args.quick))
