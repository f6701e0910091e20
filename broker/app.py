"""The composition root: `create_app(config)` builds the one Starlette app and its lifespan.

Everything that needs the store is built in the lifespan, in dependency order (store and
migrations, signing keys, revocation view, scope definitions, verifier and token service,
connectors, MCP session manager), and closed in reverse. Until start-up finishes, and after it
fails, every route but ``/healthz`` answers 503: the broker never serves half-built.
Tests replace any part by passing it in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.config import BrokerConfig
from broker.errors import ConfigError
from broker.health import health_routes
from broker.ports import Clock, Store, SystemClock

__all__ = ["Services", "create_app"]

logger = logging.getLogger(__name__)


@dataclass
class Services:
    """What the running broker holds; filled in by the lifespan of `create_app`'s app."""

    config: BrokerConfig
    clock: Clock
    environ: Mapping[str, str]
    store: Any = None
    keyring: Any = None
    revocations: Any = None
    verifier: Any = None
    tokens: Any = None
    registry: Any = None
    front: Any = None
    recorder: Any = None
    call_approvals: Any = None
    approval_desk: Any = None
    metrics: Any = None
    scopes: dict[str, Any] = field(default_factory=dict[str, Any])
    ready: bool = False
    record: bool = True
    """False only for `make bench`'s unrecorded target (see `create_app`)."""


class _BrokerApp(Starlette):
    """The Starlette app, with one shortcut: an MCP ``POST`` goes straight to the front's lane.

    Those requests are the hot path, and Starlette's error middlewares and two routers cost them
    tens of microseconds each while adding nothing: the lane answers every request it takes with
    its own JSON response and hands the rest to the SDK's app, which has its own. The shortcut
    exists only while the broker is ready (the lifespan sets and clears ``lane``).
    """

    lane: ASGIApp | None = None
    lane_path: str = "/mcp"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self.lane
        if (
            lane is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == self.lane_path
        ):
            scope["app"] = self
            await lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


