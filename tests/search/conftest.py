"""Fixtures of the service tests: a real redis-server per test."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server per test on a free loopback port, stopped (or already killed) at teardown."""
    server = RedisServer(workdir=tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
