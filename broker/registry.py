"""Connector registry: builds connectors from configuration, aggregates, names and pins their tools.

Shell module (asyncio/anyio, connectors, the store). What agents can reach is an immutable
`Snapshot`, rebuilt only when something changes and swapped in one assignment, so the per-call
lookup is one dict access with no per-call work.

Naming: a connector's tool ``t`` is exposed as ``{prefix}__{t}`` (``prefix`` defaults to the
connector id; ``""`` exposes ``t`` unprefixed). Prompts are named the same way. An exposed name
outside ``[A-Za-z0-9_.-]{1,128}`` is refused (the tool stays hidden and a problem is recorded);
two connectors with the same prefix, or producing the same exposed name, are refused when the
registry starts (`ConfigError` naming both connectors). A collision that appears later at run
time hides the newcomer's tool and records a problem instead of taking the broker down.

Pinning (rug-pull protection): every listed tool's pinned definition is recorded with
``store.upsert_seen_pin``. A tool is exposed only when the digest seen *now* equals the approved
digest, and then with the *approved* definition exactly (renamed), never the downstream's copy.
After a downstream ``list_changed`` or a restart the connector is re-listed and re-pinned; a
definition that changed hides the tool at once (calls answer ``tool-definition-changed``).

Provenance (issue 8): for every stdio connector built from config the registry also pins what
it runs (`connectors.provenance`) as the pseudo-tool ``@provenance`` of that connector, in the
same pin table. Until that pin is approved the connector exposes no tool (``tool-unapproved``);
when what it runs differs from the approved provenance its tools answer
``tool-definition-changed`` and the connector is kept down (closed, not restarted) until the new
provenance is approved, after which it is rebuilt with the approved digest as
``StdioSpec.expected_provenance``, so every later spawn is refused if the files change again.
Provenance is checked at start, at every re-list (restart, ``list_changed``) and at every spawn;
not continuously in between.

Approvals made by another process (``broker connectors approve`` on the shared store) are noticed
by polling the pins every ``pin_poll_interval`` seconds (default 2): one ``list_pins()`` query,
and a rebuild only when something relevant changed. The same poll retries connectors whose last
listing failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import anyio
import mcp.types as types
from pydantic import ValidationError

from broker.config import BrokerConfig, ConnectorConfig, resolve_secret
from broker.core.decision import Reason
from broker.core.pinning import PinStatus, ToolPin, definition_digest, pinned_definition
from broker.errors import BrokerError, ConfigError
from broker.ports import Clock, Store, StoredConnector, SystemClock
from connectors import (
    PROVENANCE_PIN_NAME,
    ChangeKind,
    Connector,
    ConnectorError,
    ConnectorSpec,
    EgressPolicy,
    EgressProxy,
    HttpSpec,
    NativeSpec,
    ProvenanceChanged,
    ResourceLimits,
    SandboxMode,
    SandboxSpec,
    StdioSpec,
    child_environment,
    connector_provenance,
    open_connector,
    pinned_provenance_digest,
    provenance_pin_definition,
)
from scopes import ScopeDefinition

__all__ = [
    "NAME_RE",
    "PromptRoute",
    "Registry",
    "ResourceRoute",
    "Snapshot",
    "SnapshotChange",
    "TemplateRoute",
    "ToolRoute",
    "broker_private_paths",
    "build_spec",
    "connector_configs",
    "exposed_name",
    "scope_read_paths",
]

logger = logging.getLogger("broker.registry")

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
SEPARATOR = "__"


def exposed_name(prefix: str, name: str) -> str:
    """The name agents see: ``{prefix}__{name}``, or ``name`` when the prefix is empty."""
    return f"{prefix}{SEPARATOR}{name}" if prefix else name


# -- the snapshot: what agents can reach -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolRoute:
    """One exposed tool name and where it goes. ``tool`` is None when the tool is disabled."""

    name: str
    connector_id: str
    tool_name: str
    """The downstream name (what grants match and what the connector is called with)."""
    connector: Connector
    tool: types.Tool | None
    """The approved definition under the exposed name; None when pending or changed."""
    disabled: Reason | None
    """``tool-unapproved`` (never approved) or ``tool-definition-changed``; None when exposed."""
    digest: str
    """Digest of the definition seen most recently."""


@dataclass(frozen=True, slots=True)
class PromptRoute:
    name: str
    connector_id: str
    prompt_name: str
    connector: Connector
    prompt: types.Prompt
    """Under the exposed name."""


@dataclass(frozen=True, slots=True)
class ResourceRoute:
    connector_id: str
    connector: Connector
    resource: types.Resource


@dataclass(frozen=True, slots=True)
class TemplateRoute:
    connector_id: str
    connector: Connector
    template: types.ResourceTemplate
    pattern: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything agents can reach, immutable; replaced whole on every change."""

    version: int
    tools: Mapping[str, ToolRoute]
    """Every routable exposed name, disabled ones included (they answer with their reason)."""
    listed: tuple[ToolRoute, ...]
    """Enabled tools, sorted by name (what ``tools/list`` may show)."""
    input_schemas: Mapping[str, Mapping[str, Any]]
    prompts: Mapping[str, PromptRoute]
    resources: Mapping[str, ResourceRoute]
    templates: tuple[TemplateRoute, ...]
    connectors: Mapping[str, Connector]
    problems: tuple[str, ...] = ()
    """Human-readable refusals (bad names, late collisions, failed listings)."""

    def resource_route(self, uri: str) -> ResourceRoute | TemplateRoute | None:
        """The connector that listed ``uri``, else the first whose template matches it."""
        route = self.resources.get(uri)
        if route is not None:
            return route
        for template in self.templates:
            if template.pattern.fullmatch(uri):
                return template
        return None

    def template_route(self, uri_template: str) -> TemplateRoute | None:
        for template in self.templates:
            if template.template.uri_template == uri_template:
                return template
        return None


