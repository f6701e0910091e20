"""The review pages' routes: thin over the store, `broker.admin` and the templates. Shell.

Pages (all under ``/review``): ``login`` (GET form, POST token), ``logout`` (POST),
``sessions`` (filters: agent id or name, task, since/until as RFC 3339 or an age such as
``2h``, decision, flagged; paged by cursor), ``sessions/{id}`` (a timeline page of
`EVENTS_PER_PAGE` events after ``?after=``, with the chain's status), ``approvals`` (pending and
changed tool definitions with their diff; POST ``approvals/approve`` for approvers), ``agents``
(POST ``agents/{id}/release`` with a reason, admins only), and ``static/``.

Every response carries `SECURITY_HEADERS` (a strict CSP: no script at all, styles from this
origin only). Every POST needs a login, a same-origin request and the login's CSRF token, in
that order, then the role; a refusal is a 403 page and changes nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.admin import (
    AdminActions,
    ApiError,
    SessionFilters,
    all_events,
    definition_diff,
    page_sessions,
    read_body,
)
from broker.admin_tokens import authenticate_admin
from broker.core.identity import AdminRole, Agent, AgentStatus
from broker.core.pinning import PinStatus, ToolPin
from broker.core.recording import RecordedEvent, format_timestamp, verify_chain
from broker.errors import AdminAuthFailed, NotFound, StoreUnavailable
from broker.ports import role_allows
from broker.review.auth import ABSOLUTE_LIFETIME, COOKIE_NAME, Login, LoginStore, is_same_origin
from broker.review.render import MAX_TEXT, diff_lines, event_view, pretty, visible
from broker.store.errors import Conflict

__all__ = [
    "CSP",
    "EVENTS_PER_PAGE",
    "SECURITY_HEADERS",
    "SESSIONS_PER_PAGE",
    "review_routes",
]

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
EVENTS_PER_PAGE = 100
SESSIONS_PER_PAGE = 50
MAX_FORM_BYTES = 16 * 1024
_AGE_RE = re.compile(r"^(\d{1,6})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NOTICES = {
    "released": "The agent was released.",
    "approved": "The tool definition was approved.",
}


class _SecurityHeaders:
    """Adds `SECURITY_HEADERS` (and no-store, except for static files) to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/review/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in (b"content-security-policy", b"cache-control")
                    or (static and k.lower() == b"cache-control")
                ]
                for name, value in SECURITY_HEADERS.items():
                    headers.append((name.lower().encode(), value.encode()))
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ToLogin(Exception):
    pass


def _parse_when(text: str, now: datetime) -> datetime:
    age = _AGE_RE.match(text.strip().lower())
    if age:
        return now - timedelta(seconds=int(age.group(1)) * _UNITS[age.group(2)])
    at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return at if at.tzinfo is not None else at.replace(tzinfo=now.tzinfo)


