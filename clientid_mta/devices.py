"""The device policy: may this device use this account? (DESIGN.md, "Device policy").

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clientid_mta import alerts
from clientid_mta.clientid import ClientIdentity, device_key, fingerprint
from clientid_mta.config import ClientIdConfig
from clientid_mta.store import PENDING, TRUSTED, IDeviceStore

ENFORCING = ("tofu", "allowlist")

# Internal reason codes: logged for the operator, never sent to the client.
ALLOWED_KNOWN_DEVICE = "known_device"
ALLOWED_FIRST_DEVICE = "first_device_trusted"
ALLOWED_OBSERVED = "observed"
ALLOWED_WITHOUT_CLIENTID = "no_clientid_allowed"
ALLOWED_POLICY_OFF = "policy_off"
REFUSED_WITHOUT_CLIENTID = "no_clientid_refused"
REFUSED_NEW_DEVICE = "new_device_pending"
REFUSED_PENDING = "device_pending"
REFUSED_REVOKED = "device_revoked"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    fingerprint: str | None = None
    notices: tuple[str, ...] = field(default=())


class DevicePolicy:
    def __init__(
        self,
        settings: ClientIdConfig,
        store: IDeviceStore,
        server_key: bytes,
        notifier: alerts.Notifier | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.server_key = server_key
        self.notifier = notifier

    def _presented(
        self, identity: ClientIdentity | None
    ) -> tuple[ClientIdentity | None, frozenset[str]]:
        if identity is None or not self.settings.advertised:
            return None, frozenset()
        flags = self.settings.flags_for(identity.type)
        if "ignore" in flags or "debug" in flags:
            return None, flags
        return identity, flags

    def _notify(
        self, kind: str, account: str, fp: str, identity: ClientIdentity, network: str
    ) -> tuple[str, ...]:
        if self.notifier is None:
            return ()
        try:
            sent = self.notifier.notify(kind, account, fp, identity.type, network)
        except (OSError, ValueError):
            # A notice is a courtesy: a full or broken mailbox must not change the decision.
            return (f"{kind}-undeliverable",)
        return (kind,) if sent else ()

    def decide(self, account: str, identity: ClientIdentity | None, network: str) -> Decision:
        """The password was right; decide on device grounds. Blocking."""
        mode = self.settings.policy
        if mode == "off":
            return Decision(True, ALLOWED_POLICY_OFF)
        identity, flags = self._presented(identity)
        recorded = identity is not None and ("userlog" in flags or "auth" in flags)
        enforced = identity is not None and "auth" in flags and mode in ENFORCING
        if not enforced and mode in ENFORCING and not self.settings.allow_without_clientid:
            decision = Decision(False, REFUSED_WITHOUT_CLIENTID)
        elif identity is None or (not recorded and not enforced):
            decision = Decision(True, ALLOWED_WITHOUT_CLIENTID)
        else:
            return self._decide_device(account, identity, flags, network, enforced)
        return decision

    def _decide_device(
        self,
        account: str,
        identity: ClientIdentity,
        flags: frozenset[str],
        network: str,
        enforced: bool,
    ) -> Decision:
        key = device_key(self.server_key, identity)
        fp = fingerprint(key)
        existing = self.store.get(account, key)
        if existing is None:
            first = self.settings.policy != "allowlist" and not self.store.ever_trusted(account)
            state = TRUSTED if first else PENDING
        else:
            state = existing.state
        self.store.record(account, key, identity.type, state, network)

        notices: tuple[str, ...] = ()
        if existing is None and state == TRUSTED:
            reason, allowed = ALLOWED_FIRST_DEVICE, True
            notices += self._notify(alerts.NEW_DEVICE_TRUSTED, account, fp, identity, network)
        elif existing is None:
            reason, allowed = REFUSED_NEW_DEVICE, not enforced
            kind = alerts.NEW_DEVICE_PENDING if enforced else alerts.NEW_DEVICE_SEEN
            notices += self._notify(kind, account, fp, identity, network)
        elif state == TRUSTED:
            reason, allowed = ALLOWED_KNOWN_DEVICE, True
        else:
            reason = REFUSED_PENDING if state == PENDING else REFUSED_REVOKED
            allowed = not enforced
        if allowed and not enforced and reason != ALLOWED_FIRST_DEVICE:
            reason = ALLOWED_OBSERVED
        if allowed:
            self.store.login(account, key, network)
            if "alert-success" in flags:
                notices += self._notify(alerts.LOGIN_SUCCEEDED, account, fp, identity, network)
        elif "alert-fail" in flags:
            notices += self._notify(alerts.LOGIN_FAILED, account, fp, identity, network)
        return Decision(allowed, reason, fp, notices)

    def password_failed(
        self, account: str, identity: ClientIdentity | None, network: str
    ) -> Decision:
        """A wrong password for an existing account: only the ``alert-fail`` notice. Blocking."""
        identity, flags = self._presented(identity)
        if identity is None:
            return Decision(False, "bad_password")
        fp = fingerprint(device_key(self.server_key, identity))
        notices: tuple[str, ...] = ()
        if "alert-fail" in flags:
            notices = self._notify(alerts.LOGIN_FAILED, account, fp, identity, network)
        return Decision(False, "bad_password", fp, notices)
