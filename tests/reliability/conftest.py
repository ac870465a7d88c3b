"""The reliability lane: real worker processes killed, stopped and starved, on Redis servers
the tests stop and restart themselves. Everything here is marked slow (tests/conftest.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from queueservice_server.settings import Settings


@pytest.fixture
def lc(settings: Settings) -> Settings:
    """Settings whose tasks include the test tasks, and retention that keeps every job to count."""
    return replace(settings, task_modules=("tests.lifecycle_tasks",), keep_completed=100_000, keep_failed=1000)
