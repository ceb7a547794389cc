"""Exercise 3: one LoRA layer, forward and backward, by hand.

The layer computes ``y = x @ W + ((x @ A) * s) @ B`` with ``x [N, in]``, a frozen ``W [in, out]``,
``A [in, r]``, ``B [r, out]`` and the scaling ``s``. Given ``g = dL/dy`` (shape ``[N, out]``),
``backward`` returns ``dL/dx``, ``dL/dA`` and ``dL/dB``. Hints: name the intermediate
``h = (x @ A) * s``; each matmul ``p @ q`` sends ``g @ qᵀ`` to ``p`` and ``pᵀ @ g`` to ``q``;
``x`` feeds two paths, so its gradient is a sum. ``W`` is frozen: no gradient for it.

Fill in ``forward`` and ``backward``. Grade them with ``python -m graphlora check
03_lora_layer.py``: the forward is compared with graphlora's ``LoraLinear``, the gradients with
finite differences.
"""

import numpy as np

EXERCISE = "lora_layer"


def forward(x, w, a, b, s):
    """``y = x @ W + ((x @ A) * s) @ B``."""
    return x @ w + ((x @ a) * s) @ b


def backward(g, x, w, a, b, s):
    """``(dL/dx, dL/dA, dL/dB)`` from ``g = dL/dy``."""
    h = (x @ a) * s
    grad_h = g @ b.T
    grad_a = x.T @ (grad_h * s)
    grad_b = h.T @ g
    grad_x = g @ w.T + (grad_h * s) @ a.T
    return grad_x, grad_a, grad_b
