"""GET latency while the pruner removes a deleted batch of `--items` items, against the
same server's GET latency before, in one run (issue 15: a prune must not stall the API).

A fresh SQLite file gets a completed batch of `--items` items (written straight through
the store, outputs included) and a small one; `minibatch serve` starts on it. wrk (or the
aiohttp fallback of bench/api.py) drives `GET /v1/batches/{small}` with `--connections`
connections for `--duration` s (before), then the big batch is deleted (`DELETE
/v1/batches/{id}`) and the same load runs until its rows are gone (during). Printed: req/s,
p50, p99 and max of both windows, the prune's duration and rows/s, and the p99 ratio.

    .venv/bin/python bench/retention.py [--items 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import api as api_bench
import apsw

from minibatch.auth import create_tenant_key
from minibatch.store import SqliteStore


def prepare(db: str, n: int) -> tuple[str, str, str]:
    """(key, big batch id, small batch id): both completed, every item succeeded."""
    store = SqliteStore(db)
    key = create_tenant_key(store, "bench")["api_key"]
    big = store.batch_insert(tenant="bench", kind="echo", now=time.time(), max_attempts=1,
                             items=({"input": {"n": i}} for i in range(n)))
    small = store.batch_insert(tenant="bench", kind="echo", now=time.time(), max_attempts=1,
                               items=[{"input": 1}])
    with store.conn:
        store.conn.execute("UPDATE items SET status='succeeded', attempts=1,"
                           " output=x'7b226f6b223a747275657d'")
        store.conn.execute("UPDATE batches SET status='completed', queued=0,"
                           " succeeded=total, started_at=created_at, completed_at=?",
                           (time.time(),))
    assert store.check() == []
    store.close()
    return key, big.id, small.id


def items_left(db: str) -> int:
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("SELECT count(*) FROM items").fetchall()[0][0]
    finally:
        conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--duration", type=int, default=20)
    p.add_argument("--connections", type=int, default=50)
    args = p.parse_args()
    load = api_bench.parse_args(["--connections", str(args.connections), "--duration",
                                 str(args.duration)])
    load.client = api_bench.pick_client("auto")
    with tempfile.TemporaryDirectory(prefix="minibatch-retention-") as tmp:
        db = os.path.join(tmp, "r.db")
        t = time.perf_counter()
        key, big, small = prepare(db, args.items)
        print(f"{args.items:,} items prepared in {time.perf_counter() - t:.1f} s;"
              f" load: {load.client}, {args.connections} connections", flush=True)
        port = api_bench.free_port()
        cmd = [sys.executable, "-m", "minibatch", "serve", "--db", db, "--host",
               api_bench.HOST, "--port", str(port), "--no-access-log"]
        with api_bench.Server("minibatch", cmd, port, os.path.join(tmp, "serve.log")) as mb:
            url = f"{mb.base}/v1/batches/{small}"
            before = api_bench.measure("GET before", mb, url, key, "", load, tmp)
            status, _ = api_bench.call("DELETE", f"{mb.base}/v1/batches/{big}", key)
            assert status == 200, status
            started = time.perf_counter()
            done: list[float] = []

            def watch() -> None:
                while items_left(db) > 1:
                    time.sleep(0.2)
                done.append(time.perf_counter() - started)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            during = api_bench.measure("GET during prune", mb, url, key, "", load, tmp)
            watcher.join(timeout=600)
        if not done:
            raise SystemExit("the prune did not finish")
        prune_s = done[0]
        print(f"prune of {args.items:,} items: {prune_s:.1f} s ({args.items / prune_s:,.0f}"
              f" items/s); the GET window was {during['duration_s']:.1f} s"
              + ("" if prune_s <= during["duration_s"] else
                 " (shorter than the prune: raise --duration to cover all of it)"))
        print(json.dumps({"p99_before_ms": before["p99_ms"], "p99_during_ms": during["p99_ms"],
                          "max_during_ms": during["max_ms"],
                          "p99_ratio": round(during["p99_ms"] / before["p99_ms"], 2),
                          "rps_ratio": round(during["rps"] / before["rps"], 2)}))


if __name__ == "__main__":
    main()
