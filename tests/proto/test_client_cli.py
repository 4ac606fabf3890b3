"""petit-client's command line itself: every command documents -c and -v, misuse is one line."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from petit_client.cli import main

COMMANDS = sorted(main.commands)
# Every leaf command, as argv: groups (``service``) contribute their subcommands.
LEAVES = sorted(
    [name, *([sub] if sub else [])]
    for name, command in main.commands.items()
    for sub in (sorted(command.commands) if isinstance(command, click.Group) else [""])
)


def test_the_whole_command_set_exists() -> None:
    expected = "config evict init lease log register service sping start status stop tenants"
    assert sorted([*expected.split(), "unregister", "version"]) == COMMANDS
    assert ["service", "install"] in LEAVES
    assert ["service", "uninstall"] in LEAVES


@pytest.mark.parametrize("argv", LEAVES, ids=" ".join)
def test_every_command_has_help_with_config_and_verbose(argv: list[str]) -> None:
    result = CliRunner().invoke(main, [*argv, "--help"])
    assert result.exit_code == 0, result.output
    assert "-c, --config FILE" in result.output
    assert "-v, --verbose" in result.output
    summary = result.output.split("\n\n")[1].strip()
    assert summary.endswith("."), f"{argv} --help has no summary: {summary!r}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["unregister"], "Must use exactly one of -a -r -t."),
        (["unregister", "-a", "-t", "x"], "Must use exactly one of -a -r -t."),
        (["evict"], "No target specified (use '-r' or '-t')."),
        (["evict", "-r", "1001", "-t", "x"], "Can't use '-r' and '-t' together."),
    ],
)
def test_misuse_is_one_line_and_exit_2_before_reading_the_config(
    argv: list[str], message: str
) -> None:
    result = CliRunner().invoke(main, [*argv, "-c", "/nonexistent/config.toml"])
    assert result.exit_code == 2
    assert result.output == f"error: {message}\n"
