"""api.py, pinned over real HTTP where mutation testing (bench/mutation.py) found that
the tests of its map noticed nothing, beyond what test_api_edges.py already pins: the
bodies of the three DELETE routes.

Equivalent mutants of api.py (besides those test_api_edges.py lists):
- `_ResultLine(msgspec.Struct, kw_only=True)` -> `kw_only=False`: no field has a default
  and the one place that builds a line passes every field by keyword, so the Struct, its
  encoding and each JSONL line are the same.
"""

from __future__ import annotations

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
