"""The pruner: deletes what `retention_days` says is old, and removes the rows of deleted
batches, a small transaction at a time, in a worker thread on a connection of its own so
the event loop never waits for it. The store's half is store/retention.py."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import anyio
import anyio.abc

from .auth import IDEMPOTENCY_WINDOW_S
from .config import Settings
from .errors import StorageUnavailable
from .runner import pause_after_error
from .store import Store

log = logging.getLogger("minibatch.retention")
PRUNE_INTERVAL_S = 1.0  # how soon a deleted batch's rows start going
CHUNK = 2000  # rows removed per transaction (~ms of write lock each)
# Between two of them: the thread lets go of the write lock and the GIL, so the event
# loop's writes and requests get in (bench/retention.py: GET p99 during a prune of 1M
# items 28.6 ms back to back, against 10.6 ms before it).
CHUNK_GAP_S = 0.002
IDEMPOTENCY_EVERY = 300  # passes between two prunes of expired idempotency keys (~5 min)
BATCHES_PER_PASS = 100  # ended batches deleted per retention transaction


class Pruner:
    def __init__(self, store: Store, settings: Settings, now: Callable[[], float]) -> None:
        self.settings = settings
        self.now = now
        # A connection of the pruner's own, used from its thread only; a store that can
        # have only one (":memory:") is pruned on the loop.
        self.own_store = store.another()
        self.shared = store if self.own_store is None else None
        self.thread = anyio.CapacityLimiter(1)
        self.stopping = threading.Event()  # a pass in its thread ends at the next chunk
        self.passes = 0

    async def run(self, task_group: anyio.abc.TaskGroup) -> None:
        task_group.start_soon(self.pruner)

    async def pruner(self) -> None:
        while True:
            await anyio.sleep(PRUNE_INTERVAL_S)
            try:
                if self.shared is not None:
                    self.prune_once()
                else:
                    await anyio.to_thread.run_sync(self.prune_once, limiter=self.thread)
            except StorageUnavailable:
                pass  # the next pass goes on where this one stopped
            except Exception:
                await pause_after_error(log, "pruner")

    def prune_once(self) -> int:
        """Delete the batches that ended more than `retention_days` ago, remove every
        deleted batch's rows (a CHUNK per transaction), and expired idempotency keys.
        Returns the rows removed."""
        store = self._store()
        now = self.now()
        if self.settings.retention_days is not None:
            before = now - self.settings.retention_days * 86400
            while (store.batches_delete_ended(before, BATCHES_PER_PASS, now)
                   == BATCHES_PER_PASS and not self.stopping.is_set()):
                pass
        removed = 0
        while not self.stopping.is_set() and (chunk := store.doomed_prune(CHUNK)):
            removed += chunk
            time.sleep(CHUNK_GAP_S)
        if self.passes % IDEMPOTENCY_EVERY == 0:
            store.idempotency_prune(now - IDEMPOTENCY_WINDOW_S)
        self.passes += 1
        return removed

    def _store(self) -> Store:
        store = self.shared or self.own_store
        assert store is not None
        return store

    def close(self) -> None:
        if self.own_store is not None:
            self.own_store.close()
            self.own_store = None
