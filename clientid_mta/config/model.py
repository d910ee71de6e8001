"""The settings, one frozen dataclass per TOML section: each key is defined once, here.

A field is a key of its section. Its type says how the loader checks it (``bool``,
``str``, ``int`` = a positive whole number, ``Path`` = a path relative to the config
file's folder) and its default is the key's default. What a type cannot say goes in
``field(metadata=setting(...))``: another check (a range, a list of choices, an
endpoint description), a default file inside ``[server] data_dir``, or that the field
is not a plain key. The loader (``load.py``) and its key list (``schema.py``) are
derived from these fields, so adding a field here is all it takes to add a key (and a
row in the README's tables, which a test compares).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clientid_mta.config import checks
from clientid_mta.config.checks import Check

POLICIES = ("off", "observe", "tofu", "allowlist")
TYPE_FLAGS = ("ignore", "debug", "syslog", "userlog", "auth", "alert-fail", "alert-success")
DEFAULT_TYPE_FLAGS = ("syslog", "userlog", "auth")

DEFAULT_SUBMISSION = "tcp:8587:interface=127.0.0.1"
DEFAULT_SUBMISSIONS = "tcp:8465:interface=127.0.0.1"

SETTING = "clientid_mta.config"  # the key of a field's metadata that holds its Setting


@dataclass(frozen=True)
class Setting:
    """What a field's type cannot say about its key."""

    check: Check | None = None  # None: the check for the field's type (checks.for_type)
    # The default is this file inside [server] data_dir, so moving data_dir moves it.
    in_data_dir: str | None = None
    # Filled from named sub-tables ([clientid.types."UUID"]) by a parser in load.py.
    sub_tables: bool = False
    # Not a key of the file: why not, and where the value comes from.
    not_a_key: str | None = None


def setting(
    *,
    check: Check | None = None,
    in_data_dir: str | None = None,
    sub_tables: bool = False,
    not_a_key: str | None = None,
) -> dict[str, Setting]:
    """The metadata of a field: ``field(default=0, metadata=setting(check=checks.count))``.

    A path inside data_dir has no default of its own (it depends on data_dir): declare it
    ``field(kw_only=True, metadata=setting(in_data_dir="name"))``.
    """
    return {SETTING: Setting(check, in_data_dir, sub_tables, not_a_key)}


def setting_of(item: dataclasses.Field[Any]) -> Setting:
    found = item.metadata.get(SETTING, Setting())
    assert isinstance(found, Setting)
    return found


def default_in_data_dir(section: type, key: str, data_dir: Path) -> Path:
    """The default of a key whose file lives in data_dir (``setting(in_data_dir=...)``)."""
    name = setting_of(next(f for f in dataclasses.fields(section) if f.name == key)).in_data_dir
    assert name is not None, f"{section.__name__}.{key} has no default in data_dir"
    return data_dir / name


def _this_host() -> str:
    return socket.getfqdn()  # looked up at each load, so a test can patch socket.getfqdn


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = field(default_factory=_this_host, metadata=setting(check=checks.hostname))
    data_dir: Path = Path("clientid-mta-data")
    received_header_ip: bool = False
    # processes serving the ports; 0: one per CPU
    workers: int = field(default=0, metadata=setting(check=checks.count))

    @property
    def worker_count(self) -> int:
        import os

        return self.workers or len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class ListenConfig:
    submission: str = field(default=DEFAULT_SUBMISSION, metadata=setting(check=checks.endpoint))
    submissions: str = field(default=DEFAULT_SUBMISSIONS, metadata=setting(check=checks.endpoint))
    # each connection starts with a PROXY header (v1 or v2) from a proxy in proxy_from
    submission_proxy_protocol: bool = False
    submissions_proxy_protocol: bool = False
    proxy_from: tuple[str, ...] = field(
        default=("127.0.0.1/32", "::1/128"), metadata=setting(check=checks.networks)
    )

    def proxy_protocol(self, listener: str) -> bool:
        """Does the listener named ``listener`` ("submission", "submissions") expect it?"""
        return bool(getattr(self, f"{listener}_proxy_protocol"))


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class AuthConfig:
    passwd_file: Path = field(kw_only=True, metadata=setting(in_data_dir="passwd"))
    max_failures_per_session: int = 3
    # seconds a verified (account, password) pair is remembered; 0: off
    cache_ttl: int = field(default=3600, metadata=setting(check=checks.count))
    cache_size: int = 10000
    # "passwd-file": our hashes; "dovecot": Dovecot's auth service checks the passwords
    backend: str = field(
        default="passwd-file", metadata=setting(check=checks.one_of("passwd-file", "dovecot"))
    )
    # Dovecot's auth-client socket: "/run/dovecot/auth-client" or "tcp:host:port"
    dovecot_socket: str = field(default="", metadata=setting(check=checks.socket_address))
    dovecot_timeout: int = 5  # seconds to connect or get an answer, then 454
    # Dovecot's auth_failure_delay: a device refusal waits as long as a wrong password
    dovecot_failure_delay: int = field(default=2, metadata=setting(check=checks.count))
    # send-as lists of Dovecot users, "address:alias,alias" a line
    send_as_file: Path | None = None
    # how the admin command writes passwd_file: "short" (address:hash[:send-as]) or
    # "dovecot" (Dovecot's seven fields, send-as as the extra field send_as=)
    passwd_format: str = field(
        default="short", metadata=setting(check=checks.one_of("short", "dovecot"))
    )


