"""The Maildir store process: ``python -m clientid_mta.delivery.store_helper <maildir root>``.

Started by ``store_process.StoreProcess``, one per server process. It reads requests on
standard input, stores each message with ``MaildirRoot.deliver_bytes`` (the same
durable write as the threads: written, fsynced, renamed into ``new/``, folder fsynced)
in a few threads of its own, and answers each with one line on standard output once it
is durable, or with the error.

- request: a JSON line ``{"id": N, "size": S, "domain": D, "localpart": L}``, then S bytes;
- answer: ``{"id": N, "path": P}``, or ``{"id": N, "error": E, "errno": X}``, with
  ``"unsafe": true`` for a mailbox name that cannot be a folder.

It ignores SIGINT and SIGTERM (a Ctrl-C or systemd's stop reaches the whole group) and
ends when standard input closes: the server closes it after its last store, and the
kernel closes it when the server dies.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from clientid_mta.delivery.maildir import MaildirRoot, UnsafeMailboxName

THREADS = 8  # concurrent fsyncs: the file system commits them together
MAX_HEADER = 64 * 1024  # a request's JSON line; longer is not from our server


def read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    """``size`` bytes, or None if the stream ends first."""
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Answers:
    """Writes one whole answer line at a time (the store threads share standard output)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.lock = threading.Lock()

    def send(self, answer: dict[str, Any]) -> None:
        line = json.dumps(answer).encode() + b"\n"
        with self.lock:
            self.out.write(line)
            self.out.flush()


def store_one(
    maildirs: MaildirRoot, answers: Answers, request: dict[str, Any], data: bytes
) -> None:
    number = request["id"]
    try:
        path = maildirs.deliver_bytes(request["domain"], request["localpart"], data)
    except UnsafeMailboxName as problem:
        answers.send({"id": number, "error": str(problem), "unsafe": True})
    except OSError as problem:
        answers.send(
            {"id": number, "error": problem.strerror or str(problem), "errno": problem.errno or 0}
        )
    except Exception as problem:  # answered, never a store that hangs its session
        answers.send({"id": number, "error": f"{type(problem).__name__}: {problem}", "errno": 0})
    else:
        answers.send({"id": number, "path": str(path)})


def serve(root: Path, requests: IO[bytes], out: IO[bytes]) -> None:
    maildirs, answers = MaildirRoot(root), Answers(out)
    with ThreadPoolExecutor(THREADS, thread_name_prefix="store") as pool:
        while True:
            head = requests.readline(MAX_HEADER)
            if not head.endswith(b"\n"):
                return  # closed (or not our server's request): the pool finishes what it has
            request = json.loads(head)
            data = read_exactly(requests, int(request["size"]))
            if data is None:
                return
            pool.submit(store_one, maildirs, answers, request, data)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m clientid_mta.delivery.store_helper <maildir root>", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(Path(args[0]), sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
