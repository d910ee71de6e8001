"""Embedding: the README's example program runs as written, and ``import clientid_mta``
leaves the choice of reactor to the program."""

from __future__ import annotations

import ast
import smtplib
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from clientid_mta.config import load_config
from tests.conftest import merge_toml
from tests.serverproc import cli
from tests.sink import running_sink, wait_until

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    """The Python block of the README's "Embedding in a Twisted program" section."""
    section = (ROOT / "README.md").read_text().split("## Embedding in a Twisted program\n")[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0] + "\n"


class Program:
    """A Python program in a subprocess; its output is collected line by line."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, *argv],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def line_starting(self, prefix: str, timeout: float = 30) -> str:
        def probe() -> str | None:
            if self.process.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"the program ended:\n{self.output()}")
            return next((line for line in self.lines if line.startswith(prefix)), None)

        return wait_until(probe, timeout, f"a line starting {prefix!r}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        status = self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        return status


def test_readme_embedding_example_takes_local_mail_and_relays_the_rest(tmp_path: Path) -> None:
    program = tmp_path / "ticket_desk.py"
    program.write_text(readme_example())
    with running_sink(tmp_path, tls="none") as sink:
        config_path = tmp_path / "clientid-mta.toml"
        relay = f'[relay]\nsmarthost = "127.0.0.1:{sink.port}"\ntls = "opportunistic"\n'
        config_path.write_text(merge_toml(relay))
        added = cli(
            ["--config", str(config_path), "user", "add", "alice@example.org"],
            stdin="alice-password\n",
            cwd=tmp_path,
        )
        assert added.returncode == 0, added.stderr
        config = load_config(config_path)
        desk = Program([str(program), str(config_path)], tmp_path)
        try:
            ports = ast.literal_eval(desk.line_starting("listening ").partition(" ")[2])
            context = ssl.create_default_context(cafile=str(config.generated_tls_dir / "cert.pem"))
            with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=10) as client:
                client.starttls(context=context)
                client.login("alice@example.org", "alice-password")
                message = (
                    b"From: alice@example.org\r\nTo: tickets@example.org, carol@example.net\r\n"
                    b"Subject: Printer on fire\r\nMessage-ID: <t1@example.org>\r\n\r\nHelp.\r\n"
                )
                refused = client.sendmail(
                    "alice@example.org", ["tickets@example.org", "carol@example.net"], message
                )
                assert refused == {}
                with pytest.raises(smtplib.SMTPRecipientsRefused) as nobody:
                    client.sendmail("alice@example.org", ["nobody@example.org"], message)
                assert nobody.value.recipients["nobody@example.org"][0] == 550
            desk.line_starting("ticket for tickets@example.org: Printer on fire")
            [relayed] = sink.wait_for(1, timeout=20)
            assert relayed.rcpt_to == ["carol@example.net"]
            assert b"Subject: Printer on fire" in relayed.data
        finally:
            status = desk.stop()
    output = desk.output()
    assert "Traceback" not in output, output
    assert status == 0, output
    assert not list(config.delivery.maildir_root.glob("*/tickets"))  # not a Maildir delivery


REACTOR_CHOICE = """
import sys

import clientid_mta
import clientid_mta.config

loaded = "twisted.internet.reactor" in sys.modules
print("reactor imported:", loaded, flush=True)

from twisted.internet import asyncioreactor

asyncioreactor.install()

from twisted.internet import defer, endpoints, protocol, task


class Greeting(protocol.Protocol):
    def __init__(self):
        self.line = defer.Deferred()
        self.buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        if b"\\r\\n" in self.buffer and not self.line.called:
            self.line.callback(self.buffer.split(b"\\r\\n")[0].decode())
            self.transport.loseConnection()


async def main(reactor):
    print("reactor:", type(reactor).__name__, flush=True)
    server = clientid_mta.build_service(clientid_mta.load_config(sys.argv[1]), reactor=reactor)
    server.privilegedStartService()
    server.startService()
    ports = await server.listening()
    where = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", ports["submission"].getHost().port)
    greeting = Greeting()
    await endpoints.connectProtocol(where, greeting)
    print("greeting:", await greeting.line, flush=True)
    await server.stopService()


task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


def test_import_leaves_the_reactor_to_the_program(tmp_path: Path) -> None:
    """``import clientid_mta`` (and its config) installs no reactor: a program installs
    asyncioreactor afterwards and runs the server on it."""
    script = tmp_path / "asyncio_server.py"
    script.write_text(REACTOR_CHOICE)
    config = tmp_path / "clientid-mta.toml"
    config.write_text(merge_toml(""))
    done = subprocess.run(
        [sys.executable, str(script), str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert "reactor imported: False" in done.stdout, output
    assert "reactor: AsyncioSelectorReactor" in done.stdout, output
    assert "greeting: 220 mail.example.org " in done.stdout, output
    assert done.returncode == 0, output


def test_public_api_is_exported_lazily() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, clientid_mta; print(sorted(clientid_mta.__all__)); "
            "print('twisted.mail.smtp' in sys.modules); "
            "print(clientid_mta.build_service.__module__, clientid_mta.SendFailed.__name__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names, mail_loaded, found = done.stdout.splitlines()
    assert ast.literal_eval(names) == sorted(
        [
            "load_config",
            "Config",
            "ConfigError",
            "build_service",
            "sendmail",
            "send_message",
            "send_messages",
            "RecipientResult",
            "SendFailed",
            "ConnectionFailed",
        ]
    )
    assert mail_loaded == "False"
    assert found == "clientid_mta.server.service SendFailed"
