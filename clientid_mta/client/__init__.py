"""An SMTP submission client that speaks CLIENTID, for Twisted programs and the relay."""

from clientid_mta.client.submit import (
    ConnectionFailed,
    RecipientResult,
    SendFailed,
    send_message,
    send_messages,
    sendmail,
)

__all__ = [
    "ConnectionFailed",
    "RecipientResult",
    "SendFailed",
    "send_message",
    "send_messages",
    "sendmail",
]
