"""Section f of the benchmarks: one LoRA fine-tuning step of a GPT, graphlora against PyTorch.

The step: forward, cross-entropy on the next tokens, backward, SGD on the LoRA parameters (rank 8
on ``c_attn``), float32. graphlora's ``GPT`` records it every step or replays it
(``Graph.compile``); the other side is transformers' ``GPT2LMHeadModel`` with PEFT's LoRA on
PyTorch eager (CPU), with the same weights, at one thread and at PyTorch's default. Both sides
start from the same weights and take one step first, and the LoRA parameters must then agree.
Each side's time is its median over interleaved rounds; beside each ratio, the middle half of
the rounds' own ratios (each graphlora side over PyTorch's faster setting in the same round)
shows how far the machine's noise moves one run's ratio.

Peak memory: each side, in a process of its own, resets the kernel's high-water mark of resident
memory (``/proc/self/clear_refs``) once its libraries are imported, builds its model (the same
sizes, its own init) and takes three steps: how far the mark rose is the memory of the model,
its optimizer state and a step's values and gradients. Linux only. And, where transformers is
installed: how long a GPT-2-small-sized (124M) checkpoint takes to read, and how much memory.

    python benches/gpt_step.py            # every size, GPT-2 small's real dimensions included
    python benches/gpt_step.py --quick    # the small size, few rounds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import graphlora as gl
from graphlora.optim import SGD

SIZES = {
    "small": {"batch": 4, "tokens": 32, "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab": 256},
    "medium": {"batch": 8, "tokens": 128, "n_embd": 256, "n_layer": 4, "n_head": 4, "vocab": 512},
    # GPT-2 small's real dimensions (124M parameters): left out of --quick
    "gpt2-small": {
        "batch": 1,
        "tokens": 128,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "vocab": 50257,
    },
}
RANK, ALPHA, LR = 8, 16.0, 1e-3


def _data(size: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, size["vocab"], size=(size["batch"], size["tokens"] + 1))
    return ids[:, :-1], ids[:, 1:]  # inputs, and the next token of each as its target


def graphlora_step(
    size: dict[str, int], replay: bool
) -> tuple[Callable[[], None], Callable[[], list[np.ndarray]]]:
    """graphlora's step, and a reader of (A, B) of every adapted layer, in name order."""
    config = gl.GPTConfig(
        vocab_size=size["vocab"],
        block_size=size["tokens"],
        n_layer=size["n_layer"],
        n_head=size["n_head"],
        n_embd=size["n_embd"],
    )
    g = gl.Graph(np.float32)
    model = gl.GPT.new(g, config, rng=0)
    adapters = gl.apply_lora(model, gl.LoraConfig(rank=RANK, alpha=ALPHA, seed=0, init="kaiming"))
    rng = np.random.default_rng(1)
    for layer in adapters.values():  # trained-looking B, so that every gradient is non-zero
        g.set_value(layer.lora_b, rng.normal(0, 0.02, size=(RANK, layer.out_features)))
    x, y = _data(size)
    tokens, targets = g.constant(x), g.constant(y)
    opt = SGD(g, gl.nn.parameters(model), lr=LR)

    def loss() -> gl.NodeId:
        return g.cross_entropy(model.forward(g, tokens, fused=True), targets)

    if replay:
        run = g.compile(loss())

        def step() -> None:
            run()
            opt.step()
            opt.zero_grad()

    else:

        def step() -> None:
            g.backward(loss())
            opt.step()
            opt.zero_grad()
            g.reset()

    def read() -> list[np.ndarray]:
        return [
            np.array(g.value(n)) for layer in adapters.values() for n in layer.trainable_params()
        ]

    step.graph, step.model, step.adapters = g, model, adapters  # type: ignore[attr-defined]
    return step, read


