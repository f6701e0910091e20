"""Our conformance fixture server against the official suite, directly over HTTP, both eras.

The baseline below records every scenario the suite runs for each spec version. A scenario that
starts failing, an expected failure that starts passing, a scenario that stops running and a
scenario the baseline does not know all fail the test. The broker-fronted run will reuse
`run_server_suite` with the broker's `/mcp` URL and the same baseline.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from mcp import Client, StdioServerParameters

from tests.conformance.harness import (
    REPO,
    SCENARIOS,
    baseline_problems,
    missing_tools,
    run_server_suite,
)

pytestmark = [
    pytest.mark.servers,
    pytest.mark.skipif(missing_tools() is not None, reason=f"conformance suite: {missing_tools()}"),
]

FIXTURE_MODULE = "tests.fixtures.servers.conformance_server"

BASELINE = SCENARIOS
# Scenario -> why it cannot pass against the fixture server. Empty: every scenario passes.
EXPECTED_FAILURES: dict[str, dict[str, str]] = {"2025-11-25": {}, "2026-07-28": {}}


async def _read_url(process: Process) -> str:
    assert process.stdout is not None
    seen = ""
    async for chunk in TextReceiveStream(process.stdout):
        seen += chunk
        for line in seen.splitlines():
            if line.startswith("listening on "):
                return line.removeprefix("listening on ").strip()
    raise RuntimeError(f"fixture server exited before listening; stdout was {seen!r}")


@asynccontextmanager
async def fixture_server_over_http() -> AsyncIterator[str]:
    """Start the fixture server as a child process on a free loopback port; yield its /mcp URL."""
    command = [sys.executable, "-m", FIXTURE_MODULE, "--http", "--port", "0"]
    process = await anyio.open_process(command, cwd=REPO)
    try:
        with anyio.fail_after(15):
            url = await _read_url(process)
        yield url
    finally:
        process.terminate()
        with anyio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.aclose()


@pytest.mark.parametrize("spec_version", sorted(BASELINE))
async def test_fixture_server_passes_the_official_suite_over_http(spec_version: str) -> None:
    async with fixture_server_over_http() as url:
        with anyio.fail_after(90):
            report = await run_server_suite(url, spec_version)
    problems = baseline_problems(report, BASELINE[spec_version], EXPECTED_FAILURES[spec_version])
    assert not problems, "\n".join([*problems, report.summary()])


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_fixture_server_over_stdio_serves_the_probed_fixtures(mode: str) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", FIXTURE_MODULE, "--stdio"], cwd=REPO
    )
    with anyio.fail_after(20):
        async with Client(params, mode=mode) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            text = await client.call_tool("test_simple_text", {})
            prompt = await client.get_prompt(
                "test_prompt_with_arguments", {"arg1": "a", "arg2": "b"}
            )
            resource = await client.read_resource("test://template/7/data")
    assert {"test_simple_text", "json_schema_2020_12_tool", "test_header_echo"} <= tools
    assert text.content[0].model_dump()["text"] == "This is a simple text response for testing."
    assert "arg1='a'" in prompt.messages[0].content.model_dump()["text"]
    assert '"id": "7"' in resource.contents[0].model_dump()["text"]
