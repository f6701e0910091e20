"""`broker stdio`: MCP over stdin/stdout for clients that only launch subprocesses.

Configured by the environment only (secrets never on argv): ``BROKER_URL``, ``BROKER_CLIENT_ID``,
``BROKER_CLIENT_SECRET`` or ``BROKER_CLIENT_SECRET_FILE``, optional ``BROKER_SCOPE`` and
``BROKER_TASK_PURPOSE``; ``BROKER_STDIO_LOG_LEVEL`` (default WARNING) for stderr logging.
Exit codes: 0 when stdin closes, 2 for a configuration error, 3 when the broker cannot be
reached (or goes away), 4 when it refuses the credentials or scope.
"""

from __future__ import annotations

import logging
import os
import sys

import anyio
import httpx2
import typer

from broker.stdio_shim import (
    CredentialsRefused,
    ShimConfigError,
    ShimError,
    ShimSettings,
    run_shim,
)

__all__ = ["register", "stdio"]

EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_REFUSED = 2, 3, 4


def register(app: typer.Typer) -> None:
    app.command("stdio")(stdio)


def _fail(message: str, code: int) -> typer.Exit:
    sys.stderr.write(f"broker stdio: error: {message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


def stdio() -> None:
    """Relay MCP between stdin/stdout and a broker, with a renewed task token (env config)."""
    level = os.environ.get("BROKER_STDIO_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level, logging.WARNING),
        format="broker stdio: %(levelname)s %(name)s: %(message)s",
    )
    # Request lines name URLs only, but keep the HTTP libraries quiet below WARNING regardless.
    for noisy in ("httpx2", "httpcore", "mcp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        settings = ShimSettings.from_environ(os.environ)
    except ShimConfigError as exc:
        raise _fail(str(exc), EXIT_CONFIG) from None
    try:
        anyio.run(run_shim, settings)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (ShimError, httpx2.HTTPError, BaseExceptionGroup) as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, CredentialsRefused):
            raise _fail(str(leaf), EXIT_REFUSED) from None
        if isinstance(leaf, ShimError):
            raise _fail(str(leaf), EXIT_UNREACHABLE) from None
        if isinstance(leaf, httpx2.HTTPError):
            raise _fail(
                f"lost the connection to the broker at {settings.broker_url}: "
                f"{type(leaf).__name__}",
                EXIT_UNREACHABLE,
            ) from None
        raise


def _leaf(exc: BaseException) -> BaseException:
    """The first shim or HTTP error inside (nested) exception groups, else ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:  # pyright: ignore[reportUnknownVariableType]
            found = _leaf(inner)  # pyright: ignore[reportUnknownArgumentType]
            if isinstance(found, ShimError | httpx2.HTTPError):
                return found
    return exc


if __name__ == "__main__":
    typer.run(stdio)
