"""Watched values and their encoded forms, cut into chunks for matching. Pure; stdlib only.

A value the shell asks us to watch is kept as the chunks of its encoded forms only: verbatim,
hex (lower and upper case) and base64 (standard and URL-safe alphabets) at each of the three
byte alignments, so a value encoded in the middle of a larger blob is still found. Each form
is cut into aligned, non-overlapping chunks of `CHUNK` characters; matching slides over every
position of the egress text, so any piece of at least ``2 * CHUNK - 1`` characters of a form
contains a whole chunk. Coverage is the share of a form's chunks seen, which adds up over
several calls (split exfiltration). Values live in memory only and never leave this module in
a signal.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["CHUNK", "Hit", "SecretEntry", "SecretIndex", "add_values", "grams"]

CHUNK = 8

Hit = tuple[int, int]
"""(form id, chunk number); form ids are stable for the life of an entry."""


@dataclass(frozen=True, slots=True)
class Form:
    id: int
    encoding: str
    chunks: tuple[str, ...] = field(repr=False)
    ref: str
    """The decision id of the read that brought the value in."""


@dataclass(frozen=True, slots=True)
class SecretEntry:
    digest: bytes = field(repr=False)
    forms: tuple[Form, ...]


@dataclass(frozen=True, slots=True)
class SecretIndex:
    entries: tuple[SecretEntry, ...] = ()
    chunks: Mapping[str, tuple[Hit, ...]] = field(default_factory=dict[str, tuple[Hit, ...]])
    forms: Mapping[int, Form] = field(default_factory=dict[int, Form])
    next_id: int = 0


def _encodings(value: str) -> list[tuple[str, str]]:
    raw = value.encode("utf-8", "surrogatepass")
    hexed = raw.hex()
    out = [("verbatim", value), ("hex", hexed), ("hex-upper", hexed.upper())]
    for offset in range(3):
        part = raw[offset:]
        whole = len(part) // 3 * 3
        std = base64.b64encode(part[:whole]).decode("ascii")
        url = std.replace("+", "-").replace("/", "_")
        out.append(("base64", std))
        if url != std:
            out.append(("base64url", url))
    return out


def _cut(form: str) -> tuple[str, ...]:
    return tuple(form[i : i + CHUNK] for i in range(0, len(form) - CHUNK + 1, CHUNK))


def add_values(
    index: SecretIndex,
    values: tuple[str, ...],
    ref: str,
    *,
    keep: int,
    min_chars: int,
    max_chars: int,
) -> SecretIndex:
    """``index`` with ``values`` added, the oldest dropped beyond ``keep``."""
    entries = list(index.entries)
    known = {e.digest for e in entries}
    next_id = index.next_id
    for value in values:
        if len(value) < min_chars:
            continue
        value = value[:max_chars]
        digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in known:
            continue
        known.add(digest)
        forms: list[Form] = []
        for encoding, text in _encodings(value):
            chunks = _cut(text)
            if chunks:
                forms.append(Form(next_id, encoding, chunks, ref))
                next_id += 1
        entries.append(SecretEntry(digest, tuple(forms)))
    if next_id == index.next_id:
        return index
    entries = entries[-keep:]
    table: dict[str, tuple[Hit, ...]] = {}
    by_id: dict[int, Form] = {}
    for entry in entries:
        for form in entry.forms:
            by_id[form.id] = form
            for n, chunk in enumerate(form.chunks):
                table[chunk] = (*table.get(chunk, ()), (form.id, n))
    return SecretIndex(tuple(entries), table, by_id, next_id)


def grams(text: str) -> set[str]:
    """Every `CHUNK`-character substring of ``text``."""
    return {text[i : i + CHUNK] for i in range(len(text) - CHUNK + 1)}
