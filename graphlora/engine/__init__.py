"""The engine: the graph of leaves and recorded ops (``graph``), its typed op methods
(``methods``), compiled steps (``replay``) and descriptions of a graph as text (``describe``).
It knows nothing of adapters or layers.
"""

from __future__ import annotations

from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.engine.replay import Replay

__all__ = ["Graph", "NodeId", "Replay", "check_graph"]
