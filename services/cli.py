"""`edgeorch <command>`: one entry point for every process type and tool.

The composition root: it sits above the core (``edgeorch/``, which imports
no service) and above every service, and is the only module that names them
all. Run as the ``edgeorch`` console script or ``python -m services.cli``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_serve_args(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port})")
    p.add_argument("--log-level", default="INFO")


def _bind_refused(host: str, admin_token: str, service: str) -> bool:
    """Print why ``service`` must not listen on ``host`` (no admin token beyond loopback), if so."""
    from edgeorch.service.auth import InsecureBindError, check_bind

    try:
        check_bind(host, admin_token, service)
    except InsecureBindError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return True
    return False


def _run_splitter(args: argparse.Namespace) -> int:
    from edgeorch.service.serve import serve, setup_logging
    from services.splitter.app import SplitterSettings, create_app

    setup_logging(args.log_level)
    # No bind check: a plan is a pure function of its request, the splitter changes nothing.
    serve(create_app(SplitterSettings()), args.host, args.port, args.log_level)
    return 0


def _run_monitor(args: argparse.Namespace) -> int:
    from edgeorch.service.serve import serve, setup_logging
    from services.monitor.app import MonitorSettings, create_app

    setup_logging(args.log_level)
    settings = MonitorSettings()
    if _bind_refused(args.host, settings.admin_token, "monitor"):
        return 2
    serve(create_app(settings), args.host, args.port, args.log_level)
    return 0


def _run_broadcast(args: argparse.Namespace) -> int:
    from edgeorch.rollout.signing import InsecureSecretError
    from edgeorch.service.serve import serve, setup_logging
    from services.broadcast.app import BroadcastSettings, create_app

    setup_logging(args.log_level)
    settings = BroadcastSettings()
    if _bind_refused(args.host, settings.admin_token, "broadcast"):
        return 2
    try:
        app = create_app(settings, bind_host=args.host)
    except InsecureSecretError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve(app, args.host, args.port, args.log_level)
    return 0


def _run_orchestrator(args: argparse.Namespace) -> int:
    from edgeorch.service.serve import serve, setup_logging
    from services.orchestrator.app import OrchestratorSettings, create_app

    setup_logging(args.log_level)
    settings = OrchestratorSettings()
    if _bind_refused(args.host, settings.admin_token, "orchestrator"):
        return 2
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    serve(create_app(settings, bind_url=f"http://{host}:{args.port}"), args.host, args.port, args.log_level)
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    import torch

    from edgeorch.service.serve import serve, setup_logging
    from services.worker.app import WorkerSettings, create_app

    setup_logging(args.log_level)
    overrides = {"node_id": args.node_id} if args.node_id else {}
    if args.threads is not None:
        overrides["torch_threads"] = args.threads
    if args.memory is not None:
        overrides["memory"] = args.memory
    settings = WorkerSettings(**overrides)
    if _bind_refused(args.host, settings.admin_token, "worker"):
        return 2
    if settings.broadcast_url:
        from edgeorch.rollout.signing import InsecureSecretError, resolve_secret

        try:  # refuse to take rollout orders beyond loopback without a shared secret
            settings.rollout_secret = resolve_secret(settings.rollout_secret, args.host)
        except InsecureSecretError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    serve(create_app(settings), args.host, args.port, args.log_level)
    return 0


def _store(args: argparse.Namespace):
    from edgeorch.models.store import ModelStore
    from edgeorch.service.settings import CommonSettings

    # The CLI is the operator's own hand: any checkpoint directory it names is allowed.
    return ModelStore(Path(args.store) if args.store else CommonSettings().model_store, allowed_dirs=["/"])


def _models_prepare(args: argparse.Namespace) -> int:
    from edgeorch.models.store import ModelStoreError
    from edgeorch.service.serve import setup_logging

    setup_logging("INFO")
    store = _store(args)
    try:
        built = store.prepare(args.only or None, force=args.force)
        packed = []
        if args.formats:
            from edgeorch.engine.synth import pack_store

            formats = [f.strip() for f in args.formats.split(",") if f.strip()]
            packed = pack_store(store, args.only or store.prepared(), formats, force=args.force)
    except (ModelStoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model store {store.root}: built {built or 'nothing (all prepared)'}; packed {packed or 'nothing'}; "
          f"ready: {store.prepared()}")  # fmt: skip
    return 0


def _models_import(args: argparse.Namespace) -> int:
    from edgeorch.engine.importer import import_model
    from edgeorch.models.store import ModelStoreError
    from edgeorch.service.serve import setup_logging

    setup_logging("INFO")
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    try:
        path = import_model(_store(args), Path(args.path), args.name, formats)
    except (ModelStoreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"imported {args.path} as {args.name} ({', '.join(formats) or 'checkpoint only'}) at {path}")
    return 0


def _models_synth(args: argparse.Namespace) -> int:
    from edgeorch.engine.synth import synth_model
    from edgeorch.models.store import ModelStoreError
    from edgeorch.service.serve import setup_logging

    setup_logging("INFO")
    try:
        path = synth_model(_store(args), args.name, args.shape, args.format, seed=args.seed)
    except (ModelStoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"synthesised {args.name} ({args.shape}, {args.format}) at {path}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    store = _store(args)
    for name in store.prepared():
        info = store.info(name)
        print(f"{name:16} {info['family']:6} {info['kind']:8} {info.get('source', '')}")
    return 0


def _run_chain(args: argparse.Namespace) -> int:
    from edgeorch.local.chain_command import run_chain_command

    return run_chain_command(args, _store(args))


def _add_models(sub) -> None:
    models = sub.add_parser("models", help="the local model store")
    msub = models.add_subparsers(dest="models_command", required=True)
    p = msub.add_parser("prepare", help="build the model store (idempotent)")
    p.add_argument(
        "--store", help="store directory (default: EDGEORCH_MODEL_STORE or ~/.cache/edgeorch/models)"
    )
    p.add_argument("--only", nargs="*", help="only these models")
    p.add_argument("--force", action="store_true", help="rebuild even if prepared")
    p.add_argument(
        "--formats", default="", help="also write packed per-unit files in these formats (e.g. int8,int4)"
    )
    p.set_defaults(func=_models_prepare)
    p = msub.add_parser("import", help="add a GGUF file (llama, qwen2, mistral) or HF directory to the store")
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.add_argument("--format", default="int8,int4", help="packed formats to write (default int8,int4)")
    p.add_argument("--store")
    p.set_defaults(func=_models_import)
    p = msub.add_parser("synth", help="write a random-weight model of a real shape, unit by unit")
    p.add_argument("name")
    p.add_argument(
        "--shape", required=True, help="tinyllama-1.1b, llama-7b, or test-tiny (a few MB, for tests)"
    )
    p.add_argument("--format", required=True, help="fp32, bf16, int8 or int4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store")
    p.set_defaults(func=_models_synth)
    p = msub.add_parser("list", help="list prepared models")
    p.add_argument("--store")
    p.set_defaults(func=_models_list)


def _certs_init(args: argparse.Namespace) -> int:
    import re

    from edgeorch.schemas.stage import ID_PATTERN
    from edgeorch.security.certs import init_certs

    names = [n.strip() for n in args.names.split(",") if n.strip()]
    bad = [n for n in names if not re.match(ID_PATTERN, n)]
    if bad or not names:
        print(f"error: names must be plain ids ({ID_PATTERN}); got {bad or 'none'}", file=sys.stderr)
        return 2
    written = init_certs(Path(args.dir), names)
    print(f"CA and {len(names)} certificates in {args.dir}: {', '.join(p.name for p in written)}")
    print(
        "serve with EDGEORCH_TLS_CERT=<dir>/<name>.pem EDGEORCH_TLS_KEY=<dir>/<name>.key EDGEORCH_TLS_CA=<dir>/ca.pem"
    )
    return 0


def _add_certs(sub) -> None:
    certs = sub.add_parser("certs", help="mutual TLS: a local CA and a certificate per service or node")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    p = csub.add_parser("init", help="write ca.pem (kept if present) and <name>.pem/.key per name into DIR")
    p.add_argument("dir")
    p.add_argument("--names", default="orchestrator,monitor,splitter,broadcast,worker,client",
                   help="comma-separated services or nodes (default: the five services and a client)")  # fmt: skip
    p.set_defaults(func=_certs_init)


def _add_chain(sub) -> None:
    p = sub.add_parser("chain", help="run a prompt through a static split on local workers")
    p.add_argument("--model", required=True, help="store name, e.g. smollm2-135m, minilm-l6")
    p.add_argument("--stages", required=True, help="unit ranges, e.g. 0:11,11:21,21:32")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch default)")
    p.add_argument("--format", default=None,
                   help="weights: fp32 (default, exact), bf16, int8, int4 for every stage, or one per stage: fp32,int8,int8")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.add_argument("--store")
    p.add_argument("--log-dir", help="where worker logs go (default: a temporary directory)")
    p.set_defaults(func=_run_chain)


def _run_jobs_worker(args: argparse.Namespace) -> int:
    from edgeorch.service.jobs import celery_app, worker_argv
    from edgeorch.service.serve import setup_logging

    setup_logging(args.log_level)
    # In-process, so the worker is one `edgeorch` process like every other service.
    celery_app.worker_main(worker_argv(args.concurrency, args.log_level, args.hostname))
    return 0


def _add_jobs_worker(sub) -> None:
    p = sub.add_parser("jobs-worker", help="run the Celery worker for batch jobs (POST /v1/jobs)")
    p.add_argument("--concurrency", type=int, default=2, help="jobs run at once, one thread each (default 2)")
    p.add_argument("--hostname", help="Celery node name (default: jobs@<host>)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_run_jobs_worker)


def _run_up(args: argparse.Namespace) -> int:
    from edgeorch.local.up_command import run_up

    return run_up(args)


def _add_up(sub) -> None:
    from edgeorch.local.up_command import add_arguments

    p = sub.add_parser(
        "up",
        help="run the whole stack locally, deploy a model, answer a sample question",
        description="Start Redis (if none answers), monitor, splitter, broadcast, orchestrator, a jobs "
        "worker and the scenario's workers on loopback; deploy --model; print where everything "
        "listens, the plan and a sample answer; run until Ctrl-C (or stop at once with --once).",
    )
    add_arguments(p)
    p.set_defaults(func=_run_up)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="edgeorch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "orchestrator", help="serve the Adaptive Orchestrator and the OpenAI-compatible gateway"
    )
    _add_serve_args(p, 8000)
    p.set_defaults(func=_run_orchestrator)

    p = sub.add_parser("splitter", help="serve the Split Revision planner (POST /v1/plan)")
    _add_serve_args(p, 8002)
    p.set_defaults(func=_run_splitter)

    p = sub.add_parser("monitor", help="serve Monitoring & Capacity Profiling")
    _add_serve_args(p, 8001)
    p.set_defaults(func=_run_monitor)

    p = sub.add_parser("broadcast", help="serve the Reconfiguration Broadcast (POST /v1/rollouts)")
    _add_serve_args(p, 8003)
    p.set_defaults(func=_run_broadcast)

    p = sub.add_parser("worker", help="serve model stages on this node")
    _add_serve_args(p, 8100)
    p.add_argument("--node-id", help="node id (default: EDGEORCH_NODE_ID or host-pid)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: EDGEORCH_TORCH_THREADS)")
    p.add_argument(
        "--memory",
        type=int,
        help="memory cap in bytes for weights + planned KV (default: EDGEORCH_MEMORY, none)",
    )
    p.set_defaults(func=_run_worker)

    _add_models(sub)
    _add_chain(sub)
    _add_certs(sub)
    _add_jobs_worker(sub)
    _add_up(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
