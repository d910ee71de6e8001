"""The AUTH floods of the hostile test (issue "Abuse resistance, round 2", H1 and H2).

Run from ``bench/attacks.py`` (``--attack h1-audit-flood --attack h2-fresh-clientid``):

- ``handshake``: sessions that only do implicit TLS, EHLO and QUIT; their server CPU per
  session is what "beyond its TLS handshake" subtracts.
- ``h1-audit-flood``: 24 sessions from one /24 (127.20.0.1-24), no CLIENTID, each
  sending 3 ``AUTH PLAIN`` with a 1,000-character user name and a wrong password, over
  and over. Figure: growth of the device store (``devices.sqlite3`` with its ``-wal``
  and ``-shm``) per minute. Target: < 1 MB for a 60 s flood.
- ``h2-fresh-clientid``: 60 sessions from 127.0.0.10-15, each attempt a new session
  with a fresh ``CLIENTID UUID`` and a made-up account. Figures: the trusted device's
  AUTH -> 235 p50/p99 (target p99 < 500 ms) and the server CPU per refused attempt
  beyond its TLS handshake (target <= 0.3 ms).

During each phase alice's trusted device logs in from 127.0.0.2 every ``interval`` s
(TLS, EHLO, CLIENTID, AUTH PLAIN -> 235 timed, QUIT). Server CPU is that of the twistd
process and its worker processes (/proc). Everything is on loopback and bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchserver import BenchServer, process_cpu_seconds
from smtpload import (
    SESSION_ERRORS,
    Latencies,
    SmtpSession,
    Tally,
    Target,
    error_name,
    process_pool,
)

ALICE, ALICE_PASSWORD = "alice@example.org", "alice-password"
TRUSTED_UUID = "6f1d2c3b-4a5e-4f60-8a7b-1c2d3e4f5a6b"
TRUSTED_SOURCE = "127.0.0.2"
WRONG_PASSWORD = "not-the-password"
LONG_USER = "u" * 988 + "@example.org"  # 1,000 characters
H1_AUTH_PER_SESSION = 3

FLOODS = ("h1-audit-flood", "h2-fresh-clientid")


@dataclass(frozen=True)
class FloodSpec:
    kind: str  # handshake, h1-audit-flood or h2-fresh-clientid
    count: int  # concurrent sessions
    duration: float
    target: Target

    def source(self, index: int) -> str:
        if self.kind == "h2-fresh-clientid":
            return f"127.0.0.{10 + index % 6}"  # 127.0.0.10-15, 10 sessions each
        if self.kind == "h1-audit-flood":
            return f"127.20.0.{1 + index % 24}"  # one /24
        return f"127.21.0.{1 + index % 200}"


def count_for(kind: str) -> int:
    return {"handshake": 24, "h1-audit-flood": 24, "h2-fresh-clientid": 60}[kind]


async def _slot_handshake(spec: FloodSpec, index: int, tally: Tally) -> None:
    async with await SmtpSession.open(spec.target, spec.source(index)):
        tally["sessions"] += 1


async def _slot_h1(spec: FloodSpec, index: int, tally: Tally) -> None:
    async with await SmtpSession.open(spec.target, spec.source(index)) as session:
        tally["sessions"] += 1
        for _ in range(H1_AUTH_PER_SESSION):
            reply = await session.auth_plain(LONG_USER, WRONG_PASSWORD)
            tally["attempts"] += 1
            tally[str(reply.code)] += 1
            if session.closed:
                break


async def _slot_h2(spec: FloodSpec, index: int, tally: Tally) -> None:
    async with await SmtpSession.open(spec.target, spec.source(index)) as session:
        tally["sessions"] += 1
        await session.clientid("UUID", str(uuid.uuid4()))
        made_up = f"{uuid.uuid4().hex[:12]}@example.org"
        reply = await session.auth_plain(made_up, WRONG_PASSWORD)
        tally["attempts"] += 1
        tally[str(reply.code)] += 1


SLOTS: dict[str, Callable[[FloodSpec, int, Tally], Awaitable[None]]] = {
    "handshake": _slot_handshake,
    "h1-audit-flood": _slot_h1,
    "h2-fresh-clientid": _slot_h2,
}


def flood_process(spec: FloodSpec) -> Tally:
    """The attacker, in its own process: ``count`` sessions in a loop until the deadline."""

    async def flood() -> Tally:
        tally: Tally = Counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.duration
        slot = SLOTS[spec.kind]

        async def keep_going(index: int) -> None:
            await asyncio.sleep(index / 200)
            while loop.time() < deadline:
                try:
                    async with asyncio.timeout(max(deadline - loop.time(), 0.1) + 10):
                        await slot(spec, index, tally)
                except SESSION_ERRORS as problem:
                    tally[error_name(problem)] += 1

        await asyncio.gather(*(keep_going(i) for i in range(spec.count)))
        return tally

    return asyncio.run(flood())


async def trusted_logins(target: Target, duration: float, interval: float) -> Latencies:
    """Alice's trusted device logs in every ``interval`` s; AUTH -> 235 is timed."""
    latencies = Latencies()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration
    while loop.time() < deadline:
        try:
            async with await SmtpSession.open(target, TRUSTED_SOURCE) as session:
                await session.clientid("UUID", TRUSTED_UUID)
                started = time.perf_counter()
                reply = await session.auth_plain(ALICE, ALICE_PASSWORD)
                if reply.code == 235:
                    latencies.add(time.perf_counter() - started)
                else:
                    latencies.unwanted[f"AUTH {reply.code}"] += 1
        except SESSION_ERRORS as problem:
            latencies.unwanted[error_name(problem)] += 1
        await asyncio.sleep(interval)
    return latencies


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its direct children (the worker processes)."""
    total = process_cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                total += process_cpu_seconds(int(stat.parent.name))
    return total


def store_bytes(server: BenchServer) -> int:
    store = Path(server.config.clientid.device_store)
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            total += Path(str(store) + suffix).stat().st_size
    return total


@dataclass
class FloodPhase:
    kind: str
    duration: float
    tally: Tally
    cpu_seconds: float
    store_growth: int
    trusted: Latencies = field(default_factory=Latencies)

    @property
    def per_minute(self) -> float:
        return self.store_growth * 60.0 / self.duration


async def trust_alice(target: Target) -> None:
    """Alice's first login with her device: trusted on first use."""
    async with await SmtpSession.open(target, TRUSTED_SOURCE) as session:
        await session.clientid("UUID", TRUSTED_UUID)
        reply = await session.auth_plain(ALICE, ALICE_PASSWORD)
        if reply.code != 235:
            raise RuntimeError(f"alice's first device was not trusted: {reply}")


