"""What a server costs, read from /proc: its process tree, CPU seconds and memory.

A server may be one process (ours, aiosmtpd) or many (Postfix: a master and its
smtpd, cleanup, qmgr, virtual ... children, which come and go). The figures are
taken over the process tree of the server's root pid:

- CPU: utime + stime of every live process, plus cutime + cstime (the CPU of
  children that ended and were waited for, as the master does for its smtpds). The
  difference of two readings is the tree's CPU in between, even for processes that
  started or ended in between (a child's time moves into its parent's cutime when it
  is waited for).
- memory: VmRSS summed over the tree (what the issue asks for; it counts pages that
  processes share once per process), and Pss from smaps_rollup (shared pages divided
  among the processes that share them: the fair sum for a forking server).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from benchserver import clock_ticks


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after "pid (comm) ": fields[0] is field 3 (state) of proc(5)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue  # ended while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime + cutime + cstime, summed; processes that are gone count 0."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])  # fields 14-17: utime stime cutime cstime
    return ticks / clock_ticks()


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class Memory:
    processes: int
    rss_kib: int
    pss_kib: int
    hwm_kib: int  # the largest VmHWM (peak RSS) of one process in the tree


def tree_memory(pids: Iterable[int], pss: bool = True) -> Memory:
    """VmRSS and (unless ``pss`` is False: it is slower) Pss summed over ``pids``."""
    count = rss = pss_total = hwm = 0
    for pid in pids:
        try:
            rss += _status_kib(pid, "VmRSS")
            hwm = max(hwm, _status_kib(pid, "VmHWM"))
            pss_total += _pss_kib(pid) if pss else 0
            count += 1
        except (OSError, ValueError):
            continue
    return Memory(count, rss, pss_total, hwm)


def reset_peak(pids: Iterable[int]) -> None:
    """Start VmHWM (peak RSS) again from the current RSS (writes /proc/PID/clear_refs)."""
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            continue
