"""Path canonicalisation and `within` containment: every trick refused, legit paths canonical."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from scopes import CanonicalisationError, canonical_path, check_arguments, parse_constraints

REFUSED = [
    ("srv/workspace/a", "absolute"),
    ("", "absolute"),
    ("./a", "absolute"),
    ("~/notes.txt", "absolute"),
    ("~root/.ssh/id_rsa", "absolute"),
    ("/..", "climb"),
    ("/srv/../../etc/passwd", "climb"),
    ("/srv/workspace/a\x00b", "control"),
    ("/srv/workspace\\..\\etc", "backslash"),
    ("/srv/workspace/\\", "backslash"),
    ("/srv/workspace/%2e%2e/etc", "percent"),
    ("/srv/workspace/%2E%2E/etc", "percent"),
    ("/srv/workspace%2fetc", "percent"),
    ("/srv/workspace/a%00", "percent"),
    ("/srv/workspace/a\nb", "control"),
    ("/srv/workspace/a\tb", "control"),
    ("/srv/workspace/a\x7fb", "control"),
    ("/srv/workspace/a\x85b", "control, format"),
    ("/srv/workspace/a\u202eb", "control, format"),
    ("/srv/workspace/a\u200bb", "control, format"),
    ("/srv/workspace/a\ud800b", "control, format"),
    ("/srv/workspace/a\u2028b", "control, format"),
    ("/srv/workspace\uff0f..\uff0fetc", "look like"),
    ("/srv/workspace\u2215..\u2215etc", "look like"),
    ("/srv/workspace\u2044etc", "look like"),
    ("/srv/workspace/\u2024\u2024/etc", "look like"),
    ("/srv/workspace/\uff0e\uff0e/etc", "look like"),
    ("/srv/workspace/\ufe52\ufe52/etc", "look like"),
    ("/srv/workspace/\u3002\u3002/etc", "look like"),
    ("/srv/workspace/\ufb01le", "compatibility"),
    ("/srv/workspace/\uff41", "compatibility"),
    ("/srv/" + "a" * 256, "255 bytes"),
    ("/srv/" + "\u00e9" * 128, "255 bytes"),
    ("/" + "/".join(["a" * 200] * 21), "4096 bytes"),
]


@pytest.mark.parametrize(
    ("path", "reason"),
    REFUSED,
    ids=[
        "relative",
        "empty",
        "dot-relative",
        "tilde",
        "tilde-user",
        "dotdot-above-root",
        "dotdot-climbs-out",
        "nul",
        "backslash-separators",
        "trailing-backslash",
        "percent-dotdot",
        "percent-dotdot-upper",
        "percent-slash",
        "percent-nul",
        "newline",
        "tab",
        "del",
        "c1-next-line",
        "rtl-override",
        "zero-width-space",
        "lone-surrogate",
        "line-separator",
        "fullwidth-solidus",
        "division-slash",
        "fraction-slash",
        "one-dot-leader",
        "fullwidth-full-stop",
        "small-full-stop",
        "ideographic-full-stop",
        "ligature",
        "fullwidth-letter",
        "long-component",
        "long-component-multibyte",
        "long-path",
    ],
)
def test_canonical_path_refuses_trick(path: str, reason: str) -> None:
    with pytest.raises(CanonicalisationError, match=reason) as caught:
        canonical_path(path)
    assert not path or path not in str(caught.value)


ACCEPTED = [
    ("/srv/workspace/a.txt", "/srv/workspace/a.txt"),
    ("/srv/workspace/./a//b/", "/srv/workspace/a/b"),
    ("/srv/workspace/a/../b", "/srv/workspace/b"),
    ("/", "/"),
    ("//", "/"),
    ("/.", "/"),
    ("/srv/workspace/cafe\u0301", "/srv/workspace/caf\u00e9"),
    ("/srv/workspace/100%", "/srv/workspace/100%"),
    ("/srv/workspace/50%zz", "/srv/workspace/50%zz"),
    ("/srv/workspace/a b", "/srv/workspace/a b"),
    ("/srv/workspace/...", "/srv/workspace/..."),
    ("/srv/workspace/~", "/srv/workspace/~"),
    ("/srv/workspace/日本語.txt", "/srv/workspace/日本語.txt"),
    ("/srv/workspace/.hidden", "/srv/workspace/.hidden"),
]


@pytest.mark.parametrize(
    ("path", "expected"),
    ACCEPTED,
    ids=[
        "plain",
        "dot-and-double-slash-and-trailing-slash",
        "dotdot-inside",
        "root",
        "double-slash-root",
        "dot-root",
        "nfd-becomes-nfc",
        "lone-percent",
        "percent-without-hex",
        "space",
        "three-dots-is-a-name",
        "tilde-component",
        "cjk",
        "hidden-file",
    ],
)
def test_canonical_path_accepts_legit_path_in_canonical_form(path: str, expected: str) -> None:
    assert canonical_path(path) == expected
    assert canonical_path(expected) == expected


WITHIN = [
    ("/srv/ws", True),
    ("/srv/ws/", True),
    ("/srv/ws/a/b", True),
    ("/srv/ws/a/../b", True),
    ("/srv/ws_evil", False),
    ("/srv/ws_evil/x", False),
    ("/srv/wsx", False),
    ("/srv/ws/../ws_evil/x", False),
    ("/srv/ws/../../etc/passwd", False),
    ("/srv", False),
    ("/srv/w", False),
    ("/srv/ws/../ws/ok", True),
]


@pytest.mark.parametrize(
    ("path", "allowed"),
    WITHIN,
    ids=[
        "root-itself",
        "root-with-slash",
        "below",
        "dotdot-stays-inside",
        "sibling-prefix",
        "sibling-prefix-below",
        "longer-name",
        "dotdot-to-sibling",
        "dotdot-out",
        "parent",
        "shorter-name",
        "dotdot-back-in",
    ],
)
def test_within_compares_whole_components(path: str, allowed: bool) -> None:
    constraints = parse_constraints({"path": {"within": "/srv/ws"}})
    result = check_arguments(constraints, {"path": path})
    assert result.ok is allowed
    if not allowed:
        assert [(v.path, v.operator) for v in result.violations] == [("path", "within")]


def test_within_accepts_any_of_several_roots() -> None:
    constraints = parse_constraints({"path": {"within": ["/srv/a", "/srv/b/"]}})
    assert check_arguments(constraints, {"path": "/srv/b/x"}).ok
    assert check_arguments(constraints, {"path": "/srv/a"}).ok
    assert not check_arguments(constraints, {"path": "/srv/c"}).ok


def test_within_root_slash_allows_every_absolute_path() -> None:
    constraints = parse_constraints({"path": {"within": "/"}})
    assert check_arguments(constraints, {"path": "/etc/passwd"}).ok
    assert not check_arguments(constraints, {"path": "etc/passwd"}).ok


def test_within_forwards_the_canonical_path() -> None:
    constraints = parse_constraints({"path": {"within": "/srv/ws"}})
    result = check_arguments(constraints, {"path": "/srv/ws/./a//b/../c/"})
    assert result.ok
    assert result.arguments == {"path": "/srv/ws/a/c"}


def test_within_refuses_a_number_where_a_path_is_expected() -> None:
    constraints = parse_constraints({"path": {"within": "/srv/ws"}})
    result = check_arguments(constraints, {"path": 3})
    assert [v.message for v in result.violations] == ["expected a string path"]


def _fake_realpath(links: dict[str, str]) -> Callable[[str], str]:
    def realpath(path: str) -> str:
        if path in links:
            return links[path]
        if path.startswith("/missing"):
            raise FileNotFoundError(path)
        return path

    return realpath


def test_realpath_hook_refuses_a_symlink_leaving_the_root() -> None:
    constraints = parse_constraints({"path": {"within": "/srv/ws"}})
    realpath = _fake_realpath({"/srv/ws/link": "/etc/passwd"})
    result = check_arguments(constraints, {"path": "/srv/ws/link"}, realpath=realpath)
    assert not result.ok
    assert result.violations[0].message == "expected a path that resolves within the roots"
    assert result.arguments == {"path": "/srv/ws/link"}


def test_realpath_hook_forwards_the_resolved_path_under_a_symlinked_root() -> None:
    constraints = parse_constraints({"path": {"within": "/srv/ws"}})
    realpath = _fake_realpath({"/srv/ws": "/data/ws", "/srv/ws/a": "/data/ws/a"})
    result = check_arguments(constraints, {"path": "/srv/ws/a"}, realpath=realpath)
    assert result.ok
    assert result.arguments == {"path": "/data/ws/a"}


def test_realpath_hook_errors_are_violations_not_exceptions() -> None:
    constraints = parse_constraints({"path": {"within": "/srv/ws"}})
    broken = _fake_realpath({"/srv/ws/rel": "relative/target"})
    result = check_arguments(constraints, {"path": "/srv/ws/rel"}, realpath=broken)
    assert result.violations[0].message == "expected a resolvable path"
    missing_root = parse_constraints({"path": {"within": "/missing"}})
    result = check_arguments(missing_root, {"path": "/missing/x"}, realpath=_fake_realpath({}))
    assert result.violations[0].message == "expected a resolvable path"


def test_realpath_hook_refuses_when_the_root_itself_cannot_be_resolved() -> None:
    constraints = parse_constraints({"path": {"within": "/srv/ws"}})
    realpath = _fake_realpath({"/srv/ws": "not/absolute", "/srv/ws/a": "/srv/ws/a"})
    result = check_arguments(constraints, {"path": "/srv/ws/a"}, realpath=realpath)
    assert result.violations[0].message == "expected a path that resolves within the roots"


def test_realpath_hook_is_not_called_for_paths_refused_lexically() -> None:
    calls: list[str] = []

    def realpath(path: str) -> str:
        calls.append(path)
        return path

    constraints = parse_constraints({"path": {"within": "/srv/ws"}})
    assert not check_arguments(constraints, {"path": "/etc/x"}, realpath=realpath).ok
    assert calls == []


def test_realpath_hook_resolves_each_root_once_per_call() -> None:
    calls: list[str] = []

    def realpath(path: str) -> str:
        calls.append(path)
        return path

    constraints = parse_constraints({"paths[*]": {"within": "/srv/ws"}})
    result = check_arguments(
        constraints, {"paths": ["/srv/ws/a", "/srv/ws/b", "/srv/ws/a"]}, realpath=realpath
    )
    assert result.ok
    assert sorted(calls) == ["/srv/ws", "/srv/ws/a", "/srv/ws/b"]
