"""Configuration: `broker.toml` loaded once into a frozen, validated model; the only reader.

`load_config(path, environ)` reads the TOML file, applies ``BROKER_*`` overrides from the
environ it is given (``BROKER_SERVER__PORT=9000`` sets ``[server] port``; a double underscore
separates levels; the value is read as a TOML literal when it parses as one, else as a string),
resolves relative paths against the config file's folder, and validates. Any unknown key or bad
value raises `ConfigError` naming the key, the value and what was expected.

Secrets are never written inline: a connector's credentials are references, ``env:NAME`` or
``file:PATH``, resolved by `resolve_secret` only when a connector starts. A plain literal is
accepted for non-secret environment variables, but a header or variable whose name looks like a
credential (authorization, cookie, token, secret, password, key) must be a reference.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broker.core.detectors.config import DetectorsConfig
from broker.errors import ConfigError

__all__ = [
    "AlertsConfig",
    "ApprovalConfig",
    "BrokerConfig",
    "ConnectorConfig",
    "ConnectorLimitsConfig",
    "EgressConfig",
    "LimitsConfig",
    "OutputConfig",
    "RecordingConfig",
    "ServerConfig",
    "StoreConfig",
    "TokenConfig",
    "load_config",
    "resolve_secret",
]

ENV_PREFIX = "BROKER_"
CONNECTOR_ID_RE = r"^[a-z][a-z0-9-]{0,31}$"
_SECRETISH = re.compile(r"(authorization|cookie|token|secret|passw|api[-_]?key|private)", re.I)
_REF_RE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Model):
    """``[server]``: where the broker listens and how it names itself."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8765
    public_url: str = ""
    """Base URL agents use (issuer). Empty: ``http://{host}:{port}``. No trailing slash."""
    allowed_hosts: tuple[str, ...] = ()
    """Extra Host header values accepted (DNS-rebinding protection); loopback is always allowed."""
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    workers: Annotated[int, Field(ge=1, le=64)] = 1

    @field_validator("public_url")
    @classmethod
    def _no_trailing_slash(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", v):
            raise ValueError("expected an http(s) URL such as https://broker.example.com")
        return v.rstrip("/")

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def resource_url(self) -> str:
        """The MCP resource (token audience, RFC 8707/9728)."""
        return f"{self.base_url}/mcp"


class StoreConfig(_Model):
    """``[store]``: SQLite file by default, PostgreSQL by URL."""

    url: str = "sqlite+aiosqlite:///broker.db"
    pool_size: Annotated[int, Field(ge=1, le=200)] = 5
    max_overflow: Annotated[int, Field(ge=0, le=200)] = 10
    revocation_staleness: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """Seconds: a replica whose revocation view is older than this refuses calls."""
    revocation_poll_interval: Annotated[float, Field(gt=0, le=60)] = 1.0
    """Seconds between polls of the store for revocations (the fallback to LISTEN/NOTIFY)."""
    listen: bool = True
    """On PostgreSQL, hear revocations at once through LISTEN/NOTIFY (polling continues)."""

    @model_validator(mode="after")
    def _poll_within_bound(self) -> StoreConfig:
        if self.revocation_poll_interval >= self.revocation_staleness:
            raise ValueError(
                f"revocation_poll_interval ({self.revocation_poll_interval}) must be less than "
                f"revocation_staleness ({self.revocation_staleness})"
            )
        return self

    @field_validator("url")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        if not (v.startswith("sqlite+aiosqlite://") or v.startswith("postgresql+asyncpg://")):
            raise ValueError(
                "expected sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST:PORT/DB"
            )
        return v


class TokenConfig(_Model):
    """``[tokens]``: capability-token lifetimes and signing keys."""

    keys_dir: Path = Path("keys")
    default_ttl: Annotated[int, Field(ge=10, le=86400)] = 600
    """Seconds, when a token request names no ``expires_in``."""
    max_ttl: Annotated[int, Field(ge=10, le=86400)] = 3600
    """Seconds; the cap over every agent's own maximum."""
    leeway: Annotated[int, Field(ge=0, le=120)] = 30
    max_delegation_depth: Annotated[int, Field(ge=0, le=10)] = 3

    @model_validator(mode="after")
    def _ttl_order(self) -> TokenConfig:
        if self.default_ttl > self.max_ttl:
            raise ValueError(f"default_ttl ({self.default_ttl}) must not exceed max_ttl")
        return self


class LimitsConfig(_Model):
    """``[limits]``: per-agent and per-connector rate and concurrency limits (0 = no limit)."""

    agent_calls_per_minute: Annotated[float, Field(ge=0)] = 600.0
    agent_burst: Annotated[int, Field(ge=1)] = 60
    agent_max_concurrent: Annotated[int, Field(ge=0)] = 16
    connector_calls_per_minute: Annotated[float, Field(ge=0)] = 0.0
    connector_burst: Annotated[int, Field(ge=1)] = 100
    connector_max_concurrent: Annotated[int, Field(ge=0)] = 64


class OutputConfig(_Model):
    """``[output]``: what the broker does to tool results before an agent sees them."""

    max_result_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 256 * 1024
    """Kept well under the 1 MB an SDK client accepts in one event (mcp-sdk-notes pitfall 19)."""
    oversize: Literal["truncate", "refuse"] = "truncate"
    redact_secrets: bool = True


class ApprovalConfig(_Model):
    """``[approvals]``: human approval waits."""

    call_timeout: Annotated[float, Field(gt=0, le=3600)] = 120.0
    """Seconds a call of an ``approval = "call"`` scope is held waiting for an approver."""
    token_request_ttl: Annotated[int, Field(gt=0, le=86400)] = 600
    """Seconds an ``authorization_pending`` token request stays answerable."""
    poll_interval: Annotated[int, Field(ge=1, le=60)] = 2
    """Seconds an agent is told to wait between polls (OAuth ``interval``)."""


class RecordingConfig(_Model):
    """``[recording]``: the session record's redaction key and excerpt size."""

    hmac_key: str = "file:keys/recording.key"
    """Reference (``file:``/``env:``) to the key that turns recorded secrets into HMACs, so equal
    values correlate without being stored. At least 16 bytes; `broker init` writes one."""
    excerpt_chars: Annotated[int, Field(ge=0, le=65536)] = 2048

    @field_validator("hmac_key")
    @classmethod
    def _a_reference(cls, v: str) -> str:
        if not _REF_RE.match(v):
            raise ValueError("expected a reference, 'file:PATH' or 'env:NAME', never the key")
        return v


_EGRESS_HOST = re.compile(
    r"^(\*\.)?(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


class EgressConfig(_Model):
    """``[connectors.egress]`` (stdio): where a sandboxed connector may connect, through the
    broker's egress proxy only. Without it a sandboxed connector has no network at all."""

    hosts: tuple[str, ...]
    """Host names (``api.example.com``), subdomain wildcards (``*.example.com``) or IP literals."""
    ports: tuple[Annotated[int, Field(ge=1, le=65535)], ...] = (80, 443)
    allow_private: bool = False
    """Allow RFC 1918, unique-local and CGNAT addresses (refused by default)."""
    allow_networks: tuple[str, ...] = ()
    """CIDRs allowed although refused by default (loopback, link-local, ...)."""

    @field_validator("hosts")
    @classmethod
    def _host_shapes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("expected at least one host (omit [egress] for no network)")
        out: list[str] = []
        for host in v:
            name = host.strip().lower().rstrip(".")
            try:
                out.append(str(ipaddress.ip_address(name.strip("[]"))))
                continue
            except ValueError:
                pass
            if not _EGRESS_HOST.match(name):
                raise ValueError(
                    f"host {host!r}: expected a name, '*.' and a name, or an IP address"
                )
            out.append(name)
        return tuple(out)

    @field_validator("ports")
    @classmethod
    def _some_ports(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("expected at least one port")
        return v

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for cidr in v:
            try:
                out.append(str(ipaddress.ip_network(cidr, strict=False)))
            except ValueError:
                raise ValueError(f"{cidr!r} is not a network such as 10.1.0.0/16") from None
        return tuple(out)


class ConnectorLimitsConfig(_Model):
    """``[connectors.limits]`` (stdio): resource limits inside the sandbox (not the rate limits
    of the top-level ``[limits]``)."""

    address_space_mb: Annotated[int, Field(ge=16)] = 8192
    processes: Annotated[int, Field(ge=1)] = 256
    open_files: Annotated[int, Field(ge=16)] = 1024
    cpu_seconds: Annotated[int, Field(ge=1)] = 3600
    file_size_mb: Annotated[int, Field(ge=1)] = 1024
    tmpfs_mb: Annotated[int, Field(ge=1)] = 64


_SANDBOX_KEYS = (
    "sandbox",
    "writable_paths",
    "runtime_paths",
    "egress",
    "limits",
    "sandbox_uid",
    "sandbox_gid",
)


class ConnectorConfig(_Model):
    """``[[connectors]]``: one downstream tool source."""

    id: Annotated[str, Field(pattern=CONNECTOR_ID_RE)]
    kind: Literal["stdio", "http", "native"]
    prefix: str | None = None
    """Tool-name prefix: tools appear as ``{prefix}__{tool}``; None means the id; "" means none."""
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = Field(default_factory=dict[str, str])
    env_allowlist: tuple[str, ...] = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
    cwd: Path | None = None
    url: str | None = None
    headers: Mapping[str, str] = Field(default_factory=dict[str, str])
    target: str | None = None
    """native: ``package.module:attribute`` naming a connectors.ToolSet."""
    roots: tuple[str, ...] = ()
    local_paths: bool = False
    """The connector runs on this host: ``within`` paths are also checked after resolving
    symlinks here, so a link inside a granted root that leads out of it is refused."""
    call_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    max_call_timeout: Annotated[float, Field(gt=0, le=86400)] = 300.0
    sandbox: Literal["required", "auto", "off"] = "auto"
    """stdio: ``required`` refuses to start where the platform cannot sandbox; ``auto`` sandboxes
    where it can (and says so loudly where it cannot); ``off`` opts out."""
    writable_paths: tuple[Path, ...] = ()
    """stdio: absolute paths the sandbox shows read-write (scope ``within`` roots are read-only)."""
    runtime_paths: tuple[Path, ...] = ()
    """stdio: extra absolute paths the connector needs to run, shown read-only."""
    egress: EgressConfig | None = None
    """stdio: network through the broker's egress proxy; None: no network in the sandbox."""
    limits: ConnectorLimitsConfig = ConnectorLimitsConfig()
    sandbox_uid: Annotated[int, Field(ge=1, le=2**32 - 2)] = 65534
    sandbox_gid: Annotated[int, Field(ge=1, le=2**32 - 2)] = 65534

    @field_validator("writable_paths", "runtime_paths")
    @classmethod
    def _absolute(cls, v: tuple[Path, ...]) -> tuple[Path, ...]:
        for path in v:
            if not path.is_absolute():
                raise ValueError(f"{str(path)!r} is not an absolute path")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, v: str | None) -> str | None:
        if v not in (None, "") and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("expected letters, digits, '_', '.', '-' (at most 64)")
        return v

    @model_validator(mode="after")
    def _kind_fields(self) -> ConnectorConfig:
        need = {"stdio": "command", "http": "url", "native": "target"}[self.kind]
        if getattr(self, need) is None:
            raise ValueError(f"a {self.kind} connector needs '{need}'")
        if self.call_timeout > self.max_call_timeout:
            raise ValueError("call_timeout must not exceed max_call_timeout")
        if self.kind != "stdio":
            given = [k for k in _SANDBOX_KEYS if k in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)}: only stdio connectors are sandboxed")
        for where, values in (("env", self.env), ("headers", self.headers)):
            for name, value in values.items():
                if _SECRETISH.search(name) and not _REF_RE.match(value):
                    raise ValueError(
                        f"{where}.{name} looks like a credential: write it as a reference, "
                        "'env:NAME' or 'file:PATH', never inline"
                    )
        return self

    @property
    def tool_prefix(self) -> str:
        return self.id if self.prefix is None else self.prefix


class AlertsConfig(_Model):
    """``[alerts]``: where automatic responses (revocation, quarantine) are reported.

    A JSON POST to ``webhook_url`` (empty: off), retried ``retries`` times with backoff in the
    background, each attempt bounded by ``timeout`` seconds; never on the call path.
    """

    webhook_url: str = ""
    retries: Annotated[int, Field(ge=0, le=20)] = 3
    timeout: Annotated[float, Field(gt=0, le=120)] = 5.0

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("expected an http(s) URL, or empty to turn alerts off")
        return v


class BrokerConfig(_Model):
    """The whole configuration. Built only by `load_config` (or directly in tests)."""

    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    tokens: TokenConfig = TokenConfig()
    limits: LimitsConfig = LimitsConfig()
    output: OutputConfig = OutputConfig()
    approvals: ApprovalConfig = ApprovalConfig()
    recording: RecordingConfig = RecordingConfig()
    detectors: DetectorsConfig = DetectorsConfig()
    alerts: AlertsConfig = AlertsConfig()
    scope_files: tuple[Path, ...] = ()
    connectors: tuple[ConnectorConfig, ...] = ()
    base_dir: Path = Path(".")
    """The config file's folder; relative paths were resolved against it. Not read from TOML."""

    @model_validator(mode="after")
    def _unique_connectors(self) -> BrokerConfig:
        seen: set[str] = set()
        for c in self.connectors:
            if c.id in seen:
                raise ValueError(f"connector id '{c.id}' appears twice")
            seen.add(c.id)
        return self


def load_config(path: Path | None, environ: Mapping[str, str]) -> BrokerConfig:
    """Read ``path`` (or defaults when None), apply ``BROKER_*`` overrides, validate.

    Raises:
        ConfigError: the file is missing or not TOML, or a key is unknown or its value invalid.
    """
    data: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist (run `broker init`)") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        base_dir = path.resolve().parent
    if "base_dir" in data:
        raise ConfigError("'base_dir' is not a configuration key (it is the config file's folder)")
    _apply_env_overrides(data, environ)
    data["base_dir"] = base_dir
    try:
        config = BrokerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    return _resolve_paths(config)


def _apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Apply ``BROKER_SECTION__KEY`` overrides.

    A variable is an override when it has a ``__`` (a section and a key: an unknown section or
    key is then an error like any other) or names a top-level key. Other ``BROKER_*`` names
    belong to the broker's tools and agents (``BROKER_URL``, ``BROKER_CLIENT_ID``,
    ``BROKER_LOG_LEVEL``, ...) and are left alone.
    """
    top_level = set(BrokerConfig.model_fields) - {"base_dir"}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if "__" not in rest and rest.lower() not in top_level:
            continue
        keys = [k.lower() for k in rest.split("__")]
        if not all(keys):
            raise ConfigError(f"environment variable {name}: empty key segment")
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name}: '{k}' is not a table")
            node = child  # pyright: ignore[reportUnknownVariableType]
        node[keys[-1]] = _parse_env_value(raw)


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f"{path}: " if path else ""
    lines: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}unknown key '{loc}'")
            continue
        value = err.get("input")
        last = str(err["loc"][-1]) if err["loc"] else ""
        scalar = isinstance(value, str | int | float | bool)
        shown = f" (got {value!r})" if scalar and not _SECRETISH.search(last) else ""
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}{loc}: {msg}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _resolve_paths(config: BrokerConfig) -> BrokerConfig:
    base = config.base_dir
    store_url = config.store.url
    prefix = "sqlite+aiosqlite:///"
    if store_url.startswith(prefix):
        file_part = store_url[len(prefix) :]
        if file_part and file_part != ":memory:" and not file_part.startswith("/"):
            store_url = prefix + str(base / file_part)
    tokens = config.tokens
    keys_dir = tokens.keys_dir if tokens.keys_dir.is_absolute() else base / tokens.keys_dir
    scope_files = tuple(p if p.is_absolute() else base / p for p in config.scope_files)
    connectors = tuple(
        c.model_copy(update={"cwd": base / c.cwd}) if c.cwd and not c.cwd.is_absolute() else c
        for c in config.connectors
    )
    return config.model_copy(
        update={
            "store": config.store.model_copy(update={"url": store_url}),
            "tokens": tokens.model_copy(update={"keys_dir": keys_dir}),
            "scope_files": scope_files,
            "connectors": connectors,
        }
    )


def resolve_secret(ref: str, environ: Mapping[str, str], base_dir: Path) -> str:
    """Resolve ``env:NAME`` / ``file:PATH`` to the secret; a plain value is returned as is.

    Raises:
        ConfigError: the variable is unset or the file cannot be read (names which, not the value).
    """
    if ref.startswith("env:"):
        name = ref[4:]
        if name not in environ:
            raise ConfigError(f"secret reference {ref}: environment variable {name} is not set")
        return environ[name]
    if ref.startswith("file:"):
        p = Path(ref[5:])
        p = p if p.is_absolute() else base_dir / p
        try:
            return p.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"secret reference {ref}: cannot read {p}: {exc.strerror}") from None
    return ref


def default_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """``BROKER_CONFIG`` or ``./broker.toml``."""
    return Path(environ.get("BROKER_CONFIG", "broker.toml"))
