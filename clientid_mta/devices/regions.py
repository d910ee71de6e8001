"""Where a client is, coarsely, for the impossible-travel check (draft 6.2 item 4).

Without a GeoIP database a region is the /16 (IPv4) or /32 (IPv6) network; with a
MaxMind-format database it is the country code, falling back to the network.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from clientid_mta.smtp.network import network_prefix


def network_region(host: str) -> str:
    return network_prefix(host, ipv4=16, ipv6=32)


def _lookup_form(host: str) -> str:
    """The address as the database knows it: no zone, and an IPv4-mapped IPv6 address
    (a dual-stack listener, a PROXY TCP6 header) as IPv4, which an IPv4-only database
    takes and the others file under the same country."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class Regions:
    def __init__(self, geoip_database: Path | None = None) -> None:
        self._reader: Any = None
        if geoip_database is not None:
            import maxminddb

            self._reader = maxminddb.open_database(str(geoip_database))

    def region(self, host: str) -> str:
        if self._reader is not None:
            try:
                record = self._reader.get(_lookup_form(host))
            except ValueError:
                record = None
            country = (
                (record or {}).get("country", {}).get("iso_code")
                if isinstance(record, dict)
                else None
            )
            if country:
                return f"country:{country}"
        return network_region(host)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
