"""A private Postfix instance for the side-by-side benchmark (bench/compare.py).

Debian's package, installed with apt-get when it is missing (``ensure_installed``), run
as its own instance under a temporary folder: ``postfix -c CONFDIR start`` with a
generated main.cf and master.cf. Nothing under /etc/postfix is changed and the
system's own Postfix (if any) is not touched.

What the instance does, to be comparable with our server:

- one submission listener on 127.0.0.1 (a free port): STARTTLS required before
  anything else (``smtpd_tls_security_level = encrypt``, ``smtpd_tls_auth_only``),
  the benchmark's certificate and key;
- SASL PLAIN through Cyrus SASL, ``auxprop`` with a ``sasldb2`` made by ``saslpasswd2 -f``
  (plain-text passwords: no hash to compute, which is the point of workload (b));
- the sender must be the login (``reject_sender_login_mismatch``, as our server's S6);
  a TLS ``Received:`` header like ours;
- mail for the benchmark's domain goes to Maildirs under the folder through the
  ``virtual`` delivery agent. Postfix answers 250 once the queue file is fsynced (its
  default; ``cleanup`` fsyncs before it replies) and delivers to the Maildir after that,
  so a message is written twice (queue, Maildir) where our server writes it once;
- no chroot, logging to ``postfix.log`` in the folder (``maillog_file``), no connection
  limits per client (``smtpd_client_connection_count_limit = 0``), and as many smtpd
  processes as ``process_limit`` (one per concurrent session: that is Postfix's design).

Run it alone to check the setup (one message through swaks):

    python bench/peers/postfix_peer.py
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
if str(BENCH) not in sys.path:  # run as a script
    sys.path.insert(0, str(BENCH))

from benchserver import free_port  # noqa: E402
from procstats import process_tree  # noqa: E402

PACKAGES = ("postfix", "sasl2-bin", "libsasl2-modules")
TOOLS = ("/usr/sbin/postfix", "/usr/sbin/saslpasswd2", "/usr/sbin/postconf")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
INSTALL_TIMEOUT = 600.0
MAILBOX_USER = "nobody"  # owner of the delivered Maildirs (virtual_uid_maps)
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
LOG_PROBLEMS = ("fatal:", "panic:", "error:", "warning:")
# Warnings that say nothing about the benchmark: the clock of a busy virtual machine.
LOG_BENIGN = ("file system clock is", "resetting file time stamps")

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
myhostname = {hostname}
mydomain = {domain}
myorigin = $mydomain
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_banner = $myhostname ESMTP
biff = no
append_dot_mydomain = no
readme_directory = no
smtputf8_enable = no
default_process_limit = {process_limit}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0

virtual_mailbox_domains = {domain}
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = texthash:{config}/mailboxes
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1

smtpd_tls_cert_file = {certificate}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 0
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {config}/sasl
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
smtpd_sender_login_maps = texthash:{config}/senders
smtpd_sender_restrictions = reject_sender_login_mismatch
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
"""

# service type private unpriv chroot wakeup maxproc command: no chroot anywhere.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - {process_limit} smtpd
  -o syslog_name=postfix/submission
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

SASL_CONF = """\
pwcheck_method: auxprop
auxprop_plugin: sasldb
mech_list: PLAIN LOGIN
sasldb_path: {sasldb}
"""


class PostfixUnavailable(Exception):
    """Postfix cannot run here; str() says why, in one sentence."""


def _run(argv: Sequence[str], stdin: str = "", timeout: float = 60.0) -> str:
    done = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines()
        raise PostfixUnavailable(
            f"`{' '.join(argv)}` failed (exit {done.returncode}): "
            + (" / ".join(output[-5:]) or "no output")
        )
    return done.stdout


def installed() -> bool:
    return all(Path(tool).exists() for tool in TOOLS)


