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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import scipy.optimize

from graphlora import _checks
from graphlora.engine.graph import Graph, NodeId, check_graph
from graphlora.errors import GraphError, ShapeError
from graphlora.ops import Array

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "ParamGroup", "minimize"]


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


ParamGroup = Mapping[str, Any]


def _split_groups(
    where: str, params: Iterable[NodeId] | Iterable[ParamGroup], names: tuple[str, ...]
) -> list[tuple[list[NodeId], dict[str, Any]]]:
    """``params`` as ``[(nodes, hyper-parameters the group sets)]``: one group for a list of
    parameters, one per mapping for torch.optim's ``[{"params": [...], "lr": ...}, ...]``."""
    if isinstance(params, (str, bytes, Mapping, NodeId)) or not isinstance(params, Iterable):
        raise TypeError(
            f"{where}: params must be a list of parameters or of parameter groups (mappings "
            f"with 'params'), got {type(params).__name__}"
        )
    items = list(params)
    if not any(isinstance(item, Mapping) for item in items):
        return [(list(items), {})]  # type: ignore[arg-type]
    groups = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "params" not in item:
            raise TypeError(
                f"{where}: params[{i}] must be a parameter group (a mapping with 'params') "
                f"like the others, got {item!r:.60}"
            )
        unknown = sorted(set(item) - {"params", *names})
        if unknown:
            raise ValueError(
                f"{where}: parameter group {i} has unknown keys {unknown}; a group takes "
                f"'params' and {list(names)}"
            )
        nodes = item["params"]
        if isinstance(nodes, NodeId):
            nodes = [nodes]
        if isinstance(nodes, (str, bytes, Mapping)) or not isinstance(nodes, Iterable):
            raise TypeError(f"{where}: parameter group {i}'s 'params' must be a list")
        groups.append((list(nodes), {k: v for k, v in item.items() if k != "params"}))
    return groups


