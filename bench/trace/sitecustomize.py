"""Where the server's time goes under load: loaded into every server process by Python's
``site`` when this folder is on PYTHONPATH (issue 16).

    CLIENTID_TRACE=/tmp/trace PYTHONPATH=$PWD/bench/trace \\
        python bench/compare.py --peers ours --workloads a --duration 15

Each server process (twistd and its workers) then writes ``/tmp/trace.<pid>`` every two
seconds:

- ``auth``: AUTH inside the server, from the decoded credentials to the 235 (or 535)
  being written; ``queue``: from the hand-off to the login thread until it starts;
  ``run``: the login thread's work. The client's AUTH → 235 minus ``auth`` is the time
  the command and the reply spent waiting for the reactor (and the client).
- ``turns``: the reactor's loop, one turn per epoll call; ``handling+wait``: the wall time
  spent dispatching events against the reactor thread's own CPU time in it (the
  difference is time the thread was runnable but not running: the GIL or the CPU).
- ``handling``: each turn's dispatching alone (less its epoll wait); for turns whose
  handling took over 10 ms, ``slow handling`` is the share of it the reactor thread
  actually ran (0.3: it waited 70% of the time for the GIL or a CPU).
- ``gc``: the collector's pauses by generation.

Each AUTH is also written to ``/tmp/trace.auth.<pid>.json`` with its moments on the
system's monotonic clock (the client's port, the end of the epoll call of its turn, the
socket read, the start of the login, the 235 written, and whether it was decided at
once, with no thread), for ``bench/trace/auth_wire.py`` to join with what
``bench/steps/`` saw in the load generator.

Nothing here changes what the server does; it only wraps methods to time them. A
process without the variable is untouched.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from typing import Any

OUT = os.environ.get("CLIENTID_TRACE", "")
KEEP = 50_000  # newest samples kept per figure
SLOW_HANDLING = 0.010  # seconds: a turn's handling this long is looked at more closely


class Samples:
    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.sums: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        values = self.values.setdefault(name, [])
        values.append(value)
        if len(values) > KEEP:
            del values[: KEEP // 2]

    def total(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value

    def report(self) -> str:
        lines = [f"pid {os.getpid()} {' '.join(sys.argv[:3])}"]
        for name, values in sorted(self.values.items()):
            ordered = sorted(values)
            if not ordered:
                continue

            def at(share: float, ordered: list[float] = ordered) -> float:
                return ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1000

            mean = sum(ordered) / len(ordered) * 1000
            lines.append(
                f"{name}: n={len(ordered)} p50={at(0.5):.2f} p90={at(0.9):.2f} "
                f"p99={at(0.99):.2f} max={ordered[-1] * 1000:.2f} mean={mean:.2f} ms"
            )
        if FULL_COLLECTIONS:
            lines.append(
                "gc gen2 pauses (seconds after start: ms): "
                + ", ".join(f"{at:.1f}: {pause * 1000:.1f}" for at, pause in FULL_COLLECTIONS)
            )
        for name, value in sorted(self.sums.items()):
            lines.append(f"{name}: {value:.2f} s")
        return "\n".join(lines) + "\n"


SAMPLES = Samples()
# [client port, epoll returned, read, login, 235 written, 1 if decided without a thread]
AUTH_MOMENTS: list[list[float]] = []
POLLED = [0.0]  # time.monotonic() when this turn's epoll call returned
STARTED = time.perf_counter()
FULL_COLLECTIONS: list[tuple[float, float]] = []  # (seconds after start, pause)


def _wrap_reactor() -> None:
    from twisted.internet import epollreactor

    original = epollreactor.EPollReactor.doPoll
    last: list[float] = []
    waited = [0.0]  # this turn's epoll wait

    class TimedPoller:
        def __init__(self, poller: Any) -> None:
            self.poller = poller

        def __getattr__(self, name: str) -> Any:
            return getattr(self.poller, name)

        def poll(self, *args: Any) -> Any:
            started = time.perf_counter()
            events = self.poller.poll(*args)
            POLLED[0] = time.monotonic()
            waited[0] = time.perf_counter() - started
            SAMPLES.total("epoll wait", waited[0])
            SAMPLES.add("events per turn (not ms)", len(events) / 1000)
            return events

    def do_poll(self: Any, timeout: float | None) -> None:
        if not isinstance(self._poller, TimedPoller):
            self._poller = TimedPoller(self._poller)
        started = time.perf_counter()
        if last:
            SAMPLES.add("turns", started - last[0])
        last[:] = [started]
        cpu = time.thread_time()
        waited[0] = 0.0
        original(self, timeout)
        wall, used = time.perf_counter() - started, time.thread_time() - cpu
        SAMPLES.total("handling+wait wall", wall)
        SAMPLES.total("handling+wait reactor CPU", used)
        # The events' handling alone: its wall time, and the share of it the reactor
        # thread ran. A long handling with a low share waited for the GIL or a CPU.
        handling = wall - waited[0]
        SAMPLES.add("handling", handling)
        if handling > SLOW_HANDLING:
            SAMPLES.add("slow handling: reactor CPU (not ms: share)", used / handling / 1000)

    epollreactor.EPollReactor.doIteration = do_poll


def _wrap_reads() -> None:
    """Each TCP connection keeps the moment of its last socket read, and its turn's."""
    from twisted.internet import tcp

    original = tcp.Connection.doRead

    def do_read(self: Any) -> Any:
        self.trace_read = (POLLED[0], time.monotonic())
        return original(self)

    tcp.Connection.doRead = do_read  # type: ignore[method-assign]


