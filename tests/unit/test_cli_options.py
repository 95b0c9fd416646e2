"""Every option of the `outbox` command reads an OUTBOX_* variable; metrics stay on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from outbox.cli import main
from outbox.metrics import serve

#: Flags that print something and exit: no setting, so no variable.
INFORMATIONAL = {"help", "version"}


def commands(group: click.Command, path: str = "outbox") -> Iterator[tuple[str, click.Command]]:
    yield path, group
    if isinstance(group, click.Group):
        for name, sub in group.commands.items():
            yield from commands(sub, f"{path} {name}")


def test_every_option_has_an_outbox_environment_variable() -> None:
    missing = []
    seen = 0
    for path, command in commands(main):
        for param in command.params:
            if not isinstance(param, click.Option) or param.name in INFORMATIONAL:
                continue
            seen += 1
            envvar = param.envvar
            names = [envvar] if isinstance(envvar, str) else list(envvar or [])
            if not names or not all(n.startswith("OUTBOX_") for n in names):
                missing.append(f"{path} {param.opts[0]}")
    assert seen > 30, "the walk found the commands' options"
    assert not missing, f"options without an OUTBOX_* variable: {missing}"


def test_the_environment_variables_are_shown_in_help() -> None:
    for _path, command in commands(main):
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in INFORMATIONAL \
                    and param.envvar:
                assert param.show_envvar, param.opts


def test_dead_letter_all_reads_its_variable_per_command() -> None:
    """A variable meant for retry must not purge: each command has its own."""
    group = main.commands["dead-letters"]
    assert isinstance(group, click.Group)
    envvars = {name: next(p.envvar for p in cmd.params if p.name == "everything")
               for name, cmd in group.commands.items() if name in ("retry", "purge")}
    assert envvars == {"retry": "OUTBOX_DEAD_LETTERS_RETRY_ALL",
                       "purge": "OUTBOX_DEAD_LETTERS_PURGE_ALL"}


@pytest.mark.parametrize("command", ["relay", "consume"])
def test_metrics_host_defaults_to_loopback(command: str) -> None:
    cmd = main.commands[command]
    [host] = [p for p in cmd.params if p.name == "metrics_host"]
    assert host.default == "127.0.0.1" and host.envvar == "OUTBOX_METRICS_HOST"


def test_metrics_endpoint_binds_loopback_unless_told() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(port, None, lambda: True)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
    server = serve(port, None, lambda: True, host="0.0.0.0")
    try:
        assert server.server_address[0] == "0.0.0.0"
    finally:
        server.shutdown()
        server.server_close()


def test_usage_errors_come_before_any_connection() -> None:
    """Contradicting settings are refused without touching the (unreachable) database."""
    out = CliRunner().invoke(main, ["relay", "--db", "postgresql://u:p@127.0.0.1:1/x",
                                    "--kafka", "127.0.0.1:1", "--poll-interval", "5",
                                    "--lease", "5"])
    assert out.exit_code == 2
    assert "--poll-interval (5 s) must be shorter than --lease (5 s)" in out.output


def test_compose_relay_publishes_metrics_beyond_its_loopback() -> None:
    """In a container the metrics must bind every interface for the published port."""
    from pathlib import Path

    import yaml

    compose = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    relay = compose["services"]["relay"]
    command = relay["command"]
    port = command[command.index("--metrics-port") + 1]
    assert f"{port}:{port}" in relay["ports"]
    assert command[command.index("--metrics-host") + 1] == "0.0.0.0"
