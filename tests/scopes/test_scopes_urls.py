"""URL canonicalisation and the `url` operator: one strict parse, every trick refused."""

from __future__ import annotations

import pytest

from scopes import (
    CanonicalisationError,
    Constraints,
    canonical_url,
    check_arguments,
    parse_constraints,
)
from scopes.urls import parse_url

REFUSED = [
    ("http://127.0.0.1\\@example.com/", "backslash"),
    ("https://example.com\\foo", "backslash"),
    ("https://user@example.com/", "userinfo"),
    ("https://user:pw@example.com/", "userinfo"),
    ("https://example.com@evil.test/", "userinfo"),
    ("https://example.com:443@evil.test/", "userinfo"),
    (" https://example.com/", "leading or trailing whitespace"),
    ("https://example.com/ ", "leading or trailing whitespace"),
    ("https://example.com/\u3000", "leading or trailing whitespace"),
    ("https://exa\tmple.com/", "control characters, tabs or newlines"),
    ("https://example.com/a\nb", "control characters, tabs or newlines"),
    ("https://example.com/a\rb", "control characters, tabs or newlines"),
    ("https://example.com/\x00", "control characters"),
    ("https://example.com/a\x85b", "control characters"),
    ("https://\u200bexample.com/", "format"),
    ("https://example.com/\u202e", "format"),
    ("", "non-empty"),
    ("https://example.com/" + "a" * 8200, "8192"),
    ("example.com/a", "scheme"),
    ("//example.com/a", "scheme"),
    ("javascript:alert(1)", "http, https, ws, wss"),
    ("file:///etc/passwd", "http, https, ws, wss"),
    ("ftp://example.com/", "http, https, ws, wss"),
    ("https:example.com", "exactly '//'"),
    ("https:/example.com", "exactly '//'"),
    ("https:///example.com", "exactly '//'"),
    ("https://", "expected a host"),
    ("https://:443/", "expected a host"),
    ("https://./", "expected a host"),
    ("https://ex\u00e4mple.com/", "ASCII host"),
    ("https://example\uff0ecom/", "ASCII host"),
    ("https://example\u3002com/", "ASCII host"),
    ("https://\uff45xample.com/", "ASCII host"),
    ("https://exa%6dple.com/", "percent-encoding"),
    ("https://xn--zz.example/", "punycode"),
    ("https://xn--a.example/", "punycode"),
    ("https://example..com/", "labels"),
    ("https://-example.com/", "labels"),
    ("https://exa mple.com/", "labels"),
    ("https://example.com../", "labels"),
    ("https://" + "a." * 127 + "com/", "253"),
    ("https://example.com:0/", "between 1 and 65535"),
    ("https://example.com:65536/", "between 1 and 65535"),
    ("https://example.com:/", "decimal port"),
    ("https://example.com:https/", "decimal port"),
    ("https://example.com:-1/", "decimal port"),
    ("https://example.com:1:2/", "decimal port"),
    ("https://[::1/", "']'"),
    ("https://[::1]x/", "':' and a port"),
    ("https://[::g]/", "hex digits"),
    ("https://[1:2:3]/", "valid IPv6"),
    ("https://[fe80::1%25eth0]/", "hex digits"),
    ("https://[::ffff:127.0.0.01]/", "valid IPv6"),
    ("http://999.1.1.1/", "at most 255"),
    ("http://1.2.3.4.5/", "four parts"),
    ("http://1.2.3.256/", "fit the remaining bytes"),
    ("http://4294967296/", "fit the remaining bytes"),
    ("http://09.1.1.1/", "decimal, octal or hexadecimal"),
    ("http://0x1g.1/", "decimal, octal or hexadecimal"),
    ("http://1..2/", "no empty IPv4 parts"),
    ("http://example.0x/", "decimal, octal or hexadecimal"),
    ("http://example.123/", "decimal, octal or hexadecimal"),
]


