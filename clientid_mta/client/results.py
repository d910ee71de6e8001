"""What the submission client reports: one ``RecipientResult`` per recipient, or
``ConnectionFailed`` when no transaction took place; ``SendFailed`` is ``sendmail``'s
errback."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class ConnectionFailed(Exception):
    """No SMTP transaction took place with this host: connect error/timeout, TLS handshake or
    certificate failure, TLS required but STARTTLS not offered, connection lost before the end,
    greeting not 2xx, EHLO refused, AUTH refused (any code), server went silent (timeout), a
    ``421`` reply (the server is closing the session) before the end-of-data reply.
    `.temporary` is always True here; `str()` is a one-line human reason (no secrets).

    In ``send_messages``' results it is the outcome of the transaction that did not get its
    final reply and of every later one (the same instance); there a ``421`` to the end of
    data is one too, and so is a message that could not be read (its ``__cause__``)."""

    temporary = True


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient.

    ``code`` is RCPT's code if RCPT was refused, else the code of the reply to the end of
    data (or to DATA, if DATA itself was refused); a refused MAIL FROM gives its code to
    every recipient. ``text`` is that reply's text (decoded, on one line).
    """

    address: str
    code: int
    text: str

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


class SendFailed(Exception):
    """``sendmail``'s errback when a recipient was not delivered; ``.results`` has them all."""

    def __init__(self, results: Sequence[RecipientResult]) -> None:
        self.results = list(results)
        refused = [f"{r.address}: {r.code} {r.text}" for r in self.results if not r.delivered]
        super().__init__("not delivered to " + "; ".join(refused))
