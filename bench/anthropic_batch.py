"""Message requests through minibatch's Anthropic Message Batches dialect, against the same
requests sent straight to the upstream, in one run.

Two paths (`--path anthropic`, `--path translate`; the default runs both):

* anthropic: minibatch with `MINIBATCH_ANTHROPIC_UPSTREAM` set to the fake upstream's root,
  so each request's `params` is POSTed to its `/v1/messages`. Direct: the same `params`
  POSTed to `/v1/messages` (with `x-api-key` and `anthropic-version`).
* translate: minibatch with only `MINIBATCH_OPENAI_UPSTREAM` set, so each request is
  translated to `/chat/completions` and the reply mapped back to a Message. Direct: the
  chat bodies the translation would send (system message first, `max_tokens`) POSTed to
  `/v1/chat/completions`.

What is measured:

* upstream (its own process, so it shares a GIL with neither client): tests/upstream.py in
  fast mode (aiohttp, on uvloop when installed), answering every POST 200 with one
  prebuilt Message or ChatCompletion. It counts the POSTs and reports them with its CPU
  time on `GET /stats`, so the bench can check that each system sent exactly `--requests`
  and that the upstream was not the bottleneck.
* direct: `--requests` bodies, encoded beforehand, POSTed by `--concurrency` tasks sharing
  one `aiohttp.ClientSession` (connection limit `--concurrency`); each answer is read and
  parsed. The ceiling a batch runner's upstream client sits on.
* minibatch: `minibatch serve` in a subprocess on a fresh SQLite file, the upstream set
  through MINIBATCH_* variables with its concurrency = `--concurrency`, every other setting
  default. The clock starts before `messages.batches.create(requests=...)` (the `anthropic`
  SDK; the requests travel in that one call, so their validation and storage are inside
  the measured time), and the batch is polled (every 50 ms) until it is `ended`. Reported:
  requests/s from the create until the batch was seen ended, the create call on its own,
  the span between the first and the last request the upstream received, and the server
  process's peak RSS (VmHWM) and CPU seconds. The batch must end with every request
  succeeded and one result line each, or the script fails.

Goal: minibatch / direct >= 0.8 at the same concurrency, on each path.

    .venv/bin/python bench/anthropic_batch.py --requests 10000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.openai_batch import FastUpstream, check_upstream, proc_figures  # noqa: E402

GOAL = 0.8  # minibatch / direct
POLL_S = 0.05
MESSAGES = "/v1/messages"
CHAT = "/v1/chat/completions"
VERSION = "2023-06-01"
SYSTEM = "You answer briefly."
PATHS = ("anthropic", "translate")


def params(n: int) -> list[dict[str, Any]]:
    return [{"model": "fast", "max_tokens": 16, "system": SYSTEM,
             "messages": [{"role": "user", "content": f"request number {i}"}]}
            for i in range(n)]


def chat_bodies(anthropic_params: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the translation sends for each request: the same turns after a system one."""
    return [{"model": p["model"], "max_tokens": p["max_tokens"],
             "messages": [{"role": "system", "content": p["system"]}, *p["messages"]]}
            for p in anthropic_params]


# -- direct ----------


async def direct_run(url: str, headers: dict[str, str], payloads: list[bytes],
                     concurrency: int) -> dict[str, Any]:
    import aiohttp

    todo = iter(payloads)
    failures: list[int] = []
    headers = {"content-type": "application/json", **headers}

    async def worker(session: aiohttp.ClientSession) -> None:
        for payload in todo:
            async with session.post(url, data=payload, headers=headers) as resp:
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


def direct(path: str, upstream: FastUpstream, payloads: list[dict[str, Any]],
           concurrency: int) -> dict[str, Any]:
    n = len(payloads)
    if path == "anthropic":
        url, headers = upstream.base + MESSAGES, {"x-api-key": "sk-direct",
                                                  "anthropic-version": VERSION}
        bodies = payloads
    else:
        url, headers = upstream.url + "/chat/completions", {"authorization": "Bearer sk-direct"}
        bodies = chat_bodies(payloads)
    before = upstream.stats()
    got = asyncio.run(direct_run(url, headers, [json.dumps(b).encode() for b in bodies],
                                 concurrency))
    after = upstream.stats()
    check_upstream(f"direct ({path})", {"requests": after["requests"] - before["requests"]}, n)
    got["upstream_cpu_s"] = after["cpu_s"] - before["cpu_s"]
    return got


# -- minibatch ----------


