"""Adapter files in PEFT's layout: save graphlora adapters that PEFT loads as they are, and load
adapters saved by PEFT (or by graphlora) into ``LoraLinear`` layers.

An adapter directory holds ``adapter_model.safetensors`` and ``adapter_config.json``. Tensor keys
are ``base_model.model.<name>.lora_A.weight`` (shape ``[rank, in]``: our A transposed, as PyTorch's
``nn.Linear`` stores ``[out, in]``) and ``base_model.model.<name>.lora_B.weight`` (``[out, rank]``);
PEFT may also spell them with an adapter name, ``.lora_A.default.weight``. The frozen base weights
are never saved. Writes are atomic: files go to a temporary directory that replaces the target only
once complete, so an interrupted save leaves any earlier adapter intact. Loading checks everything
before assigning anything, and nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graphlora.errors import GraphError, ShapeError
from graphlora.functional import lora_scaling
from graphlora.graph import Graph, check_graph
from graphlora.lora import LoraLinear
from graphlora.ops import Array

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterFile",
    "adapter_config",
    "load_adapter",
    "read_adapter",
    "save_adapter",
    "save_merged",
]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt")
_KEY = re.compile(
    r"^base_model\.model\.(?P<name>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def safetensors_module(where: str = "adapter files") -> Any:
    """The ``safetensors`` package (with its NumPy API), or an ImportError that says how to get
    it."""
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            f"{where} needs the safetensors package: pip install 'graphlora[adapters]' "
            "(from a clone: pip install -e '.[adapters]')"
        ) from None
    return safetensors


# --- saving -------------------------------------------------------------------------------------


def _most_common(values: list[Any]) -> Any:
    """The most frequent value; the first one seen among equally frequent ones."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def _check_layers(where: str, layers: object) -> dict[str, LoraLinear]:
    """``layers`` as ``{name: LoraLinear}``: a mapping as given, or a model's LoRA layers."""
    if not isinstance(layers, Mapping):
        from graphlora.nn import is_module, lora_layers

        if is_module(layers):
            layers = lora_layers(layers)
            if not layers:
                raise ValueError(f"{where}: the model has no LoRA layer (apply_lora first)")
    if not isinstance(layers, Mapping) or not layers:
        raise TypeError(
            f"{where}: layers must be a model with LoRA layers or a non-empty mapping of names to "
            "LoraLinear"
        )
    for name, layer in layers.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"{where}: layer name {name!r} must be dotted identifiers such as 'layers.0' or "
                "'model.q_proj'"
            )
        if not isinstance(layer, LoraLinear):
            raise TypeError(
                f"{where}: layers[{name!r}] must be a LoraLinear, got {type(layer).__name__}"
            )
    return dict(layers)


