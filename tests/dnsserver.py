"""A test DNS server on 127.0.0.1 (UDP and TCP on one random port) with in-memory records.

    with running_dns({
        "example.net": [("MX", 10, "mx1.example.net"), ("MX", 20, "mx2.example.net")],
        "mx1.example.net": [("A", "127.0.0.1")],
        "mx2.example.net": [("A", "127.0.0.1"), ("AAAA", "::1")],
        "broken.example": "SERVFAIL",
    }) as dns:
        dns.port  # point the relay's nameservers at 127.0.0.1:dns.port
        dns.set("example.net", [("MX", 5, "mx2.example.net")])  # visible to the next query

Records: ("MX", preference, host), ("A", address), ("AAAA", address), ("TXT", text, ...)
(texts over 255 octets are split into strings); a name's value "SERVFAIL" makes every
query for it fail. Unknown names: NXDOMAIN; a known name without records of the asked type:
an empty NOERROR answer. Names are matched case-insensitively, with or without the final
dot. TTL 0 by default, so changes are never hidden by a cache.

As a subprocess: ``python -m tests.dnsserver --port P --zone FILE.json`` (the same mapping as
JSON, re-read whenever the file changes); it prints ``{"port": P}`` when listening.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import AuthoritativeDomainError

from tests.sink import ChildProcess, announce
from tests.typed_reactor import blockingCallFromThread, reactor

Record = tuple[Any, ...]
Records = Sequence[Record] | str  # a list of records, or "SERVFAIL"
Zone = Mapping[str, Records]
SERVFAIL = "SERVFAIL"
LISTEN_ATTEMPTS = 20


def _key(name: str | bytes) -> str:
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    return text.rstrip(".").lower()


def _txt_strings(texts: Sequence[str]) -> list[bytes]:
    strings: list[bytes] = []
    for text in texts:
        data = text.encode()
        strings += [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    return strings


def payload(record: Record, ttl: int) -> Any:
    """The twisted.names record for one tuple."""
    kind, *values = record
    kind = str(kind).upper()
    if kind == "MX":
        return dns.Record_MX(int(values[0]), values[1], ttl=ttl)
    if kind == "A":
        return dns.Record_A(values[0], ttl=ttl)
    if kind == "AAAA":
        return dns.Record_AAAA(values[0], ttl=ttl)
    if kind == "TXT":
        return dns.Record_TXT(*_txt_strings(values), ttl=ttl)
    raise ValueError(f"unsupported record type {kind!r} in {record!r}")


class ScriptedFailure(Exception):
    """A name whose value is "SERVFAIL" was asked for."""


class ZoneResolver(ResolverBase):
    """Answers from a mutable in-memory mapping; ``reload`` (if given) refreshes it first."""

    def __init__(self, zone: Zone, ttl: int = 0) -> None:
        super().__init__()
        self.ttl = ttl
        self.lock = threading.Lock()
        self.zone: dict[str, Records] = {}
        self.replace(zone)

    def replace(self, zone: Zone) -> None:
        for records in zone.values():
            self._check(records)
        with self.lock:
            self.zone = {_key(name): records for name, records in zone.items()}

    def set(self, name: str, records: Records) -> None:
        self._check(records)
        with self.lock:
            self.zone[_key(name)] = records

    def delete(self, name: str) -> None:
        with self.lock:
            self.zone.pop(_key(name), None)

    def _check(self, records: Records) -> None:
        if isinstance(records, str):
            if records != SERVFAIL:
                raise ValueError(f"a name's value is a list of records or {SERVFAIL!r}")
        else:
            for record in records:
                payload(record, self.ttl)

    def reload(self) -> None:
        """Refresh the zone before each query (the subprocess re-reads its file)."""

    def query(self, query: dns.Query, timeout: Any = None) -> defer.Deferred[Any]:
        return defer.maybeDeferred(self.answer, query)

    def answer(self, query: dns.Query) -> tuple[list[dns.RRHeader], list[Any], list[Any]]:
        self.reload()
        name = query.name.name
        with self.lock:
            records = self.zone.get(_key(name))
        if records is None:
            raise AuthoritativeDomainError(name)  # NXDOMAIN
        if isinstance(records, str):
            raise ScriptedFailure(name)  # SERVFAIL
        answers = []
        for record in records:
            data = payload(record, self.ttl)
            if query.type in (data.TYPE, dns.ALL_RECORDS):
                answers.append(dns.RRHeader(name, data.TYPE, dns.IN, self.ttl, data, auth=True))
        return answers, [], []


class FileZoneResolver(ZoneResolver):
    """A zone from a JSON file, re-read whenever the file changes."""

    def __init__(self, path: Path, ttl: int = 0) -> None:
        self.path = path
        self.stamp: tuple[int, int, int] | None = None
        super().__init__({}, ttl)
        self.reload()

    def reload(self) -> None:
        stat = self.path.stat()
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp != self.stamp:
            self.replace(json.loads(self.path.read_text()))
            self.stamp = stamp


class QuietDNSServerFactory(server.DNSServerFactory):
    """SERVFAIL is a scripted answer here, not an error worth a logged traceback."""

    def gotResolverError(self, failure: Any, protocol: Any, message: Any, address: Any) -> None:
        rcode = dns.ENAME if failure.check(AuthoritativeDomainError) else dns.ESERVER
        response = self._responseFromMessage(message=message, rCode=rcode)
        self.sendReply(protocol, response, address)


def listen(resolver: ZoneResolver, port: int = 0) -> tuple[int, list[Any]]:
    """Listen on UDP and TCP, on ``port`` or one random port free for both (reactor thread)."""
    factory = QuietDNSServerFactory(authorities=[resolver])
    for _ in range(LISTEN_ATTEMPTS):
        # A new protocol each try: a stopped UDP port lets go of its protocol only later.
        protocol = dns.DNSDatagramProtocol(factory)
        udp = reactor.listenUDP(port, protocol, interface="127.0.0.1")
        address = udp.getHost()
        assert isinstance(address, IPv4Address)
        chosen = address.port
        try:
            tcp = reactor.listenTCP(chosen, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            if port:
                raise
            continue
        return chosen, [udp, tcp]
    raise CannotListenError("127.0.0.1", port, "no port free for both UDP and TCP")


class DnsServer:
    """A running server: ``port``; ``set``/``delete``/``replace`` change the records."""

    def __init__(self, resolver: ZoneResolver, port: int, listening: list[Any]) -> None:
        self.resolver = resolver
        self.port = port
        self.listening = listening

    def set(self, name: str, records: Records) -> None:
        self.resolver.set(name, records)

    def fail(self, name: str) -> None:
        """Every query for ``name`` gets SERVFAIL."""
        self.resolver.set(name, SERVFAIL)

    def delete(self, name: str) -> None:
        """``name`` no longer exists (NXDOMAIN)."""
        self.resolver.delete(name)

    def replace(self, zone: Zone) -> None:
        self.resolver.replace(zone)

    @property
    def nameserver(self) -> str:
        """For ``[relay] nameservers``."""
        return f"127.0.0.1:{self.port}"


@contextmanager
def running_dns(zone: Zone, ttl: int = 0) -> Iterator[DnsServer]:
    """A DNS server in this process's reactor, stopped on exit."""
    from tests.conftest import _ensure_reactor

    _ensure_reactor()
    resolver = ZoneResolver(zone, ttl)
    port, listening = blockingCallFromThread(reactor, listen, resolver)
    try:
        yield DnsServer(resolver, port, listening)
    finally:
        for port_object in listening:
            blockingCallFromThread(reactor, port_object.stopListening)


def write_zone(path: Path, zone: Zone) -> None:
    """Write (atomically) a zone file for ``python -m tests.dnsserver --zone``."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(zone))
    temporary.replace(path)


class DnsProcess(ChildProcess):
    """``python -m tests.dnsserver`` in a child; ``set_zone`` rewrites its zone file."""

    def __init__(self, zone_file: Path, port: int = 0) -> None:
        self.zone_file = zone_file
        argv = ["--zone", str(zone_file), "--port", str(port)]
        super().__init__("tests.dnsserver", argv, zone_file.parent)
        self.port: int = self.ready["port"]

    def set_zone(self, zone: Zone) -> None:
        write_zone(self.zone_file, zone)


@contextmanager
def dns_process(zone_file: Path, zone: Zone, port: int = 0) -> Iterator[DnsProcess]:
    write_zone(zone_file, zone)
    child = DnsProcess(zone_file, port)
    try:
        yield child
    finally:
        child.terminate()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.dnsserver", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--zone", type=Path, required=True, help="JSON: name -> records")
    parser.add_argument("--ttl", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    port, _ = listen(FileZoneResolver(args.zone, args.ttl), args.port)
    announce(port=port, pid=os.getpid())
    reactor.run()


if __name__ == "__main__":
    main()
