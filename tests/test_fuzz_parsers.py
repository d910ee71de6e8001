"""Issue 6, point 2: the pure parsers under Hypothesis and random bytes.

Each parser may raise only its own documented error, whatever it is fed:
``parse_clientid`` -> ClientIdSyntaxError, the SASL decoders -> SaslError, ``parse_path``
-> AddressSyntaxError, ``load_config`` -> ConfigError. Where it is cheap, the tests go
beyond "no crash" and compare with a reference written here from the standard (the
draft's ABNF, RFC 4616, RFC 4648, RFC 5321): valid inputs must parse to the right value,
invalid ones must be refused, and ``BodyReader`` must frame a DATA block exactly like a
reference reader for every way TCP may cut the stream into chunks.

A longer run: ``FUZZ_EXAMPLES=5000 ./run-tests tests/test_fuzz_parsers.py``.
"""

from __future__ import annotations

import base64
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clientid_mta.config import SCHEMA, TYPE_FLAGS, Config, ConfigError, load_config
from clientid_mta.smtp.addresses import AddressSyntaxError, parse_path
from clientid_mta.smtp.body import BodyReader
from clientid_mta.smtp.clientid import ClientIdSyntaxError, parse_clientid
from clientid_mta.smtp.sasl import (
    MAX_FIELD,
    SaslError,
    decode_response,
    decode_text,
    decode_username,
    parse_plain,
)

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

pytestmark = pytest.mark.timeout(300 + FUZZ_EXAMPLES // 10)  # long campaigns outlive 300 s

# --- CLIENTID (C5, C13): the ABNF of draft section 5 ---------------------------------------

TYPE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"
VCHARS = "".join(chr(c) for c in range(0x21, 0x7F))
# client-id-type SP client-id-token; the server also takes a run of spaces as the
# separator (clients differ), and the command parser has already trimmed the ends.
CLIENTID_GRAMMAR = re.compile(rb" *([A-Za-z0-9-]{1,16}) +([\x21-\x7e]{1,128}) *")

client_types = st.text(TYPE_CHARS, min_size=1, max_size=16)
client_tokens = st.text(VCHARS, min_size=1, max_size=128)
# Bytes that are likely to sit near the grammar's edges: separators, controls, 8-bit.
edge_bytes = st.sampled_from([b" ", b"\t", b"\x00", b"\x7f", b"\x80", b"\xff", b"_", b"\r"])
clientid_noise = st.lists(
    st.one_of(edge_bytes, client_types.map(str.encode), client_tokens.map(str.encode)),
    max_size=5,
).map(b"".join)


def expected_identity(raw_type: bytes, raw_token: bytes) -> tuple[str, str]:
    """C13: the type upper-cased; the token lower-cased only for a type ending in UUID."""
    client_type = raw_type.decode().upper()
    token = raw_token.decode()
    return client_type, token.lower() if client_type.endswith("UUID") else token


@FUZZ
@given(client_types, client_tokens, st.integers(1, 3))
def test_C5_C13_parse_clientid_accepts_every_type_and_token_of_the_grammar(
    client_type: str, token: str, spaces: int
) -> None:
    identity = parse_clientid(f"{client_type}{' ' * spaces}{token}".encode())
    assert (identity.type, identity.token) == expected_identity(
        client_type.encode(), token.encode()
    )


@FUZZ
@given(st.one_of(clientid_noise, st.binary(max_size=300)))
def test_C5_parse_clientid_accepts_exactly_the_grammar(arguments: bytes) -> None:
    match = CLIENTID_GRAMMAR.fullmatch(arguments)
    try:
        identity = parse_clientid(arguments)
    except ClientIdSyntaxError:
        assert match is None, arguments
    else:
        assert match is not None, arguments
        assert (identity.type, identity.token) == expected_identity(match[1], match[2])


def _break_type(client_type: str, token: str, how: int) -> str:
    bad = ["_", "\t", "é", ".", "\x00", "+"][how % 6]
    return f"{client_type[:15]}{bad} {token}" if how < 6 else f"{'A' * 17} {token}"


def _break_token(client_type: str, token: str, how: int) -> str:
    bad = ["\x7f", "\x00", "é", "\x1b", "\t"][how % 5]
    return f"{client_type} {token[:127]}{bad}" if how < 5 else f"{client_type} {'t' * 129}"


def _break_count(client_type: str, token: str, how: int) -> str:
    return [client_type, f"{client_type} {token} {token}", "", " ", token + " x y"][how % 5]


@FUZZ
@given(
    client_types,
    client_tokens,
    st.sampled_from([_break_type, _break_token, _break_count]),
    st.integers(0, 6),
)
def test_C5_parse_clientid_rejects_every_malformed_shape(
    client_type: str, token: str, breaker: Any, how: int
) -> None:
    arguments = breaker(client_type, token, how).encode()
    try:
        parse_clientid(arguments)
    except ClientIdSyntaxError:
        return
    raise AssertionError(f"accepted malformed CLIENTID arguments {arguments!r}")


# --- SASL (S4): RFC 4648 base64, RFC 4616 PLAIN, LOGIN ------------------------------------


def sane_text(text: str) -> bool:
    """What a password must be: non-empty, no NUL, at most MAX_FIELD characters."""
    return bool(text) and "\0" not in text and len(text) <= MAX_FIELD


def sane_name(text: str) -> bool:
    """A user name also may not hold what could start a new log line (C0, DEL, C1, LS, PS)."""
    breaking = any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in text)
    return sane_text(text) and not breaking


