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
import importlib.util
import json
import multiprocessing
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
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


def _describe(error: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(error.__traceback__)
    frame = frames[-1] if frames else None
    return {
        "kind": type(error).__name__,
        "message": str(error),
        "file": Path(frame.filename).name if frame else "",
        "line": frame.lineno if frame and frame.lineno is not None else 0,
    }


def _send(connection: Connection, message: dict[str, Any]) -> None:
    connection.send_bytes(json.dumps(message).encode("utf-8"))


def serve(connection: Connection, path: str, name: str) -> None:  # pragma: no cover (a child)
    """The child: import the file, say whether it imported, then run the calls it is sent."""
    kept: dict[int, Callable[..., Any]] = {}

    def keep(function: Callable[..., Any]) -> int:
        kept[len(kept)] = function
        return len(kept) - 1

    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except BaseException as error:  # SystemExit and KeyboardInterrupt too: reported, not obeyed
        _send(connection, {"error": _describe(error)})
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
            reply = {"value": encode(function(*args, **kwargs), keep)}
        except BaseException as error:
            reply = {"error": _describe(error)}
        _send(connection, reply)


class Child:
    """A child process running one student's file, with a time limit for all of it.

    ``call(name, *args)`` runs the file's function ``name`` there and returns its output
    (functions it returns come back as callables that run there too). The child is stopped at
    the time limit, after which every call raises ``ChildGone``.
    """

    def __init__(self, path: Path, name: str, timeout: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, theirs = context.Pipe()
        self._process = context.Process(
            target=serve, args=(theirs, str(path), name), daemon=True, name="graphlora-check"
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
