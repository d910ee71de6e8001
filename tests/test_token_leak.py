"""C14: the client token is a secret. After a run with logins that succeed and fail,
a delivered message and device notices, the token is nowhere: not in a reply, not in
the log, not in any file under the data folder (SQLite and its -wal/-shm included),
not in any delivered message."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Wire
from tests.serverproc import ServerProcess, devices, fingerprint_of, running

UUID_TOKEN = "5ec12e70-0000-4000-8000-00000000beef"
LICENSE_TOKEN = "TOKEN-LEAK-CANARY-123"
UUID_ID = f"UUID {UUID_TOKEN}"
LICENSE_ID = f"LICENSE {LICENSE_TOKEN}"
CANARIES = (UUID_TOKEN.encode(), LICENSE_TOKEN.encode())

ALL_NOTICES = (
    '[clientid.types."*"]\nflags = ["syslog", "userlog", "auth", "alert-fail", "alert-success"]\n'
)

ALICE, BOB = ("alice@example.org", "alice-password"), ("bob@example.org", "bob-password")


class RecordingWire(Wire):
    """The raw client, keeping every reply line it receives in ``transcript``."""

    def __init__(self, server: ServerProcess, transcript: list[str]) -> None:
        self.transcript = transcript
        super().__init__(server)

    def reply(self) -> tuple[int, list[str]]:
        code, lines = super().reply()
        self.transcript.extend(f"{code} {line}" for line in lines)
        return code, lines


def leaks(blobs: Iterable[tuple[str, bytes]]) -> list[str]:
    """Where a canary occurs (compared without case), as 'where: canary'."""
    return [
        f"{where}: {canary.decode()}"
        for where, data in blobs
        for canary in CANARIES
        if canary.lower() in data.lower()
    ]


def files_under(root: Path) -> list[tuple[str, bytes]]:
    return [(str(path), path.read_bytes()) for path in sorted(root.rglob("*")) if path.is_file()]


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[ServerProcess]:
    root = tmp_path / "server"
    with running(root, ALL_NOTICES, logfile=root / "clientid-mta.log") as server:
        yield server


def session(
    server: ServerProcess,
    transcript: list[str],
    clientid: str,
    logins: tuple[tuple[str, str], ...],
    send_to: str = "",
) -> list[int]:
    """TLS, CLIENTID, one AUTH PLAIN per login until one succeeds, maybe a message."""
    wire = RecordingWire(server, transcript).tls_session()
    assert wire.cmd(f"CLIENTID {clientid}") == (250, ["2.0.0 OK"])
    codes = []
    for user, password in logins:
        codes.append(wire.auth_plain(user, password))
        if codes[-1] == 235:
            break
    if send_to:
        user = logins[-1][0]
        assert wire.code(f"MAIL FROM:<{user}>") == 250
        assert wire.code(f"RCPT TO:<{send_to}>") == 250
        assert wire.code("DATA") == 354
        wire.send(f"From: {user}\r\nTo: {send_to}\r\nSubject: leak check\r\n\r\nHi.\r\n.\r\n")
        assert wire.reply()[0] == 250
    assert wire.code("QUIT") == 221
    wire.close()
    return codes


def refused_commands(server: ServerProcess, transcript: list[str]) -> None:
    """Commands that carry a token and are refused: their replies must not echo it."""
    plain = RecordingWire(server, transcript)
    assert plain.code("EHLO client.example.net") == 250
    assert plain.code(f"CLIENTID {UUID_ID}") == 500  # C3, plaintext
    plain.close()
    wire = RecordingWire(server, transcript).tls_session()
    assert wire.code(f"CLIENTID {LICENSE_ID} extra") == 501  # C5, three arguments
    assert wire.code(f"CLIENTID UUID {UUID_TOKEN}{'x' * 100}") == 501  # C5, 136 characters
    assert wire.code(f"CLIENTID {UUID_ID}") == 250
    assert wire.code(f"CLIENTID {LICENSE_ID}") == 503  # C6
    wire.close()


def test_C14_token_is_in_no_reply_log_file_or_message(proc: ServerProcess) -> None:
    transcript: list[str] = []
    wrong = (ALICE[0], "wrong-password")
    alice_uuid_fp = fingerprint_of(proc, UUID_ID)

    # First device of alice (upper-case UUID, C13): trusted, notices, a message to bob.
    assert session(proc, transcript, UUID_ID.upper(), (ALICE,), send_to=BOB[0]) == [235]
    # Unknown device under tofu: pending and refused; wrong password, then a retry (C11).
    assert session(proc, transcript, LICENSE_ID, (ALICE,)) == [535]
    assert session(proc, transcript, UUID_ID, (wrong, ALICE)) == [535, 235]
    # A revoked device is refused.
    proc.admin("device", "revoke", ALICE[0], alice_uuid_fp)
    assert devices(proc.admin("device", "list", ALICE[0]))[alice_uuid_fp][1] == "revoked"
    assert session(proc, transcript, UUID_ID, (ALICE,)) == [535]
    # The same token is bob's first device; bob writes to alice.
    assert session(proc, transcript, LICENSE_ID, (BOB,), send_to=ALICE[0]) == [235]
    refused_commands(proc, transcript)

    delivered = proc.messages(ALICE[0]) + proc.messages(BOB[0])
    subjects = [str(message["Subject"]) for message in delivered]
    assert subjects.count("leak check") == 2
    assert "A new device was refused on your mail account" in subjects
    assert "A device failed to log in to your mail account" in subjects
    assert len(delivered) >= 6, subjects  # the two messages and the notices

    assert leaks([("replies", "\n".join(transcript).encode())]) == []
    assert leaks((str(m["Subject"]), m.as_bytes()) for m in delivered) == []
    assert leaks(files_under(proc.root)) == []  # while running: the -wal/-shm files exist
    proc.stop()
    log = (proc.root / "clientid-mta.log").read_text()
    assert "auth refused" in log and f"device={alice_uuid_fp}" in log  # the right file
    assert leaks(files_under(proc.root)) == []
