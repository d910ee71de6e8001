"""What happened, told by the wire, the checker and the queue to whoever counts it.

The one neutral seam between the layers that act and the metrics that count: the
wire imports only this module (no storage, no HTTP, no Prometheus), and a server
without ``[metrics] listen`` keeps ``NO_EVENTS``, whose calls cost one method call.
Labels are classes of outcome, never an account, an address or a token.
"""

from __future__ import annotations

from zope.interface import Interface, implementer

# Why a login was refused, as a metric label: the internal reason is finer and stays in
# the audit log.
REFUSED_PASSWORD = "password"  # noqa: S105 - a label, not a secret
REFUSED_DEVICE = "device"
REFUSED_POLICY = "policy"


class IServerEvents(Interface):
    """Each call is made on the reactor thread and must return at once."""

    def session_opened(listener: str) -> None:
        """A connection was accepted on ``listener`` (submission or submissions)."""

    def session_closed(listener: str) -> None:
        """A session counted by ``session_opened`` ended."""

    def tls_failed() -> None:
        """A TLS handshake failed."""

    def login(result: str, refusal: str) -> None:
        """An AUTH attempt: result accepted, refused or throttled; refusal is its class
        (password, device, policy) or ""."""

    def device_event(event: str) -> None:
        """new, pending, trusted_on_first_use, approved, revoked, shared_flagged, travel."""

    def message(result: str, size: int, reply_seconds: float) -> None:
        """End of DATA answered: result accepted, refused or failed."""

    def delivery(result: str) -> None:
        """One recipient's relay attempt: delivered, deferred, failed or expired."""


@implementer(IServerEvents)
class NoEvents:
    """Nobody counts: every call does nothing."""

    def session_opened(self, listener: str) -> None:
        pass

    def session_closed(self, listener: str) -> None:
        pass

    def tls_failed(self) -> None:
        pass

    def login(self, result: str, refusal: str) -> None:
        pass

    def device_event(self, event: str) -> None:
        pass

    def message(self, result: str, size: int, reply_seconds: float) -> None:
        pass

    def delivery(self, result: str) -> None:
        pass


NO_EVENTS: IServerEvents = NoEvents()
