"""End-to-end throughput of minibatch, against the raw SQLite ceiling and huey.

What is measured (each system in its own subprocess, so figures and peak RSS are per system
and the runs do not disturb each other):

* minibatch (always): a fresh SQLite file, one no-op async handler (`concurrency=200`),
  `--items` items submitted as a generator of `{"input": i}`, then `mb.wait(...)`.
  Reported: items/s from the start of `submit` until every item is terminal, the submit
  time on its own, and the peak RSS of the process. The batch must end `completed` with
  every item succeeded, or the script fails.
* `--ceiling`, first `mb-store`: minibatch's store alone, as the runner calls it, with no
  runner or handler (one submit, then claims of 500 written back at once), timed from
  the submit as minibatch is. Then raw apsw on a fresh WAL file (`synchronous=NORMAL`,
  `temp_store=MEMORY`), no Python work per item. The same number of queued rows is inserted with one
  `executemany` in one transaction; then, in groups of 100, one transaction SELECTs the
  ids of queued rows (a partial index on `status='queued'`) and UPDATEs them to running,
  and a second transaction marks them done with a small result blob. Reported: claim +
  complete items/s (the insert is timed separately) and the ratio minibatch / ceiling;
  also, since minibatch's clock runs from the submit, the raw rate with the insert
  counted in, and minibatch's ratio to that.
  `ceiling-1st` is the same with the claim as one `UPDATE … IN (SELECT … LIMIT) RETURNING`,
  the statement behind the ~165k figure in MEASURED.md.
* `--workers N` (N > 1): the same two minibatch runs (`minibatch-wN`, `mb-group-wN`)
  with the items in N worker processes on one SQLite file: a submitting process (its
  handlers not started) and N processes running `async with mb`, each set as
  `serve --workers N` sets its workers (no waiting for the write lock, outcomes written
  at most every 10 ms, no webhooks or pruning). The workers are started and ready
  before the clock starts; they poll every 20 ms, since SQLite tells no other process of
  a submit (the default is 0.2 s). Reported the same way, from the submit until the batch
  is terminal, and each process's own CPU and peak RSS.
* `--peer huey`: the same no-op workload through huey's SqliteHuey with
  `synchronous=NORMAL` (equal durability to minibatch; huey defaults to FULL), a task
  returning 1 so that a result is stored, and a consumer with 4 worker threads.
  `--huey-items` tasks are enqueued first, then the consumer starts; the clock runs from
  the first enqueue until every result is stored, as minibatch's runs from the submit.
  Reported: tasks/s and the ratio minibatch / huey.

Every line shows the CPU its process spent (user + system, from the clock's start to its
end) and that CPU per item, so the cost of an item is visible beside the rate.

Reference figures and goals: /work/shared/MEASURED.md (minibatch should reach at least half
the ceiling and 10x huey measured in the same run).

    .venv/bin/python bench/throughput.py --ceiling --peer huey --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

GROUP = 100  # rows claimed and completed per transaction in the ceiling; a group's size
WORKER_POLL_S = 0.02  # how often a worker process looks for new items (see --workers)
RESULT_BLOB = b'{"ok":true}'
HUEY_WORKERS = 4
# minibatch / system, from shared/MEASURED.md. "ceiling" claims with a SELECT then an
# UPDATE (the faster way); "ceiling-1st" with the single statement MEASURED.md's ~165k
# figure used. Both are printed so the goal can be read against either definition.
GOALS = {"ceiling": 0.5, "ceiling-1st": 0.5, "huey": 10.0}


# -- helpers ----------


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU this process has spent so far, user and system, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(figures: dict[str, Any]) -> None:
    """Print the child's figures as the single JSON line the parent reads."""
    figures["peak_rss_mib"] = round(peak_rss_mib(), 1)
    print(json.dumps(figures), flush=True)


# -- minibatch ----------


def items_of(n: int) -> Iterator[dict[str, int]]:
    return ({"input": i} for i in range(n))


