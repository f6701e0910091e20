"""Sandboxed stdio connectors: what the jail shows, who runs in it, how it dies, how it gets out."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest

from connectors import StdioConnector, StdioSpec
from connectors.base import EgressPolicy, SandboxMode, SandboxSpec
from connectors.egress import EgressEvent, EgressProxy
from connectors.errors import ConnectorConfigError
from connectors.sandbox import (
    SandboxSupport,
    SandboxUnavailable,
    describe_sandbox,
    plan_sandbox,
    probe_sandbox,
)

Argv = Callable[[str], tuple[str, ...]]

REPO = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent(
    '''
    """A stdlib MCP server whose tools report what the jail lets it see and do."""
    import json, os, resource, socket, sys, urllib.request

    def run(name, a):
        if name == "read":
            with open(a["path"], "rb") as f:
                return f.read(4096).decode("utf-8", "replace")
        if name == "write":
            with open(a["path"], "w") as f:
                f.write(a.get("text", ""))
            return "written"
        if name == "listdir":
            return sorted(os.listdir(a["path"]))
        if name == "whoami":
            caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")]
            limits = {n: resource.getrlimit(getattr(resource, n))[0]
                      for n in ("RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_CPU")}
            pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            return {"uid": os.getuid(), "gid": os.getgid(), "caps": caps[0], "limits": limits,
                    "pids": pids, "hostname": socket.gethostname(),
                    "interfaces": sorted(n for _, n in socket.if_nameindex())}
        if name == "connect":
            s = socket.create_connection((a["host"], a["port"]), timeout=3)
            s.close()
            return "connected"
        if name == "fetch":
            with urllib.request.urlopen(a["url"], timeout=10) as r:
                return r.read().decode()
        if name == "spawn":
            return os.fork() and "forked"
        raise ValueError(name)

    def answer(req):
        m = req.get("method")
        if "id" not in req:
            return None
        if m == "initialize":
            res = {"protocolVersion": req["params"]["protocolVersion"],
                   "capabilities": {"tools": {}}, "serverInfo": {"name": "probe", "version": "1"}}
        elif m == "tools/list":
            res = {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in
                   ("read", "write", "listdir", "whoami", "connect", "fetch")]}
        elif m == "tools/call":
            p = req["params"]
            try:
                out = run(p["name"], p.get("arguments") or {})
                res = {"content": [], "structuredContent": {"ok": out}, "isError": False}
            except Exception as exc:
                res = {"content": [{"type": "text", "text": type(exc).__name__ + ": " + str(exc)}],
                       "isError": True}
        else:
            res = {}
        return {"jsonrpc": "2.0", "id": req["id"], "result": res}

    for line in sys.stdin:
        if line.strip():
            reply = answer(json.loads(line))
            if reply is not None:
                sys.stdout.write(json.dumps(reply) + "\\n")
                sys.stdout.flush()
    '''
)


@pytest.fixture(scope="module")
def support() -> SandboxSupport:
    found = probe_sandbox()
    if not found.available:
        pytest.skip(f"this platform cannot sandbox: {found.reason}")
    return found


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    path = tmp_path / "runtime" / "probe.py"
    path.parent.mkdir()
    path.write_text(PROBE)
    return path


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    # The jail's uid must be able to read it (pytest makes its directories 0700).
    for directory in (tmp_path, tmp_path.parent, tmp_path.parent.parent):
        directory.chmod(0o755)
    root = tmp_path / "workspace"
    (root / "out").mkdir(parents=True)
    (root / "notes.txt").write_text("workspace notes")
    os.chown(root / "out", 65534, 65534)
    return root


@pytest.fixture
def broker_secret(tmp_path: Path) -> Path:
    secret = tmp_path / "broker" / "signing.key"
    secret.parent.mkdir()
    secret.write_text("broker-private-key")
    return secret


def probe_spec(probe: Path, **sandbox: Any) -> StdioSpec:
    return StdioSpec(
        id="probe",
        command=sys.executable,
        args=("-I", str(probe)),
        sandbox=SandboxSpec(mode=SandboxMode.REQUIRED, **sandbox),
    )


async def call(connector: StdioConnector, tool: str, **arguments: Any) -> tuple[bool, Any]:
    with anyio.fail_after(30):
        result = await connector.call_tool(tool, arguments)
    if result.is_error:
        text = result.content[0]
        assert text.type == "text"
        return False, text.text
    assert result.structured_content is not None
    return True, result.structured_content["ok"]


async def test_minimal_server_answers_from_inside_the_jail(
    support: SandboxSupport, fixture_server: Argv
) -> None:
    command, *args = fixture_server("minimal")
    spec = StdioSpec(
        id="minimal",
        command=command,
        args=tuple(args),
        sandbox=SandboxSpec(mode=SandboxMode.REQUIRED),
    )
    async with StdioConnector(spec) as connector:
        assert connector.sandboxed
        with anyio.fail_after(30):
            echoed = await connector.call_tool("echo", {"text": "hi"})
            seen = await connector.call_tool("environment", {})
    assert echoed.content[0].type == "text"
    assert echoed.content[0].text == "hi"
    assert seen.structured_content is not None
    assert seen.structured_content["cwd"] == "/tmp"


async def test_jail_shows_runtime_and_scope_paths_but_not_the_broker_or_the_host(
    support: SandboxSupport, probe: Path, workspace: Path, broker_secret: Path
) -> None:
    spec = probe_spec(probe, read_paths=(str(workspace),), deny_paths=(str(broker_secret),))
    async with StdioConnector(spec) as connector:
        assert await call(connector, "read", path=str(workspace / "notes.txt")) == (
            True,
            "workspace notes",
        )
        for hidden in (str(broker_secret), str(REPO / "pyproject.toml"), "/etc/passwd", "/root"):
            ok, said = await call(connector, "read", path=hidden)
            assert not ok
            assert "FileNotFoundError" in said or "IsADirectoryError" in said
        ok, top = await call(connector, "listdir", path="/")
        assert ok
        runtime = {Path(p).parts[1] for p in (sys.prefix, sys.base_prefix, probe, workspace)}
        system = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "dev"}
        assert set(top) <= system | {"tmp", "run"} | runtime
        assert "home" not in top


async def test_scope_paths_are_read_only_unless_declared_writable(
    support: SandboxSupport, probe: Path, workspace: Path
) -> None:
    spec = probe_spec(probe, read_paths=(str(workspace),), write_paths=(str(workspace / "out"),))
    async with StdioConnector(spec) as connector:
        ok, said = await call(connector, "write", path=str(workspace / "notes.txt"), text="x")
        assert not ok
        assert "Read-only file system" in said
        assert await call(connector, "write", path=str(workspace / "out" / "a.txt"), text="y") == (
            True,
            "written",
        )
    assert (workspace / "notes.txt").read_text() == "workspace notes"
    assert (workspace / "out" / "a.txt").read_text() == "y"


async def test_jailed_child_is_unprivileged_alone_in_its_pid_namespace_and_limited(
    support: SandboxSupport, probe: Path
) -> None:
    async with StdioConnector(probe_spec(probe)) as connector:
        ok, me = await call(connector, "whoami")
    assert ok
    assert (me["uid"], me["gid"], me["caps"]) == (65534, 65534, "0000000000000000")
    assert me["pids"] == [1, 2]  # bubblewrap's reaper and the probe itself
    assert me["hostname"] == "sandbox"
    assert me["interfaces"] == ["lo"]
    assert me["limits"] == {
        "RLIMIT_AS": 8 * 1024**3,
        "RLIMIT_NPROC": 256,
        "RLIMIT_NOFILE": 1024,
        "RLIMIT_CPU": 3600,
    }


async def test_jail_without_egress_has_no_network_at_all(
    support: SandboxSupport, probe: Path
) -> None:
    with socket.socket() as canary:
        canary.bind(("127.0.0.1", 0))
        canary.listen()
        port = canary.getsockname()[1]
        async with StdioConnector(probe_spec(probe)) as connector:
            ok, said = await call(connector, "connect", host="127.0.0.1", port=port)
            assert not ok
            assert "ConnectionRefusedError" in said
            ok, said = await call(connector, "connect", host="192.0.2.1", port=80)
            assert not ok
            assert "unreachable" in said
            ok, said = await call(connector, "fetch", url="http://example.com/")
            assert not ok
        canary.setblocking(False)
        with pytest.raises(BlockingIOError):
            canary.accept()


@pytest.fixture
def upstream() -> Iterator[tuple[str, int, list[str]]]:
    """An allowed 'remote' HTTP server on 127.0.0.2 (see test_egress.py for why loopback)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = b"hello from upstream"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "127.0.0.2", server.server_address[1], seen
    server.shutdown()
    server.server_close()


