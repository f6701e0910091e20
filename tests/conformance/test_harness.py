"""The harness's own logic: reading checks.json results and comparing a leg with its baseline."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conformance.harness import (
    CheckOutcome,
    ScenarioOutcome,
    SuiteReport,
    baseline_problems,
    parse_results,
)


def _report(**scenarios: str) -> SuiteReport:
    outcomes = {
        name: ScenarioOutcome(name, (CheckOutcome(f"{name}-check", status, "why"),))
        for name, status in scenarios.items()
    }
    return SuiteReport("http://x/mcp", "2026-07-28", outcomes, exit_code=0, output_tail="")


def test_results_are_read_per_scenario_from_timestamped_directories(tmp_path: Path) -> None:
    ok = tmp_path / "server-tools-list-2026-11-23T23-46-43-529Z"
    bad = tmp_path / "server-server-sse-polling-2026-11-23T23-46-44-000Z"
    for directory, status in ((ok, "SUCCESS"), (bad, "FAILURE")):
        directory.mkdir()
        checks = [
            {"id": "info", "status": "INFO"},
            {"id": "c", "status": status, "errorMessage": "m"},
        ]
        (directory / "checks.json").write_text(json.dumps(checks))

    outcomes = parse_results(tmp_path)

    assert sorted(outcomes) == ["server-sse-polling", "tools-list"]
    assert outcomes["tools-list"].passed
    assert not outcomes["server-sse-polling"].passed
    assert outcomes["server-sse-polling"].failures == (CheckOutcome("c", "FAILURE", "m"),)


def test_a_scenario_with_only_warnings_passes_but_one_without_any_success_does_not() -> None:
    report = _report(a="WARNING", b="SUCCESS")
    report_b = SuiteReport(
        "u",
        "v",
        {
            "a": ScenarioOutcome("a", (CheckOutcome("x", "SUCCESS"), CheckOutcome("y", "WARNING"))),
        },
        0,
        "",
    )

    assert report.failed == ["a"]
    assert report_b.passed == ["a"]


def test_a_leg_matching_its_baseline_has_no_problems() -> None:
    report = _report(a="SUCCESS", b="FAILURE")

    assert baseline_problems(report, ["a"], {"b": "known gap"}) == []


def test_new_failures_stale_expectations_missing_and_unknown_scenarios_are_problems() -> None:
    report = _report(new_fail="FAILURE", fixed="SUCCESS", surprise="SUCCESS")

    problems = baseline_problems(report, ["new_fail", "gone"], {"fixed": "was broken"})

    assert problems == [
        "gone: expected to run but wrote no results",
        "fixed: expected to fail (was broken) but passes",
        "new_fail: new failure: new_fail-check: why",
        "surprise: not in the baseline (passes); record it",
    ]
