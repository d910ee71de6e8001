"""Issue 13, "Dovecot stopped": the server as admins run it (twistd), with both
``[auth] backend = "dovecot"`` and ``[delivery] lmtp``. Dovecot stopped: ``454`` at
``AUTH``, ``451`` at the end of data, nothing acknowledged lost, no traceback in the
log; Dovecot back: both work again without a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dovecot_server import MakeDovecot, dovecot_servers
from tests.serverproc import running
from tests.test_abuse_throttling import ACCEPTED, attempt, new_token

make_dovecot = pytest.fixture(name="make_dovecot")(dovecot_servers)

ALICE, ALICE_PW = "alice@example.org", "alice-password"
BOB, BOB_PW = "bob@example.org", "bob-password"
UNAVAILABLE = (454, "4.7.0 Temporary authentication failure")
LOCAL_ERROR = (451, b"4.3.0 Local error in processing, try again later")


def test_dovecot_stopped_and_back_under_twistd(make_dovecot: MakeDovecot, tmp_path: Path) -> None:
    root = tmp_path / "twistd"
    (root / "data").mkdir(parents=True)
    dovecot = make_dovecot(root / "data" / "passwd")
    toml = (
        f'[auth]\nbackend = "dovecot"\ndovecot_socket = "{dovecot.auth_socket}"\n'
        f'[delivery]\nlmtp = "{dovecot.lmtp_socket}"\n'
    )
    with running(root, toml) as server:
        device = new_token()
        assert attempt(server, device, ALICE, ALICE_PW) == ACCEPTED
        session = server.smtp()  # logged in while Dovecot is up
        session.login(ALICE, ALICE_PW)
        dovecot.stop()
        assert attempt(server, device, ALICE, ALICE_PW) == UNAVAILABLE
        assert session.mail(ALICE)[0] == 250
        assert session.rcpt(BOB)[0] == 250
        assert session.data(b"Subject: while down\r\n\r\nhello\r\n") == LOCAL_ERROR
        dovecot.start()
        assert session.mail(ALICE)[0] == 250  # the same session, no restart
        assert session.rcpt(BOB)[0] == 250
        assert session.data(b"Subject: while down\r\n\r\nhello\r\n")[0] == 250
        session.quit()
        assert attempt(server, device, ALICE, ALICE_PW) == ACCEPTED
        [stored] = [m for m in dovecot.imap_messages(BOB, BOB_PW) if b"while down" in m]
        assert b"hello" in stored
        output = server.output()
    assert "Traceback" not in output and "Unhandled" not in output
    assert "dovecot auth" in output and "unreachable" in output  # said once, plainly
