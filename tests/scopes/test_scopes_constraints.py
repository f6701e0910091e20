"""Constraint operators, argument paths, conjunction and the canonical copy."""

from __future__ import annotations

import pytest

from scopes import (
    Constraints,
    JSONValue,
    ScopeSyntaxError,
    Violation,
    check_arguments,
    parse_authorization_details,
    parse_constraints,
)


def _check(args_table: dict[str, object], arguments: dict[str, JSONValue]) -> list[Violation]:
    return list(check_arguments(parse_constraints(args_table), arguments).violations)


OPERATOR_CASES: list[tuple[dict[str, object], JSONValue, bool]] = [
    ({"one_of": ["main", "dev"]}, "main", True),
    ({"one_of": ["main", "dev"]}, "prod", False),
    ({"one_of": [1, 2]}, 1.0, True),
    ({"one_of": [1, 2]}, True, False),
    ({"one_of": [True]}, 1, False),
    ({"one_of": [True]}, True, True),
    ({"one_of": [None, "x"]}, None, True),
    ({"one_of": ["x"]}, None, False),
    ({"one_of": ["x"]}, ["x"], False),
    ({"equals": "main"}, "main", True),
    ({"equals": "main"}, "Main", False),
    ({"equals": 0}, False, False),
    ({"equals": 2.5}, 2.5, True),
    ({"pattern": "[a-z]+"}, "abc", True),
    ({"pattern": "[a-z]+"}, "abc\n", False),
    ({"pattern": "[a-z]+"}, "abc1", False),
    ({"pattern": "b"}, "abc", False),
    ({"pattern": "[a-z]+"}, 3, False),
    ({"range": {"min": 1, "max": 10}}, 1, True),
    ({"range": {"min": 1, "max": 10}}, 10.0, True),
    ({"range": {"min": 1, "max": 10}}, 0, False),
    ({"range": {"min": 1, "max": 10}}, 10.5, False),
    ({"range": {"min": 1}}, 10**30, True),
    ({"range": {"max": 0}}, -5, True),
    ({"range": {"min": 0, "max": 1}}, True, False),
    ({"range": {"min": 0, "max": 1}}, float("nan"), False),
    ({"range": {"min": 0}}, float("inf"), False),
    ({"range": {"min": 0, "max": 1}}, "1", False),
    ({"max_length": 3}, "abc", True),
    ({"max_length": 3}, "abcd", False),
    ({"max_length": 3}, "\u00e9\u00e9\u00e9", True),
    ({"max_length": 2}, [1, 2], True),
    ({"max_length": 2}, [1, 2, 3], False),
    ({"max_length": 2}, 12, False),
    ({"max_length": 0}, "", True),
    ({"no_flag": True}, "file.txt", True),
    ({"no_flag": True}, "-rf", False),
    ({"no_flag": True}, "--upload-pack=evil", False),
    ({"no_flag": True}, "  -x", False),
    ({"no_flag": True}, "a-b", True),
    ({"no_flag": True}, ["a", "b"], True),
    ({"no_flag": True}, ["a", "-b"], False),
    ({"no_flag": True}, ["a", 1], False),
    ({"no_flag": True}, -1, False),
    ({"no_flag": True}, [], True),
]


@pytest.mark.parametrize(
    ("operators", "value", "allowed"),
    OPERATOR_CASES,
    ids=[
        "one-of-member",
        "one-of-outsider",
        "one-of-int-equals-float",
        "one-of-bool-is-not-int",
        "one-of-int-is-not-bool",
        "one-of-bool",
        "one-of-null",
        "one-of-null-not-listed",
        "one-of-array-never",
        "equals-same",
        "equals-is-case-sensitive",
        "equals-false-is-not-zero",
        "equals-float",
        "pattern-full-match",
        "pattern-no-trailing-newline",
        "pattern-is-anchored-at-end",
        "pattern-is-anchored-at-start",
        "pattern-needs-string",
        "range-min-inclusive",
        "range-max-inclusive-float",
        "range-below",
        "range-above",
        "range-min-only-big-int",
        "range-max-only",
        "range-refuses-bool",
        "range-refuses-nan",
        "range-refuses-infinity",
        "range-refuses-string",
        "max-length-equal",
        "max-length-over",
        "max-length-counts-code-points",
        "max-length-array",
        "max-length-array-over",
        "max-length-number",
        "max-length-zero",
        "no-flag-plain",
        "no-flag-short",
        "no-flag-long",
        "no-flag-after-whitespace",
        "no-flag-dash-inside",
        "no-flag-array",
        "no-flag-array-element",
        "no-flag-array-non-string",
        "no-flag-number",
        "no-flag-empty-array",
    ],
)
def test_operator_verdict(operators: dict[str, object], value: JSONValue, allowed: bool) -> None:
    violations = _check({"a": operators}, {"a": value})
    assert (not violations) is allowed
    for violation in violations:
        assert violation.path == "a"
        assert violation.operator in operators


