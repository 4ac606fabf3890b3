"""petit-client's command line itself: every command documents -c and -v, misuse is one line."""

from __future__ import annotations

import datetime
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


def _revocation_list() -> bytes:
    """A PEM file OpenSSL loads as a CA file, though it holds no certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone")]))
        .last_update(now)
        .next_update(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("content", [b"[server]\n", _revocation_list()], ids=["toml", "crl"])
def test_init_refuses_a_ca_that_is_no_certificate(tmp_path: Path, content: bytes) -> None:
    """--ca given the server's config (or anything but a certificate, even a PEM file OpenSSL
    loads) fails at init, with exit 3 and one line, and writes nothing, rather than at the
    first register."""
    not_a_certificate = tmp_path / "config.toml"
    not_a_certificate.write_bytes(content)
    config = tmp_path / "client" / "config.toml"
    argv = ["init", "-c", str(config), "--server", "localhost:3014"]
    result = CliRunner().invoke(main, [*argv, "--ca", str(not_a_certificate)])
    assert result.exit_code == 3
    assert result.output.strip().splitlines() == [
        f"error: --ca {not_a_certificate} holds no PEM certificate: give the server's "
        "certificates/ca.crt (from petit-server init)"
    ]
    assert not config.parent.exists()
