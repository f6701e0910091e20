"""`broker init`: a working broker's files on a fresh directory, private, with examples approved."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import load_config
from broker.core.pinning import PinStatus
from broker.store import open_store

BROKER = Path(sys.executable).parent / "broker"


def run_init(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BROKER), "init", "--config", str(tmp_path / "broker.toml"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.servers
async def test_init_with_examples_writes_private_files_and_approves_the_example_tools(
    tmp_path: Path,
) -> None:
    done = run_init(tmp_path, "--examples")
    assert done.returncode == 0, done.stderr
    assert "first admin token (shown once" in done.stdout
    token_line = done.stdout.strip().splitlines()[-1].strip()
    assert token_line.startswith("bat_")

    config = load_config(tmp_path / "broker.toml", {})
    db = tmp_path / "broker.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.tokens.keys_dir.stat().st_mode) == 0o700
    keys = sorted(p.name for p in config.tokens.keys_dir.iterdir())
    assert "recording.key" in keys
    assert len(keys) == 2  # the signing key and the recording key
    for key in config.tokens.keys_dir.iterdir():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert {c.id for c in config.connectors} == {"time", "demo"}

    store = open_store(config.store.url)
    try:
        pins = await store.list_pins()
    finally:
        await store.aclose()
    assert {(p.connector_id, p.tool_name) for p in pins} >= {
        ("time", "get_current_time"),
        ("demo", "echo"),
    }
    assert all(p.status is PinStatus.APPROVED for p in pins)


def test_init_refuses_to_overwrite_an_existing_config(tmp_path: Path) -> None:
    (tmp_path / "broker.toml").write_text("# mine\n")
    done = run_init(tmp_path)
    assert done.returncode == 1
    assert "already exists (use --force to overwrite it)" in done.stderr
    assert (tmp_path / "broker.toml").read_text() == "# mine\n"


def test_serve_with_a_broken_config_names_the_key_and_exits(tmp_path: Path) -> None:
    (tmp_path / "broker.toml").write_text("[server]\nport = 'high'\n")
    done = subprocess.run(
        [str(BROKER), "serve", "--config", str(tmp_path / "broker.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "server.port" in done.stderr
    assert "Traceback" not in done.stderr
