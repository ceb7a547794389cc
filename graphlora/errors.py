"""The exception hierarchy of graphlora.

Every error the library raises on purpose is one of these, a ``TypeError`` for an argument of the
wrong kind, or a ``ValueError`` for a configuration value out of range. Each message names the op or
function that refused the call and the offending values, so it can be read without a traceback.
"""

from __future__ import annotations

__all__ = [
    "ForeignNodeError",
    "GradcheckError",
    "GraphError",
    "NonFiniteError",
    "ShapeError",
    "StaleNodeError",
]


class GraphError(Exception):
    """Root of graphlora's own errors: a graph was asked to do something it cannot do."""


class ShapeError(GraphError, ValueError):
    """The shapes (or dtypes) of the arguments do not fit, e.g. ``matmul`` of (3, 4) by (5, 2)."""


class StaleNodeError(GraphError):
    """A NodeId recorded before the last ``Graph.reset()`` was used; its op no longer exists."""


class ForeignNodeError(GraphError):
    """A NodeId that belongs to another Graph was passed to this one."""


class NonFiniteError(GraphError, FloatingPointError):
    """Anomaly mode found NaN or Inf in an op's output or gradient, or a merge would make some."""


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with its finite-difference estimate (``gradcheck``)."""
