"""Fair claims on a real SQLite file: the items of several batches of a kind are claimed
in turn, so one small batch is not stuck behind a big one; caps, due times, one
transaction and the lease token hold as before."""

from __future__ import annotations

from collections import Counter

import pytest

from minibatch.store import Outcome, Store, open_store

T0 = 1_000_000.0


def submit(store: Store, n: int, *, kind: str = "k", tenant: str = "a", **kw) -> int:
    row = store.batch_insert(tenant=tenant, kind=kind, items=[{"input": i} for i in range(n)],
                             now=T0, max_attempts=3, **kw)
    return row.seq


def per_batch(claimed) -> Counter:
    return Counter(c.batch_seq for c in claimed)


def finish(store: Store, claimed, owner: str = "o", *, status: str = "succeeded",
           run_at: float = 0.0) -> None:
    store.items_finish([Outcome(c.seq, c.batch_seq, c.token, status, b"1", None, run_at)
                        for c in claimed], owner, T0)


def test_a_one_item_batch_is_in_the_first_claim_after_a_3000_item_batch(db_path):
    """The issue: tenant b's one item waited behind tenant a's 3,000 of the same kind."""
    store = open_store(db_path)
    big = submit(store, 3000, tenant="a")
    small = submit(store, 1, tenant="b")
    claimed = store.items_claim("k", 100, "o", T0, lease_s=30)
    assert per_batch(claimed) == {big: 99, small: 1}


def test_250_batches_are_all_served_within_3_claims_of_100(db_path):
    """With more batches than a claim holds, the next claim starts where this one ended
    (oldest first, the old claim served the first 150 batches' items and no others)."""
    store = open_store(db_path)
    seqs = [submit(store, 2) for _ in range(250)]
    served = [per_batch(store.items_claim("k", 100, "o", T0, lease_s=30)) for _ in range(3)]
    assert all(sum(c.values()) == 100 and max(c.values()) == 1 for c in served)
    assert set().union(*served) == set(seqs)


def test_batches_take_turns_when_there_are_more_batches_than_the_claim_size(db_path):
    store = open_store(db_path)
    seqs = [submit(store, 100) for _ in range(3)]
    served: Counter = Counter()
    for claim in range(6):
        claimed = store.items_claim("k", 2, "o", T0 + claim, lease_s=30)
        assert len(per_batch(claimed)) == 2  # one item from each of two batches
        served += per_batch(claimed)
        finish(store, claimed)
    assert served == {seq: 4 for seq in seqs}


def test_a_batch_with_few_due_items_leaves_its_share_to_the_others(db_path):
    store = open_store(db_path)
    big, few, other = submit(store, 3000), submit(store, 5), submit(store, 3000)
    claimed = store.items_claim("k", 100, "o", T0, lease_s=30)
    assert per_batch(claimed) == {big: 48, few: 5, other: 47}
    assert sorted(c.seq for c in claimed if c.batch_seq == big) == \
        [c.seq for c in claimed if c.batch_seq == big]  # oldest first within a batch


def test_a_capped_batch_gets_no_more_than_its_free_slots(db_path):
    store = open_store(db_path)
    capped = submit(store, 10, concurrency=2)
    free = submit(store, 10)
    first = store.items_claim("k", 100, "o", T0, lease_s=30)
    assert per_batch(first) == {capped: 2, free: 10}
    assert store.items_claim("k", 100, "o", T0, lease_s=30) == []  # both slots taken
    finish(store, [c for c in first if c.batch_seq == capped][:1])
    assert per_batch(store.items_claim("k", 100, "o", T0, lease_s=30)) == {capped: 1}


def test_a_batch_whose_items_are_not_due_takes_no_share(db_path):
    store = open_store(db_path)
    waiting = submit(store, 1)
    [retry] = store.items_claim("k", 1, "o", T0, lease_s=30)
    finish(store, [retry], status="queued", run_at=T0 + 60)  # a retry, due in a minute
    due = submit(store, 3)
    assert per_batch(store.items_claim("k", 100, "o", T0 + 1, lease_s=30)) == {due: 3}
    assert per_batch(store.items_claim("k", 100, "o", T0 + 60, lease_s=30)) == {waiting: 1}


def test_other_kinds_are_not_claimed(db_path):
    store = open_store(db_path)
    submit(store, 3, kind="other")
    mine = submit(store, 3)
    assert per_batch(store.items_claim("k", 100, "o", T0, lease_s=30)) == {mine: 3}


@pytest.mark.sqlite_only
def test_a_fair_claim_is_one_transaction_with_one_lease_token(db_path):
    store = open_store(db_path)
    for _ in range(5):
        submit(store, 50)
    statements = []
    store.conn.exec_trace = lambda cursor, sql, bindings: statements.append(sql) or True
    claimed = store.items_claim("k", 100, "o", T0, lease_s=30)
    store.conn.exec_trace = None
    assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("COMMIT") == 1
    assert len(claimed) == 100 and len({c.token for c in claimed}) == 1
    for batch in store.batches_list(None, status=None, limit=10, after=None)[0]:
        assert (batch.status, batch.metrics.running, batch.metrics.queued) == \
            ("running", 20, 30)


@pytest.mark.sqlite_only
def test_a_claim_that_could_not_take_every_item_it_read_changes_nothing(db_path):
    """The claim reads the queued items, then marks them running without reading them
    again. Should one of them not change (here a trigger skips its row), the claim is
    undone rather than hand out an item its row does not say is running."""
    store = open_store(db_path)
    seq = submit(store, 3)
    store.conn.execute(
        "CREATE TEMP TRIGGER skip_one BEFORE UPDATE OF status ON items"
        " WHEN new.status = 'running' AND old.idx = 1 BEGIN SELECT RAISE(IGNORE); END")
    with pytest.raises(RuntimeError, match="claimed 2 of 3 items"):
        store.items_claim("k", 10, "o", T0, lease_s=30)
    assert store.conn.execute("SELECT status, attempts, lease_owner FROM items ORDER BY idx"
                              ).fetchall() == [("queued", 0, None)] * 3
    assert store.conn.execute("SELECT queued, running, status, claim_turn FROM batches"
                              " WHERE seq=?", (seq,)).fetchall() == [(3, 0, "queued", None)]
    store.conn.execute("DROP TRIGGER skip_one")
    assert len(store.items_claim("k", 10, "o", T0, lease_s=30)) == 3
