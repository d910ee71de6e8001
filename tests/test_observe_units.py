"""Issue 14, the fast layer: the JSON log line, the failed-AUTH name escaping, the
refusal classes, twistd's observer choice for ``[log] format = "json"``, the folder
check, and the counter's exposition. No server, no sockets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyRequest

from clientid_mta.auth.checker import MAX_LOGGED_NAME, as_typed, refusal_class
from clientid_mta.observe.health import run_checks, writable_folder
from clientid_mta.observe.logs import TWISTD_OBSERVER, event_as_json
from clientid_mta.observe.metrics import PrometheusEvents
from clientid_mta.observe.web import MetricsPage, Observed, ReadyPage
from clientid_mta.server.tap import Options


def test_a_json_log_line_is_one_object_with_the_events_fields() -> None:
    event = {
        "log_format": "auth {outcome} client={client}",
        "log_level": LogLevel.warn,
        "log_namespace": "clientid_mta.auth.checker",
        "log_time": 0.0,
        "outcome": "refused",
        "client": "198.51.100.7",
        "notices": ("pending",),
        "path": Path("/srv/mail"),
    }
    line = event_as_json(event)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "time": "1970-01-01T00:00:00.000Z",
        "level": "warn",
        "namespace": "clientid_mta.auth.checker",
        "text": "auth refused client=198.51.100.7",
        "outcome": "refused",
        "client": "198.51.100.7",
        "notices": ["pending"],
        "path": "/srv/mail",
    }


def test_a_json_log_line_carries_a_failures_traceback() -> None:
    try:
        raise ValueError("broken\nover two lines")
    except ValueError:
        failure = Failure()
    line = event_as_json({"log_format": "oops", "log_failure": failure, "log_time": 1.0})
    assert line.count("\n") == 1
    assert "ValueError: broken\nover two lines" in json.loads(line)["traceback"]


def test_a_typed_name_cannot_split_the_line_or_fake_a_field() -> None:
    typed = as_typed('eve" client=10.0.0.1\r\nauth refused client=10.0.0.2 "')
    assert "\n" not in typed and "\r" not in typed
    assert json.loads(typed) == 'eve" client=10.0.0.1\r\nauth refused client=10.0.0.2 "'
    assert typed.count('"') - typed.count('\\"') == 2  # only its own quotes are bare
    assert len(json.loads(as_typed("a" * 5000))) == MAX_LOGGED_NAME


def test_refusal_classes() -> None:
    assert [refusal_class(r) for r in ("bad_password", "unknown_account")] == ["password"] * 2
    assert refusal_class("bad_password_repeated") == "password"
    for reason in ("new_device_pending", "device_pending", "device_revoked", "shared_device"):
        assert refusal_class(reason) == "device"
    assert refusal_class("no_clientid_refused") == "policy"
    assert refusal_class("impossible_travel") == "policy"


def tap_options(tmp_path: Path, log_format: str, twistd: dict[str, object]) -> Options:
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ndata_dir = "data"\n[log]\nformat = "{log_format}"\n')
    options = Options()
    # What twistd's ServerOptions (an Options, so a dict) gives a plugin's options:
    options.parent = cast(usage.Options, twistd)
    options.parseOptions(["--config", str(config)])
    return options


def test_json_format_becomes_twistds_logger_unless_the_admin_chose_one(tmp_path: Path) -> None:
    twistd: dict[str, object] = {"logger": None, "syslog": False, "logfile": "-", "nodaemon": 1}
    tap_options(tmp_path, "json", twistd)
    assert twistd["logger"] == TWISTD_OBSERVER

    chosen: dict[str, object] = {"logger": "my.observer", "logfile": "", "nodaemon": 1}
    tap_options(tmp_path, "json", chosen)
    assert chosen["logger"] == "my.observer"

    text: dict[str, object] = {"logger": None, "logfile": "", "nodaemon": 1}
    tap_options(tmp_path, "text", text)
    assert text["logger"] is None


def test_folder_check(tmp_path: Path) -> None:
    assert run_checks([("mail folder", writable_folder(tmp_path / "mail" / "not-yet"))]) == []
    (tmp_path / "file").write_text("x")
    problems = run_checks([("mail folder", writable_folder(tmp_path / "file"))])
    assert problems == [f"mail folder: {tmp_path / 'file'} is not a folder"]

    def broken() -> str | None:
        raise OSError("no space left on device")

    assert run_checks([("data folder", broken)]) == [
        "data folder: OSError: no space left on device"
    ]


def test_counting_and_the_queue_gauge() -> None:
    events = PrometheusEvents()
    events.session_opened("submissions")
    events.session_opened("submission")
    events.session_closed("submission")
    events.login("refused", "device")
    events.message("accepted", 1200, 0.02)
    events.message("refused", 0, 0.001)
    text = events.exposition(lambda: {"new": 2, "deferred": 1, "active": 0}).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("clientid_mta_sessions_total", (("listener", "submissions"),))] == 1
    assert samples[("clientid_mta_sessions_active", ())] == 1
    assert samples[("clientid_mta_auth_total", (("refusal", "device"), ("result", "refused")))] == 1
    assert samples[("clientid_mta_message_bytes_total", ())] == 1200
    assert samples[("clientid_mta_data_reply_seconds_count", ())] == 2
    assert samples[("clientid_mta_queue_entries", (("state", "new"),))] == 2
    assert samples[("clientid_mta_queue_entries", (("state", "deferred"),))] == 1


class _HeldPool:
    """A thread pool that runs nothing until told: the work a page queued so far."""

    def __init__(self) -> None:
        self.queued: list[tuple[Any, Any]] = []

    def callInThreadWithCallback(self, on_result: Any, work: Any) -> None:
        self.queued.append((on_result, work))

    def run_all(self) -> None:
        queued, self.queued = self.queued, []
        for on_result, work in queued:
            on_result(True, work())


class _PoolReactor:
    def __init__(self) -> None:
        self.pool = _HeldPool()

    def getThreadPool(self) -> _HeldPool:
        return self.pool

    def callFromThread(self, call: Any, *args: Any) -> None:
        call(*args)


def test_hammering_readiness_queues_one_check_run_and_answers_every_request() -> None:
    """/healthz/ready shares the thread pool with the logins' password checks and store
    queries: a flood of requests must not fill it (nor open a store connection each)."""
    reactor = _PoolReactor()
    runs: list[int] = []

    def store_check() -> str | None:
        runs.append(1)
        return "down for the test"

    observed = Observed(
        metrics=lambda: None,
        not_ready=list,
        checks=lambda: [("device store", store_check)],
        queue_states=lambda: None,
    )
    page = ReadyPage(reactor, observed)
    requests = [DummyRequest([b""]) for _ in range(50)]
    for request in requests:
        assert page.render_GET(cast(Request, request)) == NOT_DONE_YET  # a Request's stand-in
    requests[7].processingFailed(Failure(ConnectionDone()))  # this client leaves early
    assert len(reactor.pool.queued) == 1
    reactor.pool.run_all()
    assert runs == [1]
    answered = [r for r in requests if r.finished]
    assert len(answered) == 49 and requests[7] not in answered
    assert {r.responseCode for r in answered} == {503}
    assert b"device store: down for the test" in b"".join(answered[0].written)
    # The next request, after the answer, runs the checks afresh.
    later = DummyRequest([b""])
    page.render_GET(cast(Request, later))
    reactor.pool.run_all()
    assert runs == [1, 1] and later.finished


def test_hammering_metrics_reads_the_queue_once_per_scrape_run() -> None:
    """Reading the queue's entries walks them on the reactor: a request that joins the
    running scrape must not walk them again."""
    reactor = _PoolReactor()
    walks: list[int] = []

    def queue_states() -> dict[str, int]:
        walks.append(1)
        return {"active": 0, "deferred": 2, "new": 1}

    events = PrometheusEvents()
    observed = Observed(
        metrics=lambda: events, not_ready=list, checks=list, queue_states=queue_states
    )
    page = MetricsPage(reactor, observed)
    requests = [DummyRequest([b""]) for _ in range(30)]
    for request in requests:
        assert page.render_GET(cast(Request, request)) == NOT_DONE_YET
    assert walks == [1] and len(reactor.pool.queued) == 1
    reactor.pool.run_all()
    assert all(r.finished for r in requests)
    assert b"clientid_mta_queue" in b"".join(requests[-1].written)


# --- the endpoint's own bounds -----------------------------------------------------------


def observe_endpoint() -> tuple[Any, Any]:
    from twisted.internet import task

    from clientid_mta.observe.web import observe_site

    clock = task.Clock()
    observed = Observed(
        metrics=lambda: None, not_ready=lambda: [], checks=lambda: [], queue_states=lambda: None
    )
    return observe_site(clock, observed), clock


def http_connection(site: Any) -> tuple[Any, Any]:
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    if channel is None:
        return None, None
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_the_endpoint_closes_an_idle_connection() -> None:
    from clientid_mta.observe.web import IDLE_TIMEOUT

    site, clock = observe_endpoint()
    channel, transport = http_connection(site)
    channel.dataReceived(b"GET /healthz/live HTTP/1.1\r\n")  # and nothing more
    clock.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


def test_the_endpoint_caps_its_connections() -> None:
    from clientid_mta.observe.web import MAX_CONNECTIONS

    site, _clock = observe_endpoint()
    channels = [http_connection(site)[0] for _ in range(MAX_CONNECTIONS)]
    assert None not in channels
    assert http_connection(site)[0] is None  # one more is closed at once
    channels[0].connectionLost(Failure(ConnectionDone()))
    assert http_connection(site)[0] is not None


def test_the_endpoint_keeps_no_request_body() -> None:
    site, _clock = observe_endpoint()
    channel, transport = http_connection(site)
    channel.dataReceived(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n")
    assert transport.disconnecting  # closed before a byte of the body is stored
    chunked, wire = http_connection(site)
    chunked.dataReceived(
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    assert wire.disconnecting
    plain, answer = http_connection(site)
    plain.dataReceived(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.value().startswith(b"HTTP/1.1 200")
