"""The broker as an MCP server: the low-level `mcp.server.Server` agents talk to, and its HTTP app.

Shell adapter over the `Registry` snapshot. Every method is mediated and denies by default:

- ``tools/list`` shows a caller only the enabled tools some grant of its token's scopes covers
  (coarse: connector and tool name; argument constraints are checked per call by mediation).
- ``tools/call`` goes through `McpFront.call_tool`, the one call path: principal -> route ->
  coarse scope check -> pin status -> forward (progress relayed, cancellation flowing through)
  -> result. A denial is a tool result with ``is_error`` whose text is only
  ``denied (<reasons>); decision <id>``; an unknown tool and a forbidden one answer the same.
- Resources, resource templates, prompts and completion (the non-tool methods) are reachable
  only for connectors the caller holds a *connector-wide* grant for: a grant naming that
  connector whose tools include ``"*"`` and that carries no argument constraints. A constrained
  grant (``within = ...``) never opens the non-tool methods, since they would bypass the
  constraint. Unknown and forbidden resources/prompts answer the same (-32602).
- ``roots/list`` is never relayed: connectors answer their servers from configuration.

Every handler catches its own exceptions (the 2025 path would send ``str(exc)`` otherwise) and
answers with a safe message. ``list_changed`` reaches 2025-era sessions (captured by a
`Server.middleware` entry, keyed by ``mcp-session-id``) and 2026-era listeners (the
`SubscriptionBus`).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import mcp.types as types
from mcp.server import Server, ServerRequestContext
from mcp.server.auth.provider import TokenVerifier
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
from mcp.shared.exceptions import MCPError
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.applications import Starlette

from broker.config import ServerConfig
from broker.core.decision import Reason
from broker.principal import Principal, PrincipalLookup, principal_from_request
from broker.registry import Registry, SnapshotChange, ToolRoute
from connectors import CallTimeout, ConnectorError, JSONValue
from scopes.model import Grant, ScopeDefinition

__all__ = ["BROKER_VERSION", "McpFront", "ScopeAccess", "denial", "new_decision_id"]

logger = logging.getLogger("broker.mcp_front")

BROKER_VERSION = "0.1.0"
LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")
LOOPBACK_ORIGINS = ("http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*")
_NOTIFY_TIMEOUT = 5.0

R = TypeVar("R")


def new_decision_id() -> str:
    """A fresh, unguessable decision id (``dec_`` + 20 hex digits)."""
    return "dec_" + secrets.token_hex(10)


def denial(decision_id: str, *reasons: Reason) -> types.CallToolResult:
    """The wire shape of a denied call: the reasons and the decision id, nothing more."""
    text = f"denied ({','.join(sorted(reasons))}); decision {decision_id}"
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


class ScopeAccess:
    """The coarse scope check: which grants a principal's scopes give, cached per scope set.

    Scope names the broker does not define grant nothing (fail closed).
    """

    def __init__(self, definitions: Sequence[ScopeDefinition]) -> None:
        self._by_name = {d.name: d for d in definitions}
        self._grants: dict[frozenset[str], tuple[Grant, ...]] = {}
        self._wide: dict[frozenset[str], frozenset[str]] = {}

    def grants(self, principal: Principal) -> tuple[Grant, ...]:
        key = principal.scopes
        found = self._grants.get(key)
        if found is None:
            found = tuple(
                g
                for name in sorted(key)
                if name in self._by_name
                for g in self._by_name[name].grants
            )
            self._grants[key] = found
        return found

    def may_call(self, principal: Principal, connector_id: str, tool_name: str) -> bool:
        """Whether some grant covers ``tool_name`` (downstream name) of ``connector_id``."""
        return any(g.covers(connector_id, tool_name) for g in self.grants(principal))

    def wide_connectors(self, principal: Principal) -> frozenset[str]:
        """Connectors the principal may use beyond tools (resources, prompts, completion)."""
        key = principal.scopes
        found = self._wide.get(key)
        if found is None:
            found = frozenset(
                g.connector
                for g in self.grants(principal)
                if "*" in g.tools and not g.constraints.items
            )
            self._wide[key] = found
        return found


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
    """

    def __init__(
        self,
        registry: Registry,
        scopes: Sequence[ScopeDefinition],
        *,
        verifier: TokenVerifier | None = None,
        server_config: ServerConfig | None = None,
        principal_lookup: PrincipalLookup = principal_from_request,
        bus: SubscriptionBus | None = None,
        json_response: bool = False,
        version: str = BROKER_VERSION,
    ) -> None:
        self.registry = registry
        self.access = ScopeAccess(scopes)
        self.verifier = verifier
        self.server_config = server_config or ServerConfig()
        self.principal_lookup = principal_lookup
        self.bus: SubscriptionBus = bus or InMemorySubscriptionBus()
        self.json_response = json_response
        self._sessions: dict[object, _LegacySession] = {}
        self._list_cache: dict[frozenset[str], tuple[int, types.ListToolsResult]] = {}
        self._app: Starlette | None = None
        self.server = _BrokerServer(
            "mcp-authz-broker",
            version=version,
            instructions="Tools are mediated by mcp-authz-broker: calls are checked and recorded.",
            get_tool_input_schema=registry.input_schema,
            on_list_tools=self._guard(self.list_tools),
            on_call_tool=self.call_tool,
            on_list_resources=self._guard(self.list_resources),
            on_list_resource_templates=self._guard(self.list_resource_templates),
            on_read_resource=self._guard(self.read_resource),
            on_list_prompts=self._guard(self.list_prompts),
            on_get_prompt=self._guard(self.get_prompt),
            on_completion=self._guard(self.complete),
            on_subscriptions_listen=ListenHandler(self.bus),
        )
        self.server.middleware.append(self._track_session)
        registry.add_listener(self._on_registry_change)

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
        )
        return self._app

    @property
    def session_manager(self) -> StreamableHTTPSessionManager:
        self.asgi_app()
        return self.server.session_manager

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Run the streamable HTTP session manager (a mounted sub-app's lifespan never runs)."""
        async with self.session_manager.run():
            yield

    # -- the call path -----------------------------------------------------------------------

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        """The one path of a tool call: who -> which route -> may they -> forward -> result.

        Mediation replaces the coarse check below with ``decide()`` and records the outcome
        under ``decision_id`` before the result is returned.
        """
        decision_id = new_decision_id()
        try:
            principal = self.principal_lookup(ctx)
            if principal is None:
                return self._deny(decision_id, Reason.TOKEN_INVALID, params.name, None)
            route = self._covered_route(principal, params.name)
            if route is not None and self.registry.is_stale(route.connector_id):
                # The downstream announced a change: decide on the re-pinned definition.
                if not await self.registry.settled(route.connector_id):
                    return self._deny(
                        decision_id, Reason.UPSTREAM_UNAVAILABLE, params.name, principal
                    )
                route = self._covered_route(principal, params.name)
            # Unknown and forbidden answer alike: existence is not revealed to the uncovered.
            if route is None:
                return self._deny(decision_id, Reason.SCOPE_MISSING, params.name, principal)
            if route.disabled is not None:
                return self._deny(decision_id, route.disabled, params.name, principal)
            arguments: dict[str, JSONValue] = dict(params.arguments or {})
        except Exception:
            logger.exception("deciding a tool call failed", extra={"decision_id": decision_id})
            return denial(decision_id, Reason.DECISION_ERROR)
        return await self._forward(ctx, route, arguments, decision_id)

    def _covered_route(self, principal: Principal, name: str) -> ToolRoute | None:
        """The route of ``name`` if some grant of ``principal`` covers it (enabled or not)."""
        route = self.registry.snapshot.tools.get(name)
        if route is None or not self.access.may_call(
            principal, route.connector_id, route.tool_name
        ):
            return None
        return route

    async def _forward(
        self,
        ctx: ServerRequestContext[Any, Any],
        route: ToolRoute,
        arguments: Mapping[str, JSONValue],
        decision_id: str,
    ) -> types.CallToolResult:
        """Call the connector; progress goes back to the agent, cancellation comes down."""

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            await ctx.session.report_progress(progress, total, message)

        try:
            result = await route.connector.call_tool(route.tool_name, arguments, progress=relay)
        except CallTimeout:
            logger.warning("tool call timed out", extra=_ids(decision_id, route))
            return denial(decision_id, Reason.UPSTREAM_TIMEOUT)
        except ConnectorError:
            logger.warning("tool call failed upstream", extra=_ids(decision_id, route))
            return denial(decision_id, Reason.UPSTREAM_UNAVAILABLE)
        except Exception:
            logger.exception("forwarding a tool call failed", extra=_ids(decision_id, route))
            return denial(decision_id, Reason.UPSTREAM_UNAVAILABLE)
        return _for_era(result, ctx.protocol_version)

    def _deny(
        self, decision_id: str, reason: Reason, tool: str, principal: Principal | None
    ) -> types.CallToolResult:
        logger.info(
            "tool call denied",
            extra={
                "decision_id": decision_id,
                "reasons": [str(reason)],
                "agent": principal.agent_id if principal else None,
            },
        )
        return denial(decision_id, reason)

    # -- listing -----------------------------------------------------------------------------

    async def list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        principal = self.principal_lookup(ctx)
        if principal is None:
            return types.ListToolsResult(tools=[])
        snapshot = self.registry.snapshot
        cached = self._list_cache.get(principal.scopes)
        if cached is not None and cached[0] == snapshot.version:
            return cached[1]
        tools = [
            r.tool
            for r in snapshot.listed
            if r.tool is not None and self.access.may_call(principal, r.connector_id, r.tool_name)
        ]
        result = types.ListToolsResult(tools=tools)
        if len(self._list_cache) > 1024:
            self._list_cache.clear()
        self._list_cache[principal.scopes] = (snapshot.version, result)
        return result

    def _wide(self, ctx: ServerRequestContext[Any, Any]) -> frozenset[str]:
        principal = self.principal_lookup(ctx)
        return self.access.wide_connectors(principal) if principal else frozenset()

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
            raise _not_found("Resource not found")
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
        return frozenset(_session_instances(self.server.session_manager))

    async def close_sessions_for(self, agent_id: str) -> int:
        """Terminate every live 2025-era HTTP session opened by ``agent_id``; returns how many.

        The agent's next request on such a session gets 404 "Session not found". 2026-era
        requests carry no session; refusing them is the verifier's job.
        """
        closed = 0
        for key, entry in list(self._sessions.items()):
            if entry.agent_id != agent_id:
                continue
            self._sessions.pop(key, None)
            if entry.http_session_id is not None and await terminate_http_session(
                self.session_manager, entry.http_session_id
            ):
                closed += 1
        return closed


# -- helpers -----------------------------------------------------------------------------------


def _session_instances(manager: StreamableHTTPSessionManager) -> Mapping[str, Any]:
    return manager._server_instances  # pyright: ignore[reportPrivateUsage]


async def terminate_http_session(manager: StreamableHTTPSessionManager, session_id: str) -> bool:
    """Drop one stateful HTTP session; False when it is already gone.

    The SDK (2.3) has no public way to end a session, so this is the one place that uses its
    private ``_server_instances`` / ``_discard_session`` (pinned by ``mcp>=2.3,<2.4`` and
    covered by a test).
    """
    transport = _session_instances(manager).get(session_id)
    if transport is None:
        return False
    await manager._discard_session(session_id, transport)  # pyright: ignore[reportPrivateUsage]
    return True


def _http_session_id(ctx: ServerRequestContext[Any, Any]) -> str | None:
    request = ctx.request
    headers = getattr(request, "headers", None)
    if headers is None:
        return None
    value = headers.get("mcp-session-id")
    return value if isinstance(value, str) else None


def _connection_key(ctx: ServerRequestContext[Any, Any]) -> object | None:
    """A per-connection key for transports without HTTP sessions (stdio, in-process)."""
    connection = getattr(ctx.session, "_connection", None)
    return ("connection", id(connection)) if connection is not None else None


def _ids(decision_id: str, route: ToolRoute) -> dict[str, str]:
    return {"decision_id": decision_id, "connector": route.connector_id, "tool": route.tool_name}


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