def torch_step(
    size: dict[str, int], torch: Any, transformers: Any, peft: Any, own_weights: bool = False
) -> tuple[Callable[[], None], Callable[[], list[np.ndarray]]]:
    """The same step in transformers + PEFT on PyTorch eager, from graphlora's weights (or, with
    ``own_weights``, transformers' own init, for measuring memory alone)."""
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=size["vocab"],
            n_positions=size["tokens"],
            n_embd=size["n_embd"],
            n_layer=size["n_layer"],
            n_head=size["n_head"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["c_attn"], fan_in_fan_out=True
    )
    if own_weights:
        lora = peft.get_peft_model(hf, config).train()
        params = [p for p in lora.parameters() if p.requires_grad]
    else:
        source, _ = graphlora_step(size, replay=False)
        g, model, adapters = source.graph, source.model, source.adapters  # type: ignore[attr-defined]
        state = gl.nn.state_dict(g, model)
        hf.load_state_dict(
            {k: torch.from_numpy(v) for k, v in state.items() if "lora_" not in k}, strict=False
        )
        lora = peft.get_peft_model(hf, config).train()
        named = dict(lora.named_parameters())
        params = []
        for name, layer in adapters.items():
            a = named[f"base_model.model.{name}.lora_A.default.weight"]
            b = named[f"base_model.model.{name}.lora_B.default.weight"]
            with torch.no_grad():
                a.copy_(torch.from_numpy(np.array(g.value(layer.lora_a)).T))
                b.copy_(torch.from_numpy(np.array(g.value(layer.lora_b)).T))
            params += [a, b]
    x, y = (torch.from_numpy(v) for v in _data(size))
    vocab = size["vocab"]

    def step() -> None:
        logits = lora(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.sub_(LR * p.grad)
                p.grad = None

    def read() -> list[np.ndarray]:
        return [p.detach().numpy().T.copy() for p in params]

    return step, read


def _memory_worker(side: str, size_name: str) -> None:
    """In a process of its own: print how far the resident memory rose above what the imported
    libraries hold, while building the model and taking three steps."""

    import resident  # benches/resident.py, beside this file

    size = SIZES[size_name]
    if side.startswith("torch"):
        import peft
        import torch
        import transformers

        torch.set_num_threads(1 if side == "torch1" else torch.get_num_threads())
        before = resident.start()  # the high-water mark starts from here
        step, _ = torch_step(size, torch, transformers, peft, own_weights=True)
    else:
        before = resident.start()
        step, _ = graphlora_step(size, replay=side == "replay")
    for _ in range(3):
        step()
    print(json.dumps({"peak_bytes": resident.rise(before)}))


def _load_worker(directory: str) -> None:
    """In a process of its own: read a checkpoint into a float32 graph; print the time, the
    weights' size, NumPy's peak (tracemalloc) and the rise of resident memory."""
    import time
    import tracemalloc

    import resident  # benches/resident.py, beside this file

    before = resident.start()
    tracemalloc.start()
    start = time.perf_counter()
    g = gl.Graph(np.float32)
    model = gl.GPT.from_pretrained(g, directory)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    weights = sum(int(np.prod(leaf.shape)) * 4 for _, leaf in gl.nn.named_leaves(model))
    print(
        json.dumps(
            {
                "seconds": seconds,
                "weights": weights,
                "numpy_peak": peak,
                "rss_rise": resident.rise(before),
            }
        )
    )


def checkpoint_load(transformers: Any) -> dict[str, float] | None:
    """Write a GPT-2-small-sized (124M) checkpoint with transformers, and read it back."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(directory)
        done = subprocess.run(
            [sys.executable, __file__, "--load-worker", directory],
            capture_output=True,
            text=True,
            timeout=600,
        )
    if done.returncode != 0:
        return None
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def peak_memory(side: str, size_name: str) -> int | None:
    done = subprocess.run(
        [sys.executable, __file__, "--memory-worker", side, size_name],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        return None
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def section_f(
    rounds_of: Callable[..., dict[str, list[float]]], rounds: int, min_batch: float, quick: bool
) -> list[dict[str, Any]]:
    """Time (and memory) of one GPT LoRA step on each side, at each size: the median seconds of
    each over interleaved rounds, and, round by round, each graphlora side's time over PyTorch's
    faster setting's in the same round, whose spread shows how far the machine's noise moves
    one run's ratio of medians."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        print(
            "\n(f) GPT LoRA step: PyTorch, transformers and PEFT are not installed; graphlora only"
        )
        torch = transformers = peft = None
    default_threads = torch.get_num_threads() if torch is not None else 0
    rows = []
    for size_name in ["small"] if quick else list(SIZES):
        size = SIZES[size_name]
        makers: dict[str, Any] = {
            "graphlora": lambda s=size: graphlora_step(s, replay=False),
            "gl replay": lambda s=size: graphlora_step(s, replay=True),
        }
        if torch is not None:
            makers["torch"] = lambda s=size: torch_step(s, torch, transformers, peft)
        steps, readers = {}, {}
        for name, make in makers.items():
            steps[name], readers[name] = make()
        for step in steps.values():  # one step each from the same start: the same maths?
            step()
        reference = readers["graphlora"]()
        for name, read in readers.items():
            for got, want in zip(read(), reference, strict=True):
                assert np.allclose(got, want, rtol=1e-3, atol=1e-5), name
        timed = {"graphlora": steps["graphlora"], "gl replay": steps["gl replay"]}
        if torch is not None:
            torch_run = steps["torch"]

            def on(threads: int, run: Callable[[], None] = torch_run) -> Callable[[], None]:
                def call() -> None:
                    torch.set_num_threads(threads)
                    run()

                return call

            timed["torch 1 thread"] = on(1)
            timed[f"torch {default_threads} threads"] = on(default_threads)
        samples = rounds_of(timed, rounds=rounds, min_batch=min_batch)
        seconds = {name: statistics.median(times) for name, times in samples.items()}
        by_round: dict[str, list[float]] = {}
        if torch is not None:
            theirs = np.min([samples[k] for k in timed if k.startswith("torch")], axis=0)
            by_round = {
                name: (np.array(samples[name]) / theirs).tolist()
                for name in ("graphlora", "gl replay")
            }
            torch.set_num_threads(default_threads)
        memory = {
            side: peak_memory(side, size_name)
            for side in (
                ["graphlora", "replay"] + (["torch1", "torch"] if torch is not None else [])
            )
        }
        rows.append(
            {
                "size": size_name,
                "shape": size,
                "seconds": seconds,
                "ratio_by_round": by_round,
                "peak_bytes": memory,
            }
        )
    if transformers is not None and not quick:
        rows.append({"size": "gpt2-small checkpoint", "load": checkpoint_load(transformers)})
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    print(
        "\n(f) GPT LoRA step (rank 8 on c_attn, float32): ms per step; ratio to PyTorch's faster setting"
    )
    for row in rows:
        if "load" in row:
            load = row["load"]
            if load:
                print(
                    f"reading a GPT-2-small-sized checkpoint (124M, float32): {load['seconds']:.2f} s; "
                    f"NumPy's peak {load['numpy_peak'] / load['weights']:.2f}x the weights "
                    f"({load['weights'] / 2**20:.0f} MiB), resident memory up {load['rss_rise'] / 2**20:.0f} MiB "
                    "(the memory-mapped file's pages count there too)"
                )
            continue
        s = row["seconds"]
        torch_best = min((v for k, v in s.items() if k.startswith("torch")), default=None)
        shape = row["shape"]
        print(
            f"{row['size']} (B={shape['batch']}, T={shape['tokens']}, C={shape['n_embd']}, "
            f"{shape['n_layer']} layers, {shape['n_head']} heads, vocab {shape['vocab']}):"
        )
        for name, value in s.items():
            ratio = f"  {value / torch_best:.2f}x" if torch_best else ""
            rounds = row["ratio_by_round"].get(name)
            if rounds:  # the middle half of the rounds' own ratios
                low, high = np.percentile(rounds, [25, 75])
                ratio += f"  (rounds: {low:.2f}-{high:.2f}x)"
            print(f"  {name:18} {1e3 * value:8.2f} ms{ratio}")
        memory = {k: v for k, v in row["peak_bytes"].items() if v is not None}
        print(
            "  peak memory of model and step: "
            + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items())
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        _memory_worker(sys.argv[2], sys.argv[3])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--load-worker":
        _load_worker(sys.argv[2])
        sys.exit(0)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import rounds_of  # type: ignore[import-not-found]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, min_batch = (3, 0.002) if args.quick else (9, 0.05)
    report(section_f(rounds_of, rounds, min_batch, args.quick))
