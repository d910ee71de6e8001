"""Building blocks for SMTP load generators: an asyncio submission client and drivers.

- ``Target`` says where and how to connect (implicit TLS or STARTTLS); it is plain
  data, so it can be handed to worker processes.
- ``SmtpSession`` is one client session over TLS: ``open`` connects, does TLS and
  EHLO; then ``command``, ``clientid``, ``auth_plain``, ``quit``. Every read is bounded
  by the target's timeout, so a silent server cannot hang a generator.
- ``run_slots`` keeps N sessions going in one event loop until a deadline;
  ``run_in_processes`` spreads such loops over worker processes.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import math
import multiprocessing
import multiprocessing.pool
import os
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

CLOSE_TIMEOUT = 2.0  # seconds a closing TLS session may take before it is cut
ERROR_PAUSE = 0.05  # seconds a slot waits after a failed session, so errors do not spin

Tally = Counter[str]  # named counts: "sessions", reply codes like "454", "error <Type>"

T = TypeVar("T")
R = TypeVar("R")


class SmtpError(Exception):
    """The server did something a session cannot go on with."""


class UnexpectedReply(SmtpError):
    def __init__(self, command: str, reply: Reply) -> None:
        super().__init__(f"{command!r} got {reply.code} {' / '.join(reply.lines)}")
        self.reply = reply


class SessionClosed(SmtpError):
    """The server closed the connection before a whole reply arrived."""


# What a session may fail with; drivers count these and go on.
SESSION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes ssl.SSLError, ConnectionError and TimeoutError
    SmtpError,
    asyncio.IncompleteReadError,
)


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " / ".join(self.lines)


@functools.cache
def client_context(cafile: str) -> ssl.SSLContext:
    """A verifying client context for the server's certificate (one per process)."""
    return ssl.create_default_context(cafile=cafile)


@dataclass(frozen=True)
class Target:
    """Where to connect. Picklable: the TLS context is built in each process."""

    host: str
    port: int
    implicit_tls: bool
    cafile: str
    server_hostname: str
    helo: str = "client.example.net"
    timeout: float = 10.0

    @property
    def context(self) -> ssl.SSLContext:
        return client_context(self.cafile)

    @property
    def mode(self) -> str:
        return "implicit TLS" if self.implicit_tls else "STARTTLS"


def plain_response(user: str, password: str) -> str:
    """The SASL PLAIN initial response (RFC 4616), base64."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")


class SmtpSession:
    """One SMTP session over TLS. Use ``await SmtpSession.open(target)``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.target = target
        self.extensions: tuple[str, ...] = ()
        self.closed = False

    @classmethod
    async def open(cls, target: Target, source: str | None = None) -> SmtpSession:
        """Connect (from ``source`` when given), do TLS, and EHLO under TLS."""
        session = await cls.open_tls(target, source)
        try:
            session.extensions = (await session.expect(f"EHLO {target.helo}", 250)).lines
        except BaseException:
            session.abort()
            raise
        return session

    @classmethod
    async def open_tls(cls, target: Target, source: str | None = None) -> SmtpSession:
        """Connect and do TLS (implicit, or EHLO and STARTTLS), up to the EHLO under TLS."""
        implicit = target.implicit_tls
        async with asyncio.timeout(target.timeout):
            reader, writer = await asyncio.open_connection(
                target.host,
                target.port,
                ssl=target.context if implicit else None,
                server_hostname=target.server_hostname if implicit else None,
                local_addr=(source, 0) if source else None,
            )
        session = cls(reader, writer, target)
        try:
            await session.expect(None, 220)
            if not implicit:
                await session.expect(f"EHLO {target.helo}", 250)
                await session.expect("STARTTLS", 220)
                async with asyncio.timeout(target.timeout):
                    await writer.start_tls(target.context, server_hostname=target.server_hostname)
        except BaseException:
            session.abort()
            raise
        return session

    @property
    def tls_version(self) -> str:
        ssl_object = self.writer.get_extra_info("ssl_object")
        return str(ssl_object.version()) if ssl_object is not None else "none"

    async def reply(self) -> Reply:
        """One whole (possibly multi-line) reply."""
        lines: list[str] = []
        async with asyncio.timeout(self.target.timeout):
            while True:
                raw = await self.reader.readline()
                if not raw.endswith(b"\n"):
                    self.closed = True
                    raise SessionClosed(f"closed by the server after {lines!r}")
                line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                lines.append(line[4:])
                if line[3:4] != "-":
                    if not line[:3].isdigit():
                        raise SmtpError(f"not an SMTP reply: {line!r}")
                    return Reply(int(line[:3]), tuple(lines))

    async def command(self, line: str) -> Reply:
        self.writer.write(line.encode("utf-8") + b"\r\n")
        return await self.reply()

    async def expect(self, line: str | None, code: int) -> Reply:
        """Send ``line`` (None: just read, e.g. the greeting) and insist on ``code``."""
        reply = await (self.reply() if line is None else self.command(line))
        if reply.code != code:
            raise UnexpectedReply(line or "(greeting)", reply)
        return reply

    async def clientid(self, client_type: str, token: str) -> Reply:
        return await self.expect(f"CLIENTID {client_type} {token}", 250)

    async def auth_plain(self, user: str, password: str) -> Reply:
        """AUTH PLAIN with an initial response; the reply, whatever its code."""
        reply = await self.command(f"AUTH PLAIN {plain_response(user, password)}")
        if reply.code == 421:
            self.closed = True  # 421 always ends the session
        return reply

    async def quit(self) -> None:
        """QUIT (unless the server already closed), then close."""
        try:
            if not self.closed:
                await self.command("QUIT")
        except SESSION_ERRORS:
            pass
        await self.close()

    async def close(self) -> None:
        """Close the TLS session properly, or cut it after ``CLOSE_TIMEOUT``."""
        self.closed = True
        self.writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.writer.wait_closed()
        except SESSION_ERRORS:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()

    async def __aenter__(self) -> SmtpSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            await self.quit()
        else:
            self.abort()


