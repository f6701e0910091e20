"""`make demo`: a good, a delegating and a rogue agent against a fresh broker.

Creates a broker in a temporary directory (``broker init --examples``), serves it on a free
loopback port, registers the agents with the CLI, runs the three example agents as subprocesses,
and ends by printing how to review what happened: the sessions commands, the review page and a
reviewer token. The broker keeps running for review until Enter (or Ctrl-C); with
``--no-wait``, or when stdin is not a terminal, it stops at once and the directory is kept.

    python -m examples.demo [--dir DIR] [--no-wait]

Exit codes: 0 every agent behaved as expected (the rogue one was quarantined), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx2

REPO = Path(__file__).resolve().parent.parent
AGENTS = REPO / "examples" / "agents"
BIN = Path(sys.executable).parent
BROKER = [str(BIN / "broker")] if (BIN / "broker").exists() else [sys.executable, "-m", "broker"]
CLI_TIMEOUT = 60.0
READY_TIMEOUT = 60.0
AGENT_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0


class DemoError(Exception):
    """A step of the demo failed; the message says which."""


def banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_cli(config: Path, *args: str) -> dict[str, Any]:
    """Run ``broker ARGS --config CONFIG --json``; its JSON answer."""
    command = [*BROKER, *args, "--config", str(config), "--json"]
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv
            command, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DemoError(f"`broker {' '.join(args)}` took over {CLI_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        raise DemoError(f"`broker {' '.join(args)}` failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def init(config: Path) -> None:
    command = [*BROKER, "init", "--examples", "--config", str(config)]
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv
            command, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DemoError(f"`broker init` took over {CLI_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        raise DemoError(f"`broker init` failed: {done.stderr.strip()}")


@contextmanager
def served(config: Path, port: int, log: Path) -> Iterator[str]:
    """``broker serve`` as a subprocess until the block ends; yields its URL once healthy."""
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        server = subprocess.Popen(  # noqa: S603 - fixed argv
            [*BROKER, "serve", "--config", str(config), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=config.parent,
            start_new_session=True,
        )
        try:
            wait_healthy(url, server, log)
            yield url
        finally:
            stop(server)


def wait_healthy(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    with httpx2.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise DemoError(f"the broker exited ({server.returncode}); see {log}")
            try:
                if http.get(f"{url}/healthz").status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.2)  # the poll interval of a bounded wait
    raise DemoError(f"the broker was not healthy within {READY_TIMEOUT:.0f} s; see {log}")


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after ``STOP_TIMEOUT``; only the server we started."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=STOP_TIMEOUT)


def run_agent(name: str, script: str, args: list[str], env: dict[str, str]) -> int:
    """Run one example agent, its output indented under ``name``; its exit code."""
    command = [sys.executable, str(AGENTS / script), *args]
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv
            command,
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=AGENT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DemoError(f"{name} took over {AGENT_TIMEOUT:.0f} s") from exc
    for line in (done.stdout + done.stderr).splitlines():
        print(f"  | {line}")
    print(f"  {name} exited {done.returncode}", flush=True)
    return done.returncode


def agent_env(url: str, agent: dict[str, Any], **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(REPO)),
        "BROKER_URL": url,
        "BROKER_CLIENT_ID": str(agent["client_id"]),
        "BROKER_CLIENT_SECRET": str(agent["client_secret"]),
    }
    return env | extra


def add_agent(config: Path, name: str, scopes: str) -> dict[str, Any]:
    agent = broker_cli(config, "agents", "add", name, "--scopes", scopes, "--owner", "demo")
    print(f"  {name}: {agent['id']} may request {scopes}", flush=True)
    return agent


def story(config: Path, url: str) -> tuple[bool, str]:
    """Register the agents and run them; (each behaved as expected, the rogue agent's id)."""
    banner("registering agents (broker agents add)")
    good = add_agent(config, "good-agent", "demo:echo,demo:math")
    boss = add_agent(config, "orchestrator", "demo:echo,demo:math")
    worker = add_agent(config, "sub-agent", "demo:echo,demo:math")
    helper = add_agent(config, "helper", "demo:echo,demo:math")
    rogue = add_agent(config, "rogue-agent", "demo:echo,demo:math")

    banner("1. a good agent: a narrow token for one task, calls inside it")
    good_code = run_agent(
        "good-agent",
        "task_agent.py",
        [
            "--scope",
            "demo:echo",
            "--purpose",
            "echo a greeting for the demo",
            "--tool",
            "demo__echo",
            "--args",
            '{"text": "hello from a well-behaved agent"}',
        ],
        agent_env(url, good),
    )

    banner("2. a delegating agent: hands a sub-agent a narrower token that cannot widen")
    delegating_code = run_agent(
        "orchestrator",
        "delegating_agent.py",
        ["--scope", "demo:echo demo:math", "--child-scope", "demo:echo"],
        agent_env(
            url,
            boss,
            BROKER_SUBAGENT_ID=str(worker["client_id"]),
            BROKER_SUBAGENT_SECRET=str(worker["client_secret"]),
            BROKER_HELPER_ID=str(helper["client_id"]),
        ),
    )

    banner("3. a rogue agent: legitimate work, then probing and exfiltration")
    rogue_code = run_agent(
        "rogue-agent", "rogue_agent.py", ["--scope", "demo:echo demo:math"], agent_env(url, rogue)
    )
    shown = broker_cli(config, "agents", "show", str(rogue["id"]))
    print(f"  rogue-agent status: {shown['status']} ({shown.get('status_reason', '')})")

    ok = {
        "good agent": good_code == 0,
        "delegating agent": delegating_code == 0,
        "rogue agent stopped": rogue_code == 0 and shown["status"] == "quarantined",
    }
    banner("outcome")
    for what, passed in ok.items():
        print(f"  {what}: {'as expected' if passed else 'NOT as expected'}")
    if ok["rogue agent stopped"]:
        print(f"  the rogue agent {rogue['id']} is quarantined")
    return all(ok.values()), str(rogue["id"])


def review_instructions(config: Path, url: str, rogue: str) -> None:
    token = broker_cli(config, "admin-token", "create", "--role", "reviewer", "--name", "demo")
    c = shlex.quote(str(config))
    banner("review what happened")
    print(f"  broker sessions list --config {c}")
    print(f"  broker sessions show SESSION_ID --config {c}")
    print(f"  broker sessions verify --config {c}")
    print(f"  broker agents show {rogue} --config {c}")
    print(f"  broker agents release {rogue} --reason '...' --config {c}")
    print(f"  review page: {url}/review  (while the broker runs)")
    print(f"  reviewer token: {token['token']}")
    print(f"  serve it again: broker serve --config {c} --port {url.rsplit(':', 1)[1]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, default=None, help="where the broker lives")
    parser.add_argument("--no-wait", action="store_true", help="stop the broker at the end")
    ns = parser.parse_args()
    home = ns.dir or Path(tempfile.mkdtemp(prefix="broker-demo-"))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "broker.toml"
    port = free_port()
    try:
        banner(f"a fresh broker in {home}")
        init(config)
        print(f"  broker init --examples --config {config}")
        with served(config, port, home / "serve.log") as url:
            print(f"  broker serve on {url} (log: {home / 'serve.log'})", flush=True)
            ok, rogue = story(config, url)
            review_instructions(config, url, rogue)
            if not ns.no_wait and sys.stdin.isatty():
                with suppress(EOFError, KeyboardInterrupt):
                    input("\nthe broker keeps running for review: press Enter to stop it ")
        print("broker stopped", flush=True)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
