"""Our server side by side with aiosmtpd and Postfix, on the same load (issue 5, items 1 and 2).

Usage, from the repository root with the venv's Python, as root (Postfix's master runs as
root; the script installs Debian's postfix, sasl2-bin and libsasl2-modules if missing):

    python bench/compare.py                        # everything: about 15 minutes
    python bench/compare.py --peers ours,postfix --workloads a --duration 10
    python bench/compare.py --smoke --output-dir /tmp/smoke   # a few sessions, ours only

Peers, each started fresh for every workload, all on 127.0.0.1 with the same
certificate (ECDSA P-256, made here), the same accounts and the same recipient:

- ``ours``: ``twistd -n clientid-mta`` (bench/benchserver.py), policy tofu, default
  settings except the session caps the workload needs, ``[server] workers`` (``--workers``)
  and the passwd file, certificate and key made here;
- ``aiosmtpd``: bench/peers/aiosmtpd_peer.py: STARTTLS, AUTH PLAIN against the same
  passwd file (argon2id), the same Maildir write with fsyncs;
- ``postfix``: bench/peers/postfix_peer.py: a private instance of Debian's Postfix,
  STARTTLS, Cyrus SASL PLAIN from a sasldb, 250 after its queue fsync, then delivery to a
  Maildir by ``virtual``.

Accounts ``load01@example.org`` ... (``--users``, made with our admin command); each
account is one device (one CLIENTID UUID); the recipient is ``bob@example.org``.
Concurrent session i logs in as account i modulo ``--users``.

Workloads (see workloads.py for the session itself; every reply is checked):

- (a) sustained: ``--sessions`` (50) concurrent sessions, each sending ``--messages`` (20)
  messages of ``--size`` (4096) bytes, again and again for ``--duration`` seconds. The
  first session of each slot is shorter, from ``--messages`` down to 1 over the slots,
  so that the sessions' logins are spread in time rather than all at once at every
  ``--messages``-th message (``--no-stagger``: all start alike; ``workloads.MailSpec.
  first_session`` says why); those first sessions count in every figure but the
  session time;
- (b) churn: ``--churn-sessions`` (20) concurrent sessions of one message each;
- (c) idle: ``--idle`` (5000) sessions logged in and left idle; memory per session is
  the server's memory with them open minus before, divided by their number.

Before each measured run every account logs in (one message in (a) and (b), none in
(c); once, or 4 times per process of ours when it runs several): devices become trusted
(TOFU) and our auth cache is warm. Each run waits up to ``--quiet-wait`` seconds for a
quiet machine first.

Writes ``compare.md`` and ``compare.png`` to ``--output-dir`` (bench/results), prints
the table, and with ``--json`` also the raw figures. README.md describes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.util
import io
import json
import math
import multiprocessing
import multiprocessing.pool
import os
import platform
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchserver import (
    DOMAIN,
    HOSTNAME,
    _end_with_parent,
    free_port,
    machine_busy_seconds,
    running_server,
)
from peers.postfix_peer import PostfixUnavailable, ensure_installed, running_postfix
from procstats import process_tree, reset_peak, tree_cpu_seconds, tree_memory
from smtpload import Target, percentile, process_pool
from workloads import Account, IdleResult, IdleSpec, MailResult, MailSpec, run_idle, run_mail

from clientid_mta.cli import admin
from clientid_mta.config import ConfigError, load_config
from clientid_mta.smtp.tls import generate_self_signed

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PEERS = ("ours", "aiosmtpd", "postfix")
WORKLOADS = ("a", "b", "c")
RECIPIENT = f"bob@{DOMAIN}"
STARTUP_TIMEOUT = 30.0
DRAIN_TIMEOUT = 180.0  # seconds for Postfix to deliver what it queued
SETTLE = 1.5  # seconds between the warm-up and the measurement
WARM_UP_SLOTS = 4  # concurrent warm-up sessions per generator process
WARM_UP_LIMIT = 600.0  # seconds: a warm-up ends by its rounds, this only bounds a hang
IDLE_SETTLE = 2.0  # seconds between the last idle login and the memory reading
SAMPLE_INTERVAL = 0.5  # seconds between memory samples during a run
QUIET_SAMPLE, QUIET_STREAK, QUIET_SHARE = 1.0, 3, 0.25
OTHER_BUSY = 0.10  # other processes' share of a CPU above which a run is flagged

TITLES = {"a": "(a) sustained", "b": "(b) churn", "c": "(c) idle"}
SMOKE_DEFAULTS: dict[str, Any] = {
    "peers": "ours",
    "duration": 60.0,
    "sessions": 3,
    "messages": 2,
    "churn_sessions": 3,
    "idle": 6,
    "users": 3,
    "rounds": 2,
    "quiet_wait": 0.0,
}


# --- options ------------------------------------------------------------------------


@dataclass
class Options:
    peers: tuple[str, ...]
    workloads: tuple[str, ...]
    duration: float
    sessions: int
    messages: int
    size: int
    churn_sessions: int
    idle: int
    users: int
    processes: int
    nice: int
    workers: int
    rounds: int | None
    rate: float | None
    ours_toml: str
    timeout: float
    quiet_wait: float
    work_dir: Path | None
    keep: bool
    output_dir: Path | None
    json_path: Path | None
    install: bool
    smoke: bool
    stagger: bool = True
    argv: tuple[str, ...] = ()


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--peers", default=None, help="comma-separated: ours,aiosmtpd,postfix (default all)")
    add("--workloads", default="a,b,c", help="comma-separated: a,b,c")
    add("--duration", type=float, default=20.0, help="seconds of load in (a) and (b)")
    add("--sessions", type=int, default=50, help="(a): concurrent sessions")
    add("--messages", type=int, default=20, help="(a): messages per session")
    add("--size", type=int, default=4096, help="bytes per message, headers included")
    add("--churn-sessions", type=int, default=20, help="(b): concurrent one-message sessions")
    add("--idle", type=int, default=5000, help="(c): idle logged-in sessions")
    add("--users", type=int, default=50, help="accounts (and devices) the sessions use")
    add("--processes", type=int, default=1, help="load generator processes")
    add("--nice", type=int, default=0, help="lower the generator processes' priority")
    add("--workers", type=int, default=0, help="our [server] workers (0: one per CPU)")
    add(
        "--ours-toml",
        default="",
        help='more of our config, e.g. "[delivery]\\nstore_process = true" (\\n: a new line)',
    )
    add("--rounds", type=int, default=None, help="(a),(b): sessions per slot instead of time")
    add(
        "--no-stagger",
        dest="stagger",
        action="store_false",
        help="(a): every slot's first session as long as the rest (logins come in bursts)",
    )
    add(
        "--rate",
        type=float,
        default=None,
        help="(a): messages a second in all, so peers compare at one throughput "
        "(default: as fast as each server answers)",
    )
    add("--timeout", type=float, default=30.0, help="seconds the client waits for a reply")
    add("--quiet-wait", type=float, default=60.0, help="max seconds to wait for a quiet CPU")
    add("--work-dir", type=Path, default=None, help="where the servers live (kept)")
    add("--keep", action="store_true", help="keep the temporary work folder")
    add("--output-dir", type=Path, default=None, help="for compare.md/.png (default bench/results)")
    add("--json", dest="json_path", type=Path, default=None, help="write the raw figures here")
    add("--no-install", action="store_true", help="do not apt-get install Postfix if missing")
    add("--smoke", action="store_true", help="a tiny run: ours only, a few sessions")
    if "--smoke" in argv:  # a few sessions, fixed counts; options given still win
        parser.set_defaults(**SMOKE_DEFAULTS)
    args = parser.parse_args(argv)
    peers = tuple((args.peers or ",".join(PEERS)).split(","))
    workloads = tuple(args.workloads.split(","))
    for name, given, known in (("peer", peers, PEERS), ("workload", workloads, WORKLOADS)):
        unknown = [g for g in given if g not in known]
        if unknown:
            parser.error(f"unknown {name} {unknown[0]!r}; choose from {', '.join(known)}")
    output = args.output_dir if args.output_dir or args.smoke else RESULTS
    return Options(
        peers=peers,
        workloads=workloads,
        duration=args.duration,
        sessions=args.sessions,
        messages=args.messages,
        size=args.size,
        churn_sessions=args.churn_sessions,
        idle=args.idle,
        users=args.users,
        processes=args.processes,
        nice=args.nice,
        workers=args.workers,
        rounds=args.rounds,
        rate=args.rate,
        ours_toml=args.ours_toml.replace("\\n", "\n"),
        timeout=args.timeout,
        quiet_wait=args.quiet_wait,
        work_dir=args.work_dir,
        keep=args.keep,
        output_dir=output,
        json_path=args.json_path,
        install=not args.no_install,
        smoke=args.smoke,
        stagger=args.stagger,
        argv=tuple(argv),
    )


# --- the common setup: certificate, accounts ------------------------------------------


@dataclass
class Setup:
    root: Path
    certificate: Path
    key: Path
    passwd: Path
    accounts: tuple[Account, ...]
    workers: int
    workers_toml: str  # "workers = N", or "" when the installed server does not know the key
    ours_toml: str = ""  # --ours-toml: appended to our config
    notes: list[str] = field(default_factory=list)


def make_accounts(root: Path, count: int) -> tuple[Path, tuple[Account, ...]]:
    """The accounts and bob, added with our admin command (argon2id hashes)."""
    config = root / "admin.toml"
    config.write_text('[server]\ndata_dir = "admin-data"\n\n[auth]\npasswd_file = "passwd"\n')
    accounts = tuple(
        Account(f"load{i:02d}@{DOMAIN}", f"load-password-{i:02d}") for i in range(1, count + 1)
    )
    logins = [(a.address, a.password) for a in accounts]
    for address, password in [*logins, (RECIPIENT, "bob-password")]:
        argv = ["--config", str(config), "user", "add", address]
        admin.run(argv, io.StringIO(), io.StringIO(password + "\n"))
    return root / "passwd", accounts


def workers_setting(root: Path, workers: int) -> tuple[str, str]:
    """``[server] workers = N`` if the installed server's config knows it, and a note."""
    probe = root / "workers-probe.toml"
    probe.write_text(f'[server]\ndata_dir = "probe-data"\nworkers = {workers}\n')
    try:
        load_config(probe)
    except ConfigError as problem:
        if "workers" in str(problem):
            return "", f"our server does not know [server] workers ({problem}); left out"
        raise
    return f"workers = {workers}", f"our server: [server] workers = {workers} (0: one per CPU)"


