"""The `minibatch` command: serve, keys, backup, check, the client commands, demo.

Server flags, `MINIBATCH_*` variables and `Settings` fields are three doors to the same
values. Client commands import only httpx, so they start fast, and report an
unreachable server, a bad key or a missing file as one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """One line for stderr, and the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- serve and keys ----------


def serve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Flags over `MINIBATCH_*` variables over Settings defaults."""
    from .config import env_options

    options: dict[str, Any] = env_options()
    for name in ("db", "host", "port", "handlers", "webhook_retry_schedule", "synchronous",
                 "workers",
                 "openai_upstream", "openai_upstream_key", "openai_upstream_concurrency",
                 "anthropic_upstream", "anthropic_upstream_key",
                 "anthropic_upstream_concurrency", "rate_limit", "max_queued_items",
                 "retention_days"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.allow_private_webhooks:
        options["allow_private_webhooks"] = True
    if args.no_access_log:
        options["access_log"] = False
    if args.poll_only:
        options["listen"] = False
    if args.log_format is not None:
        options["log_format"] = args.log_format
    return options


def build_instance(options: dict[str, Any]) -> Any:
    """A Minibatch with the built-in kinds and those of the --handlers module."""
    import importlib

    from .app import Minibatch
    from .handlers import DECLARED
    from .kinds import register_builtin_kinds

    mb = Minibatch(options.pop("db", "minibatch.db"), **options)
    if mb.settings.handlers:
        sys.path.insert(0, os.getcwd())
        try:
            importlib.import_module(mb.settings.handlers)
        except ImportError as exc:
            raise CliError(f"cannot import --handlers {mb.settings.handlers}: {exc}") from None
        for kind, fn, limits in DECLARED:
            mb.handler(kind, **limits)(fn)
    register_builtin_kinds(mb)
    return mb


async def serve_until_signalled(mb: Any, host: str, port: int, *, quiet: bool = False) -> None:
    """Run the API under uvicorn and the runner in the same loop (or, with `workers` > 1,
    in that many worker processes) until SIGTERM/SIGINT, then stop the server, let
    in-flight items finish or go back to the queue, and return (so the process exits 0)."""
    import signal

    import anyio
    import uvicorn

    from .server import server_config
    from .workers import WorkerPool

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises a captured SIGTERM when it stops, which would end the
            # process before the runner hands its items back; the signals are ours here.
            yield

    server = Server(server_config(mb, host, port, log_level="warning" if quiet else "info"))
    pool = WorkerPool(mb.settings, mb.store) if mb.settings.workers > 1 else None
    mb.runs_items = pool is None

    async def stop_on_signal(server: uvicorn.Server) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                if pool is not None:  # a worker that exits from now on is not replaced
                    pool.stopping = True
                server.should_exit = True
                return

    async with mb, anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal, server)
        if pool is not None:
            # the workers' checkpointers keep the WAL short
            await mb.store.call(mb.store.autocheckpoint, False)
            await pool.run(tg)
        await server.serve()
        if pool is not None:
            await pool.stop()
        tg.cancel_scope.cancel()


def cmd_serve(args: argparse.Namespace) -> int:
    import anyio

    from .errors import MinibatchError

    try:
        mb = build_instance(serve_settings(args))
    except MinibatchError as exc:
        raise CliError(exc.detail) from None
    s = mb.settings
    from .logs import configure

    configure(s.log_format)
    try:
        _check_can_listen(s.host, s.port)
        anyio.run(serve_until_signalled, mb, s.host, s.port,
                  backend_options={"use_uvloop": True})
    finally:
        mb.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker process of `serve --workers N` (started by serve, not by hand)."""
    import anyio

    from .logs import configure
    from .workers import run_worker, worker_settings

    mb = build_instance(worker_settings())
    configure(mb.settings.log_format)
    try:
        anyio.run(run_worker, mb, backend_options={"use_uvloop": True})
    finally:
        mb.close()
    return 0


