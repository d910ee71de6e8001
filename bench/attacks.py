"""Floods and slow clients against the server (issue 6 point 5), with figures.

Usage, from the repository root with the venv's Python (about 3 minutes by default):

    python bench/attacks.py
    python bench/attacks.py --duration 10 --attack slowloris --attack endless-line
    python bench/attacks.py --idle 3000 --slowloris 500 --line-mb 200 --body-mb 200

It starts ``twistd -n clientid-mta`` on loopback (bench/benchserver.py) with the default
limits (20 sessions per address, 1000 in all, 25 MiB messages) except
``[limits] command_timeout``, 10 s (``--command-timeout``) so that idle and slow sessions
time out within a phase. Then one phase per attack, each ``--duration`` seconds:

- ``none``: no attack; the good client's latency "without attack";
- ``idle-one-address``: ``--idle`` connections from 127.1.0.1 that never speak;
- ``idle-many-addresses``: as many, 20 per address (127.2.0.1, 127.2.0.2, ...), so that
  the overall cap is what stops them;
- ``slowloris``: ``--slowloris`` clients (20 per address) sending a command line one byte
  a second (``--dribble``);
- ``slowloris-tls``: as many sending a TLS ClientHello one byte a second to port 465;
- ``endless-line``: one client inside TLS sending ``--line-mb`` MB without a line end,
  then CRLF and QUIT, over and over;
- ``endless-body``: one logged-in client sending a DATA body of ``--body-mb`` MB (more
  than the message size limit) and then the final dot, over and over.
- ``h1-audit-flood`` and ``h2-fresh-clientid``: the AUTH floods of the hostile test
  (bench/auth_floods.py says what each does and measures), ``--flood-duration`` s each,
  after a phase of bare TLS sessions that gives the CPU of a handshake. Their own table
  follows the first: store growth per minute, CPU per refused attempt beyond its TLS
  handshake, and the trusted device's AUTH latency.

An attacker whose connection the server closes connects again after ``--pause`` s, until
the phase ends. The attackers run in another process. During every phase a well-behaved
client connects from 127.0.0.2 (not an attacker's address), does implicit TLS, AUTH PLAIN
as alice, one message to bob and QUIT, every ``--interval`` s; the table gives its p50 and
p99 session latency with the attack next to those of the ``none`` phase. The server's peak
memory is /proc/PID/status VmHWM, reset (/proc/PID/clear_refs) at the start of each phase.

Prints a markdown table and writes it to bench/results/attacks.md (``--output``).
Everything is on loopback and stops by itself: phases, sessions and reads are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import resource
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from auth_floods import FLOODS, FloodPhase, flood_rows, run_floods
from benchserver import BenchServer, log_summary, running_server
from smtpload import (
    SESSION_ERRORS,
    Latencies,
    SmtpError,
    SmtpSession,
    Tally,
    Target,
    UnexpectedReply,
    error_name,
    percentile,
    process_pool,
)

ALICE, ALICE_PASSWORD = "alice@example.org", "alice-password"
BOB, BOB_PASSWORD = "bob@example.org", "bob-password"
GOOD_SOURCE = "127.0.0.2"
MESSAGE = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: good client\r\n\r\nHello.\r\n."

RAMP_PER_SECOND = 1000.0  # attacker connections started per second at a phase start
READ_TIMEOUT = 10.0  # seconds any single read of an attacker may wait
SETTLE = 2.0  # seconds between phases, for the server to drop what is left
SLOW_COMMAND = b"VRFY " + b"a" * 400  # under 512 octets: never too long, never finished
CHUNK = 65536
BODY_LINE = b"y" * 998 + b"\r\n"

RESULTS = Path(__file__).resolve().parent / "results" / "attacks.md"

REFUSED = "refused 421 4.7.0"
TIMED_OUT = "timed out 421 4.4.2"


# --- what an attacker process does --------------------------------------------------------


class ConnectTimeout(SmtpError):
    """No TCP connection within READ_TIMEOUT (the listen queue was full)."""


class GreetingTimeout(SmtpError):
    """Connected, but no greeting within READ_TIMEOUT."""


async def start_message(session: SmtpSession) -> None:
    """Log in as alice and open a message to bob, up to the 354 after DATA."""
    reply = await session.auth_plain(ALICE, ALICE_PASSWORD)
    if reply.code != 235:
        raise UnexpectedReply("AUTH", reply)
    await session.expect(f"MAIL FROM:<{ALICE}>", 250)
    await session.expect(f"RCPT TO:<{BOB}>", 250)
    await session.expect("DATA", 354)


@dataclass(frozen=True)
class AttackSpec:
    """One attack, handed to the attacker process (plain data: picklable)."""

    kind: str
    block: int  # attackers come from 127.<block>.x.y
    count: int  # concurrent attackers
    per_source: int  # attackers per source address
    duration: float
    pause: float
    dribble: float
    volume: int  # bytes per endless line or body
    plain: Target  # the STARTTLS port, used without TLS
    tls: Target  # the implicit TLS port

    def source(self, index: int) -> str:
        n = index // self.per_source
        return f"127.{self.block}.{n // 250}.{1 + n % 250}"


@dataclass
class AttackResult:
    tally: Tally = field(default_factory=Counter)
    close_seconds: list[float] = field(default_factory=list)  # slowloris: open -> closed
    sent: int = 0  # bytes of endless lines or bodies
    held_max: int = 0  # most sessions greeted and open at once


class Attacker:
    """The coroutines of one attack, in the attacker process."""

    def __init__(self, spec: AttackSpec) -> None:
        self.spec = spec
        self.result = AttackResult()
        self.held = 0
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + spec.duration

    def left(self) -> float:
        return self.deadline - self.loop.time()

    def hold(self, change: int) -> None:
        self.held += change
        self.result.held_max = max(self.result.held_max, self.held)

    async def run(self) -> AttackResult:
        slot = getattr(self, "slot_" + self.spec.kind.replace("-", "_"))
        await asyncio.gather(*(self.keep_going(slot, index) for index in range(self.spec.count)))
        return self.result

    async def keep_going(self, slot: Callable[[int], Awaitable[None]], index: int) -> None:
        """``slot(index)`` again and again (ramped up at the start) until the deadline."""
        await asyncio.sleep(index / RAMP_PER_SECOND)
        while self.left() > 0:
            try:
                await slot(index)
            except SESSION_ERRORS as problem:
                self.result.tally[error_name(problem)] += 1
            await asyncio.sleep(min(self.spec.pause, max(self.left(), 0)))

    async def connect(
        self, index: int, tls: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        target = self.spec.tls if tls else self.spec.plain
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    target.host, target.port, local_addr=(self.spec.source(index), 0)
                )
        except TimeoutError:
            raise ConnectTimeout() from None
        self.result.tally["connections"] += 1
        return reader, writer

    async def read_until_closed(self, reader: asyncio.StreamReader) -> tuple[bytes, bool]:
        """What the server sends until it closes (True) or the phase ends (False)."""
        received = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(self.left(), 0)):
                while chunk := await read_some(reader):
                    received += chunk
                return received, True
        return received, False

    async def greeted(self, reader: asyncio.StreamReader) -> bool:
        """Read the greeting; count a refusal (421 4.7.0)."""
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                line = await reader.readline()
        except TimeoutError:
            raise GreetingTimeout() from None
        if line.startswith(b"220 "):
            return True
        refused = line.startswith(b"421 4.7.0")
        self.result.tally[REFUSED if refused else f"greeting {line[:9]!r}"] += 1
        return False

    def outcome(self, received: bytes, closed: bool) -> str:
        if not closed:
            return "open at the end"
        return TIMED_OUT if received.startswith(b"421 4.4.2") else "closed without 421"

    async def slot_idle(self, index: int) -> None:
        """Connect, read the greeting, never speak."""
        reader, writer = await self.connect(index, tls=False)
        try:
            if await self.greeted(reader):
                self.hold(1)
                try:
                    self.result.tally[self.outcome(*await self.read_until_closed(reader))] += 1
                finally:
                    self.hold(-1)
        finally:
            writer.transport.abort()

    slot_idle_one_address = slot_idle
    slot_idle_many_addresses = slot_idle

    async def dribble(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
    ) -> None:
        """Send ``payload`` a byte every ``dribble`` s until the server closes."""
        opened = self.loop.time()
        reading = asyncio.ensure_future(self.read_until_closed(reader))
        self.hold(1)
        try:
            for byte in payload:
                if reading.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.wait({reading}, timeout=self.spec.dribble)
            received, closed = await reading
        finally:
            self.hold(-1)
            reading.cancel()
        self.result.tally[self.outcome(received, closed)] += 1
        if closed:
            self.result.close_seconds.append(self.loop.time() - opened)

    async def slot_slowloris(self, index: int) -> None:
        reader, writer = await self.connect(index, tls=False)
        try:
            if await self.greeted(reader):
                await self.dribble(reader, writer, SLOW_COMMAND)
        finally:
            writer.transport.abort()

    async def slot_slowloris_tls(self, index: int) -> None:
        reader, writer = await self.connect(index, tls=True)  # TCP only: the TLS is dribbled
        try:
            await self.dribble(reader, writer, client_hello(self.spec.tls))
        finally:
            writer.transport.abort()

    async def stream(self, session: SmtpSession, chunk: bytes) -> int:
        """Write ``chunk`` until ``volume`` bytes are sent or the phase ends."""
        sent = 0
        while sent < self.spec.volume and self.left() > 0 and not session.reader.at_eof():
            session.writer.write(chunk)
            async with asyncio.timeout(READ_TIMEOUT):
                await session.writer.drain()
            sent += len(chunk)
            self.result.sent += len(chunk)
        return sent

    async def session(self, index: int) -> SmtpSession:
        """A session over implicit TLS, after EHLO."""
        session = await SmtpSession.open(self.tls_target(), self.spec.source(index))
        self.result.tally["connections"] += 1
        return session

    async def slot_endless_line(self, index: int) -> None:
        async with await self.session(index) as session:
            self.hold(1)
            try:
                await self.stream(session, b"x" * CHUNK)
                # The 500 5.5.2 came as soon as the line passed 512 octets; the CRLF ends
                # the line (no reply of its own); then the session must still work.
                line, after = await session.command(""), await session.command("NOOP")
                self.result.tally[f"line: {line.code} {line.lines[0][:5]}, NOOP {after.code}"] += 1
            finally:
                self.hold(-1)

    async def slot_endless_body(self, index: int) -> None:
        async with await self.session(index) as session:
            await start_message(session)
            self.hold(1)
            try:
                if (
                    await self.stream(session, BODY_LINE * (CHUNK // len(BODY_LINE)))
                    < self.spec.volume
                ):
                    self.result.tally["body: unfinished at the end"] += 1
                    session.abort()  # it never ends: no final dot
                    return
                reply = await session.command(".")
                self.result.tally[f"body: {reply.code} {reply.lines[0][:5]}"] += 1
            finally:
                self.hold(-1)

    def tls_target(self) -> Target:
        return replace(self.spec.tls, timeout=READ_TIMEOUT)


async def read_some(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(65536)
    except (ConnectionError, ssl.SSLError):
        return b""


def client_hello(target: Target) -> bytes:
    """The bytes of a real TLS ClientHello for the server."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = target.context.wrap_bio(incoming, outgoing, server_hostname=target.server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def raise_file_limit() -> None:
    """Thousands of sockets: the soft limit on open files up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def attack_process(spec: AttackSpec) -> AttackResult:
    """The attacker: runs in a worker process."""
    raise_file_limit()

    async def attack() -> AttackResult:
        return await Attacker(spec).run()

    return asyncio.run(attack())


# --- the good client and the server's memory, in this process -------------------------------


async def good_client(target: Target, duration: float, interval: float) -> Latencies:
    """TLS, AUTH, one message, QUIT from GOOD_SOURCE, every ``interval`` s for ``duration``."""
    latencies = Latencies()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration
    while loop.time() < deadline:
        started = time.perf_counter()
        try:
            async with await SmtpSession.open(target, GOOD_SOURCE) as session:
                await start_message(session)
                await session.expect(MESSAGE, 250)
            latencies.add(time.perf_counter() - started)
        except SESSION_ERRORS as problem:
            latencies.unwanted[error_name(problem)] += 1
        await asyncio.sleep(interval)
    return latencies


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_memory(pid: int) -> None:
    """VmHWM back to the current RSS (proc(5), clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def folder_bytes(folder: Path) -> int:
    try:
        return sum(entry.stat().st_size for entry in folder.iterdir())
    except OSError:
        return 0


async def sample_tmp(folder: Path, stop: asyncio.Event) -> int:
    """The largest size of ``folder`` (bob's Maildir tmp/) seen until ``stop``."""
    largest = 0
    while not stop.is_set():
        largest = max(largest, folder_bytes(folder))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    return largest


# --- phases -----------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    attackers: int
    result: AttackResult
    good: Latencies
    rss_start_kib: int
    rss_peak_kib: int
    rss_end_kib: int
    tmp_peak: int
    load: float  # the machine's 1-minute load average at the start


@dataclass(frozen=True)
class Options:
    duration: float
    attacks: tuple[str, ...]
    idle: int
    slowloris: int
    line_mb: int
    body_mb: int
    command_timeout: int
    pause: float
    dribble: float
    interval: float
    output: Path
    keep: bool
    floods: tuple[str, ...] = ()
    flood_duration: float = 60.0


ATTACKS = (
    "idle-one-address",
    "idle-many-addresses",
    "slowloris",
    "slowloris-tls",
    "endless-line",
    "endless-body",
)


def spec_for(kind: str, options: Options, server: BenchServer) -> AttackSpec:
    count, per_source, volume = {
        "idle-one-address": (options.idle, options.idle, 0),
        "idle-many-addresses": (options.idle, 20, 0),
        "slowloris": (options.slowloris, 20, 0),
        "slowloris-tls": (options.slowloris, 20, 0),
        "endless-line": (1, 1, options.line_mb * 1_000_000),
        "endless-body": (1, 1, options.body_mb * 1_000_000),
    }[kind]
    return AttackSpec(
        kind,
        ATTACKS.index(kind) + 1,  # its own addresses: 127.1.x.y for the first, and so on
        count,
        per_source,
        options.duration,
        options.pause,
        options.dribble,
        volume,
        server.target(implicit_tls=False, timeout=READ_TIMEOUT),
        server.target(implicit_tls=True, timeout=READ_TIMEOUT),
    )


async def run_phase(
    server: BenchServer, options: Options, name: str, spec: AttackSpec | None
) -> Phase:
    print(f"{name} ...", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    rss_start = proc_status_kib(server.pid, "VmRSS")
    with process_pool(1) as pool:  # started first: the attack and the good client overlap
        reset_peak_memory(server.pid)
        stop = asyncio.Event()
        tmp = asyncio.create_task(sample_tmp(maildir_tmp(server, BOB), stop))
        pending = pool.apply_async(attack_process, (spec,)) if spec else None
        latencies = await good_client(server.target(), options.duration, options.interval)
        result = AttackResult()
        if pending is not None:
            result = await asyncio.to_thread(pending.get, options.duration + 60)
        stop.set()
    peak = proc_status_kib(server.pid, "VmHWM")
    rss_end = proc_status_kib(server.pid, "VmRSS")
    attackers = spec.count if spec else 0
    phase = Phase(name, attackers, result, latencies, rss_start, peak, rss_end, await tmp, load)
    print(f"  {dict(result.tally)}; good client {dict(latencies.unwanted)}", file=sys.stderr)
    await asyncio.sleep(SETTLE)
    return phase


def maildir_tmp(server: BenchServer, address: str) -> Path:
    localpart, _, domain = address.partition("@")
    return server.config.delivery.maildir_root / domain / localpart / "tmp"


async def bench(server: BenchServer, options: Options) -> tuple[list[Phase], list[FloodPhase]]:
    server.add_user(ALICE, ALICE_PASSWORD)
    server.add_user(BOB, BOB_PASSWORD)
    phases = []
    if options.attacks:
        phases.append(await run_phase(server, options, "none", None))
    for kind in options.attacks:
        phases.append(await run_phase(server, options, kind, spec_for(kind, options, server)))
    floods = []
    if options.floods:
        floods = await run_floods(server, options.floods, options.flood_duration, options.interval)
    return phases, floods


# --- the report -------------------------------------------------------------------------------


def ms_pair(latencies: Latencies) -> str:
    if not latencies.seconds:
        return "-"
    return f"{latencies.ms(0.50):.0f} / {latencies.ms(0.99):.0f}"


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def outcomes(tally: Tally) -> str:
    shown = {k: v for k, v in tally.items() if k not in ("connections", REFUSED, TIMED_OUT)}
    return ", ".join(f"{k}: {v}" for k, v in sorted(shown.items())) or "-"


def good_counts(latencies: Latencies) -> str:
    failed = sum(latencies.unwanted.values())
    detail = ", ".join(f"{k} x{v}" for k, v in sorted(latencies.unwanted.items()))
    return f"{len(latencies.seconds)} / {failed}" + (f" ({detail})" if detail else "")


def phase_rows(phases: Sequence[Phase]) -> list[str]:
    baseline = phases[0].good
    rows = [
        "| attack | attackers | connections | refused 421 4.7.0 | timed out 421 4.4.2 "
        "| other outcomes | held at once | server RSS start / peak / end MiB "
        "| good p50 / p99 ms without | good p50 / p99 ms with | good ok / failed | load |",
        "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|---|--:|",
    ]
    for p in phases:
        tally = p.result.tally
        rows.append(
            f"| {p.name} | {p.attackers} | {tally['connections']} | {tally[REFUSED]} "
            f"| {tally[TIMED_OUT]} | {outcomes(tally)} | {p.result.held_max} "
            f"| {mib(p.rss_start_kib)} / {mib(p.rss_peak_kib)} / {mib(p.rss_end_kib)} "
            f"| {ms_pair(baseline)} "
            f"| {ms_pair(p.good)} | {good_counts(p.good)} | {p.load:.1f} |"
        )
    return rows


def notes(phases: Sequence[Phase], options: Options) -> list[str]:
    lines = []
    for p in phases:
        closes = p.result.close_seconds
        if closes:
            lines.append(
                f"- {p.name}: {len(closes)} clients closed by the server while still sending, "
                f"{percentile(closes, 0.5):.1f} s (p50) / {max(closes):.1f} s (max) after "
                f"connecting; command timeout {options.command_timeout} s."
            )
        if p.result.sent:
            lines.append(
                f"- {p.name}: {p.result.sent / 1e6:.0f} MB sent in {options.duration:.0f} s; "
                f"bob's Maildir tmp/ at most {p.tmp_peak / 1e6:.1f} MB."
            )
    return lines


def report(
    phases: Sequence[Phase],
    floods: Sequence[FloodPhase],
    options: Options,
    argv: Sequence[str],
    log: list[str],
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Floods and slow clients (issue 6 point 5)",
        "",
        f"`python bench/attacks.py {' '.join(argv)}`".replace(" `", "`"),
        "",
        f"- {now}; {os.cpu_count()} CPUs; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; {ssl.OPENSSL_VERSION}.",
        "- Server: `twistd -n clientid-mta`, default limits (20 sessions per address, 1000 in "
        f"all) but command_timeout {options.command_timeout} s; {options.duration:.0f} s per "
        f"attack; attackers reconnect {options.pause:.0f} s after the server closes them.",
        "- Good client: from 127.0.0.2, implicit TLS + AUTH PLAIN + one message + QUIT, every "
        f"{options.interval * 1000:.0f} ms; its latency is the whole session's. "
        '"without" is the `none` phase.',
        '- "held at once": attackers greeted (or, for slowloris-tls, connected) and not yet '
        "closed, at most. Server RSS: at the phase start / VmHWM (reset at the phase start) / "
        "at the phase end. Each argon2id check (an AUTH) takes 64 MiB for a moment: the peak "
        "includes one per AUTH running at the same time (the good client's, the body "
        "attacker's).",
        "- slowloris-tls: no TLS yet, so no 421 can be read; the server cuts the connection "
        "1 s (CLOSE_GRACE) after its timeout.",
        "",
        *(phase_rows(phases) if phases else []),
        "",
        *notes(phases, options),
        "",
        *(["## AUTH floods (H1, H2)", "", *flood_rows(floods), ""] if floods else []),
        log_summary(log),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per attack")
    parser.add_argument(
        "--attack",
        action="append",
        choices=ATTACKS + FLOODS,
        help="an attack to run (again for more); default: all",
    )
    parser.add_argument("--idle", type=int, default=3000, help="idle connections")
    parser.add_argument("--slowloris", type=int, default=500, help="slowloris clients")
    parser.add_argument("--line-mb", type=int, default=200, help="MB per endless line")
    parser.add_argument("--body-mb", type=int, default=200, help="MB per endless body")
    parser.add_argument("--command-timeout", type=int, default=10, help="server's, in s")
    parser.add_argument("--pause", type=float, default=5.0, help="s before reconnecting")
    parser.add_argument("--dribble", type=float, default=1.0, help="s between slow bytes")
    parser.add_argument("--interval", type=float, default=0.2, help="s between good sessions")
    parser.add_argument("--output", type=Path, default=RESULTS, help="markdown file to write")
    parser.add_argument("--keep", action="store_true", help="keep the server's folder and log")
    parser.add_argument(
        "--flood-duration", type=float, default=60.0, help="seconds per AUTH flood (H1, H2)"
    )
    args = parser.parse_args(argv)
    chosen = tuple(args.attack or ATTACKS + FLOODS)
    return Options(
        args.duration,
        tuple(kind for kind in chosen if kind in ATTACKS),
        args.idle,
        args.slowloris,
        args.line_mb,
        args.body_mb,
        args.command_timeout,
        args.pause,
        args.dribble,
        args.interval,
        args.output,
        args.keep,
        tuple(kind for kind in chosen if kind in FLOODS),
        args.flood_duration,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(argv)
    raise_file_limit()  # twistd inherits it
    limits = f"\n[limits]\ncommand_timeout = {options.command_timeout}\n"
    with running_server(limits, keep=options.keep) as server:
        phases, floods = asyncio.run(bench(server, options))
        server.stop()
        problems = server.log_problems()
    text = report(phases, floods, options, argv, problems)
    print(text)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(text)
    print(f"written to {options.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
