"""The Anthropic Message Batches dialect under `/anthropic`, refereed by the real `anthropic`
SDK.

Requests run on the fake upstream of tests/upstream.py, whose answer is chosen by each
request's `model`, so one batch mixes outcomes: either natively (`anthropic_upstream`, its
`/v1/messages`) or translated to `/chat/completions` when the server has only an OpenAI
upstream. One upstream and two servers (one of each kind) serve the module; a test that
needs settings of its own (concurrency, a short window, a held upstream) builds its own.
Each test is its own tenant, and the contents of its requests start with the tenant's name,
so what the shared upstream saw can be told apart.

Everything waits on observed state (the batch's status, the upstream's record) with a
bounded deadline; no test asserts how fast anything happened, only that a retry did not
come before its `Retry-After`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import anthropic
import anyio
import httpx
import openai
import pytest

import minibatch
from tests.conftest import ServerThread
from tests.integration.test_openai import DEADLINE, OPTIONS, eventually, native
from tests.receiver import free_port
from tests.serve import Served
from tests.upstream import (
    ANTHROPIC_BAD_REQUEST_BODY,
    ANTHROPIC_SERVER_ERROR_BODY,
    BAD_REQUEST_BODY,
    CHAT,
    MESSAGES,
    Upstream,
    text_of,
)

UPSTREAM_KEY = "sk-ant-upstream-operator-key"
OPENAI_KEY = "sk-openai-upstream-operator-key"
VERSION = "2023-06-01"
KIND = "anthropic:/v1/messages"


# -- helpers ----------


def sdk(srv: ServerThread | Served, key: str, cls: type = anthropic.Anthropic) -> Any:
    return cls(base_url=f"{srv.url}/anthropic", api_key=key, max_retries=0, timeout=DEADLINE)


def params(content: Any, model: str = "claude-test", **extra: Any) -> dict:
    return {"model": model, "max_tokens": 16,
            "messages": [{"role": "user", "content": content}], **extra}


def req(custom_id: str, content: Any, model: str = "claude-test", **extra: Any) -> dict:
    return {"custom_id": custom_id, "params": params(content, model, **extra)}


def ended(client: anthropic.Anthropic, batch_id: str, timeout: float = DEADLINE) -> Any:
    return eventually(lambda: (b := client.messages.batches.retrieve(batch_id))
                      .processing_status == "ended" and b, timeout, f"batch {batch_id} ended")


def results_of(client: anthropic.Anthropic, batch_id: str) -> list[Any]:
    return list(client.messages.batches.results(batch_id))


def raw_results(srv: ServerThread | Served, key: str, batch: Any) -> list[dict]:
    """The JSONL at `results_url` as sent: exactly one non-blank line per request."""
    url = batch.results_url
    if not url.startswith("http"):
        url = f"{srv.url}/anthropic{url}"  # joined to the SDK's base URL
    got = httpx.get(url, headers={"x-api-key": key, "anthropic-version": VERSION},
                    timeout=DEADLINE)
    assert got.status_code == 200, got.text
    lines = got.text.splitlines()
    assert all(line.strip() for line in lines), f"a blank line in the results: {got.text!r}"
    return [json.loads(line) for line in lines]


def ids(results: list[Any]) -> list[str]:
    return [r.custom_id if not isinstance(r, dict) else r["custom_id"] for r in results]


def counts(batch: Any) -> dict[str, int]:
    c = batch.request_counts
    return {"processing": c.processing, "succeeded": c.succeeded, "errored": c.errored,
            "canceled": c.canceled, "expired": c.expired}


def user_texts(body: Any) -> list[str]:
    messages = (body or {}).get("messages") or []
    return [str(text_of(m.get("content"))) for m in messages
            if isinstance(m, dict) and m.get("role") == "user"]


def from_tenant(upstream: Upstream, prefix: str, path: str | None = None) -> list[dict]:
    """What the upstream received for the requests one of whose user turns starts with
    `prefix` (on `path`, if given)."""
    return [r for r in upstream.snapshot()
            if (path is None or r["path"] == path)
            and any(t.startswith(prefix) for t in user_texts(r["body"]))]


def last_user(record: dict) -> str:
    return user_texts(record["body"])[-1]


def error_shape(exc: anthropic.APIStatusError, kind: str) -> dict:
    body = exc.response.json()
    assert body.get("type") == "error", body
    assert body["error"]["type"] == kind, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


def errored(result: Any) -> tuple[str, str]:
    """(type, message) of an errored result."""
    assert result.result.type == "errored", result
    assert result.result.error.type == "error", result
    return result.result.error.error.type, result.result.error.error.message


def message_of(result: Any) -> dict:
    assert result.result.type == "succeeded", result
    return result.result.message.to_dict()


def seconds(delta: dt.timedelta) -> float:
    return delta.total_seconds()


# -- fixtures ----------


@pytest.fixture(scope="module")
def upstream():
    with Upstream() as up:
        yield up


@pytest.fixture(scope="module")
def ant_server(tmp_path_factory, upstream):
    """Anthropic requests go to the upstream's /v1/messages."""
    srv = ServerThread(str(tmp_path_factory.mktemp("anthropic") / "jobs.db"),
                       anthropic_upstream=upstream.root, anthropic_upstream_key=UPSTREAM_KEY,
                       **OPTIONS)
    yield srv.start()
    srv.stop()


