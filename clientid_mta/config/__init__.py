"""Load and validate the TOML configuration.

Every key has a built-in default, so the server runs with no file at all. A mistake
in the file stops the start with one ConfigError whose message names the key and
says how to fix it. Relative paths (and the defaults that are paths) resolve against
the config file's folder, or the current folder when no file is given.
"""

from __future__ import annotations

import fnmatch
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString

POLICIES = ("off", "observe", "tofu", "allowlist")
TYPE_FLAGS = ("ignore", "debug", "syslog", "userlog", "auth", "alert-fail", "alert-success")
DEFAULT_TYPE_FLAGS = ("syslog", "userlog", "auth")

DEFAULT_SUBMISSION = "tcp:8587:interface=127.0.0.1"
DEFAULT_SUBMISSIONS = "tcp:8465:interface=127.0.0.1"


class ConfigError(Exception):
    """A configuration mistake; str() is one sentence naming the key and the fix."""


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    data_dir: Path
    received_header_ip: bool = False
    workers: int = 0  # processes serving the ports; 0: one per CPU

    @property
    def worker_count(self) -> int:
        import os

        return self.workers or len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class ListenConfig:
    submission: str
    submissions: str


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path | None
    key: Path | None


@dataclass(frozen=True)
class AuthConfig:
    passwd_file: Path
    max_failures_per_session: int = 3
    cache_ttl: int = 3600  # seconds a verified (account, password) pair is remembered; 0: off
    cache_size: int = 10000


@dataclass(frozen=True)
class ClientIdConfig:
    enabled: bool
    policy: str
    allow_without_clientid: bool
    pipelining: bool
    key_file: Path
    device_store: Path
    # (pattern, flags) in file order; the first matching pattern wins.
    types: tuple[tuple[str, frozenset[str]], ...] = ()
    default_flags: frozenset[str] = frozenset(DEFAULT_TYPE_FLAGS)

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
    local_domains: tuple[str, ...] | None
    maildir_root: Path


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


@dataclass(frozen=True)
class ThrottleConfig:
    """Token buckets for failed AUTH attempts (a burst, then one back every ``refill`` s)."""

    enabled: bool = True
    action: str = "454"  # "454": refuse the attempt; "421": refuse and close
    device_burst: int = 10
    device_refill: int = 60
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
    window: int = 3600  # 0: never compare
    geoip_database: Path | None = None
    refuse: bool = False


@dataclass(frozen=True)
class AlertsConfig:
    postmaster: str = ""  # "": postmaster@<hostname>
    max_per_account_per_hour: int = 10
    unknown_failures: int = 5


@dataclass(frozen=True)
class AuditConfig:
    retention_days: int = 90


@dataclass(frozen=True)
class ApprovalConfig:
    localpart: str = "device-approval"
    code_lifetime: int = 86400


@dataclass(frozen=True)
class RelayConfig:
    """How mail for other domains leaves: a smarthost, or the recipient domain's MX."""

    smarthost: str = ""  # "host:port"; "": deliver to the MX of each recipient domain
    tls: str = "required"  # required (verified certificate) | opportunistic
    username: str = ""
    password_file: Path | None = None
    client_id: str = ""  # the token sent as our own CLIENTID upstream, when advertised
    client_id_type: str = "UUID"
    ca_file: Path | None = None  # trust roots; None: the system's
    helo_name: str = ""  # "": [server] hostname
    mx_port: int = 25
    nameservers: tuple[str, ...] = ()  # "host:port"; (): /etc/resolv.conf
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
    directory: Path
    retry_schedule: tuple[int, ...] = (60, 300, 900, 3600, 7200)  # the last one repeats
    max_queue_time: int = 5 * 86400
    delay_notice_after: int = 0  # 0: no delay notices


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    key: Path


