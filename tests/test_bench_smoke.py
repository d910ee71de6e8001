"""The side-by-side benchmark, tiny (issue 5): ``bench/compare.py --smoke``, our server only.

One run per test module (about 20-30 s): workload (a) with 3 concurrent sessions of 2
messages, 2 sessions per slot; (b) 3 concurrent one-message sessions, 2 per slot; (c) 6
idle logged-in sessions; 3 accounts, each logging in first (with one message in (a) and
(b): once, or 4 times per server process when the server runs several). The benchmark
checks the exact code of every reply and counts anything else as an error; these tests
check that there were none, that the counts are the ones asked for, and that the
recipient's Maildir holds exactly the messages that got 250. Speed is never asserted.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
USERS, SLOTS, ROUNDS, MESSAGES, CHURN_SLOTS, IDLE = 3, 3, 2, 2, 3, 6
SESSIONS = {"a": SLOTS * ROUNDS, "b": CHURN_SLOTS * ROUNDS, "c": IDLE}
# (a): each slot's first session is shorter (``MailSpec.first_session``): 2, 2 and 1.
STAGGERED = sum(slot * MESSAGES // SLOTS for slot in range(SLOTS))
MEASURED_MESSAGES = {
    "a": SLOTS * ROUNDS * MESSAGES - STAGGERED,
    "b": CHURN_SLOTS * ROUNDS,
    "c": 0,
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bench-smoke")
    figures = root / "figures.json"
    argv = [
        sys.executable,
        str(ROOT / "bench" / "compare.py"),
        "--smoke",
        *("--users", str(USERS), "--sessions", str(SLOTS), "--messages", str(MESSAGES)),
        *("--rounds", str(ROUNDS), "--churn-sessions", str(CHURN_SLOTS), "--idle", str(IDLE)),
        *("--processes", "1", "--work-dir", str(root / "work"), "--output-dir", str(root / "out")),
        *("--json", str(figures)),
        *("--rate", "500"),  # (a) paced: the path that compares peers at one throughput
    ]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {run["workload"]: run for run in json.loads(figures.read_text())}
    return {"root": root, "runs": runs, "stdout": done.stdout}


def maildir_count(root: Path, workload: str) -> int:
    new = root / "work" / f"ours-{workload}" / "data" / "mail" / "example.org" / "bob" / "new"
    return sum(1 for _ in new.iterdir()) if new.is_dir() else 0


def test_bench_smoke_runs_ours_in_every_workload(smoke: dict[str, Any]) -> None:
    runs = smoke["runs"]
    assert sorted(runs) == ["a", "b", "c"]
    assert all(run["peer"] == "ours" and run["ok"] for run in runs.values()), runs


@pytest.mark.parametrize("workload", ["a", "b", "c"])
def test_bench_smoke_every_reply_was_right(smoke: dict[str, Any], workload: str) -> None:
    run = smoke["runs"][workload]
    assert run["errors"] == {}
    assert run["warmup_errors"] == {}
    assert run["log_problems"] == []
    assert run["sessions"] == SESSIONS[workload]
    assert run["clientid_sessions"] == SESSIONS[workload]  # ours offers CLIENTID: always sent


@pytest.mark.parametrize("workload", ["a", "b"])
def test_bench_smoke_every_250_is_one_message_in_the_maildir(
    smoke: dict[str, Any], workload: str
) -> None:
    run = smoke["runs"][workload]
    warm_up = run["warmup_messages"]
    assert warm_up >= USERS and warm_up % USERS == 0  # every account, the same number of times
    expected = warm_up + MEASURED_MESSAGES[workload]
    assert run["messages"] == MEASURED_MESSAGES[workload]
    assert run["accepted"] == expected
    assert maildir_count(smoke["root"], workload) == expected
    assert run["delivered"] == expected


def test_bench_smoke_idle_sessions_were_held_and_quit(smoke: dict[str, Any]) -> None:
    run = smoke["runs"]["c"]
    assert run["idle_opened"] == IDLE
    assert run["idle_quit_ok"] == IDLE
    assert run["warmup_messages"] == 0
    assert maildir_count(smoke["root"], "c") == 0


def test_bench_smoke_writes_the_table_and_chart(smoke: dict[str, Any]) -> None:
    out = smoke["root"] / "out"
    table = (out / "compare.md").read_text()
    assert "### (a) sustained" in table and "### Targets" in table
    assert "| ours |" in table
    assert "None: every reply was the expected one." in table
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert table.strip() in smoke["stdout"]


def test_the_first_sessions_of_the_slots_are_spread_so_logins_do_not_come_in_bursts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    workloads = importlib.import_module("workloads")
    spec = workloads.MailSpec(None, (None,) * 50, "bob@example.org", 20, 4096, 1.0, stagger=True)
    firsts = [spec.first_session(slot) for slot in range(50)]
    assert firsts[0] == 20 and firsts[-1] == 1
    assert firsts == sorted(firsts, reverse=True)
    assert set(range(1, 21)) == set(firsts)  # every length from 20 down to 1
    in_step = workloads.MailSpec(None, (None,) * 50, "bob@example.org", 20, 4096, 1.0)
    assert {in_step.first_session(slot) for slot in range(50)} == {20}


def test_the_pacer_spaces_message_starts_and_gives_no_burst_to_a_slow_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    workloads = importlib.import_module("workloads")
    now, slept = [100.0], []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    pacer = workloads.Pacer(10.0, clock=lambda: now[0], sleep=sleep)

    async def turns(count: int) -> None:
        for _ in range(count):
            await pacer.turn()

    asyncio.run(turns(3))
    assert slept == [0.1, 0.1]  # the first at once, then 1/rate apart
    now[0] += 5.0  # the server kept the sessions waiting: no catching up afterwards
    asyncio.run(turns(2))
    assert slept == [0.1, 0.1, 0.1]
    unpaced = workloads.Pacer(None, clock=lambda: now[0], sleep=sleep)
    asyncio.run(unpaced.turn())
    assert len(slept) == 3
