"""A bounded parser for the address lists of From:, Sender: and Resent-From: fields.

``email.utils.getaddresses`` recurses once per nested comment, so a client can make it
raise ``RecursionError`` on the reactor with a field of a few thousand ``(``. This parser
is iterative and linear in the length of the field: one pass to cut the field into
tokens (comments skipped, their nesting depth capped), one pass over the tokens for
the RFC 5322 address-list grammar (display names, angle addresses with an obsolete
route, groups, quoted local parts, domain literals). Anything it cannot read raises
``HeaderSyntaxError``, which the protocol answers with 550 5.6.0.
"""

from __future__ import annotations

import re

# Deeper than any mail program writes, far shallower than the stdlib's recursion limit.
MAX_COMMENT_DEPTH = 16

_SPECIALS = frozenset('()<>[]:;@\\,."')
_WHITESPACE = frozenset(" \t\r\n")
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")

# Token kinds
_ATOM = "atom"
_QUOTED = "quoted"
_LITERAL = "literal"
_SPECIAL = "special"

Token = tuple[str, str]


class HeaderSyntaxError(ValueError):
    """The field is not an address list we can read (malformed, or nested too deep)."""


def _skip_comment(text: str, pos: int) -> int:
    """``text[pos]`` is ``(``: the index just after the matching ``)``."""
    depth = 0
    end = len(text)
    while pos < end:
        char = text[pos]
        if char == "\\":
            pos += 2
            continue
        if char == "(":
            depth += 1
            if depth > MAX_COMMENT_DEPTH:
                raise HeaderSyntaxError("comments nested too deep")
        elif char == ")":
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    raise HeaderSyntaxError("unterminated comment")


def _delimited(text: str, pos: int, close: str, what: str) -> tuple[str, int]:
    """A quoted string or domain literal from ``text[pos]`` (its opening character):
    its content with quoted pairs undone, and the index after the closing character."""
    content: list[str] = []
    pos += 1
    end = len(text)
    while pos < end:
        char = text[pos]
        if char == "\\" and pos + 1 < end:
            content.append(text[pos + 1])
            pos += 2
            continue
        if char == close:
            return "".join(content), pos + 1
        content.append(char)
        pos += 1
    raise HeaderSyntaxError(f"unterminated {what}")


def tokenize(text: str) -> list[Token]:
    """Atoms, quoted strings, domain literals and special characters; comments and
    white space dropped."""
    tokens: list[Token] = []
    pos = 0
    end = len(text)
    while pos < end:
        char = text[pos]
        if char in _WHITESPACE:
            pos += 1
        elif char == "(":
            pos = _skip_comment(text, pos)
        elif char == '"':
            content, pos = _delimited(text, pos, '"', "quoted string")
            tokens.append((_QUOTED, content))
        elif char == "[":
            content, pos = _delimited(text, pos, "]", "domain literal")
            tokens.append((_LITERAL, content))
        elif char in (")", "]", "\\"):
            raise HeaderSyntaxError(f"unexpected {char!r}")
        elif char in _SPECIALS:
            tokens.append((_SPECIAL, char))
            pos += 1
        else:
            start = pos
            while pos < end and text[pos] not in _SPECIALS and text[pos] not in _WHITESPACE:
                pos += 1
            tokens.append((_ATOM, text[start:pos]))
    return tokens


def _dotted(words: list[Token], kinds: tuple[str, ...], what: str) -> list[str]:
    """The values of ``word *("." word)``, each word of one of ``kinds``."""
    values: list[str] = []
    for index, (kind, value) in enumerate(words):
        if index % 2 == 0 and kind in kinds:
            values.append(value)
        elif index % 2 == 0 or (kind, value) != (_SPECIAL, "."):
            raise HeaderSyntaxError(f"malformed {what}")
    if not values or len(words) % 2 == 0:
        raise HeaderSyntaxError(f"malformed {what}")
    return values


