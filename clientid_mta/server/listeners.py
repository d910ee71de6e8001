"""The listening side: ports bound before the state exists, and ports another process bound.

twistd binds the ports in ``privilegedStartService`` (as root, for 587 and 465) but
the factories need the state opened in ``startService`` (as the service user). So a
port listens with a ``LateFactory`` that is given the real factory at start; a
connection that arrives before that is closed at once (under twistd none can: the
reactor is not running yet).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IReactorSocket,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure


class LateFactory(protocol.Factory):
    """Hands each connection to ``target``, set once the server has opened its state."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.target: IProtocolFactory | None = None

    def logPrefix(self) -> str:
        return self.name  # the port logs "submission starting on 587"

    def attach(self, target: IProtocolFactory) -> None:
        self.target = target
        if self.numPorts:  # already listening: the real factory starts now
            target.doStart()

    def startFactory(self) -> None:
        if self.target is not None:
            self.target.doStart()

    def stopFactory(self) -> None:
        if self.target is not None:
            self.target.doStop()

    def buildProtocol(self, addr: IAddress | None) -> protocol.Protocol | None:
        if self.target is None:
            return None  # not started yet: the connection is closed
        return self.target.buildProtocol(addr)  # type: ignore[arg-type,return-value]


class BoundPort(service.Service):
    """A listener on an endpoint, bound in ``privilegedStartService`` (as root under
    twistd, for ports below 1024); an embedder that only calls ``startService`` gets it
    bound there. A port that cannot be bound raises at once (``CannotListenError``), so
    twistd can stop with one line instead of logging a failed Deferred later.

    Bound is not accepting: until ``serve`` the port does not accept, so connections wait
    in the kernel's listen queue instead of being closed by a server still starting (or,
    with workers, taken by a process that is not ready while another one is)."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self.bound: defer.Deferred[IListeningPort] = defer.Deferred()  # fires with the port
        self._serving = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()

    def _listen(self) -> None:
        failed: list[Failure] = []
        self.endpoint.listen(self.factory).addCallbacks(self._listening, failed.append)
        if failed:  # TCP endpoints answer at once: raise the error now, not later
            failed[0].raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        if not self._serving:
            _accepting(port, False)
        self.bound.callback(port)

    def serve(self) -> None:
        """Start accepting connections (the real factory is attached)."""
        self._serving = True
        if self.port is not None:
            _accepting(self.port, True)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        return port.stopListening()


def _accepting(port: IListeningPort, on: bool) -> None:
    """Accept connections or leave them in the listen queue (a TCP port is a reader)."""
    reader = IReadDescriptor(port, None)
    if reader is not None:
        (reader.startReading if on else reader.stopReading)()  # type: ignore[attr-defined]


class AdoptedPort(service.Service):
    """A listener on a socket another process bound (a worker's share of a port). The
    socket is adopted, so this process takes connections, only at ``serve``."""

    def __init__(self, fd: int, factory: IProtocolFactory, reactor: Any) -> None:
        self.fd = fd
        self.factory = factory
        self.reactor: IReactorSocket = reactor
        self.port: IListeningPort | None = None
        self.bound: defer.Deferred[IListeningPort] = defer.Deferred()  # fires with the port

    def serve(self) -> None:
        """Take the port: from now on this process accepts its share of connections."""
        if self.port is not None:
            return
        probe = socket.socket(fileno=self.fd)
        family = probe.family
        probe.detach()
        self.port = self.reactor.adoptStreamPort(self.fd, family, self.factory)  # type: ignore[arg-type]
        os.close(self.fd)  # adoptStreamPort made its own copy
        self.bound.callback(self.port)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self.port is None:
            os.close(self.fd)  # never adopted
            return None
        return self.port.stopListening()
