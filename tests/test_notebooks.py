"""docs/make_notebooks.py: every tutorial becomes a notebook whose code cells are the page's
Python blocks, in order, with the expected outputs between them (jupytext, an optional extra)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from test_docs import ROOT, blocks


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_notebooks", ROOT / "docs" / "make_notebooks.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_tutorial_becomes_a_notebook_of_its_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("jupytext")
    script = _script()
    assert script.main([str(tmp_path)]) == 0
    pages = script.pages()
    assert {p.stem for p in pages} >= {"lab", "lora-from-scratch", "memory", "the-tape"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{p.stem}.ipynb" for p in pages)
    for page in pages:
        book = json.loads((tmp_path / f"{page.stem}.ipynb").read_text(encoding="utf-8"))
        assert book["metadata"]["kernelspec"]["name"] == "python3"
        code = ["".join(c["source"]) for c in book["cells"] if c["cell_type"] == "code"]
        found = blocks(page.read_text(encoding="utf-8"))
        python = [(body, needs) for lang, body, _, needs in found if lang == "python"]
        assert len(code) == len(python), page.name
        for cell, (body, needs) in zip(code, python, strict=True):
            note = f"# needs {','.join(needs)}\n" if needs else ""
            assert cell == note + body.rstrip("\n"), page.name
        text = "".join("".join(c["source"]) for c in book["cells"] if c["cell_type"] == "markdown")
        for lang, body, follows_python, _ in found:
            if lang == "text" and follows_python:  # the expected outputs stay, between the cells
                assert body.rstrip("\n") in text, page.name
    assert f"wrote {tmp_path / 'lab.ipynb'}" in capsys.readouterr().out
