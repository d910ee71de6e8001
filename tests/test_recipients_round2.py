"""Abuse resistance, round 2: L2 (every recipient's fate settled before any copy is
committed) and L3 (duplicate recipients collapsed, a sending limit per account).

Most tests drive the protocol over a ``StringTransport`` (the harness of
test_protocol_units.py) with the real router, Maildir, outbound queue and SQLite store
underneath; the thread hops of the stores run inline, so nothing sleeps. Two tests go
end to end over real sockets, through the wiring of the service.
"""

from __future__ import annotations

import mailbox
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from twisted.internet import defer, task
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageSMTP
from zope.interface import implementer

from clientid_mta.auth.passwd_file import Account, PasswdFile
from clientid_mta.config import ConfigError, load_config
from clientid_mta.delivery import spool as spool_module
from clientid_mta.delivery.maildir import MaildirRoot
from clientid_mta.delivery.router import AccountDelivery, LocalRouter
from clientid_mta.delivery.sending import SendingLimit, tell_postmaster
from clientid_mta.devices.notices import Notifier
from clientid_mta.devices.sqlite_store import open_sqlite_stores
from clientid_mta.devices.store import ISendingCounts, Sending, Stores, StoreUnavailable
from clientid_mta.outbound.queue import Envelope, QueueDir
from clientid_mta.outbound.submit import Outbound
from clientid_mta.smtp.staging import IStagedMessage
from tests.conftest import RunningServer
from tests.test_alerts_audit_approval import APPROVAL, DEVICE_A, Connect, Serve, connect, logged_in
from tests.test_conformance_clientid import passwd_with_users, serve, trust
from tests.test_protocol_units import (
    LOCAL_ERROR,
    OTHER_RECIPIENT,
    RECIPIENT,
    USER,
    FakeDelivery,
    FakeMessage,
    Session,
    message,
)
from tests.test_store_conformance import Backend, backend, stores

# Fixtures: the end-to-end tests' server and sessions, the store conformance suite's backends.
__all__ = ["backend", "connect", "passwd_with_users", "serve", "stores"]

MAIL_OK = ["250 2.1.0 Ok"]
RCPT_OK = ["250 2.1.5 Ok"]
DATA_GO = ["354 End data with <CR><LF>.<CR><LF>"]
APPROVAL_ALONE = ["550 5.5.3 The approval address must be the only recipient"]
MESSAGES_OVER = ["451 4.7.1 Too many messages from this account this hour, try again later"]
RECIPIENTS_OVER = ["451 4.7.1 Too many recipients from this account this hour, try again later"]
LOCAL_APPROVAL = "device-approval@example.org"
REMOTE = "dave@remote.example"
POSTMASTER = "postmaster@example.org"


