"""Connector provenance: what runs is resolved and hashed, and a changed one is refused at spawn."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import anyio
import pytest

from connectors import ConnectorBroken, StdioConnector, StdioSpec
from connectors.provenance import (
    PROVENANCE_PIN_NAME,
    ProvenanceChanged,
    connector_provenance,
    pinned_provenance_digest,
    provenance_pin_definition,
)

REPO = Path(__file__).resolve().parents[2]
MINIMAL = REPO / "tests" / "fixtures" / "servers" / "minimal.py"
ENV = {"PATH": os.environ["PATH"]}


def npm_tree(root: Path) -> Path:
    """node_modules/app (entry dist/index.js) depending on lib, which is hoisted next to it."""
    modules = root / "node_modules"
    for name, version, deps in (("app", "1.0.0", {"lib": "^2"}), ("lib", "2.0.0", {})):
        package = modules / name
        (package / "dist").mkdir(parents=True)
        (package / "package.json").write_text(
            json.dumps({"name": name, "version": version, "dependencies": deps})
        )
        (package / "dist" / "index.js").write_text(f"// {name}\n")
    (modules / "unrelated").mkdir()
    (modules / "unrelated" / "package.json").write_text('{"name": "unrelated", "version": "9"}')
    return modules / "app" / "dist" / "index.js"


def test_npm_entry_point_pins_its_package_and_dependency_closure_only(tmp_path: Path) -> None:
    entry = npm_tree(tmp_path)
    spec = StdioSpec(id="app", command="node", args=(str(entry),))
    seen = connector_provenance(spec, ENV)
    assert seen.executable == os.path.realpath(shutil.which("node") or "")
    assert [(p.kind, p.name, p.version) for p in seen.packages] == [
        ("npm", "app", "1.0.0"),
        ("npm", "lib", "2.0.0"),
    ]
    before = seen.digest
    assert connector_provenance(spec, ENV).digest == before
    (tmp_path / "node_modules" / "unrelated" / "x.js").write_text("ignored")
    assert connector_provenance(spec, ENV).digest == before
    (tmp_path / "node_modules" / "lib" / "dist" / "index.js").write_text("// changed\n")
    assert connector_provenance(spec, ENV).digest != before


def test_a_version_bump_changes_the_digest_even_with_identical_code(tmp_path: Path) -> None:
    entry = npm_tree(tmp_path)
    spec = StdioSpec(id="app", command="node", args=(str(entry),))
    before = connector_provenance(spec, ENV).digest
    manifest = tmp_path / "node_modules" / "app" / "package.json"
    manifest.write_text(manifest.read_text().replace("1.0.0", "1.0.1"))
    assert connector_provenance(spec, ENV).digest != before


def test_real_npm_filesystem_server_pins_its_name_and_version() -> None:
    entry = REPO / ".tools/npm/node_modules/@modelcontextprotocol/server-filesystem/dist/index.js"
    if not entry.is_file():
        pytest.skip("run `make tools` to install the npm test servers")
    seen = connector_provenance(StdioSpec(id="fs", command="node", args=(str(entry), "/")), ENV)
    names = {p.name: p.version for p in seen.packages}
    assert names["@modelcontextprotocol/server-filesystem"]
    assert "@modelcontextprotocol/sdk" in names


def test_python_console_script_pins_its_distribution_and_requirements() -> None:
    script = Path(sys.prefix) / "bin" / "mcp-server-time"
    if not script.is_file():
        pytest.skip("mcp-server-time is not installed: pip install -e '.[servers]'")
    seen = connector_provenance(StdioSpec(id="time", command=str(script)), ENV)
    names = {p.name.lower(): p.version for p in seen.packages}
    assert "mcp-server-time" in names
    assert "mcp" in names
    assert seen.packages[0].files > 0


def test_an_edited_script_or_a_swapped_executable_changes_the_digest(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text("print('a')\n")
    spec = StdioSpec(id="s", command=sys.executable, args=(str(script),))
    before = connector_provenance(spec, ENV)
    assert [p.kind for p in before.packages] == ["file"]
    script.write_text("print('b')\n")
    assert connector_provenance(spec, ENV).digest != before.digest
    other = StdioSpec(id="s", command="/usr/bin/env", args=(str(script),))
    assert connector_provenance(other, ENV).executable_sha256 != before.executable_sha256


def test_the_pin_definition_carries_the_whole_provenance_under_a_reserved_name(
    tmp_path: Path,
) -> None:
    seen = connector_provenance(
        StdioSpec(id="m", command=sys.executable, args=(str(MINIMAL),)), ENV
    )
    definition = provenance_pin_definition(seen)
    assert definition["name"] == PROVENANCE_PIN_NAME
    assert definition["annotations"] == {"provenance": seen.as_json()}
    assert seen.digest in definition["description"]
    assert pinned_provenance_digest(definition) == seen.digest


async def test_a_connector_whose_code_changed_after_approval_is_refused_at_spawn(
    tmp_path: Path,
) -> None:
    script = tmp_path / "minimal.py"
    shutil.copy(MINIMAL, script)
    base = StdioSpec(id="m", command=sys.executable, args=(str(script),), max_restarts=0)
    approved = connector_provenance(base, ENV).digest
    spec = StdioSpec(
        id="m",
        command=sys.executable,
        args=(str(script),),
        max_restarts=0,
        expected_provenance=approved,
    )
    async with StdioConnector(spec, environ=ENV) as connector:
        with anyio.fail_after(30):
            result = await connector.call_tool("echo", {"text": "approved"})
        assert not result.is_error
    await anyio.Path(script).write_text(script.read_text() + "\n# changed\n")
    with anyio.fail_after(30), pytest.raises(ConnectorBroken) as raised:
        async with StdioConnector(spec, environ=ENV):
            pass
    assert isinstance(raised.value.__cause__, ProvenanceChanged)
