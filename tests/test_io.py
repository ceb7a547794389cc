"""Adapter files: PEFT's exact layout, round trips, refusal of bad files (changing nothing), atomic
writes, merged weights, ``graphlora inspect``, and both directions against real PEFT if installed."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import graphlora as gl
from graphlora import io as glio
from graphlora.__main__ import main

st_numpy = pytest.importorskip("safetensors.numpy")


def _layers(g: gl.Graph, seed: int = 0, **overrides: Any) -> dict[str, gl.LoraLinear]:
    """Two trained-looking layers: q (16 -> 8, rank 4) and v (16 -> 6, rank 2, alpha 4)."""
    rng = np.random.default_rng(seed)
    q = gl.LoraLinear.new(
        g, 16, 8, gl.LoraConfig(rank=4, alpha=8.0, seed=seed, **overrides), name="model.q"
    )
    v = gl.LoraLinear.new(
        g, 16, 6, gl.LoraConfig(rank=2, alpha=4.0, seed=seed + 1, **overrides), name="model.v"
    )
    for layer in (q, v):
        g.set_value(layer.lora_b, rng.normal(size=(layer.rank, layer.out_features)))
    return {"model.q": q, "model.v": v}


def _twin(
    g: gl.Graph, layers: dict[str, gl.LoraLinear], target: gl.Graph | None = None
) -> dict[str, gl.LoraLinear]:
    """Fresh layers (in ``target``, default ``g``) over the same frozen weights, other A and B."""
    into = g if target is None else target
    return {
        name: gl.LoraLinear.from_linear(
            into,
            g.value(layer.frozen_weight),
            None if layer.bias is None else g.value(layer.bias),
            layer.config,
            rng=np.random.default_rng(99),
            name=name,
        )
        for name, layer in layers.items()
    }


def test_round_trip(tmp_path: Path) -> None:
    g = gl.Graph()
    layers = _layers(g)
    gl.save_adapter(tmp_path / "adapter", g, layers)
    g2 = gl.Graph()
    loaded = _twin(g, layers, g2)
    gl.load_adapter(tmp_path / "adapter", g2, loaded)
    for name, layer in layers.items():
        np.testing.assert_array_equal(g2.value(loaded[name].lora_a), g.value(layer.lora_a))
        np.testing.assert_array_equal(g2.value(loaded[name].lora_b), g.value(layer.lora_b))


def test_exact_keys_shapes_and_config(tmp_path: Path) -> None:
    g = gl.Graph()
    layers = _layers(g)
    out = gl.save_adapter(tmp_path / "adapter", g, layers)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tensors = st_numpy.load_file(str(out / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {
        "base_model.model.model.q.lora_A.weight": (4, 16),
        "base_model.model.model.q.lora_B.weight": (8, 4),
        "base_model.model.model.v.lora_A.weight": (2, 16),
        "base_model.model.model.v.lora_B.weight": (6, 2),
    }
    np.testing.assert_array_equal(
        tensors["base_model.model.model.q.lora_A.weight"], g.value(layers["model.q"].lora_a).T
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (
        4,
        8,
        0.0,
        False,
    )
    assert config["target_modules"] == ["model.q", "model.v"]
    assert (
        config["fan_in_fan_out"],
        config["bias"],
        config["init_lora_weights"],
        config["inference_mode"],
    ) == (False, "none", True, True)
    assert config["rank_pattern"] == {"model.v": 2}
    assert config["alpha_pattern"] == {"model.v": 4}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtypes_are_preserved(tmp_path: Path, dtype: Any) -> None:
    g = gl.Graph(dtype)
    gl.save_adapter(tmp_path / "a", g, _layers(g))
    tensors = st_numpy.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {np.dtype(dtype)}


def test_peft_key_spelling_with_an_adapter_name_loads(tmp_path: Path) -> None:
    g = gl.Graph()
    layers = _layers(g)
    gl.save_adapter(tmp_path / "a", g, layers)
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = st_numpy.load_file(str(file))
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    st_numpy.save_file(renamed, str(file))
    twin = _twin(g, layers)
    gl.load_adapter(tmp_path / "a", g, twin)
    np.testing.assert_array_equal(
        g.value(twin["model.v"].lora_b), g.value(layers["model.v"].lora_b)
    )


def test_rslora_and_pissa_are_written_and_checked(tmp_path: Path) -> None:
    g = gl.Graph()
    layers = _layers(g, use_rslora=True, init="pissa")
    gl.save_adapter(tmp_path / "a", g, layers)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True
    assert config["init_lora_weights"] == "pissa"
    plain = {
        name: gl.LoraLinear.new(
            g,
            layer.in_features,
            layer.out_features,
            gl.LoraConfig(rank=layer.rank, alpha=layer.config.alpha, use_rslora=True),
            name=name,
        )
        for name, layer in layers.items()
    }
    with pytest.raises(
        ValueError,
        match=r"load_adapter: layer 'model.q': the file has pissa init True, the layer False",
    ):
        gl.load_adapter(tmp_path / "a", g, plain)


def _snapshot(g: gl.Graph, layers: dict[str, gl.LoraLinear]) -> list[np.ndarray]:
    return [np.array(g.value(n)) for layer in layers.values() for n in layer.trainable_params()]


def test_mismatches_are_refused_and_change_nothing(tmp_path: Path) -> None:
    g = gl.Graph()
    gl.save_adapter(tmp_path / "a", g, _layers(g))
    cases: list[tuple[dict[str, gl.LoraLinear], type[Exception], str]] = []
    twin = _twin(g, _layers(g))
    cases.append(
        (
            {"model.q": twin["model.q"]},
            ValueError,
            r"does not match the layers holding adapter 'default': missing \[\], unexpected \['model.v'\]",
        )
    )
    cases.append(({**twin, "model.k": twin["model.q"]}, ValueError, r"missing \['model.k'\]"))
    other_rank = {
        **twin,
        "model.v": gl.LoraLinear.new(g, 16, 6, gl.LoraConfig(rank=3, alpha=4.0), name="model.v"),
    }
    cases.append((other_rank, ValueError, r"layer 'model.v': the file has rank 2, the layer 3"))
    other_alpha = {
        **twin,
        "model.v": gl.LoraLinear.new(g, 16, 6, gl.LoraConfig(rank=2, alpha=5.0), name="model.v"),
    }
    cases.append(
        (other_alpha, ValueError, r"layer 'model.v': the file has alpha 4.0, the layer 5.0")
    )
    rslora = {
        **twin,
        "model.v": gl.LoraLinear.new(
            g, 16, 6, gl.LoraConfig(rank=2, alpha=4.0, use_rslora=True), name="model.v"
        ),
    }
    cases.append((rslora, ValueError, r"the file has use_rslora False, the layer True"))
    wider = {
        **twin,
        "model.v": gl.LoraLinear.new(g, 17, 6, gl.LoraConfig(rank=2, alpha=4.0), name="model.v"),
    }
    cases.append((wider, gl.ShapeError, r"model.v.lora_A has shape \(2, 16\), expected \(2, 17\)"))
    for layers, error, match in cases:
        before = _snapshot(g, layers)
        with pytest.raises(error, match=r"load_adapter: .*" + match):
            gl.load_adapter(tmp_path / "a", g, layers)
        for old, new in zip(before, _snapshot(g, layers), strict=True):
            np.testing.assert_array_equal(old, new)
    twin["model.q"].merge_(g)
    with pytest.raises(gl.GraphError, match=r"layer 'model\.q' is merged"):
        gl.load_adapter(tmp_path / "a", g, twin)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (
            lambda f: f.write_bytes(b"not a safetensors file at all"),
            "is not a readable safetensors file",
        ),
        (
            lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
            "is not a readable safetensors file",
        ),
        (
            lambda f: f.write_bytes(struct.pack("<Q", 2**40) + f.read_bytes()[8:]),
            "is not a readable safetensors file",
        ),
        (lambda f: f.unlink(), "has no adapter_model.safetensors"),
        (
            lambda f: (f.parent / "adapter_config.json").write_text("{not json"),
            "adapter_config.json is not valid JSON",
        ),
        (
            lambda f: (f.parent / "adapter_config.json").write_text('{"peft_type": "IA3"}'),
            "is not a LoRA adapter config",
        ),
        (lambda f: (f.parent / "adapter_config.json").unlink(), "has no adapter_config.json"),
        (
            lambda f: st_numpy.save_file(
                {"base_model.model.model.q.lora_A.weight": np.ones((4, 16))}, str(f)
            ),
            r"has lora_A without lora_B",
        ),
        (
            lambda f: st_numpy.save_file({"model.q.weight": np.ones((4, 16))}, str(f)),
            r"holds keys that are not LoRA weights: \['model.q.weight'\]",
        ),
    ],
)
def test_damaged_files_are_refused_and_change_nothing(
    tmp_path: Path, damage: Any, match: str
) -> None:
    g = gl.Graph()
    layers = _layers(g)
    gl.save_adapter(tmp_path / "a", g, layers)
    damage(tmp_path / "a" / "adapter_model.safetensors")
    twin = _twin(g, layers)
    before = _snapshot(g, twin)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        gl.load_adapter(tmp_path / "a", g, twin)
    for old, new in zip(before, _snapshot(g, twin), strict=True):
        np.testing.assert_array_equal(old, new)


def test_bad_values_are_refused(tmp_path: Path) -> None:
    g = gl.Graph()
    layers = _layers(g)
    for value, error, match in [
        (np.full((4, 16), np.nan), ValueError, r"model.q.lora_A holds NaN or Inf"),
        (
            np.ones((4, 16), dtype=np.int32),
            TypeError,
            r"model.q.lora_A holds int32 data; it needs floating-point data",
        ),
    ]:
        gl.save_adapter(tmp_path / "a", g, layers, overwrite=True)
        file = tmp_path / "a" / "adapter_model.safetensors"
        tensors = st_numpy.load_file(str(file))
        tensors["base_model.model.model.q.lora_A.weight"] = value
        st_numpy.save_file(tensors, str(file))
        with pytest.raises(error, match=match):
            gl.load_adapter(tmp_path / "a", g, _twin(g, layers))


class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (Path(self.marker), "unpickled!"))  # type: ignore[attr-defined]


def test_pickle_files_are_refused_and_never_opened(tmp_path: Path) -> None:
    directory = tmp_path / "torch_adapter"
    directory.mkdir()
    marker = tmp_path / "marker"
    boom = _Boom()
    boom.marker = str(marker)  # type: ignore[attr-defined]
    (directory / "adapter_model.bin").write_bytes(pickle.dumps(boom))
    (directory / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    g = gl.Graph()
    with pytest.raises(
        ValueError,
        match=r"adapter_model.bin is a pickle file, which can run arbitrary code when loaded; graphlora never unpickles",
    ):
        gl.load_adapter(directory, g, _layers(g))
    assert not marker.exists()


def test_existing_directory_needs_overwrite(tmp_path: Path) -> None:
    g = gl.Graph()
    layers = _layers(g)
    gl.save_adapter(tmp_path / "a", g, layers)
    with pytest.raises(
        FileExistsError, match=r"save_adapter: .* already exists; pass overwrite=True"
    ):
        gl.save_adapter(tmp_path / "a", g, layers)
    g.set_value(layers["model.q"].lora_b, np.zeros((4, 8)))
    gl.save_adapter(tmp_path / "a", g, layers, overwrite=True)
    tensors = st_numpy.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert not tensors["base_model.model.model.q.lora_B.weight"].any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary leftovers


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_save_leaves_the_old_adapter_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: BaseException
) -> None:
    g = gl.Graph()
    layers = _layers(g)
    gl.save_adapter(tmp_path / "a", g, layers)
    expected = np.array(g.value(layers["model.q"].lora_b))
    g.set_value(layers["model.q"].lora_b, np.zeros((4, 8)))
    calls = []
    real = glio._write_bytes

    def failing(target: Path, data: bytes) -> None:
        calls.append(target.name)
        if len(calls) == 2:  # after the weights, before the config
            raise interruption
        real(target, data)

    monkeypatch.setattr(glio, "_write_bytes", failing)
    with pytest.raises(type(interruption)):
        gl.save_adapter(tmp_path / "a", g, layers, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    twin = _twin(g, layers)
    gl.load_adapter(tmp_path / "a", g, twin)
    np.testing.assert_array_equal(g.value(twin["model.q"].lora_b), expected)


def test_save_refuses_what_peft_cannot_express(tmp_path: Path) -> None:
    g = gl.Graph()
    a = gl.LoraLinear.new(g, 4, 4, gl.LoraConfig(rank=2, use_rslora=True))
    b = gl.LoraLinear.new(g, 4, 4, gl.LoraConfig(rank=2))
    with pytest.raises(
        ValueError,
        match=r"save_adapter: the layers differ in use_rslora \(\[False, True\]\); PEFT has one",
    ):
        gl.save_adapter(tmp_path / "x", g, {"a": a, "b": b})
    with pytest.raises(
        ValueError, match=r"save_adapter: layer name 'bad name' must be dotted identifiers"
    ):
        gl.save_adapter(tmp_path / "x", g, {"bad name": a})
    with pytest.raises(
        TypeError,
        match=r"save_adapter: layers must be a model with LoRA layers or a non-empty mapping",
    ):
        gl.save_adapter(tmp_path / "x", g, {})
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("layout", ["torch", "graphlora"])
def test_save_merged(tmp_path: Path, layout: str) -> None:
    g = gl.Graph()
    layers = _layers(g)
    biased = gl.LoraLinear.new(g, 5, 3, gl.LoraConfig(rank=1, seed=0), name="head")
    out = gl.save_merged(
        tmp_path / "merged.safetensors", g, {**layers, "head": biased}, layout=layout
    )
    tensors = st_numpy.load_file(str(out))
    assert sorted(tensors) == [
        "head.bias",
        "head.weight",
        "model.q.bias",
        "model.q.weight",
        "model.v.bias",
        "model.v.weight",
    ]
    expected = layers["model.q"].merge(g)
    np.testing.assert_array_equal(
        tensors["model.q.weight"], expected.T if layout == "torch" else expected
    )
    np.testing.assert_array_equal(tensors["head.bias"], g.value(biased.bias))  # type: ignore[arg-type]
    with pytest.raises(
        FileExistsError, match=r"save_merged: .* already exists; pass overwrite=True"
    ):
        gl.save_merged(out, g, layers)
    with pytest.raises(
        FileExistsError, match=r"save_merged: .* is a directory, not a file to write"
    ):
        gl.save_merged(tmp_path, g, layers, overwrite=True)
    assert gl.save_merged(out, g, layers, overwrite=True) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]  # no leftovers
    with pytest.raises(
        ValueError, match="save_merged: layout must be 'torch' or 'graphlora', got 'tf'"
    ):
        gl.save_merged(tmp_path / "m2.safetensors", g, layers, layout="tf")


# --- graphlora inspect -----------------------------------------------------------------------------


def test_inspect_prints_config_and_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = gl.Graph(np.float32)
    layers = _layers(g)
    gl.save_adapter(tmp_path / "a", g, layers)
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "peft_type 'LORA', r 4, lora_alpha 8, use_rslora False" in out
    assert "rank_pattern: {'model.v': 2}" in out
    row = next(line for line in out.splitlines() if line.startswith("model.v "))
    fields = row.split()
    assert fields[1:5] == ["(2,", "16)", "(6,", "2)"]
    assert fields[5] == "float32"
    assert float(fields[8]) == 2.0  # scaling 4 / 2
    delta = 2.0 * np.linalg.norm(layers["model.v"].delta(g) / 2.0)
    assert abs(float(fields[9]) - delta) < 1e-3 * delta


@pytest.mark.parametrize("make", ["missing", "file", "pickle"])
def test_inspect_fails_clearly_on_a_bad_directory(
    tmp_path: Path, make: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "x"
    if make == "file":
        target.write_text("hello")
    elif make == "pickle":
        target.mkdir()
        (target / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    assert main(["inspect", str(target)]) == (1 if make == "pickle" else 2)  # 2: a bad path
    err = capsys.readouterr().err
    assert err.startswith("graphlora inspect: error: read_adapter: ")
    assert ("pickle" in err) == (make == "pickle")


def test_demo_saves_an_adapter(tmp_path: Path) -> None:
    target = tmp_path / "demo_adapter"
    assert main(["demo", "--steps", "10", "--no-progress", "--save-adapter", str(target)]) == 0
    adapter = glio.read_adapter(target)
    assert adapter.a["proj"].shape == (4, 64)
    with pytest.raises(SystemExit) as info:  # it exists: refused before training, as usage
        main(["demo", "--steps", "10", "--no-progress", "--save-adapter", str(target)])
    assert info.value.code == 2
    assert (
        main(
            ["demo", "--steps", "10", "--no-progress", "--save-adapter", str(target), "--overwrite"]
        )
        == 0
    )


# --- against real PEFT -----------------------------------------------------------------------------


def _torch_model(torch: Any, g: gl.Graph, layers: dict[str, gl.LoraLinear]) -> Any:
    """A torch module with nn.Linear submodules named like the layers, holding their base weights."""
    root = torch.nn.Module()
    for name, layer in layers.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        linear = torch.nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None
        ).double()
        with torch.no_grad():
            linear.weight.copy_(torch.tensor(np.array(g.value(layer.frozen_weight)).T))
            if layer.bias is not None:
                linear.bias.copy_(torch.tensor(np.array(g.value(layer.bias))))
        parent.add_module(leaf, linear)
    return root


@pytest.mark.crosscheck
def test_peft_loads_a_graphlora_adapter_and_the_reverse(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    g = gl.Graph()
    layers = _layers(g)
    gl.save_adapter(tmp_path / "ours", g, layers)
    model = peft.PeftModel.from_pretrained(_torch_model(torch, g, layers), str(tmp_path / "ours"))
    x = np.random.default_rng(0).normal(size=(5, 16))
    for name, layer in layers.items():
        module = model.base_model.model.get_submodule(name)
        theirs = module(torch.tensor(x)).detach().numpy()
        np.testing.assert_allclose(theirs, g.value(layer.forward(g, g.constant(x))), atol=1e-6)

    # PEFT -> graphlora: train-free random adapters, saved by PEFT's own save_pretrained.
    base = _torch_model(torch, g, layers)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(layers),
        rank_pattern={"model.v": 2},
        alpha_pattern={"model.v": 4},
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(base, config)
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    twin = _twin(g, layers)
    gl.load_adapter(tmp_path / "theirs", g, twin)
    for name, layer in twin.items():
        module = peft_model.base_model.model.get_submodule(name)
        theirs = module(torch.tensor(x)).detach().numpy()
        np.testing.assert_allclose(g.value(layer.forward(g, g.constant(x))), theirs, atol=1e-6)


# --- DoRA, embeddings and several adapters ----------------------------------------------------------


class _Model:
    """An embedding ``emb`` (7 x 6) and a linear ``fc`` (6 -> 5), for adapter sets."""

    def __init__(self, g: gl.Graph) -> None:
        rng = np.random.default_rng(0)
        self.emb = gl.Embedding.new(g, 7, 6, rng=rng, name="emb")
        self.fc = gl.Linear.new(g, 6, 5, rng=rng, name="fc")

    def forward(self, g: gl.Graph, ids: Any) -> gl.NodeId:
        return self.fc.forward(g, self.emb.forward(g, ids))


def _adapted(g: gl.Graph, seed: int = 1) -> _Model:
    """``default``: LoRA on emb and fc; ``second``: DoRA on fc; every value drawn."""
    model = _Model(g)
    gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0), ["emb", "fc"])
    dora = gl.LoraConfig(rank=3, alpha=3.0, use_dora=True)
    gl.apply_lora(model, dora, ["fc"], adapter_name="second")
    rng = np.random.default_rng(seed)
    for layer in gl.nn.lora_layers(model).values():
        for update in layer.adapters.values():
            for leaf in update.params():
                g.set_value(leaf, rng.uniform(0.5, 1.5, size=leaf.shape))
    return model


def _values(g: gl.Graph, model: _Model) -> dict[str, np.ndarray]:
    return {k: np.array(g.value(v)) for k, v in gl.nn.named_leaves(model) if "lora" in k}


def test_dora_embeddings_and_several_adapters_round_trip_in_peft_layout(tmp_path: Path) -> None:
    g = gl.Graph()
    model = _adapted(g)
    out = gl.save_adapter(tmp_path / "a", g, model)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "second",
    ]
    tensors = st_numpy.load_file(str(out / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {
        "base_model.model.emb.lora_embedding_A": (2, 7),
        "base_model.model.emb.lora_embedding_B": (6, 2),
        "base_model.model.fc.lora_A.weight": (2, 6),
        "base_model.model.fc.lora_B.weight": (5, 2),
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is False and config["target_modules"] == ["emb", "fc"]
    second = json.loads((out / "second" / "adapter_config.json").read_text())
    assert (second["use_dora"], second["r"], second["target_modules"]) == (True, 3, ["fc"])
    tensors = st_numpy.load_file(str(out / "second" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {
        "base_model.model.fc.lora_A.weight": (3, 6),
        "base_model.model.fc.lora_B.weight": (5, 3),
        "base_model.model.fc.lora_magnitude_vector": (5,),
    }
    g2 = gl.Graph()
    twin = _adapted(g2, seed=2)
    gl.load_adapter(out, g2, twin)
    gl.load_adapter(out, g2, twin, adapter_name="second")
    for key, value in _values(g, model).items():
        np.testing.assert_array_equal(_values(g2, twin)[key], value, err_msg=key)
    only = gl.save_adapter(tmp_path / "b", g, model, adapter_name="second")
    assert sorted(p.name for p in only.iterdir()) == ["second"]


def test_dora_and_embedding_mismatches_are_refused_and_change_nothing(tmp_path: Path) -> None:
    g = gl.Graph()
    gl.save_adapter(tmp_path / "a", g, _adapted(g))
    plain = _Model(g)  # second without DoRA
    gl.apply_lora(plain, gl.LoraConfig(rank=2, alpha=4.0), ["emb", "fc"])
    gl.apply_lora(plain, gl.LoraConfig(rank=3, alpha=3.0), ["fc"], adapter_name="second")
    before = _values(g, plain)
    with pytest.raises(ValueError, match="layer 'fc': the file has use_dora True, the layer False"):
        gl.load_adapter(tmp_path / "a", g, plain, adapter_name="second")
    with pytest.raises(
        ValueError, match=r"no layer holds an adapter 'third'; they hold \['default', 'second'\]"
    ):
        gl.load_adapter(tmp_path / "a", g, plain, adapter_name="third")
    gl.save_adapter(tmp_path / "plain", g, plain)
    dora = _adapted(g, seed=3)
    with pytest.raises(ValueError, match="layer 'fc': the file has use_dora False, the layer True"):
        gl.load_adapter(tmp_path / "plain", g, dora, adapter_name="second")
    as_linear = {
        "emb": gl.LoraLinear.new(g, 7, 6, gl.LoraConfig(rank=2, alpha=4.0)),
        "fc": plain.fc,
    }
    with pytest.raises(
        ValueError, match="layer 'emb': the file has embedding True, the layer False"
    ):
        gl.load_adapter(tmp_path / "plain", g, as_linear)
    for key, value in before.items():
        np.testing.assert_array_equal(_values(g, plain)[key], value)
    gl.apply_lora(dora, gl.LoraConfig(rank=2, use_dora=True), ["fc"], adapter_name="mixed")
    gl.apply_lora(dora, gl.LoraConfig(rank=2), ["emb"], adapter_name="mixed")
    with pytest.raises(ValueError, match=r"the layers differ in use_dora \(\[False, True\]\)"):
        gl.save_adapter(tmp_path / "mixed", g, dora)
    assert not (tmp_path / "mixed").exists()
    # a DoRA config without its magnitudes, or magnitudes without DoRA, is a damaged file
    weights = tmp_path / "a" / "second" / "adapter_model.safetensors"
    tensors = st_numpy.load_file(str(weights))
    del tensors["base_model.model.fc.lora_magnitude_vector"]
    weights.write_bytes(st_numpy.save(tensors))
    with pytest.raises(ValueError, match=r"says use_dora true but .* has DoRA magnitudes for \[\]"):
        glio.read_adapter(tmp_path / "a" / "second")


@pytest.mark.crosscheck
def test_peft_reads_our_dora_embedding_and_second_adapters_and_the_reverse(
    tmp_path: Path,
) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    g = gl.Graph()
    model = _adapted(g)
    gl.save_adapter(tmp_path / "ours", g, model)

    def torch_model() -> Any:
        root = torch.nn.Module()
        root.add_module("emb", torch.nn.Embedding(7, 6).double())
        root.add_module("fc", torch.nn.Linear(6, 5).double())
        with torch.no_grad():
            root.emb.weight.copy_(torch.tensor(np.array(g.value(model.emb.frozen_weight))))
            root.fc.weight.copy_(torch.tensor(np.array(g.value(model.fc.frozen_weight)).T))
            root.fc.bias.copy_(torch.tensor(np.array(g.value(model.fc.bias))))
        return root

    ids = np.array([[0, 6, 2], [3, 3, 1]])

    def run_peft(peft_model: Any) -> np.ndarray:
        base = peft_model.base_model.model
        with torch.no_grad():
            return base.fc(base.emb(torch.tensor(ids))).numpy()

    def run_ours(graph: gl.Graph, ours: _Model) -> np.ndarray:
        with graph.no_grad():
            return np.array(graph.value(ours.forward(graph, ids)))

    theirs = peft.PeftModel.from_pretrained(torch_model(), str(tmp_path / "ours"))
    theirs.load_adapter(str(tmp_path / "ours" / "second"), adapter_name="second")
    np.testing.assert_allclose(run_peft(theirs), run_ours(g, model), rtol=1e-10)
    theirs.base_model.set_adapter(["default", "second"])
    gl.set_adapter(model, ["default", "second"])
    np.testing.assert_allclose(run_peft(theirs), run_ours(g, model), rtol=1e-10)

    # PEFT -> graphlora: PEFT's own save_pretrained of two adapters, one in a subfolder
    fresh = peft.get_peft_model(
        torch_model(),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "fc"], init_lora_weights=False),
    )
    dora = peft.LoraConfig(
        r=3, lora_alpha=3, target_modules=["fc"], use_dora=True, init_lora_weights=False
    )
    fresh.add_adapter("second", dora)
    fresh.save_pretrained(str(tmp_path / "theirs"))
    assert (tmp_path / "theirs" / "second" / "adapter_model.safetensors").is_file()
    g2 = gl.Graph()
    twin = _Model(g2)
    twin.emb.weight, twin.fc.weight, twin.fc.bias = (
        g2.parameter(g.value(model.emb.frozen_weight)),
        g2.parameter(g.value(model.fc.frozen_weight)),
        g2.parameter(g.value(model.fc.bias)),
    )
    gl.apply_lora(twin, gl.LoraConfig(rank=2, alpha=4.0), ["emb", "fc"])
    gl.apply_lora(
        twin, gl.LoraConfig(rank=3, alpha=3.0, use_dora=True), ["fc"], adapter_name="second"
    )
    gl.load_adapter(tmp_path / "theirs", g2, twin)
    gl.load_adapter(tmp_path / "theirs", g2, twin, adapter_name="second")
    np.testing.assert_allclose(run_ours(g2, twin), run_peft(fresh), rtol=1e-10)
    fresh.base_model.set_adapter(["default", "second"])
    gl.set_adapter(twin, ["default", "second"])
    np.testing.assert_allclose(run_ours(g2, twin), run_peft(fresh), rtol=1e-10)


# --- hostile configs, and PEFT's copy of an adapted embedding ---------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"r": 0}, r"has r 0; it must be an int >= 1"),
        ({"r": 2.0}, r"has r 2.0; it must be an int >= 1"),
        ({"r": True}, r"has r True; it must be an int >= 1"),
        ({"lora_alpha": "8"}, r"has lora_alpha '8'; it must be a finite number"),
        ({"lora_alpha": 1e400}, r"has lora_alpha inf; it must be a finite number"),
        (
            {"rank_pattern": {"model.q": 2.9}},
            r"has rank_pattern\['model.q'\] 2.9; it must be an int",
        ),
        ({"rank_pattern": {"model.q": 0}}, r"has rank_pattern\['model.q'\] 0; it must be an int"),
        ({"rank_pattern": "x"}, r"has a rank_pattern that is not a mapping"),
        ({"alpha_pattern": [1]}, r"has a alpha_pattern that is not a mapping"),
        ({"alpha_pattern": {"v": None}}, r"has alpha_pattern\['v'\] None; it must be a finite"),
        (
            {"rank_pattern": {"model.q": 3}},
            r"model.q has A \(4, 16\) and B \(8, 4\), which do not have the rank 3",
        ),
    ],
)
def test_hostile_adapter_configs_are_refused_by_name(
    tmp_path: Path, change: dict[str, Any], match: str
) -> None:
    g = gl.Graph()
    layers = _layers(g)
    gl.save_adapter(tmp_path / "a", g, layers)
    file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, **change}).replace("Infinity", "1e400"))
    twin = _twin(g, layers)
    before = _snapshot(g, twin)
    with pytest.raises(ValueError, match=r"^read_adapter: .*" + match):
        glio.read_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match=match):
        gl.load_adapter(tmp_path / "a", g, twin)
    for old, new in zip(before, _snapshot(g, twin), strict=True):
        np.testing.assert_array_equal(old, new)
    assert main(["inspect", str(tmp_path / "a")]) == 1


def test_a_deeply_nested_adapter_config_is_refused(tmp_path: Path) -> None:
    g = gl.Graph()
    gl.save_adapter(tmp_path / "a", g, _layers(g))
    (tmp_path / "a" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"^read_adapter: .* is nested too deeply to be a config$"):
        glio.read_adapter(tmp_path / "a")


def test_peft_s_copy_of_an_adapted_embedding_loads_into_its_base(tmp_path: Path) -> None:
    g = gl.Graph()
    model = _adapted(g)
    gl.save_adapter(tmp_path / "a", g, model)
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = st_numpy.load_file(str(file))
    base = np.random.default_rng(5).normal(size=(7, 6))
    for weight, error, match in [
        (
            np.ones((7, 5)),
            gl.ShapeError,
            r"emb.base_layer.weight has shape \(7, 5\), expected \(7, 6\)",
        ),
        (np.full((7, 6), np.nan), ValueError, r"emb.base_layer.weight holds NaN or Inf"),
    ]:
        st_numpy.save_file({**tensors, "base_model.model.emb.base_layer.weight": weight}, str(file))
        h = gl.Graph()
        other = _adapted(h, seed=2)
        before = _values(h, other)
        frozen = np.array(h.value(other.emb.frozen_weight))
        with pytest.raises(error, match=r"^load_adapter: " + match):
            gl.load_adapter(tmp_path / "a", h, other)
        np.testing.assert_array_equal(h.value(other.emb.frozen_weight), frozen)
        for key, value in _values(h, other).items():
            np.testing.assert_array_equal(value, before[key])
    st_numpy.save_file(
        {**tensors, "base_model.model.fc.base_layer.weight": np.ones((5, 6))}, str(file)
    )
    with pytest.raises(
        ValueError, match=r"base weights for \['fc'\], which are not adapted embeddings"
    ):
        glio.read_adapter(tmp_path / "a")
    st_numpy.save_file({**tensors, "base_model.model.emb.base_layer.weight": base}, str(file))
    h = gl.Graph()
    other = _adapted(h, seed=2)
    assert glio.read_adapter(tmp_path / "a").base.keys() == {"emb"}
    gl.load_adapter(tmp_path / "a", h, other)
    np.testing.assert_array_equal(h.value(other.emb.frozen_weight), base)
    np.testing.assert_array_equal(
        h.value(other.emb.lora_a),
        g.value(model.emb.lora_a),  # the adapter too
    )


@pytest.mark.crosscheck
def test_a_peft_adapter_with_an_adapted_llama_embedding_loads(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    hf = peft.get_peft_model(
        transformers.LlamaForCausalLM(config),
        peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False),
    )
    hf.save_pretrained(tmp_path / "peft")
    written = st_numpy.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    base_key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert base_key in written  # what PEFT writes whenever an embedding is targeted

    g = gl.Graph()
    rng = np.random.default_rng(0)
    embed = gl.Embedding.new(g, 10, 8, rng=rng, name="model.embed_tokens")
    q = gl.Linear.new(g, 8, 8, rng=rng, name="model.layers.0.self_attn.q_proj")
    layers = {
        "model.embed_tokens": gl.LoraEmbedding.from_embedding(
            g, embed.weight, gl.LoraConfig(rank=2, alpha=8.0)
        ),
        "model.layers.0.self_attn.q_proj": gl.LoraLinear.from_linear(
            g, q.weight, q.bias, gl.LoraConfig(rank=2, alpha=8.0)
        ),
    }
    gl.load_adapter(tmp_path / "peft", g, layers)
    np.testing.assert_array_equal(
        g.value(layers["model.embed_tokens"].frozen_weight), written[base_key]
    )
    np.testing.assert_array_equal(
        g.value(layers["model.embed_tokens"].lora_a),
        written["base_model.model.model.embed_tokens.lora_embedding_A"].T,
    )


class _Narrow:
    """One linear ``fc`` (20 -> 2), narrower than PEFT's default rank of 8."""

    def __init__(self, g: gl.Graph, weight: np.ndarray, bias: np.ndarray) -> None:
        self.fc = gl.Linear.from_arrays(g, weight, bias, name="fc")

    def forward(self, g: gl.Graph, x: gl.NodeId) -> gl.NodeId:
        return self.fc.forward(g, x)


