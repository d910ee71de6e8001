"""What the service adds around an account's ``IMessageDelivery``.

- An embedder's own ``IMessageDelivery`` for local recipients (``local_delivery``):
  authentication, device policy, the sender check, approval codes and the outbound
  queue stay ours; mail for the local domains goes to the embedder instead of Maildir.
- A count of messages being stored, so that a stopping server can wait for them
  (a client that saw no 250 sends again: stopping mid-store makes duplicates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.mail.smtp import Address, User
from zope.interface import alsoProvides, implementer

from clientid_mta.auth.passwd_file import normalise_address
from clientid_mta.delivery.router import LocalRouter
from clientid_mta.smtp.staging import IStagedMessage


class InFlight:
    """How many messages are between end of data and stored (or refused)."""

    def __init__(self) -> None:
        self.count = 0

    def track(self, storing: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self.count += 1

        def done(result: object) -> object:
            self.count -= 1
            return result

        return storing.addBoth(done)


@implementer(IMessageSMTP)
class CountedMessage:
    """One message, counted in ``InFlight`` while it is being stored: during
    ``eomReceived``, or from ``prepare`` until ``commit`` ends (or the copy is dropped).
    It offers the two-step store exactly when the message does.

    Anything else (``write_block`` among them, where the message has it) is the
    message's own.
    """

    def __init__(self, message: IMessageSMTP, in_flight: InFlight) -> None:
        self._message = message
        self._in_flight = in_flight
        self._staging = False  # counted from prepare until commit or connectionLost
        if IStagedMessage.providedBy(message):
            alsoProvides(self, IStagedMessage)

    def lineReceived(self, line: bytes) -> None:
        self._message.lineReceived(line)

    def eomReceived(self) -> defer.Deferred[Any]:
        return self._in_flight.track(defer.maybeDeferred(self._message.eomReceived))

    def prepare(self) -> defer.Deferred[Any]:
        if not self._staging:
            self._staging = True
            self._in_flight.count += 1
        staged: Any = self._message
        return defer.maybeDeferred(lambda: staged.prepare())

    def commit(self) -> defer.Deferred[Any]:
        staged: Any = self._message
        committed: defer.Deferred[Any] = defer.maybeDeferred(lambda: staged.commit())
        return committed.addBoth(self._staged_done)

    def _staged_done(self, result: object) -> object:
        if self._staging:
            self._staging = False
            self._in_flight.count -= 1
        return result

    def connectionLost(self) -> None:
        self._staged_done(None)
        self._message.connectionLost()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._message, name)


@implementer(IMessageDelivery)
class ServedDelivery:
    """An account's delivery as the service runs it (see the module docstring)."""

    def __init__(
        self,
        account: IMessageDelivery,
        router: LocalRouter,
        in_flight: InFlight,
        local_delivery: IMessageDelivery | None = None,
    ) -> None:
        self.account = account
        self.router = router
        self.in_flight = in_flight
        self.local_delivery = local_delivery
        # One wrapper per message of the transaction: the recipients of one queued
        # copy share a message, and the protocol writes each message once. And one per
        # factory: a recipient named twice gets the same factory, hence one copy.
        self._wrapped: dict[int, tuple[IMessageSMTP, CountedMessage]] = {}
        self._factories: dict[int, tuple[Callable[[], IMessageSMTP], Callable[[], IMessageSMTP]]]
        self._factories = {}

    @property
    def address(self) -> str | None:
        """The account's address (the session logs it with each message)."""
        return getattr(self.account, "address", None)

    def receivedHeader(self, helo: object, origin: object, recipients: object) -> None:
        return None  # the protocol writes Received: itself

    def validateFrom(self, helo: Any, origin: Address) -> defer.Deferred[Address]:
        self._wrapped.clear()
        self._factories.clear()
        checked = defer.maybeDeferred(self.account.validateFrom, helo, origin)
        if self.local_delivery is not None:
            local = self.local_delivery
            checked.addCallback(lambda _: local.validateFrom(helo, origin))
            checked.addCallback(lambda _: origin)
        return checked

    def validateTo(self, user: User) -> defer.Deferred[Callable[[], IMessageSMTP]]:
        target = self.account
        if self.local_delivery is not None:
            address = normalise_address(str(user.dest))
            if self.router.is_local(address.rpartition("@")[2]) and not (
                self.router.is_approval_address(address)
            ):
                target = self.local_delivery
        opened = defer.maybeDeferred(target.validateTo, user)
        return opened.addCallback(self._counted_factory)

    def _counted_factory(self, factory: Callable[[], IMessageSMTP]) -> Callable[[], IMessageSMTP]:
        known_factory = self._factories.get(id(factory))
        if known_factory is not None and known_factory[0] is factory:
            return known_factory[1]

        def open_message() -> IMessageSMTP:
            message = factory()
            known = self._wrapped.get(id(message))
            if known is None or known[0] is not message:
                known = (message, CountedMessage(message, self.in_flight))
                self._wrapped[id(message)] = known
            return known[1]

        self._factories[id(factory)] = (factory, open_message)
        return open_message

    def may_use_header_from(self, addresses: Iterable[str]) -> bool:
        """The From: header check at end of DATA (S6) stays the account's."""
        check = getattr(self.account, "may_use_header_from", None)
        return bool(check(addresses)) if check is not None else True