@pytest.mark.parametrize(
    ("url", "reason"),
    REFUSED,
    ids=[
        "backslash-at-confusion",
        "backslash-in-path",
        "userinfo",
        "userinfo-with-password",
        "host-lookalike-userinfo",
        "port-lookalike-userinfo",
        "leading-space",
        "trailing-space",
        "trailing-ideographic-space",
        "tab-in-host",
        "newline-in-path",
        "carriage-return",
        "nul",
        "c1-control",
        "zero-width-space-in-host",
        "rtl-override-in-path",
        "empty",
        "too-long",
        "no-scheme",
        "scheme-relative",
        "javascript",
        "file",
        "ftp",
        "no-slashes",
        "one-slash",
        "three-slashes",
        "no-host",
        "port-without-host",
        "dot-host",
        "idn-u-label",
        "fullwidth-dot-host",
        "ideographic-dot-host",
        "fullwidth-letter-host",
        "percent-in-host",
        "bad-punycode",
        "punycode-to-control",
        "empty-label",
        "leading-hyphen",
        "space-in-host",
        "two-trailing-dots",
        "host-too-long",
        "port-zero",
        "port-too-big",
        "empty-port",
        "named-port",
        "negative-port",
        "two-colons",
        "unclosed-ipv6",
        "junk-after-ipv6",
        "bad-ipv6-chars",
        "short-ipv6",
        "ipv6-zone-id",
        "ipv6-embedded-leading-zero",
        "ipv4-part-over-255",
        "ipv4-five-parts",
        "ipv4-last-part-too-big",
        "ipv4-single-number-too-big",
        "ipv4-bad-octal",
        "ipv4-bad-hex",
        "ipv4-empty-part",
        "domain-ending-in-hex",
        "domain-ending-in-number",
    ],
)
def test_canonical_url_refuses_trick(url: str, reason: str) -> None:
    with pytest.raises(CanonicalisationError, match=reason) as caught:
        canonical_url(url)
    assert not url or url not in str(caught.value)


CANONICAL = [
    ("https://example.com/", "https://example.com/"),
    ("https://example.com", "https://example.com/"),
    ("HTTPS://Example.COM/A", "https://example.com/A"),
    ("https://example.com./x", "https://example.com/x"),
    ("https://example.com:443/", "https://example.com/"),
    ("http://example.com:80/", "http://example.com/"),
    ("wss://example.com:443/", "wss://example.com/"),
    ("https://example.com:08443/", "https://example.com:8443/"),
    ("https://example.com/a/./b/../c", "https://example.com/a/c"),
    ("https://example.com/a/%2e%2E/b", "https://example.com/b"),
    ("https://example.com/a/.%2e/b", "https://example.com/b"),
    ("https://example.com/a/..", "https://example.com/"),
    ("https://example.com/a/.", "https://example.com/a/"),
    ("https://example.com/../../x", "https://example.com/x"),
    ("https://example.com/a..b/c", "https://example.com/a..b/c"),
    ("https://example.com//a", "https://example.com//a"),
    ("https://example.com/a b", "https://example.com/a%20b"),
    ("https://example.com/\u00fc?q=\u00fc#\u00fc", "https://example.com/%C3%BC?q=%C3%BC#%C3%BC"),
    ("https://example.com/a^b`c{d}", "https://example.com/a%5Eb%60c%7Bd%7D"),
    ("https://example.com/?q='\"<>", "https://example.com/?q=%27%22%3C%3E"),
    ("https://example.com/#a`b", "https://example.com/#a%60b"),
    ("https://example.com/?", "https://example.com/?"),
    ("https://example.com/#", "https://example.com/#"),
    ("https://example.com/a%zz", "https://example.com/a%zz"),
    ("https://example.com?x=1", "https://example.com/?x=1"),
    ("https://example.com#f", "https://example.com/#f"),
    ("https://xn--bcher-kva.example/", "https://xn--bcher-kva.example/"),
    ("https://XN--BCHER-KVA.example/", "https://xn--bcher-kva.example/"),
    ("https://a_b.example.com/", "https://a_b.example.com/"),
    ("http://0x7f000001/", "http://127.0.0.1/"),
    ("http://2130706433/", "http://127.0.0.1/"),
    ("http://127.1/", "http://127.0.0.1/"),
    ("http://0177.0.0.1/", "http://127.0.0.1/"),
    ("http://0x7f.1/", "http://127.0.0.1/"),
    ("http://0X7F.0.0.1/", "http://127.0.0.1/"),
    ("http://127.0.0.1./", "http://127.0.0.1/"),
    ("http://0x/", "http://0.0.0.0/"),
    ("http://00/", "http://0.0.0.0/"),
    ("http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/"),
    ("http://[::1]/", "http://[::1]/"),
    ("http://[0:0:0:0:0:0:0:1]:8080/", "http://[::1]:8080/"),
    ("http://[2001:DB8:0:0:1:0:0:1]/", "http://[2001:db8::1:0:0:1]/"),
    ("http://[2001:db8:0:1:1:1:1:1]/", "http://[2001:db8:0:1:1:1:1:1]/"),
    ("http://[1:0:0:2:0:0:0:3]/", "http://[1:0:0:2::3]/"),
]


