"""The review page: in a real headless Chromium (Debian's, driven by Playwright) over real uvicorn,
and its headers, cookies and CSRF rules over ASGI. Data is seeded through the Recorder and the
store (real SQLite) on a broker built by `create_app`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from broker.admin import AdminActions, admin_routes
from broker.admin_tokens import create_admin_token
from broker.app import Services, create_app
from broker.config import BrokerConfig, ServerConfig, StoreConfig, TokenConfig
from broker.core.identity import AdminRole, Agent, AgentStatus
from broker.core.pinning import definition_digest
from broker.core.recording import EventKind
from broker.core.redaction import Redactor
from broker.recorder import Recorder
from broker.review import CSP, review_routes
from broker.store import SqlStore
from broker.store.testing import migrated_store, sqlite_url
from broker.testing import serve_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
browser = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian chromium is not installed: run `make browser`"
)

XSS_TOOL = "<script>window.__xss='tool'</script>"
XSS_ARG = '"><img src=x onerror="window.__xss=\'arg\'">'
XSS_RESULT = "<svg onload=\"window.__xss='result'\"></svg><b id=injected>bold</b>"
XSS_AGENT = "<img src=x onerror=\"window.__xss='agent'\">"
XSS_SIGNAL = "<iframe src=\"javascript:window.__xss='signal'\"></iframe>"
JS_URL = "javascript:alert(document.cookie)"
SAFE_URL = "https://docs.example.com/page?q=1"


@dataclass
class Env:
    services: Services
    app: Starlette
    tokens: dict[str, str]
    sessions: dict[str, str]
    agents: dict[str, str]

    @property
    def store(self) -> SqlStore:
        return self.services.store


def agent(agent_id: str, name: str, status: AgentStatus, reason: str = "") -> Agent:
    return Agent(
        id=agent_id,
        name=name,
        owner="ops@example.com",
        status=status,
        allowed_scopes=("files:read",),
        max_ttl_seconds=600,
        auth_method="client_secret",
        created_at=datetime(2026, 11, 23, 12, 0, tzinfo=UTC),
        status_reason=reason,
    )


async def seed(services: Services) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    store, now = services.store, services.clock.now()
    tokens: dict[str, str] = {}
    for role in AdminRole:
        _, tokens[role.value] = await create_admin_token(
            store, role=role, name=f"{role.value} person", now=now
        )
    agents = {
        "honest": agent("agt_honest", "honest", AgentStatus.ACTIVE),
        "rogue": agent("agt_rogue", "rogue", AgentStatus.QUARANTINED, "exfil " + XSS_AGENT),
        "xss": agent("agt_xss", XSS_AGENT, AgentStatus.QUARANTINED, XSS_SIGNAL),
    }
    for a in agents.values():
        await store.create_agent(a, secret_hash=None)
    sessions: dict[str, str] = {}
    async with Recorder(store, clock=services.clock, redactor=Redactor(b"r" * 32)) as rec:
        s = await rec.open_session(agent_id="agt_honest", token_jti="jti-1", task_id="t-ok")
        await s.record(EventKind.REQUEST, {"method": "tools/call", "tool": "files__read"})
        await s.record(
            EventKind.DECISION,
            {"allowed": True, "reasons": [], "rule_ids": ["files:read/grant[0]"]},
            "dec_allowed0001",
        )
        await s.record(
            EventKind.RESULT,
            {
                "is_error": False,
                "excerpt": {
                    "text": f"see {SAFE_URL} and {JS_URL}",
                    "chars": 40,
                    "truncated": False,
                },
                "bytes": 40,
                "latency_ms": 12.5,
            },
        )
        sessions["honest"] = s.id
        s = await rec.open_session(agent_id="agt_rogue", token_jti="jti-2", task_id="t-deny")
        await s.record(
            EventKind.REQUEST,
            {"method": "tools/call", "tool": "files__write", "arguments": {"path": "/etc/passwd"}},
        )
        await s.record(
            EventKind.DECISION,
            {
                "allowed": False,
                "reasons": ["scope-missing"],
                "rule_ids": [],
                "tool": "files__write",
            },
            "dec_denied00001",
        )
        sessions["rogue"] = s.id
        s = await rec.open_session(agent_id="agt_xss", token_jti="jti-3", task_id="t-xss")
        await s.record(
            EventKind.REQUEST,
            {"method": "tools/call", "tool": XSS_TOOL, "arguments": {"path": XSS_ARG, "u": JS_URL}},
        )
        await s.record(
            EventKind.DECISION,
            {"allowed": False, "reasons": ["constraint-violated"], "tool": XSS_TOOL},
            "dec_xss00000001",
        )
        await s.record(
            EventKind.RESULT,
            {"is_error": True, "excerpt": {"text": XSS_RESULT}, "bytes": 80, "latency_ms": 3},
        )
        await s.record(
            EventKind.DETECTOR_SIGNAL,
            {"detector": "burst", "score": 0.97, "action": "flag", "detail": XSS_SIGNAL},
        )
        sessions["xss"] = s.id
    definition = {"name": XSS_TOOL, "description": "Reads. " + XSS_RESULT}
    await store.upsert_seen_pin("files", XSS_TOOL, definition_digest(definition), definition, now)
    return tokens, sessions, {k: a.id for k, a in agents.items()}


SCOPES = """
[[scope]]
name = "files:read"
[[scope.grant]]
connector = "files"
tools = ["read"]
"""


@asynccontextmanager
async def review_env(tmp_path: Path, public_url: str = "http://127.0.0.1:1") -> AsyncIterator[Env]:
    scope_file = tmp_path / "scopes.toml"
    scope_file.write_text(SCOPES, encoding="utf-8")
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    recording_key = secrets.token_hex(16)
    (keys / "recording.key").write_text(recording_key, encoding="utf-8")
    config = BrokerConfig(
        server=ServerConfig(public_url=public_url),
        store=StoreConfig(url=sqlite_url(tmp_path)),
        tokens=TokenConfig(keys_dir=keys),
        scope_files=(scope_file,),
        base_dir=tmp_path,
    )
    async with migrated_store(sqlite_url(tmp_path)) as store:
        broker = create_app(config, store=store, environ={})
        async with broker.router.lifespan_context(broker):
            services: Services = broker.state.services
            actions = AdminActions(services)
            app = Starlette(
                routes=[
                    *admin_routes(services, actions=actions),
                    *review_routes(services, actions=actions, recording_key=recording_key.encode()),
                ]
            )
            tokens, sessions, agents = await seed(services)
            yield Env(services, app, tokens, sessions, agents)


# -- in Chromium ------------------------------------------------------------------------------


@dataclass
class Browser:
    base: str
    page: Any
    context: Any
    dialogs: list[str]


@asynccontextmanager
async def chromium(app: Starlette) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with serve_app(app) as base, async_playwright() as pw:
        with anyio.fail_after(30):
            launched = await pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=20_000
            )
        try:
            context = await launched.new_context()
            context.set_default_timeout(10_000)
            page = await context.new_page()
            dialogs: list[str] = []

            async def on_dialog(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.dismiss()

            page.on("dialog", on_dialog)
            yield Browser(base, page, context, dialogs)
        finally:
            with anyio.fail_after(20):
                await launched.close()


async def log_in(b: Browser, token: str) -> None:
    await b.page.goto(b.base + "/review/login")
    await b.page.fill("#token", token)
    await b.page.click("form.login button")
    await b.page.wait_for_url(re.compile(r".*/review/sessions$"))


@browser
@pytest.mark.browser
async def test_a_reviewer_logs_in_filters_opens_a_session_and_sees_the_denial_and_its_reason(
    tmp_path: Path,
) -> None:
    async with review_env(tmp_path) as env, chromium(env.app) as b:
        await log_in(b, env.tokens["reviewer"])
        assert await b.page.locator("tr.session-row").count() == 3
        await b.page.fill("input[name=agent]", "rogue")
        await b.page.select_option("select[name=decision]", "denied")
        await b.page.click("form.filters button")
        await b.page.wait_for_url(re.compile(r".*agent=rogue.*"))
        rows = b.page.locator("tr.session-row")
        assert await rows.count() == 1
        await rows.locator("a.session-link").click()
        await b.page.wait_for_url(re.compile(r".*/review/sessions/ses_.*"))
        denied = b.page.locator("li.event.denied")
        assert await denied.locator(".verdict").inner_text() == "denied"
        assert await denied.locator(".reason").inner_text() == "scope-missing"
        assert await denied.locator(".decision-id").inner_text() == "dec_denied00001"
        assert "/etc/passwd" in await b.page.locator("#event-2").inner_text()
        assert (await b.page.locator("#chain").inner_text()).startswith("verified: 3 events")
        assert b.dialogs == []


@browser
@pytest.mark.browser
async def test_an_admin_releases_a_quarantined_agent_with_a_reason(tmp_path: Path) -> None:
    async with review_env(tmp_path) as env, chromium(env.app) as b:
        await log_in(b, env.tokens["admin"])
        await b.page.goto(b.base + "/review/agents")
        row = b.page.locator("tr.agent-row", has_text="rogue")
        await row.locator("input[name=reason]").fill("reviewed the session: a false positive")
        await row.locator("form.release button").click()
        await b.page.wait_for_url(re.compile(r".*/review/agents\?done=released$"))
        assert await b.page.locator(".notice").inner_text() == "The agent was released."
        released = await env.store.get_agent(env.agents["rogue"])
        assert released.status is AgentStatus.ACTIVE
        assert released.status_reason == "reviewed the session: a false positive"
        trail = [
            dict(e.payload)
            for s in await env.store.list_sessions(task_id="admin-actions")
            for e in await env.store.session_events(s.id)
            if e.kind == "admin-action"
        ]
        assert [(t["action"], t["phase"], t["channel"]) for t in trail] == [
            ("agent.release", "requested", "review"),
            ("agent.release", "done", "review"),
        ]


@browser
@pytest.mark.browser
async def test_stored_xss_payloads_never_execute_on_any_page(tmp_path: Path) -> None:
    async with review_env(tmp_path) as env, chromium(env.app) as b:
        await log_in(b, env.tokens["admin"])
        pages = [
            "/review/sessions",
            f"/review/sessions/{env.sessions['xss']}",
            f"/review/sessions/{env.sessions['honest']}",
            "/review/approvals",
            "/review/agents",
        ]
        for path in pages:
            await b.page.goto(b.base + path)
            assert await b.page.evaluate("() => window.__xss === undefined"), path
            for selector in (
                "script",
                "img",
                "svg",
                "iframe",
                "#injected",
                "[onerror]",
                "[onload]",
            ):
                assert await b.page.locator(selector).count() == 0, (path, selector)
            assert await b.page.locator('a[href^="javascript"]').count() == 0, path
        await b.page.goto(b.base + f"/review/sessions/{env.sessions['xss']}")
        text = await b.page.locator("ol.timeline").inner_text()
        for payload in (XSS_TOOL, XSS_RESULT, XSS_SIGNAL):
            assert payload in text
        await b.page.goto(b.base + "/review/agents")
        assert await b.page.locator("td.name", has_text=XSS_AGENT).count() == 1
        await b.page.goto(b.base + f"/review/sessions/{env.sessions['honest']}")
        link = b.page.locator("li.kind-result a")
        assert await link.count() == 1
        assert await link.get_attribute("href") == SAFE_URL
        assert await link.get_attribute("rel") == "noopener noreferrer nofollow"
        assert JS_URL in await b.page.locator("li.kind-result").inner_text()
        assert b.dialogs == []


@browser
@pytest.mark.browser
async def test_a_reviewer_sees_no_release_button_and_a_forged_release_is_refused(
    tmp_path: Path,
) -> None:
    async with review_env(tmp_path) as env, chromium(env.app) as b:
        await log_in(b, env.tokens["reviewer"])
        await b.page.goto(b.base + "/review/agents")
        assert await b.page.locator("tr.agent-row").count() == 2
        assert await b.page.locator("form.release").count() == 0
        csrf = await b.page.locator("form.logout input[name=csrf]").get_attribute("value")
        forged = await b.page.request.post(
            b.base + f"/review/agents/{env.agents['rogue']}/release",
            form={"csrf": csrf, "reason": "let me out"},
            headers={"origin": b.base},
            max_redirects=0,
        )
        assert forged.status == 403
        assert "may not do this" in await forged.text()
        assert (await env.store.get_agent(env.agents["rogue"])).status is AgentStatus.QUARANTINED
        await b.page.goto(b.base + "/review/approvals")
        assert await b.page.locator("form.approve").count() == 0


def attacker_app(target: str, csrf: str) -> Starlette:
    """Another origin on the same site (same host, another port): SameSite cookies still go."""

    async def page(request: Request) -> HTMLResponse:
        token = request.path_params["which"]
        field = {"none": "", "wrong": '<input name="csrf" value="0000">'}.get(
            token, f'<input name="csrf" value="{csrf}">'
        )
        return HTMLResponse(
            f'<form method="post" action="{target}" id="evil">{field}'
            '<input name="reason" value="pwned"><button>win a prize</button></form>'
        )

    return Starlette(routes=[Route("/{which}", page)])


@browser
@pytest.mark.browser
@pytest.mark.parametrize("csrf", ["none", "wrong", "leaked"])
async def test_a_cross_site_form_post_is_refused(tmp_path: Path, csrf: str) -> None:
    async with review_env(tmp_path) as env, chromium(env.app) as b:
        await log_in(b, env.tokens["admin"])
        real = await b.page.locator("form.logout input[name=csrf]").get_attribute("value")
        target = b.base + f"/review/agents/{env.agents['rogue']}/release"
        async with serve_app(attacker_app(target, real)) as evil:
            await b.page.goto(f"{evil}/{csrf}")
            async with b.page.expect_response(target) as answer:
                await b.page.click("#evil button")
            response = await answer.value
            assert response.status == 403
            assert await b.page.locator("#refusal").count() == 1
        assert (await env.store.get_agent(env.agents["rogue"])).status is AgentStatus.QUARANTINED


# -- over ASGI --------------------------------------------------------------------------------


@asynccontextmanager
async def client(env: Env, role: str | None = "admin") -> AsyncIterator[httpx2.AsyncClient]:
    transport = httpx2.ASGITransport(app=env.app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://broker") as c:
        if role is not None:
            with anyio.fail_after(10):
                response = await c.post("/review/login", data={"token": env.tokens[role]})
            assert response.status_code == 303, response.text
        yield c


class Tags(HTMLParser):
    """Which elements and attributes a page really has (escaped text is not markup)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.names.add(tag)
        self.attributes.update(name for name, _ in attrs)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert match is not None
    return match.group(1)