def test_operators_on_one_path_all_apply() -> None:
    violations = _check(
        {"branch": {"pattern": "[a-z-]+", "max_length": 4, "no_flag": True}},
        {"branch": "-abcdef"},
    )
    assert sorted(v.operator for v in violations) == ["max_length", "no_flag"]


def test_violation_messages_never_contain_the_value() -> None:
    secret = "hunter2-very-secret-value"
    cases: list[tuple[dict[str, object], JSONValue]] = [
        ({"one_of": ["a"]}, secret),
        ({"equals": "a"}, secret),
        ({"pattern": "a"}, secret),
        ({"max_length": 1}, secret),
        ({"no_flag": True}, "-" + secret),
        ({"within": "/srv"}, "/etc/" + secret),
        ({"within": "/srv"}, secret),
        ({"url": {"hosts": ["example.com"]}}, f"https://{secret}.test/"),
        ({"url": {"hosts": ["example.com"]}}, secret),
    ]
    for operators, value in cases:
        (violation,) = _check({"a": operators}, {"a": value})
        assert secret not in violation.message
        assert violation.message.startswith("expected")


PATH_CASES: list[tuple[str, dict[str, JSONValue], list[tuple[str, str]]]] = [
    ("a", {"a": "x"}, []),
    ("a", {}, [("a", "expected the argument to be present")]),
    ("a.b", {"a": {"b": "x"}}, []),
    ("a.b", {"a": {}}, [("a.b", "expected the argument to be present")]),
    ("a.b", {"a": "x"}, [("a", "expected an object")]),
    ("a.b", {}, [("a", "expected the argument to be present")]),
    ("a[*]", {"a": ["x", "x"]}, []),
    ("a[*]", {"a": []}, []),
    ("a[*]", {"a": ["x", "y"]}, [("a[1]", "expected the value the constraint requires")]),
    ("a[*]", {"a": "x"}, [("a", "expected an array")]),
    ("a[*]", {}, [("a", "expected the argument to be present")]),
    ("a[*].b", {"a": [{"b": "x"}, {"b": "x"}]}, []),
    ("a[*].b", {"a": []}, []),
    ("a[*].b", {"a": [{"b": "x"}, {}]}, [("a[1].b", "expected the argument to be present")]),
    ("a[*].b", {"a": [{"b": "x"}, "x"]}, [("a[1]", "expected an object")]),
    ("a[*][*]", {"a": [["x"], [], ["x", "x"]]}, []),
    ("a[*][*]", {"a": [["x"], ["y"]]}, [("a[1][0]", "expected the value the constraint requires")]),
    ("a.b.c", {"a": {"b": {"c": "x"}}}, []),
    ("a", {"a": None}, [("a", "expected the value the constraint requires")]),
]


@pytest.mark.parametrize(
    ("path", "arguments", "expected"),
    PATH_CASES,
    ids=[
        "top-level",
        "top-level-missing",
        "nested",
        "nested-missing-leaf",
        "nested-not-an-object",
        "nested-missing-parent",
        "every-element",
        "empty-array-is-vacuous",
        "one-element-fails",
        "star-on-a-string",
        "star-missing",
        "field-of-every-element",
        "field-of-empty-array",
        "field-missing-in-one-element",
        "element-not-an-object",
        "nested-arrays",
        "nested-arrays-fail",
        "deep",
        "null-is-a-value",
    ],
)
def test_argument_paths_fail_closed(
    path: str, arguments: dict[str, JSONValue], expected: list[tuple[str, str]]
) -> None:
    violations = _check({path: {"equals": "x"}}, arguments)
    assert [(v.path, v.message) for v in violations] == expected