def _local_part(words: list[Token]) -> str:
    """The local part as one string, quoted only where a dot-atom cannot say it."""
    local = ".".join(_dotted(words, (_ATOM, _QUOTED), "local part"))
    if _DOT_ATOM.match(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _domain(words: list[Token]) -> str:
    if len(words) == 1 and words[0][0] == _LITERAL:
        return f"[{words[0][1]}]"
    return ".".join(_dotted(words, (_ATOM,), "domain"))


def _addr_spec(tokens: list[Token]) -> str:
    """local-part "@" domain, lower-cased (accounts and send-as lists are lower case)."""
    at = [index for index, token in enumerate(tokens) if token == (_SPECIAL, "@")]
    if len(at) != 1:
        raise HeaderSyntaxError("expected one @ in the address")
    return f"{_local_part(tokens[: at[0]])}@{_domain(tokens[at[0] + 1 :])}".lower()


def _angle_addr(tokens: list[Token]) -> str:
    """The inside of ``<...>``, with an obsolete source route (``@a,@b:``) dropped."""
    if tokens and tokens[0] == (_SPECIAL, "@"):
        colon = next((i for i, t in enumerate(tokens) if t == (_SPECIAL, ":")), -1)
        if colon < 0:
            raise HeaderSyntaxError("malformed route")
        tokens = tokens[colon + 1 :]
    return _addr_spec(tokens)


def _is_display_name(phrase: list[Token]) -> bool:
    """Words and dots only (obs-phrase). An unquoted '@' or a [literal] there (``bob@x
    <alice@y>``) is not RFC 5322, and readers then show or take an address we did not
    check."""
    return all(kind in (_ATOM, _QUOTED) or value == "." for kind, value in phrase)


_STOPS = frozenset({(_SPECIAL, "<"), (_SPECIAL, ":"), (_SPECIAL, ","), (_SPECIAL, ";")})


def parse_address_list(text: str) -> list[str]:
    """The addresses of an RFC 5322 address list (group members included), in order.

    Raises ``HeaderSyntaxError`` for anything else. Linear time, no recursion.
    """
    tokens = tokenize(text)
    addresses: list[str] = []
    in_group = False
    pos = 0
    count = len(tokens)
    while pos < count:
        token = tokens[pos]
        if token == (_SPECIAL, ","):  # empty list elements are allowed (obs-addr-list)
            pos += 1
            continue
        if token == (_SPECIAL, ";"):
            if not in_group:
                raise HeaderSyntaxError("';' outside a group")
            in_group = False
            pos += 1
            continue
        start = pos
        while pos < count and tokens[pos] not in _STOPS:
            if tokens[pos] == (_SPECIAL, ">"):
                raise HeaderSyntaxError("'>' without '<'")
            pos += 1
        phrase = tokens[start:pos]
        stop = tokens[pos] if pos < count else None
        if stop == (_SPECIAL, ":"):  # display-name ":" starts a group
            if in_group or not phrase or not _is_display_name(phrase):
                raise HeaderSyntaxError("malformed group")
            in_group = True
            pos += 1
            continue
        if stop == (_SPECIAL, "<"):
            if not _is_display_name(phrase):
                raise HeaderSyntaxError("malformed display name")
            close = pos + 1
            while close < count and tokens[close] != (_SPECIAL, ">"):
                if tokens[close] == (_SPECIAL, "<"):
                    raise HeaderSyntaxError("'<' inside an angle address")
                close += 1
            if close == count:
                raise HeaderSyntaxError("'<' without '>'")
            addresses.append(_angle_addr(tokens[pos + 1 : close]))
            pos = close + 1
            if pos < count and tokens[pos] not in ((_SPECIAL, ","), (_SPECIAL, ";")):
                raise HeaderSyntaxError("text after an angle address")
            continue
        addresses.append(_addr_spec(phrase))
    if in_group:
        raise HeaderSyntaxError("group without its ';'")
    return addresses
