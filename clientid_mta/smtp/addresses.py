"""Parse the arguments of MAIL FROM and RCPT TO (RFC 5321 section 4.1.2).

Strict where it matters (no 8-bit, no spaces or angle brackets inside the path,
length limits) and lenient where clients differ (a space after the colon, a
missing pair of angle brackets, source routes, which are dropped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_MAILBOX_RE = re.compile(rf"(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})\Z")
_ROUTE_RE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_PARAM_RE = re.compile(r"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?\Z")

MAX_PATH = 256
MAX_LOCAL = 64


class AddressSyntaxError(ValueError):
    """The command's address or parameters are malformed (reply 501 / 553)."""


@dataclass(frozen=True)
class Path:
    """A reverse- or forward-path: the address ('' for the null path) and ESMTP parameters."""

    address: str
    params: dict[str, str | None]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    @property
    def localpart(self) -> str:
        return self.address.rpartition("@")[0]


def _split_path(text: str) -> tuple[str, str]:
    text = text.lstrip(" ")
    if text.startswith("<"):
        end = text.find(">")
        if end < 0:
            raise AddressSyntaxError("missing '>' after the address")
        return text[1:end], text[end + 1 :]
    path, _, rest = text.partition(" ")
    return path, " " + rest if rest else ""


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    if text and not text.startswith(" "):
        raise AddressSyntaxError("parameters must follow the address after a space")
    for word in text.split():
        match = _PARAM_RE.match(word)
        if not match:
            raise AddressSyntaxError(f"malformed parameter {word[:40]!r}")
        params[match["key"].upper()] = match["value"]
    return params


def parse_path(arguments: bytes, keyword: str, allow_null: bool) -> Path:
    """Parse ``FROM:<addr> params`` (keyword "FROM") or ``TO:<addr> params`` ("TO")."""
    try:
        text = arguments.decode("ascii")
    except UnicodeDecodeError:
        raise AddressSyntaxError("8-bit characters are not allowed in addresses") from None
    if not text[: len(keyword) + 1].upper() == keyword + ":":
        raise AddressSyntaxError(f"expected {keyword}:<address>")
    raw, rest = _split_path(text[len(keyword) + 1 :])
    route = _ROUTE_RE.match(raw)
    if route:
        raw = raw[route.end() :]
    params = _parse_params(rest.rstrip(" "))
    if raw == "":
        if not allow_null:
            raise AddressSyntaxError("an empty address is not allowed here")
        return Path("", params)
    if len(raw) > MAX_PATH:
        raise AddressSyntaxError("address too long")
    match = _MAILBOX_RE.match(raw)
    if not match or len(match["local"]) > MAX_LOCAL:
        raise AddressSyntaxError(f"malformed address <{raw[:80]}>")
    return Path(f"{match['local']}@{match['domain'].lower()}", params)
