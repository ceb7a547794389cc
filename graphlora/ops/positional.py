"""Rotary position embeddings as one op, ``rope``, and their frequencies (``rope_frequencies``),
as Llama-family models use them (transformers' half-split pairing)."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from graphlora._checks import real
from graphlora.errors import ShapeError
from graphlora.ops.registry import Array, Grads, Params, Vjp, builtin
from graphlora.ops.sampling import Draw, Sample

__all__ = ["ROPE_TYPES", "Llama3Scaling", "aligned", "rope_frequencies"]

ROPE_TYPES = ("default", "llama3")
"""The frequency schemes implemented: transformers' ``rope_type`` names."""

Llama3Scaling = tuple[float, float, float, float]
"""Llama 3's frequency scaling: ``(factor, low_freq_factor, high_freq_factor,
original_max_position_embeddings)``."""


def check_scaling(where: str, scaling: object) -> Llama3Scaling | None:
    """``scaling`` as ``rope`` takes it: ``None`` (the default scheme), or a mapping with
    transformers' ``rope_type`` (``"default"`` or ``"llama3"``) and, for llama3, its four fields;
    anything else is refused by name."""
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise TypeError(f"{where}: scaling must be a mapping or None, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"{where}: rope_type {kind!r} is not implemented; graphlora implements {ROPE_TYPES}"
        )
    if kind == "default":
        return None
    values = []
    for name in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ):
        if name not in scaling:
            raise ValueError(f"{where}: llama3 rope scaling needs {name}, got {dict(scaling)}")
        values.append(real(where, name, scaling[name], 0.0))
    factor, low, high, original = values
    if factor <= 0 or original <= 0 or not low < high:
        raise ValueError(
            f"{where}: llama3 rope scaling needs factor > 0, original_max_position_embeddings > 0 "
            f"and low_freq_factor < high_freq_factor, got {dict(scaling)}"
        )
    return factor, low, high, original


def _frequencies(dim: int, theta: float, scaling: Llama3Scaling | None = None) -> Array:
    """``rope_frequencies``, computed."""
    inv = 1.0 / theta ** (np.arange(0, dim - 1, 2, dtype=np.float64) / dim)
    if scaling is None:
        return inv
    factor, low, high, original = scaling
    wavelength = 2 * math.pi / inv
    scaled = np.where(wavelength > original / low, inv / factor, inv)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    result: Array = np.where(medium, blended, scaled)
    return result


# Kept for the next call with the same head width, theta and scaling (a model asks with the same
# ones in every layer and step); read-only. Wrapped here, not decorated, so that mutation testing
# reaches the function.
_cached_frequencies = functools.lru_cache(maxsize=16)(_frequencies)


def rope_frequencies(dim: int, theta: float, scaling: Llama3Scaling | None = None) -> Array:
    """The ``dim // 2`` rotation frequencies of a head of width ``dim``: ``theta ** (-2i / dim)``
    (float64), then with Llama 3's scaling, as transformers: wavelengths longer than
    ``original / low_freq_factor`` slowed by ``factor``, shorter than ``original /
    high_freq_factor`` kept, those between blended smoothly. Read-only (cached)."""
    found = _cached_frequencies(dim, theta, scaling)
    found.flags.writeable = False
    return found


def aligned(positions: Array, ndim: int) -> Array:
    """``positions [..., T]`` lined up with an ``x`` of ``ndim`` axes ``[..., T, d]``: their last
    axis on x's T axis, their leading axes on x's leading axes, and axes of one inserted for x's
    axes between (heads), as transformers' ``unsqueeze_dim``: ``[B, T]`` against ``[B, H, T, d]``
    becomes ``[B, 1, T]``."""
    missing = ndim - 1 - positions.ndim
    if missing <= 0 or positions.ndim == 0:
        return positions
    return positions.reshape(*positions.shape[:-1], *(1,) * missing, positions.shape[-1])


