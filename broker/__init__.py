"""mcp-authz-broker: a zero-trust authorization broker for AI agents' MCP tool calls."""
