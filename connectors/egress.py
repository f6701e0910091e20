"""The egress proxy: the only way a sandboxed connector reaches the network. Stdlib + base only.

An asyncio HTTP/1.1 forward proxy, one listener per connector (a unix socket bind-mounted into
the jail, or a loopback TCP port), so the listener says which connector is asking. Per client
connection:

1. read one request head (bounded size and time): ``CONNECT host:port`` opens a tunnel, an
   absolute-form ``http://`` request is forwarded; anything else is refused;
2. the host must match the connector's allowlist and the port its ports;
3. the name is resolved exactly once; every address in the answer is checked (loopback,
   private, link-local, CGNAT, metadata, IPv4-mapped, NAT64, 6to4, Teredo and other
   non-global ranges are refused unless the policy allows them) and the connection goes to
   those checked addresses only: no second lookup can rebind it;
4. plain HTTP is sent upstream as one request with ``Connection: close`` and a ``Host`` equal to
   the checked host; a redirect in the answer is checked hop by hop (host, port, one resolution,
   addresses) before the client sees it, and a refused one becomes a 403. Inside a CONNECT
   tunnel (TLS) redirects are invisible, but the client's next hop is a new CONNECT checked
   from scratch;
5. every attempt, allowed or refused, is reported to ``on_event`` (which may be async, and is
   awaited before any byte goes upstream, so a recorder that fails stops the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from connectors.base import EgressPolicy

__all__ = [
    "EgressEvent",
    "EgressListener",
    "EgressProxy",
    "Resolver",
    "address_refusal",
    "classify_address",
    "host_allowed",
]

logger = logging.getLogger("connectors.egress")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses``; called once per connection (and once per redirect hop)."""

EventSink = Callable[["EgressEvent"], Awaitable[None] | None]

MAX_HEAD = 64 * 1024
HEAD_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0
CLOSE_TIMEOUT = 5.0
MAX_BODY = 16 * 1024 * 1024

_METADATA = {
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "100.100.100.200",
        "168.63.129.16",
        "fd00:ec2::254",
    )
}
_RANGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loopback", ("127.0.0.0/8", "::1/128")),
    ("unspecified", ("0.0.0.0/8", "::/128")),
    ("link-local", ("169.254.0.0/16", "fe80::/10")),
    ("private", ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")),
    ("cgnat", ("100.64.0.0/10",)),
    ("ipv4-mapped", ("::ffff:0:0/96", "::ffff:0:0:0/96", "::/96")),
    ("nat64", ("64:ff9b::/96", "64:ff9b:1::/48")),
    ("6to4", ("2002::/16",)),
    ("teredo", ("2001::/32",)),
    ("site-local", ("fec0::/10",)),
    ("multicast", ("224.0.0.0/4", "ff00::/8")),
)
_NETWORKS = tuple((name, tuple(ipaddress.ip_network(n) for n in nets)) for name, nets in _RANGES)
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOP_BY_HOP = {
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
}


@dataclass(frozen=True, slots=True)
class EgressEvent:
    """One egress attempt, for the broker to record in the session that caused it."""

    connector_id: str
    allowed: bool
    kind: str
    """``"connect"`` (a CONNECT tunnel), ``"http"`` (a forwarded request) or ``"redirect"``."""
    host: str
    port: int
    address: str | None
    """The resolved address checked (the refused one, or the one connected to)."""
    reason: str = ""
    """Empty when allowed; otherwise kebab-case: ``host-not-allowed``, ``port-not-allowed``,
    ``address-loopback`` (``address-<category>``), ``resolve-failed``, ``connect-failed``,
    ``bad-request``, ``redirect-host-not-allowed`` ..."""
    method: str = ""


def classify_address(address: IPAddress) -> str | None:
    """The refused category of ``address`` (``"loopback"``, ``"metadata"``...), None if global."""
    if address in _METADATA:
        return "metadata"
    for name, networks in _NETWORKS:
        if any(address.version == n.version and address in n for n in networks):
            return name
    if not address.is_global:
        return "reserved"
    return None


