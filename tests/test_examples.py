"""The runnable agents under ``examples/agents/``, each run as a subprocess against a served broker.

`served_broker` (and `ServedBroker`, `DEMO`, `LateApp` as `_LateApp`) are re-exported from
`broker.testing` for the real-process tests that still import them from here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio

from broker.testing import DEMO, LateApp, ServedBroker, served_broker

__all__ = ["DEMO", "REPO", "VENV_BIN", "ServedBroker", "_LateApp", "served_broker"]

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
_LateApp = LateApp


# -- tests -------------------------------------------------------------------------------------


async def test_quickstart_agent_lists_and_calls_a_tool_through_a_served_broker(
    tmp_path: Path,
) -> None:
    async with served_broker(tmp_path) as broker:
        agent, secret = await broker.add_agent("quickstart", ["demo:use"])
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "BROKER_URL": broker.url,
            "BROKER_CLIENT_ID": agent.id,
            "BROKER_CLIENT_SECRET": secret,
        }
        command = [
            sys.executable,
            str(REPO / "examples" / "agents" / "quickstart.py"),
            "--tool",
            "demo__echo",
            "--args",
            '{"text": "hello from the quickstart"}',
        ]
        with anyio.fail_after(60):
            done = await anyio.run_process(command, env=env, cwd=REPO, check=False)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, out + err
    assert "3 tools reachable" in out
    assert "  demo__echo: Return the text unchanged." in out
    assert "demo__echo -> hello from the quickstart" in out
    assert secret not in out + err


async def test_quickstart_agent_without_credentials_says_what_to_set(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "examples" / "agents" / "quickstart.py")]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    with anyio.fail_after(30):
        done = await anyio.run_process(command, env=env, cwd=REPO, check=False)
    assert done.returncode == 2
    assert "set BROKER_CLIENT_ID" in done.stderr.decode()


async def test_quickstart_agent_with_a_wrong_secret_fails_without_printing_it(
    tmp_path: Path,
) -> None:
    async with served_broker(tmp_path) as broker:
        agent, _secret = await broker.add_agent("quickstart", ["demo:use"])
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "BROKER_URL": broker.url,
            "BROKER_CLIENT_ID": agent.id,
            "BROKER_CLIENT_SECRET": "wrong-secret-value",
        }
        command = [sys.executable, str(REPO / "examples" / "agents" / "quickstart.py")]
        with anyio.fail_after(60):
            done = await anyio.run_process(command, env=env, cwd=REPO, check=False)
    assert done.returncode != 0
    assert "wrong-secret-value" not in done.stdout.decode() + done.stderr.decode()
