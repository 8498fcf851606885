"""What a hostile client gets from the HTTP API: clear refusals that change nothing,
bounded responses, and no request that can hold the event loop or open a route."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time

import httpx
import pytest

import minibatch
from minibatch.api import ENDPOINTS
from minibatch.errors import InvalidInput
from tests.integration.test_api import assert_problem, wait_terminal

HUGE_INT = "1" + "0" * 5000


# -- input the runner could not decode is refused at the door ----------


@pytest.mark.parametrize("line", [b'{"input": 1e400}', b'{"input": -1e400}',
                                  b'{"input": ' + HUGE_INT.encode() + b'}',
                                  b'{"input": 1, "metadata": {"x": 1e999}}',
                                  b'{"input": "\xff"}'])
def test_a_file_line_the_runner_could_not_decode_is_refused_naming_the_line(
        client, server, tenant, line):
    problem = assert_problem(client.post("/v1/files", content=b'{"input": 1}\n' + line), 422)
    assert [e["line"] for e in problem["errors"]] == [2]
    assert server.stored(tenant) == (0, 0, 0)


@pytest.mark.parametrize("value", ["1e400", HUGE_INT])
def test_an_inline_input_the_runner_could_not_decode_is_refused_naming_the_field(
        client, server, tenant, value):
    body = '{"kind": "echo", "items": [{"input": 1}, {"input": ' + value + "}]}"
    problem = assert_problem(client.post("/v1/batches", content=body,
                                         headers={"content-type": "application/json"}), 422)
    assert problem["errors"][0]["field"].startswith("items[1]")
    assert server.stored(tenant) == (0, 0, 0)


@pytest.mark.anyio
async def test_the_python_api_refuses_what_it_cannot_store(mb):
    @mb.handler("echo")
    async def echo(item):
        return item.input

    with pytest.raises(InvalidInput):
        await mb.submit("echo", [{"input": 10 ** 5000}])
    with pytest.raises(InvalidInput):
        await mb.submit("echo", [{"input": 1}], metadata={"n": 10 ** 5000})
    deep: dict = {}
    for _ in range(200):
        deep = {"d": deep}
    with pytest.raises(InvalidInput):
        await mb.submit("echo", [{"input": 1}], metadata=deep)
    assert mb.store._one("SELECT count(*) FROM batches")[0] == 0


def test_batch_metadata_deeper_than_128_levels_is_refused(client, server, tenant):
    body = '{"kind": "echo", "items": [{"input": 1}], "metadata": %s}' % (
        '{"a":' * 200 + "1" + "}" * 200)
    assert_problem(client.post("/v1/batches", content=body,
                               headers={"content-type": "application/json"}), 422, "metadata")
    assert server.stored(tenant) == (0, 0, 0)


# -- uploads are stored without holding the loop ----------


def test_health_answers_while_a_big_upload_is_parsed_and_stored(tmp_path):
    """A 6 MiB file of 520k tiny lines takes a second or more to validate and store;
    /healthz must keep answering during that time, not after it (before the fix it froze:
    one answer, after the upload)."""
    from tests.conftest import ServerThread

    server = ServerThread(str(tmp_path / "big.db"), max_file_bytes=32 * 1024 * 1024).start()
    data = b'{"input":1}\n' * (6 * 1024 * 1024 // 12)
    done = threading.Event()
    outcome: list[httpx.Response] = []
    answered_during_upload = 0

    def upload() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=300,
                              headers={"x-api-key": server.key("a")}) as c:
                outcome.append(c.post("/v1/files", content=data))
        finally:
            done.set()

    try:
        thread = threading.Thread(target=upload)
        thread.start()
        while not done.is_set():
            httpx.get(server.url + "/healthz", timeout=60)
            answered_during_upload += not done.is_set()
        thread.join()
    finally:
        server.stop()
    assert outcome[0].status_code == 201, outcome[0].text
    assert outcome[0].json()["lines"] == len(data) // 12
    assert answered_during_upload >= 5


# -- secrets, pages, numbers ----------


def test_rotation_keeps_at_most_one_previous_secret_and_caps_the_overlap(
        client, server, tenant):
    for _ in range(20):
        rotated = client.post("/v1/webhook-secret/rotate", json={"overlap_s": 3600})
        assert rotated.status_code == 200, rotated.text
    active = server.mb.store.secrets_active(tenant, time.time())
    assert len(active) == 2 and active[0][0] == rotated.json()["secret_id"]
    assert active[1][0] == rotated.json()["previous_secret_id"]
    assert_problem(client.post("/v1/webhook-secret/rotate",
                               json={"overlap_s": 7 * 86400 + 1}), 422, "overlap_s")
    with pytest.raises(InvalidInput):
        server.mb.rotate_secret(tenant, overlap_s=8 * 86400)


def test_deliveries_are_paged_oldest_first(client, server):
    from tests.receiver import Receiver

    with Receiver() as rx:
        batch = client.post("/v1/batches", json={
            "kind": "echo", "items": [{"input": i} for i in range(250)],
            "webhook": {"url": rx.url, "events": ["item.succeeded", "batch.completed"]}}).json()
        wait_terminal(client, batch["id"])
        seen, after = [], None
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            page = client.get(f"/v1/batches/{batch['id']}/deliveries", params=params).json()
            assert len(page["data"]) <= 100
            seen += page["data"]
            if not page["has_more"]:
                assert page["next_cursor"] is None
                break
            after = page["next_cursor"]
            assert after == page["data"][-1]["id"]
    assert len(seen) == 251 and len({d["id"] for d in seen}) == 251
    assert [d["event"] for d in seen][-1] == "batch.completed"
    assert [d["created_at"] for d in seen] == sorted(d["created_at"] for d in seen)
    default = client.get(f"/v1/batches/{batch['id']}/deliveries").json()
    assert len(default["data"]) == 100 and default["has_more"]
    url = f"/v1/batches/{batch['id']}/deliveries"
    assert_problem(client.get(url, params={"limit": 1001}), 422, "limit")
    assert_problem(client.get(url, params={"after": "msg_nope"}), 422, "after")


@pytest.mark.parametrize("query", [{"limit": HUGE_INT}, {"after": HUGE_INT},
                                   {"limit": "9" * 19}])
def test_query_numbers_of_any_length_are_422(client, query):
    batch = client.post("/v1/batches", json={"kind": "echo", "items": [{"input": 1}]}).json()
    field = next(iter(query))
    assert_problem(client.get(f"/v1/batches/{batch['id']}/items", params=query), 422, field)
    if field == "limit":
        assert_problem(client.get("/v1/batches", params=query), 422, field)


# -- bounds on what a request may name ----------


def test_a_long_webhook_url_and_a_long_entry_id_are_refused(client, server):
    long_url = "https://hooks.example/" + "a" * 100_000
    assert_problem(client.post("/v1/batches", json={
        "kind": "echo", "items": [{"input": 1}], "webhook": {"url": long_url}}), 422,
        "webhook.url")
    assert_problem(client.post("/v1/batches", json={
        "kind": "echo", "items": [{"input": 1, "entry_id": "e" * 257}]}), 422,
        "items[0].entry_id")
    problem = assert_problem(client.post("/v1/files", content=b'{"input": 1, "entry_id": "%s"}'
                                         % (b"e" * 257)), 422)
    assert problem["errors"][0]["line"] == 1
    ok = client.post("/v1/batches", json={"kind": "echo",
                                          "items": [{"input": 1, "entry_id": "e" * 256}]})
    assert ok.status_code == 201, ok.text


def test_two_different_keys_in_one_request_are_401_and_every_401_asks_for_bearer(
        server, tenant):
    key_a, key_b = server.key(tenant + "-a"), server.key(tenant + "-b")
    both = httpx.get(server.url + "/v1/batches", headers={
        "Authorization": f"Bearer {key_a}", "x-api-key": key_b})
    assert both.status_code == 401 and both.headers["www-authenticate"] == "Bearer"
    same = httpx.get(server.url + "/v1/batches", headers={
        "Authorization": f"Bearer {key_a}", "x-api-key": key_a})
    assert same.status_code == 200
    for headers in ({}, {"x-api-key": "nope"}, {"Authorization": "Bearer nope"}):
        r = httpx.get(server.url + "/v1/batches", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_every_route_but_the_public_three_needs_a_key(server):
    """Authentication is the route's default: a new endpoint that forgets it is closed."""
    public = {e.path for e in ENDPOINTS if not e.auth}
    assert public == {"/healthz", "/metrics", "/openapi.json"}
    for e in ENDPOINTS:
        if e.auth:
            path = re.sub(r"\{[^}]+\}", "x", e.path)
            r = httpx.request(e.method, server.url + path)
            assert r.status_code == 401, (e.method, e.path, r.status_code)


