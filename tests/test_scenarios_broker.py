"""The scenario corpus replayed through a served broker with native connectors and a set clock.

Each script's calls go over MCP (streamable HTTP) with tokens minted for its agents; the policy,
the detectors and the responses are the real ones. Attacks must be stopped (refused with
``flow-blocked``/``anomaly-blocked``, or the token/agent cut off) within their bound; benign
workloads must never be blocked by a detector.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from broker.config import ConnectorConfig
from broker.core.identity import AgentStatus
from connectors import ToolError, ToolSet
from tests.scenarios.corpus import ATTACKS, BENIGN, CORPUS_CONFIG, Call, CloseTask, Script
from tests.test_quarantine_e2e import detector_broker, mcp_session, text
from tests.test_task_close_e2e import close

CONTENT: dict[str, str] = {}
# Egress calls that reached the (native) downstream tools, to prove a stopped call was not sent.
EGRESS: list[str] = []
# Set by the replay for a step the corpus marks as failing upstream (``ok=False`` or
# ``upstream-timeout``): the next downstream tool call raises a `ToolError`, as a flaky
# connector would. Calls run one at a time, so one flag is enough.
TRANSIENT: dict[str, bool] = {"fail_next": False}
# Result sizes are scaled down by this factor, and the read budget with them, so the number of
# calls that spends the budget is the corpus's while the bytes on the wire stay small.
SCALE = 64
READ_BUDGET = 64 * 1024 * 1024

files = ToolSet()
web = ToolSet()
mail = ToolSet()
jobs = ToolSet()
db = ToolSet()
shell = ToolSet()


def _upstream() -> None:
    """Fail this call if the replay marked it as a transient upstream failure."""
    if TRANSIENT["fail_next"]:
        TRANSIENT["fail_next"] = False
        raise ToolError("upstream timed out (transient), try again")


@files.tool
async def read_text_file(path: str) -> str:
    """Read a text file."""
    _upstream()
    return CONTENT.get(path, f"contents of {path}")


@files.tool
async def write_file(path: str, content: str) -> str:
    """Write a text file."""
    return f"wrote {len(content)} characters"


@files.tool
async def get_file_info(path: str) -> str:
    """File metadata."""
    return f"{path}: 1024 bytes"


@web.tool
async def fetch(url: str, body: dict[str, Any] | None = None) -> str:
    """Fetch a page."""
    _upstream()
    EGRESS.append(url + (repr(body) if body else ""))
    return f"<html>page at {url}</html>"


@web.tool
async def post(url: str, body: str) -> str:
    """Post a body to a URL."""
    EGRESS.append(url + body)
    return "posted"


@mail.tool
async def send(to: str, body: str) -> str:
    """Send a mail."""
    EGRESS.append(body)
    return "sent"


@jobs.tool
async def status(job: str) -> str:
    """A job's status."""
    return f"{job}: running"


@db.tool
async def query(dsn: str, sql: str) -> str:
    """Run a read-only query."""
    return "1 row"


@shell.tool(name="exec")
async def run_command(argv: list[str]) -> str:
    """Run a command."""
    EGRESS.append(" ".join(argv))
    return "ok"


