"""A real `minibatch serve` killed with SIGKILL four times, each time mid-run.

Afterwards every batch is completed, each item has exactly one result line, every
terminal webhook arrived at least once, and the metrics add up.

Each kill lands while work is provably open, whatever the machine's speed: the `gated`
kind runs item i only once the gate file says i is allowed, and the test opens the gate a
step at a time. So items past the gate are queued or blocked in their handler at every
kill, and a kill comes only after items have succeeded since the last restart.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import httpx

from tests.receiver import Receiver
from tests.serve import Served

BATCHES, ITEMS, KILLS, STEP = 4, 400, 4, 60  # ITEMS > KILLS * STEP: work left at each kill
ENV = {"MINIBATCH_ALLOW_PRIVATE_WEBHOOKS": "true", "MINIBATCH_WEBHOOK_TIMEOUT_S": "5",
       "MINIBATCH_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.2,0.5,1,1,2,2"}
DEADLINE_S = 120  # for each wait on the server; generous, a slow machine only waits longer
HANDLERS = """\
import time

import anyio

import minibatch

GATE = {gate!r}
_read = [0.0, 0]  # when the gate file was last read, and what it said


def allowance() -> int:
    if time.monotonic() - _read[0] > 0.02:
        try:
            with open(GATE) as f:
                _read[1] = int(f.read())
        except (OSError, ValueError):
            pass
        _read[0] = time.monotonic()
    return _read[1]


@minibatch.handler("gated", concurrency=1000)
async def gated(item):
    while item.input["i"] >= allowance():
        await anyio.sleep(0.02)
    await anyio.sleep(0.05)
    return item.input
"""


def set_gate(path, allowed: int) -> None:
    """Items with i < allowed may run; written whole, so a reader never sees half."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(allowed))
    os.replace(tmp, path)


def observe(srv: Served, batch_ids: list[str]) -> list[dict]:
    headers = {"x-api-key": srv.key["api_key"]}
    return [httpx.get(f"{srv.url}/v1/batches/{b}", headers=headers, timeout=30).json()
            for b in batch_ids]


def total(batches: list[dict], *states: str) -> int:
    return sum(b["metrics"][s] for b in batches for s in states)


def test_sigkill_mid_run_four_times_loses_nothing_and_doubles_no_result(tmp_path):
    gate = tmp_path / "gate"
    set_gate(gate, 0)
    (tmp_path / "gated_kind.py").write_text(HANDLERS.format(gate=str(gate)))
    flags = ("--handlers", "gated_kind")
    receiver = Receiver(default=200).__enter__()
    srv = Served(tmp_path, *flags, env=ENV)
    try:
        batch_ids = []
        for b in range(BATCHES):
            items = [{"input": {"i": i}, "entry_id": f"b{b}-{i}"} for i in range(ITEMS)]
            created = httpx.post(f"{srv.url}/v1/batches", headers={"x-api-key":
                                 srv.key["api_key"]}, json={
                "kind": "gated", "items": items, "concurrency": 50,
                "max_attempts": 2 * KILLS,  # an item blocked at every kill still succeeds
                "webhook": {"url": receiver.url}}, timeout=30)
            assert created.status_code == 201, created.text
            batch_ids.append(created.json()["id"])
        kills = []  # per kill: succeeded at the restart before it, succeeded and open at it
        state = observe(srv, batch_ids)
        for kill in range(1, KILLS + 1):
            at_restart = total(state, "succeeded")
            set_gate(gate, kill * STEP)
            deadline = time.monotonic() + DEADLINE_S
            while True:  # until items have succeeded since the restart and others run
                state = observe(srv, batch_ids)
                if total(state, "succeeded") > at_restart and total(state, "running") > 0:
                    break
                assert time.monotonic() < deadline, (kill, state, srv.log_tail())
                time.sleep(0.02)
            srv.kill()  # items i >= kill * STEP cannot have finished: the gate holds them
            kills.append((at_restart, total(state, "succeeded"),
                          total(state, "queued", "running")))
            srv = Served(tmp_path, *flags, env=ENV)
            state = observe(srv, batch_ids)  # what the kill left, as the restart finds it
            assert total(state, "queued", "running") >= BATCHES * (ITEMS - kill * STEP), state
        assert len(kills) == KILLS
        assert all(done > before and open_ > 0 for before, done, open_ in kills), kills
        set_gate(gate, ITEMS)
        headers = {"x-api-key": srv.key["api_key"]}
        deadline = time.monotonic() + DEADLINE_S
        batches = []
        while True:
            batches = observe(srv, batch_ids)
            pending = sum(b["deliveries"]["pending"] for b in batches)
            if all(b["status"] == "completed" for b in batches) and not pending and len(
                    {r["headers"]["webhook-id"] for r in receiver.requests}) >= BATCHES:
                break
            assert time.monotonic() < deadline, (
                [(b["status"], b["metrics"], b["deliveries"]) for b in batches],
                len(receiver.requests), srv.log_tail())
            time.sleep(0.2)
        for batch in batches:
            m = batch["metrics"]
            assert m["succeeded"] == m["total"] == ITEMS
            assert m["total"] == m["queued"] + m["running"] + m["succeeded"] + m["failed"] + \
                m["cancelled"]
            lines = httpx.get(f"{srv.url}/v1/batches/{batch['id']}/results",
                              headers=headers, timeout=30).text.splitlines()
            entries = [json.loads(line)["entry_id"] for line in lines]
            assert len(entries) == ITEMS and len(set(entries)) == ITEMS
        received = defaultdict(set)
        for request in receiver.requests:
            event = json.loads(request["body"])
            received[event["data"]["id"]].add((request["headers"]["webhook-id"],
                                               event["type"]))
        for batch_id in batch_ids:
            assert len(received[batch_id]) == 1  # one delivery, maybe sent more than once
            assert next(iter(received[batch_id]))[1] == "batch.completed"
    finally:
        srv.stop()
        receiver.__exit__(None, None, None)
