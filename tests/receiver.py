"""A real webhook receiver on 127.0.0.1, told how to answer each request.

Each request takes the next action from `script` (then `default`): an int status, or
("hang", seconds), ("drop",) to close the socket without answering, ("redirect",),
("retry_after", status, value), ("huge", n_bytes) a 500 with a big body,
("endless",) a 200 whose chunked body trickles forever, ("slowloris",) headers and then
no body, ("half",) part of the body and then a closed socket, ("garbage",) bytes that are
not HTTP.
Every request's headers, body and arrival time are kept in `requests`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    def __init__(self, script: list[Any] | None = None, default: Any = 200) -> None:
        self.script = list(script or [])
        self.default = default
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.requests.append(
                        {"headers": dict(self.headers.items()), "body": body,
                         "at": time.monotonic(), "path": self.path})
                    action = receiver.script.pop(0) if receiver.script else receiver.default
                with contextlib.suppress(OSError):  # the sender gave up: some tests want that
                    receiver.act(self, action)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def act(self, h: BaseHTTPRequestHandler, action: Any) -> None:
        kind = action[0] if isinstance(action, tuple) else "status"
        if kind == "status":
            self.reply(h, action, b"ok")
        elif kind == "hang":
            self.stopped.wait(action[1])
            self.reply(h, 200, b"late")
        elif kind == "drop":
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
        elif kind == "redirect":
            self.reply(h, 302, b"", {"Location": self.url + "/elsewhere"})
        elif kind == "retry_after":
            self.reply(h, action[1], b"busy", {"Retry-After": action[2]})
        elif kind == "huge":  # written in chunks, so the receiver itself stays small
            h.send_response(500)
            h.send_header("Content-Length", str(action[1]))
            h.end_headers()
            chunk = b"x" * 65536
            for _ in range(action[1] // len(chunk)):
                h.wfile.write(chunk)
        elif kind == "endless":
            h.send_response(200)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            while not self.stopped.is_set():
                try:
                    h.wfile.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
                except OSError:
                    return
                time.sleep(0.05)
        elif kind == "slowloris":
            h.send_response(200)
            h.send_header("Content-Length", "100")
            h.end_headers()
            h.wfile.flush()
            self.stopped.wait(30)
        elif kind == "half":
            h.send_response(200)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            h.wfile.write(b"x" * 10)
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
        elif kind == "garbage":
            h.wfile.write(b"\x16\x03\x01 not http at all\r\n\r\n")
            h.close_connection = True

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, body: bytes,
              headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
