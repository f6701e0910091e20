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
    from broker.cli import serve

    serve.register(app)


_register()


def main() -> None:
    app()
