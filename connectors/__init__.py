"""Downstream tool providers behind one `Connector` protocol; never imports `broker`.

Three kinds, one contract (`connectors.base.Connector`), one error tree (`connectors.errors`):

- `StdioConnector`: an MCP server as a supervised child process (fixed argv, no shell,
  allowlisted environment, stderr to the ``connectors.stdio`` logger, restart with backoff,
  SIGTERM then SIGKILL of its process group on close).
- `HttpConnector`: an MCP server over streamable HTTP with the broker's own headers only,
  reconnecting with backoff.
- `NativeConnector`: Python functions registered on a `ToolSet`, served in-process.

Decisions shared by the MCP kinds: they speak the handshake era (``mode="legacy"``,
2025-11-25) because every server we run speaks it, ``list_changed`` then arrives as plain
notifications (the 2026 era needs a ``subscriptions/listen`` stream), the broker can answer
``roots/list``, and no ``server/discover`` probe is paid on every spawn. Every call has a
deadline (the ``timeout`` argument or ``spec.call_timeout``, capped at
``spec.max_call_timeout``) kept by our own cancel scope, so progress cannot extend it; on
expiry the downstream request is cancelled (``notifications/cancelled``) and `CallTimeout` is
raised. ``roots/list`` is answered from ``spec.roots`` only, and only advertised when there
are some. The connectors run their supervisor as an asyncio task (the broker runs on asyncio).
"""

from collections.abc import Mapping

from connectors.base import (
    ChangeKind,
    ChangeListener,
    Connector,
    ConnectorSpec,
    EgressPolicy,
    HttpSpec,
    JSONValue,
    NativeSpec,
    ProgressCallback,
    ResourceLimits,
    SandboxMode,
    SandboxSpec,
    StdioSpec,
)
from connectors.egress import EgressEvent, EgressProxy
from connectors.errors import (
    CallTimeout,
    ConnectorBroken,
    ConnectorClosed,
    ConnectorConfigError,
    ConnectorError,
    DownstreamError,
)
from connectors.mcp_http import HttpConnector
from connectors.mcp_stdio import StdioConnector, child_environment
from connectors.native import NativeConnector, Progress, ToolError, ToolSet
from connectors.provenance import (
    PROVENANCE_PIN_NAME,
    Provenance,
    ProvenanceChanged,
    connector_provenance,
    pinned_provenance_digest,
    provenance_pin_definition,
)
from connectors.sandbox import SandboxUnavailable, describe_sandbox, probe_sandbox

__all__ = [
    "CallTimeout",
    "ChangeKind",
    "ChangeListener",
    "Connector",
    "ConnectorBroken",
    "ConnectorClosed",
    "ConnectorConfigError",
    "ConnectorError",
    "ConnectorSpec",
    "DownstreamError",
    "EgressEvent",
    "EgressPolicy",
    "EgressProxy",
    "HttpConnector",
    "HttpSpec",
    "JSONValue",
    "NativeConnector",
    "NativeSpec",
    "PROVENANCE_PIN_NAME",
    "Progress",
    "ProgressCallback",
    "Provenance",
    "ProvenanceChanged",
    "ResourceLimits",
    "SandboxMode",
    "SandboxSpec",
    "SandboxUnavailable",
    "StdioConnector",
    "StdioSpec",
    "ToolError",
    "ToolSet",
    "child_environment",
    "connector_provenance",
    "describe_sandbox",
    "open_connector",
    "pinned_provenance_digest",
    "probe_sandbox",
    "provenance_pin_definition",
]


def open_connector(
    spec: ConnectorSpec,
    *,
    environ: Mapping[str, str] | None = None,
    egress: EgressProxy | None = None,
) -> Connector:
    """Build the connector for ``spec`` (not started: call ``await connector.start()``).

    ``environ`` is the broker's environment a stdio child's allowlist draws from
    (default: ``os.environ``); ``egress`` is the proxy a sandboxed stdio connector that
    declares egress reaches the network through.

    Raises:
        ConnectorConfigError: the spec cannot work (empty command, bad native target, bad
            sandbox paths, egress declared without a proxy).
        SandboxUnavailable: the spec requires a sandbox this platform cannot provide.
    """
    match spec:
        case StdioSpec():
            return StdioConnector(spec, environ=environ, egress=egress)
        case HttpSpec():
            return HttpConnector(spec)
        case NativeSpec():
            return NativeConnector(spec)
