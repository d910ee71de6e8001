"""All cores: ``[server] workers = N`` processes serve the same listening sockets.

twistd's process binds the ports (before it drops privileges), serves them itself,
and starts N-1 workers (``python -m clientid_mta.server.worker``) that adopt the same
sockets; the kernel hands each new connection to one of them. Everything the
processes must agree on lives in files: the device store and the failure budgets in
SQLite (WAL), accounts in the passwd file, mail in Maildir and the queue. Only the
process holding the queue lock (normally this one) runs the queue; workers write
entries that it picks up within a second.

A worker that dies is started again after a pause; a worker whose parent dies is
killed by the kernel (PR_SET_PDEATHSIG), so a restarted server finds its ports free.
SIGHUP is passed on, so every process reloads the certificate.

Logs: when twistd logs to its standard output (``twistd -n`` without ``--logfile`` or
``--syslog``: systemd's journal, a redirect), the workers share that output and write
their lines themselves, each line one ``write``, so the parent's reactor spends nothing
on them. Otherwise (a log file twistd rotates, syslog, an embedding program) they
write to a pipe and the parent logs their lines, as its own.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from clientid_mta.config import Config
from clientid_mta.observe.logs import RELAYED_LINE, relayed_json
from clientid_mta.observe.metrics import process_ended
from clientid_mta.output_lines import OutputLines
from clientid_mta.server.systemd import without_systemd_variables

log = Logger()

RESTART_DELAY = 1.0  # seconds before a dead worker is started again
STOP_GRACE = 10.0  # seconds a worker gets to finish after SIGTERM
MAX_LINE = 65536  # bytes of one relayed log line held until its end
FIRST_FD = 3  # the inherited sockets start here in the child


def twistd_logs_to_stdout(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is ``twistd --nodaemon`` logging to its standard output (no
    ``--logfile`` but ``-``, no ``--syslog``, no ``--logger``), so that a worker may
    write its lines to the same output."""
    if not argv or not Path(argv[0]).name.startswith("twistd"):
        return False
    options = list(argv[1 : argv.index("clientid-mta")] if "clientid-mta" in argv else argv[1:])
    nodaemon, logfile = False, "-"
    while options:
        option = options.pop(0)
        if option in ("-n", "--nodaemon"):
            nodaemon = True
        elif option in ("--syslog", "--logger") or option.startswith("--logger="):
            return False  # syslog, or an observer of the admin's: not our stdout
        elif option in ("-l", "--logfile"):
            logfile = options.pop(0) if options else ""
        elif option.startswith("--logfile="):
            logfile = option.partition("=")[2]
        elif option.startswith("-l"):
            logfile = option[2:]
    return nodaemon and logfile == "-"


class WorkerProcess(protocol.ProcessProtocol):
    """One worker's pipes: its log lines come back on stdout and are logged here."""

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.pid: int | None = None  # kept: the transport forgets it when the process ends
        self._lines = OutputLines(MAX_LINE)

    def outReceived(self, data: bytes) -> None:
        lines = self._lines.feed(data)
        if self._lines.too_long:
            self._lines.keep_end()  # a log line without end: its last part is logged
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            event = relayed_json(line) if self.pool.json_logs else None
            if event is not None:  # the worker's own JSON line, passed on as it is
                level_name, text = str(event.get("level")), event["text"]
                relayed = {RELAYED_LINE: line}
            else:  # "<level> <text>" from the worker's log; anything else (stderr) whole
                level_name, _, text = line.partition(" ")
                if level_name not in _LEVELS:
                    text = line
                relayed = {}
            level = LogLevel.levelWithName(level_name) if level_name in _LEVELS else LogLevel.info
            log.emit(level, "worker {worker}: {line}", worker=self.number, line=text, **relayed)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.pool.ended(self, reason)


_LEVELS = {level.name for level in LogLevel.iterconstants()}


class WorkerPool(service.Service):
    name = "workers"

    def __init__(
        self,
        config: Config,
        ports: Callable[[], defer.Deferred[dict[str, Any]]],
        count: int,
        reactor: Any,
    ) -> None:
        """``ports()`` fires with {listener name: IListeningPort} once they are bound;
        ``reactor`` provides IReactorProcess and IReactorTime."""
        self.config = config
        self.ports = ports
        self.count = count
        self.reactor = reactor
        self.workers: dict[int, tuple[WorkerProcess, Any]] = {}
        self._fds: dict[str, int] = {}
        # JSON logs go through the parent's observer ([log] format sets twistd's logger,
        # which argv does not show): workers writing text there would break the format.
        self.direct_logs = config.log.format == "text" and twistd_logs_to_stdout(sys.argv)
        # With JSON each worker writes whole JSON lines (its events' own fields, and
        # ``worker``), which the parent passes on unchanged.
        self.json_logs = config.log.format == "json"

    def startService(self) -> None:
        super().startService()
        bound = self.ports()
        bound.addCallback(self._spawn_all)
        bound.addErrback(lambda failure: log.failure("cannot start workers", failure))

    def _spawn_all(self, ports: dict[str, Any]) -> None:
        self._fds = {name: port.fileno() for name, port in ports.items()}
        for number in range(1, self.count):
            self._spawn(number)
        log.info("{count} processes serve the ports", count=self.count)

    def _spawn(self, number: int) -> None:
        if not self.running:
            return
        argv = [sys.executable, "-m", "clientid_mta.server.worker", "--number", str(number)]
        argv += ["--parent", str(os.getpid())]  # a worker outliving us ends at once
        if self.config.source is not None:
            argv += ["--config", str(self.config.source)]
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        if self.direct_logs:  # our own output: the worker writes its log lines there
            child_fds.update({1: 1, 2: 2})
            argv.append("--direct-log")
        elif self.json_logs:
            argv.append("--json-log")
        for offset, (name, fd) in enumerate(sorted(self._fds.items())):
            child_fds[FIRST_FD + offset] = fd
            argv += ["--listen", f"{name}={FIRST_FD + offset}"]
        process = WorkerProcess(self, number)
        transport = self.reactor.spawnProcess(
            process,
            sys.executable,
            argv,
            env=without_systemd_variables(os.environ),  # READY=1 and sockets: the parent's
            path=os.getcwd(),
            childFDs=child_fds,
        )
        process.pid = transport.pid
        self.workers[number] = (process, transport)

    def ended(self, process: WorkerProcess, reason: Failure) -> None:
        current = self.workers.get(process.number)
        if current is None or current[0] is not process:
            return
        del self.workers[process.number]
        if process.pid is not None:
            process_ended(process.pid)  # its share of the live gauges goes with it
        if self.running:
            log.error(
                "worker {worker} ended ({reason}); starting it again",
                worker=process.number,
                reason=reason.getErrorMessage(),
            )
            self.reactor.callLater(RESTART_DELAY, self._spawn, process.number)

    def signal_all(self, signum: int) -> None:
        for _process, transport in list(self.workers.values()):
            try:
                transport.signalProcess(signum)
            except Exception:  # noqa: S110 - already gone: processEnded follows
                pass

    def reload(self) -> None:
        self.signal_all(signal.SIGHUP)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        waits = [process.ended for process, _ in self.workers.values()]
        self.signal_all(signal.SIGTERM)
        killer = self.reactor.callLater(STOP_GRACE, self.signal_all, signal.SIGKILL)

        def done(result: object) -> object:
            if killer.active():
                killer.cancel()
            return result

        return defer.DeferredList(waits).addBoth(done)
