"""The HTTP API against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
import time

import httpx
import pytest

PROBLEM = "application/problem+json"


def wait_terminal(client: httpx.Client, batch_id: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "cancelled"):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.02)


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    if field is not None:
        assert field in [e.get("field") for e in problem["errors"]], problem
    return problem


def test_health_openapi_and_metrics_need_no_key(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["openapi"] == "3.1.0" and "/v1/batches/{batch_id}" in spec["paths"]
    text = httpx.get(server.url + "/metrics").text
    assert "minibatch_items{status=\"queued\"}" in text
    assert "minibatch_item_duration_seconds_bucket" in text


def test_missing_or_unknown_key_is_401_and_both_headers_work(server, tenant):
    assert_problem(httpx.get(server.url + "/v1/batches"), 401)
    assert_problem(httpx.get(server.url + "/v1/batches",
                             headers={"Authorization": "Bearer nope"}), 401)
    key = server.key(tenant)
    assert httpx.get(server.url + "/v1/batches", headers={"x-api-key": key}).status_code == 200
    assert httpx.get(server.url + "/v1/batches",
                     headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_create_get_items_results_of_an_inline_batch(client):
    items = [{"input": {"n": i}, "entry_id": f"e{i}", "metadata": {"i": i}} for i in range(5)]
    created = client.post("/v1/batches", json={"kind": "echo", "items": items,
                                               "metadata": {"owner": "me"}})
    assert created.status_code == 201
    batch = created.json()
    assert batch["object"] == "batch" and batch["metrics"]["total"] == 5
    assert batch["polling_url"] == f"/v1/batches/{batch['id']}"
    assert batch["cancel_url"] == f"/v1/batches/{batch['id']}/cancel"
    done = wait_terminal(client, batch["id"])
    assert done["status"] == "completed" and done["cancel_url"] is None
    assert done["metadata"] == {"owner": "me"} and done["duration_ms"] is not None
    page = client.get(f"/v1/batches/{batch['id']}/items", params={"limit": 2}).json()
    assert [i["entry_id"] for i in page["data"]] == ["e0", "e1"] and page["has_more"]
    page2 = client.get(f"/v1/batches/{batch['id']}/items",
                       params={"limit": 10, "after": page["next_cursor"]}).json()
    assert [i["entry_id"] for i in page2["data"]] == ["e2", "e3", "e4"]
    assert not page2["has_more"] and page2["next_cursor"] is None
    assert page2["data"][0]["output"] == {"n": 2} and page2["data"][0]["metadata"] == {"i": 2}
    results = client.get(f"/v1/batches/{batch['id']}/results")
    assert results.headers["content-type"].startswith("application/jsonl")
    lines = [json.loads(line) for line in results.text.splitlines()]
    assert [r["entry_id"] for r in lines] == [f"e{i}" for i in range(5)]
    assert lines[0] == {"id": lines[0]["id"], "entry_id": "e0", "status": "succeeded",
                        "output": {"n": 0}, "error": None, "attempts": 1}


def test_list_batches_newest_first_with_cursor_and_status(client):
    ids = [client.post("/v1/batches", json={"kind": "echo", "items": [{"input": i}]}).json()
           ["id"] for i in range(3)]
    first = client.get("/v1/batches", params={"limit": 2}).json()
    assert [b["id"] for b in first["data"]] == ids[:0:-1] and first["has_more"]
    rest = client.get("/v1/batches", params={"after": first["next_cursor"]}).json()
    assert [b["id"] for b in rest["data"]] == ids[:1] and not rest["has_more"]
    for batch_id in ids:
        wait_terminal(client, batch_id)
    assert len(client.get("/v1/batches", params={"status": "completed"}).json()["data"]) == 3
    assert client.get("/v1/batches", params={"status": "queued"}).json()["data"] == []


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "x"}, "limit"),
    ({"status": "done"}, "status"), ({"after": "batch_nope"}, "after")])
def test_bad_list_parameters_are_422(client, params, field):
    assert_problem(client.get("/v1/batches", params=params), 422, field)


def test_upload_files_raw_and_multipart_then_batch_from_file(client):
    jsonl = b"".join(json.dumps({"input": i, "entry_id": f"f{i}"}).encode() + b"\n"
                     for i in range(4))
    raw = client.post("/v1/files", content=jsonl, headers={"content-type": "application/jsonl"})
    assert raw.status_code == 201
    assert raw.json()["lines"] == 4 and raw.json()["bytes"] == len(jsonl)
    multi = client.post("/v1/files", files={"file": ("items.jsonl", jsonl)})
    assert multi.status_code == 201 and multi.json()["filename"] == "items.jsonl"
    batch = client.post("/v1/batches", json={"kind": "echo",
                                             "input_file_id": multi.json()["id"]}).json()
    done = wait_terminal(client, batch["id"])
    assert done["metrics"]["succeeded"] == 4
    lines = client.get(f"/v1/batches/{batch['id']}/results").text.splitlines()
    assert [json.loads(line)["output"] for line in lines] == [0, 1, 2, 3]


def test_a_bad_file_names_each_bad_line_and_stores_nothing(client, server, tenant):
    jsonl = b'{"input": 1}\n{"input": 2, "extra": 1}\nnot json\n{"input": 3, "entry_id": "a"}\n' \
            b'{"input": 4, "entry_id": "a"}\n'
    problem = assert_problem(client.post("/v1/files", content=jsonl), 422)
    assert [e["line"] for e in problem["errors"]] == [2, 3, 5]
    assert server.stored(tenant) == (0, 0, 0)
    assert_problem(client.post("/v1/files", content=b"\n\n"), 422)
    too_big = b'{"input": "' + b"x" * (3 * 1024 * 1024) + b'"}\n'
    assert_problem(client.post("/v1/files", content=too_big), 413)


@pytest.mark.parametrize(("body", "field"), [
    ({"kind": "echo", "items": []}, "items"),
    ({"kind": "echo"}, "items"),
    ({"kind": "nope", "items": [{"input": 1}]}, "kind"),
    ({"kind": "echo", "items": [{"input": 1, "entry_id": "a"}, {"input": 2, "entry_id": "a"}]},
     "items[1].entry_id"),
    ({"kind": "echo", "items": [{"input": 1, "extra": 2}]}, "items[0]"),
    ({"kind": "echo", "items": [{"input": 1}], "surprise": 1}, "body"),
    ({"kind": "echo", "items": [{"input": 1}], "webhook": {"url": "ftp://x/y"}}, "webhook.url"),
    ({"kind": "echo", "items": [{"input": 1}], "webhook": {"url": "http://x/", "y": 1}},
     "webhook"),
    ({"kind": "echo", "items": [{"input": 1}], "max_attempts": "3"}, "max_attempts"),
    ({"kind": "echo", "items": [{"input": 1}], "max_attempts": 0}, "max_attempts"),
    ({"kind": "echo", "input_file_id": "file_nope"}, "input_file_id"),
])
def test_bad_batch_bodies_are_422_naming_the_field_and_change_nothing(client, body, field):
    assert_problem(client.post("/v1/batches", json=body), 422, field)
    assert client.get("/v1/batches").json()["data"] == []


def test_malformed_json_wrong_type_huge_body_and_wrong_method(client):
    assert_problem(client.post("/v1/batches", content=b'{"kind": ',
                               headers={"content-type": "application/json"}), 400)
    assert_problem(client.post("/v1/batches", content=b"kind=echo",
                               headers={"content-type": "text/plain"}), 415)
    huge = {"kind": "echo", "items": [{"input": "x" * (2 * 1024 * 1024)}]}
    assert_problem(client.post("/v1/batches", json=huge), 413)
    assert_problem(client.delete("/v1/batches"), 405)
    assert_problem(client.get("/v1/nothing-here"), 404)
    assert client.get("/v1/batches").json()["data"] == []


def test_unknown_ids_are_404(client):
    for path in ("/v1/batches/batch_x", "/v1/batches/batch_x/items",
                 "/v1/batches/batch_x/results", "/v1/batches/batch_x/deliveries"):
        assert_problem(client.get(path), 404)
    assert_problem(client.post("/v1/batches/batch_x/cancel"), 404)
    assert_problem(client.post("/v1/deliveries/msg_x/retry"), 404)


def test_bad_items_cursor_and_status_are_422(client):
    batch = client.post("/v1/batches", json={"kind": "echo", "items": [{"input": 1}]}).json()
    assert_problem(client.get(f"/v1/batches/{batch['id']}/items", params={"after": "zz"}),
                   422, "after")
    assert_problem(client.get(f"/v1/batches/{batch['id']}/items",
                              params={"status": "completed"}), 422, "status")


def test_cancel_then_409_once_terminal(client):
    batch = client.post("/v1/batches", json={
        "kind": "sleep", "items": [{"input": {"seconds": 5}} for _ in range(3)]}).json()
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] in ("cancelling", "cancelled")
    done = wait_terminal(client, batch["id"])
    assert done["status"] == "cancelled" and done["metrics"]["cancelled"] == 3
    assert_problem(client.post(f"/v1/batches/{batch['id']}/cancel"), 409)


def test_other_tenants_see_404_for_everything(server, client, tenant):
    from tests.receiver import Receiver

    with Receiver([500, 200]) as rx:
        batch = client.post("/v1/batches", json={
            "kind": "echo", "items": [{"input": 1}],
            "webhook": {"url": rx.url}}).json()
        wait_terminal(client, batch["id"])
        deadline = time.monotonic() + 10
        while not (deliveries := client.get(f"/v1/batches/{batch['id']}/deliveries").json()
                   ["data"]) or deliveries[0]["attempt_count"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    file_id = client.post("/v1/files", content=b'{"input": 1}\n').json()["id"]
    other = httpx.Client(base_url=server.url,
                         headers={"Authorization": f"Bearer {server.key(tenant + '-other')}"})
    for path in ("", "/items", "/results", "/deliveries"):
        assert_problem(other.get(f"/v1/batches/{batch['id']}{path}"), 404)
    assert_problem(other.post(f"/v1/batches/{batch['id']}/cancel"), 404)
    assert_problem(other.post(f"/v1/deliveries/{deliveries[0]['id']}/retry"), 404)
    assert_problem(other.post("/v1/batches", json={"kind": "echo", "input_file_id": file_id}),
                   422, "input_file_id")
    assert other.get("/v1/batches").json()["data"] == []
    assert_problem(other.get("/v1/batches", params={"after": batch["id"]}), 422, "after")
    other.close()


def test_deliveries_history_and_manual_retry(client):
    from tests.receiver import Receiver

    with Receiver([500], default=200) as rx:
        batch = client.post("/v1/batches", json={
            "kind": "echo", "items": [{"input": 1}], "webhook": {"url": rx.url}}).json()
        wait_terminal(client, batch["id"])
        deadline = time.monotonic() + 20
        while True:
            [d] = client.get(f"/v1/batches/{batch['id']}/deliveries").json()["data"] or [None]
            if d and d["status"] == "succeeded":
                break
            assert time.monotonic() < deadline, d
            time.sleep(0.05)
        assert [a["status_code"] for a in d["attempts"]] == [500, 200]
        assert d["payload_bytes"] == rx.requests[0]["body"].decode()
        retried = client.post(f"/v1/deliveries/{d['id']}/retry")
        assert retried.status_code == 202 and retried.json()["is_automatic"] is False
        deadline = time.monotonic() + 10
        while len(rx.requests) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert rx.requests[2]["body"] == rx.requests[0]["body"]
    assert rx.requests[2]["headers"]["webhook-id"] == d["id"]


def test_rotate_secret_over_http(client):
    rotated = client.post("/v1/webhook-secret/rotate", json={"overlap_s": 60})
    assert rotated.status_code == 200
    body = rotated.json()
    assert body["webhook_secret"].startswith("whsec_") and body["previous_secret_id"]
    assert body["previous_expires_at"] is not None
    assert_problem(client.post("/v1/webhook-secret/rotate", json={"overlap_s": -1}), 422,
                   "overlap_s")


def test_idempotency_key_replays_the_first_response(client):
    body = {"kind": "echo", "items": [{"input": 1}]}
    headers = {"Idempotency-Key": "k-1"}
    first = client.post("/v1/batches", json=body, headers=headers)
    again = client.post("/v1/batches", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert len(client.get("/v1/batches").json()["data"]) == 1
    assert_problem(client.post("/v1/batches", json={**body, "metadata": {"x": 1}},
                               headers=headers), 422, "Idempotency-Key")
    bad = client.post("/v1/batches", json={"kind": "nope", "items": [{"input": 1}]},
                      headers={"Idempotency-Key": "k-2"})
    assert_problem(bad, 422)
    fixed = client.post("/v1/batches", json=body, headers={"Idempotency-Key": "k-2"})
    assert fixed.status_code == 201  # the refused request stored nothing under its key


def test_literal_private_webhook_url_is_refused_when_private_is_not_allowed(db_path):
    from tests.conftest import ServerThread

    srv = ServerThread(db_path, allow_private_webhooks=False).start()
    try:
        with httpx.Client(base_url=srv.url, headers={"x-api-key": srv.key("t")}) as c:
            for url in ("http://127.0.0.1/x", "http://[::1]/x", "http://169.254.169.254/",
                        "http://10.0.0.1/", "http://[::ffff:127.0.0.1]/"):
                assert_problem(c.post("/v1/batches", json={
                    "kind": "echo", "items": [{"input": 1}], "webhook": {"url": url}}),
                    422, "webhook.url")
    finally:
        srv.stop()


def test_non_ascii_digits_in_limit_and_cursor_are_422_not_500(client):
    """Found by schemathesis: '³'.isdigit() is True, and int('³') raised."""
    batch = client.post("/v1/batches", json={"kind": "echo", "items": [{"input": 1}]}).json()
    assert_problem(client.get(f"/v1/batches/{batch['id']}/items", params={"after": "³"}),
                   422, "after")
    assert_problem(client.get("/v1/batches", params={"limit": "²"}), 422, "limit")
    assert_problem(client.get(f"/v1/batches/{batch['id']}/items",
                              params={"after": "9" * 30}), 422, "after")


def test_listed_batches_are_the_same_objects_as_get(client):
    batch = client.post("/v1/batches", json={"kind": "echo", "items": [{"input": 1}]}).json()
    wait_terminal(client, batch["id"])
    [listed] = client.get("/v1/batches").json()["data"]
    assert listed == client.get(f"/v1/batches/{batch['id']}").json()
    assert listed["deliveries"]["total"] == 0 and listed["failed_webhooks"] == []


def test_metrics_count_items_and_deliveries_without_tenant_names(fresh_server, tenant):
    """The metrics count every tenant's items: this test needs a server to itself."""
    from tests.conftest import tenant_client
    from tests.receiver import Receiver

    server = fresh_server
    with Receiver() as rx, tenant_client(server, tenant) as client:
        batch = client.post("/v1/batches", json={
            "kind": "echo", "items": [{"input": i} for i in range(7)],
            "webhook": {"url": rx.url}}).json()
        wait_terminal(client, batch["id"])
        deadline = time.monotonic() + 10
        while 'minibatch_deliveries{status="succeeded"} 1' not in (
                text := httpx.get(server.url + "/metrics").text):
            assert time.monotonic() < deadline, text
            time.sleep(0.02)
    assert 'minibatch_items{status="succeeded"} 7' in text
    assert "minibatch_queue_depth 0" in text
    assert "minibatch_item_duration_seconds_count 7" in text
    assert tenant not in text and batch["id"] not in text