sasl_texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "alice@example.org", "x" * MAX_FIELD, "x" * (MAX_FIELD + 1), "é"]),
    st.sampled_from(["a\r\nb", "a\x85b", "a\u2028b", "a\u2029", "\x1b[0m", "\x7f", "\x9f"]),
)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([b"", b" ", b"\t", b"\r\n"]))
def test_S4_decode_response_returns_what_was_base64_encoded(data: bytes, space: bytes) -> None:
    assert decode_response(space + base64.b64encode(data) + space) == data
    assert decode_response(b"=") == b""


@FUZZ
@given(st.binary(max_size=2000))
def test_S4_sasl_decoders_raise_only_sasl_error_on_random_bytes(data: bytes) -> None:
    for decoder in (decode_response, decode_text, decode_username, parse_plain):
        try:
            decoder(data)
        except SaslError as error:
            assert str(error).startswith("5."), error  # the text of the 501 reply


@FUZZ
@given(
    st.one_of(sasl_texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary()),
    st.sampled_from([(decode_text, sane_text), (decode_username, sane_name)]),
)
def test_S4_decode_text_and_username_accept_exactly_sane_utf8(data: bytes, pair: Any) -> None:
    decoder, sane = pair
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and sane(text):
        assert decoder(data) == text
        return
    try:
        decoder(data)
    except SaslError:
        return
    raise AssertionError(f"{decoder.__name__} accepted {data!r}")


@FUZZ
@given(sasl_texts, sasl_texts, sasl_texts)
def test_S4_parse_plain_returns_the_fields_and_flags_another_identity(
    authzid: str, authcid: str, password: str
) -> None:
    message = "\0".join([authzid, authcid, password]).encode()
    response = base64.b64encode(message)
    if message.count(b"\0") != 2 or not (sane_name(authcid) and sane_text(password)):
        try:
            parse_plain(response)
        except SaslError:
            return
        raise AssertionError(f"accepted PLAIN {message!r}")
    plain = parse_plain(response)
    assert (plain.username, plain.password) == (authcid, password)
    assert plain.acting_for_other == (authzid not in ("", authcid))


# --- MAIL FROM / RCPT TO paths (S6): RFC 5321 4.1.2 ---------------------------------------

ATEXT = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~-"
LETTERS_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

atoms = st.text(ATEXT, min_size=1, max_size=10)
dot_strings = st.lists(atoms, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
# Quoted local parts, without the angle brackets the parser documents it refuses inside a path.
quoted_locals = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\<>'),
    max_size=20,
).map(lambda s: f'"{s}"')
labels = st.one_of(
    st.text(LETTERS_DIGITS, min_size=1, max_size=1),
    st.builds(
        lambda a, mid, b: a + mid + b,
        st.text(LETTERS_DIGITS, min_size=1, max_size=1),
        st.text(LETTERS_DIGITS + "-", max_size=20),
        st.text(LETTERS_DIGITS, min_size=1, max_size=1),
    ),
)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
mailboxes = st.tuples(st.one_of(dot_strings, quoted_locals), domains).filter(
    lambda pair: len(pair[0]) + 1 + len(pair[1]) <= 256
)
param_keys = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9-]{0,10}\Z")
param_values = st.none() | st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="="),
    min_size=1,
    max_size=12,
)
params = st.dictionaries(param_keys, param_values, max_size=3).map(
    lambda d: {k.upper(): v for k, v in d.items()}
)


