"""``Graph.compile``'s ``Replay``: a recorded step that runs again, without recording it again.

Each recorded node keeps its op function and its checked parameters, so a replay calls the same
functions in tape order on the leaves' current values (replacing each node's value as it goes),
then runs the same backward walk as ``Graph.backward``. Exact by construction: a replay gives the
values and gradients a new recording of the same calls would give, to the last bit.

A replay talks to the engine through its public entry points only: ``Graph.replay_token`` (what
ends a replay), ``NodeId.replayer`` (run an op again and keep its new value),
``Graph.backward_step`` (backward, checked once) and ``Graph.value``.
"""

from __future__ import annotations

from collections.abc import Callable

from graphlora.engine.graph import Graph
from graphlora.engine.node import NodeId, needs_grad
from graphlora.errors import GraphError, StaleNodeError
from graphlora.ops import Array

__all__ = ["Replay"]


class Replay:
    """A recorded step that runs again: forward over the leaves' current values, then backward.

    Made by ``Graph.compile(loss)``. Each call runs the ops recorded up to and including the loss
    with the same op functions and the same checked parameters, on the leaves' current values,
    refreshes every recorded node's value, then runs ``backward(loss, grad)``: exactly what
    recording the same calls again gives, without the cost of recording (no checks, no new
    NodeIds). Ops recorded after the loss are not run again.

    Data that changes from step to step must come in through leaves (``set_value``: a data leaf
    of labels or token ids feeds each step its batch; an optimizer updates the parameters in
    place). Other arguments (a ``scale`` factor, labels or a dropout mask given as plain arrays)
    are fixed when recorded, and so are the decisions Python took while recording, as in a trace.
    Dropout draws a new mask on each run from the Generator it was given, as a new recording
    would. ``reset`` ends the replay (running it then raises ``StaleNodeError``), and so do
    ``requires_grad_`` and ``Graph.end_replays`` (``GraphError``).

    Examples
    --------
    >>> import numpy as np, graphlora as gl
    >>> g = gl.Graph()
    >>> w = g.parameter(np.ones(3))
    >>> loss = g.sum(g.mul(w, w))
    >>> step = g.compile(loss)
    >>> g.set_value(w, [1.0, 2.0, 3.0])
    >>> float(step())
    14.0
    >>> g.grad(w)
    array([2., 4., 6.])
    """

    __slots__ = ("_backward", "_graph", "_loss", "_nodes", "_steps", "_token")

    def __init__(
        self,
        graph: Graph,
        loss: NodeId,
        backward: Callable[[], None],
        nodes: tuple[NodeId, ...],
    ) -> None:
        self._graph = graph
        self._loss = loss
        self._backward = backward  # Graph.backward_step(loss, grad)
        self._nodes = nodes
        self._steps = tuple(node.replayer() for node in nodes)
        self._token = graph.replay_token()

    @property
    def loss(self) -> NodeId:
        """The node ``backward`` starts from."""
        return self._loss

    def __len__(self) -> int:
        """The number of ops each run computes."""
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"Replay({len(self._nodes)} ops, loss={self._loss!r})"

    def __call__(self, *, backward: bool = True) -> Array:
        """Run the step: every op again, then (unless ``backward=False``) backward from the loss.

        Returns the loss's new value, read-only. If an op raises (in anomaly mode, say), no
        gradient changes and the leaves are untouched; the ops before it hold their new values,
        it and the ops after it their old ones (each value is replaced as soon as it is computed,
        so that a run needs no more memory than the recording did).

        Raises
        ------
        StaleNodeError
            After ``graph.reset()``.
        GraphError
            After ``requires_grad_`` changed a leaf or ``end_replays`` was called (by a layer that
            merged its weights, say), or for ``backward`` when the loss depends on no parameter.
        """
        graph, loss = self._graph, self._loss
        resets, ended = graph.replay_token()
        if resets != self._token[0]:
            raise StaleNodeError(
                f"Replay: the step of {loss!r} was recorded before the last reset(); record it "
                "again and compile that"
            )
        if ended != self._token[1]:
            raise GraphError(
                "Replay: a leaf was frozen or unfrozen (requires_grad_), or end_replays was called "
                "(a layer merged or unmerged its weights or changed its adapters), after "
                "compile; a replay would not see it: record the step again and compile that"
            )
        graph.check(loss, "Replay", "loss")  # compiled inside a scratch() block that ended?
        if backward:
            needs_grad("Replay", loss)
        check_finite = graph.check_finite
        for step in self._steps:
            step(check_finite)
        if backward:
            self._backward()
        value: Array = graph.value(loss)
        return value
