"""The PROXY protocol reader on its own: StringTransport, task.Clock, no sockets.

v1 and v2 headers, split anywhere; garbage, a missing header, one that never ends and
one that never comes are closed; a connection from outside ``proxy_from`` is closed
before it may send anything; the SMTP session behind it greets only after the header
and counts its session cap on the proxied address. ``test_haproxy.py`` runs the same
through a real HAProxy.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import address, protocol, task
from twisted.internet.testing import StringTransport

from clientid_mta.config import ConfigError, load_config
from clientid_mta.server.proxy_protocol import (
    HEADER_TIMEOUT,
    MAX_V2_HEADER,
    V1_MAX,
    V2_SIGNATURE,
    BadHeader,
    ProxyHeaderFactory,
    parse_header,
    proxied,
)
from clientid_mta.smtp.protocol import SubmissionFactory

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
PROXY = address.IPv4Address("TCP", "127.0.0.1", 40000)


def v2(source: str, destination: str, ports: tuple[int, int], tlv: bytes = b"") -> bytes:
    """A v2 PROXY header for TCP, as HAProxy's ``send-proxy-v2`` writes it."""
    six = ":" in source
    family = socket.AF_INET6 if six else socket.AF_INET
    body = socket.inet_pton(family, source) + socket.inet_pton(family, destination)
    body += struct.pack("!HH", *ports) + tlv
    return V2_SIGNATURE + bytes([0x21, 0x21 if six else 0x11]) + struct.pack("!H", len(body)) + body


V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 587\r\n"
V2 = v2("192.0.2.7", "198.51.100.1", (51000, 587))
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


class Recorder(protocol.Protocol):
    """The protocol behind the reader: what it was told, and the peer it saw."""

    def __init__(self) -> None:
        self.received = b""
        self.peer: object = None
        self.lost = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class Connection:
    """One connection from ``peer`` through a ProxyHeaderFactory to a Recorder."""

    def __init__(self, peer: address.IPv4Address = PROXY) -> None:
        self.clock = task.Clock()
        self.inner = Recorder()
        inner_factory = protocol.Factory.forProtocol(lambda: self.inner)
        self.factory = ProxyHeaderFactory(inner_factory, LOOPBACK, self.clock)
        self.reader = self.factory.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer)
        self.reader.makeConnection(self.transport)

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.reader.dataReceived(chunk)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


@pytest.mark.parametrize(
    ("header", "host", "port"),
    [
        (V1, "192.0.2.7", 51000),
        (V2, "192.0.2.7", 51000),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 587\r\n", "2001:db8::7", 51000),
        (v2("2001:db8::7", "2001:db8::1", (51000, 587)), "2001:db8::7", 51000),
        (v2("192.0.2.7", "198.51.100.1", (51000, 587), b"\x04\x00\x02ab"), "192.0.2.7", 51000),
    ],
)
def test_a_header_gives_the_session_the_client_address(header: bytes, host: str, port: int) -> None:
    connection = Connection()
    assert connection.inner.peer is None  # nothing connected before the header
    connection.send(header + b"EHLO client\r\n")
    peer = connection.inner.peer
    assert (getattr(peer, "host", None), getattr(peer, "port", None)) == (host, port)
    assert connection.reader.getPeer() == peer
    assert connection.inner.received == b"EHLO client\r\n"
    assert not connection.closed


@pytest.mark.parametrize("header", [V1, V2])
def test_a_header_split_byte_by_byte_is_read(header: bytes) -> None:
    connection = Connection()
    connection.send(*(header[i : i + 1] for i in range(len(header))))
    assert getattr(connection.inner.peer, "host", None) == "192.0.2.7"
    connection.send(b"QUIT\r\n")
    assert connection.inner.received == b"QUIT\r\n"


@pytest.mark.parametrize(
    "header", [V2_LOCAL, b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"]
)
def test_a_local_header_keeps_the_connection_address(header: bytes) -> None:
    connection = Connection()
    connection.send(header)
    assert connection.inner.peer == PROXY
    assert not connection.closed


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example\r\n",  # no header at all: a client that came directly
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"PROXY TCP4 192.0.2.7 198.51.100.1 51000\r\n",  # a field missing
        b"PROXY TCP4 192.0.2.7 198.51.100.1 5x000 587\r\n",  # not a port
        b"PROXY TCP4 192.0.2.7 198.51.100.1 99999 587\r\n",  # out of range
        b"PROXY TCP4 2001:db8::7 198.51.100.1 51000 587\r\n",  # the wrong family
        b"PROXY TCP4 192.0.2.300 198.51.100.1 51000 587\r\n",  # not an address
        b"PROXY UDP4 192.0.2.7 198.51.100.1 51000 587\r\n",
        b"PROXY TCP4 \xff\xfe 198.51.100.1 51000 587\r\n",
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 signature
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),  # UDP
        V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216),  # a UNIX socket
        V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # addresses cut short
        V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # IPv6 in the length of IPv4
    ],
)
def test_garbage_is_closed_and_never_reaches_the_session(data: bytes) -> None:
    connection = Connection()
    connection.send(data)
    assert connection.closed
    assert connection.inner.peer is None
    connection.send(b"MAIL FROM:<a@example.org>\r\n")  # after the close: dropped
    assert connection.inner.received == b""
    connection.reader.connectionLost(None)
    assert not connection.inner.lost  # never connected, so never told


