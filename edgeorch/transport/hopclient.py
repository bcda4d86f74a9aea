"""The data plane's HTTP client: one POST per hop, over keep-alive connections.

Every decode step crosses one hop per stage, so a hop's fixed cost is paid
tens of times per second. A general-purpose client's Python (httpx's
request and response models, its transport layers) dominates that cost, so
this client speaks only what a hop needs: HTTP/1.1 POST and DELETE with a
byte body, answered with a ``content-length`` or chunked body (measured
costs: docs/design.md, "As built: the hop transport"). The server side is
unchanged: plain HTTP that curl, httpx or any other client can also send.

Connections are pooled per (host, port) and reused while they are idle for
less than :data:`IDLE_REUSE_S`, well under uvicorn's keep-alive timeout. A
reused connection the server closed just before the request (the classic
keep-alive race) is retried once on a new one; any other failure is the
caller's (:class:`HopError`, :class:`HopTimeout`).

``https://`` URLs go over TLS with the process's client context
(``EDGEORCH_TLS_*``, :func:`edgeorch.security.certs.client_tls`): the peer
is verified against the CA and this process's certificate is presented.
A TLS connection is kept alive like a plain one, so its handshake is paid
once per connection, not per hop.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from edgeorch.security.certs import client_tls

IDLE_REUSE_S = 30.0
MAX_HEAD_BYTES = 64 * 1024
DEFAULT_MAX_BODY_BYTES = 1 << 30


class HopError(Exception):
    """The peer could not be reached, broke the connection or answered something that is not HTTP/1.1."""


class HopTimeout(HopError):
    """The peer did not answer in time."""


class HopStatusError(HopError):
    """The peer answered with an error status (from :meth:`HopResponse.raise_for_status`)."""


@dataclass(frozen=True)
class HopResponse:
    """A complete answer: status, headers (names lower-cased) and body."""

    status_code: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (replacing what is not)."""
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.content)

    def raise_for_status(self) -> HopResponse:
        """This answer, or HopStatusError when its status is 4xx or 5xx."""
        if self.status_code >= 400:
            raise HopStatusError(f"answered {self.status_code}: {self.text[:300]}")
        return self


@lru_cache(maxsize=1024)
def _target(url: str) -> tuple[str, int, str, str, bool]:
    """(host, port, path with query, Host header, over TLS) of an http:// or https:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HopError(f"hop URLs are http(s)://host:port/...; got {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, port, path, parts.netloc, tls


_UNSET = object()


def _tls_context(given, url_host: str) -> ssl.SSLContext:
    ctx = client_tls() if given is _UNSET else given
    if ctx is None:
        raise HopError(
            f"{url_host} is an https:// peer but this process has no TLS settings (EDGEORCH_TLS_*)"
        )
    return ctx


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.idle_since < IDLE_REUSE_S
        )

    def close(self) -> None:
        self.writer.close()


class _StaleConnection(Exception):
    """A reused connection was closed by the peer before any byte of the answer."""


class HopClient:
    """Async HTTP/1.1 client for stage-to-stage hops (see the module docstring)."""

    def __init__(
        self,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        max_idle_per_peer: int = 32,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        ssl_context=_UNSET,
    ):
        """``ssl_context``: for https:// peers; default the process's (``EDGEORCH_TLS_*``), read when first needed."""
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_peer = max_idle_per_peer
        self.max_body_bytes = max_body_bytes
        self._idle: dict[tuple[str, int], list[_Connection]] = defaultdict(list)
        self._closed = False

    async def post(
        self, url: str, content: bytes, headers: dict[str, str] | None = None, timeout_s: float | None = None
    ) -> HopResponse:
        """POST ``content`` to ``url`` and return the whole answer."""
        return await self.request("POST", url, content, headers, timeout_s)

    async def delete(
        self, url: str, timeout_s: float | None = None, headers: dict[str, str] | None = None
    ) -> HopResponse:
        """DELETE ``url``."""
        return await self.request("DELETE", url, b"", headers, timeout_s)

    async def request(
        self,
        method: str,
        url: str,
        content: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> HopResponse:
        """Send one request; raises HopError (HopTimeout) when no complete answer comes."""
        if self._closed:
            raise HopError("the hop client is closed")
        host, port, path, netloc, tls = _target(url)
        head = _request_head(method, path, netloc, len(content), headers)
        limit = self.timeout_s if timeout_s is None else timeout_s
        ctx = _tls_context(self.ssl_context, netloc) if tls else None
        try:
            async with asyncio.timeout(limit):
                return await self._exchange(host, port, head, content, ctx)
        except TimeoutError as exc:
            raise HopTimeout(f"no answer from {host}:{port} within {limit:g} s") from exc

    async def _exchange(
        self, host: str, port: int, head: bytes, content: bytes, ctx: ssl.SSLContext | None
    ) -> HopResponse:
        conn, reused = self._take(host, port), True
        if conn is None:
            conn, reused = await self._open(host, port, ctx), False
        try:
            try:
                resp = await self._round_trip(conn, head, content, reused)
            except _StaleConnection:
                conn.close()
                conn = await self._open(host, port, ctx)
                resp = await self._round_trip(conn, head, content, reused=False)
        except BaseException:
            conn.close()  # a connection a request failed on is never reused
            raise
        self._give_back(host, port, conn, resp)
        return resp

    async def _round_trip(self, conn: _Connection, head: bytes, content: bytes, reused: bool) -> HopResponse:
        try:
            conn.writer.writelines((head, content))
            await conn.writer.drain()
            status_head = await _read_head(conn.reader)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            if reused and not getattr(exc, "partial", b""):
                raise _StaleConnection() from exc
            raise HopError(f"connection broken before the answer: {exc!r}") from exc
        try:
            status, headers = _parse_head(status_head)
            body = await self._read_body(conn.reader, headers)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise HopError(f"connection broken during the answer: {exc!r}") from exc
        return HopResponse(status, headers, body)

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return await _read_chunked(reader, self.max_body_bytes)
        length = headers.get("content-length")
        if length is None:
            # No length and not chunked: the body runs to the end of the connection.
            body = await reader.read(self.max_body_bytes + 1)
            while not reader.at_eof() and len(body) <= self.max_body_bytes:
                body += await reader.read(self.max_body_bytes + 1 - len(body))
            headers["connection"] = "close"
        else:
            if not length.isdigit():
                raise HopError(f"bad content-length {length!r} in the answer")
            if int(length) > self.max_body_bytes:
                raise HopError(f"answer of {length} bytes exceeds the limit of {self.max_body_bytes}")
            body = await reader.readexactly(int(length))
        if len(body) > self.max_body_bytes:
            raise HopError(f"answer exceeds the limit of {self.max_body_bytes} bytes")
        return body

    async def _open(self, host: str, port: int, ctx: ssl.SSLContext | None) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    host, port, limit=MAX_HEAD_BYTES, ssl=ctx, server_hostname=host if ctx else None
                )
        except TimeoutError as exc:
            raise HopError(
                f"connecting to {host}:{port} timed out after {self.connect_timeout_s:g} s"
            ) from exc
        except ssl.SSLError as exc:
            raise HopError(f"TLS with {host}:{port} failed: {exc}") from exc
        except OSError as exc:
            raise HopError(f"cannot connect to {host}:{port}: {exc}") from exc
        return _Connection(reader, writer)

    def _take(self, host: str, port: int) -> _Connection | None:
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    def _give_back(self, host: str, port: int, conn: _Connection, resp: HopResponse) -> None:
        idle = self._idle[(host, port)]
        if (
            self._closed
            or resp.headers.get("connection", "").lower() == "close"
            or len(idle) >= self.max_idle_per_peer
        ):
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def aclose(self) -> None:
        """Close every pooled connection; later requests fail."""
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