def render_params(values: dict[str, str | None]) -> str:
    return "".join(f" {k}" + ("" if v is None else f"={v}") for k, v in values.items())


@FUZZ
@given(
    mailboxes,
    params,
    st.sampled_from(["FROM", "TO"]),
    st.sampled_from(["{kw}:<{addr}>", "{kw}: <{addr}>", "{kw_lower}:<{addr}>", "{kw}:{addr}"]),
    st.booleans(),
)
def test_S6_parse_path_accepts_every_generated_mailbox(
    mailbox: tuple[str, str], values: dict[str, str | None], keyword: str, form: str, route: bool
) -> None:
    local, domain = mailbox
    address = f"{local}@{domain}"
    if route and "<" in form:
        address = f"@relay.example,@other.example:{address}"  # a source route is dropped
    if " " in local and "<" not in form:
        form = "{kw}:<{addr}>"  # a quoted space needs the brackets
    text = form.format(kw=keyword, kw_lower=keyword.lower(), addr=address) + render_params(values)
    path = parse_path(text.encode(), keyword, allow_null=False)
    assert path.address == f"{local}@{domain.lower()}"
    assert path.params == values


@FUZZ
@given(params)
def test_S6_parse_path_accepts_the_null_path_only_where_allowed(
    values: dict[str, str | None],
) -> None:
    arguments = ("FROM:<>" + render_params(values)).encode()
    path = parse_path(arguments, "FROM", allow_null=True)
    assert (path.address, path.params) == ("", values)
    try:
        parse_path(arguments, "FROM", allow_null=False)
    except AddressSyntaxError:
        return
    raise AssertionError("an empty address was accepted where it is not allowed")


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda head, tail: head + tail,
            st.sampled_from([b"FROM:<", b"TO:<", b"FROM:", b"to: <", b"FROM:<@"]),
            st.binary(max_size=300),
        ),
    ),
    st.sampled_from(["FROM", "TO"]),
    st.booleans(),
)
def test_S6_parse_path_raises_only_address_syntax_error(
    arguments: bytes, keyword: str, allow_null: bool
) -> None:
    try:
        path = parse_path(arguments, keyword, allow_null)
    except AddressSyntaxError:
        return
    assert all(b < 0x80 for b in arguments), "8-bit bytes were accepted in a path"
    assert path.address or allow_null


# --- DATA framing (S8, S10): BodyReader against a reference -------------------------------


@dataclass(frozen=True)
class Framed:
    end: int | None  # offset just after the terminating CRLF.CRLF, None if not reached
    lines: list[bytes]  # unstuffed lines a reader keeps (over-long lines left out)
    too_long: bool
    too_big: bool
    bare: bool


RFC5322_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:.*", re.S)


def reference_frame(stream: bytes, max_line: int, max_size: int) -> Framed:
    """RFC 5321 4.1.1.4 and 4.5.2: lines end at CRLF only; a line "." ends the data."""
    raw_lines: list[bytes] = []
    pos, end = 0, None
    while (idx := stream.find(b"\r\n", pos)) >= 0:
        raw, pos = stream[pos:idx], idx + 2
        if raw == b".":
            end = pos
            break
        raw_lines.append(raw)
    kept = [r[1:] if r.startswith(b".") else r for r in raw_lines if len(r) <= max_line]
    # An unfinished last line is already too long once it has more than max_line octets
    # besides a final CR (which may be the start of its CRLF).
    tail = stream[pos:].removesuffix(b"\r") if end is None else b""
    return Framed(
        end,
        kept,
        too_long=any(len(r) > max_line for r in [*raw_lines, tail]),
        too_big=sum(len(line) + 2 for line in kept) > max_size,
        bare=any(b"\r" in line or b"\n" in line for line in kept),
    )


stream_pieces = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"\r\n.", b".\r\n", b"a", b"bb", b"\xff", b"\x00", b": ", b"F:"]
)
streams = st.one_of(
    st.lists(stream_pieces, max_size=60).map(b"".join),
    st.lists(st.one_of(stream_pieces, st.binary(max_size=30)), max_size=20).map(b"".join),
    st.builds(
        lambda lines: b"".join(line + b"\r\n" for line in lines) + b".\r\n",
        st.lists(st.binary(max_size=24), max_size=8),
    ),
)