async def test_with_egress_the_proxy_is_the_only_way_out(
    support: SandboxSupport, probe: Path, upstream: tuple[str, int, list[str]]
) -> None:
    host, port, seen = upstream
    events: list[EgressEvent] = []

    async def resolver(name: str, _port: int) -> list[str]:
        return {"allowed.test": [host], "internal.test": ["10.0.0.7"]}[name]

    proxy = EgressProxy(on_event=events.append, resolver=resolver)
    policy = EgressPolicy(
        hosts=("allowed.test", "internal.test"), ports=(port,), allow_networks=("127.0.0.2/32",)
    )
    with socket.socket() as canary:
        canary.bind(("127.0.0.1", 0))
        canary.listen()
        canary_port = canary.getsockname()[1]
        async with StdioConnector(probe_spec(probe, egress=policy), egress=proxy) as connector:
            assert await call(connector, "fetch", url=f"http://allowed.test:{port}/x") == (
                True,
                "hello from upstream",
            )
            ok, said = await call(connector, "fetch", url=f"http://internal.test:{port}/")
            assert not ok
            assert "403" in said
            ok, _ = await call(connector, "fetch", url=f"http://127.0.0.1:{canary_port}/")
            assert not ok
            ok, said = await call(connector, "connect", host="127.0.0.1", port=canary_port)
            assert not ok
            assert "ConnectionRefusedError" in said
            ok, said = await call(connector, "connect", host=host, port=port)
            assert not ok
        canary.setblocking(False)
        with pytest.raises(BlockingIOError):
            canary.accept()
    assert seen == ["/x"]
    assert [(e.allowed, e.host, e.address, e.reason) for e in events] == [
        (True, "allowed.test", host, ""),
        (False, "internal.test", "10.0.0.7", "address-private"),
        (False, "127.0.0.1", None, "host-not-allowed"),
    ]
    assert {e.connector_id for e in events} == {"probe"}


