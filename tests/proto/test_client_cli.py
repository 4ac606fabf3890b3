"""petit-client's command line itself: every command documents -c and -v, misuse is one line."""

from __future__ import annotations

import datetime
import shutil
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from petit.ca import create_ca, issue_server_certificate
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


def test_init_refuses_a_server_certificate_in_place_of_its_ca(tmp_path: Path) -> None:
    """The server's certificates/server.crt given as --ca would fail every handshake ("unable
    to get local issuer certificate"): refused at init with the file to give instead. The CA
    itself, and a server's self-signed certificate, are taken."""
    authority = create_ca()
    issued = issue_server_certificate(authority, ["localhost"])
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    self_signed = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    ).public_bytes(serialization.Encoding.PEM)
    cases = [
        ("server.crt", issued.cert_pem, False),
        ("ca.crt", authority.cert_pem, True),
        ("self-signed.crt", self_signed, True),
    ]
    if openssl := shutil.which("openssl"):  # a form OpenSSL reads and cryptography does not
        trusted = subprocess.run(
            [openssl, "x509", "-addtrust", "serverAuth"],
            input=authority.cert_pem,
            capture_output=True,
            check=True,
        ).stdout
        assert trusted.startswith(b"-----BEGIN TRUSTED CERTIFICATE-----")
        cases.append(("trusted.crt", trusted, True))
    for file_name, pem, taken in cases:
        anchor = tmp_path / file_name
        anchor.write_bytes(pem)
        config = tmp_path / file_name.replace(".", "-") / "config.toml"
        argv = ["init", "-c", str(config), "--server", "localhost:3014", "--ca", str(anchor)]
        result = CliRunner().invoke(main, argv)
        if taken:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 3
            assert result.output.strip().splitlines() == [
                f"error: --ca {anchor} is a certificate some CA issued to a server, not a CA: "
                "give the CA that issued it (petit-server init made certificates/ca.crt)"
            ]
            assert not config.parent.exists()
