"""Contract points no other test pinned down, each checked the way a user would see it:
defaults, one start per item past its lease, the events a receiver gets, the shown
webhook URL, 413 before the whole body, idempotent uploads, the items filter, lazy
`submit`, and an item's `next_attempt_at`.

Each waits on observed state with generous deadlines (DEADLINE) and never asserts how
fast anything happened, so a slow machine passes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime

import anyio
import httpx
import pytest
from standardwebhooks.webhooks import Webhook

import minibatch
from minibatch.config import Settings
from minibatch.store.batches import CHUNK
from tests.conftest import ServerThread
from tests.receiver import Receiver

DEADLINE = 20.0
MiB = 1024 * 1024


def eventually(condition: Callable[[], object], timeout: float = DEADLINE) -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return value


async def until(condition: Callable[[], object], timeout: float = DEADLINE) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


def api(srv: ServerThread, tenant: str = "acme") -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=DEADLINE,
                        headers={"Authorization": f"Bearer {srv.key(tenant)}"})


def terminal(client: httpx.Client, batch_id: str) -> dict:
    return eventually(lambda: (b := client.get(f"/v1/batches/{batch_id}").json())["status"]
                      in ("completed", "failed", "cancelled") and b)


# -- defaults ----------


def test_settings_carry_every_default_the_contract_names():
    s = Settings()
    assert s.default_max_attempts == 3
    assert (s.retry_base_s, s.retry_cap_s) == (1.0, 60.0)
    assert s.lease_s == 30.0
    assert s.webhook_timeout_s == 15.0
    assert s.webhook_retry_schedule == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert (s.max_json_bytes, s.max_file_bytes) == (10 * MiB, 100 * MiB)
    assert minibatch.Minibatch(":memory:").settings == Settings(db=":memory:")


@pytest.mark.anyio
async def test_a_handler_without_max_attempts_gets_three_tries_a_second_apart(db_path):
    mb = minibatch.Minibatch(db_path, poll_interval_s=0.02)  # every other setting default
    clock = [1_000_000.0]
    mb.now = lambda: clock[0]
    tries: list[int] = []

    @mb.handler("never")
    async def never(item):
        tries.append(item.attempt)
        raise RuntimeError("no")

    async with mb:
        batch = await mb.submit("never", [{"input": 1}])
        for n in (1, 2):
            await until(lambda n=n: (i := items(mb, batch.id)[0]).attempts == n
                        and i.status == "queued")
            wait = items(mb, batch.id)[0].next_attempt_at.timestamp() - clock[0]
            assert 0.8 * 2 ** (n - 1) - 1e-6 <= wait <= 1.2 * 2 ** (n - 1) + 1e-6
            clock[0] += wait + 0.01
        done = await mb.wait(batch.id, timeout=DEADLINE)
        assert mb.deliverer.session.timeout.total == 15.0
    assert tries == [1, 2, 3] and done.status == "failed"
    mb.close()


def items(mb: minibatch.Minibatch, batch_id: str) -> list:
    return mb.store.items_page(batch_id, None, status=None, limit=1000, after=-1)[0]


def test_the_default_size_limits_answer_413_and_let_10_mib_of_json_in(db_path):
    srv = ServerThread(db_path).start()  # the default limits
    try:
        with api(srv) as client:
            for path, limit in (("/v1/batches", 10 * MiB), ("/v1/files", 100 * MiB)):
                with socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE) as s:
                    s.sendall(request_head(srv, path, "application/json",
                                           f"content-length: {limit + 1}"))
                    assert status_of(s) == 413, path
            padding = 10 * MiB - 200
            body = json.dumps({"kind": "echo", "items": [{"input": "x" * padding}]})
            assert len(body) <= 10 * MiB
            assert client.post("/v1/batches", content=body,
                               headers={"content-type": "application/json"}).status_code == 201
    finally:
        srv.stop()


# -- a handler running past its lease ----------


@pytest.mark.anyio
async def test_a_handler_running_past_its_lease_is_started_once(db_path):
    """Two instances on one database, as two processes would be: the second one's
    rescuer takes any item whose lease lapses. The heartbeat must keep it."""
    lease = 1.0
    starts: list[tuple[str, int]] = []

    def instance(name: str) -> minibatch.Minibatch:
        mb = minibatch.Minibatch(db_path, lease_s=lease, poll_interval_s=0.02)

        @mb.handler("long")
        async def long(item):
            starts.append((name, item.attempt))
            await anyio.sleep(lease * 3.5)
            return "done"

        return mb

    first, second = instance("first"), instance("second")
    async with first, second:
        batch = await first.submit("long", [{"input": 1}])
        done = await first.wait(batch.id, timeout=DEADLINE)
        results = [r async for r in first.results(batch.id)]
    assert len(starts) == 1, starts
    assert done.status == "completed"
    assert [(r.status, r.attempts) for r in results] == [("succeeded", 1)]
    first.close()
    second.close()


# -- events to a real receiver ----------


@pytest.mark.anyio
async def test_item_failed_and_batch_cancelled_reach_the_receiver_signed(db_path):
    mb = minibatch.Minibatch(db_path, allow_private_webhooks=True, poll_interval_s=0.02,
                             webhook_retry_schedule="0,0.05")

    @mb.handler("k", max_attempts=1)
    async def k(item):
        if item.input == "fail":
            raise minibatch.Fail("asked to fail")
        await anyio.sleep_forever()  # until its batch is cancelled

    with Receiver() as rx:
        async with mb:
            batch = await mb.submit("k", [{"input": "fail", "entry_id": "f"},
                                          {"input": "hold", "entry_id": "h"}],
                                    webhook={"url": rx.url,
                                             "events": ["item.failed", "batch.cancelled"]})
            await until(lambda: (b := mb.store.batch_get(batch.id)).metrics.failed == 1
                        and b.metrics.running == 1)
            await mb.cancel(batch.id)
            done = await mb.wait(batch.id, timeout=DEADLINE)
            await until(lambda: len(rx.requests) == 2)
            deliveries = await mb.deliveries(batch.id)
    assert done.status == "cancelled"
    bodies = [Webhook(mb.webhook_secret()).verify(r["body"], r["headers"])
              for r in rx.requests]
    # Both may be due in one claim of the deliverer and sent at once: arrival order is
    # not the order of the events.
    bodies.sort(key=lambda b: b["type"] != "item.failed")
    assert [b["type"] for b in bodies] == ["item.failed", "batch.cancelled"]
    failed, cancelled = bodies
    assert failed["data"]["object"] == "item" and failed["data"]["entry_id"] == "f"
    assert failed["data"]["status"] == "failed"
    assert failed["data"]["error"]["message"] == "asked to fail"
    assert cancelled["data"]["id"] == batch.id and cancelled["data"]["status"] == "cancelled"
    assert cancelled["data"]["metrics"]["cancelled"] == 1
    assert [d.event for d in deliveries] == ["item.failed", "batch.cancelled"]
    mb.close()


@pytest.mark.anyio
async def test_an_events_list_without_the_batchs_final_event_sends_none(db_path):
    mb = minibatch.Minibatch(db_path, allow_private_webhooks=True, poll_interval_s=0.02)
    release = anyio.Event()

    @mb.handler("k")
    async def k(item):
        if item.input == "hold":
            await release.wait()
        return item.input

    with Receiver() as rx:
        async with mb:
            # cancelled, but only batch.completed asked for
            cancelled = await mb.submit("k", [{"input": "hold"}], webhook={
                "url": rx.url, "events": ["batch.completed"]})
            await until(lambda: mb.store.batch_get(cancelled.id).metrics.running == 1)
            await mb.cancel(cancelled.id)
            # completed, but only item events asked for
            completed = await mb.submit("k", [{"input": 1}, {"input": 2}], webhook={
                "url": rx.url, "events": ["item.succeeded"]})
            cancelled = await mb.wait(cancelled.id, timeout=DEADLINE)
            completed = await mb.wait(completed.id, timeout=DEADLINE)
            # deliveries are written with the event, in the same transaction: final now
            assert await mb.deliveries(cancelled.id) == []
            await until(lambda: len(rx.requests) == 2)
            item_events = await mb.deliveries(completed.id)
    assert cancelled.status == "cancelled" and completed.status == "completed"
    assert [d.event for d in item_events] == ["item.succeeded", "item.succeeded"]
    assert sorted(json.loads(r["body"])["type"] for r in rx.requests) == [
        "item.succeeded", "item.succeeded"]
    mb.close()


@pytest.mark.anyio
async def test_a_410_ends_the_batchs_other_pending_deliveries_to_that_url(db_path):
    """Three deliveries wait while the first is answered 410: they end `endpoint_gone`
    with no attempt, and nothing more is sent there."""
    clock = [1_000_000.0]
    mb = minibatch.Minibatch(db_path, allow_private_webhooks=True, poll_interval_s=0.02,
                             webhook_retry_schedule="100,100")
    mb.now = lambda: clock[0]
    go = anyio.Event()

    @mb.handler("k", concurrency=1)
    async def k(item):
        if item.index > 0:
            await go.wait()
        return item.input

    with Receiver([410]) as rx:
        async with mb:
            batch = await mb.submit("k", [{"input": i} for i in range(3)], webhook={
                "url": rx.url, "events": ["item.succeeded", "batch.completed"]})
            await until(lambda: mb.store.deliveries_pending_count() == 1)
            clock[0] += 50  # the other three events happen later: due 50 s after the first
            go.set()
            await mb.wait(batch.id, timeout=DEADLINE)
            assert mb.store.deliveries_pending_count() == 4 and rx.requests == []
            clock[0] += 50  # only the first is due
            await until(lambda: first_delivery(mb, batch.id).status == "failed")
            # the 410 is recorded in one transaction with the end of the others
            deliveries = await mb.deliveries(batch.id)
            assert [d.status for d in deliveries] == ["failed"] * 4
            clock[0] += 1000  # were any left pending, they would be due now
            assert mb.store.deliveries_claim(clock[0], 10, 30.0) == []  # none is
    assert len(rx.requests) == 1
    assert {d.failure_reason_code for d in deliveries} == {"endpoint_gone"}
    assert [d.attempt_count for d in deliveries] == [1, 0, 0, 0]
    assert deliveries[0].attempts[0].status_code == 410
    assert all(d.attempts == [] for d in deliveries[1:])
    mb.close()


def first_delivery(mb: minibatch.Minibatch, batch_id: str) -> minibatch.models.Delivery:
    return mb.store.deliveries_page(mb.store.batch_seq(batch_id, None), limit=1,
                                    after=None)[0][0]


# -- the webhook URL as shown ----------


def test_the_shown_webhook_url_drops_userinfo_and_query_values(client, server):
    with Receiver() as rx:
        port = rx.url.split(":")[2].split("/")[0]
        url = f"http://hookuser:hunter2pw@127.0.0.1:{port}/hook?token=t0kenvalue&sig=s1gvalue"
        shown = f"http://127.0.0.1:{port}/hook?token=&sig="
        created = client.post("/v1/batches", json={
            "kind": "echo", "items": [{"input": 1}], "webhook": {"url": url}})
        assert created.status_code == 201, created.text
        batch_id = created.json()["id"]
        terminal(client, batch_id)
        eventually(lambda: client.get(f"/v1/batches/{batch_id}").json()[
            "deliveries"]["succeeded"] == 1)
        batch = client.get(f"/v1/batches/{batch_id}")
        deliveries = client.get(f"/v1/batches/{batch_id}/deliveries")
    assert batch.json()["webhook"]["url"] == shown
    [delivery] = deliveries.json()["data"]
    assert delivery["url"] == shown
    assert json.loads(delivery["payload_bytes"])["data"]["webhook"]["url"] == shown
    for text in (created.text, batch.text, deliveries.text, rx.requests[0]["body"].decode()):
        for secret in ("hookuser", "hunter2pw", "t0kenvalue", "s1gvalue"):
            assert secret not in text


# -- 413 before the whole body is read ----------


JSON_LIMIT, FILE_LIMIT = 64 * 1024, 128 * 1024


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Iterator[ServerThread]:
    """One server with small limits for the module; each test uses its own tenant."""
    srv = ServerThread(str(tmp_path_factory.mktemp("small") / "jobs.db"),
                       max_json_bytes=JSON_LIMIT, max_file_bytes=FILE_LIMIT).start()
    yield srv
    srv.stop()


def request_head(srv: ServerThread, path: str, ctype: str, length: str,
                 tenant: str = "acme") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {srv.key(tenant)}\r\n"
            f"content-type: {ctype}\r\n{length}\r\n\r\n").encode()


def status_of(sock: socket.socket) -> int:
    """The status of the response the server sends while the request is still open (a
    server that waits for the rest of the body fails the test with a timeout)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without a response: {data!r}"
        data += chunk
    return int(data.split(b" ", 2)[1])


