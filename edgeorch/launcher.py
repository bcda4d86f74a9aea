"""Start edgeorch services as local processes on loopback (tests, demo, benchmarks)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalService:
    """One `edgeorch <service>` child process with its log file."""

    def __init__(self, name: str, args: list[str], port: int, env: dict[str, str], log_dir: Path):
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeorch.cli", *args, "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C on the launcher is handled by the launcher, not broadcast
        )

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Block until `/healthz` answers 200, or raise with the log's tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(
            f"{self.name} at {self.url} not healthy after {timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of the process log."""
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after the timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class LocalWorkers:
    """N worker processes on free loopback ports; a context manager that stops them all."""

    def __init__(
        self,
        n: int,
        model_store: Path | None = None,
        threads: int = 0,
        log_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="edgeorch-workers-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(extra_env or {})
        if model_store is not None:
            env["EDGEORCH_MODEL_STORE"] = str(model_store)
        if threads:
            env["EDGEORCH_TORCH_THREADS"] = str(threads)
        self._env = env
        self.workers: list[LocalService] = []
        try:
            for i in range(n):
                self.add_worker(f"worker-{i}", env)
            for w in self.workers:
                w.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def add_worker(self, node_id: str, env: dict[str, str] | None = None, wait: bool = False) -> LocalService:
        """Start one more worker (e.g. a node joining); returns it."""
        port = free_port()
        node_env = {
            **(env if env is not None else self._env),
            "EDGEORCH_NODE_ID": node_id,
            "EDGEORCH_ADVERTISE_URL": f"http://127.0.0.1:{port}",
        }
        w = LocalService(node_id, ["worker"], port, node_env, self.log_dir)
        self.workers.append(w)
        if wait:
            w.wait_healthy()
        return w

    def stop(self) -> None:
        """Stop every worker."""
        for w in self.workers:
            w.stop()

    def __enter__(self) -> LocalWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
