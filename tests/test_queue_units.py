"""The outbound queue on disk (issue 4 points 1 and 4): commit order, recovery, corruption;
and the sweep of what a crash leaves in Maildir ``tmp/`` folders (L4)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import cast

import pytest

from clientid_mta.outbound.queue import (
    DELIVERED,
    FAILED,
    PENDING,
    Envelope,
    QueueDir,
    Recipient,
)


def make_queue(tmp_path: Path) -> QueueDir:
    queue = QueueDir(tmp_path / "queue")
    queue.create()
    return queue


def commit(queue: QueueDir, data: bytes = b"Subject: x\n\nbody\n", *rcpts: str) -> Envelope:
    writer = queue.new_message()
    writer.write(data)
    envelope = Envelope(
        writer.id, "alice@example.org", 1.0, [Recipient(r) for r in rcpts or ("bob@example.net",)]
    )
    writer.commit(envelope)
    return envelope


def test_queue_commit_writes_message_then_envelope(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    envelope = commit(queue, b"hello\n", "a@example.net", "b@example.net")
    assert queue.ids() == [envelope.id]
    loaded = queue.load(envelope.id)
    assert loaded == envelope
    assert [r.state for r in loaded.recipients] == [PENDING, PENDING]
    assert queue.message_path(envelope.id).read_bytes() == b"hello\n"
    assert os.listdir(queue.tmp) == []
    assert oct(queue.message_path(envelope.id).stat().st_mode & 0o777) == "0o600"


def test_queue_restart_removes_half_written_entries(tmp_path: Path) -> None:
    """Point 4: a crash's leftovers (tmp files, a message without envelope) are deleted."""
    queue = make_queue(tmp_path)
    kept = commit(queue)
    half = queue.new_message()
    half.write(b"half a message")  # killed while receiving DATA: stays in tmp/
    orphan = queue.new_message()
    orphan.write(b"whole but no envelope")
    orphan.sync()
    os.rename(orphan.temp_path, queue.message_path(orphan.id))  # killed between the renames
    assert queue.recover() == 2
    assert queue.ids() == [kept.id]
    assert sorted(os.listdir(queue.msg)) == [kept.id]
    assert os.listdir(queue.tmp) == []


def test_queue_recovery_keeps_files_written_since_it_began(tmp_path: Path) -> None:
    """Under twistd the port is bound before recovery ends: a session's spill file (or a
    message renamed into msg/ just before its envelope) newer than recovery stays."""
    queue = make_queue(tmp_path)
    crashed = queue.new_message()
    crashed.write(b"left by a crash")
    crashed.sync()
    os.utime(crashed.temp_path, (1000.0, 1000.0))
    live = queue.new_message()
    live.write(b"a session writing now")
    live.sync()
    assert queue.recover(older_than=2000.0) == 1
    assert os.listdir(queue.tmp) == [live.temp_path.name]


