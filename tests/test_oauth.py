"""The OAuth endpoints through real HTTP: uvicorn, a real SQLite store, the stock SDK client.

The harness at the top: `running_broker` serves on a fresh loopback port, then builds the app
for that exact base URL (the issuer must match the URL clients use) and enters its lifespan.
`_build_app` is the one place to switch to ``broker.app.create_app`` once it mounts the OAuth
routes and the MCP front.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import mcp.types as types
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from jwt.algorithms import OKPAlgorithm
from mcp import Client
from mcp.client.auth import TokenStorage
from mcp.client.auth.extensions.client_credentials import (
    ClientCredentialsOAuthProvider,
    PrivateKeyJWTOAuthProvider,
    SignedJWTParameters,
)
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server, ServerRequestContext
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.settings import AuthSettings
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from starlette.applications import Starlette
from starlette.routing import Mount

from broker.agents import CLIENT_ASSERTION_TYPE, register_agent
from broker.config import BrokerConfig, ServerConfig, StoreConfig, TokenConfig
from broker.core.identity import Agent, AgentStatus
from broker.keys import KeyRing, ensure_signing_key
from broker.oauth import EXCHANGE_GRANT, oauth_routes
from broker.ports import Clock, SystemClock
from broker.revocations import RevocationCache
from broker.store import SqlStore
from broker.store.testing import migrated_store, sqlite_url
from broker.testing import LateApp, serve_app
from broker.token_service import ACCESS_TOKEN_TYPE, TokenService
from broker.verifier import BrokerTokenVerifier

MCP_ACCEPT = {"accept": "application/json, text/event-stream"}


class MemoryStorage(TokenStorage):
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


@dataclass
class Broker:
    url: str
    config: BrokerConfig
    store: SqlStore
    service: TokenService
    verifier: BrokerTokenVerifier
    revocations: RevocationCache

    @property
    def token_url(self) -> str:
        return self.url + "/oauth/token"

    @property
    def mcp_url(self) -> str:
        return self.url + "/mcp"

    async def add_agent(
        self, name: str, scopes: list[str], *, max_ttl: int = 600, **kw: Any
    ) -> tuple[Agent, str]:
        agent, secret = await register_agent(
            self.store,
            name=name,
            owner="ops@example.com",
            scopes=scopes,
            max_ttl=max_ttl,
            now=self.service.clock.now(),
            **kw,
        )
        return agent, secret or ""

    async def post_token(
        self,
        form: dict[str, str],
        *,
        client: tuple[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx2.Response:
        """POST the form; ``client`` (id, secret) goes in a Basic header."""
        hdrs = dict(headers or {})
        if client is not None:
            raw = base64.b64encode(f"{client[0]}:{client[1]}".encode()).decode()
            hdrs["authorization"] = f"Basic {raw}"
        async with httpx2.AsyncClient(timeout=10) as http:
            return await http.post(self.token_url, data=form, headers=hdrs)

    async def token_for(self, client: tuple[str, str], scope: str, **extra: str) -> str:
        form = {"grant_type": "client_credentials", "scope": scope, **extra}
        response = await self.post_token(form, client=client)
        assert response.status_code == 200, response.text
        return response.json()["access_token"]

    async def mcp_status(self, token: str) -> int:
        """The HTTP status of an MCP initialize carrying ``token``."""
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "0"},
            },
        }
        headers = {**MCP_ACCEPT, "authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient(timeout=10) as http:
            response = await http.post(self.mcp_url, json=body, headers=headers)
        return response.status_code

    async def whoami(self, http: httpx2.AsyncClient) -> dict[str, Any]:
        async with Client(streamable_http_client(self.mcp_url, http_client=http)) as c:
            result = await c.call_tool("whoami", {})
        assert isinstance(result.structured_content, dict)
        return result.structured_content


def _whoami_server() -> Server:
    async def list_tools(
        ctx: ServerRequestContext, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        tool = types.Tool(name="whoami", input_schema={"type": "object", "properties": {}})
        return types.ListToolsResult(tools=[tool])

    async def call_tool(
        ctx: ServerRequestContext, params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        token = get_access_token()
        who: dict[str, Any] = {
            "client_id": token.client_id if token else None,
            "scopes": list(token.scopes) if token else [],
            "subject": token.subject if token else None,
        }
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=str(who))], structured_content=who
        )

    return Server("broker-test", version="0", on_list_tools=list_tools, on_call_tool=call_tool)


async def _build_app(
    config: BrokerConfig, store: SqlStore, clock: Clock, stack: AsyncExitStack
) -> tuple[Starlette, TokenService, BrokerTokenVerifier, RevocationCache]:
    """The stand-in for ``create_app``: OAuth routes first, the MCP app mounted at ``/``."""
    tokens = config.tokens
    await ensure_signing_key(store, tokens.keys_dir, clock.now())
    keyring = await KeyRing.load(
        store, tokens.keys_dir, max_ttl=tokens.max_ttl, leeway=tokens.leeway
    )
    revocations = RevocationCache(store, clock, poll_interval=0.2, staleness=30)
    verifier = BrokerTokenVerifier.from_config(config, keyring, revocations, clock, store)
    service = TokenService(store, keyring, revocations, config, clock, verifier=verifier)
    server = _whoami_server()
    mcp_app = server.streamable_http_app(
        streamable_http_path="/mcp",
        host="127.0.0.1",
        # Strings, not AnyHttpUrl: a path-less issuer must keep its exact form (pitfall 8).
        auth=AuthSettings.model_validate(
            {
                "issuer_url": config.server.base_url,
                "resource_server_url": config.server.resource_url,
                "validate_token_resource": False,
            }
        ),
        token_verifier=verifier,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with revocations, server.session_manager.run():
            yield

    app = Starlette(routes=[*oauth_routes(service), Mount("/", app=mcp_app)], lifespan=lifespan)
    return app, service, verifier, revocations


@asynccontextmanager
async def running_broker(
    store: SqlStore,
    tmp_path: Path,
    *,
    clock: Clock | None = None,
    real_app: bool = False,
    scope_files: tuple[Path, ...] = (),
    **tokens: Any,
) -> AsyncIterator[Broker]:
    """A served broker; ``real_app`` serves ``broker.app.create_app`` instead of the stand-in
    (whose MCP endpoint has a ``whoami`` tool the real front does not)."""
    clock = clock or SystemClock()
    late = LateApp()
    async with serve_app(late) as url, AsyncExitStack() as stack:
        config = BrokerConfig(
            server=ServerConfig(public_url=url),
            store=StoreConfig(url="sqlite+aiosqlite:///unused.db"),
            tokens=TokenConfig(keys_dir=tmp_path / "keys", **tokens),
            scope_files=scope_files,
            base_dir=tmp_path,  # the recording key is created under it, never in the checkout
        )
        if real_app:
            from broker.app import create_app

            app = create_app(config, store=store, clock=clock, environ={})
            await stack.enter_async_context(app.router.lifespan_context(app))
            services = app.state.services
            service, verifier, revocations = (
                services.tokens,
                services.verifier,
                services.revocations,
            )
        else:
            app, service, verifier, revocations = await _build_app(config, store, clock, stack)
            await stack.enter_async_context(app.router.lifespan_context(app))
        late.app = app
        yield Broker(url, config, store, service, verifier, revocations)


# tests ----------------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    async with migrated_store(sqlite_url(tmp_path)) as s:
        yield s


@asynccontextmanager
async def running(store: SqlStore, tmp_path: Path, **kw: Any) -> AsyncIterator[Broker]:
    """`running_broker` under a bound (entered in the test's own task: it holds task groups)."""
    with anyio.fail_after(30):
        async with running_broker(store, tmp_path, **kw) as broker:
            yield broker


def _provider(broker: Broker, client_id: str, secret: str, scope: str, method: str = "basic"):
    return ClientCredentialsOAuthProvider(
        server_url=broker.mcp_url,
        storage=MemoryStorage(),
        client_id=client_id,
        client_secret=secret,
        token_endpoint_auth_method=(
            "client_secret_basic" if method == "basic" else "client_secret_post"
        ),
        scope=scope,
        issuer=broker.url,
    )


@pytest.mark.parametrize("method", ["basic", "post"])
async def test_a_stock_sdk_client_with_client_credentials_finds_its_way_and_calls_a_tool(
    store: SqlStore, tmp_path: Path, method: str
) -> None:
    async with running(store, tmp_path) as broker:
        agent, secret = await broker.add_agent("stock", ["time:read", "demo:use"])
        auth = _provider(broker, agent.id, secret, "time:read", method)
        with anyio.fail_after(20):
            async with httpx2.AsyncClient(auth=auth, timeout=10) as http:
                who = await broker.whoami(http)
        assert who["client_id"] == agent.id
        assert who["subject"] == agent.id
        tokens = await broker.store.list_tokens(agent_id=agent.id)
        assert len(tokens) == 1
        # The stock provider drops its configured scope when nothing is advertised (pitfall 20),
        # so the token carries the agent's registered scopes; what was granted is recorded.
        assert set(who["scopes"]) == set(tokens[0].scopes)
        assert set(tokens[0].scopes) <= {"time:read", "demo:use"}


async def test_the_stock_client_gets_a_token_from_the_real_app(
    store: SqlStore, tmp_path: Path
) -> None:
    scopes = tmp_path / "scopes.toml"
    scopes.write_text(
        '[[scope]]\nname = "time:read"\ndescription = "time"\n'
        '[[scope.grant]]\nconnector = "time"\ntools = ["get_current_time"]\n',
        encoding="utf-8",
    )
    async with running(store, tmp_path, real_app=True, scope_files=(scopes,)) as broker:
        agent, secret = await broker.add_agent("stock", ["time:read"])
        auth = _provider(broker, agent.id, secret, "time:read")
        async with (
            httpx2.AsyncClient(auth=auth, timeout=10) as http,
            Client(streamable_http_client(broker.mcp_url, http_client=http)) as client,
        ):
            await client.list_tools()
        tokens = await broker.store.list_tokens(agent_id=agent.id)
        assert [t.scopes for t in tokens] == [("time:read",)]


async def test_a_stock_sdk_client_with_private_key_jwt_gets_a_token(
    store: SqlStore, tmp_path: Path
) -> None:
    async with running(store, tmp_path) as broker:
        key = Ed25519PrivateKey.generate()
        jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
        agent, _ = await broker.add_agent("signer", ["time:read"], public_jwk=jwk)
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
        params = SignedJWTParameters(
            issuer=agent.id, subject=agent.id, signing_key=pem, signing_algorithm="EdDSA",
            lifetime_seconds=60,
        )  # fmt: skip
        auth = PrivateKeyJWTOAuthProvider(
            server_url=broker.mcp_url,
            storage=MemoryStorage(),
            client_id=agent.id,
            assertion_provider=params.create_assertion_provider(),
            issuer=broker.url,
        )
        with anyio.fail_after(20):
            async with httpx2.AsyncClient(auth=auth, timeout=10) as http:
                who = await broker.whoami(http)
        assert who["client_id"] == agent.id


async def test_a_replayed_client_assertion_is_refused(store: SqlStore, tmp_path: Path) -> None:
    async with running(store, tmp_path) as broker:
        key = Ed25519PrivateKey.generate()
        jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
        agent, _ = await broker.add_agent("signer", ["time:read"], public_jwk=jwk)
        now = int(time.time())
        claims = {"iss": agent.id, "sub": agent.id, "aud": broker.token_url, "iat": now,
                  "exp": now + 60, "jti": secrets.token_urlsafe(16)}  # fmt: skip
        form = {
            "grant_type": "client_credentials",
            "scope": "time:read",
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": jwt.encode(claims, key, algorithm="EdDSA"),
        }
        first = await broker.post_token(form)
        assert first.status_code == 200, first.text
        again = await broker.post_token(form)
        assert again.status_code == 400
        assert again.json() == {
            "error": "invalid_client",
            "error_description": "client authentication failed",
        }


async def test_metadata_names_the_issuer_exactly_and_advertises_no_scopes(
    store: SqlStore,
    tmp_path: Path,
) -> None:
    async with running(store, tmp_path) as broker:
        async with httpx2.AsyncClient(timeout=10) as http:
            asm = (await http.get(broker.url + "/.well-known/oauth-authorization-server")).json()
            prm = (await http.get(broker.url + "/.well-known/oauth-protected-resource/mcp")).json()
            prm_root = (await http.get(broker.url + "/.well-known/oauth-protected-resource")).json()
            jwks = (await http.get(broker.url + "/.well-known/jwks.json")).json()
            authorize = await http.get(broker.url + "/oauth/authorize")
        assert asm["issuer"] == broker.url
        assert not asm["issuer"].endswith("/")
        assert asm["token_endpoint"] == broker.token_url
        assert asm["jwks_uri"] == broker.url + "/.well-known/jwks.json"
        assert set(asm["grant_types_supported"]) == {"client_credentials", EXCHANGE_GRANT}
        assert set(asm["token_endpoint_auth_methods_supported"]) == {
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt",
        }
        assert set(asm["token_endpoint_auth_signing_alg_values_supported"]) == {"EdDSA", "ES256"}
        assert "scopes_supported" not in asm
        assert prm == prm_root
        assert prm["resource"] == broker.mcp_url
        assert prm["authorization_servers"] == [broker.url]
        assert prm["bearer_methods_supported"] == ["header"]
        assert "scopes_supported" not in prm
        assert [k["kty"] for k in jwks["keys"]] == ["OKP"]
        assert all("d" not in k for k in jwks["keys"])
        assert authorize.status_code == 400
        assert authorize.json()["error"] == "unsupported_response_type"


async def test_an_issued_token_verifies_and_carries_the_task(
    store: SqlStore, tmp_path: Path
) -> None:
    async with running(store, tmp_path) as broker:
        agent, secret = await broker.add_agent("bot", ["files:read", "files:write"], max_ttl=300)
        response = await broker.post_token(
            {
                "grant_type": "client_credentials",
                "scope": "files:read",
                "resource": broker.mcp_url,
                "task": "task-42",
                "purpose": "summarise the logs",
                "expires_in": "9999",
                "budget": "5",
            },
            client=(agent.id, secret),
        )
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert body["token_type"] == "Bearer"
        assert body["scope"] == "files:read"
        assert body["expires_in"] == 300  # the agent's maximum wins over the request
        assert "issued_token_type" not in body
        claims = broker.verifier.verify_claims(body["access_token"])
        assert claims.sub == claims.client_id == agent.id
        assert claims.aud == broker.mcp_url
        assert claims.iss == broker.url
        assert claims.task.id == "task-42"
        assert claims.task.purpose == "summarise the logs"
        assert claims.budget == 5
        assert claims.exp - claims.iat == 300
        assert jwt.get_unverified_header(body["access_token"])["typ"] == "at+jwt"
        recorded = await broker.store.get_token(claims.jti)
        assert recorded.task_id == "task-42"
        assert await broker.mcp_status(body["access_token"]) == 200


# every error code and status ------------------------------------------------------------------


async def _error_case(broker: Broker, case: str) -> tuple[httpx2.Response, str, int]:
    agent, secret = await broker.add_agent("bot", ["files:read"])
    cc = {"grant_type": "client_credentials", "scope": "files:read"}
    ok = (agent.id, secret)
    match case:
        case "no-grant-type":
            return await broker.post_token({"scope": "x"}, client=ok), "invalid_request", 400
        case "unsupported-grant-type":
            r = await broker.post_token({"grant_type": "password"}, client=ok)
            return r, "unsupported_grant_type", 400
        case "wrong-secret-basic":
            r = await broker.post_token(cc, client=(agent.id, "nope"))
            return r, "invalid_client", 401
        case "unknown-client-post":
            r = await broker.post_token({**cc, "client_id": "agt_x", "client_secret": "s"})
            return r, "invalid_client", 400
        case "no-client-auth":
            return await broker.post_token(cc), "invalid_client", 400
        case "two-auth-methods":
            r = await broker.post_token({**cc, "client_id": agent.id, "client_secret": secret},
                                        client=ok)  # fmt: skip
            return r, "invalid_request", 400
        case "scope-not-allowed":
            r = await broker.post_token({**cc, "scope": "files:read files:write"}, client=ok)
            return r, "invalid_scope", 400
        case "malformed-scope":
            r = await broker.post_token({**cc, "scope": "files:read  x"}, client=ok)
            return r, "invalid_scope", 400
        case "resource-mismatch":
            r = await broker.post_token({**cc, "resource": "http://evil.example/mcp"}, client=ok)
            return r, "invalid_target", 400
        case "bad-expires-in":
            r = await broker.post_token({**cc, "expires_in": "-5"}, client=ok)
            return r, "invalid_request", 400
        case "bad-budget":
            r = await broker.post_token({**cc, "budget": "0"}, client=ok)
            return r, "invalid_request", 400
        case "bad-details-json":
            r = await broker.post_token({**cc, "authorization_details": "[{"}, client=ok)
            return r, "invalid_authorization_details", 400
        case "bad-details-shape":
            details = json.dumps([{"type": "payment", "amount": 5}])
            r = await broker.post_token({**cc, "authorization_details": details}, client=ok)
            return r, "invalid_authorization_details", 400
        case "disabled-agent":
            await broker.store.set_agent_status(
                agent.id, AgentStatus.DISABLED, reason="r", actor="t", at=broker.service.clock.now()
            )
            return await broker.post_token(cc, client=ok), "invalid_client", 401
        case "quarantined-agent":
            await broker.store.set_agent_status(
                agent.id, AgentStatus.QUARANTINED, reason="r", actor="t",
                at=broker.service.clock.now(),
            )  # fmt: skip
            return await broker.post_token(cc, client=ok), "access_denied", 400
        case "exchange-missing-params":
            r = await broker.post_token({"grant_type": EXCHANGE_GRANT}, client=ok)
            return r, "invalid_request", 400
        case "exchange-actor-token":
            form = {"grant_type": EXCHANGE_GRANT, "subject_token": "x", "actor_token": "y",
                    "subject_token_type": ACCESS_TOKEN_TYPE, "actor": "bot"}  # fmt: skip
            return await broker.post_token(form, client=ok), "invalid_request", 400
        case "exchange-bad-subject-token":
            form = {"grant_type": EXCHANGE_GRANT, "subject_token": "not.a.token",
                    "subject_token_type": ACCESS_TOKEN_TYPE, "actor": "bot"}  # fmt: skip
            return await broker.post_token(form, client=ok), "invalid_grant", 400
        case "exchange-wrong-token-type":
            form = {"grant_type": EXCHANGE_GRANT, "subject_token": "x",
                    "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
                    "actor": "bot"}  # fmt: skip
            return await broker.post_token(form, client=ok), "invalid_request", 400
    raise AssertionError(case)


ERROR_CASES = [
    "no-grant-type",
    "unsupported-grant-type",
    "wrong-secret-basic",
    "unknown-client-post",
    "no-client-auth",
    "two-auth-methods",
    "scope-not-allowed",
    "malformed-scope",
    "resource-mismatch",
    "bad-expires-in",
    "bad-budget",
    "bad-details-json",
    "bad-details-shape",
    "disabled-agent",
    "quarantined-agent",
    "exchange-missing-params",
    "exchange-actor-token",
    "exchange-bad-subject-token",
    "exchange-wrong-token-type",
]


@pytest.mark.parametrize("case", ERROR_CASES)
async def test_token_endpoint_errors_carry_the_rfc_code_and_status(
    store: SqlStore, tmp_path: Path, case: str
) -> None:
    async with running(store, tmp_path) as broker:
        response, error, status = await _error_case(broker, case)
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error", "error_description"}
        assert body["error"] == error
        assert response.headers["cache-control"] == "no-store"
        assert "Traceback" not in response.text
        if status == 401:
            assert response.headers["www-authenticate"].startswith("Basic ")


async def test_only_a_form_body_within_the_cap_is_read(store: SqlStore, tmp_path: Path) -> None:
    async with running(store, tmp_path) as broker:
        agent, secret = await broker.add_agent("bot", ["files:read"])
        auth = base64.b64encode(f"{agent.id}:{secret}".encode()).decode()
        headers = {"authorization": f"Basic {auth}"}
        async with httpx2.AsyncClient(timeout=10) as http:
            as_json = await http.post(
                broker.token_url, json={"grant_type": "client_credentials"}, headers=headers
            )
            huge = await http.post(
                broker.token_url,
                content=b"grant_type=client_credentials&pad=" + b"a" * 100_000,
                headers={**headers, "content-type": "application/x-www-form-urlencoded"},
            )
            repeated = await http.post(
                broker.token_url,
                content=b"grant_type=client_credentials&scope=files:read&scope=files:read",
                headers={**headers, "content-type": "application/x-www-form-urlencoded"},
            )
            garbage = await http.post(
                broker.token_url,
                content=b"\xff\xfe&&&",
                headers={**headers, "content-type": "application/x-www-form-urlencoded"},
            )
            get = await http.get(broker.token_url)
        assert (as_json.status_code, as_json.json()["error"]) == (400, "invalid_request")
        assert (huge.status_code, huge.json()["error"]) == (413, "invalid_request")
        assert (repeated.status_code, repeated.json()["error"]) == (400, "invalid_request")
        assert "scope" in repeated.json()["error_description"]
        assert (garbage.status_code, garbage.json()["error"]) == (400, "invalid_request")
        assert get.status_code == 405


async def test_an_unexpected_failure_is_a_server_error_without_details(
    store: SqlStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(store, tmp_path) as broker:
        agent, secret = await broker.add_agent("bot", ["files:read"])

        async def boom(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(broker.service, "client_credentials", boom)
        response = await broker.post_token(
            {"grant_type": "client_credentials", "scope": "files:read"}, client=(agent.id, secret)
        )
        assert response.status_code == 500
        assert response.json() == {"error": "server_error", "error_description": "internal error"}
        assert "secret internals" not in response.text
        assert any(r.exc_info for r in caplog.records if r.name == "broker.oauth")


# delegation and revocation through HTTP -------------------------------------------------------


def _exchange_form(parent_token: str, actor: str, **extra: str) -> dict[str, str]:
    return {
        "grant_type": EXCHANGE_GRANT,
        "subject_token": parent_token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "actor": actor,
        **extra,
    }


async def test_delegation_narrows_and_never_widens(store: SqlStore, tmp_path: Path) -> None:
    async with running(store, tmp_path) as broker:
        parent, p_secret = await broker.add_agent("planner", ["files:read", "files:write"])
        child, _ = await broker.add_agent("reader", ["files:read", "files:write", "net:fetch"])
        details = [{"type": "tool_call", "connector": "files", "tools": ["read_text_file"]}]
        parent_token = await broker.token_for(
            (parent.id, p_secret), "files:read files:write", budget="10", expires_in="300"
        )
        pclaims = broker.verifier.verify_claims(parent_token)
        p = (parent.id, p_secret)

        narrowed = await broker.post_token(
            _exchange_form(
                parent_token, "reader", scope="files:read", budget="3",
                authorization_details=json.dumps(details),
            ),
            client=p,
        )  # fmt: skip
        assert narrowed.status_code == 200, narrowed.text
        body = narrowed.json()
        assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
        assert body["scope"] == "files:read"
        cclaims = broker.verifier.verify_claims(body["access_token"])
        assert cclaims.client_id == child.id
        assert cclaims.sub == parent.id
        assert cclaims.act is not None
        assert cclaims.act.sub == child.id
        assert cclaims.delegation is not None
        assert cclaims.delegation.chain == (pclaims.jti,)
        assert cclaims.task.id == pclaims.task.id
        assert cclaims.budget == 3
        assert cclaims.exp <= pclaims.exp
        assert cclaims.authorization_details is not None
        assert list(cclaims.authorization_details)[-1] == details[0]
        assert await broker.mcp_status(body["access_token"]) == 200
        recorded = await broker.store.get_token(cclaims.jti)
        assert recorded.parent_jti == pclaims.jti

        wider_scope = await broker.post_token(
            _exchange_form(parent_token, "reader", scope="net:fetch"), client=p
        )
        assert wider_scope.json()["error"] == "invalid_scope"
        longer = await broker.post_token(
            _exchange_form(parent_token, "reader", expires_in="3000"), client=p
        )
        assert longer.status_code == 200
        assert broker.verifier.verify_claims(longer.json()["access_token"]).exp <= pclaims.exp
        bigger_budget = await broker.post_token(
            _exchange_form(parent_token, "reader", budget="50"), client=p
        )
        assert bigger_budget.status_code == 400
        assert bigger_budget.json()["error"] in {"invalid_request", "invalid_scope"}


async def test_delegation_depth_is_bounded(store: SqlStore, tmp_path: Path) -> None:
    with anyio.fail_after(20):
        async with running_broker(store, tmp_path, max_delegation_depth=1) as broker:
            a, a_secret = await broker.add_agent("a", ["s"])
            b, b_secret = await broker.add_agent("b", ["s"])
            await broker.add_agent("c", ["s"])
            root = await broker.token_for((a.id, a_secret), "s")
            first = await broker.post_token(_exchange_form(root, "b"), client=(a.id, a_secret))
            assert first.status_code == 200, first.text
            second = await broker.post_token(
                _exchange_form(first.json()["access_token"], "c"), client=(b.id, b_secret)
            )
    assert second.status_code == 400
    assert second.json()["error"] == "access_denied"


async def test_a_stolen_parent_token_cannot_be_exchanged_by_another_agent(
    store: SqlStore,
    tmp_path: Path,
) -> None:
    async with running(store, tmp_path) as broker:
        owner, o_secret = await broker.add_agent("owner", ["files:read"])
        thief, t_secret = await broker.add_agent("thief", ["files:read"])
        stolen = await broker.token_for((owner.id, o_secret), "files:read")
        response = await broker.post_token(
            _exchange_form(stolen, "thief"), client=(thief.id, t_secret)
        )
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"


async def test_revoking_a_parent_refuses_its_child_at_the_verifier(
    store: SqlStore, tmp_path: Path
) -> None:
    async with running(store, tmp_path) as broker:
        parent, p_secret = await broker.add_agent("planner", ["files:read"])
        await broker.add_agent("reader", ["files:read"])
        parent_token = await broker.token_for((parent.id, p_secret), "files:read")
        exchanged = await broker.post_token(
            _exchange_form(parent_token, "reader"), client=(parent.id, p_secret)
        )
        child_token = exchanged.json()["access_token"]
        assert await broker.mcp_status(child_token) == 200
        jti = broker.verifier.verify_claims(parent_token).jti
        await broker.service.revoke_token(jti, reason="leaked", actor="test")
        assert await broker.mcp_status(parent_token) == 401
        assert await broker.mcp_status(child_token) == 401
        again = await broker.post_token(
            _exchange_form(parent_token, "reader"), client=(parent.id, p_secret)
        )
        assert again.json()["error"] == "invalid_grant"


async def test_revoking_a_task_or_an_agent_refuses_their_tokens(
    store: SqlStore, tmp_path: Path
) -> None:
    async with running(store, tmp_path) as broker:
        agent, secret = await broker.add_agent("bot", ["files:read"])
        by_task = await broker.token_for((agent.id, secret), "files:read", task="t-1")
        other_task = await broker.token_for((agent.id, secret), "files:read", task="t-2")
        await broker.service.revoke_task("t-1", reason="done", actor="test")
        assert await broker.mcp_status(by_task) == 401
        assert await broker.mcp_status(other_task) == 200
        # A revoked task is over: no new token of it is issued.
        again = await broker.post_token(
            {"grant_type": "client_credentials", "scope": "files:read", "task": "t-1"},
            client=(agent.id, secret),
        )
        assert again.status_code == 400
        assert again.json()["error_description"] == "this task is revoked: name a new task"
        await broker.service.revoke_agent("bot", reason="rotate", actor="test")
        assert await broker.mcp_status(other_task) == 401


# RFC 7009: an agent revokes its own tokens ---------------------------------------------------


async def _post_revoke(
    broker: Broker, form: dict[str, str], client: tuple[str, str] | None
) -> httpx2.Response:
    headers: dict[str, str] = {}
    if client is not None:
        raw = base64.b64encode(f"{client[0]}:{client[1]}".encode()).decode()
        headers["authorization"] = f"Basic {raw}"
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(broker.url + "/oauth/revoke", data=form, headers=headers)


async def test_an_agent_revokes_its_own_token_and_the_tokens_delegated_from_it(
    store: SqlStore, tmp_path: Path
) -> None:
    async with running(store, tmp_path) as broker:
        planner, p_secret = await broker.add_agent("planner", ["files:read"])
        await broker.add_agent("reader", ["files:read"])
        other = await broker.token_for((planner.id, p_secret), "files:read")
        token = await broker.token_for((planner.id, p_secret), "files:read")
        exchanged = await broker.post_token(
            _exchange_form(token, "reader"), client=(planner.id, p_secret)
        )
        child = exchanged.json()["access_token"]
        assert await broker.mcp_status(child) == 200

        done = await _post_revoke(
            broker, {"token": token, "token_type_hint": "access_token"}, (planner.id, p_secret)
        )
        assert done.status_code == 200
        assert done.headers["cache-control"] == "no-store"
        assert await broker.mcp_status(token) == 401
        assert await broker.mcp_status(child) == 401
        assert await broker.mcp_status(other) == 200  # only what was revoked
        revocations = await broker.store.revocations_since(0)
        assert [(r.actor, r.reason) for r in revocations] == [
            (f"agent:{planner.id}", "revoked by its holder")
        ]
        # Revoking again, or a token that is not one, is not an error (RFC 7009 §2.2).
        assert (
            await _post_revoke(broker, {"token": token}, (planner.id, p_secret))
        ).status_code == 200
        junk = await _post_revoke(broker, {"token": "not-a-token"}, (planner.id, p_secret))
        assert junk.status_code == 200


async def test_a_token_of_another_agent_cannot_be_revoked_by_it(
    store: SqlStore, tmp_path: Path
) -> None:
    async with running(store, tmp_path) as broker:
        owner, o_secret = await broker.add_agent("owner", ["files:read"])
        other, x_secret = await broker.add_agent("other", ["files:read"])
        token = await broker.token_for((owner.id, o_secret), "files:read")
        refused = await _post_revoke(broker, {"token": token}, (other.id, x_secret))
        assert refused.status_code == 400
        assert refused.json()["error"] == "unauthorized_client"
        assert await broker.mcp_status(token) == 200
        anonymous = await _post_revoke(broker, {"token": token}, None)
        assert anonymous.status_code == 400
        assert anonymous.json()["error"] == "invalid_client"
        wrong = await _post_revoke(broker, {"token": token}, (owner.id, "wrong-secret"))
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"].startswith("Basic")
        missing = await _post_revoke(
            broker, {"token_type_hint": "access_token"}, (owner.id, o_secret)
        )
        assert missing.json()["error_description"] == "token is required"
        assert await broker.mcp_status(token) == 200


async def test_the_metadata_names_the_revocation_endpoint(store: SqlStore, tmp_path: Path) -> None:
    async with running(store, tmp_path) as broker, httpx2.AsyncClient(timeout=10) as http:
        meta = (await http.get(broker.url + "/.well-known/oauth-authorization-server")).json()
    assert meta["revocation_endpoint"] == broker.url + "/oauth/revoke"
    assert "private_key_jwt" in meta["revocation_endpoint_auth_methods_supported"]
