"""clientid-mta: a mail submission server on Twisted with the SMTP CLIENTID extension.

The public API is imported on first use: ``twisted.mail.smtp`` installs the default
reactor when it is imported, and a program must be able to install its own (say,
``asyncioreactor``) after ``import clientid_mta``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "ConnectionFailed",
    "RecipientResult",
    "SendFailed",
    "build_service",
    "load_config",
    "send_message",
    "send_messages",
    "sendmail",
]

_HOMES = {
    "load_config": "clientid_mta.config",
    "Config": "clientid_mta.config",
    "ConfigError": "clientid_mta.config",
    "build_service": "clientid_mta.server.service",
    "sendmail": "clientid_mta.client",
    "send_message": "clientid_mta.client",
    "send_messages": "clientid_mta.client",
    "RecipientResult": "clientid_mta.client",
    "SendFailed": "clientid_mta.client",
    "ConnectionFailed": "clientid_mta.client",
}

if TYPE_CHECKING:
    from clientid_mta.client import (
        ConnectionFailed,
        RecipientResult,
        SendFailed,
        send_message,
        send_messages,
        sendmail,
    )
    from clientid_mta.config import Config, ConfigError, load_config
    from clientid_mta.server.service import build_service


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'clientid_mta' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next look-up finds it without calling us
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
