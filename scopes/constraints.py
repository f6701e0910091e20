"""Argument constraints: operators compiled at load time, checked on every call. Pure; no I/O.

A `Constraint` holds every operator on one argument path; operators on a path AND together, and
the constraints of a `Constraints` set AND together. `check_arguments` also takes several sets
(a grant's and a token's narrowing) and ANDs them: each addressed value is canonicalised once
(`within` -> path, `url` -> URL; a path asked to be both is a violation) and every operator sees
that canonical form. The result carries a copy of the arguments with each checked value replaced
by its canonical form; that copy is what the broker forwards.

Decisions: a missing argument at a constrained path, a non-array under `[*]` and a wrong type are
violations (an empty array under `[*]` passes vacuously); `null` is a value like any other. Equality
(`equals`, `one_of`) is JSON equality: `true` never equals `1`, `1` equals `1.0`. `range` refuses
booleans and non-finite numbers. `max_length` counts code points of strings and items of arrays.
`no_flag` refuses strings whose first non-whitespace character is `-`, and arrays with any such
element or any non-string element. `within` roots must be written in canonical form. With a
`realpath` resolver, a path is checked both as written and as resolved (against the resolved
roots), and the resolved form is what gets forwarded. Violation messages never contain values.
`pattern` uses `re.fullmatch`; a pattern is at most 1024 characters and may not repeat a group
that itself repeats (`(a+)+`), and values longer than 4096 characters fail it, because patterns
may come from an agent's own token request and `re` has no timeout.

`url` host rules: `hosts` lists exact names, `*.name` (any subdomain, not the name itself), `*`
(any domain name) and IP literals. A URL whose host is an IP literal passes only if it is listed
exactly, or if `allow_ip_literals` is true and `*` is listed; non-public ranges also need
`allow_private`, and cloud metadata addresses pass only when listed exactly. `localhost` and
`*.localhost` count as loopback names. Without `ports`, only the scheme's default port passes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, cast

from scopes.argpaths import ArgPath, parse_arg_path
from scopes.errors import CanonicalisationError, ScopeSyntaxError
from scopes.paths import canonical_path, path_within
from scopes.urls import (
    DEFAULT_PORTS,
    HostPattern,
    IPAddress,
    ParsedUrl,
    ip_category,
    is_local_name,
    parse_host_pattern,
    parse_url,
)

__all__ = [
    "CheckResult",
    "Constraint",
    "Constraints",
    "JSONValue",
    "Realpath",
    "UrlRule",
    "Violation",
    "check_arguments",
    "parse_constraints",
]

JSONValue: TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"
JSONScalar: TypeAlias = str | int | float | bool | None
Realpath: TypeAlias = Callable[[str], str]
_Check: TypeAlias = Callable[[JSONValue], "str | None"]

OPERATORS = ("equals", "max_length", "no_flag", "one_of", "pattern", "range", "url", "within")
_MAX_PATTERN = 1024
_MAX_PATTERN_INPUT = 4096
_URL_KEYS = ("allow_ip_literals", "allow_private", "hosts", "ports", "schemes")


@dataclass(frozen=True, slots=True)
class Violation:
    """One failed check: where (`path`, concrete, e.g. `paths[2]`), which operator, and why.

    `operator` is the operator's name, or `path` when the argument is missing or the value on
    the way is not an object/array. `message` says what was expected, never the value.
    """

    path: str
    operator: str
    message: str


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of `check_arguments`; `arguments` holds the canonical values to forward."""

    ok: bool
    violations: tuple[Violation, ...]
    arguments: dict[str, JSONValue]


