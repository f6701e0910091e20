"""Stand-in for `broker serve` until `create_app` mounts `/mcp`: the bench's own assembly.

It wires the real pieces the broker serves calls with (SQLite `SqlStore`, `Registry`, the stdio
connector, `McpFront` with token verification through `broker.core.tokens`) around the echo
server, approves its pins, and prints `listening on URL token TOKEN`. Missing compared with the
real app: the recorder, rate limits, revocation view and OAuth endpoints. Use it with
`python -m bench --broker-impl interim`; drop it once `broker serve` runs end to end.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from mcp.server.auth.provider import AccessToken
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from broker.config import ServerConfig
from broker.core.tokens import TaskClaim, TokenClaims, TokenRejected, mint_token, verify_token
from broker.mcp_front import McpFront
from broker.registry import Registry
from broker.store.testing import migrated_store, sqlite_url
from connectors import StdioSpec, open_connector
from scopes.definitions import parse_scope_toml

REPO = Path(__file__).resolve().parent.parent
SCOPES = """\
[[scope]]
name = "bench:echo"
[[scope.grant]]
connector = "echo"
tools = ["echo"]
"""


class _Verifier:
    def __init__(self, key: Ed25519PublicKey, *, issuer: str, audience: str) -> None:
        self.keys = {"bench": key}
        self.issuer = issuer
        self.audience = audience

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            claims = verify_token(
                token,
                keys=self.keys,
                audience=self.audience,
                issuer=self.issuer,
                now=datetime.now(UTC),
                leeway=30,
                max_lifetime=7200,
            )
        except TokenRejected:
            return None
        return AccessToken(
            token=token,
            client_id=claims.client_id,
            scopes=list(claims.scopes),
            subject=claims.sub,
            expires_at=claims.exp,
            claims=claims.model_dump(mode="json"),
        )


def _mint(key: Ed25519PrivateKey, server: ServerConfig) -> str:
    now = datetime.now(UTC)
    claims = TokenClaims(
        iss=server.base_url,
        aud=server.resource_url,
        sub="bench-agent",
        client_id="bench-agent",
        exp=int((now + timedelta(hours=1)).timestamp()),
        iat=int(now.timestamp()),
        nbf=int(now.timestamp()),
        jti=f"bench{int(now.timestamp() * 1000)}xxxxxxxxxx",
        scope="bench:echo",
        task=TaskClaim(id="bench", purpose="benchmark"),
    )
    return mint_token(claims, private_key=key, kid="bench")


@asynccontextmanager
async def _registry(workdir: Path) -> AsyncIterator[Registry]:
    async with migrated_store(sqlite_url(workdir)) as store:
        registry = Registry(store, pin_poll_interval=60)
        spec = StdioSpec(
            id="echo",
            command=sys.executable,
            args=("-m", "bench.echo_server", "--stdio"),
            cwd=str(REPO),
        )
        registry.add(open_connector(spec), prefix="")
        async with registry:
            now = datetime.now(UTC)
            for pin in await store.list_pins():
                await store.approve_pin(pin.connector_id, pin.tool_name, pin.digest, "bench", now)
            await registry.reload_pins()
            yield registry


async def serve(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    bound = int(sock.getsockname()[1])
    server_cfg = ServerConfig(port=bound)
    key = Ed25519PrivateKey.generate()
    verifier = _Verifier(
        key.public_key(), issuer=server_cfg.base_url, audience=server_cfg.resource_url
    )

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    with tempfile.TemporaryDirectory(prefix="bench-interim-") as scratch:
        async with _registry(Path(scratch)) as registry:
            scopes = parse_scope_toml(SCOPES, source="bench")
            front = McpFront(registry, scopes, verifier=verifier, server_config=server_cfg)
            app = Starlette(
                routes=[Route("/healthz", healthz), Mount("/", app=front.asgi_app())],
                lifespan=lambda _app: front.lifespan(),
            )
            config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
            print(
                f"listening on {server_cfg.resource_url} token {_mint(key, server_cfg)}", flush=True
            )
            await uvicorn.Server(config).serve(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser(description="Interim broker assembly for the bench.")
    parser.add_argument("--port", type=int, default=0)
    anyio.run(serve, parser.parse_args().port)


if __name__ == "__main__":
    main()
