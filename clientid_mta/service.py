"""Assemble the server from a Config: the pieces, the factories, the twistd service.

This is the embedding API: a Twisted program calls ``build_factory(config)`` and
listens with the result, or adds ``build_service(config)`` to its application.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.cred.portal import Portal
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from clientid_mta.alerts import Notifier
from clientid_mta.clientid import load_or_create_server_key
from clientid_mta.config import Config, ConfigError, check_server_files
from clientid_mta.cred import build_portal
from clientid_mta.delivery import LocalRouter, delivery_factory
from clientid_mta.devices import DevicePolicy
from clientid_mta.esmtp import SubmissionFactory
from clientid_mta.maildir import MaildirRoot
from clientid_mta.passwords import PasswdFile
from clientid_mta.store import SQLiteDeviceStore
from clientid_mta.tls import generate_self_signed, server_context

log = Logger()


@dataclass
class Components:
    """Everything one server needs, shared by both listeners."""

    config: Config
    passwords: PasswdFile
    store: SQLiteDeviceStore
    maildirs: MaildirRoot
    portal: Portal
    server_key: bytes
    tls_context: Any


def build_components(config: Config) -> Components:
    """Create data_dir, the key, the store and the TLS context. Raises ConfigError."""
    check_server_files(config)
    try:
        config.server.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        server_key = load_or_create_server_key(config.clientid.key_file)
        store = SQLiteDeviceStore(config.clientid.device_store)
    except (OSError, ValueError) as problem:
        raise ConfigError(
            f"config error: [server] data_dir: cannot set up state: {problem}."
        ) from None
    if config.tls.certificate is None or config.tls.key is None:
        certificate, key = generate_self_signed(config.generated_tls_dir, config.server.hostname)
    else:
        certificate, key = config.tls.certificate, config.tls.key
    passwords = PasswdFile(config.auth.passwd_file)
    maildirs = MaildirRoot(config.delivery.maildir_root)
    router = LocalRouter(passwords, config.delivery.local_domains, maildirs)
    policy = DevicePolicy(
        config.clientid, store, server_key, Notifier(maildirs, config.server.hostname)
    )
    portal = build_portal(passwords, policy, delivery_factory(passwords, router))
    return Components(
        config, passwords, store, maildirs, portal, server_key, server_context(certificate, key)
    )


def build_factory(
    config: Config, implicit_tls: bool = False, components: Components | None = None
) -> IProtocolFactory:
    """A factory for one listener; with ``implicit_tls`` it is wrapped in TLS (port 465)."""
    parts = components or build_components(config)
    factory = SubmissionFactory(
        parts.portal,
        config.server.hostname,
        parts.tls_context,
        config.clientid,
        config.limits,
        server_key=parts.server_key,
        implicit_tls=implicit_tls,
        max_auth_failures=config.auth.max_failures_per_session,
        received_header_ip=config.server.received_header_ip,
    )
    if implicit_tls:
        return TLSMemoryBIOFactory(parts.tls_context, False, factory)
    return factory


class SubmissionService(service.MultiService):
    """Both listeners, and a start-up report of where everything is."""

    exit_on_listen_error = False  # twistd sets it: a busy port ends the start with one line

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.components = build_components(config)
        for key, implicit in (("submission", False), ("submissions", True)):
            description = getattr(config.listen, key)
            if not description:
                continue
            endpoint = serverFromString(reactor, description)
            listener = StreamServerEndpointService(
                endpoint, build_factory(config, implicit, self.components)
            )
            listener._raiseSynchronously = True
            listener.setName(key)
            listener.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as problem:
            names = {child.name: getattr(self.config.listen, child.name) for child in self}
            where = ", ".join(f"{name} = {value!r}" for name, value in names.items())
            message = (
                f"config error: [listen] cannot listen on port {problem.port} "
                f"({problem.socketError}); check that no other server uses it and that this "
                f"user may bind it ({where})."
            )
            if self.exit_on_listen_error:
                raise SystemExit(f"clientid-mta: {message}") from None
            raise ConfigError(message) from None

    def listening(self) -> defer.Deferred[dict[str, IListeningPort]]:
        """Fires with {listener name: port} once both listeners are bound (port 0 works)."""
        names = [child.name for child in self]
        waits = [child._waitingForPort for child in self]  # set by startService
        bound = defer.gatherResults(waits)
        return bound.addCallback(lambda ports: dict(zip(names, ports, strict=True)))

    def startService(self) -> None:
        config = self.config
        super().startService()
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
        result = super().stopService()
        self.components.store.close()
        return result


def build_service(config: Config) -> SubmissionService:
    return SubmissionService(config)
