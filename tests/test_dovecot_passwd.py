"""Issue 13, point 3: one passwd file for both. ``user add`` writes Dovecot's
seven-field form (``[auth] passwd_format = "dovecot"``), a real Dovecot reads it as
passdb and userdb, and the same password logs in over IMAP and over our SMTP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.dovecot_server import MakeDovecot, dovecot_servers
from tests.test_abuse_throttling import ACCEPTED, attempt, new_token

make_dovecot = pytest.fixture(name="make_dovecot")(dovecot_servers)


def test_dovecot_reads_the_seven_field_file_that_user_add_wrote(
    make_server: Callable[..., RunningServer], make_dovecot: MakeDovecot, tmp_path: Path
) -> None:
    server = make_server('[auth]\npasswd_format = "dovecot"\n')
    server.add_user("dana@example.org", "dana-password", send_as="info@example.org")
    passwd = server.config.auth.passwd_file
    [line] = [x for x in passwd.read_text().splitlines() if not x.startswith("#")]
    assert line.count(":") >= 7 and line.endswith(":send_as=info@example.org")
    dovecot = make_dovecot(passwd, passwd_userdb=True)
    assert dovecot.imap_messages("dana@example.org", "dana-password") == []  # logged in
    assert attempt(server, new_token(), "dana@example.org", "dana-password") == ACCEPTED
    account = server.service.components.passwords.get("dana@example.org")
    assert account is not None and account.may_send_as("info@example.org")
    assert "Error" not in dovecot.log()
