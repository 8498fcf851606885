"""Request ids, the access log, and how `minibatch serve` writes its log lines.

Every HTTP request gets an id: the caller's `x-request-id` when it is sane (1-128 of
`A-Z a-z 0-9 . _ : -`), else a new `req_…`. The response carries it back in `x-request-id`,
every log line written while the request is served names it, and the access log (logger
`minibatch.access`, on by default in serve) has one line per request: method, path,
status, duration and id. `--log-format json` writes each line as one JSON object.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("minibatch_request_id", default=None)
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Request ids must be unique, not secret: 64 random bits without a system call each.
_ids = random.Random(os.urandom(16))
access_log = logging.getLogger("minibatch.access")


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's `x-request-id` if it is sane, else a new id."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _SANE_ID.fullmatch(text):
                return text
            break
    return f"req_{_ids.getrandbits(64):016x}"


class RequestLog:
    """ASGI wrapper around the whole app (so a 500 carries the id too): the request id
    in a context variable while the request is served and in the response's headers,
    and the access log line when it ends."""

    def __init__(self, app: Any, *, access: bool) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope["headers"])
        header = (b"x-request-id", rid.encode())
        token = REQUEST_ID.set(rid)
        status = 0  # nothing was answered (the client went away first)
        started = time.perf_counter()

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access:
                ms = round((time.perf_counter() - started) * 1000, 1)
                if _access_line is not None:
                    _access_line(scope["method"], scope["path"], status, ms, rid)
                else:  # not configured by serve: the logger, wherever the app sends it
                    access_log.info("%s %s %d %.1fms", scope["method"], scope["path"],
                                    status, ms, extra={"http": {
                                        "method": scope["method"], "path": scope["path"],
                                        "status": status, "duration_ms": ms}})
            REQUEST_ID.reset(token)


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} request_id={rid}" if rid else line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if rid := getattr(record, "request_id", None):
            entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _BufferedHandler(logging.StreamHandler):
    """stderr through a 64 KiB buffer: INFO lines are written out every FLUSH_EVERY_S (one
    write a request cost a small GET a good part of its time), a warning or worse at once,
    and what is left at exit."""

    FLUSH_EVERY_S = 0.5

    def __init__(self) -> None:
        # The handler owns this stream for the life of the process (closed in close()).
        super().__init__(open(sys.stderr.fileno(), "w", buffering=1 << 16,  # noqa: SIM115
                              closefd=False, encoding="utf-8", errors="replace"))
        self._flushed = time.monotonic()
        threading.Thread(target=self._flush_often, name="minibatch-log-flush",
                         daemon=True).start()

    def _flush_often(self) -> None:
        while not self.stream.closed:
            time.sleep(self.FLUSH_EVERY_S)
            self.acquire()
            try:
                if not self.stream.closed:
                    self._flush_now()
            finally:
                self.release()

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)  # which calls flush()
        if record.levelno >= logging.WARNING:
            self._flush_now()

    def flush(self) -> None:
        if time.monotonic() - self._flushed >= self.FLUSH_EVERY_S:
            self._flush_now()

    def _flush_now(self) -> None:
        self._flushed = time.monotonic()
        super().flush()

    def close(self) -> None:
        self._flush_now()
        self.stream.close()
        super().close()


# Set by `configure`: writes one access line straight to the handler's stream, in the
# handler's format. A LogRecord, its filter and its formatter cost a small GET ~40 % of
# its time; this costs a few percent.
_access_line: Callable[[str, str, int, float, str], None] | None = None


class _Clock:
    """The time as `configure`'s lines show it, re-formatted once a second."""

    def __init__(self) -> None:
        self.second, self.text = -1, ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self.second:
            self.second, self.text = second, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                           time.localtime(t))
        return f"{self.text}.{int((t - second) * 1000):03d}"


def configure(log_format: str, level: int = logging.INFO) -> None:
    """Send every logger's lines (minibatch's and uvicorn's) to stderr, as text or JSON,
    each naming the request it was written for; the access log too, unless it is off."""
    global _access_line
    handler = _BufferedHandler()
    handler.addFilter(_WithRequestId())
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    stream, lock, clock = handler.stream, handler.lock, _Clock()
    assert lock is not None  # logging.Handler.__init__ made it

    def access_line(method: str, path: str, status: int, ms: float, rid: str) -> None:
        if log_format == "json":
            line = json.dumps({"time": clock.now(), "level": "INFO",
                               "logger": "minibatch.access",
                               "message": f"{method} {path} {status} {ms}ms",
                               "request_id": rid, "method": method, "path": path,
                               "status": status, "duration_ms": ms}) + "\n"
        else:  # a decoded path may hold a newline: one request, one line
            shown = path if path.isprintable() else json.dumps(path)[1:-1]
            line = (f"{clock.now()} INFO minibatch.access: {method} {shown} {status} {ms}ms"
                    f" request_id={rid}\n")
        with lock:  # threads log through the same stream
            stream.write(line)
            handler.flush()

    _access_line = access_line if level <= logging.INFO else None