@dataclass(frozen=True, slots=True)
class UrlRule:
    """A compiled `url` operand."""

    hosts: tuple[HostPattern, ...]
    schemes: frozenset[str]
    allow_private: bool
    allow_ip_literals: bool
    ports: frozenset[int] | None
    exact: frozenset[str] = field(init=False, repr=False, compare=False)
    suffixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    any_domain: bool = field(init=False, repr=False, compare=False)
    ips: frozenset[IPAddress] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "exact", frozenset(h.value for h in self.hosts if h.kind == "exact"))
        set_(self, "suffixes", tuple(h.value for h in self.hosts if h.kind == "suffix"))
        set_(self, "any_domain", any(h.kind == "any" for h in self.hosts))
        set_(self, "ips", frozenset(h.ip for h in self.hosts if h.ip is not None))

    def check(self, url: ParsedUrl) -> str | None:
        """Return why `url` is refused, or None when it passes."""
        if url.scheme not in self.schemes:
            return f"expected a URL with scheme among {', '.join(sorted(self.schemes))}"
        if self.ports is None:
            if url.port is not None:
                return "expected the scheme's default port"
        elif url.effective_port not in self.ports:
            return f"expected a port among {', '.join(map(str, sorted(self.ports)))}"
        if url.ip is not None:
            if url.ip in self.ips:
                return None
            if not (self.allow_ip_literals and self.any_domain):
                return "expected a host name allowed by the constraint, not an IP address literal"
            category = ip_category(url.ip)
            if category == "metadata":
                return "expected an address other than a cloud metadata endpoint"
            if category is not None and not self.allow_private:
                return f"expected a public address, not a {category} one"
            return None
        host = url.host
        if not (
            self.any_domain or host in self.exact or any(host.endswith(s) for s in self.suffixes)
        ):
            return "expected a host allowed by the constraint"
        if is_local_name(host) and not self.allow_private:
            return "expected a public host name, not a loopback one"
        return None


@dataclass(frozen=True, slots=True)
class Constraint:
    """Every operator on one argument path, compiled; all of them must hold.

    `operators` keeps the operands as written (arrays as tuples, tables as sorted key/value
    pairs) for display and records; the other fields are the compiled form.
    """

    path: str
    operators: tuple[tuple[str, object], ...]
    plan: _Plan = field(repr=False, compare=False)


class _Plan:
    """The compiled form of a `Constraint`: what to walk, how to canonicalise, what to check."""

    __slots__ = ("canonicaliser", "checks", "head", "roots", "steps", "url_rules")

    def __init__(
        self,
        head: str,
        steps: tuple[str | None, ...],
        canonicaliser: str | None,
        roots: tuple[tuple[str, ...], ...],
        url_rules: tuple[UrlRule, ...],
        checks: tuple[tuple[str, _Check], ...],
    ) -> None:
        self.head = head
        self.steps = steps
        self.canonicaliser = canonicaliser
        self.roots = roots
        self.url_rules = url_rules
        self.checks = checks

    def merged(self, other: _Plan) -> _Plan:
        """Both plans on the same path; one canonical form, or `conflict` when they disagree."""
        canonicaliser = self.canonicaliser
        if other.canonicaliser is not None and other.canonicaliser != canonicaliser:
            canonicaliser = other.canonicaliser if canonicaliser is None else "conflict"
        return _Plan(
            self.head,
            self.steps,
            canonicaliser,
            self.roots + other.roots,
            self.url_rules + other.url_rules,
            self.checks + other.checks,
        )


@dataclass(frozen=True, slots=True)
class Constraints:
    """A conjunction of constraints, at most one per argument path."""

    items: tuple[Constraint, ...] = ()

    @classmethod
    def all_of(cls, sets: Iterable[Constraints]) -> Constraints:
        """AND several sets into one; constraints on the same path are merged."""
        merged: dict[str, Constraint] = {}
        for constraints in sets:
            for item in constraints.items:
                existing = merged.get(item.path)
                merged[item.path] = (
                    item
                    if existing is None
                    else Constraint(
                        item.path,
                        existing.operators + item.operators,
                        existing.plan.merged(item.plan),
                    )
                )
        return cls(tuple(merged.values()))


def check_arguments(
    constraints: Constraints | Sequence[Constraints],
    arguments: Mapping[str, JSONValue],
    *,
    realpath: Realpath | None = None,
) -> CheckResult:
    """Check `arguments` against every constraint and canonicalise what was checked.

    `constraints` is one set or several to AND together. `realpath`, when given, resolves
    symlinks for `within` (it is called with canonical paths and roots; OSError or ValueError
    from it is a violation).
    """
    plans: Iterable[_Plan]
    if isinstance(constraints, Constraints):
        plans = [item.plan for item in constraints.items]
    else:
        by_path: dict[str, _Plan] = {}
        for each in constraints:
            for item in each.items:
                existing = by_path.get(item.path)
                by_path[item.path] = item.plan if existing is None else existing.merged(item.plan)
        plans = by_path.values()
    copied = _copy_object(arguments)
    violations: list[Violation] = []
    resolver = None if realpath is None else _Resolver(realpath)
    for constraint in plans:
        head = constraint.head
        if len(constraint.steps) > 1:
            _walk_object(constraint, copied, 0, head, "", violations, resolver)
        elif head in copied:
            copied[head] = _check_leaf(constraint, copied[head], head, violations, resolver)
        else:
            violations.append(Violation(head, "path", "expected the argument to be present"))
    return CheckResult(not violations, tuple(violations), copied)


