"""graphlora's benchmarks: every comparison side by side, in one run.

    python benches/run.py                 # everything; prints tables, writes benches/results/latest.json
    python benches/run.py --quick         # small sizes and few repeats (a smoke run)
    python benches/run.py --sections a,c  # some sections only

Shared, noisy machines make absolute times meaningless from one run to the next, so every figure
is a ratio against hand-written NumPy doing the same maths, measured in the same run with the
implementations interleaved round by round (medians of the rounds). Sections:

  a  a LoRA training step (forward, MSE, backward, SGD on A and B) at four sizes, float32 and
     float64: graphlora recording every step op by op and fused, and replaying a step recorded
     once (Graph.compile); PyTorch eager (one thread) and HIPS autograd where installed
  b  per-op recording overhead on tiny arrays, against the bare NumPy call
  c  tape scaling: backward time per node for chains of 1e3, 1e4 and 1e5 ops
  d  peak memory of a training step (tracemalloc) against hand-written NumPy
  e  an MLP with LoRA on every layer, one training step
  f  a GPT LoRA fine-tuning step against transformers + PEFT on PyTorch (benches/gpt_step.py),
     where those are installed, at two sizes; and each side's peak memory
  g  a Llama LoRA step and greedy generation against transformers + PEFT (benches/llama_step.py)
  h  QLoRA: a LoRA step over a float32 and over an NF4 base, peak memory and step time, each
     case in a process of its own (benches/qlora_step.py); the ratios are NF4 to float32
  l  the GPT step of f quiet and with one busy process per allowed core (benches/load_step.py),
     under graphlora's BLAS thread policy, all cores and one thread: loaded / quiet
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import graphlora as gl
from graphlora.optim import SGD

LR = 1e-3
SIZES = [(8, 16, 16, 2), (32, 64, 64, 4), (64, 512, 512, 8), (256, 2048, 2048, 16)]
QUICK_SIZES = [(8, 16, 16, 2), (32, 64, 64, 4)]


# --- timing ---------------------------------------------------------------------------------------


def rounds_of(
    fns: dict[str, Callable[[], object]], *, rounds: int, min_batch: float
) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``rounds`` interleaved rounds (each function
    called often enough per round to take ``min_batch`` seconds)."""
    counts = {}
    for name, fn in fns.items():
        fn()  # warm up
        n, elapsed = 1, 0.0
        while True:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            elapsed = time.perf_counter() - start
            if elapsed >= min_batch or n >= 1 << 20:
                break
            n *= 2 if elapsed < min_batch / 4 else 1
            n = max(n, int(n * min_batch / max(elapsed, 1e-9)))
        counts[name] = n
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = counts[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return samples


def compare(
    fns: dict[str, Callable[[], object]], *, rounds: int, min_batch: float
) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds."""
    samples = rounds_of(fns, rounds=rounds, min_batch=min_batch)
    return {name: statistics.median(times) for name, times in samples.items()}


# --- (a) a LoRA training step -------------------------------------------------------------------


def training_step(
    g: gl.Graph, opt: SGD, loss: Callable[[], gl.NodeId], replay: bool
) -> Callable[[], None]:
    """One SGD step on ``g``: ``loss()`` recorded on each call and dropped after, or recorded
    once here and replayed (``Graph.compile``) on each call."""
    if replay:
        run = g.compile(loss())

        def replayed() -> None:
            run()
            opt.step()
            opt.zero_grad()

        return replayed

    def recorded() -> None:
        g.backward(loss())
        opt.step()
        opt.zero_grad()
        g.reset()

    return recorded


class LoraProblem:
    """One LoRA layer's data and weights, and a training step in each implementation."""

    def __init__(
        self, batch: int, n_in: int, n_out: int, rank: int, dtype: Any, seed: int = 0
    ) -> None:
        rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.scaling = 2.0
        self.w = (rng.standard_normal((n_in, n_out)) / math.sqrt(n_in)).astype(dtype)
        self.a0 = (rng.standard_normal((n_in, rank)) * 0.01).astype(dtype)
        self.b0 = (rng.standard_normal((rank, n_out)) * 0.01).astype(dtype)
        self.x = rng.standard_normal((batch, n_in)).astype(dtype)
        self.t = rng.standard_normal((batch, n_out)).astype(dtype)

    def numpy_step(
        self, tuned: bool = False
    ) -> tuple[Callable[[], None], Callable[[], tuple[np.ndarray, np.ndarray]]]:
        """The step as one would write it; ``tuned`` computes the loss as a dot product, as
        graphlora's ``mse_loss`` does, instead of ``np.mean`` (about 2.5 us less a call)."""
        a, b = self.a0.copy(), self.b0.copy()
        x, w, t, s = self.x, self.w, self.t, self.dtype.type(self.scaling)
        lr = self.dtype.type(LR)

        def step() -> None:
            hs = (x @ a) * s  # (batch, rank)
            y = x @ w + hs @ b  # (batch, out)
            diff = y - t
            if tuned:
                flat = diff.ravel()
                loss = np.dot(flat, flat) / flat.size
            else:
                loss = np.mean(diff * diff)
            del loss
            g_y = diff * self.dtype.type(2.0 / diff.size)
            grad_b = hs.T @ g_y  # dL/dB = (x A s)ᵀ g
            grad_a = x.T @ ((g_y @ b.T) * s)  # dL/dA = xᵀ (g Bᵀ) s
            a[...] -= lr * grad_a  # in place, as the optimizers do
            b[...] -= lr * grad_b

        return step, lambda: (a, b)

    def graphlora_step(
        self, fused: bool = False, replay: bool = False
    ) -> tuple[Callable[[], None], Callable[[], tuple[np.ndarray, np.ndarray]]]:
        g = gl.Graph(self.dtype)
        config = gl.LoraConfig(rank=self.a0.shape[1], alpha=self.scaling * self.a0.shape[1])
        layer = gl.LoraLinear.from_linear(g, self.w, None, config)
        g.set_value(layer.lora_a, self.a0)
        g.set_value(layer.lora_b, self.b0)
        x, t = g.constant(self.x), g.constant(self.t)
        opt = SGD(g, layer.trainable_params(), lr=LR)
        step = training_step(
            g, opt, lambda: g.mse_loss(layer.forward(g, x, fused=fused), t), replay
        )
        read = lambda: (np.array(g.value(layer.lora_a)), np.array(g.value(layer.lora_b)))  # noqa: E731
        return step, read

    def torch_step(
        self, torch: Any
    ) -> tuple[Callable[[], None], Callable[[], tuple[np.ndarray, np.ndarray]]]:
        tensor = lambda v: torch.from_numpy(v.copy())  # noqa: E731
        w, x, t = tensor(self.w), tensor(self.x), tensor(self.t)
        a, b = tensor(self.a0).requires_grad_(), tensor(self.b0).requires_grad_()
        s = self.scaling

        def step() -> None:
            y = x @ w + ((x @ a) * s) @ b
            loss = ((y - t) ** 2).mean()
            loss.backward()
            with torch.no_grad():
                a.sub_(LR * a.grad)
                b.sub_(LR * b.grad)
            a.grad = None
            b.grad = None

        return step, lambda: (a.detach().numpy().copy(), b.detach().numpy().copy())

    def autograd_step(
        self, autograd: Any
    ) -> tuple[Callable[[], None], Callable[[], tuple[np.ndarray, np.ndarray]]]:
        anp = autograd.numpy
        x, w, t, s = self.x, self.w, self.t, self.scaling
        state = {"a": self.a0.copy(), "b": self.b0.copy()}

        def loss(a: Any, b: Any) -> Any:
            y = anp.dot(x, w) + anp.dot(anp.dot(x, a) * s, b)
            return anp.mean((y - t) ** 2)

        gradient = autograd.grad(loss, argnum=(0, 1))

        def step() -> None:
            grad_a, grad_b = gradient(state["a"], state["b"])
            state["a"] = state["a"] - LR * grad_a
            state["b"] = state["b"] - LR * grad_b

        return step, lambda: (state["a"], state["b"])


def _optional(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        return None


def section_a(
    sizes: list[tuple[int, int, int, int]], rounds: int, min_batch: float
) -> list[dict[str, Any]]:
    torch, autograd = _optional("torch"), _optional("autograd")
    default_threads = torch.get_num_threads() if torch is not None else 0
    if torch is not None:
        # PyTorch's own thread pool keeps spinning between ops and fights NumPy's BLAS threads
        # in the interleaved rounds; with one thread it is fastest here (about 2x against 6x
        # hand-written NumPy at (64, 512, 512, 8), and no slower at the largest size).
        torch.set_num_threads(1)
    if autograd is not None:
        import autograd.numpy
    rows = []
    for dtype in (np.float32, np.float64):
        for size in sizes:
            problem = LoraProblem(*size, dtype=dtype)
            makers: dict[str, Any] = {
                "numpy": problem.numpy_step,
                "numpy tuned": lambda p=problem: p.numpy_step(tuned=True),
                "graphlora": problem.graphlora_step,
                "gl fused": lambda p=problem: p.graphlora_step(fused=True),
                "gl replay": lambda p=problem: p.graphlora_step(replay=True),
                "fused replay": lambda p=problem: p.graphlora_step(fused=True, replay=True),
            }
            if torch is not None:
                makers["torch"] = lambda p=problem: p.torch_step(torch)
            if autograd is not None:
                makers["autograd"] = lambda p=problem: p.autograd_step(autograd)
            steps, results = {}, {}
            for name, make in makers.items():
                steps[name], results[name] = make()
            for fn in steps.values():  # one step each from the same start: the same maths?
                fn()
            a_ref, b_ref = results["numpy"]()
            tolerance = 1e-4 if dtype == np.float32 else 1e-10
            for name, read in results.items():
                a_got, b_got = read()
                assert np.allclose(a_got, a_ref, rtol=tolerance, atol=tolerance), name
                assert np.allclose(b_got, b_ref, rtol=tolerance, atol=tolerance), name
            times = compare(steps, rounds=rounds, min_batch=min_batch)
            rows.append(
                {
                    "size": list(size),
                    "dtype": np.dtype(dtype).name,
                    "seconds": times,
                    "ratio": {k: v / times["numpy"] for k, v in times.items()},
                }
            )
    if torch is not None:  # section f times PyTorch at its default too
        torch.set_num_threads(default_threads)
    return rows


# --- (b) per-op overhead --------------------------------------------------------------------------


def section_b(rounds: int, min_batch: float) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    a_np, b_np = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    g = gl.Graph()
    a, b = g.parameter(a_np), g.parameter(b_np)
    ops: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "add": (lambda: g.add(a, b), lambda: a_np + b_np),
        "mul": (lambda: g.mul(a, b), lambda: a_np * b_np),
        "matmul": (lambda: g.matmul(a, b), lambda: a_np @ b_np),
        "tanh": (lambda: g.tanh(a), lambda: np.tanh(a_np)),
        "sum": (lambda: g.sum(a), lambda: np.sum(a_np)),
        "relu": (lambda: g.relu(a), lambda: np.maximum(a_np, 0)),
    }
    rows = []
    batch = 1000  # ops recorded between two resets
    for name, (ours, bare) in ops.items():

        def record(op: Callable[[], object] = ours) -> None:
            for _ in range(batch):
                op()
            g.reset()

        def numpy_batch(op: Callable[[], object] = bare) -> None:
            for _ in range(batch):
                op()

        times = compare(
            {"graphlora": record, "numpy": numpy_batch}, rounds=rounds, min_batch=min_batch
        )
        per_op = {k: v / batch for k, v in times.items()}
        rows.append(
            {
                "op": name,
                "seconds": per_op,
                "ratio": per_op["graphlora"] / per_op["numpy"],
                "overhead_us": 1e6 * (per_op["graphlora"] - per_op["numpy"]),
            }
        )
    return rows


# --- (c) tape scaling -------------------------------------------------------------------------------


def section_c(lengths: list[int], rounds: int, min_batch: float) -> list[dict[str, Any]]:
    rows = []
    for n in lengths:
        g = gl.Graph()
        x = g.parameter(np.ones(4))
        y = x
        for _ in range(n):
            y = g.scale(y, 1.0)
        loss = g.sum(y)
        times = compare(
            {"backward": lambda loss=loss, g=g: g.backward(loss)},
            rounds=rounds,
            min_batch=min_batch,
        )
        rows.append(
            {
                "nodes": n + 1,
                "seconds": times["backward"],
                "per_node_us": 1e6 * times["backward"] / (n + 1),
            }
        )
    return rows


# --- (d) peak memory ------------------------------------------------------------------------------


def _peak(step: Callable[[], None]) -> int:
    step()  # warm up: caches, lazily made buffers
    gc.collect()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - base


def section_d(sizes: list[tuple[int, int, int, int]]) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        problem = LoraProblem(*size, dtype=np.float64)
        numpy_step, _ = problem.numpy_step()
        graph_step, _ = problem.graphlora_step()
        peaks = {
            "numpy": _peak(numpy_step),
            "graphlora": _peak(graph_step),
            "gl fused": _peak(problem.graphlora_step(fused=True)[0]),
            "gl replay": _peak(problem.graphlora_step(replay=True)[0]),
            "fused replay": _peak(problem.graphlora_step(fused=True, replay=True)[0]),
        }
        ratios = {k: v / peaks["numpy"] for k, v in peaks.items()}
        rows.append({"size": list(size), "peak_bytes": peaks, "ratio": ratios})
    return rows


# --- (e) an MLP with LoRA on every layer ----------------------------------------------------------


def section_e(rounds: int, min_batch: float, quick: bool) -> dict[str, Any]:
    sizes, batch, rank = ([32, 32, 10], 16, 2) if quick else ([256, 256, 256, 10], 64, 8)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, sizes[0]))
    labels = rng.integers(0, sizes[-1], size=batch)
    b_init = [0.01 * rng.standard_normal((rank, n)) for n in sizes[1:]]

    def build() -> tuple[gl.Graph, gl.MLP, dict[str, gl.LoraLinear], gl.NodeId, SGD]:
        """The same model, adapters and data on a graph of its own (same seeds every time)."""
        g = gl.Graph()
        model = gl.MLP(g, sizes, activation="relu", rng=1)
        adapters = gl.apply_lora(model, gl.LoraConfig(rank=rank, alpha=2.0 * rank, seed=0))
        for layer, b in zip(adapters.values(), b_init, strict=True):
            g.set_value(layer.lora_b, b)
        return g, model, adapters, g.constant(x_np), SGD(g, model.parameters(), lr=LR)

    def variant(fused: bool, replay: bool) -> tuple[Callable[[], None], Callable[[], list[Any]]]:
        """One training step recorded each time, or recorded once and replayed; and a reader."""
        g, model, adapters, x, opt = build()
        loss = lambda: g.cross_entropy(model.forward(g, x, fused=fused), labels)  # noqa: E731
        params = [p for layer in adapters.values() for p in layer.trainable_params()]
        return training_step(g, opt, loss, replay), lambda: [g.value(p) for p in params]

    g, _, adapters, _, _ = build()
    layers = list(adapters.values())
    ws = [np.array(g.value(layer.frozen_weight)) for layer in layers]
    bs = [np.array(g.value(layer.bias)) for layer in layers]  # type: ignore[arg-type]
    a_s = [np.array(g.value(layer.lora_a)) for layer in layers]
    b_s = [np.array(g.value(layer.lora_b)) for layer in layers]
    s = layers[0].scaling
    rows = np.arange(batch)

    def numpy_step() -> None:
        hs, acts, pre = [], [x_np], []
        h = x_np
        for i in range(len(ws)):
            low = (h @ a_s[i]) * s
            z = h @ ws[i] + low @ b_s[i] + bs[i]
            hs.append(low)
            pre.append(z)
            h = np.maximum(z, 0) if i < len(ws) - 1 else z
            acts.append(h)
        shifted = h - h.max(axis=1, keepdims=True)
        p = np.exp(shifted)
        p /= p.sum(axis=1, keepdims=True)
        grad = p
        grad[rows, labels] -= 1
        grad /= batch
        for i in reversed(range(len(ws))):
            if i < len(ws) - 1:
                grad = grad * (pre[i] > 0)
            grad_b = hs[i].T @ grad
            g_low = (grad @ b_s[i].T) * s
            grad_a = acts[i].T @ g_low
            if i > 0:
                grad = grad @ ws[i].T + g_low @ a_s[i].T
            a_s[i] -= LR * grad_a
            b_s[i] -= LR * grad_b

    variants = {
        "graphlora": variant(fused=False, replay=False),
        "gl fused": variant(fused=True, replay=False),
        "gl replay": variant(fused=False, replay=True),
        "fused replay": variant(fused=True, replay=True),
    }
    numpy_step()  # one step each from the same start: the same maths?
    want = [p for pair in zip(a_s, b_s, strict=True) for p in pair]
    for name, (step, read) in variants.items():
        step()
        for got, expected in zip(read(), want, strict=True):
            assert np.allclose(got, expected, rtol=1e-10, atol=1e-12), name
    fns = {"numpy": numpy_step, **{name: step for name, (step, _) in variants.items()}}
    times = compare(fns, rounds=rounds, min_batch=min_batch)
    return {
        "sizes": sizes,
        "batch": batch,
        "rank": rank,
        "seconds": times,
        "ratio": {k: v / times["numpy"] for k, v in times.items()},
    }