class _Group(dict):  # type: ignore[type-arg]
    """A parameter group: a dict that notes any change to it, so that ``step`` checks its
    settings again only after one."""

    changed = False

    def __setitem__(self, key: Any, value: Any) -> None:
        self.changed = True
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.changed = True
        super().__delitem__(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.changed = True
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.changed = True
        return super().setdefault(key, default)

    def pop(self, *args: Any) -> Any:
        self.changed = True
        return super().pop(*args)

    def popitem(self) -> Any:
        self.changed = True
        return super().popitem()

    def clear(self) -> None:
        self.changed = True
        super().clear()

    def __ior__(self, other: Any) -> _Group:  # type: ignore[misc]
        self.changed = True
        super().__ior__(other)
        return self


class Optimizer:
    """Base class: holds the graph, the parameters, their groups and per-parameter state.

    Parameters
    ----------
    graph
        The graph that holds the parameters.
    params
        Parameters of ``graph`` (leaves that require a gradient), each at most once; or, as
        torch.optim, parameter groups ``[{"params": [...], "lr": 0.1}, ...]``, each setting any
        of the optimizer's hyper-parameters for its parameters (the others default to the
        constructor's arguments).

    Attributes
    ----------
    params
        Every parameter, group after group.
    param_groups
        One dict per group, ``{"params": [...], <every hyper-parameter>}``, as torch.optim's.
        A group's hyper-parameters may be changed between steps (a learning-rate schedule);
        each step checks them. Its parameters are fixed at construction.
    lr, ...
        The constructor's hyper-parameters: the groups' defaults.
    """

    _state_keys: ClassVar[tuple[str, ...]] = ()  # the arrays kept per parameter
    _hyper_names: ClassVar[tuple[str, ...]] = ()  # the hyper-parameters, as attribute names

    def __init__(self, graph: Graph, params: Iterable[NodeId] | Iterable[ParamGroup]) -> None:
        where = type(self).__name__
        groups = _split_groups(where, params, self._hyper_names)
        self.graph = graph
        self.params = _parameters(where, graph, [node for nodes, _ in groups for node in nodes])
        defaults = self.hyperparameters()
        self.param_groups: list[dict[str, Any]] = [
            _Group(
                params=nodes,
                **self._checked(f"{where}: parameter group {i}", {**defaults, **hyper}),
            )
            for i, (nodes, hyper) in enumerate(groups)
        ]
        self._group_of = [i for i, (nodes, _) in enumerate(groups) for _ in nodes]
        self._hypers = [self._hyper_of(group) for group in self.param_groups]  # checked
        self.steps = [0] * len(self.params)  # updates applied to each parameter so far
        self.state: list[dict[str, Array]] = [{} for _ in self.params]

    def zero_grad(self) -> None:
        """Forget the gradients of this optimizer's parameters."""
        self.graph.zero_grad(self.params)

    def step(self) -> None:
        """Update every parameter that has a gradient, in place, with its group's
        hyper-parameters (checked first: a bad one changes nothing)."""
        hypers = self._hypers
        for i, group in enumerate(self.param_groups):
            if type(group) is not _Group or group.changed:  # checked again only when changed
                where = f"{type(self).__name__}.step: parameter group {i}"
                hypers[i] = self._checked(where, self._hyper_of(group))
                if type(group) is _Group:
                    group.changed = False
        buffers, state, steps, group_of = self.graph.buffers, self.state, self.steps, self._group_of
        for i, node in enumerate(self.params):
            value, grad = buffers(node)  # the engine's own arrays: no copies
            if grad is None:
                continue  # no gradient this step: skipped, as in PyTorch
            steps[i] += 1
            self._update(value, grad, state[i], steps[i], hypers[group_of[i]])

    def _update(
        self, value: Array, grad: Array, state: dict[str, Array], step: int, hyper: dict[str, Any]
    ) -> None:
        raise NotImplementedError

    def _hyper_of(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {name: group.get(name) for name in self._hyper_names}

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor's hyper-parameters (the groups' defaults), by name."""
        return {name: getattr(self, name) for name in self._hyper_names}

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer", "hyperparameters", "param_groups", "steps", "state"}`` with copies of
        every array; a group lists its parameters by their index in ``params``."""
        start, groups = 0, []
        for group in self.param_groups:
            count = len(group["params"])
            groups.append({**self._hyper_of(group), "params": list(range(start, start + count))})
            start += count
        return {
            "optimizer": type(self).__name__,
            "hyperparameters": self.hyperparameters(),
            "param_groups": groups,
            "steps": list(self.steps),
            "state": [{k: np.array(v) for k, v in s.items()} for s in self.state],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load what ``state_dict`` returned, all or nothing (everything is checked first).
        The groups must hold the same parameters; their hyper-parameters are loaded. A state
        without ``param_groups`` (from before groups) loads into an optimizer of one group.

        Raises
        ------
        ValueError, TypeError, ShapeError
            For another optimizer's state, a different number of parameters or other groups,
            bad hyper-parameters, or state arrays of the wrong keys or shapes.
        """
        where = f"{type(self).__name__}.load_state_dict"
        keys = {"optimizer", "hyperparameters", "steps", "state"}
        if not isinstance(state, Mapping) or set(state) not in (keys, keys | {"param_groups"}):
            raise ValueError(
                f"{where}: expected a mapping with keys 'optimizer', 'hyperparameters', "
                "'param_groups', 'steps', 'state' (as state_dict returns)"
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
        defaults = self._checked(where, dict(state["hyperparameters"]))
        groups = self._loaded_groups(where, state.get("param_groups"), defaults)
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
        self._set_hyperparameters(where, defaults)
        for group, hyper in zip(self.param_groups, groups, strict=True):
            group.update(hyper)
        self.steps = [int(c) for c in steps]
        self.state = new_state

    def _loaded_groups(
        self, where: str, saved: object, defaults: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The groups' hyper-parameters from a state's ``param_groups``, checked against this
        optimizer's groups (the same parameter indexes)."""
        if saved is None:
            if len(self.param_groups) != 1:
                raise ValueError(
                    f"{where}: the state has no 'param_groups'; this optimizer has "
                    f"{len(self.param_groups)} groups"
                )
            return [defaults]
        mine = self.state_dict()["param_groups"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(mine):
            count = len(saved) if isinstance(saved, (list, tuple)) else type(saved).__name__
            raise ValueError(
                f"{where}: 'param_groups' must list {len(mine)} groups, as this optimizer has; "
                f"got {count}"
            )
        hypers = []
        for i, (group, own) in enumerate(zip(saved, mine, strict=True)):
            if not isinstance(group, Mapping) or list(group.get("params", ())) != own["params"]:
                raise ValueError(
                    f"{where}: param_groups[{i}] must hold parameters {own['params']}, as this "
                    "optimizer's group does"
                )
            hypers.append(
                self._checked(
                    f"{where}: param_groups[{i}]", {k: v for k, v in group.items() if k != "params"}
                )
            )
        return hypers

    def _checked(self, where: str, hyper: dict[str, Any]) -> dict[str, Any]:
        """``hyper`` checked (every name, each value in range), normalised; nothing is set."""
        probe = type(self).__new__(type(self))  # a blank optimizer, to validate on
        probe._set_hyperparameters(where, hyper)
        return probe.hyperparameters()

    def _set_hyperparameters(self, where: str, hyper: dict[str, Any]) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        groups = f", {len(self.param_groups)} groups" if len(self.param_groups) > 1 else ""
        return f"{type(self).__name__}({len(self.params)} parameters{groups}, {hyper})"


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
        params: Iterable[NodeId] | Iterable[ParamGroup],
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

    def _update(
        self, value: Array, grad: Array, state: dict[str, Array], step: int, hyper: dict[str, Any]
    ) -> None:
        lr, momentum, weight_decay = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        if weight_decay:
            grad = grad + weight_decay * value
        if momentum:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = np.array(grad)
            else:
                buffer *= momentum
                buffer += grad
            grad = grad + momentum * buffer if hyper["nesterov"] else buffer
        value -= lr * grad


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
        params: Iterable[NodeId] | Iterable[ParamGroup],
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

    def _update(
        self, value: Array, grad: Array, state: dict[str, Array], step: int, hyper: dict[str, Any]
    ) -> None:
        beta1, beta2 = hyper["betas"]
        lr, weight_decay = hyper["lr"], hyper["weight_decay"]
        if self._decoupled:
            value *= 1.0 - lr * weight_decay  # AdamW: decay the weights directly
        elif weight_decay:
            grad = grad + weight_decay * value
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
        value -= lr * m_hat / (np.sqrt(v_hat) + hyper["eps"])


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``p *= 1 - lr * weight_decay``
    before the Adam step, instead of adding ``weight_decay * p`` to the gradient.

    ``weight_decay`` defaults to 0.01, as in PyTorch.
    """

    _decoupled = True

    def __init__(
        self,
        graph: Graph,
        params: Iterable[NodeId] | Iterable[ParamGroup],
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