def minibatch_with_noop(path: str, group: bool, **settings: Any) -> Any:
    """A Minibatch on `path` with the no-op handler, one item a call or GROUP a call;
    it counts the items it ran (`.ran`)."""
    import minibatch

    mb = minibatch.Minibatch(path, **settings)
    mb.ran = 0
    if not group:
        @mb.handler("noop", concurrency=200)
        async def noop(item: Any) -> None:
            mb.ran += 1
    else:
        @mb.handler("noop", concurrency=4, group=GROUP)
        async def noop_group(items: list[Any]) -> list[None]:
            mb.ran += len(items)
            return [None] * len(items)
    return mb


def check_completed(batch: Any, n: int) -> None:
    if batch.status != "completed" or batch.metrics.succeeded != n:
        raise SystemExit(f"minibatch: batch ended {batch.status!r} with metrics "
                         f"{batch.metrics!r}, expected completed with {n} succeeded")


async def minibatch_run(path: str, n: int, timeout: float, group: bool) -> dict[str, Any]:
    mb = minibatch_with_noop(path, group)
    try:
        async with mb:
            cpu, start = cpu_s(), time.perf_counter()
            batch = await mb.submit("noop", items_of(n))
            submitted = time.perf_counter()
            batch = await mb.wait(batch.id, poll_s=0.01, timeout=timeout)
            end, cpu = time.perf_counter(), cpu_s() - cpu
    finally:
        mb.close()
    check_completed(batch, n)
    return {"items": n, "submit_s": submitted - start, "total_s": end - start,
            "rate": n / (end - start), "cpu_s": cpu}


def child_minibatch(n: int, args: argparse.Namespace) -> dict[str, Any]:
    import anyio

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        return anyio.run(minibatch_run, os.path.join(tmp, "bench.db"), n, args.timeout,
                         False)


