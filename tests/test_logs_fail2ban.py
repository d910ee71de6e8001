"""Issue 14: one parseable line per refused AUTH, in both log formats, and the shipped
fail2ban filter (run by Debian's ``fail2ban-regex``) matching every refused login of a
real server's log and none of the accepted ones.

A twistd server with its default worker processes (one per CPU), so the log holds lines
of the main process and lines it relays from workers; clients connect from 127.0.0.2,
127.0.0.3 and 127.0.0.4 so each kind of attempt has its own address.
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.serverproc import ServerProcess, auth_plain_code, running

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "clientid-mta.conf"
JAIL = ROOT / "etc" / "fail2ban" / "jail.d" / "clientid-mta.conf"
FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
ALICE, ALICE_PW = "alice@example.org", "alice-password"
# A name typed to fake a second client address and a missing CLIENTID in the line.
FORGED = 'x" client=10.9.9.9 device=- account="y'


def auth_from(server: ServerProcess, source: str, user: str, password: str, clientid: bool) -> int:
    client = smtplib.SMTP(
        "127.0.0.1", server.port, timeout=10, source_address=(source, 0), local_hostname="c.test"
    )
    try:
        client.starttls(context=server.ssl_context())
        client.ehlo()
        if clientid:
            assert client.docmd("CLIENTID", f"UUID {uuid.uuid4()}")[0] == 250
        return auth_plain_code(client, user, password)
    finally:
        client.close()


def produce_log(root: Path, log_format: str, workers: int = 0) -> str:
    """Refused logins from .2 (with CLIENTID) and .3 (none, a forged name), one
    accepted from .4; the server's whole log once it has stopped."""
    logfile = root / "server.log"
    config = f'[log]\nformat = "{log_format}"\n[clientid]\nallow_without_clientid = true\n'
    config += f"[server]\nworkers = {workers}\n"
    with running(root / "server", config, logfile=logfile) as server:
        assert auth_from(server, "127.0.0.2", ALICE, "wrong-1", clientid=True) == 535
        assert auth_from(server, "127.0.0.2", ALICE, "wrong-2", clientid=True) == 535
        assert auth_from(server, "127.0.0.3", FORGED, "wrong-3", clientid=False) == 535
        assert auth_from(server, "127.0.0.3", "nobody@example.org", "x", clientid=False) == 535
        assert auth_from(server, "127.0.0.4", ALICE, ALICE_PW, clientid=True) == 235
        assert auth_from(server, "127.0.0.4", ALICE, ALICE_PW, clientid=False) == 235
    return logfile.read_text()


def fail2ban_matches(log: Path, mode: str = "normal") -> list[str]:
    """The lines ``fail2ban-regex`` matched with the shipped filter in ``mode``."""
    assert FAIL2BAN_REGEX is not None
    done = subprocess.run(
        [FAIL2BAN_REGEX, "-o", "msg", str(log), f"{FILTER}[mode={mode}]"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [line for line in done.stdout.splitlines() if line.strip()]


def client_of(line: str) -> str:
    found = re.search(r"auth \w+ client=(\S+) ", line.replace('\\"', '"'))
    assert found is not None, line
    return found.group(1)


@pytest.mark.skipif(FAIL2BAN_REGEX is None, reason="fail2ban is not installed (Debian: fail2ban)")
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_fail2ban_filter_matches_every_refused_login_and_no_accepted_one(
    tmp_path: Path, log_format: str
) -> None:
    text = produce_log(tmp_path, log_format)
    log = tmp_path / "server.log"
    refused = [line for line in text.splitlines() if "auth refused client=" in line]
    accepted = [line for line in text.splitlines() if "auth accepted client=" in line]
    assert len(refused) == 4 and len(accepted) == 2, text

    matched = fail2ban_matches(log)
    assert sorted(matched) == sorted(refused)
    assert sorted(client_of(line) for line in matched) == ["127.0.0.2"] * 2 + ["127.0.0.3"] * 2

    # Refused logins from clients that sent no CLIENTID only: those from .3.
    without = fail2ban_matches(log, "noclientid")
    assert sorted(client_of(line) for line in without) == ["127.0.0.3"] * 2


@pytest.mark.skipif(FAIL2BAN_REGEX is None, reason="fail2ban is not installed (Debian: fail2ban)")
def test_json_log_is_one_object_per_line_with_the_refusals_fields(tmp_path: Path) -> None:
    text = produce_log(tmp_path, "json", workers=1)  # one process: every line its own
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all({"time", "level", "namespace", "text"} <= set(event) for event in events)
    logins = [e for e in events if e["namespace"] == "clientid_mta.auth.checker"]
    assert [e["outcome"] for e in logins] == ["refused"] * 4 + ["accepted"] * 2
    (forged,) = [e for e in logins if e.get("typed") == json.dumps(FORGED)]
    assert forged["client"] == "127.0.0.3" and forged["fingerprint"] == "-"
    assert forged["refusal"] == "password" and forged["reason"] == "unknown_account"


def test_jail_uses_the_shipped_filter() -> None:
    jail = JAIL.read_text()
    assert re.search(r"^filter\s*=\s*clientid-mta$", jail, re.MULTILINE)
    assert re.search(r"^filter\s*=\s*clientid-mta\[mode=noclientid\]$", jail, re.MULTILINE)


def test_json_log_on_stdout_with_workers_is_json_throughout(tmp_path: Path) -> None:
    """``twistd -n`` logging to stdout: workers would write their own text lines there
    (they do with the text format); with JSON each worker writes its events as JSON
    lines, with their own fields and ``worker``, and the parent passes them on as they
    are: a log shipper sees the same fields whatever process served the login."""
    config = '[log]\nformat = "json"\n[server]\nworkers = 2\n'

    def lines(server: ServerProcess) -> list[str]:
        return [line for line in server.output().splitlines() if line.strip()]

    def worker_refusals(server: ServerProcess) -> list[dict[str, object]]:
        events = (json.loads(line) for line in lines(server) if '"worker": 1' in line)
        return [event for event in events if event.get("outcome") == "refused"]

    with running(tmp_path / "server", config) as server:
        server.wait_for_output(r"2 processes serve the ports", timeout=10)
        deadline = time.monotonic() + 30
        while not worker_refusals(server) and time.monotonic() < deadline:
            assert auth_from(server, "127.0.0.2", ALICE, "wrong", clientid=True) in (535, 454)
    events = [json.loads(line) for line in lines(server)]  # fails on any text line
    assert all({"time", "level", "namespace", "text"} <= set(event) for event in events)
    refusal = worker_refusals(server)[0]
    assert refusal["namespace"] == "clientid_mta.auth.checker" and refusal["level"] == "info"
    assert refusal["client"] == "127.0.0.2" and refusal["typed"] == json.dumps(ALICE)
    assert refusal["reason"] == "bad_password" and refusal["refusal"] == "password"
    assert str(refusal["text"]).startswith("auth refused client=127.0.0.2 ")
