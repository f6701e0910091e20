"""`broker admin-token ...` through typer's CliRunner against a real SQLite store in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
import typer
from typer.testing import CliRunner

from broker.admin_tokens import authenticate_admin
from broker.cli import admin as admin_cli
from broker.core.identity import AdminRole, AdminToken
from broker.errors import AdminAuthFailed
from broker.store.testing import migrated_store, sqlite_url


def make_cli() -> typer.Typer:
    root = typer.Typer(no_args_is_help=True)
    root.add_typer(admin_cli.app, name="admin-token")
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


def check(tmp_path: Path, raw: str, needs: AdminRole) -> AdminToken:
    async def body() -> AdminToken:
        async with migrated_store(sqlite_url(tmp_path)) as store:
            return await authenticate_admin(store, raw, needs=needs)

    return anyio.run(body)


def test_create_prints_a_working_token_once_with_a_warning(config: Path, tmp_path: Path) -> None:
    code, out, _ = invoke(config, "admin-token", "create", "--role", "approver", "--name", "alice")
    assert code == 0, out
    assert "shown only now" in out
    raw = next(line.split()[-1] for line in out.splitlines() if "token:" in line)
    record = check(tmp_path, raw, AdminRole.APPROVER)
    assert (record.name, record.role) == ("alice", AdminRole.APPROVER)
    with pytest.raises(AdminAuthFailed):
        check(tmp_path, raw, AdminRole.ADMIN)
    code, listed, _ = invoke(config, "admin-token", "list", "--json")
    assert code == 0
    assert raw not in listed
    assert raw.split(".")[1] not in listed
    assert [t["name"] for t in json.loads(listed)] == ["alice"]


def test_create_with_json_gives_the_token_and_its_record(config: Path, tmp_path: Path) -> None:
    code, out, _ = invoke(
        config, "admin-token", "create", "--role", "reviewer", "--name", "bob", "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["role"] == "reviewer"
    assert check(tmp_path, data["token"], AdminRole.REVIEWER).id == data["id"]


def test_an_unknown_role_or_an_empty_name_is_refused(config: Path) -> None:
    code, _, _ = invoke(config, "admin-token", "create", "--role", "root", "--name", "x")
    assert code == 2
    code, _, err = invoke(config, "admin-token", "create", "--role", "admin", "--name", "  ")
    assert code == 1
    assert "--name" in err


def test_revoke_stops_the_token_at_once(config: Path, tmp_path: Path) -> None:
    _, out, _ = invoke(config, "admin-token", "create", "--role", "admin", "--name", "ci", "--json")
    data = json.loads(out)
    code, revoked, _ = invoke(config, "admin-token", "revoke", data["id"])
    assert code == 0
    assert "revoked" in revoked
    with pytest.raises(AdminAuthFailed, match="revoked"):
        check(tmp_path, data["token"], AdminRole.REVIEWER)
    code, _, err = invoke(config, "admin-token", "revoke", "0000000000000000")
    assert code == 1
    assert err
