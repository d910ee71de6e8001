"""Lines out of a child process's output (the workers' logs, the store process's answers).

The output arrives in pieces that end anywhere; a line is complete at its newline. An
unfinished line is held, up to a limit: what a caller does with a longer one is its
own choice (a log keeps its end, a protocol gives up on the child).
"""

from __future__ import annotations


class OutputLines:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._rest = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes, without their newlines."""
        self._rest += data
        end = self._rest.rfind(b"\n")
        if end < 0:
            return []
        lines = bytes(self._rest[:end]).split(b"\n")
        del self._rest[: end + 1]
        return lines

    @property
    def too_long(self) -> bool:
        """The unfinished line is over the limit."""
        return len(self._rest) > self.limit

    def keep_end(self) -> None:
        """Hold only the last ``limit`` bytes of the unfinished line."""
        del self._rest[: -self.limit or None]

    def clear(self) -> None:
        self._rest.clear()
