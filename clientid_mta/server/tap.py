"""twistd glue: ``twistd -n clientid-mta [--config FILE]``."""

from __future__ import annotations

import os
from pathlib import Path
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


def state_files(config: Config) -> list[Path]:
    """What the server creates under its data folder on first start."""
    store = config.clientid.device_store
    tls = config.generated_tls_dir
    queue = config.queue_config.directory
    return [
        config.server.data_dir,
        config.clientid.key_file,
        store,
        store.with_name(store.name + "-wal"),
        store.with_name(store.name + "-shm"),
        tls,
        tls / "cert.pem",
        tls / "key.pem",
        queue,
        *(queue / name for name in ("tmp", "msg", "env", "corrupt", "control", "lock")),
    ]


def hand_over_state(config: Config, uid: int | None, gid: int | None) -> None:
    """Started as root with --uid/--gid: give the state we just created to that user.

    twistd builds the service before it drops privileges, so without this the key,
    the device store and the generated certificate would belong to root.
    """
    if os.getuid() != 0 or (uid is None and gid is None):
        return
    for path in state_files(config):
        if path.exists():
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)


def makeService(options: Options) -> Any:
    from clientid_mta.server.service import build_service

    try:
        service = build_service(options.loaded)
    except ConfigError as problem:
        raise SystemExit(f"clientid-mta: {problem}") from None
    service.exit_on_listen_error = True
    count = options.loaded.server.worker_count
    if count > 1:
        from clientid_mta.server.workerpool import WorkerPool

        service.share_state()
        pool = WorkerPool(options.loaded, service.listening, count)
        pool.setServiceParent(service)
        service.reload_hooks.append(pool.reload)
    parent = getattr(options, "parent", None) or {}
    hand_over_state(options.loaded, parent.get("uid"), parent.get("gid"))
    return service
