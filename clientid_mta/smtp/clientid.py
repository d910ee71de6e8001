"""The CLIENTID command: its grammar (draft section 5), the identity value, and the keyed hash.

The token is a secret (docs/conformance.md, C14). ``ClientIdentity`` never shows it in repr
or str, and everything that persists or logs uses ``device_key``/``fingerprint``:
HMAC-SHA256(server key, TYPE ":" token), never the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field

_TYPE_RE = re.compile(rb"[A-Za-z0-9-]{1,16}\Z")
_TOKEN_RE = re.compile(rb"[\x21-\x7e]{1,128}\Z")

FINGERPRINT_HEX = 16


class ClientIdSyntaxError(ValueError):
    """The CLIENTID arguments do not match the draft's grammar (reply 501, C5)."""


@dataclass(frozen=True)
class ClientIdentity:
    """A client identity as presented: type upper-cased, token normalised (C13)."""

    type: str
    token: str = field(repr=False)

    def __str__(self) -> str:
        return f"ClientIdentity(type={self.type})"


def parse_clientid(arguments: bytes) -> ClientIdentity:
    """Parse what follows the verb: exactly ``type SP token`` (C5).

    Any run of spaces separates arguments (clients differ); tabs and control bytes
    are not separators, so they end up inside an argument and fail its grammar.
    """
    parts = [p for p in arguments.split(b" ") if p]
    if len(parts) != 2:
        raise ClientIdSyntaxError("CLIENTID takes exactly two arguments: type and token")
    raw_type, raw_token = parts
    if not _TYPE_RE.match(raw_type):
        raise ClientIdSyntaxError("client-id-type must be 1-16 letters, digits or dashes")
    if not _TOKEN_RE.match(raw_token):
        raise ClientIdSyntaxError("client-id-token must be 1-128 printable ASCII characters")
    client_type = raw_type.decode("ascii").upper()
    token = raw_token.decode("ascii")
    if client_type.endswith("UUID"):
        token = token.lower()
    return ClientIdentity(client_type, token)


def device_key(server_key: bytes, identity: ClientIdentity) -> str:
    """The only form of a token that is ever stored: hex HMAC-SHA256 of TYPE:token."""
    message = f"{identity.type}:{identity.token}".encode("ascii")
    return hmac.new(server_key, message, hashlib.sha256).hexdigest()


def fingerprint(key: str) -> str:
    """The short form of a device key that operators see and type."""
    return key[:FINGERPRINT_HEX]
