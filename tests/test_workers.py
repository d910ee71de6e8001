"""Issue 5 point 4: ``[server] workers = N`` processes share the ports and the state.

Real twistd servers (tests/serverproc.py) with two processes: connections reach both
(each worker writes its own log lines where twistd logs to stdout, issue 16),
failure budgets are one budget whatever process a session lands on, mail a worker
accepts for another domain is relayed by the process that owns the queue, and a
SIGKILLed server leaves no worker behind holding its ports.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import pytest

from clientid_mta.config import ConfigError, load_config
from clientid_mta.server.workerpool import twistd_logs_to_stdout
from tests.serverproc import (
    ServerProcess,
    child_processes,
    command_line,
    port_is_free,
    running,
)
from tests.sink import running_sink, wait_until

WORKERS = "[server]\nworkers = 2\n"
DEVICE = "9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b"


def sessions_served(server: ServerProcess, count: int) -> None:
    for n in range(count):
        client = server.smtp()
        client.login("alice@example.org", "alice-password")
        client.sendmail(
            "alice@example.org", ["bob@example.org"], f"Subject: w{n}\r\n\r\nhi\r\n".encode()
        )
        client.quit()


def accepted_by(output: str) -> tuple[int, int]:
    """(messages accepted by the twistd process, by worker 1)."""
    # The same line whether the worker wrote it or the parent relayed it (fail2ban reads it).
    relayed = r"\[clientid_mta\.server\.workerpool#info\] worker 1: accepted [0-9A-F]{16} "
    worker = len(re.findall(relayed, output))
    main = len(re.findall(r"\[clientid_mta\.smtp\.protocol#info\] accepted [0-9A-F]{16} ", output))
    return main, worker


def served_by_both(server: ServerProcess) -> tuple[int, int]:
    """Once both processes run, sessions until each has accepted a message (bounded):
    (messages accepted by the twistd process, by worker 1)."""
    server.wait_for_output(r"2 processes serve the ports", timeout=10)
    wait_until(lambda: "worker 1: clientid-mta" in server.output() or None, 10, "worker 1")
    deadline = time.monotonic() + 30
    while min(accepted_by(server.output())) == 0 and time.monotonic() < deadline:
        sessions_served(server, 5)
    return accepted_by(server.output())


def test_workers_both_processes_serve_the_ports(tmp_path: Path) -> None:
    with running(tmp_path / "server", WORKERS) as server:
        main, worker = served_by_both(server)
        stored = len(server.messages("bob@example.org"))
    assert main > 0 and worker > 0, (main, worker)
    assert stored == main + worker


def test_workers_log_to_a_twistd_log_file_through_the_parent(tmp_path: Path) -> None:
    """With ``--logfile FILE`` (which twistd rotates) the workers' lines are relayed by
    the parent into that file; on stdout (the test above) the workers write them."""
    logfile = tmp_path / "twistd.log"

    def logged() -> str:
        return logfile.read_text(errors="replace") if logfile.exists() else ""

    with running(tmp_path / "server", WORKERS, logfile=logfile) as server:
        wait_until(lambda: "worker 1: clientid-mta" in logged() or None, 10, "worker 1")
        deadline = time.monotonic() + 30
        while accepted_by(logged())[1] == 0 and time.monotonic() < deadline:
            sessions_served(server, 5)
    assert accepted_by(logged())[1] > 0
    assert "worker 1:" not in server.output()  # nothing on stdout: all in the file


@pytest.mark.parametrize(
    ("argv", "direct"),
    [
        (["twistd", "-n", "clientid-mta"], True),
        (["/usr/bin/twistd", "--nodaemon", "--logfile", "-", "clientid-mta"], True),
        (["twistd", "-n", "--logfile=-", "clientid-mta", "--logfile", "x"], True),
        (["twistd", "-n", "--logfile", "/var/log/mta.log", "clientid-mta"], False),
        (["twistd", "-n", "-l/var/log/mta.log", "clientid-mta"], False),
        (["twistd", "-n", "--syslog", "clientid-mta"], False),
        (["twistd", "-n", "--logger", "my.observer", "clientid-mta"], False),
        (["twistd", "-n", "--logger=my.observer", "clientid-mta"], False),
        (["twistd", "clientid-mta"], False),  # daemonised: stdout is not the log
        (["python", "embedder.py"], False),
        ([], False),
    ],
)
def test_workers_write_their_own_lines_only_where_twistd_logs_to_stdout(
    argv: list[str], direct: bool
) -> None:
    assert twistd_logs_to_stdout(argv) is direct


def wrong_password(server: ServerProcess, n: int) -> int:
    """One fresh connection (the kernel picks the process), CLIENTID, a wrong AUTH (another
    wrong password each time: the same one repeated counts once)."""
    client = server.smtp()
    assert client.docmd("CLIENTID", f"UUID {DEVICE}")[0] == 250
    response = base64.b64encode(f"\0alice@example.org\0wrong-{n}".encode()).decode()
    code = client.docmd("AUTH", f"PLAIN {response}")[0]
    client.close()
    return code


def test_workers_share_one_failure_budget_per_device(tmp_path: Path) -> None:
    """A device no account trusts spends its network's budget: with a burst of 3, 3
    refusals in all, not 3 per process."""
    config = WORKERS + "[throttle]\nnetwork_burst = 3\nnetwork_refill = 3600\n"
    with running(tmp_path / "server", config) as server:
        wait_until(lambda: "worker 1: clientid-mta" in server.output() or None, 10, "worker 1")
        codes = [wrong_password(server, n) for n in range(12)]
        output = server.output()
    assert codes[:3] == [535, 535, 535], codes
    assert set(codes[3:]) == {454}, codes
    main_refusals = len(re.findall(r"\[clientid_mta\.auth\.checker#info\] auth refused", output))
    worker_refusals = len(re.findall(r"worker 1: auth refused", output))
    assert main_refusals + worker_refusals == 3


def test_workers_sigkill_leaves_no_worker_holding_the_ports(tmp_path: Path) -> None:
    with running(tmp_path / "server", WORKERS) as server:
        wait_until(lambda: "worker 1: clientid-mta" in server.output() or None, 10, "worker 1")
        server.kill()
        wait_until(
            lambda: (port_is_free(server.port) and port_is_free(server.tls_port)) or None,
            10,
            "the ports to be released by every process",
        )
        server.start()
        sessions_served(server, 2)
        assert len(server.messages("bob@example.org")) == 2


@pytest.mark.parametrize("logfile", [False, True])
def test_a_stop_lets_each_worker_stop_itself_before_the_parent_ends(
    tmp_path: Path, logfile: bool
) -> None:
    """SIGTERM to twistd reaches the workers, which drain and stop, and the parent ends
    after them: it used to end at once and the kernel SIGKILLed the workers with it (a
    worker's last log lines, relayed through the parent, could be lost)."""
    log = tmp_path / "twistd.log" if logfile else None
    with running(tmp_path / "server", WORKERS, logfile=log) as server:
        wait_until(lambda: "worker 1: clientid-mta" in read(server, log) or None, 10, "worker 1")
        sessions_served(server, 2)
        server.stop()
        assert server.process is not None  # twistd ends by its signal, as it should
        assert server.process.returncode == -signal.SIGTERM
    output = read(server, log)
    worker_end = output.find("worker 1: Main loop terminated.")
    assert worker_end != -1, output
    assert worker_end < output.find("Server Shut Down."), output


def read(server: ServerProcess, logfile: Path | None) -> str:
    """The server's log: its log file, or its standard output."""
    return logfile.read_text(errors="replace") if logfile and logfile.exists() else server.output()


def test_workers_mail_for_other_domains_is_relayed_once_by_the_queue_owner(
    tmp_path: Path,
) -> None:
    with running_sink(tmp_path, tls="none") as sink:
        relay = f'[relay]\nsmarthost = "127.0.0.1:{sink.port}"\ntls = "opportunistic"\n'
        with running(tmp_path / "server", WORKERS + relay) as server:
            wait_until(lambda: "worker 1: clientid-mta" in server.output() or None, 10, "w1")
            for n in range(10):
                client = server.smtp()
                client.login("alice@example.org", "alice-password")
                message = f"Subject: r{n}\r\nMessage-ID: <r{n}@example.org>\r\n\r\nhi\r\n"
                client.sendmail("alice@example.org", [f"carol{n}@example.net"], message.encode())
                client.quit()
            sink.wait_for(10, timeout=20)
            # A marker relayed after the ten: no copy of them went out again before it.
            client = server.smtp()
            client.login("alice@example.org", "alice-password")
            client.sendmail("alice@example.org", ["marker@example.net"], b"Subject: m\r\n\r\nm\r\n")
            client.quit()
            messages = sink.wait_for(11, timeout=20)
            output = server.output()
    assert messages[-1].rcpt_to == ["marker@example.net"]
    assert sorted(m.rcpt_to[0] for m in messages[:-1]) == sorted(
        f"carol{n}@example.net" for n in range(10)
    )
    assert "worker 1: queue resumed" not in output  # the worker never ran the queue
    assert "queue resumed" in output


HELPER = "clientid_mta.delivery.store_helper"


def children(pid: int, module: str) -> list[int]:
    """The child processes of ``pid`` running ``python -m module``."""
    return [c for c in child_processes(pid) if module.encode() in command_line(c)]


@pytest.mark.parametrize(("workers", "processes"), [(1, 1), (2, 2)])
def test_workers_count_is_the_number_of_processes(
    tmp_path: Path, workers: int, processes: int
) -> None:
    toml = f"[server]\nworkers = {workers}\n[delivery]\nstore_process = true\n"
    with running(tmp_path / "server", toml) as server:
        sessions_served(server, 1)
        assert server.process is not None
        if workers > 1:  # logged once every worker is spawned; with one, there is no pool
            server.wait_for_output(rf"{workers} processes serve the ports", timeout=10)
        workers_seen = children(server.process.pid, "clientid_mta.server.worker")
        assert len(workers_seen) == processes - 1
        for each in [server.process.pid, *workers_seen]:  # one Maildir store process each

            def store_process(each: int = each) -> list[int] | None:
                return children(each, HELPER) or None

            helpers = wait_until(store_process, 10, f"{each}'s store process")
            assert len(helpers) == 1


def test_workers_reject_a_negative_count(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nworkers = -1\n")
    with pytest.raises(ConfigError, match=r"\[server\] workers"):
        load_config(path)


def test_a_sighup_before_the_worker_can_reload_does_not_end_it() -> None:
    """The parent passes SIGHUP on to every worker; one still starting used to die of it
    (SIGHUP's default action), seen twice in a soak."""
    code = (
        "import os, signal\n"
        "from clientid_mta.server import worker\n"
        "worker.ignore_early_reloads()\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "print('alive')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout.strip()) == (0, "alive"), result.stderr


def test_a_worker_whose_parent_is_gone_before_it_starts_ends_at_once(tmp_path: Path) -> None:
    """A worker spawned just as its parent stopped used to find itself adopted, read the
    adopter's pid as its parent's and serve on with nobody to stop it (seen: a worker of
    a finished test still running ten minutes later). The parent's pid is passed in."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clientid_mta.server.worker",
            "--number",
            "1",
            "--parent",
            gone.stdout.strip(),
            "--config",
            str(tmp_path / "never-read.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr


def test_json_lines_of_a_worker_pass_through_and_anything_else_is_wrapped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``[log] format = "json"`` the parent writes a worker's JSON line exactly as
    the worker made it (its time, namespace, level and fields); a line that is no such
    object (a traceback on the worker's stderr, a line cut at 64 KiB) still becomes one
    JSON object of the parent's, with ``worker`` and ``line``."""
    from types import SimpleNamespace

    from twisted.logger import ILogObserver, Logger, LogLevel

    from clientid_mta.observe.logs import event_as_json
    from clientid_mta.server import workerpool

    events: list[dict[str, object]] = []
    relaying = Logger(
        namespace="clientid_mta.server.workerpool",
        observer=cast(ILogObserver, events.append),  # any callable of an event will do
    )
    monkeypatch.setattr(workerpool, "log", relaying)
    process = workerpool.WorkerProcess(SimpleNamespace(json_logs=True), 3)  # type: ignore[arg-type]
    own = (
        '{"time": "2026-12-04T19:00:00.000Z", "level": "warn", "namespace": '
        '"clientid_mta.auth.checker", "text": "auth refused client=192.0.2.1", '
        '"client": "192.0.2.1", "worker": 3}'
    )
    process.outReceived(own.encode() + b"\nTraceback (most recent")
    process.errReceived(b" call last):\n")
    assert [event["log_level"] for event in events] == [LogLevel.warn, LogLevel.info]
    assert event_as_json(events[0]) == own + "\n"
    wrapped = json.loads(event_as_json(events[1]))
    assert wrapped["namespace"] == "clientid_mta.server.workerpool"
    assert wrapped["text"] == "worker 3: Traceback (most recent call last):"
    assert (wrapped["worker"], wrapped["line"]) == (3, "Traceback (most recent call last):")


def test_a_worker_that_finds_a_broken_tls_key_says_so_in_one_line(tmp_path: Path) -> None:
    """A worker reads the TLS files again when it starts, which under load can be after
    an admin wrote a broken key: one config sentence and exit 1, not a traceback."""
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[tls]\ncertificate = "{tmp_path / "cert.pem"}"\nkey = "{tmp_path / "key.pem"}"\n'
    )
    done = subprocess.run(
        [
            *(sys.executable, "-m", "clientid_mta.server.worker", "--number", "1"),
            *("--config", str(config), "--parent", str(os.getpid())),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "config error: [tls]" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
