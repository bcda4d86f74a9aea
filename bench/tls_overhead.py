"""What mutual TLS costs per decode hop: the same hops with and without TLS, side by side.

Run: ``python -m bench.tls_overhead [--model smollm2-135m] [--steps 200] [--round-trips 2000]``.
Writes ``bench/results/tls_overhead.json`` and ``tls_overhead.md`` (also printed).

Two sets of three workers of the same build, one plain and one serving
mutual TLS (certificates made by ``init_certs`` in a temporary directory),
measured alternately so that load drifts hit both alike:

- *one hop, keep-alive*: a decode-sized frame (one token's hidden state in
  float32, plus the frame's header) POSTed with ``SyncHopClient`` to a
  worker's ``/v1/probe/sink`` over one kept-alive connection, plain and TLS
  alternately; the figure is the median of the paired differences. This is
  a hop's transport alone: encryption, decryption and the ssl module's
  per-record work, without compute.
- *one hop, new connection each time*: the same with a fresh connection per
  request (the TCP + TLS handshake included), to show what keep-alive saves.
- *in process*: the data plane's own client (``HopClient``) against a
  minimal asyncio HTTP server in the same process, over one kept-alive
  connection, plain and TLS alternately; the process's CPU time per round
  trip (client and server together), which a loaded machine inflates much
  less than wall time. This is the figure to hold against the target.
- *end to end*: a 3-stage chain of the model on each set (the TLS set hops
  worker to worker over TLS), stepped token by token alternately; the
  per-hop figure is the median paired step difference divided by 3 hops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import tempfile
import time
from pathlib import Path

from bench.credentials import RANGES, paired_steps
from edgeorch.local.chain import load_chain
from edgeorch.local.launcher import LocalWorkers
from edgeorch.models import load_config
from edgeorch.models.store import ModelStore
from edgeorch.security.certs import init_certs, tls_settings_for
from edgeorch.service.settings import CommonSettings
from edgeorch.transport.client import ChainClient
from edgeorch.transport.hopclient import HopClient, SyncHopClient

HOPS = 3
FRAME_HEADER_BYTES = 200  # the frame's JSON meta, about what a decode step carries


def _round_trips(urls: dict[str, str], clients: dict[str, SyncHopClient], body: bytes, n: int,
                 fresh: bool) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per POST to each URL's probe sink, alternating which goes first."""
    out: dict[str, list[float]] = {k: [] for k in urls}
    for i in range(n):
        for name in list(urls) if i % 2 else list(reversed(urls)):
            if fresh:
                clients[name].close()
            t0 = time.perf_counter()
            clients[name].post(f"{urls[name]}/v1/probe/sink", body).raise_for_status()
            out[name].append(time.perf_counter() - t0)
    return out


_ANSWER = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{"bytes": 0}'


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal keep-alive HTTP/1.1 sink: read a request with a content-length, answer 12 bytes."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            writer.write(_ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        writer.close()  # the client went, or the server is closing: nothing left to answer


