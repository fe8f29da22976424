"""
Tests for dtable.faults: the fault-injecting proxy.

Exact timing, ordering, pacing and clean-up are checked on a
MemoryReactorClock with StringTransports; forwarding, latency, bandwidth,
partitions, backpressure and shutdown over real loopback connections,
TLS included.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import pytest_twisted
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dtable.crypto import (
    derive_network,
    generate_network_key,
    issue_node_certificate,
    new_node_id,
    node_id_from_certificate,
    parse_network_key,
    tls_options,
)
from dtable.faults import FaultProxy

# Every wait on the network is bounded by this many seconds.
TIMEOUT = 10

# Slack for float arithmetic in lower bounds on elapsed time.
EPSILON = 1e-3


# --- on a memory reactor ---------------------------------------------------


class _Wired:
    """
    A FaultProxy on a MemoryReactorClock, and one connection through it
    whose client and target ends are StringTransports.
    """

    def __init__(self, case: SynchronousTestCase, connect_target: bool = True,
                 **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.proxy = FaultProxy(self.reactor, "192.0.2.7", 4000, **options)
        case.successResultOf(Deferred.fromCoroutine(self.proxy.start()))
        (_, listening, _, interface) = self.reactor.tcpServers[0]
        case.assertEqual(interface, "127.0.0.1")
        self.client = listening.buildProtocol(None)
        self.client_transport = StringTransport()
        self.client.makeConnection(self.client_transport)
        (host, port, self.target_factory, timeout, _) = self.reactor.tcpClients[0]
        case.assertEqual((host, port), ("192.0.2.7", 4000))
        self.connector = self.reactor.connectors[0]
        self.target: Protocol | None = None
        self.target_transport = StringTransport()
        if connect_target:
            self.connect_target()

    def connect_target(self) -> None:
        self.target = self.target_factory.buildProtocol(None)
        self.target.makeConnection(self.target_transport)

    def advance_to(self, when: float) -> None:
        self.reactor.advance(when - self.reactor.seconds())

    def sent(self) -> bytes:
        """What reached the target so far."""
        return self.target_transport.value()

    def returned(self) -> bytes:
        """What reached the client so far."""
        return self.client_transport.value()


class ProxyOnClockTests(SynchronousTestCase):
    """
    The proxy's scheduling, driven by a fake clock.
    """

    def test_forwards_both_ways_without_delay(self) -> None:
        wired = _Wired(self)
        wired.client.dataReceived(b"request")
        wired.target.dataReceived(b"response")
        self.assertEqual(wired.sent(), b"request")
        self.assertEqual(wired.returned(), b"response")
        self.assertEqual(wired.proxy.bytes_forwarded, 15)
        self.assertEqual(wired.proxy.connections, 1)
        self.assertEqual(wired.reactor.getDelayedCalls(), [])

    def test_latency_per_chunk(self) -> None:
        """
        Each chunk is delayed from the time it was received, so chunks
        sent in a stream arrive in a stream, not one latency apart.
        """
        wired = _Wired(self, latency=1.0)
        for index in range(3):
            wired.advance_to(index * 0.1)
            wired.client.dataReceived(b"%d," % index)
        wired.advance_to(0.95)
        self.assertEqual(wired.sent(), b"")
        wired.advance_to(1.05)
        self.assertEqual(wired.sent(), b"0,")
        wired.advance_to(1.25)
        self.assertEqual(wired.sent(), b"0,1,2,")

    def test_each_direction(self) -> None:
        wired = _Wired(self, latency=5.0, latency_in=0.2, latency_out=0.5)
        wired.client.dataReceived(b"in")
        wired.target.dataReceived(b"out")
        wired.advance_to(0.2)
        self.assertEqual((wired.sent(), wired.returned()), (b"in", b""))
        wired.advance_to(0.5)
        self.assertEqual(wired.returned(), b"out")

    def test_latency_change_keeps_order(self) -> None:
        """
        A lower latency applies to data received afterwards, which still
        waits behind the data received before.
        """
        wired = _Wired(self, latency=1.0)
        wired.client.dataReceived(b"0,")
        wired.advance_to(0.1)
        wired.client.dataReceived(b"1,")
        wired.proxy.set_latency(0.0)
        wired.advance_to(0.2)
        wired.client.dataReceived(b"2,")
        self.assertEqual(wired.sent(), b"")
        wired.advance_to(1.0)
        self.assertEqual(wired.sent(), b"0,")
        wired.advance_to(1.1)
        self.assertEqual(wired.sent(), b"0,1,2,")
        wired.client.dataReceived(b"3,")
        self.assertEqual(wired.sent(), b"0,1,2,3,")

    def test_latency_change_one_direction(self) -> None:
        wired = _Wired(self)
        wired.proxy.set_latency(0.5, direction="out")
        wired.client.dataReceived(b"in")
        wired.target.dataReceived(b"out")
        self.assertEqual((wired.sent(), wired.returned()), (b"in", b""))
        wired.advance_to(0.5)
        self.assertEqual(wired.returned(), b"out")

    def test_bandwidth_paces_slices(self) -> None:
        """
        At 1000 bytes per second, 100 bytes take 0.1 s: each slice is
        written once its transmission time has passed.
        """
        wired = _Wired(self, bandwidth=1000)
        wired.client.dataReceived(b"x" * 100)
        self.assertEqual(wired.sent(), b"")
        wired.advance_to(0.045)
        self.assertEqual(len(wired.sent()), 40)
        wired.advance_to(0.095)
        self.assertEqual(len(wired.sent()), 90)
        wired.advance_to(0.105)
        self.assertEqual(wired.sent(), b"x" * 100)
        self.assertEqual(wired.reactor.getDelayedCalls(), [])

    def test_bandwidth_after_latency(self) -> None:
        wired = _Wired(self, latency=1.0, bandwidth=1000)
        wired.target.dataReceived(b"y" * 20)
        wired.advance_to(1.015)
        self.assertEqual(wired.returned(), b"y" * 10)
        wired.advance_to(1.025)
        self.assertEqual(wired.returned(), b"y" * 20)

    def test_bandwidth_lifted_and_changed(self) -> None:
        wired = _Wired(self, bandwidth=1000)
        wired.client.dataReceived(b"x" * 100)
        wired.advance_to(0.015)
        self.assertEqual(len(wired.sent()), 10)
        wired.proxy.set_bandwidth(None)
        self.assertEqual(len(wired.sent()), 100)
        wired.proxy.set_bandwidth(100)
        wired.client.dataReceived(b"z" * 2)
        wired.advance_to(0.015 + 0.015)
        self.assertEqual(len(wired.sent()), 101)
        wired.advance_to(0.015 + 0.025)
        self.assertEqual(len(wired.sent()), 102)

    def test_data_before_target_connects(self) -> None:
        wired = _Wired(self, connect_target=False, latency=0.5)
        wired.client.dataReceived(b"early")
        wired.advance_to(0.2)
        wired.connect_target()
        self.assertEqual(wired.sent(), b"")
        wired.advance_to(0.5)
        self.assertEqual(wired.sent(), b"early")

    def test_queue_bound_pauses_sender(self) -> None:
        """
        Past max_queued bytes the proxy stops reading from the sender, and
        starts again once half of them are written.
        """
        wired = _Wired(self, latency=1.0, max_queued=100)
        wired.client.dataReceived(b"a" * 30)
        wired.advance_to(0.2)
        wired.client.dataReceived(b"b" * 30)
        wired.advance_to(0.5)
        self.assertEqual(wired.client_transport.producerState, "producing")
        wired.client.dataReceived(b"c" * 50)
        self.assertEqual(wired.client_transport.producerState, "paused")
        wired.advance_to(1.0)
        self.assertEqual(wired.sent(), b"a" * 30)
        self.assertEqual(wired.client_transport.producerState, "paused")
        wired.advance_to(1.2)
        self.assertEqual(wired.sent(), b"a" * 30 + b"b" * 30)
        self.assertEqual(wired.client_transport.producerState, "producing")
        wired.advance_to(1.5)
        self.assertEqual(wired.sent(), b"a" * 30 + b"b" * 30 + b"c" * 50)

    def test_receiver_that_stops_reading_stops_the_proxy(self) -> None:
        """
        The proxy is the producer of each transport it writes to: when that
        transport pauses it, data waits in the proxy, and past the bound the
        proxy pauses the sender.
        """
        wired = _Wired(self, max_queued=10)
        pipe = wired.target_transport.producer
        self.assertIsNotNone(pipe)
        self.assertTrue(wired.target_transport.streaming)
        pipe.pauseProducing()
        wired.client.dataReceived(b"abcdef")
        self.assertEqual(wired.sent(), b"")
        self.assertEqual(wired.client_transport.producerState, "producing")
        wired.client.dataReceived(b"ghijkl")
        self.assertEqual(wired.client_transport.producerState, "paused")
        pipe.resumeProducing()
        self.assertEqual(wired.sent(), b"abcdefghijkl")
        self.assertEqual(wired.client_transport.producerState, "producing")

    def test_client_close_flushes_then_closes_target(self) -> None:
        wired = _Wired(self, latency=1.0)
        wired.client.dataReceived(b"last words")
        wired.client.connectionLost(Failure(error.ConnectionDone()))
        self.assertFalse(wired.target_transport.disconnecting)
        wired.advance_to(1.0)
        self.assertEqual(wired.sent(), b"last words")
        self.assertTrue(wired.target_transport.disconnecting)
        self.assertIsNone(wired.target_transport.producer)
        self.assertEqual(wired.proxy.connections, 1)
        wired.target.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(wired.proxy.connections, 0)

    def test_target_close_flushes_then_closes_client(self) -> None:
        wired = _Wired(self, latency=1.0)
        wired.client.dataReceived(b"dropped: the target is gone")
        wired.target.dataReceived(b"goodbye")
        wired.target.connectionLost(Failure(error.ConnectionDone()))
        wired.advance_to(1.0)
        self.assertEqual(wired.sent(), b"")
        self.assertEqual(wired.returned(), b"goodbye")
        self.assertTrue(wired.client_transport.disconnecting)
        wired.client.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(wired.proxy.connections, 0)
        self.assertEqual(wired.reactor.getDelayedCalls(), [])

    def test_target_refused_closes_client(self) -> None:
        wired = _Wired(self, connect_target=False)
        wired.client.dataReceived(b"hello?")
        wired.target_factory.clientConnectionFailed(
            wired.connector, Failure(error.ConnectionRefusedError()))
        self.assertTrue(wired.client_transport.disconnecting)
        self.assertFalse(wired.client_transport.disconnected)
        wired.client.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(wired.proxy.connections, 0)

    def test_client_gone_while_dialling(self) -> None:
        wired = _Wired(self, connect_target=False)
        wired.client.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(wired.connector.stoppedConnecting)
        self.assertEqual(wired.proxy.connections, 1)
        # What a real connector does when told to stop.
        wired.target_factory.clientConnectionFailed(
            wired.connector, Failure(error.UserError()))
        self.assertEqual(wired.proxy.connections, 0)

    def test_cut_aborts_and_refuses(self) -> None:
        wired = _Wired(self, latency=1.0)
        wired.client.dataReceived(b"in flight")
        wired.proxy.cut()
        self.assertTrue(wired.client_transport.disconnected)
        self.assertTrue(wired.target_transport.disconnected)
        self.assertEqual(wired.reactor.getDelayedCalls(), [])
        wired.client.connectionLost(Failure(error.ConnectionAborted()))
        wired.target.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(wired.proxy.connections, 0)
        self.assertEqual(wired.sent(), b"")

        listening = wired.reactor.tcpServers[0][1]
        refused = listening.buildProtocol(None)
        refused_transport = StringTransport()
        refused.makeConnection(refused_transport)
        self.assertTrue(refused_transport.disconnected)
        self.assertEqual(len(wired.reactor.tcpClients), 1)
        refused.connectionLost(Failure(error.ConnectionAborted()))

        wired.proxy.restore()
        accepted = listening.buildProtocol(None)
        accepted.makeConnection(StringTransport())
        self.assertEqual(len(wired.reactor.tcpClients), 2)
        self.assertEqual(wired.proxy.connections, 1)

    def test_stop_waits_for_every_connection(self) -> None:
        wired = _Wired(self, latency=1.0)
        wired.client.dataReceived(b"in flight")
        wired.target.dataReceived(b"and back")
        self.assertNotEqual(wired.reactor.getDelayedCalls(), [])
        stopped = Deferred.fromCoroutine(wired.proxy.stop())
        self.assertEqual(wired.reactor.getDelayedCalls(), [])
        self.assertTrue(wired.client_transport.disconnected)
        self.assertTrue(wired.target_transport.disconnected)
        self.assertNoResult(stopped)
        wired.client.connectionLost(Failure(error.ConnectionAborted()))
        self.assertNoResult(stopped)
        wired.target.connectionLost(Failure(error.ConnectionAborted()))
        self.successResultOf(stopped)
        self.assertEqual(wired.proxy.connections, 0)
        self.assertEqual((wired.sent(), wired.returned()), (b"", b""))

    def test_stop_while_dialling(self) -> None:
        wired = _Wired(self, connect_target=False)
        stopped = Deferred.fromCoroutine(wired.proxy.stop())
        self.assertTrue(wired.connector.stoppedConnecting)
        self.assertTrue(wired.client_transport.disconnected)
        wired.target_factory.clientConnectionFailed(
            wired.connector, Failure(error.UserError()))
        self.assertNoResult(stopped)
        wired.client.connectionLost(Failure(error.ConnectionAborted()))
        self.successResultOf(stopped)

    def test_address(self) -> None:
        wired = _Wired(self)
        self.assertEqual(wired.proxy.address, f"127.0.0.1:{wired.proxy.port}")
        proxy = FaultProxy(MemoryReactorClock(), "::1", 1, interface="::1")
        with self.assertRaises(RuntimeError):
            proxy.address
        self.successResultOf(Deferred.fromCoroutine(proxy.start()))
        self.assertEqual(proxy.address, f"[::1]:{proxy.port}")
        self.failureResultOf(Deferred.fromCoroutine(proxy.start()), RuntimeError)

    def test_invalid_settings(self) -> None:
        reactor = MemoryReactorClock()
        with self.assertRaises(ValueError):
            FaultProxy(reactor, "127.0.0.1", 1, latency=-1)
        with self.assertRaises(ValueError):
            FaultProxy(reactor, "127.0.0.1", 1, latency_out=-0.1)
        with self.assertRaises(ValueError):
            FaultProxy(reactor, "127.0.0.1", 1, bandwidth=0)
        with self.assertRaises(ValueError):
            FaultProxy(reactor, "127.0.0.1", 1, max_queued=0)
        proxy = FaultProxy(reactor, "127.0.0.1", 1)
        with self.assertRaises(ValueError):
            proxy.set_latency(0.1, direction="sideways")
        with self.assertRaises(ValueError):
            proxy.set_latency(-0.1)
        with self.assertRaises(ValueError):
            proxy.set_bandwidth(-5)


# --- over loopback -----------------------------------------------------------


class _Peer(Protocol):
    """
    One end of a test connection: records what it receives, and echoes it
    if asked to.
    """

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received = bytearray()
        self.lost_reason: Failure | None = None
        self._made: list[Deferred[_Peer]] = []
        self._received_waiters: list[tuple[int, Deferred[float]]] = []
        self._lost_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        waiters, self._made = self._made, []
        for waiter in waiters:
            waiter.callback(self)

    def dataReceived(self, data: bytes) -> None:
        from twisted.internet import reactor

        if self.echo:
            self.transport.write(data)
        self.received += data
        now = reactor.seconds()
        waiting, self._received_waiters = self._received_waiters, []
        for size, waiter in waiting:
            if len(self.received) >= size:
                waiter.callback(now)
            else:
                self._received_waiters.append((size, waiter))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost_reason = reason
        for _, waiter in self._received_waiters:
            waiter.errback(reason)
        self._received_waiters = []
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def connection_failed(self, reason: Failure) -> None:
        made, self._made = self._made, []
        for waiter in made:
            waiter.errback(reason)
        self.connectionLost(reason)

    def when_made(self) -> Deferred[_Peer]:
        from twisted.internet import reactor

        waiter: Deferred[_Peer] = Deferred()
        if self.connected:
            waiter.callback(self)
        else:
            self._made.append(waiter)
        return waiter.addTimeout(TIMEOUT, reactor)

    def when_received(self, size: int) -> Deferred[float]:
        """
        Fire with the reactor's time when C{size} bytes in all have
        arrived.
        """
        from twisted.internet import reactor

        waiter: Deferred[float] = Deferred()
        if len(self.received) >= size:
            waiter.callback(reactor.seconds())
        else:
            self._received_waiters.append((size, waiter))
        return waiter.addTimeout(TIMEOUT, reactor)

    def when_lost(self) -> Deferred[None]:
        """
        Fire (with L{None}; the reason is in C{lost_reason}) once the
        connection is lost or could not be made.
        """
        from twisted.internet import reactor

        waiter: Deferred[None] = Deferred()
        if self.lost_reason is not None:
            waiter.callback(None)
        else:
            self._lost_waiters.append(waiter)
        return waiter.addTimeout(TIMEOUT, reactor)


class _ServerFactory(Factory):
    noisy = False

    def __init__(self, scene: _Scene, make: Callable[[], _Peer]) -> None:
        self.scene = scene
        self.make = make
        self.peers: list[_Peer] = []
        self._waiters: list[tuple[int, Deferred[_Peer]]] = []

    def buildProtocol(self, addr: object) -> _Peer:
        peer = self.make()
        peer.factory = self
        self.peers.append(peer)
        self.scene.peers.append(peer)
        waiting, self._waiters = self._waiters, []
        for count, waiter in waiting:
            if len(self.peers) >= count:
                waiter.callback(self.peers[count - 1])
            else:
                self._waiters.append((count, waiter))
        return peer

    def when_connection(self, count: int = 1) -> Deferred[_Peer]:
        """
        Fire with the C{count}th connection accepted.
        """
        from twisted.internet import reactor

        waiter: Deferred[_Peer] = Deferred()
        if len(self.peers) >= count:
            waiter.callback(self.peers[count - 1])
        else:
            self._waiters.append((count, waiter))
        return waiter.addTimeout(TIMEOUT, reactor)


class _ClientFactory(ClientFactory):
    noisy = False

    def __init__(self, peer: _Peer) -> None:
        self.peer = peer

    def buildProtocol(self, addr: object) -> _Peer:
        self.peer.factory = self
        return self.peer

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.peer.connection_failed(reason)


class _Scene:
    """
    Everything one test opens on loopback, for L{_scene} to close.
    """

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.ports: list[Any] = []
        self.peers: list[_Peer] = []
        self.proxies: list[FaultProxy] = []

    def listen(self, make: Callable[[], _Peer] = lambda: _Peer(echo=True),
               tls: Any = None) -> tuple[int, _ServerFactory]:
        factory = _ServerFactory(self, make)
        if tls is None:
            port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            port = self.reactor.listenSSL(0, factory, tls, interface="127.0.0.1")
        self.ports.append(port)
        return port.getHost().port, factory

    def dial(self, port: int, peer: _Peer | None = None, tls: Any = None) -> _Peer:
        peer = _Peer() if peer is None else peer
        self.peers.append(peer)
        factory = _ClientFactory(peer)
        if tls is None:
            self.reactor.connectTCP("127.0.0.1", port, factory, timeout=TIMEOUT)
        else:
            self.reactor.connectSSL("127.0.0.1", port, factory, tls, timeout=TIMEOUT)
        return peer

    async def proxy(self, target_port: int, **options: Any) -> FaultProxy:
        proxy = FaultProxy(self.reactor, "127.0.0.1", target_port, **options)
        self.proxies.append(proxy)
        await proxy.start()
        return proxy

    async def close(self) -> None:
        for proxy in self.proxies:
            await Deferred.fromCoroutine(proxy.stop()).addTimeout(TIMEOUT, self.reactor)
        for peer in self.peers:
            if peer.lost_reason is None and peer.transport is not None:
                peer.transport.abortConnection()
        await DeferredList([peer.when_lost() for peer in self.peers],
                           fireOnOneErrback=True, consumeErrors=True)
        for port in self.ports:
            await port.stopListening()


@asynccontextmanager
async def _scene() -> AsyncIterator[_Scene]:
    scene = _Scene()
    try:
        yield scene
    finally:
        await scene.close()


async def _round_trip(peer: _Peer, data: bytes) -> float:
    """
    Send C{data} to an echo server and wait for it to come back.

    @return: the seconds it took.
    """
    from twisted.internet import reactor

    start = reactor.seconds()
    expected = len(peer.received) + len(data)
    peer.transport.write(data)
    arrived = await peer.when_received(expected)
    return arrived - start


@pytest_twisted.ensureDeferred
async def test_bytes_round_trip_intact() -> None:
    async with _scene() as scene:
        target_port, server = scene.listen()
        proxy = await scene.proxy(target_port)
        client = await scene.dial(proxy.port).when_made()
        payload = os.urandom(256 * 1024)
        await _round_trip(client, payload)
        assert bytes(client.received) == payload
        echo = await server.when_connection()
        assert bytes(echo.received) == payload
        assert proxy.connections == 1
        assert proxy.bytes_forwarded == 2 * len(payload)

        # A client that closes has the proxy close the target side too.
        client.transport.loseConnection()
        await echo.when_lost()
        assert echo.lost_reason.check(error.ConnectionDone)
        await client.when_lost()
        assert proxy.connections == 0


@pytest_twisted.ensureDeferred
async def test_latency_delays_each_direction() -> None:
    from twisted.internet import reactor

    async with _scene() as scene:
        target_port, server = scene.listen()
        proxy = await scene.proxy(target_port, latency=0.1)
        client = await scene.dial(proxy.port).when_made()
        assert await _round_trip(client, b"ping") >= 0.2 - EPSILON

        # Each direction on its own.
        proxy.set_latency(0.05, direction="in")
        proxy.set_latency(0.25, direction="out")
        echo = await server.when_connection()
        start = reactor.seconds()
        client.transport.write(b"pong")
        reached_target = await echo.when_received(8)
        came_back = await client.when_received(8)
        assert reached_target - start >= 0.05 - EPSILON
        assert came_back - start >= 0.3 - EPSILON
        assert bytes(client.received) == b"pingpong"


@pytest_twisted.ensureDeferred
async def test_latency_change_keeps_order() -> None:
    """
    Chunks received under a long latency, then chunks under none: every
    chunk arrives, in the order sent.
    """
    from twisted.internet import reactor

    async with _scene() as scene:
        target_port, server = scene.listen()
        proxy = await scene.proxy(target_port, latency=0.25)
        client = await scene.dial(proxy.port).when_made()
        direct = await scene.dial(target_port).when_made()
        chunks = [b"chunk %03d;" % index for index in range(40)]

        start = reactor.seconds()
        for chunk in chunks[:20]:
            client.transport.write(chunk)
        # A round trip on a direct connection takes more reactor turns than
        # the proxy needs to read what the client wrote in the same turn.
        await _round_trip(direct, b"barrier")
        proxy.set_latency(0.0)
        for chunk in chunks[20:]:
            client.transport.write(chunk)

        expected = b"".join(chunks)
        first_back = await client.when_received(len(chunks[0]))
        await client.when_received(len(expected))
        echo = await server.when_connection()
        assert bytes(echo.received) == expected
        assert bytes(client.received) == expected
        # The first half went in under the old latency.
        assert first_back - start >= 0.25 - EPSILON


@pytest_twisted.ensureDeferred
async def test_bandwidth_limits_transfer() -> None:
    from twisted.internet import reactor

    async with _scene() as scene:
        target_port, server = scene.listen()
        proxy = await scene.proxy(target_port)
        client = await scene.dial(proxy.port).when_made()
        await _round_trip(client, b"hello")
        echo = await server.when_connection()

        rate = 200_000
        payload = os.urandom(100_000)
        proxy.set_bandwidth(rate)
        start = reactor.seconds()
        client.transport.write(payload)
        reached_target = await echo.when_received(5 + len(payload))
        await client.when_received(5 + len(payload))
        assert reached_target - start >= len(payload) / rate - EPSILON
        assert bytes(client.received) == b"hello" + payload

        proxy.set_bandwidth(None)
        await _round_trip(client, b"unlimited")
        assert bytes(client.received).endswith(b"unlimited")


@pytest_twisted.ensureDeferred
async def test_cut_drops_and_refuses_until_restored() -> None:
    async with _scene() as scene:
        target_port, server = scene.listen()
        proxy = await scene.proxy(target_port)
        first = await scene.dial(proxy.port).when_made()
        await _round_trip(first, b"before")
        echo = await server.when_connection()

        proxy.cut()
        await first.when_lost()
        assert first.lost_reason.check(error.ConnectionLost, error.ConnectionDone)
        await echo.when_lost()
        assert proxy.connections == 0

        # Accepted, then dropped at once, without reaching the target.
        refused = scene.dial(proxy.port)
        await refused.when_lost()
        assert bytes(refused.received) == b""
        assert len(server.peers) == 1
        assert proxy.connections == 0

        proxy.restore()
        again = await scene.dial(proxy.port).when_made()
        await _round_trip(again, b"after")
        assert bytes(again.received) == b"after"
        assert len(server.peers) == 2


@pytest_twisted.ensureDeferred
async def test_backpressure_from_a_receiver_that_stops_reading() -> None:
    """
    A target that stops reading fills the proxy's queue for it; past the
    bound the proxy stops reading from the client. Nothing is lost.
    """
    from twisted.internet import reactor

    limit = 64 * 1024
    events: list[dict] = []
    paused: Deferred[None] = Deferred()

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "dtable.faults" and "queued" in event:
            events.append(event)
            if event["paused"] and event["direction"] == "in" and not paused.called:
                paused.callback(None)

    def sink() -> _Peer:
        peer = _Peer()
        peer.connectionMade = lambda: peer.transport.pauseProducing()  # type: ignore[method-assign]
        return peer

    globalLogPublisher.addObserver(observe)
    try:
        async with _scene() as scene:
            target_port, server = scene.listen(make=sink)
            proxy = await scene.proxy(target_port, max_queued=limit)
            client = await scene.dial(proxy.port).when_made()
            payload = os.urandom(16 * 1024 * 1024)
            client.transport.write(payload)
            await paused.addTimeout(TIMEOUT, reactor)
            receiver = await server.when_connection()
            receiver.transport.resumeProducing()
            await receiver.when_received(len(payload))
            assert bytes(receiver.received) == payload
    finally:
        globalLogPublisher.removeObserver(observe)
    pauses = [event for event in events if event["paused"]]
    assert pauses and all(event["queued"] > event["limit"] == limit for event in pauses)
    assert any(not event["paused"] for event in events)


@pytest_twisted.ensureDeferred
async def test_stop_leaves_nothing_behind() -> None:
    from twisted.internet import reactor

    before = set(reactor.getDelayedCalls())
    async with _scene() as scene:
        target_port, server = scene.listen()
        proxy = await scene.proxy(target_port, latency=0.5)
        client = await scene.dial(proxy.port).when_made()
        direct = await scene.dial(target_port).when_made()
        client.transport.write(b"in flight")
        await _round_trip(direct, b"barrier")
        assert [call for call in reactor.getDelayedCalls() if call not in before]

        await Deferred.fromCoroutine(proxy.stop()).addTimeout(TIMEOUT, reactor)
        assert proxy.connections == 0
        assert [call for call in reactor.getDelayedCalls() if call not in before] == []
        await client.when_lost()
        assert bytes(client.received) == b""


@pytest_twisted.ensureDeferred
async def test_target_down_closes_client() -> None:
    from twisted.internet import reactor

    async with _scene() as scene:
        closed = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        target_port = closed.getHost().port
        await closed.stopListening()
        proxy = await scene.proxy(target_port)
        client = await scene.dial(proxy.port).when_made()
        client.transport.write(b"anyone there?")
        await client.when_lost()
        assert client.lost_reason.check(error.ConnectionDone)
        assert bytes(client.received) == b""
        assert proxy.connections == 0


@pytest_twisted.ensureDeferred
async def test_tls_passes_through() -> None:
    network = derive_network(parse_network_key(generate_network_key()))
    server_identity = issue_node_certificate(network, new_node_id())
    client_identity = issue_node_certificate(network, new_node_id())

    async with _scene() as scene:
        target_port, server = scene.listen(tls=tls_options(network, server_identity))
        proxy = await scene.proxy(target_port, latency=0.02)
        client = scene.dial(proxy.port, tls=tls_options(network, client_identity))
        await client.when_made()
        await _round_trip(client, b"hello over TLS\r\n")
        assert bytes(client.received) == b"hello over TLS\r\n"
        certificate = client.transport.getPeerCertificate()
        assert node_id_from_certificate(certificate) == server_identity.node_id
        echo = await server.when_connection()
        assert node_id_from_certificate(
            echo.transport.getPeerCertificate()) == client_identity.node_id
        assert proxy.bytes_forwarded > 2 * len(b"hello over TLS\r\n")
