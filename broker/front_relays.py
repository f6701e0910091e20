"""The MCP front's relays between agents and connectors beyond request/response.

- ``logging/setLevel`` (deprecated by SEP-2577, still a 2025-era method): answered ``{}``; the
  level is remembered per connection and filters what is relayed to it. It is never forwarded:
  connectors are shared by every agent.
- Log messages a connector sends during a tool call go to the agent that made the call (2025:
  on that request's stream; 2026: only if the request opted in, which the SDK enforces).
- Sampling and form-mode elicitation requests a connector sends during a tool call go to the
  agent that made the call, on the 2025 path only, and only when the agent declared the
  capability; otherwise (and always for URL-mode elicitation) the connector gets an error
  (2026 has no back channel). Routing is fail-closed: see `connectors.relay`.
- ``resources/subscribe`` / ``unsubscribe`` are mediated like ``resources/read`` (only
  resources of connectors the caller may read), forwarded to the owning connector (one
  downstream subscription per resource, however many agents hold one), and each
  ``notifications/resources/updated`` goes to the 2025-era connections subscribed to it whose
  principal may still read it.

Everything sent to an agent from a connector is first passed through the output policy
(secrets redacted); anything the policy would cut or refuse is not relayed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import mcp.types as types
from mcp.server import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS

from broker.core.output import OutputPolicy, shape_result
from broker.principal import Principal
from connectors import ConnectorError
from connectors.relay import CallRelay

__all__ = ["LOG_LEVELS", "FrontRelays", "resource_not_found"]

logger = logging.getLogger("broker.mcp_front")

# send_log_message is deprecated (SEP-2577) but is what the 2025 era still speaks.
warnings.filterwarnings(
    "ignore", message=r".*logging capability is deprecated.*", module=r"broker\.front_relays"
)

LOG_LEVELS: tuple[types.LoggingLevel, ...] = (
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
)
_MAX_TRACKED = 10_000
_NOTIFY_TIMEOUT = 5.0


def resource_not_found(uri: str) -> MCPError:
    """The one answer for a resource that is unknown or not the caller's (SEP-2164 shape)."""
    return MCPError(code=types.INVALID_PARAMS, message="Resource not found", data={"uri": uri})


@dataclass(slots=True)
class _Subscriber:
    session: Any
    principal: Principal


