"""Writing a file so that a crash leaves either nothing or the whole file.

The data goes to a temporary name (created exclusively, never through a symbolic
link), then ``commit_to`` flushes and fsyncs it, renames it to its final name and
fsyncs that folder. Maildir delivery and the outbound queue both write this way.
All of it blocks: call it from a thread.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableFile:
    """Written with plain ``os.write`` calls: callers hand over whole chunks (a
    message's spills, its rest), so a buffer would only add system calls (``fstat``,
    ``lseek``), and each call from a thread is one more wait for the GIL (issue 16)."""

    def __init__(self, temp_path: Path) -> None:
        self.temp_path = temp_path
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        self._fd: int | None = os.open(temp_path, flags, 0o600)
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:  # a regular file takes it all at once; a short write goes on
            view = view[os.write(self._fd, view) :]
        self.size += len(data)

    def sync(self) -> Path:
        """Fsync and close the data; it is still at ``temp_path``."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self.temp_path

    def commit_to(self, final: Path) -> Path:
        """``sync``, rename to ``final``, fsync its folder."""
        self.sync()
        os.rename(self.temp_path, final)
        fsync_dir(final.parent)
        return final

    def abort(self) -> None:
        """Throw the partial file away (safe to call twice)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        self.temp_path.unlink(missing_ok=True)