def _check_can_listen(host: str, port: int) -> None:
    """Fail with one line now rather than with uvicorn's exit inside the task group."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _store(db: str | None) -> Any:
    from .config import make_settings
    from .errors import MinibatchError
    from .store import open_store

    try:
        settings = make_settings(db=db or os.environ.get("MINIBATCH_DB", "minibatch.db"))
        return open_store(settings.db, webhook_schedule=settings.webhook_retry_schedule)
    except MinibatchError as exc:
        raise CliError(exc.detail) from None


def cmd_keys(args: argparse.Namespace) -> int:
    import time

    from .auth import create_tenant_key
    from .errors import MinibatchError
    from .models import MAX_OVERLAP_S
    from .signing import new_secret
    from .store import new_id

    store = _store(args.db)
    try:
        if args.keys_command == "create":
            out = create_tenant_key(store, args.tenant, args.name)
        elif args.keys_command == "list":
            import msgspec

            for key in store.keys_list(args.tenant):
                print(msgspec.json.encode(key).decode())
            return 0
        elif args.keys_command == "revoke":
            store.key_revoke(args.key_id, time.time())
            out = {"id": args.key_id, "status": "revoked"}
        else:
            if not store.tenant_exists(args.tenant):
                raise CliError(f"no tenant {args.tenant!r} (create it with keys create)")
            if not 0 <= args.overlap <= MAX_OVERLAP_S:
                raise CliError(f"--overlap must be 0 to {MAX_OVERLAP_S:g} seconds (7 days)")
            secret_id, secret = new_id("secret"), new_secret()
            store.secret_rotate(args.tenant, secret_id, secret, args.overlap, time.time())
            out = {"tenant": args.tenant, "webhook_secret": secret, "secret_id": secret_id}
    except MinibatchError as exc:
        raise CliError(exc.detail) from None
    finally:
        store.close()
    print(json.dumps(out))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """A consistent copy of the database, taken while serve may be writing it."""
    if os.path.exists(args.dest):
        raise CliError(f"{args.dest} exists; a backup is written to a new file")
    from .errors import MinibatchError

    store = _existing_store(args.db)
    try:
        pages = store.backup_to(args.dest)
    except MinibatchError as exc:
        raise CliError(exc.detail) from None
    finally:
        store.close()
    print(json.dumps({"backup": args.dest, "pages": pages}))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """SQLite's integrity check and every batch's counters against its items; exit 1 on
    any problem, one line each."""
    store = _existing_store(args.db)
    try:
        problems = store.check()
    finally:
        store.close()
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print("ok")
    return 0


def _existing_store(db: str | None) -> Any:
    path = db or os.environ.get("MINIBATCH_DB", "minibatch.db")
    if "://" not in path and not os.path.isfile(path):
        raise CliError(f"no database at {path}")
    return _store(path)


# -- client commands ----------


class Client:
    """A thin httpx client that turns transport and HTTP errors into CliErrors."""

    def __init__(self, url: str | None) -> None:
        import httpx

        self.httpx = httpx
        self.url = (url or os.environ.get("MINIBATCH_URL") or DEFAULT_URL).rstrip("/")
        key = os.environ.get("MINIBATCH_API_KEY")
        if not key:
            raise CliError("set MINIBATCH_API_KEY (see: minibatch keys create --tenant NAME)")
        if not key.isascii():
            raise CliError("MINIBATCH_API_KEY has characters an API key never has")
        try:
            self.client = httpx.Client(base_url=self.url, timeout=30,
                                       headers={"Authorization": f"Bearer {key}"})
        except httpx.InvalidURL as exc:
            raise CliError(f"not a server URL: {self.url} ({exc})") from None

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except (self.httpx.TransportError, self.httpx.InvalidURL) as exc:
            raise CliError(f"cannot reach the minibatch server at {self.url}: {exc}") from None
        self._raise_for(response)
        return response

    def stream_to(self, path: str, out: Any) -> None:
        try:
            with self.client.stream("GET", path) as response:
                if response.is_error:
                    response.read()
                    self._raise_for(response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
        except (self.httpx.TransportError, self.httpx.InvalidURL) as exc:
            raise CliError(f"cannot reach the minibatch server at {self.url}: {exc}") from None

    @staticmethod
    def _raise_for(response: Any) -> None:
        if response.status_code == 401:
            raise CliError("the server refused the API key (MINIBATCH_API_KEY)")
        if response.is_error:
            try:
                problem = response.json()
                detail = problem.get("detail", "")
                errors = "; ".join(f"{e.get('field') or 'line ' + str(e.get('line'))}: "
                                   f"{e['message']}" for e in problem.get("errors", [])[:5])
            except ValueError:
                detail, errors = response.text[:200], ""
            raise CliError(f"HTTP {response.status_code}: {detail}"
                           + (f" ({errors})" if errors else ""))


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
    client = Client(args.url)
    file = client.request("POST", "/v1/files", content=data,
                          headers={"content-type": "application/jsonl"}).json()
    body: dict[str, Any] = {"kind": args.kind, "input_file_id": file["id"]}
    if args.webhook_url:
        body["webhook"] = {"url": args.webhook_url}
    batch = client.request("POST", "/v1/batches", json=body).json()
    print(batch["id"], flush=True)
    if not args.wait:
        return 0
    from .progress import follow

    final = follow(lambda: client.request("GET", f"/v1/batches/{batch['id']}").json())
    return 0 if final["status"] == "completed" else 1


def cmd_status(args: argparse.Namespace) -> int:
    batch = Client(args.url).request("GET", f"/v1/batches/{args.batch_id}").json()
    print(json.dumps(batch, indent=2))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    Client(args.url).stream_to(f"/v1/batches/{args.batch_id}/results", sys.stdout.buffer)
    sys.stdout.flush()
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """The tenant's batches, newest first, one JSON line each."""
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    page = Client(args.url).request("GET", "/v1/batches", params=params).json()
    for batch in page["data"]:
        print(json.dumps(batch))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    batch = Client(args.url).request("POST", f"/v1/batches/{args.batch_id}/cancel").json()
    print(json.dumps(batch))
    return 0