def adapter_config(layers: Mapping[str, LoraLinear]) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT expects for ``layers`` (a ``LoraConfig``'s fields).

    ``r`` and ``lora_alpha`` are the most common rank and alpha; layers that differ are listed in
    ``rank_pattern`` and ``alpha_pattern`` by their full names. ``fan_in_fan_out`` is true for
    layers over weights stored ``[in, out]`` in the source framework (GPT-2's ``Conv1D``), so
    that PEFT merges them the right way round.

    Raises
    ------
    ValueError
        When the layers differ in ``use_rslora``, dropout or init kind (PEFT has one of each).
    """
    where = "save_adapter"
    layers = _check_layers(where, layers)
    names = list(layers)
    for field in ("use_rslora", "dropout"):
        seen = {getattr(layer.config, field) for layer in layers.values()}
        if len(seen) > 1:
            raise ValueError(
                f"{where}: the layers differ in {field} ({sorted(seen)}); PEFT has one"
            )
    pissa = {layer.config.init == "pissa" for layer in layers.values()}
    if len(pissa) > 1:
        raise ValueError(f"{where}: some layers use init='pissa' and some do not; PEFT has one")
    layouts = {layer.fan_in_fan_out for layer in layers.values()}
    if len(layouts) > 1:
        raise ValueError(
            f"{where}: some layers come from [in, out] weights (GPT-2's Conv1D) and some do not; "
            "PEFT's fan_in_fan_out is one flag for all: save them separately"
        )
    ranks = [layers[n].rank for n in names]
    alphas = [float(layers[n].config.alpha) for n in names]
    r, alpha = _most_common(ranks), _most_common(alphas)
    first = next(iter(layers.values())).config
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": int(r),
        "lora_alpha": _json_number(alpha),
        "lora_dropout": first.dropout,
        "use_rslora": first.use_rslora,
        "target_modules": sorted(names),
        "fan_in_fan_out": True in layouts,
        "bias": "none",
        # PEFT inits A and B on load and then overwrites them, except PiSSA, which also
        # rewrites the base weight into the residual that the saved A and B expect.
        "init_lora_weights": "pissa" if True in pissa else True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {n: int(k) for n, k in zip(names, ranks, strict=True) if k != r},
        "alpha_pattern": {
            n: _json_number(a) for n, a in zip(names, alphas, strict=True) if a != alpha
        },
    }


def _json_number(value: float) -> float | int:
    """Integral floats as ints (PEFT writes ``lora_alpha: 16``); others as they are."""
    return int(value) if float(value).is_integer() else float(value)


def _tensors(graph: Graph, layers: Mapping[str, LoraLinear]) -> dict[str, Array]:
    tensors = {}
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(graph.value(layer.lora_a).T)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(graph.value(layer.lora_b).T)
    return tensors


@contextlib.contextmanager
def _staging(path: Path, overwrite: bool, where: str) -> Iterator[Path]:
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


def _write_bytes(target: Path, data: bytes) -> None:
    with open(target, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_adapter(
    path: str | os.PathLike[str],
    graph: Graph,
    layers: Mapping[str, LoraLinear] | object,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``layers``' adapters to the directory ``path``, in the layout PEFT loads.

    Parameters
    ----------
    path
        The adapter directory to create.
    graph
        The graph holding the layers.
    layers
        A model (its LoRA layers are saved under their dotted names), or ``{module name:
        LoraLinear}``; the names are the PyTorch module names the adapters belong to
        (``"layers.0"``, ``"transformer.h.0.attn.c_attn"``, ...).
    overwrite
        Replace an existing directory (atomically). Without it, an existing path is an error.

    Returns
    -------
    Path
        The directory written.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    ValueError, TypeError
        For bad names or layers PEFT cannot express together; nothing is written.
    """
    where = "save_adapter"
    check_graph(where, graph)
    st = safetensors_module(where)
    layers = _check_layers(where, layers)
    config = adapter_config(layers)
    tensors = _tensors(graph, layers)
    target = Path(path)
    with _staging(target, overwrite, "save_adapter") as staging:
        _write_bytes(staging / WEIGHTS_NAME, st.numpy.save(tensors, metadata={"format": "pt"}))
        _write_bytes(staging / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return target


def save_merged(
    path: str | os.PathLike[str],
    graph: Graph,
    layers: Mapping[str, LoraLinear] | object,
    *,
    layout: str = "torch",
    overwrite: bool = False,
) -> Path:
    """Write the merged weights ``W + A @ B * scaling`` (and biases) as one safetensors file.

    For deployment without LoRA. Keys are ``<name>.weight`` and ``<name>.bias``, as in a PyTorch
    ``state_dict``. ``layout="torch"`` stores weights ``[out, in]`` (load them into ``nn.Linear``);
    ``layout="graphlora"`` keeps ``[in, out]``. The file is written to a temporary file and
    renamed into place. Merged layers contribute their current (merged) weight.
    """
    where = "save_merged"
    if layout not in ("torch", "graphlora"):
        raise ValueError(f"{where}: layout must be 'torch' or 'graphlora', got {layout!r}")
    check_graph(where, graph)
    st = safetensors_module(where)
    layers = _check_layers(where, layers)
    tensors = {}
    for name, layer in layers.items():
        weight = layer.merge(graph)
        tensors[f"{name}.weight"] = np.ascontiguousarray(weight.T if layout == "torch" else weight)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = np.array(graph.value(layer.bias))
    target = Path(path)
    if target.is_dir():
        raise FileExistsError(f"{where}: {target} is a directory, not a file to write")
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{where}: {target} already exists; pass overwrite=True to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    data = st.numpy.save(tensors, metadata={"format": "pt", "layout": layout})
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        _write_bytes(temporary, data)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


# --- reading and loading ------------------------------------------------------------------------


class AdapterFile:
    """An adapter directory read into memory: its config and, per module name, A and B.

    ``a[name]`` is ``[rank, in]`` and ``b[name]`` is ``[out, rank]``, as stored (PyTorch layout).
    """

    def __init__(
        self, path: Path, config: dict[str, Any], a: dict[str, Array], b: dict[str, Array]
    ) -> None:
        self.path = path
        self.config = config
        self.a = a
        self.b = b

    def rank(self, name: str) -> int:
        """The rank the config gives module ``name`` (``rank_pattern``, else ``r``)."""
        return int(_pattern_value(self.config.get("rank_pattern") or {}, name, self.config["r"]))

    def alpha(self, name: str) -> float:
        """The alpha the config gives module ``name`` (``alpha_pattern``, else ``lora_alpha``)."""
        return float(
            _pattern_value(self.config.get("alpha_pattern") or {}, name, self.config["lora_alpha"])
        )

    def scaling(self, name: str) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``."""
        rslora = bool(self.config.get("use_rslora"))
        return lora_scaling(self.rank(name), self.alpha(name), use_rslora=rslora)


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's lookup: an exact key, else the first key matching the end of ``name`` as a regex."""
    if name in pattern:
        return pattern[name]
    for key, value in pattern.items():
        with contextlib.suppress(re.error):
            if re.match(rf"(.*\.)?({key})$", name):
                return value
    return default


def read_adapter(path: str | os.PathLike[str]) -> AdapterFile:
    """Read and check an adapter directory written by graphlora or by PEFT's ``save_pretrained``.

    Raises
    ------
    FileNotFoundError
        For a missing directory or missing files.
    ValueError
        For pickle-based weights (refused, never opened), corrupted or truncated files, a config
        that is not a LoRA config, and keys that are not LoRA A/B weights.
    """
    where = "read_adapter"
    st = safetensors_module(where)
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{where}: {directory} is not a directory")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [n for n in _PICKLE_NAMES if (directory / n).exists()]
        if pickled:
            raise ValueError(
                f"{where}: {directory / pickled[0]} is a pickle file, which can run arbitrary "
                "code when loaded; graphlora never unpickles. Re-save the adapter with "
                "safetensors (PEFT: save_pretrained(..., safe_serialization=True))"
            )
        raise FileNotFoundError(f"{where}: {directory} has no {WEIGHTS_NAME}")
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{where}: {directory} has no {CONFIG_NAME}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{where}: {config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: {config_file} is not a LoRA adapter config (peft_type 'LORA')")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), kind):
            raise ValueError(f"{where}: {config_file} has no valid {key!r}: {config.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ValueError(f"{where}: {config_file} has a {key} that is not a mapping")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{where}: {config_file} has a use_rslora that is not true/false")
    if config.get("use_dora"):
        raise ValueError(f"{where}: {config_file} is a DoRA adapter; graphlora supports plain LoRA")
    try:
        tensors = st.numpy.load_file(str(weights))
    except Exception as error:  # safetensors raises its own error type, or others on bad dtypes
        raise ValueError(
            f"{where}: {weights} is not a readable safetensors file (corrupted, truncated or of a "
            f"dtype NumPy lacks, such as bfloat16): {error}"
        ) from None
    a: dict[str, Array] = {}
    b: dict[str, Array] = {}
    adapters: set[str] = set()
    unexpected = []
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            unexpected.append(key)
            continue
        if match["adapter"] is not None:
            adapters.add(match["adapter"])
        (a if match["ab"] == "A" else b)[match["name"]] = tensor
    if unexpected:
        raise ValueError(
            f"{where}: {weights} holds keys that are not LoRA A/B weights: {sorted(unexpected)[:5]}"
        )
    if len(adapters) > 1:
        raise ValueError(
            f"{where}: {weights} mixes adapters {sorted(adapters)}; save one per directory"
        )
    if set(a) != set(b):
        raise ValueError(
            f"{where}: {weights} has lora_A without lora_B (or the reverse) for "
            f"{sorted(set(a) ^ set(b))}"
        )
    return AdapterFile(directory, config, a, b)


def load_adapter(
    path: str | os.PathLike[str], graph: Graph, layers: Mapping[str, LoraLinear] | object
) -> AdapterFile:
    """Load an adapter directory (graphlora's or PEFT's) into ``layers`` (a model's LoRA layers,
    or ``{name: LoraLinear}``), all or nothing.

    Every name, shape, dtype, rank, alpha and ``use_rslora`` is checked against the layers, and
    the values must be finite, before any layer changes. The file's ``[rank, in]`` / ``[out, rank]``
    tensors are transposed into A ``[in, rank]`` and B ``[rank, out]`` and converted to the graph's
    dtype.

    Returns
    -------
    AdapterFile
        What was read.

    Raises
    ------
    FileNotFoundError, ValueError
        As ``read_adapter``; and for missing or unexpected names or a config that does not match.
    ShapeError, TypeError
        For tensors of the wrong shape or not floating point.
    GraphError
        When a target layer is merged.
    """
    where = "load_adapter"
    check_graph(where, graph)
    layers = _check_layers(where, layers)
    adapter = read_adapter(path)
    missing = sorted(set(layers) - set(adapter.a))
    unexpected = sorted(set(adapter.a) - set(layers))
    if missing or unexpected:
        raise ValueError(
            f"{where}: {adapter.path} does not match the layers: missing {missing}, "
            f"unexpected {unexpected}"
        )
    rslora = bool(adapter.config.get("use_rslora", False))
    pissa = adapter.config.get("init_lora_weights") == "pissa"
    values: list[tuple[LoraLinear, Array, Array]] = []
    for name, layer in layers.items():
        if layer.merged:
            raise GraphError(f"{where}: layer {name!r} is merged; unmerge_ it before loading")
        for node in layer.trainable_params():
            graph.check(node, where, f"layers[{name!r}]")  # of this graph, and live
        checks = [
            ("rank", adapter.rank(name), layer.rank),
            ("alpha", adapter.alpha(name), float(layer.config.alpha)),
            ("use_rslora", rslora, layer.config.use_rslora),
            ("pissa init", pissa, layer.config.init == "pissa"),
        ]
        for field, in_file, in_layer in checks:
            if in_file != in_layer:
                raise ValueError(
                    f"{where}: layer {name!r}: the file has {field} {in_file!r}, the layer "
                    f"{in_layer!r}"
                )
        a, b = adapter.a[name], adapter.b[name]
        for label, tensor, shape in (
            ("lora_A", a, (layer.rank, layer.in_features)),
            ("lora_B", b, (layer.out_features, layer.rank)),
        ):
            if tensor.dtype.kind != "f":
                raise TypeError(f"{where}: {name}.{label} has dtype {tensor.dtype}, not floating")
            if tensor.shape != shape:
                raise ShapeError(
                    f"{where}: {name}.{label} has shape {tensor.shape}, the layer needs {shape}"
                )
            if not np.isfinite(tensor).all():
                raise ValueError(f"{where}: {name}.{label} holds NaN or Inf")
        values.append((layer, a.T, b.T))
    for layer, a_value, b_value in values:
        graph.set_value(layer.lora_a, a_value)
        graph.set_value(layer.lora_b, b_value)
    return adapter
