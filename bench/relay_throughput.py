"""Relay throughput (issue 4, "Throughput"): from submission to delivery at the smarthost.

Starts the server (twistd) on loopback with a smarthost: a fast asyncio SMTP sink in a
process of its own (STARTTLS with a self-signed certificate that the relay verifies,
``tls = "required"``; AUTH PLAIN with the relay's username and password file). Then:

1. ``--sessions`` submission sessions (one account each, ``senderN@example.org``) open
   a TLS session (implicit TLS, or STARTTLS with ``--tls starttls``), send
   ``CLIENTID UUID`` and AUTH PLAIN, and wait until all are logged in (so no argon2id
   check falls into the measured window);
2. all start at once and each sends its share of ``--messages`` messages of ``--size``
   bytes (or sends until ``--duration`` seconds have passed) to remote recipients
   (``userN@example.net``), one MAIL/RCPT/DATA after the other in the same session,
   every reply checked. Each message has a unique ``Message-ID``;
3. the sink records, per Message-ID, when the final dot of a message arrived;
4. the benchmark waits until every accepted message has arrived at the sink and the
   queue folder (``env/``) is empty, or ``--drain-timeout`` passes.

This runs once per variant: ``plain`` (no DKIM) and ``dkim`` (a key from
``clientid-mta dkim keygen`` in ``[dkim."example.org"]``, so every message is signed
at submission). Each variant gets a fresh server.

Figures per variant:

- submission rate: messages answered 250 / (last 250 - start);
- end-to-end throughput: messages delivered at the sink / (last arrival - start), where
  "start" is the moment all sessions begin sending;
- latency: from the 250 at the submitting client to the arrival of the final dot at
  the sink (both read from CLOCK_MONOTONIC, which all processes share), p50/p95/p99;
- server CPU: utime + stime (+ cutime + cstime) of twistd's whole process tree from
  /proc, from the start to the drained queue, per message delivered;
- server RSS: the sum of VmRSS over the tree when the sending starts (after the
  logins, whose argon2id checks take 64 MiB each) and the largest sum sampled every
  0.25 s until the end; peak queue: the most entries seen in ``env/``;
- generator, sink and "other processes" CPU as a share of one core over the window
  (other = the machine's busy time from /proc/stat minus the three), so a reader sees
  whether anything but the server was the limit;
- errors (failed sessions by kind), messages accepted but not delivered (must be 0),
  duplicates and unknown messages at the sink, the sink's TLS sessions (one per
  relay connection), deferrals and error lines in the server log.

Run from the repository root: ``/tmp/venv/bin/python bench/relay_throughput.py``.
It prints a markdown table and writes it to ``bench/results/relay_throughput.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import datetime
import functools
import io
import math
import multiprocessing
import os
import platform
import re
import shutil
import ssl
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from benchserver import (
    BenchServer,
    code_version,
    cpu_model,
    log_summary,
    machine_busy_seconds,
    running_server,
)
from procstats import tree_cpu_seconds, tree_memory
from smtpload import (
    SESSION_ERRORS,
    SmtpSession,
    Tally,
    Target,
    UnexpectedReply,
    error_name,
    percentile,
)

from clientid_mta.outbound.dkim import keygen_command
from clientid_mta.smtp.tls import generate_self_signed

SINK_HOST = "127.0.0.1"
SINK_NAME = "smtp.example.net"
RELAY_USER = "relay@example.net"
RELAY_PASSWORD = "relay-secret"
SENDER_PASSWORD = "sender-password"
DKIM_SELECTOR = "bench"
SENDER_DOMAIN = "example.org"
RECIPIENT_DOMAIN = "example.net"
RECIPIENTS = 50  # distinct remote recipients, user0..user49@example.net
SAMPLE_INTERVAL = 0.25  # seconds between two samples of the server's memory and queue
DRAIN_POLL = 0.1  # seconds between two checks of the sink's count while draining
SINK_READ_LIMIT = 1 << 22  # bytes of one message the sink's reader may buffer
SESSION_RETRIES = 3  # a failed submission session is reopened this often for its share
SETTLE = 1.5  # seconds after the drain, so the server's last saves and removals count
SINK_ERRORS: tuple[type[BaseException], ...] = (*SESSION_ERRORS, asyncio.LimitOverrunError)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "relay_throughput.md"

BODY_LINE = b"The quick brown fox jumps over the lazy dog; 0123456789 relay throughput\r\n"
MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*<([^>\r\n]*)>")
DKIM_HEADER = re.compile(rb"(?im)^dkim-signature:")
DEFERRED = re.compile(r"deferred \(attempt \d+, next in \d+ s\): (.*)$", re.MULTILINE)


# --- the sink (the smarthost), in its own process -------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """The sink's self-signed certificate (for SINK_NAME, localhost and 127.0.0.1); it is
    its own trust root."""
    return generate_self_signed(directory, SINK_NAME)


@dataclass
class SinkRecord:
    """What the sink saw; sent back to the benchmark when it stops."""

    arrivals: dict[str, float] = field(default_factory=dict)  # Message-ID -> monotonic time
    duplicates: int = 0
    without_id: int = 0
    signed: int = 0  # messages with a DKIM-Signature header
    sessions: int = 0
    tls_sessions: int = 0
    errors: Tally = field(default_factory=Counter)


class SmtpSink:
    """Accepts every message after STARTTLS and AUTH PLAIN; records its arrival."""

    def __init__(self, context: ssl.SSLContext, count: ctypes.c_longlong) -> None:
        self.context = context
        self.count = count  # messages with a new Message-ID, read by the benchmark
        self.record = SinkRecord()
        self.credentials = f"\0{RELAY_USER}\0{RELAY_PASSWORD}".encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.record.sessions += 1
        try:
            await self.session(reader, writer)
        except SINK_ERRORS as problem:
            self.record.errors[error_name(problem)] += 1
            writer.transport.abort()
        else:
            writer.close()

    def arrived(self, data: bytes) -> None:
        now = time.monotonic()
        head = data[: data.find(b"\r\n\r\n") + 2]
        found = MESSAGE_ID.search(head)
        if found is None:
            self.record.without_id += 1
            return
        message_id = found.group(1).decode("ascii", "replace")
        if DKIM_HEADER.search(head):
            self.record.signed += 1
        if message_id in self.record.arrivals:
            self.record.duplicates += 1
            return
        self.record.arrivals[message_id] = now
        self.count.value += 1

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"220 {SINK_NAME} ESMTP sink\r\n".encode())
        tls = authenticated = False
        while line := await reader.readline():
            verb, _, argument = line.rstrip(b"\r\n").partition(b" ")
            verb = verb.upper()
            if verb == b"EHLO":
                features = [b"SIZE 104857600", b"8BITMIME", b"ENHANCEDSTATUSCODES"]
                features.append(b"AUTH PLAIN" if tls else b"STARTTLS")
                lines = [SINK_NAME.encode(), *features]
                writer.write(
                    b"".join(b"250-" + x + b"\r\n" for x in lines[:-1])
                    + b"250 "
                    + lines[-1]
                    + b"\r\n"
                )
            elif verb == b"STARTTLS" and not tls:
                writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                await writer.drain()
                await writer.start_tls(self.context)
                tls = True
                self.record.tls_sessions += 1
            elif verb == b"AUTH" and tls and not authenticated:
                mechanism, _, response = argument.partition(b" ")
                if mechanism.upper() != b"PLAIN":
                    writer.write(b"504 5.5.4 Unrecognized authentication type\r\n")
                    continue
                if not response:
                    writer.write(b"334 \r\n")
                    response = (await reader.readline()).strip()
                try:
                    authenticated = base64.b64decode(response, validate=True) == self.credentials
                except ValueError:
                    authenticated = False
                if authenticated:
                    writer.write(b"235 2.7.0 Authentication successful\r\n")
                else:
                    self.record.errors["sink: AUTH refused"] += 1
                    writer.write(b"535 5.7.8 Authentication credentials invalid\r\n")
            elif verb in (b"MAIL", b"RCPT") and authenticated:
                writer.write(b"250 2.1.0 OK\r\n")
            elif verb == b"DATA" and authenticated:
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                data = await reader.readuntil(b"\r\n.\r\n")
                self.arrived(data)
                writer.write(b"250 2.0.0 OK queued\r\n")
            elif verb in (b"RSET", b"NOOP"):
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            elif verb in (b"MAIL", b"RCPT", b"DATA"):
                self.record.errors["sink: mail before AUTH"] += 1
                writer.write(b"530 5.7.0 Authentication required\r\n")
            else:
                self.record.errors[f"sink: {verb.decode('ascii', 'replace')[:12]}"] += 1
                writer.write(b"502 5.5.2 Command not recognized\r\n")


async def serve_sink(cert: str, key: str, pipe: Connection, count: ctypes.c_longlong) -> SinkRecord:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sink = SmtpSink(context, count)
    server = await asyncio.start_server(sink.handle, SINK_HOST, 0, limit=SINK_READ_LIMIT)
    pipe.send(server.sockets[0].getsockname()[1])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(pipe.fileno(), stop.set)  # anything from the benchmark: stop
    async with server:
        await stop.wait()
    loop.remove_reader(pipe.fileno())
    return sink.record


def sink_main(cert: str, key: str, pipe: Connection, count: ctypes.c_longlong) -> None:
    """The sink process: serve until the benchmark writes to ``pipe``; send the record."""
    record = asyncio.run(serve_sink(cert, key, pipe, count))
    pipe.recv()
    pipe.send(record)


@dataclass
class SinkProcess:
    process: multiprocessing.process.BaseProcess
    pipe: Connection
    count: ctypes.c_longlong
    port: int

    def stop(self) -> SinkRecord:
        self.pipe.send("stop")
        record: SinkRecord = self.pipe.recv()
        self.process.join(10)
        return record


@contextlib.contextmanager
def running_sink(cert: Path, key: Path) -> Iterator[SinkProcess]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    count = context.Value("q", 0, lock=False)
    process = context.Process(
        target=sink_main, args=(str(cert), str(key), theirs, count), daemon=True
    )
    process.start()
    try:
        if not ours.poll(30):
            raise RuntimeError("the sink did not start")
        yield SinkProcess(process, ours, count, int(ours.recv()))
    finally:
        if process.is_alive():
            process.terminate()
            process.join(10)


# --- the submitting side ---------------------------------------------------------------


def message_bytes(sender: str, recipient: str, message_id: str, size: int) -> bytes:
    """A message of about ``size`` bytes in DATA wire form, with the end-of-data dot."""
    head = (
        f"From: Bench Sender <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: relay throughput {message_id}\r\n"
        f"Date: {datetime.datetime.now(datetime.UTC).strftime('%a, %d %b %Y %H:%M:%S +0000')}\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    return head + body_of(max(size - len(head), len(BODY_LINE))) + b".\r\n"


@functools.cache
def body_of(size: int) -> bytes:
    """``size`` bytes of text lines, the last one ending in CRLF."""
    body = (BODY_LINE * (size // len(BODY_LINE) + 1))[:size]
    return body if body.endswith(b"\r\n") else body[:-2] + b"\r\n"


@dataclass
class Submitted:
    accepted: dict[str, float] = field(default_factory=dict)  # Message-ID -> time of the 250
    errors: Tally = field(default_factory=Counter)
    logins: int = 0


@dataclass(frozen=True)
class Load:
    target: Target
    sessions: int
    messages: int  # in all; ignored with a duration
    duration: float | None
    size: int
    run: str  # unique per run, part of every Message-ID
    send_timeout: float  # with a count: stop sending after this many seconds anyway


def sender(index: int) -> str:
    return f"sender{index}@{SENDER_DOMAIN}"


async def login(target: Target, index: int) -> SmtpSession:
    session = await SmtpSession.open(target)
    try:
        token = str(uuid.uuid5(uuid.NAMESPACE_URL, f"relay-bench/{index}"))
        await session.clientid("UUID", token)
        reply = await session.auth_plain(sender(index), SENDER_PASSWORD)
        if reply.code != 235:
            raise UnexpectedReply("AUTH PLAIN", reply)
    except BaseException:
        session.abort()
        raise
    return session


async def submit(load: Load, submitted: Submitted, sending: Callable[[], None]) -> float:
    """Log every session in, call ``sending``, then send; returns the start (loop.time())."""
    loop = asyncio.get_running_loop()
    shares = [
        load.messages // load.sessions + (index < load.messages % load.sessions)
        for index in range(load.sessions)
    ]
    ready: list[SmtpSession | None] = [None] * load.sessions

    async def first_login(index: int) -> None:
        try:
            ready[index] = await login(load.target, index)
            submitted.logins += 1
        except SESSION_ERRORS as problem:
            submitted.errors[error_name(problem)] += 1

    async def send_share(index: int, deadline: float) -> None:
        session, number, retries = ready[index], 0, 0
        address = sender(index)
        while (load.duration is not None or number < shares[index]) and loop.time() < deadline:
            try:
                if session is None:
                    session = await login(load.target, index)
                    submitted.logins += 1
                message_id = f"{load.run}.{index}.{number}@bench.{SENDER_DOMAIN}"
                recipient = f"user{(index + number) % RECIPIENTS}@{RECIPIENT_DOMAIN}"
                await session.expect(f"MAIL FROM:<{address}>", 250)
                await session.expect(f"RCPT TO:<{recipient}>", 250)
                await session.expect("DATA", 354)
                session.writer.write(message_bytes(address, recipient, message_id, load.size))
                reply = await session.reply()
                if reply.code != 250:
                    raise UnexpectedReply("end of DATA", reply)
                submitted.accepted[message_id] = loop.time()
                number += 1
            except SESSION_ERRORS as problem:
                submitted.errors[error_name(problem)] += 1
                if session is not None:
                    session.abort()
                session, retries = None, retries + 1
                number += 1  # that Message-ID may have been queued after all; never reuse it
                if retries > SESSION_RETRIES:
                    return
        if session is not None:
            await session.quit()

    await asyncio.gather(*(first_login(index) for index in range(load.sessions)))
    sending()
    start = loop.time()
    deadline = start + (load.duration if load.duration is not None else load.send_timeout)
    await asyncio.gather(*(send_share(index, deadline) for index in range(load.sessions)))
    return start


# --- one variant -------------------------------------------------------------------------


@dataclass
class Result:
    variant: str
    sessions: int
    logins: int
    accepted: int
    delivered: int  # accepted messages that arrived at the sink
    not_delivered: int
    unknown: int  # arrived at the sink but never answered 250 to the client
    duplicates: int
    signed: int
    submit_seconds: float
    window: float  # start -> last arrival
    latencies: list[float]
    server_cpu: float
    generator_cpu: float
    sink_cpu: float
    other_cpu: float
    idle_cpu_rate: float
    rss_start_kib: int
    rss_peak_kib: int
    processes: int
    queue_peak: int
    queue_left: int
    sink_sessions: int
    sink_tls: int
    errors: Tally
    deferrals: Tally  # reasons from the server log
    drained: bool
    log_problems: list[str]
    traceback: list[str]  # the first one in the server log
    cpu_window: float  # seconds from the start of sending to SETTLE after the drain

    @property
    def submit_rate(self) -> float:
        return self.accepted / self.submit_seconds if self.submit_seconds > 0 else math.nan

    @property
    def throughput(self) -> float:
        return self.delivered / self.window if self.window > 0 else math.nan

    def share(self, cpu: float) -> float:
        """CPU seconds as a share of one core over the CPU window (drain included)."""
        return cpu / self.cpu_window if self.cpu_window > 0 else math.nan

    @property
    def cpu_ms_per_message(self) -> float:
        return self.server_cpu / self.delivered * 1000 if self.delivered else math.nan


@dataclass
class Sampler:
    """The server tree's memory and the queue length, every SAMPLE_INTERVAL from
    ``begin`` (when the sending starts) on."""

    pid: int
    queue_env: Path
    rss_start: int = 0
    rss_peak: int = 0
    processes: int = 0
    queue_peak: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def begin(self) -> None:
        self.rss_start = tree_memory(subtree(self.pid), pss=False).rss_kib
        self.task = asyncio.create_task(self.run())

    async def end(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task
        self.sample()

    def sample(self) -> None:
        memory = tree_memory(subtree(self.pid), pss=False)
        self.rss_peak = max(self.rss_peak, memory.rss_kib)
        self.processes = max(self.processes, memory.processes)
        with contextlib.suppress(OSError):
            self.queue_peak = max(self.queue_peak, queue_length(self.queue_env))

    async def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SAMPLE_INTERVAL):
                    await self.stop.wait()


def first_traceback(log_text: str, limit: int = 40) -> list[str]:
    """The first "Traceback" in the log and the indented lines after it."""
    lines = log_text.splitlines()
    for number, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            block = [line.strip()]
            for following in lines[number + 1 : number + limit]:
                if not following.startswith(("\t", " ")):
                    break
                block.append(following.lstrip("\t").rstrip())
            return block
    return []


def deferral_reasons(log_text: str) -> Tally:
    """The server log's "deferred" lines, counted by their reason."""
    return Counter(reason.strip()[:160] for reason in DEFERRED.findall(log_text))


