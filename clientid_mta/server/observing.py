"""The server's side of observing: which events it counts, what readiness checks, and
the ``[metrics] listen`` endpoint as a child service.

``PrometheusEvents`` is made only when ``[metrics] listen`` is set: the wire, the
checker and the queue then report to it, else to ``NO_EVENTS``. With worker
processes, ``tap`` names a per-run folder for prometheus_client's multiprocess mode
(``metrics_folder``); the parent empties it at start and serves everyone's sums.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from clientid_mta.config import Config, ConfigError
from clientid_mta.devices.backends import probe_store
from clientid_mta.observe.events import NO_EVENTS, IServerEvents
from clientid_mta.observe.health import Check, writable_folder
from clientid_mta.observe.metrics import MULTIPROCESS_ENV, PrometheusEvents, use_multiprocess_folder
from clientid_mta.observe.web import Observed, observe_site
from clientid_mta.outbound.queue import QueueDir
from clientid_mta.outbound.runner import QueueRunner


def metrics_folder(config: Config) -> Path:
    """Where the processes of one run keep their counts (emptied at each start)."""
    return config.server.data_dir / "metrics"


def share_metrics(config: Config) -> None:
    """Several processes will count: name the folder before prometheus_client is
    imported, here and (through the environment) in the workers."""
    if config.metrics.listen:
        os.environ[MULTIPROCESS_ENV] = str(metrics_folder(config).absolute())


def make_events(config: Config, parent: bool) -> IServerEvents:
    """The server's counter; the parent of workers empties the shared folder first."""
    if not config.metrics.listen:
        return NO_EVENTS
    folder = os.environ.get(MULTIPROCESS_ENV)
    if parent and folder:
        use_multiprocess_folder(Path(folder))
    return PrometheusEvents()


def queue_states(runner: QueueRunner) -> dict[str, int] | None:
    """The queue's entries: active (being sent), deferred (tried before) or new; None
    where another process runs the queue."""
    if not runner.owner:
        return None
    states = {"active": 0, "deferred": 0, "new": 0}
    for entry in runner.entries.values():
        tried = any(recipient.attempts for recipient in entry.envelope.recipients)
        states["active" if entry.busy else "deferred" if tried else "new"] += 1
    return states


def _queue_owner(queue: QueueDir) -> Check:
    def check() -> str | None:
        with queue.try_lock() as free:
            return "no process runs the queue" if free else None

    return check


def readiness_checks(config: Config, runner: QueueRunner) -> Sequence[tuple[str, Check]]:
    """The blocking checks (run in a thread): folders take files, the store takes a
    write, some process holds the queue."""
    checks: list[tuple[str, Check]] = [
        ("data folder", writable_folder(config.server.data_dir)),
        ("mail folder", writable_folder(config.delivery.maildir_root)),
        ("device store", lambda: probe_store(config)),
    ]
    if not runner.owner:  # this process holds the lock: alive by definition
        checks.append(("queue", _queue_owner(runner.queue)))
    return checks


class MetricsListener(service.Service):
    """The HTTP endpoint. Its owner (``SubmissionService``) binds it with the SMTP ports,
    before privileges drop, or first thing in ``startService`` when it runs embedded."""

    name = "metrics"

    def __init__(self, reactor: Any, description: str, observed: Observed) -> None:
        self.description = description
        self.endpoint = serverFromString(reactor, description)
        self.site = observe_site(reactor, observed)
        self.port: IListeningPort | None = None

    def listen(self) -> None:
        """Bind the port unless it is bound. Raises ConfigError."""
        if self.port is not None:
            return
        failed: list[Failure] = []
        listening = self.endpoint.listen(self.site)  # a TCP endpoint answers at once
        listening.addCallbacks(self._bound, failed.append)
        if failed:
            raise ConfigError(
                f"config error: [metrics] listen = {self.description!r}: cannot listen "
                f'({failed[0].getErrorMessage()}); choose a free port, or "" to turn it off.'
            )

    def _bound(self, port: IListeningPort) -> None:
        self.port = port

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
