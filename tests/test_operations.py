"""Running it for real: busy ports, state on disk, file limits, stopping, admin errors, and
policy edge cases."""

from __future__ import annotations

import ast
import base64
import io
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet import defer, protocol
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

import clientid_mta
from clientid_mta.cli import admin
from clientid_mta.config import LimitsConfig, load_config
from clientid_mta.devices.notices import NEW_DEVICE_SEEN
from clientid_mta.devices.policy import Where
from clientid_mta.server.filelimit import files_needed, fit_open_files
from clientid_mta.server.listeners import BoundPort, LateFactory
from clientid_mta.server.service import (
    STOP_POLL,
    STOP_WAIT,
    InFlight,
    build_components,
    build_service,
    state_files,
)
from clientid_mta.smtp.clientid import parse_clientid
from tests.conftest import RunningServer, _ensure_reactor
from tests.serverproc import run_twistd_once
from tests.test_units import make_policy
from tests.typed_reactor import blockingCallFromThread, reactor


def test_busy_port_stops_twistd_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(
            f'[listen]\nsubmission = "tcp:{port}:interface=127.0.0.1"\nsubmissions = ""\n'
        )
        status, output = run_twistd_once(tmp_path, config)
    assert status != 0
    assert "Traceback" not in output
    [line] = [text for text in output.splitlines() if "clientid-mta:" in text]
    assert f"cannot listen on port {port}" in line and "[listen]" in line


LISTEN_ON_ANY_PORT = (
    '[listen]\nsubmission = "tcp:0:interface=127.0.0.1"\n'
    'submissions = "tcp:0:interface=127.0.0.1"\n'
)


def test_building_the_service_creates_nothing_on_disk_and_starting_creates_the_state(
    tmp_path: Path,
) -> None:
    _ensure_reactor()
    config = load_config(_write(tmp_path, '[server]\ndata_dir = "state"\n' + LISTEN_ON_ANY_PORT))
    before = sorted(tmp_path.rglob("*"))
    server = blockingCallFromThread(reactor, build_service, config)
    assert [child.name for child in server] == [
        "auth-threads",
        "queue",
        "housekeeping",
        "maildir-tmp-sweeper",
        "submission",
        "submissions",
    ]
    assert sorted(tmp_path.rglob("*")) == before
    blockingCallFromThread(reactor, server.startService)
    try:
        created = {path for path in state_files(config) if path.exists()}
        assert {
            config.server.data_dir,
            config.clientid.key_file,
            config.clientid.device_store,
            config.generated_tls_dir / "cert.pem",
            config.queue_config.directory / "msg",
        } <= created
    finally:
        blockingCallFromThread(reactor, server.stopService)


