"""Client network addresses as the server talks about them: by prefix, not by host."""

from __future__ import annotations

import functools
import ipaddress

IPV4_PREFIX = 24
IPV6_PREFIX = 56


# Cached: every AUTH attempt asks, and the ipaddress module costs ~30 us a call, which
# was most of the CPU of a throttled attempt (bench/auth_flood.py, profile in the notes).
@functools.lru_cache(maxsize=65536)
def network_prefix(host: str, ipv4: int = IPV4_PREFIX, ipv6: int = IPV6_PREFIX) -> str:
    """The client's network: /24 for IPv4, /56 for IPv6 (IPv4-mapped IPv6 counts as IPv4)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = ipv4 if address.version == 4 else ipv6
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


SESSION_IPV6_PREFIX = 64  # one host's network: SLAAC and privacy addresses pick within it


def session_address(host: str) -> str:
    """What the per-address session cap counts as one client: the IPv4 address (IPv4-
    mapped IPv6 too), or the IPv6 /64, since a host is free to pick any address in it."""
    network = network_prefix(host, 32, SESSION_IPV6_PREFIX)
    if network == "unknown":  # not an IP (a UNIX socket): its own name
        return host
    return network.removesuffix("/32")
