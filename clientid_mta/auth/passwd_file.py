"""The password file and password hash verification.

Format (one account a line, Dovecot passwd-file style, ``#`` comments)::

    alice@example.org:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$...[:send-as]

``send-as`` is optional: a comma-separated list of further addresses the account may
use as sender, or ``*`` for any.

Dovecot's own seven-field form is read too, so that one file can serve Dovecot as
passdb and userdb and us as accounts::

    alice@example.org:{ARGON2ID}$...:uid:gid:gecos:home:shell:send_as=a@x,b@x quota=1G

Fields 3 to 7 (any may be empty) and the extra fields other than ``send_as=`` are
Dovecot's: kept as read and written back unchanged. ``[auth] passwd_format =
"dovecot"`` makes the writer use this form for every line.

Schemes: ``{ARGON2ID}`` (what we write) and ``{BLF-CRYPT}``/``{BCRYPT}`` (accepted).
The file is re-read when it changes, so ``clientid-mta user ...`` takes effect on a
running server.

Addresses are plain ``local@domain.name`` (a dot-atom local part, no quoting, no
domain literal), lower case: then no address can hold the ``:`` and ``,`` that
separate the fields, and every account's local part is a safe Maildir folder name.
The writer refuses what the reader would not read back identically, and the reader
skips (and logs) a line it cannot read instead of failing the whole file.

Hash verification is slow on purpose: callers run ``verify_password`` in a thread.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import argon2
import bcrypt
from twisted.internet import threads
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.failure import Failure

log = Logger()

_hasher = argon2.PasswordHasher()

# Verified against when the account does not exist, so an unknown user costs the
# same time as a wrong password (docs/conformance.md, row C12: same timing class).
_DUMMY_HASH = "{ARGON2ID}" + _hasher.hash("clientid-mta timing equaliser")


class PasswdFileError(ValueError):
    """A line of the password file cannot be understood."""


SEVEN_FIELDS = 7  # user:hash:uid:gid:gecos:home:shell, then Dovecot's extra fields
SEND_AS_FIELD = "send_as="


@dataclass(frozen=True)
class DovecotFields:
    """What a seven-field line holds for Dovecot alone, kept to be written back."""

    userdb: tuple[str, ...] = ("", "", "", "", "")  # uid, gid, gecos, home, shell
    extra: tuple[str, ...] = ()  # extra fields other than send_as=, in file order


@dataclass(frozen=True)
class Account:
    address: str
    password_hash: str
    send_as: frozenset[str] = frozenset()
    # Set for an account read from (or to be written in) Dovecot's seven-field form.
    dovecot: DovecotFields | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def localpart(self) -> str:
        return self.address.rpartition("@")[0]

    def may_send_as(self, address: str) -> bool:
        address = address.lower()
        return address == self.address or "*" in self.send_as or address in self.send_as


def normalise_address(address: str) -> str:
    return address.strip().lower()


def hash_password(password: str) -> str:
    """A new ``{ARGON2ID}`` hash (slow: call it off the reactor)."""
    return "{ARGON2ID}" + _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """True when ``password`` matches ``stored``; constant work for a missing account.

    Both libraries compare digests in constant time.
    """
    candidate = stored if stored is not None else _DUMMY_HASH
    scheme, _, encoded = candidate.partition("}")
    scheme = scheme.lstrip("{").upper()
    ok: bool
    try:
        if scheme in ("ARGON2ID", "ARGON2I", "ARGON2"):
            ok = _hasher.verify(encoded, password)
        elif scheme in ("BLF-CRYPT", "BCRYPT"):
            ok = bcrypt.checkpw(password.encode("utf-8"), encoded.encode("ascii"))
        else:
            ok = False
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError, ValueError):
        ok = False
    return ok and stored is not None


_ATOM = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ADDRESS_RE = re.compile(rf"(?P<local>{_ATOM}(?:\.{_ATOM})*)@{_LABEL}(?:\.{_LABEL})*\Z")
_HASH_RE = re.compile(r"\{[A-Za-z0-9-]+\}[\x21-\x39\x3b-\x7e]+\Z")  # printable, no ':'
MAX_ADDRESS = 254
MAX_LOCALPART = 64


def address_problem(address: str, account: bool = False) -> str | None:
    """Why ``address`` (normalised) cannot be stored, as an account if ``account``
    (which must also be a mailbox folder and cannot start a comment), or None."""
    match = _ADDRESS_RE.match(address)
    if match is None or len(address) > MAX_ADDRESS or len(match["local"]) > MAX_LOCALPART:
        return "only plain addresses like alice@example.org (no quotes, no [literal])"
    if account and "/" in match["local"]:
        return "a '/' cannot be part of a mailbox name"
    if account and address.startswith("#"):
        return "an account cannot start with '#'"
    return None


def _address(text: str, lineno: int, account: bool) -> str:
    address = normalise_address(text)
    problem = address_problem(address, account)
    if problem is not None:
        # No text from the line: a mangled line may hold part of a hash here.
        role = "the account" if account else "a send-as address"
        raise PasswdFileError(f"line {lineno}: {role}: {problem}")
    return address


def parse_line(line: str, lineno: int) -> Account | None:
    """The account on one line, None for a comment or blank line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    fields = text.split(":")
    if len(fields) >= SEVEN_FIELDS:
        return _seven_fields(fields, lineno)
    while len(fields) > 2 and not fields[-1]:
        fields.pop()  # trailing empty fields say nothing
    if len(fields) not in (2, 3):
        raise PasswdFileError(
            f"line {lineno}: expected address:{{SCHEME}}hash[:send-as], or Dovecot's "
            "user:hash:uid:gid:gecos:home:shell:extra_fields"
        )
    address, password_hash = _address_and_hash(fields, lineno)
    send_as = _send_as(fields[2] if len(fields) > 2 else "", lineno)
    return Account(address, password_hash, send_as)


