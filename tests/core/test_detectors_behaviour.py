"""Denials, rate, profile, loops and token misuse, driven through the engine one call at a time."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.decision import Reason
from broker.core.detectors import (
    DetectorBook,
    DetectorsConfig,
    Observation,
    Response,
    ResultObservation,
    Verdict,
    declarations,
)
from scopes import Label

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
PRIVATE = frozenset({Label.PRIVATE})
EGRESS = frozenset({Label.EGRESS})


def obs(n: int = 0, **kw: Any) -> Observation:
    base = Observation(
        decision_id=f"d{n}",
        agent_id="agent-a",
        jti="jti-1",
        task_id="task-1",
        session_id="s1",
        client_fingerprint="fp-a",
        category="files:read",
        connector="files",
        tool="read_text_file",
        arguments={"path": f"/srv/workspace/{n}.md"},
        labels=PRIVATE,
        allowed=True,
    )
    return replace(base, **kw)


def denied(n: int, reason: Reason = Reason.CONSTRAINT_VIOLATED, **kw: Any) -> Observation:
    return obs(n, allowed=False, labels=frozenset(), reasons=frozenset({reason}), **kw)


def config(**groups: Any) -> DetectorsConfig:
    return DetectorsConfig.model_validate(groups)


def fired(verdict: Verdict) -> set[str]:
    return {s.detector.value for s in verdict.signals}


def feed(
    book: DetectorBook, calls: list[Observation], every: float = 1.0, start: float = 0.0
) -> list[Verdict]:
    return [
        book.precheck(o, T0 + timedelta(seconds=start + i * every)) for i, o in enumerate(calls)
    ]


# denials and probing


def test_ten_policy_denials_within_a_minute_are_a_burst() -> None:
    book = DetectorBook(config())
    verdicts = feed(book, [denied(i, Reason.SCOPE_MISSING, tool=f"t{i}") for i in range(10)])
    assert all(not v.signals for v in verdicts[:9])
    assert fired(verdicts[9]) == {"denial-burst"}
    assert verdicts[9].action is Response.QUARANTINE_AGENT
    assert verdicts[9].signals[0].refs[-1] == "d9"


def test_denials_spread_beyond_the_window_and_transient_failures_are_no_burst() -> None:
    book = DetectorBook(config())
    spread = feed(book, [denied(i, tool=f"t{i}") for i in range(10)], every=7.0)
    transient = feed(book, [denied(20 + i, Reason.UPSTREAM_TIMEOUT) for i in range(20)], start=1000)
    assert not any(v.signals for v in spread + transient)


def test_near_miss_retries_of_a_refused_call_are_probing_even_when_one_gets_through() -> None:
    book = DetectorBook(config())
    paths = ["/srv/w/../etc/shadow", "/srv/w/..%2fetc/shadow", "/srv/w/./../etc/shadow"]
    verdicts = feed(book, [denied(i, arguments={"path": p}) for i, p in enumerate(paths)])
    through = book.precheck(
        obs(9, arguments={"path": "/srv/w/lnk/etc/shadow"}), T0 + timedelta(seconds=5)
    )
    assert not any(v.signals for v in verdicts)
    assert fired(through) == {"probing"}
    assert through.blocks
    assert set(through.signals[0].refs) >= {"d0", "d9"}


def test_an_identical_retry_or_a_different_tool_is_no_near_miss() -> None:
    book = DetectorBook(config())
    again = [denied(i, arguments={"path": "/etc/shadow"}) for i in range(3)]
    other = [denied(5 + i, tool=f"other{i}", arguments={"path": "/etc/shadow"}) for i in range(3)]
    unlike = [obs(10 + i, arguments={"q": "completely different " * (i + 1)}) for i in range(3)]
    assert not any(v.signals for v in feed(book, again + other + unlike))


# rate


def test_a_new_agent_is_held_to_the_floor_and_a_flood_hits_the_cap() -> None:
    book = DetectorBook(config(rate={"spike_floor_per_minute": 10, "cap_per_minute": 20}))
    verdicts = feed(book, [obs(i) for i in range(25)], every=0.5)
    assert next(i for i, v in enumerate(verdicts) if "rate-spike" in fired(v)) == 10
    assert next(i for i, v in enumerate(verdicts) if "rate-cap" in fired(v)) == 20
    assert verdicts[20].action is Response.REVOKE_TOKEN


def test_an_agents_own_baseline_raises_the_spike_threshold_and_idle_minutes_decay_it() -> None:
    cfg = config(rate={"spike_floor_per_minute": 10, "spike_factor": 4.0, "ewma_alpha": 0.1})
    book = DetectorBook(cfg)
    busy = [obs(m * 100 + i) for m in range(3) for i in range(5)]
    verdicts = [
        book.precheck(o, T0 + timedelta(minutes=i // 5, seconds=(i % 5) * 12))
        for i, o in enumerate(busy)
    ]
    assert not any(v.signals for v in verdicts)
    # Minute 4: the baseline is minutes 0-2 (5 a minute), lowered by the idle minute 3.
    burst = feed(book, [obs(1000 + i) for i in range(19)], every=1.0, start=240)
    assert not any(v.signals for v in burst[:18])
    assert fired(burst[18]) == {"rate-spike"}
    assert dict(burst[18].signals[0].values)["threshold"] == pytest.approx(18.0)
    later = feed(book, [obs(3000 + i) for i in range(11)], every=1.0, start=3840)
    assert not any(v.signals for v in later[:10])
    assert fired(later[10]) == {"rate-spike"}


def test_a_flood_is_judged_against_the_same_threshold_wherever_it_starts_in_the_minute() -> None:
    """The flood's own calls never raise the threshold it is judged against.

    A steady agent (12 calls a minute for five minutes) floods at 400 a minute, starting at
    every second of a minute in turn. Wherever the minute turns over, the threshold is at most
    ``8 x 12`` (lower where a quiet minute before the flood decays the baseline), so the flood
    is stopped within about 100 calls: sooner where the steady calls of the minute before still
    count in the sliding window, a few later where the flood straddles the turn of the minute
    (the estimate spreads the previous minute's calls evenly over it). Learning the flood's
    first minute as the baseline would let it run to the 300-a-minute cap.
    """
    stops: set[int] = set()
    thresholds: set[float] = set()
    for phase in range(60):
        book = DetectorBook(config())
        feed(book, [obs(i) for i in range(60)], every=5.0)
        flood = feed(book, [obs(1000 + i) for i in range(200)], every=0.15, start=300 + phase)
        first = next(i for i, v in enumerate(flood) if "rate-spike" in fired(v))
        stops.add(first + 1)
        thresholds.add(float(dict(flood[first].signals[0].values)["threshold"]))
    assert max(thresholds) == 96.0
    assert max(stops) <= 104


def test_a_minute_that_fired_is_not_learned_so_a_sustained_flood_stays_abnormal() -> None:
    book = DetectorBook(config(rate={"cap_per_minute": 10_000}))
    feed(book, [obs(i) for i in range(60)], every=5.0)
    flood = feed(book, [obs(1000 + i) for i in range(4000)], every=0.15, start=300)
    assert all("rate-spike" in fired(v) for v in flood[100:])


def test_a_clock_stepping_back_counts_in_the_current_minute() -> None:
    book = DetectorBook(config(rate={"spike_floor_per_minute": 2}))
    feed(book, [obs(0), obs(1)], start=120)
    assert fired(book.precheck(obs(2), T0)) == {"rate-spike"}


@settings(max_examples=50, deadline=None)
@given(gaps=st.lists(st.floats(0, 120), min_size=1, max_size=80))
def test_no_rate_signal_while_every_minute_stays_under_the_floor(gaps: list[float]) -> None:
    book = DetectorBook(config(rate={"spike_floor_per_minute": 30}))
    now = T0
    seen: dict[int, int] = {}
    for i, gap in enumerate(gaps):
        now += timedelta(seconds=gap)
        minute = int(now.timestamp() // 60)
        seen[minute] = seen.get(minute, 0) + 1
        verdict = book.precheck(obs(i), now)
        if seen[minute] + seen.get(minute - 1, 0) <= 30:
            assert "rate-spike" not in fired(verdict)


# profile


def test_an_experienced_profile_flags_a_new_tool_and_holds_a_first_high_risk_one() -> None:
    book = DetectorBook(config(profile={"min_calls": 5, "high_risk_tools": ["shell/*"]}))
    feed(book, [obs(i) for i in range(5)])
    other = book.precheck(obs(10, tool="list_directory"), T0 + timedelta(seconds=10))
    shell = book.precheck(obs(11, connector="shell", tool="exec"), T0 + timedelta(seconds=11))
    again = book.precheck(obs(12, connector="shell", tool="exec"), T0 + timedelta(seconds=12))
    assert fired(other) == {"off-profile"}
    assert other.action is Response.RECORD
    assert dict(other.signals[0].values)["new_connector"] is False
    assert fired(shell) == {"off-profile", "high-risk-first-use"}
    assert shell.blocks
    assert again.blocks, "a held call is not learnt"
    relearnt = book.precheck(obs(13, tool="list_directory"), T0 + timedelta(seconds=13))
    assert not relearnt.signals


def test_a_declared_tool_a_young_agent_and_a_new_category_are_not_held() -> None:
    book = DetectorBook(config(profile={"min_calls": 5}))
    young = book.precheck(obs(0, connector="mail", tool="send", labels=EGRESS), T0)
    feed(book, [obs(i) for i in range(1, 6)])
    declared = declarations(({"type": "tool_call", "connector": "web", "tools": ["post"]},))
    named = book.precheck(
        obs(8, connector="web", tool="post", labels=EGRESS, declared=declared),
        T0 + timedelta(seconds=8),
    )
    fresh = book.precheck(obs(9, category="other", tool="write_file"), T0 + timedelta(seconds=9))
    assert not young.signals
    assert fired(named) == {"off-profile"}
    assert not named.blocks
    assert not fresh.signals


def test_profiles_stay_within_their_bounds() -> None:
    cfg = config(profile={"min_calls": 1, "max_categories": 2, "max_tools": 2})
    book = DetectorBook(cfg)
    calls = [
        obs(i, category=f"c{i % 3}", tool=f"t{i % 4}", connector=f"k{i % 5}") for i in range(30)
    ]
    feed(book, calls)
    state = book.agents.get("agent-a")
    assert state is not None
    assert len(state.profile.profiles) == 2
    assert all(len(p.tools) <= 2 and len(p.connectors) <= 2 for p in state.profile.profiles)
    assert len(state.profile.seen) <= 2


def test_alternating_categories_each_keep_their_profile() -> None:
    book = DetectorBook(config(profile={"min_calls": 3}))
    verdicts = feed(book, [obs(i, category=f"c{i % 2}") for i in range(12)])
    assert not any(v.signals for v in verdicts)
    state = book.agents.get("agent-a")
    assert state is not None
    assert [p.calls for p in state.profile.profiles] == [6, 6]


# loops and budget


def test_the_same_call_repeated_within_the_window_is_a_loop() -> None:
    book = DetectorBook(config(loops={"max_repeats": 3, "window_seconds": 10}))
    slow = feed(book, [obs(i, arguments={"path": "/a"}) for i in range(4)], every=6.0)
    fast = feed(book, [obs(10 + i, arguments={"path": "/b"}) for i in range(3)], start=100)
    assert not any(v.signals for v in slow)
    assert fired(fast[2]) == {"repeated-call"}
    assert fast[2].signals[0].refs == ("d10", "d11", "d12")


def test_bytes_past_the_read_budget_hold_every_later_call_of_the_task() -> None:
    book = DetectorBook(config(loops={"read_budget_bytes": 1000}))
    results = []
    for i in range(3):
        book.precheck(obs(i), T0)
        res = ResultObservation(
            f"d{i}", "agent-a", "task-1", "files", "x", PRIVATE, result_bytes=400
        )
        results.append(book.observe_result(res, T0))
    assert [fired(v) for v in results] == [set(), set(), {"read-budget"}]
    assert results[2].action is Response.BLOCK_CALL
    after = book.precheck(obs(9), T0)
    assert fired(after) == {"read-budget"}
    assert after.signals[0].refs == ("d2", "d9")
    other_task = book.precheck(obs(10, task_id="task-2"), T0)
    assert not other_task.signals


# token misuse


def test_a_token_from_a_second_client_is_revoked_and_every_client_is_kept_up_to_a_bound() -> None:
    book = DetectorBook(config())
    verdicts = feed(book, [obs(i, client_fingerprint=f"fp-{i % 6}") for i in range(12)])
    assert not verdicts[0].signals
    assert not verdicts[6].signals, "the holder's own client"
    assert all(fired(v) == {"token-shared"} for i, v in enumerate(verdicts) if i % 6)
    assert verdicts[1].action is Response.REVOKE_TOKEN
    token = book.tokens.get("jti-1")
    assert token is not None
    assert len(token.fingerprints) == 4


def test_a_call_after_its_task_closed_revokes_the_task() -> None:
    book = DetectorBook(config())
    book.precheck(obs(0), T0)
    book.close_task("task-1", "close-1")
    book.close_task("task-1", "close-2")
    verdict = book.precheck(obs(1), T0)
    assert fired(verdict) == {"task-closed-use"}
    assert verdict.signals[0].refs == ("close-1", "d1")
    assert verdict.action is Response.REVOKE_TASK
