"""Chat requests through minibatch's OpenAI Batch dialect, against the same requests sent
straight to the upstream, in one run.

What is measured:

* upstream (its own process, so it does not share a GIL with either client):
  tests/upstream.py in fast mode (aiohttp, on uvloop when installed), answering every
  `POST /v1/chat/completions` 200 with one prebuilt ChatCompletion. It counts the POSTs and
  reports them with its CPU time on `GET /stats`, so the bench can check that each system
  sent exactly `--requests` and that the upstream was not the bottleneck.
* direct: `--requests` chat bodies, encoded beforehand, POSTed by `--concurrency` tasks
  sharing one `aiohttp.ClientSession` (connection limit `--concurrency`); each answer is
  read and parsed. The ceiling a batch runner's upstream client sits on.
* minibatch: `minibatch serve` in a subprocess on a fresh SQLite file, with
  `--openai-upstream` (through `MINIBATCH_OPENAI_UPSTREAM`) and
  `MINIBATCH_OPENAI_UPSTREAM_CONCURRENCY=--concurrency`, every other setting default. The
  same bodies as JSONL lines are uploaded with the `openai` SDK
  (`files.create(purpose="batch")`), then `batches.create` starts the clock, and the batch
  is polled (every 50 ms) until it is terminal. Reported: requests/s from the create until
  the batch was seen `completed`, the upload time on its own, the span between the first
  and the last request the upstream received, and the server process's peak RSS
  (VmHWM) and CPU seconds. The batch must end `completed` with every request completed
  and one output line each, or the script fails.

Goal: minibatch / direct >= 0.8 at the same concurrency.

    .venv/bin/python bench/openai_batch.py --requests 10000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL = 0.8  # minibatch / direct
POLL_S = 0.05
CHAT = "/v1/chat/completions"


# -- the upstream (a subprocess) ----------


class FastUpstream:
    """tests/upstream.py --fast in its own process: started on enter, reaped on exit."""

    def __enter__(self) -> FastUpstream:
        flags = ["--fast"]
        try:
            import uvloop  # noqa: F401
        except ImportError:
            pass
        else:
            flags.append("--uvloop")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.upstream", *flags],
                                     cwd=str(ROOT), stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.__exit__()
            raise SystemExit(f"upstream did not start (said {line!r})")
        self.base = f"http://127.0.0.1:{int(line)}"
        self.url = self.base + "/v1"
        return self

    def stats(self, reset: bool = False) -> dict[str, Any]:
        request = urllib.request.Request(self.base + ("/stats/reset" if reset else "/stats"),
                                         method="POST" if reset else "GET")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def bodies(n: int) -> list[dict[str, Any]]:
    return [{"model": "fast", "max_tokens": 16,
             "messages": [{"role": "system", "content": "You answer briefly."},
                          {"role": "user", "content": f"request number {i}"}]}
            for i in range(n)]


def check_upstream(system: str, got: dict[str, Any], n: int) -> None:
    if got["requests"] != n:
        raise SystemExit(f"{system}: the upstream got {got['requests']} requests, expected {n}")


# -- direct ----------


async def direct_run(url: str, payloads: list[bytes], concurrency: int) -> dict[str, Any]:
    import aiohttp

    todo = iter(payloads)
    failures: list[int] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        for payload in todo:
            async with session.post(url + "/chat/completions", data=payload,
                                    headers={"content-type": "application/json",
                                             "authorization": "Bearer sk-direct"}) as resp:
                body = await resp.read()
                if resp.status != 200:
                    failures.append(resp.status)
                json.loads(body)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"direct: {len(failures)} requests failed (e.g. {failures[0]})")
    return {"requests": len(payloads), "total_s": elapsed, "rate": len(payloads) / elapsed}


# -- minibatch ----------


def proc_figures(pid: int) -> dict[str, float]:
    """Peak RSS (VmHWM, MiB) and CPU seconds of a live process, from /proc."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"peak_rss_mib": rss, "cpu_s": (int(fields[11]) + int(fields[12])) / ticks}


