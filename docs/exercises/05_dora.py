"""Exercise 5: a LoRA variant's update: DoRA.

DoRA splits the adapted weight ``W' = W + s A @ B`` (shape ``[in, out]``) into a direction and a
length per output: column ``j`` is ``W'[:, j] / n_j`` with ``n_j = ||W'[:, j]||``, and a trainable
magnitude ``m [out]`` sets its length. The layer (no bias here) computes

    y = (x @ W') * (m / n)                  (the ratio m / n scales each output column)

As in PEFT, the norm ``n`` is *detached*: in backward it is treated as a constant, so no gradient
flows through it into ``A`` and ``B``.

Fill in ``forward`` and ``backward``; ``backward`` returns ``(dL/dx, dL/dA, dL/dB, dL/dm)`` from
``g = dL/dy``. Grade them with ``python -m graphlora check 05_dora.py``: ``dL/dx`` and ``dL/dm``
against finite differences (the norm depends on neither), ``dL/dA`` and ``dL/dB`` against the
engine's DoRA layer (the detached norm makes them differ from the finite differences of y).
"""

import numpy as np

EXERCISE = "dora"


def forward(x, w, a, b, m, s):
    """``y = (x @ (W + s A @ B)) * (m / ||W + s A @ B||)``, the norm over each column."""
    raise NotImplementedError("forward")


def backward(g, x, w, a, b, m, s):
    """``(dL/dx, dL/dA, dL/dB, dL/dm)`` with the norm held constant."""
    raise NotImplementedError("backward")
