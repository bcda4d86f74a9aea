"""Run a service app under uvicorn with edgeorch's logging set up."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from edgeorch.security.certs import TlsSettings


def setup_logging(level: str = "INFO") -> None:
    """One log format for every edgeorch process."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP call to a peer would drown everything else.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted. Access logs are off: they cost per-hop time.

    With ``EDGEORCH_TLS_CERT``/``_KEY``/``_CA`` set, HTTPS that requires a
    client certificate of that CA (edgeorch.security.certs).
    """
    tls = TlsSettings().server_kwargs()
    uvicorn.run(
        app, host=host, port=port, log_level=log_level.lower(), access_log=False, timeout_keep_alive=60, **tls
    )
