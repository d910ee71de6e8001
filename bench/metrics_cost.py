"""The cost of counting (issue 14, "Measured"): server CPU per message with ``[metrics]
listen`` on against off, the same load, one run each.

For each variant a fresh server (twistd, ``[server] workers = 1`` so one process does
all the work and its CPU is the server's) with ``--accounts`` accounts, each logged in
once first (its device trusted, its password in the authentication cache, so no
argon2id check falls into the measured window). Then ``--sessions`` concurrent sessions
(implicit TLS, CLIENTID, AUTH PLAIN) each send ``--per-session`` messages of ``--size``
bytes to a local Maildir, ``--rounds`` sessions each, one after the other: the same
number of messages for both variants (a fixed duration would give the faster run more
messages, and CPU per message falls with the rate as writes share fsyncs). With
metrics on, a scraper thread reads ``/metrics`` every ``--scrape-every`` seconds, as
Prometheus would. The variants alternate, off, on, off, on (``--repeats`` pairs), so a
neighbour's load on a shared machine falls on both alike; the table sums them.

Server CPU: utime + stime of the twistd process from /proc, from the start of the load
to 2.5 s after it ends (the audit batch is written every second). The result is CPU
per message accepted, and the difference as a share of the off figure. One run of a
noisy shared machine: differences of a few percent are within the noise; the figure
tells whether counting costs something one can see, not its exact price.

    .venv/bin/python bench/metrics_cost.py --rounds 10
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchserver import BenchServer, free_port, running_server
from workloads import Account, MailResult, MailSpec, run_mail

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "metrics_cost.md"
MAX_SECONDS = 3600.0  # the load ends after its rounds; this only bounds a stuck run
SETTLE = 2.5  # seconds after the load: the server writes its audit batch every second


@dataclass
class Variant:
    name: str
    messages: int
    cpu: float
    scrapes: int
    errors: int

    @property
    def cpu_per_message_ms(self) -> float:
        return 1000 * self.cpu / self.messages if self.messages else float("nan")


def scraper(port: int, every: float, stop: threading.Event, count: list[int]) -> None:
    while not stop.wait(every):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            page.read()
        count[0] += 1


def run_variant(name: str, metrics: bool, options: argparse.Namespace) -> Variant:
    port = free_port()
    extra = f'[metrics]\nlisten = "tcp:{port}:interface=127.0.0.1"\n' if metrics else ""
    with running_server(extra, server_toml="workers = 1") as server:
        accounts = tuple(
            Account(f"user{n}@example.org", f"password-{n}") for n in range(options.accounts)
        )
        for account in accounts:
            server.add_user(account.address, account.password)
        warm_up(server, accounts)
        spec = MailSpec(
            target=server.target(implicit_tls=True),
            accounts=accounts,
            recipient="user0@example.org",
            messages=options.per_session,
            size=options.size,
            duration=MAX_SECONDS,
            rounds=options.rounds,
            slots=options.sessions,
            label=name,
        )
        stop, scrapes = threading.Event(), [0]
        thread = None
        if metrics:
            thread = threading.Thread(
                target=scraper, args=(port, options.scrape_every, stop, scrapes)
            )
            thread.start()
        before = server.cpu_seconds()
        result: MailResult = run_mail(spec)
        time.sleep(SETTLE)
        cpu = server.cpu_seconds() - before
        stop.set()
        if thread is not None:
            thread.join()
        problems = server.log_problems()
        if problems:
            print(f"{name}: problems in the server log:\n" + "\n".join(problems), file=sys.stderr)
    return Variant(name, result.messages, cpu, scrapes[0], sum(result.errors.values()))


def warm_up(server: BenchServer, accounts: tuple[Account, ...]) -> None:
    """One session per account: trusts its device and fills the authentication cache."""
    spec = MailSpec(
        target=server.target(implicit_tls=True),
        accounts=accounts,
        recipient="user0@example.org",
        messages=1,
        size=1000,
        duration=60,
        rounds=1,
        label="warm-up",
    )
    result = run_mail(spec)
    assert result.messages == len(accounts), result.errors


def total(name: str, runs: list[Variant]) -> Variant:
    mine = [run for run in runs if run.name == name]
    return Variant(
        name,
        sum(run.messages for run in mine),
        sum(run.cpu for run in mine),
        sum(run.scrapes for run in mine),
        sum(run.errors for run in mine),
    )


def table(runs: list[Variant], options: argparse.Namespace) -> str:
    variants = [total("off", runs), total("on", runs)]
    off, on = variants
    change = (on.cpu_per_message_ms / off.cpu_per_message_ms - 1) * 100
    rows = [
        "| metrics | messages | server CPU (s) | CPU per message (ms) | scrapes | errors |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {v.name} | {v.messages} | {v.cpu:.2f} | {v.cpu_per_message_ms:.3f} | "
            f"{v.scrapes} | {v.errors} |"
            for v in variants
        ),
    ]
    load = (
        f"{options.sessions} concurrent sessions x {options.rounds} rounds, "
        f"{options.per_session} messages of {options.size} bytes per session, one twistd "
        f"process, scrape every {options.scrape_every:.0f} s with metrics on; "
        f"{options.repeats} x (off, on)"
    )
    each = ", ".join(f"{run.name} {run.cpu_per_message_ms:.3f}" for run in runs)
    return (
        "# Metrics cost (bench/metrics_cost.py)\n\n"
        f"Load: {load}.\n\n" + "\n".join(rows) + "\n\n"
        f"CPU per message with metrics on: {change:+.1f}% against off (target: under 5%).\n\n"
        f"Each run in order (ms per message): {each}.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="sessions per slot (10)")
    parser.add_argument("--repeats", type=int, default=2, help="(off, on) pairs (2)")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions (8)")
    parser.add_argument("--accounts", type=int, default=8, help="accounts (8)")
    parser.add_argument("--per-session", type=int, default=20, help="messages per session (20)")
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes (4096)")
    parser.add_argument("--scrape-every", type=float, default=5.0, help="seconds (5)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    options = parser.parse_args()
    runs = []
    for _ in range(options.repeats):
        runs += [run_variant("off", False, options), run_variant("on", True, options)]
    text = table(runs, options)
    print(text)
    options.output.write_text(text)


if __name__ == "__main__":
    main()
