"""api.py's mutation survivors (`bench/mutation.sh --ref HEAD --module api`, 87.4 % on
2026-12-01, 34 survivors), each pinned over real HTTP: bodies streamed without a
Content-Length at their exact limits, a media type's parameters and one that sorts
before JSON, `limit` at its top, the multipart parser's limits (one file, 1 MiB a
field), a `file` field that is not a file, JSON nested too deep for the decoder, the
pages of webhook endpoints by their cursor, the documented status of a GET and of an
upload, and the overlap of an endpoint's rotated secret.

Equivalent mutants of api.py, which no test can tell apart:
- `if TYPE_CHECKING:` -> `if not TYPE_CHECKING:`: it binds `Minibatch`, which only
  annotations name (and importing app there makes no cycle).
- `(spec.items is None) == (spec.input_file_id is None)` -> `is`: both sides are bools.
- `_ResultLine(kw_only=True)` -> `kw_only=False`: every line is built by keyword.
- `_client_gone`'s `Response(status_code=400)` -> 401 or 399: the client hung up; the
  answer reaches no one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.test_api import assert_problem

JSON = {"content-type": "application/json"}


def streamed(body: bytes, piece: int = 64 * 1024) -> Iterator[bytes]:
    """The body in pieces, so httpx sends it chunked: no Content-Length to refuse early."""
    for start in range(0, len(body), piece):
        yield body[start:start + piece]


def json_body_of(size: int) -> bytes:
    head, tail = b'{"kind": "echo", "items": [{"input": "', b'"}]}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_a_streamed_json_body_is_read_to_its_limit_and_refused_one_byte_past(client, server):
    limit = server.mb.settings.max_json_bytes
    ok = client.post("/v1/batches", content=streamed(json_body_of(limit)), headers=JSON)
    assert ok.status_code == 201, ok.text
    over = client.post("/v1/batches", content=streamed(json_body_of(limit + 1)), headers=JSON)
    assert_problem(over, 413)


def multipart_of(size: int, boundary: str = "edgeboundary") -> bytes:
    """A multipart body of exactly `size` bytes: one `file` part padded with spaces
    (blank space after a JSON line is allowed)."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\";"
            f" filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
            '{"input": 1}\n').encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + b" " * (size - len(head) - len(tail)) + tail


def test_a_streamed_upload_is_read_to_its_limit_and_refused_one_byte_past(client, server):
    limit = server.mb.settings.max_file_bytes
    headers = {"content-type": "multipart/form-data; boundary=edgeboundary"}
    ok = client.post("/v1/files", content=streamed(multipart_of(limit)), headers=headers)
    assert ok.status_code == 201, ok.text
    over = client.post("/v1/files", content=streamed(multipart_of(limit + 1)), headers=headers)
    assert_problem(over, 413)


def test_a_media_type_with_parameters_is_json_and_one_before_json_is_not(client):
    body = b'{"kind": "echo", "items": [{"input": 1}]}'
    ok = client.post("/v1/batches", content=body,
                     headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 201, ok.text
    assert_problem(client.post("/v1/batches", content=body,
                               headers={"content-type": "application/csv"}), 415)


def test_a_page_limit_may_be_1000_and_not_1001(client):
    assert client.get("/v1/batches", params={"limit": 1000}).status_code == 200
    assert_problem(client.get("/v1/batches", params={"limit": 1001}), 422)


def test_an_upload_has_one_file_and_fields_of_at_most_1_mib(client):
    line = ("in.jsonl", b'{"input": 1}\n')
    assert_problem(client.post("/v1/files", files=[("file", line), ("file", line)]), 400)
    mib = 1024 * 1024
    fits = client.post("/v1/files", files={"file": line}, data={"note": "n" * mib})
    assert fits.status_code == 201, fits.text
    assert_problem(client.post("/v1/files", files={"file": line},
                               data={"note": "n" * (mib + 1)}), 400)


def test_an_upload_takes_ten_fields_beside_its_file_and_not_eleven(client):
    line = ("in.jsonl", b'{"input": 1}\n')
    ten = {f"note{i}": "n" for i in range(10)}
    ok = client.post("/v1/files", files={"file": line}, data=ten)
    assert ok.status_code == 201, ok.text
    assert_problem(client.post("/v1/files", files={"file": line},
                               data={**ten, "note10": "n"}), 400)


def test_a_file_field_that_is_not_a_file_is_refused(client):
    r = client.post("/v1/files", data={"file": '{"input": 1}'},
                    files={"other": ("x.txt", b"x")})
    assert_problem(r, 422)
    assert "file" in r.json()["detail"]


def test_json_nested_past_the_decoders_depth_is_a_400(client):
    deep = b'{"kind": "echo", "items": [{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    r = client.post("/v1/batches", content=deep, headers=JSON)
    assert_problem(r, 400)
    assert "nested too deeply" in r.json()["detail"]


def test_webhook_endpoints_page_by_the_last_one_of_each_page(client):
    made = [client.post("/v1/webhook-endpoints", json={
        "name": f"e{i}", "url": f"http://127.0.0.1:9/e{i}",
        "event_types": ["batch.completed"]}).json()["id"] for i in range(3)]
    seen, after = [], None
    for _ in range(5):
        page = client.get("/v1/webhook-endpoints", params={
            "limit": 2, **({"after": after} if after else {})}).json()
        seen += [e["id"] for e in page["data"]]
        after = page["next_cursor"]
        if not page["has_more"]:
            break
    assert sorted(seen) == sorted(made) and len(seen) == 3


def test_a_get_documents_200_and_an_upload_201(client):
    spec = client.get("/openapi.json").json()
    assert {c for c in spec["paths"]["/v1/batches/{batch_id}"]["get"]["responses"]
            if c.startswith("2")} == {"200"}
    assert {c for c in spec["paths"]["/v1/files"]["post"]["responses"]
            if c.startswith("2")} == {"201"}


def test_a_rotated_endpoint_secret_overlaps_by_a_day_or_not_at_all(client, server):
    for keep, overlap in ((True, 86400.0), (False, 0.0)):
        endpoint = client.post("/v1/webhook-endpoints", json={
            "name": "r", "url": "http://127.0.0.1:9/r",
            "event_types": ["batch.completed"]}).json()["id"]
        rotated = client.post(f"/v1/webhook-endpoints/{endpoint}/rotate-secret",
                              json={"keep_old_secret_active_for_24_hours": keep})
        assert rotated.status_code == 200, rotated.text
        (old_expires, _), (_, new_created) = server.mb.store._all(
            "SELECT expires_at, created_at FROM secrets WHERE endpoint=? ORDER BY created_at",
            (endpoint,))
        assert old_expires - (new_created - 1e-6) == pytest.approx(overlap, abs=1e-3)
