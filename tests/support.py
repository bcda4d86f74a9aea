"""Helpers for tests that start real edgeorch processes on loopback ports."""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path

from edgeorch.local.launcher import LocalService, free_port

__all__ = ["REPO", "ServiceProcess", "free_port", "wait_for"]

REPO = Path(__file__).resolve().parent.parent


class ServiceProcess(LocalService):
    """`edgeorch <service> --port P` as a child process, logging to ``log_path``.

    The launcher's LocalService with the test suite's names: a log file rather
    than a log directory, ``wait_ready`` and ``kill``.
    """

    def __init__(
        self, args: list[str], port: int, env: dict[str, str] | None = None, log_path: Path | None = None
    ):
        log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp()) / f"{args[0]}.log"
        super().__init__(log_path.stem, args, port, env or {}, log_path.parent)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until `/healthz` answers, or fail with the process log."""
        self.wait_healthy(timeout_s)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process (SIGTERM by default, SIGKILL if it lingers)."""
        self.stop(sig)


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    """Poll until predicate() is truthy and return it; fail after the timeout, saying what was awaited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s}s: {what}")
