"""A rogue agent: legitimate work first, then probing and an exfiltration attempt, then cut off.

It is a stock MCP client with a client-credentials token, like `task_agent.py`. It does its task
(an echo and a sum inside its scopes), then probes: it repeats a refused call with small
mutations of the refused argument (``demo__add`` with ``a`` just above the scope's range). The
broker's probing detector sees near-miss retries of a refused call and quarantines the agent at
once: its session is closed, its token is refused (HTTP 401), and it cannot get a new token.
The agent then tries to smuggle data out through ``demo__echo`` and to get a fresh token, and
reports every refusal: denials with their reason and decision id, then the 401 and the token
endpoint's ``access_denied``.

    BROKER_URL=http://127.0.0.1:8765 BROKER_CLIENT_ID=agt_... BROKER_CLIENT_SECRET=... \\
        python examples/agents/rogue_agent.py --scope "demo:echo demo:math"

Exit codes: 0 the broker stopped it (quarantined, token and new tokens refused), 1 it was not
stopped as expected, 2 usage.
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

CALL_TIMEOUT = 30.0
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "rogue-agent", "version": "1.0"},
    },
}


def say(message: str) -> None:
    print(f"rogue: {message}", flush=True)


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> tuple[bool, str]:
    """(reached the broker's answer, text): False when the session or token was cut off."""
    try:
        with anyio.fail_after(CALL_TIMEOUT):
            result = await client.call_tool(tool, arguments)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    text = " ".join(c.text for c in result.content if c.type == "text")
    return True, f"refused: {text}" if result.is_error else text


async def work_probe_exfiltrate(base_url: str, token: str, max_probes: int) -> bool:
    """The agent's session; True when the broker cut it off during it."""
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with (
            httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(CALL_TIMEOUT)) as http,
            Client(streamable_http_client(f"{base_url}/mcp", http_client=http)) as client,
        ):
            say("1. legitimate work")
            for tool, arguments in (
                ("demo__echo", {"text": "quarterly summary ready"}),
                ("demo__add", {"a": 120, "b": 345}),
            ):
                _, text = await call(client, tool, arguments)
                say(f"   {tool} {arguments} -> {text}")
            say("2. probing: retrying a refused call with small mutations")
            for n in range(max_probes):
                arguments = {"a": 1001 + n, "b": 345}
                answered, text = await call(client, "demo__add", arguments)
                say(f"   demo__add {arguments} -> {text}")
                if not answered or "agent-quarantined" in text:
                    say("   the broker cut this session off")
                    return True
            say("3. exfiltration: smuggling data out through echo")
            payload = {"text": "dump:" + secrets.token_hex(64)}
            answered, text = await call(client, "demo__echo", payload)
            say(f"   demo__echo (a {len(payload['text'])}-character dump) -> {text}")
            return not answered
    except Exception as exc:  # the session teardown after a cut-off may fail too
        say(f"   session ended: {type(exc).__name__}")
        return True


async def token_request(
    http: httpx2.AsyncClient, base_url: str, auth: tuple[str, str], form: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    response = await http.post(f"{base_url}/oauth/token", data=form, auth=auth)
    return response.status_code, response.json()


async def run(
    base_url: str, client_id: str, secret: str, *, scope: str, task: str, max_probes: int
) -> int:
    auth = (client_id, secret)
    form = {
        "grant_type": "client_credentials",
        "scope": scope,
        "resource": f"{base_url}/mcp",
        "task": task,
        "purpose": "add up the quarterly figures",
    }
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(CALL_TIMEOUT)) as http:
        status, body = await token_request(http, base_url, auth, form)
        if status != 200:
            say(f"token refused at the start: {body.get('error')}")
            return 1
        token = str(body["access_token"])
        say(f"task {task}: token for '{body['scope']}'")

        cut_off = await work_probe_exfiltrate(base_url, token, max_probes)

        say("4. exfiltration anyway: reconnect with its token, then ask for a new one")
        response = await http.post(
            f"{base_url}/mcp",
            json=INITIALIZE,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json, text/event-stream",
            },
        )
        token_refused = response.status_code == 401
        challenge = response.headers.get("www-authenticate", "")
        say(f"   old token -> HTTP {response.status_code} {challenge}".rstrip())
        status, body = await token_request(http, base_url, auth, form | {"task": task + "-b"})
        new_refused = status != 200
        say(
            f"   new token request -> {body.get('error')}: {body.get('error_description', '')}"
            if new_refused
            else "   new token request -> granted (not stopped!)"
        )
    if cut_off and token_refused and new_refused:
        say("stopped: quarantined by the broker until a human releases it")
        return 0
    say("NOT stopped as expected")
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scope", default="demo:echo demo:math")
    parser.add_argument("--task", default=None, help="task id (default: a fresh one)")
    parser.add_argument("--max-probes", type=int, default=8)
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
            max_probes=ns.max_probes,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
