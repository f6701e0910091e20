"""A delegating agent: an orchestrator hands a sub-agent a narrower token, and it cannot widen.

The orchestrator gets a task token for what the whole task needs, then exchanges it (RFC 8693
token exchange): it authenticates as itself, presents its own token as ``subject_token``, names
the sub-agent with ``actor``, and asks for a narrower ``scope``. The child token's scopes are a
subset of the parent's, its constraints the parent's AND new ones, it expires no later, and
revoking the parent revokes it. The sub-agent gets only that child token (never the
orchestrator's credentials), and:

1. sees only the tools the child token reaches, and its call to one of them works;
2. a call to a tool the parent could use but the child cannot is denied by the broker;
3. with its own credentials, trying to pass the child token on to a helper agent with the
   parent's wider scope is refused (``invalid_scope``): a token can only ever be narrowed.

    BROKER_URL=... BROKER_CLIENT_ID=<orchestrator> BROKER_CLIENT_SECRET=... \\
    BROKER_SUBAGENT_ID=<sub-agent> BROKER_SUBAGENT_SECRET=... BROKER_HELPER_ID=<a third agent> \\
        python examples/agents/delegating_agent.py --scope "demo:echo demo:math" \\
            --child-scope demo:echo

Exit codes: 0 every step behaved as above, 1 something did not, 2 usage.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


async def token_request(
    http: httpx2.AsyncClient, base_url: str, auth: tuple[str, str], form: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    response = await http.post(f"{base_url}/oauth/token", data=form, auth=auth)
    return response.status_code, response.json()


async def sub_agent(
    base_url: str,
    child_token: str,
    *,
    own_auth: tuple[str, str] | None,
    helper: str | None,
    wider_scope: str,
) -> bool:
    """The sub-agent's whole life, holding only ``child_token``; True if it stayed narrow."""
    ok = True
    headers = {"Authorization": f"Bearer {child_token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=120.0)) as http,
        Client(streamable_http_client(f"{base_url}/mcp", http_client=http)) as client,
    ):
        reachable = sorted(t.name for t in (await client.list_tools()).tools)
        print(f"sub-agent: reachable tools: {', '.join(reachable) or '(none)'}")
        echo = await client.call_tool("demo__echo", {"text": "hello from the sub-agent"})
        echo_text = " ".join(c.text for c in echo.content if c.type == "text")
        print(f"sub-agent: demo__echo -> {'error: ' if echo.is_error else ''}{echo_text}")
        ok &= not echo.is_error
        wider = await client.call_tool("demo__add", {"a": 2, "b": 3})
        wider_text = " ".join(c.text for c in wider.content if c.type == "text")
        print(f"sub-agent: demo__add -> {'refused: ' if wider.is_error else ''}{wider_text}")
        ok &= wider.is_error
    if own_auth is not None and helper is not None:
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0)) as http:
            status, body = await token_request(
                http,
                base_url,
                own_auth,
                {
                    "grant_type": EXCHANGE,
                    "subject_token": child_token,
                    "subject_token_type": ACCESS_TOKEN,
                    "actor": helper,
                    "scope": wider_scope,
                },
            )
        if status == 200:
            print(f"sub-agent: widening to '{wider_scope}' was GRANTED; this must not happen")
            ok = False
        else:
            print(
                f"sub-agent: widening to '{wider_scope}' refused: {body.get('error')} "
                f"({body.get('error_description', '')})"
            )
    return ok


async def run(
    base_url: str,
    orchestrator: tuple[str, str],
    subagent_id: str,
    subagent_auth: tuple[str, str] | None,
    helper: str | None,
    *,
    scope: str,
    child_scope: str,
    purpose: str,
) -> int:
    task = f"tsk_{secrets.token_hex(6)}"
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0)) as http:
        status, parent = await token_request(
            http,
            base_url,
            orchestrator,
            {
                "grant_type": "client_credentials",
                "scope": scope,
                "resource": f"{base_url}/mcp",
                "task": task,
                "purpose": purpose,
            },
        )
        if status != 200:
            print(f"orchestrator: token refused: {parent.get('error')}")
            return 1
        print(f"orchestrator: task {task} token for '{parent['scope']}'")
        status, child = await token_request(
            http,
            base_url,
            orchestrator,
            {
                "grant_type": EXCHANGE,
                "subject_token": parent["access_token"],
                "subject_token_type": ACCESS_TOKEN,
                "actor": subagent_id,
                "scope": child_scope,
                "purpose": f"sub-task of {task}: {child_scope} only",
            },
        )
        if status != 200:
            print(f"orchestrator: exchange refused: {child.get('error')}")
            return 1
    print(
        f"orchestrator: child token for '{child['scope']}' handed to {subagent_id} "
        f"(valid {child['expires_in']} s)"
    )
    narrow = await sub_agent(
        base_url, child["access_token"], own_auth=subagent_auth, helper=helper, wider_scope=scope
    )
    print("delegation stayed narrow" if narrow else "delegation did NOT stay narrow")
    return 0 if narrow else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scope", default="demo:echo demo:math", help="what the whole task needs")
    parser.add_argument("--child-scope", default="demo:echo", help="what the sub-agent gets")
    parser.add_argument("--purpose", default="orchestrate a two-step demo task")
    ns = parser.parse_args()
    env = os.environ
    try:
        base = env.get("BROKER_URL", "http://127.0.0.1:8765").rstrip("/")
        orchestrator = (env["BROKER_CLIENT_ID"], env["BROKER_CLIENT_SECRET"])
        subagent_id = env["BROKER_SUBAGENT_ID"]
    except KeyError as missing:
        print(f"set {missing.args[0]} (see `broker agents add --help`)", file=sys.stderr)
        return 2
    sub_secret = env.get("BROKER_SUBAGENT_SECRET")
    subagent_auth = None if sub_secret is None else (subagent_id, sub_secret)
    return anyio.run(
        lambda: run(
            base,
            orchestrator,
            subagent_id,
            subagent_auth,
            env.get("BROKER_HELPER_ID"),
            scope=ns.scope,
            child_scope=ns.child_scope,
            purpose=ns.purpose,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
