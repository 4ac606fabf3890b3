"""The client's self-check never fails the client: any endpoint it is given, however
malformed or pointed elsewhere, ends as a failed check with its reason."""

from __future__ import annotations

import pytest
import trio

from petit_client.selfcheck import check, public_ssl_context


@pytest.mark.parametrize(
    ("endpoint", "error"),
    [
        ("http://h:99999", "Port out of range"),
        ("http://h:abc", "Port could not be cast"),
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://" + "a" * 64 + ".example", "label empty or too long"),
        ("ftp://1001.example", "only http:// and https:// URLs"),
        ("http://10.0.0.5:8080/admin/reset?", "a public URL is scheme://host[:port]"),
        ("http://user@1001.example", "a public URL is scheme://host[:port]"),
        ("http://1001.example#x", "a public URL is scheme://host[:port]"),
    ],
)
async def test_a_bad_endpoint_is_a_failed_check(endpoint: str, error: str) -> None:
    with trio.fail_after(5):
        result = await check(endpoint, public_ssl_context(None))
    assert error in result.error, result
    assert result.to_json()["ok"] is False
