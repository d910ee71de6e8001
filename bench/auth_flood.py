"""Cost of a throttled AUTH attempt (issue 3): flood the server with wrong passwords.

Starts the server (twistd) on loopback and measures, with the server's CPU time
from /proc/PID/stat:

1. baseline: sessions that only do the TLS handshake, EHLO and QUIT, giving the
   server CPU per session;
2. for two kinds of attacker, a flood of wrong-password AUTH attempts against alice,
   up to ``max_failures_per_session`` per TLS session, whose extra CPU per throttled
   (454) attempt is (flood CPU - sessions x CPU per session - 535s x one argon2id
   check) / 454s:
   - "new device per session": a fresh CLIENTID UUID each session, so every device
     has its whole budget; the account's budget for unknown devices is spent first;
   - "repeated devices": a small pool of CLIENTID tokens whose device budgets are
     spent first (on made-up accounts), so attempts stop at the device budget;
3. the same floods again while alice's trusted device logs in every 200 ms, giving
   the AUTH latency (AUTH sent -> 235) of an innocent device under attack.

Run it with the venv's Python: ``python bench/auth_flood.py --duration 20``.
See bench/README.md for how to read the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import math
import os
import platform
import ssl
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.pool import Pool
from pathlib import Path

from benchserver import (
    BenchServer,
    code_version,
    cpu_model,
    log_summary,
    machine_busy_seconds,
    running_server,
)
from smtpload import (
    SESSION_ERRORS,
    Latencies,
    Reply,
    SmtpSession,
    Tally,
    Target,
    error_name,
    process_pool,
    run_in_processes,
    run_slots,
)

from clientid_mta.auth.passwd_file import PasswdFile, verify_password

ALICE = "alice@example.org"
ALICE_PASSWORD = "alice-password"
WRONG_PASSWORD = "wrong-password"
CLIENT_TYPE = "UUID"
THROTTLED_TEXT = "4.7.0 Too many failed logins"  # the 454 of a spent budget
COUNTED = ("sessions", "attempts", "235", "454", "535", "421")  # columns of the phase table

SLOTS_PER_SOURCE = 8  # concurrent sessions per source address (the server allows 20)
SESSIONS_PER_DEVICE = 3  # concurrent sessions per repeated device (the server allows 5)
IDLE_WINDOW = 3.0  # seconds of idle server CPU measured, subtracted from every phase
SETTLE = 2.5  # seconds after a phase, so its last audit batch (flushed each second) counts
PROBE_INTERVAL = 0.2  # seconds between two logins of the trusted device
PROBE_DELAY = 1.0  # seconds into a flood before the first trusted login
ARGON2_SAMPLES = 5
QUIET_SAMPLE = 1.0  # seconds over which the machine's load is sampled before a phase
QUIET_STREAK = 3  # quiet samples in a row before a phase starts
QUIET_SHARE = 0.25  # "quiet": other processes use less than this share of one CPU
DISTURBED_SHARE = 0.10  # a phase during which other processes used more gets a warning
MAX_WARMUP_SESSIONS = 30  # sessions to spend one budget before giving up
PASSWORD_CHECKS_TIMEOUT = 120.0  # seconds for a reply while budgets are being spent
TARGET_THROTTLED_MS = 0.3
TARGET_P99_MS = 500.0

RESULTS = Path(__file__).resolve().parent / "results" / "auth_flood.md"


BASELINE = "baseline: handshake + EHLO + QUIT"
NEW_DEVICES = "new device per session"
REPEATED_DEVICES = "repeated devices, budgets spent"
ATTACKERS = (NEW_DEVICES, REPEATED_DEVICES)


def flood(attacker: str) -> str:
    """The name of the phase that measures CPU against ``attacker``."""
    return f"flood, {attacker}"


def flood_probed(attacker: str) -> str:
    """The name of the phase that measures the trusted device's latency."""
    return f"flood, {attacker} + trusted logins"


def source_address(slot: int) -> str:
    """Loopback source address of a load slot, so that no address exceeds the session cap."""
    return f"127.0.0.{10 + slot // SLOTS_PER_SOURCE}"


def ghost_account(index: int, round_: int) -> str:
    """A made-up account on which a repeated device spends its own budget."""
    return f"nobody-{index}-{round_}@example.org"


def new_token() -> str:
    return str(uuid.uuid4())


# --- one session, in any process ---------------------------------------------------