def prepare(options: Options, root: Path) -> Setup:
    certificate, key = generate_self_signed(root / "tls", HOSTNAME)
    passwd, accounts = make_accounts(root, options.users)
    workers_toml, workers_note = workers_setting(root, options.workers)
    cache = importlib.util.find_spec("clientid_mta.auth.cache") is not None
    notes = [
        workers_note,
        "our server: auth cache "
        + ("present ([auth] cache_ttl default 3600 s)" if cache else "NOT present in this tree"),
        "aiosmtpd: no auth cache in (a) and (b) (a full argon2id check per login); in (c) a "
        "cache like ours, so that its logins do not take minutes before memory is measured",
    ]
    if options.ours_toml:
        notes.append(f"our server: more config: {options.ours_toml!r}")
    return Setup(
        root,
        certificate,
        key,
        passwd,
        accounts,
        options.workers,
        workers_toml,
        options.ours_toml,
        notes,
    )


# --- peers ---------------------------------------------------------------------------


@dataclass
class Instance:
    """A started server under test."""

    peer: str
    port: int
    certificate: Path  # the CA file of the client: the self-signed certificate
    root_pids: Callable[[], list[int]]  # the process tree to measure
    maildir: Path  # the recipient's Maildir
    queued: Callable[[], int] = lambda: 0
    log_problems: Callable[[], list[str]] = list
    warm_up_rounds: int = 1  # logins per account before a measurement

    def target(self, timeout: float) -> Target:
        """STARTTLS on the submission port; each reply within ``timeout`` seconds."""
        return Target(
            "127.0.0.1", self.port, False, str(self.certificate), HOSTNAME, timeout=timeout
        )

    def delivered(self) -> int:
        try:
            return sum(1 for _ in (self.maildir / "new").iterdir())
        except FileNotFoundError:
            return 0

    def wait_delivered(self, expected: int, timeout: float) -> int:
        """Wait until ``expected`` messages are in the Maildir and nothing is queued."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queued() == 0 and self.delivered() >= expected:
                break
            time.sleep(0.2)
        return self.delivered()


def session_caps(load: int, users: int) -> str:
    """[limits] for ``load`` concurrent sessions from one address, ``users`` devices."""
    per_device = max(5, math.ceil(load / users) + 5)
    return (
        f"\n[limits]\nmax_sessions = {max(1000, load + 100)}\n"
        f"max_sessions_per_address = {max(20, load + 100)}\n"
        f"max_sessions_per_device = {per_device}\n"
    )


def ours_warm_up_rounds(workers: int) -> int:
    """Logins per account that warm the auth cache of each of our processes.

    Every process has its own cache and the kernel hands a connection to whichever
    process accepts it first, so with N processes each account logs in 4 x N times.
    """
    processes = workers or os.cpu_count() or 1
    return 1 if processes == 1 else 4 * processes


@contextlib.contextmanager
def start_ours(setup: Setup, folder: Path, load: int) -> Iterator[Instance]:
    extra = (
        f'\n[auth]\npasswd_file = "{setup.passwd}"\n'
        f'\n[tls]\ncertificate = "{setup.certificate}"\nkey = "{setup.key}"\n'
        + session_caps(load, len(setup.accounts))
        + (f"\n{setup.ours_toml}\n" if setup.ours_toml else "")
    )
    with running_server(extra, root=folder, server_toml=setup.workers_toml) as server:
        local, _, domain = RECIPIENT.partition("@")
        yield Instance(
            "ours",
            server.submission_port,
            setup.certificate,
            lambda: process_tree(server.pid),
            server.config.delivery.maildir_root / domain / local,
            log_problems=server.log_problems,
            warm_up_rounds=ours_warm_up_rounds(setup.workers),
        )


@contextlib.contextmanager
def start_aiosmtpd(setup: Setup, folder: Path, cache_ttl: float) -> Iterator[Instance]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = folder / "aiosmtpd.log"
    argv = [
        sys.executable,
        str(BENCH / "peers" / "aiosmtpd_peer.py"),
        *("--port", str(port), "--certificate", str(setup.certificate)),
        *("--key", str(setup.key), "--passwd", str(setup.passwd)),
        *("--maildir-root", str(folder / "mail"), "--hostname", HOSTNAME),
        *("--cache-ttl", str(cache_ttl)),
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_end_with_parent
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "ready" not in log_path.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aiosmtpd did not start: {log_path.read_text()[-800:]}")
            time.sleep(0.1)
        local, _, domain = RECIPIENT.partition("@")

        def problems() -> list[str]:
            text = log_path.read_text(errors="replace")
            return [line for line in text.splitlines() if "Traceback" in line or "ERROR" in line]

        yield Instance(
            "aiosmtpd",
            port,
            setup.certificate,
            lambda: process_tree(process.pid),
            folder / "mail" / domain / local,
            log_problems=problems,
        )
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


@contextlib.contextmanager
def start_postfix(setup: Setup, folder: Path, load: int) -> Iterator[Instance]:
    users = [(a.address, a.password) for a in setup.accounts]
    with running_postfix(
        folder,
        hostname=HOSTNAME,
        domain=DOMAIN,
        certificate=setup.certificate,
        key=setup.key,
        users=users,
        mailboxes=[RECIPIENT],
        process_limit=max(100, load + 50),
    ) as postfix:
        yield Instance(
            "postfix",
            postfix.port,
            setup.certificate,
            postfix.pids,
            postfix.maildir(RECIPIENT),
            queued=postfix.queued,
            log_problems=postfix.log_problems,
        )


def start(peer: str, setup: Setup, workload: str, load: int) -> contextlib.AbstractContextManager:
    folder = setup.root / f"{peer}-{workload}"
    if peer == "ours":
        return start_ours(setup, folder, load)
    if peer == "aiosmtpd":
        # The idle workload's 5,000 logins would take minutes of argon2id without a cache.
        return start_aiosmtpd(setup, folder, cache_ttl=3600.0 if workload == "c" else 0.0)
    return start_postfix(setup, folder, load)


# --- measuring -------------------------------------------------------------------------


class MemorySampler:
    """Samples the server tree's summed RSS in a thread; ``peak`` is the largest sum."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.peak_kib = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def sample(self) -> None:
        memory = tree_memory(self.instance.root_pids(), pss=False)
        self.peak_kib = max(self.peak_kib, memory.rss_kib, memory.hwm_kib)
        self.max_processes = max(self.max_processes, memory.processes)

    def __enter__(self) -> MemorySampler:
        reset_peak(self.instance.root_pids())  # the peak of this run, not of the warm-up
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@dataclass
class Window:
    """CPU readings around a measured run."""

    wall: float = 0.0
    server_cpu: float = 0.0
    main_cpu: float = 0.0
    machine_busy: float = 0.0
    load_before: float = 0.0  # the 1-minute load average just before


