"""A thread pool for login checks, apart from the reactor's pool that saves mail.

Password hashing and device-store look-ups can be slow (argon2id costs ~100 ms and
64 MiB; another process may lock the store). In their own bounded pool they can never
take the threads that fsync messages of sessions already logged in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application import service
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

AUTH_THREADS = 4  # argon2id is CPU- and memory-bound: a few threads per core are plenty


class AuthWorkers(service.Service):
    """The pool as a service: threads exist only between ``startService`` and ``stopService``.

    Work handed to ``run`` before the start waits in the pool's queue.
    """

    name = "auth-threads"

    def __init__(self, reactor: Any, size: int = AUTH_THREADS) -> None:
        self.reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name="clientid-mta-auth")

    def run(self, function: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return threads.deferToThreadPool(self.reactor, self._pool, function, *args)

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._pool.started:
            self._pool.stop()  # joins the threads: at most one running hash each
        return None
