"""Where a client is, coarsely, for the impossible-travel check (draft 6.2 item 4).

Without a GeoIP database a region is the /16 (IPv4) or /32 (IPv6) network; with a
MaxMind-format database it is the country code, falling back to the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clientid_mta.smtp.network import network_prefix


def network_region(host: str) -> str:
    return network_prefix(host, ipv4=16, ipv6=32)


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