@dataclass(frozen=True)
class ClientIdConfig:
    enabled: bool = True
    policy: str = field(default="tofu", metadata=setting(check=checks.one_of(*POLICIES)))
    allow_without_clientid: bool = True
    pipelining: bool = False
    key_file: Path = field(kw_only=True, metadata=setting(in_data_dir="clientid.key"))
    device_store: Path = field(kw_only=True, metadata=setting(in_data_dir="devices.sqlite3"))
    # (pattern, flags) in file order; the first matching pattern wins.
    types: tuple[tuple[str, frozenset[str]], ...] = field(
        default=(), metadata=setting(sub_tables=True)
    )
    default_flags: frozenset[str] = field(
        default=frozenset(DEFAULT_TYPE_FLAGS),
        metadata=setting(not_a_key='from the [clientid.types."default"] table'),
    )

    def flags_for(self, client_type: str) -> frozenset[str]:
        """The handling flags (draft 6.5) for a CLIENTID type, matched without case."""
        upper = client_type.upper()
        for pattern, flags in self.types:
            if fnmatch.fnmatchcase(upper, pattern.upper()):
                return flags
        return self.default_flags

    @property
    def advertised(self) -> bool:
        return self.enabled and self.policy != "off"


@dataclass(frozen=True)
class DeliveryConfig:
    # None: every domain that has a user in the passwd file is local.
    local_domains: tuple[str, ...] | None = field(
        default=None, metadata=setting(check=checks.domains)
    )
    maildir_root: Path = field(kw_only=True, metadata=setting(in_data_dir="mail"))
    # local mail by LMTP: "/run/dovecot/lmtp" or "tcp:127.0.0.1:24"; "": Maildir
    lmtp: str = field(default="", metadata=setting(check=checks.socket_address))
    lmtp_connections: int = 10  # kept open to Dovecot at most (each is an lmtp process)
    # a message with one local copy is written by a helper process, not a thread: more
    # messages a second under load, a longer tail at the end of DATA (issue 16, round 5)
    store_process: bool = False


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int = 26214400
    max_line_length: int = 8192
    max_recipients: int = 100
    command_timeout: int = 300
    data_timeout: int = 600
    max_errors: int = 20
    max_sessions: int = 1000
    max_sessions_per_address: int = 20
    max_sessions_per_device: int = 5
    # per account and hour, counted across the worker processes; 0: no limit
    max_messages_per_hour: int = field(default=1000, metadata=setting(check=checks.count))
    max_recipients_per_hour: int = field(default=5000, metadata=setting(check=checks.count))


@dataclass(frozen=True)
class ThrottleConfig:
    """Token buckets for failed AUTH attempts (a burst, then one back every ``refill`` s)."""

    enabled: bool = True
    # "454": refuse the attempt; "421": refuse and close
    action: str = field(default="454", metadata=setting(check=checks.one_of("454", "421")))
    device_burst: int = 10
    device_refill: int = 60
    # Sized in the README ([throttle]): newcomers behind one CGNAT address vs. argon2id CPU.
    network_burst: int = 10
    network_refill: int = 30
    # Waiting included: a few newcomers logging in at once from one network wait, not 454.
    network_checks: int = 8
    usual_network_days: int = 30
    account_unknown_burst: int = 20
    account_unknown_refill: int = 30
    account_known_burst: int = 10
    account_known_refill: int = 60


@dataclass(frozen=True)
class SharedDevicesConfig:
    max_accounts: int = 5
    window: int = 3600
    block: bool = False


@dataclass(frozen=True)
class TravelConfig:
    # 0: never compare
    window: int = field(default=3600, metadata=setting(check=checks.count))
    geoip_database: Path | None = None
    refuse: bool = False


@dataclass(frozen=True)
class AlertsConfig:
    # "": postmaster@<hostname>
    postmaster: str = field(default="", metadata=setting(check=checks.address_or_empty))
    max_per_account_per_hour: int = 10
    unknown_failures: int = 5


