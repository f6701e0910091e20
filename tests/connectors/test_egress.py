"""The egress proxy: allowlists, one pinned resolution, address ranges, redirects, reporting.

The allowed upstream is not on loopback: each test module run creates a network namespace
joined to this one by a veth pair, and serves HTTP from 198.18.0.2 (RFC 2544 benchmark range)
inside it. That address is refused by default like every non-global one, so policies allow
``198.18.0.0/30`` explicitly; loopback stays refused with no exception at all, which is what
lets the loopback canary prove that nothing reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import pytest

from connectors.base import EgressPolicy
from connectors.egress import (
    EgressEvent,
    EgressListener,
    EgressProxy,
    address_refusal,
    classify_address,
    host_allowed,
)

UPSTREAM = "198.18.0.2"
UPSTREAM_PORT = 8080

UPSTREAM_SERVER = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from urllib.parse import parse_qs, urlsplit

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            query = parse_qs(urlsplit(self.path).query)
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", query["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = ("upstream saw " + self.path + " host " + self.headers["Host"]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
    print("ready", flush=True)
    server.serve_forever()
    """
)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """198.18.0.2:8080 in a namespace of our own; the host end of the veth is 198.18.0.1/30."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 (`ip`) to build the upstream network namespace")
    name = f"egress-{secrets.token_hex(3)}"
    host_end, ns_end = f"ve{name[-6:]}a", f"ve{name[-6:]}b"
    script = tmp_path_factory.mktemp("upstream") / "server.py"
    script.write_text(UPSTREAM_SERVER)
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end, "netns", name],
        ["ip", "addr", "add", "198.18.0.1/30", "dev", host_end],
        ["ip", "link", "set", host_end, "up"],
        ["ip", "-n", name, "addr", "add", f"{UPSTREAM}/30", "dev", ns_end],
        ["ip", "-n", name, "link", "set", ns_end, "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
    ]
    server: subprocess.Popen[str] | None = None
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=10)
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                name,
                sys.executable,
                str(script),
                UPSTREAM,
                str(UPSTREAM_PORT),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        yield UPSTREAM
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
            if server.stdout is not None:
                server.stdout.close()
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def canary() -> Iterator[tuple[int, list[str]]]:
    """A loopback HTTP server that must never see a request."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"canary")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()
    assert seen == [], "the loopback canary was reached through the egress proxy"


class Names:
    """An injected resolver: a fixed table, and a count of lookups per name."""

    def __init__(self, table: dict[str, Sequence[str]]) -> None:
        self.table = table
        self.lookups: dict[str, int] = {}

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups[host] = self.lookups.get(host, 0) + 1
        answer = self.table[host]
        if isinstance(answer, list) and answer and isinstance(answer[0], list):
            return answer[self.lookups[host] - 1]  # pyright: ignore[reportUnknownVariableType]
        return answer


def table(canary_port: int) -> dict[str, Sequence[str]]:
    del canary_port  # the canary is reached only by IP literal
    return {
        "api.test": [UPSTREAM],
        "meta.test": ["169.254.169.254"],
        "home.test": ["127.0.0.1"],
        "lan.test": ["10.0.0.7"],
        "mixed.test": [UPSTREAM, "127.0.0.1"],
    }


POLICY = EgressPolicy(
    hosts=("api.test", "*.test", UPSTREAM),
    ports=(UPSTREAM_PORT, 443),
    allow_networks=("198.18.0.0/30",),
)


async def start(
    names: Names, events: list[EgressEvent], policy: EgressPolicy = POLICY
) -> EgressListener:
    proxy = EgressProxy(on_event=events.append, resolver=names)
    return await proxy.listen_tcp("fetcher", policy)


async def exchange(listener: EgressListener, request: bytes, then: bytes = b"") -> bytes:
    with anyio.fail_after(15):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            writer.write(request)
            await writer.drain()
            if then:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    return head
                writer.write(then)
                await writer.drain()
            return await reader.read()
        finally:
            # Closed and released on every path, so no socket is left for GC to find later.
            writer.close()
            with anyio.move_on_after(5), contextlib.suppress(OSError):
                await writer.wait_closed()


def get(url: str, host: str = "x") -> bytes:
    return f"GET {url} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode()


async def test_an_allowed_host_is_reached_through_plain_http_and_connect(
    upstream: str, canary: tuple[int, list[str]]
) -> None:
    events: list[EgressEvent] = []
    names = Names(table(canary[0]))
    listener = await start(names, events)
    try:
        plain = await exchange(listener, get(f"http://api.test:{UPSTREAM_PORT}/a?b=1", "evil.test"))
        tunnel = await exchange(
            listener,
            f"CONNECT api.test:{UPSTREAM_PORT} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode(),
            b"GET /t HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
        )
    finally:
        await listener.aclose()
    assert plain.startswith(b"HTTP/1.0 200")
    # The Host header is the checked one, never the client's.
    assert plain.endswith(f"upstream saw /a?b=1 host api.test:{UPSTREAM_PORT}".encode())
    assert tunnel.endswith(b"upstream saw /t host api.test")
    assert [(e.allowed, e.kind, e.host, e.address) for e in events] == [
        (True, "http", "api.test", UPSTREAM),
        (True, "connect", "api.test", UPSTREAM),
    ]


