"""The scenario corpus through the pure engine: benign work is never held, attacks are stopped."""

from __future__ import annotations

from datetime import timedelta

import pytest

from broker.core.detectors import Response
from tests.scenarios.corpus import ATTACKS, BENIGN, Call, Script
from tests.scenarios.driver import T0, corpus_config, run


def test_the_corpus_holds_at_least_ten_benign_workloads_and_ten_attacks() -> None:
    assert len(BENIGN) >= 10
    assert len(ATTACKS) >= 10
    assert len({s.name for s in (*BENIGN, *ATTACKS)}) == len(BENIGN) + len(ATTACKS)
    assert all(any(isinstance(x, Call) and x.attack for x in s.steps) for s in ATTACKS)


@pytest.mark.parametrize("script", BENIGN, ids=lambda s: s.name)
def test_benign_workload_is_never_blocked_revoked_or_quarantined(script: Script) -> None:
    result = run(script, until_stop=False)
    assert [s.detector.value for s in result.enforced] == []
    assert all(v.action is Response.RECORD for _, _, v in result.verdicts)


@pytest.mark.parametrize("script", ATTACKS, ids=lambda s: s.name)
def test_attack_is_stopped_within_its_bound_by_the_expected_detector(script: Script) -> None:
    result = run(script)
    assert result.stopped_at is not None, "never stopped"
    assert script.stop_within is not None
    assert result.stopped_at <= script.stop_within
    assert result.stop is not None
    fired = {s.detector.value for s in result.stop.signals if s.response is not Response.RECORD}
    assert set(script.expect) <= fired
    for signal in result.stop.signals:
        assert signal.refs, "every signal names the events that triggered it"


def test_every_script_holds_wherever_it_starts_in_the_minute() -> None:
    """Rates are counted per clock minute, so a script must not depend on where it starts.

    Each script is replayed starting at every second of a minute: attacks are still stopped
    within their bound, benign workloads are still never held.
    """
    misses: list[str] = []
    for phase in range(60):
        start = T0 + timedelta(seconds=phase)
        for script in BENIGN:
            if run(script, until_stop=False, start=start).enforced:
                misses.append(f"{script.name} held at +{phase}s")
        for script in ATTACKS:
            stopped = run(script, start=start).stopped_at
            if stopped is None or stopped > (script.stop_within or 0):
                misses.append(f"{script.name} stopped at {stopped} at +{phase}s")
    assert misses == []


@pytest.mark.parametrize("script", ATTACKS, ids=lambda s: s.name)
def test_in_shadow_mode_attacks_are_recorded_with_what_would_have_happened(script: Script) -> None:
    result = run(script, corpus_config(shadow=True), until_stop=False)
    assert result.enforced == []
    would = {
        s.detector.value for s in result.signals if s.shadow and s.would is not Response.RECORD
    }
    assert set(script.expect) <= would


def test_an_injected_victim_is_blocked_but_not_quarantined_unless_configured() -> None:
    script = next(s for s in ATTACKS if s.name == "a15-injected-victim-exfiltrates")
    default = run(script).stop
    assert default is not None
    assert default.action is Response.BLOCK_CALL
    strict = run(script, corpus_config(untrusted_max_response="quarantine-agent"))
    assert strict.stop is not None
    assert strict.stop.action is Response.QUARANTINE_AGENT


def test_corpus_report(capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["attack                                        stopped-at  bound  by"]
    for script in ATTACKS:
        r = run(script)
        assert r.stop is not None
        by = ",".join(f"{s.detector}:{s.response}" for s in r.stop.signals if s.response.rank)
        lines.append(f"{script.name:<46}{r.stopped_at!s:>10}{script.stop_within!s:>7}  {by}")
    flags = sum(len(run(s, until_stop=False).signals) for s in BENIGN)
    lines.append(
        f"benign: {len(BENIGN)} workloads, 0 blocked/revoked/quarantined, {flags} record-only flags"
    )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
