"""Outbound routing alone: a stub ``twisted.names`` resolver, no sockets, no sleeps."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.names import dns, error
from twisted.names.common import ResolverBase
from twisted.python.failure import Failure

from clientid_mta.config import RelayConfig
from clientid_mta.outbound.routing import Hop, RouteFailed, Router

Answer = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]
Zone = dict[str, list[tuple[Any, ...]]]  # the records of each name, see StubResolver


class StubResolver(ResolverBase):
    """Answers from a zone: {name: [("MX", pref, host) | ("A", ip) | ("AAAA", ip)]}; a
    name missing from the zone is NXDOMAIN; ``errors`` maps a name to an exception."""

    def __init__(self, zone: Zone, **errors: Exception) -> None:
        super().__init__()
        self.zone = zone
        self.errors = errors
        self.asked: list[tuple[str, str]] = []

    def _answer(self, name: str, kind: str) -> defer.Deferred[Answer]:
        name = name.decode() if isinstance(name, bytes) else name
        self.asked.append((kind, name))
        if name in self.errors:
            return defer.fail(self.errors[name])
        if name not in self.zone:
            return defer.fail(error.DNSNameError(name))
        records = []
        for record in self.zone[name]:
            if record[0] != kind:
                continue
            if kind == "MX":
                payload: Any = dns.Record_MX(record[1], record[2])
                rtype = dns.MX
            elif kind == "A":
                payload, rtype = dns.Record_A(record[1]), dns.A
            else:
                payload, rtype = dns.Record_AAAA(record[1]), dns.AAAA
            records.append(dns.RRHeader(name, rtype, dns.IN, 60, payload))
        if not records:
            return defer.fail(error.DomainError(name))
        return defer.succeed((records, [], []))

    def lookupMailExchange(self, name: str, timeout: Any = None) -> defer.Deferred[Answer]:
        return self._answer(name, "MX")

    def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred[Answer]:
        return self._answer(name, "A")

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> defer.Deferred[Answer]:
        return self._answer(name, "AAAA")


def hops_of(router: Router, destination: str) -> list[Hop] | Failure:
    """The router's answer, synchronously (the stub resolver answers at once)."""
    results: list[Any] = []
    defer.ensureDeferred(router.hops(destination)).addBoth(results.append)
    [result] = results
    return result


def direct(resolver: StubResolver, mx_port: int = 25) -> Router:
    return Router(RelayConfig(smarthost="", mx_port=mx_port), resolver)


def test_router_smarthost_is_one_hop_and_one_destination() -> None:
    resolver = StubResolver({})
    router = Router(RelayConfig(smarthost="relay.example.net:587"), resolver)
    assert router.destination("a@x.example") == router.destination("b@y.example") == "[smarthost]"
    assert hops_of(router, "[smarthost]") == [Hop("relay.example.net", "relay.example.net", 587)]
    assert resolver.asked == []  # the system resolver finds the smarthost at connect


def test_router_mx_in_preference_order_ipv4_before_ipv6() -> None:
    zone: Zone = {
        "example.net": [("MX", 20, "mx2.example.net"), ("MX", 10, "mx1.example.net")],
        "mx1.example.net": [("A", "192.0.2.1"), ("AAAA", "2001:db8::1")],
        "mx2.example.net": [("A", "192.0.2.2")],
    }
    router = direct(StubResolver(zone), mx_port=2525)
    assert router.destination("Carol@Example.NET") == "example.net"
    assert hops_of(router, "example.net") == [
        Hop("mx1.example.net", "192.0.2.1", 2525),
        Hop(
            "mx1.example.net",
            socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "2001:db8::1")),
            2525,
        ),
        Hop("mx2.example.net", "192.0.2.2", 2525),
    ]


def test_router_mx_host_without_address_is_skipped() -> None:
    zone: Zone = {
        "example.net": [("MX", 10, "gone.example.net"), ("MX", 20, "mx2.example.net")],
        "mx2.example.net": [("A", "192.0.2.2")],
    }
    assert hops_of(direct(StubResolver(zone)), "example.net") == [
        Hop("mx2.example.net", "192.0.2.2", 25)
    ]


def test_router_no_mx_falls_back_to_the_domains_own_address() -> None:
    zone: Zone = {"implicit.example": [("A", "192.0.2.9")]}
    assert hops_of(direct(StubResolver(zone)), "implicit.example") == [
        Hop("implicit.example", "192.0.2.9", 25)
    ]


@pytest.mark.parametrize(
    ("zone", "errors", "status", "permanent"),
    [
        ({}, {}, "5.1.2", True),  # NXDOMAIN
        ({"example.net": [("MX", 0, "")]}, {}, "5.1.10", True),  # RFC 7505 null MX
        ({}, {"example.net": error.DNSServerError("SERVFAIL")}, "4.4.3", False),
        ({}, {"example.net": defer.TimeoutError("timeout")}, "4.4.3", False),
        ({"example.net": [("MX", 10, "mx.example.net")]}, {}, "4.4.4", False),  # no address
    ],
)
def test_router_failures_are_permanent_only_for_a_domain_that_cannot_receive_mail(
    zone: Zone,
    errors: dict[str, Exception],
    status: str,
    permanent: bool,
) -> None:
    result = hops_of(direct(StubResolver(zone, **errors)), "example.net")
    assert isinstance(result, Failure) and result.check(RouteFailed)
    problem = result.value
    assert isinstance(problem, RouteFailed)
    assert (problem.status, problem.permanent) == (status, permanent)


def test_router_runner_delivers_to_the_mx_address_through_the_stub(tmp_path: Path) -> None:
    """The runner with direct delivery: the MX found by the stub is where it connects."""
    from clientid_mta.outbound.runner import LocalBounceTarget, QueueRunner
    from tests.test_runner_units import FakeReactor, FakeSend, commit, make_config

    config = make_config(tmp_path, '[relay]\nsmarthost = ""\nmx_port = 2525\n')
    zone: Zone = {
        "example.net": [("MX", 10, "mx1.example.net")],
        "mx1.example.net": [("A", "192.0.2.1")],
    }
    from clientid_mta.outbound.queue import QueueDir

    queue = QueueDir(config.queue_config.directory)
    queue.create()
    commit(queue, "carol@example.net")
    hosts: list[tuple[str, int]] = []
    send = FakeSend()

    def recording_send(host: str, port: int, transactions: list[Any], **options: Any) -> Any:
        hosts.append((host, port))
        assert options["tls_hostname"] == "mx1.example.net"
        return send(host, port, transactions, **options)

    runner = QueueRunner(
        config,
        queue,
        LocalBounceTarget(lambda _d: False, lambda _a, _b: False),
        Router(config.relay, StubResolver(zone)),
        reactor=FakeReactor(),
        send=recording_send,
    )
    runner.startService()
    try:
        assert hosts == [("192.0.2.1", 2525)]
        assert queue.ids() == []
    finally:
        runner.stopService()