def minibatch_run(upstream: FastUpstream, payloads: list[dict[str, Any]], concurrency: int,
                  timeout: float, workdir: str | None) -> dict[str, Any]:
    import openai

    from tests.serve import Served

    n = len(payloads)
    data = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT,
                                "body": body}).encode() + b"\n"
                    for i, body in enumerate(payloads))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        served = Served(Path(tmp), env={
            "MINIBATCH_OPENAI_UPSTREAM": upstream.url,
            "MINIBATCH_OPENAI_UPSTREAM_CONCURRENCY": str(concurrency)})
        try:
            client = openai.OpenAI(base_url=f"{served.url}/openai/v1",
                                   api_key=served.key["api_key"], max_retries=0, timeout=60)
            upload_start = time.perf_counter()
            file = client.files.create(file=("bench.jsonl", data), purpose="batch")
            upload_s = time.perf_counter() - upload_start
            upstream.stats(reset=True)
            start = time.perf_counter()
            batch = client.batches.create(input_file_id=file.id, endpoint=CHAT,
                                          completion_window="24h")
            while batch.status not in ("completed", "failed", "cancelled", "expired"):
                if time.perf_counter() - start > timeout:
                    raise SystemExit(f"minibatch: batch still {batch.status} after {timeout} s"
                                     f" ({batch.request_counts})")
                time.sleep(POLL_S)
                batch = client.batches.retrieve(batch.id)
            elapsed = time.perf_counter() - start
            figures = proc_figures(served.proc.pid)
            seen = upstream.stats()
            counts = batch.request_counts
            if batch.status != "completed" or counts is None or counts.completed != n:
                raise SystemExit(f"minibatch: batch ended {batch.status!r} with {counts}, "
                                 f"expected completed with {n} completed\n{served.log_tail()}")
            output = client.files.content(batch.output_file_id).text.splitlines()
            if len(output) != n:
                raise SystemExit(f"minibatch: {len(output)} output lines, expected {n}")
        finally:
            served.stop()
    check_upstream("minibatch", seen, n)
    span = (seen["last_at"] - seen["first_at"]) if seen["first_at"] else 0.0
    return {"requests": n, "total_s": elapsed, "rate": n / elapsed, "upload_s": upload_s,
            "upstream_span_s": span, **figures}


# -- report ----------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000, help="chat requests per system")
    p.add_argument("--concurrency", type=int, default=16,
                   help="requests in flight to the upstream, for both systems")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per system, at most")
    p.add_argument("--dir", default=None, help="where the temporary database goes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n, c = args.requests, args.concurrency
    payloads = bodies(n)
    with FastUpstream() as upstream:
        print(f"upstream {upstream.url} (fast fake, own process), {n} chat requests, "
              f"{c} in flight", flush=True)
        before = upstream.stats()
        direct = asyncio.run(direct_run(upstream.url, [json.dumps(b).encode()
                                                       for b in payloads], c))
        after = upstream.stats()
        check_upstream("direct", {"requests": after["requests"] - before["requests"]}, n)
        direct["upstream_cpu_s"] = after["cpu_s"] - before["cpu_s"]
        print(f"direct     {n:>7} requests in {direct['total_s']:6.2f} s = "
              f"{direct['rate']:>8,.0f} req/s  (aiohttp, one session; upstream CPU "
              f"{direct['upstream_cpu_s']:.1f} s)", flush=True)
        cpu_before = upstream.stats()["cpu_s"]
        mb = minibatch_run(upstream, payloads, c, args.timeout, args.dir)
        mb["upstream_cpu_s"] = upstream.stats()["cpu_s"] - cpu_before
        print(f"minibatch  {n:>7} requests in {mb['total_s']:6.2f} s = {mb['rate']:>8,.0f} "
              f"req/s  (create -> seen completed; upload {mb['upload_s']:.2f} s before)")
        print(f"           upstream saw them over {mb['upstream_span_s']:.2f} s; server peak "
              f"RSS {mb['peak_rss_mib']:.1f} MiB, CPU {mb['cpu_s']:.1f} s; upstream CPU "
              f"{mb['upstream_cpu_s']:.1f} s")
    ratio = mb["rate"] / direct["rate"]
    print()
    print(f"| {'system':<10} | {'requests':>8} | {'req/s':>8} | {'seconds':>7} "
          f"| {'peak RSS MiB':>12} |")
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 9}|{'-' * 14}|")
    print(f"| {'direct':<10} | {n:>8} | {direct['rate']:>8,.0f} | {direct['total_s']:>7.2f} "
          f"| {'-':>12} |")
    print(f"| {'minibatch':<10} | {n:>8} | {mb['rate']:>8,.0f} | {mb['total_s']:>7.2f} "
          f"| {mb['peak_rss_mib']:>12.1f} |")
    verdict = "met" if ratio >= GOAL else "MISSED"
    print(f"\nratio minibatch / direct: {ratio:.2f} (goal >= {GOAL}: {verdict})")


if __name__ == "__main__":
    main()
