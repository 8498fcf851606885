"""api.py, pinned where mutation testing (bench/mutation.py) found that the tests of its
map noticed nothing, beyond what test_api_edges.py already pins: the bodies of the three
DELETE routes, the status a client that hung up mid-body is logged with, and the polled
route being the first one Starlette tries. Over real HTTP on 127.0.0.1 but for the
last, which reads the routes of the app `Minibatch.asgi()` builds.

Equivalent mutants of api.py: those test_api_edges.py lists (`if not TYPE_CHECKING`,
`==` -> `is` between two bools, `_ResultLine`'s `kw_only=False`: no field has a default
and its one constructor passes every field by keyword), but not `_client_gone`'s
`Response(status_code=400)` -> 399 or 401: the answer reaches no client, but its status
is in the access log (`test_a_client_that_hangs_up_mid_body_is_logged_as_a_400`).
"""
from __future__ import annotations

import logging
import socket
import time

from minibatch.api import ENDPOINTS
from tests.integration.test_api import assert_problem, wait_terminal


def test_deleting_an_ended_batch_answers_that_it_was_deleted(client):
    batch = client.post("/v1/batches", json={"kind": "echo", "items": [{"input": 1}]}).json()
    wait_terminal(client, batch["id"], timeout=60)
    deleted = client.delete(f"/v1/batches/{batch['id']}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": batch["id"], "object": "batch.deleted", "deleted": True}
    assert_problem(client.get(f"/v1/batches/{batch['id']}"), 404)


def test_deleting_a_file_answers_that_it_was_deleted(client):
    file = client.post("/v1/files", content=b'{"input": 1}\n').json()
    deleted = client.delete(f"/v1/files/{file['id']}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": file["id"], "object": "file.deleted", "deleted": True}
    assert_problem(client.delete(f"/v1/files/{file['id']}"), 404)


def test_deleting_a_webhook_endpoint_answers_that_it_was_deleted(client):
    endpoint = client.post("/v1/webhook-endpoints", json={
        "name": "d", "url": "http://127.0.0.1:9/d", "event_types": ["batch.completed"]}
    ).json()
    deleted = client.delete(f"/v1/webhook-endpoints/{endpoint['id']}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": endpoint["id"], "object": "webhook_endpoint.deleted",
                              "deleted": True}
    assert_problem(client.get(f"/v1/webhook-endpoints/{endpoint['id']}"), 404)


def test_a_client_that_hangs_up_mid_body_is_logged_as_a_400(fresh_server, caplog):
    caplog.set_level(logging.INFO)
    key = fresh_server.key("gone")
    with socket.create_connection(("127.0.0.1", fresh_server.port)) as sock:
        sock.sendall(b"POST /v1/batches HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                     b"\r\nx-api-key: " + key.encode() + b"\r\ncontent-length: 1000\r\n\r\n{")

    def logged() -> list[dict]:
        return [r.http for r in caplog.records if r.name == "minibatch.access"
                and r.http["method"] == "POST" and r.http["path"] == "/v1/batches"]

    deadline = time.monotonic() + 60
    while not logged():
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.02)
    assert [entry["status"] for entry in logged()] == [400]
    assert any("disconnected" in r.getMessage() for r in caplog.records)


def test_the_polled_route_is_tried_first_and_the_others_keep_their_order(mb):
    """A polled GET of a batch is most of the traffic, and Starlette tries routes in
    order (create_app)."""
    routes = mb.asgi().app.routes[:len(ENDPOINTS)]
    tried = [(r.path, sorted(r.methods - {"HEAD"})) for r in routes]
    assert tried[0] == ("/v1/batches/{batch_id}", ["GET"])
    rest = [(e.path, [e.method]) for e in ENDPOINTS if e.name != "get_batch"]
    assert tried[1:] == rest
