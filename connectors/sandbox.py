"""Jails for stdio connectors: bubblewrap argv from a spec, and whether this platform can run it.

Imports the standard library and `connectors.base`/`connectors.errors` only; never `broker`.

What a sandboxed child sees (``plan_sandbox`` builds it, ``describe_sandbox`` prints it):

- a private mount namespace holding only ``/usr`` (and the ``/bin``, ``/lib*`` links), a few
  ``/etc`` files the dynamic loader, TLS and time zones need, a fresh ``/proc`` and minimal
  ``/dev``, a size-capped private ``/tmp``, the connector's runtime (its executable's prefix,
  its virtualenv and base interpreter, the ``node_modules`` tree or script file named in its
  argv, ``runtime_paths``), ``read_paths`` read-only and ``write_paths`` read-write. A mount
  whose source is, holds or lies inside one of ``deny_paths`` (the broker's config, keys,
  database) is refused, so a scope naming ``/`` cannot expose the broker;
- private PID, IPC, UTS, cgroup and network namespaces: the network namespace has only its own
  loopback, so without egress there is no way out at all; with egress, the broker's proxy is
  reachable through one bind-mounted unix socket, relayed to ``127.0.0.1:EGRESS_PORT`` inside
  the jail by `connectors._egress_relay`, and ``HTTP(S)_PROXY`` points there;
- uid/gid ``spec.uid``/``spec.gid`` with no capabilities and ``no_new_privs``: when the broker
  is root, bubblewrap runs privileged and ``setpriv`` drops to that host uid; otherwise a user
  namespace maps it onto the broker's own uid (with no capabilities);
- rlimits set by ``prlimit`` (address space, processes, open files, CPU seconds, file size);
- ``--die-with-parent`` and ``--new-session``: a SIGKILLed broker takes the jail with it.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from connectors.base import SandboxMode, SandboxSpec, StdioSpec
from connectors.errors import ConnectorConfigError

__all__ = [
    "EGRESS_PORT",
    "EGRESS_SOCKET",
    "Mount",
    "SandboxPlan",
    "SandboxSupport",
    "SandboxUnavailable",
    "describe_sandbox",
    "plan_sandbox",
    "probe_sandbox",
    "resolve_command",
]

logger = logging.getLogger("connectors.sandbox")

EGRESS_PORT = 3128
"""The port the in-jail relay listens on (127.0.0.1 of the jail's own network namespace)."""

EGRESS_SOCKET = "/run/egress/proxy.sock"
"""Where the proxy's unix socket appears inside the jail."""

_RELAY_INSIDE = "/run/egress/relay.py"
_RELAY_SOURCE = str(Path(__file__).with_name("_egress_relay.py"))

_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/nsswitch.conf",
    "/etc/mime.types",
)
"""Shown read-only when present. Not passwd, shadow, hosts, resolv.conf or the broker's own."""

_TOP_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class SandboxUnavailable(ConnectorConfigError):
    """Raised when a connector requires a sandbox the platform cannot provide (the reason says
    which part is missing: bubblewrap, user namespaces, ``setpriv``/``prlimit``)."""


@dataclass(frozen=True, slots=True)
class SandboxSupport:
    """What the probe found."""

    available: bool
    reason: str
    """Why not (empty when available)."""
    bwrap: str | None = None
    privileged: bool = False
    """bwrap runs as root without a user namespace; ``setpriv`` drops to the sandbox uid."""


@dataclass(frozen=True, slots=True)
class Mount:
    source: str
    target: str
    writable: bool = False
    why: str = ""


