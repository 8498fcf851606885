"""On PostgreSQL a store call is a network round trip, and the API makes it through
`store.call`, in a worker thread: a write waiting for the write lock holds its own
request, never the server's event loop. Run with MINIBATCH_TEST_STORE=postgres;
skipped otherwise.

The item loops, delivery and pruning are off: they are the runner's side, and what is
shown here is the API's. A raw connection takes the lock every write transaction takes
(WRITE_LOCK) and holds it while a POST waits behind it; reads take no lock, so GETs
of a batch made before must go on answering meanwhile."""

from __future__ import annotations

import threading
import time

import httpx
import psycopg
import pytest

from minibatch.store.postgres import WRITE_LOCK
from tests.conftest import POSTGRES, SERVER_OPTIONS, ServerThread

pytestmark = pytest.mark.skipif(not POSTGRES, reason="PostgreSQL only"
                                " (MINIBATCH_TEST_STORE=postgres)")

GET_WITHIN_S = 0.25  # a GET's round trips take milliseconds; a frozen loop, until COMMIT
POST_WITHIN_S = 5.0


def test_a_post_waiting_for_the_write_lock_leaves_the_loop_to_serve_reads(db_path):
    srv = ServerThread(db_path, **SERVER_OPTIONS)
    srv.mb.runs_items = srv.mb.delivers = srv.mb.prunes = False
    srv.start()
    key = srv.key("acme")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"kind": "echo", "items": [{"input": 1}]}
    with httpx.Client(base_url=srv.url, headers=headers, timeout=2 * GET_WITHIN_S) as client:
        made = client.post("/v1/batches", json=body)  # also writes the key's last_used_at
        assert made.status_code == 201
        batch_id = made.json()["id"]

        holder = psycopg.connect(srv.mb.store.path)
        posted: list[httpx.Response | BaseException] = []

        def post() -> None:
            try:
                with httpx.Client(base_url=srv.url, headers=headers, timeout=30) as other:
                    posted.append(other.post("/v1/batches", json=body))
            except BaseException as exc:  # seen by the assert below
                posted.append(exc)

        poster = threading.Thread(target=post, daemon=True)
        try:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))  # BEGIN first
            poster.start()
            deadline = time.monotonic() + 5
            while not holder.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype='advisory' AND objid=%s"
                    " AND NOT granted", (WRITE_LOCK,)).fetchone()[0]:
                assert time.monotonic() < deadline, "the POST never waited for the lock"
                time.sleep(0.01)
            took = []
            for _ in range(10):
                started = time.monotonic()
                got = client.get(f"/v1/batches/{batch_id}")
                took.append(time.monotonic() - started)
                assert got.status_code == 200 and got.json()["id"] == batch_id
            assert max(took) < GET_WITHIN_S, took
            assert not posted  # the POST is still waiting for the lock
        finally:
            holder.commit()
            holder.close()
            poster.join(POST_WITHIN_S)
            srv.stop()
    assert not poster.is_alive(), f"the POST took over {POST_WITHIN_S} s after COMMIT"
    assert isinstance(posted[0], httpx.Response) and posted[0].status_code == 201, posted