def test_a_v1_line_that_never_ends_is_cut_at_the_protocol_limit() -> None:
    connection = Connection()
    connection.send(b"PROXY TCP4 " + b"1" * (V1_MAX - 12))
    assert not connection.closed  # 106 bytes: may still end
    connection.send(b"1")
    assert connection.closed


def test_a_v2_header_longer_than_the_cap_is_refused_from_its_length_alone() -> None:
    connection = Connection()
    connection.send(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_HEADER))
    assert connection.closed


def test_a_header_that_never_comes_is_cut_by_the_timeout() -> None:
    connection = Connection()
    connection.send(b"PROXY TCP4 192.0.2.7")  # a start, then silence
    connection.clock.advance(HEADER_TIMEOUT - 0.1)
    assert not connection.closed
    connection.clock.advance(0.1)
    assert connection.closed


def test_the_timeout_stops_once_the_header_is_read() -> None:
    connection = Connection()
    connection.send(V1)
    assert connection.clock.getDelayedCalls() == []
    connection.clock.advance(HEADER_TIMEOUT * 2)
    assert not connection.closed


def test_a_connection_from_outside_proxy_from_is_closed_at_once() -> None:
    connection = Connection(address.IPv4Address("TCP", "203.0.113.5", 40000))
    assert connection.closed
    connection.send(V1)  # a forged header from the internet
    assert connection.inner.peer is None
    assert connection.clock.getDelayedCalls() == []


def test_an_ipv4_mapped_proxy_address_is_matched_as_ipv4() -> None:
    connection = Connection(address.IPv6Address("TCP", "::ffff:127.0.0.1", 40000))  # type: ignore[arg-type]
    assert not connection.closed


def test_parse_header_answers_none_while_incomplete_and_raises_on_garbage() -> None:
    assert parse_header(b"") is None
    assert parse_header(b"PRO") is None
    assert parse_header(V2[:10]) is None
    assert parse_header(V2[:-1]) is None
    with pytest.raises(BadHeader):
        parse_header(b"PROXX")
    header = parse_header(V2 + b"rest")
    assert header is not None and header.length == len(V2)


def test_the_smtp_session_greets_after_the_header_and_caps_the_proxied_address() -> None:
    config = load_config()
    clock = task.Clock()
    smtp = SubmissionFactory(config, None, None, reactor=clock)
    factory = proxied(smtp, ("127.0.0.1/32",), clock)
    cap = config.limits.max_sessions_per_address
    transports = []
    for number in range(cap + 1):
        transport = StringTransport(peerAddress=PROXY)
        reader = factory.buildProtocol(PROXY)
        assert reader is not None
        reader.makeConnection(transport)
        assert transport.value() == b""  # no greeting before the header
        transports.append(transport)
        source = "192.0.2.7" if number < cap else "192.0.2.8"
        reader.dataReceived(f"PROXY TCP4 {source} 198.51.100.1 {50000 + number} 587\r\n".encode())
        assert transport.value().startswith(b"220 ")
    assert smtp.sessions.by_address == {"192.0.2.7": cap, "192.0.2.8": 1}
    one_more = StringTransport(peerAddress=PROXY)
    reader = factory.buildProtocol(PROXY)
    assert reader is not None
    reader.makeConnection(one_more)
    reader.dataReceived(b"PROXY TCP4 192.0.2.7 198.51.100.1 1 587\r\n")
    assert one_more.value().startswith(b"421 4.7.0")  # the proxied client is over its cap


@pytest.mark.parametrize(
    "value", ['"127.0.0.1/32"', '["127.0.0.1/33"]', '["proxy.example"]', "[1]"]
)
def test_a_bad_proxy_from_is_one_sentence(tmp_path: Path, value: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"[listen]\nsubmission_proxy_protocol = true\nproxy_from = {value}\n")
    with pytest.raises(ConfigError, match=r"^config error: \[listen\] proxy_from must be a list"):
        load_config(config)


