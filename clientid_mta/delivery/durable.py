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
from typing import BinaryIO

_WRITE_BUFFER = 64 * 1024


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableFile:
    def __init__(self, temp_path: Path) -> None:
        self.temp_path = temp_path
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(temp_path, flags, 0o600)
        self._file: BinaryIO | None = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self.size += len(data)

    def sync(self) -> Path:
        """Flush, fsync and close the data; it is still at ``temp_path``."""
        if self._file is not None:
            handle, self._file = self._file, None
            try:
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                handle.close()
        return self.temp_path

    def commit_to(self, final: Path) -> Path:
        """``sync``, rename to ``final``, fsync its folder."""
        self.sync()
        os.rename(self.temp_path, final)
        fsync_dir(final.parent)
        return final

    def abort(self) -> None:
        """Throw the partial file away (safe to call twice)."""
        if self._file is not None:
            handle, self._file = self._file, None
            with contextlib.suppress(OSError):
                handle.close()
        self.temp_path.unlink(missing_ok=True)
