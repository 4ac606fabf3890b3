"""The client reaches the server through a real HTTP CONNECT proxy (tinyproxy).

That traffic really went through the proxy is read from tinyproxy's own log: it records every
CONNECT request it serves. One test uses a stand-in proxy in-process instead, to reach a server
by a name only that proxy knows and check TLS verifies that name, not the proxy's.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import WebSocketRequest, serve_websocket

from petit.pki import certificate_fingerprint, client_ssl_context
from petit.transport import TUNNEL_PATH, ServerAddress, ServerUnreachableError, open_websocket
from tests.integration.harness import (
    READY_TIMEOUT,
    PetitClient,
    PetitServer,
    PythonBackend,
    Reaper,
    edit_config,
    free_port,
    http_request,
    tail,
    wait_until,
)

pytestmark = pytest.mark.integration

TINYPROXY = shutil.which("tinyproxy") or "/usr/sbin/tinyproxy"
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY")
TINYPROXY_CONF = """\
Port {port}
Listen 127.0.0.1
Timeout 30
Syslog Off
LogFile "{directory}/tinyproxy.log"
LogLevel Connect
PidFile "{directory}/tinyproxy.pid"
MaxClients 50
Allow 127.0.0.1
ConnectPort {connect_port}
"""


@dataclass
class Tinyproxy:
    """A tinyproxy in the foreground that only tunnels to one port."""

    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connects(self) -> list[str]:
        """The targets of the CONNECT requests it received, in order."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/1\.1", text)

    @classmethod
    async def start(
        cls,
        directory: Path,
        reaper: Reaper,
        *,
        connect_port: int,
        basic_auth: tuple[str, str] | None = None,
    ) -> Tinyproxy:
        if not Path(TINYPROXY).exists():
            pytest.skip("tinyproxy is not installed (apt-get install tinyproxy); ./run-tests does")
        directory.mkdir(parents=True)
        port = free_port()  # tinyproxy cannot report a port the system chose
        conf = TINYPROXY_CONF.format(port=port, directory=directory, connect_port=connect_port)
        if basic_auth:
            conf += f"BasicAuth {basic_auth[0]} {basic_auth[1]}\n"
        (directory / "tinyproxy.conf").write_text(conf)
        child = reaper.spawn(
            [TINYPROXY, "-d", "-c", directory / "tinyproxy.conf"], log=directory / "stdout.log"
        )
        proxy = cls(port, directory / "tinyproxy.log")

        def listening() -> bool:
            if child.poll() is not None:
                raise AssertionError(f"tinyproxy exited {child.returncode}:\n{tail(proxy.log)}")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        await wait_until(listening, READY_TIMEOUT, what="tinyproxy to listen")
        return proxy


@pytest.fixture(autouse=True)
def no_ambient_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLIs inherit our environment: only what a test sets may apply."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


async def new_client(
    tmp_path: Path, server: PetitServer, reaper: Reaper, backend: PythonBackend, **settings: object
) -> PetitClient:
    """An initialised, not yet registered client with extra ``[client]`` settings."""
    client = PetitClient(tmp_path / "client", server, reaper)
    await client.init(backend.port)
    if settings:
        edit_config(client.config, "client", **settings)
    return client


async def assert_tunnel_serves(server: PetitServer, client: PetitClient) -> None:
    response = await http_request(server.http_port, client.host)
    assert (response.status, response.body) == (200, PythonBackend.GET_BODY)


@pytest.mark.parametrize("configured_by", ["config", "HTTPS_PROXY"])
async def test_registration_and_tunnel_go_through_the_proxy(
    configured_by: str,
    server: PetitServer,
    python_backend: PythonBackend,
    reaper: Reaper,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = await Tinyproxy.start(tmp_path / "proxy", reaper, connect_port=server.tunnel_port)
    if configured_by == "config":
        client = await new_client(tmp_path, server, reaper, python_backend, proxy=proxy.url)
    else:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)  # inherited by register and the daemon
        client = await new_client(tmp_path, server, reaper, python_backend)

    await client.register()
    await client.start()
    await assert_tunnel_serves(server, client)

    target = f"127.0.0.1:{server.tunnel_port}"
    await wait_until(lambda: len(proxy.connects()) >= 2, 5, what="tinyproxy to log 2 CONNECTs")
    assert set(proxy.connects()) == {target}, tail(proxy.log)  # register, then the session