@dataclass(frozen=True, slots=True)
class SandboxPlan:
    """A finished jail: the argv to spawn, the environment to give it, and what it shows."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    mounts: tuple[Mount, ...]
    network: str
    """``"none"`` or ``"egress proxy only"``."""
    support: SandboxSupport

    def summary(self, spec: SandboxSpec) -> list[str]:
        """Human lines: identity, namespaces, network, limits, then every mount."""
        limits = spec.limits
        lines = [
            "sandbox: bubblewrap"
            + (" (privileged, setpriv drops to uid)" if self.support.privileged else " (userns)"),
            f"identity: uid {spec.uid} gid {spec.gid}, no capabilities, no_new_privs",
            "namespaces: mount, pid, ipc, uts, cgroup, network; dies with the broker",
            f"network: {self.network}",
            "limits: "
            + ", ".join(
                f"{name}={value}"
                for name, value in (
                    ("as", limits.address_space),
                    ("nproc", limits.processes),
                    ("nofile", limits.open_files),
                    ("cpu", limits.cpu_seconds),
                    ("fsize", limits.file_size),
                    ("tmpfs", limits.tmpfs_size),
                )
                if value is not None
            ),
        ]
        if spec.egress is not None:
            egress = spec.egress
            lines.append(
                f"egress hosts: {', '.join(egress.hosts) or '(none)'}; ports "
                f"{', '.join(map(str, egress.ports))}; private "
                f"{'allowed' if egress.allow_private else 'refused'}; extra networks "
                f"{', '.join(egress.allow_networks) or '(none)'}"
            )
        lines.extend(
            f"{'rw' if m.writable else 'ro'} {m.target}"
            + (f" <- {m.source}" if m.source != m.target else "")
            + (f" ({m.why})" if m.why else "")
            for m in self.mounts
        )
        return lines


def probe_sandbox(bwrap: str | None = None) -> SandboxSupport:
    """Find out (once per bwrap path) whether a jail can be started here: runs ``true`` in one.

    The answer is cached; pass an explicit ``bwrap`` path to probe another binary.
    """
    found = bwrap or shutil.which("bwrap") or ""
    return _probe(found, os.geteuid() == 0)


@functools.cache
def _probe(bwrap: str, privileged: bool) -> SandboxSupport:
    if not bwrap or not os.access(bwrap, os.X_OK):
        return SandboxSupport(
            False, "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
        )
    for tool in ("/usr/bin/prlimit", "/usr/bin/setpriv"):
        if not os.access(tool, os.X_OK):
            return SandboxSupport(False, f"{tool} is missing (util-linux)", bwrap)
    argv = [bwrap, *_base_args(privileged, 65534, 65534), "--", "/usr/bin/true"]
    if privileged:
        argv[-1:] = [*_drop_args(65534, 65534), "/usr/bin/true"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False, env={})  # noqa: S603 - fixed argv
    except (OSError, subprocess.TimeoutExpired) as exc:
        return SandboxSupport(False, f"bubblewrap could not run: {type(exc).__name__}", bwrap)
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        hint = said[-1] if said else f"exit code {done.returncode}"
        if not privileged:
            hint += " (are unprivileged user namespaces enabled?)"
        return SandboxSupport(False, f"bubblewrap cannot create a sandbox: {hint}", bwrap)
    return SandboxSupport(True, "", bwrap, privileged)


def _base_args(privileged: bool, uid: int, gid: int) -> list[str]:
    args = [
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for link in _TOP_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    if not privileged:
        args += [
            "--unshare-user",
            "--disable-userns",
            "--uid",
            str(uid),
            "--gid",
            str(gid),
            "--cap-drop",
            "ALL",
        ]
    return args


def _drop_args(uid: int, gid: int) -> list[str]:
    return [
        "/usr/bin/setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]


def resolve_command(command: str, env: Mapping[str, str], cwd: str | None) -> str:
    """The absolute path of ``command`` as the child's own PATH finds it.

    Raises:
        ConnectorConfigError: not found or not executable.
    """
    if os.sep in command:
        path = command if os.path.isabs(command) else os.path.join(cwd or os.getcwd(), command)
        if os.access(path, os.X_OK) and os.path.isfile(path):
            return os.path.abspath(path)
        raise ConnectorConfigError(f"command {command!r} is not an executable file")
    found = shutil.which(command, path=env.get("PATH", os.defpath))
    if found is None:
        raise ConnectorConfigError(f"command {command!r} is not on the child's PATH")
    return os.path.abspath(found)


def plan_sandbox(
    spec: StdioSpec,
    env: Mapping[str, str],
    *,
    support: SandboxSupport | None = None,
    egress_socket: str | None = None,
) -> SandboxPlan:
    """The bubblewrap argv and environment that run ``spec`` jailed.

    ``env`` is the child environment `child_environment` computed; ``egress_socket`` is the
    proxy's unix socket for this connector (required when ``spec.sandbox.egress`` is set;
    a placeholder is shown when only describing).

    Raises:
        SandboxUnavailable: the platform cannot sandbox (``support.reason`` says why).
        ConnectorConfigError: a path is relative or missing, overlaps the broker's own files, or
            the working directory is not inside the jail.
    """
    box = spec.sandbox if spec.sandbox is not None else SandboxSpec(mode=SandboxMode.REQUIRED)
    support = support or probe_sandbox()
    if not support.available or support.bwrap is None:
        raise SandboxUnavailable(f"cannot sandbox stdio connector '{spec.id}': {support.reason}")
    command = resolve_command(spec.command, env, spec.cwd)
    mounts = _runtime_mounts(command, spec.args, box)
    mounts += [_mount(p, p, False, "scope path") for p in _absolute(box.read_paths, "read_paths")]
    mounts += [
        _mount(p, p, True, "writable path") for p in _absolute(box.write_paths, "write_paths")
    ]
    mounts += [
        _mount(p, p, False, "runtime path") for p in _absolute(box.runtime_paths, "runtime_paths")
    ]
    if spec.cwd is not None and not any(_within(spec.cwd, m.target) for m in mounts):
        # The working directory the operator gave the connector is part of its runtime:
        # read-only, and refused below like any mount if it holds the broker's own files.
        mounts.append(_mount(spec.cwd, spec.cwd, False, "working directory"))
    if box.egress is not None:
        mounts.append(Mount(_RELAY_SOURCE, _RELAY_INSIDE, False, "egress relay"))
        mounts.append(
            Mount(egress_socket or "<egress socket>", EGRESS_SOCKET, False, "egress proxy")
        )
        mounts += _python_mounts(os.path.realpath(sys.executable), "egress relay interpreter")
    mounts = _dedupe(mounts)
    _check_denied(spec.id, mounts, box.deny_paths)
    cwd = spec.cwd or "/tmp"  # noqa: S108 - the jail's own private tmpfs
    if spec.cwd is not None and not any(_within(spec.cwd, m.target) for m in mounts):
        raise ConnectorConfigError(
            f"stdio connector '{spec.id}': cwd {spec.cwd} is not inside any sandbox path"
        )

    argv = [support.bwrap, *_base_args(support.privileged, box.uid, box.gid)]
    argv += ["--size", str(box.limits.tmpfs_size), "--tmpfs", "/tmp"]  # noqa: S108 - private
    argv += ["--dir", "/run"]
    etc = [Mount(path, path) for path in _ETC_FILES if os.path.exists(path)]
    # bubblewrap makes missing parents 0700, which the jail's uid could not traverse.
    made = {"/", "/tmp", "/run"}  # noqa: S108 - the private tmpfs
    for m in [*etc, *mounts]:
        for parent in reversed(Path(m.target).parents):
            if str(parent) not in made and not _system(str(parent)):
                made.add(str(parent))
                argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--bind" if m.writable else "--ro-bind", m.source, m.target]
        made.add(m.target)
    argv += ["--chdir", cwd, "--"]
    if support.privileged:
        argv += _drop_args(box.uid, box.gid)
    argv += ["/usr/bin/prlimit", *_limit_args(box), "--"]
    child_env = dict(env)
    if "HOME" in child_env:
        child_env["HOME"] = "/tmp"  # noqa: S108 - private
    child_env["TMPDIR"] = "/tmp"  # noqa: S108 - private
    if box.egress is not None:
        relay_python = os.path.realpath(sys.executable)
        argv += [relay_python, "-I", "-S", _RELAY_INSIDE, str(EGRESS_PORT), EGRESS_SOCKET, "--"]
        proxy = f"http://127.0.0.1:{EGRESS_PORT}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
            child_env[name] = proxy
        child_env["NO_PROXY"] = child_env["no_proxy"] = ""
        network = "egress proxy only"
    else:
        network = "none"
    argv += [command, *spec.args]
    return SandboxPlan(tuple(argv), child_env, tuple(mounts), network, support)


def describe_sandbox(
    spec: StdioSpec,
    *,
    environ: Mapping[str, str] | None = None,
    support: SandboxSupport | None = None,
) -> list[str]:
    """What ``broker connectors show`` prints: the mode, the exact argv, then a summary.

    Never raises: a jail that cannot be built is described by the reason it cannot.
    """
    box = spec.sandbox
    if box is None or box.mode is SandboxMode.OFF:
        return ["sandbox: off (runs with the broker's own view of the filesystem and network)"]
    support = support or probe_sandbox()
    source = os.environ if environ is None else environ
    # The same rule as `connectors.mcp_stdio.child_environment` (which imports this module).
    env = {name: source[name] for name in spec.env_allowlist if name in source} | dict(spec.env)
    try:
        plan = plan_sandbox(spec, env, support=support)
    except SandboxUnavailable as exc:
        if box.mode is SandboxMode.REQUIRED:
            return [f"sandbox: required but UNAVAILABLE, connector refused: {exc}"]
        return [f"sandbox: auto, UNAVAILABLE, connector runs UNSANDBOXED: {exc}"]
    except ConnectorConfigError as exc:
        return [f"sandbox: {box.mode.value}, invalid, connector refused: {exc}"]
    return [
        f"sandbox mode: {box.mode.value}",
        "argv: " + shlex.join(plan.argv),
        *plan.summary(box),
    ]


def _limit_args(box: SandboxSpec) -> list[str]:
    limits = box.limits
    pairs = (
        ("--as", limits.address_space),
        ("--nproc", limits.processes),
        ("--nofile", limits.open_files),
        ("--cpu", limits.cpu_seconds),
        ("--fsize", limits.file_size),
        ("--core", 0),
    )
    return [f"{flag}={value}" for flag, value in pairs if value is not None]


def _absolute(paths: Sequence[str], field: str) -> list[str]:
    for path in paths:
        if not os.path.isabs(path):
            raise ConnectorConfigError(f"sandbox {field} entry {path!r} is not absolute")
    return [os.path.normpath(p) for p in paths]


def _mount(source: str, target: str, writable: bool, why: str) -> Mount:
    if not os.path.exists(source):
        raise ConnectorConfigError(f"sandbox path {source} does not exist")
    # Mount what the path names now; the target keeps the name the scopes use.
    return Mount(os.path.realpath(source), target, writable, why)


def _runtime_mounts(command: str, args: Sequence[str], box: SandboxSpec) -> list[Mount]:
    mounts: list[Mount] = []
    mounts += _python_mounts(command, "executable")
    real = os.path.realpath(command)
    if not _system(real) and not any(_within(real, m.source) for m in mounts):
        mounts.append(Mount(_prefix(real), _prefix(real), False, "executable prefix"))
    if (
        real != command
        and not _system(command)
        and not any(_within(command, m.target) for m in mounts)
    ):
        mounts.append(Mount(command, command, False, "executable link"))
    for arg in args:
        if not os.path.isabs(arg) or not os.path.isfile(arg) or _system(arg):
            continue
        modules = _outermost_node_modules(arg)
        if modules is not None:
            mounts.append(Mount(os.path.realpath(modules), modules, False, "node_modules"))
        else:
            mounts.append(Mount(os.path.realpath(arg), arg, False, "script"))
    return mounts


def _python_mounts(executable: str, why: str) -> list[Mount]:
    """A virtualenv holding ``executable`` and the base interpreter prefix it was made from."""
    mounts: list[Mount] = []
    directory = os.path.dirname(executable)
    for candidate in (os.path.dirname(directory), directory):
        config = os.path.join(candidate, "pyvenv.cfg")
        if os.path.isfile(config):
            mounts.append(Mount(os.path.realpath(candidate), candidate, False, f"{why} virtualenv"))
            home = _venv_home(config)
            if home is not None and not _system(home):
                base = _prefix(os.path.join(os.path.realpath(home), "python"))
                mounts.append(Mount(base, base, False, f"{why} base interpreter"))
            break
    real = os.path.realpath(executable)
    if not mounts and not _system(real):
        mounts.append(Mount(_prefix(real), _prefix(real), False, f"{why} prefix"))
    return mounts


def _venv_home(config: str) -> str | None:
    for line in Path(config).read_text(encoding="utf-8", errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            return value.strip()
    return None


def _prefix(real: str) -> str:
    """``/opt/node/bin/node`` -> ``/opt/node``; a file outside a ``bin`` dir -> its directory."""
    directory = os.path.dirname(real)
    if os.path.basename(directory) == "bin":
        return os.path.dirname(directory)
    return directory


def _outermost_node_modules(path: str) -> str | None:
    parts = Path(path).parts
    if "node_modules" not in parts:
        return None
    return str(Path(*parts[: parts.index("node_modules") + 1]))


def _system(path: str) -> bool:
    return any(_within(path, root) for root in ("/usr", *_TOP_LINKS))


def _within(path: str, root: str) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _dedupe(mounts: list[Mount]) -> list[Mount]:
    """One mount per target (writable wins), parents before children so children overlay."""
    by_target: dict[str, Mount] = {}
    for m in mounts:
        seen = by_target.get(m.target)
        if seen is None or (m.writable and not seen.writable):
            by_target[m.target] = m
    ordered = sorted(by_target.values(), key=lambda m: (m.target.count("/"), m.target))
    # A read-only runtime mount nested in a covering one of the same kind adds nothing.
    kept: list[Mount] = []
    for m in ordered:
        if any(
            _within(m.target, k.target)
            and k.writable == m.writable
            and _within(m.source, k.source)
            and os.path.relpath(m.target, k.target) == os.path.relpath(m.source, k.source)
            for k in kept
        ):
            continue
        kept.append(m)
    return kept


def _check_denied(connector_id: str, mounts: Sequence[Mount], deny: Sequence[str]) -> None:
    for denied in deny:
        real = os.path.realpath(denied)
        for m in mounts:
            if _within(m.source, real) or _within(real, m.source):
                raise ConnectorConfigError(
                    f"stdio connector '{connector_id}': sandbox path {m.target} overlaps the "
                    f"broker's own file {denied}"
                )
