"""Reading one DATA block (docs/conformance.md, rows S6, S7, S8, S10).

The only end of data is ``CRLF . CRLF``. Lines are split on CRLF alone: a bare CR or
LF stays inside its line, where it is detected and the message refused, so no
"smuggled" end of data is ever seen. Over-long lines and over-size messages are read
to the end without being kept, so memory stays bounded whatever the client sends.

After the header section, whole runs of complete lines are handled at once with
bytes operations (find the end marker, count CR and LF, undo dot-stuffing, turn CRLF
into LF) instead of one Python call per line: the per-line path cost about a third of
the server's CPU per message in a profile of 4 KB messages. The per-line path stays
for the header section and for any run that may hold an over-long line, and the
parser fuzz tests hold both paths to the same reference framer.
"""

from __future__ import annotations

from collections.abc import Callable

from clientid_mta.smtp.headers import HeaderSyntaxError, parse_address_list

# A From:, Sender: or Resent-From: field longer than this is refused, not cut: the
# ownership check must see every address a mail reader will show.
MAX_FROM_FIELD = 8192
# Resent-From: may repeat (one per resending); more than this is no real message.
MAX_SENDER_FIELDS = 16

# The fields whose addresses must belong to the account (S6), and whether a message
# may carry more than one of them (RFC 5322 section 3.6).
_CHECKED_FIELDS = {b"from": False, b"sender": False, b"resent-from": True, b"resent-sender": True}
_FTEXT = frozenset(range(33, 127)) - {ord(":")}


def field_name(line: bytes) -> bytes | None:
    """The lower-cased name of the field ``line`` starts, or None if it starts none.

    White space between the name and the colon is allowed (RFC 5322 obs-optional):
    mail readers take ``From : x`` for a From: field, so the check must too.
    """
    name, colon, _ = line.partition(b":")
    name = name.rstrip(b" \t")
    if not colon or not name or not _FTEXT.issuperset(name):
        return None
    return name.lower()


def looks_like_header(line: bytes) -> bool:
    return field_name(line) is not None


class HeaderScanner:
    """Watches the header section for the fields that name the author (S6).

    Each watched field is unfolded, kept up to ``MAX_FROM_FIELD`` bytes and parsed when
    it ends, so memory stays bounded whatever the client sends. ``refusal`` says why
    the section cannot be checked; ``author_addresses`` lists what must be owned.
    """

    def __init__(self) -> None:
        self.in_headers = True
        self.first_line = True
        self._field: bytes | None = None  # the watched field being read, if any
        self._value = bytearray()
        self._seen: dict[bytes, int] = {}
        self._addresses: list[str] = []
        self._refusal: tuple[int, str] | None = None

    def line(self, line: bytes) -> None:
        if not self.in_headers:
            return
        first, self.first_line = self.first_line, False
        if line[:1] in (b" ", b"\t") and not first:
            if self._field is not None:
                self._append(line)
            return
        self._finish_field()
        name = field_name(line)
        if not line or (first and name is None):
            # The end of the header section, or a message without one (the protocol
            # puts an empty line before it: it is all body).
            self.in_headers = False
            return
        # A line that is no field further down is passed over, not taken for the end of
        # the section: readers differ there, so the check looks on to the empty line.
        if name in _CHECKED_FIELDS:
            self._start_field(name, line.partition(b":")[2])

    def _start_field(self, name: bytes, value: bytes) -> None:
        seen = self._seen[name] = self._seen.get(name, 0) + 1
        shown = name.decode().title()
        if seen > 1 and not _CHECKED_FIELDS[name]:
            self._refuse(550, f"5.6.0 More than one {shown}: field")
        elif sum(self._seen.values()) > MAX_SENDER_FIELDS:
            self._refuse(550, "5.6.0 Too many sender fields")
        self._field = name
        self._value = bytearray()
        self._append(value)

    def _append(self, data: bytes) -> None:
        room = MAX_FROM_FIELD + 1 - len(self._value)
        if room > 0:
            self._value += data[:room]

    def _finish_field(self) -> None:
        name, self._field = self._field, None
        if name is None or self._refusal is not None:
            return
        shown = name.decode().title()
        if len(self._value) > MAX_FROM_FIELD:
            # 5.7.1, not 552: the message is within SIZE; what fails is the ownership
            # check, which will not pass a field it could not read to its end.
            self._refuse(550, f"5.7.1 {shown}: field too long to check")
            return
        try:
            addresses = parse_address_list(self._value.decode("utf-8", "replace"))
        except HeaderSyntaxError as bad:
            self._refuse(550, f"5.6.0 Malformed {shown}: field: {bad}")
            return
        if not addresses or (name in (b"sender", b"resent-sender") and len(addresses) != 1):
            self._refuse(550, f"5.6.0 Malformed {shown}: field")
            return
        self._addresses.extend(addresses)

    def _refuse(self, code: int, text: str) -> None:
        if self._refusal is None:
            self._refusal = (code, text)

    def refusal(self) -> tuple[int, str] | None:
        """Why the author fields cannot be accepted (read once the data has ended)."""
        self._finish_field()
        return self._refusal

    def author_addresses(self) -> list[str] | None:
        """Every address of From:, Sender:, Resent-From: and Resent-Sender: (lower case),
        None if the message has none of these fields."""
        self._finish_field()
        return list(self._addresses) if self._seen else None


