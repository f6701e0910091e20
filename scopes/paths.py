"""Filesystem path canonicalisation and containment (`within`). Pure; no I/O.

POSIX semantics, decided as follows. A path must be an absolute `str` starting with `/` (relative
paths and `~` are refused). Refused outright, never repaired: NUL and other control or format
characters (Unicode Cc, Cf, Cs, Co, Cn, Zl, Zp), backslash, any `%XX` percent-encoding sequence,
a `..` that would climb above `/`, components longer than 255 UTF-8 bytes, paths longer than
4096 bytes, and ambiguous Unicode: the path is normalised to NFC, and any character that NFKC
would change (fullwidth solidus U+FF0F, one-dot leader U+2024, ligatures, ...) or that merely
looks like `/` or `.` (division slash U+2215, fraction slash U+2044, ...) is refused. `.`, empty
components (`//`) and a trailing `/` are dropped and `..` pops a component. Containment compares
whole components, so `/srv/ws_evil` is not within `/srv/ws`; a root is within itself. Symlinks
are the caller's business: `check_arguments(realpath=...)` injects a resolver.
"""

from __future__ import annotations

import re
import unicodedata

from scopes.errors import CanonicalisationError

__all__ = ["canonical_path", "path_components", "path_within"]

_MAX_PATH_BYTES = 4096
_MAX_COMPONENT_BYTES = 255
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# Characters that render like a solidus or a full stop but are not, and that NFKC leaves alone.
_LOOKALIKES = frozenset(
    "\u2215\u2044\u29f8\u29f5\u29f9\u2571\u27cb\u27cd\u2216\u3033\u0338\u0337\u20eb"
    "\u2024\u2025\u2026\u2027\u2e31\u2e33\u3002\u06d4\u0701\u0702\ua4f8\ua60e\u2e3c"
    "\u0589\u1362\ufe52\uff0e\uff0f\uff3c\ufe68\uff61"
)
_ASCII_SAFE = re.compile(r"[\x20-\x7e]*")
# Already canonical and plain: printable ASCII without '%' or '\\', no empty, '.' or '..'
# component, no trailing '/'. At most 255 characters, so no length limit can be hit.
_PLAIN = re.compile(r"/|(?:/(?!\.\.?(?:/|\Z))[\x20-\x24\x26-\x2e\x30-\x5b\x5d-\x7e]+)+")
_PLAIN_MAX = 255


def canonical_path(path: str) -> str:
    """Return the canonical form of the absolute POSIX path `path`.

    Raises:
        CanonicalisationError: the path is not absolute, contains a refused character or
            sequence, climbs above `/`, or is too long. The message never repeats the path.
    """
    if len(path) <= _PLAIN_MAX and _PLAIN.fullmatch(path) is not None:
        return path
    return _canonical_path_slow(path)


def _canonical_path_slow(path: str) -> str:
    if not path.startswith("/"):
        raise CanonicalisationError("expected an absolute path starting with '/'")
    if "\\" in path:
        raise CanonicalisationError("expected a path without backslashes")
    if _PERCENT.search(path):
        raise CanonicalisationError("expected a path without percent-encoded sequences")
    if _ASCII_SAFE.fullmatch(path) is None:
        path = _check_unicode(path)
    components: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not components:
                raise CanonicalisationError("expected a path that does not climb above '/'")
            components.pop()
            continue
        if len(part.encode("utf-8")) > _MAX_COMPONENT_BYTES:
            raise CanonicalisationError(
                f"expected path components of at most {_MAX_COMPONENT_BYTES} bytes"
            )
        components.append(part)
    result = "/" + "/".join(components)
    if len(result.encode("utf-8")) > _MAX_PATH_BYTES:
        raise CanonicalisationError(f"expected a path of at most {_MAX_PATH_BYTES} bytes")
    return result


def _check_unicode(path: str) -> str:
    for char in path:
        if char < " " or char == "\x7f":
            raise CanonicalisationError("expected a path without control characters")
    nfc = unicodedata.normalize("NFC", path)
    for char in nfc:
        if char in _LOOKALIKES:
            raise CanonicalisationError(
                "expected a path without characters that look like '/' or '.'"
            )
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise CanonicalisationError(
                "expected a path without control, format or unassigned characters"
            )
    if unicodedata.normalize("NFKC", nfc) != nfc:
        raise CanonicalisationError(
            "expected a path without compatibility characters (unchanged by NFKC)"
        )
    return nfc


def path_components(canonical: str) -> tuple[str, ...]:
    """Split a canonical path into its components (`/` has none)."""
    if canonical == "/":
        return ()
    return tuple(canonical[1:].split("/"))


def path_within(canonical: str, root: str) -> bool:
    """Whether canonical path `canonical` is `root` or below it, comparing whole components."""
    if root == "/":
        return True
    return canonical == root or canonical.startswith(root + "/")
