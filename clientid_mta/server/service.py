"""The server as one Twisted service: ``build_service(config)``.

Its children: the two listeners, the queue runner, housekeeping (audit log, failure
budgets) and the login thread pool. Building it touches no disk (apart from checking
that files named in the config exist); ports are bound in ``privilegedStartService``;
the state is created and opened in ``startService``, after twistd's ``--uid/--gid``
switch. ``build_factory`` (in ``components``) remains for protocol-only use.
"""

from __future__ import annotations

import gc
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorThreads
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageDelivery

from clientid_mta.config import Config, ConfigError
from clientid_mta.delivery.sweep import TmpSweeper
from clientid_mta.devices.backends import shared_by_nodes
from clientid_mta.global_reactor import global_reactor
from clientid_mta.observe.events import NO_EVENTS, IServerEvents
from clientid_mta.observe.health import Check
from clientid_mta.observe.metrics import PrometheusEvents
from clientid_mta.observe.web import Observed
from clientid_mta.server.components import (
    Components,
    build_components,
    build_factory,
    open_components,
    prepare,
    state_files,
)
from clientid_mta.server.delivery import InFlight
from clientid_mta.server.filelimit import fit_open_files
from clientid_mta.server.housekeeping import Housekeeping
from clientid_mta.server.listeners import AdoptedPort, BoundPort, LateFactory
from clientid_mta.server.observing import (
    MetricsListener,
    make_events,
    queue_states,
    readiness_checks,
)
from clientid_mta.server.proxy_protocol import proxied
from clientid_mta.server.systemd import Notifier

__all__ = [
    "Components",
    "InFlight",
    "SubmissionService",
    "build_components",
    "build_factory",
    "build_service",
    "state_files",
]

log = Logger()

# The reactor's pool writes and fsyncs messages and queue entries (logins have their
# own pool): enough threads that fsyncs of many sessions overlap and share journal
# commits, few enough to keep memory small.
DISK_THREADS = 16
STOP_WAIT = 10.0  # seconds a stop waits for messages being stored and relayed
STOP_POLL = 0.05


