"""The op catalogue as ``Graph`` methods: one typed line each, through the one recording path.

``Graph`` inherits these. Each method hands its inputs and parameters to ``Graph._record``, which
checks the inputs, runs the op's own check (``graphlora.ops``) and records it; the op's maths,
check and VJP live with the op, so a method here is only its signature and a one-line docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from graphlora import _checks
from graphlora.ops import OpDef, activations, arithmetic, linalg, losses, reductions
from graphlora.ops import shape as shape_ops

if TYPE_CHECKING:
    from graphlora.graph import NodeId

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

    def matmul(self, a: NodeId, b: NodeId) -> NodeId:
        """Matrix product ``a @ b`` with NumPy's rules: ``[n, k] @ [k, m]``, batched
        ``[..., n, k] @ [..., k, m]`` with batch axes broadcast, 1-D operands promoted. Scalars
        (0-D) are refused: use ``scale`` or ``mul``."""
        return self._record(linalg.matmul, (a, b), {})

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

    def reshape(self, x: NodeId, shape: int | Sequence[int]) -> NodeId:
        """``x.reshape(shape)``; one entry may be ``-1``."""
        return self._record(shape_ops.reshape, (x,), {"shape": shape})

    def transpose(self, x: NodeId, axes: Sequence[int] | None = None) -> NodeId:
        """``np.transpose(x, axes)``; ``axes=None`` reverses the axes."""
        return self._record(shape_ops.transpose, (x,), {"axes": axes})

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

    def gelu(self, x: NodeId, approximate: str = "none") -> NodeId:
        """GELU: exact ``x * Phi(x)`` (default, as PyTorch) or ``approximate="tanh"``."""
        return self._record(activations.gelu, (x,), {"approximate": approximate})

    def softmax(self, x: NodeId, axis: int = -1) -> NodeId:
        """Softmax along ``axis``, numerically stable."""
        return self._record(activations.softmax, (x,), {"axis": axis})

    def log_softmax(self, x: NodeId, axis: int = -1) -> NodeId:
        """``log(softmax(x))`` along ``axis``, computed stably as ``x - logsumexp(x)``."""
        return self._record(activations.log_softmax, (x,), {"axis": axis})

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
        return self._record(losses.dropout, (x,), {"p": p, "rng": rng})
