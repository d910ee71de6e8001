"""Open files: every session holds a socket and, while it stores a message, a file.

A process whose RLIMIT_NOFILE is below what ``[limits] max_sessions`` needs would
refuse connections with EMFILE long before the cap. At start the soft limit is
raised to the hard one where that helps, and otherwise one line says what to change.
"""

from __future__ import annotations

import resource
from typing import Any

from twisted.logger import Logger

log = Logger()

FILES_PER_SESSION = 2  # the connection, and the message or queue file being written
SPARE_FILES = 128  # listeners, the device store, the queue lock, log, threads, relays


def files_needed(max_sessions: int) -> int:
    return max_sessions * FILES_PER_SESSION + SPARE_FILES


def fit_open_files(max_sessions: int, limits: Any = resource) -> bool:
    """True when RLIMIT_NOFILE (after raising the soft limit) carries ``max_sessions``.

    ``limits`` is the ``resource`` module (tests give a fake).
    """
    needed = files_needed(max_sessions)
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    unlimited = limits.RLIM_INFINITY
    if soft == unlimited or soft >= needed:
        return True
    target = needed if hard == unlimited else hard
    if target > soft:
        try:
            limits.setrlimit(limits.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # e.g. above the kernel's nr_open: keep the old limit and say so below
    if soft >= needed:
        return True
    log.warn(
        "[limits] max_sessions = {max_sessions} needs about {needed} open files, but this "
        "process may open only {limit} (RLIMIT_NOFILE); raise the limit (systemd: "
        "LimitNOFILE=, shell: ulimit -n) or lower max_sessions",
        max_sessions=max_sessions,
        needed=needed,
        limit=soft,
    )
    return False