# --- report ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--sections", default="a,b,c,d,e,f,g,h,l")
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "latest.json")
    )
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    rounds, min_batch = (3, 0.002) if args.quick else (9, 0.02)
    sizes = QUICK_SIZES if args.quick else SIZES
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpu": platform.processor() or platform.machine(),
            "allowed_cores": gl.blas.allowed_cores(),
        },
        "graphlora": gl.__version__,
    }
    # b and c first: they time tiny ops, which are the most sensitive to whatever the heavier
    # sections (and an imported PyTorch) leave for the garbage collector to walk.
    if "b" in sections:
        report["b_op_overhead"] = rows = section_b(rounds, min_batch)
        print("\n(b) per-op recording overhead on (4, 4) arrays")
        print(f"{'op':8} {'numpy us':>9} {'graphlora us':>13} {'overhead us':>12} {'ratio':>7}")
        for row in rows:
            print(
                f"{row['op']:8} {1e6 * row['seconds']['numpy']:9.2f} {1e6 * row['seconds']['graphlora']:13.2f} {row['overhead_us']:12.2f} {row['ratio']:6.1f}x"
            )
    if "c" in sections:
        lengths = [1000, 10000] if args.quick else [1000, 10000, 100000]
        report["c_tape_scaling"] = rows = section_c(lengths, max(3, rounds // 2), min_batch)
        print("\n(c) backward time per node, chains of scale ops")
        for row in rows:
            print(f"{row['nodes']:>8} nodes: {row['per_node_us']:.3f} us/node")
        print(
            f"flatness: {max(r['per_node_us'] for r in rows) / min(r['per_node_us'] for r in rows):.2f}x between the cheapest and dearest"
        )
    if "a" in sections:
        # More rounds for the step: at the large sizes BLAS threads make single rounds noisy.
        report["a_lora_step"] = rows = section_a(sizes, rounds * 5 // 3, min_batch)
        others = [k for k in rows[0]["ratio"] if k != "numpy"]
        print("(a) LoRA training step: time / hand-written NumPy (median of interleaved rounds)")
        print(
            f"{'dtype':8} {'batch, in, out, rank':22} {'numpy us':>10} "
            + " ".join(f"{k:>10}" for k in others)
        )
        for row in rows:
            size = ", ".join(map(str, row["size"]))
            print(
                f"{row['dtype']:8} {size:22} {1e6 * row['seconds']['numpy']:10.1f} "
                + " ".join(f"{row['ratio'][k]:9.2f}x" for k in others)
            )
    if "d" in sections:
        report["d_peak_memory"] = rows = section_d(sizes)
        print("\n(d) peak memory of one float64 training step (tracemalloc), / hand-written NumPy")
        others = [k for k in rows[0]["ratio"] if k != "numpy"]
        print(
            f"{'batch, in, out, rank':22} {'numpy KiB':>10} " + " ".join(f"{k:>12}" for k in others)
        )
        for row in rows:
            size = ", ".join(map(str, row["size"]))
            print(
                f"{size:22} {row['peak_bytes']['numpy'] / 1024:10.1f} "
                + " ".join(f"{row['ratio'][k]:11.2f}x" for k in others)
            )
    if "e" in sections:
        report["e_mlp_step"] = row = section_e(rounds, min_batch, args.quick)
        print(
            f"\n(e) MLP {row['sizes']} with LoRA rank {row['rank']} on every layer, batch {row['batch']}, one step"
        )
        print(
            f"numpy {1e6 * row['seconds']['numpy']:.1f} us; "
            + ", ".join(f"{k} {v:.2f}x" for k, v in row["ratio"].items() if k != "numpy")
        )
    if "f" in sections:
        import gpt_step

        report["f_gpt_step"] = rows = gpt_step.section_f(
            rounds_of, rounds, min_batch * 2, args.quick
        )
        gpt_step.report(rows)
    if "g" in sections:
        import llama_step

        report["g_llama_step"] = rows = llama_step.section_g(
            rounds_of, rounds, min_batch * 2, args.quick
        )
        llama_step.report(rows)
    if "h" in sections:
        import qlora_step

        report["h_qlora_step"] = rows = qlora_step.section_h(rounds_of, rounds, args.quick)
        qlora_step.report(rows)
    if "l" in sections:
        import load_step

        report["l_load"] = rows = load_step.section_l(
            max(3, rounds // 2), min_batch * 5, args.quick
        )
        load_step.report(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
