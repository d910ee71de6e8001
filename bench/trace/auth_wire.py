"""Where AUTH's time goes, from the client's send to its reading of the 235 (issue 16).

Joins the moments the server wrote (``bench/trace/``: ``$CLIENTID_TRACE.auth.<pid>.json``)
with those the load generator wrote (``bench/steps/``: ``$CLIENTID_STEPS/auth.<pid>.json``).
Both use the system's monotonic clock, so one machine's processes can be compared. Run the
benchmark with both (``bench/wire/`` loads the two):

    CLIENTID_TRACE=/tmp/trace CLIENTID_STEPS=/tmp/steps PYTHONPATH=$PWD/bench/wire \\
        python bench/compare.py --peers ours --workloads a --rate 350 --duration 15
    python bench/trace/auth_wire.py /tmp/trace /tmp/steps

An AUTH is joined on the client's port and the server's read falling between the
client's send and its reply. Only the logins the server decided at once are counted
(the warm-up's first logins, which hash the password in a thread, are left out). Each
segment is printed with its p50 / p90 / p99 / mean:

- ``to the server's turn``: from the send to the end of the epoll call of the server
  turn that read it: the kernel, the server finishing its previous turn, and its
  reactor thread winning the GIL back after epoll;
- ``ahead in the server's turn``: other events handled first in that turn;
- ``server: read to login``: the socket read, TLS, the line parsed;
- ``server: login``: the login until the 235 is written;
- ``to the client's turn``: from the 235 written to the end of the epoll call of the
  client's turn that read it: the kernel and the client's own loop being busy;
- ``ahead in the client's turn``: the client's other events handled first;
- ``client: read to parsed``: TLS, the reply parsed, the coroutine woken.
"""

from __future__ import annotations

import bisect
import itertools
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

SEGMENTS = (
    "to the server's turn",
    "ahead in the server's turn",
    "server: read to login",
    "server: login",
    "to the client's turn",
    "ahead in the client's turn",
    "client: read to parsed",
    "whole (client's send to parsed)",
)


def join(server: list[list[float]], client: list[list[float]]) -> list[list[float]]:
    """Each client AUTH's segments (ms), where one server AUTH of its port fits in it."""
    by_port: defaultdict[float, list[list[float]]] = defaultdict(list)
    for moments in server:
        by_port[moments[0]].append(moments)
    reads: dict[float, list[float]] = {}  # each port's server reads, in order
    for port, same_port in by_port.items():
        same_port.sort(key=lambda m: m[2])
        reads[port] = [m[2] for m in same_port]
    joined = []
    for port, sent, client_polled, client_read, parsed in client:
        candidates = by_port.get(port, [])
        at = bisect.bisect_left(reads.get(port, []), sent)
        if at == len(candidates) or not sent <= candidates[at][2] <= client_read:
            continue
        _port, polled, read, login, written, quick = candidates[at]
        if not quick:
            continue
        points = (sent, polled, read, login, written, client_polled, client_read, parsed)
        joined.append([(b - a) * 1000 for a, b in itertools.pairwise(points)])
        joined[-1].append((parsed - sent) * 1000)
    return joined


def main(trace: str, steps: str) -> None:
    trace_path = Path(trace)
    server = []
    for path in trace_path.parent.glob(f"{trace_path.name}.auth.*.json"):
        server.extend(json.loads(path.read_text()))
    client = []
    for path in Path(steps).glob("auth.*.json"):
        client.extend(json.loads(path.read_text()))
    joined = join(server, client)
    print(f"{len(joined)} of {len(client)} client AUTHs joined ({len(server)} seen by the server)")
    if not joined:
        return
    print(f"{'segment':34} {'p50':>7} {'p90':>7} {'p99':>7} {'mean':>7}  (ms)")
    for index, name in enumerate(SEGMENTS):
        values = sorted(row[index] for row in joined)
        p50, p90 = values[len(values) // 2], values[int(len(values) * 0.9)]
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        mean = statistics.fmean(values)
        print(f"{name:34} {p50:7.2f} {p90:7.2f} {p99:7.2f} {mean:7.2f}")
    slow = [
        row for row in joined if row[-1] >= sorted(r[-1] for r in joined)[int(len(joined) * 0.9)]
    ]
    print(f"\nthe slowest 10% ({len(slow)}), mean of each segment:")
    for index, name in enumerate(SEGMENTS):
        print(f"{name:34} {statistics.fmean(row[index] for row in slow):7.2f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
