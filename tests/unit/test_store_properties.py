"""A stateful property test of the store: random interleavings of submit, cancel, claim,
finish (stale outcomes included), heartbeat, rescue, release, dead-owner expiry and
process restarts, on a real SQLite file, against a simulated clock.

After every step the database is read back and checked: counters agree with the items,
terminal things never change again, results list every terminal item once, a batch
whose items are all terminal is terminal itself, and the running items are exactly the
live claims the model holds (each with a lease).

Owner names (w1, w2) are reused after a drain (`items_release`) or a restart, which the
runner never does (each Runner names itself uniquely) but the store must survive: with
reuse, only the per-claim lease token keeps a stale outcome off a newer claim.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from minibatch import models
from minibatch.errors import Conflict
from minibatch.store import Outcome, error_bytes, open_store

T0 = 1_000_000.0
SLOTS = ("w1", "w2")
OUTCOMES = ("succeeded", "failed", "queued", "cancelled")
_uid = itertools.count(1)


@dataclass(eq=False)
class Claim:
    """One claimed attempt, as a worker holds it; stays usable (as a stale outcome)
    after its lease is lost."""

    seq: int
    batch_seq: int
    owner: str
    attempt: int
    token: int
    lease_until: float
    uid: int = field(default_factory=lambda: next(_uid))

    def __repr__(self) -> str:
        return f"<claim of item {self.seq} attempt {self.attempt} by {self.owner}>"


class StoreMachine(RuleBasedStateMachine):
    batches = Bundle("batches")
    claims = Bundle("claims")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="minibatch-props-")
        self.path = f"{self.dir}/jobs.db"
        self.store = open_store(self.path)
        self.now = T0
        self.live: dict[int, Claim] = {}  # item seq -> its live claim (the item is running)
        self.cancel_requested: set[str] = set()  # batch ids
        self.batch_kind: dict[str, str] = {}
        self.terminal_batches: dict[str, tuple] = {}  # id -> what it looked like at the end
        self.terminal_items: dict[int, tuple] = {}  # seq -> (status, output, error, attempts)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ----------

    def owner(self, slot: str) -> str:
        return slot

    def batch_rows(self) -> list[tuple]:
        return self.store.conn.execute(
            "SELECT seq, id, kind, status, total, queued, running, succeeded, failed,"
            " cancelled, started_at, completed_at, concurrency FROM batches ORDER BY seq"
        ).fetchall()

    def items_of(self, batch_seq: int) -> list[tuple]:
        return self.store.conn.execute(
            "SELECT seq, idx, status, output, error, attempts, lease_until, lease_owner"
            " FROM items WHERE batch=? ORDER BY idx", (batch_seq,)).fetchall()

    def status_of(self, batch_id: str) -> str:
        return self.store.batch_status(batch_id)

    # -- rules ----------

    @initialize(target=batches, n=st.integers(1, 5), max_attempts=st.integers(1, 3))
    def first_batch(self, n: int, max_attempts: int) -> str:
        return self.submit(n, max_attempts, None, "k")

    @rule(target=batches, n=st.integers(1, 5), max_attempts=st.integers(1, 3),
          concurrency=st.none() | st.integers(1, 2),
          kind=st.sampled_from(["k", "k", "k", "gone"]))
    def submit(self, n: int, max_attempts: int, concurrency: int | None, kind: str) -> str:
        row = self.store.batch_insert(
            tenant="t", kind=kind, items=[{"input": i} for i in range(n)], now=self.now,
            max_attempts=max_attempts, concurrency=concurrency)
        assert (row.status, row.total, row.queued) == ("queued", n, n)
        self.batch_kind[row.id] = kind
        return row.id

    @rule(batch=batches)
    def cancel(self, batch: str) -> None:
        before = self.status_of(batch)
        try:
            cancelled, _ = self.store.batch_cancel(batch, None, self.now)
        except Conflict:
            assert before in models.BATCH_TERMINAL, before
            assert self.status_of(batch) == before
            return
        assert before not in models.BATCH_TERMINAL, before
        assert cancelled.status in ("cancelling", "cancelled")
        self.cancel_requested.add(batch)

    @rule(target=claims, slot=st.sampled_from(SLOTS), limit=st.integers(1, 4),
          lease_s=st.sampled_from([5.0, 10.0, 30.0]),
          kind=st.sampled_from(["k", "k", "k", "gone"]))
    def claim(self, slot: str, limit: int, lease_s: float, kind: str):
        return multiple(*self._claim(slot, limit, lease_s, kind))

    @rule(target=claims, slot=st.sampled_from(SLOTS), limit=st.integers(1, 4),
          outcomes=st.lists(st.sampled_from(OUTCOMES), min_size=4, max_size=4),
          delay=st.integers(0, 20))
    def claim_and_finish(self, slot: str, limit: int, outcomes: list[str], delay: int):
        """A worker's whole attempt at once: claim, run, complete."""
        new = self._claim(slot, limit, 10.0, "k")
        self._finish([(c, o, delay) for c, o in zip(new, outcomes, strict=False)])
        return multiple(*new)

    def _claim(self, slot: str, limit: int, lease_s: float, kind: str) -> list[Claim]:
        owner = self.owner(slot)
        due = self.store.conn.execute(
            "SELECT count(*) FROM items i JOIN batches b ON b.seq=i.batch"
            " WHERE i.status='queued' AND i.kind=? AND i.run_at<=?"
            " AND (b.concurrency IS NULL OR b.running < b.concurrency)",
            (kind, self.now)).fetchone()[0]
        got = self.store.items_claim(kind, limit, owner, self.now, lease_s)
        assert len(got) <= limit
        assert (len(got) > 0) == (due > 0), (len(got), due)  # progress when work is due
        new = []
        for c in got:
            assert c.seq not in self.live, "claimed an item that is already running"
            claim = Claim(c.seq, c.batch_seq, owner, c.item.attempt, c.token, self.now + lease_s)
            self.live[c.seq] = claim
            new.append(claim)
        return new

    @rule(picks=st.lists(st.tuples(claims, st.sampled_from(OUTCOMES), st.integers(0, 20)),
                         min_size=1, max_size=4))
    def finish(self, picks: list[tuple[Claim, str, int]]) -> None:
        """Outcomes of any claims so far: a claim that is no longer live (lease lost, or
        already finished) is a stale outcome, which must be discarded."""
        self._finish(picks)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish_live(self, data: st.DataObject) -> None:
        """Outcomes of claims that still hold their lease (these must all be applied)."""
        live = sorted(self.live.values(), key=lambda c: c.seq)
        chosen = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=4,
                                    unique_by=lambda c: c.seq), label="claims")
        outcomes = data.draw(st.lists(st.sampled_from(OUTCOMES), min_size=len(chosen),
                                      max_size=len(chosen)), label="outcomes")
        delays = data.draw(st.lists(st.integers(0, 20), min_size=len(chosen),
                                    max_size=len(chosen)), label="retry delays")
        self._finish(list(zip(chosen, outcomes, delays, strict=True)))

    def _finish(self, picks: list[tuple[Claim, str, int]]) -> None:
        """Write outcomes grouped per owner, as each owner's completer would."""
        by_owner: dict[str, list[tuple[Claim, str, int]]] = {}
        for pick in picks:
            by_owner.setdefault(pick[0].owner, []).append(pick)
        for owner, group in by_owner.items():
            outcomes, expected = [], 0
            applied: set[int] = set()
            for claim, status, delay in group:
                output = b'"ok"' if status == "succeeded" else None
                error = None if status == "succeeded" else error_bytes(status, "by test")
                outcomes.append(Outcome(claim.seq, claim.batch_seq, claim.token, status,
                                        output, error, self.now + delay))
                if self.live.get(claim.seq) is claim and claim.uid not in applied:
                    applied.add(claim.uid)
                    expected += 1
            n = self.store.items_finish(outcomes, owner, self.now)
            assert n == expected, f"items_finish applied {n} outcomes, expected {expected}"
            for claim, _, _ in group:
                if claim.uid in applied:
                    self.live.pop(claim.seq, None)

    @rule(dt=st.sampled_from([0.0, 1.0, 4.0, 6.0, 11.0, 31.0]), rescue=st.booleans())
    def advance(self, dt: float, rescue: bool) -> None:
        """Time passes; then, maybe, the rescuer runs."""
        self.now += dt
        if rescue:
            expected = [c for c in self.live.values() if c.lease_until < self.now]
            assert self.store.items_rescue(self.now) == len(expected)
            for c in expected:
                del self.live[c.seq]

    @rule(slot=st.sampled_from(SLOTS), extra=st.sampled_from([5.0, 10.0, 30.0]))
    def heartbeat(self, slot: str, extra: float) -> None:
        owner = self.owner(slot)
        mine = [c for c in self.live.values() if c.owner == owner]
        assert self.store.leases_extend(owner, self.now + extra) == len(mine)
        for c in mine:
            c.lease_until = self.now + extra

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def expire_dead_owner(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted({c.owner for c in self.live.values()})))
        mine = [c for c in self.live.values() if c.owner == owner]
        assert self.store.leases_expire(owner) == len(mine)
        for c in mine:
            c.lease_until = 0

    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        """A process drains (`items_release` of its owner's running items) and goes away;
        the slot's next process uses the same owner name. A slot holding claims goes first."""
        busy = sorted({slot for slot in SLOTS for c in self.live.values()
                       if c.owner == self.owner(slot)})
        slot = data.draw(st.sampled_from(busy or SLOTS), label="slot")
        owner = self.owner(slot)
        mine = [c for c in self.live.values() if c.owner == owner]
        assert self.store.items_release(owner, self.now) == len(mine)
        for c in mine:
            del self.live[c.seq]

    @rule()
    def restart(self) -> None:
        """The process dies and a new one opens the same file with a new Store: the old
        leases stay until they lapse or are expired."""
        self.store.close()
        self.store = open_store(self.path)

    @precondition(lambda self: "gone" in self.batch_kind.values())
    @rule()
    def fail_unknown_kinds(self) -> None:
        open_gone = {r[1] for r in self.batch_rows() if r[2] != "k" and r[11] is None}
        failed = self.store.batches_fail_unknown_kinds(["k"], self.now)
        assert sorted(failed) == sorted(open_gone)

    # -- invariants ----------

    @invariant()
    def counters_match_items(self) -> None:
        for (seq, bid, _kind, status, total, queued, running, succeeded, failed, cancelled,
             _started, _completed, concurrency) in self.batch_rows():
            counts = (total, queued, running, succeeded, failed, cancelled)
            assert total == queued + running + succeeded + failed + cancelled, (bid, counts)
            items = self.items_of(seq)
            by_status = Counter(i[2] for i in items)
            direct = (len(items), *(by_status[s] for s in
                                    ("queued", "running", "succeeded", "failed", "cancelled")))
            assert counts == direct, (bid, status, counts, direct)
            metrics = self.store.batch_get(bid).metrics
            assert (metrics.total, metrics.queued, metrics.running, metrics.succeeded,
                    metrics.failed, metrics.cancelled) == counts
            if concurrency is not None:
                assert running <= concurrency, (bid, running, concurrency)
            if status == "cancelling":
                assert queued == 0, (bid, counts)

    @invariant()
    def terminal_batches_never_change(self) -> None:
        for row in self.batch_rows():
            bid, status = row[1], row[3]
            seen = self.terminal_batches.get(bid)
            if seen is not None:
                assert row == seen, (bid, seen, row)
            elif status in models.BATCH_TERMINAL:
                self.terminal_batches[bid] = row

    @invariant()
    def terminal_items_never_change(self) -> None:
        for (seq, *_rest) in self.batch_rows():
            for item_seq, _idx, status, output, error, attempts, _l, _o in self.items_of(seq):
                now = (status, output, error, attempts)
                seen = self.terminal_items.get(item_seq)
                if seen is not None:
                    assert now == seen, (item_seq, seen, now)
                elif status in models.ITEM_TERMINAL:
                    self.terminal_items[item_seq] = now

    @invariant()
    def results_list_each_terminal_item_once(self) -> None:
        for (seq, *_rest) in self.batch_rows():
            expected = [(i[1], i[0], i[2]) for i in self.items_of(seq)
                        if i[2] in models.ITEM_TERMINAL]
            lines, after = [], -1
            while True:  # page through with a small limit, as the results endpoint does
                page = self.store.results_page(seq, after, 2)
                lines += [(r[0], r[1], r[3]) for r in page]
                if len(page) < 2:
                    break
                after = page[-1][0]
            assert lines == expected, (seq, lines, expected)

    @invariant()
    def batch_status_follows_its_items(self) -> None:
        for (seq, bid, _kind, status, _t, _q, _r, succeeded, _f, _c, started_at,
             completed_at, _conc) in self.batch_rows():
            items = self.items_of(seq)
            all_terminal = all(i[2] in models.ITEM_TERMINAL for i in items)
            if all_terminal:
                if bid in self.cancel_requested:
                    want = "cancelled"
                else:
                    want = "completed" if succeeded else "failed"
                assert status == want, (bid, status, want)
                assert completed_at is not None
            else:
                assert completed_at is None, (bid, status)
                if bid in self.cancel_requested:
                    assert status == "cancelling", (bid, status)
                else:
                    assert status in ("queued", "running"), (bid, status)
                    assert (status == "running") == (started_at is not None), (bid, status)

    @invariant()
    def running_items_are_the_live_claims(self) -> None:
        running = {}
        for (seq, *_rest) in self.batch_rows():
            for item_seq, _idx, status, _o, _e, attempts, lease_until, owner in \
                    self.items_of(seq):
                if status == "running":
                    assert lease_until is not None and owner is not None, item_seq
                    running[item_seq] = (owner, attempts, lease_until)
        model = {c.seq: (c.owner, c.attempt, c.lease_until) for c in self.live.values()}
        assert running == model, (running, model)


StoreMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50,
                                          deadline=None)
TestStoreMachine = StoreMachine.TestCase
