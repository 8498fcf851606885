"""`minibatch serve --workers N`: the serve process and the N worker processes it keeps.

The serve process runs the HTTP API and webhook delivery; each worker process runs the
item loops (`Runner`) for every kind, on its own connection to the same database. They
share the queue through the database alone, as two embedded instances would: claims under
leases and claim tokens, counters and terminal transitions in the outcome's transaction,
cancels read from the batch row. Nothing one process holds in memory is needed by another.

- A worker does not wait for the write lock (`Store.wait_for_lock(False)`): when another
  process is committing, its loops yield and try again a couple of milliseconds later,
  so handlers on its event loop never freeze behind another process's transaction.
- A worker that dies is started again; its items run again at once (its leases are
  expired as soon as its exit is seen) rather than when their leases run out.
- A worker whose serve process is gone (kill -9) drains and exits by itself.
- SIGTERM to serve stops the API, then sends SIGTERM to every worker, which finish or
  hand back their items (`shutdown_grace_s`) and exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import msgspec

from .config import Settings
from .runner import expire_leases_of

if TYPE_CHECKING:
    from .app import Minibatch
    from .store import Store

log = logging.getLogger("minibatch.workers")
SETTINGS_ENV = "MINIBATCH_WORKER_SETTINGS"  # the serve process's Settings, as JSON
PARENT_ENV = "MINIBATCH_WORKER_PARENT"  # the serve process's pid
PARENT_CHECK_S = 0.5  # how often a worker looks for its serve process
RESTART_MIN_S = 0.5  # before starting a dead worker again; doubles while it keeps dying
RESTART_MAX_S = 30.0
STABLE_S = 10.0  # a worker that lived this long died of something else than start-up
STOP_MARGIN_S = 10.0
WRITE_GAP_S = 0.01  # a worker's outcomes are written at most 100 times a second
# Workers yield the CPU to the API's process when both want it (CFS weights ~3:1): a
# request is answered first, and the items take every cycle the API leaves.
WORKER_NICE = 5  # past the grace, for a worker to write its outcomes and exit


class WorkerPool:
    """Starts `settings.workers` worker processes and keeps that many running."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.processes: dict[int, anyio.abc.Process] = {}  # slot -> its current process
        self.stopping = False

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ, **{SETTINGS_ENV: msgspec.json.encode(self.settings).decode(),
                                  PARENT_ENV: str(os.getpid())})
        return [sys.executable, "-m", "minibatch", "worker"], env

    async def run(self, task_group: anyio.abc.TaskGroup) -> None:
        for slot in range(self.settings.workers):
            task_group.start_soon(self._keep, slot)

    async def _keep(self, slot: int) -> None:
        """Run one worker slot: start a process, and another each time it dies."""
        delay = RESTART_MIN_S
        while not self.stopping:
            command, env = self.command()
            process = await anyio.open_process(command, env=env, stdin=None, stdout=None,
                                               stderr=None)
            self.processes[slot] = process
            if self.stopping:  # stop() began while this one was starting
                process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = await process.wait()
            if self.stopping:
                return
            log.warning("worker %d (pid %d) exited with %s; starting another", slot,
                        process.pid, code)
            dead = process.pid
            try:
                await self.store.call(expire_leases_of, self.store, dead.__eq__)
            except Exception:  # the new worker's start-up expires them too
                log.exception("could not hand back the items of worker pid %d", dead)
            delay = RESTART_MIN_S if time.monotonic() - started > STABLE_S else delay
            await anyio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    async def stop(self) -> None:
        """SIGTERM every worker and wait for them; kill those still there past the grace."""
        self.stopping = True
        await anyio.sleep(0)  # a worker being started sees `stopping` first
        running = [p for p in self.processes.values() if p.returncode is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(self.settings.shutdown_grace_s + STOP_MARGIN_S):
            for process in running:
                await process.wait()
        for process in running:
            if process.returncode is None:
                log.warning("worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                await process.wait()


def worker_settings() -> dict:
    """The options a worker process was started with (its serve process's Settings)."""
    raw = os.environ.pop(SETTINGS_ENV, None)
    if raw is None:
        raise SystemExit("minibatch worker is started by `minibatch serve --workers N`")
    return msgspec.structs.asdict(msgspec.json.decode(raw, type=Settings))


async def run_worker(mb: Minibatch) -> None:
    """Run `mb`'s items (no API, no webhooks) until SIGTERM/SIGINT or the serve process
    is gone, then finish or hand back the running items."""
    # The pid serve had when it started this process: read at start-up instead, it would
    # be init's if serve died while this one was still importing, and never change.
    parent = int(os.environ.pop(PARENT_ENV, os.getppid()))
    os.nice(WORKER_NICE)
    mb.delivers = mb.prunes = False  # the serve process does both
    async with mb:
        mb.store.wait_for_lock(False)
        assert mb.runner is not None
        mb.runner.write_gap_s = WRITE_GAP_S
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_until_signalled, tg.cancel_scope)
                tg.start_soon(_until_orphaned, parent, tg.cancel_scope)
        finally:
            mb.store.wait_for_lock(True)  # the last outcomes must be written, not refused


async def _until_signalled(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _until_orphaned(parent: int, scope: anyio.CancelScope) -> None:
    while os.getppid() == parent:
        await anyio.sleep(PARENT_CHECK_S)
    log.warning("the serve process (pid %d) is gone; stopping", parent)
    scope.cancel()
