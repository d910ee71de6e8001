"""Decoding SASL PLAIN and LOGIN responses (RFC 4616, RFC 4954).

Pure functions: every malformed input raises ``SaslError`` with the reply text, and
nothing else, so the protocol can always answer (docs/conformance.md, S4).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

MAX_FIELD = 1024  # user names and passwords longer than this are not credentials


class SaslError(ValueError):
    """Malformed SASL input; str() is the text of the 501 reply."""


def decode_response(data: bytes) -> bytes:
    """A base64 client response; ``=`` is the empty response."""
    data = data.strip()
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("5.5.2 Cannot decode response") from None


def decode_text(data: bytes) -> str:
    """A user name or password: non-empty UTF-8 without NUL, of sane length."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("5.5.2 Malformed authentication response") from None
    if not text or "\0" in text or len(text) > MAX_FIELD:
        raise SaslError("5.5.2 Malformed authentication response")
    return text


def decode_username(data: bytes) -> str:
    """A user name: like ``decode_text``, and no control or line-breaking characters.

    It ends up in logs and the audit listing, so nothing in it may start a new line.
    """
    text = decode_text(data)
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in text):
        raise SaslError("5.5.2 Malformed authentication response")
    return text


@dataclass(frozen=True)
class PlainCredentials:
    username: str
    password: str = field(repr=False)
    acting_for_other: bool = False  # an authorization identity other than the user's


def parse_plain(response: bytes) -> PlainCredentials:
    """``[authzid] NUL authcid NUL passwd``, from the base64 response."""
    fields = decode_response(response).split(b"\0")
    if len(fields) != 3:
        raise SaslError("5.5.2 Malformed PLAIN response")
    authzid, authcid, password = fields
    username = decode_username(authcid)
    secret = decode_text(password)
    return PlainCredentials(username, secret, bool(authzid) and authzid != authcid)
