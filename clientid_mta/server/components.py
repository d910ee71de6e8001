"""The object graph of one server, built in two steps so that privileges can drop between them.

``prepare`` makes what writes nothing (the accounts file reader, the Maildir root,
the queue runner, the login thread pool); ``open_components`` then creates and
opens the state: data_dir, the HMAC key, the device store, the queue folders and a
generated certificate. ``SubmissionService`` calls the second from ``startService``,
i.e. after twistd's ``--uid/--gid`` switch, so everything it creates belongs to the
service user and nothing has to be handed over (or chowned) afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from twisted.cred.portal import Portal
from twisted.internet.interfaces import IProtocolFactory
from twisted.mail.interfaces import IMessageDelivery
from twisted.protocols.tls import TLSMemoryBIOFactory

from clientid_mta.auth.budgets import Throttle
from clientid_mta.auth.checker import ClientIdChecker, Defences
from clientid_mta.auth.credentials import IClientIdUsernamePassword
from clientid_mta.auth.dovecot import DovecotAuth
from clientid_mta.auth.dovecot_accounts import DovecotAccounts
from clientid_mta.auth.known_clients import KnownClients
from clientid_mta.auth.passwd_file import PasswdFile
from clientid_mta.auth.realm import build_portal
from clientid_mta.auth.threads import AuthWorkers
from clientid_mta.config import Config, ConfigError, check_server_files
from clientid_mta.delivery.lmtp import LmtpDelivery, LmtpPool
from clientid_mta.delivery.maildir import Mailboxes, MaildirRoot
from clientid_mta.delivery.router import LocalRouter, delivery_factory
from clientid_mta.delivery.sending import SendingLimit, tell_postmaster
from clientid_mta.delivery.store_process import StoreProcess
from clientid_mta.devices.approval import ApprovalMessage, Approvals
from clientid_mta.devices.audit import AuditLog
from clientid_mta.devices.backends import open_stores
from clientid_mta.devices.keys import load_or_create_server_key
from clientid_mta.devices.last_seen import LoginRecorder
from clientid_mta.devices.notices import DEVICE_APPROVED, FailureCounter, Notice, Notifier
from clientid_mta.devices.policy import DevicePolicy
from clientid_mta.devices.postgres_store import KeyMismatch, describe
from clientid_mta.devices.regions import Regions
from clientid_mta.devices.sharing import SharedDevices
from clientid_mta.devices.store import Device, Stores, StoreUnavailable
from clientid_mta.global_reactor import global_reactor
from clientid_mta.observe.events import NO_EVENTS, IServerEvents
from clientid_mta.outbound.queue import QueueDir
from clientid_mta.outbound.runner import LocalBounceTarget, QueueRunner
from clientid_mta.outbound.submit import Outbound
from clientid_mta.server.delivery import InFlight, ServedDelivery
from clientid_mta.server.systemd import without_systemd_variables
from clientid_mta.smtp.limits import SessionLimits
from clientid_mta.smtp.protocol import SubmissionFactory
from clientid_mta.smtp.tls import ReloadableServerTLS, generate_self_signed, server_context


@dataclass
class Prepared:
    """The parts made before privileges drop: none of them touches the disk yet."""

    passwords: PasswdFile
    maildirs: MaildirRoot
    router: LocalRouter
    queue: QueueDir
    queue_runner: QueueRunner
    workers: AuthWorkers
    dovecot: DovecotAuth | None = None  # [auth] backend = "dovecot"
    lmtp: LmtpDelivery | None = None  # [delivery] lmtp
    store_process: StoreProcess | None = None  # [delivery] store_process, for Maildir

    @property
    def mailboxes(self) -> Mailboxes:
        """Where notices and bounces for local accounts go."""
        return self.lmtp if self.lmtp is not None else self.maildirs


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
    in_flight: InFlight
    events: IServerEvents = NO_EVENTS  # what counts the sessions, logins, messages


def state_files(config: Config) -> list[Path]:
    """What the server creates under its data folder on first start."""
    store = config.clientid.device_store
    tls = config.generated_tls_dir
    queue = config.queue_config.directory
    return [
        config.server.data_dir,
        config.clientid.key_file,
        store,
        store.with_name(store.name + "-wal"),
        store.with_name(store.name + "-shm"),
        tls,
        tls / "cert.pem",
        tls / "key.pem",
        queue,
        *(queue / name for name in ("tmp", "msg", "env", "corrupt", "control", "lock")),
    ]


def prepare(config: Config, reactor: Any) -> Prepared:
    """The parts that write nothing. Reads only what the operator named: each file must
    exist, and a ``[tls]`` certificate and key must load (a mistake is one line before
    twistd even starts logging); they are read again, as the service user, at start."""
    check_server_files(config)
    if config.tls.certificate is not None and config.tls.key is not None:
        server_context(config.tls.certificate, config.tls.key)
    passwords, dovecot = _password_backend(config, reactor)
    maildirs = MaildirRoot(config.delivery.maildir_root)
    router = LocalRouter(
        passwords, config.delivery.local_domains, maildirs, config.approval.localpart
    )

    lmtp = None
    if config.delivery.lmtp:
        delivery = config.delivery
        pool = LmtpPool(
            reactor, delivery.lmtp, config.server.hostname, size=delivery.lmtp_connections
        )
        lmtp = router.lmtp = LmtpDelivery(pool)
    elif config.delivery.store_process:
        router.store_process = StoreProcess(
            reactor, config.delivery.maildir_root, env=without_systemd_variables(os.environ)
        )
    mailboxes: Mailboxes = lmtp if lmtp is not None else maildirs

    def deliver_notice(address: str, data: bytes) -> bool:  # in a thread, from the runner
        account = passwords.get(address)
        if account is None:
            return False
        mailboxes.deliver_bytes(account.domain, account.localpart, data)
        return True

    queue = QueueDir(config.queue_config.directory)
    runner = QueueRunner(
        config, queue, LocalBounceTarget(router.is_local, deliver_notice), reactor=reactor
    )
    workers = AuthWorkers(reactor)
    return Prepared(
        passwords, maildirs, router, queue, runner, workers, dovecot, lmtp, router.store_process
    )


def _password_backend(config: Config, reactor: Any) -> tuple[PasswdFile, DovecotAuth | None]:
    """The accounts, and Dovecot's auth service when it checks the passwords."""
    auth = config.auth
    if auth.backend != "dovecot":
        return PasswdFile(auth.passwd_file), None
    service = DovecotAuth(
        reactor, auth.dovecot_socket, auth.dovecot_timeout, auth.dovecot_failure_delay
    )
    return DovecotAccounts(auth.passwd_file, auth.send_as_file), service