async def test_proxy_credentials(
    server: PetitServer, python_backend: PythonBackend, reaper: Reaper, tmp_path: Path
) -> None:
    proxy = await Tinyproxy.start(
        tmp_path / "proxy",
        reaper,
        connect_port=server.tunnel_port,
        basic_auth=("alice", "s3cret"),
    )
    address = f"127.0.0.1:{proxy.port}"
    refusal = f"error: proxy {address} refused CONNECT to 127.0.0.1:{server.tunnel_port}"
    client = await new_client(tmp_path, server, reaper, python_backend)
    for url, answer in [
        (  # no credentials: tinyproxy asks for them with 407
            f"http://{address}",
            "407 Proxy Authentication Required"
            " (the proxy needs a user and password: http://[USER:PASSWORD@]HOST[:PORT])",
        ),
        (  # wrong ones: tinyproxy says 401 (squid, for one, says 407 again)
            f"http://alice:wr0ng-pass@{address}",
            "401 Unauthorized (check the proxy user and password)",
        ),
    ]:
        edit_config(client.config, "client", proxy=url)
        refused = await client.cli("register", check=False)
        assert refused.returncode == 5, refused  # ExitCode.UNAVAILABLE
        assert refused.stderr.strip().splitlines()[-1] == f"{refusal}: {answer}", refused
        assert "Traceback" not in refused.stderr
        assert "wr0ng-pass" not in refused.stdout + refused.stderr

    # Percent-encoded in the URL ("%33" is "3"): the proxy must receive it decoded.
    edit_config(client.config, "client", proxy=f"http://alice:s%33cret@{address}", logLevel="debug")
    await client.register()
    await client.start()
    await assert_tunnel_serves(server, client)
    logs = "".join(path.read_text() for path in (client.directory / "logs").iterdir())
    assert "through the proxy" in logs  # the debug line that names the proxy
    assert "s3cret" not in logs + client.outputs["register"].stderr
    assert "s%33cret" not in logs


async def test_no_proxy_goes_direct(
    server: PetitServer,
    python_backend: PythonBackend,
    reaper: Reaper,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dead_proxy = free_port()  # nothing listens there
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{dead_proxy}")
    client = await new_client(tmp_path, server, reaper, python_backend)

    unreachable = await client.cli("register", check=False)
    assert unreachable.returncode == 5, unreachable
    expected = f"error: cannot reach the proxy 127.0.0.1:{dead_proxy}: Connection refused"
    assert unreachable.stderr.strip().splitlines()[-1] == expected, unreachable

    monkeypatch.setenv("NO_PROXY", "localhost, 127.0.0.0/8")
    await client.register()
    await client.start()
    await assert_tunnel_serves(server, client)


async def test_tls_through_the_proxy_verifies_the_server_name(tmp_path: Path) -> None:
    """The proxy resolves the server's name; the certificate must match that name."""
    ca = trustme.CA()
    server_certificate = ca.issue_cert("tunnel.petit.test")  # not 127.0.0.1, not localhost
    ca.cert_pem.write_to_path(tmp_path / "ca.crt")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_certificate.configure_cert(server_context)
    connects: list[bytes] = []

    async def greet(request: WebSocketRequest) -> None:
        websocket = await request.accept()
        await websocket.send_message(b"hello")

    async def connect_proxy(client: trio.SocketStream) -> None:
        """CONNECT to any name reaches our server (as a proxy with its own DNS would)."""
        head = b""
        while b"\r\n\r\n" not in head:
            head += await client.receive_some(4096)
        connects.append(head.split(b"\r\n")[0])
        async with await trio.open_tcp_stream("127.0.0.1", server_port) as upstream:
            await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)

    async with trio.open_nursery() as nursery:
        websockets = await nursery.start(
            lambda task_status: serve_websocket(
                greet, "127.0.0.1", 0, server_context, task_status=task_status
            )
        )
        server_port = websockets.port
        proxies = await nursery.start(partial(trio.serve_tcp, connect_proxy, 0, host="127.0.0.1"))
        proxy = f"http://127.0.0.1:{proxies[0].socket.getsockname()[1]}"
        client_context = client_ssl_context(tmp_path / "ca.crt")

        with trio.fail_after(10):
            address = ServerAddress("tunnel.petit.test", 3014)
            async with open_websocket(address, client_context, TUNNEL_PATH, proxy=proxy) as (
                websocket,
                fingerprint,
            ):
                assert await websocket.get_message() == b"hello"
            assert connects == [b"CONNECT tunnel.petit.test:3014 HTTP/1.1"]
            expected = ssl.PEM_cert_to_DER_cert(
                server_certificate.cert_chain_pems[0].bytes().decode()
            )
            assert fingerprint == certificate_fingerprint(expected)

            # Another name is refused, proxy or not: verification is never relaxed.
            other = ServerAddress("other.petit.test", 3014)
            with pytest.raises(
                ServerUnreachableError, match=r"through the proxy .*Hostname mismatch"
            ):
                async with open_websocket(other, client_context, TUNNEL_PATH, proxy=proxy):
                    pass
        nursery.cancel_scope.cancel()


async def pump(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream) -> None:
    """Copy until the source ends or either side breaks."""
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except trio.BrokenResourceError:
        pass