def test_several_paths_and_together() -> None:
    violations = _check(
        {"path": {"within": "/srv"}, "mode": {"one_of": ["r"]}},
        {"path": "/srv/a", "mode": "w"},
    )
    assert [(v.path, v.operator) for v in violations] == [("mode", "one_of")]


def test_unconstrained_arguments_pass_through_untouched() -> None:
    result = check_arguments(
        parse_constraints({"path": {"within": "/srv"}}),
        {"path": "/srv/./a", "extra": {"k": [1, "two", None]}},
    )
    assert result.ok
    assert result.arguments == {"path": "/srv/a", "extra": {"k": [1, "two", None]}}


def test_check_returns_a_deep_copy_and_never_mutates_the_input() -> None:
    arguments: dict[str, JSONValue] = {"paths": ["/srv/./a", "/srv/b/"], "opts": {"x": [1]}}
    result = check_arguments(parse_constraints({"paths[*]": {"within": "/srv"}}), arguments)
    assert result.arguments == {"paths": ["/srv/a", "/srv/b"], "opts": {"x": [1]}}
    assert arguments == {"paths": ["/srv/./a", "/srv/b/"], "opts": {"x": [1]}}
    opts, original = result.arguments["opts"], arguments["opts"]
    assert isinstance(opts, dict)
    assert isinstance(original, dict)
    assert opts is not original
    assert opts["x"] is not original["x"]


def test_nested_canonical_values_replace_the_checked_element() -> None:
    constraints = parse_constraints(
        {"items[*].url": {"url": {"hosts": ["example.com"]}}, "items[*].path": {"within": "/"}}
    )
    result = check_arguments(
        constraints,
        {"items": [{"url": "HTTPS://EXAMPLE.COM", "path": "//a/./b"}]},
    )
    assert result.ok
    assert result.arguments == {"items": [{"url": "https://example.com/", "path": "/a/b"}]}


def test_empty_constraints_allow_anything() -> None:
    result = check_arguments(Constraints(), {"anything": ["goes"]})
    assert result.ok
    assert result.arguments == {"anything": ["goes"]}


def test_two_sets_and_together_and_canonicalise_once() -> None:
    grant = parse_constraints({"path": {"within": "/srv/ws"}})
    narrowing = parse_constraints({"path": {"within": "/srv/ws/project", "pattern": ".*\\.py"}})
    ok = check_arguments([grant, narrowing], {"path": "/srv/ws/project/./src/../main.py"})
    assert ok.ok
    assert ok.arguments == {"path": "/srv/ws/project/main.py"}
    outside = check_arguments([grant, narrowing], {"path": "/srv/ws/other.py"})
    assert [v.operator for v in outside.violations] == ["within"]
    sneaky = check_arguments([grant, narrowing], {"path": "/srv/ws/project/x.py/../../../etc"})
    assert not sneaky.ok


def test_pattern_in_another_set_sees_the_canonical_path() -> None:
    grant = parse_constraints({"path": {"within": "/srv"}})
    narrowing = parse_constraints({"path": {"pattern": "/srv/public/.*"}})
    result = check_arguments([grant, narrowing], {"path": "/srv/public/../secret/x"})
    assert [(v.operator, v.message) for v in result.violations] == [
        ("pattern", "expected a string matching the pattern")
    ]


def test_token_narrowing_can_only_narrow() -> None:
    (grant,) = parse_authorization_details(
        [
            {
                "type": "tool_call",
                "connector": "git",
                "tools": ["*"],
                "args": {"n": {"range": {"max": 5}}},
            }
        ]
    )
    scope_constraints = parse_constraints({"n": {"range": {"min": 1, "max": 10}}})
    both = [scope_constraints, grant.constraints]
    assert check_arguments(both, {"n": 5}).ok
    assert not check_arguments(both, {"n": 7}).ok
    assert not check_arguments(both, {"n": 0}).ok


def test_single_set_in_a_list_behaves_like_the_set() -> None:
    constraints = parse_constraints({"a": {"equals": 1}})
    assert check_arguments([constraints], {"a": 1}).ok
    assert not check_arguments([constraints], {"a": 2}).ok


