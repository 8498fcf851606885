"""Does a big upload hold the event loop? `/healthz` latency during a JSONL upload.

A real `minibatch serve` on 127.0.0.1 (its own subprocess, a temp database). One client
polls `GET /healthz` back to back, first with nothing else going on (the baseline), then
while another client (a subprocess of its own) uploads `--mib` MiB of tiny lines
(`{"input":1}`, 12 bytes each) to `POST /v1/files`. Printed: p50, p99 and max of each,
the upload's own time, and the ratio of the upload-time p99 and max to the baseline's.
Before uploads were validated in a worker thread and stored in chunks, /healthz waited
the whole parse (42 s for 100 MiB).

    .venv/bin/python bench/upload_stall.py --mib 100
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

UPLOADER = """
import sys, httpx
url, key, path = sys.argv[1:]
with open(path, "rb") as f:
    data = f.read()
print(httpx.post(url + "/v1/files", content=data, timeout=600,
                 headers={"x-api-key": key}).status_code)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll_health(url: str, until: threading.Event, limit_s: float) -> list[float]:
    """Seconds per /healthz answer, polled back to back until `until` is set."""
    latencies = []
    deadline = time.monotonic() + limit_s
    with httpx.Client(timeout=300) as client:
        while not until.is_set() and time.monotonic() < deadline:
            start = time.perf_counter()
            client.get(url + "/healthz").raise_for_status()
            latencies.append(time.perf_counter() - start)
    return latencies


def summary(latencies: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000, ordered[-1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="upload size (default 100)")
    parser.add_argument("--baseline-s", type=float, default=3.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db, port = os.path.join(tmp, "bench.db"), free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "MINIBATCH_DB": db, "MINIBATCH_PORT": str(port),
               "MINIBATCH_MAX_FILE_BYTES": str((args.mib + 1) * 1024 * 1024)}
        server = subprocess.Popen([sys.executable, "-m", "minibatch", "serve"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    httpx.get(url + "/healthz")
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            key = json.loads(subprocess.run(
                [sys.executable, "-m", "minibatch", "keys", "create", "--tenant", "bench",
                 "--db", db], capture_output=True, text=True, check=True).stdout)["api_key"]

            idle = poll_health(url, threading.Event(), args.baseline_s)
            path = os.path.join(tmp, "items.jsonl")
            lines = args.mib * 1024 * 1024 // 12
            with open(path, "wb") as f:
                f.write(b'{"input":1}\n' * lines)
            # The uploader is a process of its own, so its work never delays the poller.
            done = threading.Event()
            timing: dict[str, float] = {}

            def upload() -> None:
                start = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", UPLOADER, url, key, path],
                                     capture_output=True, text=True, check=True)
                timing["upload_s"] = time.perf_counter() - start
                timing["status"] = float(out.stdout)
                done.set()

            thread = threading.Thread(target=upload)
            thread.start()
            busy = poll_health(url, done, 600)
            thread.join()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    i50, i99, imax = summary(idle)
    b50, b99, bmax = summary(busy)
    print(f"upload: {args.mib} MiB, {lines:,} lines, HTTP {timing['status']:.0f},"
          f" {timing['upload_s']:.1f} s")
    print(f"/healthz idle:          n={len(idle):6d}  p50 {i50:6.2f} ms  p99 {i99:7.2f} ms"
          f"  max {imax:7.1f} ms")
    print(f"/healthz during upload: n={len(busy):6d}  p50 {b50:6.2f} ms  p99 {b99:7.2f} ms"
          f"  max {bmax:7.1f} ms")
    print(f"ratio during/idle: p99 {b99 / i99:.1f}x, max {bmax / imax:.1f}x;"
          f" longest stall {bmax / 1000 / timing['upload_s'] * 100:.1f} % of the upload")


if __name__ == "__main__":
    main()
