"""Shared fixtures: a database file in a tmp dir, and a Minibatch over it."""

from __future__ import annotations

import pytest

import minibatch


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "jobs.db")


@pytest.fixture
def mb(db_path):
    instance = minibatch.Minibatch(db_path, lease_s=5, retry_base_s=0.01, poll_interval_s=0.02)
    yield instance
    instance.close()
