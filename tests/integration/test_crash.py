"""kill -9 a real worker process mid-batch; a new process finishes it with nothing lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio

import minibatch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from crash_worker import make  # noqa: E402

N = 5000
LEASE_S = 600  # of the process killed in the lease test: far longer than any wait below


def start_worker(db: str, batch_id: str, log: Path,
                 hold_from: int | None = None) -> subprocess.Popen:
    hold = [] if hold_from is None else [str(hold_from)]
    return subprocess.Popen([sys.executable, str(HERE / "crash_worker.py"), db, batch_id,
                             str(log), *hold])


def test_sigkill_mid_run_then_restart_finishes_every_item_once(db_path, tmp_path):
    setup = make(db_path)
    batch = anyio.run(setup.submit, "work", [{"input": i} for i in range(N)])
    setup.close()
    log = tmp_path / "runs.log"

    proc = start_worker(db_path, batch.id, log, hold_from=N // 2)  # cannot finish the batch
    reader = minibatch.Minibatch(db_path)
    deadline = time.monotonic() + 120
    while anyio.run(reader.get, batch.id).metrics.succeeded < N // 4:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    mid = anyio.run(reader.get, batch.id)
    assert mid.status == "running" and N // 4 <= mid.metrics.succeeded <= N // 2

    proc = start_worker(db_path, batch.id, log)
    assert proc.wait(timeout=120) == 0
    done = anyio.run(reader.get, batch.id)

    async def collect():
        return [r async for r in reader.results(batch.id)]

    results = anyio.run(collect)
    reader.close()
    assert done.status == "completed"
    assert done.metrics.succeeded == N and done.metrics.total == N
    assert len(results) == N and len({r.id for r in results}) == N
    assert [r.output["i"] for r in results] == list(range(N))
    ran = log.read_text().split()
    assert set(ran) == {r.id for r in results}  # every item ran; re-runs only for the killed
    assert len(ran) - N <= 20 + 100  # at most what was in flight or awaiting its write


def test_restart_after_kill_resumes_without_waiting_for_the_lease(db_path, tmp_path):
    """The dead process's pid is gone, so its leases are taken back at start-up."""
    setup = make(db_path)
    batch = anyio.run(setup.submit, "work", [{"input": i} for i in range(200)])
    setup.close()
    hang = (
        f"import sys, anyio; sys.path.insert(0, {str(HERE)!r})\n"
        "from crash_worker import make\n"
        f"mb = make({db_path!r}, lease_s={LEASE_S})\n"
        "@mb.handler('work', concurrency=20)\n"
        "async def hang(item):\n"
        "    await anyio.sleep(3600)\n"
        "async def main():\n"
        "    async with mb:\n"
        "        await anyio.sleep(3600)\n"
        "anyio.run(main)\n")
    proc = subprocess.Popen([sys.executable, "-c", hang])
    reader = minibatch.Minibatch(db_path)
    deadline = time.monotonic() + 60
    while anyio.run(reader.get, batch.id).metrics.running < 20:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    started = time.monotonic()
    finisher = start_worker(db_path, batch.id, tmp_path / "log")
    assert finisher.wait(timeout=120) == 0
    elapsed = time.monotonic() - started
    done = anyio.run(reader.get, batch.id)
    reader.close()
    assert done.status == "completed" and done.metrics.succeeded == 200
    assert elapsed < LEASE_S  # it did not wait for the dead process's leases to lapse


def test_sigkill_between_batch_completion_and_delivery_delivers_after_restart(db_path):
    from standardwebhooks.webhooks import Webhook

    from tests.receiver import Receiver

    options = "webhook_retry_schedule='0,0.1', allow_private_webhooks=True"
    script = (
        "import sys, anyio, minibatch, minibatch.delivery\n"
        "async def never(self):\n"
        "    await anyio.sleep_forever()\n"
        "if sys.argv[1:] == ['--no-delivery']:  # so the kill lands before any attempt\n"
        "    minibatch.delivery.Deliverer.claimer = never\n"
        f"mb = minibatch.Minibatch({db_path!r}, {options}, poll_interval_s=0.02)\n"
        "mb.handler('echo')(lambda item: item.input)\n"
        "async def main():\n"
        "    async with mb:\n"
        "        await anyio.sleep(3600)\n"
        "anyio.run(main)\n")
    with Receiver() as rx:
        setup = minibatch.Minibatch(db_path, allow_private_webhooks=True)
        setup.handler("echo")(lambda item: item.input)
        secret = setup.webhook_secret()
        batch = anyio.run(lambda: setup.submit("echo", [{"input": 1}],
                                               webhook={"url": rx.url}))
        proc = subprocess.Popen([sys.executable, "-c", script, "--no-delivery"])
        deadline = time.monotonic() + 60
        while anyio.run(setup.get, batch.id).status != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # the delivery row exists; no attempt was made
        proc.wait()
        [pending] = anyio.run(setup.deliveries, batch.id)
        assert pending.status == "pending" and rx.requests == []
        proc = subprocess.Popen([sys.executable, "-c", script])
        try:  # until the attempt is recorded, not just received
            deadline = time.monotonic() + 60
            while (delivered := anyio.run(setup.deliveries, batch.id)[0]).status != \
                    "succeeded":
                assert time.monotonic() < deadline, delivered
                time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait()
        setup.close()
    event = Webhook(secret).verify(rx.requests[0]["body"], rx.requests[0]["headers"])
    assert event["type"] == "batch.completed" and event["data"]["id"] == batch.id
    assert rx.requests[0]["headers"]["webhook-id"] == pending.id
    assert [a.status_code for a in delivered.attempts] == [200]