def test_m3_root_start_never_chowns_through_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state is created by the user the server runs as: no code path changes owners,
    so a link planted in the data folder can never hand a file to that user."""
    package = Path(clientid_mta.__file__).parent
    calls = []
    for source in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            name = getattr(node, "attr", None) or getattr(node, "id", None)
            if name in {"chown", "lchown", "fchown"}:
                calls.append(f"{source.relative_to(package)}:{getattr(node, 'lineno', 0)}")
    assert calls == []

    # And at run time: a start with a link planted where the queue lock goes.
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    (tmp_path / "state" / "queue").mkdir(parents=True)
    (tmp_path / "state" / "queue" / "lock").symlink_to(victim)
    owner_changes: list[tuple[object, ...]] = []
    for module, name in ((os, "chown"), (os, "lchown"), (os, "fchown"), (shutil, "chown")):
        monkeypatch.setattr(module, name, lambda *args: owner_changes.append(args))
    _ensure_reactor()
    config = load_config(_write(tmp_path, '[server]\ndata_dir = "state"\n' + LISTEN_ON_ANY_PORT))
    server = blockingCallFromThread(reactor, build_service, config)
    blockingCallFromThread(reactor, server.startService)
    blockingCallFromThread(reactor, server.stopService)
    assert owner_changes == []
    assert victim.read_text() == "root's file\n"


def test_a_port_bound_before_the_state_is_open_closes_early_connections() -> None:
    late = LateFactory("submission")
    late.doStart()  # the port listens (privilegedStartService)
    assert late.buildProtocol(None) is None  # closed at once
    target = protocol.Factory.forProtocol(protocol.Protocol)
    late.attach(target)  # startService opened the state
    assert target.numPorts == 1
    assert isinstance(late.buildProtocol(None), protocol.Protocol)
    late.doStop()
    assert target.numPorts == 0


class Greeter(protocol.Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None  # made by makeConnection
        self.transport.write(b"220 ready\r\n")


def test_a_connection_before_the_server_serves_waits_in_the_listen_queue() -> None:
    """Bound is not accepting: a client that connects while the server is still opening
    its state (or, with workers, to a worker still starting) is greeted once the server
    serves, instead of being accepted and closed."""
    _ensure_reactor()
    late = LateFactory("submission")
    listener = BoundPort(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), late)
    blockingCallFromThread(reactor, listener.privilegedStartService)
    assert listener.port is not None
    port = listener.port.getHost().port  # type: ignore[attr-defined]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            for _ in range(3):  # reactor turns in which an accepting port would take it
                blockingCallFromThread(reactor, lambda: None)
            late.attach(protocol.Factory.forProtocol(Greeter))
            blockingCallFromThread(reactor, listener.serve)
            assert client.recv(100) == b"220 ready\r\n"
    finally:
        blockingCallFromThread(reactor, listener.stopService)


class FakeLimits:
    """The part of the ``resource`` module the file-limit check uses."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int) -> None:
        self.limit = (soft, hard)

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limit

    def setrlimit(self, which: int, limit: tuple[int, int]) -> None:
        if limit[1] != self.limit[1] or limit[0] > limit[1]:
            raise ValueError("not allowed")
        self.limit = limit


def test_l5_soft_file_limit_is_raised_to_the_hard_one_when_that_carries_max_sessions() -> None:
    limits = FakeLimits(1024, 65536)
    with capturedLogs() as events:
        assert fit_open_files(1000, limits)
    assert limits.limit == (65536, 65536)
    assert events == []


def test_l5_one_warning_names_max_sessions_when_the_hard_limit_is_too_low() -> None:
    limits = FakeLimits(256, 1024)
    with capturedLogs() as events:
        assert not fit_open_files(1000, limits)
    assert limits.limit == (1024, 1024)  # raised as far as it goes
    [warning] = events
    text = formatEvent(warning)
    assert "[limits] max_sessions = 1000" in text and "only 1024 " in text, text


