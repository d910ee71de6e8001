"""The Cred checker: the password AND the device policy AND the abuse defences, in one place."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clientid_mta.auth.budgets import PendingChecks, Throttle, account_key_for, source_key_for
from clientid_mta.auth.cache import AuthCache
from clientid_mta.auth.credentials import (
    AuthUnavailable,
    IClientIdUsernamePassword,
    LoginThrottled,
    peer_host,
)
from clientid_mta.auth.dovecot import DovecotUnavailable, LoginContext
from clientid_mta.auth.known_clients import KnownClients
from clientid_mta.auth.passwd_file import Account, PasswdFile, normalise_address, verify_password
from clientid_mta.auth.repeats import RecentFailures
from clientid_mta.devices import notices as alerts
from clientid_mta.devices import policy as rules
from clientid_mta.devices.audit import COUNTED_REASONS, AuditLog
from clientid_mta.devices.policy import Decision, DevicePolicy, Where
from clientid_mta.devices.regions import Regions
from clientid_mta.devices.sharing import SharedDevices
from clientid_mta.devices.store import TRUSTED, ILoginLook, StoreUnavailable
from clientid_mta.global_reactor import global_reactor
from clientid_mta.observe.events import (
    NO_EVENTS,
    REFUSED_DEVICE,
    REFUSED_PASSWORD,
    REFUSED_POLICY,
    IServerEvents,
)
from clientid_mta.smtp.clientid import ClientIdentity, fingerprint
from clientid_mta.smtp.network import network_prefix

log = Logger()

# Internal reasons of refusals decided by the budgets (audited, never sent to the client).
THROTTLED_BY_SOURCE = {
    "device": "device_throttled",
    "net": "network_throttled",
    "usual": "usual_network_throttled",
}
NETWORK_BUSY = "network_busy"  # too many of the network's checks waiting for a thread
# Checks for strangers (the "net:" budgets) run at most this many at once, whatever their
# network: half of the four login threads, so a flood from anywhere never holds them all
# while a trusted device or an account's usual network waits. The rest wait their turn.
STRANGER_THREADS = 2
REPEATED_FAILURE = "bad_password_repeated"
# The class of a refusal, for metrics (the reason itself stays in the log and audit).
PASSWORD_REASONS = frozenset({"bad_password", REPEATED_FAILURE, "unknown_account"})
DEVICE_REASONS = frozenset(
    {rules.REFUSED_NEW_DEVICE, rules.REFUSED_PENDING, rules.REFUSED_REVOKED, "shared_device"}
)
# What a decision tells about devices, as metric events.
DEVICE_EVENTS = {
    rules.ALLOWED_FIRST_DEVICE: ("new", "trusted_on_first_use"),
    rules.REFUSED_NEW_DEVICE: ("new", "pending"),
    rules.REFUSED_REVOKED: ("revoked",),
    rules.REFUSED_TRAVEL: ("travel",),
}
MAX_LOGGED_NAME = 256  # characters of a typed account name kept in the log


def refusal_class(reason: str) -> str:
    if reason in PASSWORD_REASONS:
        return REFUSED_PASSWORD
    return REFUSED_DEVICE if reason in DEVICE_REASONS else REFUSED_POLICY


def as_typed(name: str) -> str:
    """A name a client typed, quoted and escaped for one log line: no space, quote or
    control character of its own can split the line or fake a field."""
    return json.dumps(name[:MAX_LOGGED_NAME])


# Policy refusals of a right password that the repeat memory answers like a wrong one
# (C12): they change only when the device is approved (a trusted device is checked
# afresh) or the config changes. A shared-device flag or a journey can be cleared by
# other means, so those are checked every time.
REMEMBERED_REFUSALS = frozenset(
    {"new_device_pending", "device_pending", "device_revoked", "no_clientid_refused"}
)


class PasswordService(Protocol):
    """A service that checks passwords itself (Dovecot's auth, ``auth/dovecot.py``)
    instead of the hashes of the passwd file. Blocking: called in the login threads."""

    failure_delay: float  # how long its refusals take: a policy refusal waits as long

    def verify(self, username: str, password: str, context: LoginContext) -> bool: ...


@dataclass
class Defences:
    """The abuse defences the checker consults; all optional for embedders."""

    throttle: Throttle | None = None
    sharing: SharedDevices | None = None
    audit: AuditLog | None = None
    failures: alerts.FailureCounter | None = None
    regions: Regions | None = None
    # Which devices and networks earn a budget of their own; without it, none does.
    known: KnownClients | None = None


@dataclass(frozen=True)
class Attempt:
    """One AUTH attempt as the defences see it (no password, no token)."""

    address: str
    identity: ClientIdentity | None  # as the policy uses it (ignored/debug types: None)
    client_type: str
    device: str | None  # HMAC device key, when an identity is usable
    where: Where
    source_key: str  # device:<hmac>, usual:<account>|<prefix> or net:<prefix>
    peer: IAddress | None = None
    local: IAddress | None = None
    secured: bool = False

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.device) if self.device else ""


@dataclass(frozen=True)
class AuthOutcome:
    """What the blocking half of a check found; logged and audited on the reactor."""

    account: str | None
    password_ok: bool
    decision: Decision
    throttled: bool = False
    flagged_accounts: int | None = None  # this attempt flagged the device as shared
    delay: float = 0.0  # seconds the reactor waits before the verdict is told (C12)
    resight: bool = False  # the quick path's sighting, to write after the reply


def _session_id() -> str:
    """A random id for Dovecot's log line of this check (no link to the client)."""
    import secrets

    return secrets.token_hex(8)


def _unavailable(failure: Failure) -> Failure:
    """A store that cannot answer (locked, disk) is temporary trouble for the wire."""
    if failure.check(StoreUnavailable):
        raise AuthUnavailable(str(failure.value))
    return failure


def _sighting_lost(failure: Failure) -> None:
    """A sighting written behind a reply that the store could not take: one line (the
    store reports its own trouble); the next login of the pair writes it again."""
    if failure.check(StoreUnavailable):
        log.warn("a device sighting was not recorded: {problem}", problem=str(failure.value))
    else:
        log.failure("recording a device sighting failed", failure)


def _left(result: Any, pending: PendingChecks, network: str) -> Any:
    """A check of the network's is done (whatever its result): one more may wait."""
    pending.leave(network)
    return result


@implementer(ICredentialsChecker)
class ClientIdChecker:
    """Password hash AND device policy AND the abuse defences.

    Order (docs/architecture.md, "The path of one message"): the device's failure budget
    is checked on the reactor, at the cost of a dict look-up; the account's budget,
    the password hash, the policy and the notices run in a thread. Any refusal is one
    ``UnauthorizedLogin``; a spent budget is ``LoginThrottled``. The verdict is left
    on the credentials (``creds.verdict``) for the realm.

    ``cache`` (authcache.py) may answer the password question instead of the hash;
    everything else runs the same on a hit. Without one, every login is hashed.
    """

    credentialInterfaces = (IClientIdUsernamePassword,)

    def __init__(
        self,
        passwords: PasswdFile,
        policy: DevicePolicy,
        defences: Defences | None = None,
        cache: AuthCache | None = None,
        service: PasswordService | None = None,
    ) -> None:
        self.passwords = passwords
        # Dovecot checks the passwords instead of our hashes; accounts it accepts are
        # learnt by ``passwords`` (dovecot_accounts.py).
        self.service = service
        self.policy = policy
        self.defences = defences or Defences()
        self.cache = cache if cache is not None else AuthCache(ttl=0, size=1)  # off
        # Where the blocking half runs; the server gives it its own pool (workers.py).
        self.run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread
        self.throttled_count = 0  # read (and reset) by the server's housekeeping
        self.events: IServerEvents = NO_EVENTS  # metrics, when the server counts
        self.repeats = RecentFailures()
        self._stranger_lane = defer.DeferredSemaphore(STRANGER_THREADS)
        # The store's read that never waits (SQLite): with it, a trusted device's login
        # with a cached password is decided on the reactor (``_quick_check``).
        self.quick_look: ILoginLook | None = None
        # The same read where it may wait (PostgreSQL): the quick check runs in a login
        # thread instead, and a login it cannot decide goes on to the full check.
        self.thread_look: ILoginLook | None = None
        self.clock: IReactorTime | None = None  # for ``AuthOutcome.delay``; None: the reactor

    def _attempt(self, creds: IClientIdUsernamePassword) -> Attempt:
        host = peer_host(creds.peer)
        network = network_prefix(host)
        identity, _flags = self.policy.usable(creds.clientId)
        device = self.policy.key_of(identity)
        address = normalise_address(creds.username)
        regions = self.defences.regions
        where = Where(network, regions.region(host) if regions else "")
        # Set look-ups only: the reactor picks the budget without the store.
        known = self.defences.known
        trusted = known is not None and known.knows_device(device)
        usual = known is not None and not trusted and known.is_usual(address, network)
        return Attempt(
            address,
            identity,
            identity.type if identity else "",
            device,
            where,
            source_key_for(device if trusted else None, address if usual else None, network),
            creds.peer,
            getattr(creds, "local", None),
            creds.tls is not None,
        )

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        creds = IClientIdUsernamePassword(credentials)
        attempt = self._attempt(creds)
        throttle = self.defences.throttle
        if throttle is not None and not throttle.admit(attempt.source_key):
            # No thread, no hash: a throttled source costs next to nothing.
            reason = THROTTLED_BY_SOURCE[attempt.source_key.partition(":")[0]]
            return self._refuse_now(reason, attempt, creds)
        if attempt.source_key.startswith("device:"):
            if self.quick_look is None and self.thread_look is not None:
                looked = self.run_in_thread(
                    self._quick_check, attempt, creds.password, self.thread_look
                )
                looked.addErrback(_unavailable)
                return looked.addCallback(self._quick_or_full, attempt, creds)
            quick = self._quick_check(attempt, creds.password, self.quick_look)
            if quick is not None:
                return self._quick_conclude(quick, attempt, creds)
        return self._full_check(attempt, creds)

    def _quick_or_full(
        self, quick: AuthOutcome | None, attempt: Attempt, creds: IClientIdUsernamePassword
    ) -> defer.Deferred[bytes | tuple[()]]:
        if quick is None:
            return self._full_check(attempt, creds)
        return self._quick_conclude(quick, attempt, creds)

    def _quick_conclude(
        self, quick: AuthOutcome, attempt: Attempt, creds: IClientIdUsernamePassword
    ) -> defer.Deferred[bytes | tuple[()]]:
        concluded: defer.Deferred[bytes | tuple[()]]
        concluded = defer.maybeDeferred(self._conclude, quick, attempt, creds)
        if quick.resight:
            self._resight_behind(attempt)
        return concluded

    def _full_check(
        self, attempt: Attempt, creds: IClientIdUsernamePassword
    ) -> defer.Deferred[bytes | tuple[()]]:
        """The check in a login thread: every refusal, and what the quick one declined."""
        if attempt.source_key.startswith("net:"):
            checked = self._stranger_check(attempt, creds.password)
            if checked is None:
                return self._refuse_now(NETWORK_BUSY, attempt, creds)
        else:
            checked = self.run_in_thread(self._check, attempt, creds.password)
        checked.addErrback(_unavailable)
        checked.addCallback(self._wait_out)
        return checked.addCallback(self._conclude, attempt, creds)

    def _wait_out(self, outcome: AuthOutcome) -> AuthOutcome | defer.Deferred[AuthOutcome]:
        """The outcome, after its ``delay``: waited on the reactor's clock, so a slow
        refusal holds no login thread (four refused logins would hold all of them)."""
        if outcome.delay <= 0:
            return outcome
        clock = self.clock if self.clock is not None else global_reactor()
        return task.deferLater(clock, outcome.delay, lambda: outcome)

    def _quick_check(
        self, attempt: Attempt, password: str, look: ILoginLook | None
    ) -> AuthOutcome | None:
        """A trusted device's login decided on the reactor (or, with a ``thread_look``, in
        one login thread with one read), when nothing about it needs a write, a hash or a
        notice; None sends it to the full check (``_check``), which decides every other
        case and every refusal.

        It answers as ``_check`` would for a success, from the same current state: the
        device's row, the budgets' rows and the shared-device flag are read from the
        store (``ILoginLook``: a read that never waits), so a revocation, a spent budget
        or a block made a moment ago, by any process, counts at once. What it skips is
        what a success does not change: the budgets' take and refund (a success never
        spends), the repeat memory (a trusted device is never answered from it), and the
        writes the in-memory checks show would be skipped anyway (a sighting or a usual
        network recorded lately). A sighting the store still counts, but this process has
        not written lately, is written after the reply (``_resight_behind``): it moves a
        time, never a count. Only a cached password counts: no hash on the reactor.
        """
        device, defences = attempt.device, self.defences
        if look is None or self.service is not None or device is None:
            return None
        address, network = attempt.address, attempt.where.network
        sharing, known, throttle = defences.sharing, defences.known, defences.throttle
        account = self.passwords.get(address) if self.passwords.is_current() else None
        resight = sharing is not None and not sharing.seen_lately(device, address)
        if (
            account is None
            or (known is not None and not known.recorded_lately(address, network))
            or not self.cache.check(account.address, account.password_hash, password, count=False)
        ):
            return None
        keys = self._budget_keys(attempt, True, True)
        try:
            seen = look.look(address, device, keys if throttle and throttle.shared else ())
        except StoreUnavailable:
            return None
        if (
            seen.device is None
            or (sharing is not None and sharing.settings.block and seen.flagged)
            # A pair the count no longer holds may be the attempt that flags: thread.
            or (resight and sharing is not None and not sharing.counted(seen.sighted))
            or (throttle is not None and not throttle.admits_all(keys, seen.budgets))
        ):
            return None
        decision = self.policy.quick_decision(address, attempt.identity, attempt.where, seen.device)
        if decision is None:
            return None
        self.cache.hit()  # counted once: a login declined here asks the cache again
        return AuthOutcome(address, True, decision, resight=resight)

    def _resight_behind(self, attempt: Attempt) -> None:
        """The quick path's sighting of a pair the count already holds, written in a
        thread after the reply: it only moves the pair's time forward."""
        sharing, device = self.defences.sharing, attempt.device
        if sharing is None or device is None:
            return

        def resight() -> None:
            flagged = sharing.saw(device, attempt.address)
            if flagged is not None:  # the pair left the window since the read: report it
                self._report_shared(attempt, flagged)

        written = self.run_in_thread(resight)
        written.addErrback(_sighting_lost)

    def _stranger_check(self, attempt: Attempt, password: str) -> defer.Deferred[Any] | None:
        """A stranger's check, in the strangers' lane of the login threads; None when
        its network already has ``network_checks`` running or waiting (bounded memory
        and delay: the attempt is refused at once, with no hash)."""
        throttle = self.defences.throttle
        pending = throttle.pending if throttle is not None and throttle.enabled else None
        network = attempt.where.network
        if pending is not None and not pending.enter(network):
            return None
        checked = self._stranger_lane.run(self.run_in_thread, self._check, attempt, password)
        if pending is not None:
            checked.addBoth(_left, pending, network)
        return checked

    def _refuse_now(
        self, reason: str, attempt: Attempt, creds: IClientIdUsernamePassword
    ) -> defer.Deferred[bytes | tuple[()]]:
        """A refusal decided on the reactor: no thread, no hash, no store call."""
        outcome = AuthOutcome(None, False, Decision(False, reason), throttled=True)
        return defer.maybeDeferred(self._conclude, outcome, attempt, creds)

    def _check(self, attempt: Attempt, password: str) -> AuthOutcome:
        """The blocking half: shared-device watch, then the verification proper."""
        sharing = self.defences.sharing
        if sharing is None or attempt.device is None:
            return self._verify(attempt, password)
        flagged = sharing.saw(attempt.device, attempt.address)
        if flagged is not None:
            self._report_shared(attempt, flagged)
        return replace(self._verify(attempt, password), flagged_accounts=flagged)

    def _verify(self, attempt: Attempt, password: str) -> AuthOutcome:
        """Repeat, budgets, hash, policy, notices. Blocking."""
        account = self.passwords.get(attempt.address)
        address, network = attempt.address, attempt.where.network
        stored = account.password_hash if account is not None else None
        # Read before the repeat memory is asked, for every attempt alike: a repeat then
        # costs the same store read whatever it repeats (C12), and a device approved
        # since, by any process or node, is checked afresh at once.
        known = (
            account is not None
            and attempt.device is not None
            and getattr(self.policy.store.get(address, attempt.device), "state", "") == TRUSTED
        )
        if not known and self.repeats.repeated(address, stored, network, password, attempt.device):
            # Exactly these credentials were refused from this network a moment ago (a
            # mail program retrying): answered as before, counted once. Right passwords a
            # policy refused are remembered too, or the repeat's speed (and budget) would
            # tell a stolen password from a wrong one (C12).
            repeated = Decision(False, REPEATED_FAILURE)
            return AuthOutcome(address if account else None, False, repeated)
        keys = self._budget_keys(attempt, account is not None, known)
        throttle = self.defences.throttle
        if throttle is not None and not throttle.take(*keys):
            # Both budgets in one store call (one transaction, issue 16); nothing was
            # taken. Which was spent: the levels that call saw are the throttle's now.
            if len(keys) > 1 and throttle.admit(keys[0]):
                spent = Decision(False, "account_throttled")  # not a failure of the source's
            else:
                # Passed the reactor's look, but a concurrent attempt took the last token.
                spent = Decision(False, THROTTLED_BY_SOURCE[keys[0].partition(":")[0]])
            return AuthOutcome(None, False, spent, throttled=True)
        try:
            outcome = self._verify_and_decide(attempt, password, account, keys[-1], known)
        except AuthUnavailable:
            if throttle is not None:
                throttle.refund(*keys)  # Dovecot down is no failure of the client's
            raise
        if outcome.password_ok and outcome.decision.allowed:
            if throttle is not None:
                throttle.refund(*keys)  # successes never spend
            self._logged_in(attempt, outcome.decision)
        elif not outcome.password_ok or outcome.decision.reason in REMEMBERED_REFUSALS:
            # A wrong password, or a right one refused for this device: the same to a client.
            self.repeats.failed(address, stored, network, password, attempt.device)
        return outcome

    @staticmethod
    def _budget_keys(attempt: Attempt, exists: bool, known: bool) -> tuple[str, ...]:
        """The source's bucket, then the account's (none on a usual network: its
        ``usual:`` bucket is the account's budget there)."""
        network = attempt.where.network
        if exists and not known and attempt.source_key.startswith("usual:"):
            return (attempt.source_key,)
        return attempt.source_key, account_key_for(attempt.address, known, exists, network)

    def _logged_in(self, attempt: Attempt, decision: Decision) -> None:
        """Remember what this login taught the budgets: a trusted device, a usual
        network. Blocking. A store that cannot take it costs the account nothing now."""
        known = self.defences.known
        if known is None:
            return
        if decision.device_trusted and attempt.device is not None:
            known.trusted(attempt.device)
        try:
            known.logged_in(attempt.address, attempt.where.network)
        except StoreUnavailable as problem:
            log.warn("cannot record the login network now: {problem}", problem=str(problem))

    def _login_context(self, attempt: Attempt) -> LoginContext:
        peer, local = attempt.peer, attempt.local
        return LoginContext(
            remote_host=str(getattr(peer, "host", "")),
            remote_port=int(getattr(peer, "port", 0) or 0),
            local_host=str(getattr(local, "host", "")),
            local_port=int(getattr(local, "port", 0) or 0),
            secured=attempt.secured,
            session=_session_id(),
            device=attempt.fingerprint,
        )

    def _ask_service(
        self, service: PasswordService, attempt: Attempt, password: str, account: Account | None
    ) -> tuple[bool, Account | None]:
        """Dovecot's verdict; an account it accepts that we did not know is learnt."""
        try:
            ok = service.verify(attempt.address, password, self._login_context(attempt))
        except DovecotUnavailable as problem:
            raise AuthUnavailable(str(problem)) from None
        learn = getattr(self.passwords, "learn", None)
        if ok and account is None and learn is not None:
            account = learn(attempt.address)
        return ok, account

    def _verify_and_decide(
        self,
        attempt: Attempt,
        password: str,
        account: Account | None,
        account_key: str,
        known: bool,
    ) -> AuthOutcome:
        """The hash (or the cache), then the policy; both budgets are already spent. Blocking.

        Only a right password is cached, so a wrong one always costs the full hash. A
        refusal after a cache hit also costs one (its result is not needed): a policy
        refusal must keep the timing class of a wrong password (C12), or a stolen
        password could be confirmed from an unknown device by the speed of the 535.
        """
        if self.service is not None:
            return self._verify_by_service(
                self.service, attempt, password, account, account_key, known
            )
        cached = account is not None and self.cache.check(
            account.address, account.password_hash, password
        )
        ok = cached or verify_password(account.password_hash if account else None, password)
        if account is None or not ok:
            return self._wrong_password(attempt, account, account_key, known)
        if not cached:
            self.cache.remember(account.address, account.password_hash, password)
        outcome = self._decide(attempt, account_key, known)
        if cached and not outcome.decision.allowed:
            verify_password(account.password_hash, password)  # C12: the timing equaliser
        return outcome

    def _wrong_password(
        self, attempt: Attempt, account: Account | None, account_key: str, known: bool
    ) -> AuthOutcome:
        """No such account, or a wrong password for it. Blocking."""
        address = attempt.address
        decision = (
            Decision(False, "unknown_account")
            if account is None
            else self.policy.password_failed(address, attempt.identity, attempt.where)
        )
        self._failed(attempt, account_key, known and account is not None, False)
        return AuthOutcome(address if account else None, False, decision)

    def _verify_by_service(
        self,
        service: PasswordService,
        attempt: Attempt,
        password: str,
        account: Account | None,
        account_key: str,
        known: bool,
    ) -> AuthOutcome:
        """As ``_verify_and_decide``, with Dovecot's verdict instead of our hash and no
        cache (Dovecot has its own). A policy refusal of a right password waits as long
        as Dovecot's refusal of a wrong one (C12: the same timing class)."""
        ok, account = self._ask_service(service, attempt, password, account)
        if account is None or not ok:
            return self._wrong_password(attempt, account, account_key, known)
        outcome = self._decide(attempt, account_key, known)
        if not outcome.decision.allowed and service.failure_delay > 0:
            return replace(outcome, delay=service.failure_delay)  # waited on the reactor
        return outcome

    def _decide(self, attempt: Attempt, account_key: str, known: bool) -> AuthOutcome:
        """The password was right: the shared-device block, then the policy. Blocking."""
        defences = self.defences
        address = attempt.address
        if (
            defences.sharing is not None
            and attempt.device
            and defences.sharing.blocked(attempt.device)
        ):
            self._failed(attempt, account_key, known, True)
            return AuthOutcome(address, True, Decision(False, "shared_device", attempt.fingerprint))
        decision = self.policy.decide(address, attempt.identity, attempt.where)
        if not decision.allowed:
            self._failed(attempt, account_key, known, True)
        return AuthOutcome(address, True, decision)

    def _failed(
        self, attempt: Attempt, account_key: str, known: bool, password_right: bool
    ) -> None:
        """A failed attempt (its budget was spent by ``take``): maybe tell the holder, with
        how many were wrong passwords and how many right ones on unapproved devices."""
        defences = self.defences
        if known or defences.failures is None:
            return
        tally = defences.failures.failed(attempt.address, password_right)
        if tally is not None:
            if self.passwords.get(attempt.address) is not None:
                self.policy.notify(
                    alerts.Notice(
                        alerts.REPEATED_FAILURES,
                        attempt.address,
                        attempt.fingerprint,
                        attempt.client_type,
                        attempt.where.network,
                        tally.fields(),
                    )
                )

    def _report_shared(self, attempt: Attempt, accounts: int) -> None:
        sharing = self.defences.sharing
        assert sharing is not None
        action = "refused on every account" if sharing.settings.block else "only reported"
        self.policy.notify(
            alerts.Notice(
                alerts.SHARED_DEVICE,
                attempt.address,
                attempt.fingerprint,
                attempt.client_type,
                attempt.where.network,
                {"accounts": str(accounts), "action": action},
            ),
            postmaster=True,
        )

    def _count(self, result: str, decision: Decision, flagged: bool) -> None:
        events = self.events
        events.login(result, refusal_class(decision.reason) if result == "refused" else "")
        for event in DEVICE_EVENTS.get(decision.reason, ()):
            events.device_event(event)
        if decision.reason != rules.REFUSED_TRAVEL and any(
            notice.startswith(alerts.IMPOSSIBLE_TRAVEL) for notice in decision.notices
        ):
            events.device_event("travel")
        if flagged:
            events.device_event("shared_flagged")

    def _conclude(
        self, outcome: AuthOutcome, attempt: Attempt, creds: IClientIdUsernamePassword
    ) -> bytes:
        decision = outcome.decision
        accepted = decision.allowed and outcome.password_ok and outcome.account is not None
        result = "accepted" if accepted else "throttled" if outcome.throttled else "refused"
        if self.defences.audit is not None:
            # Counted attempts keep the fingerprint only of a device with a budget of its
            # own: a stranger mints a new one per attempt, and each would be a row.
            counted = outcome.throttled or decision.reason in COUNTED_REASONS
            own_budget = attempt.source_key.startswith("device:")
            self.defences.audit.record(
                attempt.address,
                attempt.fingerprint if own_budget or not counted else "",
                attempt.where.network,
                result,
                decision.reason,
                known=outcome.account is not None,
            )
        undeliverable = [n for n in decision.notices if n.endswith("-undeliverable")]
        if undeliverable:
            log.warn(
                "could not deliver notices {notices} to {account}",
                notices=undeliverable,
                account=attempt.address,
            )
        if outcome.flagged_accounts is not None:
            log.warn(
                "device {fingerprint} tried {accounts} accounts: flagged as shared",
                fingerprint=attempt.fingerprint,
                accounts=outcome.flagged_accounts,
            )
        self._count(result, decision, outcome.flagged_accounts is not None)
        if not outcome.throttled:  # throttled attempts are counted, not logged one by one
            # One line per attempt that fail2ban can read: the client's address first,
            # then the name as typed, quoted, so nothing a client types can move a field.
            log.info(
                "auth {outcome} client={client} device={fingerprint} account={typed} "
                "network={network} reason={reason}",
                outcome=result,
                client=peer_host(creds.peer),
                typed=as_typed(creds.username),
                account=outcome.account or "(unknown)",
                fingerprint=attempt.fingerprint or "-",
                network=attempt.where.network,
                reason=decision.reason,
                refusal=refusal_class(decision.reason) if result == "refused" else "",
                notices=list(decision.notices),
            )
        else:
            self.throttled_count += 1
        verdicts = getattr(creds, "verdict", None)
        if isinstance(verdicts, list):
            verdicts.append(decision)
        if outcome.throttled:
            raise LoginThrottled()
        if not accepted:
            raise error.UnauthorizedLogin()
        assert outcome.account is not None
        return outcome.account.encode("utf-8")
