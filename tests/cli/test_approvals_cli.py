"""`broker approvals ...` through typer's CliRunner against a real SQLite store."""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
import typer
from typer.testing import CliRunner

from broker.cli import approvals as approvals_cli
from broker.core.approvals import Approval, ApprovalStatus, new_call_approval, new_token_approval
from broker.store.testing import migrated_store, sqlite_url


def make_cli() -> typer.Typer:
    root = typer.Typer(no_args_is_help=True)
    root.add_typer(approvals_cli.app, name="approvals")
    return root


def held_call(approval_id: str, *, now: datetime, ttl: float = 300) -> Approval:
    return new_call_approval(
        approval_id,
        agent_id="ag_worker",
        client_id="ag_worker",
        task_id="tsk_cleanup",
        purpose="tidy the workspace",
        token_jti="jti_1",
        decision_id="dec_1",
        connector="files",
        tool="delete_file",
        arguments={"path": "/srv/ws/old.log", "note": "\x1b[31mred"},
        now=now,
        ttl_seconds=ttl,
    )


def token_request(approval_id: str, *, now: datetime) -> Approval:
    return new_token_approval(
        approval_id,
        agent_id="ag_deployer",
        task_id="tsk_release",
        purpose="ship release 1.2 to production",
        scopes=("deploy:prod",),
        binding="a" * 64,
        now=now,
        ttl_seconds=600,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(f'[store]\nurl = "{sqlite_url(tmp_path)}"\n', encoding="utf-8")
    return path


def seed(tmp_path: Path, *approvals: Approval) -> None:
    async def body() -> None:
        async with migrated_store(sqlite_url(tmp_path)) as store:
            for approval in approvals:
                await store.create_approval(approval)

    anyio.run(body)


def stored(tmp_path: Path, approval_id: str) -> Approval:
    async def body() -> Approval:
        async with migrated_store(sqlite_url(tmp_path)) as store:
            return await store.get_approval(approval_id)

    return anyio.run(body)


def invoke(config: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(make_cli(), [*args, "--config", str(config)])
    return result.exit_code, result.stdout, result.stderr


def test_list_shows_the_exact_call_and_the_token_requests_scopes_and_purpose(
    config: Path, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    seed(tmp_path, held_call("apr_call", now=now), token_request("apr_tok", now=now))
    code, out, err = invoke(config, "approvals", "list")
    assert code == 0, err
    assert "apr_call" in out
    assert "files / delete_file" in out
    assert '{"note": "\\u001b[31mred", "path": "/srv/ws/old.log"}' in out
    assert "\x1b[31m" not in out
    assert "scopes:    deploy:prod" in out
    assert '"ship release 1.2 to production"' in out


def test_list_json_has_the_canonical_arguments_for_scripts(config: Path, tmp_path: Path) -> None:
    seed(tmp_path, held_call("apr_call", now=datetime.now(UTC)))
    code, out, _ = invoke(config, "approvals", "list", "--json", "--kind", "call")
    assert code == 0
    [row] = json.loads(out)
    assert row["arguments"] == {"path": "/srv/ws/old.log", "note": "\x1b[31mred"}
    assert (row["status"], row["tool"], row["decision_id"]) == ("pending", "delete_file", "dec_1")


def test_list_hides_decided_and_overdue_approvals_unless_all(config: Path, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    seed(tmp_path, held_call("apr_old", now=now - timedelta(hours=1), ttl=60))
    code, out, _ = invoke(config, "approvals", "list")
    assert (code, out.strip()) == (0, "no approvals waiting")
    code, out, _ = invoke(config, "approvals", "list", "--all", "--json")
    assert [(r["id"], r["status"]) for r in json.loads(out)] == [("apr_old", "expired")]


def test_approve_records_the_cli_user_as_actor(config: Path, tmp_path: Path) -> None:
    seed(tmp_path, held_call("apr_call", now=datetime.now(UTC)))
    code, out, err = invoke(config, "approvals", "approve", "apr_call", "--reason", "expected")
    assert code == 0, err
    assert "approved apr_call: call files / delete_file (agent ag_worker) as cli:" in out
    approval = stored(tmp_path, "apr_call")
    assert approval.status is ApprovalStatus.APPROVED
    assert approval.decided_by == f"cli:{getpass.getuser()}"
    assert approval.reason == "expected"


def test_deny_needs_a_reason(config: Path, tmp_path: Path) -> None:
    seed(tmp_path, token_request("apr_tok", now=datetime.now(UTC)))
    code, _, err = invoke(config, "approvals", "deny", "apr_tok", "--reason", "  ")
    assert code == 2
    assert "deny needs a --reason" in err
    assert stored(tmp_path, "apr_tok").status is ApprovalStatus.PENDING


def test_deny_records_the_reason(config: Path, tmp_path: Path) -> None:
    seed(tmp_path, token_request("apr_tok", now=datetime.now(UTC)))
    code, out, err = invoke(config, "approvals", "deny", "apr_tok", "--reason", "not today")
    assert code == 0, err
    assert "denied apr_tok: token request for deploy:prod" in out
    approval = stored(tmp_path, "apr_tok")
    assert (approval.status, approval.reason) == (ApprovalStatus.DENIED, "not today")


def test_approving_an_expired_request_is_a_clear_error_and_releases_nothing(
    config: Path, tmp_path: Path
) -> None:
    seed(tmp_path, held_call("apr_old", now=datetime.now(UTC) - timedelta(minutes=10), ttl=60))
    code, out, err = invoke(config, "approvals", "approve", "apr_old")
    assert code == 1
    assert "approval apr_old expired at" in err
    assert "nothing was released" in err
    assert "approved" not in out
    assert stored(tmp_path, "apr_old").status is ApprovalStatus.EXPIRED


def test_deciding_twice_says_who_decided_first(config: Path, tmp_path: Path) -> None:
    seed(tmp_path, held_call("apr_call", now=datetime.now(UTC)))
    assert invoke(config, "approvals", "deny", "apr_call", "--reason", "no")[0] == 0
    code, _, err = invoke(config, "approvals", "approve", "apr_call")
    assert code == 1
    assert "already denied by cli:" in err


def test_an_unknown_id_is_not_found(config: Path, tmp_path: Path) -> None:
    seed(tmp_path)
    code, _, err = invoke(config, "approvals", "approve", "apr_missing")
    assert code == 1
    assert "no approval with id 'apr_missing'" in err