@dataclass(frozen=True)
class Config:
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
    approval: ApprovalConfig = ApprovalConfig()
    relay: RelayConfig = RelayConfig()
    queue: QueueConfig | None = None
    dkim: tuple[DkimKey, ...] = ()
    source: Path | None = None

    @property
    def queue_config(self) -> QueueConfig:
        return self.queue or QueueConfig(directory=self.server.data_dir / "queue")

    def dkim_key(self, domain: str) -> DkimKey | None:
        return next((k for k in self.dkim if k.domain == domain.lower()), None)

    @property
    def postmaster(self) -> str:
        return self.alerts.postmaster or f"postmaster@{self.server.hostname}"

    @property
    def generated_tls_dir(self) -> Path:
        return self.server.data_dir / "tls"


# --- the schema -----------------------------------------------------------------
# Each key: (checker, default). A checker turns the raw TOML value into the typed
# value or raises _Bad with what was expected. Path defaults are callables of the
# data_dir so that moving data_dir moves everything under it.


class _Bad(Exception):
    pass


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad("must be a string")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("must be true or false")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _Bad("must be a positive whole number")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad("must be a whole number, 0 or more")
    return value


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise _Bad("must be a port number from 1 to 65535")
    return value


def _host_port(value: Any) -> str:
    text = _str(value)
    if text == "":
        return text
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _Bad(f'must be "host:port", e.g. "smtp.provider.example:587", not {text!r}')
    return text


