"""The pure rooms import no I/O library; connectors never import broker."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IO_LIBRARIES = {
    "starlette",
    "sqlalchemy",
    "mcp",
    "mcp_types",
    "httpx",
    "httpx2",
    "anyio",
    "asyncio",
    "uvicorn",
    "aiosqlite",
    "asyncpg",
    "socket",
    "subprocess",
    "connectors",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _modules(*rooms: str) -> list[Path]:
    return sorted(p for room in rooms for p in (REPO / room).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("scopes", "broker/core"), ids=str)
def test_pure_rooms_import_no_io_library(path: Path) -> None:
    assert _imports(path) & IO_LIBRARIES == set()


@pytest.mark.parametrize("path", _modules("scopes"), ids=str)
def test_scopes_knows_nothing_of_the_broker(path: Path) -> None:
    assert "broker" not in _imports(path)


@pytest.mark.parametrize("path", _modules("connectors"), ids=str)
def test_connectors_never_import_the_broker(path: Path) -> None:
    assert "broker" not in _imports(path)
