"""Logins per second and AUTH latency by store (issue 12, "Several nodes"):

- ``sqlite``: one node, the SQLite file (the default);
- ``pg-1``: one node on PostgreSQL;
- ``pg-2``: two nodes on one PostgreSQL database, the load generator spreading its
  sessions over both (slot ``i`` goes to node ``i % 2``, as a TCP balancer would).

Each in three phases: ``cold`` (a new CLIENTID per session, so every login registers a
new device; the auth cache off, so every login costs an argon2id check) and ``warm``
(a known device per slot, logged in once before, and the auth cache on), both with UUID
identities recorded but not enforced, so every login with the right password is
accepted (``235``) and the device is recorded; and ``trusted`` (issue 16: UUID
identities enforced, one device per account trusted on first use before the clock, the
cache on: a trusted device's login, which SQLite decides on the reactor and PostgreSQL
in one thread with one read). A session is: implicit TLS, EHLO, CLIENTID, AUTH PLAIN
(timed), QUIT.

Run from the repository root with the venv's Python (PostgreSQL from Debian's package;
a private cluster is started in a temporary folder and removed):

    .venv/bin/python bench/store_logins.py --duration 10 --concurrency 8

It prints a markdown table and writes it to ``bench/results/store_logins.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchserver import BenchServer, code_version, log_summary, running_server
from smtpload import SESSION_ERRORS, Latencies, SmtpSession, Tally, Target, error_name

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.postgres_server

from clientid_mta.auth.passwd_file import Account, PasswdFile, hash_password
from clientid_mta.devices.keys import load_or_create_server_key
from tests.postgres_server import start_cluster

USERS = tuple((f"user{n}@example.org", f"password-{n}") for n in range(4))
SETUPS = ("sqlite", "pg-1", "pg-2")
PHASES = ("cold", "warm", "trusted")


@dataclass
class Result:
    setup: str
    phase: str
    duration: float
    latencies: Latencies = field(default_factory=Latencies)
    tally: Tally = field(default_factory=Counter)

    @property
    def logins_per_second(self) -> float:
        return self.tally["235"] / self.duration


async def _login(target: Target, user: str, password: str, token: str, result: Result) -> None:
    async with await SmtpSession.open(target) as session:
        await session.clientid("UUID", token)
        started = time.perf_counter()
        reply = await session.auth_plain(user, password)
        result.latencies.add(time.perf_counter() - started)
        result.tally[str(reply.code)] += 1


async def _phase(
    targets: list[Target], phase: str, concurrency: int, duration: float, result: Result
) -> None:
    tokens = [str(uuid.uuid4()) for _ in range(concurrency)]  # warm: one device per slot
    if phase == "warm":  # each device known and each password cached, before the clock
        for slot, token in enumerate(tokens):
            user, password = USERS[slot % len(USERS)]
            await _login(targets[slot % len(targets)], user, password, token, Result("", "", 1))
    if phase == "trusted":  # one device per account, trusted and cached on every node
        tokens = [tokens[slot % len(USERS)] for slot in range(concurrency)]
        for index, (user, password) in enumerate(USERS):
            for target in targets:
                await _login(target, user, password, tokens[index], Result("", "", 1))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration

    async def keep_going(slot: int) -> None:
        user, password = USERS[slot % len(USERS)]
        while loop.time() < deadline:
            token = str(uuid.uuid4()) if phase == "cold" else tokens[slot]
            try:
                await _login(targets[slot % len(targets)], user, password, token, result)
            except SESSION_ERRORS as problem:
                result.tally[error_name(problem)] += 1

    await asyncio.gather(*(keep_going(slot) for slot in range(concurrency)))


def _config(url: str, shared: Path, phase: str) -> str:
    cache = "0" if phase == "cold" else "3600"
    flags = '"auth", "syslog", "userlog"' if phase == "trusted" else '"syslog", "userlog"'
    # The generated config ends in its [clientid] table: key_file continues it.
    text = (
        f'key_file = "{shared / "clientid.key"}"\n'
        f'[clientid.types."UUID"]\nflags = [{flags}]\n'
        f'[auth]\npasswd_file = "{shared / "passwd"}"\ncache_ttl = {cache}\n'
    )
    return text + (f'[store]\nurl = "{url}"\n' if url else "")


@contextlib.contextmanager
def _nodes(count: int, url: str, shared: Path, phase: str) -> Iterator[list[BenchServer]]:
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                running_server(_config(url, shared, phase), server_toml="workers = 1")
            )
            for _ in range(count)
        ]
        yield servers


def run(concurrency: int, duration: float) -> list[Result]:
    cluster = start_cluster()
    shared = Path(cluster.root.parent / f"{cluster.root.name}-shared")
    shared.mkdir()
    load_or_create_server_key(shared / "clientid.key")
    PasswdFile(shared / "passwd").save([Account(u, hash_password(p)) for u, p in USERS])
    results = []
    try:
        for setup in SETUPS:
            url = "" if setup == "sqlite" else cluster.new_database()
            for phase in PHASES:
                with _nodes(2 if setup == "pg-2" else 1, url, shared, phase) as servers:
                    result = Result(setup, phase, duration)
                    targets = [server.target(implicit_tls=True) for server in servers]
                    asyncio.run(_phase(targets, phase, concurrency, duration, result))
                    for server in servers:
                        server.stop()
                        problems = server.log_problems()
                        if problems:
                            print(log_summary(problems), file=sys.stderr)
                results.append(result)
                print(_row(result), file=sys.stderr)
    finally:
        cluster.stop("immediate")
        shutil.rmtree(cluster.root, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)
    return results


def _row(result: Result) -> str:
    others = {k: v for k, v in result.tally.items() if k != "235"}
    return (
        f"| {result.setup} | {result.phase} | {result.tally['235']} |"
        f" {result.logins_per_second:.1f} | {result.latencies.ms(0.5):.1f} |"
        f" {result.latencies.ms(0.99):.1f} | {dict(others) or '-'} |"
    )


def report(results: list[Result], concurrency: int, duration: float) -> str:
    lines = [
        "# Logins by store: SQLite, PostgreSQL, two nodes on PostgreSQL",
        "",
        f"`bench/store_logins.py --duration {duration:g} --concurrency {concurrency}`,"
        f" {code_version()}. Loopback, implicit TLS, UUID devices recorded but not"
        f" enforced (cold, warm) or enforced and trusted (trusted), {len(USERS)} accounts,"
        " each node one process (`workers = 1`); the load generator runs on the same"
        " machine as the nodes and the database. The machine is shared with other work, so"
        " the figures compare the setups of one run rather than measure a capacity"
        f" (1-minute load average at the end: {os.getloadavg()[0]:.1f}, on"
        f" {os.cpu_count()} CPUs).",
        "",
        "| setup | phase | logins | logins/s | AUTH p50 ms | AUTH p99 ms | other replies |",
        "|---|---|---|---|---|---|---|",
        *(_row(result) for result in results),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "store_logins.md",
    )
    args = parser.parse_args()
    table = report(run(args.concurrency, args.duration), args.concurrency, args.duration)
    args.output.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
