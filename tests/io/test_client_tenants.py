"""Tenant directories on disk, local targets and the printable config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from petit.errors import ConfigError
from petit_client.config import (
    LocalTarget,
    config_document,
    default_config_text,
    load_client_config,
    mask_password,
)
from petit_client.tenants import (
    Registration,
    all_tenants,
    forget_registration,
    new_lease,
    registered_tenants,
    save_registration,
)

KEY_PEM = b"-----BEGIN PRIVATE KEY-----\nnot read by these tests\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(default_config_text(host="tunnel.example.com", port=3014, ca=None))
    return path


def test_leases_are_listed_in_order_and_registered_ones_by_id(config_path: Path) -> None:
    config = load_client_config(config_path)
    assert all_tenants(config) == []
    first = new_lease(config, LocalTarget(host="10.0.0.1", port=5432))
    second = new_lease(config, LocalTarget(host="db.internal", port=443, tls=True))
    save_registration(config, "default", KEY_PEM, Registration("1001", 11081, "http://x"))

    tenants = all_tenants(config)
    assert [t.directory for t in tenants] == [config.directory / "tenants/default", first, second]
    assert [t.index for t in tenants] == [0, 1, 2]
    assert [t.leased for t in tenants] == [False, True, True]
    assert str(tenants[1].local) == "10.0.0.1:5432 (plain)"
    assert str(tenants[2].local) == "db.internal:443 (tls)"
    assert tenants[2].local.tls_verify, "verification stays on unless turned off"
    assert re.fullmatch(r"[0-9a-f]{16}", first.name), first.name
    assert list(registered_tenants(config)) == ["1001"]
    assert (config.directory / "tenants/default/key").stat().st_mode & 0o777 == 0o600


def test_unregistering_a_lease_keeps_its_directory_and_target(config_path: Path) -> None:
    config = load_client_config(config_path)
    lease = new_lease(config, LocalTarget(host="127.0.0.1", port=9000))
    save_registration(config, lease.name, KEY_PEM, Registration("1002", 11082, "http://y"))
    save_registration(config, "plain", KEY_PEM, Registration("1003", 11083, "http://z"))
    for tenant in registered_tenants(config).values():
        forget_registration(tenant)

    assert registered_tenants(config) == {}
    assert not (config.directory / "tenants/plain").exists()
    (left,) = all_tenants(config)
    assert left.directory == lease
    assert left.registration is None
    assert sorted(p.name for p in lease.iterdir()) == ["config.toml"]
    assert left.local == LocalTarget(host="127.0.0.1", port=9000)


def test_tenant_local_overrides_the_client_local_key_by_key(config_path: Path) -> None:
    text = config_path.read_text().replace(
        "tlsVerify = true\n", 'tlsVerify = true\nca = "./local-ca.pem"\n'
    )
    config_path.write_text(text)
    config = load_client_config(config_path)
    assert config.local.ca == config.directory / "local-ca.pem"
    lease = new_lease(config, LocalTarget(host="127.0.0.1", port=9443, tls=True))
    with (lease / "config.toml").open("a") as tenant_config:
        tenant_config.write("tlsVerify = false\n")  # appended to its [local] table

    (tenant,) = all_tenants(config)
    assert tenant.local == LocalTarget(
        host="127.0.0.1", port=9443, tls=True, tls_verify=False, ca=config.local.ca
    )

    with (lease / "config.toml").open("a") as tenant_config:
        tenant_config.write("tlsVerfy = false\n")
    with pytest.raises(ConfigError, match=r"tenant\.local\.tlsVerfy"):
        all_tenants(config)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("http://user:s3cret@proxy:3128", "http://user:****@proxy:3128"),
        ("http://user:p@ss@proxy:3128/", "http://user:****@proxy:3128/"),
        ("http://user@proxy:3128", "http://user@proxy:3128"),
        ("http://proxy:3128", "http://proxy:3128"),
    ],
)
def test_mask_password(url: str, masked: str) -> None:
    assert mask_password(url) == masked


def test_config_document_masks_the_proxy_and_holds_no_key(config_path: Path) -> None:
    config_path.write_text(
        config_path.read_text().replace(
            "[client.vitae]", 'proxy = "http://me:s3cret@proxy:3128"\n\n[client.vitae]'
        )
    )
    document = config_document(load_client_config(config_path))
    client = document["client"]
    assert isinstance(client, dict)
    assert client["proxy"] == "http://me:****@proxy:3128"
    assert client["local"] == {
        "host": "localhost",
        "port": 8080,
        "tls": False,
        "tlsVerify": True,
        "tcpTls": "passthrough",
    }
    assert "s3cret" not in repr(document)
