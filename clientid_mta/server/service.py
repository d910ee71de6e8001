"""Assemble the server from a Config: the pieces, the factories, the twistd service.

This is the embedding API: a Twisted program calls ``build_factory(config)`` and
listens with the result, or adds ``build_service(config)`` to its application.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.cred.portal import Portal
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorFromThreads,
    IReactorSocket,
    IReactorThreads,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from clientid_mta.auth.budgets import Throttle
from clientid_mta.auth.checker import ClientIdChecker, Defences
from clientid_mta.auth.credentials import IClientIdUsernamePassword
from clientid_mta.auth.known_clients import KnownClients
from clientid_mta.auth.passwd_file import PasswdFile
from clientid_mta.auth.realm import build_portal
from clientid_mta.auth.threads import AuthWorkers
from clientid_mta.config import Config, ConfigError, check_server_files
from clientid_mta.delivery.maildir import MaildirRoot
from clientid_mta.delivery.router import LocalRouter, delivery_factory
from clientid_mta.devices.approval import ApprovalMessage, Approvals
from clientid_mta.devices.audit import AuditLog
from clientid_mta.devices.keys import load_or_create_server_key
from clientid_mta.devices.notices import DEVICE_APPROVED, FailureCounter, Notice, Notifier
from clientid_mta.devices.policy import DevicePolicy
from clientid_mta.devices.regions import Regions
from clientid_mta.devices.sharing import SharedDevices
from clientid_mta.devices.sqlite_store import open_sqlite_stores
from clientid_mta.devices.store import Stores
from clientid_mta.outbound.queue import QueueDir
from clientid_mta.outbound.runner import LocalBounceTarget, QueueRunner
from clientid_mta.outbound.submit import Outbound
from clientid_mta.smtp.clientid import fingerprint
from clientid_mta.smtp.limits import SessionLimits
from clientid_mta.smtp.protocol import SubmissionFactory
from clientid_mta.smtp.tls import ReloadableServerTLS, generate_self_signed

log = Logger()

HOUSEKEEPING_INTERVAL = 1.0  # seconds between audit flushes
# The reactor's pool writes and fsyncs messages and queue entries (logins have their
# own pool): enough threads that fsyncs of many sessions overlap and share journal
# commits, few enough to keep memory small.
DISK_THREADS = 16
THROTTLE_SAVE_TICKS = 10  # save the throttle state every this many flushes
KNOWN_REFRESH_TICKS = 5  # re-read the trusted devices and usual networks this often


@dataclass
class Components:
    """Everything one server needs, shared by both listeners."""

    config: Config
    passwords: PasswdFile
    store: Stores
    maildirs: MaildirRoot
    portal: Portal
    server_key: bytes
    tls_context: ReloadableServerTLS
    defences: Defences
    checker: ClientIdChecker
    sessions: SessionLimits
    workers: AuthWorkers
    queue_runner: QueueRunner


def _dkim_signer(config: Config) -> Any:
    if not config.dkim:
        return None
    from clientid_mta.outbound.dkim import DkimKeyError, DkimSigner

    try:
        return DkimSigner(config.dkim)
    except DkimKeyError as problem:
        raise ConfigError(f"config error: {problem}") from None


def build_components(config: Config) -> Components:
    """Create data_dir, the key, the store and the TLS context. Raises ConfigError."""
    check_server_files(config)
    try:
        config.server.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        server_key = load_or_create_server_key(config.clientid.key_file)
        store = open_sqlite_stores(config.clientid.device_store)
        queue = QueueDir(config.queue_config.directory)
        queue.create()
    except (OSError, ValueError) as problem:
        raise ConfigError(
            f"config error: [server] data_dir: cannot set up state: {problem}."
        ) from None
    if config.tls.certificate is None or config.tls.key is None:
        certificate, key = generate_self_signed(config.generated_tls_dir, config.server.hostname)
    else:
        certificate, key = config.tls.certificate, config.tls.key
    tls_context = ReloadableServerTLS(certificate, key)
    passwords = PasswdFile(config.auth.passwd_file)
    maildirs = MaildirRoot(config.delivery.maildir_root)
    notifier = Notifier(
        maildirs,
        config.server.hostname,
        config.postmaster,
        lambda address: passwords.get(address) is not None,
        config.alerts.max_per_account_per_hour,
    )
    approvals = Approvals(store.approval_codes, store.devices, config.approval.code_lifetime)
    known = KnownClients(store.budgets, config.throttle.usual_network_days)

    def approved(account: str, device: str) -> None:  # in a thread, from ApprovalMessage
        known.trusted(device)
        notice = Notice(DEVICE_APPROVED, account, fingerprint(device), "", "")
        policy.notify(notice)

    router = LocalRouter(
        passwords,
        config.delivery.local_domains,
        maildirs,
        config.approval.localpart,
        lambda account: ApprovalMessage(approvals, account, approved),
    )
    policy = DevicePolicy(
        config.clientid,
        store.devices,
        server_key,
        notifier,
        config.travel,
        approvals,
        router.approval_address,
    )
    try:
        regions = Regions(config.travel.geoip_database)
    except Exception as problem:  # maxminddb raises several kinds for a bad file
        raise ConfigError(
            f"config error: [travel] geoip_database {config.travel.geoip_database} cannot be "
            f"read ({problem}); point it at a MaxMind .mmdb file or remove the key."
        ) from None
    throttle = Throttle(config.throttle)
    throttle.restore(store.budgets.load())
    defences = Defences(
        throttle=throttle,
        sharing=SharedDevices(config.shared_devices, store.shared_devices),
        audit=AuditLog(store.audit, config.audit.retention_days),
        failures=FailureCounter(config.alerts.unknown_failures),
        regions=regions,
        known=known,
    )

    def deliver_notice(address: str, data: bytes) -> bool:  # in a thread, from the runner
        account = passwords.get(address)
        if account is None:
            return False
        maildirs.deliver_bytes(account.domain, account.localpart, data)
        return True

    runner = QueueRunner(config, queue, LocalBounceTarget(router.is_local, deliver_notice))
    outbound = Outbound(queue, _dkim_signer(config), runner.add)
    portal = build_portal(
        passwords, policy, delivery_factory(passwords, router, outbound), defences, config.auth
    )
    checker = portal.checkers[IClientIdUsernamePassword]
    assert isinstance(checker, ClientIdChecker)
    workers = AuthWorkers()
    checker.run_in_thread = workers.run
    return Components(
        config,
        passwords,
        store,
        maildirs,
        portal,
        server_key,
        tls_context,
        defences,
        checker,
        SessionLimits(config.limits),
        workers,
        runner,
    )


def build_factory(
    config: Config, implicit_tls: bool = False, components: Components | None = None
) -> IProtocolFactory:
    """A factory for one listener; with ``implicit_tls`` it is wrapped in TLS (port 465)."""
    parts = components or build_components(config)
    factory = SubmissionFactory(
        config,
        parts.portal,
        parts.tls_context,
        server_key=parts.server_key,
        implicit_tls=implicit_tls,
        sessions=parts.sessions,
    )
    if implicit_tls:
        return TLSMemoryBIOFactory(parts.tls_context, False, factory)
    return factory


class AdoptedPort(service.Service):
    """A listener on a socket another process bound (a worker's share of a port)."""

    def __init__(self, fd: int, factory: IProtocolFactory) -> None:
        self.fd = fd
        self.factory = factory
        self.port: IListeningPort | None = None
        self._waitingForPort: defer.Deferred[IListeningPort] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        probe = socket.socket(fileno=self.fd)
        family = probe.family
        probe.detach()
        adopter: IReactorSocket = reactor  # type: ignore[assignment]
        self.port = adopter.adoptStreamPort(self.fd, family, self.factory)  # type: ignore[arg-type]
        os.close(self.fd)  # adoptStreamPort made its own copy
        self._waitingForPort.callback(self.port)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        return self.port.stopListening() if self.port else None


class SubmissionService(service.MultiService):
    """Both listeners, and a start-up report of where everything is.

    ``inherited`` maps listener names to sockets a parent process bound: a worker
    process serves those instead of binding its own (see ``workerpool``).
    """

    exit_on_listen_error = False  # twistd sets it: a busy port ends the start with one line

    def __init__(self, config: Config, inherited: dict[str, int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.components = build_components(config)
        self.reload_hooks: list[Callable[[], object]] = []
        self._ticks = 0
        self._housekeeping_busy = False
        self._housekeeping = task.LoopingCall(self._tick)
        self.listeners: list[service.Service] = []
        for key, implicit in (("submission", False), ("submissions", True)):
            description = getattr(config.listen, key)
            if not description or (inherited is not None and key not in inherited):
                continue
            factory = build_factory(config, implicit, self.components)
            listener: service.Service
            if inherited is not None:
                listener = AdoptedPort(inherited[key], factory)
            else:
                endpoint = StreamServerEndpointService(
                    serverFromString(reactor, description), factory
                )
                endpoint._raiseSynchronously = True
                listener = endpoint
            listener.setName(key)
            listener.setServiceParent(self)
            self.listeners.append(listener)

    def share_state(self) -> None:
        """Several processes serve this config: keep the failure budgets in the store."""
        throttle = self.components.defences.throttle
        if throttle is not None and not throttle.shared:
            throttle.share(self.components.store.budgets)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as problem:
            names = {s.name: getattr(self.config.listen, str(s.name)) for s in self.listeners}
            where = ", ".join(f"{name} = {value!r}" for name, value in names.items())
            message = (
                f"config error: [listen] cannot listen on port {problem.port} "
                f"({problem.socketError}); check that no other server uses it and that this "
                f"user may bind it ({where})."
            )
            if self.exit_on_listen_error:
                raise SystemExit(f"clientid-mta: {message}") from None
            raise ConfigError(message) from None

    def _housekeep(self, final: bool = False) -> None:
        """Write the audit batch and, now and then, the throttle state. Blocking."""
        defences = self.components.defences
        if defences.audit is not None:
            defences.audit.flush()
        self._ticks += 1
        throttle = defences.throttle
        if throttle is not None and (final or self._ticks % THROTTLE_SAVE_TICKS == 0):
            if throttle.shared:
                throttle.prune_shared()
            else:
                self.components.store.budgets.save(throttle.snapshot())
        if defences.known is not None and not final and self._ticks % KNOWN_REFRESH_TICKS == 0:
            defences.known.refresh()

    def _tick(self) -> defer.Deferred[None] | None:
        checker = self.components.checker
        if checker.throttled_count:
            log.info("throttled {count} AUTH attempts", count=checker.throttled_count)
            checker.throttled_count = 0
        if self._housekeeping_busy:
            return None
        self._housekeeping_busy = True
        done = threads.deferToThread(self._housekeep)
        done.addErrback(self._housekeeping_failed)
        done.addBoth(lambda _: setattr(self, "_housekeeping_busy", False))
        return None

    def _housekeeping_failed(self, failure: Failure) -> None:
        if failure.check(OSError, sqlite3.Error):  # locked or full: retried next second
            log.error("cannot write the audit log now: {problem}", problem=str(failure.value))
        else:
            log.failure("housekeeping failed", failure)

    def listening(self) -> defer.Deferred[dict[str, IListeningPort]]:
        """Fires with {listener name: port} once both listeners are bound (port 0 works)."""
        names = [str(listener.name) for listener in self.listeners]
        waits = [listener._waitingForPort for listener in self.listeners]  # type: ignore[attr-defined]
        bound = defer.gatherResults(waits)
        return bound.addCallback(lambda ports: dict(zip(names, ports, strict=True)))

    def reload(self) -> bool:
        """SIGHUP: read the certificate and key again; running sessions are kept."""
        try:
            self.components.tls_context.reload()
        except ConfigError as problem:
            log.error("reload failed, keeping the old certificate: {problem}", problem=str(problem))
            return False
        log.info("reloaded the TLS certificate and key")
        for hook in self.reload_hooks:
            hook()
        return True

    def _install_sighup(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded with the reactor in another thread: the embedder calls reload()
        threaded: IReactorFromThreads = reactor  # type: ignore[assignment]
        signal.signal(signal.SIGHUP, lambda _signum, _frame: threaded.callFromThread(self.reload))

    def startService(self) -> None:
        config = self.config
        super().startService()
        threaded: IReactorThreads = reactor  # type: ignore[assignment]
        threaded.suggestThreadPoolSize(DISK_THREADS)
        self.components.queue_runner.startService()
        known = self.components.defences.known
        if known is not None:  # which devices and networks have budgets of their own
            loaded = threads.deferToThread(known.refresh)
            loaded.addErrback(self._housekeeping_failed)
        self._housekeeping.start(HOUSEKEEPING_INTERVAL, now=False)
        self._install_sighup()
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

    def stopService(self) -> Any:
        if self._housekeeping.running:
            self._housekeeping.stop()
        self.components.queue_runner.stopService()
        stopped = defer.maybeDeferred(super().stopService)
        stopped.addCallback(lambda _: threads.deferToThread(self._housekeep, True))
        stopped.addErrback(lambda failure: log.failure("saving state at stop failed", failure))
        stopped.addBoth(lambda _: self.components.workers.stop())
        stopped.addBoth(lambda _: self.components.store.close())
        return stopped


def build_service(config: Config) -> SubmissionService:
    return SubmissionService(config)