CONNECTORS = tuple(
    ConnectorConfig(id=name, kind="native", target=f"tests.test_scenarios_broker:{name}")
    for name in ("files", "web", "mail", "jobs", "db", "shell")
)
SCOPES = """\
[[scope]]
name = "files:read"
labels = ["private"]
[[scope.grant]]
connector = "files"
tools = ["read_text_file", "get_file_info"]
args = { path = { within = "/srv/workspace" } }

[[scope]]
name = "files:write"
labels = ["private"]
[[scope.grant]]
connector = "files"
tools = ["write_file"]
args = { path = { within = "/srv/workspace" } }

[[scope]]
name = "web:fetch"
labels = ["untrusted", "egress"]
[[scope.grant]]
connector = "web"
tools = ["fetch"]

[[scope]]
name = "web:post"
labels = ["egress"]
[[scope.grant]]
connector = "web"
tools = ["post"]

[[scope]]
name = "mail:send"
labels = ["egress"]
[[scope.grant]]
connector = "mail"
tools = ["send"]

[[scope]]
name = "jobs:run"
labels = ["private"]
[[scope.grant]]
connector = "jobs"
tools = ["status"]

[[scope]]
name = "db:query"
labels = ["private"]
[[scope.grant]]
connector = "db"
tools = ["query"]

[[scope]]
name = "shell:run"
labels = ["private"]
[[scope.grant]]
connector = "shell"
tools = ["exec"]
"""
DETECTORS: dict[str, Any] = {
    **CORPUS_CONFIG,
    "loops": {**CORPUS_CONFIG.get("loops", {}), "read_budget_bytes": READ_BUDGET // SCALE},
}
STOPPED = ("flow-blocked", "anomaly-blocked", "agent-quarantined", "token-revoked", "task-closed")


@dataclass
class SetClock:
    """Script time for the whole broker: token checks, keys, detectors and the revocation view.

    The revocation view polls on a real-time interval but measures its age on this clock, so a
    script that moves the clock faster than real time must refresh the view as it goes (see
    `advance`); otherwise the view looks older than ``revocation_staleness`` and every request is
    refused ``store-unavailable`` (fail closed), which the client sees as 401 / -32603.
    """

    at: datetime

    def now(self) -> datetime:
        return self.at


async def advance(broker: Any, clock: SetClock, at: datetime) -> None:
    """Move script time, then confirm the revocation view at that time, as the poll loop would."""
    clock.at = at
    with anyio.fail_after(5):
        await broker.services.revocations.refresh()


@dataclass
class Replay:
    script: str = ""
    stopped_at: int | None = None
    blocked: list[str] = field(default_factory=list[str])
    # The stopping call reached the downstream tool (it must not).
    leaked: bool = False
    # Calls the corpus expects to be allowed that came back as errors (before any attack).
    refused: list[str] = field(default_factory=list[str])
    # Calls that failed upstream on purpose (transient errors) and came back as plain errors.
    transient: int = 0
    calls: int = 0
    # Agents the broker quarantined by the end of the script.
    quarantined: list[str] = field(default_factory=list[str])


def broker_details(
    script: Script, alias: str, details: tuple[dict[str, Any], ...]
) -> list[dict[str, Any]] | None:
    """The token's authorization_details as the broker reads them.

    The corpus model reads a ``tool_call`` detail only as a declared tool; the broker also
    narrows by it (a token with tool_call details reaches only what they cover). So a token
    whose details name some tools also names the other tools its script calls, which keeps the
    script's allowed calls allowed and declares nothing the script does not use.
    """
    if not details:
        return None
    out = [dict(d) for d in details]
    if any(d.get("type") == "tool_call" for d in details):
        used: dict[str, set[str]] = {}
        for step in script.steps:
            if isinstance(step, Call) and step.token == alias:
                used.setdefault(step.connector, set()).add(step.tool)
        for d in details:
            if d.get("type") == "tool_call":
                used.get(str(d.get("connector")), set()).difference_update(d.get("tools", ()))
        out += [
            {"type": "tool_call", "connector": c, "tools": sorted(tools)}
            for c, tools in sorted(used.items())
            if tools
        ]
    return out


def _content(step: Call) -> str | None:
    """What the files tool returns for this step's path: its secrets, or its size (scaled)."""
    if step.secrets:
        return "\n".join(f"API_KEY={s}" for s in step.secrets)
    if step.tool == "read_text_file" and step.result_bytes > 512:
        return "x" * (step.result_bytes // SCALE)
    return None


async def replay(tmp_path: Path, script: Script) -> Replay:
    # Script time 0 is the top of a minute, as in the engine replay (tests/scenarios), so a run
    # is reproducible: rates are counted per clock minute. The engine replay also checks every
    # script at every second of the minute.
    t0 = datetime.now(UTC).replace(second=0, microsecond=0)
    clock = SetClock(t0)
    out = Replay(script.name)
    TRANSIENT["fail_next"] = False
    for step in script.steps:
        if isinstance(step, Call) and (body := _content(step)) is not None:
            CONTENT[str(step.args.get("path"))] = body
    async with (
        detector_broker(
            tmp_path,
            connectors=CONNECTORS,
            scopes_toml=SCOPES,
            detectors=DETECTORS,
            clock=clock,
        ) as broker,
        AsyncExitStack() as stack,
    ):
        # One broker agent per corpus agent (its scopes: all its tokens'), so an agent that
        # works under two tokens keeps one profile, as in the corpus.
        agent_scopes: dict[str, set[str]] = {}
        for t in script.tokens:
            agent_scopes.setdefault(t.agent, set()).update(t.scopes)
        agents: dict[str, str] = {}
        secrets: dict[str, str] = {}
        for name, scopes in agent_scopes.items():
            agent, secrets[name] = await broker.add_agent(name, sorted(scopes), max_ttl=3600)
            agents[name] = agent.id
        tokens: dict[str, str] = {}
        for t in script.tokens:
            minted = await broker.services.tokens.mint_for(
                agents[t.agent],
                scope=" ".join(t.scopes),
                # A task id is one agent's: two corpus agents' "task-1" are two broker tasks.
                task_id=f"{t.task}.{t.agent}",
                purpose=t.purpose or "scenario",
                expires_in=3600,
                authorization_details=broker_details(script, t.alias, t.authorization_details),
            )
            tokens[t.alias] = minted.access_token
        sessions: dict[tuple[str, str], Client] = {}
        attacking = 0
        in_attack = False
        for step in script.steps:
            await advance(broker, clock, t0 + timedelta(seconds=step.at))
            if isinstance(step, CloseTask):
                # The agent ends its task at the revocation endpoint (``close_task=true``).
                for t in {t.agent: t for t in script.tokens if t.task == step.task}.values():
                    client = (agents[t.agent], secrets[t.agent])
                    closed = await close(broker, tokens[t.alias], client)
                    assert closed.status_code == 200, closed.text
                continue
            key = (step.token, step.client)
            if key not in sessions:
                sessions[key] = await stack.enter_async_context(
                    mcp_session(broker, tokens[step.token], name=step.client)
                )
            in_attack = in_attack or step.attack
            attacking += in_attack
            out.calls += 1
            failing = not step.ok or step.outcome == "upstream-timeout"
            TRANSIENT["fail_next"] = failing
            sent = len(EGRESS)
            try:
                with anyio.fail_after(10):
                    result = await sessions[key].call_tool(
                        f"{step.connector}__{step.tool}", dict(step.args)
                    )
                answer = text(result) if result.is_error else ""
            except Exception as exc:
                answer = f"session-closed ({type(exc).__name__})"
            TRANSIENT["fail_next"] = False
            if failing and "(transient)" in answer:
                out.transient += 1
            elif answer and step.outcome == "allowed" and not in_attack:
                out.refused.append(f"{step.tool} at {step.at}s: {answer}")
            if any(r in answer for r in STOPPED) or answer.startswith("session-closed"):
                out.blocked.append(answer)
                if in_attack and out.stopped_at is None:
                    out.stopped_at = attacking
                    out.leaked = len(EGRESS) > sent
                    break
        for agent_id in agents.values():
            agent = await broker.services.store.get_agent(agent_id)
            if agent.status is AgentStatus.QUARANTINED:
                out.quarantined.append(agent.name)
    return out


BENIGN_RUN = [s for s in BENIGN if not s.name.startswith("b05")]
"""Every benign workload but b05 (three hours, 722 calls: beyond the 3600 s token lifetime and
the file's time budget; its pattern, polling plus reads, is covered by b02/b04/b11)."""
ATTACK_RUN = list(ATTACKS)
SUMMARY: list[str] = []


def _summary(run: Replay, script: Script) -> str:
    if script.stop_within is None:
        return (
            f"{script.name}: {run.calls} calls, blocked {len(run.blocked)}, "
            f"transient errors {run.transient}, quarantined {run.quarantined or 'none'}"
        )
    how = run.blocked[-1] if run.blocked else "-"
    return (
        f"{script.name}: stopped at attacking call {run.stopped_at} / bound {script.stop_within}"
        f" ({how}); quarantined {run.quarantined or 'none'}"
    )


@pytest.mark.parametrize("script", BENIGN_RUN, ids=[s.name for s in BENIGN_RUN])
async def test_benign_workloads_are_never_blocked_through_the_broker(
    tmp_path: Path, script: Script
) -> None:
    run = await replay(tmp_path, script)
    SUMMARY.append(_summary(run, script))
    print(SUMMARY[-1])
    assert run.blocked == []
    assert run.refused == []
    assert run.quarantined == []
    expected = sum(
        1
        for s in script.steps
        if isinstance(s, Call) and (not s.ok or s.outcome == "upstream-timeout")
    )
    assert run.transient == expected, "every transient upstream failure reached the agent"


@pytest.mark.parametrize("script", ATTACK_RUN, ids=[s.name for s in ATTACK_RUN])
async def test_attacks_are_stopped_within_their_bound_through_the_broker(
    tmp_path: Path, script: Script
) -> None:
    run = await replay(tmp_path, script)
    SUMMARY.append(_summary(run, script))
    print(SUMMARY[-1])
    assert run.refused == []
    assert run.stopped_at is not None, f"{script.name} was never stopped"
    assert script.stop_within is not None
    assert run.stopped_at <= script.stop_within, (run.stopped_at, run.blocked)
    assert not run.leaked, "the stopping call reached the downstream tool"
    if run.blocked[-1].startswith("session-closed"):
        # A closed session is a stop only because the agent was quarantined.
        assert run.quarantined, run.blocked
    if script.name.startswith("a15"):
        # Planted content may get the call blocked, never the victim switched off.
        assert run.quarantined == []
        assert "flow-blocked" in run.blocked[-1] or "anomaly-blocked" in run.blocked[-1]
