"""Shared fixtures: repo paths, a UTC clock, and per-test stores on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".tools"


@pytest.fixture
def now() -> datetime:
    return datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
