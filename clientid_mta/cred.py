"""twisted.cred pieces: the credentials, the checker, the realm, and the portal.

The credentials interface deliberately does NOT extend ``IUsernamePassword``: a
password-only checker registered in the same portal can then never be chosen for
these credentials, so the device policy cannot be bypassed by configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred import error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.internet import defer, threads
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageDelivery
from zope.interface import Attribute, implementer

from clientid_mta.clientid import ClientIdentity
from clientid_mta.devices import Decision, DevicePolicy
from clientid_mta.network import network_prefix
from clientid_mta.passwords import PasswdFile, normalise_address, verify_password

log = Logger()


class IClientIdUsernamePassword(ICredentials):
    """A SASL user name and password, plus what the session knows about the client."""

    username = Attribute("The authentication identity as typed (str).")
    password = Attribute("The password (str). Never logged.")
    clientId = Attribute("The session's ClientIdentity, or None when none was presented.")
    peer = Attribute("The client's IAddress.")
    tls = Attribute("TLSInfo of the connection, or None on plaintext.")


@dataclass(frozen=True)
class TLSInfo:
    version: str
    cipher: str


@implementer(IClientIdUsernamePassword)
@dataclass(frozen=True)
class ClientIdUsernamePassword:
    username: str
    password: str = field(repr=False)
    clientId: ClientIdentity | None = field(repr=False)
    peer: IAddress | None = None
    tls: TLSInfo | None = None


def peer_host(peer: IAddress | None) -> str:
    return str(getattr(peer, "host", "unknown"))


@dataclass(frozen=True)
class AuthOutcome:
    """What the blocking half of a check found; logged on the reactor thread."""

    account: str | None
    password_ok: bool
    decision: Decision


@implementer(ICredentialsChecker)
class ClientIdChecker:
    """Password hash AND device policy; any refusal is one ``UnauthorizedLogin``.

    The whole check (hash verification, store look-up, notices) runs in a thread,
    never on the reactor.
    """

    credentialInterfaces = (IClientIdUsernamePassword,)

    def __init__(self, passwords: PasswdFile, policy: DevicePolicy) -> None:
        self.passwords = passwords
        self.policy = policy

    def _check(self, creds: IClientIdUsernamePassword) -> AuthOutcome:
        address = normalise_address(creds.username)
        account = self.passwords.get(address)
        network = network_prefix(peer_host(creds.peer))
        ok = verify_password(account.password_hash if account else None, creds.password)
        if account is None:
            return AuthOutcome(None, False, Decision(False, "unknown_account"))
        if not ok:
            return AuthOutcome(
                address, False, self.policy.password_failed(address, creds.clientId, network)
            )
        return AuthOutcome(address, True, self.policy.decide(address, creds.clientId, network))

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        creds = IClientIdUsernamePassword(credentials)
        checked = threads.deferToThread(self._check, creds)
        return checked.addCallback(self._conclude, creds)

    def _conclude(self, outcome: AuthOutcome, creds: IClientIdUsernamePassword) -> bytes:
        decision = outcome.decision
        log.info(
            "auth {outcome} account={account} device={fingerprint} network={network} "
            "reason={reason}",
            outcome="accepted" if decision.allowed and outcome.password_ok else "refused",
            account=outcome.account or "(unknown)",
            fingerprint=decision.fingerprint or "-",
            network=network_prefix(peer_host(creds.peer)),
            reason=decision.reason,
            notices=list(decision.notices),
        )
        if outcome.account is None or not outcome.password_ok or not decision.allowed:
            raise error.UnauthorizedLogin()
        return outcome.account.encode("utf-8")


@implementer(portal.IRealm)
class SubmissionRealm:
    """Gives each authenticated account its ``IMessageDelivery``."""

    def __init__(self, delivery_for: Callable[[str], IMessageDelivery]) -> None:
        self.delivery_for = delivery_for

    def requestAvatar(
        self, avatarId: Any, mind: Any, *interfaces: Any
    ) -> tuple[Any, Any, Callable[[], None]]:
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("clientid-mta only provides IMessageDelivery")
        account = avatarId.decode() if isinstance(avatarId, bytes) else str(avatarId)
        return IMessageDelivery, self.delivery_for(account), lambda: None


def build_portal(
    passwords: PasswdFile,
    policy: DevicePolicy,
    delivery_for: Callable[[str], IMessageDelivery],
) -> portal.Portal:
    """The one place the portal is assembled; embedders reuse it."""
    return portal.Portal(SubmissionRealm(delivery_for), [ClientIdChecker(passwords, policy)])
