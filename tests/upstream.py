"""A fake OpenAI-compatible model server on 127.0.0.1, for the OpenAI dialect's tests and bench.

`POST /v1/chat/completions` and `POST /v1/embeddings`. What a request gets is chosen by its
body's `model`, so one batch can mix outcomes:

* any ordinary model: 200, a ChatCompletion (`echo: ` + the last user message) or an
  embedding list, and an `x-request-id` header (`req_…`, also kept in the record);
* `"bad-request"`: 400 with OpenAI's error body (`invalid_request_error`, param `model`);
* `"rate-limited"`: 429 with `Retry-After` (`retry_after`, "1" unless told) the first time a
  given (model, `messages[0].content`) is seen, then 200;
* `"flaky"`: 500 the first time per (model, content), then 200;
* `"always-500"`: 500 every time;
* `"slow"`: held until `release` (a threading.Event) is set, at most `slow_max_s`, then 200.

`fast=True` answers every POST 200 with one prebuilt body, records nothing but a count, and
serves `GET /stats` (`{"requests", "first_at", "last_at", "cpu_s"}`; `POST /stats/reset`
zeroes them): the bench's upstream. Run on its own with
`python -m tests.upstream --fast [--port N]`; it prints its port on the first line.

Every other request is recorded in `requests` (a list of dicts: path, method, headers with
lower-case names, the parsed JSON body, `at` its monotonic arrival time, the `request_id`
it was given and the `status` answered, None while held). It runs aiohttp on an event loop
of its own in a thread, so tens of held requests cost nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import threading
import time
from typing import Any

from aiohttp import web

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
BAD_REQUEST_BODY = {"error": {"message": "The model `bad-request` does not exist.",
                              "type": "invalid_request_error", "param": "model", "code": None}}
RATE_LIMITED_BODY = {"error": {"message": "Rate limit reached, retry later.",
                               "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
SERVER_ERROR_BODY = {"error": {"message": "The server had an error while processing your"
                               " request.", "type": "server_error", "param": None, "code": None}}
FAST_BODY = json.dumps({
    "id": "chatcmpl-fast", "object": "chat.completion", "created": 1_700_000_000,
    "model": "fast", "choices": [{"index": 0, "message": {"role": "assistant",
                                                          "content": "ok"},
                                  "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


def first_content(body: Any) -> Any:
    """`messages[0].content` of a chat body, or `input` of an embeddings body."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return messages[0].get("content")
    return body.get("input")


def last_user_content(body: dict) -> Any:
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return (users or messages or [{}])[-1].get("content")


def tokens(value: Any) -> int:
    return max(1, len(str(value).split()))


