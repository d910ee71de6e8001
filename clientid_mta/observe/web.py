"""The ``[metrics] listen`` endpoint: ``/metrics``, ``/healthz/live``, ``/healthz/ready``.

Served by twisted.web. The scrape and the readiness checks read files (the other
processes' counts, the folders, the store), so they run in the reactor's thread pool;
what only the reactor may read (sessions, the queue's entries, the listeners) is read
first, on the reactor. That pool also runs the logins' password checks and store
queries: each page runs at most one piece of work at a time, and requests that come
while it runs get its answer, so however hard the port is hammered it holds at most
two of the pool's threads and opens at most one probe connection to the store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from clientid_mta.observe.health import Check, run_checks
from clientid_mta.observe.metrics import PrometheusEvents, QueueStates

log = Logger()

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
MAX_CONNECTIONS = 32  # scrapers and health checks at once
IDLE_TIMEOUT = 30  # seconds a connection may stay idle


@dataclass
class Observed:
    """What the endpoint asks the server, each call on the reactor.

    ``metrics``: the counter, None until the server has started; ``not_ready``: the
    reasons known on the reactor (listeners not bound yet); ``checks``: the blocking
    checks, run in a thread; ``queue_states``: the queue's entries by state, or None
    where this process does not run the queue."""

    metrics: Callable[[], PrometheusEvents | None]
    not_ready: Callable[[], list[str]]
    checks: Callable[[], Sequence[tuple[str, Check]]]
    queue_states: Callable[[], dict[str, int] | None]


class _Deferring(resource.Resource):
    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self._waiting: list[server.Request] | None = None  # requests the running work answers
        self._gone: set[server.Request] = set()  # of those, the ones whose client left

    def _in_thread(
        self, request: server.Request, prepare: Callable[[], Callable[[], tuple[int, bytes]]]
    ) -> Any:
        """Answer ``request`` with the result of the work ``prepare`` gives (``prepare``
        runs on the reactor, the work in the pool); joins the work already running
        instead, if any, without preparing anything."""
        request.notifyFinish().addErrback(lambda _: self._gone.add(request))
        if self._waiting is not None:
            self._waiting.append(request)
            return server.NOT_DONE_YET
        waiting = self._waiting = [request]
        pool = self.reactor.getThreadPool()
        answer: defer.Deferred[tuple[int, bytes]] = threads.deferToThreadPool(
            self.reactor, pool, prepare()
        )

        def send(result: tuple[int, bytes] | Failure) -> None:
            self._waiting, gone = None, self._gone
            self._gone = set()
            if isinstance(result, Failure):
                path = request.path.decode("ascii", "replace")
                log.failure("{path} failed", result, path=path)
                result = (500, b"")
            code, body = result
            for each in waiting:
                if each in gone:  # the client left while we worked: nothing to send
                    continue
                each.setResponseCode(code)
                each.write(body)
                each.finish()

        answer.addBoth(send)
        return server.NOT_DONE_YET


class MetricsPage(_Deferring):
    def __init__(self, reactor: Any, observed: Observed) -> None:
        super().__init__(reactor)
        self.observed = observed

    def render_GET(self, request: server.Request) -> Any:
        metrics = self.observed.metrics()
        if metrics is None:
            request.setResponseCode(503)
            return b"starting\n"
        request.setHeader(b"content-type", CONTENT_TYPE)

        def prepare() -> Callable[[], tuple[int, bytes]]:
            states = self.observed.queue_states()  # the queue's entries: reactor only
            queue: QueueStates | None = None if states is None else (lambda: states)
            return lambda: (200, metrics.exposition(queue))

        return self._in_thread(request, prepare)


class LivePage(resource.Resource):
    """The process answers: its reactor runs."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"live\n"


class ReadyPage(_Deferring):
    def __init__(self, reactor: Any, observed: Observed) -> None:
        super().__init__(reactor)
        self.observed = observed

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")

        def prepare() -> Callable[[], tuple[int, bytes]]:
            early = self.observed.not_ready()
            checks = self.observed.checks()

            def verdict() -> tuple[int, bytes]:
                problems = early + run_checks(checks)
                if problems:
                    return 503, ("not ready\n" + "\n".join(problems) + "\n").encode()
                return 200, b"ready\n"

            return verdict

        return self._in_thread(request, prepare)


def observe_site(reactor: Any, observed: Observed) -> server.Site:
    root = resource.Resource()
    root.putChild(b"metrics", MetricsPage(reactor, observed))
    healthz = resource.Resource()
    healthz.putChild(b"live", LivePage())
    healthz.putChild(b"ready", ReadyPage(reactor, observed))
    root.putChild(b"healthz", healthz)
    site = QuietSite(root, timeout=IDLE_TIMEOUT, reactor=reactor)
    site.noisy = False
    return site


class QuietSite(server.Site):
    """Scraped every few seconds: no access log line for each. Bounded like the mail
    ports: at most ``MAX_CONNECTIONS`` at once (more are closed), an idle one closed
    after ``IDLE_TIMEOUT`` seconds, and no request body kept (every page is a GET)."""

    open_connections = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocol = _CountedChannel  # type: ignore[method-assign,assignment]  # HTTP/1.1
        self.requestFactory = _BodilessRequest

    def buildProtocol(self, addr: Any) -> Any:
        if self.open_connections >= MAX_CONNECTIONS:
            return None
        self.open_connections += 1
        return super().buildProtocol(addr)

    def log(self, request: Any) -> None:
        pass


class _CountedChannel(http.HTTPChannel):
    site: QuietSite  # set by the site that built it

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.open_connections -= 1
        super().connectionLost(reason)


class _BodilessRequest(server.Request):
    """twisted.web keeps a request's body (in a temporary file past 100 KB) before the
    page sees it; no page here takes one, so a request that sends one is closed."""

    def gotLength(self, length: int | None) -> None:
        super().gotLength(0)
        if length:
            self._close()

    def handleContentChunk(self, data: bytes) -> None:
        if data:  # a chunked body
            self._close()

    def _close(self) -> None:
        transport: Any = self.channel.transport
        transport.abortConnection()
