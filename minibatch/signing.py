"""Standard Webhooks signing: pure functions over bytes. No I/O, no clock of its own.

Signature: `v1,` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), where the key is
the base64-decoded part of a `whsec_…` secret. During rotation a header carries one
signature per active secret, space-separated.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

PREFIX = "whsec_"


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(PREFIX))


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, b"%s.%d.%s" % (msg_id.encode(), timestamp, body), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def headers(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers, signed with every key given."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(k, msg_id, timestamp, body) for k in keys),
        "content-type": "application/json",
    }


def verify(secret: str, headers: dict[str, str], body: bytes, now: int,
           tolerance_s: int = 300) -> bool:
    """True if any `v1` signature in the headers matches, within the timestamp tolerance.

    For receivers built with minibatch (the demo); any Standard Webhooks library works.
    """
    try:
        timestamp = int(headers["webhook-timestamp"])
        expected = sign(secret_key(secret), headers["webhook-id"], timestamp, body)
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    return any(hmac.compare_digest(expected, sig)
               for sig in headers.get("webhook-signature", "").split(" "))
