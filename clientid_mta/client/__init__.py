"""An SMTP submission client that speaks CLIENTID, for Twisted programs and the relay.

``api`` holds the public functions and their argument checks, ``results`` what they
report, ``protocol`` the SMTP session itself.
"""

from clientid_mta.client.api import Transaction, send_message, send_messages, sendmail
from clientid_mta.client.results import ConnectionFailed, RecipientResult, SendFailed

__all__ = [
    "ConnectionFailed",
    "RecipientResult",
    "SendFailed",
    "Transaction",
    "send_message",
    "send_messages",
    "sendmail",
]
