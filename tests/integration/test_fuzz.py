"""Fuzzing the inputs of a real server: JSONL uploads and batch bodies.

Random bytes, deep nesting, huge lines and invalid UTF-8: never a 500, never a hang,
and a refused request leaves nothing half-written.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("MINIBATCH_FUZZ_EXAMPLES", "60"))
REFUSALS = {400, 413, 415, 422}

deep = st.integers(min_value=1, max_value=200_000).map(
    lambda n: b'{"input": ' + b"[" * n + b"]" * n + b"}\n")
bad_utf8 = st.binary(min_size=1, max_size=50).map(
    lambda b: b'{"input": "' + b"\xff" + b.replace(b'"', b"") + b'"}\n')
huge_line = st.sampled_from([2 * 1024 * 1024 - 100, 2 * 1024 * 1024 + 100]).map(
    lambda n: b'{"input": "' + b"x" * n + b'"}\n')
good_line = st.builds(lambda i: json.dumps({"input": i}).encode() + b"\n",
                      st.recursive(st.none() | st.integers() | st.text(),
                                   lambda c: st.lists(c, max_size=3), max_leaves=5))
bodies = st.one_of(st.binary(max_size=2000), deep, bad_utf8, huge_line,
                   st.lists(st.one_of(good_line, st.binary(max_size=100), bad_utf8),
                            min_size=1, max_size=20).map(b"".join))


@pytest.fixture
def fuzz_client(server, tenant):
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"x-api-key": server.key(tenant)}) as c:
        yield c


def test_jsonl_uploads_never_500_and_refusals_write_nothing(server, tenant, fuzz_client):
    @given(body=bodies)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def upload(body: bytes) -> None:
        before = server.stored(tenant)
        response = fuzz_client.post("/v1/files", content=body,
                                    headers={"content-type": "application/jsonl"})
        after = server.stored(tenant)
        if response.status_code == 201:
            assert after[0] == before[0] + 1
            assert after[1] - before[1] == response.json()["lines"]
        else:
            assert response.status_code in REFUSALS, (response.status_code, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert after == before

    upload()


def test_batch_bodies_never_500(server, tenant, fuzz_client):
    nested = st.integers(min_value=1, max_value=200_000).map(
        lambda n: b'{"kind": "echo", "items": [{"input": ' + b"[" * n + b"]" * n + b"}]}")
    broken = st.binary(max_size=300).map(
        lambda b: b'{"kind": "echo", "items": [{"input": "' + b + b'"}]}')

    @given(body=st.one_of(nested, broken, st.binary(max_size=500)))
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def create(body: bytes) -> None:
        before = server.stored(tenant)
        response = fuzz_client.post("/v1/batches", content=body,
                                    headers={"content-type": "application/json"})
        if response.status_code != 201:
            assert response.status_code in REFUSALS, (response.status_code, response.text)
            assert server.stored(tenant) == before

    create()
