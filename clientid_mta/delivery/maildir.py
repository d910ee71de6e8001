"""Durable Maildir delivery (docs/conformance.md, S11).

A message is written to ``tmp/``, then fsynced, renamed into ``new/``, and ``new/``
is fsynced: only then does the caller reply 250. A crash at any moment leaves either
nothing in ``new/`` or the whole message; half-written files stay in ``tmp/``.

Layout: ``<root>/<domain>/<localpart>/{tmp,new,cur}``, created on first delivery and
never reached through a symbolic link that leaves the root.
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from twisted.internet import defer
from zope.interface import implementer

from clientid_mta.delivery.durable import DurableFile, fsync_dir
from clientid_mta.delivery.spool import LateFile
from clientid_mta.smtp.errors import LocalDeliveryError
from clientid_mta.smtp.staging import IStagedMessage

if TYPE_CHECKING:
    from clientid_mta.delivery.store_process import StoreProcess

_counter = itertools.count()

TMP_MAX_AGE = 36 * 3600  # seconds a file may stay in tmp/ before it is a crash's leftover


class Mailboxes(Protocol):
    """Where whole messages for local accounts go: Maildir, or Dovecot by LMTP."""

    def deliver_bytes(self, domain: str, localpart: str, data: bytes) -> object:
        """Deliver durably, or raise. Blocking: call it from a thread."""


class UnsafeMailboxName(LocalDeliveryError, ValueError):
    """A domain or local part that cannot be a folder name under the root."""


def _safe_component(text: str) -> str:
    if (
        not text
        or text.startswith(".")
        or any(c in text for c in "/\\\0")
        or any(ord(c) < 0x20 for c in text)
        or len(text) > 255
    ):
        raise UnsafeMailboxName(f"{text!r} cannot be a mailbox folder name")
    return text


class _NameParts:
    """What a file name repeats: the host and the pid, looked up once per process (each
    look-up is a system call in a store thread), and a generator for the R part. The R
    part only keeps two names apart, which the time, pid and counter already do; it
    need not be secret, and ``O_EXCL`` refuses a clash anyway."""

    def __init__(self) -> None:
        self.host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
        self.pid = os.getpid()
        self.random = random.Random(secrets.randbits(128))


_parts: _NameParts | None = None


def _forget_parts() -> None:
    global _parts
    _parts = None  # a forked child has another pid and must not repeat the R sequence


os.register_at_fork(after_in_child=_forget_parts)


def _unique_name() -> str:
    global _parts
    parts = _parts
    if parts is None:
        parts = _parts = _NameParts()
    now = time.time()
    return (
        f"{int(now)}.M{int((now % 1) * 1e6)}P{parts.pid}Q{next(_counter)}"
        f"R{parts.random.getrandbits(64):016x}.{parts.host}"
    )


class MaildirRoot:
    """All the account Maildirs under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._checked: set[Path] = set()  # Maildirs already created and found inside root

    def maildir(self, domain: str, localpart: str) -> Path:
        """The account's Maildir, created (durably) if needed. Blocking."""
        root = self.root
        path = root / _safe_component(domain.lower()) / _safe_component(localpart.lower())
        if path in self._checked:
            return path  # the realpath checks cost two lstat chains per message
        self._check_inside(path)
        if not (path / "new").is_dir():
            created: list[Path] = []
            for folder in (root, path.parent, path, path / "tmp", path / "new", path / "cur"):
                if not folder.exists():
                    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                    created.append(folder)
            for folder in created:
                fsync_dir(folder.parent)
            self._check_inside(path)
        if all((path / sub).is_dir() for sub in ("tmp", "new", "cur")):
            self._checked.add(path)
        return path

    def _check_inside(self, path: Path) -> None:
        real_root = os.path.realpath(self.root)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise UnsafeMailboxName(f"{path} leads out of the Maildir root")

    def sweep_tmp(self, now: float, max_age: float = TMP_MAX_AGE) -> int:
        """Delete files older than ``max_age`` seconds from every Maildir's ``tmp/``
        (what a crash mid-DATA leaves; the Maildir convention says 36 hours). Returns
        the count. Blocking: call it from a thread."""
        removed = 0
        for tmp in self.root.glob("*/*/tmp"):
            if tmp.is_symlink() or not tmp.is_dir():
                continue
            with os.scandir(tmp) as entries:
                for entry in entries:
                    try:
                        info = entry.stat(follow_symlinks=False)
                        if now - info.st_mtime > max_age and not entry.is_dir(
                            follow_symlinks=False
                        ):
                            os.unlink(entry.path)
                            removed += 1
                    except FileNotFoundError:
                        continue  # removed meanwhile
        return removed

    def open_new(self, domain: str, localpart: str) -> MaildirFile:
        return MaildirFile(self.maildir(domain, localpart))

    def deliver_bytes(self, domain: str, localpart: str, data: bytes) -> Path:
        """Deliver a whole message at once. Blocking: call it from a thread."""
        handle = self.open_new(domain, localpart)
        try:
            handle.write(data)
            return handle.commit()
        except BaseException:
            handle.abort()
            raise


class MaildirFile(DurableFile):
    """One message being written into ``tmp/``; ``commit`` makes it durable in ``new/``."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        self.name = _unique_name()
        super().__init__(maildir / "tmp" / self.name)

    def commit(self) -> Path:
        """flush, fsync, rename into new/, fsync new/. Blocking."""
        return self.commit_to(self.maildir / "new" / f"{self.name},S={self.size}")


@implementer(IStagedMessage)
class MaildirMessage:
    """Twisted's IMessage for one local recipient, stored in two steps.

    Lines arrive without their line ending and are stored with LF, the Maildir
    convention. The data waits in memory (``spool.LateFile``). ``prepare`` writes and
    fsyncs it into ``tmp/`` in a thread, where no mail reader looks; ``commit`` renames
    it into ``new/`` and fsyncs the folder. The protocol prepares every copy of a
    message before it commits any, so one failed copy leaves no other (see
    smtp/staging.py). A write error (disk full, I/O error) is kept and reported by
    ``prepare``, so that the reply is a 451, never a lost message.
    """

    def __init__(
        self,
        maildirs: MaildirRoot,
        domain: str,
        localpart: str,
        store_process: StoreProcess | None = None,
    ) -> None:
        self._data = LateFile(lambda: maildirs.open_new(domain, localpart))
        self._mailbox = (domain, localpart)
        self._store_process = store_process

    def lineReceived(self, line: bytes) -> None:
        self._data.write(line + b"\n")

    def write_block(self, data: bytes) -> None:
        """Many lines at once, already with LF endings (the fast DATA path)."""
        self._data.write(data)

    def prepare(self) -> defer.Deferred[Path]:
        """Written and fsynced in ``tmp/``: durable, not yet delivered."""
        return self._written_then(MaildirFile.sync)

    def commit(self) -> defer.Deferred[Path]:
        """Renamed into ``new/`` and the folder fsynced: delivered."""
        return self._data.then(MaildirFile.commit)

    def eomReceived(self) -> defer.Deferred[Path]:
        """Both steps at once, for a caller that stores one copy alone: by the store
        process when there is one and the message is still all in memory."""
        helper = self._store_process
        if helper is not None and helper.available():
            data = self._data.take_whole()
            if data is not None:
                return helper.store(*self._mailbox, data)
        return self._written_then(MaildirFile.commit)

    def _written_then(self, step: Callable[[MaildirFile], Path]) -> defer.Deferred[Path]:
        if self._data.error is not None:
            self._data.abort()
            return defer.fail(self._data.error)
        return self._data.finish(step)

    def connectionLost(self) -> None:
        self._data.abort()
