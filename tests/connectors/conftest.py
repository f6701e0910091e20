"""Fixtures for connector tests: paths to the fixture and npm servers, ports, child processes."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

REPO = Path(__file__).resolve().parents[2]

SERVERS = REPO / "tests" / "fixtures" / "servers"
NPM = REPO / ".tools" / "npm" / "node_modules" / "@modelcontextprotocol"


@pytest.fixture
def fixture_server() -> Callable[[str], tuple[str, ...]]:
    """argv for a test-owned server: ``fixture_server("misbehaving")``."""

    def argv(name: str) -> tuple[str, ...]:
        return (sys.executable, str(SERVERS / f"{name}.py"))

    return argv


@pytest.fixture
def npm_server() -> Callable[[str], str]:
    """Path of an npm server's entry point; skips the test when `make tools` has not run."""

    def entry(package: str) -> str:
        path = NPM / package / "dist" / "index.js"
        if not path.is_file():
            pytest.skip(f"{path} is missing: run `make tools` to install the npm test servers")
        return str(path)

    return entry


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_listening(port: int, limit: float = 30.0) -> None:
    """Poll until something accepts on 127.0.0.1:port (there is no event to wait on)."""
    with anyio.fail_after(limit):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.05)
                continue
            await stream.aclose()
            return


def children_of(pid: int) -> set[int]:
    """Live (or unreaped) direct children of ``pid``, read from /proc."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.add(int(entry))
    return found


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def members_of_group(pgid: int) -> set[int]:
    """Live processes whose process group is ``pgid``."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid and process_alive(int(entry)):
                    found.add(int(entry))
            except OSError:
                continue
    return found


class Net:
    free_port = staticmethod(free_port)
    wait_listening = staticmethod(wait_listening)


class Procs:
    children_of = staticmethod(children_of)
    alive = staticmethod(process_alive)
    group = staticmethod(members_of_group)


@pytest.fixture
def net() -> type[Net]:
    return Net


@pytest.fixture
def procs() -> type[Procs]:
    return Procs
