"""The ``clientid-mta`` administration command: accounts, devices, the queue, DKIM keys,
and ``send`` for scripts.

Changes are written to the passwd file and the device store, which the running
server re-reads, so they take effect without a restart. Secrets (passwords, device
tokens) are read from standard input or a prompt, never from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TextIO

from clientid_mta.auth.passwd_file import (
    Account,
    PasswdFile,
    PasswdFileError,
    UnreadableLine,
    address_problem,
    hash_password,
    normalise_address,
    parse_accounts,
)
from clientid_mta.cli import as_json as as_json_rows
from clientid_mta.cli import store_admin
from clientid_mta.config import Config, ConfigError, load_config
from clientid_mta.devices.audit import THROTTLED, unknown_account
from clientid_mta.devices.backends import open_stores
from clientid_mta.devices.keys import load_or_create_server_key
from clientid_mta.devices.postgres_store import KeyMismatch
from clientid_mta.devices.store import (
    REVOKED,
    TRUSTED,
    BadFingerprint,
    DeviceNotFound,
    Stores,
    StoreUnavailable,
    parse_fingerprint,
)
from clientid_mta.devices.store_copy import CopyRefused
from clientid_mta.outbound.admin import QueueAdmin, QueueAdminError
from clientid_mta.outbound.queue import QueueDir
from clientid_mta.smtp.addresses import AddressSyntaxError, parse_path
from clientid_mta.smtp.clientid import (
    ClientIdSyntaxError,
    device_key,
    parse_clientid,
)


class AdminError(Exception):
    """Ends the command with its message and exit status 1."""


def _read_secret(prompt: str, confirm: bool, stdin: TextIO) -> str:
    if stdin.isatty():
        first = getpass.getpass(f"{prompt}: ")
        if confirm and getpass.getpass(f"{prompt} (again): ") != first:
            raise AdminError("the two entries differ; nothing was changed")
        secret = first
    else:
        secret = stdin.readline().rstrip("\r\n")
    if not secret:
        raise AdminError(f"empty {prompt.lower()}; nothing was changed")
    return secret


def _address(text: str) -> str:
    try:
        path = parse_path(f"TO:<{text}>".encode(), "TO", allow_null=False)
    except (AddressSyntaxError, UnicodeEncodeError):
        raise AdminError(f"{text!r} is not an e-mail address like alice@example.org") from None
    return normalise_address(path.address)


def _storable(text: str, account: bool) -> str:
    """An address the passwd file can hold, as an account (also a Maildir folder) or
    as a send-as entry; AdminError with one clear line otherwise."""
    if account or text != "*":
        address = _address(text)
        problem = address_problem(address, account)
        if problem is not None:
            role = "an account" if account else "a send-as address"
            raise AdminError(f"{text!r} cannot be {role}: {problem}; nothing was changed")
        return address
    return text


# Lines of the passwd file the server cannot read are kept, commented out, on a rewrite
# (never silently dropped: a typo must not cost the account its hash).
KEPT_PREFIX = "#! unreadable, kept by clientid-mta: "


class Admin:
    def __init__(self, config: Config, out: TextIO, stdin: TextIO) -> None:
        self.config = config
        self.out = out
        self.stdin = stdin
        seven_fields = config.auth.passwd_format == "dovecot"  # noqa: S105 (a form's name)
        self.passwd = PasswdFile(config.auth.passwd_file, seven_fields=seven_fields)

    @contextlib.contextmanager
    def _stores(self) -> Iterator[Stores]:
        # A shared store checks the key too (when this node has one), so that a device
        # added here gets the key the nodes use.
        key_file = self.config.clientid.key_file
        shared = self.config.store.url and key_file.exists()
        stores = open_stores(self.config, load_or_create_server_key(key_file) if shared else None)
        try:
            yield stores
        finally:
            stores.close()

    def _existing(self, address: str) -> Account:
        account = self.passwd.get(address)
        if account is None:
            raise AdminError(f"no account {address}; add it with: clientid-mta user add {address}")
        return account

    def _replace(self, address: str, account: Account | None) -> None:
        others = [a for a in self.passwd.accounts() if a.address != address]
        try:
            self.passwd.save(others + ([account] if account else []), self._kept_lines())
        except PasswdFileError as problem:
            raise AdminError(f"cannot write {address}: {problem}; nothing was changed") from None

    def _passwd_bytes(self) -> bytes:
        try:
            return self.passwd.path.read_bytes()
        except FileNotFoundError:
            return b""

    def _warn_unreadable(self, data: bytes, consequence: str) -> list[UnreadableLine]:
        """The lines the server skips, each with a warning: the server's own warning is
        in its log, which whoever runs this command may not be reading."""
        unreadable = parse_accounts(data)[1]
        for line in unreadable:
            print(
                f"clientid-mta: warning: {self.passwd.path} {line.reason}: {consequence}",
                file=sys.stderr,
            )
        return unreadable

    def _kept_lines(self) -> list[str]:
        """Comments for the lines of the file the server skips (see KEPT_PREFIX)."""
        data = self._passwd_bytes()
        kept = [
            line
            for line in data.decode("utf-8", "backslashreplace").splitlines()
            if line.startswith(KEPT_PREFIX)
        ]
        for line in self._warn_unreadable(data, "kept as a comment"):
            kept.append(KEPT_PREFIX + _printable(line.text))
        return kept

    # --- users -------------------------------------------------------------------

    def user_add(self, address: str, send_as: list[str]) -> None:
        address = _storable(address, account=True)
        if self.passwd.get(address) is not None:
            raise AdminError(f"{address} exists already; change its password with: user passwd")
        aliases = frozenset(_storable(a, account=False) for a in send_as)
        password = _read_secret("Password", True, self.stdin)
        self._replace(address, Account(address, hash_password(password), aliases))
        print(f"added {address}", file=self.out)

    def user_passwd(self, address: str) -> None:
        account = self._existing(_address(address))
        password = _read_secret("Password", True, self.stdin)
        # replace(): a seven-field line keeps its Dovecot fields
        self._replace(account.address, replace(account, password_hash=hash_password(password)))
        print(f"changed the password of {account.address}", file=self.out)

    def user_send_as(self, address: str, send_as: list[str]) -> None:
        account = self._existing(_address(address))
        aliases = frozenset(_storable(a, account=False) for a in send_as)
        self._replace(account.address, replace(account, send_as=aliases))
        print(
            f"{account.address} may send as: {', '.join(sorted(aliases)) or '(itself only)'}",
            file=self.out,
        )

    def user_del(self, address: str) -> None:
        account = self._existing(_address(address))
        self._replace(account.address, None)
        with self._stores() as stores:
            removed = stores.devices.delete_account(account.address)
        print(f"deleted {account.address} and its {removed} device record(s)", file=self.out)

    def user_list(self, as_json: bool = False) -> None:
        self._warn_unreadable(self._passwd_bytes(), "skipped")
        if as_json:
            as_json_rows.emit(self.out, as_json_rows.accounts(self.passwd.accounts()))
            return
        for account in self.passwd.accounts():
            extra = f"  send-as: {','.join(sorted(account.send_as))}" if account.send_as else ""
            print(f"{account.address}{extra}", file=self.out)

    # --- devices -----------------------------------------------------------------

    def device_list(self, address: str, as_json: bool = False) -> None:
        address = _address(address)
        with self._stores() as stores:
            devices = stores.devices.devices_of(address)
        if as_json:
            as_json_rows.emit(self.out, as_json_rows.devices(devices))
            return
        if not devices:
            print(f"{address} has no devices yet", file=self.out)
            return
        row = "{:<17} {:<16} {:<8} {:>6}  {:<16} {:<17} {:<17} {}"
        print(
            row.format(
                "FINGERPRINT",
                "TYPE",
                "STATE",
                "LOGINS",
                "LABEL",
                "FIRST SEEN",
                "LAST SEEN",
                "LAST NETWORK",
            ),
            file=self.out,
        )
        for d in devices:
            print(
                row.format(
                    d.fingerprint,
                    d.type,
                    d.state,
                    d.logins,
                    d.label or "-",
                    _when(d.first_seen),
                    _when(d.last_seen),
                    d.last_network or "-",
                ),
                file=self.out,
            )

    def device_add(self, address: str, client_type: str, label: str) -> None:
        address = self._existing(_address(address)).address
        token = _read_secret("Token", False, self.stdin)
        try:
            identity = parse_clientid(f"{client_type} {token}".encode("ascii"))
        except (ClientIdSyntaxError, UnicodeEncodeError) as bad:
            raise AdminError(f"not a valid client identity: {bad}") from None
        key = load_or_create_server_key(self.config.clientid.key_file)
        with self._stores() as stores:
            device = stores.devices.add_trusted(
                address, device_key(key, identity), identity.type, label
            )
        print(f"trusted device {device.fingerprint} ({device.type}) for {address}", file=self.out)

    def set_device_state(self, address: str, fingerprint: str, state: str, verb: str) -> None:
        address = _address(address)
        fingerprint = _fingerprint(fingerprint)
        with self._stores() as stores:
            try:
                device = stores.devices.set_state(address, fingerprint, state)
            except DeviceNotFound as missing:
                raise AdminError(f"{missing}; see: clientid-mta device list {address}") from None
        print(f"{verb} device {device.fingerprint} of {address}", file=self.out)

    def device_unflag(self, fingerprint: str) -> None:
        fingerprint = _fingerprint(fingerprint)
        with self._stores() as stores:
            removed = stores.shared_devices.unflag(fingerprint)
        if not removed:
            raise AdminError(f"no flagged device matches {fingerprint}")
        print(f"cleared the shared-device flag of {fingerprint}", file=self.out)

    def audit(
        self, account: str | None, device: str | None, since: str | None, as_json: bool = False
    ) -> None:
        account = self._audited_account(_address(account)) if account else None
        device = _fingerprint(device) if device is not None else None
        since_time = parse_since(since) if since else None
        with self._stores() as stores:
            entries = stores.audit.audit(account=account, fingerprint=device, since=since_time)
        if as_json:
            as_json_rows.emit(self.out, as_json_rows.audit(entries))
            return
        row = "{:<19} {:<9} {:<30} {:<17} {:<18} {}"
        print(
            row.format("TIME", "OUTCOME", "ACCOUNT", "DEVICE", "NETWORK", "REASON"), file=self.out
        )
        throttled_reply = self.config.throttle.action
        for e in entries:
            if not e.account:  # a count per minute, network, device and reason
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.time))
                reply = throttled_reply if e.outcome == THROTTLED else "535"
                outcome, account = f"{reply} x {e.count}", "*"
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
                outcome, account = e.outcome, _printable(e.account)  # never break a line
            print(
                row.format(when, outcome, account, e.fingerprint or "-", e.network, e.reason),
                file=self.out,
            )

    def _audited_account(self, address: str) -> str:
        """How the audit keeps ``address``: as is if it is an account here, else as the
        keyed hash of the text (what the server stored when a client typed it)."""
        key_file = self.config.clientid.key_file
        if self.passwd.get(address) is not None or not key_file.exists():
            return address
        return unknown_account(address, load_or_create_server_key(key_file))

    def device_label(self, address: str, fingerprint: str, text: str) -> None:
        address = _address(address)
        fingerprint = _fingerprint(fingerprint)
        with self._stores() as stores:
            try:
                device = stores.devices.set_label(address, fingerprint, text)
            except DeviceNotFound as missing:
                raise AdminError(str(missing)) from None
        print(f"labelled device {device.fingerprint} of {address}: {text}", file=self.out)


def parse_since(text: str, now: float | None = None) -> float:
    """``2h``, ``30m``, ``7d``, ``90s`` ago, or a local ISO date/time like ``2026-11-23T08:00``."""
    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return now - int(text[:-1]) * units[text[-1]]
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise AdminError(
            f"--since {text!r}: give a duration like 2h, 30m, 7d, or a date like 2026-11-23"
        ) from None


def _fingerprint(text: str) -> str:
    """A fingerprint as typed: hex only, or ``%`` and ``_`` could match every device."""
    try:
        return parse_fingerprint(text)
    except BadFingerprint as bad:
        raise AdminError(str(bad)) from None


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON array, for scripts")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clientid-mta", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", help="TOML config file (default: built-in defaults)")
    groups = parser.add_subparsers(dest="group", required=True)

    user = groups.add_parser("user", help="accounts").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="add an account; the password is read from stdin or prompted")
    add.add_argument("address")
    add.add_argument("--send-as", default="", help="comma-separated extra sender addresses, or *")
    user.add_parser("passwd", help="change an account's password").add_argument("address")
    send_as = user.add_parser("send-as", help="set the extra sender addresses of an account")
    send_as.add_argument("address")
    send_as.add_argument("send_as", nargs="*", help="addresses, or * for any")
    user.add_parser("del", help="delete an account and its device records").add_argument("address")
    _json_option(user.add_parser("list", help="list accounts"))

    device = groups.add_parser("device", help="client identities").add_subparsers(
        dest="action", required=True
    )
    device_list = device.add_parser("list", help="an account's devices")
    device_list.add_argument("address")
    _json_option(device_list)
    dadd = device.add_parser("add", help="trust a device; its token is read from stdin or prompted")
    dadd.add_argument("address")
    dadd.add_argument("type", help="the CLIENTID type, e.g. UUID")
    dadd.add_argument("--label", default="")
    for name, text in (
        ("approve", "trust a pending device"),
        ("revoke", "refuse a device from now on"),
    ):
        sub = device.add_parser(name, help=text)
        sub.add_argument("address")
        sub.add_argument("fingerprint")
    device.add_parser("unflag", help="clear a device's shared-device flag").add_argument(
        "fingerprint"
    )
    audit = groups.add_parser("audit", help="AUTH attempts: who, which device, outcome, why")
    audit.add_argument("--account", help="only this account (as typed)")
    audit.add_argument("--device", help="only this device fingerprint (or a prefix)")
    audit.add_argument("--since", help="2h, 30m, 7d, or a date/time like 2026-11-23T08:00")
    _json_option(audit)
    label = device.add_parser("label", help="name a device")
    label.add_argument("address")
    label.add_argument("fingerprint")
    label.add_argument("text")

    queue = groups.add_parser("queue", help="the outbound queue").add_subparsers(
        dest="action", required=True
    )
    _json_option(
        queue.add_parser("list", help="entries: id, age, sender, each recipient's state and error")
    )
    queue.add_parser("flush", help="retry now (one entry, or all)").add_argument("id", nargs="?")
    queue.add_parser("delete", help="drop an entry without a bounce").add_argument("id")
    queue.add_parser("bounce", help="give up on an entry and bounce it").add_argument("id")
    dkim = groups.add_parser("dkim", help="DKIM keys").add_subparsers(dest="action", required=True)
    dkim.add_parser("keygen", help="write a key and print its DNS record", add_help=False)
    groups.add_parser("send", help="send a message from stdin (for scripts)", add_help=False)
    store_admin.add_parser(groups)
    return parser


def run(argv: Sequence[str], out: TextIO, stdin: TextIO) -> int:
    args, rest = _parser().parse_known_args(argv)
    if args.group == "send":  # needs no config: it talks to any submission server
        from clientid_mta.cli.send import send_command

        return send_command(rest)
    if args.group == "dkim":  # keygen parses its own arguments
        from clientid_mta.outbound.dkim import keygen_command

        return keygen_command(rest, load_config(args.config).server.data_dir)
    if rest:
        _parser().parse_args(argv)  # reports the unknown arguments and exits 2
    config = load_config(args.config)
    if args.group == "queue":
        queue_admin = QueueAdmin(QueueDir(config.queue_config.directory), out)
        if args.action == "list":
            queue_admin.list(as_json=args.json)
        else:
            queue_admin.change(args.action, args.id or "")
        return 0
    if args.group == "store":
        store_admin.run(config, args, out)
        return 0
    admin = Admin(config, out, stdin)
    actions: dict[tuple[str, str | None], Callable[[], None]] = {
        ("user", "add"): lambda: admin.user_add(
            args.address, [a for a in args.send_as.split(",") if a]
        ),
        ("user", "passwd"): lambda: admin.user_passwd(args.address),
        ("user", "send-as"): lambda: admin.user_send_as(args.address, args.send_as),
        ("user", "del"): lambda: admin.user_del(args.address),
        ("user", "list"): lambda: admin.user_list(args.json),
        ("device", "list"): lambda: admin.device_list(args.address, args.json),
        ("device", "add"): lambda: admin.device_add(args.address, args.type, args.label),
        ("device", "approve"): lambda: admin.set_device_state(
            args.address, args.fingerprint, TRUSTED, "approved"
        ),
        ("device", "revoke"): lambda: admin.set_device_state(
            args.address, args.fingerprint, REVOKED, "revoked"
        ),
        ("device", "label"): lambda: admin.device_label(args.address, args.fingerprint, args.text),
        ("device", "unflag"): lambda: admin.device_unflag(args.fingerprint),
        ("audit", None): lambda: admin.audit(args.account, args.device, args.since, args.json),
    }
    actions[(args.group, getattr(args, "action", None))]()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv, sys.stdout, sys.stdin)
    except (
        AdminError,
        ConfigError,
        QueueAdminError,
        store_admin.StoreAdminError,
        KeyMismatch,
        CopyRefused,
    ) as problem:
        print(f"clientid-mta: {problem}", file=sys.stderr)
        return 1
    except (OSError, StoreUnavailable, sqlite3.Error) as problem:
        print(f"clientid-mta: cannot read or write the server's state: {problem}", file=sys.stderr)
        return 1