EMPTY = Snapshot(
    version=0,
    tools=MappingProxyType({}),
    listed=(),
    input_schemas=MappingProxyType({}),
    prompts=MappingProxyType({}),
    resources=MappingProxyType({}),
    templates=(),
    connectors=MappingProxyType({}),
)


@dataclass(frozen=True, slots=True)
class SnapshotChange:
    """What changed between two snapshots, as agents would notice it."""

    snapshot: Snapshot
    tools: bool
    prompts: bool
    resources: bool


ChangeCallback = Callable[[SnapshotChange], Awaitable[None]]


# -- configuration -> specs ---------------------------------------------------------------------


def connector_configs(
    config: BrokerConfig, stored: Sequence[StoredConnector] = ()
) -> list[ConnectorConfig]:
    """``config.connectors`` then the connectors added with the CLI, validated like config.

    Raises:
        ConfigError: a stored connector is invalid, or its id is also in the config file.
    """
    out = list(config.connectors)
    seen = {c.id for c in out}
    for item in stored:
        try:
            parsed = ConnectorConfig.model_validate(dict(item.spec))
        except ValidationError as exc:
            raise ConfigError(
                f"stored connector '{item.id}' is invalid: {exc.errors()[0]['msg']}"
            ) from None
        if parsed.id in seen:
            raise ConfigError(
                f"connector id '{parsed.id}' is both in the config file and in the store "
                f"(remove one: `broker connectors remove {parsed.id}`)"
            )
        seen.add(parsed.id)
        out.append(parsed)
    return out


def scope_read_paths(connector_id: str, scopes: Iterable[ScopeDefinition]) -> tuple[str, ...]:
    """The ``within`` roots of every scope grant naming ``connector_id``, sorted, unique."""
    roots: set[str] = set()
    for definition in scopes:
        for grant in definition.grants:
            if grant.connector != connector_id:
                continue
            for constraint in grant.constraints.items:
                for name, operand in constraint.operators:
                    if name != "within":
                        continue
                    values = operand if isinstance(operand, tuple) else (operand,)
                    roots.update(str(v) for v in values if isinstance(v, str))  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
    return tuple(sorted(roots))


def broker_private_paths(
    config: BrokerConfig, environ: Mapping[str, str], config_file: Path | None = None
) -> tuple[str, ...]:
    """What no sandbox may show: the config file, the keys dir, the recording key, the SQLite
    database (with its -wal/-shm) and every ``file:`` secret of every connector."""
    base = config.base_dir
    paths: list[Path] = []
    if config_file is None:
        named = environ.get("BROKER_CONFIG")
        config_file = Path(named) if named else base / "broker.toml"
    paths.append(config_file if config_file.is_absolute() else base / config_file)
    paths.append(config.tokens.keys_dir)
    refs = [config.recording.hmac_key]
    for c in config.connectors:
        refs += [*c.env.values(), *c.headers.values()]
    for ref in refs:
        if ref.startswith("file:"):
            p = Path(ref[5:])
            paths.append(p if p.is_absolute() else base / p)
    prefix = "sqlite+aiosqlite:///"
    if config.store.url.startswith(prefix):
        db = config.store.url[len(prefix) :]
        if db and db != ":memory:":
            p = Path(db) if Path(db).is_absolute() else base / db
            paths += [p, Path(f"{p}-wal"), Path(f"{p}-shm"), Path(f"{p}-journal")]
    return tuple(dict.fromkeys(os.path.abspath(p) for p in paths))


