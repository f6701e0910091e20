"""Model-based test of the recorder on the call path (issue 5, "Done when", first bullet).

A hypothesis state machine drives random tool calls through the real MCP front (in-process
client, both eras, a real SQLite store and recorder, an injected principal carrying real token
claims): allowed calls, denials (scope missing; a ``within`` and a ``one_of`` constraint
violated), and malformed calls (an unknown tool, arguments of the wrong type, a missing or an
extra argument, arguments that are not an object). The model predicts each call's outcome and
keeps every decision id a response carried, in call order. After every step the store must hold
exactly one ``decision`` event per decision the broker made and none other, in call order
within each recorded session, each findable by its decision id, and every chain must verify.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import mcp.types as types
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import event as note_event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from mcp import Client
from mcp.shared.exceptions import MCPError

from broker.config import LimitsConfig
from broker.core.recording import EventKind, RecordedEvent, verify_chain
from broker.core.redaction import Redactor
from broker.core.tokens import TaskClaim, TokenClaims
from broker.mcp_front import McpFront
from broker.mediation import DECISION_META
from broker.principal import Principal
from broker.recorder import Recorder
from broker.registry import Registry
from broker.revocations import RevocationCache
from broker.store import SqlStore
from broker.store.testing import make_agent, migrated_store, sqlite_url
from connectors import NativeConnector, ToolSet
from scopes.definitions import parse_scope_toml
from tests.callers import Caller

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ERAS = ("legacy", "2026-07-28")
AGENT = "ag_one"
DENIAL = re.compile(r"denied \(([a-z,-]+)\); decision (dec_[0-9a-f]{20})")
STEP_BOUND = 10.0
"""Seconds any one step (a call, a reconnect, reading the store) may take."""

SCOPES = parse_scope_toml(
    """
[[scope]]
name = "tools:use"
[[scope.grant]]
connector = "local"
tools = ["echo", "add"]

[[scope]]
name = "files:read"
[[scope.grant]]
connector = "local"
tools = ["read"]
args = { path = { within = "/srv/ws" } }

[[scope]]
name = "colors:pick"
[[scope.grant]]
connector = "local"
tools = ["pick"]
args = { color = { one_of = ["red", "green"] } }
""",
    source="test",
)

TOKENS: dict[str, frozenset[str]] = {
    "jti-all-aaaaaaaaaaaaaaaaaa": frozenset({"tools:use", "files:read", "colors:pick"}),
    "jti-tools-aaaaaaaaaaaaaaaa": frozenset({"tools:use"}),
    "jti-files-aaaaaaaaaaaaaaaa": frozenset({"files:read", "colors:pick"}),
}


def local_tools() -> ToolSet:
    tools = ToolSet()

    @tools.tool
    async def echo(text: str) -> str:
        """Echo."""
        return text

    @tools.tool
    async def add(a: int, b: int) -> str:
        """Add two integers."""
        return str(a + b)

    @tools.tool
    async def read(path: str) -> str:
        """Pretend to read a file."""
        return f"contents of {path}"

    @tools.tool
    async def pick(color: str) -> str:
        """Pick a colour."""
        return color

    @tools.tool
    async def secret() -> str:
        """No scope grants this."""
        return "never"

    return tools


def principal_for(jti: str) -> Principal:
    token = TokenClaims(
        iss="http://127.0.0.1:8765",
        aud="http://127.0.0.1:8765/mcp",
        sub=AGENT,
        client_id=AGENT,
        exp=int((NOW + timedelta(minutes=10)).timestamp()),
        iat=int((NOW - timedelta(minutes=1)).timestamp()),
        nbf=int((NOW - timedelta(minutes=1)).timestamp()),
        jti=jti,
        scope=" ".join(sorted(TOKENS[jti])),
        task=TaskClaim(id="task-1", purpose="testing"),
    )
    return Principal.from_claims(token.to_payload())


@dataclass
class Clock:
    at: datetime = NOW

    def now(self) -> datetime:
        return self.at


# -- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One call the machine makes and what the model predicts for it."""

    tool: str
    arguments: Any
    scope: str | None
    """The scope that grants the tool (None: no scope does, or the tool does not exist)."""
    constraint_ok: bool = True
    """Whether the arguments satisfy the grant's constraints."""
    valid: bool = True
    """Whether the downstream tool accepts the arguments (its schema)."""
    expected_text: str | None = None


