"""The credentials one AUTH produces, and the refusals the protocol tells apart.

The credentials interface deliberately does NOT extend ``IUsernamePassword``: a
password-only checker registered in the same portal can then never be chosen for
these credentials, so the device policy cannot be bypassed by configuration.
Imported by the wire (``smtp.protocol``), so it imports no storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.cred import error
from twisted.cred.credentials import ICredentials
from twisted.internet.interfaces import IAddress
from zope.interface import Attribute, implementer

from clientid_mta.smtp.clientid import ClientIdentity


class IClientIdUsernamePassword(ICredentials):
    """A SASL user name and password, plus what the session knows about the client."""

    username = Attribute("The authentication identity as typed (str).")
    password = Attribute("The password (str). Never logged.")
    clientId = Attribute("The session's ClientIdentity, or None when none was presented.")
    peer = Attribute("The client's IAddress.")
    tls = Attribute("TLSInfo of the connection, or None on plaintext.")
    local = Attribute("Our end of the connection, an IAddress, or None.")


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
    local: IAddress | None = None  # our end of the connection (Dovecot's lip/lport)
    # The checker appends its Decision here; the realm reads it (passed as the mind).
    verdict: list[Any] = field(default_factory=list, compare=False, repr=False)


def peer_host(peer: IAddress | None) -> str:
    return str(getattr(peer, "host", "unknown"))


class LoginThrottled(error.UnauthorizedLogin):
    """Refused before any password check because a failure budget is spent (454/421)."""


class AuthUnavailable(Exception):
    """The state a decision needs cannot be read now (store locked, disk): 454, try later."""
