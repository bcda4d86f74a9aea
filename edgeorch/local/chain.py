"""A static chain of stages on local workers: `edgeorch chain`.

Starts one worker process per stage on loopback, loads the stages with each
pointing at the next, runs a prompt through with greedy decoding (or embeds
it, for an encoder), and stops the workers.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from edgeorch.local.launcher import LocalWorkers
from edgeorch.models.formats import check_format
from edgeorch.security.certs import client_verify
from edgeorch.security.credentials import new_credential
from edgeorch.service.auth import ADMIN_TOKEN_ENV, admin_headers
from edgeorch.transport.client import ChainClient, Generation

log = logging.getLogger(__name__)


class ChainSpecError(ValueError):
    """The --stages argument does not describe a valid split of the model."""


def parse_stages(text: str, num_units: int) -> list[tuple[int, int]]:
    """Parse "0:11,11:21,21:32" into ranges that must tile [0, num_units) exactly."""
    ranges = []
    for part in text.split(","):
        try:
            a, b = (int(v) for v in part.strip().split(":"))
        except ValueError:
            raise ChainSpecError(f"stage {part!r} is not START:END") from None
        ranges.append((a, b))
    expected = 0
    for a, b in ranges:
        if a != expected or b <= a:
            raise ChainSpecError(
                f"stages must be contiguous and non-empty from 0; {a}:{b} does not follow {expected}"
            )
        expected = b
    if expected != num_units:
        raise ChainSpecError(
            f"stages end at {expected} but the model has {num_units} units (0..{num_units - 1})"
        )
    return ranges


@dataclass
class Chain:
    """Loaded stages on running workers, and a client for the first one."""

    workers: LocalWorkers
    stage_ids: list[str]
    client: ChainClient
    credential: str | None = field(default=None, repr=False)  # every stage's data-plane credential

    def stage_bytes(self) -> list[dict[str, int]]:
        """Per stage, what its worker holds for it: ``param_bytes`` and planned ``kv_bytes``."""
        out = []
        for w, sid in zip(self.workers.workers, self.stage_ids, strict=False):
            info = httpx.get(f"{w.url}/v1/stages/{sid}", timeout=30, verify=_verify(self.workers)).json()
            out.append({"param_bytes": info["param_bytes"], "kv_bytes": info.get("kv_bytes", 0)})
        return out

    def close(self) -> None:
        """Stop the client and the workers."""
        self.client.close()
        self.workers.stop()


def load_chain(
    workers: LocalWorkers | list[str],
    model: str,
    ranges: list[tuple[int, int]],
    prefix: str = "chain",
    options: dict | list[dict] | None = None,
    token: str = "",
    credential: str | None = None,
) -> list[str]:
    """PUT one stage per worker, each pointing at the next; returns the stage ids.

    ``workers`` are local workers or worker URLs (stage i on the i-th; a URL
    may repeat). ``options`` go into every stage spec (e.g. ``{"engine":
    "lean", "format": "int8"}``), or, as a list, one dict per stage (a format
    per node); ``token`` is the workers' admin token, if they have one.
    ``credential``: every stage's data-plane credential (one chain, one
    credential); None leaves them open.
    """
    urls = [w.url for w in workers.workers] if isinstance(workers, LocalWorkers) else workers
    verify = _verify(workers)
    if len(urls) < len(ranges):
        raise ChainSpecError(f"{len(ranges)} stages need as many workers, have {len(urls)}")
    per_stage = options if isinstance(options, list) else [options or {}] * len(ranges)
    if len(per_stage) != len(ranges):
        raise ChainSpecError(f"{len(per_stage)} stage options for {len(ranges)} stages")
    ids = [f"{prefix}.s{i}" for i in range(len(ranges))]
    for i, (a, b) in reversed(list(enumerate(ranges))):
        nxt = None
        if i + 1 < len(ranges):
            nxt = {"url": urls[i + 1], "stage_id": ids[i + 1], "credential": credential}
        resp = httpx.put(
            f"{urls[i]}/v1/stages/{ids[i]}",
            json={
                "model": model,
                "start": a,
                "end": b,
                "next": nxt,
                "credential": credential,
                **per_stage[i],
            },
            headers=admin_headers(token),
            timeout=300,
            verify=verify,
        )
        if resp.status_code not in (200, 201):
            raise RuntimeError(f"loading stage {ids[i]} [{a}, {b}) failed: {resp.status_code} {resp.text}")
        log.info("stage %s [%d, %d) on %s", ids[i], a, b, urls[i])
    return ids


def _verify(workers: LocalWorkers | list[str]):
    """How to call the workers: their stack's client TLS context, else this process's (EDGEORCH_TLS_*)."""
    tls = workers.client_tls if isinstance(workers, LocalWorkers) else None
    return tls or client_verify()


def start_chain(
    model: str,
    ranges: list[tuple[int, int]],
    model_store: Path | None = None,
    threads: int = 0,
    log_dir: Path | None = None,
    options: dict | list[dict] | None = None,
    token: str = "",
) -> Chain:
    """Start len(ranges) workers, load the stages (spec ``options`` on each), return a ready chain.

    The workers require ``token`` on admin calls (none when empty: they listen
    on loopback), whatever EDGEORCH_ADMIN_TOKEN this process inherited. The
    chain needs no control plane, so it makes its own data-plane credential.
    """
    env = {ADMIN_TOKEN_ENV: token}
    if Path(model).is_absolute():  # a checkpoint directory the operator named: its workers may load it
        env["EDGEORCH_MODEL_DIRS"] = model
    workers = LocalWorkers(
        len(ranges), model_store=model_store, threads=threads, log_dir=log_dir, extra_env=env
    )
    credential = new_credential()
    try:
        ids = load_chain(workers, model, ranges, options=options, token=token, credential=credential)
    except BaseException:
        workers.stop()
        raise
    client = ChainClient(
        workers.workers[0].url, ids[0], credential=credential, ssl_context=workers.client_tls
    )
    return Chain(workers, ids, client, credential)


def parse_formats(text: str | None, n_stages: int) -> list[dict] | None:
    """``--format``: one weight format for every stage, or one per stage ("int8" or "fp32,int8,int8").

    Returns per-stage spec options (the lean engine in each format), None
    when ``text`` is empty. Activations cross hops in float32 whatever a
    stage's format, so stages of different formats chain as they are.
    """
    if not text:
        return None
    formats = [f.strip() for f in text.split(",")]
    if len(formats) == 1:
        formats *= n_stages
    if len(formats) != n_stages:
        raise ChainSpecError(f"--format lists {len(formats)} formats for {n_stages} stages")
    for f in formats:
        check_format(f)
    return [{"engine": "lean", "format": f} for f in formats]


def hop_summary(gen: Generation) -> list[dict]:
    """Per stage: mean compute time, and the overhead of reaching it (transfer + framing)."""
    if not gen.steps:
        return []
    n = len(gen.steps[0].hops)
    out = []
    for i in range(n):
        compute = [s.hops[i]["compute_s"] for s in gen.steps[1:] or gen.steps]
        if i == 0:
            overhead = [s.wall_s - s.hops[0]["handler_s"] for s in gen.steps[1:] or gen.steps]
        else:
            overhead = [
                s.hops[i - 1]["downstream_s"] - s.hops[i]["handler_s"] for s in gen.steps[1:] or gen.steps
            ]
        out.append({
            "stage": gen.steps[0].hops[i]["stage"],
            "node": gen.steps[0].hops[i]["node"],
            "decode_compute_ms": 1000 * statistics.median(compute),
            "hop_overhead_ms": 1000 * statistics.median(overhead),
            "bytes_in_decode": gen.steps[-1].hops[i - 1].get("bytes_out") if i else gen.steps[-1].bytes_sent,
        })  # fmt: skip
    return out
