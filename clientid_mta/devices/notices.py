"""Notices to account holders (in their own Maildir) and to the postmaster.

Plain text; a device is named by its fingerprint, never its token. A refused mail
program only says "Login failed": the notice is where the holder learns what happened,
so it says which device, why, and what to do. Rate-limited twice, so that an attacker
cannot flood a mailbox: one notice per account, device and kind an hour, and at most
``max_per_account_per_hour`` notices per account an hour, counted in the store
(``INoticeLedger``) when one is given, so that the caps hold across worker processes.
All methods block on disk: call them from a thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from clientid_mta.delivery.maildir import Mailboxes
from clientid_mta.devices.store import INoticeLedger, StoreUnavailable

NEW_DEVICE_PENDING = "pending"
NEW_DEVICE_TRUSTED = "trusted"
NEW_DEVICE_SEEN = "seen"
LOGIN_SUCCEEDED = "success"
LOGIN_FAILED = "failure"
REPEATED_FAILURES = "repeated-failures"
IMPOSSIBLE_TRAVEL = "travel"
DEVICE_APPROVED = "approved"
SHARED_DEVICE = "shared-device"
SENDING_LIMIT = "sending-limit"

_SUBJECTS = {
    NEW_DEVICE_PENDING: "A new device was refused on your mail account",
    NEW_DEVICE_TRUSTED: "A new device can now send mail as you",
    NEW_DEVICE_SEEN: "A new device sent mail as you",
    LOGIN_SUCCEEDED: "A device logged in to your mail account",
    LOGIN_FAILED: "A device failed to log in to your mail account",
    REPEATED_FAILURES: "Repeated failed logins on your mail account",
    IMPOSSIBLE_TRAVEL: "Your device logged in from two distant networks",
    DEVICE_APPROVED: "You approved a new device",
    SHARED_DEVICE: "A device is trying many accounts",
    SENDING_LIMIT: "An account reached its hourly sending limit",
}

_EXPLANATIONS = {
    NEW_DEVICE_PENDING: (
        "A mail program tried to send mail as you from the device above, which this\n"
        "server had not seen before. It gave your right password, but a new device\n"
        "needs your approval first, so it was refused and its message was not sent.\n\n"
        'The mail program does not say why. Thunderbird shows "Login to server ...\n'
        'failed" with the buttons Retry and Enter New Password; other programs say\n'
        '"Login failed" or "Authentication failed". Your password is right: entering\n'
        "it again does not help. The device has not been blocked for good.\n\n"
        "If this was you (a new computer, phone or mail program), approve the device\n"
        "in one of two ways, then press Retry there (or send the message again):\n\n"
        "  - from a device you already use for this account, send a message to\n"
        "    {approval_address} with this code in the subject: {code}\n"
        "    (the code works once, until {expires});\n"
        "  - or ask your mail administrator to run:\n"
        "    clientid-mta device approve {account} {fingerprint}\n\n"
        "If it was not you, nothing needs doing to keep that device out: it stays\n"
        "refused. But it knew your password, so it is wise to change it."
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
    REPEATED_FAILURES: (
        "Devices this server does not trust for your account tried to log in\n"
        "{total} within the hour, and were refused (the device above was the last):\n\n"
        "{tally}\n\n"
        "Your own devices are not affected.{advice}"
    ),
    IMPOSSIBLE_TRAVEL: (
        "One of your trusted devices logged in from {network} ({region}), shortly after\n"
        "logging in from {previous}. One device cannot be in two places at once: if you\n"
        "did not move between networks, someone may have copied it. Tell your mail\n"
        "administrator, who can revoke it:\n\n"
        "    clientid-mta device revoke {account} {fingerprint}"
    ),
    DEVICE_APPROVED: (
        "The device above can now send mail as you, approved with a code from a\n"
        "device you already trust. If that was not you, ask your mail administrator\n"
        "to revoke it:\n\n"
        "    clientid-mta device revoke {account} {fingerprint}"
    ),
    SHARED_DEVICE: (
        "One client identity was used against {accounts} different accounts within\n"
        "a short time: a sign of credential stuffing, or of a shared device.\n"
        "Last account tried: {account}. It is {action}. Clear the flag with:\n\n"
        "    clientid-mta device unflag {fingerprint}"
    ),
    SENDING_LIMIT: (
        "The account {account} reached its sending limit for this hour ({limit}).\n"
        "Its mail is refused with 451 4.7.1 until the hour is over; this is the only\n"
        "notice about it this hour. A sudden burst often means a stolen password: if\n"
        "the account holder did not send it, change the password. The limits are\n"
        "[limits] max_messages_per_hour and max_recipients_per_hour."
    ),
}

REPEAT_INTERVAL = 3600.0
HOUR = 3600.0
MAX_WAITING = 1000  # notices kept while the ledger cannot record them
SENT_KEPT_FOR = max(REPEAT_INTERVAL, HOUR)  # older notices sent count against no cap


def _times(count: int) -> str:
    return "once" if count == 1 else "twice" if count == 2 else f"{count} times"


@dataclass(frozen=True)
class FailureTally:
    """Failed logins from devices the account does not trust, by what was wrong."""

    wrong_password: int
    unapproved_device: int  # the right password, on a device not (yet) allowed

    def fields(self) -> dict[str, str]:
        """The placeholders of the "repeated failures" notice."""
        lines = []
        if self.wrong_password:
            lines.append(f"  - {_times(self.wrong_password)} with a wrong password;")
        if self.unapproved_device:
            lines.append(
                f"  - {_times(self.unapproved_device)} with your right password, but from a"
                " device\n    you have not approved (or one that gave no device identity)."
            )
        advice = ""
        if self.unapproved_device:
            advice += (
                "\n\nYour right password was used on a device you have not approved. If\n"
                "that was you (a new computer, phone or mail program), approve it: see the\n"
                'notice "A new device was refused on your mail account", or ask your mail\n'
                "administrator. If it was not you, someone knows your password: change it."
            )
        if self.wrong_password:
            advice += "\n\nIf your password is weak or used elsewhere too, change it."
        total = self.wrong_password + self.unapproved_device
        return {"total": _times(total), "tally": "\n".join(lines), "advice": advice}


@dataclass(frozen=True)
class Notice:
    """What a notice is about; ``extra`` fills the placeholders of its explanation.

    An empty ``network`` or ``client_type`` (not known) leaves its part out; a
    ``first_seen`` time adds a line (a pending device is always new: first seen now).
    """

    kind: str
    account: str
    fingerprint: str
    client_type: str
    network: str
    extra: dict[str, str] | None = None
    first_seen: float | None = None


class Notifier:
    """Writes notices into Maildirs, rate-limited (thread-safe)."""

    def __init__(
        self,
        maildirs: Mailboxes,  # Maildir, or Dovecot's LMTP
        hostname: str,
        postmaster: str = "",
        is_local_account: Callable[[str], bool] = lambda _address: True,
        max_per_account_per_hour: int = 10,
        ledger: INoticeLedger | None = None,
    ) -> None:
        self._maildirs = maildirs
        self._hostname = hostname
        self.postmaster = postmaster or f"postmaster@{hostname}"
        self._is_local_account = is_local_account
        self._max_per_account = max_per_account_per_hour
        self._ledger = ledger
        self._last_sent: dict[tuple[str, str, str], float] = {}
        self._sent_by_account: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        # Notices the ledger could not record (its store away): sent once it answers.
        self._waiting: deque[tuple[str, Notice]] = deque(maxlen=MAX_WAITING)

    def _due(self, recipient: str, fingerprint: str, kind: str) -> bool:
        if self._ledger is not None:  # one answer for every worker process
            return self._ledger.may_notify(
                recipient, fingerprint, kind, time.time(), REPEAT_INTERVAL, self._max_per_account
            )
        now = time.monotonic()
        with self._lock:
            last = self._last_sent.get((recipient, fingerprint, kind))
            if last is not None and now - last < REPEAT_INTERVAL:
                return False
            recent = [t for t in self._sent_by_account.get(recipient, []) if now - t < 3600]
            if len(recent) >= self._max_per_account:
                return False
            self._last_sent[(recipient, fingerprint, kind)] = now
            self._sent_by_account[recipient] = [*recent, now]
            return True

    def notify(self, notice: Notice) -> bool:
        """Tell the account holder; False when rate-limited."""
        return self._send(notice.account, notice)

    def notify_postmaster(self, notice: Notice) -> bool:
        """Tell the postmaster (admin events); False when rate-limited or not a local account."""
        if not self._is_local_account(self.postmaster):
            return False
        return self._send(self.postmaster, notice)

    def _send(self, recipient: str, notice: Notice) -> bool:
        # A notice without a device (a sending limit) is counted per account instead.
        try:
            due = self._due(recipient, notice.fingerprint or notice.account, notice.kind)
        except StoreUnavailable:
            self._waiting.append((recipient, notice))  # bounded: past it the oldest go
            return False
        if not due:
            return False
        self._deliver(recipient, notice)
        return True

    def _deliver(self, recipient: str, notice: Notice) -> None:
        message = EmailMessage()
        message["From"] = f"Mail server <postmaster@{self._hostname}>"
        message["To"] = recipient
        message["Subject"] = _SUBJECTS[notice.kind]
        message["Date"] = formatdate(localtime=True)
        message["Message-ID"] = make_msgid(domain=self._hostname)
        message["Auto-Submitted"] = "auto-generated"
        details = self._details(notice)
        fields = {
            "account": notice.account,
            "fingerprint": notice.fingerprint,
            "network": notice.network,
            "client_type": notice.client_type,
        }
        fields.update(notice.extra or {})
        message.set_content(details + _EXPLANATIONS[notice.kind].format(**fields) + "\n")
        localpart, _, domain = recipient.rpartition("@")
        self._maildirs.deliver_bytes(domain, localpart, message.as_bytes())

    def send_waiting(self) -> int:
        """Send the notices that waited for the ledger, oldest first, until it fails
        again (they keep waiting). Returns how many went. Blocking."""
        sent = 0
        while self._waiting:
            recipient, notice = self._waiting.popleft()
            try:
                due = self._due(recipient, notice.fingerprint or notice.account, notice.kind)
            except StoreUnavailable:
                self._waiting.appendleft((recipient, notice))
                break
            if due:
                self._deliver(recipient, notice)
                sent += 1
        return sent

    @staticmethod
    def _details(notice: Notice) -> str:
        """The facts above the explanation, one a line; an unknown one is left out."""
        now = time.time()
        first_seen = notice.first_seen
        if first_seen is None and notice.kind == NEW_DEVICE_PENDING:
            first_seen = now  # refused the first time it was seen
        lines = [
            f"Account:     {notice.account}",
            f"Device:      {notice.fingerprint or '(no client identity)'}"
            f"{f' (type {notice.client_type})' if notice.client_type else ''}",
        ]
        if first_seen is not None:
            lines.append(f"First seen:  {formatdate(first_seen, localtime=True)}")
        if notice.network:
            lines.append(f"Network:     {notice.network}")
        lines.append(f"Time:        {formatdate(now, localtime=True)}")
        return "\n".join(lines) + "\n\n"


class FailureCounter:
    """Counts failures from unknown devices per account; says when to tell the holder,
    and how many were wrong passwords and how many right ones on unapproved devices."""

    def __init__(
        self, threshold: int, window: float = HOUR, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.window = window
        self._clock = clock
        self._failures: dict[str, list[tuple[float, bool]]] = {}  # (time, password right)
        self._lock = threading.Lock()

    def failed(self, account: str, password_right: bool) -> FailureTally | None:
        """Note one failure; the tally each time the count in the window reaches the
        threshold (then counting starts afresh), else None."""
        now = self._clock()
        with self._lock:
            recent = [f for f in self._failures.get(account, []) if now - f[0] < self.window]
            recent.append((now, password_right))
            if len(recent) >= self.threshold:
                self._failures.pop(account, None)
                right = sum(1 for _when, was_right in recent if was_right)
                return FailureTally(len(recent) - right, right)
            self._failures[account] = recent
            if len(self._failures) > 100_000:  # bounded: forget the oldest accounts
                self._failures.pop(next(iter(self._failures)))
            return None
