"""The TOML configuration: ``load_config(path)`` returns a frozen ``Config``.

- ``model.py``: the settings, one dataclass per [section]; each key is one field, with
  its type, default and, in ``setting(...)``, what the type cannot say.
- ``checks.py``: the value checks a field can name (ranges, choices, host names, ...).
- ``schema.py``: the sections and keys, derived from the fields.
- ``load.py``: TOML reading, the checks, named sub-tables and rules between keys.
- ``files.py``: at start, the files the operator named must exist.
"""

from clientid_mta.config.files import check_server_files
from clientid_mta.config.load import ConfigError, load_config
from clientid_mta.config.model import (
    DEFAULT_SUBMISSION,
    DEFAULT_SUBMISSIONS,
    DEFAULT_TYPE_FLAGS,
    POLICIES,
    TYPE_FLAGS,
    AlertsConfig,
    ApprovalConfig,
    AuditConfig,
    AuthConfig,
    ClientIdConfig,
    Config,
    DeliveryConfig,
    DkimKey,
    LimitsConfig,
    ListenConfig,
    QueueConfig,
    RelayConfig,
    ServerConfig,
    SharedDevicesConfig,
    StoreConfig,
    ThrottleConfig,
    TLSConfig,
    TravelConfig,
)
from clientid_mta.config.schema import SCHEMA

__all__ = [
    "DEFAULT_SUBMISSION",
    "DEFAULT_SUBMISSIONS",
    "DEFAULT_TYPE_FLAGS",
    "POLICIES",
    "SCHEMA",
    "TYPE_FLAGS",
    "AlertsConfig",
    "ApprovalConfig",
    "AuditConfig",
    "AuthConfig",
    "ClientIdConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DkimKey",
    "LimitsConfig",
    "ListenConfig",
    "QueueConfig",
    "RelayConfig",
    "ServerConfig",
    "SharedDevicesConfig",
    "StoreConfig",
    "TLSConfig",
    "ThrottleConfig",
    "TravelConfig",
    "check_server_files",
    "load_config",
]
