"""
Dialling and accepting links: the ReconnectingClientFactory for outbound
links, the per-peer service that owns its connector, and the server factory
for inbound links.

This module owns connection attempts and their back-off. It knows nothing of
frames or tables: the protocols it builds report to the node (the hub).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ClientFactory, ReconnectingClientFactory, ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from dtable.protocol import PeerProtocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IConnector, IReactorTime
    from twisted.internet.ssl import CertificateOptions

    from dtable.config import Config
    from dtable.peers import PeerAddress
    from dtable.protocol import ILinkHub

log = Logger(namespace="dtable.links")


class LinkServerFactory(ServerFactory):
    """
    Builds a L{PeerProtocol} for every inbound connection.
    """

    def __init__(self, hub: "ILinkHub", clock: "IReactorTime", config: "Config") -> None:
        self.hub = hub
        self.clock = clock
        self.config = config
        #: Every accepted connection until it is lost.
        self.accepted: set[PeerProtocol] = set()

    def buildProtocol(self, addr) -> PeerProtocol:
        protocol = PeerProtocol(self.hub, self.clock, self.config, outbound=False)
        protocol.factory = self
        self.accepted.add(protocol)
        protocol.when_lost().addBoth(lambda _: self.accepted.discard(protocol))
        return protocol


    @property
    def pending_handshakes(self) -> int:
        """
        Accepted connections whose hello has not been accepted yet.
        """
        return sum(1 for protocol in self.accepted if protocol.hello is None)


class GuardedTLSFactory(TLSMemoryBIOFactory):
    """
    The listening side's TLS, with an admission check in front: a
    connection that C{admit(address)} refuses is closed as it is accepted,
    before any TLS work or protocol is spent on it.
    """

    def __init__(self, tls: "CertificateOptions", factory: LinkServerFactory,
                 admit: Callable[["IAddress"], bool]) -> None:
        super().__init__(tls, False, factory)
        self._admit = admit

    def buildProtocol(self, addr: "IAddress"):
        if not self._admit(addr):
            return None
        return super().buildProtocol(addr)


class LinkClientFactory(ReconnectingClientFactory):
    """
    Dials one peer again and again with growing back-off. The back-off is
    reset only when the peer's hello is accepted, never when TCP or TLS
    alone succeed, and never once shutdown began.
    """

    noisy = False

    def __init__(self, owner: "PeerConnection") -> None:
        self.owner = owner
        self.clock = owner.clock
        self.initialDelay = owner.config.reconnect_initial_delay
        self.delay = self.initialDelay
        self.maxDelay = owner.config.reconnect_max_delay

    def buildProtocol(self, addr) -> PeerProtocol:
        protocol = PeerProtocol(
            self.owner.hub, self.clock, self.owner.config, outbound=True,
            role=self.owner.role, address=self.owner.address,
        )
        protocol.factory = self
        self.owner.connected(protocol)
        return protocol

    def hello_accepted(self) -> None:
        if self.continueTrying:
            self.resetDelay()

    def clientConnectionFailed(self, connector: "IConnector", reason: Failure) -> None:
        self.owner.attempt_failed(reason.getErrorMessage())
        super().clientConnectionFailed(connector, reason)

    def clientConnectionLost(self, connector: "IConnector", reason: Failure) -> None:
        self.owner.disconnected(reason.getErrorMessage())
        super().clientConnectionLost(connector, reason)


class PeerConnection(Service):
    """
    Owns the outbound link to one address: its factory and connector.

    @param connect: C{connect(address, factory)} starts dialling and returns
        the connector (for example a wrapper around reactor.connectSSL).
    @param on_failure: called with the address and a reason each time an
        attempt fails before the peer's hello was accepted.
    """

    def __init__(self, hub: "ILinkHub", clock: "IReactorTime", config: "Config",
                 address: "PeerAddress",
                 connect: Callable[["PeerAddress", ReconnectingClientFactory], "IConnector"],
                 on_failure: Callable[["PeerAddress", str], None],
                 role: str = "link") -> None:
        self.hub = hub
        self.clock = clock
        self.config = config
        self.address = address
        self.role = role
        self._connect = connect
        self._on_failure = on_failure
        self._factory: LinkClientFactory | None = None
        self._connector: "IConnector | None" = None
        self._protocol: PeerProtocol | None = None

    @property
    def protocol(self) -> PeerProtocol | None:
        return self._protocol

    def startService(self) -> None:
        super().startService()
        self._factory = LinkClientFactory(self)
        self._connector = self._connect(self.address, self._factory)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._factory is not None:
            self._factory.stopTrying()
        protocol, self._protocol = self._protocol, None
        if self._connector is not None:
            self._connector.disconnect()
        if protocol is not None:
            protocol.close("shutting down")
            return protocol.when_lost()
        return succeed(None)

    def hello_accepted(self) -> None:
        if self.running and self._factory is not None:
            self._factory.hello_accepted()

    # Reports from the factory ------------------------------------------------

    def connected(self, protocol: PeerProtocol) -> None:
        self._protocol = protocol

    def attempt_failed(self, reason: str) -> None:
        self._protocol = None
        if self.running:
            self._on_failure(self.address, reason)

    def disconnected(self, reason: str) -> None:
        protocol, self._protocol = self._protocol, None
        if self.running and (protocol is None or protocol.hello is None):
            self._on_failure(self.address, reason)


class ProbeFactory(ClientFactory):
    """
    One short test connection to a node that is not linked: the node
    measures a series of pings over it and closes it. C{on_failed(reason)} is
    called if it never got as far as the peer's hello.
    """

    noisy = False

    def __init__(self, hub: "ILinkHub", clock: "IReactorTime", config: "Config",
                 address: "PeerAddress", on_failed: Callable[[str], None]) -> None:
        self.hub = hub
        self.clock = clock
        self.config = config
        self.address = address
        self._on_failed = on_failed
        self.protocol_instance: PeerProtocol | None = None

    def buildProtocol(self, addr) -> PeerProtocol:
        protocol = PeerProtocol(self.hub, self.clock, self.config, outbound=True,
                                role="probe", address=self.address)
        protocol.factory = self
        self.protocol_instance = protocol
        return protocol

    def clientConnectionFailed(self, connector: "IConnector", reason: Failure) -> None:
        self._on_failed(reason.getErrorMessage())

    def clientConnectionLost(self, connector: "IConnector", reason: Failure) -> None:
        protocol = self.protocol_instance
        if protocol is None or protocol.hello is None:
            self._on_failed(reason.getErrorMessage())
