"""Start-up of connector isolation: the sandbox probe and the broker's one egress proxy.

Shell module. `start_egress` runs in the app's lifespan before the registry is built: it says
loudly when this platform cannot sandbox (and refuses connectors marked ``sandbox =
"required"``), and starts the `connectors.EgressProxy` every sandboxed connector that declares
egress reaches the network through.

Each egress attempt, allowed or refused, is recorded as an ``egress`` event before any byte goes
upstream (the proxy awaits the callback, so a recorder that cannot write stops the connection).
It is recorded in a session of the connector itself, ``connector:<id>``, opened on first use
(its ``agent_id`` is that same name): the connector's whole network history in one place, with
the decision ids of the calls being forwarded to it at that moment (``calls``). When exactly one
call is in flight, the attempt can only be that call's doing, so it is also recorded in the
calling agent's session under the call's decision id: a reviewer reading what an agent did sees
what its tools tried to reach. With several calls in flight the attribution stays a candidate
list, never a guess.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio

from broker.core.recording import EventKind
from broker.errors import ConfigError
from broker.mediation import ForwardedCall
from broker.registry import connector_configs
from broker.store.errors import Conflict
from connectors import EgressEvent, EgressProxy, probe_sandbox

__all__ = ["EgressRecorder", "connector_session_id", "start_egress"]

logger = logging.getLogger("broker.sandboxing")


def connector_session_id(connector_id: str) -> str:
    """The session a connector's own events (egress attempts) are recorded in."""
    return f"connector:{connector_id}"


InFlightLookup = Callable[[str], Sequence[ForwardedCall]]
"""The calls being forwarded to a connector (`broker.mediation.Mediator.forwarded_calls`)."""


class EgressRecorder:
    """The proxy's ``on_event``: records each attempt (see the module docstring)."""

    def __init__(self, recorder: Any, in_flight: InFlightLookup | None = None) -> None:
        self._recorder = recorder
        self._in_flight = in_flight
        self._opened: set[str] = set()
        self._lock = anyio.Lock()

    async def __call__(self, event: EgressEvent) -> None:
        """Record ``event``; raises (so the proxy refuses) when the record cannot be written.

        A broker built to record nothing (``create_app(record=False)``, the bench's) has no
        recorder: the attempt is then only decided, as everything else there is.
        """
        if self._recorder is None:
            return
        session_id = connector_session_id(event.connector_id)
        await self._ensure(session_id)
        payload: dict[str, Any] = {
            "connector": event.connector_id,
            "allowed": event.allowed,
            "kind": event.kind,
            "host": event.host,
            "port": event.port,
            "address": event.address,
        }
        if event.reason:
            payload["reason"] = event.reason
        if event.method:
            payload["method"] = event.method
        calls = tuple(self._in_flight(event.connector_id)) if self._in_flight else ()
        await self._recorder.record(
            session_id,
            EventKind.EGRESS,
            {**payload, "calls": [c.decision_id for c in calls]},
        )
        if len(calls) == 1 and calls[0].session_id is not None:
            await self._recorder.record(
                calls[0].session_id, EventKind.EGRESS, payload, calls[0].decision_id
            )

    async def _ensure(self, session_id: str) -> None:
        if session_id in self._opened:
            return
        async with self._lock:
            if session_id in self._opened:
                return
            # Conflict: opened by an earlier run or another replica; append to it.
            with contextlib.suppress(Conflict):
                await self._recorder.open_session(
                    agent_id=session_id,
                    token_jti="",
                    task_id="",
                    session_id=session_id,
                    transport="egress",
                )
            self._opened.add(session_id)


async def start_egress(services: Any, stack: AsyncExitStack) -> EgressProxy:
    """Probe the sandbox, refuse ``required`` connectors it cannot jail, start the egress proxy.

    Raises:
        ConfigError: a connector has ``sandbox = "required"`` and this platform cannot sandbox
            (names the connector and the reason).
    """
    configs = connector_configs(services.config, await services.store.list_connectors())
    stdio = [c for c in configs if c.kind == "stdio" and c.sandbox != "off"]
    support = probe_sandbox()
    if not support.available:
        if stdio:
            logger.error(
                "SANDBOX UNAVAILABLE: stdio connectors cannot be jailed on this host",
                extra={"reason": support.reason, "connectors": [c.id for c in stdio]},
            )
        else:
            logger.warning("sandbox unavailable", extra={"reason": support.reason})
        for c in stdio:
            if c.sandbox == "required":
                raise ConfigError(
                    f"connector '{c.id}' has sandbox = \"required\" but this host cannot "
                    f"sandbox: {support.reason}"
                )
    else:
        logger.info("sandbox available", extra={"privileged": support.privileged})
    # The connectors' listeners close with the registry (entered later, so closed first).
    socket_dir = tempfile.mkdtemp(prefix="broker-egress-")
    os.chmod(socket_dir, 0o700)
    stack.callback(shutil.rmtree, socket_dir, ignore_errors=True)

    def in_flight(connector_id: str) -> Sequence[ForwardedCall]:
        # The front (and its mediator) is built after the proxy; until then nothing is in flight.
        front = services.front
        return front.mediator.forwarded_calls(connector_id) if front is not None else ()

    recorder = EgressRecorder(services.recorder, in_flight)
    return EgressProxy(on_event=recorder, socket_dir=socket_dir)
