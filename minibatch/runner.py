"""The item loops: claimer (one per kind, sized to free slots), workers, completer,
heartbeat, canceller, rescuer, expirer, and the WAL checkpointer.

Items flow claimer -> per-kind deque -> worker tasks -> outcome list -> completer, which
writes outcomes in groups, one transaction per group. No loop touches SQL directly; each
makes one `store.call` per pass (a store method, or a few in a row), which on PostgreSQL
runs in a worker thread while the loop serves the items. Each loop is a thin `while`
around a `..._once()`.

A store call may suspend, so whatever a pass read of the runner's state before its call
may have changed when it returns: the deques, `stopping`, the outcomes. The runner's state
changes on the event loop only, never in the call's thread; each `..._once()` says what
it reads again after its call. `drain` waits for the calls under way (`_call`) before it
hands items back.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import ParamSpec, TypeVar

import anyio

from .config import Settings
from .errors import StorageUnavailable, StoreBusy
from .handlers import (
    Handler,
    Registry,
    backoff,
    cancelled_outcome,
    expired_outcome,
    failed_attempt,
    run_attempt,
    run_group,
)
from .metrics import Histogram
from .store import Claimed, Outcome, Store

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger("minibatch.runner")
STORAGE_RETRY_S = 1.0
# Another process holds the write lock (a store that does not wait for it): try again
# this soon. Its transactions are short, so the lock is usually free by then.
BUSY_RETRY_S = 0.002
CHECKPOINT_INTERVAL_S = 0.5
EXPIRY_INTERVAL_S = 1.0  # how late, at most, a batch's expiry is seen
# After an unexpected error in one pass of a loop: long enough that a fault that repeats
# on every pass logs a couple of lines a second rather than spinning, short enough that
# one that does not repeat costs nobody much.
LOOP_ERROR_PAUSE_S = 0.5


class KindPool:
    """The in-process side of one kind: claimed items waiting for a worker."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.ready: collections.deque[Claimed] = collections.deque()
        self.in_flight = 0  # claimed and not yet finished
        self.idle: list[anyio.Event] = []  # one per idle worker, set to wake it
        self.waking = False  # a worker has been woken and has not run yet
        self.slot_free = anyio.Event()  # set when in_flight drops to the capacity
        self.wake = anyio.Event()  # set when new items may be due (a submit)

    @property
    def free(self) -> int:
        """Room for claimed items: the workers' slots and as many again waiting in the
        deque, so the claimer takes items a group at a time (one transaction for many)
        while the workers run the previous group, rather than one item per finished one.
        A cancel still reaches the waiting ones before they start."""
        return 2 * self.handler.capacity - self.in_flight

    def wake_one(self) -> None:
        """Wake one idle worker, unless one is already on its way.

        Waking every worker for each claim cost more than the items themselves: a worker
        whose handler does not suspend drains the whole deque, so the others woke for
        nothing. One at a time, each woken worker wakes the next before running its item,
        so suspending handlers still spread over all workers.
        """
        if self.idle and not self.waking:
            self.waking = True
            self.idle.pop().set()


class GroupScope:
    """The cancel scope of one group handler's call, as the items of the group see it: a
    cancel interrupts the call only once every batch with an item in it is cancelled.
    Until then the call goes on, and the cancelled batches' items end `cancelled` when it
    returns."""

    def __init__(self, scope: anyio.CancelScope, batches: set[int], cancelled: set[int]
                 ) -> None:
        self.scope = scope
        self.batches = batches
        self.cancelled = cancelled

    def cancel(self) -> None:
        if self.batches <= self.cancelled:
            self.scope.cancel()


