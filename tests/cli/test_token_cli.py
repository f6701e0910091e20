"""`broker token mint|revoke|inspect` and `broker keys rotate` through CliRunner, real SQLite."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
import typer
from typer.testing import CliRunner

from broker.agents import register_agent
from broker.cli import tokens as tokens_cli
from broker.keys import ensure_signing_key
from broker.store.testing import migrated_store, sqlite_url


def make_cli() -> typer.Typer:
    root = typer.Typer(no_args_is_help=True)
    root.add_typer(tokens_cli.app, name="token")
    root.add_typer(tokens_cli.keys_app, name="keys")
    return root


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(
        f'[server]\npublic_url = "http://127.0.0.1:8765"\n[store]\nurl = "{sqlite_url(tmp_path)}"\n'
        '[tokens]\nkeys_dir = "keys"\nmax_ttl = 1800\n',
        encoding="utf-8",
    )

    async def setup() -> None:
        now = datetime.now(UTC)
        async with migrated_store(sqlite_url(tmp_path)) as store:
            await ensure_signing_key(store, tmp_path / "keys", now)
            await register_agent(
                store, name="bot", owner="ops", scopes=["a", "b"], max_ttl=900, now=now
            )
            await register_agent(
                store, name="other", owner="ops", scopes=["a"], max_ttl=900, now=now
            )

    anyio.run(setup)
    return path


def invoke(config: Path, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(make_cli(), [*args, "--config", str(config)], input=stdin)
    return result.exit_code, result.stdout, result.stderr


def mint(config: Path, *extra: str) -> dict[str, object]:
    code, out, err = invoke(
        config, "token", "mint", "--agent", "bot", "--scope", "a", "--task-purpose", "test",
        "--json", *extra,
    )  # fmt: skip
    assert code == 0, err
    return json.loads(out)


def test_mint_prints_the_token_once_with_a_warning(config: Path) -> None:
    code, out, err = invoke(
        config, "token", "mint", "--agent", "bot", "--scope", "a,b",
        "--task-purpose", "nightly report", "--ttl", "10m",
    )  # fmt: skip
    assert code == 0, err
    assert "Shown once" in out
    token = next(line for line in out.splitlines() if line.count(".") == 2 and " " not in line)
    code, out, _ = invoke(config, "token", "inspect", token, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["valid"] is True
    assert data["claims"]["scope"] == "a b"
    assert data["claims"]["task"]["purpose"] == "nightly report"
    assert data["claims"]["exp"] - data["claims"]["iat"] == 600


def test_mint_caps_the_ttl_and_refuses_scopes_the_agent_lacks(config: Path) -> None:
    assert mint(config, "--ttl", "2h")["expires_in"] == 900
    code, _, err = invoke(
        config, "token", "mint", "--agent", "other", "--scope", "b", "--task-purpose", "x"
    )
    assert code == 1
    assert "invalid_scope" in err


def test_inspect_reads_stdin_and_never_prints_the_signature(config: Path) -> None:
    token = str(mint(config)["access_token"])
    signature = token.rsplit(".", 1)[1]
    code, out, _ = invoke(config, "token", "inspect", "-", stdin=token + "\n")
    assert code == 0
    assert "valid" in out
    assert signature not in out
    code, out, _ = invoke(config, "token", "inspect", "-", "--json", stdin=token)
    assert signature not in out
    assert json.loads(out)["header"]["alg"] == "EdDSA"


def test_a_tampered_token_is_reported_invalid_with_its_reason(config: Path) -> None:
    token = str(mint(config)["access_token"])
    head, payload, sig = token.split(".")
    tampered = f"{head}.{payload}.{'A' * len(sig)}"
    code, out, _ = invoke(config, "token", "inspect", tampered, "--json")
    assert code == 1
    data = json.loads(out)
    assert data["valid"] is False
    assert data["reason"] == "bad-signature"
    code, out, _ = invoke(config, "token", "inspect", "garbage")
    assert code == 1
    assert "malformed" in out


@pytest.mark.parametrize("by", ["jti", "task", "agent"])
def test_revoke_by_jti_task_or_agent_makes_inspect_report_revoked(config: Path, by: str) -> None:
    minted = mint(config, "--task", "t-7")
    target = {"jti": [str(minted["jti"])], "task": ["--task", "t-7"], "agent": ["--agent", "bot"]}
    code, out, err = invoke(config, "token", "revoke", *target[by], "--reason", "test", "--json")
    assert code == 0, err
    assert json.loads(out)["kind"] == ("token" if by == "jti" else by)
    code, out, _ = invoke(config, "token", "inspect", str(minted["access_token"]), "--json")
    assert code == 1
    data = json.loads(out)
    assert data["valid"] is False
    assert data["revocation"] == "token-revoked"


def test_revoke_needs_exactly_one_target_and_a_reason(config: Path) -> None:
    code, _, err = invoke(config, "token", "revoke", "--reason", "x")
    assert code == 1
    assert "exactly one" in err
    code, _, err = invoke(
        config, "token", "revoke", "--task", "t", "--agent", "bot", "--reason", "x"
    )
    assert code == 1
    code, _, err = invoke(config, "token", "revoke", "--task", "t")
    assert code == 1
    assert "--reason" in err
    code, _, err = invoke(config, "token", "revoke", "x" * 32, "--reason", "r")
    assert code == 1


def test_keys_rotate_keeps_old_tokens_verifying(config: Path) -> None:
    token = str(mint(config)["access_token"])
    code, out, err = invoke(config, "keys", "rotate", "--json")
    assert code == 0, err
    new_kid = json.loads(out)["kid"]
    code, out, _ = invoke(config, "token", "inspect", token, "--json")
    assert code == 0
    assert json.loads(out)["header"]["kid"] != new_kid
    fresh = str(mint(config)["access_token"])
    code, out, _ = invoke(config, "token", "inspect", fresh, "--json")
    assert json.loads(out)["header"]["kid"] == new_kid


@pytest.mark.parametrize(
    "command", [["token", "mint"], ["token", "revoke"], ["token", "inspect"], ["keys", "rotate"]]
)
def test_every_token_and_keys_command_has_help_with_config(command: list[str]) -> None:
    result = CliRunner().invoke(make_cli(), [*command, "--help"])
    assert result.exit_code == 0
    assert "--config" in result.stdout