@pytest.fixture(scope="module")
def tr_server(tmp_path_factory, upstream):
    """Only an OpenAI upstream: Anthropic requests are translated to /chat/completions."""
    srv = ServerThread(str(tmp_path_factory.mktemp("translate") / "jobs.db"),
                       openai_upstream=upstream.url, openai_upstream_key=OPENAI_KEY,
                       **OPTIONS)
    yield srv.start()
    srv.stop()


@pytest.fixture
def key(ant_server, tenant) -> str:
    return ant_server.key(tenant)


@pytest.fixture
def ant(ant_server, key):
    with sdk(ant_server, key) as client:
        yield client


@pytest.fixture
def p(tenant) -> str:
    """The prefix of this test's request contents."""
    return f"{tenant}:"


# -- the fake upstream itself ----------


def test_the_fake_upstream_serves_messages_and_honours_chat_stops():
    """The referee's referee: /v1/messages answers by model as tests/upstream.py says, to
    the real SDK; the chat fake honours max_tokens and stop; fast mode serves both."""
    with Upstream(retry_after="1") as up, anthropic.Anthropic(
            base_url=up.root, api_key="sk-ant-x", max_retries=0) as client, openai.OpenAI(
            base_url=up.url, api_key="sk-x", max_retries=0) as chat:
        # (clients closed at the end: a client left to the collector warns in a later test)
        say = [{"role": "user", "content": "hi"}]
        ok = client.messages.with_raw_response.create(model="m", max_tokens=16, messages=say)
        message = ok.parse()
        assert message.id.startswith("msg_") and message.type == "message"
        assert (message.role, message.model, message.stop_reason, message.stop_sequence) == (
            "assistant", "m", "end_turn", None)
        assert [(b.type, b.text) for b in message.content] == [("text", "echo: hi")]
        assert message.usage.input_tokens == 1 and message.usage.output_tokens == 2
        assert ok.headers["request-id"] == up.requests[-1]["request_id"]
        sent = up.requests[-1]
        assert sent["path"] == MESSAGES  # this SDK sends its key as a Bearer token
        assert sent["headers"]["authorization"] == "Bearer sk-ant-x"
        assert sent["headers"]["anthropic-version"]
        assert sent["body"] == {"model": "m", "max_tokens": 16, "messages": say}
        blocks = client.messages.create(model="m", max_tokens=16, messages=[
            {"role": "user", "content": [{"type": "text", "text": "as blocks"}]}])
        assert blocks.content[0].text == "echo: as blocks"
        cut = client.messages.create(model="m", max_tokens=16, stop_sequences=["X"],
                                     messages=[{"role": "user", "content": "a X b"}])
        assert (cut.content[0].text, cut.stop_reason, cut.stop_sequence) == (
            "echo: a ", "stop_sequence", "X")
        short = client.messages.create(model="m", max_tokens=1, messages=say)
        assert (short.content[0].text, short.stop_reason) == ("echo:", "max_tokens")

        with pytest.raises(anthropic.BadRequestError) as bad:
            client.messages.create(model="bad-request", max_tokens=16, messages=say)
        assert bad.value.response.json() == ANTHROPIC_BAD_REQUEST_BODY
        with pytest.raises(anthropic.RateLimitError) as limited:
            client.messages.create(model="rate-limited", max_tokens=16, messages=say)
        assert limited.value.response.headers["retry-after"] == "1"
        assert client.messages.create(model="rate-limited", max_tokens=16, messages=say)
        with pytest.raises(anthropic.InternalServerError) as flaky:
            client.messages.create(model="flaky", max_tokens=16, messages=say)
        assert flaky.value.response.json() == ANTHROPIC_SERVER_ERROR_BODY
        assert client.messages.create(model="flaky", max_tokens=16, messages=say)
        for _ in range(2):
            with pytest.raises(anthropic.InternalServerError):
                client.messages.create(model="always-500", max_tokens=16, messages=say)

        length = chat.chat.completions.create(model="m", max_tokens=1, messages=[
            {"role": "user", "content": "a b c"}])
        assert length.choices[0].finish_reason == "length"
        assert length.choices[0].message.content == "echo:"
        stopped = chat.chat.completions.with_raw_response.create(
            model="m", stop=["NEVER", "STOP"], messages=[
                {"role": "user", "content": "before STOP after"}]).http_response.json()
        [choice] = stopped["choices"]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "STOP")
        assert choice["message"]["content"] == "echo: before "
        assert up.bodies(CHAT)[-1]["stop"] == ["NEVER", "STOP"]
        plain = chat.chat.completions.with_raw_response.create(
            model="m", stop="NEVER", messages=say).http_response.json()["choices"][0]
        assert plain["finish_reason"] == "stop" and "stop_reason" not in plain
        assert up.requests[-1]["reply"]["choices"][0] == plain

        held = client.messages.create  # `slow` is held until release
        up.release.set()
        assert held(model="slow", max_tokens=16, messages=say).content[0].text == "echo: hi"

    with Upstream(fast=True) as fast:
        got = httpx.post(fast.root + MESSAGES, json=params("x"))
        assert got.status_code == 200 and got.headers["request-id"] == "req_fast"
        assert got.json()["type"] == "message" and got.json()["content"][0]["text"] == "ok"
        assert httpx.post(fast.url + "/chat/completions", json={}).json()["object"] == (
            "chat.completion")
        assert httpx.get(fast.root + "/stats").json()["requests"] == 2


