"""A fake OpenAI- and Anthropic-compatible model server on 127.0.0.1, for the dialects'
tests and benches.

`POST /v1/chat/completions`, `POST /v1/embeddings` (OpenAI) and `POST /v1/messages`
(Anthropic). What a request gets is chosen by its body's `model`, so one batch can mix
outcomes:

* any ordinary model: 200, a ChatCompletion (`echo: ` + the last user message), an
  embedding list, or a Message (`msg_…`, one text block `echo: ` + the last user message,
  `stop_reason` `end_turn`); an `x-request-id` header (OpenAI paths) or `request-id`
  (`/v1/messages`), `req_…`, also kept in the record;
* `"bad-request"`: 400 with the dialect's error body (OpenAI: `invalid_request_error`, param
  `model`; Anthropic: `{"type": "error", "error": {"type": "invalid_request_error", ...}}`);
* `"rate-limited"`: 429 with `Retry-After` (`retry_after`, "1" unless told) the first time a
  given (model, conversation) is seen, then 200 (the conversation: `system` and `messages`,
  or `input`);
* `"flaky"`: 500 the first time per (model, conversation), then 200;
* `"always-500"`: 500 every time;
* `"slow"`: held until `release` (a threading.Event) is set, at most `slow_max_s`, then 200.

The chat reply honours `stop` (a string or a list: the reply is cut before the earliest stop
string it contains, `finish_reason` "stop", and the choice gets vLLM's `stop_reason` field set
to the matched string) and `max_tokens` (a reply of more words than that is cut to that many
words, `finish_reason` "length"; a stop that comes first wins). The Message reply honours
`stop_sequences` (`stop_reason` "stop_sequence", `stop_sequence` the matched string) and
`max_tokens` (`stop_reason` "max_tokens") the same way; a Message request without an integer
`max_tokens` is a 400, as Anthropic's. Tokens are words.

`fast=True` answers every POST 200 with one prebuilt body (a ChatCompletion, or a Message on
`/v1/messages`), records nothing but a count, and serves `GET /stats` (`{"requests",
"first_at", "last_at", "cpu_s"}`; `POST /stats/reset` zeroes them): the benches' upstream.
Run on its own with `python -m tests.upstream --fast [--port N]`; it prints its port on the
first line.

Every other request is recorded in `requests` (a list of dicts: path, method, headers with
lower-case names — `authorization`, `x-api-key`, `anthropic-version`, ... —, the parsed JSON
body, `at` its monotonic arrival time, the `request_id` it was given, the `status` answered,
None while held, and `reply`, the JSON body answered). `bodies(path)` gives the bodies a path
received. It runs aiohttp on an event loop of its own in a thread, so tens of held requests
cost nothing. `url` is the OpenAI base (`.../v1`), `root` the Anthropic one (no `/v1`).
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
MESSAGES = "/v1/messages"
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
ANTHROPIC_BAD_REQUEST_BODY = {"type": "error", "error": {
    "type": "invalid_request_error", "message": "model: `bad-request` is not a valid model"}}
ANTHROPIC_RATE_LIMITED_BODY = {"type": "error", "error": {
    "type": "rate_limit_error", "message": "Number of requests has exceeded your rate limit"}}
ANTHROPIC_SERVER_ERROR_BODY = {"type": "error", "error": {
    "type": "api_error", "message": "Internal server error"}}
FAST_MESSAGE_BODY = json.dumps({
    "id": "msg_fast", "type": "message", "role": "assistant", "model": "fast",
    "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
    "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}).encode()


def text_of(content: Any) -> Any:
    """A message's content as text: a string as it is, a list of blocks as their `text`s
    joined (a chat content-part list or Anthropic text blocks), anything else as it is."""
    if isinstance(content, list):
        return "".join(str(block.get("text", "")) for block in content
                       if isinstance(block, dict) and block.get("type") == "text")
    return content


def conversation(body: dict) -> str:
    """What `rate-limited` and `flaky` remember having seen (with the model)."""
    if isinstance(body.get("messages"), list):
        return json.dumps([body.get("system"), body["messages"]], sort_keys=True)
    return json.dumps(body.get("input"), sort_keys=True)


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
    return text_of((users or messages or [{}])[-1].get("content"))


def tokens(value: Any) -> int:
    return max(1, len(str(value).split()))


def stops_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for s in value if isinstance(s, str) and s]
    return []


def generate(prompt: Any, stops: list[str], max_tokens: Any) -> tuple[str, str, str | None]:
    """The would-be reply to `prompt`, and why it ended: ("stop", None) when it ran out,
    ("stop", s) when it met the stop string s, ("length", None) at max_tokens words."""
    text = f"echo: {prompt}"
    matched = None
    hits = [(text.find(s), s) for s in stops if s in text]
    if hits:
        at, matched = min(hits)
        text = text[:at]
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 0:
        words = text.split()
        if len(words) > max_tokens:
            return " ".join(words[:max_tokens]), "length", None
    return text, "stop", matched


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

    @property
    def root(self) -> str:
        """The base an Anthropic client joins `/v1/messages` to: `http://127.0.0.1:PORT`."""
        return f"http://{self.host}:{self.port}"

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
            app.router.add_post(MESSAGES, self._fast)
            app.router.add_get("/stats", self._stats)
            app.router.add_post("/stats/reset", self._reset)
        else:
            app.router.add_post(CHAT, self._handle)
            app.router.add_post(EMBEDDINGS, self._handle)
            app.router.add_post(MESSAGES, self._handle)
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

    def bodies(self, path: str = CHAT) -> list[Any]:
        """The bodies `path` received, in arrival order (what a translation sent)."""
        return [r["body"] for r in self.snapshot() if r["path"] == path]

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
                  "body": body, "raw": raw, "request_id": request_id, "status": None,
                  "reply": None}
        with self._lock:
            self.requests.append(record)
        status, payload, headers = await self._answer(request.path, body)
        record["status"], record["reply"] = status, payload
        id_header = "request-id" if request.path == MESSAGES else "x-request-id"
        return web.json_response(payload, status=status,
                                 headers={id_header: request_id, **headers})

    async def _answer(self, path: str, body: Any) -> tuple[int, dict, dict[str, str]]:
        anthropic = path == MESSAGES
        if not isinstance(body, dict):
            if anthropic:
                return 400, anthropic_error("invalid_request_error",
                                            "There was an issue with the format of your"
                                            " request: invalid JSON"), {}
            return 400, {"error": {"message": "We could not parse the JSON body of your"
                                   " request.", "type": "invalid_request_error",
                                   "param": None, "code": None}}, {}
        model = body.get("model")
        key = (str(model), conversation(body))
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
        if model == "bad-request":
            return 400, ANTHROPIC_BAD_REQUEST_BODY if anthropic else BAD_REQUEST_BODY, {}
        if model == "rate-limited" and first:
            return 429, ANTHROPIC_RATE_LIMITED_BODY if anthropic else RATE_LIMITED_BODY, {
                "Retry-After": self.retry_after}
        if (model == "flaky" and first) or model == "always-500":
            return 500, ANTHROPIC_SERVER_ERROR_BODY if anthropic else SERVER_ERROR_BODY, {}
        if anthropic and (not isinstance(body.get("max_tokens"), int)
                          or isinstance(body.get("max_tokens"), bool)):
            return 400, anthropic_error("invalid_request_error", "max_tokens: Field required"), {}
        if model == "slow":
            deadline = time.monotonic() + self.slow_max_s
            while not self.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        return 200, self._success(path, body), {}

    def _success(self, path: str, body: dict) -> dict:
        model = body.get("model")
        if path == MESSAGES:
            content = last_user_content(body)
            text, why, matched = generate(content, stops_of(body.get("stop_sequences")),
                                          body.get("max_tokens"))
            reason = ("max_tokens" if why == "length"
                      else "stop_sequence" if matched is not None else "end_turn")
            return {"id": f"msg_{next(self._ids):06d}", "type": "message",
                    "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": reason, "stop_sequence": matched,
                    "usage": {"input_tokens": tokens(content), "output_tokens": tokens(text)}}
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
        reply, finish, matched = generate(content, stops_of(body.get("stop")),
                                          body.get("max_tokens"))
        prompt, completion = tokens(content), tokens(reply)
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": reply},
                                  "finish_reason": finish}
        if matched is not None:
            choice["stop_reason"] = matched  # vLLM names the stop string that ended it
        return {"id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion",
                "created": int(time.time()), "model": model,
                "choices": [choice],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    async def _fast(self, request: web.Request) -> web.Response:
        await request.read()
        self.count += 1
        self.last_at = time.time()
        if self.first_at is None:
            self.first_at = self.last_at
        if request.path == MESSAGES:
            return web.Response(body=FAST_MESSAGE_BODY, content_type="application/json",
                                headers={"request-id": "req_fast"})
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


def anthropic_error(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


def main(argv: list[str] | None = None) -> None:
    """Serve in the foreground (the bench runs it in a process of its own)."""
    p = argparse.ArgumentParser(description="a fake OpenAI- and Anthropic-compatible upstream")
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