@contextlib.contextmanager
def measured(instance: Instance, window: Window) -> Iterator[None]:
    window.load_before = os.getloadavg()[0]
    cpu, busy = tree_cpu_seconds(instance.root_pids()), machine_busy_seconds()
    main = time.process_time()
    started = time.perf_counter()
    yield
    window.wall = time.perf_counter() - started
    window.server_cpu = tree_cpu_seconds(instance.root_pids()) - cpu
    window.machine_busy = machine_busy_seconds() - busy
    window.main_cpu = time.process_time() - main


def wait_quiet(max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) for QUIET_STREAK quiet samples; the last busy share."""
    deadline = time.monotonic() + max_wait
    streak, share = 0, 0.0
    while streak < QUIET_STREAK and time.monotonic() < deadline:
        busy = machine_busy_seconds()
        time.sleep(QUIET_SAMPLE)
        share = (machine_busy_seconds() - busy) / QUIET_SAMPLE
        streak = streak + 1 if share < QUIET_SHARE else 0
        if not streak:
            print(f"  other processes use {share:.0%} of a CPU; waiting", file=sys.stderr)
    return share


def spread(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` dealt round-robin into ``parts`` lists (empty ones dropped)."""
    dealt = [list(items[i::parts]) for i in range(parts)]
    return [d for d in dealt if d]


