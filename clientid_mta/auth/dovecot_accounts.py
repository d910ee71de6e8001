"""The accounts when Dovecot checks the passwords (``[auth] backend = "dovecot"``).

Dovecot's auth-client protocol answers "is this password right", not "does this user
exist", so the accounts we know are:

- the accounts of our passwd file, if it has any (one file can serve both: Dovecot as
  passdb, us as accounts with their send-as lists);
- the addresses of the send-as file (``[auth] send_as_file``), one line each:
  ``alice@example.org:sales@example.org,info@example.org`` (``*``: any sender);
- every account Dovecot accepted a password for since the server started.

Only these get notices, a Maildir, or are local recipients; a name nobody ever logged
in with costs nothing to remember, so a client cannot grow this set by guessing.
"""

from __future__ import annotations

import threading
from pathlib import Path

from twisted.logger import Logger

from clientid_mta.auth.passwd_file import (
    Account,
    PasswdFile,
    PasswdFileError,
    address_problem,
    normalise_address,
)

log = Logger()

# The stored hash of an account whose password only Dovecot knows: it verifies nothing.
DOVECOT_HASH = "{DOVECOT}-"


def parse_send_as_line(line: str, lineno: int) -> Account | None:
    """``address:alias,alias`` as an account whose password Dovecot checks."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    address, _, aliases = text.partition(":")
    address = normalise_address(address)
    problem = address_problem(address, account=True)
    if problem is not None:
        raise PasswdFileError(f"line {lineno}: the account: {problem}")
    send_as: set[str] = set()
    for alias in (normalise_address(a) for a in aliases.split(",")):
        if alias and alias != "*" and address_problem(alias) is not None:
            raise PasswdFileError(f"line {lineno}: a send-as address: {address_problem(alias)}")
        if alias:
            send_as.add(alias)
    return Account(address, DOVECOT_HASH, frozenset(send_as))


class SendAsFile(PasswdFile):
    """The send-as lists of Dovecot users, re-read when the file changes."""

    def _read(self) -> dict[str, Account]:
        accounts: dict[str, Account] = {}
        for lineno, raw in enumerate(self.path.read_bytes().split(b"\n"), 1):
            try:
                account = parse_send_as_line(raw.decode("utf-8"), lineno)
            except (UnicodeDecodeError, PasswdFileError) as problem:
                self._skipped(lineno, str(problem))
                continue
            if account is not None:
                accounts[account.address] = account
        return accounts

    def _skipped(self, lineno: int, reason: str) -> None:
        log.warn("send-as file {path}: skipped {reason}", path=str(self.path), reason=reason)


class DovecotAccounts(PasswdFile):
    """Our passwd file, the send-as file and the accounts Dovecot accepted, as one."""

    def __init__(self, passwd: Path, send_as: Path | None) -> None:
        super().__init__(passwd)
        self.send_as = SendAsFile(send_as) if send_as is not None else None
        self._learned: dict[str, Account] = {}  # replaced whole, never changed in place
        self._learn_lock = threading.Lock()

    def accounts(self) -> list[Account]:
        merged = dict(self._learned)
        if self.send_as is not None:
            merged.update((a.address, a) for a in self.send_as.accounts())
        merged.update((a.address, a) for a in super().accounts())  # the passwd file wins
        return sorted(merged.values(), key=lambda a: a.address)

    def domains(self) -> frozenset[str]:
        return frozenset(a.domain for a in self.accounts())

    def get(self, address: str) -> Account | None:
        address = normalise_address(address)
        found = super().get(address)
        if found is None and self.send_as is not None:
            found = self.send_as.get(address)
        return found if found is not None else self._learned.get(address)

    def learn(self, address: str) -> Account | None:
        """Dovecot accepted a password for ``address`` (under that very name): from now on
        it is an account. None for a name that cannot be an account address."""
        address = normalise_address(address)
        known = self.get(address)
        if known is not None:
            return known
        if address_problem(address, account=True) is not None:
            return None
        account = Account(address, DOVECOT_HASH)
        with self._learn_lock:
            self._learned = {**self._learned, address: account}
        return account