def _wrap_auth() -> None:
    from clientid_mta.smtp.send_at_once import tcp_connection

    checker = sys.modules["clientid_mta.auth.checker"]
    wire = sys.modules["clientid_mta.smtp.protocol"]
    session_class = wire.SubmissionESMTP
    checker_class = checker.ClientIdChecker
    login, request, check = (
        session_class._login,
        checker_class.requestAvatarId,
        checker_class._check,
    )
    handed: dict[int, float] = {}

    def timed_login(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        login_at = time.monotonic()
        connection = tcp_connection(self.transport)
        polled, read = getattr(connection, "trace_read", (0.0, 0.0))
        port = float(getattr(self.transport.getPeer(), "port", 0))

        def done(result: Any) -> Any:
            SAMPLES.add("auth", time.perf_counter() - started)
            quick = float(not returned)  # decided on the reactor, within the call
            AUTH_MOMENTS.append([port, polled, read, login_at, time.monotonic(), quick])
            if len(AUTH_MOMENTS) > KEEP:
                del AUTH_MOMENTS[: KEEP // 2]
            return result

        returned: list[bool] = []
        answered = login(self, *args, **kwargs).addBoth(done)
        returned.append(True)
        return answered

    def timed_request(self: Any, credentials: Any) -> Any:
        handed[id(credentials.password)] = time.perf_counter()
        return request(self, credentials)

    def timed_check(self: Any, attempt: Any, password: str) -> Any:
        started = time.perf_counter()
        was = handed.pop(id(password), None)
        if was is not None:
            SAMPLES.add("queue", started - was)
        try:
            return check(self, attempt, password)
        finally:
            SAMPLES.add("run", time.perf_counter() - started)

    session_class._login = timed_login
    checker_class.requestAvatarId = timed_request
    checker_class._check = timed_check


def _watch_gc() -> None:
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pause = time.perf_counter() - started[0]
            SAMPLES.add(f"gc gen{info['generation']}", pause)
            if info["generation"] == 2:
                FULL_COLLECTIONS.append((started[0] - STARTED, pause))

    gc.callbacks.append(callback)


def _background() -> None:
    wanted = ("clientid_mta.auth.checker", "clientid_mta.smtp.protocol")
    while not all(hasattr(sys.modules.get(name), "__file__") for name in wanted):
        time.sleep(0.05)
    time.sleep(0.5)  # both modules finished importing
    _wrap_auth()
    while True:
        time.sleep(2)
        with open(f"{OUT}.{os.getpid()}", "w", encoding="utf-8") as report:
            report.write(SAMPLES.report())
        with open(f"{OUT}.auth.{os.getpid()}.json", "w", encoding="utf-8") as moments:
            json.dump(AUTH_MOMENTS, moments)


if OUT:  # a process that never loads the server (the load generator) writes nothing
    _wrap_reactor()
    _wrap_reads()
    _watch_gc()
    threading.Thread(target=_background, name="trace", daemon=True).start()
