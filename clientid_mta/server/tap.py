"""twistd glue: ``twistd -n clientid-mta [--config FILE]``."""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from clientid_mta.config import Config, ConfigError, load_config


class Options(usage.Options):
    optParameters = [
        [
            "config",
            "c",
            None,
            "TOML config file (default: built-in defaults, data in ./clientid-mta-data)",
        ],
    ]

    def postOptions(self) -> None:
        # A configuration mistake ends the start with its one-line explanation.
        try:
            self.loaded: Config = load_config(self["config"])
        except ConfigError as problem:
            raise SystemExit(f"clientid-mta: {problem}") from None
        self._choose_log_format()

    def _choose_log_format(self) -> None:
        """twistd picks its log observer before it makes the service: ``[log] format =
        "json"`` is passed to it as its ``--logger``, unless the admin chose one (or
        syslog) on twistd's command line."""
        twistd = getattr(self, "parent", None)
        if self.loaded.log.format != "json" or twistd is None:
            return
        if twistd.get("logger") or twistd.get("syslog"):
            return
        from clientid_mta.observe.logs import TWISTD_OBSERVER, use_twistd_output

        use_twistd_output(twistd.get("logfile") or "", bool(twistd.get("nodaemon")))
        twistd["logger"] = TWISTD_OBSERVER


def makeService(options: Options) -> Any:
    """The server for twistd: ports bound as the user twistd starts as (root for 587 and
    465), state created and opened only after it switched to ``--uid/--gid``."""
    from twisted.internet import reactor  # twistd has installed the one it was asked for

    from clientid_mta.server.observing import share_metrics
    from clientid_mta.server.service import build_service

    try:
        service = build_service(options.loaded, reactor=reactor)
    except ConfigError as problem:
        raise SystemExit(f"clientid-mta: {problem}") from None
    service.exit_on_start_error = True
    service.freeze_at_start = True
    from clientid_mta.server.systemd import Notifier

    service.systemd = Notifier.from_environment(reactor)  # Type=notify: READY=1 and so on
    from clientid_mta.server.stop_signals import StopOnce

    StopOnce().install(reactor)  # twistd owns the reactor: a second SIGTERM is one line
    count = options.loaded.server.worker_count
    if count > 1:
        from clientid_mta.server.workerpool import WorkerPool

        service.share_state()
        share_metrics(options.loaded)  # before anything imports prometheus_client
        pool = WorkerPool(options.loaded, service.listening, count, reactor)
        pool.setServiceParent(service)
        service.worker_pool = pool
        service.reload_hooks.append(pool.reload)
    return service