def chunked(data: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + 8192]), data[i:i + 8192])
                    for i in range(0, len(data), 8192))


MULTIPART = "multipart/form-data; boundary=xyz"
PART_HEAD = (b'--xyz\r\ncontent-disposition: form-data; name="file"; filename="a.jsonl"\r\n'
             b"content-type: application/octet-stream\r\n\r\n")


@pytest.mark.parametrize(("path", "ctype", "limit", "start"), [
    ("/v1/batches", "application/json", JSON_LIMIT, b'{"kind": "echo", "items": [{"input": "'),
    ("/v1/files", "application/jsonl", FILE_LIMIT, b'{"input": "'),
    ("/v1/files", MULTIPART, FILE_LIMIT, PART_HEAD + b'{"input": "'),
], ids=["json", "raw-file", "multipart"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_413_is_sent_before_the_whole_body_is_read(small, tenant, path, ctype, limit, start,
                                                  framing):
    """The client sends more than the limit but not the end of the body, then waits."""
    part = start + b"x" * (limit + 16 * 1024 - len(start))
    with socket.create_connection(("127.0.0.1", small.port), timeout=DEADLINE) as sock:
        if framing == "content-length":  # declares 10 times the limit, sends a part
            sock.sendall(request_head(small, path, ctype, f"content-length: {limit * 10}",
                                      tenant))
            sock.sendall(part[:1024])
        else:  # no declared length: the body must be counted as it arrives
            sock.sendall(request_head(small, path, ctype, "transfer-encoding: chunked", tenant))
            sock.sendall(chunked(part))
        assert status_of(sock) == 413
    with api(small, tenant) as client:  # and nothing was stored
        assert client.get("/v1/batches").json()["data"] == []
    assert small.stored(tenant) == (0, 0, 0)


# -- idempotent file uploads ----------


def test_a_replayed_upload_is_byte_identical_and_stores_one_file(client, server, tenant):
    headers = {"Idempotency-Key": "file-1", "content-type": "application/jsonl"}
    body = b'{"input": 1}\n{"input": 2, "entry_id": "b"}\n'
    first = client.post("/v1/files", content=body, headers=headers)
    assert first.status_code == 201, first.text
    replay = client.post("/v1/files", content=body, headers=headers)
    assert replay.status_code == 201 and replay.content == first.content
    assert replay.headers["idempotent-replayed"] == "true"
    other = client.post("/v1/files", content=b'{"input": 3}\n', headers=headers)
    assert other.status_code == 422
    assert server.stored(tenant)[0] == 1


def test_an_upload_replays_after_a_server_restart(db_path):
    headers = {"Idempotency-Key": "file-2", "content-type": "application/jsonl"}
    body = b'{"input": "kept"}\n'
    srv = ServerThread(db_path).start()
    key = srv.key("acme")
    try:
        first = httpx.post(srv.url + "/v1/files", content=body, timeout=DEADLINE,
                           headers={**headers, "x-api-key": key})
        assert first.status_code == 201, first.text
    finally:
        srv.stop()
    again = ServerThread(db_path).start()
    try:
        replay = httpx.post(again.url + "/v1/files", content=body, timeout=DEADLINE,
                            headers={**headers, "x-api-key": key})
        files = again.mb.store._one("SELECT count(*) FROM files")[0]
    finally:
        again.stop()
    assert replay.status_code == 201 and replay.content == first.content
    assert files == 1


def test_the_same_key_while_the_first_upload_is_in_flight_is_409(client, server, monkeypatch):
    """The first upload is held inside its create (the key is then in flight) while a
    second one with the same key arrives."""
    entered, release = threading.Event(), threading.Event()
    create_file = server.mb.create_file
    calls = []

    async def held(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            while not release.is_set():
                await anyio.sleep(0.01)
        return await create_file(*args, **kwargs)

    monkeypatch.setattr(server.mb, "create_file", held)  # undone for the module's next test
    headers = {"Idempotency-Key": "file-3", "content-type": "application/jsonl"}
    body = b'{"input": 1}\n'
    answers: list[httpx.Response] = []
    first = threading.Thread(target=lambda: answers.append(
        client.post("/v1/files", content=body, headers=headers)))
    first.start()
    try:
        assert entered.wait(DEADLINE)
        second = client.post("/v1/files", content=body, headers=headers)
        other_key = client.post("/v1/files", content=body,
                                headers={**headers, "Idempotency-Key": "file-4"})
    finally:
        release.set()
        first.join(DEADLINE)
    assert second.status_code == 409, second.text
    assert second.headers["content-type"] == "application/problem+json"
    assert other_key.status_code == 201  # only that key waits
    [answer] = answers
    assert answer.status_code == 201
    replay = client.post("/v1/files", content=body, headers=headers)
    assert replay.status_code == 201 and replay.content == answer.content


# -- items: the status filter, and next_attempt_at ----------


@pytest.fixture
def picky(db_path) -> Iterator[ServerThread]:
    """A server with kind `pick`: input "fail" fails, "retry" retries in an hour,
    "hold" runs until `srv.gate` is set, anything else is the output."""
    srv = ServerThread(db_path)
    srv.gate = threading.Event()

    @srv.mb.handler("pick", max_attempts=3)
    async def pick(item):
        if item.input == "fail":
            raise minibatch.Fail("asked to fail")
        if item.input == "retry":
            raise minibatch.Retry(after=3600)
        while item.input == "hold" and not srv.gate.is_set():
            await anyio.sleep(0.01)
        return item.input

    srv.start()
    yield srv
    srv.gate.set()
    srv.stop()


def items_page(client: httpx.Client, batch_id: str, **query) -> dict:
    response = client.get(f"/v1/batches/{batch_id}/items", params=query)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_items_status_filter_returns_only_that_status_and_pages(picky):
    with api(picky) as client:
        inputs = ["ok", "fail", "ok", "fail", "ok"]
        batch = client.post("/v1/batches", json={
            "kind": "pick", "items": [{"input": i} for i in inputs]}).json()
        terminal(client, batch["id"])
        failed = items_page(client, batch["id"], status="failed")
        succeeded = items_page(client, batch["id"], status="succeeded")
        first = items_page(client, batch["id"], status="failed", limit=1)
        rest = items_page(client, batch["id"], status="failed", limit=1,
                          after=first["next_cursor"])
        none = items_page(client, batch["id"], status="queued")
    assert [i["index"] for i in failed["data"]] == [1, 3]
    assert all(i["status"] == "failed" for i in failed["data"])
    assert [i["index"] for i in succeeded["data"]] == [0, 2, 4]
    assert [i["index"] for i in first["data"]] == [1] and first["has_more"]
    assert [i["index"] for i in rest["data"]] == [3] and not rest["has_more"]
    assert none == {"data": [], "has_more": False, "next_cursor": None}


def test_a_retrying_item_shows_a_future_next_attempt_at_and_others_null(picky):
    with api(picky) as client:
        # concurrency 1: "hold" runs, and the item after it is not tried yet
        held = client.post("/v1/batches", json={
            "kind": "pick", "concurrency": 1,
            "items": [{"input": "hold"}, {"input": "fresh"}]}).json()
        eventually(lambda: items_page(client, held["id"])["data"][0]["status"] == "running")
        running, fresh = items_page(client, held["id"])["data"]
        retrying = client.post("/v1/batches", json={
            "kind": "pick", "items": [{"input": "retry"}, {"input": "ok"}]}).json()
        eventually(lambda: [(i["status"], i["attempts"]) for i in
                            items_page(client, retrying["id"])["data"]] == [
            ("queued", 1), ("succeeded", 1)])
        waiting, finished = items_page(client, retrying["id"])["data"]
        picky.gate.set()
        terminal(client, held["id"])
        done = items_page(client, held["id"])["data"]
    assert (fresh["status"], fresh["attempts"], fresh["next_attempt_at"]) == ("queued", 0, None)
    assert running["status"] == "running" and running["next_attempt_at"] is None
    assert finished["next_attempt_at"] is None
    assert waiting["error"]["code"] == "retry" and waiting["next_attempt_at"] is not None
    due = datetime.fromisoformat(waiting["next_attempt_at"].replace("Z", "+00:00"))
    assert due.timestamp() > time.time() + 1800  # Retry(after=3600): an hour away
    assert [i["next_attempt_at"] for i in done] == [None, None]


# -- submit reads its iterable lazily ----------


@pytest.mark.anyio
async def test_submit_reads_its_iterable_a_chunk_at_a_time(mb):
    """A generator that fails the test if it is read more than a chunk ahead of what
    has been written (rows the same connection sees inside the submit's transaction)."""
    total = 3 * CHUNK
    pulled = 0

    @mb.handler("k")
    async def k(item):
        return item.input

    def written() -> int:
        return mb.store._one("SELECT count(*) FROM items")[0]

    def generate():
        nonlocal pulled
        for i in range(total):
            if i % 500 == 0:
                ahead = i - written()
                assert ahead <= 2 * CHUNK, f"read {ahead} items ahead of the writes"
            pulled += 1
            yield {"input": i}

    batch = await mb.submit("k", generate())
    assert pulled == total and batch.metrics.total == total
