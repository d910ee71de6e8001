"""The Cred realm and the portal: an authenticated account gets its ``IMessageDelivery``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred import portal
from twisted.mail.interfaces import IMessageDelivery
from zope.interface import implementer

from clientid_mta.auth.cache import AuthCache
from clientid_mta.auth.checker import ClientIdChecker, Defences, PasswordService
from clientid_mta.auth.passwd_file import PasswdFile
from clientid_mta.config import AuthConfig
from clientid_mta.devices.policy import Decision, DevicePolicy


@implementer(portal.IRealm)
class SubmissionRealm:
    """Gives each authenticated account its ``IMessageDelivery``."""

    def __init__(self, delivery_for: Callable[[str, bool], IMessageDelivery]) -> None:
        self.delivery_for = delivery_for

    def requestAvatar(
        self, avatarId: Any, mind: Any, *interfaces: Any
    ) -> tuple[Any, Any, Callable[[], None]]:
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("clientid-mta only provides IMessageDelivery")
        account = avatarId.decode() if isinstance(avatarId, bytes) else str(avatarId)
        # The mind is the credentials: the checker left its Decision there.
        verdicts = getattr(mind, "verdict", None) or [Decision(True, "")]
        trusted_device = bool(verdicts[-1].device_trusted)
        return IMessageDelivery, self.delivery_for(account, trusted_device), lambda: None


def build_portal(
    passwords: PasswdFile,
    policy: DevicePolicy,
    delivery_for: Callable[[str, bool], IMessageDelivery],
    defences: Defences | None = None,
    auth: AuthConfig | None = None,
    service: PasswordService | None = None,
) -> portal.Portal:
    """The one place the portal is assembled; embedders reuse it.

    ``auth`` sizes the authentication cache (``cache_ttl``, ``cache_size``); without
    it there is no cache and every login is hashed. With a password ``service``
    (Dovecot) there is no cache either: Dovecot keeps its own (``auth_cache_size``), and
    ours could not see a password changed there.
    """
    cache = (
        AuthCache(auth.cache_ttl, auth.cache_size) if auth is not None and service is None else None
    )
    checker = ClientIdChecker(passwords, policy, defences, cache, service)
    return portal.Portal(SubmissionRealm(delivery_for), [checker])
