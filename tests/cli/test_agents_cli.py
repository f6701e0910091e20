"""`broker agents ...` through typer's CliRunner against a real SQLite store in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from typer.testing import CliRunner

from broker.agents import verify_secret
from broker.cli import agents as agents_cli
from broker.cli._common import parse_duration
from broker.store.testing import migrated_store, sqlite_url


def make_cli() -> typer.Typer:
    root = typer.Typer(no_args_is_help=True)
    root.add_typer(agents_cli.app, name="agents")
    return root


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(
        f'[store]\nurl = "{sqlite_url(tmp_path)}"\n[tokens]\nkeys_dir = "keys"\n',
        encoding="utf-8",
    )

    async def migrate() -> None:
        async with migrated_store(sqlite_url(tmp_path)):
            pass

    anyio.run(migrate)
    return path


def invoke(config: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(make_cli(), [*args, "--config", str(config)])
    return result.exit_code, result.stdout, result.stderr


def secret_hash(tmp_path: Path, agent_id: str) -> str | None:
    async def body() -> str | None:
        async with migrated_store(sqlite_url(tmp_path)) as store:
            return await store.agent_secret_hash(agent_id)

    return anyio.run(body)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("10m", 600), ("1h", 3600), ("45", 45)])
def test_durations_accept_seconds_minutes_and_hours(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


def test_a_duration_without_a_known_unit_is_refused() -> None:
    with pytest.raises(typer.BadParameter):
        parse_duration("10d")


def test_agents_add_prints_the_client_id_and_the_secret_once_with_a_warning(
    config: Path, tmp_path: Path
) -> None:
    code, out, _ = invoke(
        config, "agents", "add", "ci-bot", "--scopes", "files:read,time:read",
        "--max-ttl", "10m", "--owner", "ops@example.com",
    )  # fmt: skip
    assert code == 0, out
    assert "not stored" in out
    client_id = next(line.split()[-1] for line in out.splitlines() if "client_id:" in line)
    secret = next(line.split()[-1] for line in out.splitlines() if "client_secret:" in line)
    stored = secret_hash(tmp_path, client_id)
    assert stored is not None
    assert secret not in stored
    assert verify_secret(stored, secret)
    code, out, _ = invoke(config, "agents", "show", "ci-bot", "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["id"] == client_id
    assert shown["allowed_scopes"] == ["files:read", "time:read"]
    assert shown["max_ttl_seconds"] == 600
    assert secret not in out


def test_agents_add_with_a_public_key_gives_no_secret(config: Path, tmp_path: Path) -> None:
    pem = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    key_file = tmp_path / "agent.pub"
    key_file.write_bytes(pem)
    code, out, _ = invoke(
        config, "agents", "add", "signer", "--scopes", "a", "--owner", "ops",
        "--public-key", str(key_file), "--json",
    )  # fmt: skip
    assert code == 0, out
    data = json.loads(out)
    assert data["client_secret"] is None
    assert data["auth_method"] == "private_key_jwt"
    assert data["public_jwk"]["crv"] == "Ed25519"


def test_agents_add_refuses_a_bad_name_with_one_line_and_no_traceback(config: Path) -> None:
    code, _, err = invoke(config, "agents", "add", "Bad Name", "--scopes", "a", "--owner", "o")
    assert code == 1
    assert "agent name" in err
    assert "Traceback" not in err


def test_agents_list_shows_every_agent(config: Path) -> None:
    for name in ("one", "two"):
        assert invoke(config, "agents", "add", name, "--scopes", "a", "--owner", "o")[0] == 0
    code, out, _ = invoke(config, "agents", "list", "--json")
    assert code == 0
    assert sorted(a["name"] for a in json.loads(out)) == ["one", "two"]
    code, out, _ = invoke(config, "agents", "list")
    assert code == 0
    assert "one" in out
    assert "two" in out


def test_quarantine_then_release_needs_reasons_and_changes_the_status(config: Path) -> None:
    assert invoke(config, "agents", "add", "bot", "--scopes", "a", "--owner", "o")[0] == 0
    code, _, err = invoke(config, "agents", "quarantine", "bot")
    assert code != 0
    assert "--reason" in err
    code, out, _ = invoke(config, "agents", "quarantine", "bot", "--reason", "odd calls", "--json")
    assert code == 0
    assert json.loads(out)["status"] == "quarantined"
    code, _, err = invoke(config, "agents", "release", "bot", "--reason", "  ")
    assert code == 1
    assert "reason" in err
    code, out, _ = invoke(config, "agents", "release", "bot", "--reason", "reviewed", "--json")
    assert code == 0
    assert json.loads(out)["status"] == "active"
    code, out, _ = invoke(config, "agents", "disable", "bot", "--reason", "retired", "--json")
    assert json.loads(out)["status"] == "disabled"


def test_an_unknown_agent_is_one_clear_error(config: Path) -> None:
    code, _, err = invoke(config, "agents", "show", "nobody")
    assert code == 1
    assert "nobody" in err


@pytest.mark.parametrize("command", ["add", "list", "show", "disable", "quarantine", "release"])
def test_every_agents_command_has_help_with_config(command: str) -> None:
    result = CliRunner().invoke(make_cli(), ["agents", command, "--help"])
    assert result.exit_code == 0
    assert "--config" in result.stdout
