"""Text in and out: a checkpoint's own ``tokenizer.json`` read with the ``tokenizers`` library
(the optional extra ``text``), the ids the language models take, and their masks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora import _checks
from graphlora.nn import checkpoint

__all__ = ["Tokenizer"]


def _tokenizers(where: str) -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            f"{where} needs the tokenizers package: {_checks.install_hint('text')}"
        ) from None
    return tokenizers


def _special(where: str, config: dict[str, Any], key: str) -> str | None:
    """A special token of ``tokenizer_config.json``: a string, or transformers' ``{"content":
    ...}`` form."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: tokenizer_config.json's {key} must be a string, got {value!r}")
    return value


class Tokenizer:
    """A checkpoint's tokenizer: ``encode`` text to ids, ``decode`` ids to text, and
    ``encode_batch`` several texts to left-padded ids with their attention mask, ready for a
    model's ``forward`` and ``generate``.

    Built with ``Tokenizer.from_pretrained(path)``. ``eos_token_id``, ``bos_token_id`` and
    ``pad_token_id`` come from ``tokenizer_config.json`` beside ``tokenizer.json`` where it names
    them (``None`` otherwise); padding uses ``pad_token_id``, else the eos id, else 0 (padding is
    masked out, so its id never matters).
    """

    def __init__(
        self,
        backend: Any,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        self.backend = backend
        self.eos_token_id = self._id(eos_token)
        self.bos_token_id = self._id(bos_token)
        self.pad_token_id = self._id(pad_token)

    def _id(self, token: str | None) -> int | None:
        if token is None:
            return None
        found = self.backend.token_to_id(token)
        return None if found is None else int(found)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read ``tokenizer.json`` (and ``tokenizer_config.json`` if present) from the folder
        ``path``, or the file ``path`` itself.

        Raises
        ------
        ImportError
            Without the ``tokenizers`` package, saying how to install it.
        FileNotFoundError
            For a missing folder or file.
        ValueError
            For a file the ``tokenizers`` library cannot read.
        """
        where = "Tokenizer.from_pretrained"
        target = Path(path)
        file = target / "tokenizer.json" if target.is_dir() else target
        if not file.is_file():
            raise FileNotFoundError(f"{where}: {file} does not exist")
        library = _tokenizers(where)
        try:
            backend = library.Tokenizer.from_file(str(file))
        except Exception as error:  # the library raises its own exception types
            raise ValueError(
                f"{where}: {file} is not a tokenizer the tokenizers library reads: {error}"
            ) from None
        config_file = file.parent / "tokenizer_config.json"
        config = checkpoint.read_json(where, config_file) if config_file.is_file() else {}
        return cls(
            backend,
            eos_token=_special(where, config, "eos_token"),
            bos_token=_special(where, config, "bos_token"),
            pad_token=_special(where, config, "pad_token"),
        )

    @property
    def vocab_size(self) -> int:
        """The number of ids, added tokens included."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> npt.NDArray[np.int64]:
        """The ids of ``text`` (int64 ``[T]``), with the tokenizer's special tokens (a BOS, say)
        where its post-processor adds them, as transformers' tokenizers do by default."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: text must be a str, got {_checks.describe(text)}")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return np.array(ids, dtype=np.int64)

    def decode(self, ids: npt.ArrayLike, *, skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (``[T]``), special tokens left out unless asked for."""
        array = np.asarray(ids)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise ValueError(
                f"Tokenizer.decode: ids must be one sequence of integer ids, got shape "
                f"{array.shape} and dtype {array.dtype}"
            )
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            bad = int(array.min()) if array.min() < 0 else int(array.max())
            raise ValueError(
                f"Tokenizer.decode: id {bad} is out of range for a vocabulary of {self.vocab_size}"
            )
        text: str = self.backend.decode(
            [int(i) for i in array], skip_special_tokens=skip_special_tokens
        )
        return text

    def encode_batch(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """``(ids, attention_mask)``, both int64 ``[B, T]``: each text's ids, left-padded to the
        longest (as generation wants), and 1 where a real token stands, 0 on padding."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("Tokenizer.encode_batch: texts must be a list of str")
        rows = [self.encode(text, add_special_tokens=add_special_tokens) for text in texts]
        width = max((len(row) for row in rows), default=0)
        pad = next((i for i in (self.pad_token_id, self.eos_token_id) if i is not None), 0)
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, row in enumerate(rows):
            if len(row):
                ids[b, width - len(row) :] = row
                mask[b, width - len(row) :] = 1
        return ids, mask

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"
