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


def makeService(options: Options) -> Any:
    from clientid_mta.service import build_service

    try:
        return build_service(options.loaded)
    except ConfigError as problem:
        raise SystemExit(f"clientid-mta: {problem}") from None
