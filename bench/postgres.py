"""Items/s through 1, 2 and 3 `minibatch serve` processes sharing one PostgreSQL
database, against procrastinate running the same jobs on the same server, in one run.

For each workload (`noop`: minibatch's grouped `echo`; `1ms`: a 1 ms sleep per item) and
each process count P, a fresh database:
- minibatch: P `minibatch serve --db postgresql://…` processes; `--items` items uploaded
  as JSONL to the first and submitted by `input_file_id`; timed from the submit (which
  writes every item) to the batch's end, polled every 50 ms.
- procrastinate: its schema applied and P worker processes started
  (`run_worker_async(concurrency=--peer-concurrency)`, woken by its LISTEN/NOTIFY);
  timed from the deferral of `--items` jobs (`batch_defer_async`, 1,000 at a time, which
  writes every job) until all have succeeded, polled every 50 ms.
Printed: items/s of each, and minibatch / procrastinate.

    .venv/bin/python bench/postgres.py [--url postgresql://postgres@127.0.0.1:5432/postgres]
        [--items 20000] [--processes 1 2 3]

Without `--url` it starts a throwaway cluster (tests/postgres.py: initdb, fsync off).
Needs procrastinate (`pip install procrastinate`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import psycopg  # noqa: E402
from workers import call  # noqa: E402  (bench/workers.py)

from tests import postgres  # noqa: E402
from tests.receiver import free_port  # noqa: E402

HOST = "127.0.0.1"
PEER = textwrap.dedent("""
    import asyncio, logging, sys
    import procrastinate

    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=sys.argv[1]))

    @app.task(name="noop")
    async def noop(n):
        return n

    @app.task(name="sleep")
    async def sleep(n):
        await asyncio.sleep(0.001)

    async def main(role, count, concurrency):
        async with app.open_async():
            if role == "schema":
                await app.schema_manager.apply_schema_async()
            elif role == "defer":
                task = noop if sys.argv[5] == "noop" else sleep
                for start in range(0, count, 1000):
                    await task.batch_defer_async(
                        *({"n": i} for i in range(start, min(count, start + 1000))))
            else:
                await app.run_worker_async(concurrency=concurrency)

    asyncio.run(main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
""")


def fresh(admin: str, name: str) -> str:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return admin.rsplit("/", 1)[0] + "/" + name


def minibatch_rate(url: str, processes: int, workload: str, n: int, tmp: str) -> float:
    key = json.loads(subprocess.run(
        [sys.executable, "-m", "minibatch", "keys", "create", "--tenant", "bench", "--db",
         url], check=True, capture_output=True, text=True).stdout)["api_key"]
    servers, bases = [], []
    for p in range(processes):
        port = free_port()
        with open(os.path.join(tmp, f"serve-{workload}-{processes}-{p}.log"), "w") as log:
            servers.append(subprocess.Popen(
                [sys.executable, "-m", "minibatch", "serve", "--db", url, "--host", HOST,
                 "--port", str(port), "--no-access-log"], stdout=log, stderr=log))
        bases.append(f"http://{HOST}:{port}")
    try:
        for base, server in zip(bases, servers, strict=True):
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(base + "/healthz", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit(f"serve did not start: see {tmp}") from None
                    time.sleep(0.05)
        kind = "echo" if workload == "noop" else "sleep"
        line = (b'{"input":{"n":1}}' if kind == "echo" else b'{"input":{"seconds":0.001}}')
        file = call("POST", bases[0] + "/v1/files", key, (line + b"\n") * n,
                    "application/jsonl")
        started = time.perf_counter()
        batch = call("POST", bases[0] + "/v1/batches", key,
                     json.dumps({"kind": kind, "input_file_id": file["id"]}).encode())
        while batch["status"] not in ("completed", "failed", "cancelled"):
            time.sleep(0.05)
            batch = call("GET", f"{bases[0]}/v1/batches/{batch['id']}", key)
        elapsed = time.perf_counter() - started
        if batch["metrics"]["succeeded"] != n:
            raise SystemExit(f"batch ended {batch['status']}: {batch['metrics']}")
        return n / elapsed
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(timeout=60)


def procrastinate_rate(url: str, processes: int, workload: str, n: int, concurrency: int,
                       script: str) -> float:
    def peer(role: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, script, url, role, str(n), str(concurrency),
                                 workload])

    if peer("schema").wait(timeout=600) != 0:
        raise SystemExit("procrastinate's schema failed")
    workers = [peer("work") for _ in range(processes)]
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            deadline = time.monotonic() + 60  # each worker registers itself when it starts
            while conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0] < (
                    processes):
                if time.monotonic() > deadline:
                    raise SystemExit("procrastinate's workers did not start")
                time.sleep(0.05)
            started = time.perf_counter()
            if peer("defer").wait(timeout=600) != 0:
                raise SystemExit("procrastinate's defer failed")
            deadline = time.monotonic() + 1800
            while conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status ="
                               " 'succeeded'").fetchone()[0] < n:
                if time.monotonic() > deadline:
                    raise SystemExit("procrastinate did not finish in 30 min")
                time.sleep(0.05)
            return n / (time.perf_counter() - started)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="an admin URL of a PostgreSQL server (default: a"
                                 " throwaway cluster)")
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--peer-concurrency", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="minibatch-pg-bench-") as tmp:
        cluster = None
        admin = args.url
        if admin is None:
            cluster = tempfile.mkdtemp(prefix="minibatch-pg-")  # the postgres user reaches it
            admin = postgres.start(cluster)
        script = os.path.join(tmp, "peer.py")
        with open(script, "w") as f:
            f.write(PEER)
        try:
            print(f"{os.cpu_count()} cores; {args.items:,} items per run; procrastinate"
                  f" workers at concurrency {args.peer_concurrency}")
            print(f"| {'workload':<8} | {'processes':>9} | {'minibatch/s':>11} |"
                  f" {'procrastinate/s':>15} | {'ratio':>6} |")
            print(f"|{'-' * 10}|{'-' * 11}|{'-' * 13}|{'-' * 17}|{'-' * 8}|")
            for workload in ("noop", "1ms"):
                for processes in args.processes:
                    ours = minibatch_rate(fresh(admin, "bench_mb"), processes, workload,
                                          args.items, tmp)
                    theirs = procrastinate_rate(fresh(admin, "bench_peer"), processes,
                                                workload, args.items,
                                                args.peer_concurrency, script)
                    print(f"| {workload:<8} | {processes:>9} | {ours:>11,.0f} |"
                          f" {theirs:>15,.0f} | {ours / theirs:>5.1f}x |", flush=True)
        finally:
            if cluster is not None:
                postgres.stop(cluster)
                shutil.rmtree(cluster, ignore_errors=True)


if __name__ == "__main__":
    main()