async def test_every_review_page_sends_the_strict_headers_and_contains_no_script(
    tmp_path: Path,
) -> None:
    async with review_env(tmp_path) as env, client(env) as c:
        paths = [
            "/review/login",
            "/review/sessions",
            f"/review/sessions/{env.sessions['xss']}",
            "/review/approvals",
            "/review/agents",
            "/review/nowhere",
            "/review/sessions/ses_unknown",
        ]
        for path in paths:
            response = await c.get(path)
            assert response.headers["content-security-policy"] == CSP, path
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert response.headers["cache-control"] == "no-store"
            tags = Tags()
            tags.feed(response.text)
            assert tags.names.isdisjoint({"script", "img", "svg", "iframe", "style"}), path
            assert not any(a == "style" or a.startswith("on") for a in tags.attributes), path
        css = await c.get("/review/static/review.css")
        assert css.status_code == 200
        assert css.headers["content-security-policy"] == CSP
        assert (await c.get("/review/sessions/ses_unknown")).status_code == 404


async def test_login_sets_an_opaque_strict_httponly_cookie_scoped_to_the_review_path(
    tmp_path: Path,
) -> None:
    async with review_env(tmp_path) as env, client(env, role=None) as c:
        response = await c.post("/review/login", data={"token": env.tokens["reviewer"]})
        cookie = response.headers["set-cookie"]
        assert response.status_code == 303
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        assert "Path=/review" in cookie
        assert "Secure" not in cookie
        assert env.tokens["reviewer"] not in cookie
        assert env.tokens["reviewer"].split(".")[1] not in cookie


