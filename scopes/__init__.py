"""The scope and argument-constraint language. Pure and synchronous; no I/O except reading the
files handed to `load_scope_files`. Knows nothing of tokens, HTTP or MCP.

Modules:
    errors       ScopeError -> ScopeSyntaxError (definitions), CanonicalisationError (arguments)
    definitions  parse_scope_toml, load_scope_files, parse_authorization_details
    model        Label, ApprovalMode, Grant, ScopeDefinition
    constraints  operators compiled at load time; check_arguments -> CheckResult
    argpaths     `a`, `a.b`, `a[*]`, `a[*].b`
    paths        canonical_path and component-wise containment (`within`)
    urls         canonical_url: one strict WHATWG-style parse; IP range classification (`url`)
    globs        tool-name globs (`*`, `?`), compiled
    matching     tool_matches, grants_for

A grant covers (connector, tool globs) and carries `Constraints`; several grants covering one
tool are alternatives, while `check_arguments([grant.constraints, token_narrowing], args)` ANDs
sets. A check returns violations as values and the canonical arguments to forward.
"""

from scopes.constraints import (
    CheckResult,
    Constraint,
    Constraints,
    JSONValue,
    Realpath,
    Violation,
    check_arguments,
    parse_constraints,
)
from scopes.definitions import load_scope_files, parse_authorization_details, parse_scope_toml
from scopes.errors import CanonicalisationError, ScopeError, ScopeSyntaxError
from scopes.globs import ToolPatterns
from scopes.matching import grants_for, tool_matches
from scopes.model import ApprovalMode, Grant, Label, ScopeDefinition
from scopes.paths import canonical_path, path_within
from scopes.urls import canonical_url

__all__ = [
    "ApprovalMode",
    "CanonicalisationError",
    "CheckResult",
    "Constraint",
    "Constraints",
    "Grant",
    "JSONValue",
    "Label",
    "Realpath",
    "ScopeDefinition",
    "ScopeError",
    "ScopeSyntaxError",
    "ToolPatterns",
    "Violation",
    "canonical_path",
    "canonical_url",
    "check_arguments",
    "grants_for",
    "load_scope_files",
    "parse_authorization_details",
    "parse_constraints",
    "parse_scope_toml",
    "path_within",
    "tool_matches",
]
