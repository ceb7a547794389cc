"""Resident memory of this process, from ``/proc/self`` (Linux): what the benches' per-process
memory figures read. ``start()`` resets the high-water mark and returns the resident bytes now;
``rise(since)`` is how far the high-water mark has gone above them."""

from __future__ import annotations

from pathlib import Path


def status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``"VmRSS:"``, ``"VmHWM:"``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def start() -> int:
    """Reset the resident high-water mark to what is resident now, and return that."""
    Path("/proc/self/clear_refs").write_text("5")
    return status("VmRSS:")


def rise(since: int) -> int:
    """Bytes the resident high-water mark rose above ``since`` (what ``start`` returned)."""
    return status("VmHWM:") - since