def address_refusal(address: IPAddress, policy: EgressPolicy) -> str | None:
    """Why ``policy`` refuses ``address`` (``"address-<category>"``), or None when allowed."""
    for cidr in policy.allow_networks:
        network = ipaddress.ip_network(cidr, strict=False)
        if address.version == network.version and address in network:
            return None
    category = classify_address(address)
    if category is None:
        return None
    if category in ("private", "cgnat") and policy.allow_private:
        return None
    return f"address-{category}"


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def host_allowed(host: str, policy: EgressPolicy) -> bool:
    """Whether ``host`` (already lower-cased, no trailing dot) is on the policy's list.

    IP literals match only a literal entry; names match exactly or under a ``*.`` wildcard
    (``*.example.com`` covers ``a.example.com`` and ``a.b.example.com``, not ``example.com``).
    """
    literal = _ip(host)
    for entry in policy.hosts:
        entry = entry.lower().rstrip(".")
        if literal is not None:
            if _ip(entry) == literal:
                return True
        elif entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif entry == host:
            return True
    return False


async def _system_resolver(host: str, port: int) -> Sequence[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


class _Refused(Exception):
    def __init__(self, reason: str, status: int = 403, *, reported: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.reported = reported


@dataclass(slots=True)
class _Target:
    host: str
    port: int


class EgressListener:
    """One connector's way in to the proxy; ``path`` (unix) or ``port`` (TCP) says where."""

    def __init__(self, server: asyncio.Server, path: str | None, port: int | None) -> None:
        self._server = server
        self.path = path or ""
        self.port = port or 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    async def aclose(self) -> None:
        """Stop accepting, cut open connections, remove the socket file. Idempotent.

        A connection accepted while this runs is closed on arrival (see `EgressProxy._accept`),
        so once it returns no connection of this listener is open. Every wait is bounded.
        """
        self.closed = True
        self._server.close()
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            self._tasks.difference_update(tasks)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            if self.path:
                os.unlink(self.path)


class EgressProxy:
    """The broker's egress proxy (see the module docstring for every rule it enforces)."""

    def __init__(
        self,
        *,
        on_event: EventSink,
        resolver: Resolver | None = None,
        socket_dir: str | None = None,
    ) -> None:
        """``on_event`` receives every attempt; ``resolver`` replaces DNS (tests);
        ``socket_dir`` holds the unix sockets (default: a fresh private temporary directory)."""
        self._on_event = on_event
        self._resolve = resolver or _system_resolver
        self._dir = socket_dir

    def _socket_dir(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="broker-egress-")
            os.chmod(self._dir, 0o700)
        return self._dir

    async def listen(self, connector_id: str, policy: EgressPolicy) -> EgressListener:
        """A fresh unix socket for one connector, mode 0666 inside a 0700 directory, so only
        the jail it is bind-mounted into (and the broker's own uid) can reach it."""
        path = os.path.join(self._socket_dir(), f"{connector_id}-{secrets.token_hex(6)}.sock")
        holder: list[EgressListener] = []
        server = await asyncio.start_unix_server(
            lambda r, w: self._accept(holder[0], connector_id, policy, r, w), path=path
        )
        os.chmod(path, 0o666)  # noqa: S103 - the 0700 directory is the gate; the jail's uid differs
        holder.append(EgressListener(server, path, None))
        return holder[0]

    async def listen_tcp(
        self, connector_id: str, policy: EgressPolicy, host: str = "127.0.0.1"
    ) -> EgressListener:
        """A loopback TCP port for one connector (unsandboxed use and tests)."""
        holder: list[EgressListener] = []
        server = await asyncio.start_server(
            lambda r, w: self._accept(holder[0], connector_id, policy, r, w), host=host, port=0
        )
        port = int(server.sockets[0].getsockname()[1])
        holder.append(EgressListener(server, None, port))
        return holder[0]

    def _accept(
        self,
        listener: EgressListener,
        connector_id: str,
        policy: EgressPolicy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if listener.closed:
            writer.close()  # accepted as the listener closed: nobody would ever close it
            return
        task = asyncio.get_running_loop().create_task(
            self._serve(connector_id, policy, reader, writer)
        )
        listener._tasks.add(task)  # pyright: ignore[reportPrivateUsage]
        task.add_done_callback(listener._tasks.discard)  # pyright: ignore[reportPrivateUsage]

    async def _report(self, event: EgressEvent) -> None:
        log = logger.info if event.allowed else logger.warning
        log(
            "egress allowed" if event.allowed else "egress refused",
            extra={
                "connector": event.connector_id,
                "host": event.host,
                "port": event.port,
                "address": event.address,
                "reason": event.reason,
                "kind": event.kind,
            },
        )
        result = self._on_event(event)
        if inspect.isawaitable(result):
            await result

    async def _serve(
        self,
        connector_id: str,
        policy: EgressPolicy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                await self._refuse_raw(writer, connector_id, "bad-request", 400)
                return
            if len(head) > MAX_HEAD:
                await self._refuse_raw(writer, connector_id, "bad-request", 431)
                return
            method, target, headers = _parse_head(head)
            if method == "CONNECT":
                await self._tunnel(connector_id, policy, target, reader, writer)
            else:
                await self._forward(connector_id, policy, method, target, headers, reader, writer)
        except _Refused as refused:
            await self._refuse_raw(
                writer, connector_id, refused.reason, refused.status, report=not refused.reported
            )
        except Exception:
            logger.exception("egress proxy connection failed", extra={"connector": connector_id})
        finally:
            await _close(writer)

    async def _refuse_raw(
        self,
        writer: asyncio.StreamWriter,
        connector_id: str,
        reason: str,
        status: int,
        *,
        report: bool = True,
    ) -> None:
        if report:
            await self._report(EgressEvent(connector_id, False, "http", "", 0, None, reason))
        body = f"egress refused: {reason}\n".encode()
        phrase = {
            400: "Bad Request",
            403: "Forbidden",
            431: "Too Large",
            501: "Not Implemented",
            502: "Bad Gateway",
            503: "Service Unavailable",
        }.get(status, "Refused")
        with contextlib.suppress(OSError):
            writer.write(
                f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n"
                f"X-Egress-Refused: {reason}\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()

    async def _check(
        self, connector_id: str, policy: EgressPolicy, target: _Target, kind: str, method: str
    ) -> list[IPAddress]:
        """Host, port, one resolution, every address: the pinned addresses, or `_Refused`."""
        prefix = "redirect-" if kind == "redirect" else ""

        async def refuse(reason: str, address: str | None = None, status: int = 403) -> _Refused:
            await self._report(
                EgressEvent(
                    connector_id,
                    False,
                    kind,
                    target.host,
                    target.port,
                    address,
                    prefix + reason,
                    method,
                )
            )
            return _Refused(prefix + reason, status, reported=True)

        if not host_allowed(target.host, policy):
            raise await refuse("host-not-allowed")
        if target.port not in policy.ports:
            raise await refuse("port-not-allowed")
        literal = _ip(target.host)
        if literal is not None:
            answers: Sequence[str] = [str(literal)]
        else:
            try:
                answers = await asyncio.wait_for(
                    self._resolve(target.host, target.port), RESOLVE_TIMEOUT
                )
            except (OSError, TimeoutError, UnicodeError):
                raise await refuse("resolve-failed", status=502) from None
        addresses: list[IPAddress] = []
        for answer in answers:
            address = _ip(answer)
            if address is None:
                raise await refuse("resolve-failed", answer, 502)
            why = address_refusal(address, policy)
            if why is not None:
                raise await refuse(why, str(address))
            addresses.append(address)
        if not addresses:
            raise await refuse("resolve-failed", status=502)
        return addresses

    async def _open(
        self, connector_id: str, policy: EgressPolicy, target: _Target, kind: str, method: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        addresses = await self._check(connector_id, policy, target, kind, method)
        for address in addresses:
            # `asyncio.timeout`, not `wait_for`: on Python 3.11 a `wait_for` cancelled just as
            # the connection completes drops the connected stream unclosed.
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    upstream = await asyncio.open_connection(str(address), target.port)
            except (OSError, TimeoutError):
                continue
            event = EgressEvent(
                connector_id, True, kind, target.host, target.port, str(address), "", method
            )
            try:
                await self._report(event)
            except Exception:
                await _close(upstream[1])
                logger.exception(
                    "egress event could not be recorded", extra={"connector": connector_id}
                )
                raise _Refused("not-recorded", 503, reported=True) from None
            except BaseException:  # cancelled: the connection is nobody else's to close
                upstream[1].close()
                raise
            return upstream
        await self._report(
            EgressEvent(
                connector_id,
                False,
                kind,
                target.host,
                target.port,
                str(addresses[0]),
                "connect-failed",
                method,
            )
        )
        raise _Refused("connect-failed", 502, reported=True)

    async def _tunnel(
        self,
        connector_id: str,
        policy: EgressPolicy,
        target: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        up_reader, up_writer = await self._open(
            connector_id, policy, _authority(target, None), "connect", "CONNECT"
        )
        try:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await _splice(reader, writer, up_reader, up_writer)
        finally:
            await _close(up_writer)

    async def _forward(
        self,
        connector_id: str,
        policy: EgressPolicy,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if not _TOKEN.match(method):
            raise _Refused("bad-request", 400)
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.netloc or "@" in parts.netloc:
            raise _Refused("bad-request", 400)
        target = _authority(parts.netloc, 80)
        names = {name.lower() for name, _ in headers}
        if "transfer-encoding" in names:
            raise _Refused("chunked-request-body", 501)
        lengths = {value.strip() for name, value in headers if name.lower() == "content-length"}
        if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
            raise _Refused("bad-request", 400)
        length = int(next(iter(lengths), "0"))
        if length > MAX_BODY:
            raise _Refused("body-too-large", 403)
        up_reader, up_writer = await self._open(connector_id, policy, target, "http", method)
        try:
            dropped = (
                _HOP_BY_HOP
                | {"host"}
                | {
                    token.strip().lower()
                    for name, value in headers
                    if name.lower() == "connection"
                    for token in value.split(",")
                }
            )
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            host = (
                target.host
                if _ip(target.host) is None or ":" not in target.host
                else f"[{target.host}]"
            )
            authority = host if target.port == 80 else f"{host}:{target.port}"
            lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}"]
            lines += [f"{n}: {v}" for n, v in headers if n.lower() not in dropped]
            lines.append("Connection: close")
            up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            remaining = length
            while remaining:
                chunk = await asyncio.wait_for(reader.read(min(remaining, 65536)), IDLE_TIMEOUT)
                if not chunk:
                    raise _Refused("bad-request", 400)
                up_writer.write(chunk)
                remaining -= len(chunk)
            await up_writer.drain()
            try:
                response = await asyncio.wait_for(up_reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                raise _Refused("bad-response", 502) from None
            status_line, *response_headers = response.decode("latin-1").split("\r\n")
            status = status_line.split(" ", 2)
            if len(status) < 2 or not status[1].isdigit():
                raise _Refused("bad-response", 502)
            if 300 <= int(status[1]) < 400:
                for line in response_headers:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "location":
                        await self._check_redirect(connector_id, policy, url, value.strip(), method)
            kept = [
                line
                for line in response_headers
                if line and line.partition(":")[0].strip().lower() not in _HOP_BY_HOP
            ]
            writer.write(
                ("\r\n".join([status_line, *kept, "Connection: close"]) + "\r\n\r\n").encode(
                    "latin-1"
                )
            )
            await writer.drain()
            while chunk := await asyncio.wait_for(up_reader.read(65536), IDLE_TIMEOUT):
                writer.write(chunk)
                await writer.drain()
        finally:
            await _close(up_writer)

    async def _check_redirect(
        self, connector_id: str, policy: EgressPolicy, base: str, location: str, method: str
    ) -> None:
        parts = urlsplit(urljoin(base, location))
        if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
            await self._report(
                EgressEvent(
                    connector_id,
                    False,
                    "redirect",
                    parts.netloc,
                    0,
                    None,
                    "redirect-bad-location",
                    method,
                )
            )
            raise _Refused("redirect-bad-location", 403, reported=True)
        target = _authority(parts.netloc, 443 if parts.scheme == "https" else 80)
        await self._check(connector_id, policy, target, "redirect", method)


def _parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:
        raise _Refused("bad-request", 400) from None
    request_line, *lines = text[:-4].split("\r\n")
    pieces = request_line.split(" ")
    if len(pieces) != 3 or pieces[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise _Refused("bad-request", 400)
    headers: list[tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name) or "\n" in value or "\r" in value:
            raise _Refused("bad-request", 400)
        headers.append((name, value.strip()))
    return pieces[0], pieces[1], headers


def _authority(authority: str, default_port: int | None) -> _Target:
    """``host:port`` (or ``[v6]:port``) -> a checked, normalised target, or `_Refused`."""
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _Refused("bad-request", 400)
        port_text = rest[1:]
        if _ip(host) is None:
            raise _Refused("bad-request", 400)
    else:
        host, _, port_text = authority.partition(":")
    host = host.lower().rstrip(".")
    if not port_text:
        if default_port is None:
            raise _Refused("bad-request", 400)
        port = default_port
    elif port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise _Refused("bad-request", 400)
    literal = _ip(host)
    if literal is not None:
        host = str(literal)
    elif not _HOST_NAME.match(host):
        raise _Refused("bad-request", 400)
    return _Target(host, port)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s connection and wait (bounded) until its socket is released."""
    writer.close()
    with contextlib.suppress(Exception, TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()


async def _splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            while chunk := await asyncio.wait_for(source.read(65536), IDLE_TIMEOUT):
                sink.write(chunk)
                await sink.drain()
        with contextlib.suppress(OSError):
            if sink.can_write_eof():
                sink.write_eof()

    await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
