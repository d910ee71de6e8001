"""A reply leaves when it is made, not one reactor turn later.

Twisted buffers every write on a TCP connection and sends it only when epoll next
reports the socket writable: the reply waits for the rest of this reactor turn and
then behind the other sessions' events of the next one, adding to every reply under
load (issue 16: the churn load's AUTH → 235 p50 was about 15% lower without it).
asyncio sends at once when nothing is queued; this gives one TCP connection the same
behaviour. When the socket cannot take it all, or
something goes wrong, the rest is left to the reactor exactly as before. The sender also
turns Nagle's algorithm off and on for the session (see ``_past_the_tickets``).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionLost

TRANSPORT_LAYERS = 4  # our session ← TLS ← PROXY header reader ← TCP, at most


def tcp_connection(transport: Any) -> tcp.Connection | None:
    """The TCP connection under ``transport`` (itself, or under TLS or PROXY wrappers);
    None for anything else (a test's StringTransport)."""
    connection = transport
    for _layer in range(TRANSPORT_LAYERS):
        if isinstance(connection, tcp.Connection):
            return connection
        connection = getattr(connection, "transport", None)
        if connection is None:
            return None
    return None


def send_at_once(transport: Any) -> SendAtOnce | None:
    """Make the TCP connection under ``transport`` send its writes at once, and return
    its sender. Anything else is left alone: None."""
    connection = tcp_connection(transport)
    if connection is None:
        return None
    sender = vars(connection).get("startWriting")
    return sender if isinstance(sender, SendAtOnce) else SendAtOnce(connection)


class SendAtOnce:
    """One connection's ``startWriting``: try the socket now, register what is left.

    ``FileDescriptor.write`` calls ``startWriting`` after buffering, on every path (TLS
    writes its records through it too). So do ``loseConnection`` and a producer's
    unregistering, with nothing new to send and before they set their flags: a call
    that finds nothing to send only registers, as Twisted always did."""

    def __init__(self, connection: tcp.Connection) -> None:
        self.connection = connection
        self.register = connection.startWriting
        self.send = connection.writeSomeData
        self.sending = False  # a producer resumed by doWrite may write again
        self.empty = False  # doWrite found nothing to send
        connection.startWriting = self  # type: ignore[method-assign]
        connection.writeSomeData = self.write_some  # type: ignore[method-assign]

    def nagle(self, on: bool) -> bool:
        """Turn Nagle's algorithm on or off for this connection; False if it does not
        apply (not TCP, or already closed: a reply may come from a Deferred that fired
        after the connection was lost, which took its socket away)."""
        sock = getattr(self.connection, "socket", None)
        if sock is None:
            return False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(not on))
        except OSError:
            return False
        return True

    def write_some(self, data: bytes) -> int | ConnectionLost:
        if self.sending and not data:
            self.empty = True
            return 0  # no system call for nothing
        return self.send(data)

    def __call__(self) -> None:
        connection = self.connection
        if (
            self.sending
            or not connection.connected
            or connection.disconnecting  # closing: the reactor's doWrite finishes it
            or connection.offset < len(connection.dataBuffer)  # the socket was full
        ):
            self.register()
            return
        self.sending, self.empty = True, False
        try:
            outcome = connection.doWrite()  # stops writing itself when all is sent
        finally:
            self.sending = False
        if outcome is not None or self.empty or connection.dataBuffer:
            # Some left (the socket is full), an error, or a call with nothing to send
            # (loseConnection's): the reactor's own doWrite sends the rest, meets the
            # error again and closes, or closes as asked. (What a producer resumed by
            # doWrite wrote came back through here and registered.)
            self.register()
