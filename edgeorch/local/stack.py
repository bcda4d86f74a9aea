"""The whole edgeorch stack as local processes on loopback: what `edgeorch up` and the e2e tests run.

Order (each tier waits for the previous one's ``/healthz``): Redis (only when
none answers at the configured URL), then monitor, splitter and broadcast,
then the orchestrator, the Celery jobs worker and the workers of a scenario
file. ``stop()`` goes back tier by tier, newest first.

``network="netns"`` puts every worker in a network namespace of its own
(:mod:`edgeorch.local.netns`): the control plane and a private Redis listen on the
bridge's address, each worker on its namespace's, and a worker's
``bandwidth_mbps`` becomes a real ``tbf`` cap on its uplink instead of
user-space pacing.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeorch.local.launcher import (
    JobsWorker,
    LocalProcess,
    LocalService,
    RedisServer,
    free_port,
    port_is_free,
    redis_answers,
)
from edgeorch.local.netns import Testbed
from edgeorch.local.scenario import Scenario, WorkerSpec, load_scenario
from edgeorch.security.certs import init_certs, tls_settings_for, url_scheme

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# The documented ports; used when `default_ports` is set and they are free.
DEFAULT_PORTS = {"orchestrator": 8000, "monitor": 8001, "splitter": 8002, "broadcast": 8003}
FIRST_WORKER_PORT = 8100
NETWORKS = ("loopback", "netns")
# The processes of a stack that get a certificate at start (each worker gets one when it starts).
TLS_SERVICES = ("monitor", "splitter", "broadcast", "orchestrator", "jobs-worker")


class StackError(RuntimeError):
    """The stack could not be started as asked."""


@dataclass(frozen=True)
class RedisChoice:
    """Which Redis a stack uses: the configured one, or a private ``redis-server`` it starts."""

    url: str
    start_server: bool


def choose_redis(url: str, answers: bool, server: str | None, private: bool = False) -> RedisChoice:
    """Use the Redis at ``url`` when it answers (and no private one is asked for), else start ``server``."""
    if answers and not private:
        return RedisChoice(url, start_server=False)
    if server is None:
        why = "a private Redis was asked for" if private else f"no Redis answers at {url}"
        raise StackError(f"{why} and redis-server is not on PATH; start Redis or set EDGEORCH_REDIS_URL")
    return RedisChoice(url, start_server=True)


def _stop_tier(tier: Sequence[LocalProcess], timeout_s: float = 10.0) -> None:
    """SIGTERM every process of a tier at once, then wait for each (SIGKILL past the timeout)."""
    for p in reversed(tier):
        if p.alive():
            p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in reversed(tier):
        try:
            p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", p.name, timeout_s)
            p.proc.kill()
            p.proc.wait()
        p.stop()  # closes the log; the process is gone already


class LocalStack:
    """Redis (if needed), monitor, splitter, broadcast, orchestrator, a jobs worker and N workers.

    A context manager: ``with LocalStack() as stack: httpx.get(stack.orchestrator_url + "/v1/models")``.
    Everything started is stopped on exit, also after an exception or Ctrl-C.
    """

    def __init__(
        self,
        scenario: Scenario | Path | str | None = None,
        *,
        workers: int | None = None,
        model_store: Path | str | None = None,
        log_dir: Path | str | None = None,
        state_dir: Path | str | None = None,
        database_url: str | None = None,
        redis_url: str | None = None,
        private_redis: bool = False,
        admin_token: str | None = None,
        api_keys: Iterable[str] = (),
        rollout_secret: str | None = None,
        torch_threads: int = 1,
        worker_env: dict[str, str] | None = None,
        service_env: dict[str, str] | None = None,
        orchestrator: bool = True,
        jobs_worker: bool = True,
        default_ports: bool = False,
        start_timeout_s: float = 120.0,
        report: Callable[[str], None] | None = None,
        network: str = "loopback",
        tls_dir: Path | str | None = None,
    ):
        """Describe a stack; nothing starts before :meth:`start` (or ``with``).

        ``scenario``: a Scenario or a YAML path (default ``scenarios/demo.yaml``); ``workers``
        keeps its first N workers or adds full-speed ones. ``database_url``: one SQL database
        for every service (tables are prefixed); default a SQLite file per service under
        ``state_dir`` (a temporary directory by default). ``admin_token`` None generates one,
        "" runs without. ``default_ports`` tries 8000-8003 and 8100+ before free ports.
        ``network``: "loopback" (every process on 127.0.0.1) or "netns" (a namespace per worker).
        ``tls_dir``: every service and worker serves mutual TLS and calls its peers with it;
        a CA and a certificate per process are made there (``edgeorch certs init``; an existing
        CA is kept), and this process calls as ``client``. Redis stays plain.
        """
        if network not in NETWORKS:
            raise StackError(f"network must be one of {', '.join(NETWORKS)}, not {network!r}")
        self.network = network
        self.tls_dir = Path(tls_dir).expanduser() if tls_dir else None
        self.client_tls = None  # this process's client context with TLS (made by start())
        self.testbed: Testbed | None = None
        self.host = "127.0.0.1"  # where the control plane listens; the bridge's address with netns
        if not isinstance(scenario, Scenario):
            scenario = load_scenario(scenario)
        self.scenario = scenario.with_workers(workers) if workers is not None else scenario
        self.model_store = Path(model_store).expanduser() if model_store else None
        # Temporary directories are made by start(), so describing a stack leaves nothing behind.
        self.log_dir = Path(log_dir).expanduser() if log_dir else None
        self.state_dir = Path(state_dir).expanduser() if state_dir else None
        self.database_url = database_url
        self.redis_url = redis_url or os.environ.get("EDGEORCH_REDIS_URL") or DEFAULT_REDIS_URL
        self.private_redis = private_redis or network == "netns"  # the shared one listens on loopback only
        self.admin_token = secrets.token_urlsafe(24) if admin_token is None else admin_token
        self.api_keys = [k for k in api_keys if k]
        self.rollout_secret = rollout_secret or secrets.token_urlsafe(32)
        self.torch_threads = torch_threads
        self.worker_env = dict(worker_env or {})
        self.service_env = dict(service_env or {})
        self.with_orchestrator = orchestrator
        self.with_jobs_worker = jobs_worker
        self.default_ports = default_ports
        self.start_timeout_s = start_timeout_s
        self._report = report or (lambda msg: log.info("%s", msg))
        # Stacks may share one Redis; a queue of their own keeps their jobs apart.
        self.jobs_queue = f"edgeorch-jobs-{uuid.uuid4().hex[:8]}"
        self.services: dict[str, LocalProcess] = {}
        self.workers: list[LocalService] = []
        self.redis_server: RedisServer | None = None
        self._tiers: list[list[LocalProcess]] = []
        self._worker_tier: list[LocalProcess] = []
        self._log_names: set[str] = set()
        self._started = self._stopped = False

    # ----- URLs ------------------------------------------------------------------------------

    def _url(self, name: str) -> str:
        service = self.services.get(name)
        if not isinstance(service, LocalService):
            raise StackError(f"{name} is not running in this stack")
        return service.url

    @property
    def orchestrator_url(self) -> str:
        """The gateway users talk to."""
        return self._url("orchestrator")

    @property
    def monitor_url(self) -> str:
        return self._url("monitor")

    @property
    def splitter_url(self) -> str:
        return self._url("splitter")

    @property
    def broadcast_url(self) -> str:
        return self._url("broadcast")

    def worker(self, node_id: str) -> LocalService:
        """The running worker with this node id."""
        for w in self.workers:
            if w.name == node_id:
                return w
        raise KeyError(f"no running worker {node_id!r}; running: {[w.name for w in self.workers]}")

    # ----- starting --------------------------------------------------------------------------

    def start(self) -> LocalStack:
        """Start every process, tier by tier; on any failure (or Ctrl-C) stop what started, then raise."""
        if self._started:
            return self
        self._started = True
        self.log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="edgeorch-logs-"))
        self.state_dir = self.state_dir or Path(tempfile.mkdtemp(prefix="edgeorch-state-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.network == "netns":
                self.testbed = Testbed()
                self.host = self.testbed.host_ip
                self._report(f"testbed {self.testbed.bridge}: control plane at {self.host}, "
                             f"a namespace per worker in {self.testbed.subnet}")  # fmt: skip
            if self.tls_dir is not None:
                init_certs(
                    self.tls_dir,
                    ["client", *TLS_SERVICES],
                    hosts=(self.host,) if self.host != "127.0.0.1" else (),
                )
                self.client_tls = tls_settings_for(self.tls_dir, "client").client_context()
                self._report(f"mutual TLS: CA and certificates in {self.tls_dir}")
            self._start_redis()
            self._start_tier([("monitor", []), ("splitter", []), ("broadcast", [])])
            if self.with_orchestrator:
                self._start_tier([("orchestrator", [])])
            if self.with_jobs_worker:
                self._start_jobs_worker()
            self._tiers.append(self._worker_tier)
            started = [self._spawn_worker(spec) for spec in self.scenario.workers]
            for w in started:
                w.wait_healthy(self.start_timeout_s)
                self._report(f"worker {w.name} ready at {w.url}")
        except (RuntimeError, TimeoutError) as exc:  # a process died or never became healthy
            self.stop()
            raise StackError(f"{exc}\n(every log is in {self.log_dir})") from exc
        except BaseException:  # Ctrl-C included: nothing may outlive a failed start
            self.stop()
            raise
        return self

    def _common_env(self) -> dict[str, str]:
        env = {
            "EDGEORCH_REDIS_URL": self.redis_url,
            "EDGEORCH_ADMIN_TOKEN": self.admin_token,
            "EDGEORCH_API_KEYS": ",".join(self.api_keys),
            "EDGEORCH_ROLLOUT_SECRET": self.rollout_secret,
            "EDGEORCH_STATE_DIR": str(self.state_dir),
            # Empty, not unset: a URL in the caller's environment must not leak into a fresh stack.
            "EDGEORCH_DATABASE_URL": self.database_url or "",
            "EDGEORCH_JOBS_QUEUE": self.jobs_queue,
        }
        if self.model_store is not None:
            env["EDGEORCH_MODEL_STORE"] = str(self.model_store)
        return env

    def _tls_env(self, name: str) -> dict[str, str]:
        return tls_settings_for(self.tls_dir, name).env() if self.tls_dir is not None else {}

    def _scheme(self) -> str:
        return url_scheme(self.tls_dir is not None)

    def _service_env(self, name: str) -> dict[str, str]:
        env = {**self._common_env(), **self.service_env, **self._tls_env(name)}
        if name == "orchestrator":
            env.update({
                "EDGEORCH_MONITOR_URL": self.monitor_url,
                "EDGEORCH_SPLITTER_URL": self.splitter_url,
                "EDGEORCH_BROADCAST_URL": self.broadcast_url,
            })  # fmt: skip
        return env

    def _port(self, preferred: int | None, taken: Iterable[int] = ()) -> int:
        if self.default_ports and preferred and preferred not in taken and port_is_free(preferred):
            return preferred
        return free_port()

    def _start_redis(self) -> None:
        choice = choose_redis(
            self.redis_url, redis_answers(self.redis_url), shutil.which("redis-server"), self.private_redis
        )
        if not choice.start_server:
            self._report(f"using the Redis at {self.redis_url}")
            return
        server = RedisServer(shutil.which("redis-server") or "redis-server", free_port(),
                             self.log_dir, self.state_dir, host=self.host)  # fmt: skip
        self._tiers.append([server])
        self.redis_server, self.redis_url = server, server.url
        server.wait_healthy(self.start_timeout_s)
        self._report(f"redis ready at {server.url}")

    def _start_tier(self, specs: list[tuple[str, list[str]]]) -> None:
        """Start the services of one tier together (their imports overlap), then wait for each."""
        tier: list[LocalProcess] = []
        self._tiers.append(tier)
        for name, args in specs:
            port = self._port(DEFAULT_PORTS.get(name))
            env = self._service_env(name)
            if name == "orchestrator":
                env["EDGEORCH_PUBLIC_URL"] = f"{self._scheme()}://{self.host}:{port}"
            service = LocalService(
                name, [name, *args], port, env, self.log_dir, host=self.host, tls=self.client_tls
            )
            self._log_names.add(name)
            tier.append(service)
            self.services[name] = service
        for service in tier:
            service.wait_healthy(self.start_timeout_s)
            self._report(f"{service.name} ready at {service.url}")

    def _start_jobs_worker(self) -> None:
        env = {**self._common_env(), **self.service_env, **self._tls_env("jobs-worker")}
        jobs = JobsWorker(env, self.log_dir)
        self._tiers.append([jobs])
        self.services["jobs-worker"] = jobs
        jobs.wait_healthy(self.start_timeout_s)
        self._report(f"jobs worker {jobs.hostname} ready (queue {self.jobs_queue})")

    def _worker_env(self, spec: WorkerSpec, host: str, port: int) -> dict[str, str]:
        capacity = spec.environment()
        if self.testbed is not None:  # the uplink's tbf shapes the bytes, not the worker
            capacity.pop("EDGEORCH_EMULATION_BANDWIDTH_MBPS", None)
        return {
            **self._common_env(),
            "EDGEORCH_NODE_ID": spec.node_id,
            "EDGEORCH_ADVERTISE_URL": f"{self._scheme()}://{host}:{port}",
            "EDGEORCH_MONITOR_URL": self.monitor_url,
            "EDGEORCH_BROADCAST_URL": self.broadcast_url,
            "EDGEORCH_TORCH_THREADS": str(self.torch_threads),
            **capacity,
            **self.worker_env,
            **self._tls_env(spec.node_id),
        }

    def _log_name(self, node_id: str) -> str:
        """``node_id``, or ``node_id.2`` ... for a node that comes back, so no log is overwritten."""
        name, n = node_id, 1
        while name in self._log_names:
            n += 1
            name = f"{node_id}.{n}"
        self._log_names.add(name)
        return name

    def _spawn_worker(self, spec: WorkerSpec) -> LocalService:
        if any(w.name == spec.node_id for w in self.workers):
            raise StackError(f"worker {spec.node_id!r} is running already")
        taken = {w.port for w in self.workers}
        port = self._port(FIRST_WORKER_PORT + len(self.workers), taken)
        host, prefix = "127.0.0.1", []
        if self.testbed is not None:
            host, prefix = self.testbed.add_node(spec.node_id), self.testbed.exec_prefix(spec.node_id)
            self.testbed.set_uplink(spec.node_id, spec.bandwidth_mbps)
        if self.tls_dir is not None:  # valid for its namespace's address too
            init_certs(self.tls_dir, [spec.node_id], hosts=(host,) if host != "127.0.0.1" else ())
        log_name = self._log_name(spec.node_id)
        w = LocalService(log_name, ["worker"], port, self._worker_env(spec, host, port), self.log_dir,
                         host=host, prefix=prefix, tls=self.client_tls)  # fmt: skip
        w.name = spec.node_id  # the node id, whatever its log file is called
        self.workers.append(w)
        self._worker_tier.append(w)
        return w

    # ----- changing a running stack ------------------------------------------------------------

    def add_worker(self, node_id: str, *, wait: bool = True, **capacity) -> LocalService:
        """Start one more worker (a node joining); ``capacity``: WorkerSpec fields (slowdown, memory, ...)."""
        if not self._started or self._stopped:
            raise StackError("the stack is not running")
        spec = WorkerSpec.model_validate({"id": node_id, **capacity})
        w = self._spawn_worker(spec)
        if wait:
            w.wait_healthy(self.start_timeout_s)
            self._report(f"worker {w.name} ready at {w.url}")
        return w

    def set_uplink(self, node_id: str, mbps: float | None) -> None:
        """Cap a node's outgoing traffic in its kernel (``network="netns"`` only; None lifts the cap)."""
        if self.testbed is None:
            raise StackError("real uplink caps need network='netns'; use the worker's emulation instead")
        self.worker(node_id)  # a running worker, or KeyError
        self.testbed.set_uplink(node_id, mbps)

    def restart_service(self, name: str, sig: int = signal.SIGKILL) -> LocalService:
        """Stop a control-plane service (SIGKILL by default: a crash) and start it again on its port."""
        old = self.services.get(name)
        if not isinstance(old, LocalService):
            raise StackError(f"{name} is not running in this stack")
        old.stop(sig=sig)
        env = self._service_env(name)
        if name == "orchestrator":
            env["EDGEORCH_PUBLIC_URL"] = old.url
        new = LocalService(
            name, [name], old.port, env, self.log_dir, log_mode="ab", host=self.host, tls=self.client_tls
        )
        for tier in self._tiers:
            tier[:] = [new if p is old else p for p in tier]
        self.services[name] = new
        new.wait_healthy(self.start_timeout_s)
        self._report(f"{name} restarted at {new.url}")
        return new

    def kill_worker(self, node_id: str) -> None:
        """SIGKILL a worker (a node lost without a goodbye); it leaves ``workers``."""
        w = self.worker(node_id)
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait()
        self.workers.remove(w)
        self._report(f"worker {node_id} killed")

    # ----- stopping ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything, newest tier first; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        for tier in reversed(self._tiers):
            try:
                _stop_tier(tier)
            except Exception:  # keep stopping the rest: a leaked process is worse than a log line
                log.exception("stopping %s failed", [p.name for p in tier])
        self.workers.clear()
        if self.testbed is not None:
            self.testbed.close()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def listing(self) -> list[tuple[str, str, Path]]:
        """(name, where it listens, log file) for every running process, in start order."""
        rows = []
        for tier in self._tiers:
            for p in tier:
                if p.alive():
                    rows.append((p.name, getattr(p, "url", "(no port: Celery via Redis)"), p.log_path))
        return rows
