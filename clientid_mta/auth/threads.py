"""A thread pool for login checks, apart from the reactor's pool that saves mail.

Password hashing and device-store look-ups can be slow (argon2id costs ~100 ms and
64 MiB; another process may lock the store). In their own bounded pool they can never
take the threads that fsync messages of sessions already logged in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer, reactor, threads
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

AUTH_THREADS = 4  # argon2id is CPU- and memory-bound: a few threads per core are plenty


class AuthWorkers:
    """Started at once (embedders need no service); stopped by ``stop`` or at shutdown."""

    def __init__(self, size: int = AUTH_THREADS) -> None:
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name="clientid-mta-auth")
        self._pool.start()
        self._trigger: Any = reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def run(self, function: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return threads.deferToThreadPool(reactor, self._pool, function, *args)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self._trigger is not None:
            trigger, self._trigger = self._trigger, None
            try:
                reactor.removeSystemEventTrigger(trigger)
            except ValueError:
                pass  # already running as the shutdown trigger
            self._pool.stop()
