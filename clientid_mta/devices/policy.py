"""The device policy: may this device use this account?

Asked only after the password was verified. Blocking (it reads and writes the store,
and may deliver a notice), so the checker runs it in a thread.

Modes:
- ``off``: CLIENTID is not advertised; password only.
- ``observe``: devices are recorded (first one trusted, later ones pending) and
  notices sent, but nothing is refused on device grounds.
- ``tofu``: the first device to log in with the right password becomes trusted; a
  later unknown device is recorded as pending, its holder notified, and refused.
- ``allowlist``: only trusted devices (``device add`` / ``device approve``).

Sessions without a usable client identity (none sent, or a type whose flags lack
``auth``) are allowed or refused by ``allow_without_clientid`` in tofu/allowlist.
A trusted device seen in two regions within ``[travel] window`` raises an alert
(and, with ``refuse``, is refused): one device cannot be in two places at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from clientid_mta.config import ClientIdConfig, TravelConfig
from clientid_mta.devices import notices as alerts
from clientid_mta.devices.approval import Approvals
from clientid_mta.devices.last_seen import LoginRecorder, PendingLogin
from clientid_mta.devices.store import PENDING, TRUSTED, Device, IDeviceRegistry
from clientid_mta.smtp.clientid import ClientIdentity, device_key, fingerprint

ENFORCING = ("tofu", "allowlist")

# Internal reason codes: logged and audited for the operator, never sent to the client.
ALLOWED_KNOWN_DEVICE = "known_device"
ALLOWED_FIRST_DEVICE = "first_device_trusted"
ALLOWED_OBSERVED = "observed"
ALLOWED_WITHOUT_CLIENTID = "no_clientid_allowed"
ALLOWED_POLICY_OFF = "policy_off"
REFUSED_WITHOUT_CLIENTID = "no_clientid_refused"
REFUSED_NEW_DEVICE = "new_device_pending"
REFUSED_PENDING = "device_pending"
REFUSED_REVOKED = "device_revoked"
REFUSED_TRAVEL = "impossible_travel"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    fingerprint: str | None = None
    notices: tuple[str, ...] = field(default=())
    device_trusted: bool = False  # the session's device is trusted for the account


@dataclass(frozen=True)
class Where:
    """The client's network (/24, /56) and region (/16 or country)."""

    network: str
    region: str = ""