@pytest.mark.crosscheck
@pytest.mark.parametrize("use_dora", [False, True])
def test_a_rank_above_min_in_out_goes_both_ways_with_peft(tmp_path: Path, use_dora: bool) -> None:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("fc", torch.nn.Linear(20, 2).double())
    config = peft.LoraConfig(r=8, target_modules=["fc"], init_lora_weights=False, use_dora=use_dora)
    theirs = peft.get_peft_model(base, config)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    weight = base.fc.base_layer.weight.detach().numpy().T
    bias = base.fc.base_layer.bias.detach().numpy()
    x = np.random.default_rng(0).normal(size=(4, 20))
    expected = theirs(torch.tensor(x)).detach().numpy()
    g = gl.Graph()
    ours = _Narrow(g, weight, bias)
    layers = gl.apply_adapter(tmp_path / "theirs", g, ours)
    assert layers["fc"].rank == 8 and g.value(layers["fc"].lora_a).shape == (20, 8)
    np.testing.assert_allclose(g.value(ours.forward(g, g.constant(x))), expected, atol=1e-12)
    # and back: graphlora's rank-8 adapter on the 20 -> 2 layer, into PEFT
    g2 = gl.Graph()
    mine = _Narrow(g2, weight, bias)
    adapted = gl.apply_lora(mine, gl.LoraConfig(rank=8, init="random", use_dora=use_dora, seed=3))
    gl.save_adapter(tmp_path / "ours", g2, mine)
    torch.manual_seed(1)
    fresh = torch.nn.Sequential()
    fresh.add_module("fc", torch.nn.Linear(20, 2).double())
    with torch.no_grad():
        fresh.fc.weight.copy_(torch.tensor(weight.T))
        fresh.fc.bias.copy_(torch.tensor(bias))
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ours"))
    np.testing.assert_allclose(
        loaded(torch.tensor(x)).detach().numpy(),
        g2.value(adapted["fc"].forward(g2, g2.constant(x))),
        atol=1e-12,
    )
