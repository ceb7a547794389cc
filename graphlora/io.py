"""Adapter files in PEFT's layout: save graphlora adapters that PEFT loads as they are, and load
adapters saved by PEFT (or by graphlora) into LoRA layers (``LoraLinear``, ``LoraEmbedding``).

An adapter directory holds ``adapter_model.safetensors`` and ``adapter_config.json``. Tensor keys
are ``base_model.model.<name>.lora_A.weight`` (shape ``[rank, in]``: our A transposed, as PyTorch's
``nn.Linear`` stores ``[out, in]``) and ``base_model.model.<name>.lora_B.weight`` (``[out, rank]``);
PEFT may also spell them with an adapter name, ``.lora_A.default.weight``. DoRA adds
``<name>.lora_magnitude_vector`` (``[out]``); an embedding has ``<name>.lora_embedding_A``
(``[rank, V]``) and ``<name>.lora_embedding_B`` (``[D, rank]``). As PEFT's ``save_pretrained``,
the adapter ``default`` is written in the directory itself and any other in a subfolder named after
it. The frozen base weights are never saved. Writes are atomic: files go to a temporary directory
that replaces the target only once complete, so an interrupted save leaves any earlier adapter
intact. Loading checks everything before assigning anything, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.lora import LoraConfig, LoraEmbedding, LoraLayer, LoraLinear
from graphlora.lora.config import BIASES
from graphlora.lora.functional import lora_scaling
from graphlora.lora.layer import adapter_list, check_adapter_name
from graphlora.lora.updates import json_number
from graphlora.nn import checkpoint
from graphlora.nn.adapters import apply_lora, pattern_value
from graphlora.nn.checkpoint import safetensors_module
from graphlora.nn.saved import saved_modules, torch_leaves
from graphlora.ops import Array

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterFile",
    "adapter_config",
    "apply_adapter",
    "load_adapter",
    "read_adapter",
    "save_adapter",
    "save_merged",
]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_LINEAR_KEY = re.compile(
    r"^base_model\.model\.(?P<name>.+)\.lora_(?P<kind>[AB])(\.(?P<adapter>[^.]+))?\.weight$"
)
_EMBEDDING_KEY = re.compile(
    r"^base_model\.model\.(?P<name>.+)\.lora_embedding_(?P<kind>[AB])(\.(?P<adapter>[^.]+))?$"
)
_MAGNITUDE_KEY = re.compile(
    r"^base_model\.model\.(?P<name>.+)\.lora_(?P<kind>magnitude)_vector"
    r"(\.(?P<adapter>(?!weight$)[^.]+))?(\.weight)?$"
)
_BASE_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.base_layer\.(?P<kind>weight|bias)$")
_LEAF_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.(?P<kind>weight|bias)$")
_LORA_BIAS_KEY = re.compile(
    r"^base_model\.model\.(?P<name>.+)\.lora_B(\.(?P<adapter>[^.]+))?\.(?P<kind>bias)$"
)
_KEYS = (
    _LINEAR_KEY,
    _EMBEDDING_KEY,
    _MAGNITUDE_KEY,
    _BASE_KEY,
    _LORA_BIAS_KEY,
    _LEAF_KEY,  # last: a model's own leaf (a bias PEFT's bias= trains), by its dotted name
)  # the adapter's name may be spelled out
_FILE_KINDS = {  # a PEFT key's leaf name -> where read_adapter keeps its tensors
    "lora_A": "a",
    "lora_embedding_A": "a",
    "lora_B": "b",
    "lora_embedding_B": "b",
    "lora_magnitude_vector": "magnitude",
    "lora_B.bias": "lora_bias",
}
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


# --- saving -------------------------------------------------------------------------------------


def _check_layers(where: str, layers: object) -> dict[str, LoraLayer]:
    """``layers`` as ``{name: LoRA layer}``: a mapping as given, or a model's LoRA layers."""
    plain = isinstance(layers, Mapping) and (
        not layers or any(isinstance(v, LoraLayer) for v in layers.values())
    )
    if not plain:  # a model: an object, or a dict or list holding layers
        from graphlora.nn import is_model, lora_layers

        if is_model(layers):
            layers = lora_layers(layers)
            if not layers:
                raise ValueError(f"{where}: the model has no LoRA layer (apply_lora first)")
    if not isinstance(layers, Mapping) or not layers:
        raise TypeError(
            f"{where}: layers must be a model with LoRA layers or a non-empty mapping of names to "
            "LoraLinear or LoraEmbedding layers"
        )
    for name, layer in layers.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"{where}: layer name {name!r} must be dotted identifiers such as 'layers.0' or "
                "'model.q_proj'"
            )
        if not isinstance(layer, LoraLayer):
            raise TypeError(
                f"{where}: layers[{name!r}] must be a LoraLinear or LoraEmbedding, got "
                f"{type(layer).__name__}"
            )
    return dict(layers)