async def test_the_cookie_is_secure_when_the_public_url_is_https(tmp_path: Path) -> None:
    async with (
        review_env(tmp_path, public_url="https://broker.example.com") as env,
        client(env, role=None) as c,
    ):
        response = await c.post("/review/login", data={"token": env.tokens["reviewer"]})
        assert "Secure" in response.headers["set-cookie"]


async def test_a_bad_token_or_an_agent_jwt_does_not_log_in(tmp_path: Path) -> None:
    async with review_env(tmp_path) as env, client(env, role=None) as c:
        holder = await env.store.find_agent("honest")
        jwt = (await env.services.tokens.mint_for(holder.id, scope="files:read")).access_token
        for token in ("bat_nope", jwt, ""):
            response = await c.post("/review/login", data={"token": token})
            assert response.status_code == 401
            assert "set-cookie" not in response.headers
        assert (await c.get("/review/sessions")).status_code == 303


async def test_pages_need_a_login_and_redirect_to_it(tmp_path: Path) -> None:
    async with review_env(tmp_path) as env, client(env, role=None) as c:
        for path in ("/review/sessions", "/review/agents", "/review/approvals"):
            response = await c.get(path)
            assert response.status_code == 303
            assert response.headers["location"] == "/review/login"
        refused = await c.post(
            f"/review/agents/{env.agents['rogue']}/release", data={"reason": "x", "csrf": "0"}
        )
        assert refused.status_code == 403


