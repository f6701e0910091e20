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
    "EgressPolicy",
    "HttpSpec",
    "JSONValue",
    "NativeSpec",
    "ProgressCallback",
    "ResourceLimits",
    "SandboxMode",
    "SandboxSpec",
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


class SandboxMode(StrEnum):
    """Whether a stdio connector must, may or must not run in a sandbox."""

    REQUIRED = "required"
    """Refuse to start where the platform cannot sandbox."""
    AUTO = "auto"
    """Sandbox where the platform can; otherwise run unsandboxed and log a warning each spawn."""
    OFF = "off"
    """Never sandbox (an explicit opt-out, shown by `describe_sandbox`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceLimits:
    """Per-process rlimits inside the sandbox (``None`` leaves that limit as inherited)."""

    address_space: int | None = 8 * 1024**3
    """RLIMIT_AS in bytes; Node reserves several GiB of address space, so keep this generous."""
    processes: int | None = 256
    """RLIMIT_NPROC (threads count). Counted per uid: see `SandboxSpec.uid`."""
    open_files: int | None = 1024
    """RLIMIT_NOFILE."""
    cpu_seconds: int | None = 3600
    """RLIMIT_CPU: cumulative CPU seconds of one child; past it the child is killed (restarted)."""
    file_size: int | None = 1024**3
    """RLIMIT_FSIZE in bytes: the largest file the child may write."""
    tmpfs_size: int = 64 * 1024**2
    """Size of the private /tmp in bytes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressPolicy:
    """Where a sandboxed connector may connect, through the broker's egress proxy only."""

    hosts: tuple[str, ...]
    """Names (``api.example.com``), subdomain wildcards (``*.example.com``) or IP literals."""
    ports: tuple[int, ...] = (80, 443)
    allow_private: bool = False
    """Allow RFC 1918, unique-local (fc00::/7) and CGNAT (100.64/10) addresses."""
    allow_networks: tuple[str, ...] = ()
    """CIDRs allowed even though they are refused by default (loopback, link-local, ...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxSpec:
    """How a stdio connector is jailed (see `connectors.sandbox` for what each field becomes)."""

    mode: SandboxMode = SandboxMode.AUTO
    read_paths: tuple[str, ...] = ()
    """Absolute paths shown read-only: the paths the connector's scopes name."""
    write_paths: tuple[str, ...] = ()
    """Absolute paths shown read-write (the connector's ``writable_paths``)."""
    runtime_paths: tuple[str, ...] = ()
    """Extra read-only runtime files beyond the discovered interpreter, venv and package."""
    deny_paths: tuple[str, ...] = ()
    """The broker's own files (config, keys, database): a mount that is, holds or sits inside one
    of these is refused."""
    egress: EgressPolicy | None = None
    """``None``: no network at all. Otherwise only the egress proxy, with this policy."""
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    uid: int = 65534
    gid: int = 65534
    """Identity inside the sandbox. When the broker runs as root this is also the host uid."""


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
    sandbox: SandboxSpec | None = None
    """``None``: not sandboxed (the library default; the broker's config defaults to ``auto``)."""
    expected_provenance: str | None = None
    """The approved provenance digest: a spawn whose executable or package differs is refused."""


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