def queue_length(env: Path) -> int:
    return sum(1 for name in os.listdir(env) if name.endswith(".json"))


def server_cpu(server: BenchServer) -> float:
    return tree_cpu_seconds(subtree(server.pid))


def subtree(pid: int) -> list[int]:
    """``pid`` and its live descendants, from /proc/PID/task/TID/children.

    Unlike a scan of all of /proc, this costs the same however many other processes
    the (shared) machine runs, so the sampling does not weigh on the generator.
    """
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text()
                todo.extend(int(child) for child in children.split())
    return tree


def process_cpu(pid: int) -> float:
    return tree_cpu_seconds([pid])


async def drain(sink: SinkProcess, expected: int, env: Path, timeout: float) -> bool:
    """Wait until the sink has every accepted message and the queue is empty."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if sink.count.value >= expected and queue_length(env) == 0:
            return True
        await asyncio.sleep(DRAIN_POLL)
    return False


def relay_toml(sink_port: int, cert: Path, password_file: Path, options: Options) -> str:
    relay = [
        f'smarthost = "{SINK_HOST}:{sink_port}"',
        'tls = "required"',
        f'ca_file = "{cert}"',
        f'username = "{RELAY_USER}"',
        f'password_file = "{password_file}"',
    ]
    if options.max_per_destination:
        relay.append(f"max_per_destination = {options.max_per_destination}")
        relay.append(f"max_connections = {max(20, options.max_per_destination)}")
    return (
        "\n[relay]\n"
        + "\n".join(relay)
        + "\n\n[queue]\nretry_schedule = [5]\n"  # a deferral retries soon, so a run can drain
    )


def dkim_toml(directory: Path, algorithm: str) -> str:
    """A key made by ``clientid-mta dkim keygen``, and the config lines for it.

    The command's own function is called: the ``clientid-mta`` entry point refuses
    ``dkim keygen DOMAIN`` with "unrecognized arguments" (admin.run checks the leftover
    arguments before it hands them to the dkim group).
    """
    argv = [SENDER_DOMAIN, "--selector", DKIM_SELECTOR, "--algorithm", algorithm]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        status = keygen_command([*argv, "--dir", str(directory)], directory)
    if status != 0:
        raise RuntimeError(f"clientid-mta dkim keygen: {printed.getvalue().strip()}")
    key = directory / f"{SENDER_DOMAIN}.{DKIM_SELECTOR}.key"
    return f'\n[dkim."{SENDER_DOMAIN}"]\nselector = "{DKIM_SELECTOR}"\nkey = "{key}"\n'


async def measure(
    server: BenchServer, sink: SinkProcess, load: Load, options: Options
) -> tuple[Submitted, SinkRecord, dict[str, float], Sampler, bool]:
    env = Path(server.config.queue_config.directory) / "env"
    sampler = Sampler(server.pid, env)
    idle_before = server_cpu(server)
    await asyncio.sleep(options.idle)
    figures = {"idle_rate": (server_cpu(server) - idle_before) / options.idle}
    submitted = Submitted()
    before: dict[str, float] = {}

    def cpu_readings() -> dict[str, float]:
        return {
            "server": server_cpu(server),
            "sink": process_cpu(sink.process.pid or 0),
            "generator": time.process_time(),
            "machine": machine_busy_seconds(),
            "wall": time.monotonic(),
        }

    # The window starts once every session is logged in, so the argon2id checks of the
    # logins (CPU, and 64 MiB each in up to 4 threads per process) stay out of it.
    def sending() -> None:
        before.update(cpu_readings())
        sampler.begin()

    figures["start"] = await submit(load, submitted, sending)
    drained = await drain(sink, len(submitted.accepted), env, options.drain_timeout)
    await asyncio.sleep(SETTLE)
    await sampler.end()
    after = cpu_readings()
    for name in before:
        figures[name] = after[name] - before[name]
    figures["other"] = figures["machine"] - figures["server"] - figures["sink"]
    figures["other"] -= figures["generator"]
    record = sink.stop()
    return submitted, record, figures, sampler, drained


def run_variant(variant: str, options: Options, work: Path) -> Result:
    cert, key = make_certificate(work)
    password_file = work / "relay-password"
    password_file.write_text(RELAY_PASSWORD + "\n")
    password_file.chmod(0o600)
    extra = dkim_toml(work, options.dkim_algorithm) if variant == "dkim" else ""
    workers = f"workers = {options.workers}" if options.workers else ""
    with running_sink(cert, key) as sink:
        toml = relay_toml(sink.port, cert, password_file, options) + extra
        with running_server(toml, keep=options.keep, server_toml=workers) as server:
            for index in range(options.sessions):
                server.add_user(sender(index), SENDER_PASSWORD)
            load = Load(
                target=server.target(implicit_tls=options.tls == "implicit"),
                sessions=options.sessions,
                messages=options.messages,
                duration=options.duration,
                size=options.size,
                run=f"{variant}-{uuid.uuid4().hex[:8]}",
                send_timeout=options.send_timeout,
            )
            submitted, record, figures, sampler, drained = asyncio.run(
                measure(server, sink, load, options)
            )
            env = Path(server.config.queue_config.directory) / "env"
            queue_left = queue_length(env)
            server.stop()
            log_text = server.log_path.read_text(errors="replace")
            problems = server.log_problems()
            traceback = first_traceback(log_text)
    start = figures["start"]
    accepted = submitted.accepted
    delivered = {m: t for m, t in record.arrivals.items() if m in accepted}
    last_arrival = max(delivered.values(), default=start)
    return Result(
        variant=variant,
        sessions=options.sessions,
        logins=submitted.logins,
        accepted=len(accepted),
        delivered=len(delivered),
        not_delivered=len(accepted) - len(delivered),
        unknown=len(record.arrivals) - len(delivered),
        duplicates=record.duplicates,
        signed=record.signed,
        submit_seconds=max(accepted.values(), default=start) - start,
        window=last_arrival - start,
        latencies=[t - accepted[m] for m, t in delivered.items()],
        server_cpu=figures["server"],
        generator_cpu=figures["generator"],
        sink_cpu=figures["sink"],
        other_cpu=figures["other"],
        idle_cpu_rate=figures["idle_rate"],
        rss_start_kib=sampler.rss_start,
        rss_peak_kib=sampler.rss_peak,
        processes=sampler.processes,
        queue_peak=sampler.queue_peak,
        queue_left=queue_left,
        sink_sessions=record.sessions,
        sink_tls=record.tls_sessions,
        errors=submitted.errors + record.errors,
        deferrals=deferral_reasons(log_text),
        drained=drained,
        log_problems=problems,
        traceback=traceback,
        cpu_window=figures["wall"],
    )


# --- the report ----------------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    """The type of the filesystem ``path`` is on (its fsync cost matters here)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            _device, mount, fs_type, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs_type
    return kind


