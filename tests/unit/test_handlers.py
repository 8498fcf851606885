"""The handler registry's limits and how `run_attempt` reads a handler's ending, called
directly (no runner, no database)."""

from __future__ import annotations

import math

import msgspec
import pytest

import minibatch
import minibatch.handlers
from minibatch.errors import Fail, InvalidInput, Retry
from minibatch.handlers import MAX_RETRY_AFTER_S, Handler, Registry, _delay, run_attempt
from minibatch.models import MAX_NESTING, Item, ItemError
from minibatch.store import Claimed

pytestmark = pytest.mark.anyio
NOW = 1_000_000.0


async def noop(item: Item) -> None:
    return None


@pytest.mark.parametrize("limits", [{"timeout": -1}, {"timeout": 0}, {"max_attempts": 0},
                                    {"max_attempts": -2}, {"concurrency": -1}])
def test_limits_that_are_not_positive_are_refused(limits):
    with pytest.raises(InvalidInput):
        Handler("k", noop, **{"concurrency": None, "timeout": None, "max_attempts": None,
                              **limits})


def test_the_smallest_positive_limits_are_accepted():
    h = Handler("k", noop, concurrency=1, timeout=0.001, max_attempts=1)
    assert (h.concurrency, h.timeout, h.max_attempts, h.is_async) == (1, 0.001, 1, True)
    sync = Handler("s", lambda item: None, concurrency=None, timeout=None, max_attempts=None)
    assert sync.concurrency == 4 and not sync.is_async and sync.limiter is not None


@pytest.mark.parametrize(("after", "seconds"), [
    (2, 2.0), (0.5, 0.5), (0, 0.0), (-3, 0.0), (1e9, MAX_RETRY_AFTER_S),
    (True, None), ("5", None), (None, None), (math.nan, None), (math.inf, None)])
def test_retry_after_is_a_finite_number_of_seconds_capped_at_a_day(after, seconds):
    assert _delay(after) == seconds


def claim(attempt: int = 1, max_attempts: int = 3) -> Claimed:
    item = Item(id="item_1", batch_id="batch_1", entry_id=None, index=0, input=1,
                metadata=None, attempt=attempt)
    return Claimed(item, 1, 1, max_attempts, None, NOW, 7)


async def attempt(fn, claimed: Claimed | None = None):
    handler = Handler("k", fn, concurrency=None, timeout=None, max_attempts=None)
    return await run_attempt(handler, claimed or claim(), None, lambda: NOW, (1.0, 60.0))


def error_of(outcome) -> ItemError:
    return msgspec.json.decode(outcome.error, type=ItemError)


@pytest.mark.parametrize("value", [object(), 10 ** 5000, {(1, 2): 3}],
                         ids=["object", "huge", "tuple-key"])
async def test_an_output_that_is_not_json_fails_the_item_at_once(value):
    async def returns(item):
        return value

    outcome = await attempt(returns)
    assert outcome.status == "failed" and error_of(outcome).code == "output_not_json"
    assert outcome.token == 7


async def test_a_retry_with_a_bad_after_falls_back_to_the_backoff():
    async def retry(item):
        raise Retry(after="soon")

    outcome = await attempt(retry)
    assert outcome.status == "queued" and NOW + 0.8 <= outcome.run_at <= NOW + 1.2


async def test_fail_ends_the_item_with_its_code_and_retry_after_is_honoured():
    async def fail(item):
        raise Fail("no", code="nope")

    async def retry(item):
        raise Retry(after=30)

    failed = await attempt(fail)
    assert failed.status == "failed" and error_of(failed) == ItemError("nope", "no")
    retried = await attempt(retry)
    assert retried.status == "queued" and retried.run_at == NOW + 30
    last = await attempt(retry, claim(attempt=3, max_attempts=3))
    assert last.status == "failed" and error_of(last).code == "retry"


def test_default_concurrency_and_the_retry_after_cap():
    assert Handler("a", noop, concurrency=None, timeout=None, max_attempts=None
                   ).concurrency == 16
    assert MAX_RETRY_AFTER_S == 86400.0


