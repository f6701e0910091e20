"""Scope definitions from TOML and grants from a token's authorization_details. Pure; the only
I/O is `load_scope_files` reading the files it is given.

Decisions: unknown keys are errors everywhere; a scope needs at least one grant; scope names are
`[a-z][a-z0-9_.-]{0,63}` followed by up to three `:part` segments (no spaces: they travel in the
OAuth `scope` parameter); `description` (default "", at most 1024 characters), `labels` (default
none) and `approval` (default "none") are optional; a duplicate label is ignored. An
authorization_details list holds at most 64 entries, each `{"type": "tool_call", "connector",
"tools", "args"?}`; any other `type` is refused, because an unknown kind cannot be enforced.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import cast

from scopes.constraints import Constraints, parse_constraints
from scopes.errors import ScopeError, ScopeSyntaxError
from scopes.globs import is_valid_glob
from scopes.model import ApprovalMode, Grant, Label, ScopeDefinition

__all__ = ["load_scope_files", "parse_authorization_details", "parse_scope_toml"]

_SCOPE_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}(?::[a-z0-9_.-]{1,64}){0,3}")
_CONNECTOR = re.compile(r"[a-z][a-z0-9-]{0,31}")
_SCOPE_KEYS = ("approval", "description", "grant", "labels", "name")
_GRANT_KEYS = ("args", "connector", "tools")
_DETAIL_KEYS = ("args", "connector", "tools", "type")
_MAX_DESCRIPTION = 1024
_MAX_DETAILS = 64
_MAX_TOOLS = 64
_LABELS = frozenset(label.value for label in Label)
_APPROVALS = frozenset(mode.value for mode in ApprovalMode)


class _Where:
    __slots__ = ("scope", "source")

    def __init__(self, source: str, scope: str | None) -> None:
        self.source = source
        self.scope = scope

    def error(
        self, field: str, expected: str, value: object = None, *, show: bool = True
    ) -> ScopeSyntaxError:
        return ScopeSyntaxError(
            self.source, expected, scope=self.scope, field=field, value=value, has_value=show
        )


def _table(value: object) -> dict[str, object] | None:
    if not isinstance(value, Mapping):
        return None
    mapping = cast("Mapping[object, object]", value)
    return {key if isinstance(key, str) else repr(key): item for key, item in mapping.items()}


def _list(value: object) -> list[object] | None:
    return cast("list[object]", value) if isinstance(value, list) else None


def _check_keys(table: dict[str, object], allowed: tuple[str, ...], where: _Where, at: str) -> None:
    for key in table:
        if key not in allowed:
            prefix = f"{at}." if at else ""
            raise where.error(prefix + key, f"only the keys {', '.join(allowed)}", show=False)


def parse_scope_toml(text: str, *, source: str) -> tuple[ScopeDefinition, ...]:
    """Parse the scope definitions in TOML `text`; `source` names it in errors.

    Raises:
        ScopeSyntaxError: invalid TOML, an unknown key, a bad value or a duplicate scope name.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScopeSyntaxError(source, f"valid TOML ({exc})") from None
    top = _Where(source, None)
    _check_keys(document, ("scope",), top, "")
    raw_scopes = _list(document.get("scope", []))
    if raw_scopes is None:
        raise top.error("scope", "an array of [[scope]] tables", show=False)
    seen: set[str] = set()
    definitions: list[ScopeDefinition] = []
    for index, raw in enumerate(raw_scopes):
        definition = _parse_scope(raw, index, source)
        if definition.name in seen:
            raise _Where(source, definition.name).error(
                "name", "a scope name defined once", definition.name
            )
        seen.add(definition.name)
        definitions.append(definition)
    return tuple(definitions)


