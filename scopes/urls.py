"""URL canonicalisation and host rules (`url`): one strict WHATWG-style parse. Pure; no I/O.

Only `http`, `https`, `ws` and `wss` URLs of the form `scheme://host[:port][/path][?query][#frag]`
are accepted. Decisions where WHATWG is lenient and we refuse: userinfo (any `@` in the
authority), a backslash anywhere, leading or trailing whitespace, control characters, tabs and
newlines anywhere, Unicode format characters, a missing or extra `/` after `scheme:`, an empty
port (`host:`), port 0, `%` in the host, and non-ASCII hosts: the stdlib codec is IDNA2003, which
maps some names (`ß`, `ς`, ZWJ) differently from the UTS-46 processing browsers and HTTP clients
use, so a Unicode host could be checked as one name and fetched as another. Hosts must come in
A-label form (`xn--...`); each such label must round-trip through punycode to an NFC, lowercase
name without control, format, separator or `.`/`/` characters.

Kept from WHATWG: scheme and host are lowercased; one trailing dot of the host is dropped; a host
ending in a number is an IPv4 address in any WHATWG encoding (`0x7f000001`, `2130706433`,
`127.1`, `0177.0.0.1`) and is serialised dotted-decimal; IPv6 literals are serialised compressed
and lowercase; a default port is dropped; `.`/`..` path segments (also as `%2e`) are resolved;
non-ASCII and unsafe characters in path, query and fragment are percent-encoded as UTF-8, and
existing `%XX` sequences are left as they are. URLs longer than 8192 characters are refused.
Names resolving to private addresses (DNS rebinding) cannot be seen here: egress must check the
resolved address too.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

from scopes.errors import CanonicalisationError

__all__ = [
    "DEFAULT_PORTS",
    "HostPattern",
    "ParsedUrl",
    "canonical_url",
    "ip_category",
    "parse_host_pattern",
    "parse_url",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_MAX_URL = 8192
_MAX_HOST = 253
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_REFUSED_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
_DIGITS = {8: re.compile(r"[0-7]*"), 10: re.compile(r"[0-9]*"), 16: re.compile(r"[0-9A-Fa-f]*")}
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_PATH_ENCODE = frozenset(' "<>`{}^')
_QUERY_ENCODE = frozenset(" \"<>'")
_FRAGMENT_ENCODE = frozenset(' "<>`')
# Already canonical and plain (the common case): lowercase scheme and LDH host whose last label
# starts with a letter, no port, path without '%' or any segment starting with '.', safe query
# and fragment. Anything else takes the full parse; both must agree (a property test checks).
_PLAIN = re.compile(
    r"(https?|wss?)://"
    r"((?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z](?:[a-z0-9_-]{0,61}[a-z0-9_])?)"
    r"(/[!$&-;=@-\[\]_a-z|~]*)"
    r"(?:\?[!$-&(-;=?-\[\]-~]*)?"
    r"(?:#[!#-;=?-\[\]-_a-z{-~]*)?"
)
_DOUBLE_DOT = frozenset({"..", ".%2e", "%2e.", "%2e%2e"})
_SINGLE_DOT = frozenset({".", "%2e"})


class ParsedUrl(NamedTuple):
    """A URL that passed the parse; `url` is its canonical serialisation.

    A NamedTuple rather than a dataclass: one is built per checked URL, and this is cheaper.
    """

    url: str
    scheme: str
    host: str
    ip: IPAddress | None
    port: int | None
    path: str

    @property
    def effective_port(self) -> int:
        """The explicit port, or the scheme's default."""
        return DEFAULT_PORTS[self.scheme] if self.port is None else self.port


def canonical_url(url: str) -> str:
    """Return the canonical serialisation of `url`.

    Raises:
        CanonicalisationError: the URL is outside the accepted subset; the message says what was
            expected and never repeats the URL.
    """
    return parse_url(url).url


