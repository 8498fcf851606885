"""A full disk under a running server: writes answer 503, reads keep answering, nothing is
corrupted, and writes work again once there is room, without a restart.

The disk fills through RLIMIT_FSIZE on the server process (SIGXFSZ ignored, so a write
past the limit fails with EFBIG as it would with ENOSPC); the test lifts it with prlimit.
"""

from __future__ import annotations

import resource
import signal
import time

import apsw
import httpx
import pytest

from tests.serve import Served

LIMIT = 3 * 1024 * 1024


def small_disk() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))


@pytest.mark.sqlite_only
def test_full_disk_gives_503_then_recovers_without_a_restart(tmp_path):
    srv = Served(tmp_path, preexec_fn=small_disk)
    client = httpx.Client(base_url=srv.url, headers={"x-api-key": srv.key["api_key"]},
                          timeout=30)
    try:
        accepted, refused = [], 0
        payload = "x" * 20_000
        for _ in range(400):
            r = client.post("/v1/batches", json={
                "kind": "echo", "items": [{"input": payload} for _ in range(10)]})
            if r.status_code == 201:
                accepted.append(r.json()["id"])
                continue
            assert r.status_code == 503, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["title"] == "Storage unavailable"
            refused += 1
            if refused == 3:
                break
        assert refused == 3 and accepted
        assert client.get("/healthz").status_code == 200
        listed = client.get("/v1/batches", params={"limit": 1000})
        assert listed.status_code == 200  # reads keep answering
        assert {b["id"] for b in listed.json()["data"]} == set(accepted)

        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        after = client.post("/v1/batches", json={"kind": "echo", "items": [{"input": 1}]})
        assert after.status_code == 201
        accepted.append(after.json()["id"])
        deadline = time.monotonic() + 60
        for batch_id in accepted:
            while (b := client.get(f"/v1/batches/{batch_id}").json())["status"] != "completed":
                assert time.monotonic() < deadline, b
                time.sleep(0.05)
            assert b["metrics"]["succeeded"] == b["metrics"]["total"]
    finally:
        client.close()
        assert srv.stop() == 0
    conn = apsw.Connection(srv.db)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("SELECT count(*) FROM batches").fetchall() == [(len(accepted),)]
