"""The op catalogue: every differentiable operation as ONE function over NumPy arrays.

Each op computes its forward value and returns it with its VJP (vector-Jacobian product)
closure, ``(out, vjp)``. ``vjp(g, needs)`` takes the gradient ``g`` of the loss with respect to
``out`` and a tuple ``needs`` saying which inputs want a gradient; it returns one gradient per
input, ``None`` for every input that does not want one, and computes nothing for those. The
docstring of each op states its VJP in one line. Beside each op, in the same place, sit its
argument check (run before NumPy, so that errors name the op and the shapes) and its registry
entry: the kinds of its inputs, where they are safe to test, and the same op in PyTorch.

The ops live in families: ``arithmetic``, ``linalg``, ``reductions``, ``shape`` (and indexing),
``activations``, ``normalization``, ``attention``, ``positional`` (rotary embeddings),
``losses``, ``regularization`` (dropout).
The registry (``registry``), the test-sampling protocol (``sampling``) and the speed helpers
(``kernels``) are small modules of their own. ``OPS`` lists them all by name,
and each is also an attribute of this module (``ops.matmul``); calling one checks its arguments
and runs it.
"""

from __future__ import annotations

from graphlora.ops import (
    activations,
    arithmetic,
    attention,
    linalg,
    losses,
    normalization,
    positional,
    reductions,
    regularization,
    shape,
)
from graphlora.ops.kernels import column_sum, swap, unbroadcast
from graphlora.ops.registry import OPS, Array, Grads, Op, OpDef, Params, Slot, Vjp, builtin, op
from graphlora.ops.regularization import dropout_mask
from graphlora.ops.sampling import Draw, Sample, broadcasting, elementwise

__all__ = [
    "OPS",
    "Array",
    "Draw",
    "Grads",
    "Op",
    "OpDef",
    "Params",
    "Sample",
    "Slot",
    "Vjp",
    "activations",
    "arithmetic",
    "attention",
    "broadcasting",
    "builtin",
    "column_sum",
    "dropout_mask",
    "elementwise",
    "linalg",
    "losses",
    "normalization",
    "op",
    "positional",
    "reductions",
    "regularization",
    "shape",
    "swap",
    "unbroadcast",
]


def __getattr__(name: str) -> OpDef:
    """The catalogue's ops as attributes of this module: ``ops.matmul is ops.OPS["matmul"]``."""
    try:
        return OPS[name]
    except KeyError:
        raise AttributeError(f"module 'graphlora.ops' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*__all__, *OPS})
