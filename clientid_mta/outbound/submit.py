"""Submission into the outbound queue: the ``IMessage`` for remote recipients.

All remote recipients of one transaction share one ``OutboundMessage``, so the queue
holds one copy per message. It is stored in two steps (smtp/staging.py): ``prepare``
writes and fsyncs the data in the queue's ``tmp/`` and signs it with DKIM (when a key
exists for the domain of its ``From:`` address); ``commit`` makes it a queue entry and
tells the runner. The protocol prepares every copy of a message before it commits any,
and replies 250 only once every entry is durable (docs/conformance.md, S11).
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.mail.interfaces import IMessageSMTP
from zope.interface import implementer

from clientid_mta.delivery.spool import LateFile
from clientid_mta.outbound.queue import Envelope, MessageWriter, QueueDir, Recipient
from clientid_mta.smtp.staging import IStagedMessage

if TYPE_CHECKING:
    from clientid_mta.outbound.dkim import DkimSigner


def author_domain(message: bytes) -> str:
    """The domain of the first ``From:`` address ("" if none): the DKIM signing domain."""
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(message)
    addresses = email.utils.getaddresses(headers.get_all("From", []))
    return next((a.rpartition("@")[2].lower() for _n, a in addresses if "@" in a), "")


class Outbound:
    """What the submission side needs of the queue: a place to write, a signer, and
    someone to tell about a new entry."""

    def __init__(
        self,
        queue: QueueDir,
        signer: DkimSigner | None = None,
        committed: Callable[[Envelope], None] = lambda _e: None,
    ) -> None:
        self.queue = queue
        self.signer = signer
        self.committed = committed

    def transaction(self, sender: str, account: str) -> OutboundTransaction:
        return OutboundTransaction(self, sender, account)


class OutboundTransaction:
    """The remote recipients of one MAIL transaction, collected as DATA opens them."""

    def __init__(self, outbound: Outbound, sender: str, account: str) -> None:
        self.outbound = outbound
        self.sender = sender
        self.account = account
        self.message: OutboundMessage | None = None

    def recipient(self, address: str) -> Callable[[], IMessageSMTP]:
        """The message factory for one remote recipient (what ``validateTo`` returns)."""

        def open_message() -> IMessageSMTP:
            if self.message is None:
                self.message = OutboundMessage(self.outbound, self.sender, self.account)
            if address not in self.message.recipients:
                self.message.recipients.append(address)
            return self.message

        return open_message


@implementer(IStagedMessage)
class OutboundMessage:
    """One queued copy; the protocol hands it each line once even with many recipients."""

    def __init__(self, outbound: Outbound, sender: str, account: str) -> None:
        self.outbound = outbound
        self.sender = sender
        self.account = account
        self.recipients: list[str] = []
        self._data: LateFile[MessageWriter] = LateFile(outbound.queue.new_message)
        self._envelope: Envelope | None = None  # once prepared

    def lineReceived(self, line: bytes) -> None:
        self._data.write(line + b"\n")

    def write_block(self, data: bytes) -> None:
        self._data.write(data)

    def prepare(self) -> defer.Deferred[Envelope]:
        """The data fsynced in the queue's ``tmp/`` and signed: durable, not yet queued."""
        if self._data.error is not None:
            self._data.abort()
            return defer.fail(self._data.error)
        return self._data.finish(self._prepare)

    def commit(self) -> defer.Deferred[Envelope]:
        """The entry in the queue (message, then envelope), and the runner told."""
        stored = self._data.then(self._commit)
        stored.addCallback(self._committed)
        return stored

    def eomReceived(self) -> defer.Deferred[Envelope]:
        """Both steps at once, for a caller that stores one copy alone."""
        prepared = self.prepare()
        prepared.addCallback(lambda _envelope: self.commit())
        return prepared

    def _prepare(self, writer: MessageWriter) -> Envelope:
        """Fsync the data and sign it. In a thread (``LateFile.finish``)."""
        path = writer.sync()
        header = b""
        signer = self.outbound.signer
        if signer is not None:
            data = path.read_bytes()
            header = signer.signature_header(data, author_domain(data)) or b""
        self._envelope = Envelope(
            id=writer.id,
            sender=self.sender,
            arrival=time.time(),
            recipients=[Recipient(address) for address in dict.fromkeys(self.recipients)],
            account=self.account,
            dkim_header=header.decode("ascii"),
        )
        return self._envelope

    def _commit(self, writer: MessageWriter) -> Envelope:
        """The envelope's rename commits the entry. In a thread (``LateFile.then``)."""
        assert self._envelope is not None, "commit before prepare"
        writer.commit(self._envelope)
        return self._envelope

    def _committed(self, envelope: Envelope) -> Envelope:
        self.outbound.committed(envelope)
        return envelope

    def connectionLost(self) -> None:
        self._data.abort()
