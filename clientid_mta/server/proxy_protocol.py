"""The PROXY protocol (v1 and v2) on a listener: the load balancer says who the client is.

HAProxy (``send-proxy`` / ``send-proxy-v2``) opens each connection with a header naming
the client's address. ``ProxyHeaderFactory`` wraps a listener's factory: it reads that
header first, and only then connects the SMTP session (or, on 465, the TLS layer under
it), whose ``transport.getPeer()`` is from then on the client's address. So session
caps, budgets, the audit log, the logs and ``Received:`` all see the proxied address
without knowing about the proxy.

Twisted's own ``twisted.protocols.haproxy`` is not used: it connects the session before
the header (the greeting would go out first, and the session cap would count the
proxy's address), it waits for a header forever, and a malformed v1 port raises.

Refused, with the connection closed and one log line: a connection from an address
outside ``proxy_from``, a header that is malformed, longer than the protocol allows
(v1) or than ``MAX_V2_HEADER`` (v2), or not complete within ``HEADER_TIMEOUT`` seconds.
A ``LOCAL`` (v2) or ``UNKNOWN`` (v1) header, which HAProxy sends for its own health
checks, keeps the connection's real addresses.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import address, protocol
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

log = Logger()

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line with its CRLF (the protocol's own limit)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family, length
MAX_V2_HEADER = 4096  # addresses (at most 216 bytes) and TLVs; HAProxy sends far less
HEADER_TIMEOUT = 10.0  # seconds a proxy has to send the header (it sends it at once)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BadHeader(Exception):
    """Not a PROXY header this server accepts; str() says why, for the log."""


@dataclass(frozen=True)
class Header:
    """A complete header: the client's and the proxy's listening address (None: keep the
    connection's own, for LOCAL/UNKNOWN), and how many bytes it took."""

    source: IAddress | None
    destination: IAddress | None
    length: int


def parse_header(data: bytes) -> Header | None:
    """The header at the start of ``data``; None while it may still be incomplete.

    Raises ``BadHeader`` as soon as ``data`` cannot be the start of a valid header.
    """
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        return _parse_v2(data)
    if data[: len(V1_PREFIX)] == V1_PREFIX[: len(data)]:
        return _parse_v1(data)
    raise BadHeader("no PROXY header")


def _parse_v1(data: bytes) -> Header | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise BadHeader("v1 header longer than 107 bytes")
        return None
    words = data[:end].split(b" ")
    if words[1:2] == [b"UNKNOWN"]:
        return Header(None, None, end + 2)
    if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6"):
        raise BadHeader("malformed v1 header")
    version = 4 if words[1] == b"TCP4" else 6
    source = _ip_address(_v1_ip(words[2], version), _v1_port(words[4]))
    destination = _ip_address(_v1_ip(words[3], version), _v1_port(words[5]))
    return Header(source, destination, end + 2)


def _v1_ip(text: bytes, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise BadHeader("malformed v1 address") from None
    if ip.version != version:
        raise BadHeader("v1 address of the wrong family")
    return ip


def _v1_port(text: bytes) -> int:
    if not (text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise BadHeader("malformed v1 port")
    return int(text)


def _parse_v2(data: bytes) -> Header | None:
    if len(data) < V2_FIXED:
        return None
    version_command, family, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    total = V2_FIXED + length
    if version_command >> 4 != 2 or version_command & 0x0F > 1:
        raise BadHeader("unknown v2 version or command")
    if total > MAX_V2_HEADER:
        raise BadHeader(f"v2 header longer than {MAX_V2_HEADER} bytes")
    if len(data) < total:
        return None
    if version_command & 0x0F == 0 or family == 0x00:  # LOCAL, or UNSPEC: the proxy's own
        return Header(None, None, total)
    body = data[V2_FIXED:total]
    if family == 0x11 and length >= 12:  # TCP over IPv4
        source_ip, destination_ip, ports = body[0:4], body[4:8], body[8:12]
    elif family == 0x21 and length >= 36:  # TCP over IPv6
        source_ip, destination_ip, ports = body[0:16], body[16:32], body[32:36]
    else:
        raise BadHeader(f"v2 family 0x{family:02x} is not TCP, or its addresses are cut")
    source_port, destination_port = struct.unpack("!HH", ports)
    source = _ip_address(ipaddress.ip_address(source_ip), source_port)
    destination = _ip_address(ipaddress.ip_address(destination_ip), destination_port)
    return Header(source, destination, total)


def _ip_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> IAddress:
    if ip.version == 4:
        return address.IPv4Address("TCP", str(ip), port)
    return address.IPv6Address("TCP", str(ip), port)


def trusted(peer: IAddress, networks: tuple[Network, ...]) -> bool:
    """May this connection send a header? A local (UNIX socket) peer always may: only
    processes with access to the socket file can connect."""
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return True
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


class ProxyHeaderReader(policies.ProtocolWrapper):
    """Reads the header, then connects the wrapped protocol with the proxied addresses."""

    factory: ProxyHeaderFactory
    transport: Any  # the TCP connection (an ITransport once connected)

    def __init__(self, factory: ProxyHeaderFactory, wrapped: protocol.Protocol) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self._buffer = b""
        self._header: Header | None = None
        self._refused = False
        self._timer: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper connects the wrapped protocol here; that waits for the header.
        directlyProvides(self, providedBy(transport))
        protocol.Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        if not trusted(self.transport.getPeer(), self.factory.networks):
            self._refuse("not a proxy in [listen] proxy_from")
            return
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._refuse, "no header")

    def dataReceived(self, data: bytes) -> None:
        if self._header is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        self._buffer += data
        try:
            header = parse_header(self._buffer)
        except BadHeader as problem:
            self._refuse(str(problem))
            return
        if header is None:
            return
        rest, self._buffer = self._buffer[header.length :], b""
        self._stop_timer()
        self._header = header
        self.wrappedProtocol.makeConnection(cast(ITransport, self))  # provides it, see above
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def _refuse(self, reason: str) -> None:
        self._stop_timer()
        self._refused = True
        self._buffer = b""
        peer = self.transport.getPeer()
        log.info(
            "PROXY header refused from {peer} on {listener}: {reason}; connection closed",
            peer=getattr(peer, "host", str(peer)),
            listener=self.factory.logPrefix(),
            reason=reason,
        )
        self.transport.loseConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._stop_timer()
        self.factory.unregisterProtocol(self)
        if self._header is not None:
            self.wrappedProtocol.connectionLost(reason)

    def getPeer(self) -> IAddress:
        if self._header is not None and self._header.source is not None:
            return self._header.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        return self.transport.getHost()


class ProxyHeaderFactory(policies.WrappingFactory):
    """Wraps a listener's factory: each connection starts with a PROXY header from one of
    ``networks``, or is closed."""

    protocol = ProxyHeaderReader

    def __init__(
        self, wrapped: IProtocolFactory, networks: tuple[Network, ...], clock: IReactorTime
    ) -> None:
        super().__init__(wrapped)
        self.networks = networks
        self.clock = clock

    def logPrefix(self) -> str:
        prefix = getattr(self.wrappedFactory, "logPrefix", None)
        return f"{prefix() if prefix else type(self.wrappedFactory).__name__} (PROXY)"


def proxied(factory: IProtocolFactory, proxy_from: tuple[str, ...], clock: Any) -> IProtocolFactory:
    """``factory`` behind the PROXY protocol, accepting headers from ``proxy_from``
    (networks as ``[listen] proxy_from`` writes them)."""
    networks = tuple(ipaddress.ip_network(text, strict=False) for text in proxy_from)
    return ProxyHeaderFactory(factory, networks, clock)
