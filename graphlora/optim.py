"""Optimizers (SGD, Adam, AdamW) and ``minimize``, a bridge to ``scipy.optimize.minimize``.

The update rules are PyTorch's documented formulas (``torch.optim``), applied in place to the
parameters' values after ``graph.backward``. A parameter that got no gradient in a step is skipped,
as in PyTorch. A training step reads::

    loss = loss_fn(graph)            # record the forward pass
    graph.backward(loss)
    opt.step()                       # update the parameters in place
    opt.zero_grad(); graph.reset()   # forget the gradients and the recorded ops

``minimize`` hands the same gradients to SciPy (L-BFGS-B by default), for small problems that
should be solved to high precision rather than trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import scipy.optimize

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.errors import GraphError, ShapeError
from graphlora.ops import Array

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "minimize"]


def _parameters(where: str, graph: Graph, params: Sequence[NodeId]) -> list[NodeId]:
    """``params`` as a list, if each is a parameter of ``graph`` and none repeats."""
    check_graph(where, graph)
    nodes = list(params)
    if not nodes:
        raise ValueError(f"{where}: params is empty; pass the parameters to optimise")
    for i, node in enumerate(nodes):
        graph.check(node, where, f"params[{i}]")
        if not node.is_leaf or not node.requires_grad:
            raise GraphError(
                f"{where}: params[{i}] {node!r} is not a parameter (a leaf that requires a "
                "gradient)"
            )
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"{where}: params lists a parameter more than once")
    return nodes


class Optimizer:
    """Base class: holds the graph, the parameters and their per-parameter state.

    Parameters
    ----------
    graph
        The graph that holds the parameters.
    params
        Parameters of ``graph`` (leaves that require a gradient), each at most once.
    """

    _state_keys: ClassVar[tuple[str, ...]] = ()  # the arrays kept per parameter
    _hyper_names: ClassVar[tuple[str, ...]] = ()  # the hyper-parameters, as attribute names

    def __init__(self, graph: Graph, params: Sequence[NodeId]) -> None:
        self.graph = graph
        self.params = _parameters(type(self).__name__, graph, params)
        self.steps = [0] * len(self.params)  # updates applied to each parameter so far
        self.state: list[dict[str, Array]] = [{} for _ in self.params]

    def zero_grad(self) -> None:
        """Forget the gradients of this optimizer's parameters."""
        self.graph.zero_grad(self.params)

    def step(self) -> None:
        """Update every parameter that has a gradient, in place."""
        for i, node in enumerate(self.params):
            value, grad = self.graph.buffers(node)  # the engine's own arrays: no copies
            if grad is None:
                continue  # no gradient this step: skipped, as in PyTorch
            self.steps[i] += 1
            self._update(value, grad, self.state[i], self.steps[i])

    def _update(self, value: Array, grad: Array, state: dict[str, Array], step: int) -> None:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """The hyper-parameters, by name."""
        return {name: getattr(self, name) for name in self._hyper_names}

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer", "hyperparameters", "steps", "state"}`` with copies of every array."""
        return {
            "optimizer": type(self).__name__,
            "hyperparameters": self.hyperparameters(),
            "steps": list(self.steps),
            "state": [{k: np.array(v) for k, v in s.items()} for s in self.state],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load what ``state_dict`` returned, all or nothing (everything is checked first).

        Raises
        ------
        ValueError, TypeError, ShapeError
            For another optimizer's state, a different number of parameters, bad
            hyper-parameters, or state arrays of the wrong keys or shapes.
        """
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, Mapping) or set(state) != {
            "optimizer",
            "hyperparameters",
            "steps",
            "state",
        }:
            raise ValueError(
                f"{where}: expected a mapping with keys 'optimizer', 'hyperparameters', 'steps', "
                "'state' (as state_dict returns)"
            )
        if state["optimizer"] != type(self).__name__:
            raise ValueError(
                f"{where}: this is a {state['optimizer']!r} state, not {type(self).__name__!r}"
            )
        if not isinstance(state["steps"], (list, tuple)) or not isinstance(
            state["state"], (list, tuple)
        ):
            raise TypeError(f"{where}: 'steps' and 'state' must be lists, one entry a parameter")
        if not isinstance(state["hyperparameters"], Mapping):
            raise TypeError(f"{where}: 'hyperparameters' must be a mapping")
        steps, per_param = list(state["steps"]), list(state["state"])
        if len(steps) != len(self.params) or len(per_param) != len(self.params):
            raise ValueError(
                f"{where}: state is for {len(steps)} parameters, this optimizer has "
                f"{len(self.params)}"
            )
        probe = type(self).__new__(type(self))  # a blank optimizer, to validate on
        probe._set_hyperparameters(where, dict(state["hyperparameters"]))
        new_state: list[dict[str, Array]] = []
        for i, (node, count, entry) in enumerate(zip(self.params, steps, per_param, strict=True)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"{where}: steps[{i}] must be an int >= 0, got {count!r}")
            if not isinstance(entry, Mapping):
                raise TypeError(
                    f"{where}: state[{i}] must be a mapping, got {type(entry).__name__}"
                )
            keys = set(entry)
            if keys and keys != set(self._state_keys):
                raise ValueError(
                    f"{where}: state[{i}] has keys {sorted(keys)}, expected "
                    f"{sorted(self._state_keys)} or none"
                )
            arrays = {}
            for key in sorted(keys):
                array = np.asarray(entry[key])
                if array.shape != node.shape or array.dtype.kind != "f":
                    raise ShapeError(
                        f"{where}: state[{i}][{key!r}] is {array.dtype} {array.shape}, parameter "
                        f"{node!r} needs floating point {node.shape}"
                    )
                arrays[key] = np.array(array, dtype=self.graph.dtype)
            new_state.append(arrays)
        self._set_hyperparameters(where, dict(state["hyperparameters"]))
        self.steps = [int(c) for c in steps]
        self.state = new_state

    def _set_hyperparameters(self, where: str, hyper: dict[str, Any]) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({len(self.params)} parameters, {hyper})"


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, Nesterov momentum and L2 weight decay.

    PyTorch's rule: ``g = grad + weight_decay * p``; with momentum, ``b = g`` on the first step
    and ``b = momentum * b + g`` after, then ``g = g + momentum * b`` (Nesterov) or ``g = b``;
    finally ``p -= lr * g``.
    """

    _state_keys = ("momentum_buffer",)
    _hyper_names = ("lr", "momentum", "weight_decay", "nesterov")

    def __init__(
        self,
        graph: Graph,
        params: Sequence[NodeId],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        hyper = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self._set_hyperparameters("SGD", {**hyper, "nesterov": nesterov})
        super().__init__(graph, params)

    def _set_hyperparameters(self, where: str, hyper: dict[str, Any]) -> None:
        if set(hyper) != set(self._hyper_names):
            raise ValueError(f"{where}: hyperparameters must be {list(self._hyper_names)}")
        lr = _checks.real(where, "lr", hyper["lr"], 0.0)
        momentum = _checks.real(where, "momentum", hyper["momentum"], 0.0)
        weight_decay = _checks.real(where, "weight_decay", hyper["weight_decay"], 0.0)
        nesterov = hyper["nesterov"]
        if not isinstance(nesterov, bool):
            raise TypeError(f"{where}: nesterov must be a bool, got {nesterov!r}")
        if nesterov and momentum == 0.0:
            raise ValueError(f"{where}: nesterov=True needs momentum > 0")
        self.lr, self.momentum, self.weight_decay, self.nesterov = (
            lr,
            momentum,
            weight_decay,
            nesterov,
        )

    def _update(self, value: Array, grad: Array, state: dict[str, Array], step: int) -> None:
        if self.weight_decay:
            grad = grad + self.weight_decay * value
        if self.momentum:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = np.array(grad)
            else:
                buffer *= self.momentum
                buffer += grad
            grad = grad + self.momentum * buffer if self.nesterov else buffer
        value -= self.lr * grad


class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's L2 ``weight_decay`` (added to the gradient).

    ``g = grad + weight_decay * p``; ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g²``;
    ``p -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)``.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _hyper_names = ("lr", "betas", "eps", "weight_decay")
    _decoupled = False

    def __init__(
        self,
        graph: Graph,
        params: Sequence[NodeId],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        hyper = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self._set_hyperparameters(type(self).__name__, hyper)
        super().__init__(graph, params)

    def _set_hyperparameters(self, where: str, hyper: dict[str, Any]) -> None:
        if set(hyper) != set(self._hyper_names):
            raise ValueError(f"{where}: hyperparameters must be {list(self._hyper_names)}")
        betas = hyper["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
        beta1 = _checks.real(where, "betas[0]", betas[0], 0.0, 1.0)
        beta2 = _checks.real(where, "betas[1]", betas[1], 0.0, 1.0)
        self.lr = _checks.real(where, "lr", hyper["lr"], 0.0)
        self.eps = _checks.real(where, "eps", hyper["eps"], 0.0)
        self.weight_decay = _checks.real(where, "weight_decay", hyper["weight_decay"], 0.0)
        self.betas = (beta1, beta2)

    def _update(self, value: Array, grad: Array, state: dict[str, Array], step: int) -> None:
        beta1, beta2 = self.betas
        if self._decoupled:
            value *= 1.0 - self.lr * self.weight_decay  # AdamW: decay the weights directly
        elif self.weight_decay:
            grad = grad + self.weight_decay * value
        if not state:
            state["exp_avg"] = np.zeros_like(value)
            state["exp_avg_sq"] = np.zeros_like(value)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= beta1
        m += (1.0 - beta1) * grad
        v *= beta2
        v += (1.0 - beta2) * grad * grad
        m_hat = m / (1.0 - beta1**step)
        v_hat = v / (1.0 - beta2**step)
        value -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``p *= 1 - lr * weight_decay``
    before the Adam step, instead of adding ``weight_decay * p`` to the gradient.

    ``weight_decay`` defaults to 0.01, as in PyTorch.
    """

    _decoupled = True

    def __init__(
        self,
        graph: Graph,
        params: Sequence[NodeId],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(graph, params, lr, betas, eps, weight_decay)


# SciPy's stubs accept only literal method names; graphlora passes the user's string through.
_scipy_minimize: Callable[..., scipy.optimize.OptimizeResult] = scipy.optimize.minimize


def minimize(
    graph: Graph,
    loss_fn: Callable[[Graph], NodeId],
    params: Sequence[NodeId],
    method: str = "L-BFGS-B",
    **options: Any,
) -> scipy.optimize.OptimizeResult:
    """Minimise ``loss_fn(graph)`` over ``params`` with ``scipy.optimize.minimize``.

    The parameters are flattened into one float64 vector; each evaluation writes it back, records
    ``loss_fn(graph)`` after a ``reset``, and takes the gradient from ``backward``. The solution is
    written back into the parameters. The parameters' gradients are zeroed.

    Parameters
    ----------
    graph
        The graph holding ``params``.
    loss_fn
        ``loss_fn(graph) -> NodeId`` of size 1, recorded afresh at each evaluation.
    params
        The parameters to optimise.
    method
        Any method of ``scipy.optimize.minimize``; gradient-based ones use ``backward``.
    **options
        Passed on to ``scipy.optimize.minimize`` (``tol``, ``options={"maxiter": ...}``,
        ``bounds``, ...).

    Returns
    -------
    scipy.optimize.OptimizeResult
        SciPy's result; ``result.x`` is also written into the parameters.

    Raises
    ------
    Exception
        Whatever ``loss_fn`` or SciPy raises; the parameters are then restored to their values
        from before the call.
    """
    nodes = _parameters("minimize", graph, params)
    shapes = [node.shape for node in nodes]
    sizes = [math.prod(shape) for shape in shapes]
    splits = np.cumsum(sizes)[:-1]
    start = [np.array(graph.value(node)) for node in nodes]

    def write(x: Array) -> None:
        for node, chunk, shape in zip(nodes, np.split(x, splits), shapes, strict=True):
            graph.set_value(node, chunk.reshape(shape))

    def fun(x: Array) -> tuple[float, Array]:
        write(x)
        graph.reset()
        graph.zero_grad(nodes)
        loss = loss_fn(graph)
        graph.backward(loss)
        grads = [graph.grad(node) for node in nodes]
        flat = [np.zeros(n) if g is None else g.ravel() for g, n in zip(grads, sizes, strict=True)]
        return float(graph.value(loss).reshape(())), np.concatenate(flat).astype(np.float64)

    x0 = np.concatenate([value.ravel() for value in start]).astype(np.float64)
    try:
        result = _scipy_minimize(fun, x0, jac=True, method=method, **options)
    except BaseException:
        for node, value in zip(nodes, start, strict=True):
            graph.set_value(node, value)
        graph.reset()
        graph.zero_grad(nodes)
        raise
    write(np.asarray(result.x))
    graph.reset()
    graph.zero_grad(nodes)
    return result
