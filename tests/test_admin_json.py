"""Issue 14: ``--json`` on ``user list``, ``device list``, ``audit`` and ``queue list``:
one JSON array each, with what the text listing shows, for scripts."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.conftest import RunningServer
from tests.serverproc import fingerprint_of, login_code, submit

ALICE, ALICE_PW = "alice@example.org", "alice-password"
DEVICE = "UUID 0d6f3c1e-93a4-4f7b-9d0e-2b1c3a4d5e6f"


def listing(server: RunningServer, *argv: str) -> Any:
    return json.loads(server.admin(*argv, "--json"))


def test_listings_as_json(make_server: Callable[..., RunningServer]) -> None:
    server = make_server()
    server.add_user(ALICE, ALICE_PW, send_as="team@example.org")
    assert listing(server, "user", "list") == [{"address": ALICE, "send_as": ["team@example.org"]}]
    assert listing(server, "device", "list", ALICE) == []

    assert login_code(server, ALICE, "wrong", DEVICE) == 535
    assert login_code(server, ALICE, ALICE_PW, DEVICE) == 235
    (device,) = listing(server, "device", "list", ALICE)
    assert device["fingerprint"] == fingerprint_of(server, DEVICE)
    assert (device["type"], device["state"], device["logins"]) == ("UUID", "trusted", 1)
    assert device["first_seen"].endswith("Z") and device["last_network"] == "127.0.0.0/24"
    assert DEVICE.split()[1] not in json.dumps(device)

    audit = server.service.components.defences.audit
    assert audit is not None
    audit.flush()
    rows = listing(server, "audit", "--account", ALICE)
    assert [(r["outcome"], r["reason"], r["device"]) for r in rows] == [
        ("refused", "bad_password", device["fingerprint"]),
        ("accepted", "first_device_trusted", device["fingerprint"]),
    ]

    client = server.smtp()
    client.login(ALICE, ALICE_PW)
    submit(client, ALICE, "carol@example.net", b"Subject: q\r\n\r\nhi\r\n")
    client.quit()
    (entry,) = listing(server, "queue", "list")
    assert (entry["sender"], entry["account"]) == (ALICE, ALICE)
    (recipient,) = entry["recipients"]
    assert (recipient["address"], recipient["state"]) == ("carol@example.net", "pending")
