"""Approval of a pending device by the account holder, from a device already trusted.

The pending-device notice carries a one-time code. The holder sends a message with
that code to the reserved local address (``[approval] localpart`` at a local domain)
from a session authenticated by a trusted device; the code then approves the device.
Codes are random, stored only as SHA-256 hashes, expire, and work once.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable

from twisted.internet import defer, threads
from twisted.mail.interfaces import IMessageSMTP
from twisted.mail.smtp import SMTPServerError
from zope.interface import implementer

from clientid_mta.devices.store import TRUSTED, Device, IApprovalCodes, IDeviceRegistry

_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
_CODE_RE = re.compile(r"\b([A-HJ-NP-Z2-9]{5})-([A-HJ-NP-Z2-9]{5})\b", re.IGNORECASE)
MAX_MESSAGE = 65536  # an approval message is short; more is not read


def _hash(code: str) -> str:
    return hashlib.sha256(code.replace("-", "").upper().encode("ascii")).hexdigest()


class Approvals:
    def __init__(
        self,
        codes: IApprovalCodes,
        devices: IDeviceRegistry,
        lifetime: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.codes = codes
        self.devices = devices
        self.lifetime = lifetime
        self.clock = clock  # wall-clock seconds: expiry times are stored

    def issue(self, account: str, device_key: str) -> tuple[str, float]:
        """A new code for a pending device: (code, expiry time). Blocking."""
        raw = "".join(secrets.choice(_ALPHABET) for _ in range(10))
        code = f"{raw[:5]}-{raw[5:]}"
        expires = self.clock() + self.lifetime
        self.codes.add_approval_code(_hash(code), account, device_key, expires)
        return code, expires

    def redeem(self, account: str, text: str) -> list[Device]:
        """Approve the devices whose valid codes appear in ``text``; those devices, as
        now stored. Blocking."""
        approved = []
        for match in _CODE_RE.finditer(text[:MAX_MESSAGE]):
            code = f"{match[1]}-{match[2]}"
            # One UPDATE ... RETURNING: a code raced by two messages approves once.
            device_key = self.codes.redeem_approval_code(_hash(code), account, self.clock())
            if device_key is not None:
                device = self.devices.get(account, device_key)
                if device is not None:
                    approved.append(self.devices.set_state(account, device.fingerprint, TRUSTED))
        return approved


@implementer(IMessageSMTP)
class ApprovalMessage:
    """A message to the reserved approval address: its codes approve devices, nothing is stored.

    Only created for sessions authenticated by a trusted device (see delivery/router.py).
    """

    def __init__(
        self,
        approvals: Approvals,
        account: str,
        approved: Callable[[Device], None] = lambda _device: None,
    ) -> None:
        self._approvals = approvals
        self._account = account
        self._approved = approved
        self._text: list[str] = []
        self._size = 0

    def lineReceived(self, line: bytes) -> None:
        if self._size < MAX_MESSAGE:
            self._text.append(line.decode("ascii", "replace"))
            self._size += len(line) + 1

    def _redeem(self) -> list[Device]:
        devices = self._approvals.redeem(self._account, "\n".join(self._text))
        for device in devices:
            self._approved(device)
        return devices

    def eomReceived(self) -> defer.Deferred[list[Device]]:
        redeemed = threads.deferToThread(self._redeem)

        def check(devices: list[Device]) -> list[Device]:
            if not devices:
                raise SMTPServerError(550, b"5.7.1 No valid approval code in the message")
            return devices

        return redeemed.addCallback(check)

    def connectionLost(self) -> None:
        self._text = []