async def test_the_unix_socket_listener_serves_the_same_rules(
    upstream: str, canary: tuple[int, list[str]], tmp_path: Path
) -> None:
    events: list[EgressEvent] = []
    proxy = EgressProxy(on_event=events.append, resolver=Names(table(canary[0])))
    listener = await proxy.listen("fetcher", POLICY)
    try:
        assert ((await anyio.Path(listener.path).parent.stat()).st_mode & 0o777) == 0o700
        with anyio.fail_after(15):
            reader, writer = await asyncio.open_unix_connection(listener.path)
            try:
                writer.write(get(f"http://home.test:{UPSTREAM_PORT}/"))
                answer = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    finally:
        await listener.aclose()
    assert answer.startswith(b"HTTP/1.1 403")
    assert not await anyio.Path(listener.path).exists()
    assert [(e.allowed, e.reason) for e in events] == [(False, "address-loopback")]


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("http://127.0.0.1:{canary}/stolen", "redirect-host-not-allowed"),
        ("http://169.254.169.254/latest/meta-data/", "redirect-host-not-allowed"),
        ("http://meta.test:8080/latest/meta-data/", "redirect-address-metadata"),
        ("http://home.test:{canary}/", "redirect-port-not-allowed"),
        ("http://home.test:8080/", "redirect-address-loopback"),
        ("file:///etc/passwd", "redirect-bad-location"),
    ],
    ids=["loopback-ip", "metadata-ip", "name-to-metadata", "port", "name-to-loopback", "file"],
)
async def test_a_redirect_to_a_refused_place_never_reaches_the_client(
    location: str, reason: str, upstream: str, canary: tuple[int, list[str]]
) -> None:
    events: list[EgressEvent] = []
    listener = await start(Names(table(canary[0])), events)
    target = location.format(canary=canary[0])
    try:
        answer = await exchange(
            listener, get(f"http://api.test:{UPSTREAM_PORT}/redirect?to={target}")
        )
    finally:
        await listener.aclose()
    assert answer.startswith(b"HTTP/1.1 403")
    assert f"X-Egress-Refused: {reason}".encode() in answer
    assert b"Location" not in answer
    assert [(e.allowed, e.kind, e.reason) for e in events] == [
        (True, "http", ""),
        (False, "redirect", reason),
    ]


async def test_an_allowed_redirect_is_passed_on_for_the_client_to_follow(
    upstream: str, canary: tuple[int, list[str]]
) -> None:
    events: list[EgressEvent] = []
    listener = await start(Names(table(canary[0])), events)
    try:
        answer = await exchange(
            listener, get(f"http://api.test:{UPSTREAM_PORT}/redirect?to=/elsewhere")
        )
    finally:
        await listener.aclose()
    assert answer.startswith(b"HTTP/1.0 302")
    assert b"Location: /elsewhere" in answer
    # A redirect hop that passes its checks is not an attempt of its own: the client's
    # follow-up request through the proxy is, and is checked again.
    assert [(e.allowed, e.kind, e.host) for e in events] == [(True, "http", "api.test")]


@pytest.mark.parametrize(
    ("name", "answer", "reason"),
    [
        ("lan.test", ["10.0.0.7"], "address-private"),
        ("home.test", ["127.0.0.1"], "address-loopback"),
        ("meta.test", ["169.254.169.254"], "address-metadata"),
        ("cgnat.test", ["100.64.0.9"], "address-cgnat"),
        ("link.test", ["fe80::1"], "address-link-local"),
        ("mapped.test", ["::ffff:127.0.0.1"], "address-ipv4-mapped"),
        ("nat64.test", ["64:ff9b::7f00:1"], "address-nat64"),
        ("ula.test", ["fd00::1"], "address-private"),
        ("zero.test", ["0.0.0.0"], "address-unspecified"),  # noqa: S104 - an answer, not a bind
        ("mixed.test", [UPSTREAM, "127.0.0.1"], "address-loopback"),
    ],
)
async def test_a_name_resolving_to_a_refused_address_is_refused_for_connect_and_http(
    name: str, answer: list[str], reason: str, upstream: str, canary: tuple[int, list[str]]
) -> None:
    events: list[EgressEvent] = []
    listener = await start(Names({name: answer}), events)
    try:
        tunnel = await exchange(listener, f"CONNECT {name}:443 HTTP/1.1\r\n\r\n".encode(), b"x")
        plain = await exchange(listener, get(f"http://{name}:{UPSTREAM_PORT}/"))
    finally:
        await listener.aclose()
    assert tunnel.startswith(b"HTTP/1.1 403")
    assert plain.startswith(b"HTTP/1.1 403")
    assert [e.reason for e in events] == [reason, reason]
    assert all(not e.allowed and e.address is not None for e in events)