def _copy_object(value: Mapping[str, JSONValue]) -> dict[str, JSONValue]:
    copied: dict[str, JSONValue] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            item = _copy_object(item)
        elif isinstance(item, list):
            item = _copy_array(item)
        copied[key] = item
    return copied


def _copy_array(value: list[JSONValue]) -> list[JSONValue]:
    copied: list[JSONValue] = []
    for item in value:
        if isinstance(item, dict):
            item = _copy_object(item)
        elif isinstance(item, list):
            item = _copy_array(item)
        copied.append(item)
    return copied


def _walk_object(
    constraint: _Plan,
    node: dict[str, JSONValue],
    index: int,
    name: str,
    where: str,
    violations: list[Violation],
    resolver: _Resolver | None,
) -> None:
    here = f"{where}.{name}" if where else name
    if name not in node:
        violations.append(Violation(here, "path", "expected the argument to be present"))
        return
    value = node[name]
    if index + 1 == len(constraint.steps):
        node[name] = _check_leaf(constraint, value, here, violations, resolver)
    else:
        _walk_value(constraint, value, index + 1, here, violations, resolver)


def _walk_value(
    constraint: _Plan,
    node: JSONValue,
    index: int,
    where: str,
    violations: list[Violation],
    resolver: _Resolver | None,
) -> None:
    name = constraint.steps[index]
    if name is not None:
        if not isinstance(node, dict):
            violations.append(Violation(where, "path", "expected an object"))
            return
        _walk_object(constraint, node, index, name, where, violations, resolver)
        return
    if not isinstance(node, list):
        violations.append(Violation(where, "path", "expected an array"))
        return
    last = index + 1 == len(constraint.steps)
    for position, item in enumerate(node):
        here = f"{where}[{position}]"
        if last:
            node[position] = _check_leaf(constraint, item, here, violations, resolver)
        else:
            _walk_value(constraint, item, index + 1, here, violations, resolver)


class _Resolver:
    """Wraps the caller's realpath with a per-call cache (roots repeat across values)."""

    __slots__ = ("_cache", "_realpath")

    def __init__(self, realpath: Realpath) -> None:
        self._realpath = realpath
        self._cache: dict[str, str | None] = {}

    def resolve(self, path: str) -> str | None:
        if path not in self._cache:
            try:
                self._cache[path] = canonical_path(self._realpath(path))
            except (OSError, ValueError):
                self._cache[path] = None
        return self._cache[path]


def _check_leaf(
    constraint: _Plan,
    value: JSONValue,
    where: str,
    violations: list[Violation],
    resolver: _Resolver | None,
) -> JSONValue:
    canonical = value
    kind = constraint.canonicaliser
    if kind == "path":
        if not isinstance(value, str):
            violations.append(Violation(where, "within", "expected a string path"))
            return value
        try:
            canonical = canonical_path(value)
        except CanonicalisationError as exc:
            violations.append(Violation(where, "within", str(exc)))
            return value
        for roots in constraint.roots:
            for root in roots:
                if path_within(canonical, root):
                    break
            else:
                violations.append(
                    Violation(where, "within", "expected a path within the allowed roots")
                )
                return value
        if resolver is not None:
            resolved = resolver.resolve(canonical)
            if resolved is None:
                violations.append(Violation(where, "within", "expected a resolvable path"))
                return value
            for roots in constraint.roots:
                if not any(
                    (real_root := resolver.resolve(root)) is not None
                    and path_within(resolved, real_root)
                    for root in roots
                ):
                    violations.append(
                        Violation(where, "within", "expected a path that resolves within the roots")
                    )
                    return value
            canonical = resolved
    elif kind == "url":
        if not isinstance(value, str):
            violations.append(Violation(where, "url", "expected a string URL"))
            return value
        try:
            parsed = parse_url(value)
        except CanonicalisationError as exc:
            violations.append(Violation(where, "url", str(exc)))
            return value
        for rule in constraint.url_rules:
            reason = rule.check(parsed)
            if reason is not None:
                violations.append(Violation(where, "url", reason))
                return value
        canonical = parsed.url
    elif kind == "conflict":
        violations.append(
            Violation(where, "within", "expected one canonical form, but both path and URL apply")
        )
        return value
    for operator, check in constraint.checks:
        reason = check(canonical)
        if reason is not None:
            violations.append(Violation(where, operator, reason))
    return canonical


