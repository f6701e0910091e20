"""The official MCP conformance suite: a harness and the runs against our servers."""
