"""The connector registry: naming, collisions, pinning and approval, against a real SQLite store."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from broker.config import BrokerConfig, ConnectorConfig
from broker.core.decision import Reason
from broker.core.pinning import PinStatus
from broker.errors import ConfigError
from broker.ports import StoredConnector
from broker.registry import (
    Registry,
    Snapshot,
    SnapshotChange,
    build_spec,
    connector_configs,
    exposed_name,
)
from broker.store import SqlStore
from broker.store.testing import migrated_store, sqlite_url
from connectors import NativeConnector, StdioSpec, ToolSet, open_connector
from connectors.testing import EchoConnector

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
MUTATING = Path(__file__).parent / "fixtures" / "servers" / "mutating.py"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    async with migrated_store(sqlite_url(tmp_path)) as s:
        yield s


async def approve_all(store: SqlStore, registry: Registry) -> Snapshot:
    for pin in await store.list_pins():
        if pin.approved_digest != pin.digest:
            await store.approve_pin(pin.connector_id, pin.tool_name, pin.digest, "test", NOW)
    return await registry.reload_pins()


def test_exposed_names_join_prefix_and_tool_with_a_double_underscore() -> None:
    assert exposed_name("fs", "read_file") == "fs__read_file"
    assert exposed_name("", "read_file") == "read_file"


async def test_tools_stay_hidden_until_approved_then_appear_under_the_connector_prefix(
    store: SqlStore,
) -> None:
    registry = Registry(store, pin_poll_interval=60)
    registry.add(EchoConnector("echo"))
    async with registry:
        snapshot = registry.snapshot
        assert snapshot.listed == ()
        assert snapshot.tools["echo__echo"].disabled is Reason.TOOL_UNAPPROVED
        pins = await store.get_pins("echo")
        assert {p.tool_name: p.status for p in pins} == dict.fromkeys(
            ("echo", "fail", "sleep"), PinStatus.PENDING
        )

        snapshot = await approve_all(store, registry)

        assert [r.name for r in snapshot.listed] == ["echo__echo", "echo__fail", "echo__sleep"]
        route = snapshot.tools["echo__echo"]
        assert route.tool is not None
        assert route.tool.name == "echo__echo"
        assert route.tool_name == "echo"
        assert registry.input_schema("echo__echo") == route.tool.input_schema


async def test_an_empty_prefix_exposes_tool_names_unchanged(store: SqlStore) -> None:
    registry = Registry(store, pin_poll_interval=60)
    registry.add(EchoConnector("echo"), prefix="")
    async with registry:
        snapshot = await approve_all(store, registry)
        assert [r.name for r in snapshot.listed] == ["echo", "fail", "sleep"]


def test_two_connectors_with_the_same_prefix_are_refused_naming_both(store: SqlStore) -> None:
    registry = Registry(store)
    registry.add(EchoConnector("one"), prefix="tools")
    with pytest.raises(ConfigError, match="'one' and 'two' both use the tool prefix 'tools'"):
        registry.add(EchoConnector("two"), prefix="tools")


async def test_colliding_tool_names_refuse_to_start_naming_both_connectors(
    store: SqlStore,
) -> None:
    registry = Registry(store, pin_poll_interval=60)
    registry.add(EchoConnector("one"), prefix="")
    registry.add(EchoConnector("two"), prefix="")
    with pytest.raises(ConfigError, match="'echo' is exposed by both connectors 'one' and 'two'"):
        await registry.start()
    await registry.aclose()


async def test_a_connector_registered_later_with_colliding_names_is_refused_and_closed(
    store: SqlStore,
) -> None:
    registry = Registry(store, pin_poll_interval=60)
    registry.add(EchoConnector("one"), prefix="")
    async with registry:
        late = EchoConnector("two")
        with pytest.raises(ConfigError, match="both connectors 'one' and 'two'"):
            await registry.register(late, prefix="")
        assert "two" not in registry.snapshot.connectors
        with pytest.raises(Exception, match="closed"):
            await late.list_tools()


async def test_a_tool_whose_exposed_name_is_invalid_is_refused_with_a_clear_problem(
    store: SqlStore,
) -> None:
    tools = ToolSet()

    @tools.tool(name="has space")
    async def spaced() -> str:
        return "x"

    @tools.tool(name="fine")
    async def fine() -> str:
        return "x"

    registry = Registry(store, pin_poll_interval=60)
    registry.add(NativeConnector.from_toolset("odd", tools))
    async with registry:
        snapshot = await approve_all(store, registry)
        assert [r.name for r in snapshot.listed] == ["odd__fine"]
        assert "odd__has space" not in snapshot.tools
        assert any(
            "'has space' of connector 'odd' is not exposed" in p and "A-Z a-z 0-9 _ . -" in p
            for p in snapshot.problems
        )


async def test_the_exposed_definition_is_the_approved_one_only_pinned_fields(
    store: SqlStore,
) -> None:
    registry = Registry(store, pin_poll_interval=60)
    registry.add(EchoConnector("echo"))
    async with registry:
        snapshot = await approve_all(store, registry)
        pin = next(p for p in await store.get_pins("echo") if p.tool_name == "echo")
        tool = snapshot.tools["echo__echo"].tool
        assert tool is not None
        exposed = tool.model_dump(by_alias=True, exclude_none=True, mode="json")
        assert pin.approved_definition is not None
        assert exposed == {**pin.approved_definition, "name": "echo__echo"}


async def test_approvals_made_elsewhere_are_noticed_by_the_pin_poll(store: SqlStore) -> None:
    registry = Registry(store, pin_poll_interval=0.05)
    registry.add(EchoConnector("echo"))
    send, receive = anyio.create_memory_object_stream[SnapshotChange](10)

    async def on_change(change: SnapshotChange) -> None:
        send.send_nowait(change)

    registry.add_listener(on_change)
    async with registry, receive:
        for pin in await store.list_pins():
            await store.approve_pin(pin.connector_id, pin.tool_name, pin.digest, "admin", NOW)
        with anyio.fail_after(5):
            async for change in receive:
                assert change.tools
                if len(change.snapshot.listed) == 3:
                    break
    send.close()


async def test_a_silently_changed_definition_seen_after_a_restart_disables_the_tool(
    store: SqlStore, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    spec = StdioSpec(id="mut", command=sys.executable, args=(str(MUTATING), str(state)))
    registry = Registry(store, pin_poll_interval=60)
    registry.add(open_connector(spec))
    async with registry:
        snapshot = await approve_all(store, registry)
        assert "mut__greet" in {r.name for r in snapshot.listed}
        state.write_text("annotation", encoding="utf-8")

        snapshot = await registry.refresh("mut")

        route = snapshot.tools["mut__greet"]
        assert route.tool is None
        assert route.disabled is Reason.TOOL_DEFINITION_CHANGED
        assert "mut__greet" not in {r.name for r in snapshot.listed}
        pin = next(p for p in await store.get_pins("mut") if p.tool_name == "greet")
        assert pin.status is PinStatus.CHANGED
        assert pin.approved_definition is not None
        assert pin.approved_definition["annotations"] == {"readOnlyHint": True}


def test_build_spec_resolves_secret_references_and_relative_roots(tmp_path: Path) -> None:
    (tmp_path / "token.txt").write_text("file-secret\n", encoding="utf-8")
    stdio = ConnectorConfig(
        id="git",
        kind="stdio",
        command="/bin/true",
        env={"API_TOKEN": "env:GIT_TOKEN", "MODE": "plain"},
        roots=("work",),
    )
    http = ConnectorConfig(
        id="remote",
        kind="http",
        url="https://x.example/mcp",
        headers={"Authorization": "file:token.txt"},
    )
    spec = build_spec(stdio, {"GIT_TOKEN": "env-secret"}, tmp_path)
    assert isinstance(spec, StdioSpec)
    assert dict(spec.env) == {"API_TOKEN": "env-secret", "MODE": "plain"}
    assert spec.roots == (str(tmp_path / "work"),)
    remote = build_spec(http, {}, tmp_path)
    assert dict(getattr(remote, "headers")) == {"Authorization": "file-secret"}  # noqa: B009
    with pytest.raises(ConfigError, match="GIT_TOKEN is not set"):
        build_spec(stdio, {}, tmp_path)


def test_stored_connectors_follow_the_configured_ones_and_may_not_reuse_an_id() -> None:
    config = BrokerConfig(connectors=(ConnectorConfig(id="a", kind="stdio", command="/bin/a"),))
    stored = StoredConnector(
        id="b",
        kind="stdio",
        spec={"id": "b", "kind": "stdio", "command": "/bin/b"},
        created_at=NOW,
        created_by="admin",
    )
    assert [c.id for c in connector_configs(config, [stored])] == ["a", "b"]
    clash = StoredConnector(
        id="a",
        kind="stdio",
        spec={"id": "a", "kind": "stdio", "command": "/bin/x"},
        created_at=NOW,
        created_by="admin",
    )
    with pytest.raises(ConfigError, match="'a' is both in the config file and in the store"):
        connector_configs(config, [clash])


async def test_from_config_builds_native_connectors_from_their_target(store: SqlStore) -> None:
    config = BrokerConfig(
        connectors=(
            ConnectorConfig(
                id="demo", kind="native", target="broker.demo_tools:toolset", prefix=""
            ),
        )
    )
    registry = await Registry.from_config(config, store, environ={}, pin_poll_interval=60)
    async with registry:
        snapshot = await approve_all(store, registry)
        assert [r.name for r in snapshot.listed] == ["add", "echo", "word_count"]