async def test_each_connection_resolves_once_and_goes_only_to_the_checked_address(
    upstream: str, canary: tuple[int, list[str]]
) -> None:
    # A rebinding name: public-looking first, loopback on the next lookup.
    names = Names({"rebind.test": [[UPSTREAM], ["127.0.0.1"], ["127.0.0.1"]]})  # pyright: ignore[reportArgumentType]
    events: list[EgressEvent] = []
    listener = await start(names, events)
    try:
        first = await exchange(listener, get(f"http://rebind.test:{UPSTREAM_PORT}/one"))
        second = await exchange(listener, get(f"http://rebind.test:{UPSTREAM_PORT}/two"))
    finally:
        await listener.aclose()
    assert first.endswith(f"upstream saw /one host rebind.test:{UPSTREAM_PORT}".encode())
    assert second.startswith(b"HTTP/1.1 403")
    assert names.lookups == {"rebind.test": 2}
    assert [(e.address, e.reason) for e in events] == [
        (UPSTREAM, ""),
        ("127.0.0.1", "address-loopback"),
    ]


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (get("http://other.example:8080/"), b"403", "host-not-allowed"),
        (get("http://api.test:25/"), b"403", "port-not-allowed"),
        (get("http://user:pw@api.test:8080/"), b"400", "bad-request"),
        (get("https://api.test/"), b"400", "bad-request"),
        (get("/relative"), b"400", "bad-request"),
        (b"CONNECT api.test HTTP/1.1\r\n\r\n", b"400", "bad-request"),
        (b"CONNECT api_test:443 HTTP/1.1\r\n\r\n", b"400", "bad-request"),
        (
            b"GET http://api.test:8080/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"501",
            "chunked-request-body",
        ),
        (
            b"GET http://api.test:8080/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"400",
            "bad-request",
        ),
        (b"GET http://api.test:8080/ HTTP/1.1\r\n folded\r\n\r\n", b"400", "bad-request"),
        (b"garbage\r\n\r\n", b"400", "bad-request"),
    ],
    ids=[
        "host",
        "port",
        "userinfo",
        "https-absolute",
        "origin-form",
        "connect-no-port",
        "bad-name",
        "chunked",
        "two-lengths",
        "obs-fold",
        "garbage",
    ],
)
async def test_unlisted_hosts_ports_and_malformed_requests_are_refused_and_reported(
    request_bytes: bytes, status: bytes, reason: str, upstream: str, canary: tuple[int, list[str]]
) -> None:
    events: list[EgressEvent] = []
    listener = await start(Names(table(canary[0])), events)
    try:
        answer = await exchange(listener, request_bytes)
    finally:
        await listener.aclose()
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert [(e.allowed, e.reason) for e in events] == [(False, reason)]


async def test_a_recorder_that_fails_stops_the_connection(
    upstream: str, canary: tuple[int, list[str]]
) -> None:
    async def broken(event: EgressEvent) -> None:
        raise RuntimeError("store down")

    proxy = EgressProxy(on_event=broken, resolver=Names(table(canary[0])))
    listener = await proxy.listen_tcp("fetcher", POLICY)
    try:
        answer = await exchange(listener, get(f"http://api.test:{UPSTREAM_PORT}/never"))
    finally:
        await listener.aclose()
    assert answer.startswith(b"HTTP/1.1 503")


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("169.254.1.1", "link-local"),
        ("172.16.3.4", "private"),
        ("192.168.1.1", "private"),
        ("100.127.255.254", "cgnat"),
        ("::ffff:10.0.0.1", "ipv4-mapped"),
        ("::127.0.0.1", "ipv4-mapped"),
        ("64:ff9b:1::a00:1", "nat64"),
        ("2002:7f00:1::", "6to4"),
        ("2001:0:4136:e378::", "teredo"),
        ("224.0.0.1", "multicast"),
        ("198.18.0.2", "reserved"),
        ("203.0.113.5", "reserved"),
        ("255.255.255.255", "reserved"),
    ],
)
def test_addresses_are_classified_into_refused_ranges(address: str, category: str | None) -> None:
    assert classify_address(ipaddress.ip_address(address)) == category


def test_allow_private_and_allow_networks_open_only_what_they_name() -> None:
    private = EgressPolicy(hosts=(), allow_private=True)
    assert address_refusal(ipaddress.ip_address("10.1.2.3"), private) is None
    assert address_refusal(ipaddress.ip_address("100.64.0.1"), private) is None
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), private) == "address-loopback"
    assert address_refusal(ipaddress.ip_address("169.254.169.254"), private) == "address-metadata"
    narrow = EgressPolicy(hosts=(), allow_networks=("10.9.0.0/16",))
    assert address_refusal(ipaddress.ip_address("10.9.1.1"), narrow) is None
    assert address_refusal(ipaddress.ip_address("10.8.1.1"), narrow) == "address-private"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("api.example.com", True),
        ("a.b.example.org", True),
        ("example.org", False),
        ("evilexample.org", False),
        ("api.example.com.evil", False),
        ("203.0.113.9", True),
        ("203.0.113.10", False),
    ],
)
def test_hosts_match_exactly_or_under_a_wildcard(host: str, allowed: bool) -> None:
    policy = EgressPolicy(hosts=("API.example.com.", "*.example.org", "203.0.113.9"))
    assert host_allowed(host, policy) is allowed