class Upstream:
    def __init__(self, *, fast: bool = False, retry_after: str = "1", slow_max_s: float = 30.0,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.fast = fast
        self.retry_after = retry_after
        self.slow_max_s = slow_max_s
        self.host, self.port = host, port
        self.requests: list[dict] = []
        self.release = threading.Event()
        # fast mode: POSTs answered, and the wall times of the first and the last of them,
        # since the start or the last `POST /stats/reset`
        self.count = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._seen: set[tuple[str, str]] = set()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="upstream")

    # -- life cycle ----------

    @property
    def url(self) -> str:
        """The base a client joins `/chat/completions` to: `http://127.0.0.1:PORT/v1`."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Upstream:
        self._thread.start()
        if not self._started.wait(10) or self._error:
            raise RuntimeError(f"upstream did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        self.release.set()  # held requests answer, so nothing hangs the shutdown
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        if self.fast:
            app.router.add_post(CHAT, self._fast)
            app.router.add_post(EMBEDDINGS, self._fast)
            app.router.add_get("/stats", self._stats)
            app.router.add_post("/stats/reset", self._reset)
        else:
            app.router.add_post(CHAT, self._handle)
            app.router.add_post(EMBEDDINGS, self._handle)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, backlog=1024)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    # -- what tests read ----------

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.requests)

    def of(self, model: str | None = None, content: Any = None) -> list[dict]:
        """The recorded requests, in arrival order, for `model` and/or `messages[0].content`."""
        return [r for r in self.snapshot()
                if (model is None or (r["body"] or {}).get("model") == model)
                and (content is None or first_content(r["body"]) == content)]

    def held(self) -> int:
        """Requests that arrived and have not been answered yet (the `slow` ones)."""
        return sum(1 for r in self.snapshot() if r["status"] is None)

    # -- handlers ----------

    async def _handle(self, request: web.Request) -> web.Response:
        at = time.monotonic()
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        request_id = f"req_{next(self._ids):06d}"
        record = {"path": request.path, "method": request.method, "at": at,
                  "headers": {k.lower(): v for k, v in request.headers.items()},
                  "body": body, "raw": raw, "request_id": request_id, "status": None}
        with self._lock:
            self.requests.append(record)
        status, payload, headers = await self._answer(request.path, body)
        record["status"] = status
        return web.json_response(payload, status=status,
                                 headers={"x-request-id": request_id, **headers})

    async def _answer(self, path: str, body: Any) -> tuple[int, dict, dict[str, str]]:
        if not isinstance(body, dict):
            return 400, {"error": {"message": "We could not parse the JSON body of your"
                                   " request.", "type": "invalid_request_error",
                                   "param": None, "code": None}}, {}
        model = body.get("model")
        key = (str(model), json.dumps(first_content(body), sort_keys=True))
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
        if model == "bad-request":
            return 400, BAD_REQUEST_BODY, {}
        if model == "rate-limited" and first:
            return 429, RATE_LIMITED_BODY, {"Retry-After": self.retry_after}
        if (model == "flaky" and first) or model == "always-500":
            return 500, SERVER_ERROR_BODY, {}
        if model == "slow":
            deadline = time.monotonic() + self.slow_max_s
            while not self.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        return 200, self._success(path, body), {}

    def _success(self, path: str, body: dict) -> dict:
        model = body.get("model")
        if path == EMBEDDINGS:
            inputs = body.get("input")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            used = sum(tokens(i) for i in inputs)
            return {"object": "list", "model": model,
                    "data": [{"object": "embedding", "index": i,
                              "embedding": [0.1 * (i + 1), 0.2, 0.3]}
                             for i in range(len(inputs))],
                    "usage": {"prompt_tokens": used, "total_tokens": used}}
        content = last_user_content(body)
        reply = f"echo: {content}"
        prompt, completion = tokens(content), tokens(reply)
        return {"id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion",
                "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    async def _fast(self, request: web.Request) -> web.Response:
        await request.read()
        self.count += 1
        self.last_at = time.time()
        if self.first_at is None:
            self.first_at = self.last_at
        return web.Response(body=FAST_BODY, content_type="application/json",
                            headers={"x-request-id": "req_fast"})

    async def _stats(self, request: web.Request) -> web.Response:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return web.json_response({"requests": self.count, "first_at": self.first_at,
                                  "last_at": self.last_at,
                                  "cpu_s": usage.ru_utime + usage.ru_stime})

    async def _reset(self, request: web.Request) -> web.Response:
        self.count, self.first_at, self.last_at = 0, None, None
        return await self._stats(request)

    async def _not_found(self, request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": f"Unknown path {request.path}",
                                            "type": "invalid_request_error", "param": None,
                                            "code": "unknown_url"}}, status=404)


def main(argv: list[str] | None = None) -> None:
    """Serve in the foreground (the bench runs it in a process of its own)."""
    p = argparse.ArgumentParser(description="a fake OpenAI-compatible upstream")
    p.add_argument("--fast", action="store_true", help="answer every POST 200 at once")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = p.parse_args(argv)
    upstream = Upstream(fast=args.fast, port=args.port)

    async def serve() -> None:
        runner = web.AppRunner(upstream.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, upstream.host, upstream.port, backlog=1024)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    if args.uvloop:
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
