"""graphlora.teach.viz: DOT text that is well-formed and says what the graph is, the summary table, and
rendering with Graphviz where it is installed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given

import graphlora as gl
from graphlora.teach import viz
from graphlora.testing import strategies as gst


def _lora_graph() -> tuple[gl.Graph, gl.LoraLinear, gl.NodeId]:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 4, 3, gl.LoraConfig(rank=2, seed=0), name="proj")
    x = g.constant(np.ones((2, 4)), name="x")
    loss = g.mse_loss(layer.forward(g, x), g.constant(np.zeros((2, 3)), name="target"))
    return g, layer, loss


def _check_well_formed(dot: str) -> tuple[set[str], list[tuple[str, str]]]:
    """Balanced braces and quotes; every edge's ends declared. Returns the nodes and edges."""
    assert dot.startswith("digraph graphlora {")
    depth = 0
    for line in dot.splitlines():
        assert line.count('"') % 2 == 0 or '\\"' in line, line
        depth += line.count("{") - line.count("}")
        assert depth >= 0
    assert depth == 0
    declared = set(re.findall(r"^\s*(n\d+) \[label=", dot, flags=re.MULTILINE))
    edges = re.findall(r"^\s*(n\d+) -> (n\d+);", dot, flags=re.MULTILINE)
    for a, b in edges:
        assert a in declared and b in declared, (a, b)
    return declared, edges


def test_dot_shows_kinds_shapes_edges_and_the_lora_clusters() -> None:
    g, layer, loss = _lora_graph()
    dot = g.to_dot()
    nodes, edges = _check_well_formed(dot)
    assert len(nodes) == len(g)
    lines = {
        n: next(line for line in dot.splitlines() if line.strip().startswith(f"{n} ["))
        for n in nodes
    }
    assert 'fillcolor="#cfe2ff"' in lines[f"n{layer.lora_a.id}"]  # a parameter
    assert 'fillcolor="#e8e8e8"' in lines[f"n{layer.frozen_weight.id}"]  # a constant
    assert "shape=ellipse" in lines[f"n{loss.id}"]  # an op
    assert "(4, 2)" in lines[f"n{layer.lora_a.id}"]  # shapes on every node
    update = next(n for n in g.tape if n.op == "matmul" and layer.lora_b in n.inputs)
    assert update.scope == "proj/lora"
    assert (f"n{layer.lora_b.id}", f"n{update.id}") in edges  # B flows into (x A s) @ B
    assert 'label="proj";' in dot
    frozen = dot.split('label="frozen path: x @ W";')[1].split("}")[0]
    low_rank = dot.split('label="low-rank path: ((x @ A) * s) @ B";')[1].split("}")[0]
    assert f"n{layer.frozen_weight.id} [" in frozen
    assert f"n{layer.lora_a.id} [" in low_rank
    assert f"n{layer.lora_b.id} [" in low_rank
    assert f"n{layer.lora_a.id} [" not in frozen


def test_root_keeps_only_its_ancestors_and_values_and_grads_can_be_shown() -> None:
    g, layer, loss = _lora_graph()
    unrelated = g.exp(g.constant(np.ones(2), name="unrelated"))
    g.backward(loss)
    dot = g.to_dot(loss, show_values=True, show_grads=True)
    nodes, _ = _check_well_formed(dot)
    assert f"n{unrelated.id}" not in nodes
    assert "unrelated" not in dot
    assert f"n{layer.lora_b.id}" in nodes
    grad_b = g.grad(layer.lora_b)
    assert grad_b is not None
    assert "grad [[" in dot  # B's 6 gradient numbers are shown
    plain = g.to_dot(loss)
    assert "grad" not in plain  # by default neither gradients nor values are drawn
    assert "|.|=" not in plain
    assert "[1 .. 1], |.|=2.83" in dot  # x (2, 4) of ones: 8 numbers shown as range and norm
    with pytest.raises(gl.ForeignNodeError):
        g.to_dot(gl.Graph().constant(1.0))


