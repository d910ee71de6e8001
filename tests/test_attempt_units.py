"""One delivery attempt alone (``outbound/attempt.py``): no runner, no sockets, no sleeps.

The queue is a real folder; the clock is a ``MemoryReactorClock`` whose thread pool
runs each call at once (``FakeReactor``); ``ScriptedSend`` answers per recipient or
refuses a host; ``FakeRouter`` gives fixed hops or a route failure.
"""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from clientid_mta.client import ConnectionFailed, RecipientResult
from clientid_mta.outbound import attempt as attempt_module
from clientid_mta.outbound.attempt import (
    Attempts,
    Due,
    LocalBounceTarget,
    delay_notice_due,
    enhanced_status,
)
from clientid_mta.outbound.queue import Envelope, QueueDir, Recipient
from clientid_mta.outbound.routing import Hop, RouteFailed, Router
from tests.test_runner_units import FakeReactor, commit, make_config

T = TypeVar("T")

MX1 = Hop("mx1.example.net", "192.0.2.1", 25)
MX2 = Hop("mx2.example.net", "192.0.2.2", 25)


class ScriptedSend:
    """``send_messages`` stand-in: ``replies`` gives a recipient's (code, text), 250 by
    default; a host in ``down`` refuses the connection; ``cut_after`` transactions
    complete, the later ones get the ConnectionFailed (a connection lost midway)."""

    def __init__(
        self,
        replies: dict[str, tuple[int, str]] | None = None,
        down: tuple[str, ...] = (),
        cut_after: int | None = None,
    ) -> None:
        self.replies = replies or {}
        self.down = down
        self.cut_after = cut_after
        self.calls: list[tuple[str, list[list[str]], list[bytes], dict[str, Any]]] = []

    def __call__(
        self, host: str, port: int, transactions: list[Any], **options: Any
    ) -> defer.Deferred[list[Any]]:
        messages = [t.message.read() for t in transactions]
        self.calls.append((host, [list(t.recipients) for t in transactions], messages, options))
        if host in self.down:
            return defer.fail(ConnectionFailed("connection refused"))
        outcomes: list[Any] = [
            [RecipientResult(r, *self.replies.get(r, (250, "2.0.0 ok"))) for r in t.recipients]
            for t in transactions
        ]
        if self.cut_after is not None:
            lost = ConnectionFailed("connection lost")
            outcomes[self.cut_after :] = [lost] * (len(outcomes) - self.cut_after)
        return defer.succeed(outcomes)


class FakeRouter:
    """Every destination has ``hops``, or fails with ``failure``."""

    def __init__(self, hops: list[Hop], failure: RouteFailed | None = None) -> None:
        self._hops = hops
        self.failure = failure

    def destination(self, recipient: str) -> str:
        return recipient.rpartition("@")[2].lower()

    async def hops(self, destination: str) -> list[Hop]:
        if self.failure is not None:
            raise self.failure
        return self._hops


class LocalSenders:
    """The local side of bounces: example.org is local; what was delivered, to whom."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, bytes]] = []

    def target(self) -> LocalBounceTarget:
        def deliver(address: str, data: bytes) -> bool:
            self.delivered.append((address, data))
            return True

        return LocalBounceTarget(lambda domain: domain == "example.org", deliver)


class Setup:
    def __init__(
        self,
        tmp_path: Path,
        send: ScriptedSend | None = None,
        router: FakeRouter | None = None,
        extra: str = "",
    ) -> None:
        config = make_config(
            tmp_path, "[queue]\nretry_schedule = [60, 300]\ndelay_notice_after = 3600\n" + extra
        )
        self.queue = QueueDir(config.queue_config.directory)
        self.queue.create()
        self.reactor = FakeReactor()
        self.send = send or ScriptedSend()
        self.local = LocalSenders()
        self.enqueued: list[Envelope] = []
        self.set_aside: list[Envelope] = []
        self.attempts = Attempts(
            config,
            self.queue,
            self.local.target(),
            cast(Router, router or FakeRouter([MX1])),
            reactor=self.reactor,
            send=self.send,
            enqueued=self.enqueued.append,
        )

    def deliver(self, *envelopes: Envelope) -> None:
        batch: list[Due] = [(envelope, envelope.pending()) for envelope in envelopes]
        done(self.attempts.deliver("example.net", batch, self.set_aside.append))

    def conclude(self, envelope: Envelope, deleted: bool = False) -> bool:
        return done(self.attempts.conclude(envelope, deleted=deleted))


def done(work: Coroutine[Any, Any, T]) -> T:
    """The coroutine's result: with inline threads and a synchronous send it has one."""
    results: list[Any] = []
    defer.ensureDeferred(work).addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return cast(T, result)


