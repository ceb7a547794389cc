"""Argument checks shared by every module: real scalars, flags, axes, shapes, arrays, generators.

Each check takes ``where`` (the op or function being called) and the argument's name, and raises a
``TypeError``, ``ValueError`` or ``ShapeError`` whose message names both and the offending value,
or returns the argument in the one form the caller needs (a Python float, a tuple of axes, ...).
One place for these means one wording for each kind of mistake, and one rule for ``rng``.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from graphlora.errors import ShapeError

__all__ = [
    "Rng",
    "as_generator",
    "axes",
    "check_rng",
    "describe",
    "flag",
    "float_array",
    "int_tuple",
    "is_int",
    "one_axis",
    "positive_int",
    "probability",
    "real",
    "real_scalar",
    "resolve_shape",
]

Rng = np.random.Generator | int | None
"""What an ``rng`` argument may be: a Generator (draws go on from it), an int seed (the same
draws each time) or ``None`` (fresh entropy)."""


def describe(value: object) -> str:
    """A short description of a wrong argument: its type, and its shape or a short repr."""
    if isinstance(value, np.ndarray):
        return f"an ndarray of shape {value.shape} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__}: {text if len(text) <= 60 else text[:57] + '...'}"


def is_int(value: object) -> TypeGuard[int | np.integer[Any]]:
    """True for a Python or NumPy integer that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


_is_int = is_int


def _is_real(value: object) -> TypeGuard[float | int | np.integer[Any] | np.floating[Any]]:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def real_scalar(where: str, arg: str, value: object) -> float:
    """``value`` as a Python float if it is a real scalar (not a bool, array or string)."""
    if type(value) is float:
        return value
    if not _is_real(value):
        raise TypeError(
            f"{where}: {arg} must be a real scalar (int or float), got {type(value).__name__}: "
            f"{value!r:.60}"
        )
    return float(value)


def real(where: str, arg: str, value: object, low: float, high: float | None = None) -> float:
    """A finite real number in ``[low, high)`` (``high=None``: no upper bound), as a float."""
    if not _is_real(value):
        raise TypeError(f"{where}: {arg} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < low or (high is not None and number >= high):
        accepted = f">= {low:g}" if high is None else f"in [{low:g}, {high:g})"
        raise ValueError(f"{where}: {arg} must be {accepted}, got {value!r}")
    return number


def probability(where: str, arg: str, value: object) -> float:
    """A dropout probability: a real scalar in ``[0, 1)``."""
    p = real_scalar(where, arg, value)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{where}: {arg} must be in [0, 1), got {p}")
    return p


def positive_int(where: str, arg: str, value: object) -> int:
    """An int >= 1 (a size or a rank), as a Python int."""
    if not _is_int(value):
        raise TypeError(f"{where}: {arg} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{where}: {arg} must be >= 1, got {value}")
    return int(value)


def seed(where: str, arg: str, value: object) -> int | None:
    """A seed: ``None`` or an int >= 0, as a Python int."""
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(f"{where}: {arg} must be an int or None, got {value!r}")
    if value < 0:
        raise ValueError(f"{where}: {arg} must be >= 0, got {value}")
    return int(value)


def label(where: str, arg: str, value: object) -> str:
    """A name that can label a scope or a layer's leaves: a non-empty str without ``/``."""
    if not isinstance(value, str):
        raise TypeError(f"{where}: {arg} must be a str, got {type(value).__name__}")
    if not value or "/" in value:
        raise ValueError(f"{where}: {arg} must be a non-empty str without '/', got {value!r}")
    return value


def flag(where: str, arg: str, value: object) -> bool:
    """``value`` as a bool, if it is one (``True``/``False`` or a NumPy bool)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {arg} must be a bool, got {type(value).__name__}")
    return bool(value)


def int_tuple(where: str, arg: str, value: object) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints) as a tuple of Python ints."""
    items = (value,) if _is_int(value) else value
    if not isinstance(items, (tuple, list)) or not all(_is_int(i) for i in items):
        raise TypeError(f"{where}: {arg} must be an int or a tuple of ints, got {value!r:.60}")
    return tuple(int(i) for i in items)


def one_axis(where: str, axis: object, shape: tuple[int, ...]) -> int:
    """One axis of ``shape``, as a non-negative int."""
    if not _is_int(axis):
        raise TypeError(f"{where}: axis must be an int, got {type(axis).__name__}")
    if not -len(shape) <= axis < len(shape):
        raise ShapeError(f"{where}: axis {axis} is out of range for shape {shape}")
    return int(axis) % len(shape)


def axes(where: str, axis: object, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """``axis`` (``None``, an int or a tuple of ints) as a sorted tuple of non-negative axes, or
    ``None`` for all axes."""
    if axis is None:
        return None
    given = int_tuple(where, "axis", axis)
    ndim = len(shape)
    for a in given:
        if not -ndim <= a < ndim:
            raise ShapeError(f"{where}: axis {a} is out of range for shape {shape}")
    normalized = tuple(sorted(a % ndim for a in given))
    if len(set(normalized)) != len(normalized):
        raise ShapeError(f"{where}: axis {given} repeats an axis")
    return normalized


def resolve_shape(where: str, shape: object, old: tuple[int, ...]) -> tuple[int, ...]:
    """The target of a reshape, with a ``-1`` entry worked out; refuses impossible shapes."""
    new = int_tuple(where, "shape", shape)
    size = math.prod(old)
    unknown = [i for i, n in enumerate(new) if n == -1]
    if len(unknown) > 1 or any(n < -1 for n in new):
        raise ShapeError(f"{where}: shape {new} may hold at most one -1 and no other negatives")
    known = math.prod(n for n in new if n != -1)
    if unknown:
        if known == 0 or size % known:
            raise ShapeError(f"{where}: cannot reshape {old} ({size} elements) into {new}")
        new = (*new[: unknown[0]], size // known, *new[unknown[0] + 1 :])
    elif known != size:
        raise ShapeError(f"{where}: cannot reshape {old} ({size} elements) into {new}")
    return new


def float_array(where: str, arg: str, value: object) -> npt.NDArray[Any]:
    """``value`` as an array of floating-point data (not converted), or a clear error."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"{where}: {arg} is not a regular array: {exc}") from None
    if array.dtype.kind != "f":
        raise TypeError(f"{where}: {arg} must hold floating-point data, got dtype {array.dtype}")
    return array


def check_rng(where: str, rng: object) -> Rng:
    """``rng`` if it is a Generator, an int seed or ``None``; the seed as a Python int."""
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    if _is_int(rng):
        return int(rng)
    raise TypeError(
        f"{where}: rng must be a np.random.Generator, an int seed or None, got {type(rng).__name__}"
    )


def as_generator(where: str, rng: object) -> np.random.Generator:
    """The Generator to draw from: ``rng`` itself, or a new one from a seed (or from entropy).

    Called each time something is drawn, so that a seed draws the same numbers every time (in a
    recording and in each run of a compiled step alike) while a Generator goes on drawing.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(check_rng(where, rng))


def install_hint(extra: str) -> str:
    """How to install an optional extra, from PyPI and from a clone (as the README says)."""
    return f"pip install 'graphlora[{extra}]' (from a clone: pip install -e '.[{extra}]')"