def num(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def ms(values: Sequence[float], fraction: float) -> str:
    return num(percentile(values, fraction) * 1000, 0)


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def pct(share: float) -> str:
    return "n/a" if math.isnan(share) else f"{share * 100:.0f}%"


def errors_text(result: Result) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(result.errors.items())) or "0"


def variant_name(result: Result, options: Options) -> str:
    return "DKIM " + options.dkim_algorithm if result.variant == "dkim" else "no DKIM"


def tables(results: Sequence[Result], options: Options) -> str:
    rows = [
        "| variant | accepted | submission msg/s | delivered | not delivered | "
        "end-to-end msg/s | window s | latency p50 / p95 / p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rows.append(
            f"| {variant_name(r, options)} | {r.accepted} | {num(r.submit_rate)} | "
            f"{r.delivered} | {'**' + str(r.not_delivered) + '**' if r.not_delivered else 0} | "
            f"{num(r.throughput)} | {num(r.window)} | "
            f"{ms(r.latencies, 0.5)} / {ms(r.latencies, 0.95)} / {ms(r.latencies, 0.99)} | "
            f"{errors_text(r)} |"
        )
    rows += [
        "",
        "| variant | server CPU s | server CPU ms/msg | server CPU | server RSS MiB "
        "(start / peak) | peak queue | generator CPU | sink CPU | other CPU | "
        "sink TLS sessions | deferrals |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {variant_name(r, options)} | {num(r.server_cpu, 2)} | "
            f"{num(r.cpu_ms_per_message, 2)}{'' if r.drained else ' (not drained)'} | "
            f"{pct(r.share(r.server_cpu))} | "
            f"{mib(r.rss_start_kib)} / {mib(r.rss_peak_kib)} ({r.processes} proc.) | "
            f"{r.queue_peak} | "
            f"{pct(r.share(r.generator_cpu))} | {pct(r.share(r.sink_cpu))} | "
            f"{pct(r.share(r.other_cpu))} | {r.sink_tls} | {r.deferrals.total()} |"
        )
    return "\n".join(rows)