def states(envelope: Envelope) -> dict[str, tuple[str, str, int]]:
    return {r.address: (r.state, r.status, r.attempts) for r in envelope.recipients}


# --- the reply of each recipient ------------------------------------------------------


def test_attempt_each_recipient_gets_the_outcome_of_its_own_reply(tmp_path: Path) -> None:
    send = ScriptedSend(
        {
            "later@example.net": (451, "4.3.2 try again later"),
            "gone@example.net": (550, "5.1.1 no such user"),
        }
    )
    setup = Setup(tmp_path, send)
    setup.reactor.advance(100)
    envelope = commit(setup.queue, "carol@example.net", "later@example.net", "gone@example.net")
    setup.deliver(envelope)
    assert states(envelope) == {
        "carol@example.net": ("delivered", "2.0.0", 0),
        "later@example.net": ("pending", "4.3.2", 1),
        "gone@example.net": ("failed", "5.1.1", 1),
    }
    carol, later, gone = envelope.recipients
    assert (carol.remote_mta, carol.last_attempt, carol.last_error) == ("mx1.example.net", 100, "")
    assert later.last_error == "451 4.3.2 try again later"
    assert later.next_attempt == 100 + 60  # the first step of retry_schedule
    assert gone.last_error == "550 5.1.1 no such user" and gone.remote_mta == "mx1.example.net"
    [(host, recipients, _messages, options)] = send.calls
    assert host == "192.0.2.1" and recipients == [[r.address for r in envelope.recipients]]
    assert options["tls_hostname"] == "mx1.example.net" and options["reactor"] is setup.reactor


@pytest.mark.parametrize(
    ("code", "text", "status"),
    [
        (250, "2.6.0 queued as 42", "2.6.0"),
        (250, "ok", "2.0.0"),
        (451, "4.7.1 greylisted", "4.7.1"),
        (452, "mailbox full 4.2.2", "4.0.0"),  # only a leading code counts
        (550, "5.7.1 relaying denied", "5.7.1"),
        (554, "no", "5.0.0"),
    ],
)
def test_attempt_enhanced_status_is_the_replys_or_the_generic_one_of_its_class(
    code: int, text: str, status: str
) -> None:
    assert enhanced_status(code, text) == status


