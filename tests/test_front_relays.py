"""The front's relays beyond request/response: logging, resource subscriptions, sampling and
elicitation during a call, and the per-session SSE event store.

Driven in process by a real MCP client (`Client(front.server, mode=...)`) over the conformance
fixture server as a stdio connector, with the principal injected.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import mcp.types as types
import pytest
from mcp import Client, MCPError
from mcp.client.session import ClientRequestContext

from broker.event_store import BoundedEventStore
from broker.mcp_front import McpFront
from broker.registry import Registry
from broker.store.testing import migrated_store, sqlite_url
from connectors import StdioSpec, open_connector
from connectors.relay import CallRelay, InFlight
from scopes.definitions import parse_scope_toml
from tests.callers import Caller, principal
from tests.test_mcp_front import approve_all

REPO = Path(__file__).resolve().parent.parent
WAIT = 10.0

SCOPES = parse_scope_toml(
    """
[[scope]]
name = "conf:all"
[[scope.grant]]
connector = "conf"
tools = ["*"]

[[scope]]
name = "conf:narrow"
[[scope.grant]]
connector = "conf"
tools = ["*"]
args = { text = { max_length = 5 } }
""",
    source="test",
)


@dataclass
class Conf:
    front: McpFront
    caller: Caller


@pytest.fixture
async def conf(tmp_path: Path) -> AsyncIterator[Conf]:
    spec = StdioSpec(
        id="conf",
        command=sys.executable,
        args=("-m", "tests.fixtures.servers.conformance_server", "--stdio"),
        cwd=str(REPO),
    )
    async with migrated_store(sqlite_url(tmp_path)) as store:
        registry = Registry(store, pin_poll_interval=60)
        registry.add(open_connector(spec), prefix="")
        caller = Caller(principal("conf:all"))
        front = McpFront(registry, SCOPES, principal_lookup=caller.lookup)
        async with registry:
            await approve_all(store, registry)
            yield Conf(front, caller)


def text_of(result: types.CallToolResult) -> str:
    return " ".join(b.text for b in result.content if isinstance(b, types.TextContent))


# -- logging -----------------------------------------------------------------------------------


async def test_set_level_is_answered_and_filters_relayed_log_messages(conf: Conf) -> None:
    got: list[types.LoggingMessageNotificationParams] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        got.append(params)

    async with Client(conf.front.server, mode="legacy", logging_callback=on_log) as client:  # pyright: ignore[reportArgumentType]
        assert await client.set_logging_level("info") == types.EmptyResult()
        result = await client.call_tool("test_tool_with_logging", {})
        assert not result.is_error, text_of(result)
        assert len(got) == 3
        assert all(p.level == "info" for p in got)

        got.clear()
        await client.set_logging_level("error")
        result = await client.call_tool("test_tool_with_logging", {})
        assert not result.is_error
        assert got == []


async def test_2026_log_messages_reach_only_a_request_that_opted_in(conf: Conf) -> None:
    got: list[types.LoggingMessageNotificationParams] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        got.append(params)

    async with Client(conf.front.server, mode="2026-07-28", logging_callback=on_log) as client:  # pyright: ignore[reportArgumentType]
        await client.call_tool("test_tool_with_logging", {})
        assert got == []
    async with Client(
        conf.front.server,  # pyright: ignore[reportArgumentType]
        mode="2026-07-28",
        logging_callback=on_log,
        log_level="info",
    ) as client:
        await client.call_tool("test_tool_with_logging", {})
        assert len(got) == 3


# -- sampling and elicitation ------------------------------------------------------------------


async def test_a_connectors_sampling_request_during_a_call_reaches_the_calling_agent(
    conf: Conf,
) -> None:
    seen: list[types.CreateMessageRequestParams] = []

    async def sample(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        seen.append(params)
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="forty-two"),
            model="test-model",
        )

    async with Client(conf.front.server, mode="legacy", sampling_callback=sample) as client:  # pyright: ignore[reportArgumentType]
        result = await client.call_tool("test_sampling", {"prompt": "the answer?"})
    assert not result.is_error, text_of(result)
    assert "forty-two" in text_of(result)
    assert len(seen) == 1


async def test_sampling_is_refused_to_the_connector_when_the_agent_lacks_the_capability(
    conf: Conf,
) -> None:
    async with Client(conf.front.server, mode="legacy") as client:  # pyright: ignore[reportArgumentType]
        result = await client.call_tool("test_sampling", {"prompt": "the answer?"})
    # The fixture reports the refusal it got from the broker as a tool error.
    assert result.is_error


async def test_elicitation_is_relayed_to_the_agent_and_its_answer_returned(conf: Conf) -> None:
    async def elicit(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        return types.ElicitResult(
            action="accept", content={"username": "ada", "email": "ada@example.com"}
        )

    async with Client(conf.front.server, mode="legacy", elicitation_callback=elicit) as client:  # pyright: ignore[reportArgumentType]
        result = await client.call_tool("test_elicitation", {"message": "who are you?"})
    assert not result.is_error, text_of(result)
    assert "accept" in text_of(result)


async def test_sampling_on_the_2026_path_is_refused_to_the_connector(conf: Conf) -> None:
    async def sample(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        raise AssertionError("2026 has no back channel: nothing may reach the agent")

    async with Client(conf.front.server, mode="2026-07-28", sampling_callback=sample) as client:  # pyright: ignore[reportArgumentType]
        result = await client.call_tool("test_sampling", {"prompt": "x"})
    assert result.is_error


async def test_a_request_with_no_call_in_flight_is_refused_by_the_connector(
    conf: Conf,
) -> None:
    connector = conf.front.registry.snapshot.tools["test_sampling"].connector
    on_sampling = connector._on_sampling  # pyright: ignore[reportAttributeAccessIssue]
    refused = await on_sampling(
        None,
        types.CreateMessageRequestParams(
            messages=[
                types.SamplingMessage(role="user", content=types.TextContent(type="text", text="x"))
            ],
            max_tokens=5,
        ),
    )
    assert isinstance(refused, types.ErrorData)


def test_routing_is_only_to_an_unambiguous_owner() -> None:
    inflight = InFlight()
    assert inflight.route() is None
    a1, a2, b = CallRelay(owner="a"), CallRelay(owner="a"), CallRelay(owner="b")
    with inflight.call(a1):
        assert inflight.route() is a1
        with inflight.call(a2):
            assert inflight.route() is a2  # same owner: the latest call
            with inflight.call(b):
                assert inflight.route() is None  # two owners: nobody
            with inflight.call(None):
                assert inflight.route() is None  # a call without a relay: nobody
            assert inflight.route() is a2
        assert inflight.route() is a1
    assert inflight.route() is None


# -- resource subscriptions --------------------------------------------------------------------


async def test_subscribe_relays_resource_updates_and_unsubscribe_stops_them(conf: Conf) -> None:
    updated: list[str] = []
    arrived = anyio.Event()
    uri = "test://watched-resource"
    connector: Any = conf.front.registry.snapshot.resource_route(uri).connector  # pyright: ignore[reportOptionalMemberAccess]
    downstream_update = types.ResourceUpdatedNotification(
        params=types.ResourceUpdatedNotificationParams(uri=uri)
    )

    async def on_message(message: object) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updated.append(str(message.params.uri))
            arrived.set()

    async with Client(conf.front.server, mode="legacy", message_handler=on_message) as client:  # pyright: ignore[reportArgumentType]
        assert await client.subscribe_resource(uri) == types.EmptyResult()
        assert uri in connector._subscribed  # the downstream subscription was made
        # What the fixture's session would deliver when the resource changes:
        await connector._on_message(downstream_update)
        with anyio.fail_after(WAIT):
            await arrived.wait()
        assert updated == [uri]

        assert await client.unsubscribe_resource(uri) == types.EmptyResult()
        assert uri not in connector._subscribed
        await connector._on_message(downstream_update)
        await client.list_tools()  # a round trip after the would-be notification
        assert updated == [uri]


async def test_updates_stop_for_a_subscriber_whose_token_no_longer_reads_the_resource(
    conf: Conf,
) -> None:
    updated: list[str] = []
    uri = "test://watched-resource"
    connector: Any = conf.front.registry.snapshot.resource_route(uri).connector  # pyright: ignore[reportOptionalMemberAccess]

    async def on_message(message: object) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updated.append(str(message.params.uri))

    async with Client(conf.front.server, mode="legacy", message_handler=on_message) as client:  # pyright: ignore[reportArgumentType]
        await client.subscribe_resource(uri)
        # The subscription's principal loses its wide grant (as a revocation would).
        subscribers = conf.front.relays._subscribers[uri]  # pyright: ignore[reportPrivateUsage]
        for sub in subscribers.values():
            sub.principal = principal("conf:narrow")
        await connector._on_message(
            types.ResourceUpdatedNotification(
                params=types.ResourceUpdatedNotificationParams(uri=uri)
            )
        )
        await client.list_tools()
        assert updated == []


async def test_subscribe_is_mediated_like_read(conf: Conf) -> None:
    async with Client(conf.front.server, mode="legacy") as client:  # pyright: ignore[reportArgumentType]
        with pytest.raises(MCPError) as unknown:
            await client.subscribe_resource("test://no-such-thing")
        assert unknown.value.error.code == types.INVALID_PARAMS
        assert unknown.value.error.data == {"uri": "test://no-such-thing"}
        conf.caller.who = principal("conf:narrow")
        with pytest.raises(MCPError) as forbidden:
            await client.subscribe_resource("test://watched-resource")
        assert forbidden.value.error.message == unknown.value.error.message
        assert forbidden.value.error.data == {"uri": "test://watched-resource"}


async def test_read_of_an_unknown_resource_names_the_uri(conf: Conf) -> None:
    async with Client(conf.front.server, mode="2026-07-28") as client:  # pyright: ignore[reportArgumentType]
        with pytest.raises(MCPError) as unknown:
            await client.read_resource("test://no-such-thing")
    assert unknown.value.error.data == {"uri": "test://no-such-thing"}


# -- the event store ---------------------------------------------------------------------------


def _note(n: int) -> types.JSONRPCNotification:
    return types.JSONRPCNotification(jsonrpc="2.0", method="notifications/message", params={"n": n})


async def test_event_store_replays_one_stream_after_an_id_and_stays_bounded() -> None:
    store = BoundedEventStore(max_events=4)
    prime = await store.store_event("1", None)
    first = await store.store_event("1", _note(1))
    await store.store_event("2", _note(2))
    await store.store_event("1", _note(3))
    replayed: list[Any] = []

    async def send(event: Any) -> None:
        replayed.append(event.message)

    assert await store.replay_events_after(prime, send) == "1"
    assert [m.params["n"] for m in replayed] == [1, 3]
    assert await store.replay_events_after("not-an-id", send) is None
    for n in range(10):
        await store.store_event("1", _note(n))
    assert store.count == 4
    assert await store.replay_events_after(first, send) is None  # dropped, not replayed
    assert len(prime) >= 20  # unguessable ids


async def test_each_http_session_gets_its_own_event_store(conf: Conf) -> None:
    conf.front.asgi_app()
    manager: Any = conf.front.session_manager
    assert manager.event_store is not None  # so the SDK primes and replays at all
    first = manager._admit_session(None)
    second = manager._admit_session(None)
    try:
        assert isinstance(first._event_store, BoundedEventStore)
        assert first._event_store is not second._event_store
        assert first._event_store is not manager.event_store
    finally:
        manager._server_instances.clear()


async def test_url_mode_elicitation_is_never_relayed(conf: Conf) -> None:
    asked: list[object] = []

    async def elicit(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        asked.append(params)
        return types.ElicitResult(action="accept")

    relays: list[CallRelay | None] = []
    front = conf.front
    original = front.relays.call_relay

    def capture(ctx: Any, who: Any) -> CallRelay | None:
        relay = original(ctx, who)
        relays.append(relay)
        return relay

    front.relays.call_relay = capture  # type: ignore[method-assign]
    async with Client(front.server, mode="legacy", elicitation_callback=elicit) as client:  # pyright: ignore[reportArgumentType]
        await client.call_tool("test_simple_text", {})
    relay = relays[0]
    assert relay is not None
    assert relay.elicitation is not None
    # The call is over: the request channel is closed, but the refusal comes before any send.
    answer = await relay.elicitation(
        types.ElicitRequestURLParams(
            message="log in here", url="https://example.com/login", elicitation_id="e1"
        )
    )
    assert isinstance(answer, types.ErrorData)
    assert asked == []
