"""Hypothesis strategies for property-testing gradients: shapes, arrays, LoRA layers, expressions.

Every strategy draws small, finite data so that a failing example is short to read. They are
the ones graphlora's own test suite uses. ``expressions()`` draws whole random programs over the
op catalogue, kept inside each op's safe domain, and prints them as code. Needs Hypothesis:
``pip install 'graphlora[test]'``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora.graph import Graph, NodeId
from graphlora.lora import INITS, LoraConfig, LoraLinear

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as exc:  # pragma: no cover - exercised only without Hypothesis
    raise ImportError(
        "graphlora.testing.strategies needs Hypothesis; install the test extra: "
        "pip install 'graphlora[test]'"
    ) from exc

__all__ = [
    "Expression",
    "arrays",
    "broadcastable_shapes",
    "expressions",
    "lora_configs",
    "lora_layers",
    "matmul_shapes",
    "shapes",
]

Shape = tuple[int, ...]


def shapes(
    *, min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 4
) -> st.SearchStrategy[Shape]:
    """Array shapes with ``min_dims..max_dims`` axes of ``min_side..max_side`` elements each."""
    return hnp.array_shapes(
        min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
    )


def arrays(
    shape: Shape | st.SearchStrategy[Shape] | None = None,
    *,
    dtype: npt.DTypeLike = np.float64,
    elements: st.SearchStrategy[float] | None = None,
    min_value: float = -3.0,
    max_value: float = 3.0,
) -> st.SearchStrategy[np.ndarray[Any, Any]]:
    """Arrays of bounded, finite floats.

    Parameters
    ----------
    shape
        A shape, a strategy of shapes, or ``None`` for ``shapes()``.
    dtype
        ``np.float64`` (default) or ``np.float32``.
    elements
        A strategy for the elements; default: finite floats in ``[min_value, max_value]``.
    """
    if elements is None:
        elements = st.floats(
            min_value,
            max_value,
            allow_nan=False,
            allow_infinity=False,
            width=32 if np.dtype(dtype) == np.float32 else 64,
        )
    return hnp.arrays(dtype, shapes() if shape is None else shape, elements=elements)


def broadcastable_shapes(
    *, max_dims: int = 3, max_side: int = 4
) -> st.SearchStrategy[tuple[Shape, Shape]]:
    """Pairs of shapes that broadcast together under NumPy's rules (either may be the larger)."""
    return hnp.mutually_broadcastable_shapes(
        num_shapes=2, min_dims=0, max_dims=max_dims, max_side=max_side
    ).map(lambda drawn: (drawn.input_shapes[0], drawn.input_shapes[1]))


@st.composite
def matmul_shapes(
    draw: st.DrawFn, *, max_batch_dims: int = 2, max_side: int = 4, allow_1d: bool = True
) -> tuple[Shape, Shape]:
    """Pairs ``(a_shape, b_shape)`` that ``np.matmul`` accepts.

    Covers ``[n, k] @ [k, m]``, batched ``[..., n, k] @ [k, m]``, batch axes broadcast on both
    sides, and (with ``allow_1d``) 1-D operands promoted as in NumPy.
    """
    side = st.integers(1, max_side)
    n, k, m = draw(side), draw(side), draw(side)
    batch_a, batch_b = draw(
        hnp.mutually_broadcastable_shapes(
            num_shapes=2, min_dims=0, max_dims=max_batch_dims, max_side=3
        ).map(lambda drawn: drawn.input_shapes)
    )
    a_shape: Shape = (*batch_a, n, k)
    b_shape: Shape = (*batch_b, k, m)
    if allow_1d and draw(st.booleans()):
        if draw(st.booleans()):
            a_shape = (k,)
        else:
            b_shape = (k,)
    return a_shape, b_shape


