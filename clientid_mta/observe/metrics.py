"""The Prometheus metrics: an ``IServerEvents`` that counts, and the text a scrape gets.

With several worker processes every process counts into files of prometheus_client's
multiprocess mode, in one folder per run under the data folder (emptied at start);
the process that serves ``/metrics`` adds them up, so the figures are the whole
server's. The mode is chosen when prometheus_client is first imported, which is why
``use_multiprocess_folder`` must run before anything imports this module's metrics.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from zope.interface import implementer

from clientid_mta.observe.events import (
    REFUSED_DEVICE,
    REFUSED_PASSWORD,
    REFUSED_POLICY,
    IServerEvents,
)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
LISTENERS = ("submission", "submissions")
LOGIN_RESULTS = ("accepted", "refused", "throttled")
REFUSAL_CLASSES = (REFUSED_PASSWORD, REFUSED_DEVICE, REFUSED_POLICY)
DEVICE_EVENTS = (
    "new",
    "pending",
    "trusted_on_first_use",
    "approved",
    "revoked",
    "shared_flagged",
    "travel",
)
MESSAGE_RESULTS = ("accepted", "refused", "failed")
DELIVERY_RESULTS = ("delivered", "deferred", "failed", "expired")
# End of DATA to the reply: an fsync or two normally, the queue's commit and DKIM at most.
REPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

QueueStates = Callable[[], dict[str, int]]


def use_multiprocess_folder(folder: Path) -> None:
    """Several processes count: empty ``folder`` (the last run's counts must not add up
    with this one's) and tell prometheus_client, here and in the workers we start."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROCESS_ENV] = str(folder)


def multiprocess() -> bool:
    return MULTIPROCESS_ENV in os.environ


def process_ended(pid: int) -> None:
    """A worker died: its share of the live gauges (sessions open) is gone with it."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        mp.mark_process_dead(pid)


@implementer(IServerEvents)
class PrometheusEvents:
    """Counts every event into prometheus_client metrics. Cheap on the reactor: one
    dict look-up and an add (a write into a memory-mapped file in multiprocess mode)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        shared = multiprocess()
        # One registry per server (tests build several); in multiprocess mode the
        # figures are read back from the files instead.
        self.registry = CollectorRegistry(auto_describe=True)
        own = None if shared else self.registry
        self.sessions = Counter(
            "clientid_mta_sessions", "Connections accepted", ["listener"], registry=own
        )
        self.active = Gauge(
            "clientid_mta_sessions_active",
            "Sessions open now",
            registry=own,
            multiprocess_mode="livesum",
        )
        self.auth = Counter(
            "clientid_mta_auth",
            "AUTH attempts by result; refusal is the class of a refusal",
            ["result", "refusal"],
            registry=own,
        )
        self.device_events = Counter(
            "clientid_mta_device_events", "Device policy events", ["event"], registry=own
        )
        self.messages = Counter(
            "clientid_mta_messages",
            "Messages at the end of DATA by reply",
            ["result"],
            registry=own,
        )
        self.message_bytes = Counter(
            "clientid_mta_message_bytes", "Bytes of the messages accepted", registry=own
        )
        self.reply_seconds = Histogram(
            "clientid_mta_data_reply_seconds",
            "Seconds from the end of DATA to the reply",
            buckets=REPLY_BUCKETS,
            registry=own,
        )
        self.deliveries = Counter(
            "clientid_mta_deliveries",
            "Relay attempts per recipient by outcome",
            ["result"],
            registry=own,
        )
        self.tls_failures = Counter(
            "clientid_mta_tls_handshake_failures", "TLS handshakes that failed", registry=own
        )
        self._show_every_label()

    def _show_every_label(self) -> None:
        """Every series exists from the start at 0, so a rate() sees the first event."""
        for listener in LISTENERS:
            self.sessions.labels(listener)
        for result in LOGIN_RESULTS:
            for refusal in REFUSAL_CLASSES if result == "refused" else ("",):
                self.auth.labels(result, refusal)
        for event in DEVICE_EVENTS:
            self.device_events.labels(event)
        for result in MESSAGE_RESULTS:
            self.messages.labels(result)
        for result in DELIVERY_RESULTS:
            self.deliveries.labels(result)

    def session_opened(self, listener: str) -> None:
        self.sessions.labels(listener).inc()
        self.active.inc()

    def session_closed(self, listener: str) -> None:
        self.active.dec()

    def tls_failed(self) -> None:
        self.tls_failures.inc()

    def login(self, result: str, refusal: str) -> None:
        self.auth.labels(result, refusal).inc()

    def device_event(self, event: str) -> None:
        self.device_events.labels(event).inc()

    def message(self, result: str, size: int, reply_seconds: float) -> None:
        self.messages.labels(result).inc()
        if result == "accepted":
            self.message_bytes.inc(size)
        self.reply_seconds.observe(reply_seconds)

    def delivery(self, result: str) -> None:
        self.deliveries.labels(result).inc()

    def exposition(self, queue_states: QueueStates | None = None) -> bytes:
        """The text a scrape gets: this process's figures, or every process's."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = self.registry
        if multiprocess():
            from prometheus_client import multiprocess as mp

            registry = CollectorRegistry()
            mp.MultiProcessCollector(registry)
        text = generate_latest(registry)
        if queue_states is not None:
            text += _queue_text(queue_states())
        return text


def _queue_text(states: dict[str, int]) -> bytes:
    """The queue's gauge, known only to the process that runs the queue."""
    lines = [
        "# HELP clientid_mta_queue_entries Queue entries by state",
        "# TYPE clientid_mta_queue_entries gauge",
    ]
    lines += [f'clientid_mta_queue_entries{{state="{k}"}} {n}' for k, n in sorted(states.items())]
    return ("\n".join(lines) + "\n").encode()
