"""The handler registry, and the one place that turns how a handler ended into an outcome.

Async handlers are awaited on the event loop; sync ones run in worker threads bounded by
the kind's concurrency. A handler registered with `group=G` takes a list of up to G items
and returns one outcome per item. `run_attempt` and `run_group` are the only code that
catches what a handler raises.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from . import models
from .errors import Fail, InvalidInput, Retry
from .store import Claimed, Outcome, error_bytes

DEFAULT_ASYNC_CONCURRENCY = 16
DEFAULT_SYNC_CONCURRENCY = 4
MAX_RETRY_AFTER_S = 86400.0
# The jitter of retry and webhook delays, drawn from a generator of minibatch's own: the
# global one is the application's (a seed it set for its own ends must not shift with our
# retries, nor ours with its draws).
JITTER = random.Random()


class Handler:
    """A registered kind: the callable and its limits."""

    __slots__ = ("capacity", "concurrency", "fn", "group", "interruptible", "is_async", "kind",
                 "limiter", "max_attempts", "timeout")

    def __init__(self, kind: str, fn: Callable[..., Any], *, concurrency: int | None,
                 timeout: float | None, max_attempts: int | None,
                 interruptible: bool = True, group: int | None = None) -> None:
        self.kind = kind
        # Items per call: None calls `fn(item)`, an int G calls `fn([item, ...])` with up
        # to G items and expects a list of as many outcomes back.
        self.group = group
        # Whether a cancel interrupts this kind's running items (else they finish: a
        # request already sent to an upstream is worth its answer).
        self.interruptible = interruptible
        self.fn = fn
        call = fn if inspect.isroutine(fn) else type(fn).__call__  # an object's __call__
        self.is_async = inspect.iscoroutinefunction(call)
        default = DEFAULT_ASYNC_CONCURRENCY if self.is_async else DEFAULT_SYNC_CONCURRENCY
        self.concurrency = concurrency or default  # calls at once
        self.capacity = self.concurrency * (group or 1)  # items running at once
        self.timeout = timeout
        self.max_attempts = max_attempts
        # Sync handlers get their own thread limiter, so one kind cannot starve another.
        self.limiter = None if self.is_async else anyio.CapacityLimiter(self.concurrency)
        if self.concurrency < 1 or (timeout is not None and timeout <= 0) or (
                max_attempts is not None and max_attempts < 1) or (
                group is not None and (isinstance(group, bool) or group < 1)):
            raise InvalidInput(f"handler {kind!r}: concurrency, timeout, max_attempts and group"
                               " must be positive")


# Handlers declared with the module-level `minibatch.handler` decorator, for modules that
# `minibatch serve --handlers MODULE` imports: serve registers them on its instance.
DECLARED: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []


def handler(kind: str, *, concurrency: int | None = None, timeout: float | None = None,
            max_attempts: int | None = None, interruptible: bool = True,
            group: int | None = None) -> Callable:
    """Declare a handler in a module for `minibatch serve --handlers MODULE`."""
    def declare(fn: Callable) -> Callable:
        DECLARED.append((kind, fn, {"concurrency": concurrency, "timeout": timeout,
                                    "max_attempts": max_attempts,
                                    "interruptible": interruptible, "group": group}))
        return fn
    return declare


class Registry:
    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def register(self, kind: str, fn: Callable[..., Any], **limits: Any) -> Handler:
        handler = Handler(kind, fn, **limits)
        self.handlers[kind] = handler
        return handler

    def get(self, kind: str) -> Handler | None:
        return self.handlers.get(kind)

    def require(self, kind: str) -> Handler:
        handler = self.handlers.get(kind)
        if handler is None:
            raise InvalidInput(
                f"unknown kind {kind!r}: this instance has handlers for"
                f" {sorted(self.handlers) or 'none'}",
                [{"field": "kind", "message": "no handler for this kind"}])
        return handler


def backoff(attempt: int, base: float, cap: float) -> float:
    """About `base` seconds, doubling per attempt, capped, with +-20 % jitter."""
    return min(cap, base * 2 ** (attempt - 1)) * JITTER.uniform(0.8, 1.2)


class _Overran(Exception):
    """The attempt (or the group's call) ran past its timeout."""


async def run_attempt(handler: Handler, claimed: Claimed, timeout: float | None,
                      now: Callable[[], float], backoff_s: tuple[float, float]) -> Outcome:
    """Run one attempt of one item and decide its outcome.

    A cancellation from outside (the batch was cancelled) is not the handler's doing and
    passes through to the runner.
    """
    try:
        value = await _call_within(handler, claimed.item, timeout)
    except Exception as exc:  # a handler's bug is the item's failure, never the runner's
        return _outcome_of_error(claimed, exc, timeout, now, backoff_s)
    return _outcome_of_value(claimed, value)


async def run_group(handler: Handler, group: list[Claimed], timeout: float | None,
                    now: Callable[[], float], backoff_s: tuple[float, float]
                    ) -> list[Outcome]:
    """One call of a group handler with the items of `group`, and each item's outcome.

    The handler returns one entry per item, in order: an output, or an exception
    instance (`Fail`, `Retry`, any other) that ends that item alone as if raised for it.
    What the call raises, or a timeout, is every item's; so is a reply that is not a list
    of as many entries.
    """
    try:
        values = await _call_within(handler, [c.item for c in group], timeout)
        if not isinstance(values, list | tuple) or len(values) != len(group):
            got = f"{len(values)} entries" if isinstance(values, list | tuple) else (
                type(values).__name__)
            raise TypeError(f"a group handler must return a list of {len(group)} outcomes,"
                            f" one per item; got {got}")
    except Exception as exc:
        return [_outcome_of_error(c, exc, timeout, now, backoff_s) for c in group]
    return [_outcome_of_error(c, v, timeout, now, backoff_s) if isinstance(v, BaseException)
            else _outcome_of_value(c, v) for c, v in zip(group, values, strict=True)]


async def _call_within(handler: Handler, arg: Any, timeout: float | None) -> Any:
    if timeout is None:
        return await _call(handler, arg)
    with anyio.move_on_after(timeout) as scope:
        value = await _call(handler, arg)
    # A sync handler's thread cannot be interrupted: it overran if it ended late.
    if scope.cancelled_caught or scope.deadline < anyio.current_time():
        raise _Overran
    return value


def _outcome_of_value(claimed: Claimed, value: Any) -> Outcome:
    try:
        output = models.encoder.encode(value)
    except (TypeError, ValueError, msgspec.EncodeError, RecursionError) as exc:
        return _end(claimed, "failed", None,
                    error_bytes("output_not_json", f"handler returned {exc}"))
    if models.too_deep(output):
        return _end(claimed, "failed", None, error_bytes(
            "output_not_json", f"output nests deeper than {models.MAX_NESTING} levels"))
    return _end(claimed, "succeeded", output, None)


def _outcome_of_error(claimed: Claimed, exc: BaseException, timeout: float | None,
                      now: Callable[[], float], backoff_s: tuple[float, float]) -> Outcome:
    """The outcome of an attempt that raised `exc` (or, in a group, returned it)."""
    attempt = claimed.item.attempt
    if isinstance(exc, _Overran):
        return failed_attempt(claimed, "timeout", f"the attempt ran past its {timeout} s",
                              backoff(attempt, *backoff_s), now)
    if isinstance(exc, Fail):
        return _end(claimed, "failed", _fail_output(exc.output),
                    error_bytes(exc.code, str(exc)))
    if isinstance(exc, Retry):
        delay = _delay(exc.after) if exc.after is not None else None
        return failed_attempt(claimed, "retry", str(exc),
                              backoff(attempt, *backoff_s) if delay is None else delay,
                              now, _fail_output(exc.output))
    return failed_attempt(claimed, "exception", f"{type(exc).__name__}: {exc}",
                          backoff(attempt, *backoff_s), now)


def _fail_output(output: Any) -> bytes | None:
    """A `Fail`'s output as stored JSON; one that cannot be encoded is dropped (the
    failure itself is what matters)."""
    if output is None:
        return None
    try:
        encoded = models.encoder.encode(output)
    except (TypeError, ValueError, msgspec.EncodeError, RecursionError):
        return None
    return None if models.too_deep(encoded) else encoded


async def _call(handler: Handler, arg: Any) -> Any:
    """`fn(item)`, or `fn(items)` for a group handler."""
    if handler.is_async:
        return await handler.fn(arg)
    return await anyio.to_thread.run_sync(handler.fn, arg, limiter=handler.limiter)


def _delay(after: Any) -> float | None:
    """`Retry(after=…)` as seconds: a finite number >= 0 (capped at a day), else None."""
    if isinstance(after, bool) or not isinstance(after, int | float) or not math.isfinite(
            after):
        return None
    return min(max(float(after), 0.0), MAX_RETRY_AFTER_S)


def cancelled_outcome(claimed: Claimed) -> Outcome:
    return _end(claimed, "cancelled", None, None)


def expired_outcome(claimed: Claimed) -> Outcome:
    return _end(claimed, "expired", None, None)


def _end(c: Claimed, status: str, output: bytes | None, error: bytes | None) -> Outcome:
    return Outcome(c.seq, c.batch_seq, c.token, status, output, error, 0.0)


def failed_attempt(c: Claimed, code: str, message: str, delay: float,
                   now: Callable[[], float], output: bytes | None = None) -> Outcome:
    """A failed attempt: queued again after `delay` while attempts are left; else the
    item fails (keeping `output`, if any)."""
    error = error_bytes(code, message)
    if c.item.attempt >= c.max_attempts:
        return _end(c, "failed", output, error)
    return Outcome(c.seq, c.batch_seq, c.token, "queued", None, error, now() + delay)
