"""Connector provenance: what a stdio connector runs, pinned by digest. Stdlib + base only.

The provenance of a stdio spec is the resolved executable (real path and SHA-256), plus every
package its argv names, each with name, version and one SHA-256 over its files:

- an npm entry point (an argv path inside ``node_modules``): its package and the transitive
  closure of its ``dependencies``, resolved the way Node does (own then ancestor
  ``node_modules``); each package's files are hashed without its nested ``node_modules``
  (those are packages of their own in the closure);
- a Python console script in a virtualenv (``.venv/bin/mcp-server-time``) or ``python -m pkg``:
  the distribution that provides it and its installed requirements (extras skipped), files
  taken from the distribution's RECORD;
- any other absolute file in the argv (``python server.py``): that file.

The digest is a SHA-256 over the canonical JSON of all of it. The broker pins it like a tool
definition (see `provenance_pin_definition`) and passes the approved digest back as
``StdioSpec.expected_provenance``, so a changed executable or package is refused at spawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from connectors.base import StdioSpec
from connectors.errors import ConnectorBroken
from connectors.sandbox import resolve_command

__all__ = [
    "PROVENANCE_PIN_NAME",
    "PackageProvenance",
    "Provenance",
    "ProvenanceChanged",
    "connector_provenance",
    "pinned_provenance_digest",
    "provenance_pin_definition",
]

PROVENANCE_PIN_NAME = "@provenance"
"""The pseudo-tool name the broker pins provenance under; ``@`` is not legal in MCP tool names."""

_SKIP_DIRS = {"__pycache__", ".git"}


class ProvenanceChanged(ConnectorBroken):
    """Raised at spawn when the executable or a package differs from the approved provenance."""


@dataclass(frozen=True, slots=True)
class PackageProvenance:
    kind: str
    """``"npm"``, ``"python"`` or ``"file"``."""
    name: str
    version: str
    root: str
    files: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Provenance:
    executable: str
    executable_sha256: str
    argv: tuple[str, ...]
    packages: tuple[PackageProvenance, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "executable": self.executable,
            "executable_sha256": self.executable_sha256,
            "argv": list(self.argv),
            "packages": [
                {
                    "kind": p.kind,
                    "name": p.name,
                    "version": p.version,
                    "root": p.root,
                    "files": p.files,
                    "sha256": p.sha256,
                }
                for p in self.packages
            ],
        }

    @property
    def digest(self) -> str:
        body = json.dumps(self.as_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()


def provenance_pin_definition(provenance: Provenance) -> dict[str, Any]:
    """A wire-shaped pseudo-tool whose pinned fields carry the provenance, so the broker's tool
    pins (digest over name, description, annotations...) cover it with no new table."""
    return {
        "name": PROVENANCE_PIN_NAME,
        "description": f"what this connector runs (digest {provenance.digest})",
        "inputSchema": {"type": "object"},
        "annotations": {"provenance": provenance.as_json()},
    }


def pinned_provenance_digest(definition: Mapping[str, Any]) -> str:
    """The `Provenance.digest` of a pin definition made by `provenance_pin_definition` (what
    the broker passes as ``StdioSpec.expected_provenance`` from the approved definition)."""
    body = json.dumps(
        definition["annotations"]["provenance"],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def connector_provenance(spec: StdioSpec, env: Mapping[str, str]) -> Provenance:
    """Resolve and hash what ``spec`` runs (its ``env`` decides the PATH lookup).

    Raises:
        ConnectorConfigError: the command cannot be found.
    """
    command = resolve_command(spec.command, env, spec.cwd)
    real = os.path.realpath(command)
    packages: list[PackageProvenance] = []
    seen: set[str] = set()

    def add(found: Iterable[PackageProvenance]) -> None:
        for package in found:
            if package.root not in seen:
                seen.add(package.root)
                packages.append(package)

    site = _site_packages(command)
    if site is not None and not os.path.basename(real).startswith("python"):
        add(_python_packages(site, script=os.path.basename(command)))
    args = list(spec.args)
    if site is not None and "-m" in args[:-1]:
        add(_python_packages(site, module=args[args.index("-m") + 1].split(".")[0]))
    for arg in args:
        if not os.path.isabs(arg) or not os.path.isfile(arg):
            continue
        package_dir = _npm_package_dir(arg)
        if package_dir is not None:
            add(_npm_closure(package_dir))
        else:
            add([_file(arg)])
    return Provenance(real, _sha256_file(real), (spec.command, *spec.args), tuple(packages))


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file(path: str) -> PackageProvenance:
    real = os.path.realpath(path)
    return PackageProvenance("file", os.path.basename(path), "", real, 1, _sha256_file(real))


def _hash_tree(root: Path, files: Iterable[Path]) -> tuple[int, str]:
    """One SHA-256 over sorted (relative path, content digest, executable bit) entries."""
    entries: list[str] = []
    for path in files:
        if path.is_symlink():
            entries.append(f"{path.relative_to(root).as_posix()}\0link\0{os.readlink(path)}")
        elif path.is_file():
            mode = "x" if os.access(path, os.X_OK) else "-"
            entries.append(
                f"{path.relative_to(root).as_posix()}\0{mode}\0{_sha256_file(str(path))}"
            )
    entries.sort()
    return len(entries), hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _walk(root: Path, skip: set[str]) -> Iterable[Path]:
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in names:
            yield Path(directory) / name
        for name in dirs:
            if (Path(directory) / name).is_symlink():
                yield Path(directory) / name


def _npm_package_dir(path: str) -> Path | None:
    current = Path(path).parent
    while "node_modules" in current.parts:
        if (current / "package.json").is_file():
            return current
        current = current.parent
    return None


def _npm_package(directory: Path) -> tuple[PackageProvenance, dict[str, str]]:
    manifest = json.loads((directory / "package.json").read_text(encoding="utf-8"))
    count, digest = _hash_tree(directory, _walk(directory, _SKIP_DIRS | {"node_modules"}))
    name = str(manifest.get("name", directory.name))
    package = PackageProvenance(
        "npm", name, str(manifest.get("version", "")), str(directory.resolve()), count, digest
    )
    dependencies = manifest.get("dependencies") or {}
    return package, {str(k): str(v) for k, v in dict(dependencies).items()}


def _npm_resolve(start: Path, name: str) -> Path | None:
    current = start
    while True:
        candidate = current / "node_modules" / name
        if (candidate / "package.json").is_file():
            return candidate
        if current.parent == current:
            return None
        current = current.parent


def _npm_closure(directory: Path) -> list[PackageProvenance]:
    found: list[PackageProvenance] = []
    queue = [directory]
    visited: set[Path] = set()
    while queue:
        current = queue.pop(0)
        real = current.resolve()
        if real in visited:
            continue
        visited.add(real)
        package, dependencies = _npm_package(current)
        found.append(package)
        for name in sorted(dependencies):
            resolved = _npm_resolve(current, name)
            if resolved is not None:
                queue.append(resolved)
    return found


def _site_packages(command: str) -> Path | None:
    bin_dir = Path(command).parent
    root = bin_dir.parent
    if not (root / "pyvenv.cfg").is_file():
        return None
    for candidate in sorted(root.glob("lib/python*/site-packages")):
        return candidate
    return None


_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _python_packages(
    site: Path, *, script: str | None = None, module: str | None = None
) -> list[PackageProvenance]:
    dists = {_normalise(d.metadata["Name"]): d for d in metadata.distributions(path=[str(site)])}
    start: list[str] = []
    for key, dist in dists.items():
        if script is not None and any(
            ep.group == "console_scripts" and ep.name == script for ep in dist.entry_points
        ):
            start.append(key)
        if module is not None:
            top = (dist.read_text("top_level.txt") or "").split()
            names = {Path(str(f)).parts[0].removesuffix(".py") for f in dist.files or ()}
            if module in top or module in names:
                start.append(key)
    found: list[PackageProvenance] = []
    visited: set[str] = set()
    queue = sorted(set(start))
    while queue:
        key = queue.pop(0)
        if key in visited or key not in dists:
            continue
        visited.add(key)
        dist = dists[key]
        files = [
            Path(str(dist.locate_file(f)))
            for f in dist.files or ()
            if "__pycache__" not in f.parts and not str(f).endswith(".pyc")
        ]
        count, digest = _hash_tree(site, [f for f in files if f.is_relative_to(site)])
        found.append(
            PackageProvenance(
                "python", dist.metadata["Name"], dist.version, str(site / key), count, digest
            )
        )
        for requirement in dist.requires or ():
            if "extra ==" in requirement.replace('extra=="', 'extra == "'):
                continue
            match = _REQUIREMENT_NAME.match(requirement)
            if match:
                queue.append(_normalise(match.group(1)))
    return found
