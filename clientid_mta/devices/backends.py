"""The store backend the config names: SQLite (one machine) or PostgreSQL (several nodes).

``[store] url`` absent: the SQLite file ``[clientid] device_store``. Present: the
PostgreSQL database it names, its schema brought up to date, and the device-token key
checked against the one the database was filled under.
"""

from __future__ import annotations

from clientid_mta.config import Config
from clientid_mta.devices.keys import key_fingerprint
from clientid_mta.devices.sqlite_store import open_sqlite_stores
from clientid_mta.devices.store import Stores


def shared_by_nodes(config: Config) -> bool:
    """Whether several machines may use this store (then the failure budgets live in it)."""
    return bool(config.store.url)


def open_stores(config: Config, server_key: bytes | None) -> Stores:
    """The configured backend's repositories. With PostgreSQL: ValueError for a bad URL or
    password file, StoreUnavailable when it cannot be reached, KeyMismatch when
    ``server_key`` (None: not checked) is not the database's."""
    if not config.store.url:
        return open_sqlite_stores(config.clientid.device_store)
    from clientid_mta.devices.postgres_store import open_postgres_stores

    return open_postgres_stores(
        config.store.url,
        config.store.password_file,
        key_fingerprint(server_key) if server_key is not None else None,
        config.store.pool_size,
    )


def probe_store(config: Config) -> str | None:
    """None if the configured store takes work now, else why not (blocking: a thread's)."""
    if not config.store.url:
        from clientid_mta.devices.sqlite_store import probe_writable

        return probe_writable(config.clientid.device_store)
    from clientid_mta.devices.postgres_store import probe_reachable

    return probe_reachable(config.store.url, config.store.password_file)
