"""Fault soak (issue 6, point 6): mail load against a twistd server while faults are injected.

Run from the repository root, as root (the disk faults need ``mount``), with the Python of
the venv the package is installed in; it takes a few minutes and is not part of CI (the
short version is ``tests/test_fault_soak.py``)::

    /tmp/venv/bin/python bench/fault_soak.py [--rounds 2] [--fault-seconds 20] [--senders 6]

Options: ``--rounds N`` (times the whole fault sequence runs, default 2), ``--fault-seconds S``
(how long the disk faults last, default 20), ``--senders N`` (concurrent sender threads,
default 6), ``--kills N`` and ``--reloads N`` per round (3 and 6), ``--lock-seconds A,B``
(device store lock holds, default 4,25: one below and one above the server's 10 s SQLite
busy timeout), ``--disk-mib N`` (size of the small filesystem, 256), ``--seed N``,
``--faults LIST`` (a subset of ``disk,readonly,kill,hup,store``, default all),
``--client-timeout S`` (seconds a sender waits for a reply, 90), ``--output FILE`` (default
``bench/results/fault_soak.md``), ``--keep`` (keep the temporary folder).

What it does: ``tests/serverproc.py`` starts ``twistd -n clientid-mta`` (policy tofu) with
``alice@example.org`` and ``bob@example.org``, each sender thread having its own trusted
device. Each sender loops over sessions: TLS (implicit TLS and STARTTLS in turn), EHLO,
``CLIENTID UUID`` (every third session none, as a client without it), ``AUTH PLAIN``, then
1 to 5 messages with unique Message-IDs to the other
account (every 16th about 120 KB, the rest about 2.5 KB), then QUIT. Every reply is recorded:
which message got 250, which got a 4xx or 5xx (and at which command), and which got no reply.
The faults, in order, each followed by a recovery check (the time from the fault's removal
to the first 250, or for the store the first 235, of a command sent after the removal):

- full disk: ``maildir_root`` is on a small filesystem (a tmpfs; a loop-mounted ext4 file if
  tmpfs cannot be mounted) that a filler file fills up (ENOSPC) and is then deleted;
- read-only Maildir: bob's Maildir becomes a read-only bind mount (``chattr +i`` on its
  ``tmp/`` and ``new/`` if bind mounts are not allowed), then read-write again;
- SIGKILL and restart (``--kills`` times, while mail flows);
- SIGHUP reloads (``--reloads`` during load; sessions must go on);
- the device store locked by another process: this process opens the SQLite file and holds
  ``BEGIN EXCLUSIVE`` for each of ``--lock-seconds``, then rolls back.

Afterwards, with the server stopped, every file in the Maildirs is read: every message that
got 250 must be there exactly once and whole (digest of its body), none may be partial or
unknown; refusals must be ``451 4.3.0`` for disk faults and ``454 4.7.0`` at AUTH for the
store, never a 5xx and never a dropped connection (no reply only in sessions the server was
killed in); and the server must have recovered by itself. The server log is scanned for
``Traceback`` and error lines. A fault the sandbox cannot create (not root, no mount) is
skipped with its reason. Mounts are always undone, also after a failure.

It prints a table per fault and writes ``bench/results/fault_soak.md``.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import datetime
import email
import errno
import hashlib
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``tests`` importable
    sys.path.insert(0, str(ROOT))

from tests.conftest import Wire  # noqa: E402
from tests.serverproc import USERS, ServerProcess  # noqa: E402
from tests.sink import wait_until  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fault_soak.md"
DOMAIN = "example.org"
CLIENT_NAME = "client.example.net"
MAX_PER_SESSION = 5
BIG_EVERY = 16  # every N-th message is big, so a full disk can also hit it mid-DATA
SMALL_LINES, BIG_LINES = 30, 1500  # 80-octet lines: about 2.5 KB and 120 KB
FAIL_PAUSE = 0.1  # seconds a sender waits after a refusal or a failed connection
RELOADED = "reloaded the TLS certificate and key"
STORE_BUSY_TIMEOUT = 10.0  # seconds: the server's sqlite3.connect(timeout=10)

FULL_DISK, READ_ONLY, SIGKILL, SIGHUP, STORE_LOCK = (
    "full disk",
    "read-only Maildir",
    "SIGKILL + restart",
    "SIGHUP reload",
    "device store locked",
)
DISK_FAULTS = (FULL_DISK, READ_ONLY)
BASELINE, AFTER = "baseline (no fault)", "after the faults"

T = TypeVar("T")


def now() -> float:
    return time.monotonic()


# --- mounts, always undone --------------------------------------------------------


def run(*argv: str) -> str | None:
    """Run a system command; None if it worked, else its error text."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as problem:
        return f"{argv[0]}: {problem}"
    if done.returncode == 0:
        return None
    return f"`{' '.join(argv)}`: {(done.stderr or done.stdout).strip() or done.returncode}"


class Mounts:
    """The mounts and immutable flags this run made; ``close`` undoes them, newest first."""

    def __init__(self) -> None:
        self.points: list[Path] = []
        self.immutable: list[Path] = []
        self.problems: list[str] = []

    def mount(self, point: Path, *argv: str) -> str | None:
        problem = run("mount", *argv, str(point))
        if problem is None:
            self.points.append(point)
        return problem

    def bind_read_only(self, path: Path) -> str | None:
        """Bind-mount ``path`` on itself (once), then make that mount read-only.

        The remount fails (EBUSY) while a file is open for writing through the mount, as a
        message being delivered is: it is retried for up to 5 s.
        """
        if path not in self.points:
            problem = self.mount(path, "--bind", str(path))
            if problem is not None:
                return problem
        deadline = now() + 5.0
        while True:
            problem = run("mount", "-o", "remount,bind,ro", str(path))
            if problem is None or "busy" not in problem or now() > deadline:
                return problem
            time.sleep(0.01)

    def set_immutable(self, paths: Sequence[Path], on: bool) -> str | None:
        problem = run("chattr", "+i" if on else "-i", *map(str, paths))
        if problem is None and on:
            self.immutable.extend(paths)
        elif problem is None:
            self.immutable = [p for p in self.immutable if p not in paths]
        return problem

    def unmount(self, point: Path) -> None:
        problem = None
        for _ in range(20):
            problem = run("umount", str(point))
            if problem is None:
                break
            time.sleep(0.25)
        if problem is not None and run("umount", "-l", str(point)) is not None:
            self.problems.append(f"could not unmount {point}: {problem}")
        self.points.remove(point)

    def close(self) -> None:
        if self.immutable:
            self.set_immutable(list(self.immutable), on=False)
        for point in reversed(list(self.points)):
            self.unmount(point)

    def __enter__(self) -> Mounts:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def can_mount() -> str | None:
    """None if mounting may work here, else why not."""
    if os.geteuid() != 0:
        return "not root: mount needs CAP_SYS_ADMIN"
    missing = [tool for tool in ("mount", "umount") if shutil.which(tool) is None]
    return f"no {', '.join(missing)} command" if missing else None