# -- a round trip via an Anthropic upstream ----------


def test_a_mixed_batch_round_trip(ant, ant_server, upstream, key, p):
    """Ordinary, bad-request, flaky, rate-limited and always-500 requests in one batch: the
    batch object, counts, result types and order, what the upstream received, and the same
    batch natively."""
    requests = [req("ok-1", f"{p}ok-1"), req("bad", f"{p}bad", "bad-request"),
                req("flaky", f"{p}flaky", "flaky"),
                req("limited", f"{p}limited", "rate-limited"),
                req("down", f"{p}down", "always-500"), req("ok-2", f"{p}ok-2")]
    created = ant.messages.batches.create(requests=requests)
    assert created.id.startswith("msgbatch_") and created.type == "message_batch"
    assert created.processing_status in ("in_progress", "ended")
    assert sum(counts(created).values()) == 6
    assert created.archived_at is None and created.cancel_initiated_at is None
    assert seconds(created.expires_at - created.created_at) == 86400
    if created.processing_status == "in_progress":
        assert created.results_url is None and created.ended_at is None
    batch = ended(ant, created.id)

    assert counts(batch) == {"processing": 0, "succeeded": 4, "errored": 2, "canceled": 0,
                             "expired": 0}
    assert batch.ended_at is not None and batch.created_at <= batch.ended_at
    assert batch.cancel_initiated_at is None and batch.archived_at is None
    assert batch.created_at == created.created_at and batch.expires_at == created.expires_at
    assert batch.results_url.endswith(f"/v1/messages/batches/{batch.id}/results")

    results = results_of(ant, batch.id)
    assert ids(results) == [r["custom_id"] for r in requests]  # request order
    raw = raw_results(ant_server, key, batch)
    assert ids(raw) == ids(results)
    seen = from_tenant(upstream, p)
    by_content: dict[str, list[dict]] = {}
    for record in seen:
        by_content.setdefault(last_user(record), []).append(record)
    for result in results:
        if result.custom_id in ("bad", "down"):
            continue
        message = message_of(result)
        content = f"{p}{result.custom_id}"
        last = by_content[content][-1]
        assert message == last["reply"], "the upstream's Message, as it answered it"
        assert message["type"] == "message" and message["role"] == "assistant"
        assert message["content"] == [{"type": "text", "text": f"echo: {content}"}]
        assert message["stop_reason"] == "end_turn" and message["stop_sequence"] is None
        assert message["id"].startswith("msg_")
    bad = {r.custom_id: r for r in results}["bad"]
    assert errored(bad) == ("invalid_request_error",
                            ANTHROPIC_BAD_REQUEST_BODY["error"]["message"])
    down = {r.custom_id: r for r in results}["down"]
    assert errored(down)[0] == "api_error"
    assert raw[1]["result"]["error"]["error"]["type"] == "invalid_request_error"

    # what the upstream got: each request's params, at /v1/messages, with the operator's key
    # and anthropic-version (never the tenant's key); 400 is final, 500 and 429 retried
    assert {c[len(p):]: len(rs) for c, rs in by_content.items()} == {
        "ok-1": 1, "bad": 1, "flaky": 2, "limited": 2, "down": 3, "ok-2": 1}
    for r in seen:
        assert r["path"] == MESSAGES and r["method"] == "POST"
        assert r["body"] == next(q["params"] for q in requests
                                 if q["params"]["messages"][0]["content"] == last_user(r))
        assert r["headers"]["x-api-key"] == UPSTREAM_KEY
        assert r["headers"]["anthropic-version"] == VERSION
        assert key not in json.dumps(r["headers"])
    first, retry = by_content[f"{p}limited"]
    assert (first["status"], retry["status"]) == (429, 200)
    assert retry["at"] - first["at"] >= 1.0, "the retry came before the 429's Retry-After: 1"
    assert [r["status"] for r in by_content[f"{p}down"]] == [500, 500, 500]

    # the same batch, natively
    with native(ant_server, key) as api:
        got = api.get(f"/v1/batches/{batch.id}")
        assert got.status_code == 200, got.text
        assert (got.json()["kind"], got.json()["dialect"]) == (KIND, "anthropic")
        assert got.json()["metrics"]["total"] == 6


