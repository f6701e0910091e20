"""Prometheus metrics: a small in-process registry and the broker's metric set. Shell; stdlib.

No dependency: counters, gauges and histograms rendered in the Prometheus text format 0.0.4 at
``GET /metrics``. One `Metrics` object per broker process (built by `create_app`, kept on
``Services.metrics``); the pipeline calls its methods, which never raise and never block:

- ``observe_call(decision, reasons, overhead_s=..., downstream_s=...)`` once per mediated call:
  ``decision`` is ``"allowed"``/``"denied"`` (or a bool), ``reasons`` the decision's reasons,
  ``overhead_s`` the broker's own time (total minus downstream), ``downstream_s`` the connector's
  time, or None when nothing was forwarded.
- ``store_write_failed(events=1)`` when a recorder batch (or any store write on the call path)
  fails; ``session_opened()`` / ``session_closed()`` around each recorded session;
  ``agent_status_changed(status)`` after a quarantine, disable or release (the admin API calls
  it); ``token_issued(grant)`` per minted token (``client_credentials``, ``token_exchange`` or
  ``admin``).

Cardinality: every label has a closed set of values. ``decision``: allowed, denied. ``reason``:
the decision vocabulary (`broker.core.decision.Reason`); anything else is counted as ``other``.
``status``: the agent statuses. ``grant``: the three above, else ``other``. No agent id, token,
task, tool or connector name, and no argument value is ever a label: those belong in the record.
At scrape time, when a store is given, ``broker_agents{status}`` counts agents by status.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broker.core.decision import Reason
from broker.core.identity import AgentStatus

__all__ = [
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "Metrics",
    "Registry",
    "metrics_routes",
]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_DECISIONS = frozenset({"allowed", "denied"})
_REASONS = frozenset(r.value for r in Reason)
_STATUSES = frozenset(s.value for s in AgentStatus)
_GRANTS = frozenset({"client_credentials", "token_exchange", "admin"})

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: LabelValues, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labels)

    def _key(self, values: Sequence[str]) -> LabelValues:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        return tuple(values)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {}
        if not self.labelnames:
            self.values[()] = 0.0

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.labelnames, k)} {_number(v)}"
            for k, v in sorted(self.values.items())
        ]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        self.values[self._key(labels)] = value

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) - amount

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labels)
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError("buckets must be given in increasing order")
        self.buckets = tuple(buckets)
        self.series: dict[LabelValues, tuple[list[int], list[float]]] = {}
        """Per label set: counts per bucket (non-cumulative, +Inf last) and [sum]."""

    def observe(self, value: float, *labels: str) -> None:
        if not math.isfinite(value) or value < 0:
            return
        key = self._key(labels)
        counts, total = self.series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        total[0] += value

    def count(self, *labels: str) -> int:
        found = self.series.get(self._key(labels))
        return 0 if found is None else sum(found[0])

    def lines(self) -> list[str]:
        out: list[str] = []
        for key, (counts, total) in sorted(self.series.items()):
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                le = f'le="{_number(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(total[0])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {running}")
        return out


Collector = Callable[[], Awaitable[None]]
_M = TypeVar("_M", bound=_Metric)


class Registry:
    """Metrics in registration order, plus async collectors run before each scrape."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []
        self.collectors: list[Collector] = []

    def add(self, metric: _M) -> _M:
        if any(m.name == metric.name for m in self.metrics):
            raise ValueError(f"metric {metric.name} is registered twice")
        self.metrics.append(metric)
        return metric

    async def collect(self) -> None:
        for collector in self.collectors:
            try:
                await collector()
            except Exception:
                # A scrape must not fail because one collector did; its gauges keep their
                # last value.
                logger.exception("metrics collector failed")

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines += metric.header()
            lines += metric.lines()
        return "\n".join(lines) + "\n"


def _bounded(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else "other"


class Metrics:
    """The broker's metrics (see the module docstring for the calling API)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.calls = r.add(
            Counter("broker_calls_total", "Mediated calls by decision.", ["decision"])
        )
        self.reasons = r.add(
            Counter(
                "broker_decision_reasons_total",
                "Reasons given by decisions (a decision may give several).",
                ["decision", "reason"],
            )
        )
        self.overhead = r.add(
            Histogram(
                "broker_call_overhead_seconds",
                "Time the broker itself spent on a call (downstream time excluded).",
                ["decision"],
            )
        )
        self.downstream = r.add(
            Histogram("broker_downstream_seconds", "Time connectors took on forwarded calls.")
        )
        self.store_failures = r.add(
            Counter("broker_store_write_failures_total", "Events the store failed to write.")
        )
        self.active_sessions = r.add(
            Gauge("broker_active_sessions", "Recorded sessions open in this process.")
        )
        self.status_changes = r.add(
            Counter(
                "broker_agent_status_changes_total",
                "Agent status changes (quarantines, disables, releases) made here.",
                ["status"],
            )
        )
        self.agents = r.add(Gauge("broker_agents", "Registered agents by status.", ["status"]))
        self.tokens = r.add(
            Counter("broker_tokens_issued_total", "Capability tokens issued.", ["grant"])
        )

    # the pipeline's API

    def observe_call(
        self,
        decision: str | bool,
        reasons: Iterable[str] = (),
        *,
        overhead_s: float,
        downstream_s: float | None = None,
    ) -> None:
        """One mediated call: its decision, reasons and where its time went."""
        if isinstance(decision, bool):
            label = "allowed" if decision else "denied"
        else:
            label = _bounded(str(decision), _DECISIONS)
        self.calls.inc(label)
        for reason in set(reasons):
            self.reasons.inc(label, _bounded(str(reason), _REASONS))
        self.overhead.observe(overhead_s, label)
        if downstream_s is not None:
            self.downstream.observe(downstream_s)

    def store_write_failed(self, events: int = 1) -> None:
        self.store_failures.inc(amount=max(0, events))

    def session_opened(self) -> None:
        self.active_sessions.inc()

    def session_closed(self) -> None:
        self.active_sessions.dec()

    def agent_status_changed(self, status: str) -> None:
        self.status_changes.inc(_bounded(str(status), _STATUSES))

    def token_issued(self, grant: str) -> None:
        self.tokens.inc(_bounded(grant, _GRANTS))

    # scraping

    def watch_store(self, store: Any) -> None:
        """Count agents by status from ``store`` at every scrape."""

        async def count_agents() -> None:
            counts = dict.fromkeys(sorted(_STATUSES), 0)
            for agent in await store.list_agents():
                counts[agent.status.value] = counts.get(agent.status.value, 0) + 1
            for status, n in counts.items():
                self.agents.set(n, status)

        self.registry.collectors.append(count_agents)

    async def scrape(self) -> str:
        await self.registry.collect()
        return self.registry.render()


def metrics_routes(metrics: Metrics) -> list[BaseRoute]:
    """``GET /metrics`` in the Prometheus text format (no credentials: nothing secret is in it)."""

    async def endpoint(request: Request) -> Response:
        return Response(
            await metrics.scrape(),
            headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"},
        )

    return [Route("/metrics", endpoint, methods=["GET"])]
