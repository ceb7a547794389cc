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
    raise NotImplementedError("forward: the frozen path plus the low-rank path")


def backward(g, x, w, a, b, s):
    """``(dL/dx, dL/dA, dL/dB)`` from ``g = dL/dy``."""
    raise NotImplementedError("backward: dL/dx, dL/dA and dL/dB")
