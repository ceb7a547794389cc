"""The op catalogue as ``Graph`` methods: one typed line each, through the one recording path.

``Graph`` inherits these. Each method hands its inputs and parameters to ``Graph._record``, which
checks the inputs, runs the op's own check (``graphlora.ops``) and records it; the op's maths,
check and VJP live with the op, so a method here is only its signature and a one-line docstring.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from graphlora import _checks
from graphlora.ops import (
    OpDef,
    activations,
    arithmetic,
    attention,
    linalg,
    losses,
    normalization,
    positional,
    reductions,
    regularization,
)
from graphlora.ops import shape as shape_ops

if TYPE_CHECKING:
    from graphlora.engine.graph import NodeId

__all__ = ["OpMethods"]

Scalar = float | int | np.floating[Any] | np.integer[Any]


class OpMethods:
    """The built-in ops as methods (a part of ``Graph``)."""

    _grad_enabled: bool

    def _record(self, op: OpDef, args: tuple[Any, ...], params: dict[str, Any]) -> NodeId:
        raise NotImplementedError  # Graph's

    def check(self, node: object, where: str = "check", arg: str = "node") -> NodeId:
        raise NotImplementedError  # Graph's

    def add(self, a: NodeId, b: NodeId) -> NodeId:
        """``a + b`` with NumPy broadcasting; gradients are summed back to each input's shape."""
        return self._record(arithmetic.add, (a, b), {})

    def sub(self, a: NodeId, b: NodeId) -> NodeId:
        """``a - b`` with NumPy broadcasting."""
        return self._record(arithmetic.sub, (a, b), {})

    def mul(self, a: NodeId, b: NodeId) -> NodeId:
        """Elementwise ``a * b`` with NumPy broadcasting."""
        return self._record(arithmetic.mul, (a, b), {})

    def div(self, a: NodeId, b: NodeId) -> NodeId:
        """Elementwise ``a / b`` with NumPy broadcasting (division by zero follows NumPy)."""
        return self._record(arithmetic.div, (a, b), {})

    def scale(self, x: NodeId, c: Scalar) -> NodeId:
        """``c * x`` for a real scalar ``c`` (a Python or NumPy number, not an array)."""
        return self._record(arithmetic.scale, (x,), {"c": c})

    def neg(self, x: NodeId) -> NodeId:
        """``-x``."""
        return self._record(arithmetic.neg, (x,), {})

    def pow(self, x: NodeId, p: Scalar) -> NodeId:
        """``x ** p`` for a real scalar exponent ``p``."""
        return self._record(arithmetic.pow, (x,), {"p": p})

    def maximum(self, a: NodeId, b: NodeId) -> NodeId:
        """Elementwise ``max(a, b)`` with broadcasting; ties share the gradient, as PyTorch."""
        return self._record(arithmetic.maximum, (a, b), {})

    def minimum(self, a: NodeId, b: NodeId) -> NodeId:
        """Elementwise ``min(a, b)`` with broadcasting; ties share the gradient, as PyTorch."""
        return self._record(arithmetic.minimum, (a, b), {})

    def where(self, cond: NodeId | npt.ArrayLike, a: NodeId, b: NodeId) -> NodeId:
        """``a`` where the bool ``cond`` (a data node or an array) is True, else ``b``."""
        return self._record(arithmetic.where, (cond, a, b), {})

    def abs(self, x: NodeId) -> NodeId:
        """``|x|``; the gradient at 0 is 0, as in PyTorch."""
        return self._record(arithmetic.abs, (x,), {})

    def sqrt(self, x: NodeId) -> NodeId:
        """Elementwise square root."""
        return self._record(arithmetic.sqrt, (x,), {})

    def matmul(self, a: NodeId, b: NodeId) -> NodeId:
        """Matrix product ``a @ b`` with NumPy's rules: ``[n, k] @ [k, m]``, batched
        ``[..., n, k] @ [..., k, m]`` with batch axes broadcast, 1-D operands promoted. Scalars
        (0-D) are refused: use ``scale`` or ``mul``."""
        return self._record(linalg.matmul, (a, b), {})

    def linear(self, x: NodeId, weight: NodeId, bias: NodeId | None = None) -> NodeId:
        """A dense layer in one node, ``x @ weight + bias``: ``x [..., in]``, ``weight [in, out]``,
        ``bias [out]`` (``Linear.forward(..., fused=True)``)."""
        return self._record(linalg.linear, (x, weight, bias), {})

    def sum(
        self, x: NodeId, axis: int | Sequence[int] | None = None, keepdims: bool = False
    ) -> NodeId:
        """Sum over ``axis`` (``None``: all axes; an int or a tuple of ints), as ``np.sum``."""
        return self._record(reductions.sum, (x,), {"axis": axis, "keepdims": keepdims})

    def mean(
        self, x: NodeId, axis: int | Sequence[int] | None = None, keepdims: bool = False
    ) -> NodeId:
        """Mean over ``axis`` (``None``: all axes; an int or a tuple of ints), as ``np.mean``."""
        return self._record(reductions.mean, (x,), {"axis": axis, "keepdims": keepdims})

    def max(
        self, x: NodeId, axis: int | Sequence[int] | None = None, keepdims: bool = False
    ) -> NodeId:
        """The largest element over ``axis``, as ``np.max``; ties share the gradient."""
        return self._record(reductions.max, (x,), {"axis": axis, "keepdims": keepdims})

    def min(
        self, x: NodeId, axis: int | Sequence[int] | None = None, keepdims: bool = False
    ) -> NodeId:
        """The smallest element over ``axis``, as ``np.min``; ties share the gradient."""
        return self._record(reductions.min, (x,), {"axis": axis, "keepdims": keepdims})

    def logsumexp(
        self, x: NodeId, axis: int | Sequence[int] | None = -1, keepdims: bool = False
    ) -> NodeId:
        """``log(sum(exp(x)))`` over ``axis`` (default the last), computed stably."""
        return self._record(reductions.logsumexp, (x,), {"axis": axis, "keepdims": keepdims})

    def var(
        self,
        x: NodeId,
        axis: int | Sequence[int] | None = None,
        keepdims: bool = False,
        ddof: int = 0,
    ) -> NodeId:
        """Variance over ``axis``, as ``np.var`` (``ddof=1``: the unbiased one)."""
        params = {"axis": axis, "keepdims": keepdims, "ddof": ddof}
        return self._record(reductions.var, (x,), params)

    def reshape(self, x: NodeId, shape: int | Sequence[int]) -> NodeId:
        """``x.reshape(shape)``; one entry may be ``-1``."""
        return self._record(shape_ops.reshape, (x,), {"shape": shape})

    def transpose(self, x: NodeId, axes: Sequence[int] | None = None) -> NodeId:
        """``np.transpose(x, axes)``; ``axes=None`` reverses the axes."""
        return self._record(shape_ops.transpose, (x,), {"axes": axes})

    def getitem(self, x: NodeId, index: Any) -> NodeId:
        """``x[index]``: NumPy's basic and integer-array (or bool) indexing."""
        return self._record(shape_ops.getitem, (x,), {"index": index})

    def concat(self, nodes: Sequence[NodeId], axis: int = 0) -> NodeId:
        """Join ``nodes`` along ``axis``, as ``np.concatenate``."""
        return self._record(shape_ops.concat, tuple(nodes), {"axis": axis})

    def stack(self, nodes: Sequence[NodeId], axis: int = 0) -> NodeId:
        """Stack ``nodes`` along a new ``axis``, as ``np.stack``."""
        return self._record(shape_ops.stack, tuple(nodes), {"axis": axis})

    def split(
        self, x: NodeId, indices_or_sections: int | Sequence[int], axis: int = 0
    ) -> tuple[NodeId, ...]:
        """``np.split``: ``x`` cut along ``axis`` into equal sections (an int) or at indices;
        a tuple of nodes, each a ``getitem`` slice of ``x``."""
        where = "split"
        shape = self.check(x, where, "x").shape
        axis = _checks.one_axis(where, axis, shape)
        size = shape[axis]
        if isinstance(indices_or_sections, (int, np.integer)) and not isinstance(
            indices_or_sections, bool
        ):
            sections = int(indices_or_sections)
            if sections < 1 or size % sections:
                raise ValueError(
                    f"{where}: {size} along axis {axis} does not split into {sections} equal "
                    "sections; give the indices to cut at instead"
                )
            cuts = [size // sections * i for i in range(1, sections)]
        else:
            cuts = list(_checks.int_tuple(where, "indices_or_sections", indices_or_sections))
        bounds = [0, *cuts, size]
        lead = (slice(None),) * axis
        return tuple(
            self._record(shape_ops.getitem, (x,), {"index": (*lead, slice(start, stop))})
            for start, stop in itertools.pairwise(bounds)
        )

    def embedding(self, weight: NodeId, ids: NodeId | npt.ArrayLike) -> NodeId:
        """Rows of ``weight [V, D]`` picked by integer ``ids [...]`` (a data node or an array):
        ``[..., D]``; ids outside ``[0, V)`` are refused."""
        return self._record(shape_ops.embedding, (weight, ids), {})

    def relu(self, x: NodeId) -> NodeId:
        """``max(x, 0)``; the gradient at 0 is 0, as in PyTorch."""
        return self._record(activations.relu, (x,), {})

    def tanh(self, x: NodeId) -> NodeId:
        """Hyperbolic tangent."""
        return self._record(activations.tanh, (x,), {})

    def sigmoid(self, x: NodeId) -> NodeId:
        """Logistic sigmoid ``1 / (1 + exp(-x))``, without overflow."""
        return self._record(activations.sigmoid, (x,), {})

    def exp(self, x: NodeId) -> NodeId:
        """Elementwise ``exp(x)``."""
        return self._record(activations.exp, (x,), {})

    def log(self, x: NodeId) -> NodeId:
        """Natural logarithm (``x <= 0`` gives NaN or -inf, as in NumPy)."""
        return self._record(activations.log, (x,), {})

    def softplus(self, x: NodeId) -> NodeId:
        """``log(1 + exp(x))``, computed stably."""
        return self._record(activations.softplus, (x,), {})

    def silu(self, x: NodeId) -> NodeId:
        """SiLU (swish): ``x * sigmoid(x)``."""
        return self._record(activations.silu, (x,), {})

    def erf(self, x: NodeId) -> NodeId:
        """The error function."""
        return self._record(activations.erf, (x,), {})

    def gelu(self, x: NodeId, approximate: str = "none") -> NodeId:
        """GELU: exact ``x * Phi(x)`` (default, as PyTorch) or ``approximate="tanh"``."""
        return self._record(activations.gelu, (x,), {"approximate": approximate})

    def softmax(self, x: NodeId, axis: int = -1) -> NodeId:
        """Softmax along ``axis``, numerically stable."""
        return self._record(activations.softmax, (x,), {"axis": axis})

    def log_softmax(self, x: NodeId, axis: int = -1) -> NodeId:
        """``log(softmax(x))`` along ``axis``, computed stably as ``x - logsumexp(x)``."""
        return self._record(activations.log_softmax, (x,), {"axis": axis})

    def layer_norm(
        self,
        x: NodeId,
        weight: NodeId | None = None,
        bias: NodeId | None = None,
        eps: float = 1e-5,
    ) -> NodeId:
        """Layer norm over the last axis, ``(x - mean) / sqrt(var + eps) * weight + bias``."""
        return self._record(normalization.layer_norm, (x, weight, bias), {"eps": eps})

    def rms_norm(self, x: NodeId, weight: NodeId | None = None, eps: float = 1e-6) -> NodeId:
        """RMS norm over the last axis, ``x / sqrt(mean(x**2) + eps) * weight``."""
        return self._record(normalization.rms_norm, (x, weight), {"eps": eps})

    def rope(
        self,
        x: NodeId,
        positions: NodeId | npt.ArrayLike,
        *,
        theta: float = 10000.0,
        scaling: Mapping[str, Any] | None = None,
    ) -> NodeId:
        """Rotary position embedding of ``x [..., T, d]`` at integer ``positions [..., T]`` (their
        leading axes x's leading ones; x's head axes between broadcast), transformers' half-split
        pairing; ``scaling``: transformers'
        ``rope_parameters`` for ``rope_type`` ``"llama3"`` (``None``: the default scheme)."""
        return self._record(positional.rope, (x, positions), {"theta": theta, "scaling": scaling})

    def scaled_dot_product_attention(
        self,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        mask: NodeId | npt.ArrayLike | None = None,
        causal: bool = False,
        scale: float | None = None,
        dropout: float = 0.0,
        rng: _checks.Rng = None,
    ) -> NodeId:
        """``softmax(q kᵀ * scale) v`` over ``[..., T, d]`` inputs, as one op; ``mask`` (bool,
        True keeps) and ``causal`` hide scores; ``scale`` defaults to ``1 / sqrt(d)``;
        ``dropout`` on the attention weights acts only while gradients are recorded."""
        p = dropout if self._grad_enabled else 0.0
        params = {"causal": causal, "scale": scale, "dropout": p, "rng": rng}
        return self._record(attention.scaled_dot_product_attention, (q, k, v, mask), params)

    def qkv_attention(
        self,
        qkv: NodeId,
        mask: NodeId | npt.ArrayLike | None = None,
        *,
        n_head: int,
        causal: bool = False,
        scale: float | None = None,
        dropout: float = 0.0,
        rng: _checks.Rng = None,
    ) -> NodeId:
        """Multi-head attention over a packed projection ``qkv [..., T, 3C]`` (``q | k | v``,
        each with ``n_head`` heads side by side, as GPT-2's ``c_attn`` makes them): ``[..., T,
        C]``. ``scaled_dot_product_attention`` on every head, as one op, without the ``split``,
        ``reshape`` and ``transpose`` nodes around it; ``mask`` broadcasts to ``[..., n_head, T,
        T]``."""
        p = dropout if self._grad_enabled else 0.0
        params = {"n_head": n_head, "causal": causal, "scale": scale, "dropout": p, "rng": rng}
        return self._record(attention.qkv_attention, (qkv, mask), params)

    def mse_loss(self, pred: NodeId, target: NodeId) -> NodeId:
        """Mean squared error ``mean((pred - target)**2)``; the shapes must be equal."""
        return self._record(losses.mse_loss, (pred, target), {})

    def cross_entropy(
        self,
        logits: NodeId,
        labels: NodeId | npt.ArrayLike,
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> NodeId:
        """Mean cross-entropy of ``logits [..., C]`` (classes LAST) against integer ``labels
        [...]``: a NodeId of integer data (fed by ``set_value`` to a compiled step) or an array.
        ``ignore_index`` and ``label_smoothing`` as in PyTorch."""
        params = {"ignore_index": ignore_index, "label_smoothing": label_smoothing}
        return self._record(losses.cross_entropy, (logits, labels), params)

    def dropout(self, x: NodeId, p: float, rng: _checks.Rng = None) -> NodeId:
        """Inverted dropout: zero each element with probability ``p`` and scale the rest by
        ``1 / (1 - p)``, so the expected value is unchanged.

        The rule: dropout acts only while gradients are recorded (training). With ``p == 0`` or
        inside ``no_grad()`` it is the identity and returns ``x`` itself, recording nothing.
        ``rng``: a ``np.random.Generator``, an int seed (the same seed draws the same mask) or
        ``None`` for fresh entropy; the global NumPy random state is never used.
        """
        if _checks.probability("dropout", "p", p) == 0.0 or not self._grad_enabled:
            return self.check(x, "dropout", "x")
        return self._record(regularization.dropout, (x,), {"p": p, "rng": rng})
