"""The HTTP server's limits against a real server on 127.0.0.1, driven over raw sockets:
oversized heads (431), requests that do not arrive whole in time (dropped), and
connections beyond `max_connections` (503).

Waits are bounded generously (CLOSED_WITHIN) and never asserted tighter, so a slow
machine passes; the connection count is read from the server rather than guessed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import ServerThread

LIMIT = 8192  # max_header_bytes of the header tests
TIMEOUT_S = 0.5  # request_timeout_s of the timeout tests
CLOSED_WITHIN = 10.0  # 20 times TIMEOUT_S: how long a test waits for the server to act


@pytest.fixture
def serve(db_path) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(**settings) -> ServerThread:
        started.append(ServerThread(db_path, **settings).start())
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def connect() -> Iterator[Callable[[ServerThread], socket.socket]]:
    """Opens client sockets, and closes those a test leaves open (a failing one too)."""
    opened: list[socket.socket] = []

    def open_to(srv: ServerThread) -> socket.socket:
        opened.append(socket.create_connection(("127.0.0.1", srv.port),
                                               timeout=CLOSED_WITHIN))
        return opened[-1]

    yield open_to
    for sock in opened:
        sock.close()


def until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection (a reset ends it too); a
    server that keeps it open past CLOSED_WITHIN fails the test with TimeoutError."""
    chunks = []
    with sock:
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def head(size: int, *, end: bytes = b"\r\n") -> bytes:
    """A GET /healthz of `size` bytes: its request line and headers, then `end` (the
    blank line, or nothing for a head that has not ended)."""
    start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: "
    return start + b"a" * (size - len(start) - 2 - len(end)) + b"\r\n" + end