def ensure_installed(install: bool = True) -> str:
    """Make sure Debian's postfix, sasl2-bin and libsasl2-modules are there.

    Installs them with apt-get (root only; the debconf answer "No configuration" keeps
    the package from setting up or starting a system-wide Postfix). Returns what was
    done; raises PostfixUnavailable with the reason when it cannot.
    """
    if installed():
        return "already installed"
    if not install:
        raise PostfixUnavailable(
            "Postfix is not installed and --no-install was given; install it with: "
            "apt-get install postfix sasl2-bin libsasl2-modules"
        )
    if os.geteuid() != 0:
        raise PostfixUnavailable(
            "Postfix is not installed and installing it needs root; run as root or install "
            "it first: apt-get install postfix sasl2-bin libsasl2-modules"
        )
    if shutil.which("apt-get") is None:
        raise PostfixUnavailable("Postfix is not installed and there is no apt-get here")
    _run(
        ["debconf-set-selections"],
        stdin="postfix postfix/main_mailer_type select No configuration\n",
    )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    attempt = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT, check=False
    )
    if attempt.returncode != 0:  # perhaps the package lists are missing: update once
        subprocess.run(
            ["apt-get", "update"],
            capture_output=True,
            env=env,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
        attempt = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT, check=False
        )
    if attempt.returncode != 0 or not installed():
        last = (attempt.stderr or attempt.stdout).strip().splitlines()[-3:]
        raise PostfixUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {' / '.join(last)}")
    return "installed with apt-get: " + ", ".join(PACKAGES)


def _ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


