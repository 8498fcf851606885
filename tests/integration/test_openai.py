"""The OpenAI Batch dialect under `/openai/v1`, refereed by the real `openai` SDK.

Requests run on a fake OpenAI-compatible upstream (tests/upstream.py) whose answer is chosen
by each line's `model`, so one batch mixes outcomes. One server and one upstream serve the
module; a test that needs settings of its own (upstream concurrency, a short completion
window, a held upstream) builds its own. Each test is its own tenant, and the contents of
its lines start with the tenant's name, so what the shared upstream saw can be told apart.

Everything waits on observed state (the batch's status, the upstream's record, a
receiver's requests) with a bounded deadline; no test asserts how fast anything happened,
only that a retry did not come before its `Retry-After`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import openai
import pytest

import minibatch
from tests.conftest import ServerThread
from tests.receiver import Receiver
from tests.serve import Served
from tests.upstream import BAD_REQUEST_BODY, CHAT, SERVER_ERROR_BODY, Upstream

DEADLINE = 30.0
UPSTREAM_KEY = "sk-upstream-operator-key"
TERMINAL = ("completed", "failed", "cancelled", "expired")
OPTIONS = {"retry_base_s": 0.05, "allow_private_webhooks": True,
           "webhook_retry_schedule": "0,0.05,0.05"}


# -- helpers ----------


def eventually(condition: Callable[[], Any], timeout: float = DEADLINE,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not met within {timeout} s"
        time.sleep(0.02)
    return value


def sdk(srv: ServerThread | Served, key: str, cls: type = openai.OpenAI) -> Any:
    return cls(base_url=f"{srv.url}/openai/v1", api_key=key, max_retries=0, timeout=DEADLINE)


def native(srv: ServerThread | Served, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=DEADLINE,
                        headers={"Authorization": f"Bearer {key}"})


def chat_line(custom_id: str, content: str, model: str = "gpt-test") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": model, "messages": [{"role": "user", "content": content}]}}


def jsonl(lines: list[dict | bytes]) -> bytes:
    """One line per entry; a bytes entry is written as it is (a line that is not JSON)."""
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                    for line in lines)


def upload(client: openai.OpenAI, content: bytes | list, filename: str = "in.jsonl") -> Any:
    data = content if isinstance(content, bytes) else jsonl(content)
    return client.files.create(file=(filename, data), purpose="batch")


def create(client: openai.OpenAI, lines: bytes | list, endpoint: str = CHAT, **options: Any
           ) -> Any:
    file = upload(client, lines)
    return client.batches.create(input_file_id=file.id, endpoint=endpoint,
                                 completion_window="24h", **options)


def finished(client: openai.OpenAI, batch_id: str, timeout: float = DEADLINE) -> Any:
    return eventually(lambda: (b := client.batches.retrieve(batch_id)).status in TERMINAL
                      and b, timeout, f"batch {batch_id} terminal")


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def ids(lines: list[dict]) -> list[str]:
    return [line["custom_id"] for line in lines]


def from_tenant(upstream: Upstream, prefix: str) -> list[dict]:
    """What the upstream received for the lines whose content starts with `prefix`."""
    return [r for r in upstream.snapshot()
            if str(((r["body"] or {}).get("messages") or [{}])[0].get("content")
                   or (r["body"] or {}).get("input")).startswith(prefix)]


def error_shape(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# -- fixtures ----------


@pytest.fixture(scope="module")
def upstream():
    with Upstream() as up:
        yield up


@pytest.fixture(scope="module")
def oai_server(tmp_path_factory, upstream):
    srv = ServerThread(str(tmp_path_factory.mktemp("openai") / "jobs.db"),
                       openai_upstream=upstream.url, openai_upstream_key=UPSTREAM_KEY,
                       **OPTIONS)
    yield srv.start()
    srv.stop()


@pytest.fixture
def key(oai_server, tenant) -> str:
    return oai_server.key(tenant)


@pytest.fixture
def oai(oai_server, key):
    with sdk(oai_server, key) as client:
        yield client


@pytest.fixture
def p(tenant) -> str:
    """The prefix of this test's line contents."""
    return f"{tenant}:"


# -- the fake upstream itself ----------