def exchange(sock: socket.socket) -> int:
    """One GET /healthz on a kept-alive socket, its response read whole: the status."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    response.close()
    return response.status


def healthy(srv: ServerThread) -> bool:
    return httpx.get(srv.url + "/healthz", timeout=CLOSED_WITHIN).status_code == 200


def open_connections(srv: ServerThread, count: int) -> None:
    """Wait until the server itself counts `count` open connections."""
    deadline = time.monotonic() + CLOSED_WITHIN
    while len(srv.server.server_state.connections) != count:
        assert time.monotonic() < deadline, len(srv.server.server_state.connections)
        time.sleep(0.01)


# -- request line and headers ----------


def test_a_head_at_the_limit_is_served_and_one_byte_more_gets_431_and_a_close(serve, connect):
    srv = serve(max_header_bytes=LIMIT)
    at_limit = connect(srv)
    at_limit.sendall(head(LIMIT))
    assert status(until_closed(at_limit)) == 200

    over = connect(srv)
    over.sendall(head(LIMIT + 1))
    answer = until_closed(over)
    assert status(answer) == 431
    assert b"content-type: application/problem+json" in answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == 431


def test_an_unfinished_head_over_the_limit_gets_431_without_waiting_for_its_end(serve, connect):
    srv = serve(max_header_bytes=LIMIT)
    sock = connect(srv)
    sock.sendall(head(LIMIT + 1, end=b""))
    assert status(until_closed(sock)) == 431
    assert healthy(srv)


def test_a_1_mib_header_is_refused_long_before_it_ends(serve, connect):
    """The head never ends and the request timeout is 30 s: only the header limit can
    close this connection within CLOSED_WITHIN, so the server never holds the 1 MiB."""
    srv = serve(max_header_bytes=LIMIT)
    sock = connect(srv)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed mid-send
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (1024 * 1024))
    answer = until_closed(sock)
    # Closing with the rest unread makes the kernel send a reset, which may beat the 431.
    assert answer == b"" or status(answer) == 431
    open_connections(srv, 0)
    assert healthy(srv)


def test_body_bytes_in_the_same_read_as_the_head_do_not_count(serve, connect):
    srv = serve(max_header_bytes=LIMIT)
    body = b"".join(b'{"input": %d}\n' % i for i in range(10_000))
    assert len(body) > 10 * LIMIT
    sock = connect(srv)
    sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 b"Authorization: Bearer " + srv.key("acme").encode() + b"\r\n"
                 b"Content-Type: application/jsonl\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert status(until_closed(sock)) == 201


def test_a_pipelined_head_over_the_limit_gets_431_after_the_first_answer(serve, connect):
    srv = serve(max_header_bytes=LIMIT)
    sock = connect(srv)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + head(LIMIT + 1))
    assert re.findall(rb"HTTP/1.1 (\d+)", until_closed(sock)) == [b"200", b"431"]


# -- requests that do not arrive whole in time ----------


def test_a_connection_that_sends_nothing_is_closed_with_408(serve, connect):
    srv = serve(request_timeout_s=TIMEOUT_S)
    assert status(until_closed(connect(srv))) == 408
    assert healthy(srv)


def test_a_head_sent_half_then_stalled_is_closed_with_408(serve, connect):
    srv = serve(request_timeout_s=TIMEOUT_S)
    sock = connect(srv)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slo")
    assert status(until_closed(sock)) == 408
    assert healthy(srv)


def test_a_body_sent_in_part_then_stalled_is_dropped(serve, connect):
    srv = serve(request_timeout_s=TIMEOUT_S)
    sock = connect(srv)
    sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer " + srv.key("acme").encode() + b"\r\n"
                 b"Content-Type: application/jsonl\r\nContent-Length: 1000\r\n\r\n"
                 b'{"input": 1}\n')
    # The handler is reading the body, so no status line can be sent: only the close.
    assert until_closed(sock) == b""
    assert healthy(srv)


def test_a_body_stalled_after_an_early_answer_is_dropped_without_a_second_answer(serve, connect):
    srv = serve(request_timeout_s=TIMEOUT_S)
    sock = connect(srv)
    sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/jsonl\r\nContent-Length: 1000\r\n\r\n"
                 b'{"input": 1}\n')
    # No key: the 401 leaves before the body ends, and the connection waits for the rest.
    assert re.findall(rb"HTTP/1.1 (\d+)", until_closed(sock)) == [b"401"]


def test_a_kept_alive_connection_gives_each_request_its_own_clock(serve, connect):
    srv = serve(request_timeout_s=TIMEOUT_S)
    sock = connect(srv)
    assert exchange(sock) == 200
    # Idle for longer than the request timeout (shorter than uvicorn's 5 s keep-alive):
    # the clock of a request that arrived whole has stopped.
    time.sleep(2 * TIMEOUT_S)
    assert exchange(sock) == 200
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
    assert status(until_closed(sock)) == 408


def test_a_request_begun_late_on_a_connection_still_gets_its_whole_time(serve, connect):
    """The connection's first clock runs out while the second request is arriving;
    that request still has until its own time is up (a margin of 1 s here)."""
    srv = serve(request_timeout_s=3.0)
    sock = connect(srv)
    assert exchange(sock) == 200
    time.sleep(1.5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    time.sleep(2.0)  # past the first clock (3 s), short of this request's (4.5 s)
    sock.sendall(b"Connection: close\r\n\r\n")
    assert status(until_closed(sock)) == 200


# -- open connections ----------


def test_connections_beyond_max_connections_get_503(serve, connect):
    srv = serve(max_connections=5)
    held = [connect(srv) for _ in range(4)]
    for sock in held:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # slow clients count as open
    open_connections(srv, 4)
    assert healthy(srv)  # the fifth open connection is still served

    open_connections(srv, 4)
    held.append(connect(srv))
    open_connections(srv, 5)
    refused = httpx.get(srv.url + "/healthz", timeout=CLOSED_WITHIN)
    assert refused.status_code == 503

    held.pop().close()
    open_connections(srv, 4)
    assert healthy(srv)
