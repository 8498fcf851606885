"""Per-key rate limits and per-tenant queue limits, through the HTTP API and the SDKs'
error shapes. Rate-limit tests use a rate so low (0.2/s) that no machine is fast or slow
enough to change which request is refused."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

import minibatch
from minibatch.auth import RateLimit, create_tenant_key
from minibatch.errors import InvalidInput, TooManyRequests
from tests.conftest import ServerThread

pytestmark = pytest.mark.anyio


def test_the_token_bucket_allows_a_burst_then_one_per_interval():
    limit = RateLimit(2.0)  # bursts of 2
    key = b"k"
    assert limit.wait(key, 100.0) == 0 and limit.wait(key, 100.0) == 0
    assert limit.wait(key, 100.0) == pytest.approx(0.5)
    assert limit.wait(key, 100.25) == pytest.approx(0.25)  # half a token came back
    assert limit.wait(key, 100.5) == 0
    assert limit.wait(b"other", 100.5) == 0  # each key its own bucket
    slow = RateLimit(0.2)  # bursts of 1: the next token in 5 s
    assert slow.wait(key, 0.0) == 0 and slow.wait(key, 1.0) == pytest.approx(4.0)


@pytest.mark.parametrize("value", [0, -1, float("nan")])
def test_limits_that_are_not_positive_are_refused(value):
    for name in ("rate_limit", "max_queued_items"):
        with pytest.raises(InvalidInput, match=name):
            minibatch.Minibatch(":memory:", **{name: value})


def test_a_key_over_its_rate_gets_429_with_retry_after_and_recovers(tmp_path):
    srv = ServerThread(str(tmp_path / "rl.db"), rate_limit=0.2).start()
    try:
        key, other = srv.key("acme"), srv.key("acme")
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(srv.url + "/v1/batches", headers=auth).status_code == 200
        refused = httpx.get(srv.url + "/v1/batches", headers=auth)
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert 1 <= int(refused.headers["retry-after"]) <= 5
        assert "rate_limit" in refused.json()["detail"]
        # Another key of the same tenant has its own bucket; public routes none.
        assert httpx.get(srv.url + "/v1/batches",
                         headers={"Authorization": f"Bearer {other}"}).status_code == 200
        assert httpx.get(srv.url + "/healthz").status_code == 200
        openai = httpx.get(srv.url + "/openai/v1/batches", headers=auth)
        assert openai.status_code == 429
        assert openai.json()["error"]["code"] == "rate_limit_exceeded"
        time.sleep(float(refused.headers["retry-after"]))  # the bucket's next token
        assert httpx.get(srv.url + "/v1/batches", headers=auth).status_code == 200
    finally:
        srv.stop()


async def test_a_submit_past_max_queued_items_is_429_and_writes_nothing(db_path):
    mb = minibatch.Minibatch(db_path, max_queued_items=10)
    create_tenant_key(mb.store, "acme")
    create_tenant_key(mb.store, "zeta")
    release = anyio.Event()

    @mb.handler("blocked")
    async def blocked(item):
        await release.wait()

    mb.runs_items = False  # items stay queued: the limit is about queued items
    async with mb:
        await mb.submit("blocked", [{"input": i} for i in range(6)], tenant="acme")
        with pytest.raises(TooManyRequests) as refused:
            await mb.submit("blocked", ({"input": i} for i in range(5)), tenant="acme")
        assert "limit is 10" in refused.value.detail
        assert refused.value.headers["Retry-After"] == "10"
        assert len(await mb.list_batches(tenant="acme")) == 1  # nothing of it written
        await mb.submit("blocked", [{"input": i} for i in range(4)], tenant="acme")  # = 10
        await mb.submit("blocked", [{"input": i} for i in range(10)], tenant="zeta")
        first = (await mb.list_batches(tenant="acme"))[-1]
        await mb.cancel(first.id, tenant="acme")  # its 6 are no longer queued
        await mb.submit("blocked", [{"input": i} for i in range(6)], tenant="acme")
        with pytest.raises(InvalidInput, match="split it"):  # never fits: not a 429
            await mb.submit("blocked", [{"input": i} for i in range(11)], tenant="zeta")
    mb.close()


def test_the_queue_limit_is_a_429_over_http_and_a_batch_over_it_alone_a_422(tmp_path):
    srv = ServerThread(str(tmp_path / "q.db"), max_queued_items=3)
    srv.mb.runs_items = False  # the items stay queued
    srv.start()
    try:
        auth = {"Authorization": f"Bearer {srv.key('acme')}"}

        def submit(n: int) -> httpx.Response:
            return httpx.post(srv.url + "/v1/batches", headers=auth, json={
                "kind": "echo", "items": [{"input": i} for i in range(n)]})

        assert submit(2).status_code == 201
        full = submit(2)
        assert full.status_code == 429 and full.headers["retry-after"] == "10"
        assert full.headers["content-type"] == "application/problem+json"
        never = submit(4)
        assert never.status_code == 422 and "split it" in never.json()["detail"]
        assert len(httpx.get(srv.url + "/v1/batches", headers=auth).json()["data"]) == 1
    finally:
        srv.stop()
