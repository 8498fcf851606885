"""Dashboard pages on a batch of `--items` items against the same pages on a batch of
1,000, in one run and one server (issue 17: no page reads all items).

A fresh SQLite file gets two ended batches of the same make-up (written straight through
the store): 90 % succeeded, 5 % failed with one of five error messages, the last 5 %
cancelled, and a throughput record spread over 100 seconds. `minibatch serve` starts on
it, a client signs in to /ui, and each page is fetched `--repeat` times one after another.
Printed per page: the median and p90 in ms for each batch, and big / small; a page that
stays fast on a big batch is near 1x.

    .venv/bin/python bench/dashboard.py [--items 1000000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import api as api_bench
import httpx

from minibatch.auth import create_tenant_key
from minibatch.store import SqliteStore

SMALL = 1000


def make_batch(store: SqliteStore, n: int) -> str:
    """An ended batch of `n` items: succeeded, failed (every 20th) and a cancelled tail."""
    now = time.time()
    row = store.batch_insert(tenant="bench", kind="echo", now=now, max_attempts=1,
                             items=({"input": {"n": i}} for i in range(n)))
    tail = n - n // 20
    with store.conn:
        store.conn.execute("UPDATE items SET status='succeeded', attempts=1, output=x'31'"
                           " WHERE batch=? AND idx<?", (row.seq, tail))
        store.conn.execute(
            "UPDATE items SET status='failed', output=NULL, error=json_object('code',"
            " 'upstream', 'message', 'error number ' || (idx % 5)) WHERE batch=? AND"
            " idx<? AND idx % 20 = 7", (row.seq, tail))
        store.conn.execute("UPDATE items SET status='cancelled' WHERE batch=? AND idx>=?",
                           (row.seq, tail))
        failed = store.conn.execute("SELECT count(*) FROM items WHERE batch=? AND"
                                    " status='failed'", (row.seq,)).fetchall()[0][0]
        store.conn.execute(
            "UPDATE batches SET status='cancelled', queued=0, succeeded=?, failed=?,"
            " cancelled=?, started_at=created_at, completed_at=? WHERE seq=?",
            (tail - failed, failed, n - tail, now, row.seq))
        store.conn.executemany("INSERT INTO batch_ticks VALUES (?,?,?)",
                               [(row.seq, int(now) + s, tail // 100) for s in range(100)])
    return row.id


def timed(client: httpx.Client, path: str, repeat: int) -> tuple[float, float]:
    """(median, p90) ms of `repeat` GETs of `path`, each answered 200."""
    took = []
    for _ in range(repeat):
        t = time.perf_counter()
        answer = client.get(path)
        took.append((time.perf_counter() - t) * 1000)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:200])
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.9) - 1]


def sign_in(base: str, key: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=60)
    page = client.get("/ui/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    assert client.post("/ui/login", data={"api_key": key, "csrf": csrf}).status_code == 303
    return client


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="minibatch-dashboard-") as tmp:
        db = os.path.join(tmp, "d.db")
        store = SqliteStore(db)
        key = create_tenant_key(store, "bench")["api_key"]
        t = time.perf_counter()
        big = make_batch(store, args.items)
        small = make_batch(store, SMALL)
        assert store.check() == []
        store.close()
        print(f"{args.items:,} + {SMALL:,} items prepared in {time.perf_counter() - t:.1f} s",
              flush=True)
        port = api_bench.free_port()
        cmd = [sys.executable, "-m", "minibatch", "serve", "--db", db, "--host",
               api_bench.HOST, "--port", str(port), "--no-access-log"]
        with api_bench.Server("minibatch", cmd, port, os.path.join(tmp, "serve.log")) as mb:
            client = sign_in(mb.base, key)
            last_failed = args.items - args.items // 20 - 20
            pages = [
                ("GET /v1/batches/{id} (API)", "/v1/batches/{id}"),
                ("batch page", "/ui/batches/{id}"),
                ("items=failed", "/ui/batches/{id}?items=failed"),
                ("items=failed, last page", "/ui/batches/{id}?items=failed&after={deep}"),
                ("items=cancelled", "/ui/batches/{id}?items=cancelled"),
                ("items=succeeded", "/ui/batches/{id}?items=succeeded"),
                ("items=queued (none)", "/ui/batches/{id}?items=queued"),
                ("items, last page", "/ui/batches/{id}?after={end}"),
                ("live", "/ui/live?id={id}"),
            ]
            print(f"{'page':28} {'big p50':>9} {'p90':>8} {'small p50':>10} {'p90':>8}"
                  f" {'big/small':>9}")
            api = httpx.Client(base_url=mb.base, timeout=60,
                               headers={"Authorization": f"Bearer {key}"})
            for name, template in pages:
                caller = api if template.startswith("/v1") else client
                figures = []
                for batch_id, n in ((big, args.items), (small, SMALL)):
                    deep = n - n // 20 - 20 if n == args.items else SMALL - SMALL // 20 - 20
                    path = template.format(id=batch_id, deep=deep, end=n - 60)
                    figures.append(timed(caller, path, args.repeat))
                (b50, b90), (s50, s90) = figures
                print(f"{name:28} {b50:8.2f}  {b90:7.2f}  {s50:9.2f}  {s90:7.2f}"
                      f"  {b50 / s50:8.2f}x", flush=True)
            print(f"batch list (2 batches): {timed(client, '/ui/batches', args.repeat)[0]:.2f}"
                  f" ms p50; failed items at idx up to {last_failed:,}")
            client.close()
            api.close()


if __name__ == "__main__":
    main()
