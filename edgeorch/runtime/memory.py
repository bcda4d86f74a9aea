"""A worker's memory: what its stages are planned to hold, the cap it may not pass, what /proc says.

A stage holds its units' weights (``param_bytes``, shared units counted once)
and the KV of the sessions its spec plans for (``kv_sessions`` ×
``kv_context`` tokens × the stage's KV bytes per token). A worker with a
memory cap (``--memory`` / ``EDGEORCH_MEMORY``) refuses a load that would
take the planned total past it, before reading a byte, so whatever it
already serves is untouched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class OverMemory(Exception):
    """A stage load would take the worker's planned memory past its cap."""


def check_budget(limit: int | None, held: int, weights: int, kv: int, what: str) -> None:
    """Raise :class:`OverMemory` when ``held + weights + kv`` exceeds ``limit`` (None: no cap)."""
    need = weights + kv
    if limit is not None and held + need > limit:
        raise OverMemory(
            f"{what} needs {need} bytes ({weights} of weights + {kv} of planned KV) but this worker "
            f"already holds {held} of its {limit}-byte memory cap ({held + need - limit} bytes over); "
            "nothing was loaded"
        )


def proc_memory() -> dict[str, int]:
    """This process's resident memory from /proc/self/status, in bytes (rss, rss_anon, rss_file, peak_rss)."""
    names = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "peak_rss"}
    out = dict.fromkeys(names.values(), 0)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in names:
                out[names[key]] = int(rest.split()[0]) * 1024
    except OSError:  # not Linux: report zeros rather than fail a status call
        pass
    return out


def return_memory() -> None:
    """Collect garbage and give freed malloc arenas back to the OS (glibc's ``malloc_trim``)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # musl and others have no malloc_trim: nothing to trim
        log.debug("malloc_trim is not available")
