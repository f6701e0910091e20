"""NativeConnector and ToolSet: schemas from type hints, validation, result shapes, deadlines."""

from __future__ import annotations

import anyio
import mcp.types as types
import pytest
from pydantic import BaseModel

from connectors import (
    CallTimeout,
    ConnectorClosed,
    ConnectorConfigError,
    DownstreamError,
    NativeConnector,
    NativeSpec,
    Progress,
    ToolError,
    ToolSet,
    open_connector,
)
from connectors.testing import EchoConnector, check_connector, conformance_toolset


class Weather(BaseModel):
    city: str
    celsius: float


def demo_tools() -> ToolSet:
    tools = ToolSet()

    @tools.tool
    async def add(a: int, b: int = 1) -> int:
        """Add two integers."""
        return a + b

    @tools.tool(name="weather", annotations=types.ToolAnnotations(read_only_hint=True))
    def weather_now(city: str) -> Weather:
        """Current weather for a city."""
        return Weather(city=city, celsius=21.5)

    @tools.tool
    def lookup(key: str) -> dict[str, str]:
        return {"key": key, "value": key.upper()}

    @tools.tool
    async def boom(secret: str) -> str:
        raise RuntimeError(f"database password is {secret}")

    @tools.tool
    async def refuse(reason: str) -> str:
        raise ToolError(f"refused: {reason}")

    @tools.tool
    async def count(steps: int, progress: Progress) -> str:
        for step in range(1, steps + 1):
            await progress(step, steps, f"step {step}")
        return "counted"

    @tools.tool
    async def forever() -> str:
        await anyio.sleep_forever()
        return "never"

    return tools


TOOLS = demo_tools()


def text_of(result: types.CallToolResult) -> str:
    return "".join(b.text for b in result.content if isinstance(b, types.TextContent))


async def test_echo_connector_passes_the_conformance_suite() -> None:
    await check_connector(EchoConnector)


async def test_native_connector_passes_the_conformance_suite() -> None:
    await check_connector(lambda: NativeConnector.from_toolset("native", conformance_toolset()))


async def test_input_schema_is_an_object_built_from_type_hints_and_description_from_docstring() -> (
    None
):
    async with NativeConnector.from_toolset("demo", TOOLS) as connector:
        tools = {tool.name: tool for tool in await connector.list_tools()}
    add = tools["add"]
    assert add.description == "Add two integers."
    assert add.input_schema["type"] == "object"
    assert add.input_schema["properties"]["a"]["type"] == "integer"
    assert add.input_schema["required"] == ["a"]
    assert "progress" not in tools["count"].input_schema["properties"]
    assert tools["weather"].annotations == types.ToolAnnotations(read_only_hint=True)
    assert tools["weather"].output_schema is not None


async def test_valid_arguments_are_converted_and_the_result_is_structured() -> None:
    async with NativeConnector.from_toolset("demo", TOOLS) as connector:
        added = await connector.call_tool("add", {"a": 2, "b": 3})
        weather = await connector.call_tool("weather", {"city": "Oslo"})
        looked_up = await connector.call_tool("lookup", {"key": "k"})
    assert added.structured_content == {"result": 5}
    assert text_of(added) == "5"
    assert weather.structured_content == {"city": "Oslo", "celsius": 21.5}
    assert looked_up.structured_content == {"key": "k", "value": "K"}
    assert not looked_up.is_error


async def test_invalid_or_unknown_arguments_are_a_tool_error_without_the_values() -> None:
    async with NativeConnector.from_toolset("demo", TOOLS) as connector:
        wrong_type = await connector.call_tool("add", {"a": "not-a-number-xyz"})
        unknown = await connector.call_tool("add", {"a": 1, "sneaky": True})
    assert wrong_type.is_error is True
    assert "a:" in text_of(wrong_type)
    assert "not-a-number-xyz" not in text_of(wrong_type)
    assert unknown.is_error is True
    assert "sneaky" in text_of(unknown)


async def test_an_exception_in_a_tool_is_a_plain_error_result_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with NativeConnector.from_toolset("demo", TOOLS) as connector:
        result = await connector.call_tool("boom", {"secret": "hunter2"})
    assert result.is_error is True
    assert text_of(result) == "tool 'boom' failed"
    assert "Traceback" not in text_of(result)
    assert [r.tool for r in caplog.records if r.name == "connectors.native"] == ["boom"]  # pyright: ignore[reportAttributeAccessIssue]


async def test_tool_error_message_reaches_the_caller() -> None:
    async with NativeConnector.from_toolset("demo", TOOLS) as connector:
        result = await connector.call_tool("refuse", {"reason": "not today"})
    assert result.is_error is True
    assert text_of(result) == "refused: not today"


async def test_progress_from_a_native_tool_reaches_the_callback() -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with NativeConnector.from_toolset("demo", TOOLS) as connector:
        result = await connector.call_tool("count", {"steps": 3}, progress=on_progress)
    assert text_of(result) == "counted"
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


async def test_deadline_is_capped_by_the_spec_maximum() -> None:
    connector = NativeConnector.from_toolset("demo", TOOLS, max_call_timeout=0.2)
    async with connector:
        with anyio.fail_after(5), pytest.raises(CallTimeout):
            await connector.call_tool("forever", {}, timeout=60)


async def test_closing_cancels_a_call_in_flight_with_connector_closed() -> None:
    connector = NativeConnector.from_toolset("demo", TOOLS)
    await connector.start()
    outcome: list[BaseException] = []

    async def call() -> None:
        try:
            await connector.call_tool("forever", {})
        except ConnectorClosed as exc:
            outcome.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.wait_all_tasks_blocked()
            await connector.aclose()
    assert len(outcome) == 1


async def test_an_unknown_tool_is_a_downstream_protocol_error() -> None:
    async with NativeConnector.from_toolset("demo", TOOLS) as connector:
        with pytest.raises(DownstreamError) as raised:
            await connector.call_tool("nope", {})
    assert raised.value.code == -32602


async def test_open_connector_loads_a_toolset_by_target() -> None:
    connector = open_connector(NativeSpec(id="loaded", target="connectors.testing:TARGET_TOOLS"))
    assert isinstance(connector, NativeConnector)
    async with connector:
        names = {tool.name for tool in await connector.list_tools()}
    assert names == {"echo", "fail", "sleep"}


@pytest.mark.parametrize(
    "target",
    ["no_colon", "missing.module.xyz:tools", "connectors.testing:EchoConnector"],
    ids=["malformed", "unimportable", "not-a-toolset"],
)
def test_a_bad_native_target_is_a_config_error(target: str) -> None:
    with pytest.raises(ConnectorConfigError):
        NativeConnector(NativeSpec(id="bad", target=target))


def test_registering_the_same_name_twice_is_refused() -> None:
    tools = ToolSet()

    @tools.tool
    def one() -> str:
        return "1"

    with pytest.raises(ValueError, match="already registered"):
        tools.add(one)