def child_minibatch_group(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same no-op items through a handler that takes them GROUP at a time."""
    import anyio

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        return anyio.run(minibatch_run, os.path.join(tmp, "bench.db"), n, args.timeout,
                         True)


# -- minibatch in worker processes (--workers N) ----------


async def worker_run(path: str, group: bool, timeout: float) -> dict[str, Any]:
    """One worker process: ready, then the batch id on stdin, then run items until the
    batch is terminal. Reports its CPU and items from the id's arrival to the end."""
    import anyio

    from minibatch.workers import WRITE_GAP_S

    mb = minibatch_with_noop(path, group, poll_interval_s=WORKER_POLL_S)
    mb.delivers = mb.prunes = False  # as in serve's workers (see minibatch/workers.py)
    try:
        async with mb:
            mb.store.wait_for_lock(False)
            mb.runner.write_gap_s = WRITE_GAP_S
            print("ready", flush=True)
            batch_id = (await anyio.to_thread.run_sync(sys.stdin.readline)).strip()
            cpu = cpu_s()
            await mb.wait(batch_id, poll_s=0.01, timeout=timeout)
            cpu = cpu_s() - cpu
    finally:
        mb.close()
    return {"ran": mb.ran, "cpu_s": cpu}


def child_worker(n: int, args: argparse.Namespace) -> dict[str, Any]:
    import anyio

    return anyio.run(worker_run, args.db, args.group, args.timeout)


async def workers_run(path: str, n: int, args: argparse.Namespace, group: bool
                      ) -> dict[str, Any]:
    """Start args.workers worker processes on `path`, submit from this one, and time the
    batch from the submit until it is terminal."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "mb-worker", "--db", path,
           "--timeout", str(args.timeout)] + (["--group"] if group else [])
    mb = minibatch_with_noop(path, group)  # makes the schema; its handlers never start
    workers = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True) for _ in range(args.workers)]
    try:
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise SystemExit(f"a worker did not start (exit {w.wait()})")
        cpu, start = cpu_s(), time.perf_counter()
        batch = await mb.submit("noop", items_of(n))
        submitted = time.perf_counter()
        for w in workers:
            w.stdin.write(batch.id + "\n")
            w.stdin.flush()
        batch = await mb.wait(batch.id, poll_s=0.01, timeout=args.timeout)
        end, cpu = time.perf_counter(), cpu_s() - cpu
        ends = [json.loads(w.communicate(timeout=args.timeout)[0].splitlines()[-1])
                for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        mb.close()
    check_completed(batch, n)
    if sum(e["ran"] for e in ends) != n:
        raise SystemExit(f"workers ran {[e['ran'] for e in ends]} items, expected {n}")
    return {"items": n, "submit_s": submitted - start, "total_s": end - start,
            "rate": n / (end - start), "cpu_s": cpu, "workers": ends}


def child_workers(n: int, args: argparse.Namespace, group: bool = False) -> dict[str, Any]:
    import anyio

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        return anyio.run(workers_run, os.path.join(tmp, "bench.db"), n, args, group)


def child_workers_group(n: int, args: argparse.Namespace) -> dict[str, Any]:
    return child_workers(n, args, group=True)


# -- minibatch's store alone (--ceiling) ----------


def child_store(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """The store's own calls, as the runner makes them, with no runner or handler: one
    submit, then claims of 500 each written back at once as succeeded. Between this and
    `minibatch` is the runner's cost; between this and `ceiling`, the schema's (leases,
    claim tokens, counters, the indexes the API's pages read) and the store's Python."""
    from minibatch.store import Outcome, open_store

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = open_store(os.path.join(tmp, "store.db"))
        now = store.clock()
        cpu, start = cpu_s(), time.perf_counter()
        row = store.batch_insert(tenant="bench", kind="noop", items=items_of(n), now=now,
                                 max_attempts=3)
        inserted = time.perf_counter()
        while claimed := store.items_claim("noop", 500, "bench", now, 60.0):
            store.items_finish([Outcome(c.seq, c.batch_seq, c.token, "succeeded", b"null",
                                        None, 0.0) for c in claimed], "bench", now)
        end, cpu = time.perf_counter(), cpu_s() - cpu
        batch = store.batch_get(row.id)
        store.close()
    check_completed(batch, n)
    return {"items": n, "submit_s": inserted - start, "total_s": end - start,
            "rate": n / (end - start), "cpu_s": cpu}


# -- the raw apsw ceiling ----------


def ceiling_open(path: str) -> Any:
    import apsw

    conn = apsw.Connection(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT NOT NULL, payload BLOB,"
        " result BLOB);"
        " CREATE INDEX jobs_queued ON jobs(id) WHERE status='queued';")
    return conn


def ceiling_insert(conn: Any, n: int) -> None:
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    cur.executemany("INSERT INTO jobs (status, payload) VALUES ('queued', ?)",
                    ((b'{"input":%d}' % i,) for i in range(n)))
    cur.execute("COMMIT")


def ceiling_claim(cur: Any) -> list[int]:
    """One transaction: the ids of up to GROUP queued rows, marked running."""
    cur.execute("BEGIN IMMEDIATE")
    ids = [row[0] for row in cur.execute(
        "SELECT id FROM jobs WHERE status='queued' ORDER BY id LIMIT ?", (GROUP,))]
    if ids:
        cur.execute(f"UPDATE jobs SET status='running' WHERE id IN ({','.join('?' * len(ids))})",
                    ids)
    cur.execute("COMMIT")
    return ids


def ceiling_claim_one_statement(cur: Any) -> list[int]:
    """The claim as shared/MEASURED.md's first row defines its ~165k/s ceiling: one
    `UPDATE … WHERE id IN (SELECT … LIMIT) RETURNING id`."""
    cur.execute("BEGIN IMMEDIATE")
    ids = [row[0] for row in cur.execute(
        "UPDATE jobs SET status='running' WHERE id IN (SELECT id FROM jobs"
        " WHERE status='queued' ORDER BY id LIMIT ?) RETURNING id", (GROUP,))]
    cur.execute("COMMIT")
    return ids


def ceiling_complete(cur: Any, ids: list[int]) -> None:
    """One transaction: each claimed row done, with its own small result blob."""
    cur.execute("BEGIN IMMEDIATE")
    cur.executemany("UPDATE jobs SET status='done', result=? WHERE id=?",
                    [(RESULT_BLOB, i) for i in ids])
    cur.execute("COMMIT")


def child_ceiling(n: int, args: argparse.Namespace,
                  claim: Any = ceiling_claim) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        conn = ceiling_open(os.path.join(tmp, "ceiling.db"))
        start = time.perf_counter()
        ceiling_insert(conn, n)
        cpu, inserted = cpu_s(), time.perf_counter()
        cur = conn.cursor()
        while ids := claim(cur):
            ceiling_complete(cur, ids)
            if time.perf_counter() - inserted > args.timeout:
                raise SystemExit(f"ceiling: not done after {args.timeout} s")
        end, cpu = time.perf_counter(), cpu_s() - cpu
        done = conn.execute("SELECT count(*) FROM jobs WHERE status='done'").fetchall()[0][0]
        conn.close()
    if done != n:
        raise SystemExit(f"ceiling: {done} rows done, expected {n}")
    return {"items": n, "insert_s": inserted - start, "total_s": end - inserted,
            "rate": n / (end - inserted), "cpu_s": cpu}


# -- huey ----------


def huey_instance(path: str) -> Any:
    from huey import SqliteHuey
    from huey.storage import SqliteStorage

    class NormalSyncStorage(SqliteStorage):
        """huey's SQLite storage with `synchronous=NORMAL` on every connection."""

        def _create_connection(self) -> Any:
            conn = super()._create_connection()
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn

    return SqliteHuey("bench", filename=path, storage_class=NormalSyncStorage)


def child_huey(n: int, args: argparse.Namespace) -> dict[str, Any]:
    timeout = args.timeout
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        huey = huey_instance(os.path.join(tmp, "huey.db"))

        @huey.task()
        def noop(i: int) -> int:
            return 1

        cpu, start = cpu_s(), time.perf_counter()
        for i in range(n):
            noop(i)
        enqueued = time.perf_counter()
        consumer = huey.create_consumer(workers=HUEY_WORKERS, worker_type="thread",
                                        periodic=False, check_worker_health=False)
        consumer.start()
        try:
            while huey.result_count() < n:
                if time.perf_counter() - enqueued > timeout:
                    raise SystemExit(f"huey: {huey.result_count()} of {n} results "
                                     f"after {timeout} s")
                time.sleep(0.01)
            end, cpu = time.perf_counter(), cpu_s() - cpu
        finally:
            consumer.stop(graceful=True)
        huey.storage.close()
    # End to end like minibatch's figure (enqueue -> every result stored): the same
    # definition for both, so the ratio compares like with like.
    return {"items": n, "enqueue_s": enqueued - start, "total_s": end - start,
            "rate": n / (end - start), "cpu_s": cpu}


def child_ceiling_one_statement(n: int, args: argparse.Namespace) -> dict[str, Any]:
    return child_ceiling(n, args, claim=ceiling_claim_one_statement)


CHILDREN = {"minibatch": child_minibatch, "mb-group": child_minibatch_group,
            "mb-workers": child_workers, "mb-group-workers": child_workers_group,
            "mb-worker": child_worker, "mb-store": child_store, "ceiling": child_ceiling,
            "ceiling-1st": child_ceiling_one_statement, "huey": child_huey}


# -- the parent ----------


def run_child(system: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one system in a fresh interpreter and return the figures it printed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", system, "--items", str(n),
           "--timeout", str(args.timeout), "--workers", str(args.workers)]
    if args.dir:
        cmd += ["--dir", args.dir]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 30)
    except subprocess.TimeoutExpired as exc:
        raise SystemExit(f"{system}: timed out after {exc.timeout} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{system} failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(lines[-1])


def report(system: str, r: dict[str, Any]) -> None:
    extra = ""
    for key, label in (("submit_s", "submit"), ("insert_s", "insert"),
                       ("enqueue_s", "enqueue")):
        if key in r:
            extra = f" ({label} {r[key]:.2f} s, timed apart)"
    print(f"{system:<16} {r['items']:>8} items in {r['total_s']:6.2f} s = "
          f"{r['rate']:>9,.0f} items/s{extra}, {cpu_line(r['cpu_s'], r['items'])},"
          f" peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    for i, w in enumerate(r.get("workers", []), start=1):
        print(f"{'':<16}   worker {i}: {w['ran']:>8} items, {cpu_line(w['cpu_s'], w['ran'])},"
              f" peak RSS {w['peak_rss_mib']:.0f} MiB", flush=True)


def cpu_line(cpu: float, items: int) -> str:
    per_item = f"{cpu / items * 1e6:.1f} us/item" if items else "no items"
    return f"CPU {cpu:.2f} s ({per_item})"


def table(results: dict[str, dict[str, Any]]) -> None:
    mb = results["minibatch"]["rate"]
    print()
    print(f"| {'system':<16} | {'items':>8} | {'items/s':>9} | {'minibatch / it':>14} "
          f"| {'CPU us/item':>11} | {'peak RSS MiB':>12} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 11}|{'-' * 16}|{'-' * 13}|{'-' * 14}|")
    for system, r in results.items():
        ratio = "" if system == "minibatch" else f"{mb / r['rate']:.2f}x"
        cpu = r["cpu_s"] + sum(w["cpu_s"] for w in r.get("workers", []))
        rss = max([r["peak_rss_mib"]] + [w["peak_rss_mib"] for w in r.get("workers", [])])
        print(f"| {system:<16} | {r['items']:>8} | {r['rate']:>9,.0f} | {ratio:>14} "
              f"| {cpu / r['items'] * 1e6:>11.1f} | {rss:>12.0f} |")
    print("(CPU: every process of the system; peak RSS: its largest process)")
    if "ceiling" in results:  # like for like: minibatch's clock runs from the submit
        raw = results["ceiling"]
        raw_rate = raw["items"] / (raw["insert_s"] + raw["total_s"])
        print(f"raw end to end (the ceiling's insert + claim + complete): {raw_rate:,.0f}"
              f" items/s; minibatch {mb / raw_rate:.2f}x of it")
    print(f"\nminibatch submit: {results['minibatch']['submit_s']:.2f} s of "
          f"{results['minibatch']['total_s']:.2f} s end to end")
    for who in (s for s in results if s.startswith(("minibatch", "mb-group"))):
        for system, goal in GOALS.items():
            if system in results:
                ratio = results[who]["rate"] / results[system]["rate"]
                verdict = "met" if ratio >= goal else "MISSED"
                print(f"goal {who} >= {goal:g}x {system} (MEASURED.md): {ratio:.2f}x,"
                      f" {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100_000,
                   help="items for minibatch and the ceiling (default 100000)")
    p.add_argument("--ceiling", action="store_true",
                   help="also measure raw apsw claim+complete in groups of 100")
    p.add_argument("--peer", choices=["huey"], action="append", default=[],
                   help="also measure a peer with the same workload")
    p.add_argument("--huey-items", type=int, default=20_000,
                   help="tasks for huey, which is ~3k/s (default 20000)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds one system may take before the run fails (default 60)")
    p.add_argument("--dir", default=None,
                   help="directory for the temporary databases (default: the system's)")
    p.add_argument("--workers", type=int, default=1,
                   help="also run minibatch's items in this many worker processes (> 1)")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)  # a worker's database
    p.add_argument("--group", action="store_true", help=argparse.SUPPRESS)  # its handler
    args = p.parse_args(argv)
    if args.items <= 0 or args.huey_items <= 0 or args.workers <= 0:
        p.error("--items, --huey-items and --workers must be > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        emit(CHILDREN[args.child](args.items, args))
        return
    plan = [("minibatch", args.items), ("mb-group", args.items)]
    if args.workers > 1:
        plan += [("mb-workers", args.items), ("mb-group-workers", args.items)]
    if args.ceiling:
        plan += [("mb-store", args.items), ("ceiling", args.items),
                 ("ceiling-1st", args.items)]
    if "huey" in args.peer:
        plan.append(("huey", args.huey_items))
    results: dict[str, dict[str, Any]] = {}
    for child, n in plan:
        system = child.replace("-workers", f"-w{args.workers}").replace("mb-w", "minibatch-w")
        results[system] = run_child(child, n, args)
        report(system, results[system])
    table(results)


if __name__ == "__main__":
    main()
