"""Issue 14: ``/metrics`` counts exactly what a scripted session did, and
``/healthz/ready`` turns 503 with the reason when the store or the mail folder cannot be
used, and back.

A real server (in-process, then twistd with two processes), real TLS, real HTTP; the
scrape is parsed with prometheus_client's own text parser.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clientid_mta.config import ConfigError
from tests.conftest import RunningServer, start_server
from tests.serverproc import (
    ServerProcess,
    fingerprint_of,
    free_ports,
    login_code,
    run_twistd_once,
    running,
    submit,
)
from tests.sink import wait_until

ALICE, ALICE_PW = "alice@example.org", "alice-password"
Sample = tuple[str, tuple[tuple[str, str], ...]]
MESSAGE = b"From: alice@example.org\r\nTo: alice@example.org\r\nSubject: m\r\n\r\nhello\r\n"
# One network budget: the second stranger failing from 127.0.0.1 is throttled.
THROTTLE = "[throttle]\nnetwork_burst = 1\nnetwork_refill = 3600\n"


def metrics_config(port: int) -> str:
    return f'[metrics]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def scrape(port: int) -> dict[Sample, float]:
    """Every sample of /metrics, by name and labels (the _created timestamps left out)."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def moved(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    """The counters that changed (histogram buckets and gauges left out) and by how much."""
    changes = {}
    for key, value in after.items():
        name = key[0]
        if name.endswith("_bucket") or not name.endswith(("_total", "_count")):
            continue
        if value != before.get(key, 0.0):
            changes[key] = value - before.get(key, 0.0)
    return changes


def token() -> str:
    return f"UUID {uuid.uuid4()}"


def scripted_session(server: RunningServer) -> None:
    """A login accepted (first device: trusted) and a message in one session, a wrong
    password refused, then a throttled attempt, and a TLS handshake that fails."""
    client = server.smtp()
    assert client.docmd("CLIENTID", token())[0] == 250
    client.login(ALICE, ALICE_PW)
    submit(client, ALICE, ALICE, MESSAGE)
    client.quit()
    # A name that is no account: the network's budget (alice's own network is usual now).
    assert login_code(server, "mallory@example.org", "wrong-1", token()) == 535
    assert login_code(server, "mallory@example.org", "wrong-2", token()) == 454
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as raw:
        raw.sendall(b"EHLO not-tls\r\n" * 4)  # not a TLS record: the handshake fails
        raw.settimeout(10)
        while raw.recv(4096):
            pass


EXPECTED: dict[Sample, float] = {
    ("clientid_mta_sessions_total", (("listener", "submission"),)): 3,
    ("clientid_mta_sessions_total", (("listener", "submissions"),)): 1,
    ("clientid_mta_auth_total", (("refusal", ""), ("result", "accepted"))): 1,
    ("clientid_mta_auth_total", (("refusal", "password"), ("result", "refused"))): 1,
    ("clientid_mta_auth_total", (("refusal", ""), ("result", "throttled"))): 1,
    ("clientid_mta_device_events_total", (("event", "new"),)): 1,
    ("clientid_mta_device_events_total", (("event", "trusted_on_first_use"),)): 1,
    ("clientid_mta_messages_total", (("result", "accepted"),)): 1,
    ("clientid_mta_message_bytes_total", ()): len(MESSAGE),
    ("clientid_mta_data_reply_seconds_count", ()): 1,
    ("clientid_mta_tls_handshake_failures_total", ()): 1,
}


def no_sessions_open(port: int) -> Callable[[], bool | None]:
    return lambda: scrape(port)[("clientid_mta_sessions_active", ())] == 0 or None


def test_metrics_move_by_exactly_what_a_session_did(
    make_server: Callable[..., RunningServer],
) -> None:
    (port,) = free_ports(1)
    server = make_server(metrics_config(port) + THROTTLE)
    server.add_user(ALICE, ALICE_PW)
    before = scrape(port)
    scripted_session(server)
    wait_until(no_sessions_open(port), 10, "every session to be closed")
    after = scrape(port)
    assert moved(before, after) == EXPECTED
    queue = [k for k in after if k[0] == "clientid_mta_queue_entries"]
    assert sorted(dict(k[1])["state"] for k in queue) == ["active", "deferred", "new"]
    assert get(port, "/healthz/live") == (200, "live\n")


def test_metrics_never_carry_an_account_or_a_token(
    make_server: Callable[..., RunningServer],
) -> None:
    (port,) = free_ports(1)
    server = make_server(metrics_config(port) + THROTTLE)
    server.add_user(ALICE, ALICE_PW)
    secret = token()
    assert login_code(server, ALICE, ALICE_PW, secret) == 235
    text = get(port, "/metrics")[1]
    assert "clientid_mta_auth_total" in text
    assert "alice" not in text and secret.split()[1] not in text


def test_readiness_turns_503_with_the_reason_and_back(
    make_server: Callable[..., RunningServer],
) -> None:
    (port,) = free_ports(1)
    server = make_server(metrics_config(port))
    server.add_user(ALICE, ALICE_PW)
    assert login_code(server, ALICE, ALICE_PW, token()) == 235  # the mail folder exists now
    assert get(port, "/healthz/ready") == (200, "ready\n")

    # The store locked by another process's write transaction.
    holder = sqlite3.connect(server.config.clientid.device_store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        status, body = get(port, "/healthz/ready")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert status == 503 and "device store: database is locked" in body, body
    assert get(port, "/healthz/ready") == (200, "ready\n")

    # The mail folder unusable. Tests run as root, whom a read-only mode does not stop:
    # a file where the folder should be stops everyone.
    mail = server.config.delivery.maildir_root
    aside = mail.with_name("mail-aside")
    os.rename(mail, aside)
    mail.write_text("not a folder")
    try:
        status, body = get(port, "/healthz/ready")
    finally:
        mail.unlink()
        os.rename(aside, mail)
    assert status == 503 and f"mail folder: {mail} is not a folder" in body, body
    assert get(port, "/healthz/ready") == (200, "ready\n")


def test_two_worker_processes_report_the_whole_servers_figures(tmp_path: Path) -> None:
    """Each connection lands in either process; the scrape adds both up. Enough sessions
    that both serve some (checked in the log), and the totals are exact."""
    (port,) = free_ports(1)
    config = "[server]\nworkers = 2\n" + metrics_config(port)
    with running(tmp_path / "server", config) as server:
        wait_until(lambda: "worker 1: clientid-mta" in server.output() or None, 20, "worker 1")
        device = token()
        before = scrape(port)
        logins = 0
        while logins < 40 and (logins < 6 or "worker 1: auth accepted" not in server.output()):
            assert login_code(server, ALICE, ALICE_PW, device) == 235
            logins += 1
        wait_until(no_sessions_open(port), 10, "every session to be closed")
        changes = moved(before, scrape(port))
        output = server.output()
    assert "worker 1: auth accepted" in output
    assert "[clientid_mta.auth.checker#info] auth accepted" in output
    accepted = ("clientid_mta_auth_total", (("refusal", ""), ("result", "accepted")))
    sessions = ("clientid_mta_sessions_total", (("listener", "submission"),))
    assert changes[accepted] == logins and changes[sessions] == logins, changes


def test_documented_metric_names_are_the_exported_ones(
    make_server: Callable[..., RunningServer],
) -> None:
    (port,) = free_ports(1)
    make_server(metrics_config(port))
    families = text_string_to_metric_families(get(port, "/metrics")[1])
    exported = {f.name for f in families if not f.name.endswith("_created")}  # timestamps
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text().split("\n### Monitoring\n", 1)[1]
    table = set(re.findall(r"^\| `(clientid_mta_\w+)` \|", readme, re.MULTILINE))
    rules = (root / "etc" / "prometheus" / "clientid-mta.rules.yml").read_text()
    used = set(re.findall(r"clientid_mta_[a-z_]+", rules))

    def family(name: str) -> str:  # the parser names a counter's family without _total
        return re.sub(r"_(total|bucket|count|sum)$", "", name)

    assert {family(name) for name in table} == exported
    assert {family(name) for name in used} <= exported


def test_device_refusals_count_as_device_events(
    make_server: Callable[..., RunningServer],
) -> None:
    (port,) = free_ports(1)
    server = make_server(metrics_config(port))
    server.add_user(ALICE, ALICE_PW)
    first, second = token(), token()
    assert login_code(server, ALICE, ALICE_PW, first) == 235
    before = scrape(port)
    assert login_code(server, ALICE, ALICE_PW, second) == 535  # tofu: a second device waits
    server.admin("device", "revoke", ALICE, fingerprint_of(server, first))
    assert login_code(server, ALICE, ALICE_PW, first) == 535
    wait_until(no_sessions_open(port), 10, "every session to be closed")
    assert moved(before, scrape(port)) == {
        ("clientid_mta_sessions_total", (("listener", "submission"),)): 2,
        ("clientid_mta_auth_total", (("refusal", "device"), ("result", "refused"))): 2,
        ("clientid_mta_device_events_total", (("event", "new"),)): 1,
        ("clientid_mta_device_events_total", (("event", "pending"),)): 1,
        ("clientid_mta_device_events_total", (("event", "revoked"),)): 1,
    }


def test_a_busy_metrics_port_stops_the_start_with_one_sentence(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as problem:
            start_server(tmp_path / "server", metrics_config(port))
    message = str(problem.value)
    assert message.startswith(f"config error: [metrics] listen = 'tcp:{port}:interface=127.0.0.1'")
    assert message.endswith('choose a free port, or "" to turn it off.')


def test_twistd_with_a_busy_metrics_port_exits_with_the_sentence(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ServerProcess.create(tmp_path / "server", metrics_config(port))
        status, output = run_twistd_once(server.root, server.config.source)
    assert status != 0
    assert f"clientid-mta: config error: [metrics] listen = 'tcp:{port}:" in output, output
