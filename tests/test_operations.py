"""Running it for real: busy ports, state ownership, admin errors, and policy edge cases."""

from __future__ import annotations

import base64
import io
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from clientid_mta.cli import admin
from clientid_mta.config import load_config
from clientid_mta.devices.notices import NEW_DEVICE_SEEN
from clientid_mta.devices.policy import Where
from clientid_mta.server.service import build_components
from clientid_mta.server.tap import hand_over_state, state_files
from clientid_mta.smtp.clientid import parse_clientid
from tests.conftest import RunningServer
from tests.serverproc import run_twistd_once
from tests.test_units import make_policy


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


@pytest.mark.skipif(os.getuid() != 0, reason="changing owners needs root")
def test_state_created_as_root_is_handed_to_the_uid(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, '[server]\ndata_dir = "state"\n'))
    components = build_components(config)
    hand_over_state(config, 65534, 65534)
    components.store.close()
    owned = [path for path in state_files(config) if path.exists()]
    assert config.clientid.key_file in owned and config.clientid.device_store in owned
    assert {(path.stat().st_uid, path.stat().st_gid) for path in owned} == {(65534, 65534)}


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