def notes(results: Sequence[Result]) -> list[str]:
    lines = []
    for r in results:
        checks = []
        if not r.drained:
            checks.append(f"the queue did not drain in time ({r.queue_left} entries left)")
        if r.unknown or r.duplicates:
            checks.append(
                f"{r.unknown} unacknowledged and {r.duplicates} duplicate arrival(s) at the sink"
            )
        if r.variant == "dkim" and r.signed < r.delivered:
            checks.append(f"only {r.signed} of {r.delivered} arrived with a DKIM-Signature")
        if r.variant != "dkim" and r.signed:
            checks.append(f"{r.signed} arrived signed without a DKIM key configured")
        if r.deferrals:
            reasons = "; ".join(f"{n} x `{text}`" for text, n in r.deferrals.most_common(3))
            checks.append(f"deferrals: {reasons}")
        lines.append(
            f"- {r.variant}: {r.logins} logins for {r.sessions} sessions; idle server CPU "
            f"{r.idle_cpu_rate * 1000:.1f} ms/s (not subtracted); CPU window "
            f"{r.cpu_window:.1f} s (start of sending to {SETTLE} s after the drain); "
            + ("; ".join(checks) if checks else "every accepted message arrived exactly once")
            + f". {log_summary(r.log_problems)}"
        )
        if r.traceback:
            lines += ["", "  The first traceback in its log:", "", "  ```"]
            lines += [f"  {line}" for line in r.traceback] + ["  ```"]
    return lines


