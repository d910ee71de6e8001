"""The interop matrix (README, "Mail programs that work with it"): real clients against
the twistd server, over both ports (STARTTLS on the submission port, implicit TLS on
the submissions port) and both AUTH mechanisms, each message read back from the Maildir.

Only ``clientid_mta.client`` (and Thunderbird, in ``test_thunderbird_real.py``) sends
CLIENTID; the others log in with the password alone, which the default
``allow_without_clientid = true`` lets through and which records no device. Our client
uses AUTH PLAIN whenever it is offered (LOGIN only without PLAIN:
``tests/test_client.py::test_S4_auth_login_when_plain_is_not_offered``).
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.serverproc import ADMIN, USERS, ServerProcess, devices, fingerprint_of, running, submit
from tests.test_twistd import SWAKS, message, stored_subject_and_body

(ALICE, ALICE_PW), (BOB, _) = USERS
OUR_UUID = str(uuid.uuid4())
CURL, MSMTP = shutil.which("curl") or "/usr/bin/curl", shutil.which("msmtp") or "/usr/bin/msmtp"
STARTTLS, IMPLICIT_TLS = "starttls", "implicit_tls"
PLAIN, LOGIN = "plain", "login"

# A client: (server, implicit TLS?, mechanism, subject, a scratch folder) -> its output.
Client = Callable[[ServerProcess, bool, str, str, Path], str]


@pytest.fixture(scope="module")
def interop_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running(tmp_path_factory.mktemp("interop-server")) as server:
        yield server


def run(argv: list[str], stdin: bytes = b"") -> str:
    """Run a client to completion; its output, or a failure that shows it."""
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=60, check=False)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"{argv[0]} exited with {done.returncode}:\n{output}"
    return output


def with_smtplib(
    server: ServerProcess, implicit: bool, mechanism: str, subject: str, _: Path
) -> str:
    client = server.smtp(implicit=implicit)
    client.user, client.password = ALICE, ALICE_PW
    authenticate = client.auth_plain if mechanism == PLAIN else client.auth_login
    assert client.auth(mechanism.upper(), authenticate)[0] == 235
    submit(client, ALICE, BOB, message(subject, "Sent by smtplib."))
    client.quit()
    return ""


def with_swaks(server: ServerProcess, implicit: bool, mechanism: str, subject: str, _: Path) -> str:
    argv = [str(SWAKS), "--server", f"127.0.0.1:{port(server, implicit)}", "--timeout", "20"]
    argv += ["--tlsc" if implicit else "--tls", "--auth", mechanism.upper()]
    argv += ["--auth-user", ALICE, "--auth-password", ALICE_PW, "--from", ALICE, "--to", BOB]
    argv += ["--header", f"Subject: {subject}", "--body", "Sent by swaks."]
    output = run(argv)
    assert "~> CLIENTID" not in output
    return output


def with_curl(
    server: ServerProcess, implicit: bool, mechanism: str, subject: str, tmp: Path
) -> str:
    """``smtps://`` for implicit TLS, ``smtp://`` with ``--ssl-reqd`` for STARTTLS."""
    url = f"smtps://127.0.0.1:{server.tls_port}" if implicit else f"smtp://127.0.0.1:{server.port}"
    argv = [CURL, "--silent", "--show-error", "--verbose", "--max-time", "20", "--url", url]
    argv += [] if implicit else ["--ssl-reqd"]
    argv += ["--cacert", str(server.cafile), "--user", f"{ALICE}:{ALICE_PW}"]
    argv += ["--login-options", f"AUTH={mechanism.upper()}", "--mail-from", ALICE]
    argv += ["--mail-rcpt", BOB, "--upload-file", "-"]
    output = run(argv, message(subject, "Sent by curl."))
    assert f"> AUTH {mechanism.upper()}" in output, output  # the mechanism asked for
    assert "> CLIENTID" not in output
    return output


def with_msmtp(
    server: ServerProcess, implicit: bool, mechanism: str, subject: str, tmp: Path
) -> str:
    """A config file as a user writes it; the certificate through ``tls_trust_file``."""
    config = tmp / "msmtprc"
    config.write_text(
        "account default\n"
        f"host 127.0.0.1\nport {port(server, implicit)}\n"
        f"tls on\ntls_starttls {'off' if implicit else 'on'}\n"
        f"tls_trust_file {server.cafile}\n"
        f"auth {mechanism}\nuser {ALICE}\npassword {ALICE_PW}\nfrom {ALICE}\n"
    )
    config.chmod(0o600)  # msmtp refuses a password file others can read
    output = run([MSMTP, "--debug", "-C", str(config), BOB], message(subject, "Sent by msmtp."))
    assert f"--> AUTH {mechanism.upper()}" in output, output
    assert "--> CLIENTID" not in output
    return output


def with_our_client(
    server: ServerProcess, implicit: bool, mechanism: str, subject: str, tmp: Path
) -> str:
    """``clientid-mta send`` (``clientid_mta.client``), which sends CLIENTID."""
    password = tmp / "password"
    password.write_text(ALICE_PW + "\n")
    argv = [str(ADMIN), "send", "--host", "127.0.0.1", "--port", str(port(server, implicit))]
    argv += ["--tls", "implicit" if implicit else "starttls", "--ca-file", str(server.cafile)]
    argv += ["--user", ALICE, "--password-file", str(password)]
    argv += ["--client-id", f"UUID:{OUR_UUID}", "--from", ALICE, BOB]
    return run(argv, message(subject, "Sent by clientid_mta.client."))


def port(server: ServerProcess, implicit: bool) -> int:
    return server.tls_port if implicit else server.port


CLIENTS: dict[str, tuple[Client, str | None]] = {
    # name: (how to send, the program it needs)
    "smtplib": (with_smtplib, None),
    "swaks": (with_swaks, str(SWAKS)),
    "curl": (with_curl, CURL),
    "msmtp": (with_msmtp, MSMTP),
    "clientid_mta": (with_our_client, None),
}
CASES = [
    pytest.param(name, tls, mechanism, id=f"{name}-{tls}-{mechanism}")
    for name in CLIENTS
    for tls in (STARTTLS, IMPLICIT_TLS)
    for mechanism in (PLAIN, LOGIN)
    if not (name == "clientid_mta" and mechanism == LOGIN)  # PLAIN whenever offered
]


@pytest.mark.parametrize(("name", "tls", "mechanism"), CASES)
def test_interop_client_delivers(
    interop_server: ServerProcess, tmp_path: Path, name: str, tls: str, mechanism: str
) -> None:
    send, program = CLIENTS[name]
    if program is not None and shutil.which(program) is None:
        pytest.skip(f"{program} is not installed (Debian package {name}; CI installs it)")
    subject = f"{name} over {tls} with AUTH {mechanism} {uuid.uuid4()}"
    before = devices(interop_server.admin("device", "list", ALICE)).keys()
    send(interop_server, tls == IMPLICIT_TLS, mechanism, subject, tmp_path)

    body = f"Sent by {'clientid_mta.client' if name == 'clientid_mta' else name}."
    assert (subject, body) in stored_subject_and_body(interop_server, BOB)
    after = devices(interop_server.admin("device", "list", ALICE))
    ours = fingerprint_of(interop_server, f"UUID {OUR_UUID}")
    if name == "clientid_mta":  # CLIENTID sent: its device, the account's first, trusted
        assert after[ours][1] == "trusted", after
    else:  # no CLIENTID: no device recorded
        assert after.keys() == before, after
