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
    import importlib

    from broker.cli import agents, scopes, serve, stdio, tokens

    serve.register(app)
    stdio.register(app)
    scopes.register(app)
    app.add_typer(agents.app, name="agents")
    app.add_typer(tokens.app, name="token")
    app.add_typer(tokens.keys_app, name="keys")
    # Command groups whose modules may not exist in every build of the tree yet.
    for module, name, attr in (
        ("connectors", "connectors", "app"),
        ("sessions", "sessions", "app"),
        ("approvals", "approvals", "app"),
        ("admin", "admin-token", "app"),
    ):
        try:
            mod = importlib.import_module(f"broker.cli.{module}")
        except ModuleNotFoundError:
            continue
        app.add_typer(getattr(mod, attr), name=name)


_register()


def main() -> None:
    app()