@given(expr=gst.expressions(max_ops=6))
def test_dot_of_random_expressions_is_well_formed(expr: gst.Expression) -> None:
    g = gl.Graph()
    out = expr.fn(g, *[g.parameter(a) for a in expr.inputs])
    nodes, edges = _check_well_formed(g.to_dot(out))
    assert f"n{out.id}" in nodes
    assert len(edges) == sum(len(n.inputs) for n in g.tape if f"n{n.id}" in nodes)


def test_summary_columns() -> None:
    g, layer, loss = _lora_graph()
    g.backward(loss)
    table = g.summary().splitlines()
    assert table[0].split() == [
        "id",
        "op",
        "name",
        "inputs",
        "shape",
        "dtype",
        "requires_grad",
        "grad_norm",
    ]
    assert len(table) == 1 + len(g)
    row_b = next(line for line in table if "proj.lora_B" in line).split()
    assert row_b[:3] == [str(layer.lora_b.id), "parameter", "proj.lora_B"]
    assert row_b[-2] == "True"
    assert float(row_b[-1]) == pytest.approx(np.linalg.norm(g.grad(layer.lora_b)), rel=1e-3)
    row_loss = table[-1].split()
    assert row_loss[1] == "mse_loss"
    assert row_loss[-1] == "-"  # ops keep no gradient unless retain_grads=True
    row_w = next(line for line in table if "proj.weight" in line).split()
    assert row_w[-2:] == ["False", "-"]


def test_render_draws_a_png_where_graphviz_is_installed(tmp_path: Path) -> None:
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    g, _, loss = _lora_graph()
    out = viz.render(g.to_dot(loss), tmp_path / "graph.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = viz.render(g.to_dot(loss), tmp_path / "graph.svg")
    assert "<svg" in svg.read_text()
    with pytest.raises(
        ValueError, match=r"render: Graphviz's dot refused to draw it as 'png': .*syntax error"
    ):
        viz.render("digraph { -> }", tmp_path / "bad.png")
    with pytest.raises(TypeError, match=r"render: dot must be DOT text \(a str\), got int"):
        viz.render(3, tmp_path / "bad.png")  # type: ignore[arg-type]


def test_render_without_graphviz_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(
        FileNotFoundError,
        match=r"render: Graphviz's 'dot' program is not installed. Install Graphviz \(Debian/Ubuntu: apt-get install graphviz",
    ):
        viz.render("digraph {}", tmp_path / "g.png")


def test_drawings_show_scalar_arguments_a_legend_and_a_merged_layer_as_merged() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 4, 3, gl.LoraConfig(rank=2, alpha=6.0, seed=0), name="proj")
    x = g.constant(np.ones((2, 4)))
    y = layer.forward(g, x)
    dot = g.to_dot(y, legend=True)
    assert 'label="scale\\n(2, 2)\\nc=3"' in dot  # s = alpha / rank
    assert 'label="low-rank path: ((x @ A) * s) @ B"' in dot and "cluster_legend" in dot
    assert "(no gradient flows)" in dot
    assert "cluster_legend" not in g.to_dot(y)
    scale = next(node for node in g.tape if node.op == "scale")
    assert scale.params == {"c": 3.0}
    g.reset()
    layer.merge_(g)
    merged = g.to_dot(layer.forward(g, x))
    assert 'label="merged: x @ (W + A @ B * s)"' in merged
    assert "low-rank path" not in merged and "frozen path" not in merged


def test_show_grads_shows_the_zero_gradient_of_a_when_b_is_zero() -> None:
    g = gl.Graph()
    layer = gl.LoraLinear.new(g, 2, 2, gl.LoraConfig(rank=1, seed=0), name="proj")
    loss = g.mean(layer.forward(g, g.constant(np.ones((1, 2)))))
    g.backward(loss)
    dot = g.to_dot(loss, show_grads=True)
    line = next(x for x in dot.splitlines() if "proj.lora_A" in x)
    assert "grad [[0.],\\n [0.]]" in line