def feed_in_chunks(
    reader: BodyReader, stream: bytes, cuts: list[int], max_line: int
) -> tuple[int, bool]:
    """Feed ``stream`` cut at ``cuts`` the way the protocol does; (bytes consumed, ended)."""
    buffer = bytearray()
    consumed_total = 0
    bounds = sorted({c for c in cuts if 0 < c < len(stream)})
    for start, stop in zip([0, *bounds], [*bounds, len(stream)], strict=True):
        buffer += stream[start:stop]
        consumed, done = reader.feed(buffer)
        del buffer[:consumed]
        consumed_total += consumed
        if done:
            return consumed_total, True
        # S8: memory stays bounded. A reader must keep a whole line of max_line octets
        # and its CR (the LF may be in the next segment), and never more.
        assert len(buffer) <= max_line + 1, (len(buffer), max_line)
    return consumed_total, False


@FUZZ
@given(
    streams,
    st.lists(st.integers(0, 400), max_size=8),
    st.integers(1, 16),
    st.integers(1, 200),
    st.booleans(),
)
@example(stream=b"abcd\r\n.\r\n", cuts=[5], max_line=4, max_size=100, blocks=False)
@example(stream=b"abcde\r\n.\r\n", cuts=[6], max_line=4, max_size=100, blocks=False)
@example(stream=b"x\r\n.\r\nNOOP\r\n", cuts=[], max_line=4, max_size=100, blocks=False)
@example(stream=b"a:b\r\n\r\n..x\r\n.\r\n", cuts=[], max_line=4, max_size=100, blocks=True)
@example(stream=b"a:b\r\n\r\nxy\r\nabcdef\r\n.\r\n", cuts=[], max_line=4, max_size=99, blocks=True)
def test_S8_S10_body_reader_frames_like_the_reference_for_every_chunking(
    stream: bytes, cuts: list[int], max_line: int, max_size: int, blocks: bool
) -> None:
    """Both paths: line by line, and (``blocks``) whole runs of lines after the headers."""
    written: list[bytes] = []

    def write_block(data: bytes) -> None:
        written.extend(data.split(b"\n")[:-1])

    reader = BodyReader(written.append, max_size, max_line, write_block if blocks else None)
    consumed, ended = feed_in_chunks(reader, stream, cuts, max_line)
    ref = reference_frame(stream, max_line, max_size)
    # S10: the data ends at the first CRLF . CRLF and nowhere else; nothing after it is read.
    assert ended == (ref.end is not None), (stream, cuts)
    if ref.end is not None:
        assert consumed == ref.end
    # S8/S7/S10: each refusal reason is found whatever the chunking.
    assert (reader.line_too_long, reader.too_big, reader.bare_newline) == (
        ref.too_long,
        ref.too_big,
        ref.bare,
    ), (stream, cuts, max_line)
    if reader.failed:
        return
    if written[:1] == [b""] and ref.lines[:1] != [b""]:
        # A separator before a body without a header section; never before a header field.
        assert ref.lines and not RFC5322_FIELD.fullmatch(ref.lines[0]), ref.lines[:1]
        written = written[1:]
    elif ref.lines and ref.lines[0] and b":" not in ref.lines[0]:
        raise AssertionError(f"no separator before the header-less first line {ref.lines[0]!r}")
    assert written == ref.lines


# --- the config loader: only ConfigError ---------------------------------------------------


def toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "inf" if value == math.inf else "-inf" if value == -math.inf else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(document: dict[str, Any]) -> str:
    """Top-level values first, then one [table] per dict (TOML needs that order)."""
    lines = [
        f"{toml_string(k)} = {toml_value(v)}"
        for k, v in document.items()
        if not isinstance(v, dict)
    ]
    for name, table in document.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_string(name)}]")
            lines.extend(f"{toml_string(k)} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


ALL_KEYS = sorted({key for keys in SCHEMA.values() for key in keys} | {"types"})
PATHS = ["", "~", "~/data", "~nosuchuser-fuzz/data", "~root/x", "rel/dir", "/abs/dir", "\x00"]
ENDPOINTS = ["tcp:0", "tcp:587:interface=127.0.0.1", "tcp:99999", "unix:/nonexistent/s", "ssl:0"]
WORDS = ["tofu", "off", "observe", "allowlist", "421", "454", "example.org", "mail.example.org"]
paths_and_words = st.sampled_from([*PATHS, *ENDPOINTS, *WORDS])
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 2**31]),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    paths_and_words,
)
toml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
type_tables = st.dictionaries(
    st.sampled_from(["UUID", "X-*", "default", "*", "[", ""]) | st.text(max_size=8),
    st.one_of(
        st.fixed_dictionaries({"flags": st.lists(st.sampled_from([*TYPE_FLAGS, "bogus"]))}),
        toml_values,
    ),
    max_size=3,
)
section_tables = st.dictionaries(
    st.sampled_from(ALL_KEYS) | st.text(max_size=8),
    st.one_of(toml_values, type_tables),
    max_size=5,
)
documents = st.dictionaries(
    st.sampled_from(sorted(SCHEMA)) | st.text(max_size=8),
    st.one_of(section_tables, toml_values),
    max_size=4,
)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config") / "clientid-mta.toml"