def error_name(problem: BaseException) -> str:
    """A short counter name for a failed session: ``error 421``, ``error TimeoutError``."""
    if isinstance(problem, UnexpectedReply):
        return f"error {problem.reply.code}"
    return f"error {type(problem).__name__}"


# --- drivers ---------------------------------------------------------------------

SlotFn = Callable[[int, Tally], Awaitable[None]]


async def run_slots(slot: SlotFn, count: int, duration: float, rounds: int | None = None) -> Tally:
    """Run ``slot(index, tally)`` over and over in ``count`` concurrent loops.

    Each loop starts no new call after ``duration`` seconds, nor after ``rounds`` calls
    when that is given; a call that fails with a session error is counted under
    ``error_name``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration
    tally: Tally = Counter()

    async def keep_going(index: int) -> None:
        done = 0
        while loop.time() < deadline and (rounds is None or done < rounds):
            done += 1
            try:
                await slot(index, tally)
            except SESSION_ERRORS as problem:
                tally[error_name(problem)] += 1
                await asyncio.sleep(ERROR_PAUSE)

    await asyncio.gather(*(keep_going(index) for index in range(count)))
    return tally


def run_in_processes(
    pool: multiprocessing.pool.Pool, job: Callable[[T], R], specs: Sequence[T], timeout: float
) -> list[R]:
    """``job(spec)`` for each spec on a ``multiprocessing`` pool; raises on ``timeout``.

    The pool should have one process per spec, so that the jobs run side by side.
    """
    return list(pool.map_async(job, specs, chunksize=1).get(timeout))


def process_pool(processes: int, nice: int = 0) -> multiprocessing.pool.Pool:
    """A pool of fresh (spawned) processes, ``nice`` lowering their priority.

    Use it as a context manager: leaving it ends the processes.
    """
    context = multiprocessing.get_context("spawn")
    return context.Pool(processes, initializer=os.nice, initargs=(nice,))


# --- figures ---------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Latencies:
    """Timings (seconds) of one kind of command, and the replies that were not wanted."""

    seconds: list[float] = field(default_factory=list)
    unwanted: Tally = field(default_factory=Counter)

    def add(self, seconds: float) -> None:
        self.seconds.append(seconds)

    def ms(self, fraction: float) -> float:
        return percentile(self.seconds, fraction) * 1000.0
