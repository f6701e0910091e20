"""The bench's own code keeps working (its figures are `make bench`'s, never asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.__main__ import main as bench_main
from bench.core import decide_cost_us, detectors_cost_us, main
from broker.testing import served_broker


def test_the_core_bench_measures_decide_and_the_detectors() -> None:
    assert decide_cost_us(calls=5) > 0
    assert detectors_cost_us(calls=60) > 0


def test_the_core_bench_prints_its_figures_as_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bench.core.ROUNDS", 1)
    assert main(["--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) == {"decide_us_ten_grants", "detectors_us_per_call", "json_yardstick_us"}
    assert all(isinstance(v, float) and v > 0 for v in figures.values())


async def test_the_unrecorded_broker_mediates_every_call_but_records_nothing(
    tmp_path: Path,
) -> None:
    """The bench's *mediation* target differs from the broker in recording only."""
    async with served_broker(tmp_path, record=False) as broker:
        agent, _ = await broker.add_agent("bench-agent", ["demo:use"])
        token = await broker.mint(agent, "demo:use")
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0)) as http,
            Client(streamable_http_client(broker.mcp_url, http_client=http)) as client,
        ):
            allowed = await client.call_tool("demo__echo", {"text": "hi"})
            unknown = await client.call_tool("demo__nothing", {})
        sessions = await broker.services.store.list_sessions()
    assert not allowed.is_error
    assert unknown.is_error
    assert "denied (scope-missing)" in str(unknown.content)
    assert sessions == []


def test_the_broker_bench_runs_all_three_targets_and_prices_recording(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`make bench`'s shape: direct, mediation and broker series, their ratios, recording's cost."""
    argv = ["--calls", "4", "--rounds", "1", "--concurrency", "1", "--warmup", "1", "--json"]
    assert bench_main(argv) in (0, 1)  # the figures themselves are the bench's, not a test's
    document = json.loads(capsys.readouterr().out)
    assert sorted(s["target"] for s in document["series"]) == ["broker", "direct", "mediation"]
    assert all(s["calls"] == 4 for s in document["series"])
    assert [(r["target"], r["checked"]) for r in document["ratios"]] == [
        ("broker", False),
        ("mediation", True),
    ]
    [recording] = document["recording"]
    assert recording["concurrency"] == 1
    assert recording["checked"] is True
