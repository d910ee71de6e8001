"""The global reactor and ``blockingCallFromThread``, typed for what the tests do with them.

Both are Twisted's own objects: importing this module installs the default reactor just as
``from twisted.internet import reactor`` does; only their static types differ.

- ``twisted.internet.reactor`` is typed as a make-believe ``_IReactorCommon`` (core, time,
  FD set, TCP, process). The default reactor on Linux also provides SSL, UDP and threads,
  which the tests use. Two of the interfaces' signatures are narrower than the reactor's:
  ``listenTCP`` takes only a ``ServerFactory`` of the default protocol type (``listenSSL``
  takes a ``ServerFactory`` of any; ``tcp.Port`` any protocol factory), and ``listenUDP``
  has no defaults for ``interface`` and ``maxPacketSize``.
- ``blockingCallFromThread`` takes ``f: Callable[P, R] | Callable[P, Deferred[R]]``, from
  which mypy infers ``R = Never`` whenever ``f`` returns a Deferred. Overloads that try the
  Deferred case first say what it does: wait for the Deferred and return its result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar, cast, overload

from twisted.internet import reactor as _reactor
from twisted.internet import threads

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import (
        IListeningPort,
        IProtocolFactory,
        IReactorCore,
        IReactorFDSet,
        IReactorFromThreads,
        IReactorProcess,
        IReactorSSL,
        IReactorTCP,
        IReactorThreads,
        IReactorTime,
        IReactorUDP,
    )
    from twisted.internet.protocol import DatagramProtocol

    class TestReactor(
        IReactorCore,
        IReactorTime,
        IReactorFDSet,
        IReactorTCP,
        IReactorProcess,
        IReactorSSL,
        IReactorUDP,
        IReactorThreads,
    ):
        """The interfaces of the default (epoll) reactor that the tests use."""

        def listenTCP(
            port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = ""
        ) -> IListeningPort: ...

        def listenUDP(
            port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
        ) -> IListeningPort: ...


P = ParamSpec("P")
R = TypeVar("R")


class BlockingCall(Protocol):
    """``blockingCallFromThread(reactor, f, *a, **kw)``: what ``f`` returns, or what the
    Deferred it returns fires with."""

    @overload
    def __call__(
        self,
        reactor: IReactorFromThreads,
        f: Callable[P, Deferred[R]],
        /,
        *a: P.args,
        **kw: P.kwargs,
    ) -> R: ...

    @overload
    def __call__(
        self, reactor: IReactorFromThreads, f: Callable[P, R], /, *a: P.args, **kw: P.kwargs
    ) -> R: ...


reactor = cast("TestReactor", _reactor)
blockingCallFromThread = cast(BlockingCall, threads.blockingCallFromThread)
