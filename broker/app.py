"""The composition root: `create_app(config)` builds the one Starlette app and its lifespan.

Everything the routes need is built here and opened in the lifespan in dependency order (store,
keys, revocation view, connectors, MCP session manager) and closed in reverse. Tests replace any
part by passing it in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from broker.config import BrokerConfig
from broker.ports import Clock, Store, SystemClock

__all__ = ["Services", "create_app"]

logger = logging.getLogger(__name__)


@dataclass
class Services:
    """What the running broker holds; built by `create_app`, opened by its lifespan."""

    config: BrokerConfig
    clock: Clock
    environ: Mapping[str, str]
    store: Any = None
    extras: dict[str, Any] = field(default_factory=dict[str, Any])


def create_app(
    config: BrokerConfig,
    *,
    store: Store | None = None,
    clock: Clock | None = None,
    environ: Mapping[str, str] | None = None,
) -> Starlette:
    """Build the broker's ASGI app. Nothing is opened until the lifespan runs."""
    services = Services(
        config=config,
        clock=clock or SystemClock(),
        environ=os.environ if environ is None else environ,
        store=store,
    )
    own_store = store is None

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    routes: list[BaseRoute] = [Route("/healthz", healthz, methods=["GET"])]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if own_store:
                from broker.store import open_store

                services.store = open_store(
                    config.store.url,
                    pool_size=config.store.pool_size,
                    max_overflow=config.store.max_overflow,
                )
                stack.push_async_callback(services.store.aclose)
                await services.store.migrate()
            app.state.services = services
            yield

    return Starlette(routes=routes, lifespan=lifespan)
