"""
Tests for the TLS under peer links (L{dtable.links}): both sides encrypt
each frame as it is written, and a node dials over that TLS by default.
"""

from __future__ import annotations

from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from dtable import crypto
from dtable.links import GuardedTLSFactory, LinkTLSFactory, tls_connector

PUMP_LIMIT = 50


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class _RecorderServerFactory(ServerFactory):
    """
    A server factory whose protocols only record what they receive.
    """

    def __init__(self) -> None:
        self.built: list[_Recorder] = []

    def buildProtocol(self, addr: object) -> _Recorder:
        protocol = _Recorder()
        self.built.append(protocol)
        return protocol


def _options():
    network = crypto.derive_network(crypto.parse_network_key(crypto.generate_network_key()))
    return [
        crypto.tls_options(network, crypto.issue_node_certificate(network, crypto.new_node_id()))
        for _ in range(2)
    ]


def _pump(a: StringTransport, a_protocol: Protocol,
          b: StringTransport, b_protocol: Protocol) -> None:
    """
    Carry bytes both ways until neither side has anything to say.
    """
    for _ in range(PUMP_LIMIT):
        a_out, b_out = a.value(), b.value()
        a.clear()
        b.clear()
        if not a_out and not b_out:
            return
        if a_out:
            b_protocol.dataReceived(a_out)
        if b_out:
            a_protocol.dataReceived(b_out)
    raise AssertionError(f"still talking after {PUMP_LIMIT} exchanges")


class WriteAsSentTests(SynchronousTestCase):
    """
    A frame written to a link is encrypted and handed to TCP in the same
    turn, on the dialling side and the listening side alike.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        client_options, server_options = _options()
        self.server_factory = _RecorderServerFactory()
        listening = GuardedTLSFactory(server_options, self.server_factory, lambda address: True)
        self.client_app = _Recorder()
        dialling = LinkTLSFactory(client_options, True,
                                  ClientFactory.forProtocol(lambda: self.client_app),
                                  clock=self.clock)
        self.client = dialling.buildProtocol(None)
        self.server = listening.buildProtocol(None)
        self.client_wire, self.server_wire = StringTransport(), StringTransport()
        self.server.makeConnection(self.server_wire)
        self.client.makeConnection(self.client_wire)
        _pump(self.client_wire, self.client, self.server_wire, self.server)
        [self.server_app] = self.server_factory.built

    def test_plain_tls_protocol(self) -> None:
        """
        Both sides use the TLS protocol that writes at once, not Twisted's
        default that aggregates small writes until the next turn.
        """
        self.assertIs(type(self.client), TLSMemoryBIOProtocol)
        self.assertIs(type(self.server), TLSMemoryBIOProtocol)

    def test_client_frame_written_at_once(self) -> None:
        self.client_app.transport.write(b"frame from the dialler")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.client_wire.value())
        _pump(self.client_wire, self.client, self.server_wire, self.server)
        self.assertEqual(bytes(self.server_app.received), b"frame from the dialler")

    def test_server_frame_written_at_once(self) -> None:
        self.server_app.transport.write(b"frame from the listener")
        self.assertTrue(self.server_wire.value())
        _pump(self.client_wire, self.client, self.server_wire, self.server)
        self.assertEqual(bytes(self.client_app.received), b"frame from the listener")

    def test_refused_address_gets_no_protocol(self) -> None:
        _, server_options = _options()
        guarded = GuardedTLSFactory(server_options, _RecorderServerFactory(),
                                    lambda address: False)
        self.assertIsNone(guarded.buildProtocol(None))


class TLSConnectorTests(SynchronousTestCase):
    """
    L{tls_connector} dials like C{connectSSL}, over L{LinkTLSFactory}.
    """

    def test_dials_tcp_with_link_tls(self) -> None:
        reactor = MemoryReactor()
        options, _ = _options()
        factory = ClientFactory.forProtocol(Protocol)
        connector = tls_connector(reactor)("127.0.0.1", 4100, factory, options, timeout=7)
        [(host, port, wrapping, timeout, bind)] = reactor.tcpClients
        self.assertEqual((host, port, timeout, bind), ("127.0.0.1", 4100, 7, None))
        self.assertIsInstance(wrapping, LinkTLSFactory)
        self.assertIs(wrapping.wrappedFactory, factory)
        self.assertIs(connector, reactor.connectors[0])
        # The dialling side speaks first: a TLS handshake record.
        wire = StringTransport()
        wrapping.buildProtocol(None).makeConnection(wire)
        self.assertEqual(wire.value()[:1], b"\x16")
