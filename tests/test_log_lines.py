"""Issue 16: what a session logs. One line per message; per session one line for its
start and its CLIENTID together (the type's ``syslog`` flag), written at the CLIENTID,
else before its first AUTH, else at its end; the verdict's line is the checker's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import provider

from tests.test_protocol_units import TOKEN, Session, message, plain


@pytest.fixture
def lines() -> Iterator[list[str]]:
    """The protocol's log lines while the test runs."""
    seen: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "clientid_mta.smtp.protocol":
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_a_session_with_clientid_logs_one_line_for_it_and_one_per_message(
    lines: list[str],
) -> None:
    session = Session()
    assert lines == []  # nothing at connect
    session.login()
    [start] = lines
    assert start.startswith(f"session {session.protocol.session_id} from ")
    assert " on submission clientid type=UUID device=" in start
    assert TOKEN not in start
    for _ in range(2):
        session.envelope()
        session.send(message())
    assert len(lines) == 3  # the session, then one line per message
    assert all(line.startswith("accepted ") for line in lines[1:])
    assert "account=alice@example.org" in lines[1] and session.protocol.session_id in lines[1]
    session.disconnect()
    assert len(lines) == 3


def test_a_session_without_clientid_logs_its_line_before_auth(lines: list[str]) -> None:
    session = Session()
    session.starttls()
    session.cmd("EHLO client.example")
    assert lines == []
    session.cmd(f"AUTH PLAIN {plain()}")
    assert [line.split(" from ")[0] for line in lines] == [f"session {session.protocol.session_id}"]


def test_a_session_that_only_connects_is_logged_when_it_ends(lines: list[str]) -> None:
    session = Session()
    session.cmd("EHLO client.example")
    assert lines == []
    session.disconnect()
    assert len(lines) == 1 and lines[0].endswith(" on submission")


def test_a_second_clientid_is_its_own_line(lines: list[str]) -> None:
    session = Session()
    session.starttls()
    for _ in range(2):  # a new greeting forgets the identity (C10): a second CLIENTID
        session.cmd("EHLO client.example")
        assert session.cmd(f"CLIENTID UUID {TOKEN}") == ["250 2.0.0 OK"]
    assert len(lines) == 2 and lines[1].startswith("clientid type=UUID device=")
