"""Chaos soak: a real `minibatch serve` SIGKILLed at random, webhooks to a flaky receiver.

The crash loop test (tests/integration/test_crash_loop.py), bigger and longer. Not run in
CI: the default run takes several minutes.

What is run (127.0.0.1 only; every process is stopped and the work directory removed at
the end, unless `--keep`):

* receiver: a subprocess, a raw asyncio protocol on uvloop (HTTP/1.1 keep-alive,
  Content-Length bodies). It answers `--fail-rate` of the POSTs (random, `--seed`) with
  500 and the others with 200, and writes one line per POST to a file: the status it
  answered, the time, the `webhook-id` header, and the event `type` and `data.id` of the
  body. `GET /stats` flushes that file and returns the counts.
* server: `python -m minibatch serve` configured by `MINIBATCH_*` variables (a database in
  the work directory, a free port, private webhooks allowed, `MINIBATCH_WEBHOOK_TIMEOUT_S=2`,
  `--retry-schedule` as `MINIBATCH_WEBHOOK_RETRY_SCHEDULE`), and one API key from
  `python -m minibatch keys create --tenant chaos`.
* work: `--items` `sleep` items of `--sleep-s` seconds, split over `--batches` batches; each
  batch is uploaded as JSONL by `POST /v1/files` and created by `POST /v1/batches` with
  `input_file_id` (and `--max-attempts`, `--concurrency` if given) and a webhook for
  item.succeeded, item.failed, batch.completed and batch.failed.
* chaos: for `--duration` seconds the server is SIGKILLed after a random
  `--min-kill`..`--max-kill` seconds and started again on the same database (on a new
  port). A server that exits by itself is counted as a crash and started again. Then the
  last server gets up to `--drain-timeout` seconds to make every batch terminal and every
  delivery not pending.

Reported, then checked (the script exits 1 unless each of the first six is 0, every batch
is terminal and no delivery is pending at the end):
items lost (not terminal, or missing from the results), duplicated result lines, items not
succeeded, batch webhooks undelivered (a terminal batch whose `batch.*` event was never
answered 2xx), item webhooks undelivered (a terminal item whose `item.*` event was never
answered 2xx, matched on `data.id`), item events emitted twice (one item, two webhook-ids);
and for information: deliveries failed for good (the batches' delivery summaries), their
reasons, redeliveries of a webhook-id already answered 2xx, kills (and how many landed
while items were still open), server crashes and errors in the server logs, and the
throughput over the whole run, restarts included: items/s from the first upload to the last
batch's `completed_at`, deliveries/s (distinct webhook-ids answered 2xx) from the first
upload to the last 2xx answer.

With the default `--sleep-s 0.005` the items are done within ~10 s and later kills land
on webhook delivery only; `--sleep-s 1` keeps 1000 items running for ~100 s, so most kills
land on running items (each such kill costs them an attempt: see `--max-attempts`).

    .venv/bin/python bench/chaos.py --items 20000 --duration 40
    .venv/bin/python bench/chaos.py
    .venv/bin/python bench/chaos.py --sleep-s 1 --duration 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec

HOST = "127.0.0.1"
EVENTS = ["item.succeeded", "item.failed", "batch.completed", "batch.failed"]
DEFAULT_SCHEDULE = "0,0.5,1,2,2,2,3,3,5,5,5,5,5,5"  # 14 attempts: 0.3**14 * 100k ~ 0.005
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.5  # how often the batches are looked at while waiting
LOG_ERROR_MARKS = ("Traceback", "ERROR", "CRITICAL", "Exception")


# -- the receiver (a subprocess) ----------


class Body(msgspec.Struct):
    id: str


class Event(msgspec.Struct):
    type: str
    data: Body


class ReceiverProtocol(asyncio.Protocol):
    """HTTP/1.1 just far enough: Content-Length bodies, keep-alive; 500 or 200 per POST."""

    out: Any = None  # the record file, set by receiver_main
    fail_rate = 0.0
    rng = random.Random()
    stats = {"posts": 0, "ok": 0, "failed": 0, "undecodable": 0}
    decode = msgspec.json.Decoder(Event).decode

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head = buf[:end]
            lower = head.lower()
            length = 0
            if (i := lower.find(b"\ncontent-length:")) >= 0:
                j = lower.find(b"\r", i)
                length = int(lower[i + 16:j if j >= 0 else None])
            total = end + 4 + length
            if len(buf) < total:
                break
            body, buf = buf[end + 4:total], buf[total:]
            if lower.startswith(b"post "):
                self.post(head, lower, body)
            else:  # GET /stats, then close
                self.out.flush()
                usage = resource.getrusage(resource.RUSAGE_SELF)
                reply = json.dumps({**self.stats, "cpu_s": usage.ru_utime + usage.ru_stime})
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(reply), reply.encode()))
                self.transport.close()
                return
        self.buf = buf

    def post(self, head: bytes, lower: bytes, body: bytes) -> None:
        stats = self.stats
        stats["posts"] += 1
        msg_id = "-"
        if (i := lower.find(b"\nwebhook-id:")) >= 0:
            j = lower.find(b"\r", i)
            msg_id = head[i + 12:j if j >= 0 else None].strip().decode() or "-"
        try:
            event = self.decode(body)
            kind, data_id = event.type, event.data.id
        except msgspec.DecodeError:
            stats["undecodable"] += 1
            kind = data_id = "-"
        if self.rng.random() < self.fail_rate:
            stats["failed"] += 1
            status = 500
            self.transport.write(b"HTTP/1.1 500 Internal Server Error\r\n"
                                 b"Content-Length: 4\r\n\r\nfail")
        else:
            stats["ok"] += 1
            status = 200
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.out.write(f"{status} {time.time():.3f} {msg_id} {kind} {data_id}\n")


async def receiver_serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(ReceiverProtocol, HOST, 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def receiver_main(path: str, fail_rate: float, seed: int) -> None:
    import uvloop

    ReceiverProtocol.fail_rate = fail_rate
    ReceiverProtocol.rng = random.Random(seed)
    with open(path, "a", buffering=1 << 20) as out:
        ReceiverProtocol.out = out
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # closes (flushes) the file
        uvloop.run(receiver_serve())


class Receiver:
    """The receiver subprocess: started when made, stopped (and reaped) by `stop`."""

    def __init__(self, record: Path, fail_rate: float, seed: int) -> None:
        self.record = record
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--receiver", str(record),
             "--fail-rate", str(fail_rate), "--seed", str(seed)],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.stop()
            raise SystemExit(f"receiver did not start (said {line!r})")
        self.base = f"http://{HOST}:{int(line)}"
        self.url = self.base + "/hook"

    def stats(self) -> dict[str, float]:
        """The counts so far; the record file is flushed first."""
        return httpx.get(self.base + "/stats", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


# -- the server ----------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minibatch", *args], capture_output=True,
                          text=True, timeout=60, env=env)


class Server:
    """One `minibatch serve` process on the shared database, logging to its own file."""

    def __init__(self, work: Path, env: dict[str, str], number: int) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = work / f"serve-{number:03d}-{self.port}.log"
        self.env = {**env, "MINIBATCH_PORT": str(self.port)}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "minibatch", "serve"],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=str(work))

    def wait_healthy(self) -> float:
        """Seconds until /healthz answers 200; SystemExit if the process dies or stalls."""
        start = time.monotonic()
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode} while starting:\n"
                                 f"{tail(self.log)}")
            if time.monotonic() - start > START_TIMEOUT_S:
                raise SystemExit(f"server not healthy after {START_TIMEOUT_S} s:\n"
                                 f"{tail(self.log)}")
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- submitting and watching ----------


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def submit(client: httpx.Client, url: str, sizes: list[int], args: argparse.Namespace
           ) -> list[str]:
    """Upload each batch as JSONL and create it by input_file_id; the batch ids."""
    batch_ids = []
    for b, n in enumerate(sizes):
        line = '{"input":{"seconds":%s},"entry_id":"b%d-%d"}\n'
        data = "".join(line % (args.sleep_s, b, i) for i in range(n)).encode()
        file = client.post("/v1/files", content=data,
                           headers={"content-type": "application/jsonl"})
        if file.status_code != 201:
            raise SystemExit(f"POST /v1/files: {file.status_code} {file.text[:500]}")
        body: dict[str, Any] = {"kind": "sleep", "input_file_id": file.json()["id"],
                                "webhook": {"url": url, "events": EVENTS}}
        if args.max_attempts:
            body["max_attempts"] = args.max_attempts
        if args.concurrency:
            body["concurrency"] = args.concurrency
        created = client.post("/v1/batches", json=body)
        if created.status_code != 201:
            raise SystemExit(f"POST /v1/batches: {created.status_code} {created.text[:500]}")
        batch_ids.append(created.json()["id"])
    return batch_ids


def look(client: httpx.Client, batch_ids: list[str]) -> list[dict[str, Any]] | None:
    """Every batch as the server shows it, or None if the server does not answer."""
    try:
        out = [client.get(f"/v1/batches/{b}") for b in batch_ids]
    except httpx.TransportError:
        return None
    if any(r.status_code != 200 for r in out):
        return None
    return [r.json() for r in out]


class Watch:
    """The batches as last seen, and whether they were settled: every batch terminal and
    no delivery pending."""

    def __init__(self) -> None:
        self.settled = False
        self.last: list[dict[str, Any]] | None = None

    def update(self, batches: list[dict[str, Any]] | None) -> bool:
        if batches is not None:
            self.last = batches
            self.settled = pending_deliveries(batches) == 0 and all(
                b["status"] in ("completed", "failed", "cancelled") for b in batches)
        return self.settled


def open_items(batches: list[dict[str, Any]] | None) -> int | None:
    if batches is None:
        return None
    return sum(b["metrics"]["queued"] + b["metrics"]["running"] for b in batches)


def pending_deliveries(batches: list[dict[str, Any]] | None) -> int | None:
    if batches is None:
        return None
    return sum(b["deliveries"]["pending"] for b in batches)


def progress_line(batches: list[dict[str, Any]] | None) -> str:
    if batches is None:
        return "server not answering"
    m: Counter = Counter()
    for b in batches:
        m.update(b["metrics"])
        m.update({f"d_{k}": v for k, v in b["deliveries"].items() if isinstance(v, int)})
    return (f"items {m['succeeded'] + m['failed'] + m['cancelled']}/{m['total']} terminal "
            f"({m['running']} running, {m['failed']} failed), deliveries "
            f"{m['d_succeeded']} ok, {m['d_pending']} pending, {m['d_failed']} failed")


# -- the run ----------


class Chaos:
    """The servers on one database: the current one, and every one started before."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work = work
        self.env = env
        self.servers: list[Server] = []
        self.kills = 0
        self.kills_mid_run = 0  # while items were queued or running
        self.kills_mid_delivery = 0  # while deliveries were pending
        self.crashes: list[tuple[int, int]] = []  # (server number, exit code)
        self.down_s = 0.0

    @property
    def current(self) -> Server:
        return self.servers[-1]

    def start(self) -> Server:
        server = Server(self.work, self.env, len(self.servers))
        self.servers.append(server)
        self.down_s += server.wait_healthy()
        return server

    def restart_if_crashed(self) -> None:
        code = self.current.proc.poll()
        if code is not None:
            self.crashes.append((len(self.servers) - 1, code))
            print(f"  server {len(self.servers) - 1} exited by itself with {code}", flush=True)
            self.start()

    def kill_and_restart(self) -> None:
        self.current.kill()
        self.kills += 1
        self.start()

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