def parse_url(url: str) -> ParsedUrl:
    """Parse `url` once, strictly; see the module docstring for what is refused.

    Raises:
        CanonicalisationError: the URL is outside the accepted subset.
    """
    plain = _PLAIN.fullmatch(url)
    if (
        plain is not None
        and len(url) <= _MAX_URL
        and len(plain.group(2)) <= _MAX_HOST
        and "xn--" not in url
        and "/." not in plain.group(3)
    ):
        scheme, host, path = plain.group(1, 2, 3)
        return ParsedUrl(url, scheme, host, None, None, path)
    return _parse_url_slow(url)


def _parse_url_slow(url: str) -> ParsedUrl:
    if not url:
        raise CanonicalisationError("expected a non-empty URL")
    if len(url) > _MAX_URL:
        raise CanonicalisationError(f"expected a URL of at most {_MAX_URL} characters")
    if url[0].isspace() or url[-1].isspace():
        raise CanonicalisationError("expected a URL without leading or trailing whitespace")
    bad = _REFUSED_CHARS.search(url)
    if bad is not None:
        if bad.group() == "\\":
            raise CanonicalisationError("expected a URL without backslashes")
        raise CanonicalisationError("expected a URL without control characters, tabs or newlines")
    if not url.isascii():
        for char in url:
            if unicodedata.category(char) in _REFUSED_CATEGORIES:
                raise CanonicalisationError(
                    "expected a URL without format, private-use or unassigned characters"
                )
    match = _SCHEME.match(url)
    if match is None:
        raise CanonicalisationError("expected a URL starting with a scheme such as 'https:'")
    scheme = match.group()[:-1].lower()
    if scheme not in DEFAULT_PORTS:
        raise CanonicalisationError("expected a scheme among http, https, ws, wss")
    rest = url[match.end() :]
    if not rest.startswith("//") or rest[2:3] == "/":
        raise CanonicalisationError("expected exactly '//' and a host after the scheme")
    rest = rest[2:]
    end = len(rest)
    for delimiter in "/?#":
        found = rest.find(delimiter)
        if found != -1 and found < end:
            end = found
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        raise CanonicalisationError("expected a URL without userinfo ('@' in the authority)")
    host, ip, port = _parse_authority(authority, scheme)
    path, query, fragment = _split_tail(tail)
    serialised = f"{scheme}://{host}" + ("" if port is None else f":{port}") + path
    if query is not None:
        serialised += "?" + query
    if fragment is not None:
        serialised += "#" + fragment
    return ParsedUrl(serialised, scheme, host, ip, port, path)


def _parse_authority(authority: str, scheme: str) -> tuple[str, IPAddress | None, int | None]:
    port_text: str | None = None
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise CanonicalisationError("expected ']' closing the IPv6 address")
        after = authority[close + 1 :]
        if after:
            if not after.startswith(":"):
                raise CanonicalisationError("expected ':' and a port after the IPv6 address")
            port_text = after[1:]
        ip6 = _parse_ipv6(authority[1:close])
        host, ip = f"[{_serialise_ipv6(ip6)}]", ip6
    else:
        host_text, colon, port_part = authority.partition(":")
        if colon:
            port_text = port_part
        host, ip = _parse_host(host_text)
    port: int | None = None
    if port_text is not None:
        if _PORT.fullmatch(port_text) is None:
            raise CanonicalisationError("expected a decimal port after ':'")
        port = int(port_text)
        if not 0 < port <= 65535:
            raise CanonicalisationError("expected a port between 1 and 65535")
        if port == DEFAULT_PORTS[scheme]:
            port = None
    return host, ip, port