def _check_rope(
    x: Array, positions: Array, *, theta: object = 10000.0, scaling: object = None
) -> Params:
    where = "rope"
    if x.ndim < 1 or x.shape[-1] % 2:
        raise ShapeError(f"rope: x must be [..., d] with d even (pairs rotate), got {x.shape}")
    try:
        lined_up = aligned(positions, x.ndim).shape
        fits = np.broadcast_shapes(lined_up, x.shape[:-1]) == x.shape[:-1]
    except ValueError:
        fits = False
    if not fits:
        raise ShapeError(
            f"rope: positions of shape {positions.shape} do not line up with x's leading axes "
            f"{x.shape[:-1]} (positions [..., T]: the batch axes, then T)"
        )
    value = real(where, "theta", theta, 0.0)
    if value <= 0.0:
        raise ValueError(f"rope: theta must be > 0, got {theta!r}")
    return {"theta": value, "scaling": check_scaling(where, scaling)}


def _rope_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    *lead, d = draw.shape(min_dims=2, max_dims=4)
    return (draw.floats((*lead, 2 * d)),)


def _rope_params(draw: Draw, x: Array) -> Params:  # pragma: no mutate block
    positions = x.shape[:-1] if draw.choice([False, True]) else x.shape[-2:-1]
    scaling = draw.choice(
        [
            None,
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ]
    )
    return {
        "positions": draw.ints(positions, 0, 40),
        "theta": draw.choice([10000.0, 3.0]),
        "scaling": scaling,
    }


def _torch_rope(
    t: Any, x: Any, positions: Any, theta: float = 10000.0, scaling: Any = None
) -> Any:  # pragma: no mutate block
    # transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, cos = cat(f, f).cos()
    inv = t.from_numpy(rope_frequencies(x.shape[-1], theta, check_scaling("rope", scaling)))
    freqs = positions[..., None].to(t.float64) * inv
    emb = t.cat((freqs, freqs), dim=-1)
    half = x.shape[-1] // 2
    rotated = t.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * emb.cos().to(x.dtype) + rotated * emb.sin().to(x.dtype)


def _rope(
    x: Array, positions: Array, *, theta: float, scaling: Llama3Scaling | None
) -> tuple[Array, Vjp]:  # the keywords' defaults are the check's, which always gives them
    """Rotary position embedding of ``x [..., T, d]`` at integer ``positions [..., T]`` (lined
    up with ``x``'s leading axes by ``aligned``, then broadcast): the pair ``(x[i], x[i +
    d/2])`` turned by the angle ``position * f[i]``, ``f = rope_frequencies(d, theta,
    scaling)`` (transformers' half-split pairing: ``x cos + rotate_half(x) sin``). Angles and
    their sines are computed in float64.
    VJP: the turn back, ``(g1 cos + g2 sin, g2 cos - g1 sin)``; positions get none."""
    half = x.shape[-1] // 2
    lined_up = aligned(positions, x.ndim)
    angles = lined_up[..., None] * rope_frequencies(2 * half, theta, scaling)  # (..., d/2)
    cos, sin = np.cos(angles).astype(x.dtype), np.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    out = np.empty_like(x)
    np.subtract(x1 * cos, x2 * sin, out=out[..., :half])
    np.add(x2 * cos, x1 * sin, out=out[..., half:])

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        g1, g2 = g[..., :half], g[..., half:]
        grad = np.empty_like(g)
        np.add(g1 * cos, g2 * sin, out=grad[..., :half])
        np.subtract(g2 * cos, g1 * sin, out=grad[..., half:])
        return grad, None

    return out, vjp


rope = builtin(
    _rope,
    check=_check_rope,
    data={"positions": "int"},
    sample=Sample(_rope_inputs, _rope_params, fits=lambda x: x.ndim >= 2 and x.shape[-1] % 2 == 0),
    torch=_torch_rope,
)
