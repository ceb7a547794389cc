"""gl.Tokenizer: a checkpoint's tokenizer.json in and out, left-padded batches with their masks,
against transformers' own fast tokenizer over the same file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import graphlora as gl

tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "LoRA adds a low-rank update to a frozen weight.",
    "The quick brown fox jumps over the lazy dog.",
    "Rotary positions turn each pair of features by an angle.",
]


def write_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer trained here on a few sentences, saved as transformers saves
    one: tokenizer.json (which adds <s> before each text) and tokenizer_config.json."""
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(CORPUS, trainer)
    model.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_special_tokens_come_from_the_config(folder: Path) -> None:
    tok = gl.Tokenizer.from_pretrained(folder)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok.encode("the fox")
    assert ids[0] == 1 and ids.dtype == np.int64
    assert tok.encode("the fox", add_special_tokens=False).tolist() == ids[1:].tolist()
    assert gl.Tokenizer.from_pretrained(folder / "tokenizer.json").vocab_size == tok.vocab_size


@given(text=st.text(max_size=40))
def test_any_text_comes_back_from_its_ids(folder: Path, text: str) -> None:
    tok = gl.Tokenizer.from_pretrained(folder)
    assert tok.decode(tok.encode(text)) == text


def test_a_batch_is_left_padded_with_its_mask(folder: Path) -> None:
    tok = gl.Tokenizer.from_pretrained(folder)
    texts = ["the fox", "LoRA adds a low-rank update", ""]
    ids, mask = tok.encode_batch(texts)
    assert ids.shape == mask.shape == (3, len(tok.encode(texts[1])))
    for row, m, text in zip(ids, mask, texts, strict=True):
        alone = tok.encode(text)
        assert m.tolist() == [0] * (len(row) - len(alone)) + [1] * len(alone)
        assert row[m == 1].tolist() == alone.tolist()
        assert (row[m == 0] == 0).all()  # the pad id


def test_refusals_name_the_function(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = gl.Tokenizer.from_pretrained(folder)
    with pytest.raises(
        FileNotFoundError, match=r"Tokenizer\.from_pretrained: .*tokenizer\.json does not exist"
    ):
        gl.Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a tokenizer the tokenizers library reads"):
        gl.Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"Tokenizer\.decode: id 300 is out of range"):
        tok.decode([1, 300])
    with pytest.raises(ValueError, match="one sequence of integer ids"):
        tok.decode([[1]])
    with pytest.raises(TypeError, match=r"Tokenizer\.encode: text must be a str"):
        tok.encode(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="texts must be a list of str"):
        tok.encode_batch("abc")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install 'graphlora\\[text\\]'"):
        gl.Tokenizer.from_pretrained(folder)


@pytest.mark.crosscheck
def test_ids_and_batches_equal_transformers_fast_tokenizer(folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )
    ours = gl.Tokenizer.from_pretrained(folder)
    texts = [*CORPUS, "unseen wörds ✓", "a"]
    for text in texts:
        assert ours.encode(text).tolist() == theirs(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == theirs.decode(
            theirs(text)["input_ids"], skip_special_tokens=True
        )
    batch = theirs(texts, padding=True)
    ids, mask = ours.encode_batch(texts)
    assert ids.tolist() == batch["input_ids"]
    assert mask.tolist() == batch["attention_mask"]


# --- the generate command -------------------------------------------------------------------------


def _checkpoint(directory: Path) -> tuple[gl.Graph, gl.Llama, gl.Tokenizer]:
    """A tiny Llama saved with its tokenizer, as a checkpoint folder."""
    tok = gl.Tokenizer.from_pretrained(write_tokenizer(directory.parent / "tok"))
    config = gl.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    g = gl.Graph(np.float32)
    model = gl.Llama.new(g, config, rng=0)
    for leaf in g.leaves:  # larger weights: a continuation that depends on the prompt
        g.set_value(leaf, g.value(leaf) * 30)
    model.save_pretrained(g, directory)
    write_tokenizer(directory)
    return g, model, gl.Tokenizer.from_pretrained(directory)


def test_generate_prints_the_greedy_continuation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphlora.__main__ import main

    g, model, tok = _checkpoint(tmp_path / "model")
    prompt = tok.encode("The quick brown fox")
    expected = tok.decode(
        model.generate(g, prompt, 5, eos_token_id=tok.eos_token_id)[len(prompt) :]
    )
    assert (
        main(
            [
                "generate",
                str(tmp_path / "model"),
                "--prompt",
                "The quick brown fox",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    adapters = gl.apply_lora(model, gl.LoraConfig(rank=2, alpha=4.0), ["q_proj", "v_proj"])
    for layer in adapters.values():
        g.set_value(layer.lora_b, np.random.default_rng(0).normal(0, 3.0, size=layer.lora_b.shape))
    gl.save_adapter(tmp_path / "adapter", g, model)
    adapted = tok.decode(model.generate(g, prompt, 5, eos_token_id=tok.eos_token_id)[len(prompt) :])
    argv = ["generate", str(tmp_path / "model"), "--prompt", "The quick brown fox"]
    assert main([*argv, "--max-new-tokens", "5", "--adapter", str(tmp_path / "adapter")]) == 0
    assert capsys.readouterr().out == adapted + "\n"
    assert main([*argv, "--temperature", "1.5", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*argv, "--temperature", "1.5", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first


def test_generate_refuses_bad_paths_and_flags_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphlora.__main__ import main

    assert main(["generate", str(tmp_path / "none"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphlora generate: error: Tokenizer.from_pretrained:")
    assert err.count("\n") == 1
    _checkpoint(tmp_path / "model")
    argv = ["generate", str(tmp_path / "model"), "--prompt", "x"]
    assert main([*argv, "--adapter", str(tmp_path / "none")]) == 2
    assert "graphlora generate: error:" in capsys.readouterr().err
    assert main([*argv, "--max-new-tokens", "100"]) == 2
    assert "longer than the model's context of 64" in capsys.readouterr().err
    for flags in (["--temperature", "-1"], ["--max-new-tokens", "0"], ["--seed", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, *flags])
        assert exit_.value.code == 2
    assert "--seed: expected an int" in capsys.readouterr().err