class ReviewPages:
    """The review pages; their logins live in the store, so any process or replica serves them."""

    def __init__(self, services: Any, actions: AdminActions, recording_key: bytes) -> None:
        self.services = services
        self.actions = actions
        self.logins = LoginStore(services.store, recording_key)
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["q"] = lambda value: quote(str(value), safe="")  # pyright: ignore[reportUnknownLambdaType, reportUnknownArgumentType]
        self.env.filters["ts"] = lambda value: "" if value is None else format_timestamp(value)  # pyright: ignore[reportUnknownLambdaType, reportUnknownArgumentType]
        self.env.filters["vis"] = lambda value: visible(str(value))[:MAX_TEXT]  # pyright: ignore[reportUnknownLambdaType, reportUnknownArgumentType]
        public = services.config.server.public_url or ""
        self.public_url: str = public
        self.secure_cookie = public.startswith("https://")

    @property
    def store(self) -> Any:
        return self.services.store

    def now(self) -> datetime:
        return self.services.clock.now()

    # plumbing

    def page(
        self, template: str, login: Login | None, status: int = 200, **context: Any
    ) -> HTMLResponse:
        body = self.env.get_template(template).render(
            login=login,
            csrf=login.csrf if login else "",
            can_approve=login is not None and role_allows(login.role, AdminRole.APPROVER),
            can_release=login is not None and role_allows(login.role, AdminRole.ADMIN),
            notice=context.pop("notice", None),
            error=context.pop("error", None),
            **context,
        )
        return HTMLResponse(body, status)

    async def login_of(self, request: Request) -> Login:
        login = await self.logins.get(request.cookies.get(COOKIE_NAME), self.now())
        if login is None:
            raise _ToLogin
        return login

    async def form(self, request: Request) -> dict[str, str]:
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise _Refused(415, "Forms must be sent as application/x-www-form-urlencoded.")
        try:
            raw = (await read_body(request, MAX_FORM_BYTES)).decode("ascii")
            pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=False, max_num_fields=20)
        except (ApiError, UnicodeDecodeError, ValueError):
            raise _Refused(400, "The form could not be read.") from None
        out: dict[str, str] = {}
        for name, value in pairs:
            if name in out:
                raise _Refused(400, "A form field was repeated.")
            out[name] = value
        return out

    async def guarded_post(
        self, request: Request, needs: AdminRole
    ) -> tuple[Login, dict[str, str]]:
        """The login and form of a state-changing POST that passed every check."""
        try:
            login = await self.login_of(request)
        except _ToLogin:
            raise _Refused(403, "You are not logged in.") from None
        if not is_same_origin(request, self.public_url):
            raise _Refused(403, "Cross-site requests are refused.")
        form = await self.form(request)
        session_id = request.cookies.get(COOKIE_NAME, "")
        if not self.logins.csrf_ok(session_id, form.get("csrf")):
            raise _Refused(403, "The form's CSRF token is missing or wrong. Reload the page.")
        if not role_allows(login.role, needs):
            raise _Refused(403, f"Your role ({login.role.value}) may not do this.")
        return login, form

    def wrap(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except _ToLogin:
                return RedirectResponse("/review/login", 303)
            except _Refused as exc:
                return self.page("error.html", None, exc.status, message=exc.message)
            except NotFound:
                return self.page("error.html", None, 404, message="Not found.")
            except StoreUnavailable:
                logger.exception("review page: store unavailable")
                return self.page("error.html", None, 503, message="The store is unavailable.")
            except Exception:
                logger.exception("review page failed", extra={"path": request.url.path})
                return self.page("error.html", None, 500, message="Something went wrong.")

        return endpoint

    # pages

    async def root(self, request: Request) -> Response:
        return RedirectResponse("/review/sessions", 303)

    async def login_form(self, request: Request) -> Response:
        return self.page("login.html", None)

    async def login(self, request: Request) -> Response:
        if not is_same_origin(request, self.public_url):
            raise _Refused(403, "Cross-site requests are refused.")
        form = await self.form(request)
        raw = form.get("token", "").strip()
        try:
            token = await authenticate_admin(self.store, raw, needs=AdminRole.REVIEWER)
        except AdminAuthFailed:
            return self.page("login.html", None, 401, error="That token was not accepted.")
        await self.logins.drop(request.cookies.get(COOKIE_NAME))
        session_id = await self.logins.create(token, self.now())
        response = RedirectResponse("/review/sessions", 303)
        response.set_cookie(
            COOKIE_NAME,
            session_id,
            max_age=int(ABSOLUTE_LIFETIME.total_seconds()),
            path="/review",
            secure=self.secure_cookie,
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        await self.guarded_post(request, AdminRole.REVIEWER)
        await self.logins.drop(request.cookies.get(COOKIE_NAME))
        response = RedirectResponse("/review/login", 303)
        response.delete_cookie(
            COOKIE_NAME, path="/review", secure=self.secure_cookie, httponly=True, samesite="strict"
        )
        return response

    async def sessions(self, request: Request) -> Response:
        login = await self.login_of(request)
        q = request.query_params
        values = {k: q.get(k, "").strip()[:200] for k in ("agent", "task", "since", "until")}
        values["decision"] = (
            q.get("decision", "") if q.get("decision") in ("allowed", "denied") else ""
        )
        values["flagged"] = q.get("flagged", "") if q.get("flagged") in ("yes", "no") else ""
        agents: Sequence[Agent] = await self.store.list_agents()
        names = {a.id: a.name for a in agents}
        error = None
        agent_id: str | None = None
        if values["agent"]:
            match = [a.id for a in agents if values["agent"] in (a.id, a.name)]
            agent_id = match[0] if match else values["agent"]
        now = self.now()
        times: dict[str, datetime | None] = {"since": None, "until": None}
        for key in ("since", "until"):
            if values[key]:
                try:
                    times[key] = _parse_when(values[key], now)
                except ValueError:
                    error = (
                        f"'{key}' must be a time such as 2026-11-23T12:00Z or an age such as 2h."
                    )
        filters = SessionFilters(
            agent_id=agent_id,
            task_id=values["task"] or None,
            since=times["since"],
            until=times["until"],
            flagged={"yes": True, "no": False}.get(values["flagged"]),
            decision=values["decision"] or None,  # type: ignore[arg-type]  # checked above
        )
        rows: list[Any] = []
        next_link = None
        if error is None:
            try:
                rows, cursor = await page_sessions(
                    self.store, filters, limit=SESSIONS_PER_PAGE, cursor=q.get("cursor") or None
                )
            except ApiError:
                rows, cursor, error = [], None, "That page link is not valid any more."
            if cursor:
                next_link = "/review/sessions?" + urlencode(
                    {**{k: v for k, v in values.items() if v}, "cursor": cursor}
                )
        return self.page(
            "sessions.html",
            login,
            400 if error else 200,
            error=error,
            values=values,
            sessions=rows,
            names=names,
            next_link=next_link,
        )

    async def session(self, request: Request) -> Response:
        login = await self.login_of(request)
        session_id = request.path_params["session_id"]
        session = await self.store.get_session(session_id)
        raw_after = request.query_params.get("after", "0")
        after = int(raw_after) if raw_after.isdigit() and len(raw_after) < 18 else 0
        events: Sequence[RecordedEvent] = await self.store.session_events(
            session_id, after_seq=after, limit=EVENTS_PER_PAGE + 1
        )
        more = len(events) > EVENTS_PER_PAGE
        events = events[:EVENTS_PER_PAGE]
        report = verify_chain(session, await all_events(self.store, session_id))
        agent_name = None
        try:
            agent_name = (await self.store.get_agent(session.agent_id)).name
        except NotFound:
            agent_name = None
        next_link = None
        if more and events:
            next_link = f"/review/sessions/{quote(session_id, safe='')}?after={events[-1].seq}"
        return self.page(
            "session.html",
            login,
            session=session,
            agent_name=agent_name,
            client_info=pretty(dict(session.client_info), 500),
            report=report,
            events=[event_view(e) for e in events],
            first=after == 0,
            next_link=next_link,
        )

    async def approvals(self, request: Request) -> Response:
        login = await self.login_of(request)
        pins: Sequence[ToolPin] = await self.store.list_pins()
        waiting = [p for p in pins if p.status is not PinStatus.APPROVED]
        items = [
            {
                "pin": p,
                "diff": diff_lines(definition_diff(p.approved_definition, p.definition)),
            }
            for p in waiting[:200]
        ]
        notice = _NOTICES.get(request.query_params.get("done", ""))
        return self.page("approvals.html", login, items=items, notice=notice)

    async def approve(self, request: Request) -> Response:
        login, form = await self.guarded_post(request, AdminRole.APPROVER)
        connector, tool, digest = (form.get(k, "") for k in ("connector_id", "tool_name", "digest"))
        if not (connector and tool and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise _Refused(400, "The approval form is incomplete.")
        token, _ = await self.store.get_admin_token(login.token_id)
        try:
            await self.actions.approve_pin(token, connector, tool, digest, channel="review")
        except Conflict:
            raise _Refused(
                409, "The tool's definition changed since it was shown; review it again."
            ) from None
        return RedirectResponse("/review/approvals?done=approved", 303)

    async def agents(self, request: Request) -> Response:
        login = await self.login_of(request)
        agents: Sequence[Agent] = await self.store.list_agents()
        held = [a for a in agents if a.status is not AgentStatus.ACTIVE]
        active = [a for a in agents if a.status is AgentStatus.ACTIVE]
        notice = _NOTICES.get(request.query_params.get("done", ""))
        return self.page("agents.html", login, held=held, active=active, notice=notice)

    async def release(self, request: Request) -> Response:
        login, form = await self.guarded_post(request, AdminRole.ADMIN)
        agent_id = request.path_params["agent_id"]
        reason = form.get("reason", "").strip()
        if not reason or len(reason) > 1000:
            raise _Refused(400, "A release needs a reason (at most 1000 characters).")
        agent = await self.store.get_agent(agent_id)
        if agent.status is AgentStatus.ACTIVE:
            raise _Refused(409, "That agent is already active.")
        token, _ = await self.store.get_admin_token(login.token_id)
        await self.actions.set_status(token, agent.id, AgentStatus.ACTIVE, reason, channel="review")
        return RedirectResponse("/review/agents?done=released", 303)

    async def not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await self.page("error.html", None, 404, message="Not found.")(scope, receive, send)


def review_routes(
    services: Any, *, recording_key: bytes, actions: AdminActions | None = None
) -> list[BaseRoute]:
    """The review pages at ``/review``; share ``actions`` with `broker.admin.admin_routes`.

    ``recording_key`` is the broker's recording key: the CSRF key is derived from it, so every
    process and replica holding it accepts the same forms.
    """
    ui = ReviewPages(services, actions or AdminActions(services), recording_key)
    w = ui.wrap
    router = Router(
        routes=[
            Route("/", w(ui.root), methods=["GET"]),
            Route("/login", w(ui.login_form), methods=["GET"]),
            Route("/login", w(ui.login), methods=["POST"]),
            Route("/logout", w(ui.logout), methods=["POST"]),
            Route("/sessions", w(ui.sessions), methods=["GET"]),
            Route("/sessions/{session_id}", w(ui.session), methods=["GET"]),
            Route("/approvals", w(ui.approvals), methods=["GET"]),
            Route("/approvals/approve", w(ui.approve), methods=["POST"]),
            Route("/agents", w(ui.agents), methods=["GET"]),
            Route("/agents/{agent_id}/release", w(ui.release), methods=["POST"]),
            Mount("/static", app=StaticFiles(directory=HERE / "static")),
        ],
        default=ui.not_found,
    )
    app = _SecurityHeaders(router)

    async def bare(request: Request) -> Response:
        return RedirectResponse("/review/sessions", 303)

    return [
        Mount("/review", app=app),
        Route("/review", bare, methods=["GET"]),
    ]
