"""A message with one local copy, stored by a helper process instead of a thread.

Why: a store in a thread makes about ten system calls, and each one gives up the GIL and
then has to win it back from the busy reactor. Under load that tripled the store's CPU,
and the reactor kept losing the GIL to it. A helper process (``store_helper``) makes the
same calls with the same code, and shares its GIL with nobody. The reactor only writes the
message to a pipe and reads one line back (bench/results/latency_issue16.md, round 5).

What does not change:
- the 250 waits for the helper's answer, which it sends once both fsyncs are done;
- an error is the same ``OSError`` or ``UnsafeMailboxName`` as in a thread (a ``451``);
- if the helper ends (crash, kill), every store it had fails with a ``451``; for the next
  ``RESPAWN_WAIT`` seconds stores go to threads as before (``available``), then the next
  store starts a new helper;
- at most ``MAX_PENDING`` bytes wait for it; more is refused at once, like a disk that
  cannot keep up.

Stopping: the server's drain waits for the stores; ``stopService`` then closes the
helper's standard input and waits for it to end, and kills it after ``STOP_WAIT``. If the
server dies, the kernel closes that pipe. The helper may still store a request it has
already read, whose client never saw the 250 and will send it again: a duplicate, never a
loss, as when a server dies between a store and its reply.
"""

from __future__ import annotations

import errno
import itertools
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from clientid_mta.delivery.maildir import UnsafeMailboxName
from clientid_mta.output_lines import OutputLines

log = Logger()

MAX_PENDING = 64 * 1024 * 1024  # bytes handed to the helper and not yet answered
MAX_ANSWER = 64 * 1024  # one answer line; longer means the helper is not ours or broken
STOP_WAIT = 10.0  # seconds the helper gets to end after its input closes
RESPAWN_WAIT = 5.0  # after a helper ended by itself: stores go to threads for this long
HELPER_MODULE = "clientid_mta.delivery.store_helper"


class _Helper(protocol.ProcessProtocol):
    """One running helper: the stores it was given, by number, and their answers."""

    def __init__(self) -> None:
        self.waiting: dict[int, tuple[defer.Deferred[Path], int]] = {}
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._answers = OutputLines(MAX_ANSWER)

    def send(self, number: int, domain: str, localpart: str, data: bytes) -> defer.Deferred[Path]:
        assert self.transport is not None
        head = {"id": number, "size": len(data), "domain": domain, "localpart": localpart}
        self.transport.writeSequence([json.dumps(head).encode(), b"\n", data])
        stored: defer.Deferred[Path] = defer.Deferred()
        self.waiting[number] = (stored, len(data))
        return stored

    def outReceived(self, data: bytes) -> None:
        for line in self._answers.feed(data):
            if not self._answer(line):
                return  # broken: nothing after it is believed
        if self._answers.too_long:
            self._broken("an answer line without end")

    def errReceived(self, data: bytes) -> None:
        text = data[:2000].decode("utf-8", "replace").rstrip()
        log.error("the Maildir store process says: {text}", text=text)

    def _answer(self, line: bytes) -> bool:
        """Settle the store a line answers; False when the line is no answer."""
        try:
            answer = json.loads(line)
            stored, _size = self.waiting.pop(int(answer["id"]))
        except (ValueError, KeyError, TypeError):
            self._broken("an answer it was not asked for")
            return False
        if "path" in answer:
            stored.callback(Path(answer["path"]))
        elif answer.get("unsafe"):
            stored.errback(UnsafeMailboxName(str(answer.get("error"))))
        else:
            stored.errback(OSError(int(answer.get("errno") or errno.EIO), str(answer.get("error"))))
        return True

    def _broken(self, what: str) -> None:
        log.error("the Maildir store process sent {what}; stopping it", what=what)
        self._answers.clear()
        self.kill()

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass

    def outConnectionLost(self) -> None:
        """Its output closed: it has ended, or no answer can come any more. (Not
        ``processEnded``: that needs the child reaped, which a reactor without signal
        handlers, as in a thread of an embedding program, never does.)"""
        self._end("its output closed")

    def processEnded(self, reason: Failure) -> None:
        self._end(reason.getErrorMessage())

    def _end(self, why: str) -> None:
        if self.ended.called:
            return
        waiting, self.waiting = self.waiting, {}
        if waiting:
            log.error(
                "the Maildir store process ended with {count} messages not stored: {why}",
                count=len(waiting),
                why=why,
            )
        for stored, _size in waiting.values():
            stored.errback(OSError(errno.EIO, "the Maildir store process ended"))
        self.ended.callback(None)


class StoreProcess(service.Service):
    """Hands single-copy Maildir stores to a helper process while it runs."""

    name = "maildir-store"

    def __init__(
        self,
        reactor: Any,
        root: Path,
        *,
        env: Mapping[str, str],
        max_pending: int = MAX_PENDING,
        executable: str = sys.executable,
    ) -> None:
        self.reactor = reactor
        self.root = root
        self.env = dict(env)
        self.max_pending = max_pending
        self.executable = executable
        self.pending_bytes = 0
        self.helper: _Helper | None = None
        self._numbers = itertools.count(1)
        self._respawn_at = 0.0

    def startService(self) -> None:
        super().startService()
        try:
            self._spawn()  # now, so that the first message does not wait for Python to start
        except OSError as problem:  # threads store meanwhile; the next try is later
            self._cannot_start(problem)

    def available(self) -> bool:
        """Running, and no helper just died: else the caller stores in a thread."""
        return bool(self.running) and (
            self.helper is not None or self.reactor.seconds() >= self._respawn_at
        )

    def store(self, domain: str, localpart: str, data: bytes) -> defer.Deferred[Path]:
        """Durable in ``new/`` when it fires (with the path); only when ``available``."""
        if self.pending_bytes + len(data) > self.max_pending:
            return defer.fail(OSError(errno.ENOBUFS, "the disk cannot keep up with the message"))
        helper = self.helper
        if helper is None:
            try:
                helper = self._spawn()
            except OSError as problem:
                self._cannot_start(problem)
                return defer.fail(problem)
        self.pending_bytes += len(data)
        stored = helper.send(next(self._numbers), domain, localpart, data)
        return stored.addBoth(self._answered, len(data))

    def _answered(self, result: Any, size: int) -> Any:
        self.pending_bytes -= size
        return result

    def _spawn(self) -> _Helper:
        helper = _Helper()
        self.reactor.spawnProcess(
            helper,
            self.executable,
            # -P: not the working folder first on sys.path, where any clientid_mta could sit
            [self.executable, "-P", "-m", HELPER_MODULE, str(self.root)],
            env=self.env,
        )
        helper.ended.addCallback(lambda _: self._forget(helper))
        self.helper = helper
        return helper

    def _cannot_start(self, problem: OSError) -> None:
        log.error("cannot start the Maildir store process: {problem}", problem=str(problem))
        self._respawn_at = self.reactor.seconds() + RESPAWN_WAIT

    def _forget(self, helper: _Helper) -> None:
        if self.helper is helper:
            self.helper = None
            if self.running:  # it ended by itself
                self._respawn_at = self.reactor.seconds() + RESPAWN_WAIT

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        helper = self.helper
        if helper is None or helper.transport is None:
            return defer.succeed(None)
        helper.transport.closeStdin()
        timer = self.reactor.callLater(STOP_WAIT, helper.kill)
        return helper.ended.addBoth(lambda _: timer.cancel() if timer.active() else None)
