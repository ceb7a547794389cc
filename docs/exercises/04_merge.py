"""Exercise 4: merging an adapter into its weight, and taking it out again.

For inference the low-rank path can be folded into the weight: a layer with
``W' = W + (A @ B) * s`` computes ``x @ W'``, the same outputs as ``x @ W + ((x @ A) * s) @ B``
(up to rounding), with one matmul instead of three. To switch adapters, take it out again.

Fill in ``merge`` and ``unmerge``. Grade them with ``python -m graphlora check 04_merge.py``.
Then think: is ``unmerge(merge(W))`` exactly ``W``? (graphlora's ``LoraLinear.unmerge_`` keeps
the original aside; docs/lora-from-scratch.md section 5 measures why.)
"""

import numpy as np

EXERCISE = "merge"


def merge(w, a, b, s):
    """The merged weight ``W + (A @ B) * s`` (a new array)."""
    raise NotImplementedError("merge")


def unmerge(merged, a, b, s):
    """``W`` back from the merged weight (a new array)."""
    raise NotImplementedError("unmerge")