@dataclass(frozen=True)
class Outcome:
    kind: str
    """``allowed`` (forwarded; the result may be the tool's own error), ``denied`` (with
    ``reasons``) or ``rejected`` (a protocol error; nothing decided)."""
    reasons: frozenset[str] = frozenset()


def predict(call: Call, scopes: frozenset[str]) -> Outcome:
    if not isinstance(call.arguments, dict):
        return Outcome("rejected")
    if call.scope is None or call.scope not in scopes:
        return Outcome("denied", frozenset({"scope-missing"}))
    if not call.constraint_ok:
        return Outcome("denied", frozenset({"constraint-violated"}))
    return Outcome("allowed")


texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
ints = st.integers(-1000, 1000)

calls = st.one_of(
    # well-formed calls
    st.builds(lambda t: Call("local__echo", {"text": t}, "tools:use", expected_text=t), texts),
    st.builds(
        lambda a, b: Call("local__add", {"a": a, "b": b}, "tools:use", expected_text=str(a + b)),
        ints,
        ints,
    ),
    st.sampled_from(["/srv/ws/a.txt", "/srv/ws/d/e.txt", "/srv/ws"]).map(
        lambda p: Call("local__read", {"path": p}, "files:read", expected_text=f"contents of {p}")
    ),
    st.sampled_from(["red", "green"]).map(
        lambda c: Call("local__pick", {"color": c}, "colors:pick", expected_text=c)
    ),
    # constraint violations
    st.sampled_from(["/etc/passwd", "/srv/ws/../etc/passwd", "/srv/wsx/a", "relative/a"]).map(
        lambda p: Call("local__read", {"path": p}, "files:read", constraint_ok=False)
    ),
    st.sampled_from(["blue", "RED", "", "red "]).map(
        lambda c: Call("local__pick", {"color": c}, "colors:pick", constraint_ok=False)
    ),
    # scope missing: a tool no scope grants, and tools that do not exist
    st.just(Call("local__secret", {}, None)),
    st.sampled_from(["nope__tool", "local__nope", "local", "", "local__echo__x"]).map(
        lambda name: Call(name, {}, None)
    ),
    # malformed arguments the policy lets through and the tool itself refuses
    st.sampled_from(
        [
            {"text": 5},
            {"text": None},
            {},
            {"text": "a", "extra": 1},
        ]
    ).map(lambda args: Call("local__echo", args, "tools:use", valid=False)),
    st.sampled_from([{"a": "x", "b": 1}, {"a": 1}, {"a": 1.5, "b": 2}, {"a": [1], "b": 2}]).map(
        lambda args: Call("local__add", args, "tools:use", valid=False)
    ),
    # arguments that are not an object: refused by the protocol layer, nothing decided
    st.sampled_from([[1, 2], "text", 7, True]).map(
        lambda args: Call("local__echo", args, "tools:use")
    ),
)


@dataclass
class Made:
    """A decision the broker made, as the client saw it."""

    decision_id: str
    jti: str
    allowed: bool


# -- the broker under test -----------------------------------------------------------------------


@dataclass
class Live:
    store: SqlStore
    front: McpFront
    caller: Caller
    client: Client | None = None
    stack: list[AbstractContextManager[Any]] = field(
        default_factory=list[AbstractContextManager[Any]]
    )


