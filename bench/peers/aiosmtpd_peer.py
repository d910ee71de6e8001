"""aiosmtpd as a submission server, the Python peer of the side-by-side benchmark.

A standalone server (bench/compare.py starts it as a subprocess) that does what ours
does on the benchmark's path, as plainly as aiosmtpd allows:

- STARTTLS required before MAIL and AUTH (``require_starttls``, ``auth_require_tls``),
  with the benchmark's certificate and key;
- AUTH PLAIN against our passwd file (argon2id hashes), checked with
  ``clientid_mta.auth.passwd_file.verify_password`` in a pool of 4 threads (as our server's
  login pool), so a password check never blocks the event loop;
- ``CLIENTID type token``: advertised after STARTTLS and answered 250 when it has two
  arguments, before AUTH. No device policy is applied (aiosmtpd has none): the
  command is there so that both servers see the same commands;
- MAIL FROM must be the login (as our server's S6); RCPT TO must be an account;
- DATA: a ``Received:`` header, line ends turned to LF, and the Maildir write of ours:
  ``tmp/``, fsync, rename into ``new/``, fsync ``new/``, in a thread; 250 after that.

``--cache-ttl S`` keeps verified (account, hash, password) triples for S seconds (a
keyed hash, as our server's auth cache). compare.py turns it on only for the idle
workload, where 5,000 logins would otherwise take minutes of argon2id before the
memory can be measured; the other workloads run without it.

    python bench/peers/aiosmtpd_peer.py --port 2587 --certificate cert.pem --key key.pem \\
        --passwd passwd --maildir-root mail --hostname mail.example.org

Prints ``ready <port>`` once it listens; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import email.utils
import hashlib
import hmac
import itertools
import os
import secrets
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from clientid_mta.auth.passwd_file import PasswdFile, normalise_address, verify_password
from clientid_mta.delivery.durable import fsync_dir

AUTH_THREADS = 4
MAX_MESSAGE_SIZE = 26214400
_ids = itertools.count()


class AuthCache:
    """Verified (account, stored hash, password) triples, as keyed hashes, for ``ttl`` s."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._secret = secrets.token_bytes(32)
        self._entries: dict[bytes, float] = {}

    def _key(self, account: str, stored: str, password: str) -> bytes:
        message = f"{account}\0{stored}\0{password}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def hit(self, account: str, stored: str, password: str) -> bool:
        expires = self._entries.get(self._key(account, stored, password))
        return expires is not None and expires > time.monotonic()

    def add(self, account: str, stored: str, password: str) -> None:
        self._entries[self._key(account, stored, password)] = time.monotonic() + self.ttl


def deliver(maildir: Path, data: bytes) -> None:
    """Write one message durably: tmp/, fsync, rename into new/, fsync new/."""
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    name = f"{time.time():.6f}.P{os.getpid()}Q{next(_ids)}R{secrets.token_hex(8)}.aiosmtpd"
    temp = maildir / "tmp" / name
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    final = maildir / "new" / f"{name},S={len(data)}"
    os.rename(temp, final)
    fsync_dir(final.parent)


class Submission(SMTP):
    """aiosmtpd's SMTP session plus the CLIENTID command (syntax only, before AUTH)."""

    @syntax("CLIENTID type token")
    async def smtp_CLIENTID(self, arg: str) -> None:
        assert self.session is not None
        parts = arg.split() if arg else []
        if not self._tls_protocol:
            await self.push("500 5.5.1 Command unrecognized")
        elif self.session.authenticated:
            await self.push("503 5.5.1 CLIENTID must come before AUTH")
        elif len(parts) != 2:
            await self.push("501 5.5.4 Syntax: CLIENTID type token")
        else:
            self.session.clientid = tuple(parts)  # type: ignore[attr-defined]
            await self.push("250 2.0.0 OK")


