"""decide(): table-driven cases and a property test against an independent reference model."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.decision import Decision, Reason
from broker.core.pinning import PinStatus
from broker.core.policy import AccessRequest, TokenPolicy, decide, visible
from scopes import parse_authorization_details, parse_scope_toml

SCOPES = parse_scope_toml(
    """
[[scope]]
name = "files:read"
labels = ["private"]
[[scope.grant]]
connector = "files"
tools = ["read_*", "list_directory"]
args = { path = { within = "/srv/ws" } }

[[scope]]
name = "files:tmp"
approval = "call"
[[scope.grant]]
connector = "files"
tools = ["read_text_file"]
args = { path = { within = "/tmp" } }

[[scope]]
name = "time:read"
[[scope.grant]]
connector = "time"
tools = ["*"]
""",
    source="test.toml",
)
BY_NAME = {s.name: s for s in SCOPES}


def policy(*names: str, details: list[dict[str, object]] | None = None) -> TokenPolicy:
    narrowing = parse_authorization_details(details) if details else ()
    return TokenPolicy(tuple(BY_NAME[n] for n in names), narrowing)


def request(
    p: TokenPolicy,
    tool: str,
    args: dict[str, object],
    *,
    connector: str = "files",
    pin: PinStatus | None = PinStatus.APPROVED,
    token_problem: Reason | None = None,
) -> AccessRequest:
    return AccessRequest("dec_1", connector, tool, args, p, pin, token_problem)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("req", "allowed", "reason"),
    [
        (request(policy("files:read"), "read_text_file", {"path": "/srv/ws/a"}), True, None),
        (
            request(policy("files:read"), "read_text_file", {"path": "/srv/ws/../etc/passwd"}),
            False,
            Reason.CONSTRAINT_VIOLATED,
        ),
        (
            request(policy("files:read"), "write_file", {"path": "/srv/ws/a"}),
            False,
            Reason.SCOPE_MISSING,
        ),
        (request(policy("files:read"), "nosuch", {}, pin=None), False, Reason.SCOPE_MISSING),
        (request(policy(), "read_text_file", {"path": "/srv/ws/a"}), False, Reason.SCOPE_MISSING),
        (
            request(
                policy("files:read"), "read_text_file", {"path": "/srv/ws/a"}, pin=PinStatus.PENDING
            ),
            False,
            Reason.TOOL_UNAPPROVED,
        ),
        (
            request(
                policy("files:read"), "read_text_file", {"path": "/srv/ws/a"}, pin=PinStatus.CHANGED
            ),
            False,
            Reason.TOOL_DEFINITION_CHANGED,
        ),
        (
            request(policy("time:read"), "read_text_file", {}, pin=PinStatus.CHANGED),
            False,
            Reason.SCOPE_MISSING,
        ),
        (
            request(
                policy("files:read"),
                "read_text_file",
                {"path": "/srv/ws/a"},
                token_problem=Reason.AGENT_QUARANTINED,
            ),
            False,
            Reason.AGENT_QUARANTINED,
        ),
        (request(policy("time:read"), "get_current_time", {}, connector="time"), True, None),
        (
            request(policy("time:read"), "get_current_time", {}, connector="files"),
            False,
            Reason.SCOPE_MISSING,
        ),
    ],
    ids=[
        "inside-the-root-is-allowed",
        "traversal-out-of-the-root-is-a-constraint-violation",
        "an-ungranted-tool-is-scope-missing",
        "an-unknown-tool-looks-like-an-ungranted-one",
        "no-scopes-grant-nothing",
        "a-pending-tool-is-unapproved",
        "a-changed-tool-is-refused",
        "a-pin-state-is-not-revealed-to-a-caller-without-the-grant",
        "a-token-problem-comes-first",
        "a-glob-grant-covers-every-tool-of-its-connector",
        "a-grant-names-its-connector",
    ],
)
def test_decide_answers_each_case_with_one_reason(
    req: AccessRequest, allowed: bool, reason: Reason | None
) -> None:
    auth = decide(req)
    assert auth.decision.allowed is allowed
    assert auth.decision.reasons == (frozenset() if reason is None else frozenset({reason}))
    assert auth.decision.decision_id == "dec_1"


def test_allowed_call_forwards_the_canonical_arguments_and_names_the_grant() -> None:
    auth = decide(request(policy("files:read"), "read_text_file", {"path": "/srv/ws/./x//y/../z"}))
    assert auth.decision.allowed
    assert auth.arguments == {"path": "/srv/ws/x/z"}
    assert auth.decision.rule_ids == ("files:read/grant[0]",)
    assert auth.scope is not None
    assert auth.scope.name == "files:read"
    assert "private" in auth.labels


def test_second_alternative_grant_allows_what_the_first_refuses_and_carries_its_approval_mode() -> (
    None
):
    auth = decide(request(policy("files:read", "files:tmp"), "read_text_file", {"path": "/tmp/x"}))
    assert auth.decision.allowed
    assert auth.approval == "call"
    assert auth.decision.rule_ids == ("files:tmp/grant[0]",)


def test_refusal_details_name_each_alternative_but_never_the_value() -> None:
    secret_path = "/home/victim/.ssh/id_ed25519"
    auth = decide(
        request(policy("files:read", "files:tmp"), "read_text_file", {"path": secret_path})
    )
    assert auth.decision.reasons == {Reason.CONSTRAINT_VIOLATED}
    assert len(auth.decision.detail) == 2
    assert all(secret_path not in d for d in auth.decision.detail)
    assert auth.arguments == {}


def test_authorization_details_narrow_the_tools_a_token_reaches() -> None:
    details: list[dict[str, object]] = [
        {"type": "tool_call", "connector": "files", "tools": ["read_text_file"]}
    ]
    p = policy("files:read", details=details)
    assert decide(request(p, "read_text_file", {"path": "/srv/ws/a"})).decision.allowed
    listing = decide(request(p, "list_directory", {"path": "/srv/ws"}))
    assert listing.decision.reasons == {Reason.SCOPE_MISSING}


def test_authorization_details_constraints_and_with_the_scopes_own() -> None:
    details: list[dict[str, object]] = [
        {
            "type": "tool_call",
            "connector": "files",
            "tools": ["read_*"],
            "args": {"path": {"within": "/srv/ws/project"}},
        }
    ]
    p = policy("files:read", details=details)
    assert decide(request(p, "read_text_file", {"path": "/srv/ws/project/a"})).decision.allowed
    outside = decide(request(p, "read_text_file", {"path": "/srv/ws/other"}))
    assert outside.decision.reasons == {Reason.CONSTRAINT_VIOLATED}


def test_details_cannot_widen_a_scope_they_do_not_match() -> None:
    details: list[dict[str, object]] = [{"type": "tool_call", "connector": "files", "tools": ["*"]}]
    p = policy("files:read", details=details)
    assert decide(request(p, "write_file", {"path": "/srv/ws/a"})).decision.reasons == {
        Reason.SCOPE_MISSING
    }


def test_visible_lists_only_reachable_tools_in_order() -> None:
    tools = [
        ("files", "write_file"),
        ("files", "read_text_file"),
        ("time", "x"),
        ("files", "list_directory"),
    ]
    assert visible(policy("files:read"), tools) == [
        ("files", "read_text_file"),
        ("files", "list_directory"),
    ]


# --- the reference model -------------------------------------------------------------------


@dataclass(frozen=True)
class RefGrant:
    connector: str
    tools: tuple[str, ...]
    lo: int | None  # range on argument "n"
    hi: int | None
    choices: tuple[str, ...] | None  # one_of on argument "s"


def ref_covers(g: RefGrant, connector: str, tool: str) -> bool:
    return g.connector == connector and any(fnmatch.fnmatchcase(tool, p) for p in g.tools)


def ref_ok(g: RefGrant, args: dict[str, object]) -> bool:
    if g.lo is not None:
        n = args.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or not (g.lo <= n <= g.hi):  # type: ignore[operator]
            return False
    return g.choices is None or args.get("s") in g.choices


def ref_decide(
    scopes: list[list[RefGrant]],
    details: list[RefGrant] | None,
    connector: str,
    tool: str,
    args: dict[str, object],
    pin: PinStatus | None,
) -> Reason | None:
    covering = [g for s in scopes for g in s if ref_covers(g, connector, tool)]
    narrowing = None if details is None else [d for d in details if ref_covers(d, connector, tool)]
    if pin is None or not covering or (narrowing is not None and not narrowing):
        return Reason.SCOPE_MISSING
    if pin is PinStatus.PENDING:
        return Reason.TOOL_UNAPPROVED
    if pin is PinStatus.CHANGED:
        return Reason.TOOL_DEFINITION_CHANGED
    for g in covering:
        if ref_ok(g, args) and all(ref_ok(d, args) for d in narrowing or []):
            return None
    return Reason.CONSTRAINT_VIOLATED


def to_toml_args(g: RefGrant) -> str:
    parts = []
    if g.lo is not None:
        parts.append(f"n = {{ range = {{ min = {g.lo}, max = {g.hi} }} }}")
    if g.choices is not None:
        parts.append("s = { one_of = [" + ", ".join(f'"{c}"' for c in g.choices) + "] }")
    return "{ " + ", ".join(parts) + " }" if parts else "{}"


def to_detail(g: RefGrant) -> dict[str, object]:
    args: dict[str, object] = {}
    if g.lo is not None:
        args["n"] = {"range": {"min": g.lo, "max": g.hi}}
    if g.choices is not None:
        args["s"] = {"one_of": list(g.choices)}
    return {"type": "tool_call", "connector": g.connector, "tools": list(g.tools), "args": args}


TOOLS = ["read", "write", "list"]
grant_st = st.builds(
    lambda c, tools, rng, choices: RefGrant(
        c,
        tuple(tools),
        None if rng is None else min(rng),
        None if rng is None else max(rng),
        choices,
    ),
    st.sampled_from(["a", "b"]),
    st.lists(st.sampled_from([*TOOLS, "*", "r*", "?rite"]), min_size=1, max_size=2),
    st.none() | st.tuples(st.integers(-5, 5), st.integers(-5, 5)),
    st.none() | st.lists(st.sampled_from(["x", "y", "z"]), min_size=1, max_size=2).map(tuple),
)
args_st = st.fixed_dictionaries(
    {},
    optional={
        "n": st.integers(-7, 7) | st.text(max_size=1) | st.booleans(),
        "s": st.sampled_from(["x", "y", "z", "w"]),
    },
)


@settings(max_examples=2000, deadline=None)
@given(
    scopes=st.lists(st.lists(grant_st, min_size=1, max_size=3), max_size=3),
    details=st.none() | st.lists(grant_st, min_size=1, max_size=2),
    connector=st.sampled_from(["a", "b"]),
    tool=st.sampled_from(TOOLS),
    args=args_st,
    pin=st.sampled_from([None, PinStatus.APPROVED, PinStatus.PENDING, PinStatus.CHANGED]),
)
def test_decide_agrees_with_the_reference_model(
    scopes: list[list[RefGrant]],
    details: list[RefGrant] | None,
    connector: str,
    tool: str,
    args: dict[str, object],
    pin: PinStatus | None,
) -> None:
    toml = "\n".join(
        f'[[scope]]\nname = "s{i}"\n'
        + "\n".join(
            f'[[scope.grant]]\nconnector = "{g.connector}"\ntools = {list(g.tools)!r}\n'.replace(
                "'", '"'
            )
            + f"args = {to_toml_args(g)}\n"
            for g in grants
        )
        for i, grants in enumerate(scopes)
    )
    defs = parse_scope_toml(toml, source="gen.toml") if scopes else ()
    narrowing = parse_authorization_details([to_detail(d) for d in details]) if details else ()
    p = TokenPolicy(tuple(defs), narrowing)
    auth = decide(AccessRequest("dec_p", connector, tool, args, p, pin))  # type: ignore[arg-type]
    expected = ref_decide(scopes, details, connector, tool, args, pin)
    if expected is None:
        assert auth.decision.allowed, auth.decision
        assert auth.arguments == args
    else:
        assert auth.decision.reasons == {expected}


def test_a_denial_needs_a_reason_and_reasons_read_back_sorted() -> None:
    with pytest.raises(ValueError, match="at least one reason"):
        Decision.deny("dec_x")
    both = Decision.deny("dec_x", Reason.SCOPE_MISSING, Reason.BUDGET_EXHAUSTED)
    assert both.reason_text() == "budget-exhausted,scope-missing"
    assert Decision.allow("dec_y").reasons == frozenset()
