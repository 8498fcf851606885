"""`minibatch serve --workers N`: items/s through 1, 2, ... worker processes, in one run.

For each N in `--workers` (default 1 2), a fresh database and `minibatch serve --workers N`
on a free port of 127.0.0.1; `--items` items are uploaded as JSONL (`POST /v1/files`) and
submitted by `input_file_id`, and the batch is polled every 50 ms until it is terminal.
Reported per N: items/s from the submit to the end, and the ratio to N=1 of the same run.
Two workloads: `echo` (no-op items, 100 per call: the database's write lock is the limit)
and `sleep` items of `--sleep-s` (the CPU of the event loops is the limit). `--workers 1`
runs the items in the API's own process, as serve always did; N > 1 runs none there.

On this 2-core machine the serve process, the workers and this script share two cores,
so N = 2 cannot double anything; the figures show what the split costs or buys.

    .venv/bin/python bench/workers.py [--items 200000] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def call(method: str, url: str, key: str, body: bytes | None = None,
         ctype: str = "application/json") -> dict:
    req = urllib.request.Request(url, data=body, method=method, headers={
        "authorization": f"Bearer {key}", "content-type": ctype})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def one_run(tmp: str, workers: int, kind: str, n: int, sleep_s: float) -> float:
    db = os.path.join(tmp, f"{kind}-{workers}.db")
    key = json.loads(subprocess.run(
        [sys.executable, "-m", "minibatch", "keys", "create", "--tenant", "bench", "--db", db],
        check=True, capture_output=True, text=True).stdout)["api_key"]
    port = free_port()
    base = f"http://{HOST}:{port}"
    with open(os.path.join(tmp, f"serve-{kind}-{workers}.log"), "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "minibatch", "serve", "--db", db, "--host", HOST,
             "--port", str(port), "--workers", str(workers)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"serve --workers {workers} did not start") from None
                time.sleep(0.05)
        line = (json.dumps({"input": {"seconds": sleep_s}}) if kind == "sleep"
                else '{"input":{"n":1}}').encode() + b"\n"
        file = call("POST", base + "/v1/files", key, line * n, "application/jsonl")
        started = time.perf_counter()
        batch = call("POST", base + "/v1/batches", key,
                     json.dumps({"kind": kind, "input_file_id": file["id"]}).encode())
        while batch["status"] not in ("completed", "failed", "cancelled"):
            time.sleep(0.05)
            batch = call("GET", f"{base}/v1/batches/{batch['id']}", key)
        elapsed = time.perf_counter() - started
        if batch["metrics"]["succeeded"] != n:
            raise SystemExit(f"batch ended {batch['status']}: {batch['metrics']}")
        return n / elapsed
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--sleep-items", type=int, default=100_000)
    p.add_argument("--sleep-s", type=float, default=0.05)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    print(f"{os.cpu_count()} cores; echo: {args.items:,} items, sleep: {args.sleep_items:,}"
          f" items of {args.sleep_s:g} s (1000 at a time per process)")
    print(f"| {'kind':<6} | {'workers':>7} | {'items/s':>9} | {'/ workers 1':>11} |")
    print(f"|{'-' * 8}|{'-' * 9}|{'-' * 11}|{'-' * 13}|")
    with tempfile.TemporaryDirectory(prefix="minibatch-workers-") as tmp:
        for kind, n in (("echo", args.items), ("sleep", args.sleep_items)):
            first = None
            for workers in args.workers:
                rate = one_run(tmp, workers, kind, n, args.sleep_s)
                first = first or rate
                print(f"| {kind:<6} | {workers:>7} | {rate:>9,.0f} | {rate / first:>10.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