def _request_head(method: str, path: str, netloc: str, length: int, headers: dict[str, str] | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {netloc}", f"content-length: {length}"]
    for name, value in (headers or {}).items():
        if any(c in name + value for c in "\r\n"):
            raise HopError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.LimitOverrunError, ValueError) as exc:
        raise HopError(f"answer head exceeds {MAX_HEAD_BYTES} bytes") from exc


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HopError(f"not an HTTP/1.1 answer: {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HopError(f"malformed header line in the answer: {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    body = bytearray()
    while True:
        try:
            size_line = await reader.readuntil(b"\r\n")
        except (asyncio.LimitOverrunError, ValueError) as exc:
            raise HopError("chunk size line too long in the answer") from exc
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as exc:
            raise HopError(f"bad chunk size {size_text[:20]!r} in the answer") from exc
        if size == 0:
            # Trailers, if any, end with an empty line.
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return bytes(body)
        if len(body) + size > limit:
            raise HopError(f"answer exceeds the limit of {limit} bytes")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


class SyncHopClient:
    """The blocking counterpart for tools and benchmarks: one keep-alive connection per peer.

    Built on the standard library's ``http.client``, which costs less than half
    a blocking ``httpx.Client`` per round trip (figures: docs/design.md, the
    hop transport); not thread-safe.
    """

    def __init__(self, timeout_s: float = 300.0, ssl_context=_UNSET):
        """``ssl_context``: for https:// peers; default the process's (``EDGEORCH_TLS_*``)."""
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context
        self._conns: dict[tuple[str, int], http.client.HTTPConnection] = {}

    def post(self, url: str, content: bytes, headers: dict[str, str] | None = None) -> HopResponse:
        """POST ``content`` to ``url`` and return the whole answer."""
        return self.request("POST", url, content, headers)

    def delete(self, url: str, headers: dict[str, str] | None = None) -> HopResponse:
        """DELETE ``url``."""
        return self.request("DELETE", url, headers=headers)

    def request(
        self, method: str, url: str, content: bytes = b"", headers: dict[str, str] | None = None
    ) -> HopResponse:
        """Send one request; raises HopError (HopTimeout) when no complete answer comes."""
        host, port, path, netloc, tls = _target(url)
        key = (host, port)
        for attempt in (0, 1):
            conn = self._conns.get(key)
            reused = conn is not None
            if conn is None:
                if tls:
                    ctx = _tls_context(self.ssl_context, netloc)
                    conn = http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=ctx)
                else:
                    conn = http.client.HTTPConnection(host, port, timeout=self.timeout_s)
                self._conns[key] = conn
            try:
                conn.request(method, path, body=content, headers=headers or {})
                resp = conn.getresponse()
                body = resp.read()
            except TimeoutError as exc:
                self._drop(key)
                raise HopTimeout(f"no answer from {host}:{port} within {self.timeout_s:g} s") from exc
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop(key)
                if reused and attempt == 0:
                    continue  # the peer closed the idle connection: one retry on a new one
                raise HopError(f"connection to {host}:{port} broken: {exc!r}") from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop(key)
                raise HopError(f"cannot reach {host}:{port}: {exc!r}") from exc
            if resp.will_close:
                self._drop(key)
            return HopResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _drop(self, key: tuple[str, int]) -> None:
        conn = self._conns.pop(key, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close every connection."""
        for key in list(self._conns):
            self._drop(key)
