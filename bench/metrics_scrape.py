"""The cost of a /metrics scrape's store read with `--deliveries` deliveries stored, against
the GROUP BY over every delivery it replaced, in one run.

A fresh SQLite file gets one batch and N delivery rows (inserted with one executemany;
the triggers keep `delivery_counts` as they go), then both reads are timed, each the best
of 5.

    .venv/bin/python bench/metrics_scrape.py [--deliveries 1000000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from minibatch.store import SqliteStore


def best_of(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deliveries", type=int, default=1_000_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(os.path.join(tmp, "m.db"))
        row = store.batch_insert(tenant="t", kind="k", now=0.0, max_attempts=1,
                                 items=[{"input": 1}])
        statuses = ("succeeded", "failed", "pending")
        t = time.perf_counter()
        with store.conn:
            store.conn.executemany(
                "INSERT INTO deliveries (id, batch, tenant, event, url, payload, status,"
                " max_attempts, next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                ((f"msg_{i}", row.seq, "t", "item.failed", "http://x", b"{}",
                  statuses[i % 3], 1, 0.0, 0.0) for i in range(args.deliveries)))
        print(f"{args.deliveries:,} deliveries inserted in {time.perf_counter() - t:.1f} s")
        counts = best_of(store.counts)
        group_by = best_of(lambda: store.conn.execute(
            "SELECT status, count(*) FROM deliveries GROUP BY status").fetchall())
        assert store.counts()["deliveries"] == {
            s: (args.deliveries + 2 - k) // 3 for k, s in enumerate(statuses)}
        print(f"store.counts() (what /metrics reads): {counts * 1000:.3f} ms")
        print(f"GROUP BY over every delivery (before): {group_by * 1000:.1f} ms"
              f" ({group_by / counts:,.0f}x)")
        store.close()


if __name__ == "__main__":
    main()