def _layer_mapping(given: object) -> bool:
    """Whether ``given`` is a mapping of names to LoRA layers rather than a model."""
    return isinstance(given, Mapping) and all(isinstance(v, LoraLayer) for v in given.values())


def _holding(where: str, layers: Mapping[str, LoraLayer], adapter_name: str) -> dict[str, Any]:
    """The layers that hold adapter ``adapter_name`` and its update in each, or a ValueError
    listing the adapters the layers hold."""
    holders = {
        n: layer.adapters[adapter_name]
        for n, layer in layers.items()
        if adapter_name in layer.adapters
    }
    if not holders:
        known = list(dict.fromkeys(a for layer in layers.values() for a in layer.adapters))
        raise ValueError(f"{where}: no layer holds an adapter {adapter_name!r}; they hold {known}")
    return holders


def adapter_config(
    layers: Mapping[str, LoraLayer] | object, adapter_name: str = "default"
) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT expects for adapter ``adapter_name`` of
    ``layers`` (a model, or ``{name: LoRA layer}``), as the adapter's variant writes it.

    For LoRA (and DoRA): its ``LoraConfig``'s fields; ``r`` and ``lora_alpha`` are the most
    common rank and alpha, layers that differ are listed in ``rank_pattern`` and
    ``alpha_pattern`` by their full names, and ``use_dora`` says whether it is DoRA. For VeRA:
    PEFT's ``VeraConfig`` fields. ``fan_in_fan_out`` is true for layers over weights stored
    ``[in, out]`` in the source framework (GPT-2's ``Conv1D``), so that PEFT merges them the
    right way round.

    Raises
    ------
    ValueError
        When the layers differ in what PEFT has one of per file (variant, ``use_rslora``,
        dropout, init kind, layout), or none holds ``adapter_name``.
    """
    where = "save_adapter"
    layers = _check_layers(where, layers)
    updates = _holding(where, layers, adapter_name)
    kinds = {update.peft_type for update in updates.values()}
    if len(kinds) > 1:
        raise ValueError(
            f"{where}: adapter {adapter_name!r} mixes PEFT types {sorted(kinds)}; PEFT has one "
            "per file"
        )
    layouts = {
        layer.fan_in_fan_out
        for n, layer in layers.items()
        if n in updates and isinstance(layer, LoraLinear)
    }
    if len(layouts) > 1:
        raise ValueError(
            f"{where}: some layers come from [in, out] weights (GPT-2's Conv1D) and some do not; "
            "PEFT's fan_in_fan_out is one flag for all: save them separately"
        )
    config: dict[str, Any] = next(iter(updates.values())).peft_config(updates, True in layouts)
    return config


def _tensors(graph: Graph, layers: Mapping[str, LoraLayer], adapter_name: str) -> dict[str, Array]:
    """PEFT's tensors of adapter ``adapter_name``, in PyTorch's layout (our A and B transposed)."""
    tensors = {}
    for name, layer in layers.items():
        if adapter_name not in layer.adapters:
            continue
        update = layer.adapters[adapter_name]
        leaves = [*update.file_leaves(f"base_model.model.{name}"), *update.file_shared()]
        for key, leaf, transposed in leaves:  # shared leaves (VeRA's projections) once
            value = graph.value(leaf)
            tensors[key] = np.ascontiguousarray(value.T if transposed else value)
    return tensors


def _model_tensors(
    where: str,
    graph: Graph,
    given: object,
    layers: Mapping[str, LoraLayer],
    adapter_name: str,
    config: Mapping[str, Any],
) -> dict[str, Array]:
    """The model's own leaves an adapter's file holds, under PEFT's keys: its modules_to_save
    copies (``<module>.<leaf>``, in PyTorch's layout) and the biases its ``bias`` trains
    (``<layer>.base_layer.bias`` for an adapted layer's, ``<name>.bias`` for another's)."""
    tensors = {}
    mode = config.get("bias", "none")
    plain = _layer_mapping(given)
    if config.get("modules_to_save"):
        if plain:
            raise ValueError(
                f"{where}: adapter {adapter_name!r} has modules_to_save, whose copies its file "
                "holds: pass the model, not a mapping of layers"
            )
        for name, wrapper in saved_modules(given).items():
            module = wrapper.modules_to_save.get(adapter_name)
            for leaf_name, (leaf, transposed) in torch_leaves(module).items() if module else ():
                value = np.asarray(graph.value(leaf))
                key = f"base_model.model.{name}.{leaf_name}"
                tensors[key] = np.ascontiguousarray(value.T if transposed else value)
    if mode == "none":
        return tensors
    if plain:
        if mode == "all":
            raise ValueError(
                f"{where}: adapter {adapter_name!r} has bias='all', whose file holds every bias "
                "of the model: pass the model, not a mapping of layers"
            )
        biases = {
            f"{n}.bias": bias
            for n, layer in layers.items()
            if adapter_name in layer.adapters and (bias := getattr(layer, "bias", None)) is not None
        }
    else:
        from graphlora.nn.adapters import trained_biases

        biases = trained_biases(given, adapter_name)
    for name, leaf in biases.items():
        owner = name.rsplit(".", 1)[0]
        key = f"{owner}.base_layer.bias" if owner in layers else name
        tensors[f"base_model.model.{key}"] = np.array(graph.value(leaf))
    return tensors


def _pissa_to_lora(
    where: str, config: dict[str, Any], tensors: dict[str, Array], initial: AdapterFile
) -> tuple[dict[str, Any], dict[str, Array]]:
    """A trained PiSSA adapter's config and tensors as plain LoRA over the original weight:
    ``A' = [A, A0]``, ``B' = [B; -B0]`` (PEFT's ``subtract_mutated_init``), rank and alpha
    doubled (alpha by ``sqrt(2)`` with rsLoRA)."""
    if config.get("init_lora_weights") != "pissa" or config.get("use_dora"):
        raise ValueError(
            f"{where}: path_initial_model_for_weight_conversion converts a plain LoRA adapter "
            "made with init='pissa'; this one is not"
        )
    if initial.config.get("init_lora_weights") != "pissa":
        raise ValueError(f"{where}: {initial.path} does not hold a PiSSA adapter's initial state")
    names = {match["name"] for key in tensors if (match := _LINEAR_KEY.match(key)) is not None}
    if names != set(initial.a) or any(
        initial.rank(n) != config.get("rank_pattern", {}).get(n, config["r"]) for n in names
    ):
        raise ValueError(
            f"{where}: {initial.path} holds the layers {sorted(initial.a)} and ranks "
            f"{ {n: initial.rank(n) for n in sorted(initial.a)} }; the adapter has {sorted(names)}"
        )
    converted = dict(tensors)
    for name in names:
        prefix = f"base_model.model.{name}"
        converted[f"{prefix}.lora_A.weight"] = np.concatenate(
            [tensors[f"{prefix}.lora_A.weight"], initial.a[name]], axis=0
        )
        converted[f"{prefix}.lora_B.weight"] = np.concatenate(
            [tensors[f"{prefix}.lora_B.weight"], -initial.b[name]], axis=1
        )
    factor = math.sqrt(2.0) if config.get("use_rslora") else 2.0
    config = {
        **config,
        "init_lora_weights": True,
        "r": 2 * config["r"],
        "lora_alpha": json_number(factor * config["lora_alpha"]),
        "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
        "alpha_pattern": {
            k: json_number(factor * v) for k, v in (config.get("alpha_pattern") or {}).items()
        },
    }
    return config, converted


def _write_bytes(target: Path, data: bytes) -> None:
    with open(target, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_adapter(
    path: str | os.PathLike[str],
    graph: Graph,
    layers: Mapping[str, LoraLayer] | object,
    *,
    adapter_name: str | list[str] | None = None,
    overwrite: bool = False,
    path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``layers``' adapters to the directory ``path``, in the layout PEFT loads.

    As PEFT's ``save_pretrained``: the adapter ``default`` goes in ``path`` itself, any other in
    the subfolder ``path/<adapter name>``, each as ``adapter_model.safetensors`` and
    ``adapter_config.json``.

    Parameters
    ----------
    path
        The adapter directory to create.
    graph
        The graph holding the layers.
    layers
        A model (its LoRA layers are saved under their dotted names), or ``{module name:
        layer}``; the names are the PyTorch module names the adapters belong to
        (``"layers.0"``, ``"transformer.h.0.attn.c_attn"``, ...).
    adapter_name
        The adapter (or list of adapters) to save; ``None``: every adapter the layers hold.
    overwrite
        Replace an existing directory (atomically). Without it, an existing path is an error.
    path_initial_model_for_weight_conversion
        As PEFT's: the directory where the PiSSA adapter was saved *before* training. The
        adapter is then written as plain LoRA for the original base weight, not the residual
        PiSSA trains over: ``W + s (A B - A0 B0)`` is ``W + s' [A, A0] [B; -B0]``, rank ``2r``
        and alpha ``2 alpha`` (``sqrt(2) alpha`` with rsLoRA), so the scaling is unchanged;
        ``rank_pattern`` and ``alpha_pattern`` follow (PEFT doubles ``alpha_pattern`` even with
        rsLoRA, which changes those layers' scaling; here it follows ``lora_alpha``). One plain
        LoRA PiSSA adapter at a time.

    Returns
    -------
    Path
        The directory written.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    ValueError, TypeError
        For bad names, an adapter no layer holds, or layers PEFT cannot express together;
        nothing is written.
    """
    where = "save_adapter"
    check_graph(where, graph)
    st = safetensors_module(where)
    given = layers
    layers = _check_layers(where, layers)
    if adapter_name is None:
        names = list(dict.fromkeys(a for layer in layers.values() for a in layer.adapters))
    else:
        names = adapter_list(where, adapter_name)
    if not names:
        raise ValueError(f"{where}: the layers hold no adapter")
    initial = None
    if path_initial_model_for_weight_conversion is not None:
        if len(names) != 1:
            raise ValueError(f"{where}: converting PiSSA to LoRA takes one adapter, got {names}")
        initial = read_adapter(path_initial_model_for_weight_conversion)
    files = {}
    for name in names:
        config = adapter_config(layers, name)
        tensors = {
            **_tensors(graph, layers, name),
            **_model_tensors(where, graph, given, layers, name, config),
        }
        if initial is not None:
            config, tensors = _pissa_to_lora(where, config, tensors, initial)
        data = st.numpy.save(tensors, metadata={"format": "pt"})
        files[name] = (data, (json.dumps(config, indent=2) + "\n").encode())
    target = Path(path)
    with checkpoint.staging(target, overwrite, where) as staging:
        for name, (weights, config_bytes) in files.items():
            folder = staging if name == "default" else staging / name
            folder.mkdir(exist_ok=True)
            _write_bytes(folder / WEIGHTS_NAME, weights)
            _write_bytes(folder / CONFIG_NAME, config_bytes)
    return target


def save_merged(
    path: str | os.PathLike[str],
    graph: Graph,
    layers: Mapping[str, LoraLayer] | object,
    *,
    layout: str = "torch",
    overwrite: bool = False,
) -> Path:
    """Write the merged weights (``W + A @ B * scaling`` for each active adapter, DoRA's rescaled
    weight) and biases as one safetensors file.

    For deployment without LoRA. Keys are ``<name>.weight`` and ``<name>.bias``, as in a PyTorch
    ``state_dict``. ``layout="torch"`` stores each weight as its PyTorch module does: ``[out, in]``
    for ``nn.Linear``, ``[in, out]`` for a layer with ``fan_in_fan_out`` (GPT-2's ``Conv1D``),
    ``[V, D]`` for an embedding; ``layout="graphlora"`` keeps ``[in, out]``. The file is written
    to a temporary file and renamed into place. Merged layers contribute their current (merged)
    weight.
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
        transpose = layout == "torch" and isinstance(layer, LoraLinear) and not layer.fan_in_fan_out
        tensors[f"{name}.weight"] = np.ascontiguousarray(weight.T if transpose else weight)
        bias = layer.merge_bias(graph)  # with B's biases (lora_bias) added
        if bias is not None:
            tensors[f"{name}.bias"] = bias
    target = Path(path)
    if target.is_dir():
        raise FileExistsError(f"{where}: {target} is a directory, not a file to write")
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{where}: {target} already exists; pass overwrite=True to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    data = st.numpy.save(tensors, metadata={"format": "pt", "layout": layout})
    checkpoint.write_atomic(target, data)
    return target


# --- reading and loading ------------------------------------------------------------------------


class AdapterFile:
    """An adapter directory read into memory: its config and, per module name, A and B (and
    DoRA's magnitude).

    ``a[name]`` is ``[rank, in]`` and ``b[name]`` is ``[out, rank]``, as stored (PyTorch layout;
    for an embedding ``[rank, V]`` and ``[D, rank]``); ``magnitude[name]`` is ``[out]``;
    ``embeddings`` names the modules stored as embeddings (``lora_embedding_A``/``_B``);
    ``base[name]`` is an embedding's own weight ``[V, D]``, which PEFT's ``save_pretrained``
    writes (``base_layer.weight``) whenever an embedding is targeted; ``lora_bias[name]`` is B's
    bias ``[out]`` (``lora_B.bias``) of an adapter saved with ``lora_bias``; ``leaves`` holds
    the model's own leaves the file carries, by dotted name (``fc1.bias``: the biases PEFT's
    ``bias="lora_only"`` / ``"all"`` trains), as stored.
    """

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        a: dict[str, Array],
        b: dict[str, Array],
        magnitude: dict[str, Array] | None = None,
        embeddings: frozenset[str] = frozenset(),
        base: dict[str, Array] | None = None,
        lora_bias: dict[str, Array] | None = None,
        leaves: dict[str, Array] | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.a = a
        self.b = b
        self.magnitude = {} if magnitude is None else magnitude
        self.embeddings = embeddings
        self.base = {} if base is None else base
        self.lora_bias = {} if lora_bias is None else lora_bias
        self.leaves = {} if leaves is None else leaves

    @property
    def use_dora(self) -> bool:
        """Whether the adapter is DoRA (the config's ``use_dora``)."""
        return bool(self.config.get("use_dora"))

    def rank(self, name: str) -> int:
        """The rank the config gives module ``name`` (``rank_pattern``, else ``r``)."""
        return int(pattern_value(self.config.get("rank_pattern") or {}, name, self.config["r"]))

    def alpha(self, name: str) -> float:
        """The alpha the config gives module ``name`` (``alpha_pattern``, else ``lora_alpha``)."""
        return float(
            pattern_value(self.config.get("alpha_pattern") or {}, name, self.config["lora_alpha"])
        )

    def scaling(self, name: str) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``."""
        rslora = bool(self.config.get("use_rslora"))
        return lora_scaling(self.rank(name), self.alpha(name), use_rslora=rslora)


def _check_rank_and_alpha(where: str, file: Path, field: str, value: object, kind: str) -> None:
    """A rank (``r``, ``rank_pattern``'s values) must be an int >= 1; an alpha (``lora_alpha``,
    ``alpha_pattern``'s values) a finite real number."""
    if kind == "r" or kind == "rank_pattern":
        good = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        need = "an int >= 1"
    else:
        good = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
        need = "a finite number"
    if not good:
        raise ValueError(f"{where}: {file} has {field} {value!r}; it must be {need}")


def read_adapter(path: str | os.PathLike[str]) -> AdapterFile:
    """Read and check an adapter directory written by graphlora or by PEFT's ``save_pretrained``.

    Raises
    ------
    FileNotFoundError
        For a missing directory or missing files.
    ValueError
        For pickle-based weights (refused, never opened), corrupted or truncated files, a config
        that is not a LoRA config, keys that are not LoRA weights, and DoRA magnitudes that the
        config's ``use_dora`` does not announce (or the reverse).
    """
    where = "read_adapter"
    safetensors_module(where)  # its install hint comes before any other error
    directory = checkpoint.folder(where, path)
    weights = directory / WEIGHTS_NAME
    checkpoint.refuse_pickle(
        where,
        directory,
        WEIGHTS_NAME,
        "Re-save the adapter with safetensors (PEFT: save_pretrained(..., "
        "safe_serialization=True))",
    )
    config_file = directory / CONFIG_NAME
    config = checkpoint.read_json(where, config_file)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: {config_file} is not a LoRA adapter config (peft_type 'LORA')")
    _check_rank_and_alpha(where, config_file, "r", config.get("r"), "r")
    _check_rank_and_alpha(where, config_file, "lora_alpha", config.get("lora_alpha"), "lora_alpha")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ValueError(f"{where}: {config_file} has a {key} that is not a mapping")
        for module, value in (config.get(key) or {}).items():
            _check_rank_and_alpha(where, config_file, f"{key}[{module!r}]", value, key)
    for key in ("use_rslora", "use_dora", "lora_bias"):
        if not isinstance(config.get(key, False), bool):
            raise ValueError(f"{where}: {config_file} has a {key} that is not true/false")
    tensors = checkpoint.load_tensors(where, weights)
    found: dict[str, dict[str, Array]] = {
        "A": {},
        "B": {},
        "magnitude": {},
        "weight": {},
        "lora_bias": {},
    }
    leaves: dict[str, Array] = {}
    embeddings: set[str] = set()
    adapters: set[str] = set()
    unexpected = []
    for key, tensor in tensors.items():
        matched = [(k, m) for k, m in ((k, k.match(key)) for k in _KEYS) if m is not None]
        if not matched:
            unexpected.append(key)
            continue
        pattern, match = matched[0]
        if match.groupdict().get("adapter") is not None:
            adapters.add(match["adapter"])
        if pattern is _LEAF_KEY or (pattern is _BASE_KEY and match["kind"] == "bias"):
            leaves[f"{match['name']}.{match['kind']}"] = tensor
            continue
        found["lora_bias" if pattern is _LORA_BIAS_KEY else match["kind"]][match["name"]] = tensor
        if pattern is _EMBEDDING_KEY:
            embeddings.add(match["name"])
    if unexpected:
        raise ValueError(
            f"{where}: {weights} holds keys that are not LoRA weights: {sorted(unexpected)[:5]}"
        )
    if len(adapters) > 1:
        raise ValueError(
            f"{where}: {weights} mixes adapters {sorted(adapters)}; save one per directory"
        )
    a, b, magnitude, base = found["A"], found["B"], found["magnitude"], found["weight"]
    if set(a) != set(b):
        raise ValueError(
            f"{where}: {weights} has lora_A without lora_B (or the reverse) for "
            f"{sorted(set(a) ^ set(b))}"
        )
    if set(base) - embeddings:
        raise ValueError(
            f"{where}: {weights} holds base weights for {sorted(set(base) - embeddings)}, which "
            "are not adapted embeddings (PEFT saves only those)"
        )
    lora_bias = found["lora_bias"]
    adapter = AdapterFile(
        directory, config, a, b, magnitude, frozenset(embeddings), base, lora_bias, leaves
    )
    for name in sorted(a):
        rank = adapter.rank(name)
        shapes = (a[name].shape, b[name].shape)
        if (
            len(shapes[0]) != 2
            or len(shapes[1]) != 2
            or (shapes[0][0], shapes[1][1]) != (rank, rank)
        ):
            raise ValueError(
                f"{where}: {weights}: {name} has A {shapes[0]} and B {shapes[1]}, which do not "
                f"have the rank {rank} its config gives it ([{rank}, in] and [out, {rank}])"
            )
    dora = bool(config.get("use_dora"))
    expected = set(a) if dora else set()
    if set(magnitude) != expected:
        raise ValueError(
            f"{where}: {config_file} says use_dora {str(dora).lower()} but {weights} has DoRA "
            f"magnitudes for {sorted(magnitude)} (expected them for {sorted(expected)})"
        )
    mode = config.get("bias", "none")
    if mode not in BIASES:
        raise ValueError(f"{where}: {config_file} has bias {mode!r}; PEFT's are {list(BIASES)}")
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(n, str) for n in saved):
        raise ValueError(f"{where}: {config_file} has modules_to_save that are not module names")

    def allowed(name: str) -> bool:
        parts = name.split(".")
        owners = [".".join(parts[:i]) for i in range(1, len(parts))]  # the modules above it
        if any(owner.endswith(entry) for owner in owners for entry in saved):
            return True  # a leaf of a modules_to_save module
        if not name.endswith(".bias") or mode == "none":
            return False
        return mode == "all" or owners[-1] in a

    stray = sorted(name for name in leaves if not allowed(name))
    if stray:
        raise ValueError(
            f"{where}: {weights} holds keys that are not LoRA weights: {stray[:5]} (biases are "
            f"saved only by bias='lora_only' or 'all', other leaves by modules_to_save; the "
            f"config has bias={mode!r}, modules_to_save={saved})"
        )
    with_bias = set(a) - embeddings if config.get("lora_bias") else set()
    if set(lora_bias) != with_bias or any(np.ndim(v) != 1 for v in lora_bias.values()):
        raise ValueError(
            f"{where}: {config_file} says lora_bias {str(bool(with_bias)).lower()} but "
            f"{weights} has B's biases (lora_B.bias, [out]) for {sorted(lora_bias)} (expected "
            f"them for {sorted(with_bias)})"
        )
    return adapter


def apply_adapter(
    path: str | os.PathLike[str], graph: Graph, model: object
) -> dict[str, LoraLayer]:
    """Put the LoRA adapter in the directory ``path`` (graphlora's or PEFT's) on ``model`` as its
    file says, and load it: PEFT's ``PeftModel.from_pretrained``. Each module the file names
    gets an adapter of the rank and alpha its config gives it (``rank_pattern`` and
    ``alpha_pattern`` honoured), with its rsLoRA and DoRA settings; then ``load_adapter`` fills
    them, all checked before any layer changes value.

    Returns
    -------
    dict
        ``{name: LoRA layer}`` of the adapted modules.

    Raises
    ------
    FileNotFoundError, ValueError
        As ``read_adapter`` (which refuses other PEFT types: for VeRA, build its layers with
        ``apply_lora`` and a ``VeraConfig``, then ``load_adapter``) and ``load_adapter``.
    """
    where = "apply_adapter"
    check_graph(where, graph)
    adapter = read_adapter(path)  # refuses other PEFT types (VeRA) by name
    groups: dict[tuple[int, float], list[str]] = {}
    for name in adapter.a:
        groups.setdefault((adapter.rank(name), adapter.alpha(name)), []).append(name)
    layers: dict[str, LoraLayer] = {}
    for (rank, alpha), names in sorted(groups.items()):
        config = LoraConfig(
            rank=rank,
            alpha=alpha,
            use_rslora=bool(adapter.config.get("use_rslora")),
            use_dora=bool(adapter.config.get("use_dora")),
            lora_bias=bool(adapter.config.get("lora_bias")),
            bias=adapter.config.get("bias", "none"),
            modules_to_save=adapter.config.get("modules_to_save"),
        )
        layers.update(apply_lora(model, config, names))
    load_adapter(path, graph, model)
    return layers


def load_adapter(
    path: str | os.PathLike[str],
    graph: Graph,
    layers: Mapping[str, LoraLayer] | object,
    *,
    adapter_name: str = "default",
) -> AdapterFile:
    """Load an adapter directory (graphlora's or PEFT's) into adapter ``adapter_name`` of
    ``layers`` (a model's LoRA layers, or ``{name: LoRA layer}``), all or nothing.

    For an adapter other than ``default``, ``path/<adapter_name>`` is read when it holds an
    adapter (the layout ``save_adapter`` and PEFT's ``save_pretrained`` write), else ``path``.
    Every name, shape, dtype, rank, alpha, ``use_rslora`` and DoRA flag is checked against the
    layers holding that adapter, and the values must be finite, before any layer changes. The
    file's ``[rank, in]`` / ``[out, rank]`` tensors are transposed into A ``[in, rank]`` and B
    ``[rank, out]`` and converted to the graph's dtype.

    Returns
    -------
    AdapterFile
        What was read.

    Raises
    ------
    FileNotFoundError, ValueError
        As ``read_adapter``; for an adapter no layer holds (the message lists those they hold),
        missing or unexpected names, a config that does not match (a DoRA file into a plain
        adapter, or the reverse), or an embedding's tensors for a linear layer.
    ShapeError, TypeError
        For tensors of the wrong shape or not floating point.
    GraphError
        When a target layer is merged.
    """
    where = "load_adapter"
    check_graph(where, graph)
    given = layers
    given_model = not _layer_mapping(given)
    layers = _check_layers(where, layers)
    adapter_name = check_adapter_name(where, adapter_name)
    updates = _holding(where, layers, adapter_name)
    directory = Path(path)
    if adapter_name != "default" and (directory / adapter_name / CONFIG_NAME).is_file():
        directory = directory / adapter_name
    kinds = {update.peft_type for update in updates.values()}
    if kinds != {"LORA"}:
        return _load_shared_variant(where, directory, graph, layers, updates, kinds)
    adapter = read_adapter(directory)
    missing = sorted(set(updates) - set(adapter.a))
    unexpected = sorted(set(adapter.a) - set(updates))
    if missing or unexpected:
        raise ValueError(
            f"{where}: {adapter.path} does not match the layers holding adapter "
            f"{adapter_name!r}: missing {missing}, unexpected {unexpected}"
        )
    rslora = bool(adapter.config.get("use_rslora", False))
    pissa = adapter.config.get("init_lora_weights") == "pissa"
    values: list[tuple[str, NodeId, object]] = []
    flipped: set[str] = set()
    for name, update in updates.items():
        layer = layers[name]
        layer.refuse_merged(where, f"layer {name!r}")
        for node in update.params():
            graph.check(node, where, f"layers[{name!r}]")  # of this graph, and live
        checks = [
            ("rank", adapter.rank(name), update.rank),
            ("alpha", adapter.alpha(name), float(update.config.alpha)),
            ("use_rslora", rslora, update.config.use_rslora),
            ("pissa init", pissa, update.config.init == "pissa"),
            ("lora_bias", bool(adapter.config.get("lora_bias")), update.config.lora_bias),
            *(
                (key, bool(adapter.config.get(key, False)), flag)
                for key, flag in update.peft_flags.items()
            ),
            ("embedding", name in adapter.embeddings, isinstance(layer, LoraEmbedding)),
        ]
        for field, in_file, in_layer in checks:
            if in_file != in_layer:
                raise ValueError(
                    f"{where}: layer {name!r}: the file has {field} {in_file!r}, the layer "
                    f"{in_layer!r}"
                )
        prefix = f"base_model.model.{name}"
        for key, leaf, transposed in update.file_leaves(prefix):
            kind = key[len(prefix) + 1 :].removesuffix(".weight")  # lora_A, lora_B.bias, ...
            label = f"{name}.{kind}"
            values.append((label, leaf, getattr(adapter, _FILE_KINDS[kind])[name]))
            if transposed:
                flipped.add(label)
    for name, weight in adapter.base.items():  # PEFT's copy of an adapted embedding's weight
        table = layers[name].frozen_weight
        assert table is not None  # an embedding's table is never in NF4
        values.append((f"{name}.base_layer.weight", table, weight))
    if adapter.leaves:  # modules_to_save copies, the model's own biases (bias=)
        if given_model:
            from graphlora.nn import named_leaves

            own = dict(named_leaves(given))
            for module, wrapper in saved_modules(given).items():
                copied = wrapper.modules_to_save.get(adapter_name)
                for leaf_name, (leaf, transposed) in torch_leaves(copied).items() if copied else ():
                    own[f"{module}.{leaf_name}"] = leaf
                    if transposed:
                        flipped.add(f"{module}.{leaf_name}")
        else:
            own = {
                f"{n}.bias": bias
                for n, layer in layers.items()
                if (bias := getattr(layer, "bias", None)) is not None
            }
        absent = sorted(set(adapter.leaves) - set(own))
        if absent:
            raise ValueError(
                f"{where}: {adapter.path} holds {absent[:5]}, which the "
                f"{'model' if given_model else 'layers'} do not have"
            )
        values.extend((name, own[name], value) for name, value in adapter.leaves.items())
    graph.set_values(where, values, transposed=flipped)
    return adapter


def _load_shared_variant(
    where: str,
    directory: Path,
    graph: Graph,
    layers: Mapping[str, LoraLayer],
    updates: Mapping[str, Any],
    kinds: set[str],
) -> AdapterFile:
    """Load a variant whose file is not LoRA's (VeRA): every key is one of the updates'
    ``file_leaves`` or ``file_shared``, checked for shape, dtype and finiteness before any
    leaf changes. A VeRA file without its projections is refused: PEFT would draw them with
    PyTorch's generator, which graphlora does not reproduce."""
    if len(kinds) > 1:
        raise ValueError(f"{where}: the layers mix adapter types {sorted(kinds)}")
    (kind,) = kinds
    checkpoint.refuse_pickle(
        where, directory, WEIGHTS_NAME, "Re-save the adapter with safetensors."
    )
    config_file = directory / CONFIG_NAME
    config = checkpoint.read_json(where, config_file)
    if config.get("peft_type") != kind:
        raise ValueError(
            f"{where}: {config_file} is a {config.get('peft_type')!r} adapter; the layers hold "
            f"a {kind!r} adapter"
        )
    weights = directory / WEIGHTS_NAME
    tensors = checkpoint.load_tensors(where, weights)
    expected: dict[str, tuple[NodeId, bool]] = {}
    for name, update in updates.items():
        layer = layers[name]
        layer.refuse_merged(where, f"layer {name!r}")
        if update.rank != config.get("r"):
            raise ValueError(
                f"{where}: layer {name!r}: the file has r {config.get('r')!r}, the layer "
                f"{update.rank}"
            )
        for key, leaf, transposed in update.file_leaves(f"base_model.model.{name}"):
            expected[key] = (leaf, transposed)
        for key, leaf, transposed in update.file_shared():
            expected[key] = (leaf, transposed)
    shared = {key for update in updates.values() for key, _, _ in update.file_shared()}
    if shared - set(tensors) or config.get("save_projection") is False:
        raise ValueError(
            f"{where}: {weights} has no {sorted(shared - set(tensors)) or sorted(shared)}: it was "
            "saved with save_projection=False, and PEFT draws those with PyTorch's generator, "
            "which graphlora does not reproduce; save the adapter with save_projection=True"
        )
    found = {}
    for key, tensor in tensors.items():  # PEFT may spell a leaf with its adapter's name
        plain = key.rsplit(".", 1)[0]
        found[plain if key not in expected and plain in expected else key] = tensor
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: {weights} does not match the layers: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    graph.set_values(
        where,
        [(key, leaf, found[key]) for key, (leaf, _) in expected.items()],
        transposed={key for key, (_, transposed) in expected.items() if transposed},
    )
    return AdapterFile(directory, config, {}, {})
