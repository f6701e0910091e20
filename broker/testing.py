"""Helpers shipped for tests (ours and integrators'): a real uvicorn server on a loopback port.

`serve_app(app)` binds 127.0.0.1:0 before the server starts (no port races), runs uvicorn in the
current event loop, waits for start-up under a bound, and shuts it down on exit.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import uvicorn
from starlette.types import ASGIApp

__all__ = ["serve_app"]


@asynccontextmanager
async def serve_app(app: ASGIApp, *, startup_timeout: float = 10.0) -> AsyncIterator[str]:
    """Serve ``app`` on a fresh loopback port; yields the base URL ``http://127.0.0.1:PORT``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        try:
            with anyio.fail_after(startup_timeout):
                while not server.started:
                    if server.should_exit:
                        raise RuntimeError("uvicorn exited during start-up (see the log above)")
                    await anyio.sleep(0.01)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()
