"""Issue 6 point 5: floods and slow clients, small enough for CI (docs/conformance.md, S8, S13).

- hundreds of connections that never speak: the ones over the per-address or overall cap
  get ``421 4.7.0`` and are closed, the others time out with ``421 4.4.2``;
- slowloris clients (a byte at a time, in plaintext, inside TLS, or of the TLS
  handshake) are closed within the command timeout, though they never stop sending;
- an endless line (no CRLF) in every input mode, and a DATA body that never ends: the
  server's peak memory (a twistd child, measured in its own /proc) and its Maildir
  ``tmp/`` stay bounded;
- during each attack a well-behaved client, from another loopback address so that the
  per-address cap does not apply to it, logs in and sends a message within its normal
  latency.

The bigger versions, against a twistd server and with figures: ``bench/attacks.py``.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from clientid_mta.smtp.protocol import CLOSE_GRACE
from tests import test_conformance_submission as conformance
from tests.conftest import HOSTNAME, RunningServer, Wire
from tests.serverproc import ServerProcess, running
from tests.sink import wait_until
from tests.test_conformance_submission import (
    ALICE,
    BOB,
    PASSWORDS,
    assert_in_sync,
    check,
    ehlo,
    expect,
    logged_in,
    mail_dir,
    message,
    session,
    stored_files,
)

# The conftest ``server`` (alice and bob), with their passwords hashed once per module.
password_hashes = conformance.password_hashes
start = conformance.start

ATTACKER = "127.0.0.1"
GOOD_SOURCE = "127.0.0.2"  # the well-behaved client: not counted with the attackers
COMMAND_TIMEOUT = 3  # seconds; the timed-out floods below wait for it
PER_ADDRESS = 50
SLACK = 2.0  # seconds the server may take beyond a timeout on a busy CI machine
IDLE = 200  # connections that never speak

FLOOD_BYTES = 20 * 1024 * 1024  # sent by each endless line or body, at least
FLOOD_SECONDS = 60  # most a flood goes on while the good client is still busy
MAX_MESSAGE = 1024 * 1024
MAX_GROWTH_MIB = 12  # peak memory growth allowed while 20 MiB are flooded in
WARM_UP_CHUNKS = 16  # 1 MiB sent before the baseline is taken

GOOD_SESSIONS = 3  # well-behaved sessions before, and at least as many during, an attack
LATENCY_FACTOR = 3.0  # "normal latency": at most this times the median before the attack,
LATENCY_SLACK = 1.0  # plus this many seconds (argon2 and TLS on 2 busy CPUs vary)

DRIBBLE = 0.25  # seconds between two bytes of a slowloris client (8 per timeout)
SLOWLORIS_PER_KIND = 5


@pytest.fixture
def timed_server(start: Callable[[str], RunningServer]) -> RunningServer:
    """Short command timeout, and a per-address cap that 200 connections exceed."""
    return start(
        f"[limits]\ncommand_timeout = {COMMAND_TIMEOUT}\nmax_sessions_per_address = {PER_ADDRESS}"
    )


@pytest.fixture
def small_server(start: Callable[[str], RunningServer]) -> RunningServer:
    """Default timeouts, a 1 MiB message size limit."""
    return start(f"[limits]\nmax_message_size = {MAX_MESSAGE}")


# --- the well-behaved client ---------------------------------------------------------------


def good_session(server: RunningServer) -> float:
    """Implicit TLS, AUTH and one message (to alice herself, so that bob's Maildir is
    the attackers') from GOOD_SOURCE; the seconds it all took."""
    started = time.perf_counter()
    client = smtplib.SMTP_SSL(
        "127.0.0.1",
        server.tls_port,
        local_hostname="good.example.net",
        timeout=30,
        context=server.ssl_context(),
        source_address=(GOOD_SOURCE, 0),
    )
    try:
        client.login(ALICE, PASSWORDS[ALICE])
        assert client.sendmail(ALICE, [ALICE], message(to=ALICE, subject="good")) == {}
        client.quit()
    finally:
        client.close()
    return time.perf_counter() - started


def served_during(server: RunningServer, attacking: Callable[[], bool]) -> tuple[list[float], int]:
    """GOOD_SESSIONS good sessions: (their latencies, how many of them started while
    ``attacking()`` was still true)."""
    latencies: list[float] = []
    overlapping = 0
    for _ in range(GOOD_SESSIONS):
        overlapping += attacking()
        latencies.append(good_session(server))
    return latencies, overlapping


def assert_normal_latency(before: list[float], during: list[float], overlapping: int) -> None:
    assert overlapping >= 1, "no good session ran during the attack: nothing was measured"
    normal = statistics.median(before)
    worst = max(during)
    assert worst <= LATENCY_FACTOR * normal + LATENCY_SLACK, (
        f"good client: {worst:.2f} s under attack, {normal:.2f} s (median) without; "
        f"before {before}, during {during}"
    )


def assert_each_good_message_stored_once(server: RunningServer, sessions: int) -> None:
    assert [m["Subject"] for m in server.messages(ALICE)] == ["good"] * sessions


@contextlib.contextmanager
def attacking(attack: Callable[[], object]) -> Iterator[Future[object]]:
    """Run ``attack`` in a thread; its exceptions are raised when the block ends."""
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(attack)
        try:
            yield running
        finally:
            running.result(timeout=120)


# --- raw sockets -----------------------------------------------------------------------------


def connect(server: RunningServer, source: str = ATTACKER, implicit: bool = False) -> socket.socket:
    port = server.tls_port if implicit else server.port
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def first_line(sock: socket.socket) -> bytes:
    """The greeting (one line), read byte by byte so that nothing after it is consumed."""
    line = b""
    while not line.endswith(b"\r\n"):
        byte = sock.recv(1)
        assert byte, f"closed after {line!r}"
        line += byte
    return line


def until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or ``deadline`` passes (False)."""
    received = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except (ConnectionError, ssl.SSLError):
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


# --- S13: connections that never speak --------------------------------------------------------


def test_S13_idle_flood_over_the_address_cap_is_421_4_7_0_and_the_rest_times_out_421_4_4_2(
    timed_server: RunningServer,
) -> None:
    server = timed_server
    before = [good_session(server) for _ in range(GOOD_SESSIONS)]
    started = time.monotonic()
    sockets, greetings = [], []
    for _ in range(IDLE):  # one at a time: the listen backlog (50) must not overflow
        sockets.append(connect(server))
        greetings.append(first_line(sockets[-1]))
    connecting = time.monotonic() - started
    assert connecting < COMMAND_TIMEOUT, f"{IDLE} connections took {connecting:.1f} s"
    welcomed = [sock for sock, line in zip(sockets, greetings, strict=True) if line[:4] == b"220 "]
    refused = [sock for sock, line in zip(sockets, greetings, strict=True) if line[:4] != b"220 "]
    assert len(welcomed) == PER_ADDRESS
    assert {line for line in greetings if line[:4] != b"220 "} == {
        f"421 4.7.0 {HOSTNAME} Error: too many sessions from your address, "
        "try again later\r\n".encode()
    }
    for sock in refused:  # closed right after the 421
        assert until_closed(sock, time.monotonic() + SLACK) == (b"", True)
    during, overlapping = served_during(  # while the idle sessions are held
        server, lambda: time.monotonic() < started + COMMAND_TIMEOUT
    )
    deadline = started + COMMAND_TIMEOUT + SLACK
    for sock in welcomed:
        received, closed = until_closed(sock, deadline)
        assert closed and received.startswith(b"421 4.4.2 "), received
    assert_normal_latency(before, during, overlapping)
    assert_each_good_message_stored_once(server, len(before) + len(during))
    server.wait_for_sessions(lambda s: s.total == 0, "every slot given back")
    assert first_line(connect(server))[:4] == b"220 "


def test_S13_full_server_pushes_out_the_oldest_session_not_logged_in(
    start: Callable[[str], RunningServer],
) -> None:
    server = start("[limits]\nmax_sessions = 30\nmax_sessions_per_address = 20")
    first = [connect(server, "127.0.0.1") for _ in range(20)]
    greetings = [first_line(sock) for sock in first]
    second = [connect(server, "127.0.0.3") for _ in range(20)]
    greetings += [first_line(sock) for sock in second]
    assert [line[:4] for line in greetings] == [b"220 "] * 40  # idle ones make room
    busy = f"421 4.7.0 {HOSTNAME} Error: server busy, try again later\r\n".encode()
    assert [first_line(sock) for sock in first[:10]] == [busy] * 10  # the oldest ten
    good_session(server)  # a client that logs in is served even when the server is full
    assert server.service.components.sessions.total <= 30
    assert_each_good_message_stored_once(server, 1)


def test_S13_logged_in_sessions_are_never_pushed_out(
    start: Callable[[str], RunningServer],
) -> None:
    server = start("[limits]\nmax_sessions = 3")
    clients = []
    for _ in range(3):
        client = smtplib.SMTP_SSL(
            "127.0.0.1", server.tls_port, timeout=10, context=server.ssl_context()
        )
        client.login(ALICE, PASSWORDS[ALICE])
        clients.append(client)
    refused = connect(server, "127.0.0.3")
    assert first_line(refused).startswith(b"421 4.7.0 ")
    for client in clients:
        assert client.noop()[0] == 250  # none of them was pushed out
    clients.pop().quit()
    server.wait_for_sessions(lambda s: s.total == 2, "the quit session uncounted")
    good_session(server)


# --- S13: slowloris ----------------------------------------------------------------------------


def client_hello(server: RunningServer) -> bytes:
    """The bytes of a real TLS ClientHello for the server, to send a byte at a time."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = server.ssl_context().wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


SLOW_COMMAND = b"VRFY " + b"a" * 400  # never finished: a byte per DRIBBLE s


def slow_plaintext(server: RunningServer) -> tuple[socket.socket, bytes]:
    sock = connect(server)
    assert first_line(sock)[:4] == b"220 "
    return sock, SLOW_COMMAND


def slow_in_tls(server: RunningServer) -> tuple[socket.socket, bytes]:
    wire = Wire(server)
    wire.tls_session()  # the timer restarts with this EHLO, the last complete line
    return wire.sock, SLOW_COMMAND


def slow_handshake(server: RunningServer) -> tuple[socket.socket, bytes]:
    return connect(server, implicit=True), client_hello(server)


def silent_on_tls_port(server: RunningServer) -> tuple[socket.socket, bytes]:
    return connect(server, implicit=True), b""


# kind: (open a connection and return it with what to dribble, what it must receive)
SLOWLORIS: dict[str, tuple[Callable[[RunningServer], tuple[socket.socket, bytes]], bytes]] = {
    "plaintext_command": (slow_plaintext, b"421 4.4.2 "),
    "command_inside_tls": (slow_in_tls, b"421 4.4.2 "),
    "tls_handshake": (slow_handshake, b""),  # no TLS yet: closed without a reply
    "silent_on_implicit_tls_port": (silent_on_tls_port, b""),
}


Dribbled = tuple[bytes, float | None, int]


def dribble(sock: socket.socket, payload: bytes, limit: float) -> Dribbled:
    """Send ``payload`` a byte every DRIBBLE s until the server closes the connection:
    (what the server sent, seconds until it closed or None if it did not by ``limit``,
    bytes sent)."""
    started = time.monotonic()
    received = b""
    sent = 0
    while time.monotonic() - started < limit:
        if sent < len(payload):
            try:
                sock.send(payload[sent : sent + 1])
            except (ConnectionError, ssl.SSLError):
                return received, time.monotonic() - started, sent
            sent += 1
        more, closed = until_closed(sock, time.monotonic() + DRIBBLE)
        received += more
        if closed:
            return received, time.monotonic() - started, sent
    return received, None, sent


def test_S13_slowloris_clients_are_closed_within_the_command_timeout(
    timed_server: RunningServer,
) -> None:
    """The idle timer restarts per complete line, not per byte (nor per TLS record)."""
    server = timed_server
    before = [good_session(server) for _ in range(GOOD_SESSIONS)]
    clients = [
        (kind, *opened(server))
        for kind, (opened, _) in SLOWLORIS.items()
        for _ in range(SLOWLORIS_PER_KIND)
    ]
    limit = COMMAND_TIMEOUT + CLOSE_GRACE + SLACK
    with ThreadPoolExecutor(len(clients)) as pool:
        results = [pool.submit(dribble, sock, payload, limit) for _, sock, payload in clients]
        during, overlapping = served_during(
            server, lambda: not all(result.done() for result in results)
        )
        outcomes = [result.result(timeout=limit + 10) for result in results]
    for (kind, _sock, payload), (received, seconds, sent) in zip(clients, outcomes, strict=True):
        assert seconds is not None, f"{kind}: still open after {limit} s"
        assert received.startswith(SLOWLORIS[kind][1]), (kind, received)
        # It kept sending all along: the timer did not restart with its bytes.
        assert not payload or sent >= COMMAND_TIMEOUT / DRIBBLE / 2, (kind, sent)
    assert_normal_latency(before, during, overlapping)
    assert_each_good_message_stored_once(server, len(before) + len(during))
    server.wait_for_sessions(lambda s: s.total == 0, "every session uncounted")


# --- S8: an endless line, a body that never ends ----------------------------------------------


def plaintext_after_ehlo(server: RunningServer) -> Wire:
    wire = server.wire()
    ehlo(wire)
    return wire


def in_auth_exchange(server: RunningServer) -> Wire:
    wire = session(server)
    expect(wire, "AUTH PLAIN", 334)
    return wire


def in_data(server: RunningServer) -> Wire:
    wire = logged_in(server)
    expect(wire, f"MAIL FROM:<{ALICE}>", 250)
    expect(wire, f"RCPT TO:<{BOB}>", 250)
    expect(wire, "DATA", 354)
    return wire


LINE_CHUNK = b"x" * 65536
BODY_CHUNK = (b"y" * 1022 + b"\r\n") * 64  # 64 KiB of 1 KiB lines

# name: (how to get there, what to send again and again, the end, and the reply to it)
FLOODS: dict[str, tuple[Callable[[RunningServer], Wire], bytes, bytes, tuple[int, str]]] = {
    "plaintext_command_line": (plaintext_after_ehlo, LINE_CHUNK, b"\r\n", (500, "5.5.2")),
    "auth_response_line": (in_auth_exchange, LINE_CHUNK, b"\r\n", (500, "5.5.2")),
    "data_line": (in_data, LINE_CHUNK, b"\r\n.\r\n", (500, "5.5.2")),
    "data_body_never_ending": (in_data, BODY_CHUNK, b".\r\n", (552, "5.3.4")),
}


def flood(wire: Wire, chunk: bytes, stop: threading.Event) -> int:
    """Send ``chunk`` until FLOOD_BYTES are sent and ``stop`` is set (or FLOOD_SECONDS)."""
    sent = 0
    deadline = time.monotonic() + FLOOD_SECONDS
    while sent < FLOOD_BYTES or not (stop.is_set() or time.monotonic() > deadline):
        wire.send(chunk)
        sent += len(chunk)
    return sent


def tmp_bytes(server: RunningServer) -> int:
    """Bytes in bob's Maildir tmp/ (a message being received is written there)."""
    folder = mail_dir(server, BOB) / "tmp"
    return sum(path.stat().st_size for path in folder.iterdir()) if folder.is_dir() else 0


def finish_flood(server: RunningServer, wire: Wire, name: str) -> None:
    _, _, end, (code, status) = FLOODS[name]
    wire.send(end)
    check(wire.reply(), code, status)  # one reply for the whole flood
    assert_in_sync(wire)
    assert stored_files(server, BOB) == []
    wait_until(lambda: tmp_bytes(server) == 0 or None, 5, "the partial copy removed")


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """``small_server`` as a twistd child with one process: the memory measured is the
    server's alone (in this process it would be pytest's too, and argon2's earlier peak)."""
    config = f"[server]\nworkers = 1\n[limits]\nmax_message_size = {MAX_MESSAGE}\n"
    with running(tmp_path / "server", config) as server:
        yield server


def memory_kib(server: ServerProcess, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (the peak since the last ``reset_peak``) of the server process."""
    assert server.process is not None
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    match = re.search(rf"{field}:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1))


def reset_peak(server: ServerProcess) -> None:
    """Set the server's VmHWM to its current RSS (Linux ``clear_refs``, our own child)."""
    assert server.process is not None
    Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")


@pytest.mark.parametrize("name", FLOODS.keys())
def test_S8_endless_line_or_body_keeps_memory_and_disk_bounded(
    server_process: ServerProcess, name: str
) -> None:
    """The server's peak memory (its own process) does not grow with what is sent."""
    opened, chunk, _, _ = FLOODS[name]
    wire = opened(server_process)  # after the login: argon2 alone takes 64 MiB for a moment
    for _ in range(WARM_UP_CHUNKS):  # buffers and allocator at their working size
        wire.send(chunk)
    reset_peak(server_process)
    before = memory_kib(server_process, "VmHWM")
    stop = threading.Event()
    stop.set()  # FLOOD_BYTES, then stop
    flood(wire, chunk, stop)
    # tmp/ only grows, and the server has read most of the flood by now (the socket buffers
    # hold a few MiB at most): its size now is the most it held.
    assert tmp_bytes(server_process) <= MAX_MESSAGE + 4096
    grown_mib = (memory_kib(server_process, "VmHWM") - before) / 1024
    assert grown_mib < MAX_GROWTH_MIB, f"the server's peak memory grew by {grown_mib:.1f} MiB"
    finish_flood(server_process, wire, name)


@pytest.mark.parametrize("name", FLOODS.keys())
def test_S13_good_client_keeps_its_latency_during_an_endless_line_or_body(
    small_server: RunningServer, name: str
) -> None:
    opened, chunk, _, _ = FLOODS[name]
    before = [good_session(small_server) for _ in range(GOOD_SESSIONS)]
    wire = opened(small_server)
    stop = threading.Event()
    with attacking(lambda: flood(wire, chunk, stop)) as attack:
        try:
            during, overlapping = served_during(small_server, lambda: not attack.done())
        finally:
            stop.set()
    finish_flood(small_server, wire, name)
    assert_normal_latency(before, during, overlapping)
    assert_each_good_message_stored_once(small_server, len(before) + len(during))
