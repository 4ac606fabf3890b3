"""petit-client's command line itself: every command documents -c and -v, misuse is one line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from petit_client.cli import main

COMMANDS = sorted(main.commands)


def test_the_whole_command_set_exists() -> None:
    expected = "config evict init lease log register sping start status stop tenants unregister"
    assert sorted([*expected.split(), "version"]) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_config_and_verbose(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "-c, --config FILE" in result.output
    assert "-v, --verbose" in result.output
    summary = result.output.split("\n\n")[1].strip()
    assert summary.endswith("."), f"{command} --help has no summary: {summary!r}"


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
