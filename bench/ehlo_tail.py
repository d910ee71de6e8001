"""The EHLO right after TLS starts, timed with no other load (issue 16, round 4).

    python bench/ehlo_tail.py [--sessions 100] [--concurrency 1,10]

Starts our server (``benchserver.running_server``) and opens sessions one after another
(then ``--concurrency`` at a time): on the submission port EHLO, STARTTLS, the TLS
handshake, and the timed EHLO; on the implicit-TLS port the handshake, the greeting and
the timed EHLO. Prints p50, p90 and how many took 40 ms or more: a reply held by Nagle's
algorithm until the client's delayed ACK takes 40 ms on Linux, so any there is a tail
that no amount of CPU explains.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from benchserver import running_server
from smtpload import SmtpSession, Target, percentile

DELAYED_ACK = 0.040  # seconds: Linux's shortest delayed ACK


async def timed_ehlo(target: Target) -> float:
    """One session: the seconds from sending the EHLO inside TLS to its whole reply."""
    session = await SmtpSession.open_tls(target)
    try:
        started = time.perf_counter()
        await session.expect(f"EHLO {target.helo}", 250)
        return time.perf_counter() - started
    finally:
        await session.close()


async def measure(target: Target, sessions: int, concurrency: int) -> list[float]:
    seconds: list[float] = []

    async def slot(count: int) -> None:
        for _ in range(count):
            seconds.append(await timed_ehlo(target))

    await asyncio.gather(*(slot(sessions // concurrency) for _ in range(concurrency)))
    return sorted(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100, help="sessions per run")
    parser.add_argument("--concurrency", default="1,10", help="comma-separated")
    args = parser.parse_args()
    with running_server() as server:
        for implicit in (False, True):
            target = server.target(implicit_tls=implicit)
            for concurrency in (int(each) for each in args.concurrency.split(",")):
                seconds = asyncio.run(measure(target, args.sessions, concurrency))
                held = sum(1 for each in seconds if each >= DELAYED_ACK)
                print(
                    f"{target.mode:12} concurrency {concurrency:3}: {len(seconds)} EHLOs,"
                    f" p50 {percentile(seconds, 0.5) * 1e3:.2f} ms,"
                    f" p90 {percentile(seconds, 0.9) * 1e3:.2f} ms, {held} of 40 ms or more"
                )


if __name__ == "__main__":
    main()