def report(
    results: Sequence[Result], options: Options, argv: Sequence[str], load: str, started: str
) -> str:
    command = " ".join(["python bench/relay_throughput.py", *argv])
    amount = (
        f"sent for {options.duration:g} s"
        if options.duration is not None
        else f"{options.messages} in all"
    )
    workers = f"`[server] workers = {options.workers}`" if options.workers else "server default"
    per_dest = options.max_per_destination or "server default"
    mode = "implicit TLS" if options.tls == "implicit" else "STARTTLS"
    return "\n".join(
        [
            "# Relay throughput (issue 4)",
            "",
            f"Command: `{command}`",
            "",
            f"- {started}; {code_version()}.",
            f"- {os.cpu_count()} CPUs ({cpu_model()}), shared with other processes; load "
            f"average at start {load}; Linux {platform.release()}; Python "
            f"{platform.python_version()}; {ssl.OPENSSL_VERSION}; queue on "
            f"{filesystem_of(Path(tempfile.gettempdir()))} ({tempfile.gettempdir()}).",
            f"- Load: {options.sessions} sessions ({mode}, CLIENTID, AUTH PLAIN "
            f"once each), messages of {options.size} bytes ({amount}), one recipient each at "
            f"{RECIPIENT_DOMAIN}; relay to a local asyncio sink with verified STARTTLS and "
            f"AUTH PLAIN; workers: {workers}; `[relay] max_per_destination`: {per_dest}.",
            "",
            tables(results, options),
            "",
            "Notes:",
            "",
            *notes(results),
            "",
            "Submission msg/s: 250s / (last 250 - start). End-to-end msg/s: messages "
            "delivered at the sink / (last arrival - start); start is when all sessions, "
            "already logged in, begin sending. Latency: the 250 at the client to the final "
            "dot at the sink. CPU shares are of one core over the CPU window; server CPU "
            "is the whole twistd process tree, per message delivered.",
        ]
    )


