"""Shared fixtures: repo paths, a UTC clock, and per-test stores on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".tools"


@pytest.fixture
def now() -> datetime:
    return datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


# What `broker init` and `make run` write into the folder they run in: a test that leaves one of
# these behind wrote into the checkout (a config without ``base_dir``), where it could be read by
# the next test or a developer's own broker.
_CHECKOUT_STATE = ("keys", "broker.toml", "broker.db", "broker.db-wal")


@pytest.fixture(autouse=True, scope="session")
def _checkout_left_alone() -> Iterator[None]:
    before = {name for name in _CHECKOUT_STATE if (REPO / name).exists()}
    yield
    appeared = sorted(name for name in _CHECKOUT_STATE if (REPO / name).exists())
    new = [name for name in appeared if name not in before]
    assert not new, f"tests wrote {new} into the checkout {REPO}; give their config a base_dir"
