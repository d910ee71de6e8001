"""Fault soak, the short version (issue 6, point 6); the long one is ``bench/fault_soak.py``.

One soak per test run (a module fixture, about half a minute): sender threads do TLS,
CLIENTID, AUTH and messages with unique Message-IDs against a twistd server while, in turn,
the Maildir's disk is full, bob's Maildir is read-only, the server is killed with SIGKILL
and restarted, it gets SIGHUP reloads, and another process holds the device store's write
lock past the server's busy timeout. With the server stopped, every Maildir file is read.

Each test checks one fault's share of that run: every message that got 250 is in a
Maildir exactly once and whole, refusals are the temporary ones (``451 4.3.0`` for the
Maildir, ``454 4.7.0`` at AUTH for the store), never a 5xx or a dropped connection (no
reply only in sessions the server was killed in), and the server recovered by itself
once the fault was removed. Faults the sandbox cannot create (mounts need root) are
skipped with the reason.
"""

from __future__ import annotations

import random

import pytest

from bench.fault_soak import (
    AFTER,
    BASELINE,
    FULL_DISK,
    READ_ONLY,
    SIGHUP,
    SIGKILL,
    STORE_BUSY_TIMEOUT,
    STORE_LOCK,
    Plan,
    Report,
    Row,
    run_soak,
)

KILLS, RELOADS = 2, 4
STEPS = (
    (FULL_DISK, 1.5),
    (READ_ONLY, 1.5),
    (SIGKILL, KILLS),
    (SIGHUP, RELOADS),
    (STORE_LOCK, STORE_BUSY_TIMEOUT + 1),  # one AUTH can wait out the busy timeout: 454
)


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> Report:
    root = tmp_path_factory.mktemp("soak")
    plan = Plan(root, STEPS, baseline=0.3, tail=0.3, settle=0.3, seed=random.randrange(1 << 16))
    return run_soak(plan)


def problems_of(report: Report, *labels: str) -> list[str]:
    return [p for p in report.problems if p.startswith(tuple(f"[{label}]" for label in labels))]


def fault_row(report: Report, fault: str) -> Row:
    """The fault's row, after checking it had no problem; skips a fault not made here."""
    skipped = [f.skipped for f in report.faults if f.label == fault and f.skipped]
    if skipped:
        pytest.skip(f"{fault} cannot be created here: {skipped[0]}")
    assert problems_of(report, fault) == [], report.text()
    (row,) = [r for r in report.rows if r.label == fault]
    assert (row.lost, row.duplicates, row.permanent) == (0, 0, 0), report.text()
    assert row.accepted > 0 and row.recovery not in ("-", "**never**"), report.text()
    return row


@pytest.mark.parametrize("fault", [FULL_DISK, READ_ONLY], ids=["full-disk", "read-only"])
def test_S11_maildir_fault_gives_451_and_recovers(soak: Report, fault: str) -> None:
    row = fault_row(soak, fault)
    assert row.temporary > 0 and row.no_reply == 0, soak.text()  # felt, as 451 4.3.0 only


def test_S11_sigkill_and_restart_lose_no_acknowledged_message(soak: Report) -> None:
    fault_row(soak, SIGKILL)
    (run,) = [f for f in soak.faults if f.kind == SIGKILL]
    assert len(run.recoveries) == len(run.down) == KILLS, soak.text()


def test_S11_sighup_reloads_keep_sessions_and_mail_going(soak: Report) -> None:
    row = fault_row(soak, SIGHUP)
    assert (row.temporary, row.no_reply, row.auth_454) == (0, 0, 0), soak.text()


def test_S4_locked_device_store_gives_454_or_waits_and_recovers(soak: Report) -> None:
    row = fault_row(soak, STORE_LOCK)
    assert (row.temporary, row.no_reply) == (0, 0), soak.text()
    # The lock was felt: an AUTH got 454, or waited for the lock (a password check: < 5 s).
    assert row.auth_454 > 0 or row.slowest_auth > STORE_BUSY_TIMEOUT / 2, soak.text()


def test_S11_soak_keeps_every_250_once_and_whole_and_logs_no_traceback(soak: Report) -> None:
    unlabelled = [p for p in soak.problems if not p.startswith("[")]
    assert unlabelled + problems_of(soak, BASELINE, AFTER) == [], soak.text()
    assert soak.stored.damaged == soak.stored.unknown == [], soak.text()
    assert sum(soak.stored.copies.values()) >= soak.totals["accepted"] > 0, soak.text()
    assert [(r.label, r.lost, r.duplicates) for r in soak.rows if r.lost or r.duplicates] == []
    assert not soak.log_tracebacks, soak.text()