def build_spec(
    c: ConnectorConfig,
    environ: Mapping[str, str],
    base_dir: Path,
    *,
    scopes: Iterable[ScopeDefinition] = (),
    deny_paths: Sequence[str] = (),
    expected_provenance: str | None = None,
) -> ConnectorSpec:
    """The connector spec for ``c`` with every ``env:``/``file:`` reference resolved.

    A stdio spec carries its sandbox: the ``within`` roots of the grants in ``scopes`` naming
    this connector read-only (none by default: a connector sees no data unless a scope names
    it), ``writable_paths`` read-write, ``deny_paths`` (see `broker_private_paths`) refused.

    Raises:
        ConfigError: a referenced variable is unset or a referenced file unreadable.
    """
    roots = tuple(str(r if Path(r).is_absolute() else base_dir / r) for r in c.roots)
    common: dict[str, Any] = {
        "id": c.id,
        "call_timeout": c.call_timeout,
        "max_call_timeout": c.max_call_timeout,
        "roots": roots,
    }
    if c.kind == "stdio":
        assert c.command is not None  # noqa: S101 - ConnectorConfig checked it
        return StdioSpec(
            **common,
            command=c.command,
            args=c.args,
            env={k: resolve_secret(v, environ, base_dir) for k, v in c.env.items()},
            env_allowlist=c.env_allowlist,
            cwd=str(c.cwd) if c.cwd is not None else None,
            sandbox=_sandbox_spec(c, scopes, deny_paths),
            expected_provenance=expected_provenance,
        )
    if c.kind == "http":
        assert c.url is not None  # noqa: S101 - ConnectorConfig checked it
        return HttpSpec(
            **common,
            url=c.url,
            headers={k: resolve_secret(v, environ, base_dir) for k, v in c.headers.items()},
        )
    assert c.target is not None  # noqa: S101 - ConnectorConfig checked it
    return NativeSpec(**common, target=c.target)


def _sandbox_spec(
    c: ConnectorConfig, scopes: Iterable[ScopeDefinition], deny_paths: Sequence[str]
) -> SandboxSpec:
    read_paths: list[str] = []
    for root in scope_read_paths(c.id, scopes):
        if os.path.lexists(root):
            read_paths.append(root)
        else:
            # Nothing to show; the grant still checks arguments against it.
            logger.warning(
                "scope root missing; not shown in the sandbox", extra={"connector": c.id}
            )
    limits = c.limits
    mib = 1024 * 1024
    egress = (
        EgressPolicy(
            hosts=c.egress.hosts,
            ports=c.egress.ports,
            allow_private=c.egress.allow_private,
            allow_networks=c.egress.allow_networks,
        )
        if c.egress is not None
        else None
    )
    return SandboxSpec(
        mode=SandboxMode(c.sandbox),
        read_paths=tuple(read_paths),
        write_paths=tuple(str(p) for p in c.writable_paths),
        runtime_paths=tuple(str(p) for p in c.runtime_paths),
        deny_paths=tuple(deny_paths),
        egress=egress,
        limits=ResourceLimits(
            address_space=limits.address_space_mb * mib,
            processes=limits.processes,
            open_files=limits.open_files,
            cpu_seconds=limits.cpu_seconds,
            file_size=limits.file_size_mb * mib,
            tmpfs_size=limits.tmpfs_mb * mib,
        ),
        uid=c.sandbox_uid,
        gid=c.sandbox_gid,
    )


def _approved_provenance(pins: Iterable[ToolPin]) -> str | None:
    """The approved provenance digest among a connector's pins (None when never approved)."""
    for pin in pins:
        if pin.tool_name == PROVENANCE_PIN_NAME and pin.approved_definition is not None:
            try:
                return pinned_provenance_digest(pin.approved_definition)
            except (KeyError, TypeError):
                return None
    return None


# -- per-connector state -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Seen:
    name: str
    definition: Mapping[str, Any]
    digest: str


@dataclass(frozen=True, slots=True)
class _Origin:
    """How the registry (re)builds a stdio connector whose provenance it pins."""

    spec: StdioSpec
    environ: Mapping[str, str]
    egress: EgressProxy | None


