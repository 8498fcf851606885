"""One frozen `Settings` Struct: the defaults, and their three doors.

`Minibatch(**kwargs)`, CLI flags and `MINIBATCH_*` environment variables all set these
same fields; defaults live only here. Values are checked once, with messages that name
the setting.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import msgspec

from .errors import InvalidInput

ENV_PREFIX = "MINIBATCH_"

# Svix's schedule: seconds to wait before each attempt; its length is the attempt count.
DEFAULT_RETRY_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    db: str = "minibatch.db"
    host: str = "127.0.0.1"
    port: int = 8000
    handlers: str | None = None
    synchronous: Literal["normal", "full"] = "normal"
    workers: int = 1  # `serve`: worker processes running the items (1: in the API's)
    access_log: bool = True  # one line per request (logger minibatch.access)
    log_format: Literal["text", "json"] = "text"  # how `serve` writes its log lines
    # Items
    lease_s: float = 30.0
    claim_size: int = 500  # at most; a kind claims only as many as it has room for
    poll_interval_s: float = 0.2
    # PostgreSQL: a submit wakes every process's claimers by LISTEN/NOTIFY; off, they
    # poll only (PgBouncer in transaction mode drops LISTEN)
    listen: bool = True
    default_max_attempts: int = 3
    shutdown_grace_s: float = 10.0  # on stop, running items get this long to finish
    retry_base_s: float = 1.0
    retry_cap_s: float = 60.0
    # Webhooks
    allow_private_webhooks: bool = False
    webhook_retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    webhook_timeout_s: float = 15.0
    webhook_concurrency: int = 50
    webhook_per_host: int = 20
    # HTTP
    max_json_bytes: int = 10 * 1024 * 1024
    max_file_bytes: int = 100 * 1024 * 1024
    max_header_bytes: int = 64 * 1024  # request line and headers; 431 beyond
    request_timeout_s: float = 30.0  # a request not arrived whole by then is dropped
    max_connections: int = 1000  # open connections; 503 beyond
    # Dialects
    openai_upstream: str | None = None  # an OpenAI-compatible server's /v1 base URL
    openai_upstream_key: str | None = None
    openai_upstream_concurrency: int = 16
    openai_upstream_timeout_s: float = 600.0  # one request to an upstream
    anthropic_upstream: str | None = None  # an Anthropic-compatible server's root URL
    anthropic_upstream_key: str | None = None
    anthropic_upstream_concurrency: int = 16
    completion_window_s: float = 86400.0  # what a dialect's 24 h window lasts
    retention_days: float | None = None  # ended batches older than this are deleted
    # Tenants
    rate_limit: float | None = None  # requests per second per API key (429 beyond)
    max_queued_items: int | None = None  # items queued at once per tenant (429 beyond)

    def __post_init__(self) -> None:
        positive = ("workers", "lease_s", "claim_size", "poll_interval_s", "default_max_attempts",
                    "webhook_timeout_s", "webhook_concurrency", "webhook_per_host",
                    "max_json_bytes", "max_file_bytes", "max_header_bytes",
                    "request_timeout_s", "max_connections", "retry_base_s", "retry_cap_s",
                    "openai_upstream_concurrency", "openai_upstream_timeout_s",
                    "anthropic_upstream_concurrency",
                    "completion_window_s")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidInput(f"setting {name} must be a number > 0, got {value}")
        if not (math.isfinite(self.shutdown_grace_s) and self.shutdown_grace_s >= 0):
            raise InvalidInput("setting shutdown_grace_s must be a number >= 0,"
                               f" got {self.shutdown_grace_s}")
        if not 0 <= self.port <= 65535:
            raise InvalidInput(f"setting port must be 0 to 65535, got {self.port}")
        for name in ("rate_limit", "max_queued_items", "retention_days"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InvalidInput(f"setting {name} must be a number > 0, got {value}")
        for name in ("openai_upstream", "anthropic_upstream"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("http://", "https://")):
                raise InvalidInput(f"setting {name} must be an http(s) URL, got {url!r}")
        schedule = self.webhook_retry_schedule
        if not schedule or not all(math.isfinite(s) and s >= 0 for s in schedule):
            raise InvalidInput("setting webhook_retry_schedule needs one or more finite"
                               " delays >= 0")


def parse_schedule(text: str) -> tuple[float, ...]:
    """`"0,5,300"` -> (0.0, 5.0, 300.0): seconds before each attempt."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InvalidInput(
            f"webhook_retry_schedule: not a comma-separated list of seconds: {text!r}") from None


def make_settings(**options: Any) -> Settings:
    """Build Settings from keyword options, naming any unknown or mistyped one."""
    if options.get("workers") == "auto":
        options["workers"] = os.cpu_count() or 1
    if isinstance(options.get("webhook_retry_schedule"), str):
        options["webhook_retry_schedule"] = parse_schedule(options["webhook_retry_schedule"])
    try:
        return msgspec.convert(options, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid setting: {exc}") from None


def env_options(environ: os._Environ | dict[str, str] | None = None) -> dict[str, str]:
    """The `MINIBATCH_*` variables that name a Settings field, keyed by field name."""
    environ = os.environ if environ is None else environ
    fields = set(Settings.__struct_fields__)
    out = {}
    for key, value in environ.items():
        name = key[len(ENV_PREFIX):].lower() if key.startswith(ENV_PREFIX) else None
        if name in fields:
            out[name] = value
    return out
