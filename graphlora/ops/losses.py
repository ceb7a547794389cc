"""Losses: ``mse_loss``, ``cross_entropy`` (integer labels, ``ignore_index``,
``label_smoothing``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora._checks import real
from graphlora.errors import ShapeError
from graphlora.ops.activations import log_softmax_parts
from graphlora.ops.registry import Array, Grads, Params, Vjp, builtin
from graphlora.ops.sampling import Draw, Sample


def _check_mse_loss(pred: Array, target: Array) -> None:
    if pred.shape != target.shape:
        raise ShapeError(
            f"mse_loss: pred has shape {pred.shape} but target has shape {target.shape}; "
            "they must be equal"
        )


def _same_shape_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    shape = draw.shape()
    return draw.floats(shape), draw.floats(shape)


def _mse_loss(pred: Array, target: Array) -> tuple[Array, Vjp]:
    """``mean((pred - target)**2)`` (NaN for empty arrays, as PyTorch).
    VJP: ``(2 g d / n, -2 g d / n)``, ``d = pred - target``."""
    diff = pred - target

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        if diff.size == 0:
            return (
                np.zeros_like(diff) if needs[0] else None,
                np.zeros_like(diff) if needs[1] else None,
            )
        g_pred = diff * (2.0 * float(g) / diff.size)  # g is the loss's (scalar) gradient
        return (g_pred if needs[0] else None, -g_pred if needs[1] else None)

    if not diff.size:  # no elements: NaN
        return np.full((), np.nan, diff.dtype), vjp
    flat = diff.ravel()
    return np.asarray(flat.dot(flat) / diff.size), vjp  # the mean of squares, one dot product


mse_loss = builtin(
    _mse_loss,
    check=_check_mse_loss,
    sample=Sample(_same_shape_inputs, fits=lambda a, b: a.shape == b.shape),
    torch=lambda t, pred, target: t.nn.functional.mse_loss(pred, target),
)


def _check_cross_entropy(
    logits: Array,
    labels: npt.NDArray[np.integer[Any]],
    *,
    ignore_index: object = -100,
    label_smoothing: object = 0.0,
) -> Params:
    where = "cross_entropy"
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ShapeError(
            f"{where}: logits must be [..., C] with the C >= 1 classes on the last axis, got "
            f"shape {logits.shape}"
        )
    if labels.shape != logits.shape[:-1]:
        raise ShapeError(
            f"{where}: labels must have shape {logits.shape[:-1]} to match logits "
            f"{logits.shape}, got {labels.shape}"
        )
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(
        ignore_index, (int, np.integer)
    ):
        raise TypeError(f"{where}: ignore_index must be an int, got {ignore_index!r}")
    classes = logits.shape[-1]
    bad = labels[((labels < 0) | (labels >= classes)) & (labels != ignore_index)]
    if bad.size:
        raise ValueError(
            f"{where}: labels must lie in [0, {classes}) for {classes} classes (or equal "
            f"ignore_index {ignore_index}), got {bad[:5].tolist()}{' ...' if bad.size > 5 else ''}"
        )
    smoothing = real(where, "label_smoothing", label_smoothing, 0.0, 1.0 + 1e-12)
    return {"ignore_index": int(ignore_index), "label_smoothing": min(smoothing, 1.0)}


def _logits_inputs(draw: Draw) -> tuple[Array | None, ...]:  # pragma: no mutate block
    batch = draw.shape(max_dims=2)
    classes = draw.shape(min_dims=1, max_dims=1, min_side=1)
    return (draw.floats(batch + classes),)


def _cross_entropy_params(draw: Draw, logits: Array) -> Params:  # pragma: no mutate block
    *batch, classes = logits.shape
    labels = draw.ints(tuple(batch), 0, classes)
    if labels.size > 1 and draw.choice([False, True]):
        labels.flat[draw.choice(range(1, labels.size))] = -100  # one ignored, never all
    return {"labels": labels, "label_smoothing": draw.choice([0.0, 0.0, 0.1])}


def _torch_cross_entropy(
    t: Any, logits: Any, labels: Any, ignore_index: int = -100, label_smoothing: float = 0.0
) -> Any:  # pragma: no mutate block
    classes = logits.shape[-1]
    return t.nn.functional.cross_entropy(
        logits.reshape(-1, classes),
        labels.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


def _cross_entropy(
    logits: Array,
    labels: npt.NDArray[np.integer[Any]],
    *,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[Array, Vjp]:  # the defaults are the check's, which always gives both
    """Mean cross-entropy of ``logits [..., C]`` (classes on the LAST axis, unlike PyTorch's
    N-d form, which puts them on axis 1) against integer ``labels [...]``.

    Rows whose label is ``ignore_index`` count for nothing; the mean is over the others (NaN if
    there are none, as PyTorch). With ``label_smoothing = e`` the target is ``(1 - e)`` on the
    label plus ``e / C`` on every class, as in PyTorch.
    VJP: ``(g * (softmax(logits) - (1 - e) onehot(labels) - e / C) / n,)`` on the kept rows.
    """
    classes = logits.shape[-1]
    flat = labels.ravel()  # (N,)
    logp, exps, total = log_softmax_parts(logits, -1)
    logp = logp.reshape(flat.size, classes)  # (N, C)
    ignored = flat == ignore_index
    rows = np.flatnonzero(~ignored)  # the kept rows
    picked = flat[rows]
    n = rows.size
    e = label_smoothing
    with np.errstate(invalid="ignore"):  # no rows kept, or a row of -inf: 0 / 0, NaN, as PyTorch
        loss = -(logp[rows, picked].sum() / n)
        if e:
            loss = (1 - e) * loss - e / classes * (logp[rows].sum() / n)
        # the softmax for backward, written over logp once the loss is taken: the step's peak
        # memory stays as it was when backward took exp(logp) again
        probs = np.divide(exps.reshape(logp.shape), total.reshape(-1, 1), out=logp)

    def vjp(g: Array, needs: tuple[bool, ...]) -> Grads:
        grad = probs.copy()
        grad[ignored] = 0.0
        grad[rows, picked] -= 1.0 - e
        if e:
            grad[rows] -= e / classes
        if n:
            grad *= g / n
        return grad.reshape(logits.shape), None  # labels get no gradient

    return np.asarray(loss), vjp  # logp's dtype: NumPy keeps float32 with Python numbers


cross_entropy = builtin(
    _cross_entropy,
    check=_check_cross_entropy,
    data={"labels": "int"},
    sample=Sample(
        _logits_inputs, _cross_entropy_params, fits=lambda x: x.ndim >= 1 and x.shape[-1] > 0
    ),
    torch=_torch_cross_entropy,
)
