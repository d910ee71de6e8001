"""Where an authenticated account's mail goes: its ``IMessageDelivery``.

``validateFrom`` enforces the sender (S6); ``validateTo`` routes each recipient to a
local Maildir or refuses it. Remote recipients are refused with 550 5.7.1 until the
outbound queue exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.cred.error import UnauthorizedLogin
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.mail.smtp import Address, SMTPBadRcpt, SMTPBadSender, User
from zope.interface import implementer

from clientid_mta.maildir import MaildirMessage, MaildirRoot
from clientid_mta.passwords import Account, PasswdFile, normalise_address


class LocalRouter:
    """Knows which domains are local, which local users exist, and where they live."""

    def __init__(
        self, passwords: PasswdFile, local_domains: Iterable[str] | None, maildirs: MaildirRoot
    ) -> None:
        self.passwords = passwords
        self._local_domains = frozenset(d.lower() for d in local_domains) if local_domains else None
        self.maildirs = maildirs

    def is_local(self, domain: str) -> bool:
        domains = (
            self._local_domains if self._local_domains is not None else self.passwords.domains()
        )
        return domain.lower() in domains

    def message_factory(self, address: str) -> Callable[[], IMessageSMTP] | None:
        """A callable that opens the message for a local user, or None if no such user."""
        account = self.passwords.get(address)
        if account is None:
            return None
        return lambda: MaildirMessage(self.maildirs, account.domain, account.localpart)


@implementer(IMessageDelivery)
class AccountDelivery:
    def __init__(self, account: Account, router: LocalRouter) -> None:
        self.account = account
        self.router = router

    def receivedHeader(self, helo: object, origin: object, recipients: object) -> None:
        # The protocol writes the Received: header itself (S15): it knows the TLS state.
        return None

    def validateFrom(self, helo: object, origin: Address) -> Address:
        if not self.account.may_send_as(str(origin)):
            raise SMTPBadSender(str(origin), 553, "5.7.1 Sender address rejected: not owned by you")
        return origin

    def validateTo(self, user: User) -> Callable[[], IMessageSMTP]:
        address = normalise_address(str(user.dest))
        domain = address.rpartition("@")[2]
        if not self.router.is_local(domain):
            raise SMTPBadRcpt(address, 550, "5.7.1 Relaying to other domains is not enabled here")
        factory = self.router.message_factory(address)
        if factory is None:
            raise SMTPBadRcpt(address, 550, "5.1.1 No such user here")
        return factory

    def may_use_header_from(self, addresses: Iterable[str]) -> bool:
        """The From: header check at end of DATA (S6)."""
        return all(self.account.may_send_as(a) for a in addresses)


def delivery_factory(
    passwords: PasswdFile, router: LocalRouter
) -> Callable[[str], IMessageDelivery]:
    """What the realm calls with an authenticated account name."""

    def delivery_for(address: str) -> IMessageDelivery:
        account = passwords.get(address)
        if account is None:  # deleted between the password check and now
            raise UnauthorizedLogin()
        return AccountDelivery(account, router)

    return delivery_for