class Runner:
    def __init__(self, store: Store, registry: Registry, settings: Settings,
                 now: Callable[[], float], latency: Histogram) -> None:
        self.store = store
        self.latency = latency
        self.registry = registry
        self.settings = settings
        self.now = now
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.pools: dict[str, KindPool] = {}
        self.outcomes: list[Outcome] = []
        self.outcome_ready = anyio.Event()
        self.finished: set[KindPool] = set()  # pools with outcomes not yet written
        # (item seq, claim token) -> (batch seq, scope): a claim, not an item, since this
        # process may re-claim an item whose lease it lost while the first run goes on.
        # The scope is None for a kind whose running items a cancel lets finish.
        self.running: dict[tuple[int, int], tuple[int, anyio.CancelScope | GroupScope | None]
                           ] = {}
        self.cancelled: set[int] = set()
        self.stopping = False
        self._backoff = (settings.retry_base_s, settings.retry_cap_s)
        # Between two writes of outcomes: 0 writes each as soon as the loop gets to it. A
        # process sharing the write lock with others (a worker of serve --workers N) waits
        # a little, so its outcomes go in fewer, larger transactions and the others (the
        # API's writes) find the lock free more often.
        self.write_gap_s = 0.0
        self._calls = 0  # store calls under way that began before `stopping` (`_call`)
        self._calls_ended = anyio.Event()  # set when `_calls` drops to 0
        # One write of outcomes at a time (complete_once); taken at once when free.
        self._writing = anyio.Lock(fast_acquire=True)

    # -- start and stop ----------

    async def recover(self) -> None:
        """At start-up: take back the items of dead processes, and fail the kinds that no
        live process serves. This one's kinds are leased first; another process starting
        in the same instant with other kinds may not have leased its own yet, and its
        batches queued before then could be failed here."""
        store, owner, now = self.store, self.owner, self.now()
        until, kinds = now + self.settings.lease_s, self._kinds_served()
        known = self.registry.handlers

        def take_back() -> None:  # four calls, one thread hop
            expire_leases_of(store, lambda pid: pid != os.getpid() and not _pid_alive(pid))
            store.leases_extend(owner, until, kinds)
            store.items_rescue(now)
            store.batches_fail_unknown_kinds(known, now)

        await self._call(take_back)

    async def run(self, task_group: anyio.abc.TaskGroup) -> None:
        await self.recover()
        for handler in self.registry.handlers.values():
            pool = self.pools[handler.kind] = KindPool(handler)
            task_group.start_soon(self.claimer, pool)
            for _ in range(handler.concurrency):
                task_group.start_soon(self.worker, pool)
        task_group.start_soon(self.completer)
        task_group.start_soon(self.heartbeat)
        task_group.start_soon(self.canceller)
        task_group.start_soon(self.rescuer)
        task_group.start_soon(self.expirer)
        task_group.start_soon(self.checkpointer)
        if self.settings.listen:
            task_group.start_soon(self.listener)

    async def drain(self, grace_s: float) -> None:
        """Stop claiming, let running items finish for up to `grace_s`, write every
        outcome, then hand what is still running back to the queue."""
        self.stopping = True
        for pool in self.pools.values():
            pool.wake.set()
            pool.in_flight -= len(pool.ready)  # claimed, not started: released below
            pool.ready.clear()
        with anyio.move_on_after(grace_s):
            while any(p.in_flight for p in self.pools.values()):
                await anyio.sleep(0.01)
        # The calls begun before `stopping` end first: a claim's items (kept out of the
        # deque now) are this owner's to hand back, and a beat's lease on the kinds must
        # not land after items_release dropped them. Those begun since lease nothing: no
        # claim starts, and `_kinds_served` is empty. A write of outcomes under way is
        # waited for by the flush (one write at a time), so it lands before the release.
        while self._calls:
            self._calls_ended = anyio.Event()
            await self._calls_ended.wait()
        await self._flush_until_written()
        await self.store.call(self.store.items_release, self.owner, self.now())

    async def _call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """`store.call` for the loops. One begun before `stopping` is counted while under
        way, for `drain` to wait for; one begun since leases nothing, and is not."""
        if self.stopping:
            return await self.store.call(fn, *args, **kwargs)
        self._calls += 1
        try:
            return await self.store.call(fn, *args, **kwargs)
        finally:
            self._calls -= 1
            if not self._calls:
                self._calls_ended.set()

    async def _flush_until_written(self) -> None:
        try:
            await self.complete_once()
        except StorageUnavailable:
            log.warning("could not write %d outcomes at shutdown; their items run again",
                        len(self.outcomes))

    async def listener(self) -> None:
        """Wake a kind's claimer when any process submits items of it, from the store's
        notifications (PostgreSQL's LISTEN/NOTIFY; SQLite sends none, as its processes
        share one machine's poll); polling finds whatever a notification misses."""
        token = anyio.lowlevel.current_token()

        def on_kind(kind: str) -> None:  # in the store's listening thread
            with contextlib.suppress(RuntimeError):  # the event loop has stopped
                anyio.from_thread.run_sync(self.notify, kind, token=token)

        stop = self.store.subscribe(on_kind)
        try:
            await anyio.sleep_forever()
        finally:
            stop()

    def notify(self, kind: str) -> None:
        """New items of `kind` may be due now (called after a submit)."""
        pool = self.pools.get(kind)
        if pool is not None:
            pool.wake.set()

    def cancel_local(self, batch_seq: int) -> None:
        """Interrupt this process's running items of a cancelled batch (those of kinds
        that can be interrupted; the others finish)."""
        self.cancelled.add(batch_seq)
        for b, scope in list(self.running.values()):
            if b == batch_seq and scope is not None:
                scope.cancel()

    # -- claimer and workers ----------

    async def claimer(self, pool: KindPool) -> None:
        while not self.stopping:
            try:
                claimed = await self.claim_once(pool)
            except StoreBusy:
                await anyio.sleep(BUSY_RETRY_S)
                continue
            except StorageUnavailable:
                await anyio.sleep(STORAGE_RETRY_S)
                continue
            except Exception:
                await self._pause_after_error(f"claimer of kind {pool.handler.kind!r}")
                continue
            if claimed == 0 and pool.free > 0:
                with anyio.move_on_after(self.settings.poll_interval_s):
                    await pool.wake.wait()
                pool.wake = anyio.Event()
            elif pool.in_flight > pool.handler.capacity:
                await pool.slot_free.wait()  # until the deque is empty again
                pool.slot_free = anyio.Event()
            else:
                await anyio.sleep(0)

    async def claim_once(self, pool: KindPool) -> int:
        """Claim as many due items as the kind has free slots (at most claim_size).

        While the claim is under way, slots can only free up (this is the kind's one
        claimer), so `room` still fits; but the runner may have begun to drain: then the
        claimed items stay out of the deque, leased to this owner, and `drain`, which
        waits for this call, hands them back with the rest."""
        room = min(pool.free, self.settings.claim_size)
        if room <= 0 or self.stopping:
            return 0
        claimed = await self._call(self.store.items_claim, pool.handler.kind, room,
                                   self.owner, self.now(), self.settings.lease_s)
        if self.stopping:
            return 0
        if claimed:
            pool.in_flight += len(claimed)
            pool.ready.extend(claimed)
            pool.wake_one()
        return len(claimed)

    async def worker(self, pool: KindPool) -> None:
        drain = self._drain_groups if pool.handler.group else self._drain
        while True:
            while pool.ready:
                try:
                    await drain(pool)
                except Exception:
                    await self._pause_after_error(f"worker of kind {pool.handler.kind!r}")
            wake = anyio.Event()
            pool.idle.append(wake)
            await wake.wait()
            pool.waking = False

    async def _drain(self, pool: KindPool) -> None:
        """Run items from the deque, one after another, under one cancel scope.

        One scope per drain rather than per item: a scope costs more than a no-op item
        (shared/MEASURED.md). Cancelling a batch cancels the scope of each worker running
        one of its items; that worker is inside that item's handler, so only that item is
        interrupted, and the worker goes on under a new scope.
        """
        handler = pool.handler
        scope = anyio.CancelScope()
        current: Claimed | None = None
        try:
            with scope:
                while pool.ready and not scope.cancel_called:
                    current = pool.ready.popleft()
                    if pool.ready:
                        pool.wake_one()
                    self.running[current.seq, current.token] = (
                        current.batch_seq, scope if handler.interruptible else None)
                    if ended := self._ended_before_start(current):
                        self._finish(pool, current, ended)
                        current = None
                        continue
                    outcome = await run_attempt(handler, current, current.timeout_s or
                                                handler.timeout, self.now, self._backoff)
                    if scope.cancel_called and current.batch_seq in self.cancelled:
                        outcome = cancelled_outcome(current)  # e.g. a sync handler's thread
                    self._finish(pool, current, outcome)
                    current = None
        except Exception as exc:
            # A fault of the runner's own, not the handler's (run_attempt catches those):
            # the item still needs an outcome, or this process would hold its lease (the
            # heartbeat extends it, the rescuer skips it) for as long as it lives.
            if current is not None and (current.seq, current.token) in self.running:
                self._finish(pool, current, self._internal_error(current, exc))
            raise
        if current is not None:  # its handler was interrupted by the batch's cancel
            self._finish(pool, current, cancelled_outcome(current))

    async def _drain_groups(self, pool: KindPool) -> None:
        """Run a group handler's items from the deque, a group (one call) at a time."""
        handler = pool.handler
        while pool.ready:
            group, timeout = self._take_group(pool)
            if not group:
                continue
            if pool.ready:
                pool.wake_one()
            scope = anyio.CancelScope()
            batches = {c.batch_seq for c in group}
            guard = GroupScope(scope, batches, self.cancelled) if handler.interruptible else None
            for c in group:
                self.running[c.seq, c.token] = (c.batch_seq, guard)
            try:
                outcomes: list[Outcome] | None = None
                with scope:
                    outcomes = await run_group(handler, group, timeout, self.now, self._backoff)
                if outcomes is None:  # the call was interrupted: every batch was cancelled
                    outcomes = [cancelled_outcome(c) for c in group]
                elif handler.interruptible and batches & self.cancelled:
                    outcomes = [cancelled_outcome(c) if c.batch_seq in self.cancelled else o
                                for c, o in zip(group, outcomes, strict=True)]
                for c, outcome in zip(group, outcomes, strict=True):
                    self._finish(pool, c, outcome)
            except Exception as exc:  # the runner's own fault: see _drain
                for c in group:
                    if (c.seq, c.token) in self.running:
                        self._finish(pool, c, self._internal_error(c, exc))
                raise

    def _take_group(self, pool: KindPool) -> tuple[list[Claimed], float | None]:
        """Up to `group` items from the deque that share one timeout (the call's), and that
        timeout. Those whose batch ended while they waited are finished here instead."""
        group: list[Claimed] = []
        timeout: float | None = None
        size = pool.handler.group or 1
        while pool.ready and len(group) < size:
            claimed = pool.ready[0]
            its_timeout = claimed.timeout_s or pool.handler.timeout
            if group and its_timeout != timeout:
                break
            pool.ready.popleft()
            if ended := self._ended_before_start(claimed):
                self.running[claimed.seq, claimed.token] = (claimed.batch_seq, None)
                self._finish(pool, claimed, ended)
                continue
            group.append(claimed)
            timeout = its_timeout
        return group, timeout

    def _ended_before_start(self, claimed: Claimed) -> Outcome | None:
        """A claimed item whose batch was cancelled or expired while it waited in the deque
        never starts (a handler run under a cancelled scope could still send a request
        before its first await)."""
        if claimed.batch_seq in self.cancelled:
            return cancelled_outcome(claimed)
        if claimed.expires_at is not None and self.now() >= claimed.expires_at:
            return expired_outcome(claimed)
        return None

    def _finish(self, pool: KindPool, claimed: Claimed, outcome: Outcome) -> None:
        del self.running[claimed.seq, claimed.token]
        pool.in_flight -= 1
        # Events are set only on the transitions their waiters wait for (the deque ran
        # dry; the first outcome since the last write): setting one per item cost ~7 %.
        if pool.in_flight == pool.handler.capacity:
            pool.slot_free.set()
        self.outcomes.append(outcome)
        self.finished.add(pool)
        if len(self.outcomes) == 1:
            self.outcome_ready.set()
        # Last, so that whatever fails here cannot leave the item without its outcome.
        self.latency.observe(self.now() - claimed.claimed_at)

    def _internal_error(self, claimed: Claimed, exc: Exception) -> Outcome:
        """The outcome of an attempt the runner itself broke: a failed attempt, retried
        after the usual backoff while attempts are left, as a handler's exception is."""
        return failed_attempt(
            claimed, "internal_error",
            f"minibatch failed while running this item: {type(exc).__name__}: {exc}",
            backoff(claimed.item.attempt, *self._backoff), self.now)

    async def _pause_after_error(self, loop: str) -> None:
        await pause_after_error(log, loop)

    # -- completer, heartbeat, rescuer ----------

    async def completer(self) -> None:
        while True:
            await self.outcome_ready.wait()
            self.outcome_ready = anyio.Event()
            try:
                await self.complete_once()
                if self.write_gap_s:
                    await anyio.sleep(self.write_gap_s)  # outcomes gather meanwhile
            except StoreBusy:
                self.outcome_ready.set()  # outcomes are kept; try again in a moment
                await anyio.sleep(BUSY_RETRY_S)
            except StorageUnavailable:
                self.outcome_ready.set()  # outcomes are kept; try again shortly
                await anyio.sleep(STORAGE_RETRY_S)
            except Exception:
                self.outcome_ready.set()  # outcomes are kept here too
                await self._pause_after_error("completer")

    async def complete_once(self) -> int:
        """Write every outcome gathered so far in one transaction, then wake the claimers
        of the kinds written: a finished item frees a slot of its batch's `concurrency`
        cap (a capped batch must not wait a poll interval for its next item), and a retry
        may be due at once.

        One write at a time: drain's last one waits for the completer's under way, so
        every outcome gathered before it is written before drain hands the items back.
        Outcomes gathered during a write wait for the next; a failed write's go back
        before them."""
        async with self._writing:
            if not self.outcomes:
                return 0
            outcomes, self.outcomes = self.outcomes, []
            finished, self.finished = self.finished, set()
            try:
                await self._call(self.store.items_finish, outcomes, self.owner, self.now())
            except BaseException:
                self.outcomes[:0] = outcomes
                self.finished |= finished
                raise
        for pool in finished:
            pool.wake.set()
        return len(outcomes)

    async def heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.settings.lease_s / 3)
            while True:
                try:
                    await self.heartbeat_once()
                except StoreBusy:
                    await anyio.sleep(BUSY_RETRY_S)  # a lease must not lapse for that
                    continue
                except StorageUnavailable:
                    pass  # leases may lapse; other processes' rescuers re-run those items
                except Exception:
                    await self._pause_after_error("heartbeat")
                break

    async def heartbeat_once(self) -> None:
        """Extend this process's leases; interrupt items of batches cancelled elsewhere
        (as `cancel_once`, in the same store call)."""
        store, owner, asked = self.store, self.owner, self._batches_to_ask()
        until, kinds = self.now() + self.settings.lease_s, self._kinds_served()

        def beat() -> list[int]:
            store.leases_extend(owner, until, kinds)
            return store.batches_cancelling(asked)

        for batch_seq in await self._call(beat):
            self.cancel_local(batch_seq)

    async def canceller(self) -> None:
        """A cancel made in another process (the API's, or another worker's) reaches this
        one's running items within a poll interval: a read, and only while items run."""
        await self._every(self.settings.poll_interval_s, self.cancel_once, "canceller")

    async def cancel_once(self) -> None:
        """Interrupt this process's running items of batches cancelled anywhere; those
        claimed and waiting in a deque then never start (`_ended_before_start`). The
        batches are those held before the call; `cancel_local` reaches whichever of
        their items run when it returns (one claimed meanwhile is asked next pass)."""
        cancelling = await self._call(self.store.batches_cancelling, self._batches_to_ask())
        for batch_seq in cancelling:
            self.cancel_local(batch_seq)

    def _batches_to_ask(self) -> set[int]:
        """The batches with items running or waiting here, not yet known cancelled (none:
        the store asks nothing)."""
        held = {b for b, _ in self.running.values()}
        held.update(c.batch_seq for pool in self.pools.values() for c in pool.ready)
        return held - self.cancelled

    async def rescuer(self) -> None:
        await self._every(max(self.settings.lease_s / 2, 0.05), self.rescue_once, "rescuer")

    async def rescue_once(self) -> int:
        """Put other processes' items whose lease expired back in the queue (or fail them).

        This process's own leases are extended first and never rescued here: its items
        are still running, since it lives. After the event loop stalled past the lease (a
        long synchronous call), this pass may well run before the heartbeat's; rescuing
        then would start a second run of an item whose first run is still going.
        """
        store, owner, now = self.store, self.owner, self.now()
        until, kinds = now + self.settings.lease_s, self._kinds_served()

        def rescue() -> int:  # both in one thread hop, in this order
            store.leases_extend(owner, until, kinds)
            return store.items_rescue(now, except_owner=owner)

        return await self._call(rescue)

    def _kinds_served(self) -> Iterable[str]:
        """The kinds this process leases: none once it drains (items_release dropped
        them, and the heartbeat must not lease them again while the process ends)."""
        return () if self.stopping else self.registry.handlers

    async def expirer(self) -> None:
        await self._every(EXPIRY_INTERVAL_S, self.expire_once, "expirer")

    async def _every(self, interval_s: float, step: Callable[[], Awaitable[object]],
                     loop: str) -> None:
        """Run `step` every `interval_s`: after a storage fault the next pass does its work;
        any other error is logged and the loop goes on."""
        while True:
            await anyio.sleep(interval_s)
            try:
                await step()
            except StorageUnavailable:
                pass
            except Exception:
                await self._pause_after_error(loop)

    async def expire_once(self) -> int:
        """End the items not started of batches past their `expires_at` (`expired`): those
        queued in the store, and those this process claimed that still wait in a deque,
        whose workers may be busy for long yet (as a cancel reaches them). The deques are
        read after the store call, as they are then."""
        now = self.now()
        expired = len(await self._call(self.store.batches_expire, now))
        for pool in self.pools.values():
            for claimed in [c for c in pool.ready
                            if c.expires_at is not None and now >= c.expires_at]:
                pool.ready.remove(claimed)
                self.running[claimed.seq, claimed.token] = (claimed.batch_seq, None)
                self._finish(pool, claimed, expired_outcome(claimed))
        return expired

    async def checkpointer(self) -> None:
        """Checkpoint the WAL in a worker thread, so no COMMIT on the loop does it:
        bench/api.py saw 20 ms COMMITs (SQLite's automatic checkpoints) in GET tails."""
        self.store.autocheckpoint(False)
        try:
            while True:
                await anyio.sleep(CHECKPOINT_INTERVAL_S)
                try:
                    await anyio.to_thread.run_sync(self.store.checkpoint)
                except StorageUnavailable:
                    pass  # the WAL just grows meanwhile
                except Exception:
                    await self._pause_after_error("checkpointer")
        finally:
            self.store.autocheckpoint(True)


async def pause_after_error(logger: logging.Logger, loop: str) -> None:
    """Log the error being handled, with its traceback, and wait a moment: one bad row,
    item or delivery must not stop a loop, nor the process with it."""
    logger.exception("%s: a pass failed; going on in %g s", loop, LOOP_ERROR_PAUSE_S)
    await anyio.sleep(LOOP_ERROR_PAUSE_S)


def expire_leases_of(store: Store, gone: Callable[[int], bool]) -> None:
    """Expire the leases of this host's processes whose pid `gone` names, so their items
    run again at the next rescue rather than when the lease runs out. Owners are
    `host:pid:token` (Runner.owner). Store calls only: a loop calls it whole through
    `store.call`."""
    host = socket.gethostname()
    for owner in store.lease_owners():
        owner_host, _, rest = owner.partition(":")
        pid = int(rest.partition(":")[0] or 0)
        if owner_host == host and gone(pid):
            store.leases_expire(owner)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
