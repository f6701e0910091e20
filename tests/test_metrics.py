"""Metrics: the registry's text format, bounded labels, and /metrics over real HTTP."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import anyio
import httpx2
import pytest
from starlette.applications import Starlette

from broker.admin import AdminActions
from broker.admin_tokens import create_admin_token
from broker.app import Services, create_app
from broker.config import BrokerConfig, ServerConfig, StoreConfig, TokenConfig
from broker.core.identity import AdminRole, AgentStatus
from broker.metrics import CONTENT_TYPE, Counter, Histogram, Metrics, Registry, metrics_routes
from broker.store.testing import make_agent, migrated_store, sqlite_url
from broker.testing import serve_app

SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\\n]|\\.)*",?)*\})? [-+0-9.eInf]+$')


def samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        assert SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def test_a_counter_renders_help_type_and_one_line_per_label_set() -> None:
    registry = Registry()
    c = registry.add(Counter("x_total", "Things.", ["kind"]))
    c.inc("b")
    c.inc("a", amount=2)
    assert registry.render() == (
        '# HELP x_total Things.\n# TYPE x_total counter\nx_total{kind="a"} 2\nx_total{kind="b"} 1\n'
    )


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    registry = Registry()
    h = registry.add(Histogram("lat_seconds", "Latency.", buckets=[0.1, 1.0]))
    for value in (0.05, 0.5, 0.5, 3.0):
        h.observe(value)
    h.observe(float("nan"))
    h.observe(-1)
    got = samples(registry.render())
    assert got['lat_seconds_bucket{le="0.1"}'] == 1
    assert got['lat_seconds_bucket{le="1"}'] == 3
    assert got['lat_seconds_bucket{le="+Inf"}'] == 4
    assert got["lat_seconds_count"] == 4
    assert got["lat_seconds_sum"] == pytest.approx(4.05)


def test_label_values_are_escaped() -> None:
    registry = Registry()
    registry.add(Counter("odd_total", "Odd.", ["v"])).inc('a"b\\c\nd')
    assert 'odd_total{v="a\\"b\\\\c\\nd"} 1' in registry.render()


def test_registering_a_name_twice_is_an_error() -> None:
    registry = Registry()
    registry.add(Counter("dup_total", "x"))
    with pytest.raises(ValueError, match="twice"):
        registry.add(Counter("dup_total", "y"))


def test_calls_are_counted_by_decision_and_reason_with_overhead_and_downstream_apart() -> None:
    m = Metrics()
    m.observe_call("allowed", overhead_s=0.0004, downstream_s=0.02)
    m.observe_call(False, ["scope-missing", "constraint-violated"], overhead_s=0.0002)
    m.observe_call("denied", ["scope-missing", "scope-missing"], overhead_s=0.0003)
    got = samples(m.registry.render())
    assert got['broker_calls_total{decision="allowed"}'] == 1
    assert got['broker_calls_total{decision="denied"}'] == 2
    assert got['broker_decision_reasons_total{decision="denied",reason="scope-missing"}'] == 2
    assert got['broker_decision_reasons_total{decision="denied",reason="constraint-violated"}'] == 1
    assert got['broker_call_overhead_seconds_count{decision="denied"}'] == 2
    assert got["broker_downstream_seconds_count"] == 1
    assert got['broker_downstream_seconds_bucket{le="0.025"}'] == 1


def test_labels_stay_within_their_vocabularies() -> None:
    m = Metrics()
    m.observe_call("agent-7/../etc", ["sk-live-secret-value", "scope-missing"], overhead_s=0.1)
    m.agent_status_changed("hacked")
    m.token_issued("agt_123")
    text = m.registry.render()
    assert "sk-live" not in text
    assert "agt_123" not in text
    assert "agent-7" not in text
    got = samples(text)
    assert got['broker_calls_total{decision="other"}'] == 1
    assert got['broker_decision_reasons_total{decision="other",reason="other"}'] == 1
    assert got['broker_agent_status_changes_total{status="other"}'] == 1
    assert got['broker_tokens_issued_total{grant="other"}'] == 1


def test_sessions_store_failures_and_tokens_are_counted() -> None:
    m = Metrics()
    m.session_opened()
    m.session_opened()
    m.session_closed()
    m.store_write_failed(events=3)
    m.token_issued("client_credentials")
    m.token_issued("token_exchange")
    got = samples(m.registry.render())
    assert got["broker_active_sessions"] == 1
    assert got["broker_store_write_failures_total"] == 3
    assert got['broker_tokens_issued_total{grant="client_credentials"}'] == 1


async def test_a_failing_collector_does_not_fail_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = Metrics()

    async def broken() -> None:
        raise RuntimeError("boom")

    m.registry.collectors.append(broken)
    text = await m.scrape()
    assert "broker_calls_total" in text
    assert [r.message for r in caplog.records] == ["metrics collector failed"]


async def test_metrics_are_served_over_http_with_agents_by_status_and_admin_quarantines(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "recording.key").write_text(secrets.token_hex(16), encoding="utf-8")
    config = BrokerConfig(
        server=ServerConfig(public_url="http://127.0.0.1:1"),
        store=StoreConfig(url=sqlite_url(tmp_path)),
        tokens=TokenConfig(keys_dir=keys),
        base_dir=tmp_path,
    )
    async with migrated_store(sqlite_url(tmp_path)) as store:
        broker = create_app(config, store=store, environ={})
        async with broker.router.lifespan_context(broker):
            services: Services = broker.state.services
            metrics = Metrics()
            metrics.watch_store(store)
            services.metrics = metrics  # pyright: ignore[reportAttributeAccessIssue]  # until Services has the field
            agent = make_agent("watched")
            await store.create_agent(agent, secret_hash=None)
            token, _ = await create_admin_token(
                store, role=AdminRole.ADMIN, name="a", now=services.clock.now()
            )
            await AdminActions(services).set_status(
                token, agent.id, AgentStatus.QUARANTINED, "suspicious"
            )
            app = Starlette(routes=metrics_routes(metrics))
            async with serve_app(app) as url, httpx2.AsyncClient() as client:
                with anyio.fail_after(10):
                    response = await client.get(url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    got = samples(response.text)
    assert got['broker_agents{status="quarantined"}'] == 1
    assert got['broker_agents{status="active"}'] == 0
    assert got['broker_agent_status_changes_total{status="quarantined"}'] == 1
    assert agent.id not in response.text