def test_attempt_sends_the_dkim_header_before_the_stored_message(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    envelope = commit(setup.queue, "carol@example.net")
    envelope.dkim_header = "DKIM-Signature: v=1; d=example.org\r\n"
    setup.deliver(envelope)
    [(_host, _recipients, [message], _options)] = setup.send.calls
    assert message == b"DKIM-Signature: v=1; d=example.org\r\nSubject: x\n\nbody\n"


def test_attempt_temporary_failure_past_max_queue_time_fails_as_expired(tmp_path: Path) -> None:
    setup = Setup(tmp_path, ScriptedSend({"carol@example.net": (451, "4.3.2 later")}))
    envelope = commit(setup.queue, "carol@example.net")
    setup.reactor.advance(5 * 86400)  # the default max_queue_time since arrival (0)
    setup.deliver(envelope)
    [carol] = envelope.recipients
    assert (carol.state, carol.status) == ("failed", "4.4.7")
    assert carol.last_error == "delivery time expired; last error: 451 4.3.2 later"


# --- hops and connections ---------------------------------------------------------------


def test_attempt_connection_failure_moves_on_to_the_next_hop(tmp_path: Path) -> None:
    send = ScriptedSend(down=("192.0.2.1",))
    setup = Setup(tmp_path, send, FakeRouter([MX1, MX2]))
    envelope = commit(setup.queue, "carol@example.net")
    setup.deliver(envelope)
    assert [host for host, *_ in send.calls] == ["192.0.2.1", "192.0.2.2"]
    [carol] = envelope.recipients
    assert (carol.state, carol.remote_mta) == ("delivered", "mx2.example.net")


def test_attempt_no_reachable_hop_defers_with_the_last_hops_reason(tmp_path: Path) -> None:
    send = ScriptedSend(down=("192.0.2.1", "192.0.2.2"))
    setup = Setup(tmp_path, send, FakeRouter([MX1, MX2]))
    envelope = commit(setup.queue, "carol@example.net")
    setup.deliver(envelope)
    assert states(envelope) == {"carol@example.net": ("pending", "4.4.1", 1)}
    [carol] = envelope.recipients
    assert carol.last_error == "mx2.example.net[192.0.2.2]:25: connection refused"
    assert carol.next_attempt == 60


def test_attempt_no_hop_at_all_defers(tmp_path: Path) -> None:
    setup = Setup(tmp_path, router=FakeRouter([]))
    envelope = commit(setup.queue, "carol@example.net")
    setup.deliver(envelope)
    assert setup.send.calls == []
    assert envelope.recipients[0].last_error == "no mail server to try"
    assert states(envelope) == {"carol@example.net": ("pending", "4.4.1", 1)}


def test_attempt_connection_lost_midway_retries_only_the_unfinished_entries(
    tmp_path: Path,
) -> None:
    send = ScriptedSend(cut_after=1)
    setup = Setup(tmp_path, send, FakeRouter([MX1, MX2]))
    first = commit(setup.queue, "carol@example.net")
    second = commit(setup.queue, "dave@example.net")
    setup.deliver(first, second)
    assert [(host, recipients) for host, recipients, *_ in send.calls] == [
        ("192.0.2.1", [["carol@example.net"], ["dave@example.net"]]),
        ("192.0.2.2", [["dave@example.net"]]),
    ]
    assert first.recipients[0].remote_mta == "mx1.example.net"
    assert second.recipients[0].remote_mta == "mx2.example.net"
    assert first.recipients[0].state == second.recipients[0].state == "delivered"


@pytest.mark.parametrize(
    ("failure", "state"),
    [
        (RouteFailed("example.net: no such domain", "5.1.2", True), "failed"),
        (RouteFailed("example.net: DNS failure", "4.4.3", False), "pending"),
    ],
)
def test_attempt_route_failure_fails_or_defers_without_sending(
    tmp_path: Path, failure: RouteFailed, state: str
) -> None:
    setup = Setup(tmp_path, router=FakeRouter([MX1], failure))
    envelope = commit(setup.queue, "carol@example.net")
    setup.deliver(envelope)
    assert setup.send.calls == []
    assert states(envelope) == {"carol@example.net": (state, failure.status, 1)}
    assert envelope.recipients[0].last_error == str(failure)


# --- reading the batch ----------------------------------------------------------------


def test_attempt_unreadable_message_is_deferred_and_the_rest_is_sent(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    lost = commit(setup.queue, "carol@example.net")
    kept = commit(setup.queue, "dave@example.net")
    setup.queue.message_path(lost.id).unlink()
    setup.deliver(lost, kept)
    assert [recipients for _host, recipients, *_ in setup.send.calls] == [[["dave@example.net"]]]
    assert states(lost) == {"carol@example.net": ("pending", "4.3.0", 1)}
    assert lost.recipients[0].last_error == "cannot read the queued message"
    assert kept.recipients[0].state == "delivered"


def test_attempt_batch_past_its_size_cap_sets_the_rest_aside_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attempt_module, "BATCH_BYTES", 1)  # full after the first message
    setup = Setup(tmp_path)
    first = commit(setup.queue, "carol@example.net")
    second = commit(setup.queue, "dave@example.net")
    setup.deliver(first, second)
    assert [recipients for _host, recipients, *_ in setup.send.calls] == [[["carol@example.net"]]]
    assert setup.set_aside == [second]
    assert second.recipients == [Recipient("dave@example.net")]  # not even counted as a try


# --- after the attempt: save, bounce, delay notice, remove ---------------------------------


def test_attempt_conclude_removes_an_entry_delivered_to_everyone(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    envelope = commit(setup.queue, "carol@example.net")
    setup.deliver(envelope)
    assert setup.conclude(envelope) is True
    assert setup.queue.ids() == [] and setup.local.delivered == []


def test_attempt_conclude_saves_a_deferred_entry_and_keeps_it(tmp_path: Path) -> None:
    setup = Setup(tmp_path, ScriptedSend({"carol@example.net": (451, "4.3.2 later")}))
    envelope = commit(setup.queue, "carol@example.net")
    setup.deliver(envelope)
    assert setup.conclude(envelope) is False
    assert states(setup.queue.load(envelope.id)) == {"carol@example.net": ("pending", "4.3.2", 1)}
    assert setup.local.delivered == [] and setup.enqueued == []


def test_attempt_conclude_bounces_a_failure_to_a_local_sender(tmp_path: Path) -> None:
    setup = Setup(tmp_path, ScriptedSend({"gone@example.net": (550, "5.1.1 no such user")}))
    envelope = commit(setup.queue, "carol@example.net", "gone@example.net")
    setup.deliver(envelope)
    assert setup.conclude(envelope) is True  # delivered + bounced: nothing left
    [(address, notice)] = setup.local.delivered
    assert address == "alice@example.org"
    assert b"Action: failed" in notice and b"Status: 5.1.1" in notice
    assert b"gone@example.net" in notice and b"carol@example.net" not in notice
    assert [r.state for r in envelope.recipients] == ["delivered", "bounced"]
    assert setup.queue.ids() == []


def test_attempt_conclude_queues_the_bounce_of_a_remote_sender_from_the_null_sender(
    tmp_path: Path,
) -> None:
    setup = Setup(tmp_path, ScriptedSend({"gone@example.net": (550, "5.1.1 no such user")}))
    envelope = commit(setup.queue, "gone@example.net")
    envelope.sender = "alice@elsewhere.example"
    setup.deliver(envelope)
    assert setup.conclude(envelope) is True
    [notice] = setup.enqueued
    assert notice.sender == "" and [r.address for r in notice.recipients] == [
        "alice@elsewhere.example"
    ]
    assert setup.queue.ids() == [notice.id]  # the notice is durable; the original is gone
    assert setup.local.delivered == []


def test_attempt_conclude_never_bounces_to_the_null_sender(tmp_path: Path) -> None:
    setup = Setup(tmp_path, ScriptedSend({"gone@example.net": (550, "5.1.1 no such user")}))
    envelope = commit(setup.queue, "gone@example.net")
    envelope.sender = ""
    setup.deliver(envelope)
    assert setup.conclude(envelope) is True
    assert setup.local.delivered == [] and setup.enqueued == [] and setup.queue.ids() == []


def test_attempt_conclude_sends_one_delay_notice_once_it_is_due(tmp_path: Path) -> None:
    setup = Setup(tmp_path, ScriptedSend({"carol@example.net": (451, "4.3.2 later")}))
    envelope = commit(setup.queue, "carol@example.net")
    setup.reactor.advance(3599)
    setup.deliver(envelope)
    assert setup.conclude(envelope) is False
    assert setup.local.delivered == []  # not yet an hour in the queue
    setup.reactor.advance(1)
    setup.deliver(envelope)
    assert setup.conclude(envelope) is False
    [(address, notice)] = setup.local.delivered
    assert address == "alice@example.org"
    assert b"Action: delayed" in notice and b"Status: 4.3.2" in notice
    assert setup.queue.load(envelope.id).delay_notice_sent
    setup.reactor.advance(300)
    setup.deliver(envelope)
    setup.conclude(envelope)
    assert len(setup.local.delivered) == 1  # once per entry


def test_attempt_delay_notice_due_needs_pending_recipients_time_and_no_earlier_notice() -> None:
    envelope = Envelope("A1", "alice@example.org", 0.0, [Recipient("carol@example.net")])
    assert delay_notice_due(envelope, 3600, 3600)
    assert not delay_notice_due(envelope, 3599, 3600)
    assert not delay_notice_due(envelope, 10**9, 0)  # 0: delay notices are off
    envelope.recipients[0].state = "delivered"
    assert not delay_notice_due(envelope, 3600, 3600)
    envelope.recipients[0].state = "pending"
    envelope.delay_notice_sent = True
    assert not delay_notice_due(envelope, 3600, 3600)


def test_attempt_conclude_of_a_deleted_entry_removes_it_without_a_notice(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    envelope = commit(setup.queue, "carol@example.net")
    assert setup.conclude(envelope, deleted=True) is True
    assert setup.queue.ids() == [] and setup.local.delivered == []


def test_attempt_entry_set_aside_by_the_size_cap_goes_in_the_runners_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner frees what an attempt sets aside, so it is neither lost nor stuck."""
    from clientid_mta.outbound.runner import QueueRunner
    from tests.test_runner_units import FakeSend

    monkeypatch.setattr(attempt_module, "BATCH_BYTES", 1)
    config = make_config(tmp_path)
    queue = QueueDir(config.queue_config.directory)
    queue.create()
    commit(queue, "carol@example.net")
    commit(queue, "dave@example.net")
    send = FakeSend()
    local = LocalBounceTarget(lambda _domain: False, lambda _address, _data: False)
    runner = QueueRunner(config, queue, local, reactor=FakeReactor(), send=send)
    runner.startService()
    try:
        assert send.calls == [[["carol@example.net"]], [["dave@example.net"]]]
        assert queue.ids() == [] and runner.entries == {}
    finally:
        runner.stopService()