async def test_required_sandbox_is_refused_loudly_where_the_platform_cannot_sandbox(
    probe: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(
        "connectors.mcp_stdio.probe_sandbox",
        lambda: SandboxSupport(False, "bubblewrap (bwrap) is not installed"),
    )
    with pytest.raises(SandboxUnavailable, match="requires a sandbox: bubblewrap"):
        StdioConnector(probe_spec(probe))
    auto = StdioSpec(id="probe", command=sys.executable, args=(str(probe),), sandbox=SandboxSpec())
    connector = StdioConnector(auto)
    assert not connector.sandboxed
    assert any(
        r.getMessage() == "SANDBOX UNAVAILABLE: stdio connector runs unsandboxed"
        and r.levelname == "WARNING"
        for r in caplog.records
    )


def test_a_mount_overlapping_the_brokers_own_files_is_refused(
    support: SandboxSupport, probe: Path, broker_secret: Path
) -> None:
    for exposing in (broker_secret.parent, broker_secret.parent.parent, Path("/")):
        spec = probe_spec(probe, read_paths=(str(exposing),), deny_paths=(str(broker_secret),))
        with pytest.raises(ConnectorConfigError, match="overlaps the broker's own file"):
            plan_sandbox(spec, {}, support=support)


def test_the_connectors_working_directory_is_mounted_read_only_unless_it_holds_broker_files(
    support: SandboxSupport, probe: Path, tmp_path: Path, broker_secret: Path
) -> None:
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    spec = replace(probe_spec(probe), cwd=str(workdir))
    plan = plan_sandbox(spec, {}, support=support)
    (mount,) = [m for m in plan.mounts if m.target == str(workdir)]
    assert not mount.writable
    exposing = replace(
        probe_spec(probe, deny_paths=(str(broker_secret),)), cwd=str(broker_secret.parent)
    )
    with pytest.raises(ConnectorConfigError, match="overlaps the broker's own file"):
        plan_sandbox(exposing, {}, support=support)


def test_relative_or_missing_sandbox_paths_are_refused(
    support: SandboxSupport, probe: Path
) -> None:
    with pytest.raises(ConnectorConfigError, match="not absolute"):
        plan_sandbox(probe_spec(probe, read_paths=("data",)), {}, support=support)
    with pytest.raises(ConnectorConfigError, match="does not exist"):
        plan_sandbox(probe_spec(probe, write_paths=("/no/such/dir",)), {}, support=support)


def test_describe_sandbox_prints_the_exact_argv_and_a_summary(
    support: SandboxSupport, probe: Path, workspace: Path
) -> None:
    spec = probe_spec(
        probe,
        read_paths=(str(workspace),),
        egress=EgressPolicy(hosts=("api.example.com",)),
    )
    lines = describe_sandbox(spec)
    assert lines[0] == "sandbox mode: required"
    argv = shlex.split(lines[1].removeprefix("argv: "))
    assert argv[0] == support.bwrap
    assert argv[-3:] == [sys.executable, "-I", str(probe)]
    assert "--die-with-parent" in argv
    assert "--unshare-net" in argv
    assert f"ro {workspace} (scope path)" in lines
    assert "network: egress proxy only" in lines
    off = StdioSpec(id="x", command="true", sandbox=SandboxSpec(mode=SandboxMode.OFF))
    assert describe_sandbox(off)[0].startswith("sandbox: off")
    down = SandboxSupport(False, "bubblewrap (bwrap) is not installed")
    assert "UNAVAILABLE, connector refused" in describe_sandbox(probe_spec(probe), support=down)[0]


BROKER_STAND_IN = textwrap.dedent(
    """
    import asyncio, json, sys
    from connectors import StdioConnector, StdioSpec
    from connectors.base import SandboxSpec, SandboxMode

    async def main():
        mode = sys.argv[1]
        spec = StdioSpec(id="minimal", command=sys.executable, args=(sys.argv[2], "--grandchild"),
                         sandbox=None if mode == "none" else SandboxSpec(mode=SandboxMode.REQUIRED))
        async with StdioConnector(spec) as connector:
            print(json.dumps({"pid": connector.pid}), flush=True)
            await asyncio.sleep(600)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("mode", ["none", "required"], ids=["unsandboxed", "sandboxed"])
async def test_children_die_when_the_broker_is_sigkilled(
    mode: str, support: SandboxSupport, fixture_server: Argv, tmp_path: Path
) -> None:
    script = tmp_path / "broker_stand_in.py"
    script.write_text(BROKER_STAND_IN)
    minimal = fixture_server("minimal")[1]
    broker = subprocess.Popen(  # noqa: ASYNC220 - killed and waited below, bounded
        [sys.executable, str(script), mode, minimal],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert broker.stdout is not None
        with anyio.fail_after(30):
            line = await anyio.to_thread.run_sync(broker.stdout.readline)
        child = json.loads(line)["pid"]
        with anyio.fail_after(10):
            while len(family := {child, *_descendants(child)}) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        if mode == "none":
            # PR_SET_PDEATHSIG covers the direct child only; its own children are its business
            # (a jail's whole PID namespace dies with it instead).
            orphans, family = family - {child}, {child}
        else:
            orphans = set[int]()
        broker.send_signal(signal.SIGKILL)
        broker.wait(timeout=10)
        with anyio.fail_after(10):
            while alive := {p for p in family if _alive(p)}:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert not alive
        for orphan in orphans:
            os.kill(orphan, signal.SIGKILL)
    finally:
        broker.kill()
        broker.wait(timeout=10)
        if broker.stdout is not None:
            broker.stdout.close()


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    found.add(int(entry))
                    frontier.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
