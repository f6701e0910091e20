"""Property tests: canonical forms are stable, containment is component-wise, hosts stay listed."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import string
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from scopes import (
    CanonicalisationError,
    canonical_path,
    canonical_url,
    check_arguments,
    parse_constraints,
)
from scopes.paths import _canonical_path_slow, path_components  # pyright: ignore[reportPrivateUsage]
from scopes.urls import _parse_url_slow, parse_url  # pyright: ignore[reportPrivateUsage]

SEGMENT = st.sampled_from(
    [
        "",
        ".",
        "..",
        "ws",
        "ws_evil",
        "srv",
        "a",
        "b c",
        "%2e",
        "%2F",
        "%",
        "\\",
        "~",
        "\x00",
        "\t",
        "\uff0f",
        "\u2215",
        "\u2024",
        "cafe\u0301",
        "caf\u00e9",
        "\ufb01",
        "...",
        "ws.",
        "\u200b",
    ]
) | st.text(max_size=4)
PATHS = st.builds(
    lambda lead, segments: lead + "/".join(segments),
    st.sampled_from(["/", "//", "", "~", "./", "/srv/ws/"]),
    st.lists(SEGMENT, max_size=8),
)
ROOTS = st.sampled_from(["/", "/srv", "/srv/ws", "/srv/ws/a", "/srv/ws_evil"])


def _canonical_or_none(path: str) -> str | None:
    try:
        return canonical_path(path)
    except CanonicalisationError:
        return None


@settings(max_examples=250, deadline=None)
@given(PATHS)
def test_accepted_paths_are_canonical_idempotent_and_clean(path: str) -> None:
    canonical = _canonical_or_none(path)
    if canonical is None:
        return
    assert canonical_path(canonical) == canonical
    assert canonical.startswith("/")
    assert not {"", ".", ".."} & set(path_components(canonical))
    assert unicodedata.is_normalized("NFC", canonical)
    assert unicodedata.normalize("NFKC", canonical) == canonical
    assert "\\" not in canonical
    assert re.search("%[0-9A-Fa-f]{2}", canonical) is None
    assert all(unicodedata.category(char)[0] != "C" for char in canonical)


@settings(max_examples=250, deadline=None)
@given(PATHS | st.text(max_size=30))
def test_path_fast_path_agrees_with_the_full_canonicaliser(path: str) -> None:
    try:
        slow: str | None = _canonical_path_slow(path)
    except CanonicalisationError:
        slow = None
    assert _canonical_or_none(path) == slow


@settings(max_examples=250, deadline=None)
@given(PATHS, ROOTS)
def test_within_holds_exactly_when_components_start_with_the_root(path: str, root: str) -> None:
    result = check_arguments(parse_constraints({"p": {"within": root}}), {"p": path})
    canonical = _canonical_or_none(path)
    if canonical is None:
        assert not result.ok
        return
    components = path_components(canonical)
    root_components = path_components(root)
    inside = components[: len(root_components)] == root_components
    assert result.ok is inside
    if inside:
        assert result.arguments == {"p": canonical}


@settings(max_examples=250, deadline=None)
@given(st.text(max_size=40))
def test_canonicalisers_only_ever_raise_canonicalisation_error(text: str) -> None:
    for canonicalise in (canonical_path, canonical_url):
        for candidate in (text, "/" + text, "https://" + text):
            with contextlib.suppress(CanonicalisationError):
                canonicalise(candidate)


LABEL = st.sampled_from(
    [
        "example",
        "EXAMPLE",
        "com",
        "org",
        "api",
        "evil",
        "localhost",
        "0x7f",
        "127",
        "1",
        "0",
        "077",
        "255",
        "4294967295",
        "xn--bcher-kva",
        "xn--zz",
        "a_b",
        "-x",
        "",
        "ex\u00e4mple",
        "%41",
        "exa mple",
    ]
)
HOST = st.one_of(
    st.builds(
        lambda labels, dot: ".".join(labels) + dot,
        st.lists(LABEL, min_size=1, max_size=4),
        st.sampled_from(["", "."]),
    ),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip.exploded.upper()}]"),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=4).map(lambda ip: str(int(ip))),
    st.ip_addresses(v=4).map(lambda ip: hex(int(ip))),
)
URL_SEGMENT = st.sampled_from(
    ["", ".", "..", "%2e", "%2E%2e", ".%2e", "a", "b c", "\u00fc", "^", "%zz", "x", "a..b", "{}"]
)
URLS = st.builds(
    lambda scheme, slashes, userinfo, host, port, segments, query, fragment: (
        f"{scheme}:{slashes}{userinfo}{host}{port}"
        + ("/" + "/".join(segments) if segments is not None else "")
        + query
        + fragment
    ),
    st.sampled_from(["http", "https", "HTTPS", "Https", "ws", "wss", "ftp"]),
    st.sampled_from(["//", "//", "//", "/", "///", "\\\\"]),
    st.sampled_from(["", "", "", "user@", "a:b@"]),
    HOST,
    st.sampled_from(["", "", ":", ":0", ":443", ":80", ":8443", ":65536", ":08443"]),
    st.none() | st.lists(URL_SEGMENT, max_size=5),
    st.sampled_from(["", "?", "?q=1", "?q=a b", "?\u00fc", "?a'b"]),
    st.sampled_from(["", "#", "#f", "#a`b", "#@evil.test"]),
)


def _parsed_or_none(url: str) -> object:
    try:
        return parse_url(url)
    except CanonicalisationError:
        return None


@settings(max_examples=250, deadline=None)
@given(URLS)
def test_accepted_urls_reparse_to_the_same_canonical_url(url: str) -> None:
    parsed = _parsed_or_none(url)
    try:
        slow: object = _parse_url_slow(url)
    except CanonicalisationError:
        slow = None
    assert parsed == slow
    if parsed is None:
        return
    canonical = canonical_url(url)
    assert canonical_url(canonical) == canonical
    assert parse_url(canonical) == parsed
    assert canonical == canonical.strip()
    assert "@" not in canonical.split("/")[2]
    assert "\\" not in canonical


@settings(max_examples=250, deadline=None)
@given(URLS)
def test_urls_passing_the_constraint_have_a_listed_host(url: str) -> None:
    constraints = parse_constraints({"u": {"url": {"hosts": ["example.com", "*.example.org"]}}})
    result = check_arguments(constraints, {"u": url})
    if not result.ok:
        return
    checked = result.arguments["u"]
    assert isinstance(checked, str)
    parsed = parse_url(checked)
    assert parsed.scheme == "https"
    assert parsed.ip is None
    assert parsed.host == "example.com" or parsed.host.endswith(".example.org")
    assert parsed.effective_port == 443


def _format_part(value: int, radix: int, upper: bool) -> str:
    if radix == 16:
        digits = f"{value:x}" if value else ""
        return ("0X" if upper else "0x") + (digits.upper() if upper else digits)
    if radix == 8:
        return "0" + f"{value:o}"
    return str(value)


@settings(max_examples=250, deadline=None)
@given(
    st.integers(min_value=1, max_value=4).flatmap(
        lambda count: st.tuples(
            st.lists(st.integers(0, 300), min_size=count - 1, max_size=count - 1),
            st.integers(0, 2**32 + 5),
            st.lists(st.sampled_from([8, 10, 16]), min_size=count, max_size=count),
            st.booleans(),
            st.booleans(),
        )
    )
)
def test_ipv4_numbers_in_any_encoding_decode_to_the_generated_address(
    case: tuple[list[int], int, list[int], bool, bool],
) -> None:
    leading, last, radixes, upper, trailing_dot = case
    parts = [*leading, last]
    host = ".".join(_format_part(v, r, upper) for v, r in zip(parts, radixes, strict=True))
    host += "." if trailing_dot else ""
    remaining = 5 - len(parts)
    valid = all(v <= 255 for v in leading) and last < 256**remaining
    try:
        parsed = parse_url(f"http://{host}/")
    except CanonicalisationError:
        assert not valid
        return
    assert valid
    expected = ipaddress.IPv4Address(bytes(leading) + last.to_bytes(remaining, "big"))
    assert parsed.ip == expected
    assert parsed.host == str(expected)


_REFERENCE_PART = re.compile(r"0[xX](?P<hex>[0-9a-fA-F]*)|0(?P<oct>[0-7]+)|(?P<dec>[1-9][0-9]*|0)")


def _reference_ipv4(host: str) -> int | None:
    """An independent reading of the WHATWG IPv4 parser, for hosts that end in a number."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    numbers: list[int] = []
    for part in parts:
        match = _REFERENCE_PART.fullmatch(part)
        if match is None:
            return None
        if match["hex"] is not None:
            numbers.append(int(match["hex"] or "0", 16))
        elif match["oct"] is not None:
            numbers.append(int(match["oct"], 8))
        else:
            numbers.append(int(match["dec"]))
    if len(numbers) > 4 or any(n > 255 for n in numbers[:-1]):
        return None
    size = 5 - len(numbers)
    if numbers[-1] >= 1 << (8 * size):
        return None
    packed = bytes(numbers[:-1]) + numbers[-1].to_bytes(size, "big")
    return int.from_bytes(packed, "big")


