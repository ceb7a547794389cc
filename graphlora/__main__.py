"""The ``python -m graphlora`` command line (also installed as the ``graphlora`` script).

``demo`` (the default) shows LoRA recovering a planted low-rank update, or adapting a digits
classifier with ``--task digits``; ``inspect DIR`` prints an adapter directory's config and
tensors; ``generate DIR --prompt TEXT`` continues a prompt with a checkpoint folder's model;
``explain`` walks one tiny LoRA layer through forward and backward formula by formula;
``example`` builds a tiny graph and prints every node's value and gradient next to the
same gradients worked out by hand; ``check FILE`` grades an exercise from ``docs/exercises/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import graphlora as gl
from graphlora import _checks
from graphlora.io import apply_adapter, read_adapter
from graphlora.lora.functional import scaled_delta
from graphlora.nn.checkpoint import safetensors_module
from graphlora.teach import demo, demo_gpt
from graphlora.teach.explain import explain
from graphlora.teach.grading import DEFAULT_TIMEOUT, check_file

__all__ = ["main"]


def _example() -> int:
    """A linear layer ``y = x @ w + b`` with a mean squared error against a target."""
    with np.printoptions(precision=4, suppress=True):  # for this printout only
        _print_example()
    return 0


def _print_example() -> None:
    g = gl.Graph()
    x = g.constant([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], name="x")  # (batch 2, in 3)
    w = g.parameter([[0.1, -0.2], [0.3, 0.0], [-0.1, 0.2]], name="w")  # (in 3, out 2)
    b = g.parameter([0.5, -0.5], name="b")  # (out 2,)
    target = g.constant([[1.0, 0.0], [0.0, 1.0]], name="target")
    y = g.add(g.matmul(x, w), b)  # (2, 2): b is broadcast over the batch
    loss = g.mse_loss(y, target)
    g.backward(loss, retain_grads=True)  # keep every node's gradient, to print it

    print("graphlora: a worked example of y = x @ w + b, loss = mean((y - target)**2)\n")
    print(g)
    for node in (*g.leaves, *g.tape):
        print(f"\n{node!r}\nvalue:\n{g.value(node)}")
        grad = g.grad(node)
        if grad is not None:
            print(f"grad:\n{grad}")

    # The same gradients by hand: dL/dy = 2 (y - t) / n, dL/dw = x.T @ dL/dy, dL/db = sum(dL/dy).
    dy = 2 * (g.value(y) - g.value(target)) / g.value(y).size
    by_hand_w, by_hand_b = g.value(x).T @ dy, dy.sum(axis=0)
    engine_w, engine_b = g.grad(w), g.grad(b)
    assert engine_w is not None and engine_b is not None
    print("\nBy hand: dL/dy = 2 (y - target) / 4, dL/dw = x.T @ dL/dy, dL/db = dL/dy summed")
    print(f"dL/dw by hand:\n{by_hand_w}")
    print(f"dL/db by hand:\n{by_hand_b}")
    difference = max(np.abs(by_hand_w - engine_w).max(), np.abs(by_hand_b - engine_b).max())
    print(f"largest difference from the engine: {difference:.1e}")


def _ranks(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` for ``--rank-sweep``."""
    try:
        ranks = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints such as 1,2,4,8, got {text!r}"
        ) from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be >= 1, got {text!r}")
    return ranks


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` that must be > 0."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _seed(text: str) -> int:
    """An argparse type: a seed, an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


_TASK_OPTIONS = {  # the demo options each task reads; the others are refused, not ignored
    "lowrank": {
        "rank",
        "rank_sweep",
        "planted_rank",
        "in_features",
        "out_features",
        "samples",
        "noise",
        "steps",
        "lr",
        "alpha",
        "rslora",
        "init",
        "seed",
        "plot",
        "progress",
        "save_adapter",
        "overwrite",
    },
    "digits": {"rank", "steps", "lr", "seed", "plot", "progress"},
    "gpt": {"rank", "steps", "lora_steps", "quick", "seed", "plot", "progress"},
}


def _demo_low_rank(args: argparse.Namespace) -> int:
    task = demo.plant_low_rank_task(
        args.in_features, args.out_features, args.planted_rank, args.samples, args.noise, args.seed
    )
    ranks = args.rank_sweep or [args.rank]
    too_big = [r for r in ranks if r > min(args.in_features, args.out_features)]
    if too_big:
        raise ValueError(
            f"rank {too_big[0]} exceeds min(in, out) = {min(args.in_features, args.out_features)}"
        )
    planted = ", ".join(f"{s:g}" for s in task.singular_values)
    weight = args.in_features * args.out_features
    print("graphlora demo: LoRA recovers a planted low-rank update")
    print(
        f"  frozen base W0: {args.in_features} -> {args.out_features}; planted update dW*: rank "
        f"{args.planted_rank} (singular values {planted}); {args.samples} samples, "
        f"noise {args.noise:g}"
    )
    print(f"  training A, B only: Adam, lr {args.lr:g}, {args.steps} full-batch steps")
    alpha = "the rank" if args.alpha is None else f"{args.alpha:g}"
    scaling = "alpha / sqrt(r)" if args.rslora else "alpha / r"
    print(f"  LoRA: init {args.init}, alpha {alpha}, scaling {scaling}")
    for r in ranks:
        note = _saving(r * (args.in_features + args.out_features), weight)
        if note:
            print(
                f"  rank {r}: {r * (args.in_features + args.out_features):,} trainable against "
                f"W0's {weight:,}{note}"
            )
    print()
    results = [
        demo.run_low_rank(
            task,
            r,
            args.steps,
            args.lr,
            args.seed,
            args.progress,
            alpha=args.alpha,
            use_rslora=args.rslora,
            init=args.init,
        )
        for r in ranks
    ]
    update = "W_res + A B s - W0" if args.init == "pissa" else "A B s"
    if len(results) > 1:
        header = "rank  trainable  final loss  best-fit loss  relative error  best-fit error"
        print(f"{header}  least error")
        for r in results:
            mark = "   <- the planted rank" if r.rank == args.planted_rank else ""
            row = (
                f"{r.rank:4d}  {r.trainable:9,d}  {r.final_loss:10.2e}  {r.least_loss:13.2e}  "
                f"{r.relative_error:14.4f}"
            )
            print(f"{row}  {r.noisy_best_error:14.4f}  {r.best_error:11.4f}{mark}")
        print(
            f"\nrelative error: ||{update} - dW*||_F / ||dW*||_F. 'best fit': the update of "
            "that rank with the least training loss on these noisy samples (reduced-rank "
            "regression); no training ends below its loss, and a fully trained adapter ends at "
            "its error (an earlier stop can land nearer dW*, fitting less noise). 'least "
            "error': the least of any update of that rank, knowing dW* exactly (Eckart-Young): "
            f"above 0 below the planted rank, whatever the training. Noise floor (noise²): "
            f"{args.noise**2:.2e}."
        )
    else:
        r = results[0]
        print(
            f"trainable parameters: {r.trainable:,} of {r.total:,} "
            f"({100 * r.trainable / r.total:.2f}%): A [{args.in_features}, {r.rank}] and "
            f"B [{r.rank}, {args.out_features}]"
        )
        print(
            f"final loss (MSE): {r.final_loss:.4e}   (noise² = {args.noise**2:.1e}: a fit to "
            f"{args.samples} samples also fits part of their noise, so it can end below)"
        )
        print(f"relative error ||{update} - dW*||_F / ||dW*||_F: {r.relative_error:.4f}")
        print(
            f"the best fit of any rank-{r.rank} adapter to these {args.samples} noisy samples "
            f"(reduced-rank regression): loss {r.least_loss:.4e}, error {r.noisy_best_error:.4f}"
        )
        print(
            f"the least error of any rank-{r.rank} adapter, knowing dW* exactly (Eckart-Young): "
            f"{r.best_error:.4f}"
        )
        print(f"singular values  planted  learned ({update})")
        count = max(len(r.planted_singular_values), len(r.learned_singular_values))
        for i in range(count):
            p = r.planted_singular_values[i] if i < len(r.planted_singular_values) else 0.0
            q = r.learned_singular_values[i] if i < len(r.learned_singular_values) else 0.0
            print(f"  {i + 1:>14d}  {p:7.3f}  {q:7.3f}")
        print(f"max |merged - unmerged| output difference: {r.merge_max_difference:.1e}")
    if args.plot:
        demo.plot_results(args.plot, results, args.planted_rank, args.noise)
        print(f"\nwrote {args.plot}")
    if args.save_adapter:
        r = results[0]
        gl.save_adapter(args.save_adapter, r.graph, {"proj": r.layer}, overwrite=args.overwrite)
        print(f"\nsaved the adapter (module 'proj', PEFT layout) to {args.save_adapter}")
    return 0


def _demo_digits(args: argparse.Namespace) -> int:
    result = demo.run_digits(
        rank=args.rank, steps=args.steps, lr=args.lr, seed=args.seed, show_progress=args.progress
    )
    print("graphlora demo: adapting a digits classifier with LoRA (scikit-learn's digits)")
    print(f"  an MLP 64 -> 32 -> 5 trained on digits 0-4, then LoRA rank {args.rank} on 5-9\n")
    print("accuracy on held-out images (a fixed fifth of each digit set, never trained on):")
    print(f"  digits 0-4 (its own task):       {result.base_accuracy:.3f}")
    print(f"  digits 5-9 before adaptation:    {result.before_accuracy:.3f}")
    print(f"  digits 5-9 with the adapters:    {result.after_accuracy:.3f}")
    print(f"  digits 0-4 with adapters off:    {result.base_after_accuracy:.3f}")
    print(
        f"trainable parameters: {result.trainable:,} of {result.total:,} "
        f"({100 * result.trainable / result.total:.2f}%)"
    )
    for name, n_in, n_out, count in result.layers:
        note = _saving(count, n_in * n_out)
        print(f"  {name}: {n_in} -> {n_out}, adapter {count:,} against {n_in * n_out:,}{note}")
    if args.plot:
        demo.plot_digits(args.plot, result)
        print(f"\nwrote {args.plot}")
    return 0


def _saving(adapter: int, weight: int) -> str:
    """What a layer's adapter saves against training its weight: nothing, or little, said."""
    if adapter >= weight:
        return ": as many as the weight itself or more, no saving"
    if 2 * adapter > weight:
        return ": over half the weight, little saving on a layer this narrow"
    return ""


def _demo_gpt(args: argparse.Namespace) -> int:
    steps = (600 if args.quick else 3000) if args.steps is None else args.steps
    lora_steps = (200 if args.quick else 1000) if args.lora_steps is None else args.lora_steps
    rank = 8 if args.rank is None else args.rank
    print("graphlora demo: a character-level GPT, pretrained on prose, LoRA-adapted to code")
    print(
        "  prose: Python's help pages (pydoc_data.topics); code: the source of "
        f"{', '.join(demo_gpt.CODE_MODULES)}"
    )
    print(
        f"  GPT-2 architecture, 2 layers, 4 heads, width 64, context 64; {steps} AdamW steps on "
        f"the prose, then LoRA rank {rank} on c_attn, c_proj, c_fc for {lora_steps} steps on "
        "the code\n"
    )
    result = demo_gpt.run_gpt(
        steps=steps,
        lora_steps=lora_steps,
        rank=rank,
        seed=args.seed,
        show_progress=args.progress,
    )
    print(result.trainable)
    print("\nvalidation loss (perplexity)   prose           code")
    rows = [
        ("base model", result.base_loss),
        ("with the adapters", result.adapted_loss),
        ("adapters zeroed again", result.removed_loss),
    ]
    for label, losses in rows:
        cells = "  ".join(
            f"{losses[text]:.3f} ({np.exp(losses[text]):5.2f})" for text in ("prose", "code")
        )
        print(f"  {label:<28}{cells}")
    for label, text in result.samples.items():
        print(f"\nsample, {label} (prompt 'def ', temperature 0.8):")
        print(textwrap.indent(text, "  | ", lambda line: True))
    print(f"\n{result.seconds:.0f} s in all")
    if args.plot:
        demo_gpt.plot_gpt(args.plot, result)
        print(f"\nwrote {args.plot}")
    return 0


def _inspect(directory: str) -> int:
    """Print an adapter directory's config and tensors (graphlora's or PEFT's)."""
    adapter = read_adapter(directory)
    config = adapter.config
    print(f"adapter: {adapter.path}")
    shown = (
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "use_dora",
        "lora_dropout",
        "init_lora_weights",
    )
    print("  " + ", ".join(f"{key} {config.get(key)!r}" for key in shown))
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            print(f"  {key}: {config[key]}")
    width = max(len("module"), *(len(name) for name in adapter.a))
    header = f"{'module':<{width}}  {'lora_A':>12}  {'lora_B':>12}  {'dtype':>7}  "
    print("\n" + header + "  |A|_F      |B|_F  scaling   |dW|_F")
    for name in sorted(adapter.a):
        a, b = adapter.a[name], adapter.b[name]
        scaling = adapter.scaling(name)
        delta = np.linalg.norm(
            scaled_delta(a.T.astype(np.float64), b.T.astype(np.float64), scaling)
        )
        print(
            f"{name:<{width}}  {a.shape!s:>12}  {b.shape!s:>12}  {a.dtype!s:>7}  "
            f"{np.linalg.norm(a):9.4g}  {np.linalg.norm(b):9.4g}  {scaling:7.4g}  {delta:7.4g}"
        )
    print("\nlora_A is [rank, in] and lora_B [out, rank] (PyTorch layout); dW = scaling * B A")
    return 0


def _non_negative(text: str) -> float:
    """An argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _generate(args: argparse.Namespace) -> int:
    """Continue ``--prompt`` with the checkpoint folder's model (and an adapter), greedy or
    sampled, and print the continuation."""
    tokenizer = gl.Tokenizer.from_pretrained(args.directory)
    graph = gl.Graph(np.float32)
    model = gl.from_pretrained(graph, args.directory)
    if args.adapter:
        apply_adapter(args.adapter, graph, model)
    prompt = tokenizer.encode(args.prompt)
    if not len(prompt):
        raise ValueError(f"the prompt {args.prompt!r} has no tokens")
    out = model.generate(
        graph,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        eos_token_id=tokenizer.eos_token_id,
        seed=args.seed,
    )
    print(tokenizer.decode(out[len(prompt) :]))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphlora",
        description="graphlora: a tape-based autograd engine on NumPy with LoRA layers.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("example", help="build a tiny graph and print its values and gradients")
    commands.add_parser(
        "explain",
        help="walk one tiny LoRA layer through forward and backward, formula by formula",
    )
    d = commands.add_parser(
        "demo",
        help="LoRA recovering a planted low-rank update (the default command)",
        description="Train a LoRA adapter on data from a frozen map plus a planted low-rank "
        "update, and show how well the update is recovered.",
        epilog="Threads: every matrix product picks its BLAS threads (graphlora.blas): one "
        "below about 4 million multiply-adds, and for larger ones the cores other processes "
        "leave free. On a busy machine (a CI runner, a shared server) NumPy's default of a "
        "thread per core can make a step several times slower; graphlora.set_num_threads(n) "
        "fixes the count instead (benches/load_step.py measures both).",
    )
    positive_int, positive_float = _positive(int), _positive(float)
    d.add_argument(
        "--task",
        choices=["lowrank", "digits", "gpt"],
        default="lowrank",
        help="lowrank: recover a planted update; digits: adapt a classifier (scikit-learn); gpt: "
        "pretrain a character-level GPT on prose and LoRA-adapt it to code (default lowrank)",
    )
    d.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (default 4; gpt: 8)")
    d.add_argument(
        "--rank-sweep", type=_ranks, metavar="R1,R2,...", help="train at each rank (default: no)"
    )
    d.add_argument("--planted-rank", type=positive_int, default=4, help="rank of dW* (default 4)")
    d.add_argument(
        "--in-features", type=positive_int, default=64, help="width of W0's input (default 64)"
    )
    d.add_argument(
        "--out-features", type=positive_int, default=32, help="width of W0's output (default 32)"
    )
    d.add_argument(
        "--samples", type=positive_int, default=512, help="training samples (default 512)"
    )
    d.add_argument(
        "--noise", type=float, default=0.01, help="std of the target noise (default 0.01)"
    )
    d.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps (default 300; gpt: 3000 of pretraining, 600 with --quick)",
    )
    d.add_argument(
        "--lora-steps",
        type=positive_int,
        default=None,
        help="gpt: LoRA steps on the code (default 1000; 200 with --quick)",
    )
    d.add_argument(
        "--quick",
        action="store_true",
        help="gpt: 600 pretraining and 200 LoRA steps, for a lab: about 15 s on two quiet cores "
        "(default: no; 3000 and 1000, about 70 s)",
    )
    d.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="Adam learning rate (default 0.02 for lowrank, 0.01 for digits)",
    )
    d.add_argument(
        "--alpha",
        type=positive_float,
        default=None,
        help="LoRA alpha: the update is A B alpha / r (default: the rank, so scaling 1)",
    )
    d.add_argument(
        "--rslora",
        action="store_true",
        help="scale by alpha / sqrt(r) instead of alpha / r (default: no)",
    )
    d.add_argument(
        "--init",
        choices=demo.DEMO_INITS,
        default="kaiming",
        help="how A and B start (default kaiming: A random, B zero); random: B random too (the "
        "layer starts changed); zeros: both zero (nothing learns); pissa starts from W0's top "
        "singular vectors",
    )
    d.add_argument("--seed", type=_seed, default=0, help="seed of every random draw (default 0)")
    d.add_argument(
        "--plot",
        metavar="FILE.png",
        help="save the run's figure: loss curves, singular values and, for a sweep, errors by "
        "rank; for digits the loss and the accuracies (default: no)",
    )
    d.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (default: a bar, when tqdm is installed)",
    )
    d.add_argument(
        "--save-adapter", metavar="DIR", help="save the trained adapter, PEFT layout (default: no)"
    )
    d.add_argument(
        "--overwrite", action="store_true", help="let --save-adapter replace DIR (default: no)"
    )
    i = commands.add_parser(
        "inspect",
        help="print an adapter directory's config and tensors",
        description="Print the config and tensors of an adapter directory saved by graphlora or "
        "by PEFT's save_pretrained.",
    )
    i.add_argument("directory", metavar="DIR")
    gen = commands.add_parser(
        "generate",
        help="continue a prompt with a checkpoint folder's model (GPT-2, Llama, Mistral, Qwen2)",
        description="Continue a prompt with the model in DIR (config.json, model.safetensors and "
        "tokenizer.json, as transformers' save_pretrained writes them), optionally with a LoRA "
        "adapter (graphlora's or PEFT's), and print the new text.",
    )
    gen.add_argument("directory", metavar="DIR")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--adapter", metavar="ADAPTER_DIR", help="a LoRA adapter to apply")
    gen.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="tokens to add (default 32)"
    )
    gen.add_argument(
        "--temperature",
        type=_non_negative,
        default=0.0,
        help="0: greedy (the default); above 0: sample at this temperature",
    )
    gen.add_argument("--seed", type=_seed, default=None, help="seed of the sampling")
    c = commands.add_parser(
        "check",
        help="grade an exercise from docs/exercises/",
        description="Grade a filled-in exercise: its values against the engine, its gradients "
        "against finite differences (gradcheck), naming the input and element that disagree.",
    )
    c.add_argument("file", metavar="FILE")
    c.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"stop the file after S seconds in all (default {DEFAULT_TIMEOUT:g})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    A closed output pipe (``graphlora demo | head -1``) ends the command quietly with status 0,
    as Unix tools do.
    """
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # Python would try to flush stdout again on exit: point it at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return status


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "example":
        return _example()
    if args.command == "explain":
        return 0 if explain() < 1e-12 else 1
    if args.command == "check":
        try:
            report = check_file(args.file, timeout=args.timeout)
        except (OSError, ValueError) as error:
            print(f"graphlora check: error: {error}", file=sys.stderr)
            return 2
        print(report.text(), end="")
        return 0 if report.passed else 1
    if args.command == "generate":
        try:
            return _generate(args)
        except BrokenPipeError:
            raise
        except (OSError, ImportError, ValueError, TypeError) as error:
            print(f"graphlora generate: error: {error}", file=sys.stderr)
            return 2
    if args.command == "inspect":
        try:
            return _inspect(args.directory)
        except BrokenPipeError:
            raise  # a closed pipe (inspect DIR | head -1) ends quietly: see main
        except (OSError, ImportError) as error:  # no such directory, or no safetensors: usage
            print(f"graphlora inspect: error: {error}", file=sys.stderr)
            return 2
        except ValueError as error:  # the directory is there but its adapter is not readable
            print(f"graphlora inspect: error: {error}", file=sys.stderr)
            return 1
    if args.command is None:  # the main job is the default
        args = parser.parse_args(["demo"])
    defaults = parser.parse_args(["demo"])
    ignored = [
        "--" + name.replace("_", "-").replace("progress", "no-progress")
        for name, value in vars(args).items()
        if name not in _TASK_OPTIONS[args.task] | {"command", "task"}
        and value != getattr(defaults, name)
    ]
    if ignored:
        listed = " and ".join([", ".join(ignored[:-1]), ignored[-1]] if ignored[:-1] else ignored)
        verb = "do" if len(ignored) > 1 else "does"
        parser.error(f"{listed} {verb} not apply to --task {args.task}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(f"--plot needs matplotlib: {_checks.install_hint('plot')}")
    if args.save_adapter and (args.task != "lowrank" or args.rank_sweep):
        parser.error("--save-adapter goes with the lowrank task and a single --rank")
    if args.save_adapter:
        try:
            safetensors_module("--save-adapter")  # before training, not after
        except ImportError as error:
            parser.error(str(error))
        target = Path(args.save_adapter)
        if target.exists() and not target.is_dir():
            parser.error(f"--save-adapter: {target} is a file, not a directory")
        if target.exists() and not args.overwrite:
            parser.error(f"--save-adapter: {target} already exists; pass --overwrite to replace it")
    if args.task == "gpt" and args.rank is not None and args.rank > demo_gpt.WIDTH:
        parser.error(
            f"--rank {args.rank} exceeds {demo_gpt.WIDTH}, the width of the demo's GPT "
            "(a rank is at most min(in, out) of every adapted layer)"
        )
    if args.lr is None:
        args.lr = 0.02 if args.task == "lowrank" else 0.01
    if args.task == "gpt":
        return _demo_gpt(args)
    args.steps = 300 if args.steps is None else args.steps
    args.rank = 4 if args.rank is None else args.rank
    try:
        return _demo_low_rank(args) if args.task == "lowrank" else _demo_digits(args)
    except (ValueError, ImportError, FileExistsError) as error:
        print(f"graphlora demo: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