# --- results ---------------------------------------------------------------------------


@dataclass
class Run:
    peer: str
    workload: str
    ok: bool = True
    problem: str = ""  # why the run could not be done
    wall: float = 0.0  # (a), (b): first connect to last QUIT; (c): opening the sessions
    window: float = 0.0  # the CPU measurement: the load and, for Postfix, its deliveries
    sessions: int = 0
    messages: int = 0
    clientid_sessions: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    warmup_errors: dict[str, int] = field(default_factory=dict)
    warmup_messages: int = 0
    data_ms: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # p50 p95 p99
    auth_ms: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    session_ms: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    server_cpu: float = 0.0
    generator_cpu: float = 0.0
    other_cpu: float = 0.0  # the machine's busy time less server, generators, this process
    load_before: float = 0.0
    peak_rss_mib: float = 0.0
    processes: int = 0
    accepted: int = 0  # 250s at the final dot, warm-up included
    delivered: int = 0  # messages in the recipient's Maildir afterwards
    log_problems: list[str] = field(default_factory=list)
    # (c) only
    idle_opened: int = 0
    idle_quit_ok: int = 0
    idle_open_seconds: float = 0.0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    pss_before_kib: int = 0
    pss_after_kib: int = 0

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.wall if self.wall else math.nan

    @property
    def sessions_per_s(self) -> float:
        return self.sessions / self.wall if self.wall else math.nan

    @property
    def server_share(self) -> float:
        """The server's CPU over the measured window, as a share of one CPU."""
        return self.server_cpu / self.window if self.window else math.nan

    @property
    def cpu_ms_per_message(self) -> float:
        return self.server_cpu / self.messages * 1000 if self.messages else math.nan

    @property
    def cpu_ms_per_session(self) -> float:
        return self.server_cpu / self.sessions * 1000 if self.sessions else math.nan

    @property
    def rss_kib_per_session(self) -> float:
        opened = self.idle_opened
        return (self.rss_after_kib - self.rss_before_kib) / opened if opened else math.nan

    @property
    def pss_kib_per_session(self) -> float:
        opened = self.idle_opened
        return (self.pss_after_kib - self.pss_before_kib) / opened if opened else math.nan

    def as_dict(self) -> dict[str, Any]:
        figures = asdict(self)
        for name in (
            "errors_total",
            "server_share",
            "msgs_per_s",
            "sessions_per_s",
            "cpu_ms_per_message",
            "cpu_ms_per_session",
            "rss_kib_per_session",
            "pss_kib_per_session",
        ):
            figures[name] = getattr(self, name)
        return figures


def percentiles_ms(values: Sequence[float]) -> tuple[float, float, float]:
    """p50, p95 and p99 in milliseconds (nearest rank; NaN for no values)."""
    return (
        percentile(values, 0.50) * 1000,
        percentile(values, 0.95) * 1000,
        percentile(values, 0.99) * 1000,
    )


