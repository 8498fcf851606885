"""Details of the HTTP API that mutation testing showed no test held: the documented
status of each route is the one it answers, body and form limits at their exact edges,
cursors of pages longer than two, zero-padded numbers, and errors of the dialects'
sub-apps in their own shape."""

from __future__ import annotations

import time

from tests.integration.test_api import assert_problem, wait_terminal


def success_codes(spec: dict, path: str, method: str) -> set[str]:
    return {c for c in spec["paths"][path][method]["responses"] if c.startswith("2")}


def test_each_routes_documented_success_status_is_the_one_it_answers(client, server):
    spec = client.get("/openapi.json").json()
    created = client.post("/v1/batches", json={
        "kind": "echo", "items": [{"input": 1}],
        "webhook": {"url": "http://127.0.0.1:9/never"}})
    assert success_codes(spec, "/v1/batches", "post") == {str(created.status_code)} == {"201"}
    batch = wait_terminal(client, created.json()["id"])
    deadline = time.monotonic() + 30
    while (delivery := client.get(f"/v1/batches/{batch['id']}/deliveries").json()["data"][0]
           )["status"] != "failed":  # no attempt in flight: a retry then is a 409
        assert time.monotonic() < deadline
        time.sleep(0.02)
    retried = client.post(f"/v1/deliveries/{delivery['id']}/retry")
    assert success_codes(spec, "/v1/deliveries/{delivery_id}/retry", "post") == {
        str(retried.status_code)} == {"202"}
    endpoint = client.post("/v1/webhook-endpoints", json={
        "name": "n", "url": "http://127.0.0.1:9/e", "event_types": ["batch.completed"]})
    assert success_codes(spec, "/v1/webhook-endpoints", "post") == {
        str(endpoint.status_code)} == {"201"}


def test_a_json_body_of_exactly_the_limit_is_read(client, server):
    limit = server.mb.settings.max_json_bytes
    head = b'{"kind": "echo", "items": [{"input": "'
    tail = b'"}]}'
    body = head + b"x" * (limit - len(head) - len(tail)) + tail
    assert len(body) == limit
    r = client.post("/v1/batches", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 201, r.text
    over = client.post("/v1/batches", content=body + b" ",
                       headers={"content-type": "application/json"})
    assert_problem(over, 413)


def test_a_multipart_upload_takes_ten_small_fields_and_refuses_an_eleventh(client):
    fields = {f"note{i}": f"a note of some length {i}" for i in range(9)}
    ok = client.post("/v1/files", files={"file": ("in.jsonl", b'{"input": 1}\n')},
                     data=fields)
    assert ok.status_code == 201, ok.text
    too_many = client.post("/v1/files", files={"file": ("in.jsonl", b'{"input": 1}\n')},
                           data={**fields, "note9": "x", "note10": "y"})
    assert_problem(too_many, 400)


def test_the_next_cursor_is_the_last_batch_of_a_page_of_three(client):
    ids = [client.post("/v1/batches", json={"kind": "echo", "items": [{"input": i}]}
                       ).json()["id"] for i in range(4)]
    page = client.get("/v1/batches", params={"limit": 3}).json()
    assert [b["id"] for b in page["data"]] == ids[::-1][:3]
    assert page["next_cursor"] == ids[1] and page["has_more"]
    rest = client.get("/v1/batches", params={"after": page["next_cursor"]}).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]]


def test_numbers_of_eighteen_digits_are_read_and_nineteen_refused(client):
    for i in range(3):
        client.post("/v1/batches", json={"kind": "echo", "items": [{"input": i}]})
    page = client.get("/v1/batches", params={"limit": "0" * 17 + "2"})
    assert page.status_code == 200 and len(page.json()["data"]) == 2
    assert_problem(client.get("/v1/batches", params={"limit": "0" * 18 + "2"}), 422, "limit")


def test_an_unknown_route_is_a_404_titled_not_found(client):
    problem = assert_problem(client.get("/v1/no-such-thing"), 404)
    assert problem["title"] == "Not found"
    assert assert_problem(client.delete("/v1/batches"), 405)["title"] == "Method not allowed"


def test_a_dialects_errors_come_in_its_own_shape(client):
    """Ours (a missing batch) and Starlette's (an unknown route) alike."""
    for path in ("/openai/v1/batches/batch_nope", "/openai/v1/no-such-thing"):
        r = client.get(path)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    r = client.get("/anthropic/v1/messages/batches/msgbatch_nope")
    assert r.status_code == 404
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "not_found_error"