class _Spec:
    """Where a piece of a definition sits, for error messages."""

    __slots__ = ("field", "scope", "source")

    def __init__(self, source: str, scope: str | None, field: str) -> None:
        self.source = source
        self.scope = scope
        self.field = field

    def at(self, name: str) -> _Spec:
        return _Spec(self.source, self.scope, f"{self.field}.{name}")

    def error(self, expected: str, value: object = None, *, show: bool = True) -> ScopeSyntaxError:
        return ScopeSyntaxError(
            self.source,
            expected,
            scope=self.scope,
            field=self.field,
            value=value,
            has_value=show,
        )


def parse_constraints(
    args: object,
    *,
    source: str = "<constraints>",
    scope: str | None = None,
    field: str = "args",
) -> Constraints:
    """Compile an `args` table (TOML or JSON shape) into `Constraints`.

    Raises:
        ScopeSyntaxError: names `source`, `scope` and the field, and says what was expected.
    """
    spec = _Spec(source, scope, field)
    table = _as_table(args)
    if table is None:
        raise spec.error("a table mapping argument paths to operator tables", args)
    items: list[Constraint] = []
    for key, operators in table.items():
        arg_path = parse_arg_path(key)
        if arg_path is None:
            raise spec.error("an argument path such as 'a', 'a.b', 'a[*]' or 'a[*].b'", key)
        items.append(_parse_constraint(arg_path, operators, spec.at(key)))
    return Constraints(tuple(items))


def _freeze(value: object) -> object:
    """An operand made immutable: arrays become tuples, tables sorted (key, value) pairs."""
    table = _as_table(value)
    if table is not None:
        return tuple(sorted((key, _freeze(item)) for key, item in table.items()))
    listed = _as_list(value)
    if listed is not None:
        return tuple(_freeze(item) for item in listed)
    return value


def _as_table(value: object) -> dict[str, object] | None:
    if not isinstance(value, Mapping):
        return None
    mapping = cast("Mapping[object, object]", value)
    return {key if isinstance(key, str) else repr(key): item for key, item in mapping.items()}


def _as_list(value: object) -> list[object] | None:
    return cast("list[object]", value) if isinstance(value, list) else None


def _parse_constraint(arg_path: ArgPath, operators: object, spec: _Spec) -> Constraint:
    table = _as_table(operators)
    if not table:
        raise spec.error(f"a table of at least one operator ({', '.join(OPERATORS)})", operators)
    entries = sorted(table.items())
    names = {name for name, _ in entries}
    if "within" in names and "url" in names:
        raise spec.error("either 'within' or 'url' on one path, not both", show=False)
    roots: list[tuple[str, ...]] = []
    url_rules: list[UrlRule] = []
    checks: list[tuple[str, _Check]] = []
    for name, operand in entries:
        op_spec = spec.at(name)
        if name == "within":
            roots.append(_parse_roots(operand, op_spec))
        elif name == "url":
            url_rules.append(_parse_url_rule(operand, op_spec))
        elif name in _SCALAR_PARSERS:
            checks.append((name, _SCALAR_PARSERS[name](operand, op_spec)))
        else:
            raise spec.error(f"an operator among {', '.join(OPERATORS)}", name)
    canonicaliser = "path" if roots else "url" if url_rules else None
    plan = _Plan(
        arg_path.head,
        arg_path.steps,
        canonicaliser,
        tuple(roots),
        tuple(url_rules),
        tuple(checks),
    )
    return Constraint(
        arg_path.text, tuple((name, _freeze(operand)) for name, operand in entries), plan
    )


def _parse_roots(operand: object, spec: _Spec) -> tuple[str, ...]:
    listed = _as_list(operand)
    values = [operand] if listed is None else listed
    if not values:
        raise spec.error("an absolute path or a non-empty list of them", operand)
    roots: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise spec.error("an absolute path (string)", value)
        try:
            canonical = canonical_path(value)
        except CanonicalisationError as exc:
            raise spec.error(f"a root accepted by the path rules ({exc})", value) from None
        if value not in (canonical, canonical + "/"):
            raise spec.error(f"a root in canonical form ({canonical!r})", value)
        roots.append(canonical)
    return tuple(roots)


