"""`broker scopes list|check` and `broker explain` through typer's CliRunner, real SQLite store."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
import typer
from typer.testing import CliRunner

from broker.cli import scopes as scopes_cli
from broker.config import load_config
from broker.core.revocation import RevocationKind
from broker.core.tokens import TaskClaim, TokenClaims, mint_token
from broker.keys import KeyRing, ensure_signing_key
from broker.store.testing import migrated_store, sqlite_url

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

SCOPES = """
[[scope]]
name = "files:read"
description = "Read the workspace"
labels = ["private"]
[[scope.grant]]
connector = "files"
tools = ["read_text_file"]
args = { path = { within = "/srv/ws" } }

[[scope]]
name = "demo:all"
approval = "call"
[[scope.grant]]
connector = "demo"
tools = ["*"]
"""


def make_cli() -> typer.Typer:
    root = typer.Typer(no_args_is_help=True)
    scopes_cli.register(root)
    return root


@dataclass
class Setup:
    config: Path
    tmp: Path


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    (tmp_path / "scopes.toml").write_text(SCOPES, encoding="utf-8")
    path = tmp_path / "broker.toml"
    path.write_text(
        f'scope_files = ["scopes.toml"]\n[store]\nurl = "{sqlite_url(tmp_path)}"\n'
        f'[tokens]\nkeys_dir = "keys"\n\n'
        '[[connectors]]\nid = "files"\nkind = "native"\ntarget = "broker.demo_tools:toolset"\n'
        "\n"
        '[[connectors]]\nid = "demo"\nkind = "native"\ntarget = "broker.demo_tools:toolset"\n',
        encoding="utf-8",
    )
    return Setup(path, tmp_path)


def invoke(setup: Setup, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(make_cli(), [*args, "--config", str(setup.config)])
    return result.exit_code, result.stdout, result.stderr


def mint(setup: Setup, scope: str, *, details: list[dict[str, object]] | None = None) -> str:
    """A real token signed with the broker's key, after migrating the store."""
    config = load_config(setup.config, {})

    async def body() -> str:
        async with migrated_store(config.store.url) as store:
            now = datetime.now(UTC)
            await ensure_signing_key(store, config.tokens.keys_dir, now)
            ring = await KeyRing.load(
                store, config.tokens.keys_dir, max_ttl=config.tokens.max_ttl, leeway=30
            )
            kid, key = ring.signing_key()
            definition = {"name": "read_text_file", "inputSchema": {"type": "object"}}
            await store.upsert_seen_pin("files", "read_text_file", "d1", definition, now)
            await store.approve_pin("files", "read_text_file", "d1", "admin", now)
            await store.upsert_seen_pin("demo", "echo", "d2", {"name": "echo"}, now)
            claims = TokenClaims(
                iss=config.server.base_url,
                aud=config.server.resource_url,
                sub="agent-1",
                client_id="agent-1",
                exp=int((now + timedelta(minutes=5)).timestamp()),
                iat=int(now.timestamp()),
                nbf=int(now.timestamp()),
                jti="jti-explain-" + "a" * 16,
                scope=scope,
                task=TaskClaim(id="t1", purpose="explain"),
                authorization_details=tuple(details) if details else None,  # pyright: ignore[reportArgumentType]
            )
            return mint_token(claims, private_key=key, kid=kid)

    return anyio.run(body)


def revoke(setup: Setup, jti: str) -> None:
    config = load_config(setup.config, {})

    async def body() -> None:
        async with migrated_store(config.store.url) as store:
            await store.revoke(RevocationKind.TOKEN, jti, reason="t", actor="admin", at=NOW)

    anyio.run(body)


