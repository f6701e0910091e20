"""Demo native tools for `make run`, the examples and the bench: ``echo``, ``add``, ``word_count``.

Configure with ``kind = "native"`` and ``target = "broker.demo_tools:toolset"``.
"""

from __future__ import annotations

import mcp.types as types

from connectors import ToolSet

__all__ = ["toolset"]

toolset = ToolSet()

_READ_ONLY = types.ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)


@toolset.tool(annotations=_READ_ONLY)
async def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@toolset.tool(annotations=_READ_ONLY)
async def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@toolset.tool(annotations=_READ_ONLY)
async def word_count(text: str) -> dict[str, int]:
    """Count the words, lines and characters of a text."""
    return {"words": len(text.split()), "lines": len(text.splitlines()), "characters": len(text)}
