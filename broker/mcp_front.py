"""The broker as an MCP server: the low-level `mcp.server.Server` agents talk to, and its HTTP app.

Shell adapter: MCP requests in, `broker.mediation.Mediator` decisions out. Every method is
mediated and denies by default:

- ``tools/list`` shows a caller only the enabled tools some grant of its token covers (and, when
  the token narrows with ``authorization_details``, some detail too), with the approved
  definitions exactly. Cached per token and registry snapshot.
- ``tools/call`` goes through `Mediator.call_tool` (token -> route/pin -> decide -> limits ->
  budget -> approval -> record -> forward canonical arguments -> output policy -> record); a
  denial is a tool result with ``is_error`` whose text is only ``denied (<reasons>); decision
  <id>`` (plus ``; retry after N s`` for rate limits). Unknown and forbidden tools answer alike.
- Resources, resource templates, prompts and completion are reachable only for connectors the
  caller holds a *connector-wide* grant for: a grant naming that connector whose tools include
  ``"*"`` and that carries no argument constraints (and, for a token with
  ``authorization_details``, such a detail too). A constrained grant never opens them, since
  they would bypass the constraint. A revoked token reaches none. Unknown and forbidden answer
  the same (-32602).
- ``roots/list`` is never relayed: connectors answer their servers from configuration.

Every handler catches its own exceptions (the 2025 path would send ``str(exc)`` otherwise) and
answers with a safe message. ``list_changed`` reaches 2025-era sessions (captured by a
`Server.middleware` entry, keyed by ``mcp-session-id``) and 2026-era listeners (the
`SubscriptionBus`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import anyio
import mcp.types as types
from mcp.server import Server, ServerRequestContext
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import CallNext, HandlerResult
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.models import InitializationOptions
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    SubscriptionBus,
    ToolsListChanged,
)
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp.shared.inbound import InboundModernRoute, find_invalid_x_mcp_header, x_mcp_header_map
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.applications import Starlette

from broker.config import LimitsConfig, OutputConfig, ServerConfig
from broker.core.decision import Reason
from broker.core.detectors import DetectorBook, DetectorsConfig
from broker.event_store import BoundedEventStore, per_session_event_stores
from broker.front_relays import FrontRelays, resource_not_found
from broker.http_sessions import live_session, owned_by, session_instances, terminate_http_session
from broker.mediation import (
    CallApprovals,
    CallContext,
    CallObserver,
    CallRecorder,
    DetectorResponder,
    MediationStore,
    Mediator,
    TokenCheck,
    denial,
    new_decision_id,
)
from broker.ports import Clock
from broker.principal import Principal, PrincipalCache, PrincipalLookup
from broker.registry import Registry, SnapshotChange
from broker.tool_call_lane import LaneSession, ToolCallLane
from connectors import CallTimeout, ConnectorError
from connectors.relay import CallRelay, relaying
from scopes.model import ScopeDefinition

__all__ = ["BROKER_VERSION", "McpFront", "denial", "new_decision_id", "terminate_http_session"]

logger = logging.getLogger("broker.mcp_front")

BROKER_VERSION = "0.1.0"
LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")
LOOPBACK_ORIGINS = ("http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*")
_NOTIFY_TIMEOUT = 5.0
SSE_RETRY_MS = 1000
"""The ``retry`` hint of each POST SSE stream's priming event (SEP-1699 polling)."""

R = TypeVar("R")


@dataclass(slots=True)
class _LegacySession:
    session: Any
    """A `ServerSession` proxy of one of its requests; notifications use the standalone channel."""
    agent_id: str | None
    http_session_id: str | None