async def run_flood(server: BenchServer, kind: str, duration: float, interval: float) -> FloodPhase:
    print(f"{kind} ...", file=sys.stderr, flush=True)
    target = server.target(implicit_tls=True, timeout=30.0)
    spec = FloodSpec(kind, count_for(kind), duration, target)
    with process_pool(1) as pool:
        before_store, before_cpu = store_bytes(server), tree_cpu_seconds(server.pid)
        pending = pool.apply_async(flood_process, (spec,))
        trusted = await trusted_logins(target, duration, interval)
        tally = await asyncio.to_thread(pending.get, duration + 120)
        cpu = tree_cpu_seconds(server.pid) - before_cpu
    await asyncio.sleep(1.5)  # the audit flush and the WAL writes of the last second
    growth = store_bytes(server) - before_store
    phase = FloodPhase(kind, duration, tally, cpu, growth, trusted)
    print(f"  {dict(tally)}; trusted {dict(trusted.unwanted)}", file=sys.stderr)
    return phase


async def run_floods(
    server: BenchServer, kinds: Sequence[str], duration: float, interval: float
) -> list[FloodPhase]:
    await trust_alice(server.target())
    phases = [await run_flood(server, "handshake", min(duration, 20.0), interval)]
    for kind in kinds:
        phases.append(await run_flood(server, kind, duration, interval))
    return phases


def _ms(latencies: Latencies) -> str:
    if not latencies.seconds:
        return "-"
    return f"{latencies.ms(0.50):.0f} / {latencies.ms(0.99):.0f}"


def flood_rows(phases: Sequence[FloodPhase]) -> list[str]:
    """The table, and the three figures with their targets."""
    handshake = phases[0]
    per_session = handshake.cpu_seconds / max(handshake.tally["sessions"], 1)
    rows = [
        "| flood | s | sessions | AUTH | 535 | 454 | 421 | errors | server CPU s "
        "| store growth MB/min | CPU per attempt beyond handshake ms "
        "| trusted AUTH p50 / p99 ms | trusted failed |",
        "|---|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    figures = []
    for p in phases:
        t = p.tally
        attempts = t["attempts"]
        beyond = (p.cpu_seconds - t["sessions"] * per_session) / attempts if attempts else 0.0
        errors = ", ".join(
            f"{k}: {v}"
            for k, v in sorted(t.items())
            if k not in ("sessions", "attempts", "235", "535", "454", "421")
        )
        rows.append(
            f"| {p.kind} | {p.duration:.0f} | {t['sessions']} | {attempts} | {t['535']} "
            f"| {t['454']} | {t['421']} | {errors or '-'} | {p.cpu_seconds:.1f} "
            f"| {p.per_minute / 1e6:.2f} | {beyond * 1000:.3f} | {_ms(p.trusted)} "
            f"| {sum(p.trusted.unwanted.values())} |"
        )
        if p.kind == "h1-audit-flood":
            growth = p.store_growth * 60.0 / p.duration / 1e6
            met = "yes" if growth < 1.0 else "**no**"
            figures.append(
                f"| H1 store growth per minute of flood | {growth:.2f} MB | < 1 MB | {met} |"
            )
        if p.kind == "h2-fresh-clientid":
            p99 = p.trusted.ms(0.99) if p.trusted.seconds else float("inf")
            figures.append(
                f"| H2 trusted device AUTH p50 / p99 | {_ms(p.trusted)} ms | p99 < 500 ms "
                f"| {'yes' if p99 < 500 else '**no**'} |"
            )
            figures.append(
                f"| H2 server CPU per refused attempt beyond its TLS handshake "
                f"| {beyond * 1000:.3f} ms | <= 0.3 ms "
                f"| {'yes' if beyond <= 0.0003 else '**no**'} |"
            )
    return [
        *rows,
        "",
        f"Server CPU per TLS session (handshake + EHLO + QUIT): {per_session * 1000:.2f} ms.",
        "",
        "| figure | value | target | met |",
        "|---|--:|---|---|",
        *figures,
    ]
