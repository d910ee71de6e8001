"""``[log] format = "json"``: one JSON object per line, for log shippers.

Each line has ``time`` (ISO 8601, UTC), ``level``, ``namespace`` and ``text`` (the
line the text format would show), then the event's own structured fields as
``twisted.logger`` carries them (``session``, ``client``, ``account``, ``device``,
``reason``, ...); a failure adds ``traceback``. Values JSON cannot hold are given as
their ``str()``.

With worker processes, each worker writes its own events as these lines, with a
``worker`` field, and the main process passes them on unchanged (``RELAYED_LINE``).

twistd chooses its log observer before it asks the plugin for the service, so the
plugin's options name ``twistd_json_observer`` as twistd's ``--logger`` (unless the
admin gave one) and say where twistd would have written (``use_twistd_output``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent
from twisted.python.logfile import LogFile

TWISTD_OBSERVER = "clientid_mta.observe.logs.twistd_json_observer"
_twistd_output: tuple[str, bool] = ("", True)  # twistd's --logfile and --nodaemon
# An event relayed from a worker carries the worker's own JSON line under this key,
# written as it is (its time, namespace and fields are the worker's).
RELAYED_LINE = "log_relayed_json"


def _value(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_value(item) for item in value]
    return str(value)


def event_as_json(event: dict[str, Any]) -> str:
    """One line: the event as a JSON object, newline-terminated."""
    relayed = event.get(RELAYED_LINE)
    if isinstance(relayed, str):
        return relayed + "\n"
    when = datetime.fromtimestamp(event.get("log_time", 0.0), UTC)
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in line and not key.startswith("_"):
            line[key] = _value(value)
    failure = event.get("log_failure")
    if failure is not None:
        line["traceback"] = failure.getTraceback()
    return json.dumps(line, ensure_ascii=False) + "\n"


def worker_json_format(number: int) -> Callable[[dict[str, Any]], str]:
    """A worker's line: its event as JSON, with the worker's number as ``worker``."""

    def line(event: dict[str, Any]) -> str:
        return event_as_json({**event, "worker": number})

    return line


def relayed_json(raw: str) -> dict[str, Any] | None:
    """A worker's JSON line, read back: the object, or None if it is not one of ours
    (a worker's stderr, a cut line)."""
    try:
        event = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("text"), str):
        return None
    return event


def json_observer(output: IO[str]) -> ILogObserver:
    return FileLogObserver(output, event_as_json)


def use_twistd_output(logfile: str, nodaemon: bool) -> None:
    """Remember where twistd was told to log, for ``twistd_json_observer``."""
    global _twistd_output
    _twistd_output = (logfile, nodaemon)


def twistd_json_observer() -> ILogObserver:
    """twistd's ``--logger`` factory: JSON lines where twistd would write its text lines."""
    logfile, nodaemon = _twistd_output
    if logfile == "-" or (nodaemon and not logfile):
        return json_observer(sys.stdout)
    return json_observer(LogFile.fromFullPath(logfile or "twistd.log"))
