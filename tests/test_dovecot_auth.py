"""Issue 13, point 1: passwords checked by a real Dovecot's auth service.

Each test starts a private Dovecot (``tests/dovecot_server.py``) whose passdbs are our
passwd file and a file of its own (users that exist only in Dovecot), and a server with
``[auth] backend = "dovecot"`` pointed at its auth-client socket. The device policy,
the budgets and the audit are ours, exactly as with the passwd file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.dovecot_server import DovecotServer, MakeDovecot, dovecot_servers
from tests.serverproc import fingerprint_of
from tests.test_abuse_throttling import (
    ACCEPTED,
    ALICE,
    ALICE_PW,
    REFUSED,
    THROTTLED,
    WRONG,
    attempt,
    new_token,
)

CAROL, CAROL_PW = "carol@example.org", "carol-password"  # only in Dovecot's passdb
UNAVAILABLE = (454, "4.7.0 Temporary authentication failure")

make_dovecot = pytest.fixture(name="make_dovecot")(dovecot_servers)


def dovecot_toml(dovecot: DovecotServer, extra: str = "") -> str:
    return f"""
[auth]
backend = "dovecot"
dovecot_socket = "{dovecot.auth_socket}"
{extra}
"""


def beside_dovecot(
    make_server: Callable[..., RunningServer],
    make_dovecot: MakeDovecot,
    tmp_path: Path,
    extra: str = "",
) -> tuple[RunningServer, DovecotServer]:
    """A Dovecot reading our passwd file, and our server asking it."""
    passwd = tmp_path / "server" / "data" / "passwd"
    passwd.parent.mkdir(parents=True)
    dovecot = make_dovecot(passwd)
    dovecot.add_user(CAROL, CAROL_PW)
    server = make_server(dovecot_toml(dovecot, extra))
    server.add_user(ALICE, ALICE_PW)  # in our passwd file, which Dovecot reads too
    return server, dovecot


def test_a_dovecot_only_user_logs_in_and_the_device_policy_still_decides(
    make_server: Callable[..., RunningServer], make_dovecot: MakeDovecot, tmp_path: Path
) -> None:
    server, dovecot = beside_dovecot(make_server, make_dovecot, tmp_path)
    assert server.service.components.passwords.get(CAROL) is None  # we never heard of her
    first, second = new_token(), new_token()
    assert attempt(server, first, CAROL, CAROL_PW) == ACCEPTED  # tofu: her first device
    assert server.service.components.passwords.get(CAROL) is not None  # learnt
    assert attempt(server, second, CAROL, CAROL_PW) == REFUSED  # a second device waits
    listing = server.admin("device", "list", CAROL)
    pending = [row.split()[0] for row in listing.splitlines()[1:] if "pending" in row]
    assert len(pending) == 1
    server.admin("device", "approve", CAROL, pending[0])
    known = server.service.components.defences.known
    assert known is not None
    known.refresh()  # what housekeeping does every few seconds
    assert attempt(server, second, CAROL, CAROL_PW) == ACCEPTED
    # The passwd file's users log in through Dovecot the same way.
    assert attempt(server, new_token(), ALICE, ALICE_PW) == ACCEPTED

    # Dovecot was told the device's fingerprint, never its token.
    log = dovecot.log()
    assert f"client_id={fingerprint_of(server, f'UUID {second}')}" in log
    assert second not in log and first not in log


def test_a_wrong_password_is_our_535_and_spends_our_budget(
    make_server: Callable[..., RunningServer], make_dovecot: MakeDovecot, tmp_path: Path
) -> None:
    server, dovecot = beside_dovecot(
        make_server, make_dovecot, tmp_path, "\n[throttle]\nnetwork_burst = 2\n"
    )
    device = new_token()
    assert attempt(server, device, CAROL, f"{WRONG}-1") == REFUSED
    assert attempt(server, device, CAROL, f"{WRONG}-2") == REFUSED
    # The network's budget is spent: even the right password waits now, and Dovecot is
    # not asked (our budget is checked first).
    asked = dovecot.log().count("Password mismatch")
    assert asked == 2
    assert attempt(server, device, CAROL, CAROL_PW) == THROTTLED
    assert dovecot.log().count("Password mismatch") == asked


def test_dovecot_stopped_is_454_and_back_works_without_a_restart(
    make_server: Callable[..., RunningServer], make_dovecot: MakeDovecot, tmp_path: Path
) -> None:
    server, dovecot = beside_dovecot(make_server, make_dovecot, tmp_path)
    device = new_token()
    assert attempt(server, device, CAROL, CAROL_PW) == ACCEPTED
    dovecot.stop()
    assert attempt(server, device, CAROL, CAROL_PW) == UNAVAILABLE
    assert attempt(server, new_token(), ALICE, ALICE_PW) == UNAVAILABLE
    dovecot.start()
    assert attempt(server, device, CAROL, CAROL_PW) == ACCEPTED  # reconnected
    assert attempt(server, new_token(), ALICE, ALICE_PW) == ACCEPTED


def test_dovecot_over_tcp(
    make_server: Callable[..., RunningServer], make_dovecot: MakeDovecot, tmp_path: Path
) -> None:
    passwd = tmp_path / "server" / "data" / "passwd"
    passwd.parent.mkdir(parents=True)
    dovecot = make_dovecot(passwd)
    dovecot.add_user(CAROL, CAROL_PW)
    server = make_server(
        f'[auth]\nbackend = "dovecot"\ndovecot_socket = "tcp:127.0.0.1:{dovecot.auth_port}"\n'
        f'[delivery]\nlmtp = "tcp:127.0.0.1:{dovecot.lmtp_port}"\n'
    )
    assert attempt(server, new_token(), CAROL, CAROL_PW) == ACCEPTED
    client = server.smtp()
    try:
        client.login(CAROL, CAROL_PW)
        client.sendmail(CAROL, [CAROL], b"Subject: over tcp\r\n\r\nhello\r\n")
    finally:
        client.close()
    stored = dovecot.imap_messages(CAROL, CAROL_PW)  # with the new-device notice
    assert [m for m in stored if b"Subject: over tcp" in m]
