"""The grader's sandbox: a student's file runs in a child process; the parent calls its functions.

The parent (``graphlora check``) draws every input and computes every reference itself; the child
imports the student's file and runs only the student's functions on the inputs it is sent,
returning their outputs through a pipe. So nothing the file does (loop forever, exit, replace
graphlora's functions in its own process) can change the verdict, and a time limit holds.

Messages are JSON (arrays as dtype, shape and base64 bytes of real numbers): nothing the child
sends is unpickled. A function the student returns (a VJP) stays in the child; the parent gets a
handle that calls it there.
"""

from __future__ import annotations

import base64
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import multiprocessing
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["Child", "ChildGone", "StudentError"]

_KINDS = "biuf"  # the data a message may carry: bool, int, unsigned, float


class StudentError(Exception):
    """An exception the student's code raised in the child: its type's name, its message, and
    the file and line it came from."""

    def __init__(self, kind: str, message: str, file: str, line: int) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.file, self.line = kind, message, file, line


class ChildGone(Exception):
    """The child is gone (it timed out, exited, or was killed); no more of the file runs."""


def encode(value: object, keep: Callable[[Callable[..., Any]], int]) -> Any:
    """``value`` as JSON: ``None``, bools, numbers and strings as they are; arrays of real
    numbers, tuples and lists marked; a function kept by ``keep`` and sent as its handle."""
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.kind not in _KINDS:
            raise TypeError(f"an array of dtype {array.dtype}, not of real numbers")
        data = base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")
        return {"array": array.dtype.str, "shape": list(array.shape), "data": data}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [encode(item, keep) for item in value]}
    if callable(value):
        return {"callable": keep(value)}
    raise TypeError(f"a {type(value).__name__}, which the grader cannot read")


def decode(value: Any, call: Callable[[int], Callable[..., Any]]) -> Any:
    """What ``encode`` made, back: ``call(handle)`` stands for a function kept on the other
    side. Anything not of that form is refused."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and len(value) == 1 and ("tuple" in value or "list" in value):
        kind, items = next(iter(value.items()))
        if not isinstance(items, list):
            raise ValueError("a malformed message")
        found = [decode(item, call) for item in items]
        return tuple(found) if kind == "tuple" else found
    if isinstance(value, dict) and set(value) == {"callable"} and type(value["callable"]) is int:
        return call(value["callable"])
    if isinstance(value, dict) and set(value) == {"array", "shape", "data"}:
        dtype = np.dtype(str(value["array"]))
        shape = value["shape"]
        if dtype.kind not in _KINDS or not (
            isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
        ):
            raise ValueError("a malformed array")
        raw = base64.b64decode(str(value["data"]), validate=True)
        if len(raw) != dtype.itemsize * int(np.prod(shape)):
            raise ValueError("a malformed array")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    raise ValueError("a malformed message")


def _describe(error: BaseException, path: str = "") -> dict[str, Any]:
    """The error as a message: its kind, text, and the student's line it came from (the
    innermost frame in the student's file ``path``, else the innermost of all)."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [frame for frame in frames if frame.filename == path]
    frame = own[-1] if own else frames[-1] if frames else None
    return {
        "kind": type(error).__name__,
        "message": str(error),
        "file": Path(frame.filename).name if frame else "",
        "line": frame.lineno if frame and frame.lineno is not None else 0,
    }


def _send(connection: Connection, message: dict[str, Any]) -> None:
    connection.send_bytes(json.dumps(message).encode("utf-8"))


class Refused(ImportError):
    """An import the exercise forbids (the file is to be done by hand)."""


class _Refuse(importlib.abc.MetaPathFinder):
    """A finder that refuses the packages an exercise forbids, naming the exercise."""

    def __init__(self, forbidden: Sequence[str], exercise: str) -> None:
        self.forbidden, self.exercise = tuple(forbidden), exercise

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in self.forbidden:
            raise Refused(
                f"{self.exercise} is done by hand with NumPy: the file may not import "
                f"{fullname} (graded without {', '.join(self.forbidden)})"
            )
        return None


def forbid(forbidden: Sequence[str], exercise: str) -> None:
    """Make the packages ``forbidden`` unimportable in this process: drop what is imported of
    them (the functions already bound keep working) and refuse any new import."""
    for key, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        names = {key, getattr(spec, "name", None) or key}
        if any(name.partition(".")[0] in forbidden for name in names):
            del sys.modules[key]
    sys.meta_path.insert(0, _Refuse(forbidden, exercise))


