"""Start edgeorch services (and the Redis and Celery processes they use) as local processes on loopback."""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import redis

from edgeorch.security.certs import init_certs, tls_settings_for, url_scheme

log = logging.getLogger(__name__)

# The command line lives above the core (it composes the services), so a
# launched process names it by module: `python -m services.cli <command>`.
CLI = (sys.executable, "-m", "services.cli")


# Ports handed out lately (port -> monotonic time). A child started on one takes
# seconds to bind it, and until then the kernel may offer the same port again: two
# workers on one port, and a URL that reaches the wrong node.
_HANDED_OUT: dict[int, float] = {}
_HANDED_OUT_LOCK = threading.Lock()
_REUSE_AFTER_S = 120.0


def free_port() -> int:
    """A loopback TCP port that nothing listens on now and that this process has not handed out lately."""
    with _HANDED_OUT_LOCK:
        now = time.monotonic()
        for _ in range(200):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if now - _HANDED_OUT.get(port, -_REUSE_AFTER_S) >= _REUSE_AFTER_S:
                _HANDED_OUT[port] = now
                return port
    raise RuntimeError("no loopback port free that was not handed out in the last two minutes")


class LocalProcess:
    """One child process with its log file (``{log_dir}/{name}.log``), in a session of its own."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, log_mode: str = "wb"):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, log_mode)  # noqa: SIM115 - closed in stop(); "ab" after a restart
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C on the launcher is handled by the launcher, not broadcast
        )

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

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


class LocalService(LocalProcess):
    """One `edgeorch <service>` child process on a loopback port, with its log file."""

    def __init__(
        self,
        name: str,
        args: list[str],
        port: int,
        env: dict[str, str],
        log_dir: Path,
        log_mode: str = "wb",
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
        tls: ssl.SSLContext | None = None,
    ):
        """``host``: the address it listens on and is reached at; ``prefix``: argv before Python
        (``ip netns exec NS`` for a worker in a namespace of its own); ``tls``: the launcher's
        client context when the service serves TLS (its own ``EDGEORCH_TLS_*`` are in ``env``)."""
        self.port = port
        self.host = host
        self.tls = tls
        self.url = f"{url_scheme(tls is not None)}://{host}:{port}"
        argv = [*prefix, *CLI, *args, "--host", host, "--port", str(port)]
        super().__init__(name, argv, env, log_dir, log_mode)

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Block until `/healthz` answers 200, or raise with the log's tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0, verify=self.tls or True).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(
            f"{self.name} at {self.url} not healthy after {timeout_s:.0f}s:\n{self.log_tail()}"
        )


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``port`` on loopback right now."""
    with socket.socket() as s:
        # As uvicorn binds: connections of a stack that just stopped (TIME_WAIT) do not block it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True when a Redis server answers PING at ``url``."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class RedisServer(LocalProcess):
    """A throw-away ``redis-server`` on a loopback port: no snapshots, no append-only file."""

    def __init__(self, server: str, port: int, log_dir: Path, work_dir: Path, host: str = "127.0.0.1"):
        argv = [server, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
                "--dir", str(work_dir)]  # fmt: skip
        if host != "127.0.0.1":
            # Protected mode admits loopback clients only; a testbed's bridge address is reachable
            # from its own namespaces and nothing else.
            argv += ["--protected-mode", "no"]
        super().__init__("redis", argv, {}, log_dir)
        self.port = port
        self.url = f"redis://{host}:{port}/0"

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Block until it answers PING."""
        wait_until(self, lambda: redis_answers(self.url, 0.5), timeout_s, f"redis at {self.url}")


class JobsWorker(LocalProcess):
    """`edgeorch jobs-worker`: the Celery worker for batch jobs, ready once it answers a control ping."""

    def __init__(self, env: dict[str, str], log_dir: Path, concurrency: int = 2):
        self.hostname = f"jobs-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        self.redis_url = env["EDGEORCH_REDIS_URL"]
        argv = [*CLI, "jobs-worker", "--concurrency", str(concurrency),
                "--hostname", self.hostname]  # fmt: skip
        super().__init__("jobs-worker", argv, env, log_dir)

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Block until the worker answers Celery's ping through the broker."""
        from edgeorch.service.jobs import make_celery

        app = make_celery(self.redis_url)

        def pong() -> bool:
            try:
                return bool(app.control.ping(destination=[self.hostname], timeout=0.5))
            except Exception:  # noqa: BLE001 - broker not ready yet: keep waiting
                return False

        try:
            wait_until(self, pong, timeout_s, f"jobs worker {self.hostname}")
        finally:
            app.close()


def wait_until(proc: LocalProcess, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``ready`` until it is true; raise with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{what} exited with {proc.proc.returncode}:\n{proc.log_tail()}")
        if ready():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s:\n{proc.log_tail()}")


class LocalWorkers:
    """N worker processes on free loopback ports; a context manager that stops them all."""

    def __init__(
        self,
        n: int,
        model_store: Path | None = None,
        threads: int = 0,
        log_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
        start_timeout_s: float = 60.0,
        tls_dir: Path | None = None,
    ):
        """``tls_dir``: serve and call with mutual TLS, certificates made there (``client`` for this process)."""
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.client_tls: ssl.SSLContext | None = None
        if self.tls_dir is not None:
            init_certs(self.tls_dir, ["client"])
            self.client_tls = tls_settings_for(self.tls_dir, "client").client_context()
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
                w.wait_healthy(start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def add_worker(self, node_id: str, env: dict[str, str] | None = None, wait: bool = False) -> LocalService:
        """Start one more worker (e.g. a node joining); returns it."""
        port = free_port()
        node_env = {
            **(env if env is not None else self._env),
            "EDGEORCH_NODE_ID": node_id,
            "EDGEORCH_ADVERTISE_URL": f"{url_scheme(self.tls_dir is not None)}://127.0.0.1:{port}",
        }
        if self.tls_dir is not None:
            init_certs(self.tls_dir, [node_id])
            node_env.update(tls_settings_for(self.tls_dir, node_id).env())
        w = LocalService(node_id, ["worker"], port, node_env, self.log_dir, tls=self.client_tls)
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
