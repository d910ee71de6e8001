"""Behind HAProxy: Debian's haproxy (``mode tcp``, ``send-proxy-v2``) in front of two
server processes, each with the PROXY protocol on both listeners.

Clients connect to HAProxy from 127.1.0.2 and 127.2.0.3 (loopback, in networks other
than HAProxy's own 127.0.0.0/24), so a server that took HAProxy's address for the
client's would show in the audit, the logs, ``Received:`` and the budgets.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import HOSTNAME
from tests.serverproc import USERS, ServerProcess, accepts, free_ports, port_is_free
from tests.sink import wait_until

HAPROXY = Path("/usr/sbin/haproxy")
NET_A, NET_B = "127.1.0.2", "127.2.0.3"  # the clients' addresses
DEVICE = "UUID 6f1d0c0e-3b9a-4c1e-9a57-2f8f3f1b7e21"
BURST = 3
BEHIND_PROXY = f"""
[server]
workers = 1
received_header_ip = true
[listen]
submission_proxy_protocol = true
submissions_proxy_protocol = true
[throttle]
network_burst = {BURST}
network_refill = 3600
"""


class ProxiedServer(ServerProcess):
    """A server whose ports answer only after a PROXY header."""

    def serving(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                connection.sendall(b"PROXY TCP4 127.9.0.1 127.0.0.1 1 587\r\n")
                return connection.recv(4).startswith(b"220") and accepts(self.tls_port)
        except OSError:
            return False


@dataclass
class Cluster:
    nodes: list[ProxiedServer]
    port: int  # HAProxy's frontend for the submission ports
    tls_port: int  # ... and for the submissions (implicit TLS) ports
    context: ssl.SSLContext  # trusts the nodes' certificate

    def client(self, source: str, implicit: bool = False) -> smtplib.SMTP:
        """An smtplib client from ``source`` through HAProxy, after TLS and EHLO."""
        address = ("127.0.0.1", self.tls_port if implicit else self.port)
        if implicit:
            client: smtplib.SMTP = smtplib.SMTP_SSL(
                *address, source_address=(source, 0), context=self.context, timeout=10
            )
        else:
            client = smtplib.SMTP(*address, source_address=(source, 0), timeout=10)
            client.starttls(context=self.context)
        client.ehlo("client.example.net")
        return client

    def login_code(self, source: str, password: str, implicit: bool = False) -> int:
        client = self.client(source, implicit)
        try:
            assert client.docmd("CLIENTID", DEVICE)[0] == 250
            response = base64.b64encode(f"\0alice@example.org\0{password}".encode()).decode()
            return client.docmd("AUTH", f"PLAIN {response}")[0]
        finally:
            client.close()

    def output(self) -> str:
        return "".join(node.output() for node in self.nodes)

    def audit(self) -> str:
        return "".join(node.cli("audit").stdout for node in self.nodes)


def haproxy_config(frontends: dict[int, list[int]]) -> str:
    """``mode tcp``: each frontend port spreads over its servers with a v2 header."""
    lines = [
        "global",
        "    maxconn 200",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 30s",
        "    timeout server 30s",
    ]
    for number, (port, servers) in enumerate(frontends.items()):
        lines += [
            f"frontend in{number}",
            f"    bind 127.0.0.1:{port}",
            f"    default_backend out{number}",
            f"backend out{number}",
            "    balance roundrobin",
            *(f"    server s{n} 127.0.0.1:{s} send-proxy-v2" for n, s in enumerate(servers)),
        ]
    return "\n".join(lines) + "\n"


def shared_certificate(first: ServerProcess) -> str:
    """One certificate for all nodes, as nodes behind one name have: the first's."""
    certificate = first.cafile
    return f'[tls]\ncertificate = "{certificate}"\nkey = "{certificate.with_name("key.pem")}"\n'


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if not HAPROXY.exists():
        pytest.skip("haproxy is not installed (Debian package haproxy; .ci/run installs it)")
    nodes: list[ProxiedServer] = []
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        for name in ("a", "b"):
            extra = BEHIND_PROXY + (shared_certificate(nodes[0]) if nodes else "")
            node = ProxiedServer.create(tmp_path / name, extra)
            nodes.append(node)
            for address, password in USERS:
                node.add_user(address, password)
            node.start()
        port, tls_port = free_ports(2)
        frontends = {port: [n.port for n in nodes], tls_port: [n.tls_port for n in nodes]}
        config = tmp_path / "haproxy.cfg"
        config.write_text(haproxy_config(frontends))
        with open(tmp_path / "haproxy.out", "wb") as out:
            haproxy = subprocess.Popen(
                [str(HAPROXY), "-f", str(config), "-db"], stdout=out, stderr=subprocess.STDOUT
            )
        started = haproxy

        def listening() -> bool | None:
            if started.poll() is not None:
                raise AssertionError((tmp_path / "haproxy.out").read_text(errors="replace"))
            return not (port_is_free(port) or port_is_free(tls_port)) or None

        wait_until(listening, 15, "haproxy to listen", interval=0.05)
        context = ssl.create_default_context(cafile=str(nodes[0].cafile))
        yield Cluster(nodes, port, tls_port, context)
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(timeout=10)
        for node in nodes:
            node.stop()


