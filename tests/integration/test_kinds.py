"""The built-in kinds against real receivers on 127.0.0.1."""

from __future__ import annotations

import json

import pytest

import minibatch
from minibatch.kinds import register_builtin_kinds
from tests.receiver import Receiver, free_port

pytestmark = pytest.mark.anyio


def make_mb(db_path: str, **options) -> minibatch.Minibatch:
    mb = minibatch.Minibatch(db_path, retry_base_s=0.01, poll_interval_s=0.02, **options)
    register_builtin_kinds(mb)
    return mb


async def run(mb, kind: str, inputs: list, **submit) -> list[minibatch.Result]:
    async with mb:
        batch = await mb.submit(kind, [{"input": i} for i in inputs], **submit)
        await mb.wait(batch.id, timeout=30)
        results = [r async for r in mb.results(batch.id)]
    mb.close()
    return results


async def test_http_retries_5xx_and_429_with_retry_after_then_returns_the_response(db_path):
    mb = make_mb(db_path, allow_private_webhooks=True)
    with Receiver([503, ("retry_after", 429, "0.3"), 200]) as rx:
        [result] = await run(mb, "http", [{"url": rx.url, "body": {"q": 1},
                                           "headers": {"x-trace": "t1"}}], max_attempts=5)
    assert result.status == "succeeded" and result.attempts == 3
    assert result.output == {"status": 200, "body": "ok"}
    assert json.loads(rx.requests[0]["body"]) == {"q": 1}
    assert rx.requests[0]["headers"]["x-trace"] == "t1"
    assert rx.requests[2]["at"] - rx.requests[1]["at"] >= 0.29


async def test_http_client_errors_fail_at_once_and_bad_input_is_refused(db_path):
    mb = make_mb(db_path, allow_private_webhooks=True)
    with Receiver([404]) as rx:
        results = await run(mb, "http", [{"url": rx.url}, {"nope": 1}, {"url": "ftp://x/"}],
                            max_attempts=3)
    assert [(r.status, r.error.code, r.attempts) for r in results] == [
        ("failed", "http_status", 1), ("failed", "bad_input", 1), ("failed", "bad_input", 1)]


async def test_http_connection_errors_retry_until_attempts_run_out(db_path):
    mb = make_mb(db_path, allow_private_webhooks=True)
    [result] = await run(mb, "http", [{"url": f"http://127.0.0.1:{free_port()}/"}],
                         max_attempts=2)
    assert result.status == "failed" and result.attempts == 2
    assert result.error.code == "retry"


async def test_http_private_destinations_follow_the_webhook_rule(db_path):
    mb = make_mb(db_path)
    with Receiver() as rx:
        results = await run(mb, "http", [{"url": rx.url},
                                         {"url": rx.url.replace("127.0.0.1", "localhost")}])
    assert rx.requests == []
    assert [r.error.code for r in results] == ["blocked_destination"] * 2


async def test_sleep_and_echo(db_path):
    mb = make_mb(db_path)
    async with mb:
        sleep = await mb.submit("sleep", [{"input": {"seconds": 0.01}},
                                          {"input": {"seconds": "x"}}])
        echo = await mb.submit("echo", [{"input": {"a": [1, 2]}}])
        await mb.wait(sleep.id, timeout=10)
        await mb.wait(echo.id, timeout=10)
        slept = [r async for r in mb.results(sleep.id)]
        echoed = [r async for r in mb.results(echo.id)]
    mb.close()
    assert slept[0].output == {"slept": 0.01}
    assert slept[1].status == "failed" and slept[1].error.code == "bad_input"
    assert echoed[0].output == {"a": [1, 2]}
