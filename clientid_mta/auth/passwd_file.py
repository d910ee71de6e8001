"""The password file and password hash verification.

Format (one account a line, Dovecot passwd-file style, ``#`` comments)::

    alice@example.org:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$...[:send-as]

``send-as`` is optional: a comma-separated list of further addresses the account may
use as sender, or ``*`` for any. Schemes: ``{ARGON2ID}`` (what we write) and
``{BLF-CRYPT}``/``{BCRYPT}`` (accepted). The file is re-read when it changes, so
``clientid-mta user ...`` takes effect on a running server.

Hash verification is slow on purpose: callers run ``verify_password`` in a thread.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Account:
    address: str
    password_hash: str
    send_as: frozenset[str] = frozenset()

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


def parse_line(line: str, lineno: int) -> Account | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    fields = text.split(":")
    if len(fields) < 2 or "@" not in fields[0] or not fields[1].startswith("{"):
        raise PasswdFileError(f"line {lineno}: expected address:{{SCHEME}}hash[:send-as]")
    send_as = frozenset(
        normalise_address(a) for a in (fields[2].split(",") if len(fields) > 2 else []) if a.strip()
    )
    return Account(normalise_address(fields[0]), fields[1], send_as)


def format_line(account: Account) -> str:
    extra = ":" + ",".join(sorted(account.send_as)) if account.send_as else ""
    return f"{account.address}:{account.password_hash}{extra}\n"


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

    def __init__(self, path: Path) -> None:
        self.path = path
        self._refresh_lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._accounts: dict[str, Account] = {}  # replaced whole, never changed in place
        self._next_check = 0.0
        self._refreshing = False
        self._broken: str | None = None  # the last read error, logged once

    def refresh(self) -> bool:
        """Re-read the file if it changed; True if the snapshot was replaced. Blocking."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            signature = None
        else:
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
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
        accounts: dict[str, Account] = {}
        with open(self.path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                account = parse_line(line, lineno)
                if account is not None:
                    accounts[account.address] = account
        return accounts

    def get(self, address: str) -> Account | None:
        return self._current().get(normalise_address(address))

    def accounts(self) -> list[Account]:
        return sorted(self._current().values(), key=lambda a: a.address)

    def domains(self) -> frozenset[str]:
        return frozenset(a.domain for a in self._current().values())

    # --- writing (the admin command) -------------------------------------------

    def save(self, accounts: list[Account]) -> None:
        """Replace the file atomically: write, fsync, rename, fsync the folder."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("# clientid-mta accounts: address:{SCHEME}hash[:send-as]\n")
            for account in sorted(accounts, key=lambda a: a.address):
                handle.write(format_line(account))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
