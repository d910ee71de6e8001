"""One worker process (started by ``workerpool``; not a command for people to run).

It serves the listening sockets it inherited, writes its log to stdout (the parent's
own output with ``--direct-log``, in the very format of a relayed line; else a pipe the parent
relays), stops on SIGTERM, reloads on SIGHUP, and dies with its parent.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.logger import FileLogObserver, Logger, formatEvent, formatTime, globalLogBeginner

from clientid_mta.observe.logs import worker_json_format

log = Logger()

PR_SET_PDEATHSIG = 1
RELAYED_NAMESPACE = "clientid_mta.server.workerpool"  # where the parent logs relayed lines


def die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL when the parent exits, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's SIGTERM at stop still ends us


def _format(event: dict[str, Any]) -> str:
    """A line for the parent to relay: its level, then the text."""
    text = (formatEvent(event) or "").replace("\n", " | ")
    level = event.get("log_level")
    return f"{getattr(level, 'name', 'info')} {text}\n"


def _direct_format(number: int) -> Callable[[dict[str, Any]], str]:
    """Exactly the line the parent would write for a relayed one (same namespace, same
    ``worker N:`` prefix), so whatever reads the log (fail2ban's filter) sees no change."""

    def line(event: dict[str, Any]) -> str:
        text = (formatEvent(event) or "").replace("\n", " | ")
        level = getattr(event.get("log_level"), "name", "info")
        system = f"{RELAYED_NAMESPACE}#{level}"
        return f"{formatTime(event.get('log_time'))} [{system}] worker {number}: {text}\n"

    return line


def ignore_early_reloads() -> None:
    """SIGHUP's default action ends the process: until the service installs its reload
    handler (at start), a SIGHUP the parent passes on is ignored. The certificate is read
    at start anyway, after any such signal."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> None:
    ignore_early_reloads()
    parser = argparse.ArgumentParser(prog="clientid_mta.server.worker")
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--listen", action="append", default=[], help="NAME=FD")
    parser.add_argument("--direct-log", action="store_true", help="stdout is the log itself")
    parser.add_argument("--json-log", action="store_true", help="write JSON lines to relay")
    parser.add_argument("--parent", type=int, help="the pid of the process that started us")
    args = parser.parse_args(argv)
    # The parent may have died while this process was still starting (stopped just as it
    # restarted a worker): its pid is compared, not read now, which would give whichever
    # process adopted us, and the worker would serve on with nobody to stop it.
    parent = args.parent if args.parent is not None else os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        sys.exit(1)

    from twisted.internet import reactor

    from clientid_mta.config import ConfigError, load_config
    from clientid_mta.server.service import SubmissionService
    from clientid_mta.server.stop_signals import StopOnce

    line = (
        worker_json_format(args.number)
        if args.json_log
        else _direct_format(args.number)
        if args.direct_log
        else _format
    )
    globalLogBeginner.beginLoggingTo([FileLogObserver(sys.stdout, line)], redirectStandardIO=False)
    inherited = {name: int(fd) for name, _, fd in (item.partition("=") for item in args.listen)}
    try:  # the config, or a TLS key that changed since the parent read it
        server = SubmissionService(load_config(args.config), inherited, reactor=reactor)
    except ConfigError as problem:  # one sentence, not a traceback; the parent retries
        log.error("{problem}", problem=str(problem))
        sys.exit(1)
    server.share_state()
    server.freeze_at_start = True

    def start() -> None:
        try:
            server.startService()
        except ConfigError as problem:  # logged; the parent starts us again later
            log.error("{problem}", problem=str(problem))
            reactor.stop()

    reactor.callWhenRunning(start)
    StopOnce().install(reactor)  # SIGTERM from the parent and from systemd: one stop
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
