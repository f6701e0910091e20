"""The `broker` command: thin over config, store, core and app. Subcommands live in modules."""

from __future__ import annotations

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="broker",
    help="mcp-authz-broker: task-scoped, mediated, recorded tool calls for AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from broker.cli import (
        admin,
        agents,
        approvals,
        connectors,
        scopes,
        serve,
        sessions,
        stdio,
        tokens,
    )

    serve.register(app)
    stdio.register(app)
    scopes.register(app)
    app.add_typer(agents.app, name="agents")
    app.add_typer(connectors.app, name="connectors")
    app.add_typer(tokens.app, name="token")
    app.add_typer(tokens.keys_app, name="keys")
    app.add_typer(sessions.app, name="sessions")
    app.add_typer(approvals.app, name="approvals")
    app.add_typer(admin.app, name="admin-token")


_register()


def main() -> None:
    app()