@pytest.mark.parametrize(("body", "field"), [
    ({"webhook": {"url": "http://example.com:99999/x"}}, "webhook.url"),
    ({"webhook": {"url": "http://example.com:abc/x"}}, "webhook.url"),
    ({"webhook": {"url": "http://[::1/x"}}, "webhook.url"),
    ({"webhook": {"url": "http://x/", "events": []}}, "webhook.events"),
    ({"max_attempts": 18446744073709551615}, "max_attempts"),
    ({"concurrency": 9223372036854775808}, "concurrency"),
    ({"item_timeout_s": 1e300}, "item_timeout_s"),
])
def test_ports_hosts_events_and_huge_numbers_are_422_not_500(client, body, field):
    """Found in review: a bad port was stored and then crashed the server on every start;
    huge integers overflowed SQLite's 64 bits."""
    assert_problem(client.post("/v1/batches", json={"kind": "echo", "items": [{"input": 1}],
                                                    **body}), 422, field)
    assert client.get("/v1/batches").json()["data"] == []


def test_an_items_cursor_past_the_end_is_422(client):
    batch = client.post("/v1/batches", json={"kind": "echo", "items": [{"input": 1}]}).json()
    assert client.get(f"/v1/batches/{batch['id']}/items", params={"after": 0}).status_code \
        == 200
    assert_problem(client.get(f"/v1/batches/{batch['id']}/items", params={"after": 1}),
                   422, "after")
