"""Alerts of automatic responses: a loopback webhook receives them, retried, off the call path."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from broker.config import AlertsConfig
from broker.testing import serve_app
from tests.test_quarantine_e2e import detector_broker, mcp_session, probe

BURST = {"denials": {"burst": 3, "window_seconds": 60}}


class Webhook:
    """A loopback webhook that fails its first ``failures`` requests with 503."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.attempts = 0
        self.received: list[dict[str, Any]] = []
        self.arrived = anyio.Event()

    async def endpoint(self, request: Request) -> JSONResponse:
        self.attempts += 1
        if self.attempts <= self.failures:
            return JSONResponse({"error": "try later"}, 503)
        self.received.append(json.loads(await request.body()))
        self.arrived.set()
        return JSONResponse({"ok": True})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hook", self.endpoint, methods=["POST"])])


async def test_a_quarantine_alert_reaches_the_webhook_after_a_failed_attempt(
    tmp_path: Path,
) -> None:
    hook = Webhook(failures=1)
    async with serve_app(hook.app()) as hook_url:
        alerts = AlertsConfig(webhook_url=hook_url + "/hook", retries=3, timeout=5.0)
        async with detector_broker(tmp_path, detectors=BURST, alerts=alerts) as broker:
            agent, secret = await broker.add_agent("rogue", ["slow:use"])
            token = await broker.mint(agent, "slow:use")
            await probe(broker, token, 3)
            with anyio.fail_after(10):
                await hook.arrived.wait()
    assert hook.attempts == 2
    (alert,) = hook.received
    assert alert["agent_id"] == agent.id
    assert alert["action"] == "quarantine-agent"
    assert {s["detector"] for s in alert["signals"]} & {"denial-burst", "probing"}
    assert alert["decision_id"] in alert["decision_ids"]
    assert token not in json.dumps(alert)
    assert secret not in json.dumps(alert)


async def test_a_dead_webhook_never_slows_calls(tmp_path: Path) -> None:
    async def hang(request: Request) -> JSONResponse:
        await anyio.sleep(30)
        return JSONResponse({})

    dead = Starlette(routes=[Route("/hook", hang, methods=["POST"])])
    async with serve_app(dead) as hook_url:
        alerts = AlertsConfig(webhook_url=hook_url + "/hook", retries=3, timeout=5.0)
        async with detector_broker(tmp_path, detectors=BURST, alerts=alerts) as broker:
            rogue, _ = await broker.add_agent("rogue", ["slow:use"])
            good, _ = await broker.add_agent("good", ["slow:use"])
            await probe(broker, await broker.mint(rogue, "slow:use"), 3)
            async with mcp_session(broker, await broker.mint(good, "slow:use")) as client:
                with anyio.fail_after(5):
                    began = time.perf_counter()
                    for i in range(10):
                        result = await client.call_tool("slow__quick", {"text": str(i)})
                        assert not result.is_error
                    elapsed = time.perf_counter() - began
    assert elapsed < 2.0