async def timed(fn, timeout: float, claimed: Claimed | None = None):
    handler = Handler("k", fn, concurrency=None, timeout=timeout, max_attempts=None)
    return await run_attempt(handler, claimed or claim(), timeout, lambda: NOW, (1.0, 60.0))


async def test_an_async_handler_past_its_timeout_is_interrupted_and_retried():
    import anyio

    async def slow(item):
        await anyio.sleep(30)

    outcome = await timed(slow, 0.01)
    assert outcome.status == "queued" and error_of(outcome).code == "timeout"
    assert NOW + 0.8 <= outcome.run_at <= NOW + 1.2


async def test_a_sync_handler_that_ends_after_its_timeout_counts_as_timed_out():
    """Its thread cannot be interrupted; it overran if it ended past the deadline."""
    import time

    def slow(item):
        time.sleep(0.05)
        return "late"

    outcome = await timed(slow, 0.01)
    assert outcome.status == "queued" and error_of(outcome).code == "timeout"
    quick = await timed(lambda item: "ok", 30)
    assert quick.status == "succeeded" and quick.output == b'"ok"'


async def test_an_attempt_past_max_attempts_is_the_last_whatever_the_count():
    async def boom(item):
        raise ValueError("x")

    for n in (3, 4):  # 4: the batch's max_attempts was lowered after attempts were made
        outcome = await attempt(boom, claim(attempt=n, max_attempts=3))
        assert outcome.status == "failed" and error_of(outcome).code == "exception", n
    retried = await attempt(boom, claim(attempt=2, max_attempts=3))
    assert retried.status == "queued"


def test_a_kind_is_interruptible_unless_it_says_not():
    """The contract's default: a cancel interrupts running items; `interruptible=False`
    (a request already sent is worth its answer) is the exception."""
    assert Handler("k", noop, concurrency=None, timeout=None, max_attempts=None).interruptible
    declared = []
    real = minibatch.handlers.DECLARED[:]
    try:
        minibatch.handler("declared")(noop)
        declared = minibatch.handlers.DECLARED[len(real):]
    finally:
        minibatch.handlers.DECLARED[:] = real
    [(kind, _, limits)] = declared
    assert kind == "declared" and limits["interruptible"] is True


def test_a_group_of_one_is_a_group_handler_of_one_item_per_call():
    h = Handler("k", noop, concurrency=3, timeout=None, max_attempts=None, group=1)
    assert (h.group, h.capacity) == (1, 3)


def test_an_unknown_kind_names_the_kinds_there_are_or_none():
    registry = Registry()
    with pytest.raises(InvalidInput, match=r"handlers for none$"):
        registry.require("x")
    registry.register("b", noop, concurrency=None, timeout=None, max_attempts=None)
    registry.register("a", noop, concurrency=None, timeout=None, max_attempts=None)
    with pytest.raises(InvalidInput, match=r"handlers for \['a', 'b'\]$"):
        registry.require("x")


def deep(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize(("output", "kept"), [
    ({"status": 502, "body": "bad gateway"}, b'{"status":502,"body":"bad gateway"}'),
    (deep(MAX_NESTING), msgspec.json.encode(deep(MAX_NESTING))),
    (None, None),
    (object(), None),             # TypeError
    (10 ** 5000, None),           # ValueError: too many digits
    (deep(100_000), None),        # RecursionError while encoding
    (deep(MAX_NESTING + 1), None),  # encodes, but deeper than the store reads back
], ids=["dict", "as-deep-as-allowed", "none", "object", "huge-int", "recursion", "too-deep"])
async def test_a_fail_keeps_its_output_when_it_is_storable_json_and_drops_it_if_not(
        output, kept):
    """The failure is what matters: an output that cannot be stored is dropped, and the
    item still fails with its own code."""
    async def fail(item):
        raise Fail("upstream said no", code="upstream", output=output)

    failed = await attempt(fail)
    assert failed.status == "failed" and error_of(failed).code == "upstream"
    assert failed.output == kept