def load_only_config_error(path: Path, data: bytes) -> Config | None:
    """load_config on a file holding ``data``: a Config, or None after a ConfigError."""
    path.write_bytes(data)
    try:
        return load_config(path)
    except ConfigError as error:
        assert str(error).startswith("config error:"), error
        return None


@FUZZ
@given(documents)
def test_issue6_load_config_raises_only_config_error_for_any_toml_structure(
    config_file: Path, document: dict[str, Any]
) -> None:
    text = toml_document(document)
    assert tomllib.loads(text) == document  # the writer above produced what we meant
    load_only_config_error(config_file, text.encode())


SYNTAX = ["[", "]", "[[", "]]", "{", "}", "=", '"', "'", '"""', "\n", ",", ".", "#", "\\", " "]
NAMES = ["server", "limits", "clientid.types", "max_errors", "hostname", "1", "true", "1979-05-27"]
toml_fragments = st.sampled_from([*SYNTAX, *NAMES])


def nested(depth: int) -> str:
    return "x = " + "[" * depth + "]" * depth + "\n"


@FUZZ
@given(
    st.one_of(
        st.lists(st.one_of(toml_fragments, st.text(max_size=5)), max_size=40).map("".join),
        st.text(),
        st.integers(0, 3000).map(nested),
        st.integers(0, 3000).map(lambda n: "[server]\nhostname = " + "{a=" * n + "1" + "}" * n),
    )
)
@example(text=nested(600))  # tomllib recurses per level
def test_issue6_load_config_raises_only_config_error_for_any_text(
    config_file: Path, text: str
) -> None:
    load_only_config_error(config_file, text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([b"", b'[server]\nhostname = "', b"# "]))
@example(data=b"\xff", prefix=b'[server]\nhostname = "')
def test_issue6_load_config_raises_only_config_error_for_any_bytes(
    config_file: Path, data: bytes, prefix: bytes
) -> None:
    load_only_config_error(config_file, prefix + data)


@FUZZ
@given(
    st.sampled_from(["server", "auth", "clientid", "delivery", "tls", "travel"]),
    st.sampled_from(["data_dir", "passwd_file", "key_file", "maildir_root", "certificate"]),
    paths_and_words | st.text(max_size=12),
)
@example(section="server", key="data_dir", value="~nosuchuser-fuzz/data")
def test_issue6_load_config_path_keys_raise_only_config_error(
    config_file: Path, section: str, key: str, value: str
) -> None:
    text = f"[{section}]\n{key} = {toml_string(value)}\n"
    load_only_config_error(config_file, text.encode())


# The hourly sending limits take 0 for "no limit"; every other limit is a positive count.
LIMITS_WHERE_0_IS_OFF = {"max_messages_per_hour", "max_recipients_per_hour"}


@FUZZ
@given(
    st.sampled_from(sorted(SCHEMA["limits"])),
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.booleans(), st.floats(), st.text(max_size=4)),
)
def test_issue6_load_config_limits_accept_exactly_their_whole_numbers(
    config_file: Path, key: str, value: Any
) -> None:
    if isinstance(value, float) and math.isnan(value):
        value = "nan"
    text = f"[limits]\n{key} = {toml_value(value)}\n"
    config = load_only_config_error(config_file, text.encode())
    lowest = 0 if key in LIMITS_WHERE_0_IS_OFF else 1
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= lowest
    assert (config is not None) == valid, (key, value)
    if config is not None:
        assert getattr(config.limits, key) == value