class _BrokerServer(Server[Any]):
    """Advertises ``tools.listChanged`` (and prompts/resources) on the 2025 handshake too."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            NotificationOptions(tools_changed=True, prompts_changed=True, resources_changed=True),
            experimental_capabilities,
            extensions,
        )


class McpFront:
    """The MCP server agents connect to.

    ``McpFront(registry, scope_definitions, verifier=..., server_config=...)``; mount
    `asgi_app()` and enter `lifespan()` in the host app's lifespan (after the registry started).
    In-process tests use ``Client(front.server, ...)`` with ``principal_lookup`` injected.

    The mediation seams are optional so the front runs before it is fully wired (see
    `broker.mediation.Mediator`); production passes ``recorder``, ``store``, ``revocations``
    and ``clock``. ``revocations`` defaults to the verifier's revocation view when it has one.
    """

    def __init__(
        self,
        registry: Registry,
        scopes: Sequence[ScopeDefinition],
        *,
        verifier: TokenVerifier | None = None,
        server_config: ServerConfig | None = None,
        principal_lookup: PrincipalLookup | None = None,
        bus: SubscriptionBus | None = None,
        json_response: bool = False,
        version: str = BROKER_VERSION,
        clock: Clock | None = None,
        revocations: TokenCheck | None = None,
        store: MediationStore | None = None,
        recorder: CallRecorder | None = None,
        approvals: CallApprovals | None = None,
        limits: LimitsConfig | None = None,
        output: OutputConfig | None = None,
        known_secrets: Iterable[str] = (),
        local_connectors: Collection[str] = (),
        observer: CallObserver | None = None,
        transport: str = "stdio",
        detectors: DetectorBook | DetectorsConfig | None = None,
        responder: DetectorResponder | None = None,
    ) -> None:
        self.registry = registry
        self.verifier = verifier
        self.server_config = server_config or ServerConfig()
        self._principals = PrincipalCache()
        self.principal_lookup: PrincipalLookup = principal_lookup or self._principals.from_request
        self.bus: SubscriptionBus = bus or InMemorySubscriptionBus()
        self.json_response = json_response
        self.transport = transport
        if revocations is None:
            revocations = getattr(verifier, "revocations", None)
        if clock is None:
            clock = getattr(verifier, "clock", None)
        self.mediator = Mediator(
            registry,
            scopes,
            clock=clock,
            revocations=revocations,
            store=store,
            recorder=recorder,
            approvals=approvals,
            limits=limits,
            output=output,
            known_secrets=known_secrets,
            local_connectors=local_connectors,
            observer=observer,
            detectors=detectors,
            responder=responder,
        )
        if responder is not None:
            responder.bind(self.cut_off)
        self._sessions: dict[object, _LegacySession] = {}
        self._list_cache: dict[tuple[str, frozenset[str]], tuple[int, types.ListToolsResult]] = {}
        self._app: Starlette | None = None
        self._lane: ToolCallLane | None = None
        self.relays = FrontRelays(
            registry=registry,
            principal_lookup=lambda ctx: self.principal_lookup(ctx),
            wide_connectors=self.mediator.wide_connectors,
            output=self.mediator.output,
            connection_key=_session_key,
        )
        with warnings.catch_warnings():
            # logging/setLevel is deprecated (SEP-2577) but 2025-era agents still send it.
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            self.server = self._build_server(version)
        self.server.middleware.append(self._track_session)
        registry.add_listener(self._on_registry_change)

    def _build_server(self, version: str) -> _BrokerServer:
        return _BrokerServer(
            "mcp-authz-broker",
            version=version,
            instructions="Tools are mediated by mcp-authz-broker: calls are checked and recorded.",
            get_tool_input_schema=self.registry.input_schema,
            on_list_tools=self._guard(self.list_tools),
            on_call_tool=self.call_tool,
            on_list_resources=self._guard(self.list_resources),
            on_list_resource_templates=self._guard(self.list_resource_templates),
            on_read_resource=self._guard(self.read_resource),
            on_list_prompts=self._guard(self.list_prompts),
            on_get_prompt=self._guard(self.get_prompt),
            on_completion=self._guard(self.complete),
            on_subscriptions_listen=ListenHandler(self.bus),
            on_set_logging_level=self._guard(self.relays.set_level),
            on_subscribe_resource=self._guard(self.relays.subscribe),
            on_unsubscribe_resource=self._guard(self.relays.unsubscribe),
        )

    # -- HTTP --------------------------------------------------------------------------------

    def asgi_app(self) -> Starlette:
        """The streamable HTTP app (``/mcp`` plus the RFC 9728 metadata route). Built once."""
        if self._app is not None:
            return self._app
        cfg = self.server_config
        auth = None
        if self.verifier is not None:
            auth = AuthSettings(
                issuer_url=cfg.base_url,  # pyright: ignore[reportArgumentType] - a str keeps the exact issuer (no trailing slash)
                resource_server_url=cfg.resource_url,  # pyright: ignore[reportArgumentType]
                required_scopes=[],
                validate_token_resource=False,  # the verifier checks the audience itself
            )
        self._app = self.server.streamable_http_app(
            streamable_http_path="/mcp",
            stateless_http=False,
            json_response=self.json_response,
            host=cfg.host,
            transport_security=TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=[*LOOPBACK_HOSTS, *cfg.allowed_hosts],
                allowed_origins=[*LOOPBACK_ORIGINS, *cfg.allowed_origins],
            ),
            auth=auth,
            token_verifier=self.verifier,
            max_request_body_size=cfg.max_body_bytes,
            # Priming ids and a retry hint on POST SSE streams; one bounded store per session.
            event_store=BoundedEventStore(),
            retry_interval=SSE_RETRY_MS,
        )
        per_session_event_stores(self.server.session_manager)
        return self._app

    def http_app(self) -> ToolCallLane:
        """`asgi_app()` behind the direct tool-call lane (`broker.tool_call_lane`): what to mount.

        The lane serves 2025-era ``tools/call`` POSTs on live sessions without the SDK's server
        path (the same mediation, a fraction of the CPU); everything else reaches `asgi_app()`.
        """
        if self._lane is None:
            cfg = self.server_config
            self._lane = ToolCallLane(
                self.asgi_app(),
                self,
                security=TransportSecuritySettings(
                    enable_dns_rebinding_protection=True,
                    allowed_hosts=[*LOOPBACK_HOSTS, *cfg.allowed_hosts],
                    allowed_origins=[*LOOPBACK_ORIGINS, *cfg.allowed_origins],
                ),
                max_body=cfg.max_body_bytes,
            )
        return self._lane

    async def lane_token(self, raw: str) -> AccessToken | None:
        """The lane's token check: the SDK hook's verifier; None without one (tests)."""
        if self.verifier is None:
            return None
        return await self.verifier.verify_token(raw)

    def lane_session(self, session_id: str, token: AccessToken) -> LaneSession | None:
        """The live 2025-era session ``token``'s principal opened and the front has seen."""
        manager = self.session_manager
        transport = live_session(manager, session_id)
        entry = self._sessions.get(session_id)
        if transport is None or entry is None or not owned_by(manager, session_id, token):
            return None
        version = getattr(entry.session, "protocol_version", None)
        if version not in HANDSHAKE_PROTOCOL_VERSIONS:
            return None
        return LaneSession(
            session_id=session_id,
            transport=transport,
            protocol_version=str(version),
            session=entry.session,
            client_info=_session_client_info(entry.session),
        )

    async def lane_call(
        self,
        lane: LaneSession,
        token: AccessToken,
        name: str,
        arguments: Mapping[str, Any] | None,
        peer: str | None,
    ) -> types.CallToolResult:
        """`call_tool` for a request the lane serves: same mediation, same answers."""

        def context() -> CallContext:
            return CallContext(
                principal=self._principals.from_access_token(token),
                http_session_id=lane.session_id,
                protocol_version=lane.protocol_version,
                transport="http",
                client_info=lane.client_info,
                peer=peer,
            )

        def relay(principal: Principal | None) -> CallRelay | None:
            return self.relays.relay_for(
                principal, session=lane.session, request_id=None, legacy=True, key=lane.session_id
            )

        return await self._mediate(context, relay, name, arguments, lane.protocol_version)

    def lane_modern_ready(self, name: str) -> bool:
        """Whether a 2026 call of ``name`` needs nothing of the SDK's path.

        A tool whose schema maps arguments to ``Mcp-Param-*`` headers needs the SDK to check
        them against the body; none of the broker's connectors declare any today.
        """
        schema = self.registry.input_schema(name)
        if schema is None:
            return True
        return find_invalid_x_mcp_header(schema) is None and not x_mcp_header_map(schema)

    async def lane_modern_call(
        self,
        token: AccessToken,
        route: InboundModernRoute,
        name: str,
        arguments: Mapping[str, Any] | None,
        peer: str | None,
    ) -> types.CallToolResult:
        """`call_tool` for a 2026-era request the lane serves: same mediation, same answers."""

        def context() -> CallContext:
            return CallContext(
                principal=self._principals.from_access_token(token),
                protocol_version=route.protocol_version,
                transport="http",
                client_info=_envelope_client_info(route.client_info),
                peer=peer,
            )

        def relay(principal: Principal | None) -> CallRelay | None:
            # No stream to send the agent anything on: downstream logs are dropped and requests
            # refused, as on the SDK's 2026 path for a request that did not opt in to logging.
            return self.relays.silent_relay(principal)

        return await self._mediate(context, relay, name, arguments, route.protocol_version)

    @property
    def server_info_stamp(self) -> dict[str, Any]:
        """The ``serverInfo`` a 2026-era result carries in its ``_meta``."""
        return self.server.server_info_stamp

    @property
    def session_manager(self) -> StreamableHTTPSessionManager:
        self.asgi_app()
        return self.server.session_manager

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Run the streamable HTTP session manager (a mounted sub-app's lifespan never runs)."""
        try:
            async with self.session_manager.run():
                yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.mediator.close_sessions(reason="shutdown")

    # -- the call path -----------------------------------------------------------------------

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        """A tool call on the SDK's path: the MCP request becomes a `CallContext` for mediation."""
        return await self._mediate(
            lambda: self._call_context(ctx),
            lambda principal: self.relays.call_relay(ctx, principal),
            params.name,
            params.arguments,
            ctx.protocol_version,
        )

    async def _mediate(
        self,
        context: Callable[[], CallContext],
        relay_for: Callable[[Principal | None], CallRelay | None],
        name: str,
        arguments: Mapping[str, Any] | None,
        protocol_version: str,
    ) -> types.CallToolResult:
        """The one path of every tool call, whichever way it arrived (SDK or direct lane)."""
        try:
            call = context()
        except Exception:
            decision_id = new_decision_id()
            logger.exception("identifying a tool call failed", extra={"decision_id": decision_id})
            return denial(decision_id, Reason.DECISION_ERROR)
        try:
            relay = relay_for(call.principal)
        except Exception:
            logger.exception("building the call relay failed")
            relay = None
        with relaying(relay):
            result = await self.mediator.call_tool(call, name, arguments)
        return _for_era(result, protocol_version)

    def _call_context(self, ctx: ServerRequestContext[Any, Any]) -> CallContext:
        principal = self.principal_lookup(ctx)
        http_id = (
            _http_session_id(ctx) if ctx.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS else None
        )

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            await ctx.session.report_progress(progress, total, message)

        return CallContext(
            principal=principal,
            http_session_id=http_id,
            protocol_version=str(ctx.protocol_version or ""),
            transport="http" if ctx.request is not None else self.transport,
            client_info=_client_info(ctx),
            progress=relay,
            peer=_peer_host(ctx),
        )

    # -- listing -----------------------------------------------------------------------------

    async def list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        principal = self.principal_lookup(ctx)
        if principal is None:
            return types.ListToolsResult(tools=[])
        snapshot = self.registry.snapshot
        key = (principal.token_id, principal.scopes)
        cached = self._list_cache.get(key)
        # A revoked token sees nothing, even from the cache.
        if (
            cached is not None
            and cached[0] == snapshot.version
            and self.mediator.token_problem(principal, self.mediator.token(principal)) is None
        ):
            return cached[1]
        result = types.ListToolsResult(tools=self.mediator.visible_tools(principal))
        if len(self._list_cache) > 1024:
            self._list_cache.clear()
        self._list_cache[key] = (snapshot.version, result)
        return result

    def _wide(self, ctx: ServerRequestContext[Any, Any]) -> frozenset[str]:
        return self.mediator.wide_connectors(self.principal_lookup(ctx))

    async def list_resources(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        wide = self._wide(ctx)
        snapshot = self.registry.snapshot
        return types.ListResourcesResult(
            resources=[r.resource for r in snapshot.resources.values() if r.connector_id in wide]
        )

    async def list_resource_templates(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        wide = self._wide(ctx)
        return types.ListResourceTemplatesResult(
            resource_templates=[
                t.template for t in self.registry.snapshot.templates if t.connector_id in wide
            ]
        )

    async def read_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        route = self.registry.snapshot.resource_route(uri)
        if route is None or route.connector_id not in self._wide(ctx):
            raise resource_not_found(uri)
        try:
            return await route.connector.read_resource(uri)
        except ConnectorError as exc:
            raise _upstream(exc, route.connector_id) from None

    async def list_prompts(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        wide = self._wide(ctx)
        return types.ListPromptsResult(
            prompts=[
                p.prompt for p in self.registry.snapshot.prompts.values() if p.connector_id in wide
            ]
        )

    async def get_prompt(
        self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        route = self.registry.snapshot.prompts.get(params.name)
        if route is None or route.connector_id not in self._wide(ctx):
            raise _not_found("Unknown prompt")
        try:
            return await route.connector.get_prompt(route.prompt_name, params.arguments)
        except ConnectorError as exc:
            raise _upstream(exc, route.connector_id) from None

    async def complete(
        self, ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams
    ) -> types.CompleteResult:
        snapshot = self.registry.snapshot
        ref = params.ref
        downstream: types.PromptReference | types.ResourceTemplateReference
        if isinstance(ref, types.PromptReference):
            prompt = snapshot.prompts.get(ref.name)
            connector_id = prompt.connector_id if prompt else None
            connector = prompt.connector if prompt else None
            downstream = types.PromptReference(name=prompt.prompt_name if prompt else ref.name)
        else:
            template = snapshot.template_route(ref.uri)
            connector_id = template.connector_id if template else None
            connector = template.connector if template else None
            downstream = ref
        if connector is None or connector_id not in self._wide(ctx):
            # Nothing to offer is not an error, and does not reveal whether the ref exists.
            return types.CompleteResult(completion=types.Completion(values=[]))
        context = params.context.arguments if params.context else None
        argument = {"name": params.argument.name, "value": params.argument.value}
        try:
            completion = await connector.complete(downstream, argument, context)
        except ConnectorError as exc:
            raise _upstream(exc, connector.id) from None
        return types.CompleteResult(completion=completion)

    def _guard(
        self, handler: Callable[[ServerRequestContext[Any, Any], Any], Awaitable[R]]
    ) -> Callable[[ServerRequestContext[Any, Any], Any], Awaitable[R]]:
        """Wrap a non-tool handler: protocol errors pass, anything else becomes a safe -32603."""

        async def guarded(ctx: ServerRequestContext[Any, Any], params: Any) -> R:
            try:
                return await handler(ctx, params)
            except MCPError:
                raise
            except Exception:
                logger.exception("MCP handler failed", extra={"method": ctx.method})
                raise MCPError(code=types.INTERNAL_ERROR, message="Internal error") from None

        return guarded

    # -- change notifications and sessions ---------------------------------------------------

    async def _track_session(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """Remember each 2025-era connection once, to send it list_changed later."""
        if (
            ctx.method != "initialize"
            and ctx.session.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS
        ):
            http_id = _http_session_id(ctx)
            key: object = http_id if http_id is not None else _connection_key(ctx)
            if key is not None and key not in self._sessions:
                try:
                    principal = self.principal_lookup(ctx)
                except Exception:
                    principal = None
                self._sessions[key] = _LegacySession(
                    ctx.session, principal.agent_id if principal else None, http_id
                )
        return await call_next(ctx)

    async def _on_registry_change(self, change: SnapshotChange) -> None:
        await self.notify_changed(
            tools=change.tools, prompts=change.prompts, resources=change.resources
        )

    async def notify_changed(
        self, *, tools: bool = True, prompts: bool = False, resources: bool = False
    ) -> None:
        """Tell every connected agent, in both eras, that lists changed."""
        if tools:
            await self.bus.publish(ToolsListChanged())
        if prompts:
            await self.bus.publish(PromptsListChanged())
        if resources:
            await self.bus.publish(ResourcesListChanged())
        live = self._live_http_sessions()
        for key, entry in list(self._sessions.items()):
            if entry.http_session_id is not None and entry.http_session_id not in live:
                self._sessions.pop(key, None)
                continue
            try:
                with anyio.fail_after(_NOTIFY_TIMEOUT):
                    if tools:
                        await entry.session.send_tool_list_changed()
                    if prompts:
                        await entry.session.send_prompt_list_changed()
                    if resources:
                        await entry.session.send_resource_list_changed()
            except Exception:
                # A connection that went away: forget it. Nothing else to do.
                self._sessions.pop(key, None)

    def _live_http_sessions(self) -> frozenset[str]:
        if self.server._session_manager is None:  # pyright: ignore[reportPrivateUsage]
            return frozenset()
        return frozenset(session_instances(self.server.session_manager))

    async def close_sessions_for(self, agent_id: str) -> int:
        """Terminate every live 2025-era HTTP session opened by ``agent_id``; returns how many.

        The agent's next request on such a session gets 404 "Session not found". 2026-era
        requests carry no session; refusing them is the verifier's job. The agent's recorded
        sessions are sealed too.
        """
        closed = 0
        self.relays.forget_agent(agent_id)
        for key, entry in list(self._sessions.items()):
            if entry.agent_id != agent_id:
                continue
            self._sessions.pop(key, None)
            if entry.http_session_id is not None and await terminate_http_session(
                self.session_manager, entry.http_session_id
            ):
                closed += 1
        await self.mediator.close_sessions(agent_id=agent_id, reason="agent-cut-off")
        return closed

    async def cancel_agent(self, agent_id: str, reason: Reason) -> int:
        """Cancel ``agent_id``'s calls in flight (each answers ``reason``); returns how many."""
        return await self.mediator.cancel_agent(agent_id, reason)

    async def cut_off(self, agent_id: str, reason: Reason = Reason.AGENT_QUARANTINED) -> int:
        """Quarantine's hook: cancel the agent's calls in flight, then close its sessions.

        Returns the number of calls cancelled. New calls are refused by the revocation view.
        """
        cancelled = await self.cancel_agent(agent_id, reason)
        await self.close_sessions_for(agent_id)
        return cancelled


# -- helpers -----------------------------------------------------------------------------------


def _http_session_id(ctx: ServerRequestContext[Any, Any]) -> str | None:
    request = ctx.request
    headers = getattr(request, "headers", None)
    if headers is None:
        return None
    value = headers.get("mcp-session-id")
    return value if isinstance(value, str) else None


def _session_key(ctx: ServerRequestContext[Any, Any]) -> object | None:
    """The agent connection a request came on: its HTTP session, else its transport."""
    http_id = _http_session_id(ctx)
    return http_id if http_id is not None else _connection_key(ctx)


def _connection_key(ctx: ServerRequestContext[Any, Any]) -> object | None:
    """A per-connection key for transports without HTTP sessions (stdio, in-process)."""
    connection = getattr(ctx.session, "_connection", None)
    return ("connection", id(connection)) if connection is not None else None


def _peer_host(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The HTTP client's host (no port: it changes per connection); None off HTTP."""
    client = getattr(ctx.request, "client", None)
    host = getattr(client, "host", None)
    return host if isinstance(host, str) else None


def _client_info(ctx: ServerRequestContext[Any, Any]) -> dict[str, Any]:
    """The client's self-description (name, version), as both eras carry it."""
    return _session_client_info(ctx.session)


def _envelope_client_info(info: Any) -> dict[str, Any]:
    """The client's self-description from a 2026 request envelope (name, title, version)."""
    if not isinstance(info, Mapping):
        return {}
    fields = cast("Mapping[str, Any]", info)
    return {k: fields[k] for k in ("name", "title", "version") if isinstance(fields.get(k), str)}


def _session_client_info(session: Any) -> dict[str, Any]:
    params = getattr(session, "client_params", None)
    info = getattr(params, "client_info", None)
    if info is None:
        return {}
    dumped = info.model_dump(mode="json", exclude_none=True)
    return {k: dumped[k] for k in ("name", "title", "version") if k in dumped}


def _not_found(message: str) -> MCPError:
    return MCPError(code=types.INVALID_PARAMS, message=message)


def _upstream(exc: ConnectorError, connector_id: str) -> MCPError:
    decision_id = new_decision_id()
    logger.warning(
        "upstream request failed", extra={"decision_id": decision_id, "connector": connector_id}
    )
    reason = (
        Reason.UPSTREAM_TIMEOUT if isinstance(exc, CallTimeout) else Reason.UPSTREAM_UNAVAILABLE
    )
    return MCPError(code=types.INTERNAL_ERROR, message=f"{reason}; decision {decision_id}")


def _for_era(result: types.CallToolResult, protocol_version: str) -> types.CallToolResult:
    """Fit a downstream result to the caller's era: 2025 wants object structured content."""
    structured = result.structured_content
    if (
        protocol_version in HANDSHAKE_PROTOCOL_VERSIONS
        and structured is not None
        and not isinstance(structured, dict)
    ):
        return result.model_copy(update={"structured_content": None})
    return result
