"""How long each step of a session takes, seen by the load generator (issue 16, round 3):
loaded into every process by Python's ``site`` when this folder is on PYTHONPATH.

    CLIENTID_STEPS=/tmp/steps PYTHONPATH=$PWD/bench/steps \\
        python bench/compare.py --peers ours --workloads b --duration 10
    python bench/steps/report.py /tmp/steps

Each generator process (the ones that import ``smtpload``) writes
``$CLIENTID_STEPS/steps.<pid>.json`` every 500 steps: for each command (by its verb; the
EHLO after STARTTLS is "EHLO in TLS"), the TCP connect, the TLS handshake after STARTTLS,
the whole ``open`` and the TLS ``close``, the seconds from sending to the reply. Run it
against each peer in turn; the same generator measures both. Warm-up sessions are
included. Server processes never import ``smtpload`` and are untouched, as is any
process without the variable.

Each AUTH is also kept with its moments on the system's monotonic clock (the local
port, AUTH sent, the end of the epoll call of the turn that read the reply, the socket
read, the reply parsed) in ``auth.<pid>.json``, for ``bench/trace/auth_wire.py``.
"""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

OUT = os.environ.get("CLIENTID_STEPS", "")
WRITE_EVERY = 500  # steps between two writes of the file (pool workers exit without atexit)

steps: defaultdict[str, list[float]] = defaultdict(list)
auth_moments: list[list[float]] = []  # [port, sent, epoll returned, read, parsed]
POLLED = [0.0]  # time.monotonic() when this loop's last epoll call returned


def note(step: str, seconds: float) -> None:
    steps[step].append(seconds)
    if sum(len(values) for values in steps.values()) % WRITE_EVERY == 0:
        Path(OUT, f"steps.{os.getpid()}.json").write_text(json.dumps(steps))
        Path(OUT, f"auth.{os.getpid()}.json").write_text(json.dumps(auth_moments))


def timed_auth(call: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """AUTH's moments: sent, and the turn and read that brought the reply."""

    async def timing(session: Any, *args: Any, **kwargs: Any) -> Any:
        port = float(session.writer.get_extra_info("sockname")[1])
        sent = time.monotonic()
        result = await call(session, *args, **kwargs)
        parsed = time.monotonic()
        tls = getattr(session.writer.transport, "_ssl_protocol", None)
        polled, read = getattr(tls, "trace_read", (0.0, 0.0))
        auth_moments.append([port, sent, polled, read, parsed])
        return result

    return timing


def stamp_reads() -> None:
    """Each TLS connection keeps the moment of its last socket read, and its turn's."""
    import asyncio.sslproto
    import selectors

    select = selectors.EpollSelector.select

    def timed_select(self: Any, timeout: float | None = None) -> Any:
        ready = select(self, timeout)
        POLLED[0] = time.monotonic()
        return ready

    selectors.EpollSelector.select = timed_select  # type: ignore[method-assign]
    updated = asyncio.sslproto.SSLProtocol.buffer_updated

    def buffer_updated(self: Any, nbytes: int) -> None:
        self.trace_read = (POLLED[0], time.monotonic())
        updated(self, nbytes)

    asyncio.sslproto.SSLProtocol.buffer_updated = buffer_updated  # type: ignore[method-assign]


def timed(step: Callable[..., str], call: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """``call`` timed under the name ``step(*args)`` gives."""

    async def timing(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = await call(*args, **kwargs)
        note(step(*args, **kwargs), time.perf_counter() - started)
        return result

    return timing


def verb(session: Any, line: str) -> str:
    """The command's verb; the EHLO after STARTTLS is its own step ("EHLO in TLS")."""
    name = line.split(" ", 1)[0].split(":", 1)[0].upper()
    previous, session.last_verb = getattr(session, "last_verb", ""), name
    return "EHLO in TLS" if name == "EHLO" and previous == "STARTTLS" else name


def instrument(smtpload: ModuleType) -> None:
    stamp_reads()
    session = smtpload.SmtpSession
    session.auth_plain = timed_auth(session.auth_plain)
    session.command = timed(verb, session.command)
    session.close = timed(lambda *_: "close", session.close)
    session.open = classmethod(timed(lambda *_, **__: "open (total)", session.open.__func__))
    asyncio.open_connection = timed(lambda *_, **__: "connect", asyncio.open_connection)
    asyncio.StreamWriter.start_tls = timed(  # type: ignore[method-assign]
        lambda *_, **__: "TLS handshake", asyncio.StreamWriter.start_tls
    )


class InstrumentSmtpload(importlib.abc.MetaPathFinder):
    """Finds ``smtpload`` as usual and instruments it once it has run."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "smtpload":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            instrument(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if OUT:
    Path(OUT).mkdir(parents=True, exist_ok=True)
    sys.meta_path.insert(0, InstrumentSmtpload())