def _host_ports(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Bad('must be a list like ["127.0.0.1:53"]')
    return tuple(_host_port(v) for v in value if v)


def _retry_schedule(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _Bad("must be a non-empty list of seconds, e.g. [60, 300, 900, 3600, 7200]")
    return tuple(_positive_int(v) for v in value)


def _choice(*choices: str) -> Checker:
    def check(value: Any) -> str:
        text = _str(value)
        if text not in choices:
            raise _Bad("must be one of " + ", ".join(f'"{c}"' for c in choices))
        return text

    return check


def _address_or_empty(value: Any) -> str:
    text = _str(value).strip().lower()
    if text and (text.count("@") != 1 or " " in text):
        raise _Bad('must be an e-mail address such as "postmaster@example.org", or ""')
    return text


def _localpart(value: Any) -> str:
    text = _str(value).strip().lower()
    if not text or not all(c.isalnum() or c in "-_." for c in text):
        raise _Bad('must be a local part such as "device-approval"')
    return text


def _hostname(value: Any) -> str:
    text = _str(value).strip().rstrip(".")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
    if not text or not set(text) <= allowed or ".." in text:
        raise _Bad('must be a DNS host name such as "mail.example.org"')
    return text


def _policy(value: Any) -> str:
    text = _str(value)
    if text not in POLICIES:
        raise _Bad("must be one of " + ", ".join(f'"{p}"' for p in POLICIES))
    return text


def _domains(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Bad('must be a list of domain names such as ["example.org"]')
    return tuple(_hostname(v).lower() for v in value)


def _endpoint(value: Any) -> str:
    text = _str(value)
    if text == "":
        return text  # an empty description turns that listener off
    try:
        serverFromString(reactor, text)
    except Exception as error:  # strports raises many kinds; all mean "bad description"
        raise _Bad(
            f'is not a Twisted endpoint description ({error}); write e.g. "tcp:587" '
            'or "tcp:587:interface=127.0.0.1", or "" to turn it off'
        ) from None
    return text


Checker = Callable[[Any], Any]
Default = Any  # a value, or a callable of data_dir for paths

_PATH = object()  # marker: this key is a path, resolved against the config folder

SCHEMA: dict[str, dict[str, tuple[Checker | object, Default]]] = {
    "server": {
        "hostname": (_hostname, lambda _d: socket.getfqdn()),
        "data_dir": (_PATH, lambda _d: Path("clientid-mta-data")),
        "received_header_ip": (_bool, False),
        "workers": (_count, ServerConfig.workers),
    },
    "listen": {
        "submission": (_endpoint, DEFAULT_SUBMISSION),
        "submissions": (_endpoint, DEFAULT_SUBMISSIONS),
    },
    "tls": {
        "certificate": (_PATH, None),
        "key": (_PATH, None),
    },
    "auth": {
        "passwd_file": (_PATH, lambda d: d / "passwd"),
        "max_failures_per_session": (_positive_int, 3),
        "cache_ttl": (_count, AuthConfig.cache_ttl),
        "cache_size": (_positive_int, AuthConfig.cache_size),
    },
    "clientid": {
        "enabled": (_bool, True),
        "policy": (_policy, "tofu"),
        "allow_without_clientid": (_bool, True),
        "pipelining": (_bool, False),
        "key_file": (_PATH, lambda d: d / "clientid.key"),
        "device_store": (_PATH, lambda d: d / "devices.sqlite3"),
    },
    "delivery": {
        "local_domains": (_domains, None),
        "maildir_root": (_PATH, lambda d: d / "mail"),
    },
    "limits": {
        "max_message_size": (_positive_int, LimitsConfig.max_message_size),
        "max_line_length": (_positive_int, LimitsConfig.max_line_length),
        "max_recipients": (_positive_int, LimitsConfig.max_recipients),
        "command_timeout": (_positive_int, LimitsConfig.command_timeout),
        "data_timeout": (_positive_int, LimitsConfig.data_timeout),
        "max_errors": (_positive_int, LimitsConfig.max_errors),
        "max_sessions": (_positive_int, LimitsConfig.max_sessions),
        "max_sessions_per_address": (_positive_int, LimitsConfig.max_sessions_per_address),
        "max_sessions_per_device": (_positive_int, LimitsConfig.max_sessions_per_device),
    },
    "throttle": {
        "enabled": (_bool, ThrottleConfig.enabled),
        "action": (_choice("454", "421"), ThrottleConfig.action),
        "device_burst": (_positive_int, ThrottleConfig.device_burst),
        "device_refill": (_positive_int, ThrottleConfig.device_refill),
        "account_unknown_burst": (_positive_int, ThrottleConfig.account_unknown_burst),
        "account_unknown_refill": (_positive_int, ThrottleConfig.account_unknown_refill),
        "account_known_burst": (_positive_int, ThrottleConfig.account_known_burst),
        "account_known_refill": (_positive_int, ThrottleConfig.account_known_refill),
    },
    "shared_devices": {
        "max_accounts": (_positive_int, SharedDevicesConfig.max_accounts),
        "window": (_positive_int, SharedDevicesConfig.window),
        "block": (_bool, SharedDevicesConfig.block),
    },
    "travel": {
        "window": (_count, TravelConfig.window),
        "geoip_database": (_PATH, None),
        "refuse": (_bool, TravelConfig.refuse),
    },
    "alerts": {
        "postmaster": (_address_or_empty, AlertsConfig.postmaster),
        "max_per_account_per_hour": (_positive_int, AlertsConfig.max_per_account_per_hour),
        "unknown_failures": (_positive_int, AlertsConfig.unknown_failures),
    },
    "audit": {
        "retention_days": (_positive_int, AuditConfig.retention_days),
    },
    "approval": {
        "localpart": (_localpart, ApprovalConfig.localpart),
        "code_lifetime": (_positive_int, ApprovalConfig.code_lifetime),
    },
    "relay": {
        "smarthost": (_host_port, RelayConfig.smarthost),
        "tls": (_choice("required", "opportunistic"), RelayConfig.tls),
        "username": (_str, RelayConfig.username),
        "password_file": (_PATH, None),
        "client_id": (_str, RelayConfig.client_id),
        "client_id_type": (_str, RelayConfig.client_id_type),
        "ca_file": (_PATH, None),
        "helo_name": (_str, RelayConfig.helo_name),
        "mx_port": (_port, RelayConfig.mx_port),
        "nameservers": (_host_ports, RelayConfig.nameservers),
        "max_connections": (_positive_int, RelayConfig.max_connections),
        "max_per_destination": (_positive_int, RelayConfig.max_per_destination),
        "connect_timeout": (_positive_int, RelayConfig.connect_timeout),
        "command_timeout": (_positive_int, RelayConfig.command_timeout),
    },
    "queue": {
        "directory": (_PATH, lambda d: d / "queue"),
        "retry_schedule": (_retry_schedule, QueueConfig.retry_schedule),
        "max_queue_time": (_positive_int, QueueConfig.max_queue_time),
        "delay_notice_after": (_count, QueueConfig.delay_notice_after),
    },
    # [dkim."example.org"] tables, parsed by _dkim_keys; no plain keys.
    "dkim": {},
}


def _closest(word: str, choices: list[str]) -> str:
    import difflib

    match = difflib.get_close_matches(word, choices, n=1)
    return f' (did you mean "{match[0]}"?)' if match else ""


def _section_values(name: str, raw: Any, base: Path, data_dir: Path | None) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: [{name}] must be a table, not a single value.")
    schema = SCHEMA[name]
    nested = {"clientid": set(raw) & {"types"}, "dkim": set(raw)}.get(name, set())
    extra = set(raw) - set(schema) - nested
    for key in sorted(extra):
        raise ConfigError(
            f'config error: [{name}] has an unknown key "{key}"{_closest(key, list(schema))}; '
            f"known keys are: {', '.join(schema)}."
        )
    values: dict[str, Any] = {}
    for key, (checker, default) in schema.items():
        if key in raw:
            value = raw[key]
            if checker is _PATH:
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"config error: [{name}] {key} must be a file path string.")
                try:
                    path = Path(value).expanduser()
                except RuntimeError:  # ~user for a user that does not exist
                    raise ConfigError(
                        f"config error: [{name}] {key}: {value!r} names a home folder that "
                        "does not exist; write the full path."
                    ) from None
                values[key] = path if path.is_absolute() else base / path
                continue
            try:
                values[key] = checker(value)  # type: ignore[operator]
            except _Bad as bad:
                raise ConfigError(f"config error: [{name}] {key} {bad}.") from None
        else:
            if callable(default):
                value = default(data_dir if data_dir is not None else base)
                if isinstance(value, Path) and not value.is_absolute():
                    value = base / value
                values[key] = value
            else:
                values[key] = default
    return values


def _type_flags(raw: Any) -> tuple[tuple[tuple[str, frozenset[str]], ...], frozenset[str]]:
    """Parse [clientid.types."<name or glob>"] tables; "default" covers unknown types."""
    if not isinstance(raw, dict):
        raise ConfigError(
            'config error: [clientid.types] must hold tables like [clientid.types."UUID"].'
        )
    entries: list[tuple[str, frozenset[str]]] = []
    default = frozenset(DEFAULT_TYPE_FLAGS)
    for pattern, table in raw.items():
        where = f'[clientid.types."{pattern}"]'
        if not isinstance(table, dict) or set(table) - {"flags"}:
            raise ConfigError(f"config error: {where} takes one key, flags = [...].")
        flags = table.get("flags", [])
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise ConfigError(f"config error: {where} flags must be a list of strings.")
        unknown = [f for f in flags if f not in TYPE_FLAGS]
        if unknown:
            raise ConfigError(
                f'config error: {where} flags has unknown flag "{unknown[0]}"; '
                f"known flags are: {', '.join(TYPE_FLAGS)}."
            )
        if pattern.lower() == "default":
            default = frozenset(flags)
        else:
            entries.append((pattern, frozenset(flags)))
    return tuple(entries), default


def _dkim_keys(raw: Any, base: Path) -> tuple[DkimKey, ...]:
    """Parse [dkim."<domain>"] tables: selector = "...", key = "path/to/private.pem"."""
    if not isinstance(raw, dict):
        raise ConfigError('config error: [dkim] must hold tables like [dkim."example.org"].')
    keys = []
    for domain, table in raw.items():
        where = f'[dkim."{domain}"]'
        if not isinstance(table, dict) or set(table) != {"selector", "key"}:
            raise ConfigError(
                f'config error: {where} needs exactly two keys, selector = "..." and '
                'key = "path to the private key" (make one with: clientid-mta dkim keygen).'
            )
        selector, key = table["selector"], table["key"]
        if not isinstance(selector, str) or not selector or not isinstance(key, str) or not key:
            raise ConfigError(f"config error: {where} selector and key must be non-empty strings.")
        path = Path(key).expanduser()
        keys.append(DkimKey(domain.lower(), selector, path if path.is_absolute() else base / path))
    return tuple(keys)


def load_config(path: str | Path | None = None) -> Config:
    """Read the TOML file at ``path`` (or use the built-in defaults when None)."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    source: Path | None = None
    if path is not None:
        source = Path(path).expanduser().absolute()
        base = source.parent
        try:
            with open(source, "rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config error: the config file {source} does not exist.") from None
        except OSError as error:
            raise ConfigError(f"config error: cannot read {source}: {error.strerror}.") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config error: {source} is not valid TOML: {error}.") from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"config error: {source} is not UTF-8 text; save it as UTF-8."
            ) from None
        except RecursionError:
            raise ConfigError(f"config error: {source} nests tables or lists too deeply.") from None
    for name in sorted(set(raw) - set(SCHEMA)):
        raise ConfigError(
            f"config error: unknown section [{name}]{_closest(name, list(SCHEMA))}; "
            f"known sections are: {', '.join(f'[{s}]' for s in SCHEMA)}."
        )

    server = _section_values("server", raw.get("server", {}), base, None)
    data_dir: Path = server["data_dir"]
    sections = {
        name: _section_values(name, raw.get(name, {}), base, data_dir)
        for name in SCHEMA
        if name != "server"
    }
    tls = sections["tls"]
    if (tls["certificate"] is None) != (tls["key"] is None):
        missing = "key" if tls["key"] is None else "certificate"
        raise ConfigError(
            f"config error: [tls] {missing} is missing; set both certificate and key, "
            "or neither to use a generated self-signed certificate."
        )
    types, default_flags = _type_flags(raw.get("clientid", {}).get("types", {}))
    return Config(
        server=ServerConfig(**server),
        listen=ListenConfig(**sections["listen"]),
        tls=TLSConfig(**tls),
        auth=AuthConfig(**sections["auth"]),
        clientid=ClientIdConfig(**sections["clientid"], types=types, default_flags=default_flags),
        delivery=DeliveryConfig(**sections["delivery"]),
        limits=LimitsConfig(**sections["limits"]),
        throttle=ThrottleConfig(**sections["throttle"]),
        shared_devices=SharedDevicesConfig(**sections["shared_devices"]),
        travel=TravelConfig(**sections["travel"]),
        alerts=AlertsConfig(**sections["alerts"]),
        audit=AuditConfig(**sections["audit"]),
        approval=ApprovalConfig(**sections["approval"]),
        relay=_relay(sections["relay"]),
        queue=QueueConfig(**sections["queue"]),
        dkim=_dkim_keys(raw.get("dkim", {}), base),
        source=source,
    )


def _relay(values: dict[str, Any]) -> RelayConfig:
    relay = RelayConfig(**values)
    if relay.username and relay.password_file is None:
        raise ConfigError(
            "config error: [relay] username is set but password_file is not; put the "
            "smarthost password in a file readable only by the server and name it there."
        )
    if relay.client_id and not relay.smarthost:
        raise ConfigError(
            "config error: [relay] client_id needs a smarthost; set smarthost, or remove client_id."
        )
    return relay


def check_server_files(config: Config) -> None:
    """Files the server needs that an operator named must exist (defaults are created)."""
    named = [
        ("tls", "certificate", config.tls.certificate),
        ("tls", "key", config.tls.key),
        ("travel", "geoip_database", config.travel.geoip_database),
        ("relay", "password_file", config.relay.password_file),
        ("relay", "ca_file", config.relay.ca_file),
        *(("dkim", f'"{k.domain}" key', k.key) for k in config.dkim),
    ]
    if config.source is not None:
        raw_auth = _raw_keys(config.source).get("auth", {})
        if "passwd_file" in raw_auth:
            named.append(("auth", "passwd_file", config.auth.passwd_file))
    for section, key, path in named:
        if path is not None and not path.is_file():
            hints = {
                "passwd_file": f" create it with: clientid-mta --config {config.source} user add"
                " ADDRESS",
                "geoip_database": " point it at a MaxMind .mmdb file, or remove the key",
            }
            hint = hints.get(key, " point it at an existing PEM file")
            raise ConfigError(f"config error: [{section}] {key}: {path} does not exist;{hint}.")


def _raw_keys(source: Path) -> dict[str, Any]:
    with open(source, "rb") as handle:
        return tomllib.load(handle)
