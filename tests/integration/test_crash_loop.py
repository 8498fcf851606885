"""A real `minibatch serve` killed with SIGKILL every 1.5 s, four times, mid-run.

Afterwards every batch is completed, each item has exactly one result line, every
terminal webhook arrived at least once, and the metrics add up.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import httpx

from tests.receiver import Receiver
from tests.serve import Served

BATCHES, ITEMS, KILLS = 4, 1000, 4
ENV = {"MINIBATCH_ALLOW_PRIVATE_WEBHOOKS": "true", "MINIBATCH_WEBHOOK_TIMEOUT_S": "1",
       "MINIBATCH_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.2,0.5,1,1,2,2"}


def test_sigkill_every_1_5_s_loses_nothing_and_doubles_no_result(tmp_path):
    receiver = Receiver(default=200).__enter__()
    srv = Served(tmp_path, env=ENV)
    try:
        batch_ids = []
        for b in range(BATCHES):
            items = [{"input": {"seconds": 0.2}, "entry_id": f"b{b}-{i}"} for i in range(ITEMS)]
            created = httpx.post(f"{srv.url}/v1/batches", headers={"x-api-key":
                                 srv.key["api_key"]}, json={
                "kind": "sleep", "items": items, "concurrency": 50,
                "webhook": {"url": receiver.url}}, timeout=30)
            assert created.status_code == 201, created.text
            batch_ids.append(created.json()["id"])
        kills_mid_run = 0
        for _ in range(KILLS):
            time.sleep(1.5)
            headers = {"x-api-key": srv.key["api_key"]}
            open_items = sum(
                m["queued"] + m["running"] for m in
                (httpx.get(f"{srv.url}/v1/batches/{b}", headers=headers).json()["metrics"]
                 for b in batch_ids))
            kills_mid_run += open_items > 0
            srv.kill()
            srv = Served(tmp_path, env=ENV)
        assert kills_mid_run >= 3, kills_mid_run  # the kills landed while items were open
        headers = {"x-api-key": srv.key["api_key"]}
        deadline = time.monotonic() + 60
        batches = []
        while True:
            batches = [httpx.get(f"{srv.url}/v1/batches/{b}", headers=headers).json()
                       for b in batch_ids]
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
                              headers=headers).text.splitlines()
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
