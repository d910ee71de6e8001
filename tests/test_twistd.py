"""The server as admins run it: ``twistd -n clientid-mta`` and the ``clientid-mta`` command,
each a separate process, talked to by smtplib, swaks and the raw wire client."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clientid_mta.config import load_config
from tests.conftest import THUNDERBIRD_UUID, merge_toml
from tests.serverproc import (
    ServerProcess,
    cli,
    devices,
    fingerprint_of,
    login_code,
    port_is_free,
    run_twistd_once,
    running,
    submit,
)

SWAKS = Path("/usr/bin/swaks")
OTHER_UUID = "6f1c1d2e-5a4b-4c3d-8e9f-0a1b2c3d4e5f"
THIRD_UUID = "0d7e3c55-1b2a-4f6e-9c8d-7a6b5c4d3e2f"


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[ServerProcess]:
    with running(tmp_path / "server") as server:
        yield server


def message(subject: str, body: str) -> bytes:
    headers = f"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
    return f"{headers}\r\n{body}\r\n".encode()


def stored_subject_and_body(server: ServerProcess, address: str) -> list[tuple[str, str]]:
    return [
        (str(stored["Subject"]), str(stored.get_payload()).strip())
        for stored in server.messages(address)
    ]


# --- sessions against the twistd process -------------------------------------------


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit_tls"])
def test_S1_twistd_session_with_clientid_and_auth_lands_in_maildir(
    proc: ServerProcess, implicit: bool
) -> None:
    client = proc.smtp(implicit=implicit)
    assert client.has_extn("clientid")
    assert not client.has_extn("starttls")  # encrypted either way (S1, S2)
    assert client.docmd("STARTTLS") == (503, b"5.5.1 TLS already active")
    assert client.docmd("CLIENTID", f"UUID {THUNDERBIRD_UUID}") == (250, b"2.0.0 OK")
    client.user, client.password = "alice@example.org", "alice-password"
    assert client.auth("PLAIN", client.auth_plain) == (235, b"2.7.0 Authentication successful")
    subject = f"over twistd, implicit={implicit}"
    submit(client, "alice@example.org", "bob@example.org", message(subject, "Hello Bob."))
    assert client.quit()[0] == 221

    assert stored_subject_and_body(proc, "bob@example.org") == [(subject, "Hello Bob.")]
    [stored] = proc.messages("bob@example.org")
    assert "by mail.example.org with ESMTPSA (TLSv1.3)" in " ".join(stored["Received"].split())


@pytest.mark.skipif(not SWAKS.exists(), reason="swaks is not installed (Debian package swaks)")
@pytest.mark.parametrize("tls_option", ["--tls", "--tlsc"])
def test_S1_swaks_without_clientid_delivers_by_default(
    proc: ServerProcess, tls_option: str
) -> None:
    """swaks cannot send CLIENTID: allow_without_clientid (default true) lets it in."""
    port = proc.tls_port if tls_option == "--tlsc" else proc.port
    subject = f"swaks {tls_option}"
    argv = [str(SWAKS), "--server", f"127.0.0.1:{port}", tls_option, "--timeout", "10"]
    argv += ["--ehlo", "client.example.net", "--from", "alice@example.org"]
    argv += ["--to", "bob@example.org", "--auth", "PLAIN", "--auth-user", "alice@example.org"]
    argv += ["--auth-password", "alice-password", "--header", f"Subject: {subject}"]
    argv += ["--body", "Sent by swaks."]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    transcript = done.stdout + done.stderr
    assert done.returncode == 0, transcript
    assert re.search(r"^<~  250 CLIENTID$", transcript, re.MULTILINE), transcript  # C1 over TLS
    assert "~> CLIENTID" not in transcript
    assert "<~  235 2.7.0 Authentication successful" in transcript
    assert "<~  250 2.0.0 Ok: queued as " in transcript
    assert stored_subject_and_body(proc, "bob@example.org") == [(subject, "Sent by swaks.")]
    assert proc.admin("device", "list", "alice@example.org") == (
        "alice@example.org has no devices yet\n"
    )


# --- start-up -------------------------------------------------------------------------


CONFIG_MISTAKES = {
    "unknown_key": ('[server]\nhostnme = "mail.example.org"\n', "hostnme"),
    "wrong_type": ('[limits]\nmax_message_size = "big"\n', "max_message_size"),
    "missing_file": ('[tls]\ncertificate = "missing.pem"\nkey = "missing.pem"\n', "certificate"),
    "bad_endpoint": ('[listen]\nsubmission = "nonsense:1"\n', "submission"),
    "unknown_section": ("[bogus]\nanswer = 42\n", "bogus"),
    "bad_policy": ('[clientid]\npolicy = "maybe"\n', "policy"),
}


@pytest.mark.parametrize(("extra", "key"), CONFIG_MISTAKES.values(), ids=CONFIG_MISTAKES.keys())
def test_config_mistake_stops_twistd_with_one_line_naming_the_key(
    tmp_path: Path, extra: str, key: str
) -> None:
    config = tmp_path / "clientid-mta.toml"
    config.write_text(merge_toml(extra))
    status, output = run_twistd_once(tmp_path, config)
    assert status != 0, output
    assert "Traceback" not in output
    [line] = output.strip().splitlines()
    assert line.startswith("clientid-mta: config error: "), line
    assert key in line


def test_state_error_at_start_stops_twistd_with_one_line(tmp_path: Path) -> None:
    """Files are read once twistd has bound the ports (and switched user): a bad one still
    ends the start with one line naming the key."""
    (tmp_path / "geo.mmdb").write_text("not a MaxMind database\n")
    config = tmp_path / "clientid-mta.toml"
    config.write_text(merge_toml('[travel]\ngeoip_database = "geo.mmdb"\n'))
    status, output = run_twistd_once(tmp_path, config)
    assert status != 0, output
    assert "Traceback" not in output
    [line] = [text for text in output.splitlines() if "clientid-mta:" in text]
    assert "config error: [travel] geoip_database" in line, line


def test_S1_defaults_without_config_create_state_and_explain_the_first_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    busy = [port for port in (8587, 8465) if not port_is_free(port)]
    if busy:
        pytest.skip(f"the default ports {busy} are in use on 127.0.0.1")
    monkeypatch.chdir(tmp_path)  # the defaults resolve against the current folder
    server = ServerProcess(load_config(None), None, 8587, 8465, tmp_path)  # type: ignore[arg-type]
    try:
        try:
            server.start()
        except RuntimeError:
            if "Address already in use" in server.output():  # taken since the check above
                pytest.skip("the default ports were taken while twistd started")
            raise
        data = tmp_path / "clientid-mta-data"
        assert server.config.server.data_dir == data
        assert (data / "clientid.key").stat().st_mode & 0o777 == 0o600
        assert (data / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
        assert (data / "devices.sqlite3").is_file()
        assert (data / "tls" / "cert.pem").is_file()
        hint = server.wait_for_output(r"add the first with: (clientid-mta user add \S+)")

        # Following the hint literally (same folder, no --config) gives a working account.
        done = cli(hint.group(1).split()[1:], stdin="first-password\n", cwd=tmp_path)
        assert (done.returncode, done.stderr) == (0, "")
        assert login_code(server, hint.group(1).split()[-1], "first-password") == 235
    finally:
        server.stop()


# --- the admin command against the running server ------------------------------------


def test_C15_admin_cli_changes_apply_to_the_running_server(proc: ServerProcess) -> None:
    assert login_code(proc, "carol@example.org", "carol-password") == 535
    added = proc.cli("user", "add", "carol@example.org", stdin="carol-password\n")
    assert (added.returncode, added.stdout, added.stderr) == (0, "added carol@example.org\n", "")
    assert proc.cli("user", "list").stdout.split() == [
        "alice@example.org",
        "bob@example.org",
        "carol@example.org",
    ]
    assert proc.cli("device", "list", "carol@example.org").stdout == (
        "carol@example.org has no devices yet\n"
    )

    # No restart: the new account logs in, and its first device is trusted (tofu).
    first = f"UUID {THUNDERBIRD_UUID}"
    assert login_code(proc, "carol@example.org", "carol-password", first) == 235
    first_fp = fingerprint_of(proc, first)
    listed = proc.cli("device", "list", "carol@example.org")
    assert listed.returncode == 0, listed.stderr
    assert {fp: row[:2] for fp, row in devices(listed.stdout).items()} == {
        first_fp: ("UUID", "trusted")
    }

    # An operator-added device (token on stdin, never on the command line), then a label.
    second = f"UUID {OTHER_UUID}"
    added = proc.cli("device", "add", "carol@example.org", "UUID", stdin=OTHER_UUID + "\n")
    second_fp = fingerprint_of(proc, second)
    assert added.stdout == f"trusted device {second_fp} (UUID) for carol@example.org\n"
    labelled = proc.cli("device", "label", "carol@example.org", second_fp, "Carol's phone")
    assert labelled.returncode == 0, labelled.stderr
    second_row = devices(proc.admin("device", "list", "carol@example.org"))[second_fp]
    assert second_row[:2] == ("UUID", "trusted")
    assert "Carol's phone" in second_row[2]
    assert login_code(proc, "carol@example.org", "carol-password", second) == 235

    # Revoke and approve take effect on the next login of the running server.
    assert proc.cli("device", "revoke", "carol@example.org", first_fp[:8]).returncode == 0
    assert devices(proc.admin("device", "list", "carol@example.org"))[first_fp][1] == "revoked"
    assert login_code(proc, "carol@example.org", "carol-password", first) == 535
    third = f"UUID {THIRD_UUID}"
    third_fp = fingerprint_of(proc, third)
    assert login_code(proc, "carol@example.org", "carol-password", third) == 535  # tofu: new
    assert devices(proc.admin("device", "list", "carol@example.org"))[third_fp][1] == "pending"
    assert proc.cli("device", "approve", "carol@example.org", third_fp).returncode == 0
    assert login_code(proc, "carol@example.org", "carol-password", third) == 235


def test_C15_admin_cli_unknown_fingerprint_is_one_line_and_exit_1(tmp_path: Path) -> None:
    server = ServerProcess.create(tmp_path)  # the command needs the config, not the server
    done = server.cli("device", "revoke", "alice@example.org", "0123456789abcdef")
    assert (done.returncode, done.stdout) == (1, "")
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("clientid-mta: ") and "0123456789abcdef" in line, line
