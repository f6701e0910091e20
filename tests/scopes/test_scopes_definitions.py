"""Scope definitions from TOML files and grants from authorization_details: shapes and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from scopes import (
    ApprovalMode,
    Label,
    ScopeError,
    ScopeSyntaxError,
    check_arguments,
    grants_for,
    load_scope_files,
    parse_authorization_details,
    parse_scope_toml,
)

FILES_READ = """
[[scope]]
name = "files:read"
description = "Read files under the workspace"
labels = ["private", "private"]
approval = "none"
[[scope.grant]]
connector = "files"
tools = ["read_text_file", "list_*"]
args = { path = { within = "/srv/workspace" }, "paths[*]" = { within = "/srv/workspace" } }

[[scope]]
name = "web:fetch"
labels = ["untrusted", "egress"]
approval = "call"
[[scope.grant]]
connector = "web"
tools = ["fetch"]
[scope.grant.args.url.url]
hosts = ["*.example.com"]
schemes = ["https"]
ports = [443, 8443]
[[scope.grant]]
connector = "web-cache"
tools = ["get"]
"""


def test_parse_scope_toml_builds_definitions_with_compiled_grants() -> None:
    files, web = parse_scope_toml(FILES_READ, source="scopes.toml")
    assert files.name == "files:read"
    assert files.description == "Read files under the workspace"
    assert files.labels == frozenset({Label.PRIVATE})
    assert files.approval is ApprovalMode.NONE
    assert files.source == "scopes.toml"
    (grant,) = files.grants
    assert grant.id == "files:read/grant[0]"
    assert grant.scope == "files:read"
    assert grant.tools == ("read_text_file", "list_*")
    assert [c.path for c in grant.constraints.items] == ["path", "paths[*]"]
    assert web.labels == frozenset({Label.UNTRUSTED, Label.EGRESS})
    assert web.approval is ApprovalMode.CALL
    assert web.description == ""
    assert [g.id for g in web.grants] == ["web:fetch/grant[0]", "web:fetch/grant[1]"]
    assert web.grants[1].constraints.items == ()


def test_definitions_check_calls_end_to_end() -> None:
    definitions = parse_scope_toml(FILES_READ, source="scopes.toml")
    (grant,) = grants_for(definitions, "files", "list_directory")
    result = check_arguments(grant.constraints, {"path": "/srv/workspace/a/../b", "paths": []})
    assert result.ok
    assert result.arguments == {"path": "/srv/workspace/b", "paths": []}
    (fetch,) = grants_for(definitions, "web", "fetch")
    assert check_arguments(fetch.constraints, {"url": "https://api.example.com:8443/"}).ok
    assert not check_arguments(fetch.constraints, {"url": "https://api.example.com:444/"}).ok


def test_an_empty_file_defines_no_scopes() -> None:
    assert parse_scope_toml("", source="empty.toml") == ()


def _scope(body: str, grant: str = 'connector = "files"\ntools = ["read"]') -> str:
    return f'[[scope]]\nname = "s:x"\n{body}\n[[scope.grant]]\n{grant}\n'


SYNTAX_ERRORS = [
    ("name = ", None, None, "valid TOML"),
    ("other = 1", None, "other", "only the keys scope"),
    ("scope = 1", None, "scope", "an array of [[scope]] tables"),
    ("scope = [1]", None, "scope[0]", "a [[scope]] table"),
    ("[[scope]]\ndescription = 'x'", None, "scope[0].name", "a scope name like"),
    ("[[scope]]\nname = 'Files Read'", None, "scope[0].name", "a scope name like"),
    ("[[scope]]\nname = 'files:read'", "files:read", "grant", "at least one [[scope.grant]]"),
    (_scope("colour = 'red'"), "s:x", "colour", "only the keys approval"),
    (_scope("description = 3"), "s:x", "description", "a string of at most 1024"),
    (_scope("labels = 'private'"), "s:x", "labels", "a list of labels"),
    (_scope("labels = ['secret']"), "s:x", "labels", "labels among private, untrusted, egress"),
    (_scope("labels = [['private']]"), "s:x", "labels", "labels among"),
    (_scope("approval = 'always'"), "s:x", "approval", "one of 'none', 'token', 'call'"),
    (_scope("approval = ['none']"), "s:x", "approval", "one of 'none', 'token', 'call'"),
    (_scope("", 'connector = "Files"\ntools = ["a"]'), "s:x", "grant[0].connector", "[a-z]"),
    (_scope("", 'connector = "f"\ntools = []'), "s:x", "grant[0].tools", "a list of 1 to 64"),
    (_scope("", 'connector = "f"\ntools = "a"'), "s:x", "grant[0].tools", "a list of 1 to 64"),
    (_scope("", 'connector = "f"\ntools = ["read_[ab]"]'), "s:x", "grant[0].tools", "globs"),
    (_scope("", 'connector = "f"\ntools = [1]'), "s:x", "grant[0].tools", "globs"),
    (_scope("", 'connector = "f"\ntools = ["a"]\nextra = 1'), "s:x", "grant[0].extra", "only the"),
    (_scope("", 'connector = "f"\ntools = ["a"]\nargs = 1'), "s:x", "grant[0].args", "a table"),
    (
        _scope("", 'connector = "f"\ntools = ["a"]\nargs = { "a..b" = { equals = 1 } }'),
        "s:x",
        "grant[0].args",
        "an argument path",
    ),
    (
        _scope("", 'connector = "f"\ntools = ["a"]\nargs = { a = 1 }'),
        "s:x",
        "grant[0].args.a",
        "a table of at least one operator",
    ),
    (
        _scope("", 'connector = "f"\ntools = ["a"]\nargs = { a = {} }'),
        "s:x",
        "grant[0].args.a",
        "a table of at least one operator",
    ),
    (
        _scope("", 'connector = "f"\ntools = ["a"]\nargs = { a = { prefix = "x" } }'),
        "s:x",
        "grant[0].args.a",
        "an operator among equals",
    ),
]


@pytest.mark.parametrize(
    ("text", "scope", "field", "expected"),
    SYNTAX_ERRORS,
    ids=[
        "invalid-toml",
        "unknown-top-level-key",
        "scope-not-array",
        "scope-entry-not-table",
        "missing-name",
        "bad-name",
        "no-grants",
        "unknown-scope-key",
        "description-not-string",
        "labels-not-list",
        "unknown-label",
        "unhashable-label",
        "unknown-approval",
        "unhashable-approval",
        "bad-connector",
        "empty-tools",
        "tools-not-list",
        "character-class-glob",
        "tool-not-string",
        "unknown-grant-key",
        "args-not-table",
        "bad-argument-path",
        "operators-not-table",
        "no-operators",
        "unknown-operator",
    ],
)
def test_scope_syntax_errors_name_file_scope_and_field(
    text: str, scope: str | None, field: str | None, expected: str
) -> None:
    with pytest.raises(ScopeSyntaxError) as caught:
        parse_scope_toml(text, source="conf/scopes.toml")
    error = caught.value
    assert isinstance(error, ScopeError)
    assert isinstance(error, ValueError)
    assert error.source == "conf/scopes.toml"
    assert error.scope == scope
    assert error.field == field
    assert expected in error.expected
    assert str(error).startswith("conf/scopes.toml: ")
    if scope is not None:
        assert f"scope {scope!r}" in str(error)


def _operand_error(operators: str) -> ScopeSyntaxError:
    text = _scope("", f'connector = "f"\ntools = ["a"]\nargs = {{ a = {{ {operators} }} }}')
    with pytest.raises(ScopeSyntaxError) as caught:
        parse_scope_toml(text, source="s.toml")
    return caught.value


OPERAND_ERRORS = [
    ('within = "srv"', "within", "absolute", "'srv'"),
    ('within = "/srv/../etc"', "within", "canonical form ('/etc')", None),
    ("within = []", "within", "non-empty list", None),
    ("within = [1]", "within", "an absolute path (string)", "1"),
    ('within = "/srv/%2e"', "within", "path rules", None),
    ('within = "/a", url = { hosts = ["x.com"] }', None, "either 'within' or 'url'", None),
    ('pattern = "(unclosed"', "pattern", "a valid regular expression", "'(unclosed'"),
    ("pattern = 1", "pattern", "a regular expression of at most 1024", None),
    ("range = { min = 5, max = 1 }", "range", "min <= max", None),
    ("range = { min = true }", "range.min", "a finite number", "True"),
    ("range = { min = nan }", "range.min", "a finite number", None),
    ("range = { max = inf }", "range.max", "a finite number", None),
    ("range = { low = 1 }", "range", "only the keys min, max", None),
    ("range = {}", "range", "'min' and/or 'max'", None),
    ("range = 3", "range", "'min' and/or 'max'", None),
    ("max_length = -1", "max_length", "a non-negative integer", "-1"),
    ("max_length = true", "max_length", "a non-negative integer", None),
    ("max_length = 1.5", "max_length", "a non-negative integer", None),
    ("no_flag = false", "no_flag", "true (omit no_flag", "False"),
    ("one_of = []", "one_of", "a non-empty list", None),
    ("one_of = [[1]]", "one_of", "a string, a finite number", None),
    ("one_of = [nan]", "one_of", "a string, a finite number", None),
    ("one_of = 'a'", "one_of", "a non-empty list", None),
    ("equals = { a = 1 }", "equals", "a string, a finite number", None),
    ("url = 'https://x.com'", "url", "a table with 'hosts'", None),
    ("url = { schemes = ['https'] }", "url.hosts", "a non-empty list of host names", None),
    ("url = { hosts = [] }", "url.hosts", "a non-empty list of host names", None),
    ("url = { hosts = [1] }", "url.hosts", "strings only", None),
    ("url = { hosts = ['x.com'], path = '/' }", "url", "only the keys", "'path'"),
    ("url = { hosts = ['x.com'], schemes = ['ftp'] }", "url.schemes", "among http", None),
    ("url = { hosts = ['x.com'], schemes = [] }", "url.schemes", "a non-empty list", None),
    ("url = { hosts = ['x.com'], allow_private = 'yes' }", "url.allow_private", "true or", None),
    ("url = { hosts = ['x.com'], ports = [0] }", "url.ports", "between 1 and 65535", None),
    ("url = { hosts = ['x.com'], ports = [true] }", "url.ports", "between 1 and 65535", None),
    ("url = { hosts = ['x.com'], ports = [] }", "url.ports", "a non-empty list of ports", None),
    ("url = { hosts = ['x.com:443'] }", "url.hosts", "a bare host", None),
    ("url = { hosts = ['x.com/a'] }", "url.hosts", "a bare host", None),
    ("url = { hosts = ['*x.com'] }", "url.hosts", "'*' only as a whole leading label", None),
    ("url = { hosts = ['a.*.com'] }", "url.hosts", "'*' only as a whole leading label", None),
    ("url = { hosts = ['*.1.2.3.4'] }", "url.hosts", "a domain name after", None),
    ("url = { hosts = ['b\u00fccher.de'] }", "url.hosts", "ASCII host", None),
    ("url = { hosts = ['user@x.com'] }", "url.hosts", "userinfo", None),
    ("url = { hosts = ['8.8.8.8'] }", "url.hosts", "allow_ip_literals = true", None),
    (
        "url = { hosts = ['10.0.0.1'], allow_ip_literals = true }",
        "url.hosts",
        "allow_private = true to list a private address",
        None,
    ),
    ("url = { hosts = ['localhost'] }", "url.hosts", "allow_private = true to list a loop", None),
]


@pytest.mark.parametrize(
    ("operators", "field_suffix", "expected", "shown"),
    OPERAND_ERRORS,
    ids=[
        "within-relative",
        "within-not-canonical",
        "within-empty-list",
        "within-not-string",
        "within-percent",
        "within-and-url",
        "pattern-invalid",
        "pattern-not-string",
        "range-min-over-max",
        "range-bool",
        "range-nan",
        "range-infinite",
        "range-unknown-key",
        "range-empty",
        "range-not-table",
        "max-length-negative",
        "max-length-bool",
        "max-length-float",
        "no-flag-false",
        "one-of-empty",
        "one-of-nested",
        "one-of-nan",
        "one-of-not-list",
        "equals-table",
        "url-not-table",
        "url-no-hosts",
        "url-empty-hosts",
        "url-host-not-string",
        "url-unknown-key",
        "url-unknown-scheme",
        "url-empty-schemes",
        "url-allow-private-not-bool",
        "url-port-zero",
        "url-port-bool",
        "url-ports-empty",
        "url-host-with-port",
        "url-host-with-path",
        "url-partial-wildcard",
        "url-inner-wildcard",
        "url-wildcard-ip",
        "url-unicode-host",
        "url-userinfo-host",
        "url-ip-without-allow-ip-literals",
        "url-private-ip-without-allow-private",
        "url-localhost-without-allow-private",
    ],
)
def test_operand_errors_say_what_was_expected(
    operators: str, field_suffix: str | None, expected: str, shown: str | None
) -> None:
    error = _operand_error(operators)
    assert error.scope == "s:x"
    assert error.field == "grant[0].args.a" + (f".{field_suffix}" if field_suffix else "")
    assert expected in error.expected
    if shown is not None:
        assert error.shown_value == shown
        assert str(error).endswith(f", got {shown}")


def test_secret_looking_values_are_hidden_in_errors() -> None:
    token = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
    error = _operand_error(f'within = "{token}"')
    assert error.shown_value == "<hidden>"
    assert token not in str(error)
    by_field = parse_error_for_field()
    assert by_field.shown_value == "<hidden>"


def parse_error_for_field() -> ScopeSyntaxError:
    text = _scope("", 'connector = "f"\ntools = ["a"]\nargs = { api_token = { max_length = -1 } }')
    with pytest.raises(ScopeSyntaxError) as caught:
        parse_scope_toml(text, source="s.toml")
    return caught.value


def test_long_values_are_shortened_in_errors() -> None:
    error = _operand_error(f'within = "{"relative " * 30}"')
    assert error.shown_value is not None
    assert len(error.shown_value) == 80
    assert error.shown_value.endswith("...")


def test_duplicate_scope_name_in_one_file_is_an_error() -> None:
    text = _scope("") + _scope("")
    with pytest.raises(ScopeSyntaxError, match="a scope name defined once") as caught:
        parse_scope_toml(text, source="s.toml")
    assert caught.value.scope == "s:x"


def test_load_scope_files_reads_every_file(tmp_path: Path) -> None:
    first = tmp_path / "a.toml"
    first.write_text(_scope(""), encoding="utf-8")
    second = tmp_path / "b.toml"
    second.write_text(FILES_READ, encoding="utf-8")
    definitions = load_scope_files([first, str(second)])
    assert [d.name for d in definitions] == ["s:x", "files:read", "web:fetch"]
    assert definitions[0].source == str(first)


def test_load_scope_files_refuses_a_name_defined_in_two_files(tmp_path: Path) -> None:
    first = tmp_path / "a.toml"
    first.write_text(_scope(""), encoding="utf-8")
    second = tmp_path / "b.toml"
    second.write_text(_scope("description = 'again'"), encoding="utf-8")
    with pytest.raises(ScopeSyntaxError) as caught:
        load_scope_files([first, second])
    assert caught.value.source == str(second)
    assert caught.value.expected == f"a scope name not already defined in {first}"


def test_load_scope_files_reports_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ScopeError, match="cannot read scope file") as caught:
        load_scope_files([missing])
    assert str(missing) in str(caught.value)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ScopeSyntaxError, match="UTF-8"):
        load_scope_files([latin])


DETAILS = [
    {
        "type": "tool_call",
        "connector": "files",
        "tools": ["read_*"],
        "args": {"path": {"within": "/srv/workspace/project"}},
    },
    {"type": "tool_call", "connector": "git", "tools": ["git_status"]},
]


def test_parse_authorization_details_builds_grants() -> None:
    read, status = parse_authorization_details(DETAILS)
    assert read.id == "authorization_details[0]"
    assert read.scope is None
    assert read.connector == "files"
    assert read.covers("files", "read_text_file")
    assert not read.covers("files", "write_file")
    assert not check_arguments(read.constraints, {"path": "/srv/workspace/other"}).ok
    assert status.constraints.items == ()


DETAIL_ERRORS: list[tuple[object, str, str]] = [
    ({"type": "tool_call"}, "authorization_details", "an array of at most 64"),
    ([DETAILS[1]] * 65, "authorization_details", "an array of at most 64"),
    (["tool_call"], "authorization_details[0].type", '"type": "tool_call"'),
    ([{"connector": "git", "tools": ["a"]}], "authorization_details[0].type", "tool_call"),
    (
        [{"type": "payment", "connector": "git", "tools": ["a"]}],
        "authorization_details[0].type",
        "",
    ),
    (
        [{"type": "tool_call", "connector": "git", "tools": ["a"], "locations": ["x"]}],
        "authorization_details[0].locations",
        "only the keys args, connector, tools, type",
    ),
    (
        [{"type": "tool_call", "connector": "git", "tools": ["a[0]"]}],
        "authorization_details[0].tools",
        "globs",
    ),
    (
        [{"type": "tool_call", "connector": "git", "tools": ["a"], "args": {"n": {"range": 1}}}],
        "authorization_details[0].args.n.range",
        "'min' and/or 'max'",
    ),
    (
        [{"type": "tool_call", "connector": "git", "tools": ["a"], "args": {1: {"equals": 1}}}],
        "authorization_details[0].args",
        "an argument path",
    ),
    (
        [{"type": "tool_call", "connector": "git", "tools": ["a"], "args": {"a": {7: 1}}}],
        "authorization_details[0].args.a",
        "an operator among",
    ),
]


@pytest.mark.parametrize(
    ("details", "field", "expected"),
    DETAIL_ERRORS,
    ids=[
        "not-a-list",
        "too-many",
        "entry-not-object",
        "missing-type",
        "other-type",
        "unknown-key",
        "bad-glob",
        "bad-operand",
        "non-string-path",
        "non-string-operator",
    ],
)
def test_authorization_details_errors_name_the_entry(
    details: object, field: str, expected: str
) -> None:
    with pytest.raises(ScopeSyntaxError) as caught:
        parse_authorization_details(details)
    assert caught.value.source == "authorization_details"
    assert caught.value.scope is None
    assert caught.value.field == field
    assert expected in caught.value.expected


def test_a_grant_that_is_not_a_table_is_an_error() -> None:
    with pytest.raises(ScopeSyntaxError, match="a table with connector, tools") as caught:
        parse_scope_toml('[[scope]]\nname = "s:x"\ngrant = [1]\n', source="s.toml")
    assert caught.value.field == "grant[0]"


def test_argument_paths_deeper_than_eight_steps_are_refused() -> None:
    deep = "a" + ".b" * 7
    assert parse_authorization_details(
        [{"type": "tool_call", "connector": "c", "tools": ["t"], "args": {deep: {"equals": 1}}}]
    )
    with pytest.raises(ScopeSyntaxError, match="an argument path"):
        parse_authorization_details(
            [
                {
                    "type": "tool_call",
                    "connector": "c",
                    "tools": ["t"],
                    "args": {deep + ".c": {"equals": 1}},
                }
            ]
        )
