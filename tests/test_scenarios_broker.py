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
from connectors import ToolSet
from tests.scenarios.corpus import ATTACKS, BENIGN, CORPUS_CONFIG, Call, Script
from tests.test_quarantine_e2e import detector_broker, mcp_session, text

CONTENT: dict[str, str] = {}
# Egress calls that reached the (native) downstream tools, to prove a stopped call was not sent.
EGRESS: list[str] = []

files = ToolSet()
web = ToolSet()
mail = ToolSet()


@files.tool
async def read_text_file(path: str) -> str:
    """Read a text file."""
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
async def fetch(url: str) -> str:
    """Fetch a page."""
    EGRESS.append(url)
    return f"<html>page at {url}</html>"


@mail.tool
async def send(to: str, body: str) -> str:
    """Send a mail."""
    EGRESS.append(body)
    return "sent"


CONNECTORS = tuple(
    ConnectorConfig(id=name, kind="native", target=f"tests.test_scenarios_broker:{name}")
    for name in ("files", "web", "mail")
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
name = "mail:send"
labels = ["egress"]
[[scope.grant]]
connector = "mail"
tools = ["send"]
"""
STOPPED = ("flow-blocked", "anomaly-blocked", "agent-quarantined", "token-revoked")


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
    stopped_at: int | None = None
    blocked: list[str] | None = None
    # The stopping call reached the downstream tool (it must not).
    leaked: bool = False
    # Calls the corpus expects to be allowed that came back as errors (before any attack).
    refused: list[str] = field(default_factory=list[str])


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


async def replay(tmp_path: Path, script: Script) -> Replay:
    t0 = datetime.now(UTC)
    clock = SetClock(t0)
    out = Replay(blocked=[])
    for step in script.steps:
        if isinstance(step, Call) and step.secrets:
            CONTENT[str(step.args.get("path"))] = "\n".join(f"API_KEY={s}" for s in step.secrets)
    async with (
        detector_broker(
            tmp_path,
            connectors=CONNECTORS,
            scopes_toml=SCOPES,
            detectors=CORPUS_CONFIG,
            clock=clock,
        ) as broker,
        AsyncExitStack() as stack,
    ):
        tokens: dict[str, str] = {}
        for t in script.tokens:
            agent, _ = await broker.add_agent(f"{t.agent}-{t.alias}", list(t.scopes))
            minted = await broker.services.tokens.mint_for(
                agent.id,
                scope=" ".join(t.scopes),
                purpose=t.purpose or "scenario",
                authorization_details=broker_details(script, t.alias, t.authorization_details),
            )
            tokens[t.alias] = minted.access_token
        sessions: dict[tuple[str, str], Client] = {}
        attacking = 0
        in_attack = False
        for step in script.steps:
            if not isinstance(step, Call):
                continue
            await advance(broker, clock, t0 + timedelta(seconds=step.at))
            key = (step.token, step.client)
            if key not in sessions:
                sessions[key] = await stack.enter_async_context(
                    mcp_session(broker, tokens[step.token], name=step.client)
                )
            in_attack = in_attack or step.attack
            attacking += in_attack
            sent = len(EGRESS)
            try:
                with anyio.fail_after(10):
                    result = await sessions[key].call_tool(
                        f"{step.connector}__{step.tool}", dict(step.args)
                    )
                answer = text(result) if result.is_error else ""
            except Exception as exc:
                answer = f"session-closed ({type(exc).__name__})"
            if answer and step.outcome == "allowed" and not in_attack:
                out.refused.append(f"{step.tool} at {step.at}s: {answer}")
            if any(r in answer for r in STOPPED) or answer.startswith("session-closed"):
                assert out.blocked is not None
                out.blocked.append(answer)
                if in_attack and out.stopped_at is None:
                    out.stopped_at = attacking
                    out.leaked = len(EGRESS) > sent
                    break
    return out


BENIGN_SUBSET = [s for s in BENIGN if s.name.startswith(("b01", "b03", "b09", "b12"))]
ATTACK_SUBSET = [
    s for s in ATTACKS if s.name.startswith(("a02", "a04", "a05", "a08", "a09", "a12"))
]


@pytest.mark.parametrize("script", BENIGN_SUBSET, ids=[s.name for s in BENIGN_SUBSET])
async def test_benign_workloads_are_never_blocked_through_the_broker(
    tmp_path: Path, script: Script
) -> None:
    run = await replay(tmp_path, script)
    assert run.blocked == []
    assert run.refused == []


@pytest.mark.parametrize("script", ATTACK_SUBSET, ids=[s.name for s in ATTACK_SUBSET])
async def test_attacks_are_stopped_within_their_bound_through_the_broker(
    tmp_path: Path, script: Script
) -> None:
    run = await replay(tmp_path, script)
    assert run.refused == []
    assert run.stopped_at is not None, f"{script.name} was never stopped"
    assert script.stop_within is not None
    assert run.stopped_at <= script.stop_within, (run.stopped_at, run.blocked)
    assert not run.leaked, "the stopping call reached the downstream tool"
    print(f"{script.name}: stopped at attacking call {run.stopped_at}: {run.blocked}")
