"""Redaction of secrets before anything is recorded. Pure; stdlib only (hmac, hashlib, re).

A secret is never stored. In its place goes a keyed HMAC (``hmac-sha256:`` and the first 16 hex
digits of HMAC-SHA256 under the recording key), so a reviewer can still see that two calls used
the same value without learning it. What counts as a secret:

- any value under a key whose name says so (password, secret, token, api key, authorization,
  cookie, credential, private key, ...; but not counters such as ``max_tokens``);
- values shaped like credentials: PEM private keys, AWS access key ids and secret keys, GitHub
  and Slack tokens, JWTs, ``Bearer``/``Basic`` credentials, and long high-entropy strings;
- values the shell knows are secret (``known``: the broker's connector credentials, tokens,
  canaries), wherever they occur.

A whole value that is a secret becomes ``{"redacted": "hmac-sha256:<hex16>"}``; a secret inside
longer text is replaced in place by ``[redacted hmac-sha256:<hex16>]``. Text is data, never
markup: nothing is escaped here (the review page escapes on output).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

__all__ = ["REDACTED_KEY", "Redactor", "is_redaction"]

REDACTED_KEY = "redacted"
_MARK = "hmac-sha256:"

_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "pwd",
        "secret",
        "secrets",
        "token",
        "apikey",
        "authorization",
        "auth",
        "cookie",
        "cookies",
        "credential",
        "credentials",
        "privatekey",
        "accesskey",
        "secretkey",
        "sessionkey",
        "signature",
        "bearer",
        "jwt",
    }
)
_SECRET_PAIRS = frozenset(
    {("api", "key"), ("private", "key"), ("access", "key"), ("secret", "key"), ("set", "cookie")}
)
# Words that turn a secret-sounding key into a count or a description of one.
_BENIGN_WORDS = frozenset(
    {
        "count",
        "counts",
        "max",
        "min",
        "limit",
        "num",
        "number",
        "length",
        "len",
        "usage",
        "used",
        "type",
        "types",
        "kind",
        "id",
        "ids",
        "expires",
        "expiry",
        "ttl",
        "url",
        "uri",
        "endpoint",
        "file",
        "path",
        "env",
        "ref",
        "name",
        "hint",
        "required",
        "policy",
        "present",
    }
)

_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        r"[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)"
    ),
    re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA)[A-Z0-9]{16}(?![A-Z0-9])"),
    re.compile(r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36,251}(?![A-Za-z0-9_])"),
    re.compile(r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,255}"),
    re.compile(r"(?<![A-Za-z0-9])xox[abposre]-[A-Za-z0-9-]{10,250}"),
    re.compile(r"(?<![A-Za-z0-9])xapp-[A-Za-z0-9-]{10,250}"),
    re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]+"),
    re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
    re.compile(r"(?<![A-Za-z0-9_])sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}"),
    re.compile(r"(?<![A-Za-z0-9_])AIza[A-Za-z0-9_-]{35}"),
)
_SHAPED = re.compile("|".join(f"(?:{p.pattern})" for p in _PATTERNS))
_MIN_SECRET = 8
_KEY_MEMO_SIZE = 4096
_KEY_MEMO_LENGTH = 64
# Credentials after an HTTP auth scheme: the scheme stays, the credential goes.
_AUTH_SCHEME = re.compile(
    r"\b([Bb]earer|BEARER|[Bb]asic|BASIC|[Tt]oken)(\s+)"
    r"((?=[A-Za-z0-9._~+/=-]*(?:[0-9._~+/=-]|[a-z][A-Z]|[A-Z][a-z]*[A-Z]))[A-Za-z0-9._~+/=-]{8,})"
)
_ASSIGNMENT = re.compile(
    r"(?i)\b([A-Za-z0-9_-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)"
    r"[A-Za-z0-9_-]*)(\s*[=:]\s*)([^\s'\";&,]{4,})"
)
_CANDIDATE = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/=_-]{32,}(?![A-Za-z0-9+/=_-])")
_ENTROPY_BITS = 3.5
_UPPER = re.compile(r"[A-Z]")
_LOWER = re.compile(r"[a-z]")
_DIGIT = re.compile(r"[0-9]")
_WORD = re.compile(r"[A-Z]?[a-z]{2,}")
_VOWELS = frozenset("aeiou")
_WORDY = 0.5


def _key_words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


@functools.lru_cache(maxsize=4096)
def _secret_key(name: str) -> bool:
    words = _key_words(name)
    if not words or _BENIGN_WORDS.intersection(words):
        return False
    joined = "".join(words)
    if joined in _SECRET_WORDS or _SECRET_WORDS.intersection(words):
        return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _wordiness(s: str) -> float:
    """The share of ``s`` made of pronounceable word pieces (``User``, ``profile``, ``Card``)."""
    return sum(len(w) for w in _WORD.findall(s) if _VOWELS.intersection(w.lower())) / len(s)


def _high_entropy(s: str) -> bool:
    """Random-looking: mixes upper, lower and digits, varied, and not made of words.

    Hex digests, UUIDs and ULIDs (one letter case), identifiers and paths are kept; about one
    random 32-character string in a hundred reads as wordy and is kept too.
    """
    mixed = _UPPER.search(s) and _LOWER.search(s) and _DIGIT.search(s)
    return bool(mixed) and _entropy(s) >= _ENTROPY_BITS and _wordiness(s) < _WORDY


def is_redaction(value: object) -> bool:
    """Whether ``value`` is a whole-value redaction marker."""
    if not isinstance(value, Mapping):
        return False
    m = cast("Mapping[object, object]", value)
    tag = m.get(REDACTED_KEY)
    return len(m) == 1 and isinstance(tag, str) and tag.startswith(_MARK)


class Redactor:
    """Replaces secrets by keyed HMACs; the key is the broker's recording key.

    ``known`` are exact values to redact wherever they appear (at least 8 characters, to avoid
    erasing ordinary words). ``excerpt_chars`` bounds recorded result text.
    """

    __slots__ = ("_clean", "_excerpt_chars", "_key", "_keys", "_known")

    def __init__(self, key: bytes, *, known: Iterable[str] = (), excerpt_chars: int = 2048) -> None:
        if len(key) < 16:
            raise ValueError("the recording key must be at least 16 bytes")
        if excerpt_chars < 0:
            raise ValueError("excerpt_chars must not be negative")
        self._key = key
        self._known = tuple(sorted({k for k in known if len(k) >= 8}, key=len, reverse=True))
        self._excerpt_chars = excerpt_chars
        self._keys: dict[str, tuple[str, bool]] = {}
        """Mapping keys seen before: (scrubbed, names a secret). Keys repeat on every call."""
        self._clean: set[str] = set()
        """Short string values seen before that hold no secret (tool names, methods, scope and
        connector ids repeat on every call). Never a secret: only values redaction left as
        they were are remembered. Bounded like ``_keys``."""

    def fingerprint(self, secret: str) -> str:
        """``hmac-sha256:<hex16>`` of ``secret`` under the key: equal values, equal marks."""
        mac = hmac.new(self._key, secret.encode("utf-8", "replace"), hashlib.sha256)
        return _MARK + mac.hexdigest()[:16]

    def _marker(self, secret: str) -> dict[str, str]:
        return {REDACTED_KEY: self.fingerprint(secret)}

    def _inline(self, secret: str) -> str:
        return f"[redacted {self.fingerprint(secret)}]"

    def scrub_text(self, text: str) -> str:
        """``text`` with every secret inside it replaced in place."""
        for known in self._known:
            if known in text:
                text = text.replace(known, self._inline(known))
        if len(text) < _MIN_SECRET:
            return text
        text = _SHAPED.sub(lambda m: self._inline(m.group(0)), text)
        text = _AUTH_SCHEME.sub(
            lambda m: m.group(1) + m.group(2) + self._keep_marks(m.group(3)), text
        )
        text = _ASSIGNMENT.sub(self._assignment, text)
        return _CANDIDATE.sub(
            lambda m: self._inline(m.group(0)) if _high_entropy(m.group(0)) else m.group(0), text
        )

    def _assignment(self, m: re.Match[str]) -> str:
        name, sep, value = m.group(1), m.group(2), m.group(3)
        if not _secret_key(name) or value.isdigit():
            return m.group(0)
        return name + sep + self._keep_marks(value)

    def _keep_marks(self, value: str) -> str:
        # A credential already replaced by a pattern above is not redacted twice.
        return value if value.startswith(("[redacted", "redacted")) else self._inline(value)

    def _whole_secret(self, text: str) -> bool:
        if text in self._known:
            return True
        if _SHAPED.fullmatch(text):
            return True
        if _AUTH_SCHEME.fullmatch(text):
            return True
        return bool(_CANDIDATE.fullmatch(text)) and _high_entropy(text)

    def redact(self, value: object) -> Any:
        """A copy of a JSON-shaped ``value`` with every secret replaced (see the module doc)."""
        kind = type(value)
        # Exact types first: this runs on every recorded event, where ABC checks add up.
        if value is None or kind is bool or kind is int or kind is float:
            return value
        if kind is str or (kind is not dict and kind is not list and isinstance(value, str)):
            value = cast(str, value)
            if value in self._clean:
                return value
            if self._whole_secret(value):
                return self._marker(value)
            scrubbed = self.scrub_text(value)
            if scrubbed == value and len(value) <= _KEY_MEMO_LENGTH:
                if len(self._clean) >= _KEY_MEMO_SIZE:
                    self._clean.clear()
                self._clean.add(value)
            return scrubbed
        if kind is dict or (kind is not list and isinstance(value, Mapping)):
            out: dict[str, Any] = {}
            for k, v in cast("Mapping[object, object]", value).items():
                key, secret = self._mapping_key(k) if isinstance(k, str) else (str(k), False)
                if secret and not _plain_scalar(v):
                    out[key] = v if is_redaction(v) else self._marker(_stable_text(v))
                else:
                    out[key] = self.redact(v)
            return out
        if kind is list or isinstance(value, list | tuple):
            return [self.redact(v) for v in cast("Sequence[object]", value)]
        return value

    def _mapping_key(self, k: str) -> tuple[str, bool]:
        """``k`` scrubbed, and whether it names a secret; remembered for short keys.

        The memory is bounded (emptied when full): keys come from agents and downstreams.
        """
        known = self._keys.get(k)
        if known is None:
            known = (self.scrub_text(k), _secret_key(k))
            if len(k) <= _KEY_MEMO_LENGTH:
                if len(self._keys) >= _KEY_MEMO_SIZE:
                    self._keys.clear()
                self._keys[k] = known
        return known

    def excerpt(self, text: str, limit: int | None = None) -> dict[str, Any]:
        """A bounded, redacted excerpt of result text and the size of the whole.

        Shape: ``{"text": first N characters (redacted), "chars": len(text),
        "bytes": UTF-8 size, "truncated": bool}``.
        """
        n = self._excerpt_chars if limit is None else limit
        # Scrub a window wider than the cut, so a secret straddling the cut is caught whole.
        window = self.scrub_text(text[: n + 8192])
        return {
            "text": window[:n],
            "chars": len(text),
            "bytes": len(text.encode("utf-8", "replace")),
            "truncated": len(window) > n or len(text) > n + 8192,
        }


def _plain_scalar(value: object) -> bool:
    return value is None or isinstance(value, bool)


def _stable_text(value: object) -> str:
    if isinstance(value, str):
        return value
    return repr(_sorted(value))


def _sorted(value: object) -> object:
    if isinstance(value, Mapping):
        m = cast("Mapping[object, object]", value)
        return sorted(((str(k), _sorted(v)) for k, v in m.items()), key=lambda kv: kv[0])
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in cast("Sequence[object]", value)]
    return value
