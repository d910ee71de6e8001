"""Message data held in memory until the end of DATA, then written in a thread.

Opening and writing a file on the reactor costs every other session time (an
``open`` with ``O_CREAT|O_EXCL`` in a busy Maildir took 0.5 ms in a profile). A
message is therefore kept in memory and written, fsynced and renamed in one go in a
thread at the end. Only a message that outgrows ``SPILL`` bytes gets its file opened
early (on the reactor, rarely), so memory per session stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

SPILL = 256 * 1024


class Writable(Protocol):
    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


W = TypeVar("W", bound=Writable)


class LateFile(Generic[W]):
    def __init__(self, open_file: Callable[[], W]) -> None:
        self._open_file = open_file
        self._chunks: list[bytes] = []
        self._buffered = 0
        self.file: W | None = None
        self.error: Exception | None = None  # an OSError (or ValueError) kept for the end

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > SPILL:
            try:
                self.written()
            except (OSError, ValueError) as error:
                self.error = error

    def written(self) -> W:
        """The file, opened if need be, with everything buffered written to it."""
        if self.file is None:
            self.file = self._open_file()
        if self._chunks:
            data, self._chunks, self._buffered = b"".join(self._chunks), [], 0
            self.file.write(data)
        return self.file

    def abort(self) -> None:
        self._chunks = []
        if self.file is not None:
            self.file.abort()
