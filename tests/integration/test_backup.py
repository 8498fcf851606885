"""`minibatch backup` and `minibatch check` against a real serve process writing the file."""

from __future__ import annotations

import json
import time

import apsw
import httpx
import pytest

from tests.serve import Served, cli


@pytest.mark.sqlite_only
def test_a_backup_taken_while_a_batch_runs_restores_and_passes_check(tmp_path):
    served = Served(tmp_path)
    auth = {"Authorization": f"Bearer {served.key['api_key']}"}
    try:
        with httpx.Client(base_url=served.url, timeout=30, headers=auth) as http:
            done = http.post("/v1/batches", json={"kind": "echo", "items": [
                {"input": i} for i in range(500)]}).json()["id"]
            running = http.post("/v1/batches", json={"kind": "sleep", "items": [
                {"input": {"seconds": 600}} for _ in range(20)]}).json()["id"]
            deadline = time.monotonic() + 60
            while (http.get(f"/v1/batches/{done}").json()["status"] != "completed"
                   or http.get(f"/v1/batches/{running}").json()["metrics"]["running"] < 20):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            dest = tmp_path / "copy.db"
            backup = cli("backup", str(dest), "--db", served.db)
            assert backup.returncode == 0, backup.stderr
            assert json.loads(backup.stdout)["pages"] > 0
            assert http.get(f"/v1/batches/{running}").json()["status"] == "running"
    finally:
        assert served.stop() == 0
    check = cli("check", "--db", str(dest))
    assert (check.returncode, check.stdout.strip()) == (0, "ok"), check.stdout
    # The copy is a whole database: a server on it has both batches, as they were.
    restored = Served(tmp_path, env={"MINIBATCH_DB": str(dest)})
    try:
        with httpx.Client(base_url=restored.url, timeout=30, headers=auth) as http:
            first = http.get(f"/v1/batches/{done}").json()
            second = http.get(f"/v1/batches/{running}").json()
            assert (first["status"], first["metrics"]["succeeded"]) == ("completed", 500)
            assert len(http.get(f"/v1/batches/{done}/results").text.splitlines()) == 500
            assert second["status"] == "running" and second["metrics"]["total"] == 20
    finally:
        assert restored.stop() == 0


@pytest.mark.sqlite_only
def test_check_names_counters_that_do_not_match_the_items_and_exits_1(tmp_path):
    served = Served(tmp_path)
    with httpx.Client(base_url=served.url, timeout=30, headers={
            "Authorization": f"Bearer {served.key['api_key']}"}) as http:
        batch_id = http.post("/v1/batches", json={"kind": "echo", "items": [
            {"input": i} for i in range(5)]}).json()["id"]
        deadline = time.monotonic() + 30
        while http.get(f"/v1/batches/{batch_id}").json()["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert served.stop() == 0
    assert cli("check", "--db", served.db).stdout.strip() == "ok"
    conn = apsw.Connection(served.db)
    conn.execute("UPDATE batches SET succeeded = succeeded - 1, queued = 1 WHERE id = ?",
                 (batch_id,))
    conn.close()
    check = cli("check", "--db", served.db)
    assert check.returncode == 1
    lines = check.stdout.splitlines()
    assert f"batch {batch_id}: metrics.queued is 1, its items say 0" in lines
    assert f"batch {batch_id}: metrics.succeeded is 4, its items say 5" in lines
    assert f"batch {batch_id} is completed with items queued or running" in lines


def test_backup_and_check_refuse_a_missing_database_or_an_existing_destination(tmp_path):
    missing = cli("check", "--db", str(tmp_path / "nope.db"))
    assert missing.returncode != 0 and "no database at" in missing.stderr
    assert not (tmp_path / "nope.db").exists()  # not created by looking
    db = tmp_path / "real.db"
    assert cli("keys", "create", "--tenant", "t", "--db", str(db)).returncode == 0
    taken = tmp_path / "taken.db"
    taken.write_bytes(b"keep me")
    refused = cli("backup", str(taken), "--db", str(db))
    assert refused.returncode != 0 and "exists" in refused.stderr
    assert taken.read_bytes() == b"keep me"
    for result in (missing, refused):
        assert "Traceback" not in result.stderr
