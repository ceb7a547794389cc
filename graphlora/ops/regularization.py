"""Regularisation: inverted ``dropout`` and the ``dropout_mask`` it draws (which attention and the
fused layers built on the ops draw too)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from graphlora._checks import Rng, check_rng, probability
from graphlora.ops.registry import Array, Grads, Params, Vjp, builtin
from graphlora.ops.sampling import Draw, elementwise

__all__ = ["dropout", "dropout_mask"]


def dropout_mask(shape: tuple[int, ...], dtype: npt.DTypeLike, p: float, rng: Rng) -> Array:
    """The mask of inverted dropout: ``0`` with probability ``p``, else ``1 / (1 - p)``.

    ``rng`` is a Generator, which draws the next mask, or an already checked int seed or
    ``None``, from which a new Generator draws (the same mask every time for a seed)."""
    generator = np.random.default_rng(rng)  # a Generator comes back as it is
    mask: Array = (generator.random(shape) >= p).astype(dtype)
    mask *= 1.0 / (1.0 - p)
    return mask


def _check_dropout(x: Array, *, p: object, rng: object = None) -> Params:
    return {"p": probability("dropout", "p", p), "rng": check_rng("dropout", rng)}


def _dropout_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    return {"p": draw.choice([0.25, 0.5, 0.9]), "rng": draw.choice(range(1000))}


def _dropout(x: Array, *, p: float, rng: Rng = None) -> tuple[Array, Vjp]:
    """Inverted dropout: zero each element with probability ``p``, scale the rest by
    ``1/(1-p)``. ``rng``: a Generator (each call draws the next mask), an int seed (the same
    mask every call) or ``None``.  VJP: ``(g * mask,)`` with the same mask."""
    mask = dropout_mask(x.shape, x.dtype, p, rng)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        return (g * mask,)

    return x * mask, vjp


dropout = builtin(
    _dropout, check=_check_dropout, sample=elementwise(params=_dropout_params), smooth=False
)