class DevicePolicy:
    def __init__(
        self,
        settings: ClientIdConfig,
        store: IDeviceRegistry,
        server_key: bytes,
        notifier: alerts.Notifier | None,
        travel: TravelConfig | None = None,
        approvals: Approvals | None = None,
        approval_address: Callable[[str], str] = lambda _account: "",
        logins: LoginRecorder | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.server_key = server_key
        self.notifier = notifier
        self.travel = travel or TravelConfig()
        self.approvals = approvals
        self.approval_address = approval_address
        # Where a trusted device's login is recorded after the reply (last_seen.py);
        # without it, every login is written before the decision returns.
        self.logins = logins

    def usable(
        self, identity: ClientIdentity | None
    ) -> tuple[ClientIdentity | None, frozenset[str]]:
        """The identity as the policy sees it (None if ignored or debug) and its flags."""
        if identity is None or not self.settings.advertised:
            return None, frozenset()
        flags = self.settings.flags_for(identity.type)
        if "ignore" in flags or "debug" in flags:
            return None, flags
        return identity, flags

    def key_of(self, identity: ClientIdentity | None) -> str | None:
        return device_key(self.server_key, identity) if identity is not None else None

    def notify(self, notice: alerts.Notice, postmaster: bool = False) -> tuple[str, ...]:
        """Deliver a notice as a courtesy; the kinds sent (or "<kind>-undeliverable"). Blocking."""
        if self.notifier is None:
            return ()
        try:
            if postmaster:
                sent = self.notifier.notify_postmaster(notice)
            else:
                sent = self.notifier.notify(notice)
        except Exception:
            # A notice is a courtesy: a full or broken mailbox, or a bug in a notice, must
            # not change the decision. The reactor side logs the "-undeliverable" mark.
            return (f"{notice.kind}-undeliverable",)
        return (notice.kind,) if sent else ()

    def _enforced(
        self, identity: ClientIdentity | None
    ) -> tuple[ClientIdentity | None, frozenset[str], bool]:
        """The identity as used, its flags, and whether the policy enforces on it."""
        identity, flags = self.usable(identity)
        enforced = identity is not None and "auth" in flags and self.settings.policy in ENFORCING
        return identity, flags, enforced

    def decide(self, account: str, identity: ClientIdentity | None, where: Where) -> Decision:
        """The password was right; decide on device grounds. Blocking."""
        mode = self.settings.policy
        if mode == "off":
            return Decision(True, ALLOWED_POLICY_OFF)
        identity, flags, enforced = self._enforced(identity)
        recorded = identity is not None and ("userlog" in flags or "auth" in flags)
        if not enforced and mode in ENFORCING and not self.settings.allow_without_clientid:
            return Decision(False, REFUSED_WITHOUT_CLIENTID)
        if identity is None or (not recorded and not enforced):
            return Decision(True, ALLOWED_WITHOUT_CLIENTID)
        return self._decide_device(account, identity, flags, where, enforced)

    def _decide_device(
        self,
        account: str,
        identity: ClientIdentity,
        flags: frozenset[str],
        where: Where,
        enforced: bool,
    ) -> Decision:
        key = device_key(self.server_key, identity)
        fp = fingerprint(key)
        # Trust on first use, for a device the policy uses (or watches, under observe): a
        # type that is only logged must not take the account's first-device slot. One
        # store call, so two new devices racing for the slot cannot both win it.
        eligible = (enforced or self.settings.policy == "observe") and (
            self.settings.policy != "allowlist"
        )
        device = self._trusted_device(account, key)
        behind = device is not None  # its login is recorded after the reply
        if device is None:
            device, new = self.store.register(account, key, identity.type, where.network, eligible)
        else:
            new = False
        state = device.state

        def notice(kind: str, **extra: str) -> alerts.Notice:
            return alerts.Notice(kind, account, fp, identity.type, where.network, extra)

        notices: tuple[str, ...] = ()
        if new and state == TRUSTED:
            reason, allowed = ALLOWED_FIRST_DEVICE, True
            notices += self.notify(notice(alerts.NEW_DEVICE_TRUSTED))
        elif new:
            reason, allowed = REFUSED_NEW_DEVICE, not enforced
            if enforced:
                notices += self.notify(self._pending_notice(account, key, notice))
            else:
                notices += self.notify(notice(alerts.NEW_DEVICE_SEEN))
        elif state == TRUSTED:
            reason, allowed = ALLOWED_KNOWN_DEVICE, True
            travelled = self._travelled(device, where)  # login() has not refreshed it yet
            if travelled is not None:
                travel = notice(alerts.IMPOSSIBLE_TRAVEL, region=where.region, previous=travelled)
                notices += self.notify(travel) + self.notify(travel, postmaster=True)
                if self.travel.refuse and enforced:
                    reason, allowed = REFUSED_TRAVEL, False
        else:
            reason = REFUSED_PENDING if state == PENDING else REFUSED_REVOKED
            allowed = not enforced
        if allowed and not enforced and reason != ALLOWED_FIRST_DEVICE:
            reason = ALLOWED_OBSERVED
        if allowed:
            self._record_login(account, key, where, behind)
            if "alert-success" in flags:
                notices += self.notify(notice(alerts.LOGIN_SUCCEEDED))
        elif "alert-fail" in flags:
            notices += self.notify(notice(alerts.LOGIN_FAILED))
        return Decision(allowed, reason, fp, notices, device_trusted=state == TRUSTED)

    def quick_decision(
        self, account: str, identity: ClientIdentity | None, where: Where, device: Device
    ) -> Decision | None:
        """``decide`` for a device the store just showed trusted, when the answer needs no
        store call and no notice: an enforced identity, no ``alert-success``, no journey,
        room in the write-behind. Records the login and returns the decision; None when
        any of that does not hold (``decide`` in a thread then). Never blocks."""
        identity, flags, enforced = self._enforced(identity)
        if (
            identity is None
            or not enforced
            or self.logins is None
            or "alert-success" in flags
            or device.state != TRUSTED
            or device.account != account
        ):
            return None
        if self._travelled(self.logins.latest(device), where) is not None:
            return None
        login = PendingLogin(account, device.device_key, where.network, where.region, time.time())
        if not self.logins.record_later(login):
            return None
        return Decision(True, ALLOWED_KNOWN_DEVICE, device.fingerprint, device_trusted=True)

    def _record_login(self, account: str, key: str, where: Where, behind: bool) -> None:
        """Count the login: after the reply for a trusted device, else now. Blocking."""
        if behind and self.logins is not None:
            login = PendingLogin(account, key, where.network, where.region, time.time())
            self.logins.record(login)
        else:
            self.store.login(account, key, where.network, where.region)

    def _trusted_device(self, account: str, key: str) -> Device | None:
        """A device the account trusts now, read from the store (a revocation made a
        moment ago counts), with this process's logins not yet written; None for any
        other device, or when logins are written at once. Blocking."""
        if self.logins is None:
            return None
        device = self.store.get(account, key)
        if device is None or device.state != TRUSTED:
            return None
        return self.logins.latest(device)

    def _pending_notice(
        self, account: str, key: str, notice: Callable[..., alerts.Notice]
    ) -> alerts.Notice:
        if self.approvals is None:
            return notice(
                alerts.NEW_DEVICE_PENDING,
                code="(none)",
                expires="-",
                approval_address="(not available)",
            )
        code, expires = self.approvals.issue(account, key)
        return notice(
            alerts.NEW_DEVICE_PENDING,
            code=code,
            expires=time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(expires)),
            approval_address=self.approval_address(account),
        )

    def _travelled(self, device: Device, where: Where) -> str | None:
        """The previous region when this login is an impossible journey, else None."""
        if not self.travel.window or not device.last_region or not where.region:
            return None
        if device.last_region == where.region:
            return None
        if time.time() - device.last_login > self.travel.window:
            return None
        return device.last_region

    def password_failed(
        self, account: str, identity: ClientIdentity | None, where: Where
    ) -> Decision:
        """A wrong password for an existing account: only the ``alert-fail`` notice. Blocking."""
        identity, flags = self.usable(identity)
        if identity is None:
            return Decision(False, "bad_password")
        fp = fingerprint(device_key(self.server_key, identity))
        notices: tuple[str, ...] = ()
        if "alert-fail" in flags:
            failed = alerts.Notice(alerts.LOGIN_FAILED, account, fp, identity.type, where.network)
            notices = self.notify(failed)
        return Decision(False, "bad_password", fp, notices)
