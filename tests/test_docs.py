"""The README and every tutorial in docs/ run: each ```python block is executed in order, in one
namespace per page, and a ```text block right after a python block must be exactly what it printed.
A block opened as ```python requires=torch,peft runs only where those packages import; the others
always run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "index.md")
PAGES = [ROOT / "README.md", *TUTORIALS]
BLOCK = re.compile(
    r"^```(\w+)(?: requires=([\w,]+))?\n(.*?)^```[ \t]*$", flags=re.DOTALL | re.MULTILINE
)


def blocks(text: str) -> list[tuple[str, str, bool, list[str]]]:
    """``(language, code, follows_python, requirements)`` for every fenced block, in order."""
    found = []
    previous_end, previous_lang = -1, ""
    for match in BLOCK.finditer(text):
        adjacent = previous_lang == "python" and not text[previous_end : match.start()].strip()
        requires = match.group(2).split(",") if match.group(2) else []
        found.append((match.group(1), match.group(3), adjacent, requires))
        previous_end, previous_lang = match.end(), match.group(1)
    return found


CROSSCHECKED = [
    pytest.param(page, marks=pytest.mark.crosscheck)
    if " requires=" in page.read_text(encoding="utf-8")
    else page
    for page in PAGES
]


@pytest.mark.slow
@pytest.mark.parametrize("page", CROSSCHECKED, ids=[p.name for p in PAGES])
def test_page_runs_and_shows_real_output(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # pages may write files: keep them out of the tree
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    printed: str | None = ""
    ran = 0
    for lang, code, follows_python, requires in blocks(page.read_text(encoding="utf-8")):
        absent = [name for name in requires if importlib.util.find_spec(name) is None]
        if absent:
            if os.environ.get("GRAPHLORA_CROSSCHECK") == "1":
                pytest.fail(
                    f"{page.name}: a block needs {absent}, which GRAPHLORA_CROSSCHECK=1 requires"
                )
            printed = None  # skipped: its output cannot be compared
            continue
        if lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, str(page), "exec"), namespace)
            printed = out.getvalue()
            ran += 1
        elif lang == "text" and follows_python and printed is not None:
            assert printed == code, f"{page.name}: the output shown is not what the code prints"
    assert ran >= 1, f"{page.name} has no python block"


def test_the_index_links_every_tutorial_and_every_link_and_figure_exists() -> None:
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert len(TUTORIALS) >= 4
    for page in TUTORIALS:
        assert f"]({page.name})" in index, f"docs/index.md does not link {page.name}"
    for page in [ROOT / "README.md", ROOT / "docs" / "index.md", *TUTORIALS]:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links {target}, which is missing"
