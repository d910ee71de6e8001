"""Where an authenticated account's mail goes: its ``IMessageDelivery``.

``validateFrom`` enforces the sender (S6) and opens the transaction; ``validateTo``
routes each recipient to a local Maildir or to the outbound queue, where all remote
recipients of the transaction share one queued copy. Account look-ups read the passwd
file's in-memory snapshot: nothing here touches the disk.

Every recipient's fate that can be known at ``RCPT`` is settled there, so that the
end of data has only the storing left (which the protocol does for all copies or for
none): a recipient named twice gets the same message factory, hence one copy; the
device-approval address must be the only recipient of its transaction, because its
outcome (a valid code or ``550``) is known only after the data; and the account's
sending limit (``delivery/sending.py``) is charged per transaction and per distinct
recipient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.mail.smtp import Address, SMTPBadRcpt, SMTPBadSender, User
from zope.interface import implementer

from clientid_mta.auth.passwd_file import Account, PasswdFile, normalise_address
from clientid_mta.delivery.lmtp import LmtpDelivery, LmtpTransaction
from clientid_mta.delivery.maildir import MaildirMessage, MaildirRoot
from clientid_mta.delivery.sending import SendingLimit
from clientid_mta.delivery.store_process import StoreProcess
from clientid_mta.outbound.submit import Outbound, OutboundTransaction

MessageFactory = Callable[[], IMessageSMTP]

# 5xx: the same RCPT can never succeed in this transaction. 550 rather than 503: it is
# this recipient that is refused, and mail programs show the text next to it. 5.5.3
# (RFC 3463 "too many recipients"): the address is fine, the recipient count is not.
APPROVAL_ALONE = "5.5.3 The approval address must be the only recipient"
MESSAGES_OVER_LIMIT = "4.7.1 Too many messages from this account this hour, try again later"
RECIPIENTS_OVER_LIMIT = "4.7.1 Too many recipients from this account this hour, try again later"


class LocalRouter:
    """Knows which domains are local, which local users exist, and where they live."""

    def __init__(
        self,
        passwords: PasswdFile,
        local_domains: Iterable[str] | None,
        maildirs: MaildirRoot,
        approval_localpart: str = "",
        approval_message: Callable[[str], IMessageSMTP] | None = None,
    ) -> None:
        self.passwords = passwords
        self._local_domains = frozenset(d.lower() for d in local_domains) if local_domains else None
        self.maildirs = maildirs
        self.approval_localpart = approval_localpart
        self.approval_message = approval_message
        self.lmtp: LmtpDelivery | None = None  # [delivery] lmtp: Dovecot stores local mail
        self.store_process: StoreProcess | None = None  # [delivery] store_process

    def approval_address(self, account: str) -> str:
        """The reserved address an account holder sends approval codes to."""
        domain = account.rpartition("@")[2]
        if not self.is_local(domain):
            domains = sorted(self._local_domains or self.passwords.domains()) or [domain]
            domain = domains[0]
        return f"{self.approval_localpart}@{domain}"

    def is_approval_address(self, address: str) -> bool:
        localpart, _, domain = address.rpartition("@")
        return (
            self.approval_message is not None
            and localpart == self.approval_localpart
            and self.is_local(domain)
        )

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
        return lambda: MaildirMessage(
            self.maildirs, account.domain, account.localpart, self.store_process
        )


@implementer(IMessageDelivery)
class AccountDelivery:
    def __init__(
        self,
        account: Account,
        router: LocalRouter,
        trusted_device: bool = False,
        outbound: Outbound | None = None,
        sending: SendingLimit | None = None,
    ) -> None:
        self.account = account
        self.router = router
        self.trusted_device = trusted_device
        self.outbound = outbound
        self.sending = sending
        self._transaction: OutboundTransaction | None = None
        self._lmtp: LmtpTransaction | None = None  # the local recipients, by LMTP
        # The transaction's accepted recipients (normalised) and their factories.
        self._recipients: dict[str, MessageFactory] = {}
        self._approval = False  # the approval address is among them

    @property
    def address(self) -> str:
        """The account's address, for the session's log lines."""
        return self.account.address

    def receivedHeader(self, helo: object, origin: object, recipients: object) -> None:
        # The protocol writes the Received: header itself (S15): it knows the TLS state.
        return None

    def validateFrom(self, helo: object, origin: Address) -> Address | defer.Deferred[Address]:
        if not self.account.may_send_as(str(origin)):
            raise SMTPBadSender(str(origin), 553, "5.7.1 Sender address rejected: not owned by you")
        self._recipients, self._approval = {}, False
        if self.outbound is not None:
            self._transaction = self.outbound.transaction(str(origin), self.account.address)
        if self.router.lmtp is not None:
            self._lmtp = self.router.lmtp.transaction(str(origin), self.account.address)
        if self.sending is None:
            return origin

        def decide(counted: bool) -> Address:
            if not counted:
                raise SMTPBadSender(str(origin), 451, MESSAGES_OVER_LIMIT)
            return origin

        return self.sending.take_message(self.account.address).addCallback(decide)

    def validateTo(self, user: User) -> MessageFactory | defer.Deferred[MessageFactory]:
        address = normalise_address(str(user.dest))
        known = self._recipients.get(address)
        if known is not None:
            return known  # named twice: the same factory, so one copy (and 250 again)
        factory, approval = self._route(address, str(user.dest))
        if self._recipients and (approval or self._approval):
            raise SMTPBadRcpt(address, 550, APPROVAL_ALONE)
        if self.sending is None:
            return self._accepted(address, factory, approval)

        def decide(counted: bool) -> MessageFactory:
            if not counted:
                raise SMTPBadRcpt(address, 451, RECIPIENTS_OVER_LIMIT)
            return self._accepted(address, factory, approval)

        return self.sending.take_recipient(self.account.address).addCallback(decide)

    def _accepted(self, address: str, factory: MessageFactory, approval: bool) -> MessageFactory:
        self._recipients[address] = factory
        self._approval = self._approval or approval
        return factory

    def _route(self, address: str, given: str) -> tuple[MessageFactory, bool]:
        """The recipient's message factory, and whether it is the approval address;
        raises the refusal of a recipient we cannot take. ``given`` is the address as
        the client wrote it: LMTP passes it on (Sieve rules may test it)."""
        domain = address.rpartition("@")[2]
        if not self.router.is_local(domain):
            if self._transaction is None:
                raise SMTPBadRcpt(
                    address, 550, "5.7.1 Relaying to other domains is not enabled here"
                )
            return self._transaction.recipient(address), False
        if self.router.is_approval_address(address):
            if not self.trusted_device or self.router.approval_message is None:
                raise SMTPBadRcpt(address, 550, "5.7.1 Only a trusted device may approve devices")
            make_message, account = self.router.approval_message, self.account.address
            return (lambda: make_message(account)), True
        factory = self.router.message_factory(address)
        if factory is None:
            raise SMTPBadRcpt(address, 550, "5.1.1 No such user here")
        if self._lmtp is not None:
            return self._lmtp.recipient(given), False
        return factory, False

    def may_use_header_from(self, addresses: Iterable[str]) -> bool:
        """The author check at end of DATA (S6): every address of From:, Sender:,
        Resent-From: and Resent-Sender: is the account's own or in its send-as list."""
        addresses = list(addresses)
        return bool(addresses) and all(self.account.may_send_as(a) for a in addresses)


def delivery_factory(
    passwords: PasswdFile,
    router: LocalRouter,
    outbound: Outbound | None = None,
    sending: SendingLimit | None = None,
) -> Callable[[str, bool], IMessageDelivery]:
    """What the realm calls with an authenticated account name."""

    def delivery_for(address: str, trusted_device: bool) -> IMessageDelivery:
        account = passwords.get(address)
        if account is None:  # deleted between the password check and now
            raise UnauthorizedLogin()
        return AccountDelivery(account, router, trusted_device, outbound, sending)

    return delivery_for
