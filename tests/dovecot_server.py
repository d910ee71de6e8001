"""A private Dovecot 2.3 for tests: its own base_dir, config, log file and free ports.

``DovecotServer`` writes a configuration under a temporary folder and runs
``/usr/sbin/dovecot -F -c <conf>`` as a child process: IMAP and LMTP on free
127.0.0.1 ports, LMTP and the auth-client socket as unix sockets in its base_dir, two
passdbs (our passwd file, and a file of its own for users that exist only in Dovecot),
a static userdb over ``mail_location = maildir:<root>/%d/%n`` (the layout we write).
It can be stopped and started again on the same ports and sockets, which is how the
tests take Dovecot away and bring it back. Where Dovecot is not installed the fixture
skips with a reason (CI installs it).
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.serverproc import accepts, child_processes, free_ports
from tests.sink import wait_until

DOVECOT = Path("/usr/sbin/dovecot")
START_TIMEOUT = 20.0

CONFIG = """\
# A private test instance: nothing here touches the system's Dovecot.
instance_name = {instance}
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
debug_log_path = {base}/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Each request in the log (passwords hidden): the tests read what Dovecot was sent.
auth_debug = yes
auth_cache_size = {auth_cache_size}
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = 0
first_valid_gid = 0
mail_location = maildir:{mail_root}/%d/%n
mail_uid = {mail_uid}
mail_gid = {mail_gid}
lmtp_rcpt_check_quota = no
# Delivered-To: the recipient as our server gave it (what Sieve tests see)
lmtp_hdr_delivery_address = original
deliver_log_format = msgid=%m to_envelope=%{{to_envelope}}: %$
login_log_format_elements = user=<%u> method=%m rip=%r lip=%l mpid=%e %c session=<%{{session}}>
auth_verbose_passwords = no
passdb {{
  driver = passwd-file
  args = username_format=%Lu {passwd}
}}
passdb {{
  driver = passwd-file
  args = username_format=%Lu {only_dovecot}
}}
{userdb}
service auth-worker {{
  user = root
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
# The test's folders belong to root, mode 0700: auth reads the passwd files as root.
service auth {{
  user = root
  unix_listener auth-client {{
    mode = 0666
  }}
  inet_listener auth-tcp {{
    address = 127.0.0.1
    port = {auth_port}
  }}
}}
"""

STATIC_USERDB = """\
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={mail_root}/%d/%n
}}"""

# The seven-field passwd file serves as userdb too (uid, gid, home from its fields).
PASSWD_USERDB = """\
userdb {{
  driver = passwd-file
  args = username_format=%Lu {passwd}
  default_fields = uid={mail_uid} gid={mail_gid} home={mail_root}/%d/%n
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={mail_root}/%d/%n
}}"""


def _alive(pid: int) -> bool:
    """Still running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _true_or_none(condition: bool) -> bool | None:
    """``wait_until`` waits while its probe returns None."""
    return True if condition else None


def _user(name: str, fallback: str) -> str:
    """A system user Dovecot may run its internal or login processes as."""
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return fallback
    return name


def _mail_ids() -> tuple[int, int]:
    """Who owns the mail: ourselves, unless we are root (Dovecot refuses uid 0 for
    mail): then Debian's ``mail`` user."""
    import pwd

    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    entry = pwd.getpwnam("mail")
    return entry.pw_uid, entry.pw_gid


def _group(name: str, fallback: str) -> str:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return fallback
    return name