async def attempt_session(
    target: Target,
    token: str,
    account: str,
    password: str,
    attempts: int,
    tally: Tally,
    source: str | None = None,
) -> None:
    """CLIENTID, then up to ``attempts`` AUTH PLAIN (until 235 or 421), then QUIT."""
    async with await SmtpSession.open(target, source) as session:
        tally["sessions"] += 1
        await session.clientid(CLIENT_TYPE, token)
        for _ in range(attempts):
            reply = await session.auth_plain(account, password)
            tally["attempts"] += 1
            tally[reply_key(reply)] += 1
            if session.closed or reply.code == 235:
                break


def reply_key(reply: Reply) -> str:
    """The tally key of an AUTH reply: its code; a 454 that is not throttling is apart."""
    if reply.code == 454 and not reply.text.startswith(THROTTLED_TEXT):
        return "454 " + reply.text
    return str(reply.code)


async def handshake_session(target: Target, tally: Tally, source: str | None = None) -> None:
    """TLS handshake, EHLO, QUIT: the baseline."""
    async with await SmtpSession.open(target, source):
        tally["sessions"] += 1


@dataclass(frozen=True)
class LoadSpec:
    """What one generator process does for ``duration`` seconds."""

    target: Target
    duration: float
    slots: int
    first_slot: int  # global index of this process's first slot
    account: str | None  # None: handshake-only sessions
    attempts: int = 0
    tokens: tuple[str, ...] = ()  # the device pool; empty: a new device per session

    def token(self, slot: int) -> str:
        return self.tokens[slot % len(self.tokens)] if self.tokens else new_token()


@dataclass(frozen=True)
class LoadResult:
    tally: Tally
    cpu: float  # this generator process's CPU seconds
    wall: float


async def load_slot(spec: LoadSpec, index: int, tally: Tally) -> None:
    slot = spec.first_slot + index
    source = source_address(slot)
    if spec.account is None:
        await handshake_session(spec.target, tally, source)
    else:
        token = spec.token(slot)
        await attempt_session(
            spec.target, token, spec.account, WRONG_PASSWORD, spec.attempts, tally, source
        )


def load_process(spec: LoadSpec) -> LoadResult:
    """The generator: runs in a worker process."""
    cpu, wall = time.process_time(), time.perf_counter()
    slot = functools.partial(load_slot, spec)
    tally = asyncio.run(run_slots(slot, spec.slots, spec.duration))
    return LoadResult(tally, time.process_time() - cpu, time.perf_counter() - wall)


# --- phases ------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    wall: float
    server_cpu: float  # net of the idle server's CPU
    generator_cpu: float
    others_share: float  # of one CPU, by processes that are not part of the benchmark
    tally: Tally
    latencies: Latencies | None = None

    @property
    def server_share(self) -> float:
        return self.server_cpu / self.wall

    @property
    def generator_share(self) -> float:
        return self.generator_cpu / self.wall

    def others_text(self) -> str:
        """Counts that have no column: other replies, and failed sessions (``error ...``)."""
        others = sorted((k, n) for k, n in self.tally.items() if k not in COUNTED)
        return ", ".join(f"{n} x {key}" for key, n in others) or "0"


@dataclass
class Options:
    duration: float
    processes: int
    concurrency: int
    implicit_tls: bool
    attempts: int | None
    quiet_wait: float
    nice: int
    output: Path
    keep: bool


@dataclass
class Results:
    options: Options
    attempts: int
    code: str = ""  # the server's code version, taken at the start
    tls_version: str = ""
    argon2_cpu: float = math.nan
    argon2_wall: float = math.nan
    idle_rate: float = 0.0
    phases: dict[str, Phase] = field(default_factory=dict)
    server_problems: list[str] = field(default_factory=list)