class Bench:
    def __init__(self, options: Options, setup: Setup, pool: multiprocessing.pool.Pool) -> None:
        self.options = options
        self.setup = setup
        self.pool = pool

    def load_of(self, workload: str) -> int:
        o = self.options
        return {"a": o.sessions, "b": o.churn_sessions, "c": o.idle}[workload]

    def mail_specs(
        self, instance: Instance, slots: int, messages: int, rate: float | None = None
    ) -> list[MailSpec]:
        """``rate``: messages a second over all the generator processes (None: unpaced)."""
        accounts = self.setup.accounts
        chosen = [accounts[i % len(accounts)] for i in range(slots)]
        share = rate / self.options.processes if rate else None
        return [
            MailSpec(
                instance.target(self.options.timeout),
                tuple(part),
                RECIPIENT,
                messages,
                self.options.size,
                self.options.duration,
                self.options.rounds,
                rate=share,
                stagger=self.options.stagger,
            )
            for part in spread(chosen, self.options.processes)
        ]

    def mail_jobs(self, specs: Sequence[MailSpec]) -> MailResult:
        total = MailResult()
        timeout = max(s.duration for s in specs) + 300  # the last sessions, then a hang
        for result in self.pool.map_async(run_mail, specs, chunksize=1).get(timeout):
            total.merge(result)
        return total

    def warm_up(self, instance: Instance, messages: int) -> MailResult:
        """Every account logs in (``warm_up_rounds`` times): devices trusted, caches warm.

        A few at a time (WARM_UP_SLOTS per process), so that the first logins' argon2id
        checks never queue up past the reply timeout.
        """
        warm = []
        for spec in self.mail_specs(instance, len(self.setup.accounts), messages):
            slots = min(WARM_UP_SLOTS, len(spec.accounts))
            rounds = math.ceil(len(spec.accounts) / slots) * instance.warm_up_rounds
            warm.append(replace(spec, slots=slots, rounds=rounds, duration=WARM_UP_LIMIT))
        return self.mail_jobs(warm)

    def run(self, peer: str, workload: str) -> Run:
        print(f"{TITLES[workload]}: {peer} ...", file=sys.stderr, flush=True)
        try:
            with start(peer, self.setup, workload, self.load_of(workload)) as instance:
                run = self.idle(instance) if workload == "c" else self.mail(instance, workload)
                run.log_problems = instance.log_problems()
                return run
        except PostfixUnavailable as problem:
            return Run(peer, workload, ok=False, problem=f"Postfix could not run: {problem}")
        except Exception as problem:  # report it and go on with the other peers
            return Run(peer, workload, ok=False, problem=f"{type(problem).__name__}: {problem}")
        finally:
            if not self.options.keep and self.options.work_dir is None:
                shutil.rmtree(self.setup.root / f"{peer}-{workload}", ignore_errors=True)

    def mail(self, instance: Instance, workload: str) -> Run:
        run = Run(instance.peer, workload)
        warm = self.warm_up(instance, messages=1)
        run.warmup_errors, run.warmup_messages = dict(warm.errors), warm.messages
        time.sleep(SETTLE)
        slots = self.load_of(workload)
        messages = self.options.messages if workload == "a" else 1
        specs = self.mail_specs(
            instance, slots, messages, self.options.rate if workload == "a" else None
        )
        wait_quiet(self.options.quiet_wait)
        window = Window()
        with MemorySampler(instance) as sampler, measured(instance, window):
            result = self.mail_jobs(specs)
            run.accepted = warm.messages + result.messages
            run.delivered = instance.wait_delivered(run.accepted, DRAIN_TIMEOUT)
        run.wall = result.end - result.start
        run.sessions, run.messages = result.sessions, result.messages
        run.clientid_sessions = result.clientid
        run.errors = dict(result.errors)
        run.data_ms = percentiles_ms(result.data_seconds)
        run.auth_ms = percentiles_ms(result.auth_seconds)
        run.session_ms = percentiles_ms(result.session_seconds)
        self.cpu_figures(run, window, result.cpu)
        run.peak_rss_mib = sampler.peak_kib / 1024
        run.processes = sampler.max_processes
        return run

    def cpu_figures(self, run: Run, window: Window, generator_cpu: float) -> None:
        run.server_cpu, run.window = window.server_cpu, window.wall
        run.generator_cpu = generator_cpu
        others = window.machine_busy - window.server_cpu - generator_cpu - window.main_cpu
        run.other_cpu = max(0.0, others) / window.wall if window.wall else 0.0
        run.load_before = window.load_before

    def idle(self, instance: Instance) -> Run:
        run = Run(instance.peer, "c")
        warm = self.warm_up(instance, messages=0)
        run.warmup_errors, run.warmup_messages = dict(warm.errors), warm.messages
        time.sleep(SETTLE)
        wait_quiet(self.options.quiet_wait)
        before = tree_memory(instance.root_pids())
        run.rss_before_kib, run.pss_before_kib = before.rss_kib, before.pss_kib
        indexes = list(range(self.options.idle))
        parts = spread(indexes, self.options.processes)
        accounts = self.setup.accounts
        with multiprocessing.get_context("spawn").Manager() as manager:
            opened: queue.Queue[int] = manager.Queue()
            release = manager.Event()
            specs = [
                IdleSpec(
                    instance.target(self.options.timeout),
                    tuple(accounts[i % len(accounts)] for i in part),
                    len(part),
                    concurrency=50,
                    hold_timeout=600.0,
                )
                for part in parts
            ]
            job = functools.partial(run_idle, opened=opened, release=release)
            pending = self.pool.map_async(job, specs, chunksize=1)
            started = time.perf_counter()
            for _ in specs:
                while True:
                    with contextlib.suppress(queue.Empty):
                        opened.get(timeout=1.0)
                        break
                    if pending.ready():
                        pending.get()  # raises the job's exception
                        raise RuntimeError("an idle generator ended before it reported")
            run.wall = time.perf_counter() - started
            time.sleep(IDLE_SETTLE)
            after = tree_memory(instance.root_pids())
            release.set()
            results: list[IdleResult] = pending.get(600.0)
        run.rss_after_kib, run.pss_after_kib = after.rss_kib, after.pss_kib
        run.processes = after.processes
        run.peak_rss_mib = max(after.rss_kib, after.hwm_kib) / 1024
        errors: Counter[str] = Counter()
        for result in results:
            run.idle_opened += result.opened
            run.idle_quit_ok += result.quit_ok
            run.clientid_sessions += result.clientid
            run.generator_cpu += result.cpu
            run.idle_open_seconds = max(run.idle_open_seconds, result.open_seconds)
            errors.update(result.errors)
        run.sessions = run.idle_quit_ok
        run.errors = dict(errors)
        run.accepted = warm.messages
        run.delivered = instance.delivered()
        return run


