"""A task agent: asks for the narrowest scopes its task needs, says why, and stays inside them.

It requests a capability token for one task (``task`` id and stated ``purpose`` go into the
token and the record), connects to the broker with it, and calls only tools its token reaches:
a tool outside them is refused here, before any request is made. When a scope needs a human's
approval for the token (``approval = "token"``), the broker answers ``authorization_pending``
with an ``auth_req_id``; the agent repeats its request with that id every ``interval`` seconds
until an approver runs ``broker approvals approve ID`` (or denies it, or it expires). When the
task is done it closes the task (``POST /oauth/revoke`` with ``close_task=true``) instead of
leaving its token live: a later use of it is then refused and shows up in the record.

    BROKER_URL=http://127.0.0.1:8765 BROKER_CLIENT_ID=agt_... BROKER_CLIENT_SECRET=... \\
        python examples/agents/task_agent.py --scope demo:echo \\
            --purpose "echo a greeting for the demo" --tool demo__echo --args '{"text": "hi"}'

Exit codes: 0 done, 1 the broker refused (token or call), 2 usage, 3 the tool is outside the
task's scopes (nothing was sent).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

OUTSIDE_SCOPE = 3


class Refused(Exception):
    """The broker refused the token request; the message is its OAuth error."""


async def request_token(
    http: httpx2.AsyncClient,
    base_url: str,
    auth: tuple[str, str],
    form: dict[str, str],
    *,
    max_wait: float = 600.0,
) -> dict[str, Any]:
    """A token for ``form`` (client credentials), waiting for a human approval if asked to.

    Raises:
        Refused: any OAuth error other than ``authorization_pending``.
    """
    token_url = f"{base_url}/oauth/token"
    with anyio.fail_after(max_wait):
        while True:
            response = await http.post(token_url, data=form, auth=auth)
            body = response.json()
            if response.status_code == 200:
                return body
            if body.get("error") != "authorization_pending":
                raise Refused(f"{body.get('error')}: {body.get('error_description', '')}")
            auth_req_id = str(body["auth_req_id"])
            if form.get("auth_req_id") != auth_req_id:
                print(
                    f"waiting for a human to approve token request {auth_req_id} "
                    f"(broker approvals approve {auth_req_id})",
                    flush=True,
                )
            form = form | {"auth_req_id": auth_req_id}
            await anyio.sleep(max(1, int(body.get("interval", 2))))


async def run(
    base_url: str,
    client_id: str,
    secret: str,
    *,
    scope: str,
    task: str,
    purpose: str,
    tool: str,
    arguments: dict[str, Any],
) -> int:
    form = {
        "grant_type": "client_credentials",
        "scope": scope,
        "resource": f"{base_url}/mcp",
        "task": task,
        "purpose": purpose,
    }
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0)) as http:
        try:
            granted = await request_token(http, base_url, (client_id, secret), form)
        except Refused as exc:
            print(f"token refused: {exc}")
            return 1
    print(f"task {task}: token for '{granted['scope']}', valid {granted['expires_in']} s")
    headers = {"Authorization": f"Bearer {granted['access_token']}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0)) as http,
        Client(streamable_http_client(f"{base_url}/mcp", http_client=http)) as client,
    ):
        reachable = sorted(t.name for t in (await client.list_tools()).tools)
        print(f"reachable tools: {', '.join(reachable) or '(none)'}")
        if tool not in reachable:
            print(f"{tool} is outside this task's scopes: not calling it")
            return OUTSIDE_SCOPE
        result = await client.call_tool(tool, arguments)
    text = " ".join(c.text for c in result.content if c.type == "text")
    print(f"{tool} -> {'error: ' if result.is_error else ''}{text}")
    await close_task(base_url, (client_id, secret), granted["access_token"])
    print(f"task {task}: done, task closed")
    return 1 if result.is_error else 0


async def close_task(base_url: str, auth: tuple[str, str], token: str) -> None:
    """The work is over: close the task of ``token`` rather than leave it live until it expires."""
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0)) as http:
        response = await http.post(
            f"{base_url}/oauth/revoke",
            data={"token": token, "close_task": "true"},
            auth=auth,
        )
    response.raise_for_status()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scope", required=True, help="the narrowest scopes the task needs")
    parser.add_argument("--purpose", required=True, help="why: recorded with every call")
    parser.add_argument("--task", default=None, help="task id (default: a fresh one)")
    parser.add_argument("--tool", required=True)
    parser.add_argument("--args", default="{}", help="tool arguments as a JSON object")
    ns = parser.parse_args()
    try:
        base = os.environ.get("BROKER_URL", "http://127.0.0.1:8765").rstrip("/")
        client_id = os.environ["BROKER_CLIENT_ID"]
        secret = os.environ["BROKER_CLIENT_SECRET"]
    except KeyError as missing:
        print(f"set {missing.args[0]} (see `broker agents add --help`)", file=sys.stderr)
        return 2
    return anyio.run(
        lambda: run(
            base,
            client_id,
            secret,
            scope=ns.scope,
            task=ns.task or f"tsk_{secrets.token_hex(6)}",
            purpose=ns.purpose,
            tool=ns.tool,
            arguments=json.loads(ns.args),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
