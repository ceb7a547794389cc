"""Exercise 2: softmax and its VJP.

``softmax(x)_i = exp(x_i) / sum_j exp(x_j)`` along one axis. Two things to get right:

1. Forward, stably: ``exp(1000)`` overflows. Softmax does not change when the same number is
   subtracted from every ``x_i``, so subtract the maximum first.
2. Backward: with ``y = softmax(x)`` and the incoming gradient ``g = dL/dy``, the Jacobian is
   ``dy_i/dx_j = y_i (δ_ij - y_j)``, so ``dL/dx_j = sum_i g_i y_i (δ_ij - y_j)``. Write that
   without building the Jacobian: one product, one sum along the axis (keep its dimension).

Fill in ``softmax``. Grade it with ``python -m graphlora check 02_softmax.py``.
"""

import numpy as np

EXERCISE = "softmax"


def softmax(x, axis=-1):
    """Softmax of ``x`` along ``axis``, and its VJP: (out, vjp)."""
    out = stable_softmax(x, axis)

    def vjp(g, needs):
        return (softmax_grad(g, out, axis),)

    return out, vjp


def stable_softmax(x, axis):
    """``exp(x) / sum(exp(x))`` along ``axis``, with the maximum subtracted first."""
    raise NotImplementedError("stable_softmax: the forward pass")


def softmax_grad(g, out, axis):
    """``dL/dx`` from ``g = dL/dy`` and ``out = y``, without building the Jacobian."""
    raise NotImplementedError("softmax_grad: dL/dx from g and out")
