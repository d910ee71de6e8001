"""Errors the wire answers for, raised by the layers below it.

The protocol must tell "our own trouble, try later" (451) apart from a refusal of the
client's message without knowing which storage raised it.
"""

from __future__ import annotations


class LocalDeliveryError(Exception):
    """Our side cannot store this message now (disk, an unusable mailbox): 451 4.3.0."""
