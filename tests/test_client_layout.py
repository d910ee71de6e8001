"""The client's layout: the package exports its public names from ``api`` and
``results``, and ``clientid-mta send`` is dispatched to ``clientid_mta.cli.send``."""

from __future__ import annotations

import io

import pytest

import clientid_mta
import clientid_mta.cli.send
from clientid_mta import client
from clientid_mta.cli import admin
from clientid_mta.client import api, results


def test_the_package_exports_the_api_and_its_results() -> None:
    homes = {"Transaction": api, "send_message": api, "send_messages": api, "sendmail": api}
    homes |= {"ConnectionFailed": results, "RecipientResult": results, "SendFailed": results}
    assert sorted(client.__all__) == sorted(homes)
    for name, home in homes.items():
        assert getattr(client, name) is getattr(home, name), name
    # clientid_mta's lazy public names are the same objects (all but Transaction)
    for name in set(clientid_mta.__all__) & set(homes):
        assert getattr(clientid_mta, name) is homes[name].__dict__[name], name
    assert set(homes) - set(clientid_mta.__all__) == {"Transaction"}


def test_clientid_mta_send_runs_the_send_command_with_the_rest_of_the_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[list[str]] = []

    def send_command(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setattr(clientid_mta.cli.send, "send_command", send_command)
    argv = ["send", "--host", "mail.example.org", "--from", "a@example.org", "b@example.org"]
    assert admin.run(argv, io.StringIO(), io.StringIO()) == 7
    assert seen == [argv[1:]]


def test_clientid_mta_send_usage_error_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CLIENTID_MTA_PASSWORD", raising=False)
    argv = ["send", "--host", "h", "--from", "a@b", "--user", "a@b", "b@c"]
    assert admin.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "clientid-mta send: --user needs --password-file or CLIENTID_MTA_PASSWORD"
    )
