"""Tenant-level webhook endpoints through the native routes: every matching event of the
tenant's batches, signed with the endpoint's own secret, in the batch's delivery history."""

from __future__ import annotations

import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.integration.test_api import wait_terminal
from tests.receiver import Receiver

EVENTS = ["batch.completed", "batch.failed", "batch.cancelled", "batch.expired"]


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


def until(condition, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return value


def make_endpoint(client, url: str, events: list[str] | None = None) -> dict:
    r = client.post("/v1/webhook-endpoints",
                    json={"name": "hooks", "url": url, "event_types": events or EVENTS})
    assert r.status_code == 201, r.text
    return r.json()


def run_batch(client) -> dict:
    r = client.post("/v1/batches", json={"kind": "echo", "items": [{"input": 1}]})
    assert r.status_code == 201, r.text
    return wait_terminal(client, r.json()["id"])


def test_an_endpoint_gets_every_batchs_end_signed_with_its_own_secret(client, receiver):
    endpoint = make_endpoint(client, receiver.url)
    assert endpoint["signing_secret"].startswith("whsec_")
    assert endpoint["signing_secret_hint"] and endpoint["signing_secret"] not in str(
        client.get(f"/v1/webhook-endpoints/{endpoint['id']}").json())
    first, second = run_batch(client), run_batch(client)
    until(lambda: len(receiver.requests) == 2)
    verifier = Webhook(endpoint["signing_secret"])
    got = sorted(verifier.verify(r["body"], r["headers"])["data"]["id"]
                 for r in receiver.requests)
    assert got == sorted([first["id"], second["id"]])
    [delivery] = client.get(f"/v1/batches/{first['id']}/deliveries").json()["data"]
    assert delivery["endpoint_id"] == endpoint["id"] and delivery["event"] == "batch.completed"
    until(lambda: client.get(f"/v1/batches/{first['id']}/deliveries").json()["data"][0][
        "status"] == "succeeded")


def test_only_the_subscribed_event_types_are_sent(client, receiver):
    """Deliveries are made in the batch's terminal transaction, so the history of an
    ended batch is complete: no waiting for something that should not come."""
    make_endpoint(client, receiver.url, ["batch.cancelled"])
    completed = run_batch(client)  # completed: not subscribed
    assert client.get(f"/v1/batches/{completed['id']}/deliveries").json()["data"] == []
    r = client.post("/v1/batches", json={"kind": "sleep", "items": [{"input": {"seconds": 30}}]})
    batch_id = r.json()["id"]
    client.post(f"/v1/batches/{batch_id}/cancel")
    wait_terminal(client, batch_id)
    [delivery] = client.get(f"/v1/batches/{batch_id}/deliveries").json()["data"]
    assert delivery["event"] == "batch.cancelled"
    until(lambda: receiver.requests)
    assert b'"batch.cancelled"' in receiver.requests[0]["body"]


def test_rotation_ends_the_old_secret_unless_it_is_kept(client, receiver):
    endpoint = make_endpoint(client, receiver.url)
    old = endpoint["signing_secret"]
    kept = client.post(f"/v1/webhook-endpoints/{endpoint['id']}/rotate-secret",
                       json={"keep_old_secret_active_for_24_hours": True}).json()
    run_batch(client)
    until(lambda: receiver.requests)
    req = receiver.requests[-1]
    for secret in (old, kept["signing_secret"]):  # both sign during the overlap
        Webhook(secret).verify(req["body"], req["headers"])
    cut = client.post(f"/v1/webhook-endpoints/{endpoint['id']}/rotate-secret").json()
    assert cut["signing_secret"] not in (old, kept["signing_secret"])
    run_batch(client)
    until(lambda: len(receiver.requests) == 2)
    req = receiver.requests[-1]
    Webhook(cut["signing_secret"]).verify(req["body"], req["headers"])
    with pytest.raises(WebhookVerificationError):
        Webhook(kept["signing_secret"]).verify(req["body"], req["headers"])


def test_test_sends_one_signed_sample_and_answers_the_receivers_status(client):
    with Receiver(default=418) as receiver:
        endpoint = make_endpoint(client, receiver.url)
        r = client.post(f"/v1/webhook-endpoints/{endpoint['id']}/test",
                        json={"event_type": "batch.failed"})
        assert r.status_code == 200, r.text
        assert r.json() == {"event_type": "batch.failed", "status_code": 418,
                            "object": "webhook_endpoint.test"}
        [req] = receiver.requests
        payload = Webhook(endpoint["signing_secret"]).verify(req["body"], req["headers"])
        assert payload["type"] == "batch.failed"


def test_update_list_delete_and_bad_input(client, receiver, server, tenant):
    endpoint = make_endpoint(client, receiver.url)
    other = make_endpoint(client, receiver.url + "/2", ["batch.failed"])
    page = client.get("/v1/webhook-endpoints", params={"limit": 1}).json()
    assert [e["id"] for e in page["data"]] == [other["id"]] and page["has_more"]
    rest = client.get("/v1/webhook-endpoints", params={"after": page["next_cursor"]}).json()
    assert [e["id"] for e in rest["data"]] == [endpoint["id"]] and not rest["has_more"]
    changed = client.post(f"/v1/webhook-endpoints/{endpoint['id']}",
                          json={"name": "renamed"}).json()
    assert changed["name"] == "renamed" and changed["url"] == receiver.url
    for body in ({"name": "x", "url": "ftp://h/x", "event_types": EVENTS},
                 {"name": "x", "url": receiver.url, "event_types": ["item.done"]},
                 {"name": "x", "url": receiver.url, "event_types": []},
                 {"name": "x", "url": receiver.url, "event_types": EVENTS, "extra": 1}):
        assert client.post("/v1/webhook-endpoints", json=body).status_code == 422, body
    from tests.conftest import tenant_client

    with tenant_client(server, tenant + "-other") as stranger:
        assert stranger.get(f"/v1/webhook-endpoints/{endpoint['id']}").status_code == 404
        assert stranger.delete(f"/v1/webhook-endpoints/{endpoint['id']}").status_code == 404
    assert client.delete(f"/v1/webhook-endpoints/{endpoint['id']}").json()["deleted"] is True
    assert client.get(f"/v1/webhook-endpoints/{endpoint['id']}").status_code == 404
    client.delete(f"/v1/webhook-endpoints/{other['id']}")
    ended = run_batch(client)  # its deliveries, if any, were made as it ended
    assert client.get(f"/v1/batches/{ended['id']}/deliveries").json()["data"] == []
