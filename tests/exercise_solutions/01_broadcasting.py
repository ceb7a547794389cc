"""Exercise 1: a broadcasting add and its VJP.

NumPy broadcasts ``a + b``: an input of shape ``(4,)`` added to one of shape ``(3, 4)`` is used
as if it were repeated on 3 rows. In backward, the gradient ``g`` has the output's shape, and each
input's gradient must have that input's own shape: every place the input was repeated contributed
to the loss, so its gradient is ``g`` summed over the axes broadcasting added (on the left) or
stretched (of size 1 in the input).

Fill in ``unbroadcast``. Grade it with ``python -m graphlora check 01_broadcasting.py``.
"""

import numpy as np

EXERCISE = "broadcasting"


def unbroadcast(g, shape):
    """Sum ``g`` down to ``shape``: over the leading axes ``shape`` lacks, and over the axes where
    ``shape`` has a 1 and ``g`` does not. Example: ``g`` of shape (2, 3, 4) to (3, 1) sums axis 0
    (added) and axis 2 (stretched), keeping a size-1 axis."""
    lead = g.ndim - len(shape)
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=tuple(range(lead)) + stretched).reshape(shape)


def add(a, b):
    """``a + b`` with broadcasting, and its VJP: (out, vjp)."""
    out = a + b

    def vjp(g, needs):
        grad_a = unbroadcast(g, a.shape) if needs[0] else None
        grad_b = unbroadcast(g, b.shape) if needs[1] else None
        return grad_a, grad_b

    return out, vjp