@dataclass
class SmallDisk:
    """A small filesystem mounted at ``path``; ``fill`` makes it full, ``free`` undoes that."""

    path: Path
    method: str

    @property
    def filler(self) -> Path:
        return self.path / "filler"

    def fill(self) -> None:
        """Append to the filler until the filesystem refuses (ENOSPC or EDQUOT)."""
        chunk = b"\0" * (1 << 20)
        with open(self.filler, "ab", buffering=0) as handle:
            while chunk:
                try:
                    while True:
                        handle.write(chunk)
                except OSError as full:
                    if full.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    chunk = chunk[: len(chunk) // 16] if len(chunk) >= 4096 * 16 else b""

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize


def make_small_disk(mounts: Mounts, path: Path, mib: int) -> SmallDisk | str:
    """A tmpfs of ``mib`` MiB at ``path``, else an ext4 loop file; or why neither works."""
    path.mkdir(parents=True, exist_ok=True)
    reason = can_mount()
    if reason is not None:
        return reason
    tmpfs = mounts.mount(path, "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "tmpfs")
    if tmpfs is None:
        return SmallDisk(path, f"maildir_root on a {mib} MiB tmpfs, filled by a filler file")
    image = path.parent / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(mib << 20)
    loop = run("mkfs.ext4", "-q", "-F", "-m", "0", str(image)) or mounts.mount(
        path, "-o", "loop", str(image)
    )
    if loop is None:
        return SmallDisk(path, f"maildir_root on a {mib} MiB loop-mounted ext4, filled")
    image.unlink(missing_ok=True)
    return f"tmpfs: {tmpfs}; loop file: {loop}"


@dataclass
class ReadOnly:
    """Makes one Maildir unwritable: a read-only bind mount, else chattr +i on tmp/ and new/."""

    mounts: Mounts
    maildir: Path
    method: str = ""
    bind: bool = True

    def probe(self, scratch: Path) -> str | None:
        """Find a method that works on ``scratch`` (same filesystem); None, or why none does."""
        problems = []
        try:
            for bind, name in ((True, "read-only bind mount"), (False, "chattr +i on tmp/, new/")):
                self.bind = bind
                problem = self._on(scratch) or self._refuses_writes(scratch)
                self._off(scratch)
                if problem is None:
                    self.method = f"{name} of bob's Maildir"
                    return None
                problems.append(f"{name}: {problem}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return "; ".join(problems)

    @staticmethod
    def _refuses_writes(folder: Path) -> str | None:
        target = folder / "tmp" / "probe"
        try:
            target.write_bytes(b"x")
        except OSError:
            return None
        target.unlink()
        return "a file could still be written"

    def _on(self, folder: Path) -> str | None:
        for sub in ("tmp", "new", "cur"):  # a whole Maildir, as the server makes it
            (folder / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.bind:
            return can_mount() or self.mounts.bind_read_only(folder)
        if shutil.which("chattr") is None:
            return "no chattr command"
        return self.mounts.set_immutable([folder / "tmp", folder / "new"], on=True)

    def _off(self, folder: Path) -> None:
        if not self.bind:
            self.mounts.set_immutable([folder / "tmp", folder / "new"], on=False)
        elif folder in self.mounts.points:
            self.mounts.unmount(folder)

    def on(self) -> None:
        problem = self._on(self.maildir)
        if problem is not None:
            raise RuntimeError(f"could not make {self.maildir} read-only: {problem}")

    def off(self) -> None:
        """Writable again at once; a bind mount is remounted read-write (unmounted at the end)."""
        if not self.bind or run("mount", "-o", "remount,bind,rw", str(self.maildir)) is not None:
            self._off(self.maildir)


@contextlib.contextmanager
def store_locked(path: Path) -> Iterator[None]:
    """Another process's write lock on the device store: BEGIN EXCLUSIVE, held while inside."""
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


# --- the load ---------------------------------------------------------------------


@dataclass
class Message:
    """One message a sender started (from MAIL on) and what became of it."""

    number: int
    message_id: str
    recipient: str
    digest: str  # SHA-256 of the body as the Maildir stores it (LF line ends)
    fault: str  # the fault label when the final reply came (or the connection failed)
    session: int
    started: float
    finished: float = 0.0
    code: int | None = None  # None: no reply (connection closed or timed out)
    stage: str = ""  # the command that got the final reply: MAIL, RCPT, DATA, or END (the dot)
    reply: str = ""


@dataclass
class Session:
    number: int
    account: str
    implicit: bool
    fault: str  # the fault label when the session ended
    opened: float
    closed: float = 0.0
    stage: str = "connect"  # the last step started
    end: str = ""  # quit, refused (no connection), dropped, setup (an unexpected setup reply)
    error: str = ""
    setup_reply: str = ""
    auth_fault: str = ""  # the fault label when AUTH got its reply
    auth_sent: float = 0.0
    auth_done: float = 0.0
    auth_code: int | None = None
    auth_reply: str = ""

    @property
    def sends_clientid(self) -> bool:
        """Every third session sends no CLIENTID, as a client without it: its login takes
        the login thread and the store, where a trusted device's cached one does not."""
        return self.number % 3 != 0


class SetupRefused(Exception):
    """An unexpected reply outside the mail transactions (greeting, EHLO, TLS, CLIENTID...)."""


def expect(session: Session, stage: str, reply: tuple[int, list[str]], code: int) -> None:
    session.stage = stage
    if reply[0] != code:
        raise SetupRefused(f"{stage} got {reply[0]} {reply[1][0]}")


def make_message(number: int, sender: str, recipient: str) -> tuple[str, str, bytes]:
    """(Message-ID, SHA-256 of the stored body, the message as sent with CRLF)."""
    message_id = f"<soak-{number}-{os.urandom(4).hex()}@{DOMAIN}>"
    count = BIG_LINES if number % BIG_EVERY == BIG_EVERY - 1 else SMALL_LINES
    noise = os.urandom(count * 36).hex()
    lines = [f"{number:07d} {i:04d} {noise[i * 72 : i * 72 + 72]}" for i in range(count)]
    lines.append(f"END {message_id}")
    headers = [
        f"From: {sender}",
        f"To: {recipient}",
        f"Subject: fault soak {number}",
        f"Message-ID: {message_id}",
    ]
    body = "\n".join(lines) + "\n"
    wire = "\r\n".join([*headers, "", *lines]) + "\r\n.\r\n"
    return message_id, hashlib.sha256(body.encode()).hexdigest(), wire.encode()


def device_token(index: int) -> str:
    return str(uuid.UUID(int=0x50A4_0000_0000_4000_8000_0000_0000_0000 + index))


class Load:
    """Sender threads and everything they saw.

    ``fault`` is the label of the fault now on (or the phase); each reply, and each
    connection that ends, is filed under the label current when it came.
    """

    def __init__(self, server: ServerProcess, senders: int, timeout: float, seed: int = 0) -> None:
        self.server = server
        self.timeout = timeout
        self.fault = BASELINE
        self.messages: list[Message] = []
        self.sessions: list[Session] = []
        self.crashes: list[str] = []  # a sender died of something unexpected (a harness bug)
        self.stopping = threading.Event()
        self._numbers = iter(range(1, 1 << 62))
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._sender, args=(i, seed), daemon=True)
            for i in range(senders)
        ]

    def next_number(self) -> int:
        with self._lock:
            return next(self._numbers)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(self.timeout + 10)
        alive = [thread.name for thread in self.threads if thread.is_alive()]
        if alive:
            self.crashes.append(f"sender threads did not stop: {alive}")

    def _sender(self, index: int, seed: int) -> None:
        rng = random.Random(seed * 1000 + index)
        account, password = USERS[index % len(USERS)]
        recipient = USERS[(index + 1) % len(USERS)][0]
        token = device_token(index)
        implicit = bool(index % 2)
        try:
            while not self.stopping.is_set():
                session = Session(self.next_number(), account, implicit, self.fault, now())
                self.sessions.append(session)
                if not self._session(session, password, recipient, token, rng):
                    time.sleep(FAIL_PAUSE)
                implicit = not implicit
        except Exception as problem:  # reported, never swallowed
            self.crashes.append(f"sender {index}: {problem!r}")

    def _open(self, session: Session, token: str) -> Wire:
        """Connect, TLS (implicit or STARTTLS), EHLO, CLIENTID."""
        try:
            wire = Wire(self.server, implicit=session.implicit, timeout=self.timeout)
        except ConnectionRefusedError:
            session.end = "refused"
            raise
        expect(session, "greeting", wire.greeting, 220)
        expect(session, "EHLO", wire.cmd(f"EHLO {CLIENT_NAME}"), 250)
        if not session.implicit:
            expect(session, "STARTTLS", wire.cmd("STARTTLS"), 220)
            context = self.server.ssl_context()
            wire.sock = context.wrap_socket(wire.sock, server_hostname="127.0.0.1")
            expect(session, "EHLO", wire.cmd(f"EHLO {CLIENT_NAME}"), 250)
        if session.sends_clientid:
            expect(session, "CLIENTID", wire.cmd(f"CLIENTID UUID {token}"), 250)
        return wire

    def _session(
        self, session: Session, password: str, recipient: str, token: str, rng: random.Random
    ) -> bool:
        """One session; True if it ended with QUIT after a successful AUTH."""
        wire: Wire | None = None
        message: Message | None = None
        try:
            wire = self._open(session, token)
            session.stage = "AUTH"
            secret = base64.b64encode(f"\0{session.account}\0{password}".encode()).decode()
            session.auth_sent = now()
            session.auth_code, lines = wire.cmd(f"AUTH PLAIN {secret}")
            session.auth_done, session.auth_reply = now(), lines[0]
            session.auth_fault = self.fault
            if session.auth_code == 235:
                for _ in range(rng.randint(1, MAX_PER_SESSION)):
                    if self.stopping.is_set():
                        break
                    message, data = self._new_message(session, recipient)
                    accepted = self._transaction(wire, session, message, data)
                    message = None
                    if not accepted:
                        time.sleep(FAIL_PAUSE)
            expect(session, "QUIT", wire.cmd("QUIT"), 221)
            session.end = "quit"
            return session.auth_code == 235
        except SetupRefused as refused:
            session.end, session.setup_reply = "setup", str(refused)
        except OSError as problem:  # ConnectionError, TimeoutError, ssl.SSLError
            session.end = session.end or "dropped"
            session.error = f"{type(problem).__name__}: {problem}"
            if message is not None:
                message.finished, message.fault, message.stage = now(), self.fault, session.stage
        finally:
            session.closed, session.fault = now(), self.fault
            if wire is not None:
                wire.close()
        return False

    def _new_message(self, session: Session, recipient: str) -> tuple[Message, bytes]:
        number = self.next_number()
        message_id, digest, data = make_message(number, session.account, recipient)
        message = Message(number, message_id, recipient, digest, self.fault, session.number, now())
        self.messages.append(message)
        return message, data

    def _transaction(self, wire: Wire, session: Session, message: Message, data: bytes) -> bool:
        """MAIL, RCPT, DATA, body: True for a 250 at the end."""
        for stage, line, expected in (
            ("MAIL", f"MAIL FROM:<{session.account}>", 250),
            ("RCPT", f"RCPT TO:<{message.recipient}>", 250),
            ("DATA", "DATA", 354),
        ):
            session.stage = stage
            code, lines = wire.cmd(line)
            if code != expected:
                self._done(message, code, stage, lines[0])
                expect(session, "RSET", wire.cmd("RSET"), 250)
                return False
        session.stage = "END"
        wire.send(data)
        code, lines = wire.reply()
        self._done(message, code, "END", lines[0])
        return code == 250

    def _done(self, message: Message, code: int, stage: str, reply: str) -> None:
        message.finished, message.code, message.stage, message.reply = now(), code, stage, reply
        message.fault = self.fault

    # --- what the driver asks while a fault runs --------------------------------------

    def accepted_since(self, since: float) -> float | None:
        """When the first message started at or after ``since`` got 250 (None: not yet)."""
        times = [
            m.finished
            for m in reversed_since(self.messages, since, lambda m: m.started)
            if m.code == 250
        ]
        return min(times) if times else None

    def authenticated_since(self, since: float) -> float | None:
        """When the first AUTH sent at or after ``since`` got 235 (None: not yet)."""
        times = [
            s.auth_done
            for s in reversed_since(self.sessions, since, lambda s: s.opened)
            if s.auth_code == 235 and s.auth_sent >= since
        ]
        return min(times) if times else None

    def wait_for_mail(self, count: int, timeout: float) -> None:
        """Until ``count`` more messages got 250 (mail flows), or ``timeout``."""
        start = now()
        while now() < start + timeout and not self.stopping.is_set():
            recent = reversed_since(self.messages, start, lambda m: m.started)
            if sum(m.code == 250 for m in recent) >= count:
                return
            time.sleep(0.05)


def reversed_since(items: list[T], since: float, started: Callable[[T], float]) -> list[T]:
    """The items (appended in start order, give or take a thread switch) started since."""
    found = []
    margin = 5.0  # seconds of out-of-order appends tolerated
    for item in reversed(items):
        begun = started(item)
        if begun >= since:
            found.append(item)
        elif begun < since - margin:
            break
    return found


# --- the faults -------------------------------------------------------------------


@dataclass
class FaultRun:
    """One fault as injected: when, how, and how long the server took to recover."""

    label: str
    kind: str
    method: str = ""
    started: float = 0.0
    removed: float = 0.0
    ended: float = 0.0
    recoveries: list[float | None] = field(default_factory=list)
    events: list[float] = field(default_factory=list)  # kill or SIGHUP times
    down: list[tuple[float, float]] = field(default_factory=list)  # killed .. listening again
    skipped: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What a soak does; the defaults are the CI-sized version."""

    root: Path
    steps: Sequence[tuple[str, float]]  # (fault kind, seconds or count)
    senders: int = 4
    baseline: float = 1.0
    tail: float = 1.0
    settle: float = 0.5  # seconds of load after a recovery before the next fault
    recovery_timeout: float = 30.0
    client_timeout: float = 60.0
    disk_mib: int = 256  # room for a whole soak's mail: only the filler may fill it
    seed: int = 0


class Soak:
    def __init__(self, plan: Plan, server: ServerProcess, load: Load) -> None:
        self.plan = plan
        self.server = server
        self.load = load
        self.faults: list[FaultRun] = []
        self.disk: SmallDisk | None = None
        self.disk_problem = ""
        self.read_only: ReadOnly | None = None
        self.read_only_problem = ""
        self.rng = random.Random(plan.seed)

    def begin(self, kind: str, method: str) -> FaultRun:
        rounds = sum(f.kind == kind for f in self.faults)
        label = kind if rounds == 0 else f"{kind} ({rounds + 1})"
        fault = FaultRun(label, kind, method, started=now())
        self.faults.append(fault)
        self.load.fault = label
        return fault

    def recover(self, fault: FaultRun, since: float, auth: bool = False) -> None:
        """Wait for the first success after ``since``; note how long it took."""
        deadline = since + self.plan.recovery_timeout
        check = self.load.authenticated_since if auth else self.load.accepted_since
        while (first := check(since)) is None and now() < deadline:
            time.sleep(0.02)
        fault.recoveries.append(None if first is None else first - since)

    def finish(self, fault: FaultRun) -> None:
        time.sleep(self.plan.settle)
        fault.ended = now()

    def run_step(self, kind: str, amount: float) -> None:
        step: dict[str, Callable[[float], None]] = {
            FULL_DISK: self.full_disk,
            READ_ONLY: self.read_only_maildir,
            SIGKILL: self.kills,
            SIGHUP: self.reloads,
            STORE_LOCK: self.store_lock,
        }
        step[kind](amount)

    def full_disk(self, seconds: float) -> None:
        if self.disk is None:
            self.faults.append(FaultRun(FULL_DISK, FULL_DISK, skipped=self.disk_problem))
            return
        fault = self.begin(FULL_DISK, self.disk.method)
        self.disk.fill()
        fault.notes.append(f"{self.disk.free_bytes()} bytes free while full")
        while now() < fault.started + seconds:
            time.sleep(0.25)
            self.disk.fill()  # keep it full while the server frees what it aborted
        self.disk.free()
        fault.removed = now()
        self.recover(fault, fault.removed)
        self.finish(fault)

    def read_only_maildir(self, seconds: float) -> None:
        if self.read_only is None:
            self.faults.append(FaultRun(READ_ONLY, READ_ONLY, skipped=self.read_only_problem))
            return
        fault = self.begin(READ_ONLY, self.read_only.method)
        self.read_only.on()
        time.sleep(seconds)
        self.read_only.off()
        fault.removed = now()
        self.recover(fault, fault.removed)
        self.finish(fault)

    def kills(self, count: float) -> None:
        fault = self.begin(SIGKILL, f"SIGKILL while mail flows, restart 0-0.5 s later, x{count:g}")
        for _ in range(int(count)):
            self.load.wait_for_mail(2, timeout=10)
            time.sleep(self.rng.uniform(0.0, 0.3))
            killed = now()
            fault.events.append(killed)
            self.server.kill()
            time.sleep(self.rng.uniform(0.0, 0.5))
            restarted = now()
            self.server.start()
            fault.down.append((killed, now()))
            self.recover(fault, restarted)
        starts = [f"{b - a:.2f}" for a, b in fault.down]
        fault.notes.append(f"killed to listening again: {', '.join(starts)} s")
        fault.removed = fault.down[-1][1]
        self.finish(fault)

    def reloads(self, count: float) -> None:
        # Every process (the twistd one and its workers) logs each reload: with workers the
        # expected number of lines is the count times the number of processes.
        processes = self.server.config.server.worker_count
        wait_for_workers(self.server, processes)  # a worker not started yet would miss one
        before = reloads_logged(self.server.output())
        fault = self.begin(SIGHUP, f"{count:g} x SIGHUP, 0.5 s apart, during load")
        assert self.server.process is not None
        for _ in range(int(count)):
            fault.events.append(now())
            os.kill(self.server.process.pid, signal.SIGHUP)
            self.load.wait_for_mail(1, timeout=0.5)
            time.sleep(max(0.0, 0.5 - (now() - fault.events[-1])))
        fault.removed = now()
        self.recover(fault, fault.events[0])
        expected = {name: int(count) for name in process_names(processes)}

        def new_reloads() -> dict[str, int]:
            after = reloads_logged(self.server.output())
            return {name: after[name] - before[name] for name in after}

        with contextlib.suppress(TimeoutError):  # a missing line is reported below
            wait_until(lambda: new_reloads() == expected or None, 5, "a reload line per process")
        reloads = new_reloads()
        fault.notes.append(f"{sum(reloads.values())} reloads logged")
        if reloads != expected:
            fault.notes.append(f"per process {reloads}, expected {expected}")
        self.finish(fault)

    def store_lock(self, seconds: float) -> None:
        store = self.server.config.clientid.device_store
        with store_locked(store):
            fault = self.begin(STORE_LOCK, f"BEGIN EXCLUSIVE held {seconds:g} s by this process")
            time.sleep(seconds)
        fault.removed = now()
        self.recover(fault, fault.removed, auth=True)
        self.finish(fault)


# --- checking what happened ---------------------------------------------------------


@dataclass
class Stored:
    """What the Maildirs hold, read with the server stopped."""

    copies: collections.Counter[str] = field(default_factory=collections.Counter)
    damaged: list[str] = field(default_factory=list)  # our message, wrong body or wrong box
    unknown: list[str] = field(default_factory=list)  # not ours and not a server notice
    notices: int = 0
    in_tmp: int = 0


def read_maildirs(root: Path, messages: dict[str, Message]) -> Stored:
    stored = Stored()
    for box in sorted(root.glob(f"{DOMAIN}/*")):
        address = f"{box.name}@{DOMAIN}"
        stored.in_tmp += sum(1 for _ in (box / "tmp").iterdir()) if (box / "tmp").is_dir() else 0
        for sub in ("new", "cur"):
            for path in sorted((box / sub).iterdir()) if (box / sub).is_dir() else ():
                parsed = email.message_from_bytes(path.read_bytes())
                message_id = str(parsed.get("Message-ID", ""))
                sent = messages.get(message_id)
                if sent is None:
                    if parsed.get("Auto-Submitted"):
                        stored.notices += 1
                    else:
                        stored.unknown.append(f"{sub}/{path.name}")
                    continue
                stored.copies[message_id] += 1
                body = parsed.get_payload()
                digest = hashlib.sha256(str(body).encode()).hexdigest()
                if digest != sent.digest or sent.recipient != address:
                    stored.damaged.append(f"{address} {sub}/{path.name} ({message_id})")
    return stored


@dataclass
class Row:
    label: str
    method: str
    seconds: float
    messages: int
    accepted: int
    temporary: int
    permanent: int
    no_reply: int
    auth: int
    auth_454: int
    lost: int
    duplicates: int
    recovery: str
    slowest: float  # seconds, the slowest 250 (from MAIL to the reply to the dot)
    slowest_auth: float
    refusals: collections.Counter[str]  # "451 4.3.0 at END", "AUTH 454 4.7.0", "no reply at END"


@dataclass(frozen=True)
class Timeline:
    """When each fault was on, when the server was killed, and when it was down."""

    windows: tuple[tuple[str, float, float], ...]  # (kind, started, removed)
    kills: tuple[float, ...]
    down: tuple[tuple[float, float], ...]  # killed .. listening again

    @classmethod
    def of(cls, faults: Sequence[FaultRun]) -> Timeline:
        done = [f for f in faults if not f.skipped]
        return cls(
            tuple((f.kind, f.started, f.removed) for f in done),
            tuple(t for f in done if f.kind == SIGKILL for t in f.events),
            tuple(d for f in done if f.kind == SIGKILL for d in f.down),
        )

    def killed_in(self, session: Session) -> bool:
        """The server was killed during the session, or it began while the server was down
        (a connection the dying process still took into its backlog is reset)."""
        return self.down_at(session.opened) or any(
            session.opened <= k <= session.closed for k in self.kills
        )

    def down_at(self, moment: float) -> bool:
        return any(a <= moment <= b for a, b in self.down)

    def during(self, kinds: Sequence[str], start: float, end: float) -> bool:
        """Whether [start, end] overlaps a fault of one of ``kinds`` while it was on."""
        return any(k in kinds and start <= b and a <= end for k, a, b in self.windows)


@dataclass
class Report:
    plan: Plan
    faults: list[FaultRun]
    rows: list[Row]
    problems: list[str]
    log_tracebacks: collections.Counter[str]
    log_errors: collections.Counter[str]
    stored: Stored
    totals: dict[str, int]

    def table(self) -> str:
        head = (
            "| fault | how | s | messages | 250 | 4xx | 5xx | no reply | AUTH | AUTH 454 "
            "| lost=0? | duplicates=0? | recovery s | slowest 250 s | slowest AUTH s |\n"
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|--:|--:|--:|\n"
        )
        lines = [
            f"| {r.label} | {r.method} | {r.seconds:.1f} | {r.messages} | {r.accepted} "
            f"| {r.temporary} | {r.permanent} | {r.no_reply} | {r.auth} | {r.auth_454} "
            f"| {'yes' if r.lost == 0 else f'**no: {r.lost}**'} "
            f"| {'yes' if r.duplicates == 0 else f'**no: {r.duplicates}**'} "
            f"| {r.recovery} | {r.slowest:.2f} | {r.slowest_auth:.2f} |"
            for r in self.rows
        ]
        skipped = [f"| {f.label} | skipped: {f.skipped} |" for f in self.faults if f.skipped]
        return head + "\n".join(lines + skipped) + "\n"

    def refused(self) -> list[str]:
        """Per fault: what the refusals and missing replies were, and at which command."""
        return [
            f"- {r.label}: " + ", ".join(f"{n} x {what}" for what, n in r.refusals.most_common())
            for r in self.rows
            if r.refusals
        ]

    def text(self) -> str:
        """The table and every finding, for a failing test or the console."""
        parts = [f"seed {self.plan.seed}; totals {self.totals}", self.table(), *self.refused()]
        parts += [f"problem: {p}" for p in self.problems]
        parts += [f"log traceback x{n}: {t}" for t, n in self.log_tracebacks.items()]
        parts += [f"log error x{n}: {t}" for t, n in self.log_errors.most_common(12)]
        return "\n".join(parts)


def check(load: Load, faults: list[FaultRun], stored: Stored, log: str, plan: Plan) -> Report:
    by_label = {f.label: f for f in faults if not f.skipped}
    problems: list[str] = list(load.crashes)
    sessions = {s.number: s for s in load.sessions}
    timeline = Timeline.of(faults)
    rows: list[Row] = []
    labels = [BASELINE, *by_label, AFTER]
    for label in labels:
        fault = by_label.get(label)
        messages = [m for m in load.messages if m.fault == label]
        mine = [s for s in load.sessions if s.fault == label]
        authed = [s for s in load.sessions if s.auth_fault == label and s.auth_code is not None]
        problems += check_messages(messages, sessions, timeline, stored)
        problems += check_sessions(mine, timeline)
        problems += check_auth(authed, timeline)
        problems += check_recovery(fault, messages, authed, plan.recovery_timeout)
        rows.append(make_row(label, fault, messages, authed, stored))
    problems += [f"damaged message in the Maildir: {d}" for d in stored.damaged]
    problems += [f"unknown file in new/ or cur/: {u}" for u in stored.unknown[:20]]
    tracebacks, errors = scan_log(log)
    problems += [f"server log: {n} x Traceback: {t}" for t, n in tracebacks.items()]
    totals = {
        "messages": len(load.messages),
        "accepted": sum(m.code == 250 for m in load.messages),
        "sessions": len(load.sessions),
        "stored copies": sum(stored.copies.values()),
        "stored without a reply (killed)": sum(
            stored.copies[m.message_id] for m in load.messages if m.code is None
        ),
        "server notices": stored.notices,
        "files left in tmp/": stored.in_tmp,
    }
    return Report(plan, faults, rows, problems, tracebacks, errors, stored, totals)


def check_messages(
    messages: list[Message],
    sessions: dict[int, Session],
    timeline: Timeline,
    stored: Stored,
) -> list[str]:
    problems = []
    for m in messages:
        copies = stored.copies[m.message_id]
        what = f"[{m.fault}] message {m.number} {m.message_id}"
        if m.code == 250 and copies != 1:
            problems.append(f"{what}: got 250 but is in the Maildir {copies} times")
        elif m.code is None and not timeline.killed_in(sessions[m.session]):
            problems.append(
                f"{what}: no reply to {m.stage or 'MAIL'} and the server was not killed"
            )
        elif m.code is not None and m.code != 250:
            disk = timeline.during(DISK_FAULTS, m.started, m.finished)
            expected = disk and m.code == 451 and m.reply.startswith("4.3.0")
            if not expected:
                problems.append(f"{what}: {m.stage} got {m.code} {m.reply}")
            if copies:
                problems.append(f"{what}: refused with {m.code} but stored {copies} times")
        elif copies > 1:
            problems.append(f"{what}: no reply (killed) and stored {copies} times")
    return problems


def describe(session: Session) -> str:
    tls = "implicit TLS" if session.implicit else "STARTTLS"
    return f"[{session.fault}] session {session.number} ({tls})"


def check_sessions(mine: list[Session], timeline: Timeline) -> list[str]:
    problems = []
    for s in mine:
        if s.end == "refused" and not timeline.down_at(s.opened):
            problems.append(f"{describe(s)}: connection refused while the server was up")
        elif s.end == "dropped" and not timeline.killed_in(s):
            problems.append(f"{describe(s)}: dropped at {s.stage} ({s.error}), not killed")
        elif s.end == "setup":
            problems.append(f"{describe(s)}: {s.setup_reply}")
    return problems


def check_auth(authed: list[Session], timeline: Timeline) -> list[str]:
    """AUTH must get 235, or 454 4.7.0 while the store is locked."""
    problems = []
    for s in authed:
        locked = timeline.during((STORE_LOCK,), s.auth_sent, s.auth_done)
        store_busy = locked and s.auth_code == 454
        if s.auth_code != 235 and not (store_busy and s.auth_reply.startswith("4.7.0")):
            problems.append(f"{describe(s)}: AUTH got {s.auth_code} {s.auth_reply}")
    return problems


def check_recovery(
    fault: FaultRun | None, messages: list[Message], authed: list[Session], timeout: float
) -> list[str]:
    if fault is None:
        return []
    problems = [
        f"[{fault.label}] no success within {timeout:g} s after the fault was removed"
        for r in fault.recoveries
        if r is None
    ]
    if not fault.recoveries:
        problems.append(f"[{fault.label}] recovery was not measured")
    after = [m for m in messages if m.started >= fault.removed and m.code not in (250, None)]
    late_auth = [s for s in authed if s.auth_sent >= fault.removed and s.auth_code != 235]
    problems += [
        f"[{fault.label}] still failing after the fault was removed: message {m.number} "
        f"{m.stage} got {m.code} {m.reply}"
        for m in after[:5]
    ]
    problems += [
        f"[{fault.label}] still failing after the fault was removed: session {s.number} "
        f"AUTH got {s.auth_code} {s.auth_reply}"
        for s in late_auth[:5]
    ]
    if fault.kind in DISK_FAULTS and not any(m.code == 451 for m in messages):
        problems.append(f"[{fault.label}] the fault had no effect: no 451")
    if fault.kind == STORE_LOCK and not store_lock_felt(fault, authed):
        problems.append(f"[{fault.label}] the fault had no effect: no AUTH held or refused")
    if fault.kind == SIGHUP and len(fault.notes) != 1:
        problems.append(f"[{fault.label}] {len(fault.events)} SIGHUP sent, {fault.notes}")
    return problems


def store_lock_felt(fault: FaultRun, authed: list[Session]) -> bool:
    """An AUTH got 454, or was held by the lock: sent 1 s or more before the release, answered
    after it (a password check takes well under a second of that)."""
    return any(
        s.auth_code == 454 or (s.auth_sent <= fault.removed - 1.0 <= fault.removed <= s.auth_done)
        for s in authed
    )


def make_row(
    label: str,
    fault: FaultRun | None,
    messages: list[Message],
    authed: list[Session],
    stored: Stored,
) -> Row:
    codes = [m.code for m in messages]
    recoveries = fault.recoveries if fault else []
    if not recoveries:
        recovery = "-"
    elif None in recoveries:
        recovery = "**never**"
    else:
        worst = max(r for r in recoveries if r is not None)
        recovery = f"{worst:.2f}" + (f" (max of {len(recoveries)})" if len(recoveries) > 1 else "")
    if fault is None:
        span = [m.started for m in messages] or [0.0]
        seconds = max(span) - min(span)
    else:
        seconds = (fault.removed or fault.ended) - fault.started
    return Row(
        label=label,
        method=fault.method if fault else "",
        seconds=seconds,
        messages=len(messages),
        accepted=codes.count(250),
        temporary=sum(c is not None and 400 <= c < 500 for c in codes),
        permanent=sum(c is not None and c >= 500 for c in codes),
        no_reply=codes.count(None),
        auth=len(authed),
        auth_454=sum(s.auth_code == 454 for s in authed),
        lost=sum(m.code == 250 and stored.copies[m.message_id] == 0 for m in messages),
        duplicates=sum(stored.copies[m.message_id] > 1 for m in messages),
        recovery=recovery,
        slowest=max((m.finished - m.started for m in messages if m.code == 250), default=0.0),
        slowest_auth=max((s.auth_done - s.auth_sent for s in authed), default=0.0),
        refusals=collections.Counter(
            [refusal(m.code, m.reply, m.stage) for m in messages if m.code != 250]
            + [refusal(s.auth_code, s.auth_reply, "AUTH") for s in authed if s.auth_code != 235]
        ),
    )


def refusal(code: int | None, reply: str, stage: str) -> str:
    if code is None:
        return f"no reply at {stage or 'MAIL'}"
    return f"{code} {reply.split(' ', 1)[0]} at {stage}"


LOG_PREFIX = re.compile(r"^\S+ \[[^\]]*\] ?")


def normalise(line: str) -> str:
    """A log line without its time stamp, paths, ids and numbers, so that alike lines count once."""
    text = LOG_PREFIX.sub("", line.strip())
    text = re.sub(r"'/[^']*'", "'PATH'", text)
    text = re.sub(r"\b(?=\w*\d)[0-9A-Fa-f]{8,}\b", "ID", text)
    return re.sub(r"\d+", "N", text)[:200]


def scan_log(log: str) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """(tracebacks as 'log message -> exception', error lines), each counted."""
    lines = log.splitlines()
    tracebacks: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for index, line in enumerate(lines):
        if "Traceback" in line:
            before = normalise(lines[index - 1]) if index else ""
            end = index + 1
            while end < len(lines) and (lines[end].startswith(("\t", " ")) or "[-]" in lines[end]):
                end += 1
            last = normalise(lines[end - 1]) if end - 1 > index else "?"
            tracebacks[f"{before} -> {last}"] += 1
        elif re.search(r"#(error|critical)\]", line) or "Unhandled Error" in line:
            errors[normalise(line)] += 1
    return tracebacks, errors


# --- the whole run ----------------------------------------------------------------


def process_names(processes: int) -> list[str]:
    """How ``reloads_logged`` names the processes of a server with ``processes`` of them."""
    return ["main", *(f"worker {number}" for number in range(1, processes))]


def reloads_logged(output: str) -> collections.Counter[str]:
    """Reload lines per process: "main", or "worker N" for a line a worker relayed."""
    found = re.findall(rf"(worker \d+): {re.escape(RELOADED)}|{re.escape(RELOADED)}", output)
    return collections.Counter(worker or "main" for worker in found)


def wait_for_workers(server: ServerProcess, processes: int) -> None:
    """Until each worker of the latest start has logged its start (its SIGHUP handler is
    installed by then); a start killed before its workers were up has no such lines."""

    def ready() -> bool | None:
        latest = server.output().rpartition("processes serve the ports")[2]
        names = process_names(processes)[1:]
        return all(f"{name}: clientid-mta " in latest for name in names) or None

    wait_until(ready, 30, f"{processes - 1} worker(s) to start")


# A soak sends thousands of messages an hour from a few accounts: no hourly sending limit.
NO_SENDING_LIMIT = "[limits]\nmax_messages_per_hour = 0\nmax_recipients_per_hour = 0\n"


def soak_config(maildir_root: Path | None) -> str:
    delivery = f'[delivery]\nmaildir_root = "{maildir_root}"\n' if maildir_root else ""
    return delivery + NO_SENDING_LIMIT


def prepare(server: ServerProcess, senders: int) -> None:
    for address, password in USERS:
        server.add_user(address, password)
    for index in range(senders):
        account = USERS[index % len(USERS)][0]
        server.admin("device", "add", account, "UUID", stdin=device_token(index) + "\n")


def run_soak(plan: Plan) -> Report:
    """Run ``plan``; mounts are undone and the server stopped whatever happens."""
    kinds = {kind for kind, _ in plan.steps}
    with Mounts() as mounts:
        disk: SmallDisk | str | None = None
        if kinds & set(DISK_FAULTS):
            disk = make_small_disk(mounts, plan.root / "disk", plan.disk_mib)
        maildir_root = disk.path / "mail" if isinstance(disk, SmallDisk) else None
        server = ServerProcess.create(plan.root / "server", soak_config(maildir_root))
        root = server.config.delivery.maildir_root
        load = Load(server, plan.senders, plan.client_timeout, plan.seed)
        soak = Soak(plan, server, load)
        if isinstance(disk, SmallDisk):
            soak.disk = disk
        else:
            soak.disk_problem = disk or ""
        if READ_ONLY in kinds:
            read_only = ReadOnly(mounts, root / DOMAIN / USERS[1][0].split("@")[0])
            soak.read_only_problem = read_only.probe(root / "probe") or ""
            soak.read_only = None if soak.read_only_problem else read_only
        prepare(server, plan.senders)
        try:
            server.start()
            load.start()
            load.wait_for_mail(3, timeout=30)
            time.sleep(plan.baseline)
            for kind, amount in plan.steps:
                soak.run_step(kind, amount)
            load.fault = AFTER
            load.wait_for_mail(3, timeout=30)
            time.sleep(plan.tail)
        finally:
            load.stop()
            server.stop()
        messages = {m.message_id: m for m in load.messages}
        stored = read_maildirs(root, messages)
        report = check(load, soak.faults, stored, server.output(), plan)
        if soak.disk is not None:
            soak.disk.free()
    report.problems += mounts.problems
    return report


# --- the command ------------------------------------------------------------------


FAULT_NAMES = {  # --faults: short name -> fault
    "disk": FULL_DISK,
    "readonly": READ_ONLY,
    "kill": SIGKILL,
    "hup": SIGHUP,
    "store": STORE_LOCK,
}


def bench_plan(options: argparse.Namespace, root: Path) -> Plan:
    chosen = {FAULT_NAMES[name] for name in options.faults.split(",")}
    one_round = [
        (FULL_DISK, options.fault_seconds),
        (READ_ONLY, options.fault_seconds),
        (SIGKILL, options.kills),
        (SIGHUP, options.reloads),
        *((STORE_LOCK, float(s)) for s in options.lock_seconds.split(",")),
    ]
    steps = [step for step in one_round if step[0] in chosen] * options.rounds
    return Plan(
        root,
        steps,
        senders=options.senders,
        baseline=10.0,
        tail=10.0,
        settle=5.0,
        recovery_timeout=60.0,
        client_timeout=options.client_timeout,
        disk_mib=options.disk_mib,
        seed=options.seed,
    )


def step_text(step: tuple[str, float]) -> str:
    kind, amount = step
    return f"{kind} x{amount:g}" if kind in (SIGKILL, SIGHUP) else f"{kind} {amount:g} s"


def markdown(report: Report, options: argparse.Namespace, wall: float) -> str:
    plan = report.plan
    per_round = len(plan.steps) // max(1, options.rounds)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python bench/fault_soak.py " + " ".join(sys.argv[1:])
    lines = [
        "# Fault soak (issue 6, point 6)",
        "",
        f"`{command.strip()}`, {when}, {wall / 60:.1f} minutes.",
        "",
        f"- Machine: {os.cpu_count()} CPUs; Linux {platform.release()}; "
        f"Python {platform.python_version()}.",
        f"- Server: `twistd -n clientid-mta` (tests/serverproc.py), policy tofu; {plan.senders} "
        "sender threads, each with its own trusted device, implicit TLS and STARTTLS in turn, "
        f"1-{MAX_PER_SESSION} messages per session (CLIENTID + AUTH PLAIN each), every "
        f"{BIG_EVERY}th message about 120 KB, the others about 2.5 KB; seed {plan.seed}.",
        f"- {options.rounds} round(s) of: {', '.join(map(step_text, plan.steps[:per_round]))}; "
        f"client timeout {plan.client_timeout:g} s.",
        "- Recovery s: from the removal of the fault (for SIGKILL: from the restart command; "
        "for SIGHUP: from the first signal) to the first 250 of a message started after it "
        "(for the store: the first 235 of an AUTH sent after it). Slowest: from MAIL to the "
        "reply to the final dot, and from AUTH to its reply.",
        "",
        report.table(),
        "Totals: " + ", ".join(f"{k} {v}" for k, v in report.totals.items()) + ".",
        "",
        "## Findings",
        "",
    ]
    lines += ["Refusals and missing replies, by fault:", "", *report.refused(), ""]
    lines += ["Problems:", ""]
    lines += [f"- {p}" for p in report.problems[:60]] or ["- none"]
    if len(report.problems) > 60:
        lines.append(f"- ... and {len(report.problems) - 60} more")
    lines += ["", "Server log, tracebacks (message before it -> exception):", ""]
    lines += [f"- {n} x `{t}`" for t, n in report.log_tracebacks.items()] or ["- none"]
    lines += ["", "Server log, error lines (digits as N):", ""]
    lines += [f"- {n} x `{t}`" for t, n in report.log_errors.most_common(15)] or ["- none"]
    notes = [f"- {f.label}: {'; '.join(f.notes)}" for f in report.faults if f.notes]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fault-seconds", type=float, default=20.0)
    parser.add_argument("--senders", type=int, default=6)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--reloads", type=int, default=6)
    parser.add_argument("--lock-seconds", default="4,25")
    parser.add_argument("--disk-mib", type=int, default=256)
    parser.add_argument("--faults", default=",".join(FAULT_NAMES))
    parser.add_argument("--client-timeout", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 16))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true")
    options = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="clientid-soak-"))
    started = now()
    try:
        report = run_soak(bench_plan(options, root))
    finally:
        if options.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = markdown(report, options, now() - started)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(text)
    print(text)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