def test_multipart_idempotency_covers_the_file_name_too(client, server, tenant):
    headers = {"Idempotency-Key": "upload-1"}
    first = client.post("/v1/files", files={"file": ("a.jsonl", b'{"input": 1}\n')},
                        headers=headers)
    assert first.status_code == 201
    replay = client.post("/v1/files", files={"file": ("a.jsonl", b'{"input": 1}\n')},
                         headers=headers)
    assert replay.status_code == 201 and replay.content == first.content
    assert replay.headers["idempotent-replayed"] == "true"
    renamed = client.post("/v1/files", files={"file": ("b.jsonl", b'{"input": 1}\n')},
                          headers=headers)
    assert_problem(renamed, 422, "Idempotency-Key")
    assert server.stored(tenant)[0] == 1


def test_a_client_that_hangs_up_mid_body_is_one_log_line(server, tenant, caplog):
    caplog.set_level(logging.INFO)
    key = server.key(tenant)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/batches HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                     b"\r\nx-api-key: " + key.encode() + b"\r\ncontent-length: 1000\r\n\r\n{")
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while not any("disconnected" in (m := r.getMessage()) and "POST /v1/batches" in m
                  for r in caplog.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.02)
    time.sleep(0.2)  # anything else logged for that request would be in by now
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert httpx.get(server.url + "/healthz").status_code == 200


