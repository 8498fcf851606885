"""`minibatch demo`: the whole shape in one process a newcomer can watch.

A temporary database, the API server and a webhook receiver on free ports, a batch of
`sleep` items submitted over HTTP, its progress, and the signed `batch.completed` webhook
received and verified. Exits 0 only if the webhook verified.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import signing
from .app import Minibatch
from .auth import create_tenant_key
from .kinds import register_builtin_kinds
from .progress import BatchProgress

WEBHOOK_WAIT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def receiver_app(secret: str, inbox: list[dict], arrived: anyio.Event) -> Starlette:
    async def hook(request: Request) -> Response:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified = signing.verify(secret, headers, body, int(time.time()))
        inbox.append({"verified": verified, "event": json.loads(body),
                      "id": headers.get("webhook-id")})
        arrived.set()
        return Response(status_code=204 if verified else 400)

    return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


async def start_server(app: Any, port: int, task_group: anyio.abc.TaskGroup) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning", access_log=False))
    task_group.start_soon(server.serve)
    while not server.started:
        await anyio.sleep(0.01)
    return server


async def demo(workdir: Path, items: int) -> int:
    mb = Minibatch(str(workdir / "demo.db"), allow_private_webhooks=True,
                   poll_interval_s=0.02)
    register_builtin_kinds(mb)
    key = await mb.store.call(create_tenant_key, mb.store, "demo")
    inbox: list[dict] = []
    arrived = anyio.Event()
    api_port, hook_port = free_port(), free_port()
    print(f"minibatch demo: database {workdir / 'demo.db'}")
    async with mb, anyio.create_task_group() as tg:
        servers = [await start_server(mb.asgi(), api_port, tg),
                   await start_server(receiver_app(key["webhook_secret"], inbox, arrived),
                                      hook_port, tg)]
        print(f"  API on http://127.0.0.1:{api_port}, receiver on"
              f" http://127.0.0.1:{hook_port}/hook")
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}",
                                     headers={"x-api-key": key["api_key"]}) as client:
            body = {"kind": "sleep", "webhook": {"url": f"http://127.0.0.1:{hook_port}/hook"},
                    "items": [{"input": {"seconds": round(random.uniform(0, 0.2), 3)},
                               "entry_id": f"item-{i}"} for i in range(items)]}
            batch = (await client.post("/v1/batches", json=body)).raise_for_status().json()
            print(f"  submitted {batch['id']}: {items} sleep items")
            progress = BatchProgress()
            while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
                await anyio.sleep(0.1)
                batch = (await client.get(batch["polling_url"])).raise_for_status().json()
                progress.update(batch)
            progress.close()
            elapsed = time.monotonic() - started
            with anyio.move_on_after(WEBHOOK_WAIT_S):
                await arrived.wait()
        for server in servers:
            server.should_exit = True
    return report(batch, inbox, elapsed)


def report(batch: dict, inbox: list[dict], elapsed: float) -> int:
    m = batch["metrics"]
    print(f"  batch {batch['status']}: {m['succeeded']}/{m['total']} succeeded in"
          f" {elapsed:.2f} s ({m['total'] / elapsed:,.0f} items/s)")
    if not inbox:
        print("  no webhook arrived: NOT verified")
        return 1
    hook = inbox[0]
    if not hook["verified"]:
        print(f"  webhook {hook['id']} arrived but its signature did NOT verify")
        return 1
    print(f"  webhook {hook['id']} {hook['event']['type']}: signature verified")
    print("verified")
    return 0


def run_demo(items: int = 2000) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="minibatch-demo-"))
    try:
        return anyio.run(demo, workdir, items)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
