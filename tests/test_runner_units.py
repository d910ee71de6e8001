"""The queue runner alone: a simulated clock, threads run inline, a fake delivery.

No sockets and no sleeps: ``FakeReactor`` is a ``MemoryReactorClock`` whose thread pool
runs each call at once, and ``send`` is a stub that answers per recipient.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from clientid_mta.client import ConnectionFailed, RecipientResult
from clientid_mta.config import Config, load_config
from clientid_mta.outbound.queue import Envelope, QueueDir, Recipient
from clientid_mta.outbound.runner import (
    CONCLUDE_RETRY_MAX,
    LocalBounceTarget,
    QueueRunner,
    conclude_retry_delay,
)
from tests.conftest import merge_toml


class InlineThreadPool:
    """``deferToThreadPool`` against this runs the function at once, in this thread."""

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], function: Callable[..., Any], *args: Any
    ) -> None:
        try:
            result = function(*args)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class FakeReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.pool = InlineThreadPool()

    def getThreadPool(self) -> InlineThreadPool:
        return self.pool

    def callFromThread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        function(*args, **kwargs)


class FakeSend:
    """``send_messages`` stand-in: ``reply(address)`` gives each recipient's code, or
    ``fail`` makes the connection fail."""

    def __init__(self) -> None:
        self.calls: list[list[list[str]]] = []
        self.code = 250
        self.fail = False

    def __call__(
        self, host: str, port: int, transactions: list[Any], **options: Any
    ) -> defer.Deferred[list[Any]]:
        self.calls.append([list(t.recipients) for t in transactions])
        assert options["reactor"] is not None
        if self.fail:
            return defer.fail(ConnectionFailed("connection refused"))
        return defer.succeed(
            [
                [RecipientResult(r, self.code, "2.0.0 ok") for r in t.recipients]
                for t in transactions
            ]
        )


def make_config(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "clientid-mta.toml"
    path.write_text(merge_toml('[relay]\nsmarthost = "127.0.0.1:2525"\n' + extra))
    return load_config(path)


def commit(queue: QueueDir, *recipients: str) -> Envelope:
    writer = queue.new_message()
    writer.write(b"Subject: x\n\nbody\n")
    envelope = Envelope(writer.id, "alice@example.org", 0.0, [Recipient(r) for r in recipients])
    writer.commit(envelope)
    return envelope


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)  # any callable of an event will do
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def texts(events: list[dict[str, Any]], level: LogLevel) -> list[str]:
    return [str(formatEvent(e)) for e in events if e.get("log_level") == level]


def running_runner(
    tmp_path: Path, send: FakeSend, extra: str = ""
) -> tuple[QueueRunner, QueueDir, FakeReactor]:
    config = make_config(tmp_path, extra)
    queue = QueueDir(config.queue_config.directory)
    queue.create()
    reactor = FakeReactor()
    local = LocalBounceTarget(lambda _domain: False, lambda _address, _data: False)
    runner = QueueRunner(config, queue, local, reactor=reactor, send=send)
    return runner, queue, reactor


def test_runner_recover_loads_entries_and_removes_leftovers_before_start(tmp_path: Path) -> None:
    send = FakeSend()
    runner, queue, _reactor = running_runner(tmp_path, send)
    kept = commit(queue, "carol@example.net")
    (queue.tmp / "half-written.msg").write_bytes(b"partial")
    recovered: list[object] = []
    runner.recover().addCallback(recovered.append)
    assert recovered == [None]
    assert runner.owner and list(runner.entries) == [kept.id]
    assert list(queue.tmp.iterdir()) == []
    assert send.calls == []  # nothing is sent before the service runs
    runner.startService()
    try:
        assert send.calls == [[["carol@example.net"]]]
        assert queue.ids() == []  # delivered: removed
    finally:
        runner.stopService()


def test_runner_temporary_failures_follow_the_retry_schedule(tmp_path: Path) -> None:
    send = FakeSend()
    send.fail = True
    runner, queue, reactor = running_runner(tmp_path, send, "[queue]\nretry_schedule = [60, 300]\n")
    envelope = commit(queue, "carol@example.net")
    runner.startService()
    try:
        reactor.pump([1.0] * 1000)  # 1000 simulated seconds
        # tries at 0, 60, 360, 660, 960 (the last step repeats)
        assert len(send.calls) == 5
        [recipient] = queue.load(envelope.id).recipients
        assert recipient.state == "pending" and recipient.attempts == 5
        assert "refused" in recipient.last_error
    finally:
        runner.stopService()


def test_runner_failed_save_backs_off_and_logs_once_then_recovery_once(
    tmp_path: Path, logged: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the runner does not spin on the entry (it once tried 4,181 saves in a
    second) and says so once; when saving works again it says that once."""
    send = FakeSend()
    send.code = 451
    runner, queue, reactor = running_runner(tmp_path, send, "[queue]\nretry_schedule = [3600]\n")
    envelope = commit(queue, "carol@example.net")
    real_save = queue.save
    saves: list[float] = []
    disk_full = True

    def save(entry: Envelope) -> None:
        saves.append(reactor.seconds())
        if disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(entry)

    monkeypatch.setattr(queue, "save", save)
    runner.startService()
    try:
        reactor.pump([1.0] * 600)  # ten simulated minutes
        # One try after the attempt, then after 1, 2, 4 ... s: at most one per step.
        schedule, t, failures = [0.0], 0.0, 0
        while True:
            failures += 1
            t += conclude_retry_delay(failures)
            if t > 600:
                break
            schedule.append(t)
        assert len(saves) <= len(schedule) + 1
        assert len(saves) >= 5  # it does keep trying
        assert len(send.calls) == 1  # the entry waits for its save, not re-sent
        errors = texts(logged, LogLevel.error)
        assert len(errors) == 1 and "saving queue entries failed" in errors[0]
        assert texts(logged, LogLevel.critical) == []

        disk_full = False
        reactor.pump([1.0] * int(CONCLUDE_RETRY_MAX + 1))
        recovered = [t for t in texts(logged, LogLevel.info) if "works again" in t]
        assert recovered == ["saving queue entries works again"]
        assert queue.load(envelope.id).recipients[0].attempts == 1
        count = len(saves)
        reactor.pump([1.0] * 60)
        assert len(saves) == count  # saved: nothing more to do until the next attempt
        assert len(texts(logged, LogLevel.error)) == 1
    finally:
        runner.stopService()


def test_runner_conclude_retry_delay_doubles_to_a_cap() -> None:
    assert [conclude_retry_delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert conclude_retry_delay(40) == CONCLUDE_RETRY_MAX


def test_runner_unreadable_message_is_deferred_not_sent(tmp_path: Path) -> None:
    send = FakeSend()
    runner, queue, reactor = running_runner(tmp_path, send, "[queue]\nretry_schedule = [3600]\n")
    envelope = commit(queue, "carol@example.net")
    runner.recover()
    queue.message_path(envelope.id).unlink()
    runner.startService()
    try:
        reactor.pump([1.0] * 10)
        assert send.calls == []
        [recipient] = runner.entries[envelope.id].envelope.recipients
        assert recipient.state == "pending" and recipient.attempts == 1
        assert recipient.last_error == "cannot read the queued message"
    finally:
        runner.stopService()
