"""The Connector protocol and its value types: one seam for every kind of downstream tool source.

Connectors speak `mcp.types` values (the broker is an MCP server, so no translation is needed on
the hot path). They never import `broker`: the broker resolves secrets and configuration and
hands a connector a finished spec.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

import mcp.types as types

__all__ = [
    "ChangeKind",
    "ChangeListener",
    "Connector",
    "ConnectorSpec",
    "HttpSpec",
    "JSONValue",
    "NativeSpec",
    "ProgressCallback",
    "StdioSpec",
]

JSONValue = str | int | float | bool | None | list["JSONValue"] | dict[str, "JSONValue"]

ProgressCallback = Callable[[float, float | None, str | None], Awaitable[None]]
"""Called with (progress, total, message) for each downstream progress notification."""


class ChangeKind(StrEnum):
    """What changed downstream; the broker re-lists and re-checks pins on each."""

    TOOLS = "tools"
    RESOURCES = "resources"
    PROMPTS = "prompts"
    RESTARTED = "restarted"


ChangeListener = Callable[[ChangeKind], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class _BaseSpec:
    id: str
    call_timeout: float = 30.0
    """Default per-call deadline in seconds."""
    max_call_timeout: float = 300.0
    """Hard maximum per call, enforced even while progress keeps arriving."""
    roots: tuple[str, ...] = ()
    """Filesystem roots the broker answers `roots/list` with (file:// URIs are built from these)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StdioSpec(_BaseSpec):
    """An MCP server run as a subprocess: fixed argv, no shell, allowlisted environment."""

    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict[str, str])
    """Extra environment (already resolved from env:/file: references by the broker)."""
    env_allowlist: tuple[str, ...] = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
    """Names copied from the broker's own environment; nothing else is inherited."""
    cwd: str | None = None
    restart_backoff: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 5.0)
    max_restarts: int = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpSpec(_BaseSpec):
    """An MCP server reached over streamable HTTP with the broker's own credentials."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict[str, str])
    """Already resolved from env:/file: references; never an agent's token."""
    connect_timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class NativeSpec(_BaseSpec):
    """In-process Python tools: ``target`` is ``"package.module:attribute"`` naming a ToolSet."""

    target: str


ConnectorSpec = StdioSpec | HttpSpec | NativeSpec


@runtime_checkable
class Connector(Protocol):
    """A started downstream tool source.

    Every method may raise `connectors.errors.ConnectorError` subclasses:
    `ConnectorClosed` (we closed it), `ConnectorBroken` (it died; the cause is kept),
    `CallTimeout` (the deadline passed; the downstream call was cancelled).
    Downstream *tool* errors are not exceptions: they come back as results with ``is_error``.
    """

    @property
    def id(self) -> str: ...

    @property
    def capabilities(self) -> types.ServerCapabilities: ...

    async def start(self) -> None:
        """Connect (spawn, handshake). Idempotent."""
        ...

    async def list_tools(self) -> list[types.Tool]: ...

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, JSONValue],
        *,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a per-call deadline is the contract
    ) -> types.CallToolResult:
        """Call ``name`` (the downstream name, not the prefixed one) within a deadline.

        ``timeout`` defaults to the spec's ``call_timeout`` and is capped at ``max_call_timeout``.
        Cancelling the awaiting task cancels the downstream call.
        """
        ...

    async def list_resources(self) -> list[types.Resource]: ...

    async def list_resource_templates(self) -> list[types.ResourceTemplate]: ...

    async def read_resource(self, uri: str) -> types.ReadResourceResult: ...

    async def list_prompts(self) -> list[types.Prompt]: ...

    async def get_prompt(
        self, name: str, arguments: Mapping[str, str] | None = None
    ) -> types.GetPromptResult: ...

    async def complete(
        self,
        ref: types.PromptReference | types.ResourceTemplateReference,
        argument: Mapping[str, str],
        context_arguments: Mapping[str, str] | None = None,
    ) -> types.Completion: ...

    def add_change_listener(self, listener: ChangeListener) -> None:
        """Be told when the downstream lists change or the connector restarted."""
        ...

    async def aclose(self) -> None:
        """Stop: SIGTERM then SIGKILL for subprocesses, cancel in-flight calls. Idempotent."""
        ...