@pytest.mark.parametrize("setting", ["retry_base_s", "retry_cap_s", "shutdown_grace_s",
                                     "lease_s", "request_timeout_s", "webhook_timeout_s"])
def test_every_setting_refuses_nan_and_infinity(db_path, setting):
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(InvalidInput, match=setting):
            minibatch.Minibatch(db_path, **{setting: bad})


def test_a_batch_lists_only_its_newest_failed_webhooks(client, server):
    """20k failing item events must not make every GET of the batch 20k entries long."""
    from tests.receiver import Receiver

    with Receiver(default=500) as rx:
        batch = client.post("/v1/batches", json={
            "kind": "echo", "items": [{"input": i} for i in range(60)],
            "webhook": {"url": rx.url, "events": ["item.succeeded"]}}).json()
        wait_terminal(client, batch["id"])
        deadline = time.monotonic() + 30
        while (got := client.get(f"/v1/batches/{batch['id']}").json())[
                "deliveries"]["pending"]:
            assert time.monotonic() < deadline, got["deliveries"]
            time.sleep(0.05)
    assert got["deliveries"]["failed"] == 60
    shown = [w["delivery_id"] for w in got["failed_webhooks"]]
    every = client.get(f"/v1/batches/{batch['id']}/deliveries").json()["data"]
    assert shown == [d["id"] for d in every][-20:]