@pytest.mark.parametrize(
    ("url", "expected"),
    CANONICAL,
    ids=[
        "plain",
        "empty-path",
        "case",
        "trailing-dot",
        "default-https-port",
        "default-http-port",
        "default-wss-port",
        "port-leading-zero",
        "dot-segments",
        "encoded-dotdot",
        "half-encoded-dotdot",
        "dotdot-at-end",
        "dot-at-end",
        "dotdot-above-root",
        "dots-inside-name",
        "empty-segment-kept",
        "space-in-path",
        "non-ascii-path-query-fragment",
        "path-encode-set",
        "query-encode-set",
        "fragment-encode-set",
        "empty-query",
        "empty-fragment",
        "stray-percent-kept",
        "query-without-path",
        "fragment-without-path",
        "punycode-host",
        "punycode-host-upper",
        "underscore-host",
        "ipv4-hex-number",
        "ipv4-decimal-number",
        "ipv4-two-parts",
        "ipv4-octal",
        "ipv4-hex-part",
        "ipv4-upper-hex-prefix",
        "ipv4-trailing-dot",
        "ipv4-bare-hex-prefix",
        "ipv4-octal-zero",
        "ipv6-mapped",
        "ipv6-loopback",
        "ipv6-uncompressed",
        "ipv6-upper",
        "ipv6-single-zero-not-compressed",
        "ipv6-longest-zero-run",
    ],
)
def test_canonical_url_serialises_legit_url(url: str, expected: str) -> None:
    assert canonical_url(url) == expected
    assert canonical_url(expected) == expected


def _url_rule(**operand: object) -> Constraints:
    return parse_constraints(
        {"url": {"url": {"hosts": ["*"], "schemes": ["http", "https"], **operand}}}
    )


PUBLIC_ONLY = {"allow_ip_literals": True}
IP_VERDICTS = [
    ("http://127.0.0.1/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[64:ff9b::7f00:1]/", "loopback"),
    ("http://10.1.2.3/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[fc00::1]/", "private"),
    ("http://100.64.0.1/", "cgnat"),
    ("http://169.254.1.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://255.255.255.255/", "reserved"),
    ("http://[2002:7f00:1::]/", "reserved"),
    ("http://[2001::1]/", "reserved"),
    ("http://192.0.2.1/", "documentation"),
    ("http://[::ffff:0:7f00:1]/", "reserved"),
    ("http://[4000::1]/", "reserved"),
    ("http://[::127.0.0.1]/", "reserved"),
]


@pytest.mark.parametrize(
    ("url", "category"),
    IP_VERDICTS,
    ids=[
        "loopback",
        "loopback-hex",
        "loopback-decimal",
        "loopback-short",
        "loopback-octal",
        "ipv6-loopback",
        "ipv6-mapped-loopback",
        "nat64-loopback",
        "rfc1918-10",
        "rfc1918-172",
        "rfc1918-192",
        "ipv6-mapped-private",
        "ipv6-ula",
        "cgnat",
        "link-local",
        "ipv6-link-local",
        "multicast",
        "ipv6-multicast",
        "unspecified",
        "unspecified-number",
        "ipv6-unspecified",
        "broadcast",
        "6to4",
        "teredo",
        "documentation",
        "ipv4-translated",
        "outside-global-unicast",
        "ipv4-compatible",
    ],
)
def test_url_refuses_non_public_ip_unless_allow_private(url: str, category: str) -> None:
    refused = check_arguments(_url_rule(**PUBLIC_ONLY), {"url": url})
    assert [v.message for v in refused.violations] == [
        f"expected a public address, not a {category} one"
    ]
    allowed = check_arguments(
        _url_rule(allow_ip_literals=True, allow_private=True),
        {"url": url},
    )
    assert allowed.ok
    assert allowed.arguments["url"] == canonical_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://0xa9fea9fe/",
        "http://169.254.43518/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
    ],
    ids=["aws-v4", "aws-v4-hex", "aws-v4-two-parts", "aws-mapped", "aws-v6", "alibaba"],
)
def test_url_refuses_metadata_endpoints_even_with_allow_private(url: str) -> None:
    constraints = _url_rule(allow_ip_literals=True, allow_private=True)
    result = check_arguments(constraints, {"url": url})
    assert [v.message for v in result.violations] == [
        "expected an address other than a cloud metadata endpoint"
    ]


def test_url_allows_public_ip_literal_only_when_ip_literals_are_allowed() -> None:
    for url in ("http://8.8.8.8/", "http://[2606:4700::1111]/"):
        strict = check_arguments(parse_constraints({"u": {"url": {"hosts": ["*"]}}}), {"u": url})
        assert [v.message for v in strict.violations] == [
            "expected a URL with scheme among https"
        ] or not strict.ok
        https = url.replace("http:", "https:")
        refused = check_arguments(parse_constraints({"u": {"url": {"hosts": ["*"]}}}), {"u": https})
        assert refused.violations[0].message.endswith("not an IP address literal")
        assert check_arguments(_url_rule(allow_ip_literals=True), {"url": https}).ok