@pytest.mark.parametrize(
    ("csrf", "headers"),
    [
        ("missing", {}),
        ("wrong", {}),
        ("right", {"origin": "https://evil.example"}),
        ("right", {"origin": "null"}),
        ("right", {"sec-fetch-site": "cross-site"}),
        ("right", {"sec-fetch-site": "same-site"}),
    ],
    ids=[
        "missing-token",
        "wrong-token",
        "foreign-origin",
        "null-origin",
        "cross-site",
        "same-site",
    ],
)
async def test_state_changing_posts_need_the_csrf_token_and_the_same_origin(
    tmp_path: Path, csrf: str, headers: dict[str, str]
) -> None:
    async with review_env(tmp_path) as env, client(env) as c:
        real = csrf_of((await c.get("/review/agents")).text)
        form = {"reason": "forged"}
        if csrf != "missing":
            form["csrf"] = real if csrf == "right" else secrets.token_hex(32)
        response = await c.post(
            f"/review/agents/{env.agents['rogue']}/release", data=form, headers=headers
        )
        assert response.status_code == 403
        assert (await env.store.get_agent(env.agents["rogue"])).status is AgentStatus.QUARANTINED
        ok = await c.post(
            f"/review/agents/{env.agents['rogue']}/release",
            data={"reason": "fine", "csrf": real},
            headers={"origin": "http://broker", "sec-fetch-site": "same-origin"},
        )
        assert ok.status_code == 303


