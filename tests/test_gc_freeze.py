"""Issue 16: a process that is the server's own (twistd's, a worker's) takes the objects
of its start out of the collector's view once it is ready, so a full collection under
load walks only what sessions made: its 60-80 ms stall of the reactor went away. A
program that embeds the service keeps its collector as it was."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import pytest

from clientid_mta.server.service import SubmissionService
from clientid_mta.server.tap import makeService
from tests.conftest import RunningServer, start_server
from tests.test_observe_units import tap_options


def test_an_embedded_server_leaves_the_collector_alone(server: RunningServer) -> None:
    assert server.service.freeze_at_start is False
    assert gc.get_freeze_count() == 0


def test_the_servers_own_process_freezes_once_ready_before_accepting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: order.append("freeze"))
    real_serve = SubmissionService._serve

    def serve(self: SubmissionService) -> None:
        self.freeze_at_start = True
        for listener in self.listeners:

            def accept(real: Callable[[], None] = listener.serve) -> None:
                order.append("accept")
                real()

            listener.serve = accept  # type: ignore[method-assign]  # to see when it accepts
        real_serve(self)

    monkeypatch.setattr(SubmissionService, "_serve", serve)
    running = start_server(tmp_path / "server")  # returns once it serves
    try:
        assert order[0] == "freeze"
        assert order.count("freeze") == 1
        assert "accept" in order
    finally:
        running.stop()
    assert gc.get_freeze_count() == 0  # the stand-in froze nothing of the test process


def test_twistd_asks_for_it(tmp_path: Path) -> None:
    twistd: dict[str, object] = {"logger": None, "logfile": "", "nodaemon": 1}
    service = makeService(tap_options(tmp_path, "text", twistd))
    assert service.freeze_at_start is True