class _Deferred:
    """An ASGI app that forwards to one built during start-up, answering 503 until then."""

    def __init__(self) -> None:
        self.target: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.target is not None:
            await self.target(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        response = JSONResponse({"error": "starting", "detail": "the broker is not ready"}, 503)
        await response(scope, receive, send)


def create_app(
    config: BrokerConfig,
    *,
    store: Store | None = None,
    clock: Clock | None = None,
    environ: Mapping[str, str] | None = None,
    record: bool = True,
) -> Starlette:
    """Build the broker's ASGI app. Nothing is opened until the lifespan runs.

    ``record=False`` builds a broker that records nothing: no sessions, no events, every other
    stage of mediation unchanged. It exists for one purpose, measuring what recording costs per
    call (`make bench` runs this beside the full broker); no configuration key or command reaches
    it, since a broker that keeps no record breaks "What must hold" 7.

    Raises:
        ConfigError: (from the lifespan) a scope file, connector or key is unusable.
    """
    services = Services(
        config=config,
        clock=clock or SystemClock(),
        environ=os.environ if environ is None else environ,
        store=store,
        record=record,
    )
    deferred = _Deferred()

    routes: list[BaseRoute] = [*health_routes(services), Mount("/", app=deferred)]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await _start(services, stack)
            deferred.target = Router(routes=_routes(services))
            services.ready = True
            app.state.services = services
            if isinstance(app, _BrokerApp):
                app.lane = services.front.http_app()
            logger.info("broker ready", extra={"resource": config.server.resource_url})
            try:
                yield
            finally:
                services.ready = False
                if isinstance(app, _BrokerApp):
                    app.lane = None

    return _BrokerApp(routes=routes, lifespan=lifespan)


async def _start(services: Services, stack: AsyncExitStack) -> None:
    from broker.approvals import ApprovalDesk, CallApprovalGate, TokenApprovals
    from broker.keys import KeyRing, ensure_signing_key
    from broker.mcp_front import McpFront
    from broker.metrics import Metrics
    from broker.recorder import Recorder
    from broker.registry import Registry
    from broker.responses import AgentResponder
    from broker.revocations import RevocationCache
    from broker.sandboxing import start_egress
    from broker.token_service import TokenService
    from broker.verifier import BrokerTokenVerifier
    from scopes import ScopeError, load_scope_files

    config, clock = services.config, services.clock
    if services.store is None:
        from broker.store import open_store

        services.store = open_store(
            config.store.url,
            pool_size=config.store.pool_size,
            max_overflow=config.store.max_overflow,
        )
        stack.push_async_callback(services.store.aclose)
    store = services.store
    await store.migrate()
    services.metrics = Metrics()
    services.metrics.watch_store(store)

    await ensure_signing_key(store, config.tokens.keys_dir, clock.now())
    services.keyring = await KeyRing.load(
        store, config.tokens.keys_dir, max_ttl=config.tokens.max_ttl, leeway=config.tokens.leeway
    )
    services.revocations = await stack.enter_async_context(
        RevocationCache(
            store,
            clock,
            staleness=config.store.revocation_staleness,
            poll_interval=config.store.revocation_poll_interval,
            listen=config.store.listen,
        )
    )
    try:
        definitions = load_scope_files(config.scope_files)
    except ScopeError as exc:
        raise ConfigError(str(exc)) from None
    services.scopes = {d.name: d for d in definitions}
    if services.record:
        services.recorder = await stack.enter_async_context(
            Recorder(store, clock=clock, redactor=_redactor(config, services.environ))
        )
    services.verifier = BrokerTokenVerifier.from_config(
        config, services.keyring, services.revocations, clock, store
    )
    services.call_approvals = CallApprovalGate(store, clock, config.approvals)
    services.approval_desk = ApprovalDesk(store, clock, services.call_approvals)
    services.tokens = TokenService(
        store,
        services.keyring,
        services.revocations,
        config,
        clock,
        scope_definitions=services.scopes,
        verifier=services.verifier,
        approvals=TokenApprovals(store, clock, config.approvals, scope_definitions=services.scopes),
    )
    egress = await start_egress(services, stack)
    services.registry = await Registry.from_config(
        config, store, environ=services.environ, clock=clock, scopes=definitions, egress=egress
    )
    await stack.enter_async_context(services.registry)
    responder = AgentResponder(store, services.revocations, config.alerts, clock=clock)
    await stack.enter_async_context(responder)
    services.front = McpFront(
        services.registry,
        definitions,
        verifier=services.verifier,
        server_config=config.server,
        clock=clock,
        revocations=services.revocations,
        store=store,
        recorder=services.recorder,
        limits=config.limits,
        output=config.output,
        known_secrets=_connector_secrets(config, services.environ),
        local_connectors=[c.id for c in config.connectors if c.local_paths],
        approvals=services.call_approvals,
        observer=services.metrics,
        transport="http",
        detectors=config.detectors,
        responder=responder,
    )
    await stack.enter_async_context(services.front.lifespan())
    # A quarantine, disable or agent revocation seen by this replica (from any replica, through
    # the store) cancels the agent's calls in flight here and closes its sessions here.
    services.revocations.add_cut_off_listener(services.front.cut_off)


def _redactor(config: BrokerConfig, environ: Mapping[str, str]) -> Any:
    """The record's redactor: the configured HMAC key, and every connector credential as known."""
    from broker.core.redaction import Redactor

    return Redactor(
        _recording_key(config, environ),
        known=_connector_secrets(config, environ),
        excerpt_chars=config.recording.excerpt_chars,
    )


def _recording_key(config: BrokerConfig, environ: Mapping[str, str]) -> bytes:
    """The recording key (created on first use): the redactor's HMAC key, and the root of the
    review page's CSRF key."""
    from broker.config import resolve_secret
    from broker.keys import ensure_recording_key

    ensure_recording_key(config.recording.hmac_key, config.base_dir)
    key = resolve_secret(config.recording.hmac_key, environ, config.base_dir).encode()
    if len(key) < 16:
        raise ConfigError("recording.hmac_key: the key must be at least 16 bytes")
    return key


def _connector_secrets(config: BrokerConfig, environ: Mapping[str, str]) -> list[str]:
    """The resolved values of every connector credential reference: never shown or recorded."""
    from broker.config import resolve_secret

    return [
        resolve_secret(value, environ, config.base_dir)
        for connector in config.connectors
        for value in (*connector.env.values(), *connector.headers.values())
        if value.startswith(("env:", "file:"))
    ]


def _routes(services: Services) -> list[BaseRoute]:
    from broker.admin import AdminActions, admin_routes
    from broker.metrics import metrics_routes
    from broker.oauth import oauth_routes
    from broker.review import review_routes

    actions = AdminActions(services)  # one audit writer shared by the admin API and review page
    return [
        *oauth_routes(services.tokens),
        *admin_routes(services, actions=actions, approvals=services.approval_desk),
        *review_routes(
            services,
            actions=actions,
            recording_key=_recording_key(services.config, services.environ),
        ),
        *metrics_routes(services.metrics),
        Mount("/", app=services.front.http_app()),
    ]