def test_logins_through_haproxy_are_audited_logged_and_received_with_the_client_address(
    cluster: Cluster,
) -> None:
    for source in (NET_A, NET_A, NET_B, NET_B):  # round robin: each node sees both
        assert cluster.login_code(source, "alice-password") == 235
    assert cluster.login_code(NET_B, "alice-password", implicit=True) == 235  # PROXY, then TLS
    client = cluster.client(NET_A)
    client.login("alice@example.org", "alice-password")
    client.sendmail("alice@example.org", ["bob@example.org"], b"Subject: via\r\n\r\nhi\r\n")
    client.quit()

    def both_networks_audited() -> str | None:
        audit = cluster.audit()
        return audit if "127.1.0.0/24" in audit and "127.2.0.0/24" in audit else None

    audit = wait_until(both_networks_audited, 15, "the audit of both networks", interval=0.2)
    assert "127.0.0.0/24" not in audit  # HAProxy's own network: never the client's
    output = cluster.output()
    assert "from 127.1.0.0/24 on submission" in output
    assert "from 127.2.0.0/24 on submissions" in output
    assert "from 127.0.0.0/24" not in output
    received = [m["Received"] for n in cluster.nodes for m in n.messages("bob@example.org")]
    assert len(received) == 1
    assert f"from client.example.net ([{NET_A}])" in received[0]
    assert "with ESMTPSA (TLSv1." in received[0]  # STARTTLS below the PROXY reader


def test_per_network_budgets_count_the_proxied_address(cluster: Cluster) -> None:
    """Each node allows BURST failures per network: 2 * BURST from NET_A, then 454; NET_B
    is another network with its own budget (the proxy's address would share one)."""
    codes = [cluster.login_code(NET_A, f"wrong-{n}") for n in range(2 * BURST + 4)]
    assert sorted(codes) == [454] * 4 + [535] * (2 * BURST), codes
    assert [cluster.login_code(NET_B, f"other-{n}") for n in range(2)] == [535, 535]


def test_a_connection_without_the_header_is_closed(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as direct:
        direct.sendall(b"EHLO client.example.net\r\n")
        assert read_until_closed(direct) == b""  # no greeting, no reply: closed
    with pytest.raises((ssl.SSLError, OSError)):  # 465: no TLS without the header first
        tls = ssl.create_default_context(cafile=str(node.cafile))
        with socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as raw:
            tls.wrap_socket(raw, server_hostname=HOSTNAME).close()
    # Not a proxy in [listen] proxy_from: even a well-formed header is refused.
    stranger = socket.create_connection(("127.0.0.1", node.port), 10, ("127.0.0.5", 0))
    with stranger:
        stranger.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1 587\r\nEHLO x\r\n")
        assert read_until_closed(stranger) == b""
    node.wait_for_output(r"PROXY header refused from 127\.0\.0\.5 .*not a proxy")
    node.wait_for_output(r"PROXY header refused from 127\.0\.0\.1 .*no PROXY header")


def read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends before it closes (a reset counts as closed)."""
    data = b""
    try:
        while chunk := connection.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data
