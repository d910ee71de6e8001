"""The client side of bench/compare.py: the sessions of its workloads, run in worker processes.

Every session is the same for every server: connect, STARTTLS (or implicit TLS), EHLO,
``CLIENTID UUID <the account's token>`` when the server advertises CLIENTID, AUTH PLAIN,
then for each message MAIL FROM (the account), RCPT TO (the recipient), DATA, the
message and the final dot, then QUIT. Every reply is checked for its exact code
(220, 250, 220, 250, 250, 235, 250, 250, 354, 250 ... 221); a session that gets
anything else, or nothing within the timeout, stops there and counts as an error by
its kind (``error 454``, ``error TimeoutError``). Commands are sent one at a time (our
server does not offer PIPELINING together with CLIENTID).

- ``run_mail``: workloads (a) and (b): slots that run such sessions over and over (for a
  duration, or a number of rounds), with the time from the final dot to its 250, and
  from connect to the 221 of QUIT.
- ``run_idle``: workload (c): opens sessions up to the 235 of AUTH and leaves them idle
  until the benchmark has measured the server, then QUITs them all.

Both are picklable jobs for a ``multiprocessing`` pool and return what they counted
along with their own CPU time, so the report can tell whether the generator saturated.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import os
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from smtpload import (
    SESSION_ERRORS,
    SmtpSession,
    Tally,
    Target,
    UnexpectedReply,
    error_name,
    run_slots,
)

TOKEN_NAMESPACE = uuid.UUID("8a1f4d52-3c36-4e0e-9a54-0c5d3f1b6e21")
LINE = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 the quick brown\r\n"


@dataclass(frozen=True)
class Account:
    address: str
    password: str

    @property
    def token(self) -> str:
        """The account's device: one CLIENTID UUID per account, the same in every run."""
        return str(uuid.uuid5(TOKEN_NAMESPACE, self.address))


@dataclass(frozen=True)
class MailSpec:
    """One generator process's share of workload (a) or (b)."""

    target: Target
    accounts: tuple[Account, ...]  # the accounts of this process's sessions
    recipient: str
    messages: int  # per session
    size: int  # bytes of one message, headers included
    duration: float  # seconds: no session starts after this
    rounds: int | None = None  # sessions per slot; None: until the duration is over
    slots: int | None = None  # concurrent sessions; None: one per account
    label: str = "load"
    rate: float | None = None  # messages a second this process starts; None: at once
    stagger: bool = False  # the slots' first sessions shorter, one step apart (compare.py)

    @property
    def concurrency(self) -> int:
        return self.slots or len(self.accounts)

    def first_session(self, slot: int) -> int:
        """The messages of a slot's first session: ``messages`` down to 1, evenly over the
        slots, so that the sessions' ends, and so their next logins, are spread in time.

        Without it every slot starts at once and, served fairly, the slots stay in step:
        all of them log out and in again together, every ``messages`` messages. The load
        then has a burst of ``concurrency`` TLS handshakes and logins at each turn, which
        no real population of clients makes, and AUTH's latency measures that burst.
        """
        if not self.stagger:
            return self.messages
        return self.messages - slot * self.messages // self.concurrency

    def account(self, slot: int, round_: int) -> Account:
        """The account of a slot's round: slot i takes accounts i, i + slots, ... in turn.

        With one slot per account, a slot always logs in as the same account.
        """
        return self.accounts[(slot + round_ * self.concurrency) % len(self.accounts)]


@dataclass
class MailResult:
    sessions: int = 0  # sessions that went through, every reply right
    messages: int = 0  # messages answered 250 at the final dot
    clientid: int = 0  # sessions that sent CLIENTID (the server advertised it)
    data_seconds: list[float] = field(default_factory=list)  # final dot -> 250
    auth_seconds: list[float] = field(default_factory=list)  # AUTH PLAIN -> 235
    session_seconds: list[float] = field(default_factory=list)  # connect -> 221
    errors: Tally = field(default_factory=Counter)
    cpu: float = 0.0  # this process's CPU seconds
    start: float = 0.0  # time.time() of the first and the last moment of the load
    end: float = 0.0

    def merge(self, other: MailResult) -> None:
        self.sessions += other.sessions
        self.messages += other.messages
        self.clientid += other.clientid
        self.data_seconds += other.data_seconds
        self.auth_seconds += other.auth_seconds
        self.session_seconds += other.session_seconds
        self.errors.update(other.errors)
        self.cpu += other.cpu
        self.start = min(self.start, other.start) if self.start else other.start
        self.end = max(self.end, other.end)


class Messages:
    """Messages of ``size`` bytes: headers with a unique Message-ID, then filler lines."""

    def __init__(self, recipient: str, size: int, label: str) -> None:
        self.recipient = recipient
        self.size = size
        self.label = label
        self.date = email.utils.formatdate()
        self.serial = itertools.count()
        self.prefix = f"{os.getpid()}.{time.time_ns()}"

    def next(self, sender: str) -> bytes:
        serial = next(self.serial)
        head = (
            f"From: <{sender}>\r\nTo: <{self.recipient}>\r\nSubject: {self.label} {serial}\r\n"
            f"Date: {self.date}\r\nMessage-ID: <{self.prefix}.{serial}@client.example.net>\r\n\r\n"
        ).encode()
        lines, rest = divmod(max(0, self.size - len(head)), len(LINE))
        body = LINE * lines + (LINE[: max(0, rest - 2)] + b"\r\n" if rest else b"")
        return head + body + b".\r\n"


def advertises(session: SmtpSession, keyword: str) -> bool:
    return any(line.split(" ", 1)[0].upper() == keyword for line in session.extensions[1:])


