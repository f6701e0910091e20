"""broker.toml loading: errors name the key, the value and what was expected; env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import load_config, resolve_secret
from broker.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_load_without_a_file_and_name_the_mcp_resource() -> None:
    config = load_config(None, {})
    assert config.server.resource_url == "http://127.0.0.1:8765/mcp"
    assert config.store.url.startswith("sqlite+aiosqlite:///")


def test_an_unknown_key_is_an_error_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'server\.prot'"):
        load_config(path, {})


def test_a_bad_value_names_the_key_the_value_and_the_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 70000\n")
    with pytest.raises(
        ConfigError, match=r"server\.port: .*less than or equal to 65535 \(got 70000\)"
    ):
        load_config(path, {})


def test_environment_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n")
    config = load_config(path, {"BROKER_SERVER__PORT": "9100", "BROKER_TOKENS__LEEWAY": "5"})
    assert config.server.port == 9100
    assert config.tokens.leeway == 5


def test_an_environment_override_with_a_bad_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tokens\.leeway: .*\(got 'soon'\)"):
        load_config(None, {"BROKER_TOKENS__LEEWAY": "soon"})


def test_relative_paths_resolve_next_to_the_config_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'scope_files = ["scopes.toml"]\n[store]\nurl = "sqlite+aiosqlite:///b.db"\n'
    )
    config = load_config(path, {})
    assert config.store.url == f"sqlite+aiosqlite:///{tmp_path}/b.db"
    assert config.tokens.keys_dir == tmp_path / "keys"
    assert config.scope_files == (tmp_path / "scopes.toml",)


def test_an_inline_credential_is_refused_and_not_echoed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[connectors]]\nid = "gh"\nkind = "http"\nurl = "https://x"\n'
        'headers = { Authorization = "Bearer s3cr3t-value" }\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "headers.Authorization looks like a credential" in str(info.value)
    assert "s3cr3t-value" not in str(info.value)


def test_a_credential_by_reference_is_accepted_and_resolved_only_on_request(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("from-file\n")
    path = write(
        tmp_path,
        '[[connectors]]\nid = "gh"\nkind = "http"\nurl = "https://x"\n'
        'headers = { Authorization = "env:GH_TOKEN", X-Api-Key = "file:tok" }\n',
    )
    config = load_config(path, {})
    headers = config.connectors[0].headers
    assert headers["Authorization"] == "env:GH_TOKEN"
    assert resolve_secret(headers["Authorization"], {"GH_TOKEN": "t"}, tmp_path) == "t"
    assert resolve_secret(headers["X-Api-Key"], {}, tmp_path) == "from-file"


def test_an_unset_secret_reference_names_the_variable_not_a_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment variable GH_TOKEN is not set"):
        resolve_secret("env:GH_TOKEN", {}, tmp_path)


def test_a_connector_of_a_kind_needs_its_fields(tmp_path: Path) -> None:
    path = write(tmp_path, '[[connectors]]\nid = "t"\nkind = "stdio"\n')
    with pytest.raises(ConfigError, match="a stdio connector needs 'command'"):
        load_config(path, {})


def test_duplicate_connector_ids_are_refused(tmp_path: Path) -> None:
    one = '[[connectors]]\nid = "t"\nkind = "native"\ntarget = "m:x"\n'
    with pytest.raises(ConfigError, match="connector id 't' appears twice"):
        load_config(write(tmp_path, one + one), {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server\n", "not valid TOML"),
        ('[[connectors]]\nid = "Bad_Id"\nkind = "native"\ntarget = "m:x"\n', r"connectors\.0\.id"),
        ('[store]\nurl = "mysql://x"\n', r"store\.url: expected sqlite"),
        ("[tokens]\ndefault_ttl = 7200\nmax_ttl = 600\n", "default_ttl .* must not exceed max_ttl"),
        ('base_dir = "/"\n', "'base_dir' is not a configuration key"),
    ],
    ids=["bad-toml", "bad-connector-id", "unknown-driver", "ttl-order", "base-dir-reserved"],
)
def test_bad_configs_stop_with_a_specific_message(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), {})


def test_a_missing_config_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run `broker init`"):
        load_config(tmp_path / "nope.toml", {})


def test_broker_variables_of_agents_and_tools_are_not_config_overrides() -> None:
    environ = {
        "BROKER_URL": "http://127.0.0.1:8765",
        "BROKER_CLIENT_ID": "agt_x",
        "BROKER_LOG_LEVEL": "DEBUG",
        "BROKER_CONFIG": "/etc/broker.toml",
    }
    assert load_config(None, environ).server.port == 8765


def test_a_misspelt_section_override_is_still_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown key 'sevrer'"):
        load_config(None, {"BROKER_SEVRER__PORT": "1"})


STDIO = '[[connectors]]\nid = "box"\nkind = "stdio"\ncommand = "/usr/bin/true"\n'


def test_a_stdio_connector_is_sandboxed_automatically_with_no_network_by_default(
    tmp_path: Path,
) -> None:
    box = load_config(write(tmp_path, STDIO), {}).connectors[0]
    assert box.sandbox == "auto"
    assert box.egress is None
    assert box.writable_paths == ()
    assert (box.sandbox_uid, box.sandbox_gid) == (65534, 65534)
    assert box.limits.address_space_mb == 8192
    assert box.limits.processes == 256
    assert box.limits.tmpfs_mb == 64


def test_sandbox_keys_load_from_the_connector_table(tmp_path: Path) -> None:
    text = (
        STDIO + 'sandbox = "required"\nwritable_paths = ["/srv/out"]\n'
        'runtime_paths = ["/opt/tool"]\nsandbox_uid = 1000\nsandbox_gid = 1000\n'
        '[connectors.egress]\nhosts = ["API.example.com", "*.example.org", "203.0.113.7"]\n'
        'ports = [443]\nallow_networks = ["10.1.0.0/16"]\n'
        "[connectors.limits]\nprocesses = 32\nopen_files = 64\n"
    )
    box = load_config(write(tmp_path, text), {}).connectors[0]
    assert box.sandbox == "required"
    assert box.writable_paths == (Path("/srv/out"),)
    assert box.runtime_paths == (Path("/opt/tool"),)
    assert box.egress is not None
    assert box.egress.hosts == ("api.example.com", "*.example.org", "203.0.113.7")
    assert box.egress.ports == (443,)
    assert box.egress.allow_private is False
    assert box.egress.allow_networks == ("10.1.0.0/16",)
    assert (box.limits.processes, box.limits.open_files, box.limits.cpu_seconds) == (32, 64, 3600)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('sandbox = "maybe"\n', "connectors.0.sandbox"),
        ('writable_paths = ["out"]\n', "'out' is not an absolute path"),
        ('runtime_paths = ["lib"]\n', "'lib' is not an absolute path"),
        ("[connectors.egress]\nhosts = []\n", "expected at least one host"),
        ('[connectors.egress]\nhosts = ["bad host"]\n', "expected a name"),
        ('[connectors.egress]\nhosts = ["a.com"]\nallow_networks = ["x"]\n', "not a network"),
        ('[connectors.egress]\nhosts = ["a.com"]\nports = [0]\n', "connectors.0.egress.ports"),
        ("[connectors.limits]\nprocesses = 0\n", "connectors.0.limits.processes"),
        ("[connectors.limits]\nswap_mb = 1\n", "unknown key 'connectors.0.limits.swap_mb'"),
    ],
    ids=[
        "unknown-mode",
        "relative-writable",
        "relative-runtime",
        "no-hosts",
        "bad-host",
        "bad-network",
        "bad-port",
        "zero-processes",
        "unknown-limit",
    ],
)
def test_a_bad_sandbox_key_is_an_error_naming_it(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, STDIO + extra), {})


def test_sandbox_keys_on_a_connector_that_runs_no_process_are_an_error(tmp_path: Path) -> None:
    text = '[[connectors]]\nid = "web"\nkind = "http"\nurl = "https://x.example"\nsandbox = "off"\n'
    with pytest.raises(ConfigError, match="only stdio connectors are sandboxed"):
        load_config(write(tmp_path, text), {})
