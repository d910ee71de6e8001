"""Notices to account holders about their devices, delivered into their own Maildir.

Plain text, no token (only the fingerprint), and at most one notice per account,
device and kind an hour, so that an attacker cannot flood a mailbox.
"""

from __future__ import annotations

import threading
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from clientid_mta.maildir import MaildirRoot

NEW_DEVICE_PENDING = "pending"
NEW_DEVICE_TRUSTED = "trusted"
NEW_DEVICE_SEEN = "seen"
LOGIN_SUCCEEDED = "success"
LOGIN_FAILED = "failure"

_SUBJECTS = {
    NEW_DEVICE_PENDING: "A new device was refused on your mail account",
    NEW_DEVICE_TRUSTED: "A new device can now send mail as you",
    NEW_DEVICE_SEEN: "A new device sent mail as you",
    LOGIN_SUCCEEDED: "A device logged in to your mail account",
    LOGIN_FAILED: "A device failed to log in to your mail account",
}

_EXPLANATIONS = {
    NEW_DEVICE_PENDING: (
        "A mail program presented the right password for your account, but from a\n"
        "device this server does not know, so it was refused.\n\n"
        "If this was you, ask your mail administrator to approve the device:\n\n"
        "    clientid-mta device approve {account} {fingerprint}\n\n"
        "If it was not you, someone else knows your password: change it now."
    ),
    NEW_DEVICE_TRUSTED: (
        "This is the first device that logged in to your account, so it is now\n"
        "trusted. Other new devices will need approval. If this was not you,\n"
        "change your password and ask your administrator to revoke the device:\n\n"
        "    clientid-mta device revoke {account} {fingerprint}"
    ),
    NEW_DEVICE_SEEN: (
        "A mail program logged in to your account from a device this server has not\n"
        "seen before. It was let in (this server only watches devices for now).\n"
        "If it was not you, change your password and tell your mail administrator."
    ),
    LOGIN_SUCCEEDED: "A device logged in to your account.",
    LOGIN_FAILED: "A device tried to log in to your account and was refused.",
}

REPEAT_INTERVAL = 3600.0


class Notifier:
    """Writes device notices into account Maildirs, rate-limited (thread-safe)."""

    def __init__(self, maildirs: MaildirRoot, hostname: str) -> None:
        self._maildirs = maildirs
        self._hostname = hostname
        self._last_sent: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def _due(self, key: tuple[str, str, str]) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last_sent.get(key)
            if last is not None and now - last < REPEAT_INTERVAL:
                return False
            self._last_sent[key] = now
            return True

    def notify(
        self, kind: str, account: str, fingerprint: str, client_type: str, network: str
    ) -> bool:
        """Deliver one notice (blocking disk I/O: call from a thread). False when rate-limited."""
        if not self._due((account, fingerprint, kind)):
            return False
        message = EmailMessage()
        message["From"] = f"Mail server <postmaster@{self._hostname}>"
        message["To"] = account
        message["Subject"] = _SUBJECTS[kind]
        message["Date"] = formatdate(localtime=True)
        message["Message-ID"] = make_msgid(domain=self._hostname)
        message["Auto-Submitted"] = "auto-generated"
        details = (
            f"Account:     {account}\n"
            f"Device:      {fingerprint} (type {client_type})\n"
            f"Network:     {network}\n"
            f"Time:        {formatdate(localtime=True)}\n\n"
        )
        message.set_content(
            details + _EXPLANATIONS[kind].format(account=account, fingerprint=fingerprint) + "\n"
        )
        localpart, _, domain = account.rpartition("@")
        self._maildirs.deliver_bytes(domain, localpart, message.as_bytes())
        return True