def test_list_shows_each_scope_with_its_grants_labels_and_approval(setup: Setup) -> None:
    code, out, _ = invoke(setup, "scopes", "list", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["files:read"]["labels"] == ["private"]
    assert rows["files:read"]["grants"][0]["constraints"] == ["path within"]
    assert rows["demo:all"]["approval"] == "call"
    code, out, _ = invoke(setup, "scopes", "list")
    assert code == 0
    assert "files:read" in out


def test_check_accepts_valid_files_and_names_file_scope_and_field_of_an_error(
    setup: Setup,
) -> None:
    code, out, _ = invoke(setup, "scopes", "check")
    assert code == 0
    assert "ok: 2 scope(s) in 1 file(s)" in out
    bad = setup.tmp / "bad.toml"
    bad.write_text(
        '[[scope]]\nname = "x:y"\n[[scope.grant]]\nconnector = "c"\ntools = ["t"]\n'
        'args = { path = { within = "relative/path" } }\n',
        encoding="utf-8",
    )
    code, _, err = invoke(setup, "scopes", "check", str(bad))
    assert code == 1
    assert "bad.toml" in err
    assert "x:y" in err
    assert "within" in err


def test_check_decides_a_call_for_the_scopes_given_and_shows_the_canonical_arguments(
    setup: Setup,
) -> None:
    common = ("scopes", "check", "--scope", "files:read", "--connector", "files")
    code, out, _ = invoke(
        setup, *common, "--tool", "read_text_file", "--args", '{"path": "/srv/ws/a/../b"}', "--json"
    )
    assert code == 0
    call = json.loads(out)["call"]
    assert call["allowed"] is True
    assert call["arguments"] == {"path": "/srv/ws/b"}
    assert call["rule_ids"] == ["files:read/grant[0]"]
    code, out, _ = invoke(
        setup, *common, "--tool", "read_text_file", "--args", '{"path": "/srv/ws/../etc"}'
    )
    assert code == 0
    assert "denied (constraint-violated)" in out
    assert "files:read/grant[0]" in out


def test_check_refuses_arguments_with_duplicate_keys(setup: Setup) -> None:
    code, _, err = invoke(
        setup,
        "scopes",
        "check",
        "--scope",
        "files:read",
        "--connector",
        "files",
        "--tool",
        "read_text_file",
        "--args",
        '{"path": "/srv/ws/a", "path": "/etc/passwd"}',
    )
    assert code == 1
    assert "duplicate" in err


def test_explain_prints_the_decision_and_the_canonical_arguments_for_a_real_token(
    setup: Setup,
) -> None:
    token = mint(setup, "files:read")
    args = '{"path": "/srv/ws//x.txt"}'
    code, out, err = invoke(
        setup, "explain", "--token", token, "--tool", "files__read_text_file", "--args", args
    )
    assert code == 0, err
    assert "allowed by files:read/grant[0]" in out
    assert '"path": "/srv/ws/x.txt"' in out
    assert "dry run" in out
    code, out, _ = invoke(
        setup, "explain", "--token", token, "--tool", "files__write", "--args", "{}"
    )
    assert "denied (scope-missing)" in out


def test_explain_names_a_covered_tool_awaiting_approval(setup: Setup) -> None:
    token = mint(setup, "demo:all")
    code, out, err = invoke(setup, "explain", "--token", token, "--tool", "demo__echo", "--json")
    assert code == 0, err
    assert json.loads(out)["reasons"] == ["tool-unapproved"]


def test_explain_reports_a_constraint_violation_and_a_revoked_token(setup: Setup) -> None:
    token = mint(setup, "demo:all files:read")
    code, out, err = invoke(
        setup,
        "explain",
        "--token",
        token,
        "--tool",
        "files__read_text_file",
        "--args",
        '{"path": "/etc/passwd"}',
        "--json",
    )
    assert code == 0, err
    outcome = json.loads(out)
    assert outcome["reasons"] == ["constraint-violated"]
    assert outcome["agent"] == "agent-1"
    revoke(setup, "jti-explain-" + "a" * 16)
    code, out, err = invoke(
        setup, "explain", "--token", token, "--tool", "files__read_text_file", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["reasons"] == ["token-revoked"]


def test_explain_refuses_a_token_that_does_not_verify(setup: Setup) -> None:
    mint(setup, "files:read")
    code, _, err = invoke(setup, "explain", "--token", "not.a.token", "--tool", "x", "--args", "{}")
    assert code == 1
    assert "refused" in err