def changed_inputs(
    function: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], before: list[Any]
) -> str | None:
    """A sentence naming the first array argument that differs from its copy in ``before``
    (taken before the call), by its parameter name where the signature gives one; else None."""
    try:
        names = list(inspect.signature(function).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        names = []
    values = [*args, *kwargs.values()]
    for i, (now, then) in enumerate(zip(values, before, strict=True)):
        if isinstance(then, np.ndarray) and not np.array_equal(now, then, equal_nan=True):
            label = f"{names[i]} (argument {i + 1})" if i < len(names) else f"argument {i + 1}"
            what = getattr(function, "__name__", "a function")
            return (
                f"{what} changed its input {label} in place: leave every input as it was and "
                "return new arrays (a frozen weight written into is lost for good)"
            )
    return None


def serve(  # pragma: no cover (a child)
    connection: Connection, path: str, name: str, forbidden: Sequence[str] = ()
) -> None:
    """The child: import the file (with ``forbidden`` packages refused), say whether it
    imported, then run the calls it is sent, refusing any call that writes into its inputs."""
    kept: dict[int, Callable[..., Any]] = {}

    def keep(function: Callable[..., Any]) -> int:
        kept[len(kept)] = function
        return len(kept) - 1

    try:
        if forbidden:
            forbid(forbidden, name.removeprefix("exercise_"))
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except BaseException as error:  # SystemExit and KeyboardInterrupt too: reported, not obeyed
        _send(connection, {"error": _describe(error, path)})
        return
    _send(connection, {"ready": True})
    while True:
        try:
            message = json.loads(connection.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            target = message["target"]
            function = getattr(module, target) if isinstance(target, str) else kept[target]
            args = decode(message["args"], lambda handle: kept[handle])
            kwargs = {
                k: decode(v, lambda handle: kept[handle]) for k, v in message["kwargs"].items()
            }
            before = [np.array(v) if isinstance(v, np.ndarray) else v for v in args]
            before += [np.array(v) if isinstance(v, np.ndarray) else v for v in kwargs.values()]
            value = function(*args, **kwargs)
            changed = changed_inputs(function, args, kwargs, before)
            if changed is not None:
                reply = {
                    "error": {"kind": "InputChanged", "message": changed, "file": "", "line": 0}
                }
            else:
                reply = {"value": encode(value, keep)}
        except BaseException as error:
            reply = {"error": _describe(error, path)}
        _send(connection, reply)


class Child:
    """A child process running one student's file, with a time limit for all of it.

    ``call(name, *args)`` runs the file's function ``name`` there and returns its output
    (functions it returns come back as callables that run there too). The child is stopped at
    the time limit, after which every call raises ``ChildGone``. Packages in ``forbidden``
    cannot be imported there (``forbid``), and a call that writes into one of its array inputs
    raises ``StudentError`` of kind ``InputChanged``, naming it.
    """

    def __init__(
        self, path: Path, name: str, timeout: float, forbidden: Sequence[str] = ()
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, theirs = context.Pipe()
        self._process = context.Process(
            target=serve,
            args=(theirs, str(path), name, tuple(forbidden)),
            daemon=True,
            name="graphlora-check",
        )
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._gone: str | None = None
        self._process.start()
        theirs.close()
        reply = self._receive()
        if "error" in reply:
            self.stop()
            error = reply["error"]
            raise StudentError(error["kind"], error["message"], error["file"], error["line"])

    def call(self, target: str | int, *args: Any, **kwargs: Any) -> Any:
        """Run the file's function ``target`` (a name, or a handle) on ``args`` in the child."""
        if self._gone is not None:
            raise ChildGone(self._gone)
        message = {
            "target": target,
            "args": encode(list(args), _no_functions),
            "kwargs": {k: encode(v, _no_functions) for k, v in kwargs.items()},
        }
        try:
            _send(self._connection, message)
        except OSError:
            self._ended()
        reply = self._receive()
        if "error" in reply:
            error = reply["error"]
            raise StudentError(error["kind"], error["message"], error["file"], error["line"])
        try:
            return decode(reply["value"], self._function)
        except (ValueError, TypeError, KeyError) as error:
            raise StudentError("ValueError", f"the child sent {error}", "", 0) from None

    def _function(self, handle: int) -> Callable[..., Any]:
        def remote(*args: Any, **kwargs: Any) -> Any:
            return self.call(handle, *args, **kwargs)

        return remote

    def _receive(self) -> dict[str, Any]:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0 or not self._connection.poll(remaining):
            self.stop()
            self._gone = (
                f"timed out: the file ran for more than {self._timeout:g} s (the time limit, "
                "--timeout); an endless loop?"
            )
            raise ChildGone(self._gone)
        try:
            found = json.loads(self._connection.recv_bytes())
        except (EOFError, OSError):
            self._ended()
        except ValueError:
            found = None  # not JSON
        if not isinstance(found, dict):
            self.stop()
            self._gone = "the file's process sent something that is not a reply"
            raise ChildGone(self._gone)
        return found

    def _ended(self) -> Any:
        self._process.join(5)
        self._gone = (
            f"the file ended the grader's process (exit status {self._process.exitcode}); a file "
            "to grade must not exit"
        )
        self.stop()
        raise ChildGone(self._gone)

    def stop(self) -> None:
        """End the child (at once if it is still running)."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join(5)
        self._connection.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _no_functions(function: Callable[..., Any]) -> int:
    raise TypeError("the grader sends no functions")