class MaildirHandler:
    def __init__(
        self,
        passwd: PasswdFile,
        maildir_root: Path,
        hostname: str,
        cache: AuthCache | None,
    ) -> None:
        self.passwd = passwd
        self.maildir_root = maildir_root
        self.hostname = hostname
        self.cache = cache
        # (no attribute may start with auth_: aiosmtpd would take it for a SASL mechanism)
        self.login_pool = concurrent.futures.ThreadPoolExecutor(AUTH_THREADS, "login")
        self.mail_pool = concurrent.futures.ThreadPoolExecutor(10, "maildir")

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if server._tls_protocol is not None:
            responses.insert(len(responses) - 1, "250-CLIENTID")
        return responses

    def _check(self, address: str, password: str) -> bool:
        account = self.passwd.get(address)
        stored = account.password_hash if account else None
        if self.cache is not None and stored and self.cache.hit(address, stored, password):
            return True
        ok = verify_password(stored, password)
        if ok and self.cache is not None and stored:
            self.cache.add(address, stored, password)
        return ok

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) != 2:
            await server.push("501 5.5.4 Send AUTH PLAIN with an initial response")
            return AuthResult(success=False, handled=True)
        try:
            _authz, login, password = base64.b64decode(args[1], validate=True).split(b"\0")
            address = normalise_address(login.decode("utf-8"))
            secret = password.decode("utf-8")
        except (binascii.Error, ValueError):
            await server.push("501 5.5.2 Malformed authentication response")
            return AuthResult(success=False, handled=True)
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self.login_pool, self._check, address, secret)
        if not ok:
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=LoginPassword(address.encode(), b""))

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        login = (session.login_data or b"").decode()
        if normalise_address(address) != login:
            return "553 5.7.1 Sender address rejected: not owned by you"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.passwd.get(address) is None:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    def _store(self, session: Session, envelope: Envelope, ssl_object: Any) -> str:
        message_id = secrets.token_hex(6)
        version = ssl_object.version() if ssl_object is not None else "none"
        received = (
            f"Received: from {session.host_name}\n\tby {self.hostname} with ESMTPSA ({version})\n"
            f"\tid {message_id};\n\t{email.utils.formatdate()}\n"
        ).encode()
        content = envelope.original_content or b""
        data = received + content.replace(b"\r\n", b"\n")
        for recipient in envelope.rcpt_tos:
            local, _, domain = normalise_address(recipient).partition("@")
            deliver(self.maildir_root / domain / local, data)
        return message_id

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        loop = asyncio.get_running_loop()
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
        try:
            message_id = await loop.run_in_executor(
                self.mail_pool, self._store, session, envelope, ssl_object
            )
        except OSError:
            return "451 4.3.0 Local error in processing, try again later"
        return f"250 2.0.0 Ok: queued as {message_id}"


def tls_context(certificate: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, key)
    return context


async def serve(options: argparse.Namespace) -> None:
    handler = MaildirHandler(
        PasswdFile(Path(options.passwd)),
        Path(options.maildir_root),
        options.hostname,
        AuthCache(options.cache_ttl) if options.cache_ttl > 0 else None,
    )
    context = tls_context(Path(options.certificate), Path(options.key))

    def session() -> Submission:
        return Submission(
            handler,
            hostname=options.hostname,
            ident="ESMTP",
            tls_context=context,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN"],
            decode_data=False,
            data_size_limit=MAX_MESSAGE_SIZE,
            enable_SMTPUTF8=False,
            timeout=300,
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(session, "127.0.0.1", options.port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"ready {options.port}", flush=True)
    await stop.wait()
    server.close()
    handler.login_pool.shutdown(wait=False, cancel_futures=True)
    handler.mail_pool.shutdown(wait=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certificate", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--passwd", required=True, help="our passwd file (argon2id hashes)")
    parser.add_argument("--maildir-root", required=True, help="<root>/<domain>/<local>/")
    parser.add_argument("--hostname", default="mail.example.org")
    parser.add_argument("--cache-ttl", type=float, default=0.0, help="0: no auth cache")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