def _parse_host(text: str) -> tuple[str, IPAddress | None]:
    if not text:
        raise CanonicalisationError("expected a host")
    if not text.isascii():
        raise CanonicalisationError(
            "expected an ASCII host (IDNA names in 'xn--' form); non-ASCII hosts are refused"
        )
    if "%" in text:
        raise CanonicalisationError("expected a host without percent-encoding")
    host = text.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise CanonicalisationError("expected a host")
    if len(host) > _MAX_HOST:
        raise CanonicalisationError(f"expected a host of at most {_MAX_HOST} characters")
    labels = host.split(".")
    if _ends_in_number(labels[-1]):
        ip4 = ipaddress.IPv4Address(_parse_ipv4(labels))
        return str(ip4), ip4
    for label in labels:
        if _LABEL.fullmatch(label) is None:
            raise CanonicalisationError(
                "expected a host of dot-separated labels of letters, digits, '-' and '_'"
            )
        if label.startswith("xn--"):
            _check_a_label(label)
    return host, None


def _check_a_label(label: str) -> None:
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except UnicodeError:
        decoded = ""
    if (
        not decoded
        or decoded.isascii()
        or decoded.encode("punycode").decode("ascii") != label[4:]
        or unicodedata.normalize("NFC", decoded) != decoded
        or decoded.lower() != decoded
        or any(unicodedata.category(char)[0] in "CZ" or char in "./" for char in decoded)
    ):
        raise CanonicalisationError("expected 'xn--' host labels to be valid punycode")


def _ends_in_number(label: str) -> bool:
    if label.isdigit():
        return True
    return label[:2] in ("0x", "0X") and _DIGITS[16].fullmatch(label, 2) is not None


def _parse_ipv4(parts: list[str]) -> int:
    """WHATWG IPv4 parser over labels (trailing empty label already removed)."""
    if len(parts) > 4:
        raise CanonicalisationError("expected an IPv4 address of at most four parts")
    numbers = [_ipv4_number(part) for part in parts]
    if any(number > 255 for number in numbers[:-1]):
        raise CanonicalisationError("expected IPv4 parts before the last to be at most 255")
    if numbers[-1] >= 256 ** (5 - len(numbers)):
        raise CanonicalisationError("expected the last IPv4 part to fit the remaining bytes")
    value = numbers[-1]
    for index, number in enumerate(numbers[:-1]):
        value += number * 256 ** (3 - index)
    return value


def _ipv4_number(part: str) -> int:
    if not part:
        raise CanonicalisationError("expected no empty IPv4 parts")
    radix, digits = 10, part
    if part[:2] in ("0x", "0X"):
        radix, digits = 16, part[2:]
    elif len(part) > 1 and part[0] == "0":
        radix, digits = 8, part[1:]
    if _DIGITS[radix].fullmatch(digits) is None:
        raise CanonicalisationError("expected IPv4 parts in decimal, octal or hexadecimal")
    return int(digits, radix) if digits else 0


def _parse_ipv6(text: str) -> ipaddress.IPv6Address:
    if _IPV6_CHARS.fullmatch(text) is None:
        raise CanonicalisationError("expected an IPv6 address of hex digits, ':' and '.'")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise CanonicalisationError("expected a valid IPv6 address") from None


def _serialise_ipv6(address: ipaddress.IPv6Address) -> str:
    value = int(address)
    groups = [(value >> (112 - 16 * index)) & 0xFFFF for index in range(8)]
    best_start, best_length, index = -1, 1, 0
    while index < 8:
        if groups[index] == 0:
            start = index
            while index < 8 and groups[index] == 0:
                index += 1
            if index - start > best_length:
                best_start, best_length = start, index - start
        else:
            index += 1
    if best_start == -1:
        return ":".join(f"{group:x}" for group in groups)
    head = ":".join(f"{group:x}" for group in groups[:best_start])
    tail = ":".join(f"{group:x}" for group in groups[best_start + best_length :])
    return f"{head}::{tail}"


def _split_tail(tail: str) -> tuple[str, str | None, str | None]:
    fragment: str | None = None
    query: str | None = None
    if "#" in tail:
        tail, fragment = tail.split("#", 1)
        fragment = _encode(fragment, _FRAGMENT_ENCODE)
    if "?" in tail:
        tail, query = tail.split("?", 1)
        query = _encode(query, _QUERY_ENCODE)
    return _canonical_url_path(tail), query, fragment


