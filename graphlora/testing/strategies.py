"""Hypothesis strategies for property-testing gradients: shapes, arrays, LoRA layers, op
examples, expressions.

Every strategy draws small, finite data so that a failing example is short to read. They are
the ones graphlora's own test suite uses. ``op_examples(op)`` draws valid inputs for any op from
the op's own ``Sample`` (its registry entry), zero-size arrays included on request;
``expressions()`` draws whole random programs over the op catalogue, kept inside each op's safe
domain, and prints them as code. Needs Hypothesis: ``pip install 'graphlora[test]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from graphlora.engine.graph import Graph, NodeId
from graphlora.lora import INITS, LoraConfig, LoraLinear
from graphlora.lora.variants import variant_name
from graphlora.ops import OPS, Array, OpDef, Params

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as exc:  # pragma: no cover - exercised only without Hypothesis
    raise ImportError(
        "graphlora.testing.strategies needs Hypothesis; install the test extra: "
        "pip install 'graphlora[test]' (from a clone: pip install -e '.[test]')"
    ) from exc

__all__ = [
    "Example",
    "Expression",
    "arrays",
    "broadcastable_shapes",
    "expressions",
    "lora_configs",
    "lora_layers",
    "matmul_shapes",
    "op_examples",
    "shapes",
]

Shape = tuple[int, ...]
T = TypeVar("T")


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
    dora: bool | None = False,
) -> LoraConfig:
    """Valid ``LoraConfig``s: rank ``1..max_rank``, any alpha, rsLoRA or not, a seed.

    ``dropout=True`` also draws a dropout probability (otherwise it is 0, so outputs are exact).
    ``dora``: DoRA or not (``None``: either).
    """
    return LoraConfig(
        rank=draw(st.integers(1, max_rank)),
        alpha=draw(st.floats(0.5, 32.0)),
        dropout=draw(st.sampled_from([0.1, 0.5])) if dropout else 0.0,
        use_rslora=draw(st.booleans()),
        init=draw(st.sampled_from(inits)),
        init_std=draw(st.none() | st.floats(0.01, 1.0)),
        seed=draw(st.integers(0, 2**32 - 1)),
        use_dora=draw(st.booleans()) if dora is None else dora,
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
    low-rank path contributes to the output (and a DoRA magnitude to its norms times drawn factors
    in ``[0.5, 2]``); otherwise B keeps its init. A DoRA layer's weight has a first row of 2s
    added, so that no column norm is near zero (DoRA divides by them).
    """
    cfg = draw(lora_configs() if config is None else config)
    side = st.integers(cfg.rank, max(max_features, cfg.rank))
    in_features, out_features = draw(side), draw(side)
    graph = Graph(dtype)
    weight = draw(arrays((in_features, out_features), min_value=-1.0, max_value=1.0))
    if variant_name(cfg) == "dora":
        weight[0] += 2.0
    with_bias = draw(st.booleans()) if bias is None else bias
    bias_value = draw(arrays((out_features,))) if with_bias else None
    layer = LoraLinear.from_linear(graph, weight, bias_value, cfg)
    if trained:
        graph.set_value(
            layer.lora_b, draw(arrays((cfg.rank, out_features), min_value=-1.0, max_value=1.0))
        )
        magnitude = layer.update.state_leaves().get("magnitude")
        if magnitude is not None:  # DoRA
            factors = draw(arrays((out_features,), min_value=0.5, max_value=2.0))
            graph.set_value(magnitude, graph.value(magnitude) * factors)
    return graph, layer


# --- examples of any op, from its own Sample --------------------------------------------------


def _away_from_zero(low: float, high: float, away: float) -> st.SearchStrategy[float]:
    """Floats in ``[low, high]`` with ``|x| >= away``."""
    magnitude = st.floats(away, max(abs(low), abs(high)), allow_nan=False, allow_infinity=False)
    signed = st.tuples(magnitude, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])
    return signed.filter(lambda v: low <= v <= high)


