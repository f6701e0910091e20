"""The official conformance suite against the broker fronting our fixture server.

The broker is built by `create_app` from config: its only connector is the conformance fixture
server (stdio, prefix "" so the suite finds its fixtures by name), every tool approved. The
suite sends no token, so the suite talks to a second `McpFront` over the very same registry and
scope definitions, whose principal lookup returns a fixed test principal holding the fixture
connector's ``*`` grant, and which has no verifier. Everything past authentication (listing,
mediation, forwarding, error shaping, both eras) is the broker's own code path.

The baseline is explicit: each scenario must pass, or be listed as an expected failure with the
reason a mediating broker cannot pass it. A new failure, or an expected failure that starts
passing, fails the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.server import ServerRequestContext
from starlette.applications import Starlette
from starlette.routing import Mount

from broker.mcp_front import McpFront
from broker.principal import Principal
from broker.testing import serve_app
from tests.conformance.harness import (
    SCENARIOS,
    baseline_problems,
    missing_tools,
    run_server_suite,
)
from tests.test_examples import served_broker
from tests.test_stdio_shim import FIXTURE, FIXTURE_SCOPES

pytestmark = [
    pytest.mark.servers,
    pytest.mark.skipif(missing_tools() is not None, reason=f"conformance suite: {missing_tools()}"),
]

# The suite checks the protocol, not the jail: the fixture runs from the repository (its cwd),
# which no sandbox path covers, so it runs unsandboxed here (the jail has its own tests).
SUITE_FIXTURE = FIXTURE.model_copy(update={"sandbox": "off"})

SUITE_PRINCIPAL = Principal(
    agent_id="conformance-suite",
    client_id="conformance-suite",
    scopes=frozenset({"conf:all"}),
    token_id="conformance-suite-token",
)

_INPUT_REQUIRED = (
    "the front does not relay InputRequiredResult (SEP-2322 multi-round trips): connectors "
    "speak the 2025 handshake era downstream (one era per stdio connection), where the "
    "fixture's InputRequiredResult fails the result schema ('Handler returned an invalid "
    "result') and the call becomes upstream-unavailable; relaying needs 2026-era connector "
    "sessions, the connector's inputRequests mediated up and inputResponses/requestState "
    "passed down untouched"
)
EXPECTED_FAILURES: dict[str, dict[str, str]] = {
    "2025-11-25": {},
    "2026-07-28": {
        "input-required-result-basic-elicitation": _INPUT_REQUIRED,
        "input-required-result-basic-list-roots": "by design as well: the broker is the only "
        "source of roots for connectors and never relays an agent's roots (design.md, what "
        "must hold 3); besides, " + _INPUT_REQUIRED,
        "input-required-result-basic-sampling": _INPUT_REQUIRED,
        "input-required-result-capability-check": _INPUT_REQUIRED,
        "input-required-result-multi-round": _INPUT_REQUIRED,
        "input-required-result-multiple-input-requests": _INPUT_REQUIRED,
        "input-required-result-request-state": _INPUT_REQUIRED,
        "input-required-result-result-type": _INPUT_REQUIRED,
        "input-required-result-tampered-state": _INPUT_REQUIRED,
        "input-required-result-non-tool-request": "prompts/get answered with "
        "InputRequiredResult is not relayed either (upstream-unavailable, -32603); "
        + _INPUT_REQUIRED,
        "server-stateless": "test_missing_capability must be refused with -32021 when the "
        "client lacks sampling, but capabilities are per hop: the fixture sees the broker's "
        "connector client (which declares sampling so that 2025-era calls can relay it), not "
        "the agent's declared capabilities",
    },
}


# What must pass through the broker: every scenario the suite runs but the expected failures.
BASELINE: dict[str, tuple[str, ...]] = {
    version: tuple(s for s in scenarios if s not in EXPECTED_FAILURES[version])
    for version, scenarios in SCENARIOS.items()
}


@asynccontextmanager
async def broker_for_the_suite(tmp_path: Path) -> AsyncIterator[str]:
    """The broker's MCP front over the fixture connector, as the test principal; yields /mcp."""
    async with served_broker(
        tmp_path, connectors=(SUITE_FIXTURE,), scopes_toml=FIXTURE_SCOPES
    ) as b:

        def suite_principal(_ctx: ServerRequestContext[Any, Any]) -> Principal:
            return SUITE_PRINCIPAL

        services = b.services
        front = McpFront(
            services.registry,
            list(services.scopes.values()),
            server_config=services.config.server,
            principal_lookup=suite_principal,
        )
        app = Starlette(
            routes=[Mount("/", app=front.http_app())], lifespan=lambda _app: front.lifespan()
        )
        async with serve_app(app) as url:
            yield f"{url}/mcp"


@pytest.mark.parametrize("spec_version", sorted(BASELINE))
async def test_the_broker_fronting_the_fixture_server_passes_the_official_suite(
    tmp_path: Path, spec_version: str
) -> None:
    async with broker_for_the_suite(tmp_path) as url:
        with anyio.fail_after(110):
            report = await run_server_suite(url, spec_version)
    problems = baseline_problems(report, BASELINE[spec_version], EXPECTED_FAILURES[spec_version])
    assert not problems, "\n".join([*problems, report.summary()])
