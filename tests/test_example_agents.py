"""The task agent and the delegating agent, each run as a subprocess against a served broker
(`create_app`, uvicorn on loopback) with the demo connector approved."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio

from broker.core.revocation import RevocationKind
from broker.templates import EXAMPLE_SCOPES
from broker.testing import DEMO, served_broker

REPO = Path(__file__).resolve().parent.parent
AGENTS = REPO / "examples" / "agents"
SCOPES = EXAMPLE_SCOPES
"""The scopes `broker init --examples` writes: the agents are tested against what users get."""


def base_env(tmp_path: Path, url: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "BROKER_URL": url}


async def run_agent(script: str, args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    command = [sys.executable, str(AGENTS / script), *args]
    with anyio.fail_after(60):
        done = await anyio.run_process(command, env=env, cwd=REPO, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_the_task_agent_gets_a_narrow_token_for_its_purpose_and_calls_inside_it(
    tmp_path: Path,
) -> None:
    async with served_broker(tmp_path, connectors=(DEMO,), scopes_toml=SCOPES) as broker:
        agent, secret = await broker.add_agent("tasker", ["demo:use", "demo:echo"])
        env = base_env(tmp_path, broker.url) | {
            "BROKER_CLIENT_ID": agent.id,
            "BROKER_CLIENT_SECRET": secret,
        }
        code, out, err = await run_agent(
            "task_agent.py",
            [
                "--scope",
                "demo:echo",
                "--task",
                "tsk_greeting",
                "--purpose",
                "echo a greeting for the demo",
                "--tool",
                "demo__echo",
                "--args",
                '{"text": "hello, narrowly"}',
            ],
            env,
        )
        [issued] = await broker.services.store.list_tokens(agent_id=agent.id)
        closed = await broker.services.store.revocations_since(0)
    assert code == 0, out + err
    assert [(r.kind, r.subject, r.actor) for r in closed] == [
        (RevocationKind.TASK_CLOSED, "tsk_greeting", f"agent:{agent.id}")
    ]
    assert "task tsk_greeting: token for 'demo:echo'" in out
    assert "reachable tools: demo__echo\n" in out
    assert "demo__echo -> hello, narrowly" in out
    assert "task tsk_greeting: done, task closed" in out
    assert (issued.scopes, issued.task_id, issued.purpose) == (
        ("demo:echo",),
        "tsk_greeting",
        "echo a greeting for the demo",
    )
    assert secret not in out + err


async def test_the_task_agent_does_not_call_a_tool_outside_its_scopes(tmp_path: Path) -> None:
    async with served_broker(tmp_path, connectors=(DEMO,), scopes_toml=SCOPES) as broker:
        agent, secret = await broker.add_agent("tasker", ["demo:use", "demo:echo"])
        env = base_env(tmp_path, broker.url) | {
            "BROKER_CLIENT_ID": agent.id,
            "BROKER_CLIENT_SECRET": secret,
        }
        code, out, err = await run_agent(
            "task_agent.py",
            ["--scope", "demo:echo", "--purpose", "add numbers", "--tool", "demo__add"],
            env,
        )
    assert code == 3, out + err
    assert "demo__add is outside this task's scopes: not calling it" in out


async def test_the_task_agent_reports_a_scope_its_agent_may_not_have(tmp_path: Path) -> None:
    async with served_broker(tmp_path, connectors=(DEMO,), scopes_toml=SCOPES) as broker:
        agent, secret = await broker.add_agent("tasker", ["demo:echo"])
        env = base_env(tmp_path, broker.url) | {
            "BROKER_CLIENT_ID": agent.id,
            "BROKER_CLIENT_SECRET": secret,
        }
        code, out, err = await run_agent(
            "task_agent.py",
            ["--scope", "demo:use", "--purpose", "everything", "--tool", "demo__add"],
            env,
        )
    assert code == 1, out + err
    assert "token refused: invalid_scope" in out


async def test_the_delegating_agent_hands_a_narrower_token_that_cannot_widen(
    tmp_path: Path,
) -> None:
    async with served_broker(tmp_path, connectors=(DEMO,), scopes_toml=SCOPES) as broker:
        both = ["demo:echo", "demo:math"]
        boss, boss_secret = await broker.add_agent("orchestrator", both)
        worker, worker_secret = await broker.add_agent("worker", both)
        helper, _ = await broker.add_agent("helper", both)
        env = base_env(tmp_path, broker.url) | {
            "BROKER_CLIENT_ID": boss.id,
            "BROKER_CLIENT_SECRET": boss_secret,
            "BROKER_SUBAGENT_ID": worker.id,
            "BROKER_SUBAGENT_SECRET": worker_secret,
            "BROKER_HELPER_ID": helper.id,
        }
        code, out, err = await run_agent(
            "delegating_agent.py",
            ["--scope", "demo:echo demo:math", "--child-scope", "demo:echo"],
            env,
        )
        tokens = await broker.services.store.list_tokens()
    assert code == 0, out + err
    assert "orchestrator: task tsk_" in out
    assert f"child token for 'demo:echo' handed to {worker.id}" in out
    assert "sub-agent: reachable tools: demo__echo\n" in out
    assert "sub-agent: demo__echo -> hello from the sub-agent" in out
    assert "sub-agent: demo__add -> refused: denied (scope-missing); decision dec_" in out
    assert "orchestrator: task tsk_" in out
    assert "token for 'demo:echo demo:math'" in out
    assert "sub-agent: widening to 'demo:echo demo:math' refused: invalid_scope" in out
    assert "delegation stayed narrow" in out
    parent = next(t for t in tokens if t.agent_id == boss.id)
    [child] = [t for t in tokens if t.parent_jti == parent.jti]
    assert (child.agent_id, child.scopes, child.task_id) == (
        worker.id,
        ("demo:echo",),
        parent.task_id,
    )
    assert child.expires_at <= parent.expires_at
    assert boss_secret not in out + err
    assert worker_secret not in out + err


async def test_the_delegating_agent_without_a_sub_agent_says_what_to_set(tmp_path: Path) -> None:
    env = base_env(tmp_path, "http://127.0.0.1:9") | {
        "BROKER_CLIENT_ID": "x",
        "BROKER_CLIENT_SECRET": "y",
    }
    code, _, err = await run_agent("delegating_agent.py", [], env)
    assert code == 2
    assert "set BROKER_SUBAGENT_ID" in err
