"""Where mail for a domain goes: the smarthost, or the domain's MX hosts (RFC 5321 5.1).

Direct delivery looks up MX records with ``twisted.names``, tries them in preference
order (equal preferences shuffled), and falls back to the domain's own A/AAAA records
when it has no MX (the implicit MX). A null MX (RFC 7505) or a domain that does not
exist is a permanent failure; any other DNS trouble is temporary.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from typing import Any

from twisted.names import client, dns, error
from twisted.names.common import ResolverBase

from clientid_mta.config import RelayConfig


@dataclass(frozen=True)
class Hop:
    """One server to try: connect to ``address``:``port``, check the certificate for ``name``."""

    name: str
    address: str
    port: int


class RouteFailed(Exception):
    """No server to try. ``permanent`` for a domain that cannot receive mail."""

    def __init__(self, reason: str, status: str, permanent: bool) -> None:
        super().__init__(reason)
        self.status = status
        self.permanent = permanent


def make_resolver(relay: RelayConfig) -> ResolverBase:
    if relay.nameservers:
        servers = []
        for text in relay.nameservers:
            host, _, port = text.rpartition(":")
            servers.append((host.strip("[]"), int(port)))
        return client.createResolver(servers=servers, resolvconf="/dev/null", hosts="/dev/null")
    return client.createResolver()


class Router:
    def __init__(self, relay: RelayConfig, resolver: ResolverBase | None = None) -> None:
        self.relay = relay
        self._resolver = resolver

    @property
    def resolver(self) -> ResolverBase:
        if self._resolver is None:  # created on first use: reads resolv.conf
            self._resolver = make_resolver(self.relay)
        return self._resolver

    def destination(self, recipient: str) -> str:
        """The key that groups recipients into one connection."""
        if self.relay.smarthost_address is not None:
            return "[smarthost]"
        return recipient.rpartition("@")[2].lower()

    async def hops(self, destination: str) -> list[Hop]:
        smarthost = self.relay.smarthost_address
        if smarthost is not None:
            host, port = smarthost
            return [Hop(host, host, port)]  # the system resolver (and /etc/hosts) finds it
        exchanges = await self._exchanges(destination)
        hops: list[Hop] = []
        for name in exchanges:
            try:
                addresses = await self._addresses(name)
            except RouteFailed:
                continue  # an MX host without an address: try the next one
            hops.extend(Hop(name, address, self.relay.mx_port) for address in addresses)
        if not hops:
            raise RouteFailed(f"no address for the mail servers of {destination}", "4.4.4", False)
        return hops

    async def _exchanges(self, domain: str) -> list[str]:
        try:
            answers: list[Any]
            answers, _auth, _add = await self.resolver.lookupMailExchange(domain)
        except error.DNSNameError:
            raise RouteFailed(f"domain {domain} does not exist", "5.1.2", True) from None
        except (
            error.DNSServerError,
            error.DNSQueryRefusedError,
            error.DNSFormatError,
            error.DNSNotImplementedError,
            error.DNSUnknownError,
        ) as problem:  # SERVFAIL and the like say nothing of the MX: not an implicit MX
            raise RouteFailed(f"DNS lookup of {domain} failed: {problem}", "4.4.3", False) from None
        except error.DomainError:
            answers = []  # no MX records: the implicit MX below
        except Exception as problem:  # timeouts: try again later
            raise RouteFailed(f"DNS lookup of {domain} failed: {problem}", "4.4.3", False) from None
        records = [
            (a.payload.preference, random.random(), str(a.payload.name).rstrip("."))
            for a in answers
            if a.type == dns.MX
        ]
        if not records:
            return [domain]
        if len(records) == 1 and records[0][2] == "":
            raise RouteFailed(f"{domain} accepts no mail (null MX)", "5.1.10", True)
        return [name for _pref, _shuffle, name in sorted(records) if name]

    async def _addresses(self, name: str) -> list[str]:
        found: list[str] = []
        # IPv4 first, as most small sites have no IPv6 route out.
        for lookup, rtype in (
            (self.resolver.lookupAddress, dns.A),
            (self.resolver.lookupIPV6Address, dns.AAAA),
        ):
            try:
                answers, _auth, _add = await lookup(name)
            except Exception:  # noqa: S112 - a missing family is normal; no address at all is not
                continue
            found.extend(a.payload.dottedQuad() for a in answers if a.type == rtype == dns.A)
            found.extend(
                _ipv6_text(a.payload.address) for a in answers if a.type == rtype == dns.AAAA
            )
        if not found:
            raise RouteFailed(f"no address for {name}", "4.4.4", False)
        return found


def _ipv6_text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, packed)
