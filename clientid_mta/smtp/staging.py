"""The two-step store a message copy may offer, so a transaction is all or nothing.

A copy that provides ``IStagedMessage`` is stored in two steps: ``prepare`` does
everything that can fail for ordinary reasons (writing and fsyncing the data, signing)
and leaves the copy invisible; ``commit`` only makes it visible (a rename and a folder
fsync). The protocol prepares every copy of a message before it commits any, so a
reply other than 250 to the final dot means no recipient got the message, and the
client can resend it to all of them (docs/conformance.md, row S11).
"""

from __future__ import annotations

from typing import Any

from twisted.mail.interfaces import IMessageSMTP


class IStagedMessage(IMessageSMTP):
    """An ``IMessageSMTP`` whose store is split in two; ``connectionLost`` before
    ``commit`` throws the prepared copy away. ``eomReceived`` stays the one-step store."""

    def prepare() -> Any:
        """A Deferred that fires once the copy is durable but not yet visible."""

    def commit() -> Any:
        """A Deferred that fires once the prepared copy is visible (delivered or queued)."""
