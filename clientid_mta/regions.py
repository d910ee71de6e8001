"""Where a client is, coarsely, for the impossible-travel check (draft 6.2 item 4).

Without a GeoIP database a region is the /16 (IPv4) or /32 (IPv6) network; with a
MaxMind-format database it is the country code, falling back to the network.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any


def network_region(host: str) -> str:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 16 if address.version == 4 else 32
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class Regions:
    def __init__(self, geoip_database: Path | None = None) -> None:
        self._reader: Any = None
        if geoip_database is not None:
            import maxminddb

            self._reader = maxminddb.open_database(str(geoip_database))

    def region(self, host: str) -> str:
        if self._reader is not None:
            try:
                record = self._reader.get(host.split("%", 1)[0])
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