async def test_a_release_without_a_reason_is_refused(tmp_path: Path) -> None:
    async with review_env(tmp_path) as env, client(env) as c:
        real = csrf_of((await c.get("/review/agents")).text)
        response = await c.post(
            f"/review/agents/{env.agents['rogue']}/release", data={"reason": "  ", "csrf": real}
        )
        assert response.status_code == 400
        assert (await env.store.get_agent(env.agents["rogue"])).status is AgentStatus.QUARANTINED


async def test_an_approver_approves_the_exact_digest_shown(tmp_path: Path) -> None:
    async with review_env(tmp_path) as env, client(env, "approver") as c:
        html = (await c.get("/review/approvals")).text
        assert "&lt;script&gt;" in html
        digest = re.search(r'name="digest" value="([0-9a-f]{64})"', html)
        assert digest is not None
        form = {
            "csrf": csrf_of(html),
            "connector_id": "files",
            "tool_name": XSS_TOOL,
            "digest": digest.group(1),
        }
        response = await c.post("/review/approvals/approve", data=form)
        assert response.status_code == 303
        pins = await env.store.get_pins("files")
        assert [p.status.value for p in pins] == ["approved"]
        stale = await c.post("/review/approvals/approve", data={**form, "digest": "0" * 64})
        assert stale.status_code == 409


async def test_revoking_the_admin_token_ends_its_review_sessions(tmp_path: Path) -> None:
    async with review_env(tmp_path) as env, client(env, "reviewer") as c:
        assert (await c.get("/review/sessions")).status_code == 200
        tokens = await env.store.list_admin_tokens()
        reviewer = next(t for t in tokens if t.role is AdminRole.REVIEWER)
        await env.store.revoke_admin_token(reviewer.id, env.services.clock.now())
        assert (await c.get("/review/sessions")).status_code == 303


async def test_large_results_are_cut_and_long_sessions_are_paged(tmp_path: Path) -> None:
    async with review_env(tmp_path) as env, client(env, "reviewer") as c:
        clock = env.services.clock
        async with Recorder(env.store, clock=clock, redactor=Redactor(b"r" * 32)) as rec:
            s = await rec.open_session(agent_id="agt_honest", token_jti="j", task_id="big")
            await s.record(EventKind.RESULT, {"excerpt": {"text": "A" * 200_000}, "bytes": 1})
            for i in range(150):
                await s.record(EventKind.REQUEST, {"method": "tools/call", "tool": f"t{i}"})
        first = await c.get(f"/review/sessions/{s.id}")
        assert first.status_code == 200
        assert "cut at 2000 characters" in first.text
        assert "A" * 2001 not in first.text
        assert first.text.count('<li class="event') == 100
        later = re.search(r'href="(/review/sessions/[^"]+\?after=100)"', first.text)
        assert later is not None
        second = await c.get(later.group(1))
        assert second.text.count('<li class="event') == 52
        assert "Later events" not in second.text


async def test_the_session_page_names_the_first_tampered_event(tmp_path: Path) -> None:
    import sqlite3

    async with review_env(tmp_path) as env, client(env, "reviewer") as c:
        with sqlite3.connect(tmp_path / "broker.db") as db:
            db.execute(
                "DELETE FROM events WHERE session_id = ? AND seq = 2", (env.sessions["rogue"],)
            )
        page = await c.get(f"/review/sessions/{env.sessions['rogue']}")
        assert "BROKEN at event 2 (gap)" in page.text
