"""Data flow: the lethal trifecta, and secrets echoed verbatim, hex or base64, whole or split."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.detectors import (
    DetectorBook,
    DetectorsConfig,
    Observation,
    Response,
    ResultObservation,
    Verdict,
    declarations,
)
from broker.core.detectors.secrets import CHUNK, SecretIndex, add_values
from scopes import Label

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
P = frozenset({Label.PRIVATE})
U = frozenset({Label.UNTRUSTED})
E = frozenset({Label.EGRESS})
UE = frozenset({Label.UNTRUSTED, Label.EGRESS})
SECRET = "ghp_R2d2C3poBB8Luke5kyWalker0042"
FLOW = declarations(({"type": "data_flow", "allow": ["private->egress"]},))


def obs(
    n: int, labels: frozenset[Label], args: dict[str, Any] | None = None, **kw: Any
) -> Observation:
    base = Observation(
        decision_id=f"d{n}",
        agent_id="agent-a",
        jti="jti-1",
        task_id="task-1",
        session_id="s1",
        client_fingerprint="fp-a",
        category="c",
        connector="web" if Label.EGRESS in labels else "files",
        tool="fetch" if Label.EGRESS in labels else "read",
        arguments=args if args is not None else {"n": n},
        labels=labels,
        allowed=True,
    )
    return replace(base, **kw)


def read(book: DetectorBook, n: int, *secrets: str, labels: frozenset[Label] = P) -> None:
    o = obs(n, labels)
    book.precheck(o, T0)
    book.observe_result(
        ResultObservation(
            o.decision_id, "agent-a", "task-1", o.connector, o.tool, labels, secrets=secrets
        ),
        T0,
    )


def send(book: DetectorBook, n: int, payload: Any, **kw: Any) -> Verdict:
    return book.precheck(
        obs(n, E, {"url": "https://x.example/", "body": payload}, **kw), T0 + timedelta(seconds=n)
    )


def fired(verdict: Verdict) -> set[str]:
    return {s.detector.value for s in verdict.signals}


def config(**flow: Any) -> DetectorsConfig:
    return DetectorsConfig.model_validate({"profile": {"enabled": False}, "flow": flow})


# the lethal trifecta


def test_egress_after_private_and_untrusted_input_is_blocked_not_quarantined() -> None:
    book = DetectorBook(config())
    read(book, 1)
    assert not send(book, 2, "hello").signals, "private then egress alone is not the trifecta"
    read(book, 3, labels=U)
    verdict = send(book, 4, "hello")
    assert fired(verdict) == {"lethal-trifecta"}
    assert verdict.action is Response.BLOCK_CALL
    assert verdict.signals[0].untrusted
    assert verdict.signals[0].refs == ("d1", "d3", "d4")


def test_a_declared_flow_lifts_the_trifecta_but_not_secret_echo() -> None:
    book = DetectorBook(config())
    read(book, 1, SECRET)
    read(book, 2, labels=U)
    assert not send(book, 3, "summary", declared=FLOW).signals
    assert fired(send(book, 4, SECRET, declared=FLOW)) == {"secret-echo"}


def test_taint_comes_from_calls_that_went_through_and_from_results() -> None:
    book = DetectorBook(config())
    book.precheck(obs(1, frozenset(), allowed=False), T0)
    book.observe_result(ResultObservation("d2", "agent-a", "task-1", "web", "get", U), T0)
    book.observe_result(ResultObservation("d3", "agent-a", "task-1", "files", "read", P), T0)
    book.observe_result(ResultObservation("d4", "agent-a", "task-1", "files", "read", P | U), T0)
    verdict = send(book, 5, "x")
    assert verdict.signals[0].refs == ("d3", "d2", "d5")


def test_configured_egress_tools_count_whatever_their_labels() -> None:
    book = DetectorBook(config(egress_tools=["chat/post_*"]))
    read(book, 1)
    read(book, 2, labels=U)
    verdict = book.precheck(obs(3, frozenset(), connector="chat", tool="post_message"), T0)
    assert fired(verdict) == {"lethal-trifecta"}


def test_a_refused_call_neither_taints_nor_is_checked() -> None:
    book = DetectorBook(config())
    read(book, 1)
    book.precheck(obs(2, U, allowed=False), T0)
    assert not send(book, 3, "x").signals
    read(book, 4, labels=U)
    assert not book.precheck(obs(5, E, allowed=False), T0).signals


# secret echo


def _b64(data: bytes, url: bool) -> str:
    return (base64.urlsafe_b64encode if url else base64.b64encode)(data).decode()


@settings(max_examples=200, deadline=None)
@given(
    secret=st.text(st.characters(min_codepoint=33, max_codepoint=0x24F), min_size=10, max_size=64),
    prefix=st.binary(max_size=5),
    suffix=st.binary(max_size=5),
    encoding=st.sampled_from(["verbatim", "hex", "HEX", "base64", "base64url", "percent"]),
)
def test_a_secret_read_earlier_is_found_in_egress_in_any_encoding_and_alignment(
    secret: str, prefix: bytes, suffix: bytes, encoding: str
) -> None:
    raw = prefix + secret.encode() + suffix
    payload = {
        "verbatim": lambda: f"x{secret}y",
        "hex": raw.hex,
        "HEX": lambda: raw.hex().upper(),
        "base64": lambda: _b64(raw, url=False),
        "base64url": lambda: _b64(raw, url=True),
        "percent": lambda: "".join(f"%{b:02X}" for b in secret.encode()),
    }[encoding]()
    book = DetectorBook(config())
    read(book, 1, secret)
    verdict = send(book, 2, {"nested": [payload]})
    assert fired(verdict) == {"secret-echo"}
    assert verdict.action is Response.QUARANTINE_AGENT
    shown = [str(v) for s in verdict.signals for _, v in s.values] + list(verdict.signals[0].refs)
    assert not any(secret in x for x in shown)


def test_split_exfiltration_adds_up_within_the_window_only() -> None:
    encoded = base64.b64encode(SECRET.encode()).decode()
    pieces = [encoded[i : i + 15] for i in range(0, len(encoded), 15)]
    book = DetectorBook(config())
    read(book, 1, SECRET)
    verdicts = [send(book, 10 + i, {"q": p, "n": i, "ok": True}) for i, p in enumerate(pieces)]
    first = next(i for i, v in enumerate(verdicts) if v.signals)
    assert 0 < first < len(pieces)
    assert dict(verdicts[first].signals[0].values)["calls"] == first + 1

    narrow = DetectorBook(config(split_window_calls=1))
    read(narrow, 1, SECRET)
    assert not any(send(narrow, 10 + i, {"q": p}).signals for i, p in enumerate(pieces))


def test_innocent_egress_passes_and_short_or_repeated_values_are_not_watched() -> None:
    book = DetectorBook(config())
    read(book, 1, SECRET, SECRET, "short")
    read(book, 2, SECRET)
    assert not send(book, 3, "nothing to see here, just a long sentence about weather").signals
    assert not send(book, 4, "short short short").signals
    task = book.tasks.get("task-1")
    assert task is not None
    assert len(task.flow.secrets.entries) == 1


def test_the_oldest_watched_values_are_dropped_beyond_the_bound() -> None:
    other = "pk_test_Z9y8X7w6V5u4T3s2R1q0ABCD"
    book = DetectorBook(config(max_secrets=1, match_fraction=1.0))
    read(book, 1, SECRET)
    assert not send(book, 2, SECRET[:CHUNK]).signals
    read(book, 3, other)
    assert not send(book, 4, SECRET).signals
    assert fired(send(book, 5, other)) == {"secret-echo"}


def test_a_value_too_short_to_cut_is_not_watched() -> None:
    empty = SecretIndex()
    assert add_values(empty, ("ab",), "d1", keep=4, min_chars=1, max_chars=64) is empty


def test_an_echo_after_untrusted_input_is_capped_unless_configured() -> None:
    book = DetectorBook(config())
    read(book, 1, SECRET)
    read(book, 2, labels=U)
    capped = send(book, 3, SECRET, declared=FLOW)
    assert capped.action is Response.BLOCK_CALL
    assert capped.signals[0].would is Response.BLOCK_CALL
    lifted = DetectorBook(
        DetectorsConfig.model_validate({"untrusted_max_response": "quarantine-agent"})
    )
    read(lifted, 1, SECRET)
    read(lifted, 2, labels=U)
    assert send(lifted, 3, SECRET, declared=FLOW).action is Response.QUARANTINE_AGENT


@pytest.mark.parametrize(
    "flow",
    [{"egress_tools": ["bad glob"]}, {"min_secret_chars": 40, "max_secret_chars": 20}, {"nope": 1}],
    ids=["bad-glob", "min-above-max", "unknown-key"],
)
def test_a_bad_flow_setting_is_refused(flow: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="flow"):
        DetectorsConfig.model_validate({"flow": flow})
