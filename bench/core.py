"""`make bench`, part two: what the pure core costs per call, with no I/O around it.

    python -m bench.core [--json]

* ``decide()`` for a token with ten grants (each with a ``within`` and a ``one_of`` constraint),
  the call allowed by the last grant: the policy's worst case.
* every detector together, per call: ``precheck`` on 5,000 calls of 50 agents (one in 25
  refused, one in ten an egress), a secret watched from an earlier read, and
  ``observe_result`` for each call that was allowed.

Each figure is the best of a few rounds (the least disturbed by the rest of the machine), with
a yardstick beside it: one canonical JSON encoding of the same arguments, to read the figures
against how fast this machine is right now.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.core.decision import Reason
from broker.core.detectors import DetectorBook, DetectorsConfig, Observation, ResultObservation
from broker.core.pinning import PinStatus
from broker.core.policy import AccessRequest, TokenPolicy, decide
from scopes import Label
from scopes.definitions import parse_scope_toml

__all__ = ["decide_cost_us", "detectors_cost_us", "main"]

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ROUNDS = 5


def _best_us(run: Callable[[], int], rounds: int = ROUNDS) -> float:
    """The best per-item time of ``run`` (which returns how many items it did), in µs."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        n = run()
        best = min(best, (time.perf_counter() - started) / n * 1e6)
    return best


def decide_cost_us(calls: int = 2000) -> float:
    """``decide()`` per call for a token with ten grants, µs."""
    toml = "\n".join(
        f"""
[[scope]]
name = "s{i}"
[[scope.grant]]
connector = "c{i}"
tools = ["t_*", "u{i}"]
args = {{ path = {{ within = "/srv/ws{i}" }}, mode = {{ one_of = ["r", "w"] }} }}
"""
        for i in range(10)
    )
    policy = TokenPolicy(parse_scope_toml(toml, source="bench.toml"))
    request = AccessRequest(
        "dec_x",
        "c9",
        "t_read",
        {"path": "/srv/ws9/a/b.txt", "mode": "r"},
        policy,
        PinStatus.APPROVED,
    )
    if not decide(request).decision.allowed:
        raise RuntimeError("the bench's request should be allowed")

    def run() -> int:
        for _ in range(calls):
            decide(request)
        return calls

    return _best_us(run)


def _observations(n: int) -> list[Observation]:
    base = Observation(
        decision_id="d0",
        agent_id="agent-0",
        jti="jti-0",
        task_id="task-0",
        session_id="s0",
        client_fingerprint="fp-a",
        category="c",
        connector="files",
        tool="read",
        arguments={},
        labels=frozenset({Label.PRIVATE}),
        allowed=True,
    )
    return [
        replace(
            base,
            decision_id=f"d{i}",
            agent_id=f"agent-{i % 50}",
            task_id=f"task-{i % 50}",
            jti=f"jti-{i % 50}",
            arguments={"path": f"/srv/workspace/project/src/module_{i}.py", "max_bytes": 65536},
            allowed=i % 25 != 0,
            reasons=frozenset() if i % 25 else frozenset({Reason.CONSTRAINT_VIOLATED}),
            labels=frozenset({Label.EGRESS}) if i % 10 == 0 else frozenset({Label.PRIVATE}),
        )
        for i in range(n)
    ]


def detectors_cost_us(calls: int = 5000) -> float:
    """Every detector together per call (``precheck``, and ``observe_result`` when allowed), µs."""
    observations = _observations(calls)
    nows = [T0 + timedelta(seconds=i * 0.5) for i in range(calls)]

    def run() -> int:
        book = DetectorBook(DetectorsConfig())
        book.observe_result(
            ResultObservation(
                "d-secret",
                "agent-0",
                "task-0",
                "files",
                "read",
                frozenset({Label.PRIVATE}),
                secrets=("sk_live_51HqLyjWDarjtT1zdp7dcXa9Qm",),
            ),
            T0,
        )
        for o, now in zip(observations, nows, strict=True):
            book.precheck(o, now)
            if o.allowed:
                book.observe_result(
                    ResultObservation(
                        o.decision_id,
                        o.agent_id,
                        o.task_id,
                        o.connector,
                        o.tool,
                        o.labels,
                        result_bytes=512,
                    ),
                    now,
                )
        return calls

    return _best_us(run, rounds=3)


def yardstick_us(arguments: Sequence[Mapping[str, Any]]) -> float:
    """One canonical JSON encoding of a call's arguments, µs: how fast the machine is now."""

    def run() -> int:
        for a in arguments:
            json.dumps(a, sort_keys=True, separators=(",", ":"))
        return len(arguments)

    return _best_us(run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.core", description="What the pure core costs per call."
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    options = parser.parse_args(argv)
    figures = {
        "decide_us_ten_grants": round(decide_cost_us(), 2),
        "detectors_us_per_call": round(detectors_cost_us(), 2),
        "json_yardstick_us": round(yardstick_us([o.arguments for o in _observations(1000)]), 2),
    }
    if options.json:
        print(json.dumps(figures, indent=2))
        return 0
    print("pure core, per call (best of several rounds):")
    print(f"  decide(), token with ten grants   {figures['decide_us_ten_grants']:8.1f} µs")
    print(f"  every detector together           {figures['detectors_us_per_call']:8.1f} µs")
    print(f"  yardstick: one canonical JSON     {figures['json_yardstick_us']:8.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