def _address_and_hash(fields: list[str], lineno: int) -> tuple[str, str]:
    if not _HASH_RE.match(fields[1]):
        raise PasswdFileError(f"line {lineno}: the hash must look like {{SCHEME}}...")
    return _address(fields[0], lineno, account=True), fields[1]


def _send_as(text: str, lineno: int) -> frozenset[str]:
    return frozenset(
        entry if entry == "*" else _address(entry, lineno, account=False)
        for entry in (a.strip() for a in text.split(","))
        if entry
    )


def _seven_fields(fields: list[str], lineno: int) -> Account:
    """Dovecot's form; the extra fields (which may hold ':') are the rest of the line."""
    address, password_hash = _address_and_hash(fields, lineno)
    userdb = tuple(fields[2:SEVEN_FIELDS])
    send_as: frozenset[str] = frozenset()
    extra = []
    for item in ":".join(fields[SEVEN_FIELDS:]).split():
        if item.startswith(SEND_AS_FIELD):
            send_as = _send_as(item[len(SEND_AS_FIELD) :], lineno)
        else:
            extra.append(item)
    return Account(address, password_hash, send_as, DovecotFields(userdb, tuple(extra)))


def format_line(account: Account, seven_fields: bool = False) -> str:
    """The account's line (Dovecot's seven-field form if it was read so, or if
    ``seven_fields``); PasswdFileError if the reader would not read it back as is."""
    if seven_fields and account.dovecot is None:
        account = replace(account, dovecot=DovecotFields())
    if account.dovecot is not None:
        send_as = [SEND_AS_FIELD + ",".join(sorted(account.send_as))] if account.send_as else []
        extra = " ".join(send_as + list(account.dovecot.extra))
        userdb = ":".join(account.dovecot.userdb)
        line = f"{account.address}:{account.password_hash}:{userdb}:{extra}"
    else:
        extra = ":" + ",".join(sorted(account.send_as)) if account.send_as else ""
        line = f"{account.address}:{account.password_hash}{extra}"
    if "\n" in line or "\r" in line:
        raise PasswdFileError(f"{account.address!r}: line breaks cannot be stored")
    if parse_line(line, 0) != account:  # e.g. upper case, an empty or '*'-like alias
        raise PasswdFileError(f"{account.address!r}: the account would not read back as given")
    return line + "\n"


@dataclass(frozen=True)
class UnreadableLine:
    lineno: int
    reason: str
    text: str  # as found, undecodable bytes escaped


def parse_accounts(data: bytes) -> tuple[dict[str, Account], list[UnreadableLine]]:
    """The accounts of a whole file, and the lines that had to be skipped: one bad line
    (a hand edit, an older writer) must never take the other accounts down with it."""
    accounts: dict[str, Account] = {}
    unreadable: list[UnreadableLine] = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            account = parse_line(raw.decode("utf-8"), lineno)
        except UnicodeDecodeError:
            reason = f"line {lineno}: not UTF-8"
        except PasswdFileError as problem:
            reason = str(problem)
        else:
            if account is not None:
                accounts[account.address] = account
            continue
        text = raw.rstrip(b"\r").decode("utf-8", "backslashreplace")
        unreadable.append(UnreadableLine(lineno, reason, text))
    return accounts, unreadable


