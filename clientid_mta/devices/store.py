"""The store as small interfaces, one per repository, and the values they hold.

Devices (the registry), the audit log, failure budgets, approval codes, shared
devices and the notices sent each have their own interface, so that a consumer depends
on the one it uses and a backend (SQLite, see sqlite_store.py; PostgreSQL for several
nodes, see postgres_store.py) implements them one by one. Kept apart from the password
file, keyed by account (docs/conformance.md, row C15). Tokens are never stored: a row holds the HMAC
device key (see clientid.device_key), and approval codes are kept as SHA-256 hashes.

Every decision that must be atomic is one call, run by the backend in one transaction
that other threads and processes cannot split (first-device trust, a budget take or
refund, the shared-device count, the use of an approval code, a notice's turn). Calls block; the
server runs them in threads, never on the reactor, the admin command directly. The one
exception is ``ILoginLook``, a read that never waits, offered only by SQLite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from zope.interface import Interface

TRUSTED = "trusted"
PENDING = "pending"
REVOKED = "revoked"
STATES = (TRUSTED, PENDING, REVOKED)

FINGERPRINT_MIN_HEX = 6
FINGERPRINT_MAX_HEX = 16  # a fingerprint is the first 16 hex digits of the device key
_HEX = frozenset("0123456789abcdef")


class StoreUnavailable(Exception):
    """The store cannot answer now (locked by another process, disk): try again later."""

    # True when the backend has logged the outage itself (once per change of state), so
    # that callers retrying every second need not log it each time.
    reported = False


class DeviceNotFound(LookupError):
    pass


class BadFingerprint(DeviceNotFound, ValueError):
    """Not 6 to 16 hex digits: never let it reach a query (``%`` would match every row)."""


def parse_fingerprint(text: str) -> str:
    """The fingerprint (prefix) as stored, lower case; raises BadFingerprint."""
    prefix = text.strip().lower()
    if not FINGERPRINT_MIN_HEX <= len(prefix) <= FINGERPRINT_MAX_HEX or not set(prefix) <= _HEX:
        shown = text if text.isprintable() and len(text) <= 40 else repr(text[:40])
        raise BadFingerprint(
            f"{shown!r} is not a device fingerprint "
            f"({FINGERPRINT_MIN_HEX} to {FINGERPRINT_MAX_HEX} hex digits)"
        )
    return prefix


@dataclass(frozen=True)
class AuditEntry:
    """One AUTH attempt; or, with ``count``, that many alike within the minute at ``time``
    (throttled attempts are kept so: a count per minute, network, device and reason)."""

    time: float
    account: str
    fingerprint: str
    network: str
    outcome: str
    reason: str
    count: int = 1


@dataclass(frozen=True)
class Device:
    account: str
    device_key: str
    type: str
    state: str
    label: str
    first_seen: float
    last_seen: float
    last_network: str
    logins: int
    last_login: float = 0.0
    last_region: str = ""

    @property
    def fingerprint(self) -> str:
        from clientid_mta.smtp.clientid import fingerprint

        return fingerprint(self.device_key)


@dataclass(frozen=True)
class Budget:
    """A token bucket's shape: ``burst`` attempts, one more every ``refill_seconds``."""

    burst: int
    refill_seconds: int

    def level(self, tokens: float, elapsed: float) -> float:
        return min(float(self.burst), tokens + elapsed / self.refill_seconds)


BudgetRow = tuple[float, float]  # (tokens, updated)


def change_budgets(
    budgets: Mapping[str, Budget], rows: Mapping[str, BudgetRow | None], now: float, change: float
) -> tuple[bool, dict[str, BudgetRow]]:
    """Take (-1) or give back (+1) one attempt on every key: the arithmetic every backend
    applies inside its transaction. Returns whether it applied, and the rows to keep
    (the new ones, or the levels seen when a take found a key spent)."""
    seen: dict[str, BudgetRow] = {}
    for key, budget in budgets.items():
        row = rows.get(key)
        seen[key] = (budget.level(row[0], now - row[1]) if row else float(budget.burst), now)
    if change < 0 and any(level < 1.0 for level, _ in seen.values()):
        return False, seen
    new = {
        key: (min(level + change, float(budgets[key].burst)), now)
        for key, (level, _) in seen.items()
    }
    return True, new


@dataclass(frozen=True)
class PendingLogin:
    """A trusted device's login, recorded after its ``235`` (devices/last_seen.py)."""

    account: str
    device_key: str
    network: str
    region: str
    when: float


