"""Who an in-process MCP client is, for tests that drive `McpFront` without HTTP or tokens.

`McpFront(..., principal_lookup=caller.lookup)` asks the `Caller` on every request, so a test
can change ``caller.who`` between requests (another agent, another token, nobody).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mcp.server import ServerRequestContext

from broker.principal import Principal


def principal(*scopes: str, agent: str = "agent-1") -> Principal:
    """A principal holding ``scopes`` (token ``ttt…``, task ``t1``), as a verified token gives."""
    return Principal(
        agent_id=agent, client_id=agent, scopes=frozenset(scopes), token_id="t" * 22, task_id="t1"
    )


@dataclass
class Caller:
    """Who the in-process client is; tests change it between requests."""

    who: Principal | None = None

    def lookup(self, _ctx: ServerRequestContext[Any, Any]) -> Principal | None:
        return self.who