@asynccontextmanager
async def live_broker(directory: Path) -> AsyncIterator[Live]:
    clock = Clock()
    async with migrated_store(sqlite_url(directory)) as store:
        await store.create_agent(make_agent("one", created_at=NOW), secret_hash=None)
        registry = Registry(store, pin_poll_interval=3600)
        registry.add(NativeConnector.from_toolset("local", local_tools()))
        revocations = RevocationCache(store, clock, staleness=3600)
        await revocations.refresh()
        async with registry, Recorder(store, clock=clock, redactor=Redactor(b"k" * 32)) as recorder:
            for pin in await store.list_pins():
                await store.approve_pin(pin.connector_id, pin.tool_name, pin.digest, "test", NOW)
            await registry.reload_pins()
            caller = Caller(principal_for(next(iter(TOKENS))))
            front = McpFront(
                registry,
                SCOPES,
                principal_lookup=caller.lookup,
                clock=clock,
                revocations=revocations,
                store=store,
                recorder=recorder,
                limits=LimitsConfig(agent_calls_per_minute=0, connector_calls_per_minute=0),
            )
            yield Live(store, front, caller)


async def all_events(store: SqlStore) -> dict[str, list[RecordedEvent]]:
    sessions = await store.list_sessions(limit=1000)
    return {s.id: list(await store.session_events(s.id)) for s in sessions}


def text_of(result: types.CallToolResult) -> str:
    return "".join(b.text for b in result.content if isinstance(b, types.TextContent))