def minibatch_run(path: str, upstream: FastUpstream, payloads: list[dict[str, Any]],
                  concurrency: int, timeout: float, workdir: str | None) -> dict[str, Any]:
    import anthropic

    from tests.serve import Served

    n = len(payloads)
    requests = [{"custom_id": f"r{i}", "params": p} for i, p in enumerate(payloads)]
    if path == "anthropic":
        env = {"MINIBATCH_ANTHROPIC_UPSTREAM": upstream.base,
               "MINIBATCH_ANTHROPIC_UPSTREAM_CONCURRENCY": str(concurrency)}
    else:
        env = {"MINIBATCH_OPENAI_UPSTREAM": upstream.url,
               "MINIBATCH_OPENAI_UPSTREAM_CONCURRENCY": str(concurrency)}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        served = Served(Path(tmp), env=env)
        try:
            client = anthropic.Anthropic(base_url=f"{served.url}/anthropic",
                                         api_key=served.key["api_key"], max_retries=0,
                                         timeout=120)
            upstream.stats(reset=True)
            cpu_before = upstream.stats()["cpu_s"]
            start = time.perf_counter()
            batch = client.messages.batches.create(requests=requests)
            create_s = time.perf_counter() - start
            while batch.processing_status != "ended":
                if time.perf_counter() - start > timeout:
                    raise SystemExit(f"minibatch ({path}): batch still "
                                     f"{batch.processing_status} after {timeout} s "
                                     f"({batch.request_counts})")
                time.sleep(POLL_S)
                batch = client.messages.batches.retrieve(batch.id)
            elapsed = time.perf_counter() - start
            figures = proc_figures(served.proc.pid)
            seen = upstream.stats()
            counts = batch.request_counts
            if counts.succeeded != n:
                raise SystemExit(f"minibatch ({path}): batch ended with {counts}, expected "
                                 f"{n} succeeded\n{served.log_tail()}")
            results = sum(1 for r in client.messages.batches.results(batch.id)
                          if r.result.type == "succeeded")
            if results != n:
                raise SystemExit(f"minibatch ({path}): {results} succeeded results, "
                                 f"expected {n}")
        finally:
            served.stop()
    check_upstream(f"minibatch ({path})", seen, n)
    span = (seen["last_at"] - seen["first_at"]) if seen["first_at"] else 0.0
    return {"requests": n, "total_s": elapsed, "rate": n / elapsed, "create_s": create_s,
            "upstream_span_s": span, "upstream_cpu_s": seen["cpu_s"] - cpu_before,
            **figures}


# -- report ----------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000, help="requests per system")
    p.add_argument("--concurrency", type=int, default=16,
                   help="requests in flight to the upstream, for both systems")
    p.add_argument("--path", choices=(*PATHS, "both"), default="both",
                   help="anthropic: a native Anthropic upstream; translate: only an OpenAI"
                        " upstream; both (default)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per system, at most")
    p.add_argument("--dir", default=None, help="where the temporary database goes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n, c = args.requests, args.concurrency
    paths = PATHS if args.path == "both" else (args.path,)
    payloads = params(n)
    rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    with FastUpstream() as upstream:
        print(f"upstream {upstream.base} (fast fake, own process), {n} requests per system, "
              f"{c} in flight", flush=True)
        warm = payloads[:min(n, 500)]  # the upstream's first requests are slower: not timed
        for path in paths:
            direct(path, upstream, warm, c)
        for path in paths:
            endpoint = MESSAGES if path == "anthropic" else CHAT
            d = direct(path, upstream, payloads, c)
            print(f"[{path}] direct     {n:>7} requests in {d['total_s']:6.2f} s = "
                  f"{d['rate']:>8,.0f} req/s  (aiohttp to {endpoint}; upstream CPU "
                  f"{d['upstream_cpu_s']:.1f} s)", flush=True)
            mb = minibatch_run(path, upstream, payloads, c, args.timeout, args.dir)
            print(f"[{path}] minibatch  {n:>7} requests in {mb['total_s']:6.2f} s = "
                  f"{mb['rate']:>8,.0f} req/s  (create -> seen ended; the create call "
                  f"{mb['create_s']:.2f} s of it)")
            print(f"[{path}]            upstream saw them over {mb['upstream_span_s']:.2f} s; "
                  f"server peak RSS {mb['peak_rss_mib']:.1f} MiB, CPU {mb['cpu_s']:.1f} s; "
                  f"upstream CPU {mb['upstream_cpu_s']:.1f} s", flush=True)
            rows.append((path, d, mb))
    print()
    print(f"| {'path':<9} | {'system':<9} | {'requests':>8} | {'req/s':>8} | {'seconds':>7} "
          f"| {'peak RSS MiB':>12} |")
    print(f"|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 9}|{'-' * 14}|")
    for path, d, mb in rows:
        print(f"| {path:<9} | {'direct':<9} | {n:>8} | {d['rate']:>8,.0f} "
              f"| {d['total_s']:>7.2f} | {'-':>12} |")
        print(f"| {path:<9} | {'minibatch':<9} | {n:>8} | {mb['rate']:>8,.0f} "
              f"| {mb['total_s']:>7.2f} | {mb['peak_rss_mib']:>12.1f} |")
    print()
    for path, d, mb in rows:
        ratio = mb["rate"] / d["rate"]
        verdict = "met" if ratio >= GOAL else "MISSED"
        print(f"ratio minibatch / direct ({path}): {ratio:.2f} (goal >= {GOAL}: {verdict})")


if __name__ == "__main__":
    main()