def test_proxy_from_takes_bare_addresses_as_single_hosts(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[listen]\nproxy_from = ["10.0.0.5", "2001:db8::/48"]\n')
    assert load_config(config).listen.proxy_from == ("10.0.0.5/32", "2001:db8::/48")


FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None)
PREFIXES = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE])


@FUZZ
@given(prefix=PREFIXES, rest=st.binary(max_size=300))
def test_any_bytes_parse_to_a_header_to_more_or_to_bad_header(prefix: bytes, rest: bytes) -> None:
    try:
        header = parse_header(prefix + rest)
    except BadHeader:
        return
    if header is not None:
        assert 0 < header.length <= len(prefix + rest)


@FUZZ
@given(
    ips=st.one_of(
        st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
        st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
    ),
    ports=st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
    version=st.sampled_from([1, 2]),
    cuts=st.lists(st.integers(1, 120), max_size=8),
)
def test_a_header_cut_anywhere_names_the_client(
    ips: tuple[Any, Any], ports: tuple[int, int], version: int, cuts: list[int]
) -> None:
    source, destination = ips
    if version == 1:
        family = "TCP4" if source.version == 4 else "TCP6"
        header = f"PROXY {family} {source} {destination} {ports[0]} {ports[1]}\r\n".encode()
    else:
        header = v2(str(source), str(destination), ports)
    connection = Connection()
    data, chunks = header + b"EHLO x\r\n", []
    for cut in cuts:
        chunks.append(data[:cut])
        data = data[cut:]
    connection.send(*chunks, data)
    peer = connection.inner.peer
    assert (getattr(peer, "host", None), getattr(peer, "port", None)) == (str(source), ports[0])
    assert connection.inner.received == b"EHLO x\r\n"


def test_the_per_address_cap_counts_an_ipv6_64_and_ipv4_mapped_addresses_as_one() -> None:
    """An IPv6 client picks any address of its /64 (SLAAC, privacy addresses): counted
    per address, one host held every session and pushed out everyone not logged in."""
    config = load_config()
    clock = task.Clock()
    smtp = SubmissionFactory(config, None, None, reactor=clock)
    factory = proxied(smtp, ("127.0.0.1/32",), clock)
    cap = config.limits.max_sessions_per_address

    def connect(family: str, source: str, destination: str) -> bytes:
        transport = StringTransport(peerAddress=PROXY)
        reader = factory.buildProtocol(PROXY)
        assert reader is not None
        reader.makeConnection(transport)
        reader.dataReceived(f"PROXY {family} {source} {destination} 50000 587\r\n".encode())
        return transport.value()

    for number in range(1, cap + 1):
        assert connect("TCP6", f"2001:db8:1:2::{number:x}", "2001:db8::1").startswith(b"220 ")
    assert connect("TCP6", "2001:db8:1:2:ffff::1", "2001:db8::1").startswith(b"421 4.7.0")
    assert connect("TCP6", "2001:db8:1:3::1", "2001:db8::1").startswith(b"220 ")  # next /64
    for _ in range(cap - 1):
        assert connect("TCP4", "192.0.2.7", "198.51.100.1").startswith(b"220 ")
    assert connect("TCP6", "::ffff:192.0.2.7", "::ffff:198.51.100.1").startswith(b"220 ")
    assert connect("TCP4", "192.0.2.7", "198.51.100.1").startswith(b"421 4.7.0")
    assert smtp.sessions.by_address == {
        "2001:db8:1:2::/64": cap,
        "2001:db8:1:3::/64": 1,
        "192.0.2.7": cap,
    }


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[]", "is empty"),
        ('["10.0.0.0/8", "0.0.0.0/0"]', "holds 0.0.0.0/0"),
        ('["::/0"]', "holds ::/0"),
    ],
)
def test_proxy_from_that_trusts_no_one_or_everyone_is_one_sentence(
    tmp_path: Path, value: str, problem: str
) -> None:
    """Empty: every connection is refused. Every address: anyone on the internet can send
    a header and choose the address budgets, caps, the audit and fail2ban see."""
    config = tmp_path / "c.toml"
    config.write_text(f"[listen]\nsubmissions_proxy_protocol = true\nproxy_from = {value}\n")
    with pytest.raises(ConfigError, match=rf"^config error: \[listen\] proxy_from {problem}"):
        load_config(config)
    config.write_text(f"[listen]\nproxy_from = {value}\n")  # unused without the protocol
    assert load_config(config).listen.proxy_from is not None