class FrontRelays:
    """State and handlers of the relays; owned by one `broker.mcp_front.McpFront`."""

    def __init__(
        self,
        *,
        registry: Any,
        principal_lookup: Callable[[ServerRequestContext[Any, Any]], Principal | None],
        wide_connectors: Callable[[Principal | None], frozenset[str]],
        output: OutputPolicy,
        connection_key: Callable[[ServerRequestContext[Any, Any]], object | None],
    ) -> None:
        self.registry = registry
        self.principal_lookup = principal_lookup
        self.wide_connectors = wide_connectors
        self.output = output
        self.connection_key = connection_key
        self._levels: dict[object, types.LoggingLevel] = {}
        # uri -> connection key -> subscriber
        self._subscribers: dict[str, dict[object, _Subscriber]] = {}
        # uri -> the connector it is subscribed on downstream
        self._downstream: dict[str, Any] = {}
        self._listening: set[str] = set()

    # -- logging ----------------------------------------------------------------------------

    async def set_level(
        self, ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        key = self.connection_key(ctx)
        if key is not None:
            if len(self._levels) > _MAX_TRACKED:
                self._levels.clear()
            self._levels[key] = params.level
        return types.EmptyResult()

    def _log_wanted(self, key: object | None, level: types.LoggingLevel) -> bool:
        wanted = self._levels.get(key) if key is not None else None
        if wanted is None or level not in LOG_LEVELS:
            return True
        return LOG_LEVELS.index(level) >= LOG_LEVELS.index(wanted)

    # -- per-call relays --------------------------------------------------------------------

    def call_relay(
        self, ctx: ServerRequestContext[Any, Any], principal: Principal | None
    ) -> CallRelay | None:
        """Where a connector's traffic during this call may go: this request, of this agent."""
        return self.relay_for(
            principal,
            session=ctx.session,
            request_id=ctx.request_id,
            legacy=ctx.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS,
            key=self.connection_key(ctx),
        )

    def silent_relay(self, principal: Principal | None) -> CallRelay | None:
        """A relay that claims the call for its caller but carries nothing back (no stream)."""
        if principal is None:
            return None
        return CallRelay(owner=_owner(principal))

    def relay_for(
        self,
        principal: Principal | None,
        *,
        session: Any,
        request_id: Any,
        legacy: bool,
        key: object | None,
    ) -> CallRelay | None:
        """`call_relay` from its parts: ``session`` is the agent's `ServerSession` (or a proxy),
        ``request_id`` the call's JSON-RPC id, or None when the call has no stream of its own
        (the direct tool-call path answers with plain JSON), in which case log messages and
        requests for the agent travel on the session's standalone stream."""
        if principal is None:
            return None

        async def log(params: types.LoggingMessageNotificationParams) -> None:
            if not self._log_wanted(key, params.level):
                return
            shaped = self._shape(params.model_dump(mode="json", by_alias=True, exclude_none=True))
            if shaped is None:
                return
            await session.send_log_message(
                params.level,
                shaped.get("data"),
                logger=shaped.get("logger"),
                related_request_id=request_id,
            )

        async def sampling(
            params: types.CreateMessageRequestParams,
        ) -> types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData:
            caps = session.client_capabilities
            sampling_cap = caps.sampling if caps is not None else None
            if sampling_cap is None or (params.tools and sampling_cap.tools is None):
                return _unavailable("sampling")
            wire = self._shape(params.model_dump(mode="json", by_alias=True, exclude_none=True))
            if wire is None:
                return _unavailable("sampling")
            request = types.CreateMessageRequest(
                params=types.CreateMessageRequestParams.model_validate(wire, by_name=False)
            )
            result_type: type[types.CreateMessageResult | types.CreateMessageResultWithTools] = (
                types.CreateMessageResultWithTools if params.tools else types.CreateMessageResult
            )
            return await _ask(session, request, result_type, request_id)

        async def elicitation(
            params: types.ElicitRequestParams,
        ) -> types.ElicitResult | types.ErrorData:
            caps = session.client_capabilities
            cap = caps.elicitation if caps is not None else None
            if cap is None:
                return _unavailable("elicitation")
            # URL mode would send the agent's user to a page the connector chose; no policy
            # covers that, so it is refused. Form mode needs the form capability (an empty
            # elicitation object means form).
            if isinstance(params, types.ElicitRequestURLParams) or (
                cap.form is None and cap.url is not None
            ):
                return _unavailable("elicitation")
            wire = self._shape(params.model_dump(mode="json", by_alias=True, exclude_none=True))
            if wire is None:
                return _unavailable("elicitation")
            request = types.ElicitRequest.model_validate(
                {"method": "elicitation/create", "params": wire}, by_name=False
            )
            return await _ask(session, request, types.ElicitResult, request_id)

        return CallRelay(
            owner=_owner(principal),
            log=log,
            sampling=sampling if legacy else None,
            elicitation=elicitation if legacy else None,
        )

    def _shape(self, value: dict[str, Any]) -> dict[str, Any] | None:
        """``value`` as the output policy lets it reach an agent, or None (cut or refused)."""
        shaped = shape_result(value, self.output)
        if shaped.result is None or shaped.truncated:
            return None
        return shaped.result

    # -- resource subscriptions -------------------------------------------------------------

    def _readable(self, principal: Principal | None, uri: str) -> Any:
        route = self.registry.snapshot.resource_route(uri)
        if route is None or route.connector_id not in self.wide_connectors(principal):
            return None
        return route

    async def subscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        uri = str(params.uri)
        principal = self.principal_lookup(ctx)
        route = self._readable(principal, uri)
        key = self.connection_key(ctx)
        if route is None or principal is None:
            raise resource_not_found(uri)
        if key is None or ctx.protocol_version not in HANDSHAKE_PROTOCOL_VERSIONS:
            raise MCPError(
                code=types.INVALID_REQUEST,
                message="resources/subscribe needs a 2025-era session; use subscriptions/listen",
            )
        connector = route.connector
        subscribe = getattr(connector, "subscribe_resource", None)
        if subscribe is None:
            raise MCPError(code=types.INVALID_PARAMS, message="Resource cannot be subscribed to")
        if connector.id not in self._listening:
            self._listening.add(connector.id)
            connector.add_resource_listener(self._updated_from(connector.id))
        if self._downstream.get(uri) is not connector:
            try:
                await subscribe(uri)
            except ConnectorError as exc:
                logger.warning(
                    "resource subscription failed upstream",
                    extra={"connector": connector.id, "error": type(exc).__name__},
                )
                raise MCPError(code=types.INTERNAL_ERROR, message="upstream-unavailable") from None
            self._downstream[uri] = connector
        self._subscribers.setdefault(uri, {})[key] = _Subscriber(ctx.session, principal)
        return types.EmptyResult()

    async def unsubscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        uri = str(params.uri)
        principal = self.principal_lookup(ctx)
        route = self._readable(principal, uri)
        if route is None:
            raise resource_not_found(uri)
        key = self.connection_key(ctx)
        subscribers = self._subscribers.get(uri, {})
        subscribers.pop(key, None)
        if not subscribers:
            await self._drop(uri)
        return types.EmptyResult()

    async def _drop(self, uri: str) -> None:
        """No agent holds ``uri`` any more: end the downstream subscription (best effort)."""
        self._subscribers.pop(uri, None)
        connector = self._downstream.pop(uri, None)
        unsubscribe = getattr(connector, "unsubscribe_resource", None)
        if unsubscribe is None:
            return
        try:
            with anyio.fail_after(_NOTIFY_TIMEOUT):
                await unsubscribe(uri)
        except (ConnectorError, TimeoutError):
            logger.warning(
                "resource unsubscribe failed upstream", extra={"connector": connector.id}
            )

    def forget_agent(self, agent_id: str) -> None:
        for subscribers in self._subscribers.values():
            for key, sub in list(subscribers.items()):
                if sub.principal.agent_id == agent_id:
                    subscribers.pop(key, None)

    def _updated_from(self, connector_id: str) -> Callable[[str], Any]:
        async def updated(uri: str) -> None:
            for key, sub in list(self._subscribers.get(uri, {}).items()):
                route = self._readable(sub.principal, uri)
                if route is None or route.connector_id != connector_id:
                    continue  # no longer theirs to read (revoked, narrowed, moved)
                try:
                    with anyio.fail_after(_NOTIFY_TIMEOUT):
                        await sub.session.send_resource_updated(uri)
                except Exception:
                    self._subscribers.get(uri, {}).pop(key, None)

        return updated


def _unavailable(what: str) -> types.ErrorData:
    return types.ErrorData(
        code=types.INVALID_REQUEST, message=f"{what} is not available from this agent"
    )


def _owner(principal: Principal) -> str:
    """Whose calls a relay serves: one token of one agent."""
    return f"{principal.agent_id}\x00{principal.token_id}"


async def _ask(
    session: Any, request: Any, result_type: type[Any], request_id: types.RequestId | None
) -> Any:
    try:
        return await session.send_request(
            request, result_type, metadata=ServerMessageMetadata(related_request_id=request_id)
        )
    except MCPError as exc:
        return exc.error
    except Exception:
        logger.warning("relaying a request to the agent failed", extra={"method": request.method})
        return _unavailable(str(request.method).split("/")[0])
