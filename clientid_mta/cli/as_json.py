"""``--json``: the listings of the admin command as one JSON array, for scripts.

Times are ISO 8601 in UTC; device keys and tokens never appear (a device is its
fingerprint, as in the text listing).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from clientid_mta.auth.passwd_file import Account
from clientid_mta.devices.store import AuditEntry, Device
from clientid_mta.outbound.admin import utc_iso


def emit(out: TextIO, rows: Sequence[dict[str, Any]]) -> None:
    json.dump(list(rows), out, indent=2, ensure_ascii=False)
    out.write("\n")


def accounts(items: Iterable[Account]) -> list[dict[str, Any]]:
    return [{"address": a.address, "send_as": sorted(a.send_as)} for a in items]


def devices(items: Iterable[Device]) -> list[dict[str, Any]]:
    return [
        {
            "account": d.account,
            "fingerprint": d.fingerprint,
            "type": d.type,
            "state": d.state,
            "label": d.label,
            "logins": d.logins,
            "first_seen": utc_iso(d.first_seen),
            "last_seen": utc_iso(d.last_seen),
            "last_login": utc_iso(d.last_login),
            "last_network": d.last_network,
        }
        for d in items
    ]


def audit(items: Iterable[AuditEntry]) -> list[dict[str, Any]]:
    """A row with ``count`` above 1 and no account is a count of alike attempts within
    the minute at ``time`` (throttled, or a repeated wrong password)."""
    return [
        {
            "time": utc_iso(e.time),
            "outcome": e.outcome,
            "account": e.account or None,
            "device": e.fingerprint or None,
            "network": e.network,
            "reason": e.reason,
            "count": e.count,
        }
        for e in items
    ]