# --- command line ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    sessions: int
    messages: int
    duration: float | None
    size: int
    tls: str
    variants: tuple[str, ...]
    dkim_algorithm: str
    workers: int | None
    max_per_destination: int | None
    drain_timeout: float
    send_timeout: float
    idle: float
    output: Path
    keep: bool


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10, help="concurrent sessions (10)")
    parser.add_argument("--messages", type=int, default=2000, help="messages in all (2000)")
    parser.add_argument(
        "--duration", type=float, help="send for this many seconds instead of --messages"
    )
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes (10240)")
    parser.add_argument("--tls", choices=("implicit", "starttls"), default="implicit")
    parser.add_argument(
        "--variants", default="plain,dkim", help="comma-separated: plain, dkim (both)"
    )
    parser.add_argument("--dkim-algorithm", choices=("rsa", "ed25519"), default="rsa")
    parser.add_argument("--workers", type=int, help="[server] workers (default: not set)")
    parser.add_argument(
        "--max-per-destination",
        type=int,
        help="[relay] max_per_destination (default: not set, the server's default)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=90.0,
        help="seconds to wait for the queue to drain after the last 250 (90)",
    )
    parser.add_argument(
        "--send-timeout",
        type=float,
        default=240.0,
        help="with --messages, stop sending after this many seconds anyway (240)",
    )
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of idle CPU (2)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--keep", action="store_true", help="keep the server's folder")
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or set(variants) - {"plain", "dkim"}:
        parser.error("--variants takes plain and/or dkim")
    if args.sessions < 1 or args.messages < 1 or args.size < 200:
        parser.error("--sessions and --messages must be positive, --size at least 200")
    return Options(
        sessions=args.sessions,
        messages=args.messages,
        duration=args.duration,
        size=args.size,
        tls=args.tls,
        variants=variants,
        dkim_algorithm=args.dkim_algorithm,
        workers=args.workers,
        max_per_destination=args.max_per_destination,
        drain_timeout=args.drain_timeout,
        send_timeout=args.send_timeout,
        idle=args.idle,
        output=args.output,
        keep=args.keep,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(argv)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    results = []
    for variant in options.variants:
        work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        try:
            print(f"running {variant} ...", file=sys.stderr, flush=True)
            results.append(run_variant(variant, options, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    text = report(results, options, argv, load, started)
    print(text)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(text + "\n")
    bad = any(r.not_delivered or not r.drained or r.errors for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