@dataclass(frozen=True)
class Login:
    session: SmtpSession
    clientid: bool  # CLIENTID was sent (the server advertised it)
    auth_seconds: float  # from sending AUTH PLAIN to its 235


async def open_and_login(target: Target, account: Account) -> Login:
    """Connect, TLS, EHLO, CLIENTID (if advertised) and AUTH PLAIN, insisting on each code."""
    session = await SmtpSession.open(target)
    loop = asyncio.get_running_loop()
    try:
        clientid = advertises(session, "CLIENTID")
        if clientid:
            await session.clientid("UUID", account.token)
        sent = loop.time()
        reply = await session.auth_plain(account.address, account.password)
        if reply.code != 235:
            raise UnexpectedReply("AUTH PLAIN", reply)
    except BaseException:
        session.abort()
        raise
    return Login(session, clientid, loop.time() - sent)


async def quit_checked(session: SmtpSession) -> None:
    """QUIT, insisting on 221, then close the TLS session."""
    try:
        await session.expect("QUIT", 221)
    except BaseException:
        session.abort()
        raise
    await session.close()


class Pacer:
    """Spaces the starts of a process's messages 1/rate apart over all its sessions, so
    that two servers can be compared at the same throughput rather than each at its
    most. A server that falls behind gets no burst to catch up: it sets the pace."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = 1 / rate if rate else 0.0
        self.next = 0.0
        self.clock, self.sleep = clock, sleep

    async def turn(self) -> None:
        if not self.interval:
            return
        now = self.clock()
        start = max(now, self.next)
        self.next = start + self.interval
        if start > now:
            await self.sleep(start - now)


async def mail_session(
    spec: MailSpec,
    account: Account,
    messages: Messages,
    result: MailResult,
    pacer: Pacer,
    count: int | None = None,
) -> None:
    """One session of ``count`` messages (None: ``spec.messages``); only a session of
    ``spec.messages`` counts in ``session_seconds``."""
    count = spec.messages if count is None else count
    loop = asyncio.get_running_loop()
    started = loop.time()
    login = await open_and_login(spec.target, account)
    session = login.session
    result.auth_seconds.append(login.auth_seconds)
    try:
        for _ in range(count):
            await pacer.turn()
            await session.expect(f"MAIL FROM:<{account.address}>", 250)
            await session.expect(f"RCPT TO:<{spec.recipient}>", 250)
            await session.expect("DATA", 354)
            sent = loop.time()
            session.writer.write(messages.next(account.address))
            reply = await session.reply()
            if reply.code != 250:
                raise UnexpectedReply("end of DATA", reply)
            result.data_seconds.append(loop.time() - sent)
            result.messages += 1
        await session.expect("QUIT", 221)
    except BaseException:
        session.abort()
        raise
    if count == spec.messages:
        result.session_seconds.append(loop.time() - started)
    result.sessions += 1
    result.clientid += login.clientid
    await session.close()


def run_mail(spec: MailSpec) -> MailResult:
    """Workload (a) or (b) in this process (a pool job)."""
    result = MailResult()
    messages = Messages(spec.recipient, spec.size, spec.label)

    rounds = Counter[int]()
    pacer = Pacer(spec.rate)

    async def slot(index: int, _tally: Tally) -> None:
        account = spec.account(index, rounds[index])
        count = spec.first_session(index) if rounds[index] == 0 else spec.messages
        rounds[index] += 1
        await mail_session(spec, account, messages, result, pacer, count)

    cpu = time.process_time()
    result.start = time.time()
    tally = asyncio.run(run_slots(slot, spec.concurrency, spec.duration, spec.rounds))
    result.end = time.time()
    result.cpu = time.process_time() - cpu
    result.errors.update(tally)
    return result


# --- workload (c): idle sessions -----------------------------------------------------


@dataclass(frozen=True)
class IdleSpec:
    target: Target
    accounts: tuple[Account, ...]  # session i logs in as accounts[i % len(accounts)]
    count: int  # sessions to open in this process
    concurrency: int  # logins under way at once
    hold_timeout: float  # longest wait for the release before QUIT


@dataclass
class IdleResult:
    opened: int = 0  # sessions logged in (235) and held
    clientid: int = 0
    quit_ok: int = 0  # held sessions that got 221 to QUIT at the end
    errors: Tally = field(default_factory=Counter)
    open_seconds: float = 0.0  # from the first connect to the last 235
    cpu: float = 0.0


def run_idle(spec: IdleSpec, opened: queue.Queue[int], release: threading.Event) -> IdleResult:
    """Open ``spec.count`` logged-in sessions, report on ``opened``, hold until ``release``.

    ``opened`` and ``release`` are ``multiprocessing.Manager`` proxies.
    """
    result = IdleResult()

    async def main() -> None:
        gate = asyncio.Semaphore(spec.concurrency)
        held: list[SmtpSession] = []

        async def open_one(index: int) -> None:
            async with gate:
                try:
                    account = spec.accounts[index % len(spec.accounts)]
                    login = await open_and_login(spec.target, account)
                except SESSION_ERRORS as problem:
                    result.errors[error_name(problem)] += 1
                    return
                held.append(login.session)
                result.clientid += login.clientid

        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(open_one(index) for index in range(spec.count)))
        result.open_seconds = loop.time() - started
        result.opened = len(held)
        opened.put(result.opened)
        await loop.run_in_executor(None, release.wait, spec.hold_timeout)

        async def close_one(session: SmtpSession) -> None:
            async with gate:
                try:
                    await quit_checked(session)
                    result.quit_ok += 1
                except SESSION_ERRORS as problem:
                    result.errors[f"at QUIT: {error_name(problem)}"] += 1

        await asyncio.gather(*(close_one(session) for session in held))

    cpu = time.process_time()
    asyncio.run(main())
    result.cpu = time.process_time() - cpu
    return result
