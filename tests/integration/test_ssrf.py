# ruff: noqa: RUF001  (the confusable Unicode spellings are what this file tests)
"""The destination guard against every spelling a URL parser turns into a refused address.

A loopback listener stands where each spelling leads: it must see no connection at all,
for webhooks and for the `http` kind, whether or not the up-front check recognises the
spelling, because the connector checks the address it is about to connect to.
"""

from __future__ import annotations

import socket
import threading

import aiohttp
import anyio
import pytest

import minibatch
from minibatch.delivery import BlockedDestination, connector, literal_blocked
from minibatch.kinds import register_builtin_kinds

pytestmark = pytest.mark.anyio

# Each spelling leads to 127.0.0.1 (or 169.254.169.254) once a parser normalizes it.
LOOPBACK_SPELLINGS = [
    "１２７.０.０.１",  # fullwidth digits and ASCII dots
    "１２７．０．０．１",  # fullwidth digits and fullwidth dots
    "①②⑦.⓪.⓪.①",  # circled digits
    "127。0。0。1",  # ideographic full stop
    "127.0.0.1.",  # trailing dot
    "LOCALHOST",  # case
    "localhost.",
    "Localhost.",
    "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
    "[::FFFF:7F00:1]",
]


class Listener:
    """A TCP listener on 127.0.0.1 that counts every connection it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener():
    srv = Listener()
    yield srv
    srv.close()


def urls(port: int) -> list[str]:
    return [f"http://{host}:{port}/x" for host in LOOPBACK_SPELLINGS]


def test_the_up_front_check_reads_hosts_as_the_client_does():
    """Names (LOCALHOST, localhost.) are left to the resolver; every address spelling
    is refused before anything is sent."""
    literals = [u for u in urls(80) if "ocal" not in u.lower()]
    for url in [*literals, "http://⑯⑨.②⑤④.⑯⑨.②⑤④/latest/meta-data"]:
        assert literal_blocked(url), url
    assert literal_blocked("http://example.com/x") is None
    assert literal_blocked("http://93.184.216.34/x") is None


async def test_the_connector_refuses_refused_addresses_whatever_checked_them_before(listener):
    """The socket factory is the last word: even a URL that skips every earlier check
    (here, no up-front check at all) cannot open a connection to loopback. aiohttp
    itself refuses a few non-canonical spellings (`127.0.0.1.`) as URLs."""
    async with aiohttp.ClientSession(connector=connector(4, allow_private=False)) as session:
        for url in [f"http://127.0.0.1:{listener.port}/x", *urls(listener.port)]:
            with pytest.raises((BlockedDestination, aiohttp.InvalidUrlClientError)):
                async with session.post(url, data=b"{}"):
                    pass
    assert listener.connections == 0


async def test_webhooks_to_every_spelling_are_blocked_and_nothing_connects(db_path, listener):
    mb = minibatch.Minibatch(db_path, webhook_retry_schedule="0,0.05", poll_interval_s=0.02)

    @mb.handler("echo")
    async def echo(item):
        return item.input

    async with mb:
        batches = [await mb.submit("echo", [{"input": 1}], webhook={"url": url})
                   for url in urls(listener.port)]
        deliveries = []
        with anyio.fail_after(30):
            for batch in batches:
                await mb.wait(batch.id)
                while not (found := await mb.deliveries(batch.id)) or \
                        found[0].status == "pending":
                    await anyio.sleep(0.02)
                deliveries.append(found[0])
    mb.close()
    assert listener.connections == 0
    for url, d in zip(urls(listener.port), deliveries, strict=True):
        assert (d.status, d.failure_reason_code, d.attempt_count) == (
            "failed", "blocked_destination", 1), url
        assert d.attempts[0].status_code is None and d.attempts[0].error_message, url


async def test_the_http_kind_to_every_spelling_fails_blocked_and_nothing_connects(
        db_path, listener):
    mb = minibatch.Minibatch(db_path, poll_interval_s=0.02, retry_base_s=0.01)
    register_builtin_kinds(mb)
    async with mb:
        batch = await mb.submit("http", [{"input": {"url": url}} for url in
                                         [*urls(listener.port),
                                          "http://⑯⑨.②⑤④.⑯⑨.②⑤④/latest/meta-data"]])
        await mb.wait(batch.id, timeout=30)
        results = [r async for r in mb.results(batch.id)]
    mb.close()
    assert listener.connections == 0
    assert [(r.status, r.error.code, r.attempts) for r in results] == [
        ("failed", "blocked_destination", 1)] * (len(LOOPBACK_SPELLINGS) + 1)


def test_the_api_refuses_literal_spellings_of_private_webhook_urls(tmp_path, listener):
    import httpx

    from tests.conftest import ServerThread

    srv = ServerThread(str(tmp_path / "api.db"), allow_private_webhooks=False).start()
    try:
        headers = {"Authorization": f"Bearer {srv.key('t')}"}
        for host in ["１２７.０.０.１", "①②⑦.⓪.⓪.①", "127。0。0。1", "127.0.0.1.",
                     "[::ffff:127.0.0.1]", "⑯⑨.②⑤④.⑯⑨.②⑤④"]:
            r = httpx.post(f"{srv.url}/v1/batches", headers=headers, json={
                "kind": "echo", "items": [{"input": 1}],
                "webhook": {"url": f"http://{host}:{listener.port}/x"}})
            assert r.status_code == 422, (host, r.text)
            assert r.json()["errors"][0]["field"] == "webhook.url"
    finally:
        srv.stop()
    assert listener.connections == 0