def _dkim_signer(config: Config) -> Any:
    if not config.dkim:
        return None
    from clientid_mta.outbound.dkim import DkimKeyError, DkimSigner

    try:
        return DkimSigner(config.dkim)
    except DkimKeyError as problem:
        raise ConfigError(f"config error: {problem}") from None


def _regions(config: Config) -> Regions:
    try:
        return Regions(config.travel.geoip_database)
    except Exception as problem:  # maxminddb raises several kinds for a bad file
        raise ConfigError(
            f"config error: [travel] geoip_database {config.travel.geoip_database} cannot be "
            f"read ({problem}); point it at a MaxMind .mmdb file or remove the key."
        ) from None


def open_components(
    config: Config, parts: Prepared, local_delivery: IMessageDelivery | None = None
) -> Components:
    """Create and open the state, and wire the rest around it. Raises ConfigError."""
    try:
        config.server.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        server_key = load_or_create_server_key(config.clientid.key_file)
    except (OSError, ValueError) as problem:
        raise ConfigError(
            f"config error: [server] data_dir: cannot set up state: {problem}."
        ) from None
    store = _open_store(config, server_key)
    try:
        parts.queue.create()
    except OSError as problem:
        store.close()
        raise ConfigError(
            f"config error: [server] data_dir: cannot set up state: {problem}."
        ) from None
    try:
        return _wire(config, parts, server_key, store, local_delivery)
    except BaseException:
        store.close()
        raise


def _open_store(config: Config, server_key: bytes) -> Stores:
    """The configured store; a failure is one line naming the key and the fix."""
    if not config.store.url:
        try:
            return open_stores(config, server_key)
        except (OSError, ValueError, StoreUnavailable) as problem:
            raise ConfigError(
                f"config error: [server] data_dir: cannot set up state: {problem}."
            ) from None
    where = describe(config.store.url)
    try:
        return open_stores(config, server_key)
    except KeyMismatch as problem:
        raise ConfigError(f"config error: [clientid] key_file: {problem}.") from None
    except (OSError, ValueError) as problem:
        raise ConfigError(f"config error: [store] password_file: {problem}.") from None
    except StoreUnavailable as problem:
        first = str(problem).splitlines()[0] if str(problem) else "no answer"
        raise ConfigError(
            f"config error: [store] url: cannot open the device store {where} ({first});"
            " check that the database is up and the URL, user and password are right."
        ) from None