# --- the report ------------------------------------------------------------------------


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def one_line(text: str) -> str:
    """A problem's first line, safe in a table cell."""
    return text.strip().splitlines()[0].replace("|", "/") if text.strip() else ""


def triple(values: tuple[float, float, float]) -> str:
    return " / ".join(fmt(v) for v in values)


def errors_text(run: Run) -> str:
    if not run.errors:
        return "0"
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(run.errors.items()))
    return f"{run.errors_total} ({kinds})"


def mail_table(runs: list[Run], workload: str) -> list[str]:
    per = "message" if workload == "a" else "session"
    lines = [
        f"### {TITLES[workload]}",
        "",
        f"| peer | msgs/s | sessions/s | end of DATA → 250 p50 / p95 / p99 ms | "
        "AUTH → 235 p50 / p95 / p99 ms | "
        f"session p50 / p95 / p99 ms | errors | server CPU s (of a CPU) | server CPU ms/{per} | "
        "peak RSS MiB | processes | generator CPU | other CPU | 250s / in Maildir | CLIENTID |",
        "|---|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for run in runs:
        if not run.ok:
            lines.append(f"| {run.peer} | not run: {one_line(run.problem)} |" + " |" * 13)
            continue
        per_unit = run.cpu_ms_per_message if workload == "a" else run.cpu_ms_per_session
        lines.append(
            f"| {run.peer} | {fmt(run.msgs_per_s)} | {fmt(run.sessions_per_s)} | "
            f"{triple(run.data_ms)} | {triple(run.auth_ms)} | {triple(run.session_ms)} | "
            f"{errors_text(run)} | "
            f"{fmt(run.server_cpu)} ({run.server_share:.0%}) | {fmt(per_unit, 2)} | "
            f"{fmt(run.peak_rss_mib)} | "
            f"{run.processes} | {run.generator_cpu / run.wall:.0%} | {run.other_cpu:.0%} | "
            f"{run.accepted} / {run.delivered} | "
            f"{'sent' if run.clientid_sessions else 'not offered'} |"
        )
    return [*lines, ""]


def idle_table(runs: list[Run]) -> list[str]:
    lines = [
        f"### {TITLES['c']}",
        "",
        "| peer | sessions held | errors | logins/s while opening | processes | "
        "RSS before → with them MiB | KB/session (RSS) | KB/session (PSS) | 221 at QUIT |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for run in runs:
        if not run.ok:
            lines.append(f"| {run.peer} | not run: {one_line(run.problem)} |" + " |" * 7)
            continue
        rate = run.idle_opened / run.wall if run.wall else math.nan
        lines.append(
            f"| {run.peer} | {run.idle_opened} | {errors_text(run)} | {fmt(rate)} | "
            f"{run.processes} | {run.rss_before_kib / 1024:,.1f} → {run.rss_after_kib / 1024:,.1f}"
            f" | {fmt(run.rss_kib_per_session)} | {fmt(run.pss_kib_per_session)} | "
            f"{run.idle_quit_ok} |"
        )
    return [*lines, ""]


def find(runs: list[Run], peer: str, workload: str) -> Run | None:
    return next((r for r in runs if r.peer == peer and r.workload == workload and r.ok), None)


# name: (workload, what, the figure of a run)
METRICS: dict[str, tuple[str, str, Callable[[Run], float]]] = {
    "a_msgs": ("a", "(a) messages/s", lambda r: r.msgs_per_s),
    "a_cpu": ("a", "(a) server CPU per message (ms)", lambda r: r.cpu_ms_per_message),
    "a_p99": ("a", "(a) p99 end of DATA → 250 (ms)", lambda r: r.data_ms[2]),
    "a_auth_p50": ("a", "(a) AUTH → 235 p50 (ms)", lambda r: r.auth_ms[0]),
    "b_sessions": ("b", "(b) sessions/s", lambda r: r.sessions_per_s),
    "b_cpu": ("b", "(b) server CPU per session (ms)", lambda r: r.cpu_ms_per_session),
    "c_rss": ("c", "(c) KB per idle session (RSS)", lambda r: r.rss_kib_per_session),
    "c_pss": ("c", "(c) KB per idle session (PSS)", lambda r: r.pss_kib_per_session),
}

# The targets: (what, metric, peer to divide by or None for ours alone, goal).
TARGETS: tuple[tuple[str, str, str | None, str, float], ...] = (
    ("(a) msgs/s ours / aiosmtpd", "a_msgs", "aiosmtpd", "≥", 2.0),
    ("(a) msgs/s ours / Postfix", "a_msgs", "postfix", "≥", 1.0),
    ("(a) server CPU per message, ours (ms)", "a_cpu", None, "≤", 1.0),
    ("(b) sessions/s ours / Postfix, warm auth cache", "b_sessions", "postfix", "≥", 1.0),
    ("(c) memory per idle TLS session, ours (KB, RSS)", "c_rss", None, "≤", 100.0),
    ("(a) p99 end of DATA → 250 under load, ours (ms)", "a_p99", None, "≤", 50.0),
)


# Issue 16 (latency and churn), all from one run of both peers: a ratio where a peer
# is named, else ours alone; the verdict is "met" or "no".
LATENCY_TARGETS: tuple[tuple[str, str, str | None, str, float], ...] = (
    ("(a) AUTH → 235 p50, ours / Postfix, warm cache", "a_auth_p50", "postfix", "≤", 1.5),
    ("(a) end of DATA → 250 p99, ours / Postfix", "a_p99", "postfix", "≤", 1.0),
    ("(b) sessions/s, ours / Postfix", "b_sessions", "postfix", "≥", 1.3),
    ("(a) server CPU per message, ours (ms)", "a_cpu", None, "≤", 1.0),
    ("(a) messages/s, ours / Postfix", "a_msgs", "postfix", "≥", 1.3),
)


def metric(runs: list[Run], peer: str, name: str) -> float:
    workload, _what, figure = METRICS[name]
    run = find(runs, peer, workload)
    return figure(run) if run else math.nan


def ratio(runs: list[Run], name: str, peer: str) -> float:
    ours, theirs = metric(runs, "ours", name), metric(runs, peer, name)
    return ours / theirs if theirs and not math.isnan(ours) else math.nan


def target_rows(
    runs: list[Run], table: Sequence[tuple[str, str, str | None, str, float]], words: str
) -> list[str]:
    """One row per target: the value, the goal and the verdict (``words``: "yes no")."""
    met, missed = words.split()
    lines = []
    for what, name, peer, sign, goal in table:
        value = ratio(runs, name, peer) if peer else metric(runs, "ours", name)
        if math.isnan(value):
            verdict = "n/a (not measured)"
        else:
            verdict = met if (value >= goal if sign == "≥" else value <= goal) else f"**{missed}**"
        lines.append(f"| {what} | {fmt(value, 2)} | {sign} {goal:g} | {verdict} |")
    return lines


def targets(runs: list[Run]) -> list[str]:
    head = ["| target | value | goal | met |", "|---|---:|---|---|"]
    return [
        "### Targets",
        "",
        *head,
        *target_rows(runs, TARGETS, "yes no"),
        "",
        "### Targets of issue 16 (latency, churn)",
        "",
        *head,
        *target_rows(runs, LATENCY_TARGETS, "met no"),
        "",
    ]


def ratios(runs: list[Run]) -> list[str]:
    lines = [
        "### Ratios (ours / peer)",
        "",
        "| figure | ours / aiosmtpd | ours / Postfix |",
        "|---|---:|---:|",
    ]
    for name, (_workload, what, _figure) in METRICS.items():
        cells = " | ".join(fmt(ratio(runs, name, peer), 2) for peer in ("aiosmtpd", "postfix"))
        lines.append(f"| {what} | {cells} |")
    return [*lines, ""]


def machine() -> list[str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = [f"Python {platform.python_version()}"]
    for module in ("twisted", "aiosmtpd"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions.append(f"{module} {version(module)}")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        postfix = subprocess.run(
            ["/usr/sbin/postconf", "-dh", "mail_version"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if postfix:
            versions.append(f"Postfix {postfix}")
    return [
        f"- Machine: {os.cpu_count()} x {model}, {memory:.0f} GiB RAM, Linux "
        f"{platform.release()}; {', '.join(versions)}.",
    ]


def load_line(options: Options) -> str:
    paced = f", paced at {options.rate:g} messages/s in all" if options.rate else ""
    paced += (
        " (each slot's first session shorter, so logins are spread)"
        if options.stagger
        else " (all slots in step: logins in bursts)"
    )
    length = (
        f"{options.rounds} session(s) per slot"
        if options.rounds
        else f"{options.duration:g} s of load each"
    )
    return (
        "- Load: STARTTLS, EHLO, CLIENTID (where offered), AUTH PLAIN, messages of "
        f"{options.size} bytes to {RECIPIENT}, QUIT, every reply checked; {options.users} "
        f"accounts, one device each. (a): {options.sessions} concurrent sessions x "
        f"{options.messages} messages{paced}, (b): {options.churn_sessions} concurrent sessions "
        f"x 1 message, {length}; (c): {options.idle} idle sessions. Generator: "
        f"{options.processes} process(es), asyncio, nice {options.nice}."
    )


def observed(runs: list[Run]) -> list[str]:
    """Notes from the runs themselves: how many processes our server ran as."""
    ours = [r.processes for r in runs if r.peer == "ours" and r.ok and r.workload != "c"]
    if not ours:
        return []
    return [f"our server ran as {max(ours)} process(es) under load (a), (b)"]


def report(options: Options, setup: Setup, runs: list[Run], started: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python bench/compare.py", *options.argv])
    lines = [
        "# Side-by-side load benchmark (bench/compare.py)",
        "",
        f"- Run: {now}, `{command}`, {time.monotonic() - started:.0f} s in all.",
        *machine(),
        load_line(options),
        *(f"- {note}" for note in [*setup.notes, *observed(runs)]),
        "",
    ]
    for workload in options.workloads:
        chosen = [r for r in runs if r.workload == workload]
        lines += idle_table(chosen) if workload == "c" else mail_table(chosen, workload)
    lines += ratios(runs)
    lines += targets(runs)
    lines += problems(runs)
    lines += disturbance(runs)
    return "\n".join(lines)


def problems(runs: list[Run]) -> list[str]:
    """What went wrong: runs not done, wrong replies, lost messages, log errors."""
    lines = []
    for run in runs:
        where = f"{TITLES[run.workload]}, {run.peer}"
        if not run.ok:
            lines.append(f"- {where}: not run: " + run.problem.replace("\n", "\n  "))
            continue
        if run.errors:
            lines.append(f"- {where}: {errors_text(run)} failed session(s)")
        if run.warmup_errors:
            lines.append(f"- {where}: warm-up errors {run.warmup_errors}")
        if run.workload != "c" and run.delivered != run.accepted:
            lines.append(f"- {where}: {run.accepted} messages got 250, {run.delivered} delivered")
        if run.log_problems:
            shown = "; ".join(run.log_problems[:3])
            lines.append(f"- {where}: {len(run.log_problems)} problem line(s) in its log: {shown}")
    return ["### Problems", "", *(lines or ["None: every reply was the expected one."]), ""]


def disturbance(runs: list[Run]) -> list[str]:
    """Runs during which other processes used the CPUs: their figures are less reliable."""
    busy = [
        f"{TITLES[r.workload]}, {r.peer}: {r.other_cpu:.0%}"
        for r in runs
        if r.ok and r.other_cpu > OTHER_BUSY
    ]
    if not busy:
        return []
    return [
        "### Disturbance",
        "",
        f"Other processes used more than {OTHER_BUSY:.0%} of a CPU during: {'; '.join(busy)}. "
        "Those figures are less reliable (the machine has 2 cores); run again on a quiet machine.",
        "",
    ]


def chart(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (c) by Pss: a sum of RSS over Postfix's 5,000 processes counts its shared pages 5,000 times.
    panels = [METRICS[name] for name in ("a_msgs", "b_sessions", "a_p99", "a_cpu", "c_pss")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    colours = {"ours": "tab:green", "aiosmtpd": "tab:blue", "postfix": "tab:orange"}
    for axis, (workload, title, value) in zip(axes, panels, strict=True):
        chosen = [r for r in runs if r.workload == workload and r.ok]
        names = [r.peer for r in chosen]
        values = [value(r) for r in chosen]
        values = [0.0 if math.isnan(v) else v for v in values]
        bars = axis.bar(names, values, color=[colours[n] for n in names])
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
        axis.set_title(title, fontsize=10)
        if not chosen:
            axis.text(0.5, 0.5, "not run", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- main ------------------------------------------------------------------------------


def raise_file_limit(needed: int) -> None:
    """Enough descriptors for the idle sessions, here and in every process started from here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, needed)
    if want > hard and os.geteuid() == 0:
        hard = want
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


@contextlib.contextmanager
def work_folder(options: Options) -> Iterator[Path]:
    if options.work_dir is not None:
        options.work_dir.mkdir(parents=True, exist_ok=True)
        options.work_dir.chmod(0o755)
        yield options.work_dir.resolve()
        return
    root = Path(tempfile.mkdtemp(prefix="clientid-compare-"))
    root.chmod(0o755)  # Postfix's unprivileged processes must reach their folders
    try:
        yield root
    finally:
        if options.keep:
            print(f"kept the work folder: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def check_postfix(options: Options, setup: Setup) -> str | None:
    """None when Postfix can run, else why not (also printed)."""
    try:
        done = ensure_installed(options.install)
    except (PostfixUnavailable, OSError, subprocess.SubprocessError) as problem:
        reason = str(problem)
        print(f"postfix: cannot run: {reason}", file=sys.stderr)
        return reason
    setup.notes.append(f"Postfix: {done}; private instance, Maildir delivery by virtual(8)")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(list(sys.argv[1:] if argv is None else argv))
    started = time.monotonic()
    raise_file_limit(options.idle * 2 + 1024)
    runs: list[Run] = []
    with work_folder(options) as root:
        setup = prepare(options, root)
        postfix_problem = check_postfix(options, setup) if "postfix" in options.peers else None
        with process_pool(options.processes, options.nice) as pool:
            bench = Bench(options, setup, pool)
            for workload in options.workloads:
                for peer in options.peers:
                    if peer == "postfix" and postfix_problem:
                        runs.append(Run(peer, workload, ok=False, problem=postfix_problem))
                        continue
                    runs.append(bench.run(peer, workload))
        text = report(options, setup, runs, started)
    print(text)
    if options.output_dir is not None:
        options.output_dir.mkdir(parents=True, exist_ok=True)
        (options.output_dir / "compare.md").write_text(text + "\n")
        chart(runs, options.output_dir / "compare.png")
        print(f"written to {options.output_dir}/compare.md and compare.png", file=sys.stderr)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps([r.as_dict() for r in runs], indent=1))
    return 0 if all(r.ok and not r.errors for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