async def _in_process(body: bytes, n: int, certs: Path) -> dict[str, dict[str, float]]:
    """CPU and wall microseconds per keep-alive round trip, plain and TLS, client and server in this process."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.pem"))
    server_ctx.load_cert_chain(str(certs / "bench-server.pem"), str(certs / "bench-server.key"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = tls_settings_for(certs, "client").client_context()
    servers = {"plain": await asyncio.start_server(_sink, "127.0.0.1", 0),
               "tls": await asyncio.start_server(_sink, "127.0.0.1", 0, ssl=server_ctx)}  # fmt: skip
    urls = {k: f"{'https' if k == 'tls' else 'http'}://127.0.0.1:{s.sockets[0].getsockname()[1]}/sink"
            for k, s in servers.items()}  # fmt: skip
    client = HopClient(ssl_context=client_ctx)
    cpu: dict[str, list[float]] = {"plain": [], "tls": []}
    wall: dict[str, list[float]] = {"plain": [], "tls": []}
    try:
        for i in range(n + 100):
            for name in ("plain", "tls") if i % 2 else ("tls", "plain"):
                c0, w0 = time.process_time(), time.perf_counter()
                (await client.post(urls[name], body)).raise_for_status()
                if i >= 100:  # the first ones warm up (and open the connections)
                    cpu[name].append(time.process_time() - c0)
                    wall[name].append(time.perf_counter() - w0)
    finally:
        await client.aclose()
        for s in servers.values():
            s.close()
    # process_time ticks coarsely per call; the mean over many calls is the figure, the median would be 0 or a tick
    return {
        k: {"cpu_us": 1e6 * statistics.fmean(cpu[k]), "wall_us": 1e6 * statistics.median(wall[k])}
        for k in cpu
    }


def _paired_ms(walls: dict[str, list[float]], per: int = 1) -> dict[str, float]:
    diffs = [t - p for t, p in zip(walls["tls"], walls["plain"], strict=True)]
    return {"plain_ms": 1000 * statistics.median(walls["plain"]), "tls_ms": 1000 * statistics.median(walls["tls"]),
            "added_ms": 1000 * statistics.median(diffs) / per}  # fmt: skip


def run(model: str, steps: int, round_trips: int) -> dict:
    """All three measurements on two fresh sets of three workers."""
    store = ModelStore(Path(os.environ.get("EDGEORCH_MODEL_STORE") or CommonSettings().model_store))
    hidden = int(load_config(store.path(model)).hidden_size)
    body = os.urandom(4 * hidden + FRAME_HEADER_BYTES)
    ranges = RANGES[model]
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="edgeorch-tls-bench-") as scratch:
        init_certs(Path(scratch), ["client", "bench-server"])
        in_process = asyncio.run(_in_process(body, round_trips, Path(scratch)))
    with tempfile.TemporaryDirectory(prefix="edgeorch-tls-bench-") as certs, \
            LocalWorkers(len(ranges), threads=1) as plain, \
            LocalWorkers(len(ranges), threads=1, tls_dir=Path(certs)) as sealed:  # fmt: skip
        sets = {"plain": plain, "tls": sealed}
        urls = {k: w.workers[-1].url for k, w in sets.items()}
        sync = {
            "plain": SyncHopClient(timeout_s=30),
            "tls": SyncHopClient(timeout_s=30, ssl_context=sealed.client_tls),
        }
        try:
            _round_trips(urls, sync, body, 50, fresh=False)  # warm both servers
            kept = _round_trips(urls, sync, body, round_trips, fresh=False)
            fresh = _round_trips(urls, sync, body, max(50, round_trips // 10), fresh=True)
        finally:
            for c in sync.values():
                c.close()
        ids = {k: load_chain(w, model, ranges, prefix=k) for k, w in sets.items()}
        chains = {
            k: ChainClient(w.workers[0].url, ids[k][0], ssl_context=w.client_tls) for k, w in sets.items()
        }
        try:
            walls = paired_steps(chains, steps)
        finally:
            for c in chains.values():
                c.close()
    load.append(os.getloadavg()[0])
    return {
        "model": model, "hidden": hidden, "frame_bytes": len(body), "steps": steps, "round_trips": round_trips,
        "load_avg_1m": load, "in_process": in_process, "keep_alive": _paired_ms(kept), "new_connection": _paired_ms(fresh),
        "chain": _paired_ms(walls, HOPS),
    }  # fmt: skip


def markdown(r: dict) -> str:
    """The result as a Markdown table."""
    rows = [("one hop, keep-alive (probe sink)", r["keep_alive"], f"{r['round_trips']} pairs"),
            ("one hop, new connection each time", r["new_connection"], "handshake included"),
            (f"decode step, {HOPS}-stage chain", r["chain"], f"{r['steps']} pairs; added ÷ {HOPS} hops")]  # fmt: skip
    lines = [
        f"## Mutual TLS per hop: {r['model']}, frames of {r['frame_bytes']} bytes, loopback",
        "",
        f"Plain and TLS alternately; 1-minute load average {r['load_avg_1m'][0]:.1f} before, "
        f"{r['load_avg_1m'][1]:.1f} after.",
        "",
        "| measure | plain (ms, median) | TLS (ms, median) | added per hop (median paired difference) | note |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    ip = r["in_process"]
    cpu = {k: ip[k]["cpu_us"] / 1000 for k in ip}
    wall = {k: ip[k]["wall_us"] / 1000 for k in ip}
    lines.append(f"| one hop in process, CPU time (client + server) | {cpu['plain']:.3f} | {cpu['tls']:.3f} | "
                 f"{cpu['tls'] - cpu['plain']:.3f} ms (difference of means) | {r['round_trips']} pairs |")  # fmt: skip
    lines.append(f"| one hop in process, wall time | {wall['plain']:.3f} | {wall['tls']:.3f} | "
                 f"{wall['tls'] - wall['plain']:.3f} ms (difference of medians) | same run |")  # fmt: skip
    for name, m, note in rows:
        lines.append(
            f"| {name} | {m['plain_ms']:.3f} | {m['tls_ms']:.3f} | {m['added_ms']:.3f} ms | {note} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    """Measure, write JSON and Markdown under --out-dir, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(RANGES), default="smollm2-135m")
    p.add_argument("--steps", type=int, default=200, help="decode steps per chain (default 200)")
    p.add_argument(
        "--round-trips", type=int, default=2000, help="probe-sink pairs, keep-alive (default 2000)"
    )
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    result = run(args.model, args.steps, args.round_trips)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "tls_overhead.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out_dir / "tls_overhead.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
