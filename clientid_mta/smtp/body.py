"""Reading one DATA block (docs/conformance.md, S7, S8, S10).

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

import email.utils
from collections.abc import Callable

MAX_FROM_FIELD = 8192


class HeaderScanner:
    """Watches the header section for the From: field (for the S6 check)."""

    def __init__(self) -> None:
        self.in_headers = True
        self.first_line = True
        self._from: bytearray | None = None
        self._collecting = False

    def line(self, line: bytes) -> None:
        if not self.in_headers:
            return
        self.first_line = False
        if not line:
            self.in_headers = False
            return
        if line[:1] in (b" ", b"\t"):
            if self._collecting and self._from is not None:
                self._append(line)
            return
        self._collecting = line[:5].lower() == b"from:"
        if self._collecting:
            if self._from is None:
                self._from = bytearray()
            else:
                self._from += b","  # a second From: field: check its addresses too
            self._append(line[5:])

    def _append(self, data: bytes) -> None:
        assert self._from is not None
        room = MAX_FROM_FIELD - len(self._from)
        self._from += data[: max(room, 0)]

    def from_addresses(self) -> list[str] | None:
        """Addresses in From: (lower-cased), None if there was no From: field."""
        if self._from is None:
            return None
        text = self._from.decode("ascii", "replace")
        return [addr.lower() for _name, addr in email.utils.getaddresses([text]) if addr]


def looks_like_header(line: bytes) -> bool:
    name, colon, _ = line.partition(b":")
    return bool(colon) and bool(name) and b" " not in name and b"\t" not in name


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