@dataclass(frozen=True)
class AuditConfig:
    retention_days: int = 90
    # entries kept at most (and as many per-minute counts of throttled attempts)
    max_entries: int = 1_000_000


@dataclass(frozen=True)
class StoreConfig:
    """Where devices, budgets, the audit and approval codes live: the SQLite file
    [clientid] device_store, or one PostgreSQL database shared by several nodes."""

    # "": SQLite under data_dir; a libpq URI or key/value string: PostgreSQL
    url: str = field(default="", metadata=setting(check=checks.database_url))
    password_file: Path | None = None  # None: none, or libpq's PGPASSFILE
    pool_size: int = 10  # connections to the database at most, per process


@dataclass(frozen=True)
class ApprovalConfig:
    localpart: str = field(default="device-approval", metadata=setting(check=checks.localpart))
    code_lifetime: int = 86400


@dataclass(frozen=True)
class RelayConfig:
    """How mail for other domains leaves: a smarthost, or the recipient domain's MX."""

    # "host:port"; "": deliver to the MX of each recipient domain
    smarthost: str = field(default="", metadata=setting(check=checks.host_port))
    # required (verified certificate) | opportunistic
    tls: str = field(
        default="required", metadata=setting(check=checks.one_of("required", "opportunistic"))
    )
    username: str = ""
    password_file: Path | None = None
    client_id: str = ""  # the token sent as our own CLIENTID upstream, when advertised
    client_id_type: str = "UUID"
    ca_file: Path | None = None  # trust roots; None: the system's
    helo_name: str = ""  # "": [server] hostname
    mx_port: int = field(default=25, metadata=setting(check=checks.port))
    # "host:port"; (): /etc/resolv.conf
    nameservers: tuple[str, ...] = field(default=(), metadata=setting(check=checks.host_ports))
    max_connections: int = 20
    max_per_destination: int = 10
    connect_timeout: int = 30
    command_timeout: int = 300

    @property
    def smarthost_address(self) -> tuple[str, int] | None:
        if not self.smarthost:
            return None
        host, _, port = self.smarthost.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class QueueConfig:
    directory: Path = field(kw_only=True, metadata=setting(in_data_dir="queue"))
    # waits after each temporary failure; the last one repeats
    retry_schedule: tuple[int, ...] = field(
        default=(60, 300, 900, 3600, 7200), metadata=setting(check=checks.retry_schedule)
    )
    max_queue_time: int = 5 * 86400
    # 0: no delay notices
    delay_notice_after: int = field(default=0, metadata=setting(check=checks.count))


@dataclass(frozen=True)
class MetricsConfig:
    # endpoint for /metrics and /healthz/*; "": off
    listen: str = field(default="", metadata=setting(check=checks.endpoint))


@dataclass(frozen=True)
class LogConfig:
    # text | json (one object per line)
    format: str = field(default="text", metadata=setting(check=checks.one_of("text", "json")))


@dataclass(frozen=True)
class DkimKey:
    """One [dkim."<domain>"] table."""

    domain: str = field(metadata=setting(not_a_key="the name of the table"))
    selector: str
    key: Path


@dataclass(frozen=True)
class Config:
    """The whole file: each field whose type is a dataclass above is a [section]."""

    server: ServerConfig
    listen: ListenConfig
    tls: TLSConfig
    auth: AuthConfig
    clientid: ClientIdConfig
    delivery: DeliveryConfig
    limits: LimitsConfig
    throttle: ThrottleConfig = ThrottleConfig()
    shared_devices: SharedDevicesConfig = SharedDevicesConfig()
    travel: TravelConfig = TravelConfig()
    alerts: AlertsConfig = AlertsConfig()
    audit: AuditConfig = AuditConfig()
    store: StoreConfig = StoreConfig()
    approval: ApprovalConfig = ApprovalConfig()
    relay: RelayConfig = RelayConfig()
    queue: QueueConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    dkim: tuple[DkimKey, ...] = field(default=(), metadata=setting(sub_tables=True))
    source: Path | None = field(
        default=None, metadata=setting(not_a_key="the file load_config read")
    )

    @property
    def queue_config(self) -> QueueConfig:
        """[queue]; a Config built by hand without it gets the defaults."""
        directory = default_in_data_dir(QueueConfig, "directory", self.server.data_dir)
        return self.queue or QueueConfig(directory=directory)

    def dkim_key(self, domain: str) -> DkimKey | None:
        return next((k for k in self.dkim if k.domain == domain.lower()), None)

    @property
    def postmaster(self) -> str:
        return self.alerts.postmaster or f"postmaster@{self.server.hostname}"

    @property
    def generated_tls_dir(self) -> Path:
        return self.server.data_dir / "tls"