@pytest.mark.anyio
async def test_the_webhook_loops_survive_an_unexpected_error(db_path, monkeypatch):
    """One failing pass of the deliverer's claimer, or of the recorder, is logged and the
    next pass goes on: the webhook is still delivered and recorded."""
    import anyio

    from tests.receiver import Receiver

    mb = minibatch.Minibatch(db_path, allow_private_webhooks=True, poll_interval_s=0.02,
                             webhook_retry_schedule="0")

    @mb.handler("echo")
    async def echo(item):
        return item.input

    for method in ("deliveries_claim", "deliveries_record"):
        real = getattr(mb.store, method)
        calls = {"n": 0}

        def once(*args, _real=real, _calls=calls, **kwargs):
            _calls["n"] += 1
            if _calls["n"] == 1:
                raise RuntimeError("a surprise")
            return _real(*args, **kwargs)

        monkeypatch.setattr(mb.store, method, once)
    with Receiver() as rx:
        async with mb:
            batch = await mb.submit("echo", [{"input": 1}], webhook={"url": rx.url})
            with anyio.fail_after(30):
                while not (ds := await mb.deliveries(batch.id)) or ds[0].status != "succeeded":
                    await anyio.sleep(0.02)
    mb.close()
    assert len(rx.requests) >= 1 and ds[0].attempts[-1].status_code == 200


def test_a_key_is_in_flight_while_the_first_body_is_still_arriving(client, server):
    """The second request with a key gets 409 even before the first one's body is in.

    The first request's head is sent, then part of its body; the second goes on another
    connection. Should the second be routed before the first (nothing orders two
    connections), that try is dropped and another key tried: only a server that lets
    the second through every time fails."""
    body = b'{"input": 1}\n'
    api_key = client.headers["authorization"].split()[1].encode()
    for attempt in range(10):
        key = f"slow-{attempt}"
        head = (b"POST /v1/files HTTP/1.1\r\nhost: x\r\nidempotency-key: " + key.encode()
                + b"\r\ncontent-type: application/jsonl\r\nx-api-key: " + api_key
                + b"\r\ncontent-length: %d\r\n\r\n" % len(body))
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head + body[:5])
            time.sleep(0.05)
            second = client.post("/v1/files", content=body, headers={"Idempotency-Key": key})
            if second.status_code != 409:
                assert second.status_code == 201, second.text
                continue
            sock.sendall(body[5:])
            first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 201"), first
        replay = client.post("/v1/files", content=body, headers={"Idempotency-Key": key})
        assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
        return
    pytest.fail("the second request was never refused while the first was in flight")


@pytest.mark.anyio
async def test_after_a_410_no_other_pending_delivery_to_that_url_is_sent(db_path):
    """One delivery at a time: after the first 410, the batch's other deliveries to that
    URL end without an attempt. (The deliverer also records what it has before each
    claim, for the case this does not reproduce: a claim between a 410 and its record.)"""
    import anyio

    from tests.receiver import Receiver

    mb = minibatch.Minibatch(db_path, allow_private_webhooks=True, poll_interval_s=0.02,
                             webhook_concurrency=1, webhook_retry_schedule="0,0.05")

    @mb.handler("echo")
    async def echo(item):
        return item.input

    with Receiver(default=410) as rx:
        async with mb:
            batch = await mb.submit("echo", [{"input": i} for i in range(5)], webhook={
                "url": rx.url, "events": ["item.succeeded", "batch.completed"]})
            with anyio.fail_after(30):
                await mb.wait(batch.id)
                ds = await mb.deliveries(batch.id)
                while any(d.status == "pending" for d in ds):
                    await anyio.sleep(0.02)
                    ds = await mb.deliveries(batch.id)
    mb.close()
    assert len(rx.requests) == 1
    assert [d.failure_reason_code for d in ds] == ["endpoint_gone"] * len(ds)
    assert sum(d.attempt_count for d in ds) == 1