class AuthFlood:
    """The benchmark against one running server."""

    def __init__(self, server: BenchServer, pool: Pool, options: Options) -> None:
        self.server = server
        self.pool = pool
        self.options = options
        self.target = server.target(options.implicit_tls)
        # Spending budgets queues many password checks: give their replies more time.
        self.slow_target = replace(self.target, timeout=PASSWORD_CHECKS_TIMEOUT)
        attempts = options.attempts or server.config.auth.max_failures_per_session
        self.results = Results(options, attempts, code_version())
        self.trusted_token = new_token()
        self.spent = 0  # rounds of spend_budgets

    @property
    def total_slots(self) -> int:
        return self.options.processes * self.options.concurrency

    def specs(self, account: str | None, tokens: tuple[str, ...] = ()) -> list[LoadSpec]:
        """One spec per generator process: ``account`` None is the handshake-only baseline."""
        n, attempts = self.options.concurrency, self.results.attempts
        return [
            LoadSpec(self.target, self.options.duration, n, p * n, account, attempts, tokens)
            for p in range(self.options.processes)
        ]

    async def setup(self) -> None:
        """alice, her trusted device (TOFU: the first login trusts it), the reference costs."""
        self.server.add_user(ALICE, ALICE_PASSWORD)
        tally: Tally = Counter()
        await attempt_session(self.slow_target, self.trusted_token, ALICE, ALICE_PASSWORD, 1, tally)
        if tally["235"] != 1 or "trusted" not in self.server.admin("device", "list", ALICE):
            raise RuntimeError(f"alice's first device was not trusted: {dict(tally)}")
        async with await SmtpSession.open(self.target) as session:
            self.results.tls_version = session.tls_version
        self.measure_argon2()
        cpu = self.server.cpu_seconds()
        await asyncio.sleep(IDLE_WINDOW)
        self.results.idle_rate = (self.server.cpu_seconds() - cpu) / IDLE_WINDOW

    def measure_argon2(self) -> None:
        """CPU and wall time of one real argon2id check of alice's stored hash."""
        account = PasswdFile(self.server.config.auth.passwd_file).get(ALICE)
        assert account is not None
        cpus, walls = [], []
        for _ in range(ARGON2_SAMPLES):
            cpu, wall = time.process_time(), time.perf_counter()
            verify_password(account.password_hash, WRONG_PASSWORD)
            cpus.append(time.process_time() - cpu)
            walls.append(time.perf_counter() - wall)
        self.results.argon2_cpu = statistics.median(cpus)
        self.results.argon2_wall = statistics.median(walls)

    async def until_throttled(self, account: str, token: str | None, slot: int) -> None:
        """Fail logins (a new device each session when ``token`` is None) until a 454."""
        tally: Tally = Counter()
        source = source_address(slot)
        for _ in range(MAX_WARMUP_SESSIONS):
            attempts = self.results.attempts
            device = token or new_token()
            await attempt_session(
                self.slow_target, device, account, WRONG_PASSWORD, attempts, tally, source
            )
            if tally["454"]:
                return
        raise RuntimeError(f"no 454 for {account} after {MAX_WARMUP_SESSIONS} sessions: {tally}")

    async def wait_quiet(self) -> None:
        """Wait (up to ``quiet_wait`` s) until other processes leave the CPUs nearly idle.

        Quiet means QUIET_STREAK samples in a row with less than QUIET_SHARE of a CPU busy.
        """
        deadline = time.monotonic() + self.options.quiet_wait
        streak = 0
        while streak < QUIET_STREAK and time.monotonic() < deadline:
            busy = machine_busy_seconds()
            await asyncio.sleep(QUIET_SAMPLE)
            share = (machine_busy_seconds() - busy) / QUIET_SAMPLE
            streak = streak + 1 if share < QUIET_SHARE else 0
            if not streak:
                print(f"  other processes use {share:.0%} of a CPU; waiting", file=sys.stderr)

    async def phase(
        self,
        name: str,
        specs: Sequence[LoadSpec],
        prepare: Callable[[], Awaitable[None]] | None = None,
        probe: bool = False,
    ) -> Phase:
        """Wait for a quiet machine, ``prepare``, then load the server and measure."""
        await self.wait_quiet()
        if prepare is not None:
            await prepare()
        print(f"{name} ...", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        ours, busy = time.process_time(), machine_busy_seconds()
        cpu, started = self.server.cpu_seconds(), time.perf_counter()
        prober = asyncio.create_task(self.probe_trusted(stop)) if probe else None
        timeout = max(s.duration for s in specs) + 3 * self.target.timeout + 30
        try:
            results = await asyncio.to_thread(
                run_in_processes, self.pool, load_process, specs, timeout
            )
        finally:
            stop.set()
            latencies = await prober if prober is not None else None
        wall = time.perf_counter() - started
        await asyncio.sleep(SETTLE)
        server = self.server.cpu_seconds() - cpu
        generators = sum(r.cpu for r in results)
        others = machine_busy_seconds() - busy - server - generators - time.process_time() + ours
        span = time.perf_counter() - started  # the load and the settling time
        used = server - self.results.idle_rate * span
        tally: Tally = sum((r.tally for r in results), Counter())
        done = Phase(name, wall, used, generators, max(others, 0.0) / span, tally, latencies)
        self.results.phases[name] = done
        print(f"  {done.server_share:.0%} server CPU, {dict(tally)}", file=sys.stderr, flush=True)
        return done

    async def probe_trusted(self, stop: asyncio.Event) -> Latencies:
        """alice's trusted device logs in every PROBE_INTERVAL until ``stop``."""
        latencies = Latencies()
        loop = asyncio.get_running_loop()
        next_at = loop.time() + PROBE_DELAY
        while await wait_until(stop, next_at - loop.time()):
            try:
                async with await SmtpSession.open(self.target) as session:
                    await session.clientid(CLIENT_TYPE, self.trusted_token)
                    sent = time.perf_counter()
                    reply = await session.auth_plain(ALICE, ALICE_PASSWORD)
                    latencies.add(time.perf_counter() - sent)
                    if reply.code != 235:
                        latencies.unwanted[str(reply.code)] += 1
            except SESSION_ERRORS as problem:
                latencies.unwanted[error_name(problem)] += 1
            next_at = max(next_at + PROBE_INTERVAL, loop.time())
        return latencies

    async def run(self) -> Results:
        await self.setup()
        await self.phase(BASELINE, self.specs(None))
        await self.floods(NEW_DEVICES, ())
        devices = math.ceil(self.total_slots / SESSIONS_PER_DEVICE)
        await self.floods(REPEATED_DEVICES, tuple(new_token() for _ in range(devices)))
        return self.results

    async def floods(self, attacker: str, tokens: tuple[str, ...]) -> None:
        """The CPU phase, then the latency phase, each right after spending the budgets."""
        spend = functools.partial(self.spend_budgets, tokens)
        specs = self.specs(ALICE, tokens)
        await self.phase(flood(attacker), specs, prepare=spend)
        await self.phase(flood_probed(attacker), specs, prepare=spend, probe=True)

    async def spend_budgets(self, tokens: tuple[str, ...]) -> None:
        """Spend what refilled: each pool device's budget, then alice's for unknown devices.

        A device spends its own budget on a made-up account of its own (a new one each
        time, so that the account's budget is never the one that runs out).
        """
        self.spent += 1
        devices = f"{len(tokens)} devices' and " if tokens else ""
        print(f"  spending {devices}alice's budgets", file=sys.stderr, flush=True)
        await asyncio.gather(
            *(
                self.until_throttled(ghost_account(i, self.spent), token, i * SESSIONS_PER_DEVICE)
                for i, token in enumerate(tokens)
            )
        )
        await self.until_throttled(ALICE, None, 0)


async def wait_until(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True when not stopped."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(seconds, 0.0)):
            await stop.wait()
    return not stop.is_set()


# --- the report --------------------------------------------------------------------


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.3g} ms"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def per_session_cpu(results: Results) -> float:
    baseline = results.phases[BASELINE]
    return baseline.server_cpu / max(baseline.tally["sessions"], 1)


def per_throttled_cpu(results: Results, phase: Phase) -> float:
    """(flood CPU - sessions x CPU per session - 535s x one argon2id check) / 454s."""
    extra = (
        phase.server_cpu
        - phase.tally["sessions"] * per_session_cpu(results)
        - phase.tally["535"] * results.argon2_cpu
    )
    return extra / phase.tally["454"] if phase.tally["454"] else math.nan


def phase_rows(results: Results) -> list[str]:
    rows = [
        "| phase | wall s | server CPU s | server CPU | generator CPU | other processes "
        "| sessions | AUTH | 235 | 454 | 535 | 421 | other replies, session errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for p in results.phases.values():
        t = p.tally
        rows.append(
            f"| {p.name} | {p.wall:.1f} | {p.server_cpu:.2f} | {p.server_share:.0%} "
            f"| {p.generator_share:.0%} | {p.others_share:.0%} | {t['sessions']} "
            f"| {t['attempts']} | {t['235']} "
            f"| {t['454']} | {t['535']} | {t['421']} | {p.others_text()} |"
        )
    return rows


def figure_rows(results: Results) -> list[str]:
    rows = [
        "| figure | value | target | met |",
        "|---|--:|---|---|",
        f"| server CPU per session (TLS handshake + EHLO + QUIT) | "
        f"{ms(per_session_cpu(results))} | | |",
        f"| one argon2id check (`verify_password`, CPU; wall {ms(results.argon2_wall)}) "
        f"| {ms(results.argon2_cpu)} | | |",
    ]
    for attacker in ATTACKERS:
        cost = per_throttled_cpu(results, results.phases[flood(attacker)])
        rows.append(
            f"| server CPU per throttled attempt beyond its handshake, {attacker} "
            f"| {ms(cost)} | < {TARGET_THROTTLED_MS} ms | "
            f"{verdict(cost * 1000 < TARGET_THROTTLED_MS)} |"
        )
    for attacker in ATTACKERS:
        lat = results.phases[flood_probed(attacker)].latencies
        assert lat is not None
        p99 = lat.ms(0.99)
        others = sum(lat.unwanted.values())
        detail = ", ".join(f"{n} x {k}" for k, n in sorted(lat.unwanted.items()))
        rows.append(
            f"| trusted device AUTH -> 235, {attacker}: p50 / p99 (max), n = {len(lat.seconds)} "
            f"| {lat.ms(0.5):.0f} / {p99:.0f} ({lat.ms(1.0):.0f}) ms "
            f"| p99 < {TARGET_P99_MS:.0f} ms "
            f"| {verdict(p99 < TARGET_P99_MS and others == 0)} |"
        )
        rows.append(
            f"| trusted device logins not answered 235, {attacker} | {others} "
            f"{f'({detail})' if detail else ''} | 0 | {verdict(others == 0)} |"
        )
    return rows


def disturbance(results: Results) -> list[str]:
    """A warning when other processes took a noticeable share of the CPUs during a phase."""
    busy = [p.name for p in results.phases.values() if p.others_share > DISTURBED_SHARE]
    if not busy:
        return []
    return [
        f"**Warning**: other processes used more than {DISTURBED_SHARE:.0%} of a CPU during: "
        f"{'; '.join(busy)}. Those figures are less reliable; run again on a quiet machine.",
        "",
    ]


def report(results: Results, argv: Sequence[str]) -> str:
    o = results.options
    problems = results.server_problems
    lines = [
        "# Cost of a throttled AUTH attempt (issue 3)",
        "",
        f"`python bench/auth_flood.py {' '.join(argv)}`, "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.",
        "",
        f"- Machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
        f"{cpu_model()}; Linux {platform.release()}; Python {platform.python_version()}; "
        f"{ssl.OPENSSL_VERSION}.",
        f"- Server: `twistd -n clientid-mta` ({results.code}), policy tofu, default limits "
        "(throttle: device 10 failures then 1 per 60 s; unknown devices of an account 20, "
        "then 1 per 30 s).",
        f"- Load: {o.processes} generator process(es) x {o.concurrency} concurrent sessions "
        f"from 127.0.0.10+ ({SLOTS_PER_SOURCE} per address), nice {o.nice}, "
        f"{o.duration:g} s per phase, "
        f"{'implicit TLS' if o.implicit_tls else 'STARTTLS'} ({results.tls_version}, a full "
        f"handshake per session), up to {results.attempts} wrong-password AUTH PLAIN "
        f"per session; trusted device: one login every {PROBE_INTERVAL * 1000:.0f} ms.",
        f"- Idle server CPU subtracted: {results.idle_rate:.1%} of a core.",
        "",
        *phase_rows(results),
        "",
        *disturbance(results),
        *figure_rows(results),
        "",
        log_summary(problems),
        "",
    ]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load phase")
    parser.add_argument("--processes", type=int, default=1, help="generator processes")
    parser.add_argument(
        "--concurrency", type=int, default=40, help="concurrent sessions per generator process"
    )
    parser.add_argument("--tls", choices=("implicit", "starttls"), default="implicit")
    parser.add_argument(
        "--attempts",
        type=int,
        default=None,
        help="AUTH attempts per session (default: the server's max_failures_per_session)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="seconds to wait before each phase for other processes to leave the CPUs idle",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="lower the generator processes' priority by this much (0-19), so that the "
        "server gets the CPU first, as if the attacker were on another machine",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="markdown file to write")
    parser.add_argument("--keep", action="store_true", help="keep the server's folder and log")
    args = parser.parse_args(argv)
    return Options(
        args.duration,
        args.processes,
        args.concurrency,
        args.tls == "implicit",
        args.attempts,
        args.quiet_wait,
        args.nice,
        args.output,
        args.keep,
    )


async def bench(server: BenchServer, options: Options) -> Results:
    with process_pool(options.processes, options.nice) as pool:
        return await AuthFlood(server, pool, options).run()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(argv)
    with running_server(keep=options.keep) as server:
        results = asyncio.run(bench(server, options))
        server.stop()
        results.server_problems = server.log_problems()
    text = report(results, argv)
    print(text)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(text)
    print(f"written to {options.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
