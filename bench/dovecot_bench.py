"""Beside Dovecot (issue 13, "Measured"): LMTP against Maildir delivery, and AUTH
through Dovecot's auth service against our passwd file.

Starts a private Dovecot (``tests/dovecot_server.py``: its own folder, config and
ports) reading the server's passwd file, and the server (twistd) three times:

1. ``delivery``: ``[delivery] lmtp`` off (our fsynced Maildir) and on (Dovecot's LMTP,
   which fsyncs too: ``mail_fsync`` defaults to ``optimized``). ``--sessions``
   logged-in sessions each send messages of ``--size`` bytes to two local recipients
   for ``--duration`` seconds, one after the other. Reported: messages per second
   and the time from the final dot to the ``250`` (p50, p99).
2. ``auth``: each login is a new TLS session, ``CLIENTID`` of a device already
   trusted, ``AUTH PLAIN``; timed from the ``AUTH`` command to its reply. Variants:
   passwd file with our cache off and on (``cache_ttl``), and Dovecot with its
   ``auth_cache_size`` 0 and 10M (our cache is always off with Dovecot).

Short runs on a shared machine: the figures compare variants of one run, nothing more.

    .venv/bin/python bench/dovecot_bench.py --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for folder in (BENCH, ROOT):  # run as a script: smtpload and tests importable
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from benchserver import DOMAIN, BenchServer, running_server  # noqa: E402
from smtpload import Latencies, SmtpSession, Target  # noqa: E402

from tests.dovecot_server import DovecotServer, dovecot_missing  # noqa: E402

PASSWORD = "bench-password"
USERS = [f"user{n}@{DOMAIN}" for n in range(8)]


def message(size: int, sender: str, recipients: list[str]) -> bytes:
    head = (
        f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: bench\r\n"
        f"Message-ID: <{uuid.uuid4()}@{DOMAIN}>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def logged_in(target: Target, user: str, token: str) -> SmtpSession:
    session = await SmtpSession.open(target)
    await session.clientid("UUID", token)
    reply = await session.auth_plain(user, PASSWORD)
    if reply.code != 235:
        raise RuntimeError(f"login of {user} failed: {reply}")
    return session


async def send_for(
    target: Target, tokens: dict[str, str], sessions: int, seconds: float, size: int
) -> tuple[int, Latencies]:
    """Messages sent and the final-dot-to-250 latencies over ``seconds``."""
    latencies = Latencies()
    opened = [
        await logged_in(target, USERS[n % len(USERS)], tokens[USERS[n % len(USERS)]])
        for n in range(sessions)
    ]
    deadline = time.monotonic() + seconds
    sent = 0

    async def loop(index: int, session: SmtpSession) -> None:
        nonlocal sent
        sender = USERS[index % len(USERS)]
        recipients = [USERS[(index + 1) % len(USERS)], USERS[(index + 2) % len(USERS)]]
        while time.monotonic() < deadline:
            await session.expect(f"MAIL FROM:<{sender}>", 250)
            for recipient in recipients:
                await session.expect(f"RCPT TO:<{recipient}>", 250)
            await session.expect("DATA", 354)
            session.writer.write(message(size, sender, recipients) + b".\r\n")
            started = time.perf_counter()
            reply = await session.reply()
            if reply.code != 250:
                latencies.unwanted[str(reply.code)] += 1
                continue
            latencies.add(time.perf_counter() - started)
            sent += 1

    await asyncio.gather(*(loop(n, s) for n, s in enumerate(opened)))
    for session in opened:
        await session.quit()
    return sent, latencies


async def logins_for(target: Target, tokens: dict[str, str], count: int) -> Latencies:
    latencies = Latencies()
    for n in range(count):
        user = USERS[n % len(USERS)]
        session = await SmtpSession.open(target)
        await session.clientid("UUID", tokens[user])
        started = time.perf_counter()
        reply = await session.auth_plain(user, PASSWORD)
        if reply.code == 235:
            latencies.add(time.perf_counter() - started)
        else:
            latencies.unwanted[str(reply.code)] += 1
        await session.quit()
    return latencies


def prepared(server: BenchServer) -> tuple[Target, dict[str, str]]:
    """The server's target, and a trusted device per user (the first one, under tofu)."""
    target = server.target()
    tokens = {user: str(uuid.uuid4()) for user in USERS}

    async def trust() -> None:
        for user, token in tokens.items():
            session = await logged_in(target, user, token)
            await session.quit()

    asyncio.run(trust())
    return target, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--only", choices=("delivery", "auth"), default=None)
    parser.add_argument("--output", default=str(BENCH / "results" / "dovecot.md"))
    args = parser.parse_args()
    reason = dovecot_missing()
    if reason is not None:
        sys.exit(f"cannot run: {reason}")
    server_root = Path(tempfile.mkdtemp(prefix="clientid-bench-dovecot-"))
    passwd = server_root / "data" / "passwd"
    passwd.parent.mkdir(parents=True)
    dovecot = DovecotServer(Path(tempfile.mkdtemp(prefix="cmta-dovecot-")), passwd)
    rows: list[str] = []
    through_dovecot = f'[auth]\nbackend = "dovecot"\ndovecot_socket = "{dovecot.auth_socket}"\n'
    dovecot.start()
    try:
        variants = [
            ("delivery", "Maildir", ""),
            ("delivery", "LMTP", f'[delivery]\nlmtp = "{dovecot.lmtp_socket}"\n'),
            ("auth", "passwd file, cache off", "[auth]\ncache_ttl = 0\n"),
            ("auth", "passwd file, cache on", "[auth]\ncache_ttl = 3600\n"),
            ("auth", "Dovecot, auth_cache off", through_dovecot),
            ("auth", "Dovecot, auth_cache on", through_dovecot),
        ]
        for index, (kind, name, toml) in enumerate(variants):
            if args.only is not None and kind != args.only:
                continue
            if name == "Dovecot, auth_cache on":
                dovecot.stop()
                dovecot.auth_cache_size = "10M"
                dovecot.config_path.write_text(dovecot._config())
                dovecot.start()
            root = server_root / f"run{index}"
            # [delivery] goes into the template's own table (benchserver.merge_tables)
            with running_server(toml, root=root) as server:
                for user in USERS:
                    server.add_user(user, PASSWORD)
                # Dovecot reads this server's passwd file: the same users, same hashes.
                passwd.write_bytes(server.config.auth.passwd_file.read_bytes())
                target, tokens = prepared(server)
                if kind == "delivery":
                    sent, latencies = asyncio.run(
                        send_for(target, tokens, args.sessions, args.duration, args.size)
                    )
                    rows.append(
                        f"| {name} | {sent / args.duration:.1f} msg/s | "
                        f"{latencies.ms(0.5):.1f} | {latencies.ms(0.99):.1f} | "
                        f"{dict(latencies.unwanted) or '-'} |"
                    )
                else:
                    latencies = asyncio.run(logins_for(target, tokens, args.logins))
                    rows.append(
                        f"| {name} | {len(latencies.seconds)} logins | "
                        f"{latencies.ms(0.5):.1f} | {latencies.ms(0.99):.1f} | "
                        f"{dict(latencies.unwanted) or '-'} |"
                    )
                print(rows[-1], flush=True)
    finally:
        dovecot.stop()
    table = "\n".join(
        [
            "# Beside Dovecot: LMTP vs Maildir, AUTH through Dovecot vs the passwd file",
            "",
            f"`bench/dovecot_bench.py --duration {args.duration} --sessions {args.sessions} "
            f"--size {args.size} --logins {args.logins}`; Dovecot "
            "2.3 private instance, twistd one worker; a shared 2-core machine, one short run.",
            "",
            "| variant | throughput / count | p50 ms | p99 ms | other replies |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "Delivery rows: two local recipients per message, end of data to `250`. "
            "Auth rows: `AUTH PLAIN` to its reply, a trusted device, one login at a time.",
            "",
        ]
    )
    Path(args.output).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