def cmd_deliveries(args: argparse.Namespace) -> int:
    """Every delivery of a batch with its attempts, one JSON line each (all pages)."""
    client = Client(args.url)
    params: dict[str, Any] = {"limit": 1000}
    while True:
        page = client.request("GET", f"/v1/batches/{args.batch_id}/deliveries",
                              params=params).json()
        for delivery in page["data"]:
            print(json.dumps(delivery))
        if not page.get("next_cursor"):
            return 0
        params["after"] = page["next_cursor"]


def cmd_redeliver(args: argparse.Namespace) -> int:
    delivery = Client(args.url).request("POST", f"/v1/deliveries/{args.delivery_id}/retry")
    print(json.dumps(delivery.json()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(items=args.items)


# -- argument parsing ----------


def workers_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of workers or 'auto': {text!r}"
                                         ) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minibatch", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP API and the workers")
    s.add_argument("--db", help="database file (MINIBATCH_DB; default minibatch.db)")
    s.add_argument("--host", help="MINIBATCH_HOST; default 127.0.0.1")
    s.add_argument("--port", type=int, help="MINIBATCH_PORT; default 8000")
    s.add_argument("--handlers", help="module whose @minibatch.handler kinds to serve")
    s.add_argument("--allow-private-webhooks", action="store_true",
                   help="allow webhooks to loopback and private addresses")
    s.add_argument("--webhook-retry-schedule",
                   help="seconds before each attempt, e.g. 0,5,300 (its length = attempts)")
    s.add_argument("--synchronous", choices=("normal", "full"),
                   help="normal survives a process crash; full also power loss")
    s.add_argument("--retention-days", type=float, metavar="D",
                   help="delete batches that ended more than D days ago (default: keep)")
    s.add_argument("--rate-limit", type=float, metavar="R",
                   help="requests per second per API key; 429 beyond (default: none)")
    s.add_argument("--max-queued-items", type=int, metavar="N",
                   help="items queued at once per tenant; a submit past it is 429")
    s.add_argument("--poll-only", action="store_true",
                   help="PostgreSQL: find new work by polling only, no LISTEN (for"
                        " PgBouncer in transaction mode; MINIBATCH_LISTEN=false)")
    s.add_argument("--no-access-log", action="store_true",
                   help="no line per request (MINIBATCH_ACCESS_LOG=false)")
    s.add_argument("--log-format", choices=("text", "json"),
                   help="MINIBATCH_LOG_FORMAT; default text")
    s.add_argument("--workers", type=workers_arg, metavar="N|auto",
                   help="worker processes running the items (MINIBATCH_WORKERS; default 1:"
                        " in the API's process; auto: one per CPU)")
    s.add_argument("--openai-upstream", metavar="URL",
                   help="an OpenAI-compatible server's /v1 URL that runs OpenAI batches")
    s.add_argument("--openai-upstream-key", metavar="KEY",
                   help="sent to the upstream as Authorization: Bearer")
    s.add_argument("--openai-upstream-concurrency", type=int, metavar="N",
                   help="requests in flight to the upstream at once (default 16)")
    s.add_argument("--anthropic-upstream", metavar="URL",
                   help="an Anthropic-compatible server's root URL that runs message"
                        " batches (else they are translated onto --openai-upstream)")
    s.add_argument("--anthropic-upstream-key", metavar="KEY", help="sent as x-api-key")
    s.add_argument("--anthropic-upstream-concurrency", type=int, metavar="N",
                   help="requests in flight to it at once (default 16)")
    s.set_defaults(run=cmd_serve)

    w = sub.add_parser("worker", help="one worker process of serve --workers N (started by"
                                      " serve)")
    w.set_defaults(run=cmd_worker)

    k = sub.add_parser("keys", help="API keys and webhook secrets")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="a new API key for a tenant")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--name", help="what the key is for (shown by keys list)")
    kc.add_argument("--db")
    kl = ksub.add_parser("list", help="the keys (never the keys themselves), JSON lines")
    kl.add_argument("--tenant", help="only this tenant's")
    kl.add_argument("--db")
    kv = ksub.add_parser("revoke", help="refuse a key from now on, in a running server too")
    kv.add_argument("key_id")
    kv.add_argument("--db")
    kr = ksub.add_parser("rotate-secret", help="a new primary webhook signing secret")
    kr.add_argument("--tenant", required=True)
    kr.add_argument("--overlap", type=float, default=86400.0,
                    help="seconds the old secret keeps signing (default 86400)")
    kr.add_argument("--db")
    k.set_defaults(run=cmd_keys)

    b = sub.add_parser("backup", help="a consistent copy of the database, while serve runs")
    b.add_argument("dest", help="the new file to write")
    b.add_argument("--db")
    b.set_defaults(run=cmd_backup)
    ch = sub.add_parser("check", help="integrity and counter checks; exit 1 on a problem")
    ch.add_argument("--db")
    ch.set_defaults(run=cmd_check)

    for name, helptext, fn in (("submit", "submit a JSONL file as a batch", cmd_submit),
                               ("status", "print a batch", cmd_status),
                               ("results", "write a batch's results (JSONL) to stdout",
                                cmd_results),
                               ("list", "the batches, newest first (JSON lines)", cmd_list),
                               ("cancel", "cancel a batch", cmd_cancel),
                               ("deliveries", "a batch's webhook deliveries (JSON lines)",
                                cmd_deliveries),
                               ("redeliver", "send a webhook delivery again", cmd_redeliver)):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--url", help=f"server URL (MINIBATCH_URL; default {DEFAULT_URL})")
        if name == "submit":
            c.add_argument("file")
            c.add_argument("--kind", required=True)
            c.add_argument("--wait", action="store_true", help="follow it to the end")
            c.add_argument("--webhook-url")
        elif name == "list":
            c.add_argument("--status", help="only batches in this status")
            c.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
        elif name == "redeliver":
            c.add_argument("delivery_id")
        else:
            c.add_argument("batch_id")
        c.set_defaults(run=fn)

    d = sub.add_parser("demo", help="a self-contained run: server, batch, signed webhook")
    d.add_argument("--items", type=int, default=2000)
    d.set_defaults(run=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = parser().parse_args(argv)
    try:
        code = args.run(args)
    except CliError as exc:
        print(f"minibatch: {exc}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
