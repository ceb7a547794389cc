"""graphlora: a tape-based autograd graph engine on NumPy, with LoRA layers built from its nodes.

Start with ``Graph``: add constants and parameters, call ops, then ``backward``. See the README.
"""

from __future__ import annotations

from graphlora import ops
from graphlora.errors import (
    ForeignNodeError,
    GradcheckError,
    GraphError,
    ShapeError,
    StaleNodeError,
)
from graphlora.graph import Graph, NodeId

__version__ = "0.1.0"

__all__ = [
    "ForeignNodeError",
    "GradcheckError",
    "Graph",
    "GraphError",
    "NodeId",
    "ShapeError",
    "StaleNodeError",
    "__version__",
    "ops",
]