class PasswdFile:
    """The accounts in a passwd file, re-read whenever the file changes on disk.

    Readers get an in-memory snapshot. On the reactor thread nothing touches the disk:
    at most once a second a thread checks the file's inode, mtime and size and swaps
    in a new snapshot if they changed, so the admin command's writes show within a
    second. Any other thread (the login checks, the admin command, start-up) checks
    the file itself before reading, so a login right after ``user add`` sees the
    account. Readers never take a lock; only concurrent refreshes share one.
    """

    CHECK_INTERVAL = 1.0  # seconds between the reactor's look-ups of the file

    def __init__(self, path: Path, seven_fields: bool = False) -> None:
        self.path = path
        self.seven_fields = seven_fields  # the writer's form ([auth] passwd_format)
        self._refresh_lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._accounts: dict[str, Account] = {}  # replaced whole, never changed in place
        self._next_check = 0.0
        self._refreshing = False
        self._broken: str | None = None  # the last read error, logged once

    def _signature_now(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def is_current(self) -> bool:
        """Whether the snapshot is the file as it is now: one ``stat``, no read. For the
        quick login on the reactor (issue 16), which must see a password change at once
        as the login threads do, and sends the login to a thread when the file changed."""
        try:
            return self._signature_now() == self._signature and self._signature is not None
        except OSError:
            return False

    def refresh(self) -> bool:
        """Re-read the file if it changed; True if the snapshot was replaced. Blocking."""
        signature = self._signature_now()
        with self._refresh_lock:
            if signature == self._signature:
                return False
            accounts = self._read() if signature is not None else {}
            self._accounts, self._signature = accounts, signature
            return True

    def _current(self) -> dict[str, Account]:
        if threadable.isInIOThread():
            self._refresh_soon()
        else:
            self.refresh()
        return self._accounts

    def _refresh_soon(self) -> None:
        """On the reactor: start a refresh in a thread if the last look is a second old."""
        now = time.monotonic()
        if self._refreshing or now < self._next_check:
            return
        self._refreshing, self._next_check = True, now + self.CHECK_INTERVAL
        done = threads.deferToThread(self.refresh)
        done.addCallbacks(self._refreshed, self._refresh_failed)

    def _refreshed(self, _changed: bool) -> None:
        self._refreshing = False
        if self._broken is not None:
            self._broken = None
            log.info("passwd file {path} is readable again", path=str(self.path))

    def _refresh_failed(self, failure: Failure) -> None:
        """Keep serving the last good snapshot; say so once per distinct problem."""
        self._refreshing = False
        problem = str(failure.value)
        if problem != self._broken:
            self._broken = problem
            log.error(
                "cannot read passwd file {path}, keeping the accounts read before: {problem}",
                path=str(self.path),
                problem=problem,
            )

    def _read(self) -> dict[str, Account]:
        accounts, unreadable = parse_accounts(self.path.read_bytes())
        for line in unreadable:  # the reason names the line; never the line (it has a hash)
            log.warn(
                "passwd file {path}: skipped {reason}",
                path=str(self.path),
                lineno=line.lineno,
                reason=line.reason,
            )
        return accounts

    def get(self, address: str) -> Account | None:
        return self._current().get(normalise_address(address))

    def accounts(self) -> list[Account]:
        return sorted(self._current().values(), key=lambda a: a.address)

    def domains(self) -> frozenset[str]:
        return frozenset(a.domain for a in self._current().values())

    # --- writing (the admin command) -------------------------------------------

    def save(self, accounts: list[Account], comments: Sequence[str] = ()) -> None:
        """Replace the file atomically: write, fsync, rename, fsync the folder.

        Every line is checked before the file is touched: an account the reader would
        not read back raises PasswdFileError and the old file stays. ``comments`` are
        written after the header, each as one ``#`` line.
        """
        ordered = sorted(accounts, key=lambda a: a.address)
        lines = [format_line(account, self.seven_fields) for account in ordered]
        notes = ["#" + " ".join(c.lstrip("#").splitlines()) + "\n" for c in comments]
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(
                "# clientid-mta accounts: address:{SCHEME}hash:uid:gid:gecos:home:shell:"
                "send_as=...\n"
                if self.seven_fields
                else "# clientid-mta accounts: address:{SCHEME}hash[:send-as]\n"
            )
            handle.writelines(notes + lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
