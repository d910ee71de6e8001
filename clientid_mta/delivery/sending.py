"""The sending limit of each account: messages and recipients an hour.

A stolen password must not turn the server into a bulk sender. Each account may start
``[limits] max_messages_per_hour`` transactions and add ``max_recipients_per_hour``
distinct recipients in one clock hour (0: no limit). Over it, ``MAIL`` or ``RCPT`` gets
``451 4.7.1`` (the router says so), and the postmaster gets one notice per account and
hour.

The counts live in the store (``ISendingCounts``), so all worker processes count against
the one limit; each count is one store call, in a thread, never on the reactor. A store
that cannot answer lets the mail through (logged): the limit damps abuse, it must not
stop the server's mail when the store is locked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from clientid_mta.devices.notices import SENDING_LIMIT, Notice, Notifier
from clientid_mta.devices.store import ISendingCounts, Sending, StoreUnavailable

log = Logger()

HOUR = 3600


class SendingLimit:
    """Counts what each account sends; ``take_*`` fire with False when over the limit."""

    def __init__(
        self,
        counts: ISendingCounts,
        max_messages: int,
        max_recipients: int,
        reached: Callable[[str, str], object] = lambda _account, _limit: None,
        *,
        run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.counts = counts
        self.max_messages = max_messages
        self.max_recipients = max_recipients
        self.reached = reached  # (account, which limit): tells the postmaster, in a thread
        self.run_in_thread = run_in_thread
        self.now = now

    def take_message(self, account: str) -> defer.Deferred[bool]:
        """One more transaction (at ``MAIL``)."""
        return self._take(account, 1, 0) if self.max_messages else defer.succeed(True)

    def take_recipient(self, account: str) -> defer.Deferred[bool]:
        """One more distinct recipient (at ``RCPT``)."""
        return self._take(account, 0, 1) if self.max_recipients else defer.succeed(True)

    def _take(self, account: str, messages: int, recipients: int) -> defer.Deferred[bool]:
        hour = int(self.now()) // HOUR * HOUR
        add, most = Sending(messages, recipients), Sending(self.max_messages, self.max_recipients)
        which = (
            f"{self.max_messages} messages an hour"
            if messages
            else f"{self.max_recipients} recipients an hour"
        )
        counted = self.run_in_thread(self.counts.count_sending, account, hour, add, most)
        counted.addCallback(self._counted, account, which)
        counted.addErrback(self._unavailable, account)
        return counted

    def _counted(
        self, outcome: tuple[bool, bool], account: str, which: str
    ) -> bool | defer.Deferred[bool]:
        """On the account's first refusal of the hour: the log line and the notice, which
        is written (in a thread) before the refusal is answered."""
        counted, first_refusal = outcome
        if not first_refusal:
            return counted
        log.warn(
            "account {account} reached its sending limit ({limit})", account=account, limit=which
        )
        told = self.run_in_thread(self.reached, account, which)
        # The notice is a courtesy; the refusal stands without it.
        told.addErrback(lambda failure: log.failure("cannot tell the postmaster", failure))
        return told.addCallback(lambda _: counted)

    def _unavailable(self, failure: Any, account: str) -> bool:
        failure.trap(StoreUnavailable, OSError)
        log.error(
            "cannot count the mail of {account}, letting it through: {problem}",
            account=account,
            problem=str(failure.value),
        )
        return True


def tell_postmaster(notifier: Notifier) -> Callable[[str, str], object]:
    """``reached`` for a ``SendingLimit``: the postmaster's notice (in a thread)."""

    def reached(account: str, limit: str) -> bool:
        return notifier.notify_postmaster(
            Notice(SENDING_LIMIT, account, "", "", "", {"limit": limit})
        )

    return reached
