"""Tool-name globs and finding the grants that cover a call; the public surface of `scopes`."""

from __future__ import annotations

import pytest

import scopes
from scopes import (
    Constraints,
    Grant,
    ScopeSyntaxError,
    ToolPatterns,
    grants_for,
    parse_scope_toml,
    tool_matches,
)

GLOBS = [
    (["read_text_file"], "read_text_file", True),
    (["read_text_file"], "read_text_files", False),
    (["read_text_file"], "Read_text_file", False),
    (["read"], "read_text_file", False),
    (["list_*"], "list_directory", True),
    (["list_*"], "list_", True),
    (["list_*"], "xlist_directory", False),
    (["*_file"], "read_file", True),
    (["*"], "anything at all", True),
    (["*"], "", True),
    (["read_?"], "read_a", True),
    (["read_?"], "read_ab", False),
    (["read_?"], "read_", False),
    (["a.b"], "aXb", False),
    (["a.b"], "a.b", True),
    (["a*b*c"], "aXXbYYc", True),
    (["a*b*c"], "aXXbYY", False),
    (["a*"], "a\nb", True),
    (["read_*", "write_file"], "write_file", True),
    (["read_*", "write_file"], "delete_file", False),
    ([], "read", False),
]


@pytest.mark.parametrize(
    ("patterns", "tool", "matches"),
    GLOBS,
    ids=[
        "exact",
        "exact-is-anchored",
        "case-sensitive",
        "no-implicit-prefix",
        "star-suffix",
        "star-matches-empty",
        "star-suffix-is-anchored-at-start",
        "star-prefix",
        "star-alone",
        "star-alone-empty",
        "question-one-char",
        "question-not-two",
        "question-not-zero",
        "dot-is-literal",
        "dot-matches-dot",
        "several-stars",
        "several-stars-anchored-at-end",
        "star-crosses-newline",
        "any-of-several",
        "none-of-several",
        "no-patterns",
    ],
)
def test_tool_matches_globs(patterns: list[str], tool: str, matches: bool) -> None:
    assert tool_matches(patterns, tool) is matches
    assert ToolPatterns(tuple(patterns)).matches(tool) is matches
    assert tool_matches(ToolPatterns(tuple(patterns)), tool) is matches


@pytest.mark.parametrize(
    "pattern",
    ["read_[ab]", "read_{a,b}", "read\\_x", "", "a b", "x" * 129],
    ids=["character-class", "braces", "backslash", "empty", "space", "too-long"],
)
def test_tool_matches_refuses_patterns_outside_the_glob_language(pattern: str) -> None:
    with pytest.raises(ScopeSyntaxError, match="a glob of letters"):
        tool_matches([pattern], "read_a")


DEFINITIONS = parse_scope_toml(
    """
[[scope]]
name = "files:read"
[[scope.grant]]
connector = "files"
tools = ["read_*"]
[[scope.grant]]
connector = "files"
tools = ["read_text_file"]
args = { path = { within = "/srv" } }

[[scope]]
name = "git:read"
[[scope.grant]]
connector = "git"
tools = ["git_status", "git_log"]
""",
    source="scopes.toml",
)


def test_grants_for_returns_every_alternative_in_order() -> None:
    extra = Grant("token[0]", "files", ("read_text_file",), Constraints())
    other = Grant("token[1]", "git", ("*",), Constraints())
    found = grants_for([*DEFINITIONS, extra, other], "files", "read_text_file")
    assert [g.id for g in found] == [
        "files:read/grant[0]",
        "files:read/grant[1]",
        "token[0]",
    ]


def test_grants_for_matches_connector_exactly() -> None:
    assert grants_for(DEFINITIONS, "git", "git_log")[0].id == "git:read/grant[0]"
    assert grants_for(DEFINITIONS, "git-mirror", "git_log") == ()
    assert grants_for(DEFINITIONS, "files", "write_file") == ()
    assert grants_for([], "files", "read_text_file") == ()


def test_public_api_is_sorted_and_complete() -> None:
    assert scopes.__all__ == sorted(scopes.__all__)
    public = {name for name in dir(scopes) if not name.startswith("_")}
    modules = {"argpaths", "constraints", "definitions", "errors", "globs", "matching"}
    modules |= {"model", "paths", "urls"}
    assert public - modules == set(scopes.__all__)
    for required in [
        "ApprovalMode",
        "CanonicalisationError",
        "CheckResult",
        "Constraint",
        "Constraints",
        "Grant",
        "Label",
        "ScopeDefinition",
        "ScopeError",
        "ScopeSyntaxError",
        "Violation",
        "canonical_path",
        "canonical_url",
        "check_arguments",
        "grants_for",
        "load_scope_files",
        "parse_authorization_details",
        "parse_scope_toml",
        "tool_matches",
    ]:
        assert required in scopes.__all__
