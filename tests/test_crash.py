"""S11 under SIGKILL: a 250 after DATA means the message survives a crash, whole and once.

A sender thread submits a stream of small, unique messages to a twistd server that is
killed with SIGKILL at random moments and restarted. Afterwards the recipient's Maildir
must hold every acknowledged message exactly once and complete, and nothing partial or
unknown in ``new/`` or ``cur/`` (half-written files may stay in ``tmp/``).
"""

from __future__ import annotations

import collections
import itertools
import random
import secrets
import smtplib
import threading
from collections.abc import Callable
from pathlib import Path

from tests.serverproc import ServerProcess, running

SENDER, PASSWORD, RECIPIENT = "alice@example.org", "alice-password", "bob@example.org"
PER_SESSION = 25
BODY_LINES = 40  # about 3 KB a message


def make_message(number: int, recipient: str = RECIPIENT) -> tuple[str, str, bytes]:
    """(Message-ID, body as Maildir stores it, the message as sent with CRLF)."""
    message_id = f"<crash-{number}-{secrets.token_hex(4)}@example.org>"
    lines = [f"{number:06d} line {i:03d} {secrets.token_hex(32)}" for i in range(BODY_LINES)]
    headers = [
        f"From: {SENDER}",
        f"To: {recipient}",
        f"Subject: crash test {number}",
        f"Message-ID: {message_id}",
    ]
    wire = "\r\n".join([*headers, "", *lines]) + "\r\n"
    return message_id, "\n".join(lines) + "\n", wire.encode()


class Sender(threading.Thread):
    """Submits messages until stopped; knows exactly which ones got 250 after DATA."""

    def __init__(self, server: ServerProcess, recipient: str = RECIPIENT) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.recipient = recipient
        self.stopping = threading.Event()
        self.numbers = itertools.count()
        self.bodies: dict[str, str] = {}  # every message ever started
        self.accepted: list[str] = []
        self.refused: list[tuple[str, int, bytes | str]] = []
        self.errors: list[BaseException] = []
        self.started = 0  # messages whose transaction has begun
        self.progress = threading.Condition()  # notified at each start and each 250

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                client = self._connect()
                if client is None:
                    # The server is down: try again soon (it is a separate process, which
                    # only polling can see come back); stop() ends the wait at once.
                    self.stopping.wait(0.02)
                    continue
                try:
                    self._session(client)
                finally:
                    client.close()
        except BaseException as error:  # reported by the test, never swallowed
            self.errors.append(error)

    def _connect(self) -> smtplib.SMTP | None:
        try:
            client = self.server.smtp(timeout=5)
            client.user, client.password = SENDER, PASSWORD
            client.auth("PLAIN", client.auth_plain)
        except (OSError, smtplib.SMTPException):  # the server is down or went down
            return None
        return client

    def _session(self, client: smtplib.SMTP) -> None:
        for _ in range(PER_SESSION):
            if self.stopping.is_set():
                return
            message_id, body, data = make_message(next(self.numbers), self.recipient)
            self.bodies[message_id] = body
            self._progressed(started=True)
            try:
                client.sendmail(SENDER, [self.recipient], data)  # raises unless DATA got 250
            except smtplib.SMTPResponseException as refused:
                self.refused.append((message_id, refused.smtp_code, refused.smtp_error))
                return
            except smtplib.SMTPRecipientsRefused as refused:
                self.refused.append((message_id, 0, repr(refused.recipients).encode()))
                return
            except (OSError, smtplib.SMTPException):  # killed mid-message: outcome unknown
                return
            self.accepted.append(message_id)
            self._progressed()

    def _progressed(self, started: bool = False) -> None:
        with self.progress:
            self.started += started
            self.progress.notify_all()

    def wait(self, condition: Callable[[], bool], timeout: float = 10) -> bool:
        with self.progress:
            return self.progress.wait_for(condition, timeout)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=20)
        assert not self.is_alive(), "the sender thread did not stop"


def wait_for_more(sender: Sender, than: int, timeout: float = 10) -> None:
    """Until more than ``than`` messages got 250 (or ``timeout``: the test checks the count)."""
    sender.wait(lambda: len(sender.accepted) > than, timeout)


def wait_for_a_kill_moment(sender: Sender, rng: random.Random) -> None:
    """A random moment while mail flows, a few messages on: right after a 250, or as a
    message's transaction begins. Events, not a random sleep."""
    more = rng.randint(0, 3)
    if rng.random() < 0.5:
        wait_for_more(sender, len(sender.accepted) + more)
    else:
        started = sender.started
        sender.wait(lambda: sender.started > started + more)


def test_S11_sigkill_keeps_every_acknowledged_message_whole_and_once(tmp_path: Path) -> None:
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    kills = rng.randint(3, 5)
    with running(tmp_path / "server") as server:
        sender = Sender(server)
        sender.start()
        try:
            for _ in range(kills):
                wait_for_more(sender, len(sender.accepted))  # kill while mail is flowing
                wait_for_a_kill_moment(sender, rng)
                server.kill()
                server.start()
            after_last_restart = len(sender.accepted)
            wait_for_more(sender, after_last_restart)
        finally:
            sender.stop()
        maildir = server.maildir(RECIPIENT)
        stored = [(key, maildir[key]) for key in maildir.keys()]

    context = f"(seed {seed}, {kills} kills, {len(sender.accepted)} accepted)"
    assert sender.errors == [], context
    assert sender.refused == [], context
    assert len(sender.accepted) > after_last_restart >= kills, context

    copies: collections.Counter[str] = collections.Counter()
    for key, message in stored:
        message_id = str(message["Message-ID"])
        assert message_id in sender.bodies, f"unknown message {key} in the Maildir {context}"
        assert message.get_payload() == sender.bodies[message_id], f"partial {key} {context}"
        copies[message_id] += 1
    assert [m for m, count in copies.items() if count > 1] == [], f"duplicates {context}"
    assert [m for m in sender.accepted if copies[m] != 1] == [], f"lost after 250 {context}"
