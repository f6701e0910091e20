"""Liveness and readiness: what ``/healthz`` and ``/readyz`` answer. Shell; Starlette routes.

- **Liveness** (``GET /healthz``): the process serves HTTP and finished start-up. It does not
  look at the store: restarting a replica because PostgreSQL is down would not bring it back.
  503 ``starting`` until the lifespan has built everything, then 200 ``ok``.
- **Readiness** (``GET /readyz``): this replica should receive traffic. Not ready (503) before
  start-up finishes, and whenever its revocation view is older than the staleness bound, which
  is also when it refuses every call with ``store-unavailable``: the view is confirmed by a
  store read every poll interval, so a stale view means the store has been unreachable for that
  long. A load balancer then sends agents to replicas that can answer them; this one comes back
  by itself once a refresh succeeds.

Both are cheap (no query per probe) and say nothing secret: status, the view's age, the bound,
and whether revocations arrive by ``LISTEN`` or by polling.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = ["LIVENESS_PATH", "READINESS_PATH", "Readiness", "health_routes", "readiness"]

LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"


class FreshnessView(Protocol):
    """`broker.revocations.RevocationCache`, as readiness reads it."""

    staleness: float

    @property
    def propagation(self) -> str: ...

    def age(self, now: datetime) -> float | None: ...


class HealthSource(Protocol):
    """`broker.app.Services`, as the health routes read it."""

    ready: bool
    revocations: Any
    clock: Any


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether a replica should receive traffic, and why not."""

    ready: bool
    reason: str | None
    """``starting`` or ``revocations-stale`` when not ready."""
    view_age: float | None
    bound: float | None
    propagation: str | None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": "ready" if self.ready else "not-ready"}
        if self.reason is not None:
            body["reason"] = self.reason
        if self.bound is not None:
            body["revocations"] = {
                "age_s": None if self.view_age is None else round(self.view_age, 3),
                "bound_s": self.bound,
                "propagation": self.propagation,
            }
        return body


def readiness(started: bool, view: FreshnessView | None, now: datetime) -> Readiness:
    """Ready once started and while the revocation view is within its bound (fail closed)."""
    if not started or view is None:
        return Readiness(False, "starting", None, None, None)
    age = view.age(now)
    fresh = age is not None and age <= view.staleness
    return Readiness(
        fresh, None if fresh else "revocations-stale", age, view.staleness, view.propagation
    )


def health_routes(services: HealthSource) -> list[Route]:
    """``GET /healthz`` (liveness) and ``GET /readyz`` (readiness) over the running services."""

    async def healthz(request: Request) -> JSONResponse:
        if not services.ready:
            return JSONResponse({"status": "starting"}, 503)
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        state = readiness(services.ready, services.revocations, services.clock.now())
        return JSONResponse(state.body(), 200 if state.ready else 503)

    return [
        Route(LIVENESS_PATH, healthz, methods=["GET"]),
        Route(READINESS_PATH, readyz, methods=["GET"]),
    ]
