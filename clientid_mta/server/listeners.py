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
    twistd can stop with one line instead of logging a failed Deferred later."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self.bound: defer.Deferred[IListeningPort] = defer.Deferred()  # fires with the port

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
        self.bound.callback(port)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        return port.stopListening()


class AdoptedPort(service.Service):
    """A listener on a socket another process bound (a worker's share of a port)."""

    def __init__(self, fd: int, factory: IProtocolFactory, reactor: Any) -> None:
        self.fd = fd
        self.factory = factory
        self.reactor: IReactorSocket = reactor
        self.port: IListeningPort | None = None
        self.bound: defer.Deferred[IListeningPort] = defer.Deferred()  # fires with the port

    def startService(self) -> None:
        super().startService()
        probe = socket.socket(fileno=self.fd)
        family = probe.family
        probe.detach()
        self.port = self.reactor.adoptStreamPort(self.fd, family, self.factory)  # type: ignore[arg-type]
        os.close(self.fd)  # adoptStreamPort made its own copy
        self.bound.callback(self.port)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        return self.port.stopListening() if self.port else None