def _canonical_url_path(path: str) -> str:
    segments = path[1:].split("/") if path else [""]
    out: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        lowered = segment.lower()
        if lowered in _DOUBLE_DOT:
            if out:
                out.pop()
            if index == last:
                out.append("")
        elif lowered in _SINGLE_DOT:
            if index == last:
                out.append("")
        else:
            out.append(_encode(segment, _PATH_ENCODE))
    return "/" + "/".join(out)


def _encode(text: str, encode_set: frozenset[str]) -> str:
    if text.isascii() and not any(char in encode_set for char in text):
        return text
    out: list[str] = []
    for char in text:
        if char in encode_set or not char.isascii():
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
        else:
            out.append(char)
    return "".join(out)


_V4_NETWORKS: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), category)
    for net, category in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_V6_NETWORKS: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), category)
    for net, category in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "reserved"),
        ("64:ff9b:1::/48", "reserved"),
        ("100::/64", "reserved"),
        ("2001::/23", "reserved"),
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "reserved"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)
# Outside 2000::/3 nothing is global unicast (the ranges above name the common exceptions).
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_EMBEDS_V4 = (ipaddress.IPv6Network("::ffff:0:0/96"), ipaddress.IPv6Network("64:ff9b::/96"))
_METADATA = frozenset(
    {
        ipaddress.IPv4Address("169.254.169.254"),
        ipaddress.IPv4Address("169.254.170.2"),
        ipaddress.IPv4Address("100.100.100.200"),
        ipaddress.IPv6Address("fd00:ec2::254"),
    }
)


def ip_category(address: IPAddress) -> str | None:
    """Name the non-public range `address` falls in (`metadata`, `loopback`, ...), or None.

    IPv4-mapped (`::ffff:0:0/96`) and NAT64 (`64:ff9b::/96`) addresses are judged by the IPv4
    address they carry; any other IPv6 address outside global unicast (`2000::/3`) is reserved.
    """
    if address in _METADATA:
        return "metadata"
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in net for net in _EMBEDS_V4):
            return ip_category(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        for net6, category in _V6_NETWORKS:
            if address in net6:
                return category
        return None if address in _GLOBAL_UNICAST else "reserved"
    for net4, category in _V4_NETWORKS:
        if address in net4:
            return category
    return None


def is_local_name(host: str) -> bool:
    """Whether domain `host` is `localhost` or below it (RFC 6761: always loopback)."""
    return host == "localhost" or host.endswith(".localhost")


@dataclass(frozen=True, slots=True)
class HostPattern:
    """One `hosts` entry: `kind` is `exact`, `suffix` (`*.x` -> `.x`), `any` (`*`) or `ip`."""

    kind: str
    value: str
    ip: IPAddress | None = None


def parse_host_pattern(entry: str) -> HostPattern:
    """Parse one `hosts` entry of a `url` constraint.

    Raises:
        CanonicalisationError: the entry is not a host, `*.host`, `*` or an IP literal.
    """
    if entry == "*":
        return HostPattern("any", "*")
    wildcard = entry.startswith("*.")
    probe = entry[2:] if wildcard else entry
    if "*" in probe:
        raise CanonicalisationError("expected '*' only as a whole leading label ('*.example.com')")
    parsed = parse_url(f"https://{probe}/")
    if ":" in probe.rpartition("]")[2] or parsed.url != f"https://{parsed.host}/":
        raise CanonicalisationError("expected a bare host without port or path")
    if parsed.ip is not None:
        if wildcard:
            raise CanonicalisationError("expected a domain name after '*.'")
        return HostPattern("ip", parsed.host, parsed.ip)
    if wildcard:
        return HostPattern("suffix", "." + parsed.host)
    return HostPattern("exact", parsed.host)
