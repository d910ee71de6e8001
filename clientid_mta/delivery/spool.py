"""Message data held in memory during DATA; every file operation runs in a thread.

Opening and writing a file on the reactor costs every other session time (an
``open`` with ``O_CREAT|O_EXCL`` in a busy Maildir took 0.5 ms in a profile, an
fsync of a folder much more). A message is therefore kept in memory and written,
fsynced and renamed in one go in a thread at the end. A message that outgrows
``SPILL`` bytes has its buffer handed to a thread (which opens the file on the first
spill), so memory per session stays bounded. The file operations of one message run
one at a time, in order.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

SPILL = 256 * 1024
# Bytes handed to the thread but not yet written. A disk this far behind the network
# is broken: the message gets a 451 instead of the session growing without bound.
MAX_IN_FLIGHT = 16 * SPILL


class Writable(Protocol):
    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


W = TypeVar("W", bound=Writable)
T = TypeVar("T")

RunInThread = Callable[..., "defer.Deferred[Any]"]


class LateFile(Generic[W]):
    """The data of one message: ``write`` on the reactor, then ``finish`` or ``abort``."""

    def __init__(
        self, open_file: Callable[[], W], run_in_thread: RunInThread | None = None
    ) -> None:
        self._open_file = open_file
        self._run_in_thread: RunInThread = run_in_thread or threads.deferToThread
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._in_flight = 0
        self._tail: defer.Deferred[None] = defer.succeed(None)  # the last file operation
        self._aborted = False
        self.file: W | None = None  # opened and written in threads only
        self.error: Exception | None = None  # an OSError (or ValueError) kept for the end

    def write(self, data: bytes) -> None:
        if self.error is not None or self._aborted:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered <= SPILL:
            return
        chunk = self._take()
        if self._in_flight + len(chunk) > MAX_IN_FLIGHT:
            self.error = OSError(errno.ENOBUFS, "the disk cannot keep up with the message")
            return
        self._in_flight += len(chunk)
        spilled = self._in_order(self._write_now, chunk)
        spilled.addBoth(self._landed, len(chunk))
        spilled.addErrback(self._keep_error)

    def finish(self, complete: Callable[[W], T]) -> defer.Deferred[T]:
        """After the spills: in a thread, write the rest and return ``complete(file)``.

        On any failure the partial file is thrown away (in that thread).
        """
        if self.error is not None:
            return defer.fail(self.error)
        return self._in_order(self._finish_now, self._take(), complete)

    def take_whole(self) -> bytes | None:
        """All the data, taken, if it is all still in memory (no spill, no error);
        else None and nothing changes."""
        if self.file is not None or self._in_flight or self.error is not None or self._aborted:
            return None
        return self._take()

    def then(self, step: Callable[[W], T]) -> defer.Deferred[T]:
        """After ``finish``: ``step(file)`` in a thread, in order (the second half of a
        two-step store). On failure the file is thrown away (in that thread)."""
        return self._in_order(self._step_now, step)

    def abort(self) -> None:
        """Throw the data away; a file already opened is removed in a thread."""
        self._chunks, self._buffered = [], 0
        if not self._aborted:
            self._aborted = True
            removed = self._in_order(self._abort_now)
            removed.addErrback(lambda f: log.failure("could not remove a partial message", f))

    # --- helpers ----------------------------------------------------------------------

    def _take(self) -> bytes:
        data, self._chunks, self._buffered = b"".join(self._chunks), [], 0
        return data

    def _in_order(self, operation: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run ``operation`` in a thread once every earlier one has finished."""
        result: defer.Deferred[T] = defer.Deferred()

        def start(_: object) -> defer.Deferred[None]:
            running = self._run_in_thread(operation, *args)
            running.chainDeferred(result)
            return running.addErrback(lambda _failure: None)  # the next one runs anyway

        self._tail.addCallback(start)
        return result

    def _landed(self, result: T, size: int) -> T:
        self._in_flight -= size
        return result

    def _keep_error(self, failure: Failure) -> None:
        if self.error is None:
            self.error = (
                failure.value if isinstance(failure.value, Exception) else OSError(str(failure))
            )
        self._chunks, self._buffered = [], 0

    # --- in a thread ----------------------------------------------------------------

    def _opened(self) -> W:
        if self.file is None:
            self.file = self._open_file()
        return self.file

    def _write_now(self, data: bytes) -> None:
        if self.error is None and not self._aborted:
            self._opened().write(data)

    def _finish_now(self, data: bytes, complete: Callable[[W], T]) -> T:
        try:
            if self.error is not None:
                raise self.error
            handle = self._opened()
            if data:
                handle.write(data)
            return complete(handle)
        except BaseException:
            self._abort_now()
            raise

    def _step_now(self, step: Callable[[W], T]) -> T:
        try:
            if self.error is not None:
                raise self.error
            if self.file is None:
                raise ValueError("the message was not written")
            return step(self.file)
        except BaseException:
            self._abort_now()
            raise

    def _abort_now(self) -> None:
        if self.file is not None:
            self.file.abort()
