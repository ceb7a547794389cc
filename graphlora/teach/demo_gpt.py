"""``python -m graphlora demo --task gpt``: a character-level GPT, pretrained and then LoRA-adapted.

Both texts come from Python's standard library, so the demo needs no download: the *prose* is
the interpreter's own help pages (``pydoc_data.topics``, what ``help("assert")`` prints) and the
*code* is the source of a few pure-Python modules (``textwrap``, ``string``, ``functools``,
``fractions``, ``dataclasses``, ``enum``). A small GPT (graphlora's GPT-2 architecture) learns
the prose; then it is frozen and LoRA adapters on its linear layers learn the code. The demo
reports the share of trainable parameters, the validation loss and perplexity of the base and the
adapted model on both texts, and a sample of each. The texts differ a little between Python
versions, and so do the numbers.
"""

from __future__ import annotations

import importlib
import inspect
import time
from dataclasses import dataclass, field

import numpy as np

from graphlora.engine.graph import Graph
from graphlora.lora import LoraConfig
from graphlora.nn import GPT, GPTConfig, apply_lora, parameters, trainable_parameters
from graphlora.ops import Array
from graphlora.optim import AdamW
from graphlora.teach.demo import progress

__all__ = [
    "CHARS",
    "GptResult",
    "decode",
    "encode",
    "plot_gpt",
    "run_gpt",
    "sample",
    "stdlib_texts",
]

CHARS = "".join(chr(i) for i in range(32, 127)) + "\n"
"""The vocabulary: printable ASCII and the newline; anything else reads as ``?``."""
_INDEX = {c: i for i, c in enumerate(CHARS)}
CODE_MODULES = ("textwrap", "string", "functools", "fractions", "dataclasses", "enum")
"""The standard-library modules whose source is the second text."""


def encode(text: str) -> Array:
    """Characters to token ids (tabs as four spaces, anything outside ``CHARS`` as ``?``)."""
    unknown = _INDEX["?"]
    return np.array([_INDEX.get(c, unknown) for c in text.replace("\t", "    ")], dtype=np.int64)


def decode(ids: Array) -> str:
    """Token ids to characters."""
    return "".join(CHARS[int(i)] for i in ids)


def stdlib_texts() -> tuple[str, str]:
    """``(prose, code)``: Python's help pages and the source of ``CODE_MODULES``."""
    import pydoc_data.topics  # the interpreter's help pages: large, so read only here

    topics = pydoc_data.topics.topics
    prose = "\n\n".join(topics[key] for key in sorted(topics))
    code = "".join(inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES)
    return prose, code


@dataclass
class GptResult:
    """What the GPT demo measured."""

    trainable: str  # PEFT's one-line report after apply_lora
    base_loss: dict[str, float]  # validation cross-entropy (nats a character), by text
    adapted_loss: dict[str, float]
    removed_loss: dict[str, float]  # the adapters zeroed again: the base's numbers back
    samples: dict[str, str]  # "base" and "adapted", from the same prompt and seed
    pretrain_losses: list[float] = field(default_factory=list)
    lora_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def sample(
    graph: Graph, model: GPT, prompt: str, length: int, *, temperature: float, seed: int
) -> str:
    """``prompt`` continued by ``length`` characters drawn from the model (no gradients)."""
    rng = np.random.default_rng(seed)
    ids = list(encode(prompt))
    block = model.config.block_size
    with graph.no_grad():
        for _ in range(length):
            logits = graph.value(model.forward(graph, np.array(ids[-block:])))[-1]
            graph.reset()
            scaled = (logits - logits.max()) / temperature
            p = np.exp(scaled) / np.exp(scaled).sum()
            ids.append(int(rng.choice(len(p), p=p)))
    return decode(np.array(ids))


WIDTH = 64
"""The width of the demo's GPT (``n_embd``): the largest LoRA rank its layers take."""