@dataclass
class PostfixInstance:
    root: Path
    config_dir: Path
    port: int
    domain: str

    @property
    def log_path(self) -> Path:
        return self.root / "postfix.log"

    @property
    def mail_base(self) -> Path:
        return self.root / "mail"

    def maildir(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.mail_base / domain / local

    def master_pid(self) -> int:
        text = (self.root / "queue" / "pid" / "master.pid").read_text()
        return int(text.split()[0])

    def pids(self) -> list[int]:
        """The master and every process it runs (smtpd, cleanup, qmgr, virtual, ...)."""
        try:
            return process_tree(self.master_pid())
        except (OSError, ValueError):
            return []

    def queued(self) -> int:
        """Messages in the queue (not yet delivered)."""
        total = 0
        for name in QUEUES:
            for _folder, _dirs, files in os.walk(self.root / "queue" / name):
                total += len(files)
        return total

    def postfix(self, *argv: str) -> str:
        return _run(["/usr/sbin/postfix", "-c", str(self.config_dir), *argv])

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no postfix.log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_problems(self) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [
            line
            for line in text.splitlines()
            if any(m in line for m in LOG_PROBLEMS) and not any(b in line for b in LOG_BENIGN)
        ]

    def greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.settimeout(5)
                return sock.recv(4).startswith(b"220")
        except OSError:
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.greets():
            if time.monotonic() > deadline:
                raise PostfixUnavailable(
                    f"the private Postfix did not answer on port {self.port} within "
                    f"{START_TIMEOUT:.0f} s; its log ends:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """``postfix stop``; SIGKILL whatever of the instance is left after a while."""
        pids = self.pids()
        with contextlib.suppress(PostfixUnavailable, subprocess.TimeoutExpired):
            self.postfix("stop")
        deadline = time.monotonic() + STOP_TIMEOUT
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            time.sleep(0.2)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].split()[0] == "Z"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


def configure(
    root: Path,
    *,
    hostname: str,
    domain: str,
    certificate: Path,
    key: Path,
    users: Sequence[tuple[str, str]],
    mailboxes: Sequence[str],
    process_limit: int,
) -> PostfixInstance:
    """Write the instance's configuration, sasldb and folders under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # the postfix user must reach its queue and config below here
    for folder in root.parents:
        if not folder.stat().st_mode & 0o001:
            raise PostfixUnavailable(
                f"the postfix user cannot enter {folder} (mode "
                f"{folder.stat().st_mode & 0o777:04o}); put the instance under a folder "
                "that others may enter"
            )
    (root / "queue").mkdir(exist_ok=True)  # root's; ``postfix check`` makes the rest
    config = root / "config"
    (config / "sasl").mkdir(parents=True, exist_ok=True)
    port = free_port()
    uid, gid = _ids(MAILBOX_USER)
    postfix_uid, postfix_gid = _ids("postfix")
    tls = root / "tls"
    tls.mkdir(exist_ok=True)
    shutil.copy(certificate, tls / "cert.pem")
    shutil.copy(key, tls / "key.pem")
    (tls / "key.pem").chmod(0o600)  # read by smtpd while it is still root
    fields = {
        "root": root,
        "config": config,
        "hostname": hostname,
        "domain": domain,
        "uid": uid,
        "gid": gid,
        "certificate": tls / "cert.pem",
        "key": tls / "key.pem",
        "process_limit": process_limit,
        "port": port,
    }
    _write(config / "main.cf", MAIN_CF.format(**fields))
    _write(config / "master.cf", MASTER_CF.format(**fields))
    sasldb = root / "sasldb2"
    _write(config / "sasl" / "smtpd.conf", SASL_CONF.format(sasldb=sasldb))
    for address, password in users:
        local, _, user_domain = address.partition("@")
        _run(
            ["/usr/sbin/saslpasswd2", "-f", str(sasldb), "-p", "-c", "-u", user_domain, local],
            stdin=password,
        )
    os.chown(sasldb, postfix_uid, postfix_gid)
    sasldb.chmod(0o640)
    _write(config / "senders", "".join(f"{a} {a}\n" for a, _ in users))
    _write(
        config / "mailboxes",
        "".join(f"{m} {m.partition('@')[2]}/{m.partition('@')[0]}/\n" for m in mailboxes),
    )
    mail = root / "mail"
    mail.mkdir(exist_ok=True)
    os.chown(mail, uid, gid)
    for address in mailboxes:  # created now, so that an empty one can be counted
        maildir = mail / address.partition("@")[2] / address.partition("@")[0]
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        for folder in (maildir.parent, maildir, *(maildir / s for s in ("tmp", "new", "cur"))):
            os.chown(folder, uid, gid)
            folder.chmod(0o700)
    return PostfixInstance(root, config, port, domain)


@contextlib.contextmanager
def running_postfix(
    root: Path,
    *,
    hostname: str,
    domain: str,
    certificate: Path,
    key: Path,
    users: Sequence[tuple[str, str]],
    mailboxes: Sequence[str],
    process_limit: int = 100,
) -> Iterator[PostfixInstance]:
    """A started private instance under ``root``; stopped again afterwards.

    Raises PostfixUnavailable (with the reason) when it cannot be set up or started.
    """
    if os.geteuid() != 0:
        raise PostfixUnavailable("a private Postfix instance needs root (master runs as root)")
    instance = configure(
        root,
        hostname=hostname,
        domain=domain,
        certificate=certificate,
        key=key,
        users=users,
        mailboxes=mailboxes,
        process_limit=process_limit,
    )
    try:
        instance.postfix("check")  # creates the queue folders with Postfix's own owners
        instance.postfix("start")
        instance.wait_ready()
        yield instance
    finally:
        instance.stop()


def _self_check() -> int:
    """Install if needed, start an instance, send one message with swaks, stop."""
    print(ensure_installed())
    root = Path(tempfile.mkdtemp(prefix="postfix-peer-"))
    root.chmod(0o755)
    from clientid_mta.smtp.tls import generate_self_signed

    cert, key = generate_self_signed(root / "certs", "mail.example.org")
    user, password, rcpt = "load01@example.org", "load-password", "bob@example.org"
    try:
        with running_postfix(
            root / "postfix",
            hostname="mail.example.org",
            domain="example.org",
            certificate=cert,
            key=key,
            users=[(user, password)],
            mailboxes=[rcpt],
        ) as instance:
            swaks = [
                *("swaks", "--server", f"127.0.0.1:{instance.port}", "--tls", "--auth", "PLAIN"),
                *("--auth-user", user, "--auth-password", password, "--from", user, "--to", rcpt),
                *("--tls-verify", "--tls-ca-path", str(cert)),
            ]
            done = subprocess.run(
                swaks,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            print(done.stdout[-1500:], done.stderr[-500:])
            deadline = time.monotonic() + 10
            while instance.queued() and time.monotonic() < deadline:
                time.sleep(0.2)
            delivered = list((instance.maildir(rcpt) / "new").iterdir())
            print(f"swaks exit {done.returncode}; delivered: {len(delivered)}")
            print(instance.log_tail())
            return 0 if done.returncode == 0 and len(delivered) == 1 else 1
    except PostfixUnavailable as problem:
        print(f"postfix: {problem}")
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(_self_check())