def test_the_fake_upstream_answers_by_model():
    """The referee's referee: each model behaves as tests/upstream.py says, to the SDK."""
    with Upstream(retry_after="1") as up, openai.OpenAI(
            base_url=up.url, api_key="sk-x", max_retries=0) as client:
        say = [{"role": "user", "content": "hi"}]
        ok = client.chat.completions.with_raw_response.create(model="m", messages=say)
        assert ok.parse().choices[0].message.content == "echo: hi"
        assert ok.headers["x-request-id"] == up.requests[-1]["request_id"]
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="bad-request", messages=say)
        assert bad.value.response.json() == BAD_REQUEST_BODY
        for model, first in (("rate-limited", openai.RateLimitError),
                             ("flaky", openai.InternalServerError)):
            with pytest.raises(first) as refused:
                client.chat.completions.create(model=model, messages=say)
            assert client.chat.completions.create(model=model, messages=say).choices
        assert refused.value.response.status_code == 500
        assert client.embeddings.create(model="e", input="x").data[0].embedding
        assert [r["path"] for r in up.requests][-1] == "/v1/embeddings"
        assert up.requests[0]["headers"]["authorization"] == "Bearer sk-x"
        assert up.requests[0]["body"] == {"model": "m", "messages": say}
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="rate-limited", messages=[
                {"role": "user", "content": "other"}])
        assert limited.value.response.headers["retry-after"] == "1"


# -- files ----------