def login_updates(logins: Sequence[PendingLogin]) -> list[tuple[object, ...]]:
    """A batch of logins as one row a device, in key order, as the parameters of both
    stores' ``record_logins`` UPDATE: (count, newest time x2, its network, newest time,
    its region, newest time, account, device key).

    Key order makes every node lock the rows it updates in the same order (two nodes'
    batches cannot deadlock); the UPDATE keeps a newer login another node already wrote
    (``last_login``) instead of overwriting it with an older one."""
    merged: dict[tuple[str, str], tuple[int, PendingLogin]] = {}
    for login in logins:
        key = (login.account, login.device_key)
        count, newest = merged.get(key, (0, login))
        merged[key] = (count + 1, login if login.when >= newest.when else newest)
    rows: list[tuple[object, ...]] = []
    for key in sorted(merged):
        count, newest = merged[key]
        when = newest.when
        rows.append((count, when, when, newest.network, when, newest.region, when, *key))
    return rows


class IDeviceRegistry(Interface):
    """The devices of each account and their states."""

    def get(account: str, device_key: str) -> Device | None:
        """The device, or None."""

    def register(
        account: str, device_key: str, type: str, network: str, eligible: bool
    ) -> tuple[Device, bool]:
        """A device seen with the right password, in one transaction: a new device becomes
        trusted if ``eligible`` and the account has no trusted or revoked device yet (trust
        on first use), else pending; a known one keeps its state and gets its last-seen
        time and network refreshed. Returns the device and whether it was new."""

    def login(account: str, device_key: str, network: str, region: str) -> None:
        """Count a successful login and refresh last-seen, network and region."""

    def record_logins(logins: Sequence[PendingLogin]) -> None:
        """Several logins made earlier (the write-behind's batch), in order, in one
        transaction: each counted, its time as last-seen and last-login time."""

    def add_trusted(account: str, device_key: str, type: str, label: str = "") -> Device:
        """An operator's pre-approved device (``device add``); trusted even if seen before."""

    def set_state(account: str, fingerprint: str, state: str) -> Device:
        """Change a device's state, found by fingerprint prefix (DeviceNotFound)."""

    def set_label(account: str, fingerprint: str, label: str) -> Device:
        """Change a device's label, found by fingerprint prefix (DeviceNotFound)."""

    def devices_of(account: str) -> list[Device]:
        """All devices of an account, oldest first."""

    def delete_account(account: str) -> int:
        """Forget every device of an account; returns how many there were."""

    def close() -> None:
        """Release the connection."""