def _wire(
    config: Config,
    parts: Prepared,
    server_key: bytes,
    store: Stores,
    local_delivery: IMessageDelivery | None,
) -> Components:
    if config.tls.certificate is None or config.tls.key is None:
        certificate, key = generate_self_signed(config.generated_tls_dir, config.server.hostname)
    else:
        certificate, key = config.tls.certificate, config.tls.key
    tls_context = ReloadableServerTLS(certificate, key)
    passwords, maildirs, router = parts.passwords, parts.maildirs, parts.router
    notifier = Notifier(
        parts.mailboxes,
        config.server.hostname,
        config.postmaster,
        lambda address: passwords.get(address) is not None,
        config.alerts.max_per_account_per_hour,
        store.notices,  # the caps hold for all worker processes together
    )
    approvals = Approvals(store.approval_codes, store.devices, config.approval.code_lifetime)
    known = KnownClients(store.budgets, config.throttle.usual_network_days)
    policy = DevicePolicy(
        config.clientid,
        store.devices,
        server_key,
        notifier,
        config.travel,
        approvals,
        router.approval_address,
        LoginRecorder(store.devices),  # written by housekeeping, every second and at stop
    )

    def approved(device: Device) -> None:  # in a thread, from ApprovalMessage
        known.trusted(device.device_key)  # its own budget from now on
        checker.events.device_event("approved")  # PrometheusEvents takes it from a thread
        policy.notify(
            Notice(
                DEVICE_APPROVED,
                device.account,
                device.fingerprint,
                device.type,
                device.last_network,
                first_seen=device.first_seen,
            )
        )

    router.approval_message = lambda account: ApprovalMessage(approvals, account, approved)
    throttle = Throttle(config.throttle)
    throttle.restore(store.budgets.load())
    defences = Defences(
        throttle=throttle,
        sharing=SharedDevices(config.shared_devices, store.shared_devices),
        audit=AuditLog(
            store.audit, config.audit.retention_days, config.audit.max_entries, server_key
        ),
        failures=FailureCounter(config.alerts.unknown_failures),
        regions=_regions(config),
        known=known,
    )
    runner = parts.queue_runner
    outbound = Outbound(parts.queue, _dkim_signer(config), runner.add)
    sending = SendingLimit(
        store.sending,
        config.limits.max_messages_per_hour,
        config.limits.max_recipients_per_hour,
        tell_postmaster(notifier),
    )
    account_delivery = delivery_factory(passwords, router, outbound, sending)
    in_flight = InFlight()

    def delivery_for(address: str, trusted_device: bool) -> IMessageDelivery:
        served = account_delivery(address, trusted_device)
        return ServedDelivery(served, router, in_flight, local_delivery)

    portal = build_portal(passwords, policy, delivery_for, defences, config.auth, parts.dovecot)
    checker = cast(ClientIdChecker, portal.checkers[IClientIdUsernamePassword])
    assert isinstance(checker, ClientIdChecker)
    checker.run_in_thread = parts.workers.run
    checker.quick_look = store.look  # SQLite only: a trusted device's login on the reactor
    checker.thread_look = store.thread_look  # PostgreSQL: the same, in one thread, one read
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
        parts.workers,
        runner,
        in_flight,
    )


def build_components(
    config: Config, *, reactor: Any = None, local_delivery: IMessageDelivery | None = None
) -> Components:
    """Both steps at once, for protocol-only use with ``build_factory``. Raises ConfigError.

    Nothing is started: start ``components.workers`` (the login threads) yourself, and
    note that without ``build_service`` no queue runner sends mail for other domains
    and nothing writes the audit log or the failure budgets.
    """
    parts = prepare(config, reactor if reactor is not None else global_reactor())
    return open_components(config, parts, local_delivery)


def build_factory(
    config: Config,
    implicit_tls: bool = False,
    components: Components | None = None,
    *,
    reactor: Any = None,
) -> IProtocolFactory:
    """A protocol factory for one listener; with ``implicit_tls`` wrapped in TLS (port 465).

    Protocol-only: for a whole server (queue runner, housekeeping, login threads) use
    ``build_service``.
    """
    reactor = reactor if reactor is not None else global_reactor()
    parts = components or build_components(config, reactor=reactor)
    factory = SubmissionFactory(
        config,
        parts.portal,
        parts.tls_context,
        server_key=parts.server_key,
        implicit_tls=implicit_tls,
        sessions=parts.sessions,
        reactor=reactor,
    )
    factory.events = parts.events
    if implicit_tls:
        return TLSMemoryBIOFactory(parts.tls_context, False, factory)
    return factory