def run_gpt(
    *,
    steps: int = 3000,
    lora_steps: int = 1000,
    rank: int = 8,
    seed: int = 0,
    show_progress: bool = False,
    texts: tuple[str, str] | None = None,
) -> GptResult:
    """Pretrain a char-level GPT on the prose, then LoRA-adapt it to the code (float32).

    ``texts`` (``(prose, code)``) defaults to ``stdlib_texts()``; the last tenth of each is held
    out for validation.
    """
    start = time.perf_counter()
    prose, code = stdlib_texts() if texts is None else texts
    data = {"prose": encode(prose), "code": encode(code)}
    train = {name: ids[: len(ids) * 9 // 10] for name, ids in data.items()}
    held = {name: ids[len(ids) * 9 // 10 :] for name, ids in data.items()}
    config = GPTConfig(vocab_size=len(CHARS), block_size=64, n_layer=2, n_head=4, n_embd=WIDTH)
    batch, width = 16, config.block_size
    rng = np.random.default_rng(seed)

    def windows(ids: Array, count: int, draw: np.random.Generator) -> tuple[Array, Array]:
        starts = draw.integers(0, len(ids) - width - 1, size=count)
        x = np.stack([ids[s : s + width] for s in starts])
        return x, np.stack([ids[s + 1 : s + width + 1] for s in starts])  # the next characters

    g = Graph(np.float32)
    model = GPT.new(g, config, rng=rng)
    tokens = g.constant(np.zeros((batch, width), dtype=np.int64), name="tokens")
    targets = g.constant(np.zeros((batch, width), dtype=np.int64), name="targets")

    def fit(text: str, count: int, lr: float, label: str) -> list[float]:
        """AdamW on the model's trainable leaves: one step recorded, then replayed on each batch."""
        optimizer = AdamW(g, parameters(model), lr=lr, weight_decay=0.0)
        step = g.compile(g.cross_entropy(model.forward(g, tokens, fused=True), targets))
        losses = []
        for _ in progress(count, label, show_progress):
            x, y = windows(train[text], batch, rng)
            g.set_value(tokens, x)  # the next batch, into the same data leaves
            g.set_value(targets, y)
            losses.append(float(step()))
            optimizer.step()
            optimizer.zero_grad()
        g.reset()
        return losses

    def evaluate() -> dict[str, float]:
        """Mean validation loss over the same 8 held-out batches of 32 windows, per text."""
        found = {}
        for name, ids in held.items():
            draw = np.random.default_rng(1234)
            losses = []
            for _ in range(8):
                x, y = windows(ids, 32, draw)
                with g.no_grad():
                    losses.append(float(g.value(g.cross_entropy(model.forward(g, x), y))))
                g.reset()
            found[name] = float(np.mean(losses))
        return found

    pretrain_losses = fit("prose", steps, 3e-3, "pretraining on prose")
    base_loss = evaluate()
    base_sample = sample(g, model, "def ", 120, temperature=0.8, seed=seed)
    adapters = apply_lora(
        model, LoraConfig(rank=rank, alpha=2.0 * rank, seed=seed), ["c_attn", "c_proj", "c_fc"]
    )
    trainable = trainable_parameters(model)
    lora_losses = fit("code", lora_steps, 5e-3, "LoRA on code")
    adapted_loss = evaluate()
    adapted_sample = sample(g, model, "def ", 120, temperature=0.8, seed=seed)
    saved = {name: np.array(g.value(layer.lora_b)) for name, layer in adapters.items()}
    for layer in adapters.values():  # B = 0: the update is gone, the frozen base is all there is
        g.set_value(layer.lora_b, np.zeros_like(saved[layer.name]))
    removed_loss = evaluate()
    for name, layer in adapters.items():
        g.set_value(layer.lora_b, saved[name])
    return GptResult(
        trainable=trainable,
        base_loss=base_loss,
        adapted_loss=adapted_loss,
        removed_loss=removed_loss,
        samples={"base": base_sample, "adapted": adapted_sample},
        pretrain_losses=pretrain_losses,
        lora_losses=lora_losses,
        seconds=time.perf_counter() - start,
    )


def plot_gpt(path: str, result: GptResult) -> None:
    """Save the two training curves: pretraining on prose, then LoRA on code (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (pre, post) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, losses, title, text in (
        (pre, result.pretrain_losses, "Pretraining on prose (every weight)", "prose"),
        (post, result.lora_losses, "LoRA on code (the adapters only)", "code"),
    ):
        axes.plot(losses, linewidth=0.8, label="training batches")
        axes.axhline(result.base_loss[text], color="grey", linestyle="--", label="base: validation")
        if text == "code":
            axes.axhline(
                result.adapted_loss[text], color="black", linestyle=":", label="adapted: validation"
            )
        axes.set(xlabel="AdamW step", ylabel="cross-entropy (nats per character)", title=title)
        axes.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