def test_an_unreachable_upstream_ends_errored_with_api_error(db_path):
    srv = ServerThread(db_path, anthropic_upstream=f"http://127.0.0.1:{free_port()}",
                       **OPTIONS).start()
    try:
        with sdk(srv, srv.key("acme")) as client:
            batch = ended(client, client.messages.batches.create(
                requests=[req("a", "nobody home")]).id)
            [result] = results_of(client, batch.id)
    finally:
        srv.stop()
    assert counts(batch)["errored"] == 1
    kind, message = errored(result)
    assert kind == "api_error" and message


# -- translation to an OpenAI upstream ----------


def test_translation_to_chat_completions_round_trip(tr_server, upstream, tenant, p):
    """Only an OpenAI upstream: what each chat body carried, the three stop_reasons, usage,
    an upstream 400, and refused parameters errored with nothing sent for them."""
    key = tr_server.key(tenant)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}
    tool = {"name": "lookup", "description": "look up",
            "input_schema": {"type": "object", "properties": {}}}
    requests = [
        req("plain", f"{p}plain", "gpt-test", system="Be brief.", temperature=0.5,
            top_p=0.9),
        {"custom_id": "blocks", "params": {
            "model": "gpt-test", "max_tokens": 16,
            "system": [{"type": "text", "text": "Sys block."}],
            "messages": [{"role": "user", "content": f"{p}blocks first"},
                         {"role": "assistant", "content": [{"type": "text", "text": "noted"}]},
                         {"role": "user", "content": [{"type": "text",
                                                       "text": f"{p}blocks"}]}]}},
        {"custom_id": "long", "params": {**params(f"{p}long reply here", "gpt-test"),
                                         "max_tokens": 1}},
        req("stopped", f"{p}stopped before STOP after", "gpt-test",
            stop_sequences=["STOP", "HALT"]),
        req("unmatched", f"{p}unmatched", "gpt-test", stop_sequences=["NEVER"]),
        req("bad", f"{p}bad", "bad-request"),
        req("tools", f"{p}refused-tools", "gpt-test", tools=[tool]),
        req("top_k", f"{p}refused-top_k", "gpt-test", top_k=5),
        {"custom_id": "image", "params": params(
            [image, {"type": "text", "text": f"{p}refused-image"}], "gpt-test")},
        req("stream", f"{p}refused-stream", "gpt-test", stream=True),
    ]
    with sdk(tr_server, key) as client:
        batch = ended(client, client.messages.batches.create(requests=requests).id)
        results = {r.custom_id: r for r in results_of(client, batch.id)}
        order = ids(raw_results(tr_server, key, batch))
    with native(tr_server, key) as api:
        got = api.get(f"/v1/batches/{batch.id}").json()
    assert (got["kind"], got["dialect"]) == (KIND, "anthropic")
    assert order == [r["custom_id"] for r in requests]
    assert counts(batch) == {"processing": 0, "succeeded": 5, "errored": 5, "canceled": 0,
                             "expired": 0}

    seen = from_tenant(upstream, p)
    assert all(r["path"] == CHAT for r in seen), [r["path"] for r in seen]
    assert not [r for r in seen if "refused" in json.dumps(r["body"])], \
        "a refused request reached the upstream"
    sent = {last_user(r)[len(p):]: r for r in seen}
    assert sorted(sent) == sorted(["plain", "blocks", "long reply here",
                                   "stopped before STOP after", "unmatched", "bad"])
    for r in seen:
        assert r["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
        assert key not in json.dumps(r["headers"])
        body = r["body"]
        assert not {"system", "stop_sequences", "top_k", "tools"} & set(body), body

    def turns(name: str) -> list[tuple[str, str]]:
        return [(m["role"], text_of(m["content"])) for m in sent[name]["body"]["messages"]]

    plain = sent["plain"]["body"]
    assert plain["model"] == "gpt-test" and plain["max_tokens"] == 16
    assert (plain["temperature"], plain["top_p"]) == (0.5, 0.9)
    assert "stop" not in plain
    assert turns("plain") == [("system", "Be brief."), ("user", f"{p}plain")]
    assert turns("blocks") == [("system", "Sys block."), ("user", f"{p}blocks first"),
                               ("assistant", "noted"), ("user", f"{p}blocks")]
    assert sent["long reply here"]["body"]["max_tokens"] == 1
    assert sent["stopped before STOP after"]["body"]["stop"] == ["STOP", "HALT"]
    assert sent["unmatched"]["body"]["stop"] == ["NEVER"]

    def reply(name: str) -> dict:
        return sent[name]["reply"]

    for custom_id, name, stop_reason, stop_sequence in (
            ("plain", "plain", "end_turn", None), ("blocks", "blocks", "end_turn", None),
            ("long", "long reply here", "max_tokens", None),
            ("stopped", "stopped before STOP after", "stop_sequence", "STOP"),
            ("unmatched", "unmatched", "end_turn", None)):
        message = message_of(results[custom_id])
        answer = reply(name)
        assert message["type"] == "message" and message["role"] == "assistant", message
        assert message["model"] == "gpt-test"
        assert message["content"] == [
            {"type": "text", "text": answer["choices"][0]["message"]["content"]}], message
        assert (message["stop_reason"], message["stop_sequence"]) == (
            stop_reason, stop_sequence), (custom_id, message)
        usage = message["usage"]
        assert (usage["input_tokens"], usage["output_tokens"]) == (
            answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]), usage
    assert message_of(results["stopped"])["content"][0]["text"] == f"echo: {p}stopped before "
    assert message_of(results["long"])["content"][0]["text"] == "echo:"

    assert errored(results["bad"]) == ("invalid_request_error",
                                       BAD_REQUEST_BODY["error"]["message"])
    for name in ("tools", "top_k", "image", "stream"):
        kind, message = errored(results[name])
        assert kind == "invalid_request_error", (name, kind)
        assert name in message, f"{name}: the message does not name it: {message!r}"


