"""Our server as a subprocess for benchmarks: ``twistd -n clientid-mta`` on loopback.

``running_server()`` makes a temporary folder with a generated config (free
127.0.0.1 ports, policy tofu), starts twistd from the same venv as this Python,
waits until both listeners greet, and always stops it again. ``BenchServer`` reads
the server's CPU time from /proc and runs the admin command.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
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

from smtpload import Target

from clientid_mta.config import Config, load_config

HOSTNAME = "mail.example.org"
DOMAIN = "example.org"
START_TIMEOUT = 30.0  # seconds for twistd to listen
STOP_TIMEOUT = 15.0  # seconds for a graceful stop before SIGKILL
ADMIN_TIMEOUT = 30.0
PROBLEM_MARKERS = ("Traceback", "Unhandled Error", "internal error", "CRITICAL")

CONFIG_TEMPLATE = """\
[server]
hostname = "{hostname}"
data_dir = "data"
{server_extra}

[listen]
submission = "tcp:{submission}:interface=127.0.0.1"
submissions = "tcp:{submissions}:interface=127.0.0.1"

[delivery]
local_domains = ["{domain}"]

[clientid]
policy = "tofu"
"""

VENV_BIN = Path(sys.executable).parent  # twistd and clientid-mta of this Python's venv
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _end_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; field 3 is fields[0]
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / clock_ticks()


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / clock_ticks()


@dataclass
class BenchServer:
    root: Path
    config: Config
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def cafile(self) -> Path:
        return Path(self.config.generated_tls_dir) / "cert.pem"

    @property
    def submission_port(self) -> int:
        return int(self.config.listen.submission.split(":")[1])

    @property
    def submissions_port(self) -> int:
        return int(self.config.listen.submissions.split(":")[1])

    def target(self, implicit_tls: bool = True, timeout: float = 10.0) -> Target:
        return Target(
            host="127.0.0.1",
            port=self.submissions_port if implicit_tls else self.submission_port,
            implicit_tls=implicit_tls,
            cafile=str(self.cafile),
            server_hostname=HOSTNAME,
            timeout=timeout,
        )

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def admin(self, *argv: str, stdin: str = "") -> str:
        """Run the ``clientid-mta`` admin command against this server's config."""
        done = subprocess.run(
            [str(VENV_BIN / "clientid-mta"), "--config", str(self.config.source), *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=ADMIN_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"clientid-mta {' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def add_user(self, address: str, password: str) -> None:
        self.admin("user", "add", address, stdin=password + "\n")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_problems(self) -> list[str]:
        """Lines of the server log that show an error (read it after ``stop``)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if any(m in line for m in PROBLEM_MARKERS)]

    def _greets(self, port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                return port == self.submissions_port or sock.recv(4).startswith(b"220")
        except OSError:
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not (self._greets(self.submission_port) and self._greets(self.submissions_port)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; its log ends:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (twistd stops gracefully, saving state), SIGKILL if it hangs."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)


def write_config(root: Path, extra_toml: str = "", server_toml: str = "") -> Path:
    """The config file; ``server_toml`` is lines for the ``[server]`` table."""
    path = root / "clientid-mta.toml"
    text = CONFIG_TEMPLATE.format(
        hostname=HOSTNAME,
        domain=DOMAIN,
        submission=free_port(),
        submissions=free_port(),
        server_extra=server_toml,
    )
    path.write_text(merge_tables(text, without_sending_limit(extra_toml)))
    return path


def merge_tables(base: str, extra: str) -> str:
    """``base`` with ``extra`` added: the keys of a table ``base`` already has go into it
    (TOML forbids a second ``[delivery]``), other tables at the end."""
    merged, tail = "\n" + base, []
    for chunk in re.split(r"(?m)^(?=\[)", extra):
        header, _, body = chunk.partition("\n")
        line = f"\n{header}\n"
        if header.startswith("[") and line in merged:
            merged = merged.replace(line, line + body, 1)
        else:
            tail.append(chunk)
    return merged[1:] + "".join(tail)


SENDING_LIMIT_OFF = "max_messages_per_hour = 0\nmax_recipients_per_hour = 0\n"


def without_sending_limit(extra_toml: str) -> str:
    """A benchmark sends thousands of messages an hour from a few accounts: the hourly
    sending limit goes off, in the ``[limits]`` table ``extra_toml`` may already have."""
    return merge_tables(extra_toml, "\n[limits]\n" + SENDING_LIMIT_OFF)


@contextlib.contextmanager
def running_server(
    extra_toml: str = "",
    keep: bool = False,
    twistd_options: Sequence[str] = (),
    root: Path | None = None,
    server_toml: str = "",
) -> Iterator[BenchServer]:
    """A started server in a fresh temporary folder; stopped (and the folder removed) after.

    ``extra_toml`` is appended to the generated config and ``server_toml`` goes into its
    ``[server]`` table; ``twistd_options`` go before the plugin name (e.g.
    ``--profile=FILE --profiler=cprofile --savestats``). With ``root`` the server lives in
    that (new or empty) folder instead, which is kept afterwards.
    """
    given = root is not None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="clientid-bench-"))
    server: BenchServer | None = None
    try:
        config = load_config(write_config(root, extra_toml, server_toml))
        assert config.source is not None
        with open(root / "server.log", "wb") as log:
            process = subprocess.Popen(
                [
                    str(VENV_BIN / "twistd"),
                    "-n",
                    "--pidfile=",
                    *twistd_options,
                    "clientid-mta",
                    "--config",
                    str(config.source),
                ],
                cwd=root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_end_with_parent,
            )
        server = BenchServer(root, config, process)
        server.wait_ready()
        yield server
    finally:
        if server is not None:
            server.stop()
        if keep and not given:
            print(f"kept the server folder: {root}", file=sys.stderr)
        elif not given:
            shutil.rmtree(root, ignore_errors=True)


def log_summary(problems: list[str]) -> str:
    """The report's line about the server log: the count, and the first 20 lines if any."""
    shown = ":\n\n```\n" + "\n".join(problems[:20]) + "\n```" if problems else "."
    return f"Server log: {len(problems)} error line(s){shown}"


def code_version() -> str:
    """The repository's commit, and whether the server's code differs from it."""
    repo = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "clientid_mta")
    return f"commit {commit}" + (", clientid_mta/ with uncommitted changes" if changed else "")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
