"""The broker's authorization-server endpoints: a Starlette route list over `TokenService`.

Shell adapter: HTTP in, `broker.agents` and `broker.token_service` do the work. Routes:

- ``POST /oauth/token``: ``application/x-www-form-urlencoded`` only, at most
  `MAX_TOKEN_REQUEST_BYTES`, no repeated parameter (RFC 6749 §3.2), empty values count as absent.
  ``grant_type=client_credentials`` with ``scope``, ``resource`` (RFC 8707), ``task`` (task id),
  ``purpose``, ``expires_in`` (seconds), ``authorization_details`` (RFC 9396 JSON array),
  ``budget`` (calls); or ``grant_type=urn:ietf:params:oauth:grant-type:token-exchange`` (RFC 8693)
  with ``subject_token``, ``subject_token_type``, ``actor`` (sub-agent id or name; a broker
  extension), optional ``scope``, ``resource``, ``audience``, ``requested_token_type``,
  ``expires_in``, ``authorization_details``, ``budget``, ``purpose``. Errors are RFC 6749 §5.2
  JSON; ``invalid_client`` is 401 with ``WWW-Authenticate: Basic`` when Basic was used, else 400.
  Every answer carries ``Cache-Control: no-store``; an unexpected failure is ``server_error``.
- ``POST /oauth/revoke`` (RFC 7009): an agent revokes a token issued to it (or delegated from
  one of its own), and with it every token delegated from that one. Same form rules and client
  authentication as the token endpoint; ``token`` is required, ``token_type_hint`` is accepted
  and ignored (the broker issues access tokens only). A token that does not verify (malformed,
  expired, foreign) is answered 200 like a revoked one, as RFC 7009 §2.2 says; a valid token of
  another agent is refused with ``unauthorized_client`` and stays valid.
  Broker extension: ``close_task=true`` closes the token's *task* instead (its work is over; see
  `TokenService.close_task`): only the agent that started the task, with a token that still
  verifies, may; a token that does not verify is ``invalid_grant`` here (the agent must learn
  that nothing was closed), and a delegated token is ``unauthorized_client``.
- ``GET /.well-known/oauth-authorization-server`` (RFC 8414), ``GET /.well-known/jwks.json``,
  ``GET /.well-known/oauth-protected-resource[/mcp]`` (RFC 9728), and ``GET /oauth/authorize``,
  which only says that no authorization-endpoint flow exists (the SDK's metadata model needs an
  ``authorization_endpoint``). No ``scopes_supported`` is advertised (mcp-sdk-notes pitfall 20).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.agents import authenticate_client
from broker.approvals import AuthorizationPending
from broker.core.tokens import TokenRejected
from broker.errors import ClientAuthFailed, NotFound, OAuthError, StoreUnavailable
from broker.token_service import TokenService

__all__ = [
    "EXCHANGE_GRANT",
    "MAX_TOKEN_REQUEST_BYTES",
    "REVOKE_PATH",
    "TOKEN_PATH",
    "authorization_server_metadata",
    "oauth_routes",
    "protected_resource_metadata",
]

logger = logging.getLogger(__name__)

TOKEN_PATH = "/oauth/token"
REVOKE_PATH = "/oauth/revoke"
AUTHORIZE_PATH = "/oauth/authorize"
JWKS_PATH = "/.well-known/jwks.json"
EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
MAX_TOKEN_REQUEST_BYTES = 32 * 1024
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_FORM = "application/x-www-form-urlencoded"


class _BadRequest(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def authorization_server_metadata(service: TokenService) -> dict[str, Any]:
    """RFC 8414 metadata; ``issuer`` is exactly ``server.base_url`` (no trailing slash)."""
    issuer = service.issuer
    return {
        "issuer": issuer,
        "token_endpoint": issuer + TOKEN_PATH,
        "authorization_endpoint": issuer + AUTHORIZE_PATH,
        "jwks_uri": issuer + JWKS_PATH,
        "response_types_supported": [],
        "grant_types_supported": ["client_credentials", EXCHANGE_GRANT],
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt",
        ],
        "token_endpoint_auth_signing_alg_values_supported": ["EdDSA", "ES256"],
        "revocation_endpoint": issuer + REVOKE_PATH,
        "revocation_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt",
        ],
        "revocation_endpoint_auth_signing_alg_values_supported": ["EdDSA", "ES256"],
        "authorization_details_types_supported": ["tool_call", "data_flow"],
    }


def protected_resource_metadata(service: TokenService) -> dict[str, Any]:
    """RFC 9728 metadata of the MCP endpoint."""
    return {
        "resource": service.resource,
        "authorization_servers": [service.issuer],
        "bearer_methods_supported": ["header"],
        "resource_name": "mcp-authz-broker",
        "authorization_details_types_supported": ["tool_call", "data_flow"],
    }


def _error(
    error: str, description: str, status: int, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={**_NO_STORE, **(headers or {})},
    )


async def _read_form(request: Request, limit: int) -> dict[str, str]:
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != _FORM:
        raise _BadRequest("invalid_request", f"this endpoint accepts {_FORM} only")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise _BadRequest("invalid_request", f"request body larger than {limit} bytes", 413)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise _BadRequest("invalid_request", f"request body larger than {limit} bytes", 413)
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except (UnicodeDecodeError, ValueError):
        raise _BadRequest("invalid_request", "the body is not a well-formed form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise _BadRequest("invalid_request", f"parameter '{name}' appears more than once")
        form[name] = value
    # RFC 6749 §3.1: a parameter sent without a value is treated as omitted.
    return {k: v for k, v in form.items() if v != ""}


def _int_param(form: Mapping[str, str], name: str) -> int | None:
    raw = form.get(name)
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise _BadRequest("invalid_request", f"{name} must be a positive whole number")
    return int(raw)


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _details_param(form: Mapping[str, str]) -> list[dict[str, Any]] | None:
    raw = form.get("authorization_details")
    if raw is None:
        return None
    try:
        value = json.loads(raw, object_pairs_hook=_strict_object)
    except (ValueError, RecursionError):
        raise _BadRequest(
            "invalid_authorization_details", "authorization_details is not strict JSON"
        ) from None
    if not isinstance(value, list) or not all(isinstance(d, dict) for d in value):  # pyright: ignore[reportUnknownVariableType]
        raise _BadRequest(
            "invalid_authorization_details", "authorization_details must be an array of objects"
        )
    return value  # pyright: ignore[reportUnknownVariableType]


async def _grant(service: TokenService, request: Request, form: Mapping[str, str]) -> Response:
    grant_type = form.get("grant_type")
    if grant_type is None:
        raise _BadRequest("invalid_request", "grant_type is required")
    if grant_type not in ("client_credentials", EXCHANGE_GRANT):
        raise _BadRequest(
            "unsupported_grant_type",
            f"supported: client_credentials, {EXCHANGE_GRANT}",
        )
    agent = await authenticate_client(
        service.store,
        form,
        request.headers,
        token_endpoint_url=service.issuer + TOKEN_PATH,
        issuer=service.issuer,
        now=service.clock.now(),
    )
    expires_in = _int_param(form, "expires_in")
    budget = _int_param(form, "budget")
    details = _details_param(form)
    if grant_type == "client_credentials":
        granted = await service.client_credentials(
            agent,
            scope=form.get("scope"),
            resource=form.get("resource"),
            task_id=form.get("task"),
            purpose=form.get("purpose"),
            expires_in=expires_in,
            authorization_details=details,
            budget=budget,
            auth_req_id=form.get("auth_req_id"),
        )
    else:
        if "actor_token" in form:
            raise _BadRequest(
                "invalid_request", "actor_token is not supported: name the sub-agent with 'actor'"
            )
        missing = [p for p in ("subject_token", "subject_token_type", "actor") if p not in form]
        if missing:
            raise _BadRequest("invalid_request", f"missing: {', '.join(missing)}")
        granted = await service.exchange(
            agent,
            subject_token=form["subject_token"],
            subject_token_type=form["subject_token_type"],
            actor=form["actor"],
            scope=form.get("scope"),
            resource=form.get("resource"),
            audience=form.get("audience"),
            requested_token_type=form.get("requested_token_type"),
            expires_in=expires_in,
            authorization_details=details,
            budget=budget,
            purpose=form.get("purpose"),
        )
    return JSONResponse(granted.to_json(), headers=_NO_STORE)


async def _revoke(service: TokenService, request: Request, form: Mapping[str, str]) -> Response:
    agent = await authenticate_client(
        service.store,
        form,
        request.headers,
        token_endpoint_url=service.issuer + REVOKE_PATH,
        issuer=service.issuer,
        now=service.clock.now(),
    )
    raw = form.get("token")
    if raw is None:
        raise _BadRequest("invalid_request", "token is required")
    close = form.get("close_task")
    if close not in (None, "true", "false"):
        raise _BadRequest("invalid_request", "close_task must be true or false")
    try:
        claims = service.verifier.verify_claims(raw)
    except TokenRejected as exc:
        if close == "true":
            raise _BadRequest(
                "invalid_grant", f"nothing closed: the token does not verify ({exc.reason})"
            ) from None
        # RFC 7009 §2.2: an invalid token (expired, malformed, not ours) is not an error.
        return Response(status_code=200, headers=_NO_STORE)
    if agent.id not in (claims.client_id, claims.sub):
        raise _BadRequest("unauthorized_client", "the token was not issued to this client")
    if close == "true":
        await service.close_task(claims, agent)
        return Response(status_code=200, headers=_NO_STORE)
    try:
        await service.revoke_token(
            claims.jti, reason="revoked by its holder", actor=f"agent:{agent.id}"
        )
    except NotFound:
        # Signed by us but never recorded as issued: nothing live to revoke.
        return Response(status_code=200, headers=_NO_STORE)
    return Response(status_code=200, headers=_NO_STORE)


async def _answer(
    request: Request,
    work: Callable[[dict[str, str]], Awaitable[Response]],
    max_body_bytes: int,
    endpoint: str,
    unavailable: str,
) -> Response:
    """Read the form, do ``work``, and map every failure to its RFC 6749 §5.2 answer."""
    try:
        form = await _read_form(request, max_body_bytes)
        return await work(form)
    except _BadRequest as exc:
        return _error(exc.error, exc.description, exc.status)
    except ClientAuthFailed:
        return _invalid_client(request)
    except AuthorizationPending as exc:
        body = {"error": exc.error, "error_description": exc.description, **exc.extra}
        return JSONResponse(body, 400, headers=_NO_STORE)
    except OAuthError as exc:
        if exc.error == "invalid_client":
            return _invalid_client(request)
        return _error(exc.error, exc.description, exc.status)
    except StoreUnavailable:
        logger.exception("%s endpoint: store unavailable", endpoint)
        return _error("server_error", f"the broker cannot {unavailable} right now", 503)
    except Exception:
        logger.exception("%s endpoint failed", endpoint)
        return _error("server_error", "internal error", 500)


def _invalid_client(request: Request) -> Response:
    # RFC 6749 §5.2: 401 with a matching challenge when the client used the Authorization
    # header; otherwise 400 (a 401 without WWW-Authenticate would break HTTP semantics).
    scheme = request.headers.get("authorization", "").split(" ", 1)[0].lower()
    if scheme == "basic":
        return _error(
            "invalid_client",
            "client authentication failed",
            401,
            {"WWW-Authenticate": 'Basic realm="mcp-authz-broker", charset="UTF-8"'},
        )
    return _error("invalid_client", "client authentication failed", 400)


def oauth_routes(
    service: TokenService, *, max_body_bytes: int = MAX_TOKEN_REQUEST_BYTES
) -> list[Route]:
    """The authorization-server routes; mount them before the MCP app's ``Mount("/")``."""

    async def token(request: Request) -> Response:
        if request.method != "POST":
            # Answered here rather than by routing, so a catch-all mount behind us cannot.
            return _error("invalid_request", "the token endpoint accepts POST only", 405,
                          {"Allow": "POST"})  # fmt: skip
        return await _answer(
            request,
            lambda form: _grant(service, request, form),
            max_body_bytes,
            "token",
            "issue tokens",
        )

    async def revoke(request: Request) -> Response:
        return await _answer(
            request,
            lambda form: _revoke(service, request, form),
            max_body_bytes,
            "revocation",
            "revoke tokens",
        )

    async def authorize(request: Request) -> Response:
        return _error(
            "unsupported_response_type",
            "this broker has no authorization-endpoint flow: use client_credentials or token "
            "exchange at the token endpoint",
            400,
        )

    async def as_metadata(request: Request) -> Response:
        return JSONResponse(authorization_server_metadata(service))

    async def pr_metadata(request: Request) -> Response:
        return JSONResponse(protected_resource_metadata(service))

    async def jwks(request: Request) -> Response:
        try:
            body = service.keyring.jwks(service.clock.now())
        except Exception:
            logger.exception("jwks failed")
            return _error("server_error", "internal error", 500)
        return JSONResponse(body, headers={"Cache-Control": "max-age=60"})

    return [
        Route(TOKEN_PATH, token, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        Route(REVOKE_PATH, revoke, methods=["POST"]),
        Route(AUTHORIZE_PATH, authorize, methods=["GET", "POST"]),
        Route("/.well-known/oauth-authorization-server", as_metadata, methods=["GET"]),
        Route(JWKS_PATH, jwks, methods=["GET"]),
        Route("/.well-known/oauth-protected-resource/mcp", pr_metadata, methods=["GET"]),
        Route("/.well-known/oauth-protected-resource", pr_metadata, methods=["GET"]),
    ]