def test_l5_systemd_unit_gives_room_for_the_default_max_sessions() -> None:
    unit = (Path(__file__).resolve().parent.parent / "etc" / "clientid-mta.service").read_text()
    [value] = re.findall(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert int(value) >= files_needed(LimitsConfig.max_sessions)


def test_stop_waits_for_messages_being_stored_but_not_forever(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    server = build_service(load_config(_write(tmp_path, LISTEN_ON_ANY_PORT)), reactor=clock)
    in_flight, runner = InFlight(), SimpleNamespace(active=0)
    server.components = SimpleNamespace(in_flight=in_flight, queue_runner=runner)  # type: ignore[assignment]
    storing: defer.Deferred[None] = defer.Deferred()
    in_flight.track(storing)
    drained = defer.ensureDeferred(server._drain())
    clock.pump([1.0] * 5)
    assert not drained.called
    storing.callback(None)
    assert in_flight.count == 0
    clock.pump([STOP_POLL])
    assert drained.called

    runner.active = 1  # a relay that never ends holds the stop for STOP_WAIT only
    drained = defer.ensureDeferred(server._drain())
    clock.pump([1.0] * int(STOP_WAIT - 1))
    assert not drained.called
    clock.pump([1.0] * 2)
    assert drained.called


def test_state_files_are_private(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, '[server]\ndata_dir = "state"\n'))
    components = build_components(config)
    components.store.devices.add_trusted("a@example.org", "00" * 32, "UUID")
    try:
        for path in state_files(config):
            if path.exists() and path.name != "cert.pem":  # a certificate is public
                assert path.stat().st_mode & 0o077 == 0, path
    finally:
        components.store.close()


def test_admin_reports_a_broken_device_store_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(tmp_path, '[clientid]\ndevice_store = "store-is-a-folder"\n')
    (tmp_path / "store-is-a-folder").mkdir()
    assert admin.main(["--config", str(config), "device", "list", "a@example.org"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("clientid-mta: ")


def test_revoking_the_last_trusted_device_does_not_reopen_tofu(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, "")
    laptop, thief = parse_clientid(b"UUID 1"), parse_clientid(b"UUID 2")
    assert policy.decide("a@x", laptop, Where("net")).allowed  # trusted on first use
    policy.store.set_state("a@x", policy.store.devices_of("a@x")[0].fingerprint, "revoked")
    refused = policy.decide("a@x", thief, Where("net"))
    assert not refused.allowed and refused.reason == "new_device_pending"


def test_observe_mode_notice_does_not_claim_a_refusal(tmp_path: Path) -> None:
    from clientid_mta.delivery.maildir import MaildirRoot
    from clientid_mta.devices.notices import Notifier

    policy = make_policy(tmp_path, '[clientid]\npolicy = "observe"\n')
    policy.notifier = Notifier(MaildirRoot(tmp_path / "mail"), "mail.example.org")
    policy.decide("a@example.org", parse_clientid(b"UUID 1"), Where("net"))
    second = policy.decide("a@example.org", parse_clientid(b"UUID 2"), Where("net"))
    assert second.allowed and second.notices == (NEW_DEVICE_SEEN,)
    texts = [p.read_text() for p in (tmp_path / "mail/example.org/a/new").iterdir()]
    assert any("was let in" in text for text in texts)
    assert not any("refused" in text for text in texts)


def test_a_broken_mailbox_does_not_change_the_decision(tmp_path: Path) -> None:
    from clientid_mta.delivery.maildir import MaildirRoot
    from clientid_mta.devices.notices import Notifier

    (tmp_path / "mail" / "example.org").mkdir(parents=True)
    (tmp_path / "mail" / "example.org" / "a").write_text("a file where the Maildir should be")
    policy = make_policy(tmp_path, "")
    policy.notifier = Notifier(MaildirRoot(tmp_path / "mail"), "mail.example.org")
    first = policy.decide("a@example.org", parse_clientid(b"UUID 1"), Where("net"))
    assert first.allowed and first.notices == ("trusted-undeliverable",)


def _write(folder: Path, text: str) -> Path:
    path = folder / "c.toml"
    path.write_text(text)
    return path


def test_admin_run_prompts_nothing_when_stdin_is_a_pipe(tmp_path: Path) -> None:
    config = _write(tmp_path, "")
    out = io.StringIO()
    admin.run(["--config", str(config), "user", "add", "x@example.org"], out, io.StringIO("pw\n"))
    assert out.getvalue() == "added x@example.org\n"
    with pytest.raises(admin.AdminError):
        admin.run(["--config", str(config), "user", "add", "y@example.org"], out, io.StringIO(""))


def test_throttle_take_lets_one_of_many_concurrent_attempts_through() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from clientid_mta.auth.budgets import Throttle
    from clientid_mta.config import ThrottleConfig

    throttle = Throttle(ThrottleConfig(device_burst=1, account_unknown_burst=1))
    with ThreadPoolExecutor(8) as pool:
        taken = list(pool.map(lambda _: throttle.take("device:x", "unknown:a"), range(40)))
    assert taken.count(True) == 1
    throttle.refund("device:x", "unknown:a")  # a success gives it back
    assert throttle.take("device:x", "unknown:a")


def test_S13_throttled_attempts_count_towards_the_session_limit(
    make_server: Callable[..., RunningServer],
) -> None:
    # The device is unknown: it spends its network's budget.
    server = make_server("[throttle]\nnetwork_burst = 1\n[auth]\nmax_failures_per_session = 3")
    server.add_user("alice@example.org", "alice-password")
    wire = server.wire().tls_session()
    assert wire.code("CLIENTID UUID 0b6b2f7e-0000-4000-8000-0000000000aa") == 250
    assert wire.auth_plain("alice@example.org", "wrong-1") == 535  # spends the budget
    assert wire.auth_plain("alice@example.org", "wrong-2") == 454
    code, [text] = wire.cmd(
        "AUTH PLAIN " + base64.b64encode(b"\0alice@example.org\0wrong-3").decode()
    )
    assert code == 421 and text.startswith("4.7.0 ")
    assert wire.is_closed()