def _parse_url_rule(operand: object, spec: _Spec) -> UrlRule:
    table = _as_table(operand)
    if table is None:
        raise spec.error("a table with 'hosts' and optional " + ", ".join(_URL_KEYS), operand)
    for key in table:
        if key not in _URL_KEYS:
            raise spec.error(f"only the keys {', '.join(_URL_KEYS)}", key)
    allow_private = _bool(table.get("allow_private", False), spec.at("allow_private"))
    allow_ip = _bool(table.get("allow_ip_literals", False), spec.at("allow_ip_literals"))
    hosts_spec = spec.at("hosts")
    raw_hosts = _str_list(table.get("hosts"), hosts_spec, "a non-empty list of host names")
    hosts: list[HostPattern] = []
    for entry in raw_hosts:
        try:
            pattern = parse_host_pattern(entry)
        except CanonicalisationError as exc:
            raise hosts_spec.error(
                f"a host, '*.host', '*' or an IP literal ({exc})", entry
            ) from None
        if pattern.ip is not None:
            category = ip_category(pattern.ip)
            if not allow_ip:
                raise hosts_spec.error("allow_ip_literals = true to list an IP literal", entry)
            if category not in (None, "metadata") and not allow_private:
                raise hosts_spec.error(f"allow_private = true to list a {category} address", entry)
        elif pattern.kind == "exact" and is_local_name(pattern.value) and not allow_private:
            raise hosts_spec.error("allow_private = true to list a loopback name", entry)
        hosts.append(pattern)
    schemes_spec = spec.at("schemes")
    schemes = _str_list(table.get("schemes", ["https"]), schemes_spec, "a non-empty list")
    for scheme in schemes:
        if scheme not in DEFAULT_PORTS:
            raise schemes_spec.error("schemes among http, https, ws, wss", scheme)
    ports: frozenset[int] | None = None
    if "ports" in table:
        ports_spec = spec.at("ports")
        raw_ports = _as_list(table["ports"])
        if not raw_ports:
            raise ports_spec.error("a non-empty list of ports", table["ports"])
        checked: list[int] = []
        for port in raw_ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
                raise ports_spec.error("ports between 1 and 65535", port)
            checked.append(port)
        ports = frozenset(checked)
    return UrlRule(tuple(hosts), frozenset(schemes), allow_private, allow_ip, ports)


def _bool(value: object, spec: _Spec) -> bool:
    if not isinstance(value, bool):
        raise spec.error("true or false", value)
    return value


def _str_list(value: object, spec: _Spec, expected: str) -> list[str]:
    items = _as_list(value)
    if not items:
        raise spec.error(expected, value)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise spec.error("strings only", item)
        out.append(item)
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar(value: object, spec: _Spec) -> JSONScalar:
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise spec.error("a string, a finite number, a boolean or null", value)


def _membership(allowed: Sequence[JSONScalar], message: str) -> _Check:
    strings = frozenset(v for v in allowed if isinstance(v, str))
    numbers = frozenset(v for v in allowed if _is_number(v))
    bools = frozenset(v for v in allowed if isinstance(v, bool))
    has_null = any(v is None for v in allowed)

    def check(value: JSONValue) -> str | None:
        if isinstance(value, str):
            found = value in strings
        elif isinstance(value, bool):
            found = value in bools
        elif isinstance(value, int | float):
            found = value in numbers
        elif value is None:
            found = has_null
        else:
            found = False
        return None if found else message

    return check


def _parse_one_of(operand: object, spec: _Spec) -> _Check:
    items = _as_list(operand)
    if not items:
        raise spec.error("a non-empty list of values", operand)
    allowed = [_scalar(item, spec) for item in items]
    return _membership(allowed, f"expected one of the {len(allowed)} allowed values")


def _parse_equals(operand: object, spec: _Spec) -> _Check:
    return _membership([_scalar(operand, spec)], "expected the value the constraint requires")


def _parse_pattern(operand: object, spec: _Spec) -> _Check:
    if not isinstance(operand, str) or len(operand) > _MAX_PATTERN:
        raise spec.error(f"a regular expression of at most {_MAX_PATTERN} characters", operand)
    try:
        compiled = re.compile(operand)
    except re.error as exc:
        raise spec.error(f"a valid regular expression ({exc})", operand) from None
    if _has_nested_repeat(operand):
        raise spec.error(
            "a regular expression without a repeated group that itself repeats, such as (a+)+",
            operand,
        )

    def check(value: JSONValue) -> str | None:
        if not isinstance(value, str):
            return "expected a string"
        if len(value) > _MAX_PATTERN_INPUT:
            return f"expected at most {_MAX_PATTERN_INPUT} characters for a pattern match"
        return None if compiled.fullmatch(value) else "expected a string matching the pattern"

    return check


