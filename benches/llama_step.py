"""Section g of the benchmarks: a Llama LoRA step and greedy generation, graphlora against
transformers' ``LlamaForCausalLM`` with PEFT on PyTorch (CPU).

The step: forward, cross-entropy on the next tokens, backward, SGD on the LoRA parameters (rank 8
on ``q_proj`` and ``v_proj``, PEFT's Llama default), float32, from the same weights on both
sides (checked: after one step each, the LoRA parameters agree). graphlora records each step or
replays it (``Graph.compile``); PyTorch runs at one thread and at its default, and the ratio is
to its faster setting. Generation: 128 new tokens, greedy with a KV cache, after a 32-token
prompt, at SmolLM-135M's shape with random weights; tokens per second on each side (the same
tokens: checked). Peak memory: each side in a process of its own, the rise of the resident
high-water mark (``/proc/self/clear_refs``) over building the model and running (Linux only).

    python benches/llama_step.py            # every size, generation, memory
    python benches/llama_step.py --quick    # the small size, few rounds, no 135M shape
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import graphlora as gl
from graphlora.optim import SGD

SIZES = {
    "small": {
        "batch": 4,
        "tokens": 32,
        "hidden": 64,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 172,
        "vocab": 256,
    },
    "medium": {
        "batch": 8,
        "tokens": 128,
        "hidden": 256,
        "layers": 4,
        "heads": 8,
        "kv_heads": 4,
        "intermediate": 688,
        "vocab": 512,
    },
    "smollm-135m": {
        "batch": 1,
        "tokens": 128,
        "hidden": 576,
        "layers": 30,
        "heads": 9,
        "kv_heads": 3,
        "intermediate": 1536,
        "vocab": 49152,
    },
}
RANK, ALPHA, LR = 8, 16.0, 1e-3
PROMPT, NEW = 32, 128


def _config(size: dict[str, int]) -> gl.LlamaConfig:
    return gl.LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=max(size["tokens"], PROMPT + NEW),
        tie_word_embeddings=True,
    )


def _hf(size: dict[str, int], transformers: Any) -> Any:
    config = _config(size).to_json()
    config.pop("architectures")
    config.pop("model_type")
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()


def _data(size: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, size["vocab"], size=(size["batch"], size["tokens"] + 1))
    return ids[:, :-1], ids[:, 1:]


def graphlora_model(size: dict[str, int]) -> tuple[gl.Graph, gl.Llama]:
    g = gl.Graph(np.float32)
    return g, gl.Llama.new(g, _config(size), rng=0)


def graphlora_step(
    size: dict[str, int], replay: bool
) -> tuple[Callable[[], None], Callable[[], list[np.ndarray]], Any]:
    g, model = graphlora_model(size)
    adapters = gl.apply_lora(model, gl.LoraConfig(rank=RANK, alpha=ALPHA, seed=0))
    rng = np.random.default_rng(1)
    for layer in adapters.values():
        g.set_value(layer.lora_b, rng.normal(0, 0.02, size=(RANK, layer.out_features)))
    x, y = _data(size)
    tokens, targets = g.constant(x), g.constant(y.reshape(-1))
    opt = SGD(g, gl.nn.parameters(model), lr=LR)

    def loss() -> gl.NodeId:
        logits = model.forward(g, tokens, fused=True)
        return g.cross_entropy(g.reshape(logits, (-1, size["vocab"])), targets)

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
        return [np.array(g.value(n)) for a in adapters.values() for n in a.trainable_params()]

    return step, read, (g, model, adapters)


def torch_step(
    size: dict[str, int], torch: Any, transformers: Any, peft: Any, source: Any = None
) -> tuple[Callable[[], None], Callable[[], list[np.ndarray]]]:
    hf = _hf(size, transformers)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
    params = []
    if source is not None:
        g, model, adapters = source
        state = gl.nn.state_dict(g, model)
        hf.load_state_dict(
            {
                k: torch.from_numpy(np.ascontiguousarray(v.T if k.endswith("_proj.weight") else v))
                for k, v in state.items()
                if "lora_" not in k
            },
            strict=False,
        )
    lora = peft.get_peft_model(hf, config).train()
    named = dict(lora.named_parameters())
    if source is not None:
        for name, layer in adapters.items():
            a = named[f"base_model.model.{name}.lora_A.default.weight"]
            b = named[f"base_model.model.{name}.lora_B.default.weight"]
            with torch.no_grad():
                a.copy_(torch.from_numpy(np.array(g.value(layer.lora_a)).T))
                b.copy_(torch.from_numpy(np.array(g.value(layer.lora_b)).T))
            params += [a, b]
    else:
        params = [p for p in lora.parameters() if p.requires_grad]
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


def _worker(side: str, task: str, size_name: str) -> None:
    """In a process of its own: time (generation) and the rise of resident memory."""
    import resident  # benches/resident.py, beside this file

    size = SIZES[size_name]
    prompt = np.random.default_rng(0).integers(0, size["vocab"], size=(1, PROMPT))
    if side.startswith("torch"):
        import peft
        import torch
        import transformers

        torch.set_num_threads(1 if side == "torch1" else torch.get_num_threads())
        before = resident.start()
        if task == "step":
            run, _ = torch_step(size, torch, transformers, peft)
        else:
            model = _hf(size, transformers)

            def run() -> None:
                with torch.no_grad():
                    model.generate(
                        torch.from_numpy(prompt),
                        max_new_tokens=NEW,
                        min_new_tokens=NEW,
                        do_sample=False,
                    )

    else:
        before = resident.start()
        if task == "step":
            run, _, _ = graphlora_step(size, replay=side == "replay")
        else:
            g, model = graphlora_model(size)

            def run() -> None:
                model.generate(g, prompt, NEW)

    start = time.perf_counter()
    for _ in range(3 if task == "step" else 1):
        run()
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_bytes": resident.rise(before), "seconds": seconds}))


def _measure(side: str, task: str, size_name: str) -> dict[str, float] | None:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", side, task, size_name],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        return None
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def generation(torch: Any, transformers: Any) -> dict[str, Any]:
    """Tokens per second of greedy generation at SmolLM-135M's shape, the same weights on both
    sides (and the same tokens), in one process, alternating sides."""
    size = SIZES["smollm-135m"]
    g, ours = graphlora_model(size)
    hf = _hf(size, transformers)
    state = gl.nn.state_dict(g, ours)
    hf.load_state_dict(
        {
            k: torch.from_numpy(np.ascontiguousarray(v.T if k.endswith("_proj.weight") else v))
            for k, v in state.items()
        },
        strict=False,
    )
    prompt = np.random.default_rng(0).integers(0, size["vocab"], size=(1, PROMPT))
    default_threads = torch.get_num_threads()
    times: dict[str, list[float]] = {"graphlora": [], "torch 1 thread": [], "torch default": []}
    outputs = {}
    for _ in range(2):
        start = time.perf_counter()
        outputs["graphlora"] = ours.generate(g, prompt, NEW)
        times["graphlora"].append(time.perf_counter() - start)
        for name, threads in (("torch 1 thread", 1), ("torch default", default_threads)):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            with torch.no_grad():
                found = hf.generate(
                    torch.from_numpy(prompt),
                    max_new_tokens=NEW,
                    min_new_tokens=NEW,
                    do_sample=False,
                )
            times[name].append(time.perf_counter() - start)
            outputs[name] = found.numpy()
    torch.set_num_threads(default_threads)
    same = float(np.mean(outputs["graphlora"] == outputs["torch default"]))
    return {
        "tokens_per_second": {k: NEW / min(v) for k, v in times.items()},
        "same_tokens": same,
        "peak_bytes": {
            side: (
                found["peak_bytes"]
                if (found := _measure(side, "generate", "smollm-135m"))
                else None
            )
            for side in ("graphlora", "torch")
        },
    }


def section_g(
    rounds_of: Callable[..., dict[str, list[float]]], rounds: int, min_batch: float, quick: bool
) -> list[dict[str, Any]]:
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        print("\n(g) Llama LoRA step: PyTorch, transformers and PEFT are not installed; skipped")
        return []
    default_threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    for size_name in ["small"] if quick else list(SIZES):
        size = SIZES[size_name]
        steps, readers = {}, {}
        steps["graphlora"], readers["graphlora"], source = graphlora_step(size, replay=False)
        steps["gl replay"], readers["gl replay"], _ = graphlora_step(size, replay=True)
        steps["torch"], readers["torch"] = torch_step(size, torch, transformers, peft, source)
        for step in steps.values():
            step()
        reference = readers["graphlora"]()
        for name, read in readers.items():
            for got, want in zip(read(), reference, strict=True):
                assert np.allclose(got, want, rtol=1e-3, atol=1e-5), name
        run = steps.pop("torch")

        def on(threads: int, run: Callable[[], None] = run) -> Callable[[], None]:
            def call() -> None:
                torch.set_num_threads(threads)
                run()

            return call

        steps["torch 1 thread"] = on(1)
        steps[f"torch {default_threads} threads"] = on(default_threads)
        big = size_name == "smollm-135m"
        samples = rounds_of(steps, rounds=3 if big else rounds, min_batch=min_batch)
        torch.set_num_threads(default_threads)
        seconds = {name: statistics.median(times) for name, times in samples.items()}
        memory = (
            {}
            if big
            else {
                side: (
                    found["peak_bytes"] if (found := _measure(side, "step", size_name)) else None
                )
                for side in ("graphlora", "replay", "torch1", "torch")
            }
        )
        rows.append({"size": size_name, "shape": size, "seconds": seconds, "peak_bytes": memory})
    if not quick:
        rows.append({"size": "generation", **generation(torch, transformers)})
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    print(
        "\n(g) Llama LoRA step (rank 8 on q_proj, v_proj, float32): ms per step; ratio to "
        "PyTorch's faster setting"
    )
    for row in rows:
        if row["size"] == "generation":
            tps = row["tokens_per_second"]
            best = max(v for k, v in tps.items() if k.startswith("torch"))
            print(
                f"generation at SmolLM-135M's shape ({PROMPT}-token prompt, {NEW} new, greedy): "
                + ", ".join(f"{k} {v:.1f} tokens/s" for k, v in tps.items())
                + f"; graphlora {tps['graphlora'] / best:.2f}x PyTorch's best; "
                f"same tokens {100 * row['same_tokens']:.0f}%"
            )
            memory = {k: v for k, v in row["peak_bytes"].items() if v is not None}
            print(
                "  peak memory of model and generation: "
                + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in memory.items())
            )
            continue
        s = row["seconds"]
        best = min(v for k, v in s.items() if k.startswith("torch"))
        print(f"{row['size']} {row['shape']}:")
        for name, value in s.items():
            print(f"  {name:18} {1e3 * value:9.2f} ms  {value / best:.2f}x")
        memory = {k: v for k, v in row["peak_bytes"].items() if v is not None}
        if memory:
            print(
                "  peak memory of model and 3 steps: "
                + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items())
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
    rounds, min_batch = (3, 0.002) if args.quick else (7, 0.05)
    report(section_g(rounds_of, rounds, min_batch, args.quick))
