"""Text `broker init` writes: a commented broker.toml and an example scope file."""

from __future__ import annotations

__all__ = ["CONFIG_TEMPLATE", "EXAMPLE_CONNECTORS", "EXAMPLE_SCOPES"]

CONFIG_TEMPLATE = """\
# broker.toml: mcp-authz-broker configuration. Every key is optional; unknown keys are errors.
# Any value can be overridden by the environment: BROKER_SERVER__PORT=9000 sets [server] port.

# Scope definitions: which tools, with which argument constraints, each scope grants.
scope_files = [{scope_files}]

[server]
host = "127.0.0.1"
port = 8765
# public_url = "https://broker.example.com"   # issuer and MCP resource base; default http://host:port
# allowed_hosts = ["broker.example.com"]       # Host headers accepted besides loopback
# allowed_origins = []
# max_body_bytes = 1048576

[store]
# SQLite file next to this config (WAL, synchronous=FULL), or PostgreSQL:
# url = "postgresql+asyncpg://broker@db.internal:5432/broker"
url = "sqlite+aiosqlite:///broker.db"

[tokens]
keys_dir = "keys"          # Ed25519 signing keys, mode 0600
default_ttl = 600          # seconds, when a token request names no expires_in
max_ttl = 3600             # seconds, cap over every agent's own maximum
leeway = 30                # seconds of clock skew tolerated
max_delegation_depth = 3
{connectors}"""

EXAMPLE_CONNECTORS = """
# Downstream tool sources. Tools reach agents as {{prefix}}__{{tool}} (prefix defaults to the id).
# Credentials are references, never inline: env = {{ API_KEY = "env:TIME_API_KEY" }}.

[[connectors]]
id = "time"
kind = "stdio"
command = "{time_command}"
args = ["--local-timezone", "UTC"]
call_timeout = 10

[[connectors]]
id = "demo"
kind = "native"
target = "broker.demo_tools:toolset"
"""

EXAMPLE_SCOPES = """\
# Scope definitions. A scope grants tools of one connector, optionally with argument constraints.

[[scope]]
name = "time:read"
description = "Read the current time and convert between time zones"
[[scope.grant]]
connector = "time"
tools = ["get_current_time", "convert_time"]

[[scope]]
name = "demo:use"
description = "The broker's built-in demo tools"
[[scope.grant]]
connector = "demo"
tools = ["*"]

# Narrow scopes for the example agents (`make demo`): a task asks only for what it needs.
[[scope]]
name = "demo:echo"
description = "Only the demo echo tool, with short texts"
[[scope.grant]]
connector = "demo"
tools = ["echo"]
args = { text = { max_length = 64 } }

[[scope]]
name = "demo:math"
description = "Only the demo add tool, with small operands"
[[scope.grant]]
connector = "demo"
tools = ["add"]
args = { a = { range = { min = 0, max = 1000 } }, b = { range = { min = 0, max = 1000 } } }
"""
