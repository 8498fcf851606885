"""Standard Webhooks signing: minibatch's own verify() against its own sign(), at the
edges a receiver meets (tampering, stale or future timestamps, rotation)."""

from __future__ import annotations

import base64
import hmac
import json
import time

from standardwebhooks.webhooks import Webhook

from minibatch import signing

BODY = b'{"type":"batch.completed"}'


def signed(secret: str, ts: int, body: bytes = BODY, msg_id: str = "msg_1") -> dict:
    return signing.headers([signing.secret_key(secret)], msg_id, ts, body)


def test_a_new_secret_is_whsec_and_32_random_bytes():
    secret = signing.new_secret()
    assert secret.startswith("whsec_") and len(signing.secret_key(secret)) == 32
    assert signing.new_secret() != secret


def test_verify_accepts_a_good_signature_and_agrees_with_standardwebhooks():
    secret = signing.new_secret()
    now = int(time.time())
    headers = signed(secret, now)
    assert signing.verify(secret, headers, BODY, now=now)
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)
    mac = hmac.new(signing.secret_key(secret), b"msg_1.%d." % now + BODY, "sha256")
    assert headers["webhook-signature"] == "v1," + base64.b64encode(mac.digest()).decode()


def test_verify_refuses_a_tampered_body_id_or_timestamp():
    secret = signing.new_secret()
    headers = signed(secret, 1_000_000)
    assert not signing.verify(secret, headers, BODY + b" ", now=1_000_000)
    assert not signing.verify(secret, {**headers, "webhook-id": "msg_2"}, BODY, now=1_000_000)
    assert not signing.verify(secret, {**headers, "webhook-timestamp": "1000001"}, BODY,
                              now=1_000_000)
    assert not signing.verify(signing.new_secret(), headers, BODY, now=1_000_000)


def test_verify_tolerates_300_s_either_way_and_not_a_second_more():
    secret = signing.new_secret()
    headers = signed(secret, 1_000_000)
    for now in (999_700, 1_000_300):
        assert signing.verify(secret, headers, BODY, now=now), now
    for now in (999_699, 1_000_301):
        assert not signing.verify(secret, headers, BODY, now=now), now
    assert signing.verify(secret, headers, BODY, now=1_000_010, tolerance_s=10)
    assert not signing.verify(secret, headers, BODY, now=1_000_011, tolerance_s=10)


def test_verify_refuses_missing_or_malformed_headers():
    secret = signing.new_secret()
    headers = signed(secret, 1_000_000)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        partial = {k: v for k, v in headers.items() if k != name}
        assert not signing.verify(secret, partial, BODY, now=1_000_000), name
    assert not signing.verify(secret, {**headers, "webhook-timestamp": "soon"}, BODY,
                              now=1_000_000)


def test_a_rotation_header_verifies_with_either_secret():
    old, new = signing.new_secret(), signing.new_secret()
    headers = signing.headers([signing.secret_key(new), signing.secret_key(old)], "msg_1",
                              1_000_000, BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert signing.verify(old, headers, BODY, now=1_000_000)
    assert signing.verify(new, headers, BODY, now=1_000_000)
    assert not signing.verify(signing.new_secret(), headers, BODY, now=1_000_000)