class BodyReader:
    """Turns the bytes of a DATA block into message lines (without line endings).

    ``feed`` consumes what it can and says whether the end of data was reached. The
    reader keeps no data between calls beyond what the caller leaves in its buffer,
    and it never leaves more than ``max_line`` bytes there.
    """

    def __init__(
        self,
        write_line: Callable[[bytes], None],
        max_size: int,
        max_line: int,
        write_block: Callable[[bytes], None] | None = None,
    ) -> None:
        self._write_line = write_line
        self._write_block = write_block
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0
        self.too_big = False
        self.line_too_long = False
        self.bare_newline = False
        self._skipping = False
        self.headers = HeaderScanner()

    @property
    def failed(self) -> bool:
        return self.too_big or self.line_too_long or self.bare_newline

    def feed(self, buf: bytearray) -> tuple[int, bool]:
        """Consume complete lines of ``buf``; return (bytes consumed, end of data seen)."""
        pos = 0
        end = len(buf)
        while True:
            if self._write_block is not None and not (self.headers.in_headers or self._skipping):
                last = buf.rfind(b"\r\n", pos)
                if last >= pos:
                    region = bytes(buf[pos : last + 2])
                    if region.startswith(b".\r\n"):
                        return pos + 3, True
                    found = region.find(b"\r\n.\r\n")
                    if found >= 0:
                        self._block(region[: found + 2])
                        return pos + found + 5, True
                    self._block(region)
                    pos = last + 2
            idx = buf.find(b"\r\n", pos)
            if idx < 0:
                # A final CR may be the first half of the CRLF: it does not count.
                pending = end - pos - (1 if buf[end - 1 : end] == b"\r" else 0)
                if pending > self.max_line:
                    # A line longer than the cap with no end in sight: drop what we have,
                    # keeping a final CR that may be the start of the CRLF.
                    self.line_too_long = True
                    self._skipping = True
                    pos = end - 1 if buf[end - 1 : end] == b"\r" else end
                return pos, False
            line = bytes(buf[pos:idx])
            pos = idx + 2
            if self._skipping:
                self._skipping = False  # the tail of an over-long line
                continue
            if line == b".":
                return pos, True
            if len(line) > self.max_line:
                self.line_too_long = True
                continue
            if line[:1] == b".":
                line = line[1:]
            self._line(line)

    def _block(self, block: bytes) -> None:
        """Complete lines (each ending in CRLF, none the end marker), past the headers."""
        if not block:
            return
        if len(block) > self.max_line + 2 and max(map(len, block.split(b"\r\n"))) > self.max_line:
            for line in block[:-2].split(b"\r\n"):  # rare: keep the exact per-line rules
                if len(line) > self.max_line:
                    self.line_too_long = True
                    continue
                self._line(line[1:] if line[:1] == b"." else line)
            return
        lines = block.count(b"\r\n")
        if block.count(b"\r") != lines or block.count(b"\n") != lines:
            self.bare_newline = True
        unstuffed = (b"\r\n" + block).replace(b"\r\n.", b"\r\n")[2:]
        self.size += len(unstuffed)
        if self.size > self.max_size:
            self.too_big = True
        if not self.failed:
            assert self._write_block is not None
            self._write_block(unstuffed.replace(b"\r\n", b"\n"))

    def _line(self, line: bytes) -> None:
        self.size += len(line) + 2
        if self.size > self.max_size:
            self.too_big = True
        if b"\r" in line or b"\n" in line:
            self.bare_newline = True
        if self.failed:
            return
        if self.headers.first_line and line and not looks_like_header(line):
            self._write_line(b"")  # no header section: separate our Received: from the body
        self.headers.line(line)
        self._write_line(line)