def inline(function: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """``deferToThread`` without the thread: the tests stay synchronous."""
    return defer.maybeDeferred(function, *args, **kwargs)


@pytest.fixture
def no_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Maildir and queue commits run inline (every file step goes through the spool)."""
    monkeypatch.setattr(spool_module, "threads", SimpleNamespace(deferToThread=inline))


@implementer(IMessageSMTP)
class ApprovalStub:
    """Stands in for devices.approval.ApprovalMessage: refuses like a wrong code."""

    opened: list[ApprovalStub] = []

    def __init__(self, account: str) -> None:
        self.account = account
        ApprovalStub.opened.append(self)

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred[None]:
        return defer.fail(smtp.SMTPServerError(550, b"5.7.1 No valid approval code in the message"))

    def connectionLost(self) -> None:
        pass


@dataclass
class World:
    """The real stores under one session: passwd file, Maildirs, queue, SQLite store."""

    root: Path
    maildirs: MaildirRoot
    queue: QueueDir
    stores: Stores
    clock: task.Clock
    committed: list[Envelope] = field(default_factory=list)
    reached: list[tuple[str, str]] = field(default_factory=list)
    signer: Any = None

    def delivery(
        self,
        account: str = USER,
        max_messages: int = 0,
        max_recipients: int = 0,
        reached: Callable[[str, str], object] | None = None,
    ) -> AccountDelivery:
        passwords = PasswdFile(self.root / "passwd")
        router = LocalRouter(
            passwords, ["example.org"], self.maildirs, "device-approval", ApprovalStub
        )
        outbound = Outbound(self.queue, self.signer, self.committed.append)
        sending = SendingLimit(
            self.stores.sending,
            max_messages,
            max_recipients,
            reached or (lambda account, limit: self.reached.append((account, limit))),
            run_in_thread=inline,
            now=self.clock.seconds,
        )
        found = passwords.get(account)
        assert found is not None
        return AccountDelivery(found, router, True, outbound, sending)

    def session(self, **limits: Any) -> Session:
        """Logged in as alice (a trusted device), with the real delivery."""
        session = Session()
        session.portal.delivery = self.delivery(**limits)  # type: ignore[assignment]
        session.login()
        return session

    def mail(self, address: str) -> list[bytes]:
        """The delivered messages of a local address (``new/``)."""
        localpart, _, domain = address.partition("@")
        folder = self.root / "mail" / domain / localpart
        if not (folder / "cur").is_dir():  # made last: until then the Maildir is being made
            return []
        return [m.as_bytes() for m in mailbox.Maildir(folder, create=False)]

    def leftovers(self, address: str) -> list[Path]:
        """Files in an address's ``tmp/``: copies prepared and never cleaned up."""
        localpart, _, domain = address.partition("@")
        folder = self.root / "mail" / domain / localpart / "tmp"
        return list(folder.iterdir()) if folder.exists() else []


@pytest.fixture
def world(tmp_path: Path, no_threads: None) -> Iterator[World]:
    PasswdFile(tmp_path / "passwd").save(
        [
            Account(address, "{ARGON2ID}unused")
            for address in (USER, RECIPIENT, OTHER_RECIPIENT, POSTMASTER)
        ]
    )
    queue = QueueDir(tmp_path / "queue")
    queue.create()
    stores = open_sqlite_stores(tmp_path / "devices.sqlite3")
    clock = task.Clock()
    clock.advance(1_000_000 * 3600)  # the start of an hour
    ApprovalStub.opened = []
    yield World(tmp_path, MaildirRoot(tmp_path / "mail"), queue, stores, clock)
    stores.close()


def send(session: Session, *recipients: str) -> list[str]:
    """MAIL, a RCPT for each recipient (each must be accepted), DATA; the final reply."""
    assert session.cmd(f"MAIL FROM:<{USER}>") == MAIL_OK
    for recipient in recipients:
        assert session.cmd(f"RCPT TO:<{recipient}>") == RCPT_OK, recipient
    assert session.cmd("DATA") == DATA_GO
    return session.send(message())


def rcpt_replies(session: Session, *recipients: str) -> list[str]:
    """MAIL, then a RCPT for each recipient: the RCPT replies (one line each)."""
    assert session.cmd(f"MAIL FROM:<{USER}>") == MAIL_OK
    return [line for recipient in recipients for line in session.cmd(f"RCPT TO:<{recipient}>")]


def queued(world: World) -> list[Envelope]:
    return [world.queue.load(queue_id) for queue_id in world.queue.ids()]


# --- L2: the approval address is the only recipient of its transaction -------------------


def test_l2_approval_address_after_another_recipient_is_refused_at_rcpt(world: World) -> None:
    session = world.session()
    assert rcpt_replies(session, RECIPIENT, LOCAL_APPROVAL) == RCPT_OK + APPROVAL_ALONE
    assert session.cmd("DATA") == DATA_GO
    [reply] = session.send(message())
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    assert len(world.mail(RECIPIENT)) == 1
    assert ApprovalStub.opened == []  # the code was never looked at


def test_l2_another_recipient_after_the_approval_address_is_refused_at_rcpt(
    world: World,
) -> None:
    session = world.session()
    # The approval address named twice is one recipient.
    names = (LOCAL_APPROVAL, LOCAL_APPROVAL.upper(), RECIPIENT, REMOTE)
    assert rcpt_replies(session, *names) == RCPT_OK * 2 + APPROVAL_ALONE * 2
    assert session.cmd("DATA") == DATA_GO
    assert session.send(message()) == ["550 5.7.1 No valid approval code in the message"]
    assert world.mail(RECIPIENT) == [] and queued(world) == []
    # A new transaction starts afresh.
    assert session.cmd("RSET") == ["250 2.0.0 Ok"]
    assert send(session, RECIPIENT)[0].startswith("250 2.0.0 Ok")


def test_l2_approval_address_must_be_alone_end_to_end(serve: Serve, connect: Connect) -> None:
    server = serve()
    trust(server, DEVICE_A)
    wire = logged_in(server, connect, DEVICE_A)
    assert wire.code("MAIL FROM:<alice@example.org>") == 250
    assert wire.code("RCPT TO:<bob@example.org>") == 250
    assert wire.cmd(f"RCPT TO:<{APPROVAL}>") == (550, [APPROVAL_ALONE[0][4:]])
    assert wire.code("DATA") == 354
    wire.send("From: alice@example.org\r\nSubject: ABCDE-FGH2K\r\n\r\nhello\r\n.\r\n")
    assert wire.reply()[0] == 250
    assert len(server.messages("bob@example.org")) == 1


# --- L2: every copy prepared before any is committed ---------------------------------------


def test_l2_a_failed_local_copy_leaves_no_other_copy_and_no_queue_entry(
    world: World, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (world.root / "mail" / "example.org").mkdir(parents=True)
    (world.root / "mail" / "example.org" / "carol").symlink_to(outside)  # unusable mailbox
    session = world.session()
    assert send(session, RECIPIENT, OTHER_RECIPIENT, REMOTE) == [LOCAL_ERROR]
    assert world.mail(RECIPIENT) == [] and world.leftovers(RECIPIENT) == []
    assert queued(world) == [] and world.committed == []
    assert list(world.queue.tmp.iterdir()) == [] and list(outside.iterdir()) == []
    # The client's resend, once the mailbox is fixed, reaches everyone exactly once.
    (world.root / "mail" / "example.org" / "carol").unlink()
    assert send(session, RECIPIENT, OTHER_RECIPIENT, REMOTE)[0].startswith("250 2.0.0 Ok")
    assert len(world.mail(RECIPIENT)) == len(world.mail(OTHER_RECIPIENT)) == 1
    assert [e.recipients[0].address for e in queued(world)] == [REMOTE]


class BrokenSigner:
    def signature_header(self, data: bytes, domain: str) -> bytes:
        raise OSError(5, "Input/output error")


def test_l2_a_failed_queue_copy_leaves_no_local_copy(world: World) -> None:
    world.signer = BrokenSigner()
    session = world.session()
    assert send(session, RECIPIENT, REMOTE, OTHER_RECIPIENT) == [LOCAL_ERROR]
    for address in (RECIPIENT, OTHER_RECIPIENT):
        assert world.mail(address) == [] and world.leftovers(address) == []
    assert queued(world) == [] and world.committed == []


@implementer(IStagedMessage)
class StagedMessage(FakeMessage):
    """A FakeMessage stored in two steps, each finished by the test when it says so."""

    def __init__(self, delivery: FakeDelivery, recipient: str) -> None:
        super().__init__(delivery, recipient)
        self.prepared: defer.Deferred[None] | None = None
        self.committed: defer.Deferred[None] | None = None

    def prepare(self) -> defer.Deferred[None]:
        if self.delivery.eom.get(self.recipient) == "fail":
            return defer.fail(OSError(28, "No space left on device"))
        self.prepared = defer.Deferred()
        return self.prepared

    def commit(self) -> defer.Deferred[None]:
        self.committed = defer.Deferred()
        return self.committed.addCallback(self._stored)


class StagedDelivery(FakeDelivery):
    """Staged copies for every recipient but those in ``plain``."""

    def __init__(self, plain: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.plain = plain

    def validateTo(self, user: smtp.User) -> Callable[[], IMessageSMTP]:
        recipient = str(user.dest)
        kind = FakeMessage if recipient in self.plain else StagedMessage

        def open_message() -> IMessageSMTP:
            opened = kind(self, recipient)
            self.messages.append(opened)
            return opened

        return open_message


def staged_session(delivery: StagedDelivery) -> Session:
    session = Session()
    session.delivery = session.portal.delivery = delivery
    session.login()
    session.envelope(RECIPIENT, OTHER_RECIPIENT)
    return session


def test_l2_no_copy_is_committed_before_every_copy_is_prepared() -> None:
    session = staged_session(StagedDelivery())
    assert session.send(message()) == []
    bob, carol = session.delivery.messages
    assert isinstance(bob, StagedMessage) and isinstance(carol, StagedMessage)
    assert bob.prepared is not None and carol.prepared is not None
    bob.prepared.callback(None)
    assert bob.committed is None and carol.committed is None
    carol.prepared.callback(None)
    assert bob.committed is not None and carol.committed is not None
    bob.committed.callback(None)
    assert session.take() == []  # 250 only once every copy is committed
    carol.committed.callback(None)
    [reply] = session.take()
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    assert bob.stored and carol.stored and bob.discarded == carol.discarded == 0


def test_l2_one_failed_copy_discards_the_prepared_others() -> None:
    delivery = StagedDelivery()
    delivery.eom[OTHER_RECIPIENT] = "fail"
    session = staged_session(delivery)
    assert session.send(message()) == []
    bob, carol = delivery.messages
    assert isinstance(bob, StagedMessage) and bob.prepared is not None
    bob.prepared.callback(None)
    assert session.take() == [LOCAL_ERROR]
    assert bob.committed is None and not bob.stored and bob.discarded == 1
    assert not carol.stored and carol.discarded == 1


def test_l2_a_refused_plain_copy_leaves_no_staged_copy() -> None:
    """A Twisted IMessage (one step) is stored after the staged copies are prepared and
    before any is committed: its refusal leaves no other copy."""
    delivery = StagedDelivery(plain=(OTHER_RECIPIENT,))
    delivery.eom[OTHER_RECIPIENT] = smtp.SMTPServerError(550, b"5.7.1 Refused")
    session = staged_session(delivery)
    assert session.send(message()) == []
    bob, carol = delivery.messages
    assert isinstance(bob, StagedMessage) and bob.prepared is not None
    assert not carol.stored  # not asked before the staged copies are ready
    bob.prepared.callback(None)
    assert session.take() == ["550 5.7.1 Refused"]
    assert bob.committed is None and bob.discarded == 1


def test_l2_a_single_staged_copy_is_stored_in_one_step() -> None:
    """Issue 16: one copy is all or nothing by itself, so it gets its one-step store
    (``eomReceived``): a Maildir delivery makes one thread hand-off instead of two."""
    session = Session()
    session.delivery = session.portal.delivery = StagedDelivery()
    session.login()
    session.envelope(RECIPIENT)
    [reply] = session.send(message())
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    [bob] = session.delivery.messages
    assert isinstance(bob, StagedMessage) and bob.stored
    assert bob.prepared is None and bob.committed is None


def test_l2_a_single_copy_that_fails_gets_its_error_and_is_not_kept() -> None:
    delivery = StagedDelivery()
    delivery.eom[RECIPIENT] = "fail"
    session = Session()
    session.delivery = session.portal.delivery = delivery
    session.login()
    session.envelope(RECIPIENT)
    assert session.send(message()) == [LOCAL_ERROR]
    [bob] = delivery.messages
    assert not bob.stored


# --- L3: duplicate recipients -------------------------------------------------------------


def test_l3_a_recipient_named_100_times_gets_one_copy(world: World) -> None:
    session = world.session()
    spellings = [RECIPIENT, RECIPIENT.upper(), "Bob@Example.Org"]
    remote = [REMOTE, REMOTE.upper()]
    names = [spellings[i % 3] for i in range(95)] + [remote[i % 2] for i in range(5)]
    [reply] = send(session, *names)  # every RCPT got 250 (send checks)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    [copy] = world.mail(RECIPIENT)
    assert f"for <{RECIPIENT}>".encode() not in copy  # two recipients: no "for" clause
    [entry] = queued(world)
    assert [r.address for r in entry.recipients] == [REMOTE]


def test_l3_one_recipient_named_twice_keeps_the_for_clause(world: World) -> None:
    session = world.session()
    assert send(session, RECIPIENT, RECIPIENT.upper())[0].startswith("250 2.0.0 Ok")
    [copy] = world.mail(RECIPIENT)
    assert f"for <{RECIPIENT}>".encode() in copy


# --- L3: the sending limit ----------------------------------------------------------------


def test_l3_messages_over_the_hourly_limit_get_451_at_mail(world: World) -> None:
    session = world.session(max_messages=2)
    for _ in range(2):
        assert send(session, RECIPIENT)[0].startswith("250 2.0.0 Ok")
    for _ in range(3):
        assert session.cmd(f"MAIL FROM:<{USER}>") == MESSAGES_OVER
    assert world.reached == [(USER, "2 messages an hour")]  # one notice, not three
    assert len(world.mail(RECIPIENT)) == 2
    world.clock.advance(3600)  # the next hour
    assert send(session, RECIPIENT)[0].startswith("250 2.0.0 Ok")


def test_l3_recipients_over_the_hourly_limit_get_451_at_rcpt_and_duplicates_count_once(
    world: World,
) -> None:
    session = world.session(max_recipients=2)
    names = (RECIPIENT, RECIPIENT.upper(), OTHER_RECIPIENT, REMOTE)  # bob counts once
    assert rcpt_replies(session, *names) == RCPT_OK * 3 + RECIPIENTS_OVER
    assert session.cmd("DATA") == DATA_GO
    assert session.send(message())[0].startswith("250 2.0.0 Ok")
    assert len(world.mail(RECIPIENT)) == len(world.mail(OTHER_RECIPIENT)) == 1
    assert queued(world) == []
    assert world.reached == [(USER, "2 recipients an hour")]


def test_l3_the_limit_is_counted_once_across_processes(backend: Backend, tmp_path: Path) -> None:
    """Two processes' connections, many threads taking at once (on every store backend):
    exactly the limit is counted, and exactly one caller hears of the first refusal."""
    processes = [backend.open(tmp_path), backend.open(tmp_path)]

    def take(stores: Stores) -> list[tuple[bool, bool]]:
        add, most = Sending(0, 1), Sending(0, 100)
        return [stores.sending.count_sending(USER, 7200, add, most) for _ in range(30)]

    try:
        with ThreadPoolExecutor(4) as pool:
            results = [r for taken in pool.map(take, processes * 2) for r in taken]
        assert sum(counted for counted, _first in results) == 100
        assert sum(first for _counted, first in results) == 1
    finally:
        for stores in processes:
            stores.close()


def test_l3_sending_counts_per_hour_and_per_account(stores: Stores) -> None:
    counts, most = stores.sending, Sending(2, 0)  # 0: recipients without a maximum
    assert ISendingCounts.providedBy(counts)
    assert counts.count_sending(USER, 3600, Sending(1, 500), most) == (True, False)
    assert counts.count_sending(USER, 3600, Sending(1, 500), most) == (True, False)
    assert counts.count_sending(USER, 3600, Sending(1, 0), most) == (False, True)
    assert counts.count_sending(USER, 3600, Sending(1, 0), most) == (False, False)
    assert counts.count_sending(RECIPIENT, 3600, Sending(1, 0), most) == (True, False)
    assert counts.count_sending(USER, 0, Sending(1, 0), most) == (False, False)  # a slow clock
    assert counts.count_sending(USER, 7200, Sending(1, 0), most) == (True, False)  # new hour


def test_l3_one_postmaster_notice_per_account_and_hour(world: World) -> None:
    notifier = Notifier(world.maildirs, "example.org", POSTMASTER)
    for account in (USER, RECIPIENT):
        session = Session()
        session.portal.delivery = world.delivery(  # type: ignore[assignment]
            account, max_messages=1, reached=tell_postmaster(notifier)
        )
        session.login()
        assert session.cmd(f"MAIL FROM:<{account}>") == MAIL_OK
        assert session.cmd("RSET") == ["250 2.0.0 Ok"]
        for _ in range(3):
            assert session.cmd(f"MAIL FROM:<{account}>") == MESSAGES_OVER
    notices = world.mail(POSTMASTER)
    assert len(notices) == 2
    assert all(b"Subject: An account reached its hourly sending limit" in n for n in notices)
    assert any(USER.encode() in n for n in notices) and any(
        RECIPIENT.encode() in n for n in notices
    )


def test_l3_a_notice_that_cannot_be_written_still_refuses(world: World) -> None:
    def broken(account: str, limit: str) -> None:
        raise OSError(28, "No space left on device")

    session = world.session(max_messages=1, reached=broken)
    assert send(session, RECIPIENT)[0].startswith("250 2.0.0 Ok")
    assert session.cmd(f"MAIL FROM:<{USER}>") == MESSAGES_OVER


class LockedCounts:
    def count_sending(self, *args: Any) -> tuple[bool, bool]:
        raise StoreUnavailable("database is locked")

    def close(self) -> None:
        pass


def test_l3_a_store_that_cannot_count_lets_the_mail_through(world: World) -> None:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        world.stores = replace(world.stores, sending=LockedCounts())  # type: ignore[arg-type]
        session = world.session(max_messages=1, max_recipients=1)
        assert send(session, RECIPIENT)[0].startswith("250 2.0.0 Ok")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any("cannot count the mail of" in e.get("log_format", "") for e in events)


def test_l3_no_limit_means_no_store_call() -> None:
    calls: list[object] = []

    def run_in_thread(*args: Any) -> defer.Deferred[Any]:
        calls.append(args)
        return defer.succeed(False)

    off = SendingLimit(LockedCounts(), 0, 0, run_in_thread=run_in_thread)  # type: ignore[arg-type]
    outcomes = [off.take_message(USER), off.take_recipient(USER)]
    assert [d.result for d in outcomes] == [True, True] and calls == []


def test_l3_limit_keys_default_and_zero_turns_them_off(tmp_path: Path) -> None:
    limits = load_config(None).limits
    assert (limits.max_messages_per_hour, limits.max_recipients_per_hour) == (1000, 5000)
    config = tmp_path / "c.toml"
    config.write_text("[limits]\nmax_messages_per_hour = 0\nmax_recipients_per_hour = 0\n")
    limits = load_config(config).limits
    assert (limits.max_messages_per_hour, limits.max_recipients_per_hour) == (0, 0)
    config.write_text("[limits]\nmax_messages_per_hour = -1\n")
    with pytest.raises(ConfigError, match="max_messages_per_hour"):
        load_config(config)


def test_l3_sending_limit_end_to_end(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(
        '[limits]\nmax_messages_per_hour = 1\n[alerts]\npostmaster = "bob@example.org"\n'
    )
    server.add_user("alice@example.org", "alice-password")
    server.add_user("bob@example.org", "bob-password")
    client = server.smtp()
    client.login("alice@example.org", "alice-password")
    mail = b"From: alice@example.org\r\nSubject: one\r\n\r\nhello\r\n"
    client.sendmail("alice@example.org", ["bob@example.org"], mail)
    for _ in range(2):
        code, text = client.mail("alice@example.org")
        assert (code, text.split(b" ")[0]) == (451, b"4.7.1")
        client.rset()
    client.quit()
    # The notice is written before the refusal is sent: no waiting.
    subjects = [m["Subject"] for m in server.messages("bob@example.org")]
    assert subjects.count("An account reached its hourly sending limit") == 1
    assert subjects.count("one") == 1