class _Drawer:
    """``graphlora.ops.Draw`` over Hypothesis: every choice shrinks towards the simplest."""

    def __init__(self, draw: st.DrawFn, empty: bool) -> None:
        self._draw = draw
        self._least = 0 if empty else 1

    def choice(self, options: Sequence[T]) -> T:
        return self._draw(st.sampled_from(list(options)))

    def shape(
        self,
        *,
        min_dims: int = 0,
        max_dims: int = 3,
        min_side: int | None = None,
        max_side: int = 4,
    ) -> Shape:
        least = self._least if min_side is None else min_side
        side = st.integers(least, max(max_side, least))
        if least == 0:  # zero-size arrays asked for: a side of 0 half the time
            side = st.just(0) | side
        count = self._draw(st.integers(min_dims, max_dims))
        return tuple(self._draw(side) for _ in range(count))

    def broadcastable(self, count: int = 2, *, min_dims: int = 0, max_dims: int = 3) -> list[Shape]:
        drawn = self._draw(
            hnp.mutually_broadcastable_shapes(
                num_shapes=count,
                min_dims=min_dims,
                max_dims=max_dims,
                min_side=self._least,
                max_side=3,
            )
        )
        found = [list(shape) for shape in drawn.input_shapes]
        if self._least == 0 and any(found) and self._draw(st.booleans()):
            # Empty one aligned axis in every shape that has it stretched (a 1 still broadcasts).
            ndim = max(len(shape) for shape in found)
            axis = self._draw(st.integers(1, ndim))  # counted from the right
            for shape in found:
                if len(shape) >= axis and shape[-axis] != 1:
                    shape[-axis] = 0
            max(found, key=len)[-axis] = 0
        return [tuple(shape) for shape in found]

    def floats(
        self, shape: Shape, low: float = -3.0, high: float = 3.0, away: float = 0.0
    ) -> Array:
        elements = _away_from_zero(low, high, away) if away > 0 else None
        return self._draw(arrays(shape, elements=elements, min_value=low, max_value=high))

    def distinct(self, shape: Shape, low: float = -3.0, high: float = 3.0) -> Array:
        steps = int((high - low) / 0.01)
        size = int(np.prod(shape))
        picked = self._draw(
            st.lists(st.integers(0, steps), min_size=size, max_size=size, unique=True)
        )
        return (low + 0.01 * np.array(picked, dtype=np.float64)).reshape(shape)

    def ints(self, shape: Shape, low: int, high: int) -> Array:
        return self._draw(hnp.arrays(np.int64, shape, elements=st.integers(low, high - 1)))

    def bools(self, shape: Shape) -> Array:
        return self._draw(hnp.arrays(np.bool_, shape))


@dataclass(frozen=True)
class Example:
    """Inputs for one call of an op: ``op(*inputs, **params)``, or on a graph
    ``graph.apply(op, *nodes, **params)`` with a node for each array of ``inputs``."""

    inputs: tuple[Array | None, ...]
    """Every positional input, in order: float arrays, integer/bool data, ``None`` for an
    optional input left out."""
    params: Params
    """The keyword parameters."""
    floats: tuple[int, ...]
    """The positions in ``inputs`` of the float arrays (the ones gradients flow to)."""


@st.composite
def op_examples(draw: st.DrawFn, op: OpDef, *, empty: bool = False) -> Example:
    """Valid inputs for ``op``, drawn from its ``Sample`` (its registry entry).

    With ``empty``, sides of size 0 are drawn too (where the op accepts them), so that zero-size
    arrays are part of the property tests.

    Raises
    ------
    ValueError
        For an op with no ``Sample``.
    """
    if op.sample is None:
        raise ValueError(f"op_examples: {op.name} has no Sample to draw from")
    drawer = _Drawer(draw, empty)
    floats = op.sample.inputs(drawer)
    params = dict(op.sample.params(drawer, *floats))
    if op.variadic:
        return Example(tuple(floats), params, tuple(range(len(floats))))
    float_values = iter(floats)
    inputs: list[Array | None] = []
    positions = []
    for i, slot in enumerate(op.slots):
        if slot.kind == "float":
            value = next(float_values)
            if value is not None:
                positions.append(i)
            inputs.append(value)
        else:
            inputs.append(params.pop(slot.name, None))
    return Example(tuple(inputs), params, tuple(positions))


