"""Webhook delivery throughput of minibatch to a local receiver, and the cost of a payload.

What is measured (the receiver always runs in its own subprocess, so it does not share a
core or an event loop with the sender):

* receiver: a raw asyncio protocol on 127.0.0.1 (uvloop when installed) answering every
  POST with `204 No Content` on a kept-alive connection. It counts POSTs, POSTs carrying a
  `webhook-signature: v1,…` header and body bytes, and reports them with its own CPU time
  on `GET /stats`, so the bench can check the receiver was not the bottleneck.
* minibatch (always): a fresh SQLite file, `allow_private_webhooks=True`,
  `webhook_concurrency=50`, `webhook_per_host=50`, `poll_interval_s=0.02`, one no-op async
  handler (`concurrency=200`), one batch of `--items` items submitted with
  `webhook={"url": …, "events": ["item.succeeded"]}`: one signed delivery per item, every
  attempt recorded in SQLite. Reported: deliveries/s from the start of `submit` until no
  delivery is pending (end to end), and from the moment the batch is terminal over the
  deliveries still pending then; the CPU seconds of both processes. The receiver must have
  got exactly `--items` signed POSTs and the batch's delivery summary must say `--items`
  succeeded, or the script fails.
* aiohttp alone (always): the same number of `item.succeeded` bodies, encoded beforehand,
  signed per request with `minibatch.signing.headers` and POSTed by 50 tasks sharing one
  `aiohttp.ClientSession` (limit 50): the client ceiling minibatch's deliverer sits on.
* encode + sign: `msgspec` encoding of a ~700-byte `minibatch.models.Event` carrying a
  `Batch`, then `minibatch.signing.headers([key], msg_id, ts, body)`; against `json.dumps`
  of the same data as a dict + `hmac.new` + base64 + the same headers. Median of 5 runs.
* `--peer httpx`: `--peer-items` of the same signed bodies through one shared
  `httpx.AsyncClient` (50 connections) from 50 tasks.

Reference figures and goals: /work/shared/MEASURED.md, "Webhook delivery" and "Encoding and
signing" (aiohttp alone ~9.8k/s, httpx shared client ~0.7k/s; msgspec + sign ~3.6 us, json +
hmac ~8.8 us). Goal: minibatch end to end >= 2,000 deliveries/s (the issue), >= 5,000/s
(MEASURED.md), every attempt recorded. `--profile` runs the minibatch part under cProfile.

    .venv/bin/python bench/webhooks.py --peer httpx
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import hashlib
import hmac
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

CONCURRENCY = 50  # deliveries in flight, for minibatch and every client alike
POLL_S = 0.01  # how often the bench looks at the batch and the pending deliveries
GOALS = {"the issue": 2_000.0, "MEASURED.md": 5_000.0}  # deliveries/s, every attempt recorded
CODEC_LOOPS = 20_000  # payloads per timed run of encode / sign
CODEC_RUNS = 5

# -- the receiver (a subprocess) ----------


class ReceiverProtocol(asyncio.Protocol):
    """HTTP/1.1 just far enough: Content-Length bodies, keep-alive, 204 to every POST."""

    stats = {"posts": 0, "signed": 0, "body_bytes": 0}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        stats = self.stats
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head = buf[:end].lower()
            length = 0
            if (i := head.find(b"\ncontent-length:")) >= 0:
                j = head.find(b"\r", i)
                length = int(head[i + 16:j if j >= 0 else None])
            total = end + 4 + length
            if len(buf) < total:
                break
            buf = buf[total:]
            if head.startswith(b"post "):
                stats["posts"] += 1
                stats["signed"] += b"\nwebhook-signature: v1," in head
                stats["body_bytes"] += length
                self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:  # GET /stats, then close
                usage = resource.getrusage(resource.RUSAGE_SELF)
                body = json.dumps({**stats, "cpu_s": usage.ru_utime + usage.ru_stime}).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(body), body))
                self.transport.close()
                return
        self.buf = buf


async def receiver_serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(ReceiverProtocol, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def receiver_main() -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(receiver_serve())
    else:
        uvloop.run(receiver_serve())


class Receiver:
    """The receiver subprocess: started on enter, stopped (and reaped) on exit."""

    def __enter__(self) -> Receiver:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--receiver"],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.__exit__()
            raise SystemExit(f"receiver did not start (said {line!r})")
        self.base = f"http://127.0.0.1:{int(line)}"
        self.url = self.base + "/hook"
        return self

    def stats(self) -> dict[str, float]:
        with urllib.request.urlopen(self.base + "/stats", timeout=10) as resp:
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


def stats_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after}


# -- helpers ----------


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_async(fn: Callable[..., Awaitable[Any]], *args: Any, loop: str) -> Any:
    import anyio

    return anyio.run(fn, *args, backend="asyncio",
                     backend_options={"use_uvloop": loop == "uvloop"})


def check_received(system: str, got: dict[str, float], n: int) -> None:
    if got["posts"] != n or got["signed"] != n:
        raise SystemExit(f"{system}: the receiver got {got['posts']:.0f} POSTs "
                         f"({got['signed']:.0f} signed), expected {n}")


# -- minibatch ----------


async def until_delivered(mb: Any, batch_id: str, start: float, timeout: float
                          ) -> tuple[float, int] | str:
    """Poll until the batch is terminal and no delivery is pending: (when the batch became
    terminal, deliveries pending then), or why not if `timeout` passes first."""
    import anyio

    terminal_at, pending_at_terminal = None, 0
    while True:
        if time.perf_counter() - start > timeout:
            return (f"minibatch: {mb.store.deliveries_pending_count()} deliveries pending after"
                    f" {timeout} s (batch {mb.store.batch_status(batch_id)})")
        if terminal_at is None and mb.store.batch_status(batch_id) in (
                "completed", "failed", "cancelled"):
            terminal_at = time.perf_counter()
            pending_at_terminal = mb.store.deliveries_pending_count()
        if terminal_at is not None and mb.store.deliveries_pending_count() == 0:
            return terminal_at, pending_at_terminal
        await anyio.sleep(POLL_S)


async def minibatch_run(path: str, url: str, n: int, timeout: float) -> dict[str, Any]:
    import msgspec

    import minibatch

    mb = minibatch.Minibatch(path, allow_private_webhooks=True,
                             webhook_concurrency=CONCURRENCY, webhook_per_host=CONCURRENCY,
                             poll_interval_s=0.02)

    @mb.handler("noop", concurrency=200)
    async def noop(item: Any) -> None:
        return None

    # Failures are raised after `async with mb:`, whose task group would wrap them in a group.
    try:
        async with mb:
            cpu0, start = cpu_s(), time.perf_counter()
            batch = await mb.submit("noop", ({"input": i} for i in range(n)),
                                    webhook={"url": url, "events": ["item.succeeded"]})
            submitted = time.perf_counter()
            done = await until_delivered(mb, batch.id, start, timeout)
            end, cpu1 = time.perf_counter(), cpu_s()
            batch = await mb.get(batch.id)
    finally:
        mb.close()
    if isinstance(done, str):
        raise SystemExit(done)
    terminal_at, pending_at_terminal = done
    summary = batch.deliveries
    if batch.status != "completed" or summary is msgspec.UNSET \
            or summary.total != n or summary.succeeded != n:
        raise SystemExit(f"minibatch: batch {batch.status!r}, deliveries {summary!r}; expected "
                         f"completed with {n} deliveries succeeded")
    return {"items": n, "submit_s": submitted - start, "terminal_s": terminal_at - start,
            "pending_at_terminal": pending_at_terminal, "total_s": end - start,
            "after_terminal_s": end - terminal_at, "rate": n / (end - start),
            "cpu_s": cpu1 - cpu0}


def measure_minibatch(receiver: Receiver, args: argparse.Namespace) -> dict[str, Any]:
    before = receiver.stats()
    profiler = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if profiler:
            profiler.enable()
        try:
            r = run_async(minibatch_run, os.path.join(tmp, "bench.db"), receiver.url,
                          args.items, args.timeout, loop=args.loop)
        finally:
            if profiler:
                profiler.disable()
    r["receiver"] = stats_delta(receiver.stats(), before)
    check_received("minibatch", r["receiver"], args.items)
    if profiler:
        print(f"\ncProfile of the minibatch run (rates below are slowed by the profiler), "
              f"top {args.profile} by own time:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    return r


# -- payloads, and clients without minibatch ----------


def item_bodies(n: int) -> list[bytes]:
    """`item.succeeded` bodies shaped as minibatch stores them, encoded ahead of time."""
    from minibatch import models

    now = datetime.now(UTC)
    return [models.encoder.encode(models.Event("item.succeeded", now, models.ItemRecord(
        id=f"item_{i + 1}", batch_id="batch_5f0c3a9e1d7b24c68e9f0a13", entry_id=None,
        index=i, status="succeeded", input={"input": i}, attempts=1)))
        for i in range(n)]


async def client_run(send: Callable[[str, bytes, dict[str, str]], Awaitable[int]],
                     url: str, bodies: list[bytes]) -> float:
    """POST every body from CONCURRENCY tasks, each request signed as it goes out."""
    import anyio

    from minibatch import signing

    keys = [signing.secret_key(signing.new_secret())]
    todo = iter(enumerate(bodies))
    bad: list[int] = []

    async def worker() -> None:
        for i, body in todo:
            status = await send(url, body, signing.headers(keys, f"msg_{i}", int(time.time()),
                                                           body))
            if status != 204:
                bad.append(status)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(CONCURRENCY):
            tg.start_soon(worker)
    elapsed = time.perf_counter() - start
    if bad:
        raise SystemExit(f"client: {len(bad)} requests not answered 204 (first {bad[0]})")
    return elapsed


async def aiohttp_run(url: str, bodies: list[bytes]) -> float:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=CONCURRENCY, limit_per_host=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector,
                                     skip_auto_headers=("User-Agent",)) as session:
        async def send(url: str, body: bytes, headers: dict[str, str]) -> int:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status

        return await client_run(send, url, bodies)


async def httpx_run(url: str, bodies: list[bytes]) -> float:
    import httpx

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        async def send(url: str, body: bytes, headers: dict[str, str]) -> int:
            return (await client.post(url, content=body, headers=headers)).status_code

        return await client_run(send, url, bodies)


CLIENTS = {"aiohttp": aiohttp_run, "httpx": httpx_run}


def measure_client(name: str, receiver: Receiver, n: int, loop: str) -> dict[str, Any]:
    bodies = item_bodies(n)
    before, cpu0 = receiver.stats(), cpu_s()
    elapsed = run_async(CLIENTS[name], receiver.url, bodies, loop=loop)
    cpu1 = cpu_s()
    got = stats_delta(receiver.stats(), before)
    check_received(name, got, n)
    return {"items": n, "total_s": elapsed, "rate": n / elapsed, "cpu_s": cpu1 - cpu0,
            "receiver": got}


# -- encode + sign ----------


def sample_event() -> Any:
    """A `batch.completed` Event as minibatch would send it: ~700 bytes encoded."""
    from minibatch import models

    at = datetime(2026, 11, 27, 16, 25, 51, 123456, tzinfo=UTC)
    path = "/v1/batches/batch_5f0c3a9e1d7b24c68e9f0a13"
    batch = models.Batch(
        id="batch_5f0c3a9e1d7b24c68e9f0a13", kind="thumbnails", status="completed",
        metrics=models.Metrics(total=20_000, succeeded=19_987, failed=13),
        created_at=at, started_at=at, completed_at=at, duration_ms=81_234,
        metadata={"customer": "acme"},
        polling_url=path, cancel_url=None, results_url=f"{path}/results",
        webhook=models.WebhookInfo(url="https://hooks.acme.example/mb",
                                   events=["batch.completed"]))
    return models.Event("batch.completed", at, batch)


def per_call_us(fn: Callable[[], Any]) -> float:
    """Median over CODEC_RUNS runs of CODEC_LOOPS calls, in microseconds per call."""
    runs = []
    for _ in range(CODEC_RUNS):
        start = time.perf_counter()
        for _ in range(CODEC_LOOPS):
            fn()
        runs.append((time.perf_counter() - start) / CODEC_LOOPS * 1e6)
    return statistics.median(runs)


def json_hmac_headers(key: bytes, msg_id: str, ts: int, body: bytes) -> dict[str, str]:
    """The same three headers, written the plain way with `hmac.new`."""
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256)
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
            "content-type": "application/json"}


def measure_codec() -> dict[str, Any]:
    import msgspec

    from minibatch import models, signing

    event = sample_event()
    as_dict = msgspec.to_builtins(event)
    key = signing.secret_key(signing.new_secret())
    msg_id, ts = "msg_8b1e64d2c0f93a57e4d6b218", 1_795_000_000
    body = models.encoder.encode(event)
    json_body = json.dumps(as_dict).encode()
    if json.loads(json_body) != json.loads(body):
        raise SystemExit("codec: json.dumps and msgspec encode different data")
    encode = models.encoder.encode
    dumps = json.dumps
    r = {
        "bytes": len(body), "json_bytes": len(json_body),
        "encode": per_call_us(lambda: encode(event)),
        "sign": per_call_us(lambda: signing.headers([key], msg_id, ts, body)),
        "both": per_call_us(lambda: signing.headers([key], msg_id, ts, encode(event))),
        "json_encode": per_call_us(lambda: dumps(as_dict).encode()),
        "json_sign": per_call_us(lambda: json_hmac_headers(key, msg_id, ts, json_body)),
        "json_both": per_call_us(
            lambda: json_hmac_headers(key, msg_id, ts, dumps(as_dict).encode())),
    }
    return r


# -- reporting ----------


def report_minibatch(r: dict[str, Any]) -> None:
    rc = r["receiver"]
    print(f"minibatch  {r['items']:>7} deliveries in {r['total_s']:6.2f} s from submit = "
          f"{r['rate']:>7,.0f} deliveries/s", flush=True)
    print(f"           submit {r['submit_s']:.2f} s; batch terminal at {r['terminal_s']:.2f} s "
          f"with {r['pending_at_terminal']} deliveries pending", flush=True)
    after = r["pending_at_terminal"] / r["after_terminal_s"] if r["after_terminal_s"] else 0.0
    print(f"           from terminal: {r['pending_at_terminal']} deliveries in "
          f"{r['after_terminal_s']:.2f} s = {after:,.0f} deliveries/s", flush=True)
    print(f"           CPU: bench {r['cpu_s']:.1f} s ({r['cpu_s'] / r['total_s']:.0%} of a "
          f"core, {r['cpu_s'] / r['items'] * 1e6:.0f} us/delivery), receiver "
          f"{rc['cpu_s']:.1f} s; receiver got {rc['posts']:.0f} signed POSTs, "
          f"{rc['body_bytes'] / rc['posts']:.0f} bytes/body", flush=True)


def report_client(name: str, r: dict[str, Any]) -> None:
    print(f"{name:<10} {r['items']:>7} deliveries in {r['total_s']:6.2f} s = "
          f"{r['rate']:>7,.0f} deliveries/s (no store); CPU: client {r['cpu_s']:.1f} s "
          f"({r['cpu_s'] / r['items'] * 1e6:.0f} us/request), receiver "
          f"{r['receiver']['cpu_s']:.1f} s", flush=True)


def report_codec(c: dict[str, Any]) -> None:
    print(f"\nencode + sign, per payload ({c['bytes']} bytes msgspec / {c['json_bytes']} bytes "
          f"json), median of {CODEC_RUNS} x {CODEC_LOOPS:,}:")
    print(f"| {'path':<44} | {'encode us':>9} | {'sign+headers us':>15} | {'total us':>8} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 17}|{'-' * 10}|")
    print(f"| {'msgspec Event + minibatch.signing.headers':<44} | {c['encode']:>9.2f} "
          f"| {c['sign']:>15.2f} | {c['both']:>8.2f} |")
    print(f"| {'json.dumps(dict) + hmac.new + headers':<44} | {c['json_encode']:>9.2f} "
          f"| {c['json_sign']:>15.2f} | {c['json_both']:>8.2f} |")
    print(f"msgspec path is {c['json_both'] / c['both']:.1f}x faster "
          f"(MEASURED.md: ~3.6 us against ~8.8 us)")


def table(results: dict[str, dict[str, Any]]) -> None:
    mb = results["minibatch"]["rate"]
    print()
    print(f"| {'sender':<10} | {'deliveries':>10} | {'per s':>7} | {'minibatch / it':>14} "
          f"| {'sender CPU us each':>18} |")
    print(f"|{'-' * 12}|{'-' * 12}|{'-' * 9}|{'-' * 16}|{'-' * 20}|")
    for name, r in results.items():
        ratio = "" if name == "minibatch" else f"{mb / r['rate']:.2f}x"
        print(f"| {name:<10} | {r['items']:>10} | {r['rate']:>7,.0f} | {ratio:>14} "
              f"| {r['cpu_s'] / r['items'] * 1e6:>18.0f} |")
    if "httpx" in results:
        print(f"\naiohttp / httpx (both without a store): "
              f"{results['aiohttp']['rate'] / results['httpx']['rate']:.1f}x")
    for source, goal in GOALS.items():
        verdict = "met" if mb >= goal else "MISSED"
        print(f"goal minibatch >= {goal:,.0f} deliveries/s end to end ({source}): {mb:,.0f}/s, "
              f"{verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=20_000,
                   help="items, hence deliveries, for minibatch and aiohttp (default 20000)")
    p.add_argument("--peer", choices=sorted(set(CLIENTS) - {"aiohttp"}), action="append",
                   default=[], help="also deliver through a peer client")
    p.add_argument("--peer-items", type=int, default=3_000,
                   help="deliveries for the peer, httpx is ~0.7k/s (default 3000)")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="event loop of the sending side (default asyncio)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds the minibatch run may take before it fails (default 60)")
    p.add_argument("--dir", default=None,
                   help="directory for the temporary database (default: the system's)")
    p.add_argument("--profile", type=int, nargs="?", const=25, default=0, metavar="N",
                   help="run the minibatch part under cProfile and print the top N (25)")
    p.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.items <= 0 or args.peer_items <= 0:
        p.error("--items and --peer-items must be > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.receiver:
        receiver_main()
        return
    results: dict[str, dict[str, Any]] = {}
    with Receiver() as receiver:
        print(f"receiver on {receiver.url}, sender loop {args.loop}, concurrency {CONCURRENCY}",
              flush=True)
        results["minibatch"] = measure_minibatch(receiver, args)
        report_minibatch(results["minibatch"])
        results["aiohttp"] = measure_client("aiohttp", receiver, args.items, args.loop)
        report_client("aiohttp", results["aiohttp"])
        for peer in args.peer:
            results[peer] = measure_client(peer, receiver, args.peer_items, args.loop)
            report_client(peer, results[peer])
    report_codec(measure_codec())
    table(results)


if __name__ == "__main__":
    main()