def test_files_upload_retrieve_list_content_and_delete(oai):
    data = jsonl([chat_line("a", "x")]) + b"not json at all\n"  # checked at batch creation
    file = oai.files.create(file=("in.jsonl", data), purpose="batch")
    assert file.id.startswith("file-") and file.object == "file"
    assert (file.purpose, file.bytes, file.filename, file.status) == (
        "batch", len(data), "in.jsonl", "processed")
    assert isinstance(file.created_at, int)
    assert oai.files.retrieve(file.id) == file
    assert file.id in [f.id for f in oai.files.list()]
    assert file.id in [f.id for f in oai.files.list(purpose="batch")]
    assert oai.files.content(file.id).content == data
    deleted = oai.files.delete(file.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (file.id, "file", True)
    with pytest.raises(openai.NotFoundError) as gone:
        oai.files.retrieve(file.id)
    error_shape(gone.value)
    with pytest.raises(openai.NotFoundError):
        oai.files.content(file.id)
    assert file.id not in [f.id for f in oai.files.list()]


# -- a round trip ----------


def test_a_mixed_batch_round_trip(oai, oai_server, upstream, key, p):
    """Ordinary, bad-request, flaky and rate-limited requests in one batch: the files,
    the counts, the order, what the upstream received, and the same batch natively."""
    lines = [chat_line("ok-1", f"{p}ok-1"), chat_line("bad", f"{p}bad", "bad-request"),
             chat_line("flaky", f"{p}flaky", "flaky"),
             chat_line("limited", f"{p}limited", "rate-limited"),
             chat_line("ok-2", f"{p}ok-2")]
    file = upload(oai, lines)
    created = oai.batches.create(input_file_id=file.id, endpoint=CHAT,
                                 completion_window="24h", metadata={"run": "round-trip"})
    assert created.id.startswith("batch_") and created.object == "batch"
    assert created.status in ("validating", "in_progress", "finalizing", "completed")
    batch = finished(oai, created.id)

    assert batch.status == "completed", batch
    assert (batch.endpoint, batch.input_file_id, batch.completion_window) == (
        CHAT, file.id, "24h")
    assert batch.metadata == {"run": "round-trip"}
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (5, 4, 1)
    assert batch.in_progress_at is not None and batch.completed_at is not None
    assert batch.created_at <= batch.in_progress_at <= batch.completed_at
    assert batch.expires_at == batch.created_at + 86400
    assert batch.failed_at is None and batch.cancelled_at is None

    output, errors = lines_of(oai, batch.output_file_id), lines_of(oai, batch.error_file_id)
    assert ids(output) == ["ok-1", "flaky", "limited", "ok-2"]  # input order
    assert ids(errors) == ["bad"]
    assert oai.files.retrieve(batch.output_file_id).purpose == "batch_output"
    seen = from_tenant(upstream, p)
    by_content = {c: [r for r in seen if r["body"]["messages"][0]["content"] == c]
                  for c in {r["body"]["messages"][0]["content"] for r in seen}}
    for line in output:
        assert line["id"].startswith("batch_req_") and line["error"] is None, line
        response = line["response"]
        assert response["status_code"] == 200
        content = f"{p}{line['custom_id']}"
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["message"]["content"] == f"echo: {content}"
        assert response["request_id"] == by_content[content][-1]["request_id"]
    [bad] = errors
    assert bad["id"].startswith("batch_req_") and bad["error"] is None
    assert bad["response"]["status_code"] == 400
    assert bad["response"]["body"] == BAD_REQUEST_BODY  # the upstream's own body
    assert len({line["id"] for line in output + errors}) == 5

    # what the upstream got: each line's body, at /v1/chat/completions, with the operator's
    # key (never the tenant's); 400 is final, 500 and 429 are retried once here
    assert {c[len(p):]: len(rs) for c, rs in by_content.items()} == {
        "ok-1": 1, "bad": 1, "flaky": 2, "limited": 2, "ok-2": 1}
    for r in seen:
        assert r["path"] == CHAT and r["method"] == "POST"
        assert r["body"] == next(line["body"] for line in lines
                                 if line["body"]["messages"][0]["content"]
                                 == r["body"]["messages"][0]["content"])
        assert r["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert key not in json.dumps(r["headers"])
    first, retry = by_content[f"{p}limited"]
    assert (first["status"], retry["status"]) == (429, 200)
    assert retry["at"] - first["at"] >= 1.0, "the retry came before the 429's Retry-After: 1"

    # the same batch, natively
    with native(oai_server, key) as api:
        got = api.get(f"/v1/batches/{batch.id}")
        assert got.status_code == 200, got.text
        assert got.json()["kind"] == "openai:/v1/chat/completions"
        assert got.json()["metrics"]["total"] == 5
        items = api.get(f"/v1/batches/{batch.id}/items")
        assert items.status_code == 200 and len(items.json()["data"]) == 5
        results = api.get(f"/v1/batches/{batch.id}/results")
        assert results.status_code == 200
        assert len([line for line in results.text.splitlines() if line.strip()]) == 5
        deliveries = api.get(f"/v1/batches/{batch.id}/deliveries")
        assert deliveries.status_code == 200 and deliveries.json()["data"] == []

    with pytest.raises(openai.BadRequestError) as ended:  # never 409: the SDK retries it
        oai.batches.cancel(batch.id)
    error_shape(ended.value)


def test_an_embeddings_batch_posts_to_the_upstreams_embeddings_path(oai, upstream, p):
    line = {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "embed-test", "input": f"{p}text"}}
    batch = finished(oai, create(oai, [line], endpoint="/v1/embeddings").id)
    assert batch.status == "completed", batch
    [out] = lines_of(oai, batch.output_file_id)
    assert out["custom_id"] == "e1" and out["response"]["status_code"] == 200
    assert out["response"]["body"]["data"][0]["object"] == "embedding"
    [sent] = from_tenant(upstream, p)
    assert sent["path"] == "/v1/embeddings" and sent["body"] == line["body"]


def test_a_server_error_on_every_attempt_ends_with_the_last_answer(oai, upstream, p):
    """500 is retried up to default_max_attempts (3); then the error line carries the
    upstream's status and body, as a 400 would."""
    batch = finished(oai, create(oai, [chat_line("down", f"{p}down", "always-500"),
                                       chat_line("up", f"{p}up")]).id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    [down] = lines_of(oai, batch.error_file_id)
    assert down["custom_id"] == "down" and down["error"] is None
    assert down["response"]["status_code"] == 500
    assert down["response"]["body"] == SERVER_ERROR_BODY
    assert len([r for r in from_tenant(upstream, p) if r["body"]["model"] == "always-500"]) == 3


def test_a_batch_whose_every_request_got_an_error_is_completed_not_failed(oai, p):
    """OpenAI's `failed` means the file was not a valid batch file (CONTRACT: validating
    -> failed); a batch that ran and got only error answers is `completed`."""
    batch = finished(oai, create(oai, [chat_line("bad", f"{p}bad", "bad-request")]).id)
    assert batch.status == "completed", batch
    assert batch.output_file_id is None  # that file would be empty
    assert ids(lines_of(oai, batch.error_file_id)) == ["bad"]
    assert (batch.request_counts.total, batch.request_counts.failed) == (1, 1)


def test_a_429s_retry_waits_for_the_retry_after_it_names(tmp_path):
    """Retry-After: 2 with a 0.05 s backoff base: the engine reads the header, not a fixed
    second."""
    with Upstream(retry_after="2") as up:
        srv = ServerThread(str(tmp_path / "jobs.db"), openai_upstream=up.url,
                           **OPTIONS).start()
        try:
            with sdk(srv, srv.key("acme")) as client:
                batch = finished(client, create(client, [
                    chat_line("l", "limited", "rate-limited")]).id)
                assert batch.status == "completed", batch
                assert ids(lines_of(client, batch.output_file_id)) == ["l"]
        finally:
            srv.stop()
        first, retry = up.requests
        assert (first["status"], retry["status"]) == (429, 200)
        assert retry["at"] - first["at"] >= 2.0


# -- list ----------


def test_list_pages_newest_first_over_all_the_tenants_batches(oai):
    file = upload(oai, [chat_line("a", "list")])
    made = [oai.batches.create(input_file_id=file.id, endpoint=CHAT,
                               completion_window="24h").id for _ in range(5)]
    newest_first = made[::-1]
    raw = oai.batches.with_raw_response.list(limit=2).http_response.json()
    assert raw["object"] == "list"
    assert [b["id"] for b in raw["data"]] == newest_first[:2]
    assert (raw["first_id"], raw["last_id"], raw["has_more"]) == (
        newest_first[0], newest_first[1], True)
    assert [b.id for b in oai.batches.list(limit=2)] == newest_first  # auto-pagination
    last = oai.batches.with_raw_response.list(limit=2, after=newest_first[3]
                                              ).http_response.json()
    assert [b["id"] for b in last["data"]] == newest_first[4:] and last["has_more"] is False
    assert [b.id for b in oai.batches.list()] == newest_first  # default limit 20
    for bad_limit in (0, 101):
        with pytest.raises(openai.BadRequestError) as refused:
            oai.batches.list(limit=bad_limit)
        error_shape(refused.value)


# -- validation of the input file ----------


def good(p: str, custom_id: str) -> dict:
    return chat_line(custom_id, f"{p}{custom_id}")


def without(line: dict, field: str) -> dict:
    return {k: v for k, v in line.items() if k != field}


VALIDATION = {
    "invalid_json_line": (lambda p: [good(p, "a"), b'{"custom_id": "b", not json'],
                          "invalid_json_line", 2),
    "no_custom_id": (lambda p: [good(p, "a"), without(good(p, "b"), "custom_id")],
                     "missing_required_parameter", 2),
    "no_body": (lambda p: [good(p, "a"), without(good(p, "b"), "body")],
                "missing_required_parameter", 2),
    "method_get": (lambda p: [good(p, "a"), {**good(p, "b"), "method": "GET"}],
                   "missing_required_parameter", 2),
    "duplicate_custom_id": (lambda p: [good(p, "a"), good(p, "b"), good(p, "a")],
                            "duplicate_custom_id", 3),
    "url_mismatch": (lambda p: [good(p, "a"), {**good(p, "b"), "url": "/v1/embeddings"}],
                     "url_mismatch", 2),
    "empty_file": (lambda p: b"", "empty_file", None),
}


@pytest.mark.parametrize("case", VALIDATION)
def test_a_bad_line_fails_the_batch_with_its_code_and_nothing_runs(oai, upstream, p, case):
    build, code, line = VALIDATION[case]
    batch = finished(oai, create(oai, build(p)).id)
    assert batch.status == "failed", batch
    assert batch.failed_at is not None and batch.in_progress_at is None
    assert batch.errors is not None and batch.errors.data, batch
    assert [e.code for e in batch.errors.data] == [code]
    [error] = batch.errors.data
    assert isinstance(error.message, str) and error.message
    if line is not None:
        assert error.line == line
    assert batch.output_file_id is None
    assert from_tenant(upstream, p) == []


def test_every_bad_line_is_named_in_order(oai, upstream, p):
    lines = [good(p, "a"), b"{oops", good(p, "c"), without(good(p, "d"), "custom_id"),
             {**good(p, "e"), "url": "/v1/completions"}]
    batch = finished(oai, create(oai, lines).id)
    assert batch.status == "failed", batch
    assert [(e.code, e.line) for e in batch.errors.data] == [
        ("invalid_json_line", 2), ("missing_required_parameter", 4), ("url_mismatch", 5)]
    assert from_tenant(upstream, p) == []


# -- bad create parameters ----------


@pytest.mark.parametrize("case", ["unknown_endpoint", "window_1h", "unknown_file",
                                  "other_tenants_file"])
def test_a_bad_create_parameter_raises_and_writes_nothing(oai, oai_server, tenant, case):
    file = upload(oai, [chat_line("a", "x")])
    args = {"input_file_id": file.id, "endpoint": CHAT, "completion_window": "24h"}
    expected: type[openai.APIStatusError] = openai.BadRequestError
    if case == "unknown_endpoint":
        args["endpoint"] = "/v1/not-an-endpoint"
    elif case == "window_1h":
        args["completion_window"] = "1h"
    elif case == "unknown_file":
        args["input_file_id"], expected = "file-doesnotexist", openai.NotFoundError
    else:
        with sdk(oai_server, oai_server.key(f"{tenant}-other")) as other:
            args["input_file_id"], expected = upload(other, [chat_line("a", "x")]).id, \
                openai.NotFoundError
    with pytest.raises(expected) as refused:
        oai.batches.create(**args)
    error_shape(refused.value)
    assert oai.batches.list().data == []


def test_a_file_whose_purpose_is_not_batch_is_refused(oai, p):
    done = finished(oai, create(oai, [good(p, "a")]).id)
    assert oai.files.retrieve(done.output_file_id).purpose == "batch_output"
    with pytest.raises(openai.BadRequestError) as refused:
        oai.batches.create(input_file_id=done.output_file_id, endpoint=CHAT,
                           completion_window="24h")
    error_shape(refused.value)
    assert [b.id for b in oai.batches.list()] == [done.id]


# -- idempotency and tenants ----------


def test_an_idempotency_key_replays_the_same_batch(oai, upstream, p):
    file = upload(oai, [good(p, "a")])
    args = {"input_file_id": file.id, "endpoint": CHAT, "completion_window": "24h",
            "extra_headers": {"Idempotency-Key": f"{p}key"}}
    first = oai.batches.create(**args)
    again = oai.batches.create(**args)
    assert again.id == first.id
    assert [b.id for b in oai.batches.list()] == [first.id]
    finished(oai, first.id)
    assert len(from_tenant(upstream, p)) == 1


def test_an_idempotency_key_used_with_another_body_is_422(oai, p):
    """CONTRACT: a used Idempotency-Key with a different body is 422 (409 would be retried
    by the SDK, and means the same key is still in flight)."""
    file = upload(oai, [good(p, "a")])
    args = {"input_file_id": file.id, "endpoint": CHAT, "completion_window": "24h",
            "extra_headers": {"Idempotency-Key": f"{p}key"}}
    first = oai.batches.create(**args)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        oai.batches.create(**{**args, "metadata": {"other": "body"}})
    error_shape(refused.value)
    assert [b.id for b in oai.batches.list()] == [first.id]


def test_another_tenant_sees_none_of_it(oai, oai_server, tenant, p):
    done = finished(oai, create(oai, [good(p, "a"), chat_line("b", f"{p}b", "bad-request")
                                      ]).id)
    endpoint = oai.webhooks.create(name="mine", url="http://127.0.0.1:9/hook",
                                   event_types=["batch.completed"])
    other_key = oai_server.key(f"{tenant}-other")
    with sdk(oai_server, other_key) as other:
        for call in (lambda: other.batches.retrieve(done.id),
                     lambda: other.batches.cancel(done.id),
                     lambda: other.files.retrieve(done.input_file_id),
                     lambda: other.files.content(done.input_file_id),
                     lambda: other.files.content(done.output_file_id),
                     lambda: other.files.content(done.error_file_id),
                     lambda: other.files.delete(done.input_file_id),
                     lambda: other.webhooks.retrieve(endpoint.id),
                     lambda: other.webhooks.delete(endpoint.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        assert other.batches.list().data == [] and other.files.list().data == []
        assert other.webhooks.list().data == []
    with native(oai_server, other_key) as api:
        assert api.get(f"/v1/batches/{done.id}").status_code == 404
    assert oai.batches.retrieve(done.id).status == "completed"  # still there for its owner
    assert oai.files.retrieve(done.input_file_id).id == done.input_file_id


# -- cancel and expiry (a held upstream of their own) ----------


def test_cancel_mid_run_finishes_the_running_and_cancels_the_rest(tmp_path):
    with Upstream() as up:
        srv = ServerThread(str(tmp_path / "jobs.db"), openai_upstream=up.url,
                           openai_upstream_concurrency=2, **OPTIONS).start()
        try:
            with sdk(srv, srv.key("acme")) as client:
                lines = [chat_line(f"r{i}", f"held {i}", "slow") for i in range(8)]
                batch = create(client, lines)
                eventually(lambda: up.held() == 2, what="two requests held upstream")
                cancelling = client.batches.cancel(batch.id)
                assert cancelling.status == "cancelling", cancelling
                assert cancelling.cancelling_at is not None
                assert client.batches.retrieve(batch.id).status == "cancelling"
                up.release.set()
                done = finished(client, batch.id)
                output = lines_of(client, done.output_file_id)
                errors = lines_of(client, done.error_file_id)
                with pytest.raises(openai.BadRequestError) as again:
                    client.batches.cancel(batch.id)
                error_shape(again.value)
        finally:
            up.release.set()  # so a failed test does not wait out its held requests
            srv.stop()
    assert done.status == "cancelled", done
    assert done.cancelled_at is not None and done.cancelling_at is not None
    started = [r["body"]["messages"][0]["content"] for r in up.requests]
    assert len(started) == 2, "requests were started after the cancel (or past the cap of 2)"
    assert sorted(f"held {line['custom_id'][1:]}" for line in output) == sorted(started)
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert len(output) + len(errors) == 8 == done.request_counts.total
    assert ids(errors) == [i for i in ids(lines) if i not in ids(output)]  # input order
    for line in errors:
        assert line["response"] is None, line
        assert line["error"]["code"] == "batch_cancelled" and line["error"]["message"]


def test_a_batch_unfinished_at_its_expiry_ends_expired(tmp_path):
    """A 2 s completion window and one request held upstream: the two not started end
    `batch_expired`. The held one may finish (then it is in the output) or be ended with
    the batch; either way it has one line."""
    with Upstream() as up:
        srv = ServerThread(str(tmp_path / "jobs.db"), openai_upstream=up.url,
                           openai_upstream_concurrency=1, completion_window_s=2,
                           **OPTIONS).start()
        try:
            key = srv.key("acme")
            with sdk(srv, key) as client, native(srv, key) as api:
                lines = [chat_line(f"r{i}", f"held {i}", "slow") for i in range(3)]
                batch = create(client, lines)
                assert batch.expires_at == batch.created_at + 2
                eventually(lambda: up.held() == 1, what="one request held upstream")

                def expired() -> bool:
                    metrics = api.get(f"/v1/batches/{batch.id}").json()["metrics"]
                    return (client.batches.retrieve(batch.id).status == "expired"
                            or metrics.get("expired", 0) >= 2)

                eventually(expired, what="the batch's unstarted requests expired")
                up.release.set()
                done = finished(client, batch.id)
                output = lines_of(client, done.output_file_id)
                errors = lines_of(client, done.error_file_id)
        finally:
            up.release.set()  # so a failed test does not wait out its held requests
            srv.stop()
    assert done.status == "expired", done
    assert done.expired_at is not None and done.expired_at >= done.expires_at
    assert len(up.requests) == 1, "a request was started after the batch expired"
    ran = "r" + up.requests[0]["body"]["messages"][0]["content"].split()[1]
    assert sorted(ids(output) + ids(errors)) == ["r0", "r1", "r2"]
    assert ids(errors) == [i for i in ("r0", "r1", "r2") if i not in ids(output)]
    assert set(ids(output)) <= {ran}
    for line in errors:
        assert line["response"] is None and line["error"]["code"] == "batch_expired", line


# -- webhook endpoints ----------


def test_webhook_endpoints_create_read_update_rotate_test_delete(oai):
    with Receiver() as rx, Receiver(default=400) as refusing:
        made = oai.webhooks.create(name="hooks", url=rx.url, event_types=["batch.completed"])
        assert made.id.startswith("we_") and made.object == "webhook_endpoint"
        assert (made.name, made.url, made.event_types) == ("hooks", rx.url, ["batch.completed"])
        first = made.signing_secret
        assert first.startswith("whsec_")
        shown = oai.webhooks.with_raw_response.retrieve(made.id)
        assert shown.parse().id == made.id and first not in shown.http_response.text
        listed = oai.webhooks.with_raw_response.list()
        assert made.id in [e.id for e in listed.parse().data]
        assert first not in listed.http_response.text

        updated = oai.webhooks.update(made.id, name="renamed",
                                      event_types=["batch.completed", "batch.failed"])
        assert (updated.name, sorted(updated.event_types)) == (
            "renamed", ["batch.completed", "batch.failed"])
        assert oai.webhooks.retrieve(made.id).name == "renamed"

        tested = oai.webhooks.test(made.id, event_type="batch.completed")
        assert (tested.status_code, tested.event_type) == (200, "batch.completed")
        event = oai.webhooks.unwrap(rx.requests[-1]["body"], rx.requests[-1]["headers"],
                                    secret=first)
        assert event.type == "batch.completed" and event.id.startswith("evt_")

        kept = oai.webhooks.rotate_secret(made.id, keep_old_secret_active_for_24_hours=True)
        second = kept.signing_secret
        assert second.startswith("whsec_") and second != first
        oai.webhooks.test(made.id, event_type="batch.completed")
        for secret in (first, second):  # the old one is still kept
            oai.webhooks.unwrap(rx.requests[-1]["body"], rx.requests[-1]["headers"],
                                secret=secret)
        third = oai.webhooks.rotate_secret(made.id).signing_secret  # the old ones end now
        oai.webhooks.test(made.id, event_type="batch.failed")
        body, headers = rx.requests[-1]["body"], rx.requests[-1]["headers"]
        assert oai.webhooks.unwrap(body, headers, secret=third).type == "batch.failed"
        for secret in (first, second):
            with pytest.raises(openai.InvalidWebhookSignatureError):
                oai.webhooks.unwrap(body, headers, secret=secret)

        other = oai.webhooks.create(name="refusing", url=refusing.url,
                                    event_types=["batch.completed"])
        assert oai.webhooks.test(other.id, event_type="batch.completed").status_code == 400

        deleted = oai.webhooks.delete(made.id)
        assert (deleted.id, deleted.deleted) == (made.id, True)
        with pytest.raises(openai.NotFoundError) as gone:
            oai.webhooks.retrieve(made.id)
        error_shape(gone.value)
        assert [e.id for e in oai.webhooks.list()] == [other.id]


def test_a_batchs_end_reaches_each_matching_endpoint_signed(oai, oai_server, key, p):
    """Endpoints are the tenant's: one for batch.completed, one for batch.failed. Each
    batch's end goes to the one that asked for it, in OpenAI's event shape, openable with
    the SDK's unwrap, and shows in the batch's deliveries with that endpoint's id."""
    with Receiver() as on_completed, Receiver() as on_failed:
        done_ep = oai.webhooks.create(name="done", url=on_completed.url,
                                      event_types=["batch.completed"])
        failed_ep = oai.webhooks.create(name="failed", url=on_failed.url,
                                        event_types=["batch.failed"])
        done = finished(oai, create(oai, [good(p, "a")]).id)
        failed = finished(oai, create(oai, b"{not json\n").id)
        assert (done.status, failed.status) == ("completed", "failed")
        eventually(lambda: len(on_completed.requests) >= 1 and len(on_failed.requests) >= 1,
                   what="both receivers got an event")
        with native(oai_server, key) as api:
            deliveries = {b.id: api.get(f"/v1/batches/{b.id}/deliveries").json()["data"]
                          for b in (done, failed)}
    for rx, ep, batch, kind in ((on_completed, done_ep, done, "batch.completed"),
                                (on_failed, failed_ep, failed, "batch.failed")):
        [request] = rx.requests
        event = oai.webhooks.unwrap(request["body"], request["headers"],
                                    secret=ep.signing_secret)
        assert event.type == kind and event.data.id == batch.id
        assert event.id.startswith("evt_") and event.object == "event"
        assert isinstance(event.created_at, int)
        raw = json.loads(request["body"])
        assert set(raw) >= {"id", "object", "type", "created_at", "data"}
        [delivery] = deliveries[batch.id]
        assert delivery["endpoint_id"] == ep.id, delivery


# -- kill -9 ----------


def test_kill_9_mid_batch_then_restart_gives_one_line_per_request(tmp_path):
    """`minibatch serve` (upstream set by flags) with six requests answered and four held
    upstream (the rest queued) is killed; restarted on the same database (upstream set by
    MINIBATCH_* variables) it finishes the batch: one line per request. A request whose
    answer was stored before the kill is not sent again."""
    env = {"MINIBATCH_RETRY_BASE_S": "0.05", "MINIBATCH_POLL_INTERVAL_S": "0.02",
           "MINIBATCH_LEASE_S": "5"}
    lines = ([chat_line(f"q{i}", f"quick {i}") for i in range(6)]
             + [chat_line(f"s{i}", f"slow {i}", "slow") for i in range(14)])
    with Upstream() as up:
        served = Served(tmp_path, "--openai-upstream", up.url, "--openai-upstream-key",
                        "sk-served", "--openai-upstream-concurrency", "4", env=env)
        key = served.key["api_key"]
        try:
            with sdk(served, key) as client, native(served, key) as api:
                batch = create(client, lines)
                eventually(lambda: up.held() >= 4 and api.get(
                    f"/v1/batches/{batch.id}").json()["metrics"]["succeeded"] == 6,
                    timeout=60, what="six answered and four held")
        finally:
            served.kill()  # -9, with four requests in flight
        up.release.set()  # the restarted server's requests are answered at once
        served = Served(tmp_path, env={**env, "MINIBATCH_OPENAI_UPSTREAM": up.url,
                                       "MINIBATCH_OPENAI_UPSTREAM_KEY": "sk-served",
                                       "MINIBATCH_OPENAI_UPSTREAM_CONCURRENCY": "4"})
        try:
            with sdk(served, key) as client:
                done = finished(client, batch.id, timeout=90)
                output = lines_of(client, done.output_file_id)
                errors = lines_of(client, done.error_file_id)
        finally:
            served.stop()
    assert done.status == "completed", (done, served.log_tail())
    assert errors == [] and ids(output) == ids(lines)  # each once, in input order
    assert len({line["id"] for line in output}) == 20
    assert done.request_counts.total == done.request_counts.completed == 20
    sent = [r["body"]["messages"][0]["content"] for r in up.requests]
    assert all(sent.count(f"quick {i}") == 1 for i in range(6)), sent
    assert {r["headers"]["authorization"] for r in up.requests} == {"Bearer sk-served"}


# -- the async client ----------


@pytest.mark.anyio
async def test_the_async_client_round_trip(oai_server, key, upstream, p):
    async with sdk(oai_server, key, openai.AsyncOpenAI) as client:
        file = await client.files.create(
            file=("in.jsonl", jsonl([good(p, "a"), chat_line("b", f"{p}b", "flaky")])),
            purpose="batch")
        batch = await client.batches.create(input_file_id=file.id, endpoint=CHAT,
                                            completion_window="24h")
        with anyio.fail_after(DEADLINE):
            while (batch := await client.batches.retrieve(batch.id)).status not in TERMINAL:
                await anyio.sleep(0.05)
        assert batch.status == "completed", batch
        text = (await client.files.content(batch.output_file_id)).text
        output = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert ids(output) == ["a", "b"] and batch.error_file_id is None
        assert [b.id async for b in client.batches.list(limit=1)] == [batch.id]
    assert len(from_tenant(upstream, p)) == 3  # b's 500 was retried


# -- a Python handler instead of an upstream ----------


def test_a_python_handler_runs_the_requests_when_there_is_no_upstream(db_path):
    srv = ServerThread(db_path, **OPTIONS)
    bodies: list[Any] = []

    @srv.mb.openai_handler(CHAT)
    async def reply(item):
        bodies.append((type(item), item.input))
        content = item.input["messages"][0]["content"]
        if content == "refuse":
            raise minibatch.Fail("why")
        return {"object": "chat.completion", "answer": content.upper()}

    srv.start()
    try:
        with sdk(srv, srv.key("acme")) as client:
            lines = [chat_line("a", "hello"), chat_line("b", "refuse")]
            batch = finished(client, create(client, lines).id)
            output = lines_of(client, batch.output_file_id)
            errors = lines_of(client, batch.error_file_id)
    finally:
        srv.stop()
    assert batch.status == "completed", batch
    assert {kind for kind, _ in bodies} == {minibatch.Item}
    assert sorted((body for _, body in bodies), key=json.dumps) == sorted(
        (line["body"] for line in lines), key=json.dumps)
    [out] = output
    assert out["custom_id"] == "a" and out["error"] is None
    assert out["response"]["status_code"] == 200
    assert out["response"]["body"] == {"object": "chat.completion", "answer": "HELLO"}
    [err] = errors
    assert err["custom_id"] == "b" and err["response"] is None
    assert err["error"]["code"] == "request_failed"