class IAuditStore(Interface):
    """Every AUTH attempt, with its internal reason; throttled ones as counts per minute."""

    def add_audit(entries: list[AuditEntry]) -> None:
        """Append a batch."""

    def add_audit_counts(counts: list[AuditEntry]) -> None:
        """Add each entry's ``count`` to the row of its (time, network, fingerprint,
        outcome, reason), created at 0 if missing (``time`` is the minute, ``account``
        is not kept), in one transaction."""

    def prune_audit(before: float) -> int:
        """Drop entries and counts older than ``before``; returns how many."""

    def trim_audit(max_entries: int) -> int:
        """Keep the ``max_entries`` latest written entries, and as many count rows; drop
        the earlier ones. Returns how many were dropped."""

    def compact() -> None:
        """Give the pages freed by the drops back to the file system and keep the
        journal small, a bounded amount of work per call (the whole file, not only
        the audit)."""

    def audit(
        account: str | None = None,
        fingerprint: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        """The newest ``limit`` entries and count rows matching (fingerprint: a prefix,
        BadFingerprint unless hex; a count row has no account), oldest first."""

    def close() -> None:
        """Release the connection."""


class IBudgetStore(Interface):
    """Failure budgets (token buckets) shared by the worker processes of one server.

    ``budgets`` maps each key to the shape of its bucket; a key without a row is full.
    """

    def take(budgets: Mapping[str, Budget], now: float) -> tuple[bool, dict[str, BudgetRow]]:
        """One attempt from every key, all or none, in one transaction; whether taken,
        and each key's row as now stored."""

    def refund(budgets: Mapping[str, Budget], now: float) -> dict[str, BudgetRow]:
        """Give one attempt back to every key (never above the burst), in one transaction."""

    def prune(kinds: Mapping[str, Budget], now: float) -> int:
        """Forget rows whose bucket has refilled, or whose kind (the key up to ``:``) is
        not in ``kinds``: they carry no information. Returns how many."""

    def save(rows: list[tuple[str, float, float]]) -> None:
        """Replace every row with ``rows`` (one process's snapshot, kept over a restart)."""

    def load() -> list[tuple[str, float, float]]:
        """Every row: (key, tokens, updated)."""

    def trusted_device_keys() -> set[str]:
        """The keys of the devices some account trusts: the ones that earn a budget of
        their own (an attacker cannot mint them without an account's consent)."""

    def record_login_network(account: str, network: str, now: float, keep: float) -> None:
        """The account logged in from ``network`` at ``now``, in one transaction; rows
        older than ``keep`` seconds are forgotten in the same call."""

    def login_networks(since: float) -> list[tuple[str, str, float]]:
        """(account, network, last login) of every network an account logged in from
        since ``since``."""

    def close() -> None:
        """Release the connection."""


class IApprovalCodes(Interface):
    """One-time codes that approve a pending device, kept as hashes."""

    def add_approval_code(code_hash: str, account: str, device_key: str, expires: float) -> None:
        """Keep a new code."""

    def redeem_approval_code(code_hash: str, account: str, now: float) -> str | None:
        """Mark the code used and return its device key, in one statement; None if unknown,
        used already, expired or of another account (a code works once)."""

    def prune_approval_codes(now: float) -> int:
        """Forget the codes used or expired by ``now``; returns how many."""

    def close() -> None:
        """Release the connection."""


class ISharedDeviceStore(Interface):
    """Devices seen on many accounts, counted across processes, and their flags."""

    def saw(device_key: str, account: str, now: float, window: float) -> int:
        """Record that the device tried the account at ``now`` and return the number of
        distinct accounts it tried within ``window`` seconds, in one transaction; older
        sightings are forgotten."""

    def flag(device_key: str, accounts: int, now: float) -> bool:
        """Flag the device as shared; False if it was flagged already."""

    def is_flagged(device_key: str) -> bool:
        """Whether the device is flagged."""

    def unflag(fingerprint: str) -> int:
        """Clear the flags (and the sightings) of the devices with this fingerprint prefix
        (BadFingerprint unless hex); returns how many flags."""

    def close() -> None:
        """Release the connection."""


class INoticeLedger(Interface):
    """The notices sent, shared by the worker processes, so that their caps hold for the
    server as a whole rather than per process."""

    def may_notify(
        recipient: str, fingerprint: str, kind: str, now: float, repeat: float, per_hour: int
    ) -> bool:
        """May ``kind`` about ``fingerprint`` go to ``recipient`` now? Yes unless the same
        went to them less than ``repeat`` seconds ago, or ``per_hour`` notices did within
        the hour. A yes is recorded as a notice sent, in the same transaction."""

    def prune_notices(before: float) -> int:
        """Forget the notices sent before ``before``; returns how many."""

    def close() -> None:
        """Release the connection."""


@dataclass(frozen=True)
class Sending:
    """Messages and recipients: what one call adds, or the most an hour may hold (0:
    no maximum)."""

    messages: int = 0
    recipients: int = 0


class ISendingCounts(Interface):
    """Messages and recipients each account sent in the current hour, counted across the
    worker processes, for the sending limit (``[limits] max_messages_per_hour``)."""

    def count_sending(account: str, hour: int, add: Sending, most: Sending) -> tuple[bool, bool]:
        """Add ``add`` to the account's counts for the hour that starts at ``hour`` (a
        count of an earlier hour starts again from 0), in one transaction, unless a
        count would pass its maximum in ``most``. Returns (counted, first refusal):
        whether it was added, and whether this is the account's first refusal in that
        hour (its one notice)."""

    def close() -> None:
        """Release the connection."""


@dataclass(frozen=True)
class LoginView:
    """What one read showed of a login's state: the device's row, the rows of the named
    budgets (a missing one is full), whether the device is flagged as shared, and when
    the device was last seen on this account by the shared-device count (None: not in
    its window)."""

    device: Device | None
    budgets: Mapping[str, BudgetRow]
    flagged: bool
    sighted: float | None = None


class ILoginLook(Interface):
    """A read that the reactor itself may make (issue 16): the one exception to "calls
    block". Only a backend that can answer without waiting offers it (SQLite in WAL mode:
    a reader never waits for a writer); the checker's quick path for a trusted device
    reads the current state through it, and takes the thread path when it cannot."""

    def look(account: str, device_key: str, budget_keys: Sequence[str]) -> LoginView:
        """The device's row, the budgets' rows and the shared-device flag, in one read
        transaction. Never waits: raises ``StoreUnavailable`` at once if the file is
        locked or unreadable."""

    def close() -> None:
        """Release the connection."""


@dataclass(frozen=True)
class Stores:
    """One backend's repositories, built together (see sqlite_store.open_sqlite_stores)."""

    devices: IDeviceRegistry
    audit: IAuditStore
    budgets: IBudgetStore
    approval_codes: IApprovalCodes
    shared_devices: ISharedDeviceStore
    sending: ISendingCounts
    notices: INoticeLedger
    look: ILoginLook | None = None  # a backend whose reads never wait (SQLite) has one
    # A backend whose reads may wait (PostgreSQL, over the network) offers the same read
    # for the login threads: a trusted device's login then costs one read, no write.
    thread_look: ILoginLook | None = None

    def close(self) -> None:
        for repository in (
            self.devices,
            self.audit,
            self.budgets,
            self.approval_codes,
            self.shared_devices,
            self.sending,
            self.notices,
            *((self.look,) if self.look is not None else ()),
            *((self.thread_look,) if self.thread_look is not None else ()),
        ):
            repository.close()
