"""
A fault-injecting TCP proxy for tests.

L{FaultProxy} listens on one local address and forwards every connection it
accepts to one target, adding latency, limiting bandwidth, or cutting every
connection (a partition) on demand. It forwards bytes and knows nothing of
what they carry, so TLS passes through unchanged: the handshake and the
certificates stay between the two ends. Embedders put one between the nodes
of their application to see how it copes with a slow, thin or broken
network; dtable's own tests put them between nodes of an overlay.

    proxy = FaultProxy(reactor, "127.0.0.1", node_port, latency=0.05)
    await proxy.start()
    ...  # dial proxy.address instead of the node
    proxy.cut()
    ...
    proxy.restore()
    await proxy.stop()

The proxy owns its listening port, the connections it accepts and the ones it
dials, and the timers that pace them; L{FaultProxy.stop} returns once all of
them are gone. The reactor is passed in; nothing here imports it.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from automat import MethodicalMachine
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IListeningPort

log = Logger()

#: How many bytes may wait in one direction of one connection before the
#: proxy stops reading from the side that sends them.
MAX_QUEUED = 16 * 1024 * 1024

#: Seconds the proxy waits for the target to accept a connection.
CONNECT_TIMEOUT = 5.0

#: Under a bandwidth limit, data is written in slices of about this many
#: seconds' worth of bytes (at least one byte).
_SLICE_SECONDS = 0.01

_DIRECTIONS = ("in", "out", "both")


def _check_latency(seconds: float) -> float:
    if not seconds >= 0:
        raise ValueError(f"latency must be a number of seconds >= 0, not {seconds!r}")
    return float(seconds)


def _check_bandwidth(bytes_per_second: float | None) -> float | None:
    if bytes_per_second is None:
        return None
    if not bytes_per_second > 0:
        raise ValueError(
            f"bandwidth must be bytes per second > 0 or None, not {bytes_per_second!r}"
        )
    return float(bytes_per_second)


@implementer(IPushProducer)
class _Pipe:
    """
    One direction of one proxied connection.

    Each chunk read from the source is queued with the time it becomes due:
    when it was received plus the latency in force then. Chunks are written
    to the destination strictly in order, each once it is due; under a
    bandwidth limit the head is written in slices, each once its
    transmission time (its size over the rate, after the previous slice)
    has passed. The pipe is the destination transport's producer, so a
    receiver that stops reading stops the pipe; when more than C{max_queued}
    bytes wait, it pauses the source transport until half of them are gone.

    @ivar direction: "in" (client to target) or "out" (target to client),
        for the log.
    @ivar latency: the delay added to chunks received from now on.
    @ivar queued: bytes received and not yet written.
    """

    def __init__(self, clock: Any, direction: str, source: Any, latency: float,
                 rate: float | None, max_queued: int,
                 forwarded: Callable[[int], None]) -> None:
        """
        @param clock: an L{IReactorTime}.
        @param direction: "in" or "out".
        @param source: the transport data is read from (an L{IPushProducer}).
        @param latency: seconds added to each chunk.
        @param rate: bytes per second, or L{None} for no limit.
        @param max_queued: bytes queued before C{source} is paused.
        @param forwarded: called with the size of every write.
        """
        self.direction = direction
        self.latency = latency
        self.queued = 0
        self._clock = clock
        self._source = source
        self._rate = rate
        self._max_queued = max_queued
        self._forwarded = forwarded
        self._destination: Any = None
        self._queue: deque[tuple[float, bytes]] = deque()
        self._idle_at = float("-inf")
        self._call: IDelayedCall | None = None
        self._blocked = False
        self._source_paused = False
        self._finishing = False
        self._stopped = False

    def connect(self, destination: Any) -> None:
        """
        Start writing to C{destination}, a transport, what is queued and
        what comes after.
        """
        if self._stopped:
            return
        self._destination = destination
        destination.registerProducer(self, True)
        self._idle_at = max(self._idle_at, self._clock.seconds())
        self._pump()

    def push(self, data: bytes) -> None:
        """
        Queue C{data}, read from the source just now.
        """
        if self._stopped or not data:
            return
        self._queue.append((self._clock.seconds() + self.latency, data))
        self.queued += len(data)
        if self.queued > self._max_queued and not self._source_paused:
            self._source_paused = True
            log.debug("{direction}: {queued} bytes queued (limit {limit}), reads paused",
                      direction=self.direction, queued=self.queued,
                      limit=self._max_queued, paused=True)
            self._source.pauseProducing()
        if len(self._queue) == 1:
            self._pump()

    def set_rate(self, rate: float | None) -> None:
        """
        Limit the pipe to C{rate} bytes per second (L{None}: no limit),
        from the next slice on.
        """
        self._rate = rate
        self._pump()

    def finish(self) -> None:
        """
        The source is gone: write what is queued, then close the
        destination.
        """
        if self._stopped:
            return
        self._finishing = True
        # Nothing more will be read: there is no source to resume.
        self._source_paused = False
        self._pump()

    def stop(self) -> None:
        """
        Drop what is queued and cancel the timer; write nothing more.
        """
        self._stopped = True
        self._cancel()
        self._queue.clear()
        self.queued = 0

    # IPushProducer, called by the destination transport ---------------------

    def pauseProducing(self) -> None:
        self._blocked = True
        self._cancel()

    def resumeProducing(self) -> None:
        self._blocked = False
        # The link was stalled, not sending: it starts again from now.
        self._idle_at = max(self._idle_at, self._clock.seconds())
        self._pump()

    def stopProducing(self) -> None:
        self.stop()

    # -------------------------------------------------------------------------

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _pump(self) -> None:
        """
        Write every slice that is due, then wait for the next one.
        """
        self._cancel()
        if self._stopped or self._destination is None or self._blocked:
            return
        now = self._clock.seconds()
        while self._queue and not (self._blocked or self._stopped):
            due, data = self._queue[0]
            size = len(data)
            ready = due
            if self._rate is not None:
                size = min(size, max(1, int(self._rate * _SLICE_SECONDS)))
                ready = max(due, self._idle_at) + size / self._rate
            if ready > now:
                self._call = self._clock.callLater(ready - now, self._pump)
                break
            if size == len(data):
                self._queue.popleft()
            else:
                self._queue[0] = (due, data[size:])
                data = data[:size]
            self.queued -= size
            if self._rate is not None:
                self._idle_at = ready
            self._forwarded(size)
            # This may pause the pipe at once if the transport's buffer is full.
            self._destination.write(data)
        if self._stopped:
            return
        if self._source_paused and self.queued <= self._max_queued // 2:
            self._source_paused = False
            log.debug("{direction}: {queued} bytes queued (limit {limit}), reads resumed",
                      direction=self.direction, queued=self.queued,
                      limit=self._max_queued, paused=False)
            self._source.resumeProducing()
        if self._finishing and not self._queue:
            self._stopped = True
            # A plain TCP transport with a paused streaming producer would
            # wake the producer rather than close.
            self._destination.unregisterProducer()
            self._destination.loseConnection()


def _no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off, where the transport is TCP: the proxy adds
    the latency it is told to and no more, while Nagle would hold a small
    write back until the peer's (delayed, up to 40 ms) ACK of the last one.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


class _ClientSide(Protocol):
    """
    The accepted connection of one proxied connection.
    """

    def __init__(self, link: _Link) -> None:
        self.link = link

    def connectionMade(self) -> None:
        _no_delay(self.transport)
        self.link.accepted()

    def dataReceived(self, data: bytes) -> None:
        self.link.from_client(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.link.client_lost()
        self.link.ended()


class _TargetSide(Protocol):
    """
    The dialled connection of one proxied connection.
    """

    def __init__(self, link: _Link) -> None:
        self.link = link

    def connectionMade(self) -> None:
        _no_delay(self.transport)
        self.link.target_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.link.from_target(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.link.target_lost()
        self.link.ended()


class _TargetFactory(ClientFactory):
    noisy = False

    def __init__(self, link: _Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _TargetSide:
        protocol = _TargetSide(self.link)
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.link.target_failed(reason)
        self.link.ended()


class _Link:
    """
    One proxied connection: the client's connection, the one dialled to
    the target for it, and a L{_Pipe} each way.

    It ends when every transport it holds is lost and a connection attempt
    still under way has failed; only then do L{when_closed} Deferreds fire.
    """

    _machine = MethodicalMachine()

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _ClientSide(self)
        self.target: _TargetSide | None = None
        self.inbound: _Pipe | None = None
        self.outbound: _Pipe | None = None
        self._connector: Any = None
        self._pending_ends = 0
        self._closed_waiters: list[Deferred[None]] = []
        self._closed = False

    def when_closed(self) -> Deferred[None]:
        """
        A fresh Deferred that fires once every connection of this link is
        lost.
        """
        if self._closed:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    def from_client(self, data: bytes) -> None:
        if self.inbound is not None:
            self.inbound.push(data)

    def from_target(self, data: bytes) -> None:
        if self.outbound is not None:
            self.outbound.push(data)

    def set_latency(self, inbound: float, outbound: float) -> None:
        for pipe, seconds in ((self.inbound, inbound), (self.outbound, outbound)):
            if pipe is not None:
                pipe.latency = seconds

    def set_rate(self, rate: float | None) -> None:
        for pipe in (self.inbound, self.outbound):
            if pipe is not None:
                pipe.set_rate(rate)

    def ended(self) -> None:
        """
        One of the link's connections (or its connection attempt) is gone.
        """
        self._pending_ends -= 1
        if self._pending_ends > 0 or self._closed:
            return
        self._closed = True
        self.proxy._forget(self)
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _client_text(self) -> str:
        peer = self.client.transport.getPeer()  # type: ignore[union-attr]
        return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"

    # Automat lifecycle -------------------------------------------------------

    @_machine.state(initial=True)
    def _new(self) -> None:
        "Built for an accepted connection that is not made yet."

    @_machine.state()
    def _dialling(self) -> None:
        "The client is connected; the target is being dialled."

    @_machine.state()
    def _open(self) -> None:
        "Both sides are connected; bytes flow both ways."

    @_machine.state()
    def _draining(self) -> None:
        "One side is gone; what is queued for the other is being written."

    @_machine.state()
    def _done(self) -> None:
        "Closing or closed: nothing more is forwarded."

    @_machine.input()
    def accepted(self) -> None:
        "The client's connection is made."

    @_machine.input()
    def target_connected(self, target: _TargetSide) -> None:
        "The target accepted the dialled connection."

    @_machine.input()
    def target_failed(self, reason: Failure) -> None:
        "Dialling the target failed (or was stopped)."

    @_machine.input()
    def client_lost(self) -> None:
        "The client's connection is gone."

    @_machine.input()
    def target_lost(self) -> None:
        "The target's connection is gone."

    @_machine.input()
    def abort(self) -> None:
        "The proxy was cut or stopped: drop everything now."

    @_machine.output()
    def _dial(self) -> None:
        proxy = self.proxy
        self._pending_ends = 2
        proxy._links.add(self)
        self.inbound = _Pipe(proxy._reactor, "in", self.client.transport,
                             proxy._latency_in, proxy._bandwidth, proxy._max_queued,
                             proxy._count)
        log.debug("accepted {client} for {target}", client=self._client_text(),
                  target=proxy._target_text())
        self._connector = proxy._reactor.connectTCP(
            proxy._target_host, proxy._target_port, _TargetFactory(self),
            timeout=proxy._connect_timeout)

    @_machine.output()
    def _join(self, target: _TargetSide) -> None:
        proxy = self.proxy
        self.target = target
        self.outbound = _Pipe(proxy._reactor, "out", target.transport,
                              proxy._latency_out, proxy._bandwidth, proxy._max_queued,
                              proxy._count)
        self.outbound.connect(self.client.transport)
        assert self.inbound is not None
        self.inbound.connect(target.transport)
        log.debug("forwarding {client} to {target}", client=self._client_text(),
                  target=proxy._target_text())

    @_machine.output()
    def _refuse_client(self, reason: Failure) -> None:
        log.info("cannot reach {target} for {client}: {reason}",
                 target=self.proxy._target_text(), client=self._client_text(),
                 reason=reason.getErrorMessage())
        assert self.inbound is not None
        self.inbound.stop()
        self.client.transport.loseConnection()  # type: ignore[union-attr]

    @_machine.output()
    def _stop_dialling(self) -> None:
        assert self.inbound is not None
        self.inbound.stop()
        # Fails the attempt at once: target_failed arrives in _done.
        self._connector.stopConnecting()

    @_machine.output()
    def _abort_client(self) -> None:
        self.client.transport.abortConnection()  # type: ignore[union-attr]

    @_machine.output()
    def _flush_to_target(self) -> None:
        assert self.inbound is not None and self.outbound is not None
        self.outbound.stop()
        self.inbound.finish()

    @_machine.output()
    def _flush_to_client(self) -> None:
        assert self.inbound is not None and self.outbound is not None
        self.inbound.stop()
        self.outbound.finish()

    @_machine.output()
    def _discard(self) -> None:
        self._discard_pipes()

    @_machine.output()
    def _abort_both(self) -> None:
        self._discard_pipes()
        # Either may be lost already; aborting a lost transport does nothing.
        self.client.transport.abortConnection()  # type: ignore[union-attr]
        assert self.target is not None
        self.target.transport.abortConnection()  # type: ignore[union-attr]

    @_machine.output()
    def _abort_late_target(self, target: _TargetSide) -> None:
        target.transport.abortConnection()  # type: ignore[union-attr]

    def _discard_pipes(self) -> None:
        for pipe in (self.inbound, self.outbound):
            if pipe is not None:
                pipe.stop()

    _new.upon(accepted, enter=_dialling, outputs=[_dial])

    _dialling.upon(target_connected, enter=_open, outputs=[_join])
    _dialling.upon(target_failed, enter=_done, outputs=[_refuse_client])
    _dialling.upon(client_lost, enter=_done, outputs=[_stop_dialling])
    _dialling.upon(abort, enter=_done, outputs=[_abort_client, _stop_dialling])

    _open.upon(client_lost, enter=_draining, outputs=[_flush_to_target])
    _open.upon(target_lost, enter=_draining, outputs=[_flush_to_client])
    _open.upon(abort, enter=_done, outputs=[_abort_both])

    _draining.upon(client_lost, enter=_done, outputs=[_discard])
    _draining.upon(target_lost, enter=_done, outputs=[_discard])
    _draining.upon(abort, enter=_done, outputs=[_abort_both])

    _done.upon(target_connected, enter=_done, outputs=[_abort_late_target])
    _done.upon(target_failed, enter=_done, outputs=[])
    _done.upon(client_lost, enter=_done, outputs=[])
    _done.upon(target_lost, enter=_done, outputs=[])
    _done.upon(abort, enter=_done, outputs=[])


class _Refused(Protocol):
    """
    A connection accepted while the proxy is cut or stopping: aborted as
    soon as it is made.
    """

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self._lost_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        log.debug("refused {client}: the proxy is cut",
                  client=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}")
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.proxy._refused.discard(self)
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_lost(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._lost_waiters.append(waiter)
        return waiter


class _ListenFactory(Factory):
    noisy = False

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.proxy._accept()


class FaultProxy:
    """
    One listening address that forwards every connection to one target.

    Each accepted connection gets its own connection to the target, dialled
    when the client connects; if the target cannot be reached, the client's
    connection is closed. When either side closes, the proxy writes what it
    still holds for the other side, then closes that side too.

    Latency is added to each chunk from the time it is received, so it
    delays data without dividing throughput by it; a change applies to data
    received afterwards, and data is never reordered. A bandwidth limit
    paces each direction of each connection on its own: each slice of data
    is written once its transmission time has passed, so N bytes take at
    least N / rate seconds. Each direction holds at most C{max_queued} bytes
    before the proxy stops reading from the side that sends them.

    @ivar port: the listening port number, once L{start} returned.
    @ivar bytes_forwarded: bytes written so far, both directions, all
        connections.
    """

    def __init__(self, reactor: Any, target_host: str, target_port: int, *,
                 interface: str = "127.0.0.1", latency: float = 0.0,
                 latency_in: float | None = None, latency_out: float | None = None,
                 bandwidth: float | None = None, max_queued: int = MAX_QUEUED,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        """
        @param reactor: an L{IReactorTCP} and L{IReactorTime}.
        @param target_host: the address (or name) to forward to.
        @param target_port: the port to forward to.
        @param interface: the address to listen on.
        @param latency: seconds added to each chunk, each direction.
        @param latency_in: seconds added client to target, instead of
            C{latency}.
        @param latency_out: seconds added target to client, instead of
            C{latency}.
        @param bandwidth: bytes per second, per direction per connection;
            L{None} for no limit.
        @param max_queued: bytes one direction of one connection holds
            before the proxy pauses reading from its sender.
        @param connect_timeout: seconds to wait for the target to accept.

        @raise ValueError: for a negative latency, a bandwidth that is not
            positive, or a C{max_queued} below 1.
        """
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, not {max_queued!r}")
        _check_latency(latency)
        self._reactor = reactor
        self._target_host = target_host
        self._target_port = target_port
        self._interface = interface
        self._latency_in = _check_latency(latency if latency_in is None else latency_in)
        self._latency_out = _check_latency(latency if latency_out is None else latency_out)
        self._bandwidth = _check_bandwidth(bandwidth)
        self._max_queued = max_queued
        self._connect_timeout = connect_timeout
        self._listening: IListeningPort | None = None
        self._links: set[_Link] = set()
        self._refused: set[_Refused] = set()
        self._cut = False
        self._stopping = False
        self.port: int | None = None
        self.bytes_forwarded = 0

    async def start(self) -> int:
        """
        Listen on the interface, on a port the system chooses.

        @return: the port number (also L{port}).

        @raise RuntimeError: if the proxy was started already.
        """
        if self.port is not None or self._stopping:
            raise RuntimeError("this FaultProxy was started already")
        self._listening = self._reactor.listenTCP(
            0, _ListenFactory(self), interface=self._interface)
        self.port = self._listening.getHost().port
        log.debug("proxy on {address} for {target}", address=self.address,
                  target=self._target_text())
        return self.port

    @property
    def address(self) -> str:
        """
        Where clients connect: "127.0.0.1:PORT", or "[::1]:PORT" for an
        IPv6 interface.

        @raise RuntimeError: before L{start}.
        """
        if self.port is None:
            raise RuntimeError("this FaultProxy is not started")
        if ":" in self._interface:
            return f"[{self._interface}]:{self.port}"
        return f"{self._interface}:{self.port}"

    @property
    def connections(self) -> int:
        """
        How many proxied connections are open (or closing).
        """
        return len(self._links)

    def set_latency(self, seconds: float, direction: str = "both") -> None:
        """
        Add C{seconds} to data received from now on.

        @param direction: "in" (client to target), "out" (target to client)
            or "both".

        @raise ValueError: for a negative latency or another direction.
        """
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, not {direction!r}")
        seconds = _check_latency(seconds)
        if direction in ("in", "both"):
            self._latency_in = seconds
        if direction in ("out", "both"):
            self._latency_out = seconds
        for link in self._links:
            link.set_latency(self._latency_in, self._latency_out)

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        """
        Limit each direction of each connection, open ones included, to
        C{bytes_per_second}; L{None} lifts the limit.

        @raise ValueError: for a bandwidth that is not positive.
        """
        self._bandwidth = _check_bandwidth(bytes_per_second)
        for link in self._links:
            link.set_rate(self._bandwidth)

    def cut(self) -> None:
        """
        Partition: abort every open connection, both sides, dropping what
        is queued, and accept then abort at once every new one until
        L{restore}.
        """
        self._cut = True
        log.info("proxy on port {port} cut, dropping {count} connections",
                 port=self.port, count=len(self._links))
        for link in list(self._links):
            link.abort()

    def restore(self) -> None:
        """
        End a L{cut}: new connections are forwarded again.
        """
        self._cut = False
        log.info("proxy on port {port} restored", port=self.port)

    async def stop(self) -> None:
        """
        Stop listening and abort every connection.

        Returns once the listening port is closed, every connection's
        connectionLost has run, and no timer of the proxy is pending.
        """
        self._stopping = True
        waits: list[Deferred[Any]] = []
        if self._listening is not None:
            stopped = self._listening.stopListening()
            self._listening = None
            if stopped is not None:
                waits.append(stopped)
        for link in list(self._links):
            waits.append(link.when_closed())
            link.abort()
        for refused in list(self._refused):
            waits.append(refused.when_lost())
        await DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)

    # Called by the links and factories ---------------------------------------

    def _accept(self) -> Protocol:
        if self._cut or self._stopping:
            refused = _Refused(self)
            self._refused.add(refused)
            return refused
        return _Link(self).client

    def _forget(self, link: _Link) -> None:
        self._links.discard(link)

    def _count(self, size: int) -> None:
        self.bytes_forwarded += size

    def _target_text(self) -> str:
        if ":" in self._target_host:
            return f"[{self._target_host}]:{self._target_port}"
        return f"{self._target_host}:{self._target_port}"
