"""Detector values: what the pipeline feeds in and what comes back. Pure; stdlib and scopes only.

An `Observation` describes one call before it is forwarded (after the policy decision); a
`ResultObservation` describes its result. A `Verdict` carries the `Signal`s raised, each with the
response chosen for its detector, and answers the two questions the shell acts on: does the
current call go ahead (`blocks`), and what else must happen (`action`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from broker.core.decision import Reason
from scopes import JSONValue, Label

__all__ = [
    "SEVERITY",
    "Declarations",
    "DetectorId",
    "Flow",
    "Observation",
    "Response",
    "ResultObservation",
    "Severity",
    "Signal",
    "SignalValue",
    "Verdict",
    "declarations",
    "tool_key",
]

SignalValue = str | int | float | bool


class Response(StrEnum):
    """What to do about a signal, mildest first; each one includes those before it."""

    RECORD = "record"
    BLOCK_CALL = "block-call"
    REVOKE_TOKEN = "revoke-token"
    REVOKE_TASK = "revoke-task"
    QUARANTINE_AGENT = "quarantine-agent"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_most(self, cap: Response) -> Response:
        return self if self.rank <= cap.rank else cap


_RANK = {r: i for i, r in enumerate(Response)}


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class DetectorId(StrEnum):
    """One id per signal kind; each has its own response and shadow setting."""

    DENIAL_BURST = "denial-burst"
    PROBING = "probing"
    RATE_SPIKE = "rate-spike"
    RATE_CAP = "rate-cap"
    OFF_PROFILE = "off-profile"
    HIGH_RISK_FIRST_USE = "high-risk-first-use"
    LETHAL_TRIFECTA = "lethal-trifecta"
    SECRET_ECHO = "secret-echo"
    REPEATED_CALL = "repeated-call"
    READ_BUDGET = "read-budget"
    TOKEN_SHARED = "token-shared"
    TASK_CLOSED_USE = "task-closed-use"


SEVERITY: Mapping[DetectorId, Severity] = {
    DetectorId.DENIAL_BURST: Severity.MEDIUM,
    DetectorId.PROBING: Severity.HIGH,
    DetectorId.RATE_SPIKE: Severity.MEDIUM,
    DetectorId.RATE_CAP: Severity.HIGH,
    DetectorId.OFF_PROFILE: Severity.LOW,
    DetectorId.HIGH_RISK_FIRST_USE: Severity.HIGH,
    DetectorId.LETHAL_TRIFECTA: Severity.HIGH,
    DetectorId.SECRET_ECHO: Severity.CRITICAL,
    DetectorId.REPEATED_CALL: Severity.MEDIUM,
    DetectorId.READ_BUDGET: Severity.MEDIUM,
    DetectorId.TOKEN_SHARED: Severity.CRITICAL,
    DetectorId.TASK_CLOSED_USE: Severity.HIGH,
}

_FLOW_DETECTORS = frozenset({DetectorId.LETHAL_TRIFECTA, DetectorId.SECRET_ECHO})


class Flow(StrEnum):
    """A data flow a task token may declare (authorization_details ``type: data_flow``)."""

    PRIVATE_TO_EGRESS = "private->egress"


@dataclass(frozen=True, slots=True)
class Declarations:
    """What the task token declares: permitted flows, and tools named exactly (``conn/tool``)."""

    flows: frozenset[Flow] = frozenset()
    tools: frozenset[str] = frozenset()


def tool_key(connector: str, tool: str) -> str:
    return f"{connector}/{tool}"


def declarations(details: Sequence[Mapping[str, object]] | None) -> Declarations:
    """Read a token's declarations from its ``authorization_details``.

    ``{"type": "data_flow", "allow": ["private->egress"]}`` declares a flow; a ``tool_call``
    entry naming a tool without wildcards declares that tool (its first use is expected).
    Other types are ignored here (the token service validates them).

    Raises:
        ValueError: a ``data_flow`` entry whose ``allow`` is not a non-empty list of known flows,
            or that carries other keys.
    """
    flows: set[Flow] = set()
    tools: set[str] = set()
    for detail in details or ():
        kind = detail.get("type")
        if kind == "data_flow":
            flows.update(_data_flow(detail))
        elif kind == "tool_call":
            connector = detail.get("connector")
            names = detail.get("tools")
            if isinstance(connector, str) and isinstance(names, list):
                tools.update(
                    tool_key(connector, n)
                    for n in names  # pyright: ignore[reportUnknownVariableType]
                    if isinstance(n, str) and "*" not in n and "?" not in n
                )
    return Declarations(frozenset(flows), frozenset(tools))


def _data_flow(detail: Mapping[str, object]) -> set[Flow]:
    allow = detail.get("allow")
    if set(detail) != {"type", "allow"} or not isinstance(allow, list) or not allow:
        raise ValueError('a data_flow detail is {"type": "data_flow", "allow": [flows]}')
    known = {f.value: f for f in Flow}
    out: set[Flow] = set()
    for item in allow:  # pyright: ignore[reportUnknownVariableType]
        if not isinstance(item, str) or item not in known:
            raise ValueError(f"a data_flow allows only {sorted(known)}")
        out.add(known[item])
    return out


@dataclass(frozen=True, slots=True)
class Observation:
    """One call as the mediation pipeline sees it after the policy decision, before forwarding.

    ``arguments`` are the canonical arguments the policy checked (for a denied call, the
    arguments as received); ``labels`` are the allowing scope's (empty on a denial);
    ``client_fingerprint`` is an opaque string the shell derives from the client (for example a
    hash of the client info and address) and ``category`` the task's purpose category
    (`purpose_category`).
    """

    decision_id: str
    agent_id: str
    jti: str
    task_id: str
    session_id: str
    client_fingerprint: str
    category: str
    connector: str
    tool: str
    arguments: Mapping[str, JSONValue]
    labels: frozenset[Label]
    allowed: bool
    reasons: frozenset[Reason] = frozenset()
    declared: Declarations = field(default_factory=Declarations)

    @property
    def key(self) -> str:
        return tool_key(self.connector, self.tool)


@dataclass(frozen=True, slots=True)
class ResultObservation:
    """The result of a forwarded call: its size, and the values the shell wants watched.

    ``secrets`` are the secret-looking values the result carried (the shell passes them for
    reads from ``private`` scopes); they are kept in memory only to recognise them in later
    egress arguments and never appear in a signal.
    """

    decision_id: str
    agent_id: str
    task_id: str
    connector: str
    tool: str
    labels: frozenset[Label]
    ok: bool = True
    result_bytes: int = 0
    secrets: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class Signal:
    """One detector firing: what it saw, on which events, and what it does about it.

    ``would`` is the response the detector's configuration asks for (after the cap on signals
    that may come from untrusted content); ``response`` is what takes effect: ``record`` in
    shadow mode, else ``would``. ``values`` never hold argument values or secrets.
    """

    detector: DetectorId
    values: tuple[tuple[str, SignalValue], ...]
    refs: tuple[str, ...]
    would: Response = Response.RECORD
    response: Response = Response.RECORD
    shadow: bool = False
    untrusted: bool = False
    """Raised in a task that had taken in ``untrusted`` content."""

    @property
    def severity(self) -> Severity:
        return SEVERITY[self.detector]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The signals raised for one call or result, with the responses that take effect."""

    signals: tuple[Signal, ...] = ()

    @property
    def action(self) -> Response:
        """The strongest response in effect (``record`` when nothing fired)."""
        best = Response.RECORD
        for s in self.signals:
            if s.response.rank > best.rank:
                best = s.response
        return best

    @property
    def blocks(self) -> bool:
        """Whether the current call must not be forwarded (any response above ``record``)."""
        return self.action is not Response.RECORD

    @property
    def reason(self) -> Reason | None:
        """The denial reason for a blocked call: ``flow-blocked`` or ``anomaly-blocked``."""
        enforced = [s for s in self.signals if s.response is not Response.RECORD]
        if not enforced:
            return None
        if any(s.detector in _FLOW_DETECTORS for s in enforced):
            return Reason.FLOW_BLOCKED
        return Reason.ANOMALY_BLOCKED

    @property
    def detectors(self) -> tuple[str, ...]:
        """Detector ids, for ``Decision.rule_ids``."""
        return tuple(s.detector.value for s in self.signals)