# -- list ----------


def test_list_pages_newest_first_with_after_and_before(ant, p):
    made = [ant.messages.batches.create(requests=[req("a", f"{p}{i}")]).id for i in range(5)]
    newest_first = made[::-1]
    raw = ant.messages.batches.with_raw_response.list(limit=2).http_response.json()
    assert [b["id"] for b in raw["data"]] == newest_first[:2]
    assert (raw["first_id"], raw["last_id"], raw["has_more"]) == (
        newest_first[0], newest_first[1], True)
    assert all(b["type"] == "message_batch" for b in raw["data"])
    assert [b.id for b in ant.messages.batches.list(limit=2)] == newest_first  # auto-paging
    after = ant.messages.batches.with_raw_response.list(
        limit=2, after_id=newest_first[3]).http_response.json()
    assert [b["id"] for b in after["data"]] == newest_first[4:]
    assert after["has_more"] is False
    before = ant.messages.batches.with_raw_response.list(
        limit=2, before_id=newest_first[4]).http_response.json()
    assert [b["id"] for b in before["data"]] == newest_first[2:4]
    assert (before["first_id"], before["last_id"], before["has_more"]) == (
        newest_first[2], newest_first[3], True)
    top = ant.messages.batches.with_raw_response.list(
        limit=2, before_id=newest_first[2]).http_response.json()
    assert [b["id"] for b in top["data"]] == newest_first[:2] and top["has_more"] is False
    assert [b.id for b in ant.messages.batches.list()] == newest_first  # default limit 20
    assert [b.id for b in ant.messages.batches.list(limit=1000)] == newest_first
    for bad_limit in (0, 1001):
        with pytest.raises(anthropic.BadRequestError) as refused:
            ant.messages.batches.list(limit=bad_limit)
        error_shape(refused.value, "invalid_request_error")


# -- validation ----------


def _many(p: str) -> list[dict]:
    return [{"custom_id": f"r{i}", "params": {"model": "m"}} for i in range(100_001)]