def wait_watching(client_of: Any, batch_ids: list[str], watch: Watch, until: float,
                  chaos: Chaos, stop_when_settled: bool = False) -> None:
    """Look at the batches every POLL_S until `until` (or until settled, if asked)."""
    while time.monotonic() < until:
        chaos.restart_if_crashed()
        settled = watch.update(look(client_of(), batch_ids))
        if settled and stop_when_settled:
            return
        time.sleep(min(POLL_S, max(until - time.monotonic(), 0)))


def run_chaos(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    receiver = Receiver(work / "received.txt", args.fail_rate, args.seed)
    env = {**os.environ, "MINIBATCH_DB": str(work / "chaos.db"), "MINIBATCH_HOST": HOST,
           "MINIBATCH_ALLOW_PRIVATE_WEBHOOKS": "true", "MINIBATCH_WEBHOOK_TIMEOUT_S": "2",
           "MINIBATCH_WEBHOOK_RETRY_SCHEDULE": args.retry_schedule,
           "MINIBATCH_SHUTDOWN_GRACE_S": "0.5"}
    chaos = Chaos(work, env)
    clients: dict[str, httpx.Client] = {}
    try:
        chaos.start()
        created = cli("keys", "create", "--tenant", "chaos", "--db", env["MINIBATCH_DB"],
                      env=env)
        if created.returncode != 0:
            raise SystemExit(f"keys create failed: {created.stderr}")
        key = json.loads(created.stdout)["api_key"]

        def client_of() -> httpx.Client:
            url = chaos.current.url
            if url not in clients:
                clients[url] = httpx.Client(base_url=url, headers={"x-api-key": key},
                                            timeout=60)
            return clients[url]

        sizes = split(args.items, args.batches)
        t0, t0_wall = time.monotonic(), time.time()
        batch_ids = submit(client_of(), receiver.url, sizes, args)
        submitted = time.monotonic() - t0
        print(f"submitted {args.items} items in {len(sizes)} batches in {submitted:.1f} s; "
              f"killing for {args.duration:g} s", flush=True)
        watch = Watch()
        end = time.monotonic() + args.duration
        while True:
            at = time.monotonic() + rng.uniform(args.min_kill, args.max_kill)
            if at > end:
                break
            wait_watching(client_of, batch_ids, watch, at, chaos)
            batches = look(client_of(), batch_ids)
            watch.update(batches)
            chaos.kills_mid_run += bool(open_items(batches))
            chaos.kills_mid_delivery += bool(pending_deliveries(batches))
            chaos.kill_and_restart()
            print(f"  kill {chaos.kills:>3} at {time.monotonic() - t0:6.1f} s: "
                  f"{progress_line(batches)}", flush=True)
        wait_watching(client_of, batch_ids, watch, end, chaos)
        print(f"chaos over at {time.monotonic() - t0:.1f} s; draining (up to "
              f"{args.drain_timeout:g} s)", flush=True)
        wait_watching(client_of, batch_ids, watch, time.monotonic() + args.drain_timeout,
                      chaos, stop_when_settled=True)
        drained, ended = watch.settled, time.monotonic()
        print(f"  {'settled' if drained else 'NOT settled'} at {ended - t0:.1f} s: "
              f"{progress_line(watch.last)}", flush=True)
        found = collect(client_of(), batch_ids, sizes)
        receiver_stats = receiver.stats()
    finally:
        for client in clients.values():
            client.close()
        chaos.stop_all()
        receiver.stop()
    return {"t0": t0_wall, "ended": t0_wall + ended - t0, "drained": drained, "chaos": chaos,
            "batch_ids": batch_ids, "sizes": sizes, "found": found,
            "receiver": receiver_stats, "records": read_records(receiver.record)}


# -- after the run: what the server says, what the receiver got ----------


def collect(client: httpx.Client, batch_ids: list[str], sizes: list[int]) -> dict[str, Any]:
    """Each batch and its result lines, as the last server shows them."""
    batches, results = [], {}
    for batch_id in batch_ids:
        batch = client.get(f"/v1/batches/{batch_id}")
        batch.raise_for_status()
        batches.append(batch.json())
        lines = client.get(f"/v1/batches/{batch_id}/results", timeout=300)
        lines.raise_for_status()
        results[batch_id] = [json.loads(line) for line in lines.text.splitlines() if line]
    return {"batches": batches, "results": results}


def read_records(path: Path) -> list[tuple[int, float, str, str, str]]:
    out = []
    with open(path) as f:
        for line in f:
            status, at, msg_id, kind, data_id = line.split()
            out.append((int(status), float(at), msg_id, kind, data_id))
    return out


def log_errors(servers: list[Server]) -> tuple[int, Counter]:
    """Log lines that look like errors, and the distinct exception lines that end each
    traceback (or the error line itself), over every server's log."""
    marked, distinct = 0, Counter()
    for server in servers:
        lines = server.log.read_text(errors="replace").splitlines()
        in_traceback = False
        for i, line in enumerate(lines):
            if any(mark in line for mark in LOG_ERROR_MARKS):
                marked += 1
            if line.startswith("Traceback"):
                in_traceback = True
                continue
            if in_traceback and line and not line.startswith((" ", "\t", "Traceback")):
                distinct[line[:200]] += 1
                in_traceback = i + 1 < len(lines) and lines[i + 1].startswith(
                    ("During handling", "The above exception"))
            elif not in_traceback and "ERROR" in line:
                distinct[line[:200]] += 1
    return marked, distinct


def figures(r: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every count the report prints, from the server's view and the receiver's records."""
    found, records = r["found"], r["records"]
    f: dict[str, Any] = {}
    lost = duplicated = not_succeeded = 0
    terminal_items: dict[str, str] = {}  # item id -> status
    failed_errors: Counter = Counter()
    for b, (batch_id, n) in enumerate(zip(r["batch_ids"], r["sizes"], strict=True)):
        lines = found["results"][batch_id]
        entries = Counter(line["entry_id"] for line in lines)
        duplicated += len(lines) - len(entries)
        expected = {f"b{b}-{i}" for i in range(n)}
        lost += len(expected - set(entries)) + len(set(entries) - expected)
        for line in lines:
            terminal_items[line["id"]] = line["status"]
            if line["status"] != "succeeded":
                not_succeeded += 1
                failed_errors[(line["status"], (line.get("error") or {}).get("code"))] += 1
    f.update(lost=lost, duplicated=duplicated, not_succeeded=not_succeeded,
             failed_errors=failed_errors)
    ok_ids: dict[tuple[str, str], set[str]] = defaultdict(set)  # (type, data id) -> msg ids
    all_ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    ok_answers: Counter = Counter()
    for status, _, msg_id, kind, data_id in records:
        all_ids[(kind, data_id)].add(msg_id)
        if 200 <= status < 300:
            ok_ids[(kind, data_id)].add(msg_id)
            ok_answers[msg_id] += 1
    status_of = {b["id"]: b["status"] for b in found["batches"]}
    batch_undelivered = []
    for batch_id, status in status_of.items():
        event = f"batch.{status}"
        if status in ("completed", "failed") and not ok_ids.get((event, batch_id)):
            batch_undelivered.append(batch_id)
    item_undelivered = [i for i, s in terminal_items.items()
                        if s in ("succeeded", "failed") and not ok_ids.get((f"item.{s}", i))]
    twice = sum(len(ids) > 1 for (kind, _), ids in all_ids.items() if kind.startswith("item."))
    wrong = sum(1 for (kind, data_id) in ok_ids if kind.startswith("item.")
                and terminal_items.get(data_id) != kind.removeprefix("item."))
    f.update(batch_undelivered=batch_undelivered, item_undelivered=item_undelivered,
             events_twice=twice, wrong_events=wrong,
             redelivered=sum(n - 1 for n in ok_answers.values()),
             delivered=len(ok_answers), posts=len(records),
             answered_500=sum(1 for rec in records if rec[0] >= 500))
    summaries = [b["deliveries"] for b in found["batches"]]
    f["deliveries"] = {k: sum(s[k] for s in summaries)
                       for k in ("total", "succeeded", "failed", "pending")}
    f["failed_for_good"] = Counter((w["event"], w["http_status"], w["error_message"])
                                   for b in found["batches"] for w in b["failed_webhooks"])
    f["not_terminal"] = [(b["id"], b["status"], b["metrics"]) for b in found["batches"]
                         if b["status"] not in ("completed", "failed", "cancelled")]
    attempts = len(args.retry_schedule.split(","))
    f["expected_failed_for_good"] = f["deliveries"]["total"] * args.fail_rate ** attempts
    f["receiver_span_s"] = records[-1][1] - records[0][1] if records else 0.0
    f["last_ok_at"] = max((rec[1] for rec in records if 200 <= rec[0] < 300), default=None)
    return f


def report(r: dict[str, Any], f: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Print the figures; the names of the checks that failed."""
    chaos = r["chaos"]
    marked, distinct = log_errors(chaos.servers)
    done = [b["completed_at"] for b in r["found"]["batches"] if b["completed_at"]]
    items_end = r["ended"] if f["not_terminal"] else max(
        datetime.fromisoformat(at).timestamp() for at in done)
    deliveries_end = f["last_ok_at"] if r["drained"] and f["last_ok_at"] else r["ended"]
    d = f["deliveries"]
    print()
    print(f"items lost (not terminal or missing from results): {f['lost']}")
    print(f"duplicated result lines:                           {f['duplicated']}")
    print(f"items not succeeded:                               {f['not_succeeded']}"
          + (f"  {dict(f['failed_errors'])}" if f["failed_errors"] else ""))
    print(f"batch webhooks undelivered:                        {len(f['batch_undelivered'])}"
          + (f"  {f['batch_undelivered']}" if f["batch_undelivered"] else ""))
    print(f"item webhooks undelivered:                         {len(f['item_undelivered'])}"
          + (f"  e.g. {f['item_undelivered'][:5]}" if f["item_undelivered"] else ""))
    print(f"item events emitted twice (distinct webhook-ids):  {f['events_twice']}")
    print(f"deliveries failed for good:                        {d['failed']} (by chance "
          f"~{f['expected_failed_for_good']:.3f}: {args.fail_rate:g} ** "
          f"{len(args.retry_schedule.split(','))} attempts)")
    for (event, status, error), n in f["failed_for_good"].most_common(10):
        print(f"    {n} x {event}: HTTP {status}, {error}")
    print(f"deliveries (server): {d['total']} total, {d['succeeded']} succeeded, "
          f"{d['failed']} failed, {d['pending']} pending")
    print(f"receiver: {f['posts']} POSTs, {f['answered_500']} answered 500, "
          f"{f['delivered']} distinct webhook-ids answered 2xx, {f['redelivered']} "
          f"redeliveries of a webhook-id already answered 2xx, {f['wrong_events']} events "
          f"not matching the item's final status, {r['receiver']['undecodable']:.0f} "
          f"undecodable bodies, receiver CPU {r['receiver']['cpu_s']:.1f} s")
    print(f"kills: {chaos.kills} ({chaos.kills_mid_run} while items were open, "
          f"{chaos.kills_mid_delivery} while deliveries were pending), server "
          f"crashes: {len(chaos.crashes)}{f' {chaos.crashes}' if chaos.crashes else ''}, "
          f"servers started: {len(chaos.servers)}, time to healthy: {chaos.down_s:.1f} s "
          f"in all")
    print(f"server log lines with {'/'.join(LOG_ERROR_MARKS)}: {marked}")
    for line, n in distinct.most_common(15):
        print(f"    {n} x {line}")
    for batch_id, status, metrics in f["not_terminal"]:
        print(f"STUCK batch {batch_id}: {status} {metrics}")
    span = f["receiver_span_s"]
    print(f"throughput: {args.items} items in {items_end - r['t0']:.1f} s = "
          f"{args.items / max(items_end - r['t0'], 1e-9):,.0f} items/s (upload to every "
          f"batch completed_at, restarts included); {f['delivered']} deliveries in "
          f"{deliveries_end - r['t0']:.1f} s = "
          f"{f['delivered'] / max(deliveries_end - r['t0'], 1e-9):,.0f} deliveries/s "
          f"(upload to the last 2xx answer); receiver "
          f"{f['posts'] / max(span, 1e-9):,.0f} POSTs/s over {span:.1f} s")
    checks = {"lost": f["lost"], "duplicated": f["duplicated"],
              "not succeeded": f["not_succeeded"],
              "batch webhooks undelivered": len(f["batch_undelivered"]),
              "item webhooks undelivered": len(f["item_undelivered"]),
              "item events twice": f["events_twice"], "stuck batches": len(f["not_terminal"]),
              "not drained": int(not r["drained"])}
    return [name for name, n in checks.items() if n]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100_000, help="items in all (default 100000)")
    p.add_argument("--batches", type=int, default=4, help="batches (default 4)")
    p.add_argument("--sleep-s", type=float, default=0.005,
                   help="seconds each sleep item takes (default 0.005)")
    p.add_argument("--max-attempts", type=int, default=None,
                   help="the batches' max_attempts (default: the server's, 3)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="each batch's concurrency (default: the sleep kind's, 1000)")
    p.add_argument("--fail-rate", type=float, default=0.3,
                   help="share of webhook POSTs answered 500 (default 0.3)")
    p.add_argument("--retry-schedule", default=DEFAULT_SCHEDULE,
                   help=f"MINIBATCH_WEBHOOK_RETRY_SCHEDULE (default {DEFAULT_SCHEDULE})")
    p.add_argument("--duration", type=float, default=180.0,
                   help="seconds of kills (default 180)")
    p.add_argument("--min-kill", type=float, default=2.0,
                   help="shortest life of a server, in seconds (default 2)")
    p.add_argument("--max-kill", type=float, default=10.0,
                   help="longest life of a server, in seconds (default 10)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds the last server gets to finish everything (default 300)")
    p.add_argument("--seed", type=int, default=None, help="seed of the kill times and 500s")
    p.add_argument("--dir", default=None,
                   help="directory for the work directory (default: the system's)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (database, logs, receiver records)")
    p.add_argument("--receiver", metavar="RECORD", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.items <= 0 or args.batches <= 0 or args.batches > args.items:
        p.error("--items and --batches must be > 0, with at least one item per batch")
    if not 0 < args.min_kill <= args.max_kill:
        p.error("need 0 < --min-kill <= --max-kill")
    if not 0 <= args.fail_rate < 1:
        p.error("--fail-rate must be in [0, 1)")
    if args.seed is None:
        args.seed = random.randrange(2**32)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.receiver:
        receiver_main(args.receiver, args.fail_rate, args.seed)
        return
    print(f"chaos: {args.items} items in {args.batches} batches, sleep {args.sleep_s:g} s, "
          f"fail rate {args.fail_rate:g}, kills every {args.min_kill:g}-{args.max_kill:g} s "
          f"for {args.duration:g} s, schedule {args.retry_schedule}, seed {args.seed}",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="minibatch-chaos-", dir=args.dir))
    try:
        r = run_chaos(args, work)
        failed = report(r, figures(r, args), args)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        raise SystemExit(f"FAILED: {', '.join(failed)}")
    print("OK: nothing lost, nothing duplicated, every webhook delivered")


if __name__ == "__main__":
    main()