_REPEAT_BRACE = re.compile(r"\{[0-9]*(?:,[0-9]*)?\}")


def _has_nested_repeat(pattern: str) -> bool:
    """Whether a group containing `*`, `+` or `{m,n}` is itself repeated, like `(a+)+`.

    Such patterns backtrack catastrophically. A heuristic over a pattern `re` already compiled:
    escapes and character classes are skipped; overlapping alternations such as `(a|aa)*`, and
    verbose-mode tricks, are not caught.
    """
    inside: list[bool] = [False]  # per open group: does it contain a repeat?
    group_repeats = False  # the atom just closed is a group containing a repeat
    index = 0
    while index < len(pattern):
        char = pattern[index]
        repeat = char in "*+" or (char == "{" and _REPEAT_BRACE.match(pattern, index) is not None)
        if repeat and group_repeats:
            return True
        group_repeats = False
        if repeat:
            inside[-1] = True
        elif char == "\\":
            index += 1
        elif char == "[":
            index = _class_end(pattern, index)
        elif char == "(":
            inside.append(False)
            if pattern.startswith("?", index + 1):
                index += 1
        elif char == ")":
            group_repeats = inside.pop() if len(inside) > 1 else False
            inside[-1] = inside[-1] or group_repeats
        index += 1
    return False


def _class_end(pattern: str, start: int) -> int:
    """Index of the `]` closing the character class opened at `start`."""
    index = start + 1
    if pattern.startswith("^", index):
        index += 1
    if pattern.startswith("]", index):
        index += 1
    while pattern[index] != "]":
        index += 2 if pattern[index] == "\\" else 1
    return index


def _parse_range(operand: object, spec: _Spec) -> _Check:
    table = _as_table(operand)
    if not table:
        raise spec.error("a table with 'min' and/or 'max'", operand)
    bounds: dict[str, float] = {}
    for key, bound in table.items():
        if key not in ("min", "max"):
            raise spec.error("only the keys min, max", key)
        if (
            isinstance(bound, bool)
            or not isinstance(bound, int | float)
            or not math.isfinite(bound)
        ):
            raise spec.at(key).error("a finite number", bound)
        bounds[key] = bound
    low = bounds.get("min", -math.inf)
    high = bounds.get("max", math.inf)
    if low > high:
        raise spec.error("min <= max", operand)
    message = f"expected a number in [{_fmt(low)}, {_fmt(high)}]"

    def check(value: JSONValue) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "expected a number"
        if not math.isfinite(value) or not low <= value <= high:
            return message
        return None

    return check


def _fmt(bound: float) -> str:
    return "-inf" if bound == -math.inf else "inf" if bound == math.inf else repr(bound)


def _parse_max_length(operand: object, spec: _Spec) -> _Check:
    if isinstance(operand, bool) or not isinstance(operand, int) or operand < 0:
        raise spec.error("a non-negative integer", operand)
    limit = operand
    message = f"expected at most {limit} characters or items"

    def check(value: JSONValue) -> str | None:
        if not isinstance(value, str | list):
            return "expected a string or an array"
        return None if len(value) <= limit else message

    return check


def _parse_no_flag(operand: object, spec: _Spec) -> _Check:
    if operand is not True:
        raise spec.error("true (omit no_flag to allow flags)", operand)
    return _no_flag


def _no_flag(value: JSONValue) -> str | None:
    if isinstance(value, str):
        return "expected a value not starting with '-'" if _is_flag(value) else None
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                return "expected an array of strings"
            if _is_flag(item):
                return "expected no element starting with '-'"
        return None
    return "expected a string or an array of strings"


def _is_flag(text: str) -> bool:
    return text.lstrip().startswith("-")


_SCALAR_PARSERS: dict[str, Callable[[object, _Spec], _Check]] = {
    "equals": _parse_equals,
    "max_length": _parse_max_length,
    "no_flag": _parse_no_flag,
    "one_of": _parse_one_of,
    "pattern": _parse_pattern,
    "range": _parse_range,
}