@dataclass
class DovecotServer:
    """One private Dovecot; ``start``/``stop`` may be called again and again."""

    root: Path
    passwd: Path
    passwd_userdb: bool = False
    auth_cache_size: str = "0"  # Dovecot's own cache of passdb answers
    imap_port: int = 0
    lmtp_port: int = 0
    auth_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "state").mkdir(exist_ok=True)
        self.only_dovecot.touch()
        self.passwd.touch()
        # Dovecot never accesses mail as root: the mail folders belong to the mail user,
        # and the folders above them must let it through.
        self.root.chmod(0o711)
        self.mail_root.mkdir(exist_ok=True)
        os.chown(self.mail_root, *_mail_ids())
        self.imap_port, self.lmtp_port, self.auth_port = free_ports(3)
        self.config_path.write_text(self._config())

    @property
    def mail_root(self) -> Path:
        return self.root / "mail"

    @property
    def base_dir(self) -> Path:
        return self.root / "run"

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def only_dovecot(self) -> Path:
        """The passdb of users we do not know: they exist only in Dovecot."""
        return self.root / "dovecot-users"

    @property
    def auth_socket(self) -> Path:
        return self.base_dir / "auth-client"

    @property
    def lmtp_socket(self) -> Path:
        return self.base_dir / "lmtp"

    def _config(self) -> str:
        values = {
            "instance": f"cmta-test-{self.imap_port}",
            "base": self.root,
            "mail_root": self.mail_root,
            "passwd": self.passwd,
            "only_dovecot": self.only_dovecot,
            "internal_user": _user("dovecot", "root"),
            "internal_group": _group("dovecot", "root"),
            "login_user": _user("dovenull", "nobody"),
            "mail_uid": _mail_ids()[0],
            "mail_gid": _mail_ids()[1],
            "imap_port": self.imap_port,
            "lmtp_port": self.lmtp_port,
            "auth_port": self.auth_port,
            "auth_cache_size": self.auth_cache_size,
        }
        userdb = (PASSWD_USERDB if self.passwd_userdb else STATIC_USERDB).format(**values)
        return CONFIG.format(userdb=userdb, **values)

    def add_user(self, address: str, password: str) -> None:
        """A user of Dovecot's own passdb (not in our passwd file)."""
        with self.only_dovecot.open("a") as users:
            users.write(f"{address}:{{PLAIN}}{password}\n")

    def auth_answers(self) -> bool:
        """Dovecot's auth service completes the handshake on the auth-client socket:
        started, not just listening (a socket file can outlive a stopped Dovecot)."""
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(2)
                client.connect(str(self.auth_socket))
                client.sendall(b"VERSION\t1\t2\nCPID\t1\n")
                received = b""
                while b"DONE\n" not in received:
                    chunk = client.recv(4096)
                    if not chunk:
                        return False
                    received += chunk
                return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(DOVECOT), "-F", "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=(self.root / "dovecot.stderr").open("ab"),
        )
        try:
            wait_until(
                lambda: _true_or_none(
                    self.lmtp_socket.exists()
                    and accepts(self.imap_port)
                    and accepts(self.lmtp_port)
                    and self.auth_answers()
                ),
                START_TIMEOUT,
                "dovecot to listen",
            )
        except BaseException:
            problem = (self.root / "dovecot.stderr").read_text(errors="replace")
            self.stop()
            raise AssertionError(f"dovecot did not start: {problem}\n{self.log()}") from None

    def stop(self) -> None:
        """SIGTERM, and wait until the master and its sockets are gone."""
        process, self.process = self.process, None
        if process is None:
            return
        # As systemd stops it (KillMode=control-group): the master and every process
        # it forked. Dovecot's auth process otherwise keeps serving the connections it
        # has until their clients go, so a "stopped" Dovecot would still answer.
        children = child_processes(process.pid)  # Dovecot's master forks its services
        for pid in [process.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            process.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        wait_until(
            lambda: _true_or_none(not any(_alive(pid) for pid in children)),
            START_TIMEOUT,
            "dovecot's processes to end",
        )

    def imap(self, user: str, password: str) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10)
        client.login(user, password)
        return client

    def imap_messages(self, user: str, password: str) -> list[bytes]:
        """Every message of the user's INBOX, as Dovecot reads it."""
        client = self.imap(user, password)
        try:
            client.select("INBOX", readonly=True)
            _status, found = client.search(None, "ALL")
            messages: list[bytes] = []
            for number in found[0].split():
                _status, parts = client.fetch(number, "(RFC822)")
                envelope = parts[0]
                assert isinstance(envelope, tuple)  # (b"1 (RFC822 {size}", message)
                messages.append(envelope[1])
            return messages
        finally:
            client.logout()


def dovecot_missing() -> str | None:
    """Why a private Dovecot cannot run here, or None."""
    if not DOVECOT.exists() or shutil.which("doveconf") is None:
        return "Dovecot is not installed (apt-get install dovecot-core dovecot-imapd dovecot-lmtpd)"
    return None


MakeDovecot = Callable[..., DovecotServer]


def dovecot_servers() -> Iterator[MakeDovecot]:
    """The ``make_dovecot`` fixture (a test module declares it with
    ``make_dovecot = pytest.fixture(name="make_dovecot")(dovecot_servers)``):
    ``make_dovecot(passwd, passwd_userdb=False)`` is a started private Dovecot, in a
    folder of its own under /tmp (pytest's are private to the test's user, and Dovecot
    reads mail as another user), removed afterwards."""
    reason = dovecot_missing()
    if reason is not None:
        pytest.skip(reason)
    started: list[DovecotServer] = []

    def make(passwd: Path, passwd_userdb: bool = False) -> DovecotServer:
        root = Path(tempfile.mkdtemp(prefix="cmta-dovecot-"))
        server = DovecotServer(root, passwd, passwd_userdb)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
