"""Plumbing shared by every CLI command: options, config loading, the store, output.

Commands stay thin: they parse options, call the shell or core, and print. Errors that are the
user's (bad config, unknown agent) print one clear line to stderr and exit non-zero, never a
traceback.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import anyio
import typer
from rich.console import Console

from broker.config import BrokerConfig, load_config
from broker.errors import BrokerError, ConfigError, NotFound, StoreUnavailable

__all__ = [
    "ConfigOption",
    "JsonOption",
    "TokenParts",
    "cli_actor",
    "console",
    "emit_json",
    "err_console",
    "fail",
    "load",
    "open_store",
    "open_token_parts",
    "parse_duration",
    "run",
]

T = TypeVar("T")

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        envvar="BROKER_CONFIG",
        help="Path to broker.toml.",
        show_default=True,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


_DURATION_RE = re.compile(r"^(\d{1,6})([smh]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600}


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the broker's own errors into one line on stderr and a non-zero exit."""
    try:
        yield
    except ConfigError as exc:
        fail(str(exc), 2)
    except NotFound as exc:
        fail(str(exc), 1)
    except StoreUnavailable as exc:
        fail(f"the store is unavailable: {exc}", 3)
    except BrokerError as exc:
        fail(str(exc), 1)


def load(config_path: Path) -> BrokerConfig:
    """Load the config or exit 2 with a message naming the key, value and expectation."""
    with user_errors():
        return load_config(config_path, os.environ)


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async command body, mapping broker errors to clean exits."""
    with user_errors():
        return anyio.run(fn)


@asynccontextmanager
async def open_store(config: BrokerConfig, *, migrate: bool = False) -> AsyncIterator[Any]:
    """Open the configured store (migrated when asked), closed on exit."""
    from broker.store import open_store as _open

    store = _open(
        config.store.url, pool_size=config.store.pool_size, max_overflow=config.store.max_overflow
    )
    try:
        if migrate:
            await store.migrate()
        yield store
    finally:
        await store.aclose()


@dataclass(frozen=True, slots=True)
class TokenParts:
    """The open store and what verifies tokens against it, as a running broker builds them."""

    store: Any
    clock: Any
    keyring: Any
    revocations: Any
    verifier: Any


@asynccontextmanager
async def open_token_parts(config: BrokerConfig) -> AsyncIterator[TokenParts]:
    """Open the store with the signing keys, revocation view and token verifier of ``config``."""
    from broker.keys import KeyRing
    from broker.ports import SystemClock
    from broker.revocations import RevocationCache
    from broker.verifier import BrokerTokenVerifier

    clock = SystemClock()
    async with open_store(config) as store:
        keyring = await KeyRing.load(
            store,
            config.tokens.keys_dir,
            max_ttl=config.tokens.max_ttl,
            leeway=config.tokens.leeway,
        )
        revocations = RevocationCache(store, clock, staleness=config.store.revocation_staleness)
        verifier = BrokerTokenVerifier.from_config(config, keyring, revocations, clock, store)
        yield TokenParts(store, clock, keyring, revocations, verifier)


def emit_json(value: Any) -> None:
    """Write ``value`` as JSON on stdout (datetimes and paths as strings)."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def parse_duration(text: str) -> int:
    """Seconds from ``90s``, ``10m``, ``1h`` or a bare number of seconds.

    Raises:
        typer.BadParameter: anything else.
    """
    match = _DURATION_RE.match(text.strip().lower())
    if match is None:
        raise typer.BadParameter(f"{text!r}: expected a duration such as 90s, 10m or 1h")
    return int(match.group(1)) * _UNIT[match.group(2)]


def cli_actor() -> str:
    """Who acts from this shell, for the audit trail (``cli:<login>``)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"