@dataclass(slots=True)
class _Source:
    connector: Connector
    prefix: str
    origin: _Origin | None = None
    provenance: ToolPin | None = None
    """The ``@provenance`` pin as last seen (stdio connectors built from config only)."""
    expected: str | None = None
    """The provenance digest the running connector's spawns are checked against."""
    held: bool = False
    """Kept down: what it runs differs from the approved provenance."""
    tools: tuple[_Seen, ...] = ()
    pins: dict[str, ToolPin] = field(default_factory=dict[str, ToolPin])
    resources: tuple[types.Resource, ...] = ()
    templates: tuple[types.ResourceTemplate, ...] = ()
    prompts: tuple[types.Prompt, ...] = ()
    dirty: set[ChangeKind] = field(default_factory=set[ChangeKind])
    failure: str | None = "not listed yet"

    @property
    def id(self) -> str:
        return self.connector.id


class Registry:
    """The connectors agents reach through the broker, and the snapshot of what they expose.

    Use as ``async with registry:`` (starts every connector, lists and pins, then keeps the
    snapshot current in the background) or call `start` / `aclose` yourself.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock | None = None,
        pin_poll_interval: float = 2.0,
    ) -> None:
        self._store = store
        self._clock: Clock = clock or SystemClock()
        self._poll = pin_poll_interval
        self._sources: dict[str, _Source] = {}
        self._snapshot = EMPTY
        self._listeners: list[ChangeCallback] = []
        self._lock = anyio.Lock()
        self._wake = anyio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._stale: dict[str, anyio.Event] = {}
        self._started = False

    @classmethod
    async def from_config(
        cls,
        config: BrokerConfig,
        store: Store,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Clock | None = None,
        pin_poll_interval: float = 2.0,
        extra: Iterable[tuple[Connector, str | None]] = (),
        scopes: Iterable[ScopeDefinition] = (),
        egress: EgressProxy | None = None,
    ) -> Registry:
        """A registry holding the configured and stored connectors (not started yet).

        ``extra`` adds ready-made connectors (e.g. native tool sets) with their prefixes.
        ``scopes`` decide what each stdio sandbox shows (none: no data paths); ``egress`` is
        the proxy of connectors that declare egress.

        Raises:
            ConfigError: a connector is invalid, a secret reference cannot be resolved, two
                connectors share a prefix, or a connector requires a sandbox this platform
                cannot provide (the message names the connector and why).
        """
        env = os.environ if environ is None else environ
        scope_list = list(scopes)
        deny = broker_private_paths(config, env)
        registry = cls(store, clock=clock, pin_poll_interval=pin_poll_interval)
        for c in connector_configs(config, await store.list_connectors()):
            try:
                spec = build_spec(c, env, config.base_dir, scopes=scope_list, deny_paths=deny)
                if isinstance(spec, StdioSpec):
                    expected = _approved_provenance(await store.get_pins(c.id))
                    registry.add_stdio(
                        spec,
                        environ=env,
                        egress=egress,
                        prefix=c.tool_prefix,
                        expected_provenance=expected,
                    )
                else:
                    registry.add(open_connector(spec, environ=env), prefix=c.tool_prefix)
            except ConnectorError as exc:
                raise ConfigError(f"connector '{c.id}': {exc}") from None
        for connector, prefix in extra:
            registry.add(connector, prefix=prefix)
        return registry

    # -- registration ------------------------------------------------------------------------

    def add(self, connector: Connector, *, prefix: str | None = None) -> None:
        """Register ``connector`` before `start` (its tools appear once listed and approved).

        Raises:
            ConfigError: the id is taken, the prefix is malformed, or another connector has the
                same non-empty prefix.
        """
        tool_prefix = connector.id if prefix is None else prefix
        if connector.id in self._sources:
            raise ConfigError(f"connector id '{connector.id}' is registered twice")
        if tool_prefix and not NAME_RE.fullmatch(tool_prefix):
            raise ConfigError(
                f"connector '{connector.id}': prefix {tool_prefix!r} must match [A-Za-z0-9_.-]"
            )
        for other in self._sources.values():
            if tool_prefix and other.prefix == tool_prefix:
                raise ConfigError(
                    f"connectors '{other.id}' and '{connector.id}' both use the tool prefix "
                    f"'{tool_prefix}': give one of them another prefix"
                )
        self._sources[connector.id] = _Source(connector, tool_prefix)
        connector.add_change_listener(self._listener_for(connector.id))

    def add_stdio(
        self,
        spec: StdioSpec,
        *,
        environ: Mapping[str, str],
        egress: EgressProxy | None = None,
        prefix: str | None = None,
        expected_provenance: str | None = None,
    ) -> Connector:
        """Build and `add` a stdio connector whose provenance the registry pins (see the module
        docstring); ``expected_provenance`` is the approved digest, if any.

        Raises:
            ConnectorError: the spec cannot work (bad sandbox paths, a required sandbox the
                platform cannot provide, egress without a proxy).
            ConfigError: as `add`.
        """
        base = dataclasses.replace(spec, expected_provenance=None)
        connector = open_connector(
            dataclasses.replace(spec, expected_provenance=expected_provenance),
            environ=environ,
            egress=egress,
        )
        self.add(connector, prefix=prefix)
        source = self._sources[connector.id]
        source.origin = _Origin(base, environ, egress)
        source.expected = expected_provenance
        return connector

    async def register(self, connector: Connector, *, prefix: str | None = None) -> Snapshot:
        """Add, start, list and pin one connector while the registry runs.

        Raises:
            ConfigError: as `add`, or its names collide with another connector's (the connector
                is closed and forgotten).
        """
        async with self._lock:
            self.add(connector, prefix=prefix)
            source = self._sources[connector.id]
            await self._relist(source, first=True)
            try:
                snapshot = self._build(strict=True)
            except ConfigError:
                del self._sources[connector.id]
                await connector.aclose()
                raise
            await self._swap(snapshot)
        return snapshot

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def start(self) -> Snapshot:
        """Start every connector, list and pin, build the first snapshot, begin watching.

        A connector that cannot start is logged and exposes nothing until a later retry.

        Raises:
            ConfigError: exposed names collide between connectors (nothing is left running).
        """
        async with self._lock:
            async with anyio.create_task_group() as tg:
                for source in self._sources.values():
                    tg.start_soon(self._relist, source, True)
            try:
                snapshot = self._build(strict=True)
            except ConfigError:
                await self._close_all()
                raise
            await self._swap(snapshot)
        # A plain task, not a task group: the registry is entered and exited from different
        # tasks by hosts such as test fixtures and Starlette lifespans.
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(), name="registry watcher"
        )
        self._started = True
        return snapshot

    async def aclose(self) -> None:
        """Stop watching and close every connector. Idempotent."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait([watcher])
        await self._close_all()

    async def _close_all(self) -> None:
        with anyio.CancelScope(shield=True):
            for source in self._sources.values():
                try:
                    await source.connector.aclose()
                except Exception:
                    logger.exception("connector close failed", extra={"connector": source.id})

    # -- reading -----------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def input_schema(self, name: str) -> Mapping[str, Any] | None:
        """The exposed tool's approved input schema (for the SDK's 2026 header validation)."""
        return self._snapshot.input_schemas.get(name)

    def connector(self, connector_id: str) -> Connector | None:
        source = self._sources.get(connector_id)
        return source.connector if source else None

    def is_stale(self, connector_id: str) -> bool:
        """Whether the connector announced a tool change (or restarted) not yet re-listed."""
        return connector_id in self._stale

    async def settled(self, connector_id: str, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
        """Wait (at most ``timeout`` seconds) until a stale connector was re-listed."""
        event = self._stale.get(connector_id)
        if event is None:
            return True
        with anyio.move_on_after(timeout):
            await event.wait()
            return True
        return False

    def add_listener(self, callback: ChangeCallback) -> None:
        """``callback(change)`` runs after every snapshot change agents could notice."""
        self._listeners.append(callback)

    # -- keeping current ---------------------------------------------------------------------

    async def refresh(self, connector_id: str | None = None) -> Snapshot:
        """Re-list and re-pin one connector (or all) now, and swap in the new snapshot."""
        settled: list[anyio.Event] = []
        async with self._lock:
            for source in self._sources.values():
                if connector_id is None or source.id == connector_id:
                    stale = self._stale.pop(source.id, None)
                    if stale is not None:
                        settled.append(stale)
                    await self._relist(source, first=False)
            snapshot = self._build(strict=False)
            await self._swap(snapshot)
        for event in settled:
            event.set()
        return snapshot

    async def reload_pins(self) -> Snapshot:
        """Read the pins from the store (approvals made elsewhere); swap when they matter."""
        async with self._lock:
            try:
                pins = await self._store.list_pins()
            except BrokerError:
                logger.exception("reading tool pins failed")
                return self._snapshot
            changed = False
            by_source: dict[str, dict[str, ToolPin]] = {}
            for pin in pins:
                by_source.setdefault(pin.connector_id, {})[pin.tool_name] = pin
            for source in self._sources.values():
                fresh = by_source.get(source.id, {})
                current = {t.name: fresh[t.name] for t in source.tools if t.name in fresh}
                if _pin_view(current) != _pin_view(source.pins):
                    source.pins = current
                    changed = True
                provenance = fresh.get(PROVENANCE_PIN_NAME)
                if source.origin is not None and provenance is not None:
                    known = source.provenance
                    if known is None or _pin_view({"": known}) != _pin_view({"": provenance}):
                        source.provenance = provenance
                        changed = True
                        if source.held and provenance.approved_digest == provenance.digest:
                            await self._relist(source, first=False)
            if changed:
                await self._swap(self._build(strict=False))
            return self._snapshot

    def _listener_for(self, connector_id: str) -> Callable[[ChangeKind], Awaitable[None]]:
        async def on_change(kind: ChangeKind) -> None:
            # Called from the connector's receive loop: only mark and wake, never re-list here
            # (a request from inside the loop that must answer it would deadlock).
            source = self._sources.get(connector_id)
            if source is not None:
                source.dirty.add(kind)
                if kind in (ChangeKind.TOOLS, ChangeKind.RESTARTED):
                    # Calls to this connector wait for the re-list: a changed tool must not be
                    # called between the downstream's notice and its re-pinning.
                    self._stale.setdefault(connector_id, anyio.Event())
                self._wake.set()

        return on_change

    async def _watch(self) -> None:
        while True:
            with anyio.move_on_after(self._poll):
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self._catch_up()
            except Exception:
                logger.exception("registry refresh failed")

    async def _catch_up(self) -> None:
        settled: list[anyio.Event] = []
        async with self._lock:
            touched = False
            for source in self._sources.values():
                # A held connector waits for approval (reload_pins) rather than re-hashing.
                if source.dirty or (source.failure is not None and not source.held):
                    source.dirty.clear()
                    stale = self._stale.pop(source.id, None)
                    if stale is not None:
                        settled.append(stale)
                    await self._relist(source, first=False)
                    touched = True
            if touched:
                await self._swap(self._build(strict=False))
        for event in settled:
            event.set()
        await self.reload_pins()

    async def _relist(self, source: _Source, first: bool) -> None:
        """List everything the connector offers and pin its tools; failures hide it all."""
        if source.origin is not None:
            try:
                runnable = await self._check_provenance(source)
            except (ConnectorError, BrokerError, OSError) as exc:
                logger.error("connector provenance failed", extra={"connector": source.id})
                source.failure = f"connector '{source.id}' provenance could not be read: {exc}"
                source.tools, source.pins = (), {}
                source.resources, source.templates, source.prompts = (), (), ()
                return
            if not runnable:
                return
        connector = source.connector
        try:
            await connector.start()
            listed = await connector.list_tools()
            caps = connector.capabilities
            resources: list[types.Resource] = []
            templates: list[types.ResourceTemplate] = []
            prompts: list[types.Prompt] = []
            if caps.resources is not None:
                resources = await connector.list_resources()
                templates = await connector.list_resource_templates()
            if caps.prompts is not None:
                prompts = await connector.list_prompts()
            seen: list[_Seen] = []
            for tool in listed:
                wire = tool.model_dump(by_alias=True, exclude_none=True, mode="json")
                definition = pinned_definition(wire)
                seen.append(_Seen(tool.name, definition, definition_digest(definition)))
            pins = await self._pin(source, seen)
        except ProvenanceChanged:
            # Changed between our check and the spawn: re-pin, which holds the connector down.
            source.provenance = None
            source.held = False
            if source.origin is not None:
                with contextlib.suppress(ConnectorError, BrokerError, OSError):
                    await self._check_provenance(source)
            source.failure = (
                f"connector '{source.id}' runs something other than what was approved "
                f"(provenance changed): approve it with `broker connectors approve {source.id}`"
            )
            return
        except (ConnectorError, BrokerError) as exc:
            level = logging.ERROR if first else logging.WARNING
            logger.log(level, "listing a connector failed", extra={"connector": source.id})
            source.failure = f"connector '{source.id}' could not be listed: {exc}"
            source.tools, source.pins = (), {}
            source.resources, source.templates, source.prompts = (), (), ()
            return
        source.tools = tuple(seen)
        source.pins = pins
        source.resources, source.templates, source.prompts = (
            tuple(resources),
            tuple(templates),
            tuple(prompts),
        )
        source.failure = None

    async def _check_provenance(self, source: _Source) -> bool:
        """Pin what ``source`` runs; False (connector closed, tools kept but disabled) when it
        differs from the approved provenance. Rebuilds a stopped connector after approval.

        Raises:
            ConnectorError: the command cannot be resolved.
            BrokerError: the pin cannot be written.
            OSError: a file cannot be read.
        """
        origin = source.origin
        assert origin is not None  # noqa: S101 - only called for built stdio sources
        env = child_environment(origin.spec, origin.environ)
        provenance = await anyio.to_thread.run_sync(connector_provenance, origin.spec, env)
        definition = provenance_pin_definition(provenance)
        digest = definition_digest(definition)
        pin = source.provenance
        if pin is None or pin.digest != digest:
            pin = await self._store.upsert_seen_pin(
                source.id, PROVENANCE_PIN_NAME, digest, definition, self._clock.now()
            )
        source.provenance = pin
        if pin.approved_digest is not None and pin.approved_digest != digest:
            logger.warning(
                "connector provenance changed; connector disabled until approved",
                extra={"connector": source.id, "digest": digest},
            )
            if not source.held:
                source.held = True
                await self._stop(source)
            source.failure = (
                f"connector '{source.id}' runs something other than what was approved "
                f"(provenance changed): approve it with `broker connectors approve {source.id}`"
            )
            return False
        expected = _approved_provenance([pin])
        outdated = expected is not None and expected != source.expected
        # A running, healthy connector keeps going; a stopped or failed one restarts checked.
        if source.held or (outdated and source.failure is not None):
            await self._rebuild(source, expected)
        source.held = False
        return True

    async def _stop(self, source: _Source) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await source.connector.aclose()
            except Exception:
                logger.exception("connector close failed", extra={"connector": source.id})

    async def _rebuild(self, source: _Source, expected: str | None) -> None:
        origin = source.origin
        assert origin is not None  # noqa: S101 - only called for built stdio sources
        await self._stop(source)
        source.connector = open_connector(
            dataclasses.replace(origin.spec, expected_provenance=expected),
            environ=origin.environ,
            egress=origin.egress,
        )
        source.connector.add_change_listener(self._listener_for(source.id))
        source.expected = expected

    async def _pin(self, source: _Source, seen: Sequence[_Seen]) -> dict[str, ToolPin]:
        pins: dict[str, ToolPin] = {}
        now = self._clock.now()
        for item in seen:
            known = source.pins.get(item.name)
            if known is not None and known.digest == item.digest:
                pins[item.name] = known
                continue
            pin = await self._store.upsert_seen_pin(
                source.id, item.name, item.digest, item.definition, now
            )
            if pin.status is PinStatus.CHANGED:
                logger.warning(
                    "tool definition changed; tool disabled until approved",
                    extra={"connector": source.id, "tool": item.name, "digest": item.digest},
                )
            pins[item.name] = pin
        return pins

    async def _swap(self, snapshot: Snapshot) -> None:
        old, self._snapshot = self._snapshot, snapshot
        change = SnapshotChange(
            snapshot,
            tools=[r.tool for r in old.listed] != [r.tool for r in snapshot.listed],
            prompts=[p.prompt for p in old.prompts.values()]
            != [p.prompt for p in snapshot.prompts.values()],
            resources=list(old.resources) != list(snapshot.resources)
            or [t.template for t in old.templates] != [t.template for t in snapshot.templates],
        )
        if not (change.tools or change.prompts or change.resources) or not self._started:
            return
        for callback in list(self._listeners):
            try:
                await callback(change)
            except Exception:
                logger.exception("snapshot listener failed")

    # -- building ----------------------------------------------------------------------------

    def _build(self, *, strict: bool) -> Snapshot:
        """The snapshot from the current per-connector state.

        With ``strict`` a collision between connectors raises `ConfigError`; otherwise the
        later connector's entry is hidden and recorded as a problem.
        """
        problems: list[str] = []
        tools: dict[str, ToolRoute] = {}
        prompts: dict[str, PromptRoute] = {}
        resources: dict[str, ResourceRoute] = {}
        templates: list[TemplateRoute] = []

        def collide(kind: str, name: str, first: str, second: str) -> None:
            message = (
                f"{kind} name '{name}' is exposed by both connectors '{first}' and "
                f"'{second}': give one of them a (different) prefix"
            )
            if strict:
                raise ConfigError(message)
            problems.append(message)
            logger.error("exposed name collision", extra={"name": name, "connector": second})

        for source in self._sources.values():
            if source.failure is not None:
                problems.append(source.failure)
            for seen in source.tools:
                name = exposed_name(source.prefix, seen.name)
                if not NAME_RE.fullmatch(name):
                    problems.append(_bad_name("tool", source.id, seen.name, name))
                    continue
                if name in tools:
                    collide("tool", name, tools[name].connector_id, source.id)
                    continue
                route = self._route(source, seen, name, problems)
                tools[name] = route
            for prompt in source.prompts:
                name = exposed_name(source.prefix, prompt.name)
                if not NAME_RE.fullmatch(name):
                    problems.append(_bad_name("prompt", source.id, prompt.name, name))
                    continue
                if name in prompts:
                    collide("prompt", name, prompts[name].connector_id, source.id)
                    continue
                renamed = prompt.model_copy(update={"name": name})
                prompts[name] = PromptRoute(name, source.id, prompt.name, source.connector, renamed)
            for resource in source.resources:
                uri = str(resource.uri)
                if uri in resources:
                    problems.append(
                        f"resource '{uri}' is listed by both connectors "
                        f"'{resources[uri].connector_id}' and '{source.id}'; the first is used"
                    )
                    continue
                resources[uri] = ResourceRoute(source.id, source.connector, resource)
            for template in source.templates:
                templates.append(
                    TemplateRoute(source.id, source.connector, template, _template_regex(template))
                )
        listed = tuple(sorted((r for r in tools.values() if r.tool is not None), key=_by_name))
        schemas = {r.name: r.tool.input_schema for r in listed if r.tool is not None}
        return Snapshot(
            version=self._snapshot.version + 1,
            tools=MappingProxyType(tools),
            listed=listed,
            input_schemas=MappingProxyType(schemas),
            prompts=MappingProxyType(dict(sorted(prompts.items()))),
            resources=MappingProxyType(resources),
            templates=tuple(templates),
            connectors=MappingProxyType({s.id: s.connector for s in self._sources.values()}),
            problems=tuple(problems),
        )

    def _route(self, source: _Source, seen: _Seen, name: str, problems: list[str]) -> ToolRoute:
        pin = source.pins.get(seen.name)
        tool: types.Tool | None = None
        disabled: Reason | None
        provenance = source.provenance
        if source.origin is not None and (provenance is None or provenance.approved_digest is None):
            disabled = Reason.TOOL_UNAPPROVED
        elif source.origin is not None and (
            source.held
            or (provenance is not None and provenance.approved_digest != provenance.digest)
        ):
            disabled = Reason.TOOL_DEFINITION_CHANGED
        elif pin is None or pin.approved_digest is None:
            disabled = Reason.TOOL_UNAPPROVED
        elif pin.approved_digest != seen.digest:
            disabled = Reason.TOOL_DEFINITION_CHANGED
        else:
            approved = pin.approved_definition or pin.definition
            tool, problem = _exposed_tool(approved, name)
            disabled = None if tool is not None else Reason.TOOL_UNAPPROVED
            if problem is not None:
                problems.append(f"connector '{source.id}' tool '{seen.name}': {problem}")
        return ToolRoute(name, source.id, seen.name, source.connector, tool, disabled, seen.digest)


def _by_name(route: ToolRoute) -> str:
    return route.name


def _pin_view(pins: Mapping[str, ToolPin]) -> dict[str, tuple[str, str | None]]:
    return {name: (pin.digest, pin.approved_digest) for name, pin in pins.items()}


def _bad_name(kind: str, connector_id: str, name: str, exposed: str) -> str:
    message = (
        f"{kind} {name!r} of connector '{connector_id}' is not exposed: its name "
        f"{exposed!r} must be 1-128 characters of A-Z a-z 0-9 _ . -"
    )
    logger.warning("exposed name refused", extra={"connector": connector_id})
    return message


def _exposed_tool(definition: Mapping[str, Any], name: str) -> tuple[types.Tool | None, str | None]:
    """The approved definition as a tool named ``name``, or a reason it cannot be served."""
    schema = definition.get("inputSchema")
    if not isinstance(schema, Mapping) or schema.get("type") != "object":  # pyright: ignore[reportUnknownMemberType]
        return None, 'inputSchema must be a JSON Schema object with "type": "object"'
    try:
        return types.Tool.model_validate({**definition, "name": name}), None
    except ValidationError:
        return None, "the approved definition is not a valid MCP tool"


_TEMPLATE_EXPR = re.compile(r"\{([+#./;?&]?)[^{}]*\}")


def _template_regex(template: types.ResourceTemplate) -> re.Pattern[str]:
    """A full-match regex for URIs an RFC 6570 template can produce (coarse, never wider than
    one path segment for simple expressions)."""
    out: list[str] = []
    pos = 0
    text = template.uri_template
    for match in _TEMPLATE_EXPR.finditer(text):
        out.append(re.escape(text[pos : match.start()]))
        operator = match.group(1)
        out.append(".*" if operator in ("+", "#") else "[^/?#]*")
        pos = match.end()
    out.append(re.escape(text[pos:]))
    return re.compile("".join(out), re.DOTALL)
