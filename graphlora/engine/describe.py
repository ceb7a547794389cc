"""Describing a graph: Graphviz DOT text (``to_dot``) and a text table of the tape (``summary``),
behind ``Graph.to_dot`` and ``Graph.summary``. Turning DOT text into an image is
``graphlora.viz.render``'s (``graphlora/teach/viz.py``).

Constants are grey boxes, parameters blue boxes, ops ellipses (dashed when no gradient flows
through them); edges follow the data. Nodes made inside a ``Graph.scope`` are drawn in a labelled
cluster titled by ``title_scopes`` (the layers built on the engine register their scopes'
titles, so that a layer's paths are drawn side by side under names that say what they compute).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphlora.engine.graph import Graph, NodeId, check_graph

__all__ = ["summary", "title_scopes", "to_dot"]

_STYLES = {
    "constant": 'shape=box, style="filled", fillcolor="#e8e8e8"',
    "parameter": 'shape=box, style="filled,bold", fillcolor="#cfe2ff"',
}
_OP_STYLE = 'shape=ellipse, style="filled", fillcolor="#ffffff"'
_NO_GRAD_OP_STYLE = 'shape=ellipse, style="filled,dashed", fillcolor="#ffffff"'
_TITLES: dict[str, str] = {}  # scope name -> the title of its cluster
_FOLDS: dict[str, str] = {}  # scope name -> the sibling scope it is drawn inside, when both exist
_LEGEND = [  # (label, style) of the legend's sample nodes
    ("constant\n(never learns)", 'shape=box, style="filled", fillcolor="#e8e8e8"'),
    ("parameter\n(learns)", 'shape=box, style="filled,bold", fillcolor="#cfe2ff"'),
    ("op\n(gradient flows)", 'shape=ellipse, style="filled", fillcolor="#ffffff"'),
    (
        "op, dashed\n(no gradient flows)",
        'shape=ellipse, style="filled,dashed", fillcolor="#ffffff"',
    ),
]


def _nodes(graph: Graph, root: NodeId | None) -> list[NodeId]:
    """Every live node, or ``root`` and its ancestors, in id order."""
    if root is None:
        return sorted([*graph.leaves, *graph.tape], key=lambda node: node.id)
    root = graph.check(root, "to_dot", "root")
    seen = {root.id: root}
    stack = [root]
    while stack:
        for parent in stack.pop().inputs:
            if parent.id not in seen:
                seen[parent.id] = parent
                stack.append(parent)
    return [seen[i] for i in sorted(seen)]


def title_scopes(titles: dict[str, str], folds: dict[str, str] | None = None) -> None:
    """Register cluster titles for scope names (``{"frozen": "frozen path: x @ W"}``), and
    ``folds``: a scope drawn inside a sibling scope when both are present (a leaf made in one
    scope that now feeds the other, such as a merged layer's weight)."""
    _TITLES.update(titles)
    _FOLDS.update(folds or {})


def _fold(branch: dict[str, Any]) -> None:
    """Draw each folded scope inside its sibling, throughout the tree."""
    children = branch["children"]
    for inner, outer in _FOLDS.items():
        if inner in children and outer in children:
            folded = children.pop(inner)
            children[outer]["nodes"][:0] = folded["nodes"]
            children[outer]["children"].update(folded["children"])
    for child in children.values():
        _fold(child)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _describe(array: np.ndarray[Any, Any]) -> str:
    """A short text for a value or gradient: the numbers if few, else their range and norm."""
    if array.size <= 6:
        return np.array2string(np.asarray(array), precision=3, separator=", ", suppress_small=True)
    return f"[{array.min():.3g} .. {array.max():.3g}], |.|={np.linalg.norm(array):.3g}"


def _arguments(node: NodeId) -> str:
    """An op's scalar arguments, as ``c=2`` or ``axis=(0,) keepdims=False``; arrays, generators
    and ``None`` are left out."""
    parts = []
    for key, value in node.params.items():
        if isinstance(value, (bool, np.bool_, str)):
            parts.append(f"{key}={value}")
        elif isinstance(value, (int, float, np.integer, np.floating)):
            parts.append(
                f"{key}={float(value):g}" if isinstance(value, float) else f"{key}={value}"
            )
        elif (
            isinstance(value, tuple) and len(value) <= 4 and all(isinstance(v, int) for v in value)
        ):
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _label(graph: Graph, node: NodeId, show_values: bool, show_grads: bool) -> str:
    title = node.name if node.name is not None else node.op
    kind = node.op if node.name is not None else ""
    lines = [title, f"{kind} {node.shape}".strip()]
    arguments = _arguments(node)
    if arguments:
        lines.append(arguments)
    if show_values:
        lines.append(_describe(graph.value(node)))
    grad = graph.grad(node)
    if show_grads and grad is not None:
        lines.append("grad " + _describe(grad))
    return "\n".join(lines)


def to_dot(
    graph: Graph,
    root: NodeId | None = None,
    *,
    show_values: bool = False,
    show_grads: bool = False,
    legend: bool = False,
) -> str:
    """The graph as Graphviz DOT text: constants, parameters and ops in distinct styles.

    Every node shows its shape, and an op its scalar arguments (``c=2`` on a ``scale``);
    edges run in the direction data flows. With ``root``, only it and its ancestors are
    drawn. Nodes made in a ``scope`` are grouped in a labelled cluster, so that a layer's
    parts appear side by side (with titles for the scopes layers use, such as ``frozen``).
    ``show_values`` and ``show_grads`` add each node's value and gradient (numbers when few,
    else their range and norm: a gradient of zeros shows as zeros, and a node that got none
    shows none). ``legend`` adds a key to the styles: grey boxes are constants, blue boxes
    parameters, ellipses ops, dashed ellipses ops no gradient flows through.
    ``graphlora.viz.render`` turns the text into an image.
    """
    check_graph("to_dot", graph)
    nodes = _nodes(graph, root)
    lines = [
        "digraph graphlora {",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [color="#555555"];',
    ]
    tree: dict[str, Any] = {"nodes": [], "children": {}}  # scope path -> its nodes, sub-scopes
    for node in nodes:
        where = tree
        for part in (node.scope or "").split("/") if node.scope else []:
            where = where["children"].setdefault(part, {"nodes": [], "children": {}})
        where["nodes"].append(node)
    _fold(tree)
    counter = iter(range(len(nodes) + 1))

    def emit(branch: dict[str, Any], indent: str) -> None:
        for node in branch["nodes"]:
            style = _STYLES.get(node.op, _OP_STYLE if node.requires_grad else _NO_GRAD_OP_STYLE)
            label = _quote(_label(graph, node, show_values, show_grads))
            lines.append(f"{indent}n{node.id} [label={label}, {style}];")
        for name, child in branch["children"].items():
            lines.append(f"{indent}subgraph cluster_{next(counter)} {{")
            lines.append(f"{indent}  label={_quote(_TITLES.get(name, name))};")
            lines.append(f'{indent}  style="rounded"; color="#7a7a7a"; fontname="Helvetica";')
            emit(child, indent + "  ")
            lines.append(f"{indent}}}")

    emit(tree, "  ")
    if legend:
        lines.append("  subgraph cluster_legend {")
        lines.append('    label="legend"; style="dotted"; fontname="Helvetica";')
        for i, (text, style) in enumerate(_LEGEND):
            lines.append(f"    legend{i} [label={_quote(text)}, {style}];")
        lines.append("  }")
    included = {node.id for node in nodes}
    for node in nodes:
        for parent in node.inputs:
            if parent.id in included:
                lines.append(f"  n{parent.id} -> n{node.id};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def summary(graph: Graph) -> str:
    """A text table of every leaf and recorded op (see ``Graph.summary``)."""
    check_graph("summary", graph)
    header = ("id", "op", "name", "inputs", "shape", "dtype", "requires_grad", "grad_norm")
    rows = [header]
    for node in sorted([*graph.leaves, *graph.tape], key=lambda n: n.id):
        grad = graph.grad(node)
        rows.append(
            (
                str(node.id),
                node.op,
                node.name or "",
                ",".join(str(parent.id) for parent in node.inputs) or "-",
                str(node.shape),
                str(graph.dtype),
                str(node.requires_grad),
                "-" if grad is None else f"{np.linalg.norm(grad):.4g}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return (
        "\n".join(
            "  ".join(
                cell.rjust(w) if i == 0 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        )
        + "\n"
    )
