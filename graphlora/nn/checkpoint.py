"""Reading transformers' checkpoint folders: the one reader every architecture uses.

A model file says which names go where (its expected shapes, how a stored key maps to its leaf
name, which keys to skip, which weights to transpose); this module opens the folder, refuses
pickles unopened, reads ``config.json``, and checks every tensor's name, shape and dtype from the
safetensors header before the model makes a single leaf. Adapter files (``graphlora.io``) use
the same JSON, pickle and safetensors helpers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora import _checks

__all__ = [
    "PICKLE_NAMES",
    "Weights",
    "check_layers",
    "folder",
    "load_tensors",
    "read_json",
    "refuse_pickle",
    "safetensors_module",
    "tensors",
]

PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "model.bin", "adapter_model.pt")
"""The pickle files transformers and PEFT write without ``safe_serialization``."""

Weights = Callable[[str, tuple[int, ...]], npt.NDArray[Any]]
"""``weights(name, shape)``: the array for the leaf ``name`` (``transformer.wte.weight``, ...)."""

_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names of the floats read here


def safetensors_module(where: str = "adapter files") -> Any:
    """The ``safetensors`` package (with its NumPy API), or an ImportError that says how to get
    it."""
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            f"{where} needs the safetensors package: {_checks.install_hint('adapters')}"
        ) from None
    return safetensors


def folder(where: str, path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory, or ``FileNotFoundError`` naming ``where``."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{where}: {directory} is not a directory")
    return directory


def refuse_pickle(where: str, directory: Path, wanted: str, hint: str) -> None:
    """Raise when ``directory`` has no ``wanted`` file: ``ValueError`` if it holds a pickle in
    its place (never opened: unpickling can run code), else ``FileNotFoundError``."""
    if (directory / wanted).is_file():
        return
    pickled = [name for name in PICKLE_NAMES if (directory / name).exists()]
    if pickled:
        raise ValueError(
            f"{where}: {directory / pickled[0]} is a pickle file, which can run arbitrary code "
            f"when loaded; graphlora never unpickles. {hint}"
        )
    raise FileNotFoundError(f"{where}: {directory} has no {wanted}")


def read_json(where: str, file: Path) -> dict[str, Any]:
    """The JSON object in ``file``: ``FileNotFoundError`` if missing, ``ValueError`` if it is not
    valid JSON or not an object."""
    if not file.is_file():
        raise FileNotFoundError(f"{where}: {file.parent} has no {file.name}")
    try:
        found = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{where}: {file} is not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{where}: {file} is nested too deeply to be a config") from None
    if not isinstance(found, dict):
        raise ValueError(f"{where}: {file} holds {type(found).__name__}, not a JSON object")
    return found


def load_tensors(where: str, file: Path) -> dict[str, npt.NDArray[Any]]:
    """Every tensor of the safetensors ``file`` (an adapter's: small), or a ``ValueError`` naming
    ``where`` for a file safetensors cannot read."""
    try:
        found: dict[str, npt.NDArray[Any]] = safetensors_module(where).numpy.load_file(str(file))
    except Exception as error:  # safetensors raises its own error type, or others on bad dtypes
        raise ValueError(
            f"{where}: {file} is not a readable safetensors file (corrupted, truncated or of a "
            f"dtype NumPy lacks, such as bfloat16): {error}"
        ) from None
    return found


def _open(where: str, file: Path) -> Any:
    """``safe_open(file)`` for NumPy, or a ``ValueError`` naming ``where``."""
    st = safetensors_module(where)
    try:
        return st.safe_open(str(file), framework="numpy")
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(
            f"{where}: {file} is not a readable safetensors file (corrupted or truncated): {error}"
        ) from None


def check_layers(where: str, file: Path, pattern: str, count: int, field: str) -> None:
    """Refuse a config whose layer count (``field``, ``count``) is not the file's: the layer
    indices that ``pattern`` (a regular expression with the index as its first group) finds in
    the header's keys must be exactly ``0 .. count - 1``. Checked before the caller lists
    ``count`` layers' names, so that a config claiming 10**9 layers costs nothing."""
    with _open(where, file) as handle:
        found = {int(m.group(1)) for key in handle.keys() if (m := re.match(pattern, key))}  # noqa: SIM118
    if len(found) != count or (found and max(found) != count - 1):  # indices are >= 0
        if not found:
            held = "no layers"
        elif found == set(range(len(found))):
            held = f"layers 0..{len(found) - 1}"
        else:
            held = f"layers {sorted(found)[:10]}"
        raise ValueError(f"{where}: the config says {field}={count} but {file} holds {held}")


@contextmanager
def tensors(
    where: str,
    file: Path,
    expected: Mapping[str, tuple[int, ...]],
    *,
    rename: Callable[[str], str] = str,
    skip: Callable[[str], bool] = lambda name: False,
    transpose: Collection[str] = (),
    about: str = "its config",
) -> Iterator[Weights]:
    """Open the safetensors ``file``, check it against ``expected`` (leaf name -> shape) from its
    header alone, and yield ``weights(name, shape)``, which reads one tensor at a time.

    ``rename`` maps a stored key to its leaf name (a missing prefix, say); ``skip`` drops keys
    the model does not hold (buffers, a tied head); ``transpose`` names the leaves stored the
    other way round (their stored shape is the transpose of the expected one). Missing,
    unexpected, duplicate (two keys with one leaf name), mis-shaped, non-float and non-finite
    tensors are refused together, naming them, before the caller makes any leaf. float16,
    bfloat16 (what most small models ship: read from the file's bytes and widened to float32,
    exactly, since NumPy has no bfloat16), float32 and float64 are read.

    Raises
    ------
    ValueError
        For a file safetensors cannot read and for any tensor that does not fit.
    """
    with _open(where, file) as handle:
        stored: dict[str, str] = {}
        duplicates = []
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            name = rename(key)
            if skip(name):
                continue
            if name in stored:
                duplicates.append(f"{stored[name]} and {key}")
            stored[name] = key
        headers = {name: handle.get_slice(key) for name, key in stored.items()}
        shapes = {name: tuple(header.get_shape()) for name, header in headers.items()}
        for name in set(transpose) & set(shapes):
            shapes[name] = shapes[name][::-1]
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        wrong = [
            f"{n} {shapes[n]} (needs {expected[n]})"
            for n in sorted(set(stored) & set(expected))
            if shapes[n] != tuple(expected[n])
        ]
        kinds = [
            f"{n} ({headers[n].get_dtype()})"
            for n in sorted(set(stored) & set(expected))
            if headers[n].get_dtype() not in _FLOAT_DTYPES
        ]
        if missing or unexpected or wrong or kinds or duplicates:
            raise ValueError(
                f"{where}: {file} does not fit {about}: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, wrong shapes {wrong[:5]}, not a float type {kinds[:5]}, "
                f"two keys for one weight {duplicates[:5]}"
            )

        widened = {n for n, h in headers.items() if h.get_dtype() == "BF16"}
        layout = _layout(file) if widened else {}

        def read(name: str) -> npt.NDArray[Any]:
            if name in widened:
                return _bfloat16(file, layout, stored[name])
            return _read(where, handle, stored[name])

        bad = [n for n in sorted(expected) if not np.isfinite(read(n)).all()]
        if bad:
            raise ValueError(f"{where}: {file} holds NaN or Inf in {bad[:5]}")

        def weights(name: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
            array = read(name)
            return np.transpose(array) if name in transpose else array

        yield weights


def _read(where: str, handle: Any, key: str) -> npt.NDArray[Any]:
    """One tensor of an open safetensors file, or a ``ValueError`` naming ``where`` (a file whose
    header promises more bytes than it holds)."""
    try:
        array: npt.NDArray[Any] = handle.get_tensor(key)
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"{where}: cannot read {key}: {error}") from None
    return array


def _layout(file: Path) -> dict[str, Any]:
    """The safetensors header of ``file`` (``{key: {"dtype", "shape", "data_offsets"}}``) and,
    under ``""``, where its data starts. safetensors has already checked the file's header."""
    with open(file, "rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        header: dict[str, Any] = json.loads(stream.read(size))
    header[""] = 8 + size
    return header


def _bfloat16(file: Path, layout: Mapping[str, Any], key: str) -> npt.NDArray[Any]:
    """A bfloat16 tensor of ``file`` as float32: each value's 16 bits are the top half of the
    float32 with the same value, so the widening is exact."""
    entry = layout[key]  # its offsets fit its shape and the file: safetensors checked them
    count = int(np.prod(entry["shape"]))
    bits = np.fromfile(file, dtype="<u2", count=count, offset=layout[""] + entry["data_offsets"][0])
    widened: npt.NDArray[Any] = (bits.astype("<u4") << 16).view("<f4").reshape(entry["shape"])
    return widened
