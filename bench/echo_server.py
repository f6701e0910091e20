"""A trivial MCP server with one `echo` tool, over stdio or streamable HTTP: the bench's downstream.

    python -m bench.echo_server --stdio
    python -m bench.echo_server --http [--port 0]     # first stdout line: listening on URL

It is built on the low-level `Server`, does no work per call beyond building the result, and
answers a 2026-07-28 `tools/call` without re-running `tools/list` (`get_tool_input_schema`).
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Mapping
from typing import Any

import anyio
import mcp_types as types
import uvicorn
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette

ECHO = types.Tool(
    name="echo",
    description="Returns its text argument",
    input_schema={
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    },
)


async def _list_tools(
    ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[ECHO])


async def _call_tool(
    ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    if params.name != ECHO.name:
        raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown tool: {params.name}")
    text = str((params.arguments or {}).get("text", ""))
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])


def _schema(name: str) -> Mapping[str, Any] | None:
    return ECHO.input_schema if name == ECHO.name else None


def build_server() -> Server[Any]:
    return Server(
        "bench-echo",
        version="1.0.0",
        get_tool_input_schema=_schema,
        on_list_tools=_list_tools,
        on_call_tool=_call_tool,
    )


def build_http_app() -> Starlette:
    """The SDK's default streamable HTTP app (stateful, SSE replies) at /mcp."""
    return build_server().streamable_http_app()


async def _serve_stdio() -> None:
    server = build_server()
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def _serve_http(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(build_http_app(), log_level="warning", access_log=False, lifespan="on")
    print(f"listening on http://{host}:{sock.getsockname()[1]}/mcp", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Echo MCP server for the bench.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stdio", action="store_true")
    mode.add_argument("--http", action="store_true")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args(argv)
    if options.stdio:
        anyio.run(_serve_stdio)
    else:
        _serve_http(options.host, options.port)


if __name__ == "__main__":
    main()
