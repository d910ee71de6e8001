"""Thunderbird's exact sequence (C9, C11): CLIENTID once, a wrong password, then a second
AUTH with the right password WITHOUT resending CLIENTID. The identity must survive the
failed AUTH, so the second login is decided, recorded and counted for that device."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from clientid_mta.devices.keys import load_or_create_server_key
from clientid_mta.smtp.clientid import (
    device_key,
    parse_clientid,
)
from tests.conftest import THUNDERBIRD_UUID, RunningServer, Wire

ALICE = "alice@example.org"
MESSAGE = f"From: {ALICE}\r\nTo: bob@example.org\r\nSubject: from Thunderbird\r\n\r\nHi.\r\n"
INVALID = (535, ["5.7.8 Authentication credentials invalid"])

Auth = Callable[[Wire, str, str], tuple[int, list[str]]]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def auth_plain(wire: Wire, user: str, password: str) -> tuple[int, list[str]]:
    return wire.cmd("AUTH PLAIN " + b64(f"\0{user}\0{password}"))


def auth_login(wire: Wire, user: str, password: str) -> tuple[int, list[str]]:
    """AUTH LOGIN as Thunderbird sends it: no initial response, two challenges."""
    assert wire.cmd("AUTH LOGIN") == (334, [b64("Username:")])
    assert wire.cmd(b64(user)) == (334, [b64("Password:")])
    return wire.cmd(b64(password))


@pytest.mark.parametrize("auth", [auth_plain, auth_login], ids=["plain", "login"])
def test_C9_C11_thunderbird_retries_auth_without_resending_clientid(
    server: RunningServer, auth: Auth
) -> None:
    wire = server.wire().tls_session()
    assert wire.cmd(f"CLIENTID UUID {THUNDERBIRD_UUID}") == (250, ["2.0.0 OK"])  # C9
    assert auth(wire, ALICE, "wrong-password") == INVALID
    assert auth(wire, ALICE, "alice-password") == (235, ["2.7.0 Authentication successful"])
    assert wire.cmd(f"MAIL FROM:<{ALICE}>") == (250, ["2.1.0 Ok"])
    assert wire.cmd("RCPT TO:<bob@example.org>") == (250, ["2.1.5 Ok"])
    assert wire.code("DATA") == 354
    wire.send(MESSAGE + ".\r\n")
    code, [text] = wire.reply()
    assert (code, text.startswith("2.0.0 Ok: queued as ")) == (250, True), text
    assert wire.code("QUIT") == 221

    [stored] = server.messages("bob@example.org")
    assert stored["Subject"] == "from Thunderbird"

    # C11: the retry was decided with the UUID: its device is the account's first (tofu),
    # trusted, and has exactly the one successful login counted.
    key = load_or_create_server_key(server.config.clientid.key_file)
    expected = device_key(key, parse_clientid(f"UUID {THUNDERBIRD_UUID}".encode()))
    [device] = server.service.components.store.devices.devices_of(ALICE)
    assert (device.device_key, device.type, device.state, device.logins) == (
        expected,
        "UUID",
        "trusted",
        1,
    )
    [header, row] = server.admin("device", "list", ALICE).splitlines()
    assert row.split()[:3] == [device.fingerprint, "UUID", "trusted"], header
