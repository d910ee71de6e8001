"""One worker process (started by ``workerpool``; not a command for people to run).

It serves the listening sockets it inherited, writes its log to stdout for the
parent to relay, stops on SIGTERM, reloads on SIGHUP, and dies with its parent.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from collections.abc import Sequence

from twisted.logger import FileLogObserver, formatEvent, globalLogBeginner

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL when the parent exits, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's SIGTERM at stop still ends us


def _format(event: dict[str, object]) -> str:
    text = (formatEvent(event) or "").replace("\n", " | ")
    level = event.get("log_level")
    return f"{getattr(level, 'name', 'info')} {text}\n"


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
    args = parser.parse_args(argv)
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        sys.exit(1)

    from twisted.internet import reactor

    from clientid_mta.config import ConfigError, load_config
    from clientid_mta.server.service import SubmissionService

    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(sys.stdout, _format)], redirectStandardIO=False
    )
    inherited = {name: int(fd) for name, _, fd in (item.partition("=") for item in args.listen)}
    server = SubmissionService(load_config(args.config), inherited, reactor=reactor)
    server.share_state()

    def start() -> None:
        try:
            server.startService()
        except ConfigError as problem:  # the parent logs it, and starts us again later
            print(f"error {problem}", flush=True)
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