@settings(max_examples=250, deadline=None)
@given(st.text(alphabet="0123456789abcdefxX.", min_size=1, max_size=24))
def test_ipv4_parsing_agrees_with_an_independent_reference(host: str) -> None:
    reference = _reference_ipv4(host)
    parsed = _parsed_or_none(f"http://{host}/")
    ip = getattr(parsed, "ip", None)
    if reference is not None:
        assert ip == ipaddress.IPv4Address(reference)
    else:
        assert ip is None


VALUE_CONSTRAINTS = parse_constraints(
    {
        "a": {"one_of": ["x"]},
        "b": {"pattern": "[0-9]+", "max_length": 3, "no_flag": True},
        "c": {"within": "/srv"},
        "d": {"url": {"hosts": ["example.com"]}},
        "e": {"range": {"min": 0, "max": 1}},
    }
)


@settings(max_examples=250, deadline=None)
@given(st.text(alphabet=string.printable + "\u00e9\u2215\uff0f", max_size=20))
def test_violation_messages_never_repeat_the_argument(text: str) -> None:
    value = "Zq" + text
    arguments = {
        "a": value,
        "b": "-" + value,
        "c": "/etc/" + value,
        "d": f"https://{value}/",
        "e": value,
    }
    result = check_arguments(VALUE_CONSTRAINTS, arguments)
    assert len(result.violations) >= 5
    for violation in result.violations:
        assert "Zq" not in violation.message


@settings(max_examples=200, deadline=None)
@given(st.lists(PATHS, max_size=4), URLS)
def test_checking_the_canonical_arguments_again_changes_nothing(paths: list[str], url: str) -> None:
    constraints = parse_constraints(
        {
            "paths[*]": {"within": "/"},
            "url": {"url": {"hosts": ["*"], "schemes": ["http", "https"]}},
        }
    )
    first = check_arguments(constraints, {"paths": list(paths), "url": url})
    if not first.ok:
        return
    second = check_arguments(constraints, first.arguments)
    assert second.ok
    assert second.arguments == first.arguments