VALIDATION: dict[str, Callable[[str], list]] = {
    "no_requests": lambda p: [],
    "over_100000": _many,
    "empty_custom_id": lambda p: [req("a", f"{p}a"), req("", f"{p}b")],
    "custom_id_65_chars": lambda p: [req("a", f"{p}a"), req("x" * 65, f"{p}b")],
    "custom_id_space": lambda p: [req("a", f"{p}a"), req("b c", f"{p}b")],
    "custom_id_dot": lambda p: [req("a", f"{p}a"), req("b.c", f"{p}b")],
    "duplicate_custom_id": lambda p: [req("a", f"{p}a"), req("b", f"{p}b"), req("a", f"{p}c")],
    "no_params": lambda p: [req("a", f"{p}a"), {"custom_id": "b"}],
    "params_not_object": lambda p: [req("a", f"{p}a"), {"custom_id": "b", "params": "hi"}],
    "params_a_list": lambda p: [req("a", f"{p}a"), {"custom_id": "b", "params": [1]}],
    "unknown_field": lambda p: [req("a", f"{p}a"), {**req("b", f"{p}b"), "extra": 1}],
}


@pytest.mark.parametrize("case", VALIDATION)
def test_a_bad_create_is_refused_and_writes_nothing(ant, upstream, p, case):
    with pytest.raises(anthropic.BadRequestError) as refused:
        ant.messages.batches.create(requests=VALIDATION[case](p))
    error_shape(refused.value, "invalid_request_error")
    assert ant.messages.batches.list().data == []
    assert from_tenant(upstream, p) == []


def test_a_64_char_custom_id_is_accepted(ant, p):
    custom_id = "A-z_9" * 12 + "abcd"
    assert len(custom_id) == 64
    batch = ended(ant, ant.messages.batches.create(requests=[req(custom_id, f"{p}a")]).id)
    assert ids(results_of(ant, batch.id)) == [custom_id]


def test_errors_come_in_anthropics_shape(ant, ant_server):
    with pytest.raises(anthropic.NotFoundError) as missing:
        ant.messages.batches.retrieve("msgbatch_doesnotexist")
    error_shape(missing.value, "not_found_error")
    for call in (lambda c: c.messages.batches.retrieve("msgbatch_doesnotexist"),
                 lambda c: c.messages.batches.list()):
        with sdk(ant_server, "mb_not_a_key") as bad_key, \
                pytest.raises(anthropic.AuthenticationError) as refused:
            call(bad_key)
        error_shape(refused.value, "authentication_error")


# -- delete, cancel and expiry (a held upstream of their own) ----------


def test_delete_is_refused_until_the_batch_ended(tmp_path):
    with Upstream() as up:
        srv = ServerThread(str(tmp_path / "jobs.db"), anthropic_upstream=up.root,
                           anthropic_upstream_concurrency=1, **OPTIONS).start()
        try:
            with sdk(srv, srv.key("acme")) as client:
                batch = client.messages.batches.create(
                    requests=[req(f"r{i}", f"held {i}", "slow") for i in range(2)])
                eventually(lambda: up.held() == 1, what="one request held upstream")
                with pytest.raises(anthropic.BadRequestError) as early:
                    client.messages.batches.delete(batch.id)
                error_shape(early.value, "invalid_request_error")
                assert client.messages.batches.retrieve(batch.id).processing_status == (
                    "in_progress")
                up.release.set()
                done = ended(client, batch.id)
                assert counts(done)["succeeded"] == 2
                deleted = client.messages.batches.delete(batch.id)
                assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
                for call in (client.messages.batches.retrieve, client.messages.batches.delete,
                             client.messages.batches.results):
                    with pytest.raises(anthropic.NotFoundError) as gone:
                        call(batch.id)
                    error_shape(gone.value, "not_found_error")
                assert client.messages.batches.list().data == []
        finally:
            up.release.set()  # so a failed test does not wait out its held requests
            srv.stop()


