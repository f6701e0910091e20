"""A native tool set for the replica tests: a call that runs until told (or cancelled)."""

from __future__ import annotations

import anyio

from connectors import ToolSet

__all__ = ["toolset"]

toolset = ToolSet()


@toolset.tool
async def sleep(seconds: float, marker: str = "") -> str:
    """Sleep for ``seconds``; first create the file ``marker`` (if given) to say it started."""
    if marker:
        await anyio.Path(marker).touch()
    await anyio.sleep(seconds)
    return "slept"
