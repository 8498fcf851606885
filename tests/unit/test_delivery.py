"""The destination guard and the retry arithmetic of webhook delivery."""

from __future__ import annotations

import email.utils

import pytest

from minibatch.delivery import blocked_reason, next_delay, retry_after_s

pytestmark = pytest.mark.anyio

REFUSED = [
    "127.0.0.1", "127.1.2.3", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
    "169.254.169.254", "224.0.0.1", "255.255.255.255", "0.0.0.0", "0.1.2.3", "240.0.0.1",
    "192.0.2.1", "198.51.100.1", "203.0.113.1",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "2001:db8::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "64:ff9b::a00:1",
    "64:ff9b::7f00:1", "2002:7f00:1::", "2002:a00:1::", "2001:0:4136:e378:8000:63bf:f5ff:fffe",
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
           "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"]


@pytest.mark.parametrize("address", REFUSED)
def test_private_reserved_and_embedding_addresses_are_refused(address):
    assert blocked_reason(address) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_pass(address):
    assert blocked_reason(address) is None


@pytest.mark.parametrize("spelling", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1"])
async def test_numeric_spellings_of_loopback_are_caught_after_resolution(spelling):
    from minibatch.delivery import BlockedDestination, GuardedResolver

    resolver = GuardedResolver()
    with pytest.raises(BlockedDestination, match=r"127\.0\.0\.1"):
        await resolver.resolve(spelling, 80)
    await resolver.close()


def test_retry_after_seconds_and_http_date_capped_at_a_day():
    now = 1_000_000.0
    assert retry_after_s("7", now) == 7
    assert retry_after_s(None, now) == 0
    assert retry_after_s("soon", now) == 0
    assert retry_after_s(str(10 * 86400), now) == 86400
    date = email.utils.formatdate(now + 120, usegmt=True)
    assert 119 <= retry_after_s(date, now) <= 121


def test_jitter_never_makes_the_wait_shorter_than_retry_after():
    schedule = (0.0, 5.0, 300.0)
    waits = [next_delay(schedule, 1, 0) for _ in range(200)]
    assert min(waits) >= 4.0 and max(waits) <= 6.0
    assert all(next_delay(schedule, 1, 100) >= 100 for _ in range(200))
    assert all(next_delay(schedule, 2, 30) >= 240 for _ in range(200))



def test_retry_after_that_is_not_a_finite_number_is_ignored():
    for value in ("nan", "inf", "-inf", "NaN"):
        assert retry_after_s(value, 1_000_000.0) == 0


def test_a_shorter_schedule_after_a_restart_keeps_its_last_delay():
    """Found in review: attempts made under a longer schedule indexed past the new one."""
    assert 0.8 <= next_delay((0.0, 1.0), 5, 0) <= 1.2


@pytest.mark.parametrize("address", ["64:ff9b:1::a00:1", "::ffff:0:7f00:1", "fec0::1"])
def test_special_use_ipv6_forms_are_refused(address):
    """Found in review: local-use NAT64, IPv4-translated and site-local passed."""
    assert blocked_reason(address) is not None


@pytest.mark.parametrize("spelling", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1"])
def test_numeric_spellings_in_a_url_are_refused_before_sending(spelling):
    """aiohttp rejects these URLs itself (a retried connection_error); they must be a
    blocked_destination at once."""
    from minibatch.delivery import literal_blocked

    assert "127.0.0.1" in literal_blocked(f"http://{spelling}:8080/hook")
    assert literal_blocked("http://example.com/hook") is None


def test_a_retry_after_date_past_what_a_datetime_holds_is_ignored():
    """Found by mutation testing: email.utils raised OverflowError, which escaped the send
    and ended the deliverer's task group."""
    from minibatch.delivery import retry_after_s

    assert retry_after_s("Mon, 01 Jan 2020 99999999999999999999:00:00 GMT", 0.0) == 0.0


def test_a_url_yarl_cannot_read_is_no_blocked_literal_and_a_422_at_the_api(client):
    """`http://[]@` made yarl raise IndexError: a 500 at the API before this."""
    from minibatch.delivery import literal_blocked

    assert literal_blocked("http://[]@") is None
    r = client.post("/v1/batches", json={"kind": "echo", "items": [{"input": 1}],
                                         "webhook": {"url": "http://[]@"}})
    assert r.status_code == 422, r.text
