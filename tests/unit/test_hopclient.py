"""The data plane's HTTP client against real loopback servers that answer in every way it must handle."""

from __future__ import annotations

import asyncio
import threading

import pytest

from edgeorch.transport.hopclient import HopClient, HopError, HopStatusError, HopTimeout, SyncHopClient


class RawServer:
    """A loopback TCP server whose handler reads one request head (and body) at a time."""

    def __init__(self, answer):
        self.answer = answer  # async (reader, writer, head, body) -> bool keep_open
        self.requests: list[bytes] = []
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.answer(reader, writer, head, body):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def _ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


async def echo(reader, writer, head, body) -> bool:
    writer.write(_ok(body, "x-edgeorch-hops: []\r\n"))
    await writer.drain()
    return True


def run(coro):
    return asyncio.run(coro)


def test_post_returns_status_headers_and_body_and_reuses_the_connection():
    async def main():
        srv = RawServer(echo)
        port = await srv.start()
        client = HopClient()
        for i in range(5):
            resp = await client.post(
                f"http://127.0.0.1:{port}/v1/x", b"payload %d" % i, {"content-type": "a/b"}
            )
            assert (resp.status_code, resp.content, resp.headers["x-edgeorch-hops"]) == (
                200,
                b"payload %d" % i,
                "[]",
            )
        await client.aclose()
        await srv.stop()
        assert srv.connections == 1
        assert srv.requests[0].startswith(b"POST /v1/x HTTP/1.1\r\n")
        assert b"content-type: a/b\r\n" in srv.requests[0]

    run(main())


def test_concurrent_requests_open_their_own_connections():
    async def slow_echo(reader, writer, head, body):
        await asyncio.sleep(0.05)
        return await echo(reader, writer, head, body)

    async def main():
        srv = RawServer(slow_echo)
        port = await srv.start()
        client = HopClient()
        bodies = [b"a", b"b", b"c"]
        got = await asyncio.gather(*(client.post(f"http://127.0.0.1:{port}/", b) for b in bodies))
        assert [r.content for r in got] == bodies
        await client.aclose()
        await srv.stop()
        assert srv.connections == 3

    run(main())


def test_a_connection_the_server_closed_while_idle_is_replaced_once():
    async def answer_then_close(reader, writer, head, body):
        await echo(reader, writer, head, body)
        return False  # close after every answer, without saying so

    async def main():
        srv = RawServer(answer_then_close)
        port = await srv.start()
        client = HopClient()
        first = await client.post(f"http://127.0.0.1:{port}/", b"one")
        await asyncio.sleep(0.05)  # the server's close reaches us
        second = await client.post(f"http://127.0.0.1:{port}/", b"two")
        await client.aclose()
        await srv.stop()
        assert (first.content, second.content) == (b"one", b"two")
        assert srv.requests[-1].endswith(b"two") and len(srv.requests) == 2

    run(main())


def test_chunked_answers_and_answers_without_length_are_read_whole():
    async def chunked(reader, writer, head, body):
        if b"/chunked" in head:
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
            )
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
        await writer.drain()
        return False

    async def main():
        srv = RawServer(chunked)
        port = await srv.start()
        client = HopClient()
        assert (await client.post(f"http://127.0.0.1:{port}/chunked", b"")).content == b"abcde"
        assert (await client.post(f"http://127.0.0.1:{port}/eof", b"")).content == b"until the end"
        await client.aclose()
        await srv.stop()

    run(main())


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.1 answer"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n", "bad content-length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 999999999999\r\n\r\n", "exceeds the limit"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "connection broken during the answer"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
    ],
)
def test_answers_that_are_not_well_formed_http_raise_hop_error(answer, message):
    async def bad(reader, writer, head, body):
        writer.write(answer)
        await writer.drain()
        return False

    async def main():
        srv = RawServer(bad)
        port = await srv.start()
        client = HopClient(max_body_bytes=1 << 20)
        with pytest.raises(HopError, match=message):
            await client.post(f"http://127.0.0.1:{port}/", b"x")
        await client.aclose()
        await srv.stop()

    run(main())


def test_a_silent_peer_times_out_and_a_closed_port_is_unreachable():
    async def silent(reader, writer, head, body):
        await asyncio.sleep(5)
        return False

    async def main():
        srv = RawServer(silent)
        port = await srv.start()
        client = HopClient()
        with pytest.raises(HopTimeout, match="within 0.2 s"):
            await client.post(f"http://127.0.0.1:{port}/", b"x", timeout_s=0.2)
        await srv.stop()
        with pytest.raises(HopError, match="cannot connect"):
            await client.post(f"http://127.0.0.1:{port}/", b"x")
        with pytest.raises(HopError, match=r"http\(s\)://host:port"):
            await client.post("ftp://127.0.0.1/", b"x")
        with pytest.raises(HopError, match="no TLS settings"):
            await HopClient(ssl_context=None).post("https://127.0.0.1/", b"x")
        await client.aclose()
        with pytest.raises(HopError, match="closed"):
            await client.post(f"http://127.0.0.1:{port}/", b"x")

    run(main())


def test_error_statuses_are_answers_until_raise_for_status():
    async def teapot(reader, writer, head, body):
        payload = b'{"detail": "no such stage"}'
        writer.write(f"HTTP/1.1 404 Not Found\r\ncontent-length: {len(payload)}\r\n\r\n".encode() + payload)
        await writer.drain()
        return True

    async def main():
        srv = RawServer(teapot)
        port = await srv.start()
        client = HopClient()
        resp = await client.delete(f"http://127.0.0.1:{port}/v1/stages/s/sessions/a")
        assert resp.status_code == 404 and resp.json() == {"detail": "no such stage"}
        with pytest.raises(HopStatusError, match="404"):
            resp.raise_for_status()
        await client.aclose()
        await srv.stop()
        assert srv.requests[0].startswith(b"DELETE /v1/stages/s/sessions/a HTTP/1.1")

    run(main())


def test_header_values_with_line_breaks_are_refused():
    async def main():
        client = HopClient()
        with pytest.raises(HopError, match="line break"):
            await client.post("http://127.0.0.1:1/", b"", {"x-a": "b\r\nx-injected: 1"})

    run(main())


def test_sync_client_reuses_its_connection_and_survives_a_server_close():
    loop = asyncio.new_event_loop()
    closes = {"n": 0}

    async def sometimes_close(reader, writer, head, body):
        await echo(reader, writer, head, body)
        closes["n"] += 1
        return closes["n"] != 2  # the second answer closes the connection silently

    srv = RawServer(sometimes_close)
    port = loop.run_until_complete(srv.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        client = SyncHopClient(timeout_s=5)
        got = []
        for i in range(4):
            got.append(client.post(f"http://127.0.0.1:{port}/", b"s%d" % i).content)
            if i == 1:
                threading.Event().wait(0.05)
        client.close()
        assert got == [b"s0", b"s1", b"s2", b"s3"]
        assert srv.connections == 2
        with pytest.raises(HopError, match="cannot reach"):
            SyncHopClient(timeout_s=1).post("http://127.0.0.1:1/", b"")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