def _parse_scope(raw: object, index: int, source: str) -> ScopeDefinition:
    where = _Where(source, None)
    table = _table(raw)
    if table is None:
        raise where.error(f"scope[{index}]", "a [[scope]] table", show=False)
    name = table.get("name")
    if not isinstance(name, str) or _SCOPE_NAME.fullmatch(name) is None:
        raise where.error(
            f"scope[{index}].name",
            "a scope name like 'files:read' (lowercase letters, digits, '_', '.', '-', ':')",
            name,
        )
    where = _Where(source, name)
    _check_keys(table, _SCOPE_KEYS, where, "")
    description = table.get("description", "")
    if not isinstance(description, str) or len(description) > _MAX_DESCRIPTION:
        raise where.error(
            "description", f"a string of at most {_MAX_DESCRIPTION} characters", description
        )
    labels: set[Label] = set()
    raw_labels = _list(table.get("labels", []))
    if raw_labels is None:
        raise where.error("labels", "a list of labels", table.get("labels"))
    for label in raw_labels:
        if not isinstance(label, str) or label not in _LABELS:
            raise where.error("labels", "labels among private, untrusted, egress", label)
        labels.add(Label(label))
    approval = table.get("approval", "none")
    if not isinstance(approval, str) or approval not in _APPROVALS:
        raise where.error("approval", "one of 'none', 'token', 'call'", approval)
    raw_grants = _list(table.get("grant"))
    if not raw_grants:
        raise where.error("grant", "at least one [[scope.grant]] table", show=False)
    grants = tuple(
        _parse_grant(
            raw_grant, f"{name}/grant[{position}]", f"grant[{position}]", where, _GRANT_KEYS
        )
        for position, raw_grant in enumerate(raw_grants)
    )
    return ScopeDefinition(
        name, description, frozenset(labels), ApprovalMode(approval), grants, source
    )


def _parse_grant(
    raw: object, grant_id: str, at: str, where: _Where, allowed: tuple[str, ...]
) -> Grant:
    table = _table(raw)
    if table is None:
        raise where.error(at, "a table with connector, tools and optional args", show=False)
    _check_keys(table, allowed, where, at)
    connector = table.get("connector")
    if not isinstance(connector, str) or _CONNECTOR.fullmatch(connector) is None:
        raise where.error(
            f"{at}.connector", "a connector id matching [a-z][a-z0-9-]{0,31}", connector
        )
    raw_tools = _list(table.get("tools"))
    if not raw_tools or len(raw_tools) > _MAX_TOOLS:
        raise where.error(
            f"{at}.tools", f"a list of 1 to {_MAX_TOOLS} tool names or globs", table.get("tools")
        )
    tools: list[str] = []
    for tool in raw_tools:
        if not isinstance(tool, str) or not is_valid_glob(tool):
            raise where.error(
                f"{at}.tools",
                "tool names or globs of letters, digits, '_', '.', '/', '-', '*' and '?'",
                tool,
            )
        tools.append(tool)
    constraints = Constraints()
    if "args" in table:
        constraints = parse_constraints(
            table["args"], source=where.source, scope=where.scope, field=f"{at}.args"
        )
    return Grant(grant_id, connector, tuple(tools), constraints, where.scope)


def load_scope_files(paths: Iterable[str | os.PathLike[str]]) -> tuple[ScopeDefinition, ...]:
    """Read and parse every scope file in `paths`; scope names must be unique across them.

    Raises:
        ScopeSyntaxError: a file is not valid UTF-8 TOML or a definition is invalid or repeated.
        ScopeError: a file cannot be read.
    """
    definitions: list[ScopeDefinition] = []
    first_seen: dict[str, str] = {}
    for path in paths:
        source = os.fspath(path)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ScopeError(f"{source}: cannot read scope file ({exc.strerror})") from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScopeSyntaxError(source, "a UTF-8 encoded file") from None
        for definition in parse_scope_toml(text, source=source):
            if definition.name in first_seen:
                raise _Where(source, definition.name).error(
                    "name",
                    f"a scope name not already defined in {first_seen[definition.name]}",
                    definition.name,
                )
            first_seen[definition.name] = source
            definitions.append(definition)
    return tuple(definitions)


def parse_authorization_details(
    details: object, *, source: str = "authorization_details"
) -> tuple[Grant, ...]:
    """Parse a token's RFC 9396 `authorization_details` (a JSON array) into grants.

    Raises:
        ScopeSyntaxError: not a list of `tool_call` objects, an unknown key, or a bad value.
    """
    where = _Where(source, None)
    entries = _list(details)
    if entries is None or len(entries) > _MAX_DETAILS:
        raise where.error(source, f"an array of at most {_MAX_DETAILS} objects", show=False)
    grants: list[Grant] = []
    for index, entry in enumerate(entries):
        at = f"{source}[{index}]"
        table = _table(entry)
        if table is None or table.get("type") != "tool_call":
            raise where.error(f"{at}.type", 'an object with "type": "tool_call"', show=False)
        grants.append(_parse_grant(table, at, at, where, _DETAIL_KEYS))
    return tuple(grants)