def test_path_and_url_on_one_path_from_two_sets_is_a_violation() -> None:
    as_path = parse_constraints({"a": {"within": "/srv"}})
    as_url = parse_constraints({"a": {"url": {"hosts": ["example.com"]}}})
    for sets in ([as_path, as_url], [as_url, as_path]):
        result = check_arguments(sets, {"a": "/srv/x"})
        assert [v.message for v in result.violations] == [
            "expected one canonical form, but both path and URL apply"
        ]


def test_url_constraints_from_two_sets_must_both_hold() -> None:
    wide = parse_constraints({"u": {"url": {"hosts": ["*.example.com"]}}})
    narrow = parse_constraints({"u": {"url": {"hosts": ["api.example.com"]}}})
    assert check_arguments([wide, narrow], {"u": "https://API.example.com/x"}).ok
    assert not check_arguments([wide, narrow], {"u": "https://www.example.com/x"}).ok
    plain = parse_constraints({"u": {"max_length": 100}})
    merged = check_arguments([plain, narrow], {"u": "https://api.example.com/./x"})
    assert merged.arguments == {"u": "https://api.example.com/x"}


def test_all_of_merges_constraints_on_the_same_path() -> None:
    a = parse_constraints({"x": {"equals": 1}, "y": {"equals": 2}})
    b = parse_constraints({"x": {"range": {"min": 0}}})
    merged = Constraints.all_of([a, b])
    assert [c.path for c in merged.items] == ["x", "y"]
    assert [name for name, _ in merged.items[0].operators] == ["equals", "range"]


def test_constraints_are_immutable_hashable_values() -> None:
    table: dict[str, object] = {"u": {"url": {"hosts": ["example.com"], "ports": [443]}}}
    first, second = parse_constraints(table), parse_constraints(table)
    assert first == second
    assert hash(first) == hash(second)
    assert first.items[0].operators == (("url", (("hosts", ("example.com",)), ("ports", (443,)))),)
    grants = parse_authorization_details(
        [{"type": "tool_call", "connector": "c", "tools": ["t"], "args": table}]
    )
    assert len({grants[0], grants[0]}) == 1


@pytest.mark.parametrize(
    "pattern",
    ["(a+)+$", "(a*)*", "((ab)*c)+", "(?:a+){2,}", "(x+x+)+y", "([a-z]+)*", "(a{2,})+"],
    ids=[
        "plus-plus",
        "star-star",
        "nested-groups",
        "brace",
        "two-inner",
        "class-inner",
        "inner-brace",
    ],
)
def test_patterns_with_a_repeated_repeating_group_are_refused(pattern: str) -> None:
    with pytest.raises(ScopeSyntaxError, match="repeated group"):
        parse_constraints({"a": {"pattern": pattern}})


@pytest.mark.parametrize(
    "pattern",
    [
        "[a-z]+",
        "(ab)+",
        "a+b+",
        "(?:foo|bar)+",
        "[(+)]+",
        "\\(a+\\)+",
        "a{2,3}(b)+",
        "(?P<n>a)+",
        "(a+)?",
        "[]a+]+",
        "[^]+]*(a)+",
        "(?x)(a) # ) comment",
    ],
    ids=[
        "class",
        "plain-group",
        "sequence",
        "alternation",
        "parens-in-class",
        "escaped-parens",
        "brace-then-group",
        "named-group",
        "optional-group",
        "bracket-first-in-class",
        "negated-bracket-first",
        "verbose-comment",
    ],
)
def test_ordinary_patterns_are_accepted(pattern: str) -> None:
    assert parse_constraints({"a": {"pattern": pattern}}).items


def test_pattern_operand_and_checked_value_lengths_are_bounded() -> None:
    with pytest.raises(ScopeSyntaxError, match="at most 1024 characters"):
        parse_constraints({"a": {"pattern": "a" * 1025}})
    constraints = parse_constraints({"a": {"pattern": "a*"}})
    assert check_arguments(constraints, {"a": "a" * 4096}).ok
    (violation,) = check_arguments(constraints, {"a": "a" * 4097}).violations
    assert violation.message == "expected at most 4096 characters for a pattern match"