def test_url_ip_literal_needs_a_wildcard_or_an_exact_listing() -> None:
    constraints = parse_constraints(
        {"u": {"url": {"hosts": ["example.com", "8.8.4.4"], "allow_ip_literals": True}}}
    )
    assert check_arguments(constraints, {"u": "https://8.8.4.4/"}).ok
    assert check_arguments(constraints, {"u": "https://0x08080404/"}).ok
    refused = check_arguments(constraints, {"u": "https://8.8.8.8/"})
    assert refused.violations[0].message.endswith("not an IP address literal")


def test_url_exactly_listed_metadata_address_is_allowed() -> None:
    constraints = parse_constraints(
        {
            "u": {
                "url": {
                    "hosts": ["169.254.169.254"],
                    "allow_ip_literals": True,
                    "schemes": ["http"],
                }
            }
        }
    )
    assert check_arguments(constraints, {"u": "http://169.254.169.254/latest"}).ok


HOSTS = [
    ("https://example.com/", True),
    ("https://EXAMPLE.com./x", True),
    ("https://api.example.org/", True),
    ("https://a.b.example.org/", True),
    ("https://example.org/", False),
    ("https://evilexample.org/", False),
    ("https://example.org.evil.test/", False),
    ("https://example.com.evil.test/", False),
    ("https://www.example.com/", False),
    ("http://127.0.0.1\\@example.com/", False),
    ("https://example.com@evil.test/", False),
    ("https://evil.test#@example.com/", False),
    ("https://evil.test?@example.com/", False),
    ("https://evil.test/.example.org", False),
]


@pytest.mark.parametrize(
    ("url", "allowed"),
    HOSTS,
    ids=[
        "exact",
        "exact-case-and-trailing-dot",
        "wildcard-subdomain",
        "wildcard-deep-subdomain",
        "wildcard-excludes-apex",
        "wildcard-suffix-without-dot",
        "wildcard-as-prefix",
        "exact-as-prefix",
        "exact-excludes-subdomain",
        "backslash-at",
        "userinfo-lookalike",
        "fragment-at",
        "query-at",
        "path-lookalike",
    ],
)
def test_url_host_must_be_listed(url: str, allowed: bool) -> None:
    constraints = parse_constraints({"u": {"url": {"hosts": ["example.com", "*.example.org"]}}})
    assert check_arguments(constraints, {"u": url}).ok is allowed


def test_url_forwards_the_canonical_url() -> None:
    constraints = parse_constraints({"u": {"url": {"hosts": ["example.com"]}}})
    result = check_arguments(constraints, {"u": "HTTPS://Example.com.:443/a/../b c"})
    assert result.ok
    assert result.arguments == {"u": "https://example.com/b%20c"}


def test_url_schemes_default_to_https_only() -> None:
    constraints = parse_constraints({"u": {"url": {"hosts": ["example.com"]}}})
    result = check_arguments(constraints, {"u": "http://example.com/"})
    assert result.violations[0].message == "expected a URL with scheme among https"
    both = parse_constraints(
        {"u": {"url": {"hosts": ["example.com"], "schemes": ["http", "https"]}}}
    )
    assert check_arguments(both, {"u": "http://example.com/"}).ok


def test_url_ports_default_to_the_scheme_default() -> None:
    default = parse_constraints({"u": {"url": {"hosts": ["example.com"]}}})
    assert check_arguments(default, {"u": "https://example.com:443/"}).ok
    refused = check_arguments(default, {"u": "https://example.com:8443/"})
    assert refused.violations[0].message == "expected the scheme's default port"
    listed = parse_constraints({"u": {"url": {"hosts": ["example.com"], "ports": [8443]}}})
    assert check_arguments(listed, {"u": "https://example.com:8443/"}).ok
    refused = check_arguments(listed, {"u": "https://example.com/"})
    assert refused.violations[0].message == "expected a port among 8443"


def test_url_refuses_localhost_names_unless_allow_private() -> None:
    constraints = parse_constraints({"u": {"url": {"hosts": ["*"]}}})
    for url in ("https://localhost/", "https://LOCALHOST./", "https://api.localhost/"):
        result = check_arguments(constraints, {"u": url})
        assert result.violations[0].message == "expected a public host name, not a loopback one"
    private = parse_constraints({"u": {"url": {"hosts": ["localhost"], "allow_private": True}}})
    assert check_arguments(private, {"u": "https://localhost/"}).ok


def test_url_refuses_a_non_string_value() -> None:
    constraints = parse_constraints({"u": {"url": {"hosts": ["*"]}}})
    result = check_arguments(constraints, {"u": ["https://example.com/"]})
    assert result.violations[0].message == "expected a string URL"


def test_parse_url_reports_effective_port() -> None:
    assert parse_url("https://example.com/").effective_port == 443
    assert parse_url("ws://example.com:9000/").effective_port == 9000
