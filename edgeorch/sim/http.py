"""A minimal keep-alive HTTP/1.1 client on asyncio streams, for simulated nodes.

A thousand simulated nodes heartbeat once a second from one process; with a
general client (httpx) the simulator's own CPU would be the bottleneck and
the benchmark would measure the wrong process. This client does only what
the control plane's answers need: one request at a time per connection,
``Content-Length`` bodies (FastAPI's JSON answers), reconnect on any error.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

MAX_BODY_BYTES = 16 << 20
MAX_HEADER_LINES = 100


class HttpError(OSError):
    """The request could not be completed (connection, timeout or a malformed answer)."""


class HttpConnection:
    """One persistent connection to ``base_url``; requests on it are serialised."""

    def __init__(self, base_url: str, timeout_s: float = 5.0):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"only http://host:port URLs are supported, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """Send one request; returns (status, body). Raises HttpError (the connection is then reset)."""
        async with self._lock:
            try:
                return await asyncio.wait_for(
                    self._exchange(method, path, body, headers or {}), self.timeout_s
                )
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self.close()
                raise HttpError(f"{method} {self.host}:{self.port}{path}: {exc!r}") from exc

    async def _exchange(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"host: {self.host}:{self.port}",
                 f"content-length: {len(body)}"]  # fmt: skip
        if body and "content-type" not in headers:
            lines.append("content-type: application/json")
        lines.extend(f"{k}: {v}" for k, v in headers.items())
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await self._writer.drain()
        return await self._read_response()

    async def _read_response(self) -> tuple[int, bytes]:
        reader = self._reader
        if reader is None:
            raise ValueError("not connected")
        status_line = await reader.readuntil(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP status line: {status_line[:80]!r}")
        length, close = 0, False
        for _ in range(MAX_HEADER_LINES):
            line = await reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value.strip())
            elif key == b"transfer-encoding":
                raise ValueError("chunked answers are not supported by the simulator's client")
            elif key == b"connection" and value.strip().lower() == b"close":
                close = True
        else:
            raise ValueError("too many header lines")
        if length > MAX_BODY_BYTES:
            raise ValueError(f"answer of {length} bytes is over the limit")
        data = await reader.readexactly(length) if length else b""
        if close:
            self.close()
        return int(parts[1]), data

    def close(self) -> None:
        """Drop the connection; the next request opens a new one."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