@st.composite
def lora_configs(
    draw: st.DrawFn,
    *,
    max_rank: int = 4,
    inits: tuple[str, ...] = INITS,
    dropout: bool = False,
) -> LoraConfig:
    """Valid ``LoraConfig``s: rank ``1..max_rank``, any alpha, rsLoRA or not, a seed.

    ``dropout=True`` also draws a dropout probability (otherwise it is 0, so outputs are exact).
    """
    return LoraConfig(
        rank=draw(st.integers(1, max_rank)),
        alpha=draw(st.floats(0.5, 32.0)),
        dropout=draw(st.sampled_from([0.1, 0.5])) if dropout else 0.0,
        use_rslora=draw(st.booleans()),
        init=draw(st.sampled_from(inits)),
        init_std=draw(st.floats(0.01, 1.0)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def lora_layers(
    draw: st.DrawFn,
    *,
    dtype: npt.DTypeLike = np.float64,
    max_features: int = 6,
    config: st.SearchStrategy[LoraConfig] | None = None,
    bias: bool | None = None,
    trained: bool = True,
) -> tuple[Graph, LoraLinear]:
    """A new ``Graph`` and a ``LoraLinear`` in it, built ``from_linear`` over drawn weights.

    With ``trained`` (the default) B is set to drawn values, as after some training, so the
    low-rank path contributes to the output; otherwise B keeps its init.
    """
    cfg = draw(lora_configs() if config is None else config)
    side = st.integers(cfg.rank, max(max_features, cfg.rank))
    in_features, out_features = draw(side), draw(side)
    graph = Graph(dtype)
    weight = draw(arrays((in_features, out_features), min_value=-1.0, max_value=1.0))
    with_bias = draw(st.booleans()) if bias is None else bias
    bias_value = draw(arrays((out_features,))) if with_bias else None
    layer = LoraLinear.from_linear(graph, weight, bias_value, cfg)
    if trained:
        graph.set_value(
            layer.lora_b, draw(arrays((cfg.rank, out_features), min_value=-1.0, max_value=1.0))
        )
    return graph, layer


# --- random expressions over the op catalogue --------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One line of an expression: ``out = g.op(*args, **params)``."""

    out: str
    op: str
    args: tuple[str, ...]
    params: tuple[tuple[str, Any], ...]

    def code(self) -> str:
        """The line as Python source."""
        params = [f"{key}={_literal(value)}" for key, value in self.params]
        return f"{self.out} = g.{self.op}({', '.join([*self.args, *params])})"


def _literal(value: Any) -> str:
    return repr(value.tolist()) if isinstance(value, np.ndarray) else repr(value)


class Expression:
    """A random program over the op catalogue, drawn by ``expressions()``.

    ``fn(g, *nodes)`` records it on a graph and returns a scalar NodeId; ``inputs`` are the arrays
    to call it at (with ``gradcheck(expr.fn, *expr.inputs)``); ``ops`` lists the ops it uses;
    ``repr`` prints it as a Python function, so a failing example reads as a program.
    """

    __slots__ = ("inputs", "result", "steps")

    def __init__(
        self, inputs: tuple[np.ndarray[Any, Any], ...], steps: tuple[Step, ...], result: str
    ) -> None:
        self.inputs = inputs  # the arrays x0, x1, ... to evaluate at
        self.steps = steps  # one line of code each
        self.result = result  # the name of the scalar returned

    @property
    def ops(self) -> tuple[str, ...]:
        """The op of every step, in order."""
        return tuple(step.op for step in self.steps)

    def fn(self, g: Graph, *nodes: NodeId) -> NodeId:
        """Record the expression on ``g`` with ``nodes`` as ``x0, x1, ...``."""
        env = {f"x{i}": node for i, node in enumerate(nodes)}
        for step in self.steps:
            method: Callable[..., NodeId] = getattr(g, step.op)
            env[step.out] = method(*(env[a] for a in step.args), **dict(step.params))
        return env[self.result]

    def __repr__(self) -> str:
        names = ", ".join(f"x{i}" for i in range(len(self.inputs)))
        lines = [f"def f(g, {names}):"]
        lines += [f"    {step.code()}" for step in self.steps]
        lines.append(f"    return {self.result}")
        with np.printoptions(precision=17, floatmode="unique"):
            lines += [f"x{i} = np.array({a.tolist()!r})" for i, a in enumerate(self.inputs)]
        return "\n".join(lines)


Pool = dict[str, np.ndarray[Any, Any]]


def _broadcasts(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        return False
    return True


def _matmul_fits(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    if not (1 <= a.ndim <= 2 and 1 <= b.ndim <= 2):
        return False
    return bool(a.shape[-1] == (b.shape[0] if b.ndim == 1 else b.shape[-2]))


# Each rule: which variables (or pairs) an op may take, judged on their current values so that
# every op stays in its safe domain: positive for log and fractional powers, away from zero for
# div, away from relu's kink, bounded for exp.
_UNARY_DOMAINS: dict[str, Callable[[np.ndarray[Any, Any]], bool]] = {
    "neg": lambda v: True,
    "scale": lambda v: True,
    "tanh": lambda v: True,
    "sigmoid": lambda v: True,
    "gelu": lambda v: True,
    "dropout": lambda v: True,
    "sum": lambda v: True,
    "mean": lambda v: True,
    "pow": lambda v: True,
    "exp": lambda v: bool(v.max() <= 3.0),
    "log": lambda v: bool(v.min() >= 0.25),
    "relu": lambda v: bool(np.abs(v).min() >= 0.05),
    "reshape": lambda v: v.size > 1,
    "transpose": lambda v: v.ndim >= 2,
    "softmax": lambda v: v.ndim >= 1,
    "log_softmax": lambda v: v.ndim >= 1,
    "cross_entropy": lambda v: v.ndim == 2,
    "lora_linear": lambda v: v.ndim >= 1,  # its weights are drawn as new inputs
}
_BINARY_DOMAINS: dict[str, Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any]], bool]] = {
    "add": _broadcasts,
    "sub": _broadcasts,
    "mul": _broadcasts,
    "div": lambda a, b: _broadcasts(a, b) and bool(np.abs(b).min() >= 0.25),
    "matmul": _matmul_fits,
    "mse_loss": lambda a, b: a.shape == b.shape,
}


def _params(draw: st.DrawFn, op: str, v: np.ndarray[Any, Any]) -> dict[str, Any]:
    """Draw the non-array arguments of a unary op applied to a value ``v``."""
    if op == "scale":
        return {"c": draw(st.sampled_from([-1.5, -0.5, 0.5, 2.0]))}
    if op == "pow":
        fractional = bool(v.min() >= 0.25)
        return {"p": draw(st.sampled_from([2, 3, 0.5, -1.0, 1.5] if fractional else [2, 3]))}
    if op in ("sum", "mean"):
        axis = draw(st.none() | st.integers(-v.ndim, v.ndim - 1)) if v.ndim else None
        return {"axis": axis, "keepdims": draw(st.booleans())}
    if op == "reshape":
        return {"shape": draw(st.sampled_from([(-1,), (v.size, 1), tuple(reversed(v.shape))]))}
    if op == "transpose":
        return {"axes": draw(st.none() | st.permutations(range(v.ndim)).map(tuple))}
    if op in ("softmax", "log_softmax"):
        return {"axis": draw(st.integers(-v.ndim, v.ndim - 1))}
    if op == "gelu":
        return {"approximate": draw(st.sampled_from(["none", "tanh"]))}
    if op == "cross_entropy":
        n, classes = v.shape
        labels = draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
        return {"labels": np.array(labels)}
    if op == "dropout":
        return {"p": draw(st.sampled_from([0.25, 0.5])), "rng": draw(st.integers(0, 999))}
    if op == "lora_linear":
        return {"scaling": draw(st.sampled_from([0.5, 2.0]))}
    return {}


def _choices(pool: Pool) -> dict[str, list[tuple[str, ...]]]:
    """For every op, the argument tuples from ``pool`` that keep it in its safe domain."""
    found: dict[str, list[tuple[str, ...]]] = {}
    for op, ok in _UNARY_DOMAINS.items():
        args: list[tuple[str, ...]] = [(name,) for name, v in pool.items() if ok(v)]
        if args:
            found[op] = args
    for op, ok2 in _BINARY_DOMAINS.items():
        pairs: list[tuple[str, ...]] = [
            (a, b) for a, va in pool.items() for b, vb in pool.items() if ok2(va, vb)
        ]
        if pairs:
            found[op] = pairs
    return found


@st.composite
def expressions(
    draw: st.DrawFn, *, max_ops: int = 8, max_inputs: int = 3, max_side: int = 3
) -> Expression:
    """Random expressions over the whole op catalogue, as ``Expression`` objects.

    Draws 1..``max_inputs`` input arrays (of one shape, or its last axis, so that broadcasting
    happens), then 1..``max_ops`` steps, each an op applied to earlier values where they lie in
    that op's safe domain, and finally a ``sum`` if the last value is not a scalar. Values are
    kept finite and below 1e3 in magnitude, so that finite differences stay accurate.
    """
    shape = draw(shapes(min_dims=1, max_dims=2, max_side=max_side))
    inputs = [
        draw(arrays(draw(st.sampled_from([shape, shape[-1:]])), min_value=-2.0, max_value=2.0))
        for _ in range(draw(st.integers(1, max_inputs)))
    ]
    scratch = Graph()
    nodes: dict[str, NodeId] = {f"x{i}": scratch.constant(a) for i, a in enumerate(inputs)}
    pool: Pool = {name: np.array(scratch.value(node)) for name, node in nodes.items()}
    steps: list[Step] = []

    def new_input(input_shape: Shape) -> str:
        """Draw a fresh input array (a layer's weight) and return its name."""
        name = f"x{len(inputs)}"
        inputs.append(draw(arrays(input_shape, min_value=-1.0, max_value=1.0)))
        nodes[name] = scratch.constant(inputs[-1])
        return name

    for _ in range(draw(st.integers(1, max_ops))):
        options = _choices(pool)
        op = draw(st.sampled_from(sorted(options)))
        args = draw(st.sampled_from(options[op]))
        params = _params(draw, op, pool[args[0]]) if len(args) == 1 else {}
        if op == "lora_linear":  # x [..., in] -> [..., out] through new W, A, B (and bias)
            n_in, n_out, rank = pool[args[0]].shape[-1], draw(st.integers(1, 3)), 1
            weights: list[Shape] = [(n_in, n_out), (n_in, rank), (rank, n_out)]
            weights += [(n_out,)] if draw(st.booleans()) else []
            args = (args[0], *(new_input(w) for w in weights))
        node = getattr(scratch, op)(*(nodes[a] for a in args), **params)
        value = np.array(scratch.value(node))
        if not (np.isfinite(value).all() and np.abs(value).max(initial=0.0) <= 1e3):
            continue  # out of the safe range: leave this step out
        name = f"v{len(steps)}"
        steps.append(Step(name, op, args, tuple(params.items())))
        nodes[name], pool[name] = node, value
    result = steps[-1].out if steps else "x0"
    if pool[result].size != 1:
        steps.append(Step(f"v{len(steps)}", "sum", (result,), ()))
        result = steps[-1].out
    return Expression(tuple(inputs), tuple(steps), result)
