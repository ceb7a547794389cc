"""Seeing the graph: ``render`` turns Graphviz DOT text into an image with Graphviz's ``dot``
when it is installed; ``to_dot`` and ``summary`` (the text, also ``Graph.to_dot`` and
``Graph.summary``) are the engine's and are re-exported here.

Constants are grey boxes, parameters blue boxes, ops ellipses (dashed when no gradient flows
through them); edges follow the data. Nodes made inside a ``Graph.scope`` are drawn in a labelled
cluster, so a ``LoraLinear`` shows its frozen path and its low-rank path side by side.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from graphlora.engine.describe import summary, to_dot

__all__ = ["render", "summary", "to_dot"]


def render(dot: str, path: str | Path, *, format: str | None = None) -> Path:
    """Draw DOT text into an image file with Graphviz's ``dot`` (format from the suffix).

    Raises
    ------
    FileNotFoundError
        When Graphviz is not installed; the message says how to get it. The DOT text itself
        needs nothing and can be pasted into any Graphviz viewer.
    ValueError
        When ``dot`` rejects the text or the format, with its reason.
    """
    if not isinstance(dot, str):
        raise TypeError(f"render: dot must be DOT text (a str), got {type(dot).__name__}")
    target = Path(path)
    kind = format or target.suffix.lstrip(".") or "png"
    executable = shutil.which("dot")
    if executable is None:
        raise FileNotFoundError(
            "render: Graphviz's 'dot' program is not installed. Install Graphviz (Debian/Ubuntu: "
            "apt-get install graphviz; macOS: brew install graphviz; conda: conda install "
            "graphviz), or paste the DOT text into any Graphviz viewer."
        )
    done = subprocess.run(
        [executable, f"-T{kind}", "-o", str(target)], input=dot.encode(), capture_output=True
    )
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip()
        raise ValueError(f"render: Graphviz's dot refused to draw it as {kind!r}: {reason}")
    return target
