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
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora import _checks
from graphlora.lora.nf4 import NF4Weight

__all__ = [
    "INDEX",
    "PICKLE_NAMES",
    "Weights",
    "check_layers",
    "folder",
    "load_tensors",
    "model_files",
    "open_model",
    "read_json",
    "refuse_pickle",
    "safetensors_module",
    "save_pretrained",
    "staging",
    "tensors",
    "write_atomic",
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
    """Every tensor of the safetensors ``file`` (an adapter's: small), bfloat16 ones widened to
    float32 exactly (as ``tensors`` reads them), or a ``ValueError`` naming ``where`` for a file
    safetensors cannot read."""
    with _open(where, file) as handle:
        kinds = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118
        layout = _layout(file) if "BF16" in kinds.values() else {}
        found: dict[str, npt.NDArray[Any]] = {}
        for key, kind in kinds.items():
            try:
                found[key] = (
                    _direct(where, file, layout, key) if kind == "BF16" else handle.get_tensor(key)
                )
            except Exception as error:  # safetensors' own errors, a short file, a dtype NumPy lacks
                raise ValueError(
                    f"{where}: {file} is not a readable safetensors file (corrupted, truncated, or "
                    f"of a dtype NumPy lacks): {error}"
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


def check_layers(
    where: str, files: Path | Sequence[Path], pattern: str, count: int, field: str
) -> None:
    """Refuse a config whose layer count (``field``, ``count``) is not the files': the layer
    indices that ``pattern`` (a regular expression with the index as its first group) finds in
    the headers' keys must be exactly ``0 .. count - 1``. Checked before the caller lists
    ``count`` layers' names, so that a config claiming 10**9 layers costs nothing."""
    paths = [files] if isinstance(files, Path) else list(files)
    found: set[int] = set()
    for file in paths:
        with _open(where, file) as handle:
            found |= {int(m.group(1)) for key in handle.keys() if (m := re.match(pattern, key))}  # noqa: SIM118
    if len(found) != count or (found and max(found) != count - 1):  # indices are >= 0
        if not found:
            held = "no layers"
        elif found == set(range(len(found))):
            held = f"layers 0..{len(found) - 1}"
        else:
            held = f"layers {sorted(found)[:10]}"
        shown = paths[0] if len(paths) == 1 else paths[0].parent
        raise ValueError(f"{where}: the config says {field}={count} but {shown} holds {held}")


INDEX = "model.safetensors.index.json"
"""The index of a sharded checkpoint: ``{"weight_map": {key: shard file name}}``."""


def model_files(where: str, directory: Path) -> list[Path]:
    """The safetensors files of a transformers checkpoint folder: ``model.safetensors``, or the
    shards a ``model.safetensors.index.json`` names (each a plain file name in the folder, each
    existing). A folder with only pickles (``pytorch_model.bin``) is refused unopened."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / INDEX
    if not index.is_file():
        refuse_pickle(
            where, directory, "model.safetensors", "Save it with safe_serialization=True."
        )
    weight_map = read_json(where, index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{where}: {index} has no weight_map of tensor names to shard files")
    names = []
    for key, name in weight_map.items():
        if (
            not isinstance(name, str)
            or Path(name).name != name
            or not name.endswith(".safetensors")
        ):
            raise ValueError(
                f"{where}: {index} maps {key!r} to {name!r}, not a .safetensors file in the folder"
            )
        if name not in names:
            names.append(name)
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{where}: {index} names shards that are not there: {missing[:5]}")
    return [directory / name for name in names]


def _shard_keys(where: str, files: Sequence[Path], handles: Sequence[Any]) -> None:
    """Refuse shards whose keys are not the index's: every key in the shard the index names."""
    index = files[0].parent / INDEX
    if files[0].name == "model.safetensors" or not index.is_file():
        return  # one file: nothing to match
    weight_map = read_json(where, index)["weight_map"]
    found = {}
    for file, handle in zip(files, handles, strict=True):
        found.update(dict.fromkeys(handle.keys(), file.name))
    wrong = sorted(
        key for key in set(weight_map) | set(found) if weight_map.get(key) != found.get(key)
    )
    if wrong:
        raise ValueError(
            f"{where}: {index} does not match its shards: {wrong[:5]} are listed in another shard "
            "than the one holding them, or not at all"
        )


@contextmanager
def tensors(
    where: str,
    files: Path | Sequence[Path],
    expected: Mapping[str, tuple[int, ...]],
    *,
    rename: Callable[[str], str] = str,
    skip: Callable[[str], bool] = lambda name: False,
    transpose: Callable[[str], bool] = lambda name: False,
    about: str = "its config",
) -> Iterator[Weights]:
    """Open the safetensors ``files`` (one, or a sharded checkpoint's), check them against
    ``expected`` (leaf name -> shape) from their headers alone, and yield ``weights(name,
    shape)``, which reads one tensor at a time.

    ``rename`` maps a stored key to its leaf name (a missing prefix, say); ``skip`` drops keys
    the model does not hold (buffers, a tied head); ``transpose`` tells the leaves stored the
    other way round (their stored shape is the transpose of the expected one). Missing,
    unexpected, duplicate (two keys with one leaf name), mis-shaped, non-float and non-finite
    tensors are refused together, naming them, before the caller makes any leaf; so are shards
    that do not hold what their index says. float16, bfloat16 (what most small models ship:
    read from the file's bytes and widened to float32, exactly, since NumPy has no bfloat16),
    float32 and float64 are read.

    Raises
    ------
    ValueError
        For a file safetensors cannot read and for any tensor that does not fit.
    """
    paths = [files] if isinstance(files, Path) else list(files)
    shown = paths[0] if len(paths) == 1 else paths[0].parent
    with ExitStack() as stack:
        handles = [stack.enter_context(_open(where, file)) for file in paths]
        _shard_keys(where, paths, handles)
        stored: dict[str, tuple[int, str]] = {}
        duplicates = []
        for number, handle in enumerate(handles):
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                name = rename(key)
                if skip(name):
                    continue
                if name in stored:
                    duplicates.append(f"{stored[name][1]} and {key}")
                stored[name] = (number, key)
        headers = {name: handles[n].get_slice(key) for name, (n, key) in stored.items()}
        shapes = {name: tuple(header.get_shape()) for name, header in headers.items()}
        for name in shapes:
            if transpose(name):
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
                f"{where}: {shown} does not fit {about}: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, wrong shapes {wrong[:5]}, not a float type {kinds[:5]}, "
                f"two keys for one weight {duplicates[:5]}"
            )

        # Each tensor is read from the file into an array of its own (not through safetensors'
        # memory map, whose pages would count in the process's resident memory until the file
        # closes: a whole checkpoint's worth, above what the model holds).
        layouts = {number: _layout(paths[number]) for number in {n for n, _ in stored.values()}}

        def read(name: str) -> npt.NDArray[Any]:
            number, key = stored[name]
            return _direct(where, paths[number], layouts[number], key)

        bad = [n for n in sorted(expected) if not np.isfinite(read(n)).all()]
        if bad:
            raise ValueError(f"{where}: {shown} holds NaN or Inf in {bad[:5]}")

        def weights(name: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
            array = read(name)
            return np.transpose(array) if transpose(name) else array

        yield weights


@contextmanager
def open_model(
    where: str,
    directory: Path,
    expected: Callable[[], Mapping[str, tuple[int, ...]]],
    *,
    layers: tuple[str, int, str],
    rename: Callable[[str], str] = str,
    skip: Callable[[str], bool] = lambda name: False,
    transpose: Callable[[str], bool] = lambda name: False,
    about: str = "its config",
) -> Iterator[Weights]:
    """A checkpoint folder's weights, every check made first: its files (``model_files``), its
    layer count (``check_layers`` with ``layers = (pattern, count, field)``), then ``tensors``
    against ``expected()``, called only after the layer count is checked, so that a config
    claiming 10**9 layers never lists their names."""
    files = model_files(where, directory)
    pattern, count, field = layers
    check_layers(where, files, pattern, count, field)
    with tensors(
        where, files, expected(), rename=rename, skip=skip, transpose=transpose, about=about
    ) as weights:
        yield weights


def save_pretrained(
    where: str,
    model: object,
    graph: Any,
    path: str | os.PathLike[str],
    config: Mapping[str, Any],
    *,
    expected: Collection[str],
    transpose: Callable[[str], bool] = lambda name: False,
    overwrite: bool = False,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into the folder ``path`` as transformers'
    ``save_pretrained`` does: the model's leaves named in ``expected`` (its base weights: a
    LoRA layer's merged weight when merged, its base weight otherwise; a 4-bit weight
    dequantized, so that the folder holds a float model), those ``transpose``
    tells stored ``[out, in]``, in the graph's dtype. The folder is written beside ``path`` and
    renamed into place (``staging``)."""
    from graphlora.nn.tree import named_modules, state_dict

    st = safetensors_module(where)
    state = state_dict(graph, model)
    for name, module in named_modules(model):  # 4-bit weights are no leaves: dequantized
        for attr in ("weight", "nf4"):
            value = getattr(module, attr, None)
            if isinstance(value, NF4Weight):
                state[f"{name}.weight"] = value.dequantize(graph.dtype).T
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{where}: the model has no leaves {missing[:5]}")
    tensors = {
        name: np.ascontiguousarray(state[name].T if transpose(name) else state[name])
        for name in expected
    }
    data = st.numpy.save(tensors, metadata={"format": "pt"})
    text = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    target = Path(path)
    with staging(target, overwrite, where) as folder:
        (folder / "model.safetensors").write_bytes(data)
        (folder / "config.json").write_text(text, encoding="utf-8")
    return target


def write_atomic(file: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``file``, then rename it into place."""
    handle, temporary = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.tmp-")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def staging(path: Path, overwrite: bool, where: str) -> Iterator[Path]:
    """A fresh temporary directory beside ``path`` that replaces ``path`` when the block succeeds.

    The old directory is moved aside first and deleted only after the new one is in place; any
    failure (including KeyboardInterrupt) restores it and removes the temporary one.
    """
    if path.exists() and not overwrite:
        raise FileExistsError(f"{where}: {path} already exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{where}: {path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    backup = None
    try:
        yield staging
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, backup / path.name)
        os.replace(staging, path)
    except BaseException:
        if backup is not None and not path.exists():
            os.replace(backup / path.name, path)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def _layout(file: Path) -> dict[str, Any]:
    """The safetensors header of ``file`` (``{key: {"dtype", "shape", "data_offsets"}}``) and,
    under ``""``, where its data starts. safetensors has already checked the file's header."""
    with open(file, "rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        header: dict[str, Any] = json.loads(stream.read(size))
    header[""] = 8 + size
    return header


_STORED = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}


def _direct(where: str, file: Path, layout: Mapping[str, Any], key: str) -> npt.NDArray[Any]:
    """One float tensor of ``file`` read with a plain file read (``np.fromfile``), bfloat16
    widened to float32; a ``ValueError`` naming ``where`` for a file that holds fewer bytes than
    its header promises."""
    entry = layout[key]  # its offsets fit its shape: safetensors checked the header
    count = int(np.prod(entry["shape"]))
    offset = layout[""] + entry["data_offsets"][0]
    data = np.fromfile(file, dtype=_STORED[entry["dtype"]], count=count, offset=offset)
    if data.size != count:
        raise ValueError(
            f"{where}: cannot read {key}: {file.name} holds {data.size} of its {count} values"
        )
    if entry["dtype"] == "BF16":
        data = (data.astype("<u4") << 16).view("<f4")
    shaped: npt.NDArray[Any] = data.reshape(entry["shape"])
    return shaped