def test_queue_unreadable_envelope_is_set_aside_never_delivered(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    good = commit(queue)
    bad = commit(queue)
    queue.envelope_path(bad.id).write_bytes(b'{"id": "')
    envelopes, corrupt = queue.load_all()
    assert [e.id for e in envelopes] == [good.id]
    assert corrupt == [bad.id]
    assert sorted(p.name for p in queue.corrupt.iterdir()) == sorted([bad.id, f"{bad.id}.json"])


def test_queue_save_replaces_atomically_and_remove_deletes_both(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    envelope = commit(queue, b"x\n", "a@example.net", "b@example.net")
    envelope.recipients[0].state = DELIVERED
    envelope.recipients[1].state = FAILED
    queue.save(envelope)
    assert [r.state for r in queue.load(envelope.id).recipients] == [DELIVERED, FAILED]
    assert os.listdir(queue.tmp) == []
    queue.remove(envelope.id)
    assert queue.ids() == [] and os.listdir(queue.msg) == []


def test_queue_retry_schedule_backs_off_then_repeats_the_last_step() -> None:
    recipient = Recipient("bob@example.net")
    waits = []
    for _ in range(7):
        recipient.defer(1000.0, "451 try later", "4.0.0", (60, 300, 900, 3600, 7200))
        waits.append(recipient.next_attempt - 1000.0)
    assert waits == [60, 300, 900, 3600, 7200, 7200, 7200]
    assert recipient.attempts == 7 and recipient.last_error == "451 try later"


@pytest.mark.parametrize(
    "text",
    [
        '{"id": "../../etc", "sender": "", "arrival": 1, "recipients": [{"address": "x"}]}',
        '{"id": "A1", "sender": "", "arrival": 1, "recipients": []}',
    ],
)
def test_queue_envelope_with_bad_id_or_no_recipients_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Envelope.from_json(text.encode())


def test_queue_requests_are_taken_once_in_order(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    queue.request("flush")
    queue.request("delete", "ABC")
    assert queue.take_requests() == [("flush", ""), ("delete", "ABC")]
    assert queue.take_requests() == []


def test_queue_lock_is_exclusive_between_holders(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    fd = queue.lock_forever()
    assert fd is not None
    try:
        assert queue.lock_forever() is None  # flock is per open file: a second open is refused
        with queue.try_lock() as ours:
            assert not ours
    finally:
        os.close(fd)
    with queue.try_lock() as ours:
        assert ours


def test_queue_header_then_file_reads_in_any_chunk_size() -> None:
    from clientid_mta.outbound.attempt import HeaderThenFile

    for size in (1, 3, 7, 64, -1):
        reader = HeaderThenFile(b"DKIM-Signature: x\r\n", io.BytesIO(b"Subject: y\n\nz\n"))
        chunks = []
        while chunk := reader.read(size):
            chunks.append(chunk)
            if size < 0:
                break
        assert b"".join(chunks) == b"DKIM-Signature: x\r\nSubject: y\n\nz\n"


def test_l4_maildir_tmp_swept(tmp_path: Path) -> None:
    """Files older than 36 hours leave every Maildir tmp/ at start and then daily (in a
    thread); younger ones, and anything outside tmp/, stay. Each sweep logs its count."""
    from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

    from clientid_mta.delivery.maildir import MaildirRoot
    from clientid_mta.delivery.sweep import TmpSweeper
    from tests.test_runner_units import FakeReactor

    hour = 3600.0
    reactor = FakeReactor()
    reactor.advance(1_000_000_000.0)
    start = reactor.seconds()
    maildirs = MaildirRoot(tmp_path / "mail")
    alice = maildirs.maildir("example.org", "alice")
    bob = maildirs.maildir("example.net", "bob")

    def leftover(path: Path, age_hours: float) -> Path:
        path.write_bytes(b"half a message")
        os.utime(path, (start - age_hours * hour, start - age_hours * hour))
        return path

    old = [leftover(alice / "tmp" / "old1", 37), leftover(bob / "tmp" / "old2", 100)]
    young = leftover(alice / "tmp" / "young", 35)
    delivered = leftover(alice / "new" / "kept", 1000)
    events: list[dict[str, object]] = []
    observer = cast(ILogObserver, events.append)  # any callable of an event will do
    globalLogPublisher.addObserver(observer)
    sweeper = TmpSweeper(maildirs, reactor=reactor)
    try:
        sweeper.startService()
        assert not any(path.exists() for path in old)
        assert young.exists() and delivered.exists()
        reactor.advance(12 * hour)  # young is 47 hours old now, but no sweep is due
        assert young.exists()
        reactor.advance(12 * hour)  # the daily sweep
        assert not young.exists() and delivered.exists()
    finally:
        sweeper.stopService()
        globalLogPublisher.removeObserver(observer)
    counts = [str(formatEvent(e)) for e in events if "leftover files" in str(formatEvent(e))]
    assert [text.split()[1] for text in counts] == ["2", "1"]


class RecordingFile:
    def __init__(self) -> None:
        self.data = b""
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data

    def abort(self) -> None:
        self.aborted = True


def test_spill_of_a_large_message_runs_in_a_thread_in_order() -> None:
    """Past SPILL bytes the buffer goes to a thread (opening the file there); the end
    writes the rest after every spill; the caller never opens or writes a file."""
    from twisted.internet import defer

    from clientid_mta.delivery.spool import MAX_IN_FLIGHT, SPILL, LateFile

    pending: list[tuple[defer.Deferred[object], object, tuple[object, ...]]] = []

    def later(function: object, *args: object) -> defer.Deferred[object]:
        done: defer.Deferred[object] = defer.Deferred()
        pending.append((done, function, args))
        return done

    def run_one() -> None:
        done, function, args = pending.pop(0)
        done.callback(function(*args))  # type: ignore[operator]

    opened: list[RecordingFile] = []

    def open_file() -> RecordingFile:
        opened.append(RecordingFile())
        return opened[-1]

    spool: LateFile[RecordingFile] = LateFile(open_file, later)
    chunk = b"x" * (SPILL // 2)
    for _ in range(3):
        spool.write(chunk)
    assert opened == [] and len(pending) == 1  # handed over, not written here
    spool.write(b"tail")
    finished = spool.finish(lambda handle: handle.data)
    assert opened == [] and len(pending) == 1  # the end waits for the spill
    run_one()
    assert len(opened) == 1 and len(pending) == 1
    run_one()
    results: list[object] = []
    finished.addCallback(results.append)
    assert results == [chunk * 3 + b"tail"]

    flood: LateFile[RecordingFile] = LateFile(open_file, later)
    for _ in range(2 * MAX_IN_FLIGHT // SPILL):
        flood.write(b"y" * (SPILL + 1))  # a disk that never finishes a write
    assert isinstance(flood.error, OSError)  # a 451 at the end, not unbounded memory
