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