# --- random expressions over the op catalogue --------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One line of an expression: ``out = g.op(*args, **params)``; with ``names``, the inputs go
    by name (``g.where(cond=..., a=x0, b=x1)``); with ``listed``, as one list
    (``g.concat([x0, x1], axis=0)``)."""

    out: str
    op: str
    args: tuple[str, ...]
    params: tuple[tuple[str, Any], ...]
    names: tuple[str, ...] = ()
    listed: bool = False

    def code(self) -> str:
        """The line as Python source."""
        if self.listed:
            inputs = [f"[{', '.join(self.args)}]"]
        elif self.names:
            inputs = [f"{n}={a}" for n, a in zip(self.names, self.args, strict=True)]
        else:
            inputs = list(self.args)
        params = [f"{key}={_literal(value)}" for key, value in self.params]
        return f"{self.out} = g.{self.op}({', '.join([*inputs, *params])})"

    def call(self, g: Graph, env: dict[str, NodeId]) -> NodeId:
        """Record the line on ``g``, its inputs looked up in ``env``."""
        method: Callable[..., NodeId] = getattr(g, self.op)
        nodes = [env[a] for a in self.args]
        params = dict(self.params)
        if self.listed:
            return method(nodes, **params)
        if self.names:
            return method(**dict(zip(self.names, nodes, strict=True)), **params)
        return method(*nodes, **params)


def _literal(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"np.array({value.tolist()!r}, dtype=np.{value.dtype})"
    return repr(value)


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
            env[step.out] = step.call(g, env)
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


def _float_inputs(op: OpDef) -> list[str]:
    """The names of the float inputs an expression fills from earlier values (two for a
    variadic op); optional ones are left out."""
    if op.variadic:
        return ["", ""]
    return [slot.name for slot in op.slots if slot.kind == "float" and not slot.optional]


def _choices(pool: Pool) -> dict[str, list[tuple[str, ...]]]:
    """For every op with a ``fits`` rule, the argument tuples from ``pool`` that keep it in its
    safe domain."""
    found: dict[str, list[tuple[str, ...]]] = {}
    for name, op in OPS.items():
        if op.sample is None or op.sample.fits is None:
            continue
        arity = len(_float_inputs(op))
        args = [
            names
            for names in product(pool, repeat=arity)
            if op.sample.fits(*(pool[n] for n in names))
        ]
        if args:
            found[name] = args
    return found


def _step(name: str, out: str, args: tuple[str, ...], params: dict[str, Any]) -> Step:
    """The line that applies op ``name``: inputs by position, as a list, or by name when a data
    input (a mask, say) comes before them."""
    op = OPS[name]
    if op.variadic:
        return Step(out, name, args, tuple(params.items()), listed=True)
    floats = _float_inputs(op)
    first_data = next((i for i, slot in enumerate(op.slots) if slot.kind != "float"), None)
    by_name = first_data is not None and first_data < len(floats)
    return Step(out, name, args, tuple(params.items()), tuple(floats) if by_name else ())


@st.composite
def expressions(
    draw: st.DrawFn, *, max_ops: int = 8, max_inputs: int = 3, max_side: int = 3
) -> Expression:
    """Random expressions over the whole op catalogue, as ``Expression`` objects.

    Draws 1..``max_inputs`` input arrays (of one shape, or its last axis, so that broadcasting
    happens), then 1..``max_ops`` steps, each an op applied to earlier values where they lie in
    that op's safe domain (its ``Sample.fits``), with its other arguments drawn by its
    ``Sample.params``; and finally a ``sum`` if the last value is not a scalar. Values are kept
    finite and below 1e3 in magnitude, so that finite differences stay accurate.
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
    drawer = _Drawer(draw, empty=False)
    for _ in range(draw(st.integers(1, max_ops))):
        options = _choices(pool)
        op = draw(st.sampled_from(sorted(options)))
        args = draw(st.sampled_from(options[op]))
        sample = OPS[op].sample
        assert sample is not None
        step = _step(op, f"v{len(steps)}", args, sample.params(drawer, *(pool[a] for a in args)))
        node = step.call(scratch, nodes)
        value = np.array(scratch.value(node))
        if not (np.isfinite(value).all() and np.abs(value).max(initial=0.0) <= 1e3):
            continue  # out of the safe range: leave this step out
        steps.append(step)
        nodes[step.out], pool[step.out] = node, value
    result = steps[-1].out if steps else "x0"
    if pool[result].size != 1:
        steps.append(Step(f"v{len(steps)}", "sum", (result,), ()))
        result = steps[-1].out
    return Expression(tuple(inputs), tuple(steps), result)
