"""Make Jupyter notebooks of the tutorials, to run cell by cell:
``python docs/make_notebooks.py [DIR]`` (default ``docs/notebooks``; needs jupytext:
``pip install -e '.[notebooks]'``).

Each page of ``docs/`` with Python blocks becomes ``DIR/<page>.ipynb``: every ```` ```python ````
block a code cell, in order, and the text between them, with each block's expected output and
the shell commands (shown, not run), a markdown cell. A block that needs an optional package
(```` ```python requires=ml_dtypes ````) starts with a comment that says which. Pages that
write files write them where the notebook runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent


def notebook(page: Path) -> Any:
    """The notebook of one page (a ``nbformat`` notebook)."""
    import jupytext
    import nbformat

    book = jupytext.read(page, fmt="md")
    for i, cell in enumerate(book.cells):
        if cell.cell_type == "code" and cell.source.startswith("%%"):  # a shell block: shown
            language, _, body = cell.source.partition("\n")
            fenced = f"```{language.removeprefix('%%')}\n{body}\n```"
            book.cells[i] = nbformat.v4.new_markdown_cell(fenced)
            continue
        needs = cell.metadata.pop("incorrectly_encoded_metadata", "")  # the block's requires=
        if cell.cell_type == "code" and needs.startswith("requires="):
            cell.source = f"# needs {needs.removeprefix('requires=')}\n{cell.source}"
    book.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    book.metadata.pop("jupytext", None)  # a plain notebook, not paired with the page
    return book


def pages() -> list[Path]:
    """The tutorial pages with at least one Python block."""
    return [page for page in sorted(DOCS.glob("*.md")) if "```python" in page.read_text("utf-8")]


def main(argv: list[str]) -> int:
    import jupytext

    target = Path(argv[0]) if argv else DOCS / "notebooks"
    target.mkdir(parents=True, exist_ok=True)
    for page in pages():
        path = target / f"{page.stem}.ipynb"
        text = jupytext.writes(notebook(page), fmt="ipynb")
        handle, scratch = tempfile.mkstemp(dir=target, suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(scratch, path)  # whole or not at all
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