class RecordingMachine(RuleBasedStateMachine):
    """Random calls through the front; the model is the list of decisions the client saw."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="recording-model-"))
        self.portal_cm = start_blocking_portal()
        self.portal: BlockingPortal = self.portal_cm.__enter__()
        self.broker_cm = self.portal.wrap_async_context_manager(live_broker(self.directory))
        self.live: Live = self.broker_cm.__enter__()
        self.client_cm: AbstractContextManager[Client] | None = None
        self.jti = next(iter(TOKENS))
        self.made: list[Made] = []
        """Every decision a response carried, in call order."""

    # -- plumbing --------------------------------------------------------------------------------

    def bounded(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            with anyio.fail_after(STEP_BOUND):
                return await fn(*args)

        return self.portal.call(run)

    def client(self) -> Client:
        if self.client_cm is None:
            self.connect(ERAS[0])
        assert self.live.client is not None
        return self.live.client

    def connect(self, era: str) -> None:
        self.disconnect()
        cm = self.portal.wrap_async_context_manager(Client(self.live.front.server, mode=era))  # pyright: ignore[reportArgumentType]
        self.live.client = cm.__enter__()
        self.client_cm = cm

    def disconnect(self) -> None:
        if self.client_cm is not None:
            cm, self.client_cm, self.live.client = self.client_cm, None, None
            cm.__exit__(None, None, None)

    def teardown(self) -> None:
        try:
            self.disconnect()
            self.broker_cm.__exit__(None, None, None)
            self.portal_cm.__exit__(None, None, None)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- rules -----------------------------------------------------------------------------------

    @initialize(era=st.sampled_from(ERAS))
    def start(self, era: str) -> None:
        self.connect(era)

    @rule(era=st.sampled_from(ERAS))
    def reconnect(self, era: str) -> None:
        """A new client connection (either era); the token, hence the session, stays."""
        self.connect(era)

    @rule(jti=st.sampled_from(sorted(TOKENS)))
    def switch_token(self, jti: str) -> None:
        """The agent presents another task token from now on (a session of its own)."""
        self.jti = jti
        self.live.caller.who = principal_for(jti)

    @rule(call=calls)
    def call(self, call: Call) -> None:
        expected = predict(call, TOKENS[self.jti])
        note_event(f"{expected.kind} {','.join(sorted(expected.reasons))}".strip())
        client = self.client()
        if expected.kind == "rejected":
            request = types.CallToolRequest(
                params=types.CallToolRequestParams.model_construct(
                    name=call.tool, arguments=call.arguments
                )
            )
            with warnings.catch_warnings():
                # The client serialises the deliberately ill-typed params with a warning.
                warnings.simplefilter("ignore", UserWarning)
                with pytest.raises(MCPError, match="Invalid request"):
                    self.bounded(client.session.send_request, request, types.CallToolResult)
            return

        result: types.CallToolResult = self.bounded(client.call_tool, call.tool, call.arguments)
        if expected.kind == "denied":
            assert result.is_error
            match = DENIAL.fullmatch(text_of(result))
            assert match is not None, text_of(result)
            assert set(match.group(1).split(",")) == expected.reasons
            assert DECISION_META not in (result.meta or {})
            self.made.append(Made(match.group(2), self.jti, allowed=False))
            return

        assert result.meta is not None, text_of(result)
        decision_id = result.meta[DECISION_META]
        assert re.fullmatch(r"dec_[0-9a-f]{20}", decision_id)
        if call.valid:
            assert not result.is_error, text_of(result)
            assert text_of(result) == call.expected_text
        else:
            assert result.is_error
            assert text_of(result).startswith("invalid arguments for tool"), text_of(result)
        self.made.append(Made(decision_id, self.jti, allowed=True))

    @rule(batch=st.lists(calls, min_size=2, max_size=6))
    def calls_in_a_row(self, batch: list[Call]) -> None:
        for call in batch:
            self.call(call)

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def the_record_matches_the_model(self) -> None:
        recorded: dict[str, list[RecordedEvent]] = self.bounded(all_events, self.live.store)
        order = {m.decision_id: i for i, m in enumerate(self.made)}
        assert len(order) == len(self.made), "a decision id was handed out twice"
        by_id = {m.decision_id: m for m in self.made}

        decisions: dict[str, list[RecordedEvent]] = {}
        session_of_token: dict[str, str] = {}
        for session_id, events in recorded.items():
            session = self.bounded(self.live.store.get_session, session_id)
            report = verify_chain(session, events)
            assert report.ok, report
            assert session.head_hash is None, "no session was closed, so none is sealed"
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert events[0].kind == EventKind.SESSION_OPENED
            mine = [e for e in events if e.kind == EventKind.DECISION]
            for event in mine:
                assert event.decision_id is not None
                decisions.setdefault(event.decision_id, []).append(event)
            # In call order: the session's decisions, by seq, are the model's, by call index.
            ids = [e.decision_id or "" for e in mine]
            assert all(i in order for i in ids), f"a decision no response carried: {ids}"
            assert ids == sorted(ids, key=lambda i: order[i])
            # One session per token (in-process, the session follows the token).
            jtis = {by_id[i].jti for i in ids}
            assert len(jtis) <= 1
            for jti in jtis:
                assert session_of_token.setdefault(jti, session_id) == session_id
            assert session.token_jti in jtis or not jtis
            # Every event carrying a decision id belongs to a decision recorded before it.
            seen: set[str] = set()
            for event in events:
                if event.kind == EventKind.DECISION:
                    assert event.decision_id not in seen
                    seen.add(event.decision_id or "")
                elif event.decision_id is not None:
                    assert event.decision_id in seen, (event.kind, event.decision_id)

        # Exactly one decision event per decision, and none the client did not hear of.
        assert {i: len(es) for i, es in decisions.items()} == {m.decision_id: 1 for m in self.made}
        for made in self.made:
            event = decisions[made.decision_id][0]
            assert event.payload["allowed"] is made.allowed
            found: RecordedEvent = self.bounded(
                self.live.store.find_event_by_decision, made.decision_id
            )
            assert found.kind == EventKind.DECISION
            assert (found.session_id, found.seq) == (event.session_id, event.seq)
            if made.allowed:
                # A forwarded call's result (even the tool's own error) is recorded after it.
                results = [
                    e
                    for e in recorded[event.session_id]
                    if e.decision_id == made.decision_id and e.kind == EventKind.RESULT
                ]
                assert len(results) == 1
                assert results[0].seq > event.seq


def test_every_decision_through_the_front_has_one_event_in_call_order_and_chains_verify() -> None:
    run_state_machine_as_test(
        RecordingMachine,
        settings=settings(
            max_examples=20,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