def test_cancel_mid_run_finishes_the_running_and_cancels_the_rest(tmp_path):
    with Upstream() as up:
        srv = ServerThread(str(tmp_path / "jobs.db"), anthropic_upstream=up.root,
                           anthropic_upstream_concurrency=2, **OPTIONS).start()
        try:
            with sdk(srv, srv.key("acme")) as client:
                requests = [req(f"r{i}", f"held {i}", "slow") for i in range(8)]
                batch = client.messages.batches.create(requests=requests)
                eventually(lambda: up.held() == 2, what="two requests held upstream")
                canceling = client.messages.batches.cancel(batch.id)
                assert canceling.processing_status == "canceling", canceling
                assert canceling.cancel_initiated_at is not None
                assert canceling.results_url is None
                assert client.messages.batches.retrieve(batch.id).processing_status == (
                    "canceling")
                up.release.set()
                done = ended(client, batch.id)
                results = results_of(client, batch.id)
        finally:
            up.release.set()
            srv.stop()
    assert done.cancel_initiated_at is not None and done.ended_at is not None
    assert done.cancel_initiated_at <= done.ended_at
    assert counts(done) == {"processing": 0, "succeeded": 2, "errored": 0, "canceled": 6,
                            "expired": 0}
    started = [r["body"]["messages"][0]["content"] for r in up.requests]
    assert len(started) == 2, "requests were started after the cancel (or past the cap of 2)"
    assert ids(results) == ids(requests)  # one each, in request order
    ran = [r.custom_id for r in results if r.result.type == "succeeded"]
    assert sorted(f"held {i[1:]}" for i in ran) == sorted(started)
    assert [r.result.type for r in results if r.custom_id not in ran] == ["canceled"] * 6


def test_a_batch_unfinished_at_its_expiry_ends_with_expired_results(tmp_path):
    """A 2 s window and one request held upstream: the two not started end `expired`; the
    held one may finish (succeeded) or be ended with the batch; either way one result."""
    with Upstream() as up:
        srv = ServerThread(str(tmp_path / "jobs.db"), anthropic_upstream=up.root,
                           anthropic_upstream_concurrency=1, completion_window_s=2,
                           **OPTIONS).start()
        try:
            key = srv.key("acme")
            with sdk(srv, key) as client, native(srv, key) as api:
                requests = [req(f"r{i}", f"held {i}", "slow") for i in range(3)]
                batch = client.messages.batches.create(requests=requests)
                assert seconds(batch.expires_at - batch.created_at) == 2
                eventually(lambda: up.held() == 1, what="one request held upstream")

                def expired() -> bool:
                    metrics = api.get(f"/v1/batches/{batch.id}").json()["metrics"]
                    return (client.messages.batches.retrieve(batch.id).processing_status
                            == "ended" or metrics.get("expired", 0) >= 2)

                eventually(expired, what="the batch's unstarted requests expired")
                up.release.set()
                done = ended(client, batch.id)
                results = results_of(client, batch.id)
        finally:
            up.release.set()
            srv.stop()
    assert done.ended_at is not None and done.ended_at >= done.expires_at
    assert len(up.requests) == 1, "a request was started after the batch expired"
    ran = "r" + up.requests[0]["body"]["messages"][0]["content"].split()[1]
    assert ids(results) == ["r0", "r1", "r2"]
    for result in results:
        allowed = ("succeeded", "expired") if result.custom_id == ran else ("expired",)
        assert result.result.type in allowed, result
    c = counts(done)
    assert c["expired"] >= 2 and c["succeeded"] + c["expired"] == 3 and c["processing"] == 0


# -- tenants ----------


def test_another_tenant_sees_none_of_it(ant, ant_server, tenant, p):
    done = ended(ant, ant.messages.batches.create(requests=[req("a", f"{p}a")]).id)
    other_key = ant_server.key(f"{tenant}-other")
    with sdk(ant_server, other_key) as other:
        for call in (other.messages.batches.retrieve, other.messages.batches.cancel,
                     other.messages.batches.delete, other.messages.batches.results):
            with pytest.raises(anthropic.NotFoundError) as hidden:
                call(done.id)
            error_shape(hidden.value, "not_found_error")
        assert other.messages.batches.list().data == []
    direct = httpx.get(f"{ant_server.url}/anthropic/v1/messages/batches/{done.id}/results",
                       headers={"x-api-key": other_key, "anthropic-version": VERSION})
    assert direct.status_code == 404 and direct.json()["error"]["type"] == "not_found_error"
    with native(ant_server, other_key) as api:
        assert api.get(f"/v1/batches/{done.id}").status_code == 404
    assert ant.messages.batches.retrieve(done.id).processing_status == "ended"
    assert ids(results_of(ant, done.id)) == ["a"]  # still there for its owner


# -- kill -9 ----------


