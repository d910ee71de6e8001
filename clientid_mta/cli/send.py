"""``clientid-mta send``: the message on standard input, through a submission server.

The password comes from ``--password-file`` or ``CLIENTID_MTA_PASSWORD`` (never from the
command line), the client identity from ``--client-id`` or ``CLIENTID_MTA_CLIENT_ID``.
One line per recipient on standard output; the exit status says what happened.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from clientid_mta.client import ConnectionFailed, RecipientResult, send_message
from clientid_mta.client.api import valid_client_id

EX_TEMPFAIL = 75


class _UsageError(Exception):
    pass


def _send_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clientid-mta send",
        description="Send the message on standard input through a submission server. The "
        "password comes from --password-file or CLIENTID_MTA_PASSWORD, the client identity "
        "from --client-id or CLIENTID_MTA_CLIENT_ID. Exit status: 0 delivered to all, 1 a "
        "recipient was refused for good, 75 try again later, 2 usage error.",
    )
    parser.add_argument("--host", required=True, help="the submission server")
    parser.add_argument("--port", type=int, default=587, help="default 587")
    parser.add_argument(
        "--tls",
        choices=("starttls", "implicit"),
        help="default starttls; implicit when --port is 465",
    )
    parser.add_argument("--tls-hostname", help="the name the certificate must have (--host)")
    parser.add_argument("--ca-file", type=Path, help="PEM trust roots (default: the system's)")
    parser.add_argument("--user", help="log in (AUTH) as this account")
    parser.add_argument("--password-file", type=Path, help="its first line is the password")
    parser.add_argument("--client-id", metavar="TYPE:TOKEN", help="sent as CLIENTID")
    parser.add_argument("--helo", default="localhost", help="the EHLO name (localhost)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per reply (300)")
    parser.add_argument("--from", dest="sender", required=True, metavar="ADDR")
    parser.add_argument("recipients", nargs="+", metavar="RECIPIENT")
    return parser


def _password(args: argparse.Namespace) -> str | None:
    if args.password_file is not None:
        if args.user is None:
            raise _UsageError("--password-file needs --user")
        try:
            lines = args.password_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as problem:
            raise _UsageError(f"cannot read --password-file: {problem}") from None
        if not lines or not lines[0]:
            raise _UsageError(f"--password-file {args.password_file} is empty")
        return lines[0]
    if args.user is None:
        return None
    password = os.environ.get("CLIENTID_MTA_PASSWORD")
    if not password:
        raise _UsageError("--user needs --password-file or CLIENTID_MTA_PASSWORD")
    return password


def _client_id(args: argparse.Namespace) -> tuple[str, str] | None:
    text = (
        args.client_id if args.client_id is not None else os.environ.get("CLIENTID_MTA_CLIENT_ID")
    )
    if not text:
        return None
    client_type, _, token = text.partition(":")
    if not valid_client_id(client_type, token):
        raise _UsageError(
            "the client id must be TYPE:TOKEN (type 1-16 of A-Z a-z 0-9 -, "
            "token 1-128 printable characters)"
        )
    return client_type, token


def exit_status(results: Sequence[RecipientResult]) -> int:
    """0 when all were delivered, 1 when one was refused for good, else 75 (EX_TEMPFAIL)."""
    if all(r.delivered for r in results):
        return 0
    return 1 if any(r.permanent for r in results) else EX_TEMPFAIL


def send_command(
    argv: list[str],
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``clientid-mta send``: runs the reactor; prints "<addr>: <code> <text>" per recipient."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = _send_parser().parse_args(argv)
    except SystemExit as stop:  # argparse has printed the usage (or the help)
        return 0 if stop.code in (0, None) else 2
    try:
        password, client_id = _password(args), _client_id(args)
    except _UsageError as problem:
        print(f"clientid-mta send: {problem}", file=err)
        return 2
    tls = args.tls or ("implicit" if args.port == 465 else "starttls")
    message = (stdin or sys.stdin.buffer).read()
    status = [2]

    def show(results: list[RecipientResult]) -> None:
        for r in results:
            print(f"{r.address}: {r.code} {r.text}", file=out)
        status[0] = exit_status(results)

    def trouble(failure: Failure) -> None:
        print(f"clientid-mta send: {failure.getErrorMessage()}", file=err)
        status[0] = EX_TEMPFAIL if failure.check(ConnectionFailed) else 2

    def main(reactor: Any) -> Deferred[None]:
        sending = send_message(
            args.host,
            args.port,
            args.sender,
            args.recipients,
            message,
            tls=tls,
            tls_hostname=args.tls_hostname,
            trust_roots=args.ca_file,
            username=args.user,
            password=password,
            client_id=client_id,
            helo=args.helo,
            timeout=args.timeout,
            reactor=reactor,
        )
        return sending.addCallbacks(show, trouble)

    try:
        task.react(main)
    except SystemExit as stop:
        if stop.code not in (0, None):
            return int(stop.code) if isinstance(stop.code, int) else 1
    return status[0]