class SubmissionService(service.MultiService):
    """Both listeners, the queue runner, housekeeping and the login threads.

    ``inherited`` maps listener names to sockets a parent process bound: a worker
    process serves those instead of binding its own (see ``workerpool``).
    ``components`` exists from ``startService`` on.
    """

    exit_on_start_error = False  # twistd sets it: a busy port or bad state ends the start
    # twistd and the workers set it: the process is the server's own, so the objects of
    # its start (modules, configuration, state) leave the collector's view (gc.freeze).
    # A full collection then walks only what sessions made since: its pause under load
    # went from 60-80 ms to none or about 9 ms in 15 s (issue 16). An embedder's is its own.
    freeze_at_start = False

    def __init__(
        self,
        config: Config,
        inherited: dict[str, int] | None = None,
        *,
        reactor: Any = None,
        local_delivery: IMessageDelivery | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor if reactor is not None else global_reactor()
        self.local_delivery = local_delivery
        self.parts = prepare(config, self.reactor)
        self.components: Components = None  # type: ignore[assignment]  # set by startService
        self.reload_hooks: list[Callable[[], object]] = []
        self.systemd = Notifier()  # twistd's plugin gives the one for $NOTIFY_SOCKET
        # twistd's plugin adds the worker processes (``workerpool``) as a child and names
        # them here: a stop signals them first, so they drain with this process.
        self.worker_pool: service.IService | None = None
        self._shared = False  # share_state: failure budgets in the store, for workers
        self.parts.workers.setServiceParent(self)
        self.parts.queue_runner.setServiceParent(self)
        self.housekeeping = Housekeeping(self.reactor, config.audit.max_entries)
        self.housekeeping.setServiceParent(self)
        TmpSweeper(self.parts.maildirs, reactor=self.reactor).setServiceParent(self)
        if self.parts.store_process is not None:
            self.parts.store_process.setServiceParent(self)
        self._started: defer.Deferred[None] = defer.Deferred()  # fired once serving
        self.listeners: list[BoundPort | AdoptedPort] = []
        self._factories: list[tuple[LateFactory, bool]] = []
        for key, implicit in (("submission", False), ("submissions", True)):
            description = getattr(config.listen, key)
            if not description or (inherited is not None and key not in inherited):
                continue
            late = LateFactory(key)
            self._factories.append((late, implicit))
            listener: BoundPort | AdoptedPort
            if inherited is not None:
                listener = AdoptedPort(inherited[key], late, self.reactor)
            else:
                listener = BoundPort(_endpoint(self.reactor, key, description), late)
            listener.setName(key)
            listener.setServiceParent(self)
            self.listeners.append(listener)
        self._parent = inherited is None  # a worker counts; its parent serves the sums
        self.events: IServerEvents = NO_EVENTS  # made at start, with the state
        self.metrics: MetricsListener | None = None
        if config.metrics.listen and self._parent:
            self.metrics = MetricsListener(self.reactor, config.metrics.listen, self._observed())
            self.metrics.setServiceParent(self)

    def _observed(self) -> Observed:
        def metrics() -> PrometheusEvents | None:
            return self.events if isinstance(self.events, PrometheusEvents) else None

        def not_ready() -> list[str]:
            if not self._started.called:
                return ["server: starting"]
            return [f"{each.name}: not listening" for each in self.listeners if each.port is None]

        def checks() -> Sequence[tuple[str, Check]]:
            return readiness_checks(self.config, self.parts.queue_runner)

        def queue() -> dict[str, int] | None:
            return queue_states(self.parts.queue_runner)

        return Observed(metrics, not_ready, checks, queue)

    def share_state(self) -> None:
        """Several processes serve this config: keep the failure budgets in the store."""
        self._shared = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # the SMTP ports
            if self.metrics is not None:
                self.metrics.listen()
        except CannotListenError as problem:
            names = {s.name: getattr(self.config.listen, str(s.name)) for s in self.listeners}
            where = ", ".join(f"{name} = {value!r}" for name, value in names.items())
            self._failed_start(
                f"config error: [listen] cannot listen on port {problem.port} "
                f"({problem.socketError}); check that no other server uses it and that this "
                f"user may bind it ({where})."
            )
        except ConfigError as problem:  # [metrics] listen
            for listener in self.listeners:
                if listener.port is not None:
                    listener.stopService()
            self._failed_start(str(problem))

    def _failed_start(self, message: str) -> NoReturn:
        if self.exit_on_start_error:
            raise SystemExit(f"clientid-mta: {message}") from None
        raise ConfigError(message) from None

    def listening(self) -> defer.Deferred[dict[str, IListeningPort]]:
        """Fires with {listener name: port} once both listeners are bound and serving
        (port 0 works)."""

        def bound(_: object) -> defer.Deferred[dict[str, IListeningPort]]:
            names = [str(listener.name) for listener in self.listeners]
            waits = [listener.bound for listener in self.listeners]
            ports = defer.gatherResults(waits)
            return ports.addCallback(lambda found: dict(zip(names, found, strict=True)))

        started: defer.Deferred[None] = defer.Deferred()

        def tell(result: None) -> None:
            started.callback(None)
            return result

        self._started.addCallback(tell)
        return started.addCallback(bound)

    def reload(self) -> bool:
        """SIGHUP: read the certificate and key again; running sessions are kept."""
        self.systemd.reloading()
        try:
            self.components.tls_context.reload()
        except ConfigError as problem:
            log.error("reload failed, keeping the old certificate: {problem}", problem=str(problem))
            self.systemd.reloaded(f"reload failed, old certificate kept: {problem}")
            return False
        log.info("reloaded the TLS certificate and key")
        for hook in self.reload_hooks:
            hook()
        self.systemd.reloaded(self.status())
        return True

    def status(self) -> str:
        """One line for ``systemctl status``: sessions of this process and the queue."""
        if self.components is None:
            return "starting"
        runner = self.components.queue_runner
        queue = f"{len(runner.entries)} queued" if runner.owner else "queue run by another process"
        return f"{self.components.sessions.total} sessions, {queue}"

    def _install_sighup(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded with the reactor in another thread: the embedder calls reload()
        reactor = self.reactor
        signal.signal(signal.SIGHUP, lambda _signum, _frame: reactor.callFromThread(self.reload))

    def _open(self) -> Components:
        """Create and open the state (as the user the service runs as)."""
        try:
            components = open_components(self.config, self.parts, self.local_delivery)
        except ConfigError as problem:
            for listener in self.listeners:  # bound by privilegedStartService: free them
                if listener.port is not None:
                    listener.stopService()
            self._failed_start(str(problem))
        throttle = components.defences.throttle
        shared = self._shared or shared_by_nodes(self.config)  # worker processes or nodes
        if shared and throttle is not None and not throttle.shared:
            throttle.share(components.store.budgets)
        self.housekeeping.watch(components.defences, components.store, components.checker)
        return components

    def _count_into(self, events: IServerEvents) -> None:
        """Every part that reports events reports to ``events`` from now on."""
        self.events = events
        self.components.events = events
        self.components.checker.events = events
        self.parts.queue_runner.attempts.events = events

    def startService(self) -> None:
        if self.metrics is not None:  # embedded (no privileged step): bind it before anything runs
            try:
                self.metrics.listen()
            except ConfigError as problem:
                self._failed_start(str(problem))
        if self.components is None:
            self.components = self._open()
            self._count_into(make_events(self.config, self._parent))
        fit_open_files(self.config.limits.max_sessions)
        if IReactorThreads.providedBy(self.reactor):
            self.reactor.suggestThreadPoolSize(DISK_THREADS)
        # Queue recovery deletes leftovers in tmp/, where new sessions write, and logins
        # want the accounts read: both run in threads, and the listeners (bound already,
        # closing connections until then) are given their factories once both are done.
        pool = self.reactor.getThreadPool()
        waits: list[defer.Deferred[Any]] = [
            self.components.queue_runner.recover(),
            threads.deferToThreadPool(self.reactor, pool, self.components.passwords.refresh),
        ]
        known = self.components.defences.known
        if known is not None:  # which devices and networks have budgets of their own
            waits.append(threads.deferToThreadPool(self.reactor, pool, known.refresh))
        super().startService()  # children in order: threads, queue, housekeeping, listeners
        self._install_sighup()
        ready = defer.gatherResults(waits, consumeErrors=True)
        ready.addCallback(lambda _: self._serve())
        ready.addErrback(lambda failure: log.failure("clientid-mta cannot start", failure))
        ready.addBoth(lambda _: self._started.callback(None))

    def _serve(self) -> None:
        listen = self.config.listen
        for late, implicit in self._factories:
            factory = build_factory(self.config, implicit, self.components, reactor=self.reactor)
            if listen.proxy_protocol(late.name):  # the header comes first, before TLS on 465
                factory = proxied(factory, listen.proxy_from, self.reactor)
            late.attach(factory)
        if self.freeze_at_start:
            gc.collect()
            gc.freeze()
        for listener in self.listeners:  # bound already: now they accept
            listener.serve()
        self._log_start()
        self.systemd.ready(self.status)

    def _log_start(self) -> None:
        config = self.config
        admin = "clientid-mta" + (f" --config {config.source}" if config.source else "")
        accounts = len(self.components.passwords.accounts())
        log.info(
            "clientid-mta {hostname}: submission (STARTTLS) on {submission!r}, submissions "
            "(implicit TLS) on {submissions!r}; data in {data_dir}; accounts in {passwd} "
            "({accounts}); mail in {maildir_root}; devices in {store}; policy {policy}",
            hostname=config.server.hostname,
            submission=config.listen.submission,
            submissions=config.listen.submissions,
            data_dir=str(config.server.data_dir),
            passwd=str(config.auth.passwd_file),
            accounts=accounts,
            maildir_root=str(config.delivery.maildir_root),
            store=str(config.clientid.device_store),
            policy=config.clientid.policy,
        )
        if config.tls.certificate is None:
            log.info(
                "using a generated self-signed certificate in {tls_dir}; set [tls] certificate "
                "and key for production",
                tls_dir=str(config.generated_tls_dir),
            )
        if accounts == 0:
            log.info(
                "no accounts yet: add the first with: {admin} user add alice@example.org",
                admin=admin,
            )

    def stopService(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        """Stop taking connections, let stores and relays finish (bounded), then the rest.

        MultiService would stop all children at once; the order matters here: the
        final housekeeping write must come after the last login and the last message.
        """
        service.Service.stopService(self)
        self.systemd.stopping()
        # The workers drain their own sessions meanwhile; this process outlives them, so
        # that their last log lines are relayed and none is killed with its parent.
        pool = self.worker_pool
        workers_ended = defer.maybeDeferred(pool.stopService) if pool and pool.running else None
        listening = [listener for listener in self.listeners if listener.running]
        await defer.gatherResults([defer.maybeDeferred(each.stopService) for each in listening])
        await self._drain()
        if workers_ended is not None:
            await workers_ended
        # The last logins finish before the final write of the audit log and budgets.
        # Health and metrics answer until the end: a balancer sees the drain.
        last = (
            self.parts.store_process,  # after the drain: no message waits for it now
            self.parts.queue_runner,
            self.parts.workers,
            self.housekeeping,
            self.metrics,
        )
        # Then any other child (an embedder's own), last added first, as MultiService would.
        others = [child for child in reversed(list(self)) if child not in last]
        for child in [each for each in last if each is not None] + others:
            if not child.running:
                continue
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=child.name)
        if self.components is not None:
            self.components.store.close()

    async def _drain(self) -> None:
        """Wait up to STOP_WAIT for messages being stored and deliveries being relayed."""
        if self.components is None:
            return
        in_flight, runner = self.components.in_flight, self.components.queue_runner
        deadline = self.reactor.seconds() + STOP_WAIT
        while (in_flight.count or runner.active) and self.reactor.seconds() < deadline:
            await task.deferLater(self.reactor, STOP_POLL, lambda: None)
        if in_flight.count or runner.active:
            log.warn(
                "stopping with {storing} messages being stored and {relaying} being relayed",
                storing=in_flight.count,
                relaying=runner.active,
            )


def _endpoint(reactor: Any, key: str, description: str) -> Any:
    """The endpoint of a listener; a ``systemd:`` one names a socket systemd must have passed."""
    try:
        return serverFromString(reactor, description)
    except (IndexError, KeyError):  # Twisted's systemd parser: no such inherited socket
        raise ConfigError(
            f"config error: [listen] {key} = {description!r}: systemd passed no such socket "
            "to this process (LISTEN_FDS, LISTEN_FDNAMES); start the server through its "
            ".socket unit (etc/clientid-mta.socket), or listen on a port (tcp:587)."
        ) from None


def build_service(
    config: Config, *, reactor: Any = None, local_delivery: IMessageDelivery | None = None
) -> SubmissionService:
    """The whole server as a ``MultiService``; nothing is created on disk until it starts.

    ``local_delivery``: your own ``IMessageDelivery`` for recipients in the local
    domains (instead of Maildir); everything else works as usual.
    """
    return SubmissionService(config, reactor=reactor, local_delivery=local_delivery)