def test_kill_9_mid_batch_then_restart_gives_one_result_per_request(tmp_path):
    """`minibatch serve` (upstream set by flags) with six requests answered and four held
    upstream is killed; restarted on the same database (upstream set by MINIBATCH_*
    variables) it finishes the batch: one result per request; an answer stored before the
    kill is not asked for again."""
    env = {"MINIBATCH_RETRY_BASE_S": "0.05", "MINIBATCH_POLL_INTERVAL_S": "0.02",
           "MINIBATCH_LEASE_S": "5"}
    requests = ([req(f"q{i}", f"quick {i}") for i in range(6)]
                + [req(f"s{i}", f"slow {i}", "slow") for i in range(14)])
    with Upstream() as up:
        served = Served(tmp_path, "--anthropic-upstream", up.root, "--anthropic-upstream-key",
                        "sk-served", "--anthropic-upstream-concurrency", "4", env=env)
        key = served.key["api_key"]
        try:
            with sdk(served, key) as client, native(served, key) as api:
                batch = client.messages.batches.create(requests=requests)
                eventually(lambda: up.held() >= 4 and api.get(
                    f"/v1/batches/{batch.id}").json()["metrics"]["succeeded"] == 6,
                    timeout=60, what="six answered and four held")
        finally:
            served.kill()  # -9, with four requests in flight
        up.release.set()
        served = Served(tmp_path, env={**env, "MINIBATCH_ANTHROPIC_UPSTREAM": up.root,
                                       "MINIBATCH_ANTHROPIC_UPSTREAM_KEY": "sk-served",
                                       "MINIBATCH_ANTHROPIC_UPSTREAM_CONCURRENCY": "4"})
        try:
            with sdk(served, key) as client:
                done = ended(client, batch.id, timeout=90)
                results = results_of(client, batch.id)
                raw = raw_results(served, key, done)
        finally:
            served.stop()
    assert counts(done) == {"processing": 0, "succeeded": 20, "errored": 0, "canceled": 0,
                            "expired": 0}, served.log_tail()
    assert ids(results) == ids(requests) == ids(raw)  # each once, in request order
    assert all(r.result.type == "succeeded" for r in results)
    sent = [r["body"]["messages"][0]["content"] for r in up.requests]
    assert all(sent.count(f"quick {i}") == 1 for i in range(6)), sent
    assert {r["headers"]["x-api-key"] for r in up.requests} == {"sk-served"}


# -- the async client ----------


@pytest.mark.anyio
async def test_the_async_client_round_trip(ant_server, key, upstream, p):
    async with sdk(ant_server, key, anthropic.AsyncAnthropic) as client:
        batch = await client.messages.batches.create(
            requests=[req("a", f"{p}a"), req("b", f"{p}b", "flaky")])
        assert batch.id.startswith("msgbatch_")
        with anyio.fail_after(DEADLINE):
            while (batch := await client.messages.batches.retrieve(batch.id)
                   ).processing_status != "ended":
                await anyio.sleep(0.05)
        assert counts(batch)["succeeded"] == 2
        results = [r async for r in await client.messages.batches.results(batch.id)]
        assert ids(results) == ["a", "b"]
        assert [message_of(r)["content"][0]["text"] for r in results] == [
            f"echo: {p}a", f"echo: {p}b"]
        assert [b.id async for b in client.messages.batches.list(limit=1)] == [batch.id]
        deleted = await client.messages.batches.delete(batch.id)
        assert deleted.type == "message_batch_deleted"
    assert len(from_tenant(upstream, p)) == 3  # b's 500 was retried


# -- a Python handler instead of an upstream ----------


def test_a_python_handler_runs_the_requests_when_there_is_no_upstream(db_path):
    srv = ServerThread(db_path, **OPTIONS)
    seen: list[Any] = []

    @srv.mb.anthropic_handler()
    async def reply(item):
        seen.append((type(item), item.input))
        text = item.input["messages"][0]["content"]
        if text == "refuse":
            raise minibatch.Fail("why")
        return {"id": "msg_local", "type": "message", "role": "assistant",
                "model": item.input["model"], "content": [{"type": "text",
                                                           "text": text.upper()}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1}}

    srv.start()
    try:
        with sdk(srv, srv.key("acme")) as client:
            requests = [req("a", "hello"), req("b", "refuse")]
            batch = ended(client, client.messages.batches.create(requests=requests).id)
            results = results_of(client, batch.id)
    finally:
        srv.stop()
    assert callable(minibatch.anthropic_handler)  # the --handlers module form exists too
    assert {kind for kind, _ in seen} == {minibatch.Item}
    assert sorted((body for _, body in seen), key=json.dumps) == sorted(
        (r["params"] for r in requests), key=json.dumps)
    assert counts(batch)["succeeded"] == 1 and counts(batch)["errored"] == 1
    assert ids(results) == ["a", "b"]
    assert message_of(results[0]) == {
        "id": "msg_local", "type": "message", "role": "assistant", "model": "claude-test",
        "content": [{"type": "text", "text": "HELLO"}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}
    kind, message = errored(results[1])
    assert isinstance(kind, str) and kind and isinstance(message, str)
