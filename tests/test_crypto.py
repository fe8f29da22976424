"""
Tests for dtable.crypto: network keys, the derived CA, node certificates,
master signatures, and mutual TLS 1.3 over loopback.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from datetime import datetime, timezone

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL.crypto import X509
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dtable.crypto import (
    KEY_PREFIX,
    NetworkCredentials,
    NodeIdentity,
    WeakKeyError,
    derive_network,
    generate_network_key,
    issue_node_certificate,
    load_network_key,
    new_node_id,
    node_id_from_certificate,
    parse_network_key,
    public_key_hex,
    sign,
    tls_options,
    verify,
)

# Every wait on the network is bounded by this many seconds.
TIMEOUT = 10

SECRET = parse_network_key(generate_network_key())
OTHER_SECRET = parse_network_key(generate_network_key())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _private_raw(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


class NetworkKeyTests(SynchronousTestCase):
    """
    Generating, parsing and loading network keys.
    """

    def test_generated_key_round_trip(self) -> None:
        key = generate_network_key()
        self.assertTrue(key.startswith(KEY_PREFIX))
        self.assertNotIn("=", key)
        secret = parse_network_key(key)
        self.assertEqual(len(secret), 32)
        self.assertEqual(parse_network_key(f"  {key}\n".encode()), secret)
        self.assertNotEqual(parse_network_key(generate_network_key()), secret)

    def test_passphrase_accepted(self) -> None:
        phrase = "correct horse battery staple, but longer"
        self.assertEqual(parse_network_key(phrase + "\n"), phrase.encode())

    def assertRefused(self, text: str | bytes, *words: str) -> None:
        error = self.assertRaises(WeakKeyError, parse_network_key, text)
        self.assertIsInstance(error, ValueError)
        message = str(error)
        self.assertIn("python -m dtable keygen > net.key", message)
        for word in words:
            self.assertIn(word, message)

    def test_empty_refused(self) -> None:
        self.assertRefused("", "empty")
        self.assertRefused(b" \n\t", "empty")

    def test_short_passphrase_refused(self) -> None:
        self.assertRefused("abcdefghijklmnopqrstuvwxyz", "32")

    def test_low_diversity_refused(self) -> None:
        self.assertRefused("ab" * 40, "distinct")

    def test_short_prefixed_key_refused(self) -> None:
        self.assertRefused(KEY_PREFIX + "c2hvcnQ", "32")

    def test_malformed_prefixed_key_refused(self) -> None:
        self.assertRefused(KEY_PREFIX + "not base64!" * 8, "base64url")
        self.assertRefused(KEY_PREFIX + "A" * 45, "base64url")

    def test_not_utf8_refused(self) -> None:
        self.assertRefused(b"\xff" * 40, "UTF-8")

    def _key_file(self, content: str) -> str:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "net.key")
        with open(path, "w") as key_file:
            key_file.write(content)
        return path

    def test_load_key_file(self) -> None:
        key = generate_network_key()
        path = self._key_file(key + "\n")
        self.assertEqual(load_network_key(path), parse_network_key(key))

    def test_missing_file_refused(self) -> None:
        path = os.path.join(tempfile.gettempdir(), "no-such-dir-dtable", "net.key")
        error = self.assertRaises(WeakKeyError, load_network_key, path)
        self.assertIn(path, str(error))
        self.assertIn("No such file", str(error))
        self.assertIn("keygen", str(error))

    def test_weak_file_names_path(self) -> None:
        path = self._key_file("short\n")
        error = self.assertRaises(WeakKeyError, load_network_key, path)
        self.assertIn(path, str(error))
        self.assertIn("keygen", str(error))


class DeriveNetworkTests(SynchronousTestCase):
    """
    The network CA and master key derived from the key.
    """

    def test_deterministic(self) -> None:
        first = derive_network(SECRET)
        self.assertIsInstance(first, NetworkCredentials)
        derive_network.cache_clear()
        second = derive_network(SECRET)
        self.assertIsNot(first, second)
        self.assertEqual(_der(first.ca_cert), _der(second.ca_cert))
        self.assertEqual(first.network_id, second.network_id)
        self.assertEqual(_private_raw(first.ca_key), _private_raw(second.ca_key))
        self.assertEqual(
            _private_raw(first.master_key), _private_raw(second.master_key)
        )
        self.assertIs(derive_network(SECRET), second)

    def test_network_id_is_ca_digest(self) -> None:
        network = derive_network(SECRET)
        self.assertEqual(
            network.network_id, hashlib.sha256(_der(network.ca_cert)).hexdigest()
        )

    def test_different_secrets_differ(self) -> None:
        one = derive_network(SECRET)
        other = derive_network(OTHER_SECRET)
        self.assertNotEqual(_der(one.ca_cert), _der(other.ca_cert))
        self.assertNotEqual(one.network_id, other.network_id)
        self.assertNotEqual(public_key_hex(one.ca_key), public_key_hex(other.ca_key))
        self.assertNotEqual(
            public_key_hex(one.master_key), public_key_hex(other.master_key)
        )

    def test_master_key_is_not_ca_key(self) -> None:
        network = derive_network(SECRET)
        self.assertNotEqual(
            public_key_hex(network.master_key), public_key_hex(network.ca_key)
        )

    def test_ca_certificate(self) -> None:
        network = derive_network(SECRET)
        ca = network.ca_cert
        names = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual([name.value for name in names], ["dtable network CA"])
        self.assertEqual(ca.issuer, ca.subject)
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.value.ca)
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign)
        self.assertTrue(usage.crl_sign)
        self.assertTrue(usage.digital_signature)
        ca.verify_directly_issued_by(ca)
        self.assertEqual(
            public_key_hex(ca.public_key()), public_key_hex(network.ca_key)
        )


class NodeCertificateTests(SynchronousTestCase):
    """
    Node certificates issued by the network CA.
    """

    def test_new_node_id(self) -> None:
        node_id = new_node_id()
        self.assertEqual(len(node_id), 32)
        self.assertEqual(node_id, node_id.lower())
        int(node_id, 16)
        self.assertNotEqual(new_node_id(), node_id)

    def test_certificate_verifies_against_ca(self) -> None:
        network = derive_network(SECRET)
        node_id = new_node_id()
        identity = issue_node_certificate(network, node_id)
        self.assertIsInstance(identity, NodeIdentity)
        self.assertEqual(identity.node_id, node_id)
        cert = identity.cert
        self.assertEqual(cert.issuer, network.ca_cert.subject)
        cert.verify_directly_issued_by(network.ca_cert)
        # The signature really is the CA key's.
        network.ca_key.public_key().verify(
            cert.signature, cert.tbs_certificate_bytes
        )
        self.assertEqual(
            public_key_hex(cert.public_key()), public_key_hex(identity.key)
        )

    def test_foreign_ca_does_not_verify(self) -> None:
        identity = issue_node_certificate(derive_network(SECRET), new_node_id())
        other = derive_network(OTHER_SECRET)
        self.assertRaises(
            Exception, identity.cert.verify_directly_issued_by, other.ca_cert
        )

    def test_certificate_contents(self) -> None:
        node_id = new_node_id()
        cert = issue_node_certificate(derive_network(SECRET), node_id).cert
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual([name.value for name in names], [node_id])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(san.value.get_values_for_type(x509.DNSName), [node_id])
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        self.assertEqual(
            set(eku.value),
            {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH},
        )
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertFalse(constraints.value.ca)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.digital_signature)
        self.assertFalse(usage.key_cert_sign)

    def test_fresh_key_each_time(self) -> None:
        network = derive_network(SECRET)
        node_id = new_node_id()
        one = issue_node_certificate(network, node_id)
        two = issue_node_certificate(network, node_id)
        self.assertNotEqual(public_key_hex(one.key), public_key_hex(two.key))
        self.assertNotEqual(one.cert.serial_number, two.cert.serial_number)

    def test_bad_node_id_refused(self) -> None:
        network = derive_network(SECRET)
        for bad in ["", "has space", "x" * 65, "-leading", "caf\u00e9"]:
            self.assertRaises(ValueError, issue_node_certificate, network, bad)

    def test_node_id_from_both_certificate_kinds(self) -> None:
        node_id = new_node_id()
        cert = issue_node_certificate(derive_network(SECRET), node_id).cert
        self.assertEqual(node_id_from_certificate(cert), node_id)
        self.assertEqual(
            node_id_from_certificate(X509.from_cryptography(cert)), node_id
        )

    def test_node_id_missing(self) -> None:
        key = Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(datetime(2000, 1, 1, tzinfo=timezone.utc))
            .not_valid_after(datetime(2100, 1, 1, tzinfo=timezone.utc))
            .sign(key, algorithm=None)
        )
        self.assertRaises(ValueError, node_id_from_certificate, cert)

    def test_tls_options_require_peer_certificate(self) -> None:
        network = derive_network(SECRET)
        options = tls_options(network, issue_node_certificate(network, new_node_id()))
        self.assertIsInstance(options, ssl.CertificateOptions)
        self.assertTrue(options.verify)
        self.assertTrue(options.requireCertificate)
        options.getContext()


class SignatureTests(SynchronousTestCase):
    """
    Master signatures as hex strings.
    """

    def setUp(self) -> None:
        self.key = derive_network(SECRET).master_key
        self.public = public_key_hex(self.key)

    def test_public_key_hex(self) -> None:
        self.assertEqual(len(self.public), 64)
        self.assertEqual(public_key_hex(self.key.public_key()), self.public)

    def test_round_trip(self) -> None:
        signature = sign(self.key, b"revision 7")
        self.assertEqual(len(signature), 128)
        self.assertTrue(verify(self.public, b"revision 7", signature))

    def test_other_data(self) -> None:
        signature = sign(self.key, b"revision 7")
        self.assertFalse(verify(self.public, b"revision 8", signature))

    def test_other_key(self) -> None:
        signature = sign(self.key, b"revision 7")
        other = public_key_hex(derive_network(OTHER_SECRET).master_key)
        self.assertFalse(verify(other, b"revision 7", signature))

    def test_flipped_signature(self) -> None:
        signature = sign(self.key, b"revision 7")
        flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
        self.assertFalse(verify(self.public, b"revision 7", flipped))

    def test_garbage_never_raises(self) -> None:
        signature = sign(self.key, b"data")
        for public, sig in [
            ("zz" * 32, signature),
            (self.public, "zz" * 64),
            (self.public, signature[:-2]),
            (self.public, signature + "00"),
            (self.public[:-2], signature),
            ("", ""),
            (self.public.upper(), signature),
            (self.public, " " + signature[1:]),
            (None, signature),
            (self.public, None),
        ]:
            self.assertFalse(verify(public, b"data", sig))  # type: ignore[arg-type]


# --- real TLS on loopback -------------------------------------------------


@implementer(IHandshakeListener)
class _Peer(Protocol):
    """
    Records what happens on one end of a TLS connection.

    The server end speaks first: it writes C{greeting} when the handshake
    completes. Every end writes C{greeting} as soon as it can if
    C{eager}, to show that nothing it sends before authentication arrives.
    """

    def __init__(self, greeting: bytes, eager: bool = False) -> None:
        self.greeting = greeting
        self.eager = eager
        self.completed = False
        self.peer_node_id: str | None = None
        self.version: str | None = None
        self.received = b""
        self.lost_reason: Failure | None = None
        self._received_waiters: list[tuple[int, Deferred[bytes]]] = []
        self._lost_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        if self.eager:
            self.transport.write(self.greeting)

    def handshakeCompleted(self) -> None:
        self.completed = True
        cert = self.transport.getPeerCertificate()
        if cert is not None:
            self.peer_node_id = node_id_from_certificate(cert)
        self.version = self.transport.getHandle().get_protocol_version_name()
        if not self.eager:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiting, self._received_waiters = self._received_waiters, []
        for size, waiter in waiting:
            if len(self.received) >= size:
                waiter.callback(self.received)
            else:
                self._received_waiters.append((size, waiter))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost_reason = reason
        waiting, self._lost_waiters = self._lost_waiters, []
        for waiter in waiting:
            waiter.callback(None)

    def when_received(self, size: int) -> Deferred[bytes]:
        from twisted.internet import reactor

        waiter: Deferred[bytes] = Deferred()
        if len(self.received) >= size:
            waiter.callback(self.received)
        else:
            self._received_waiters.append((size, waiter))
        return waiter.addTimeout(TIMEOUT, reactor)

    def when_lost(self) -> Deferred[None]:
        """
        Fire (with L{None}; the reason is in C{lost_reason}) once the
        connection is lost.
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

    def __init__(self) -> None:
        self.peers: list[_Peer] = []
        self._waiters: list[Deferred[_Peer]] = []

    def buildProtocol(self, addr: object) -> _Peer:
        peer = _Peer(b"server hello", eager=True)
        peer.factory = self
        self.peers.append(peer)
        waiting, self._waiters = self._waiters, []
        for waiter in waiting:
            waiter.callback(peer)
        return peer

    def when_connected(self) -> Deferred[_Peer]:
        from twisted.internet import reactor

        waiter: Deferred[_Peer] = Deferred()
        if self.peers:
            waiter.callback(self.peers[0])
        else:
            self._waiters.append(waiter)
        return waiter.addTimeout(TIMEOUT, reactor)


class _ClientFactory(ClientFactory):
    noisy = False

    def __init__(self, peer: _Peer) -> None:
        self.peer = peer
        self.failed: Failure | None = None

    def buildProtocol(self, addr: object) -> _Peer:
        self.peer.factory = self
        return self.peer

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.failed = reason
        self.peer.connectionLost(reason)


async def _run(
    server_options: ssl.CertificateOptions,
    client_options: ssl.CertificateOptions,
    client: _Peer,
    scenario,
) -> _Peer:
    """
    Listen on loopback, connect C{client}, run C{scenario(server, client)},
    then close everything and wait for it to be closed.

    @return: the server's protocol.
    """
    from twisted.internet import reactor

    factory = _ServerFactory()
    port = reactor.listenSSL(0, factory, server_options, interface="127.0.0.1")
    try:
        reactor.connectSSL(
            "127.0.0.1",
            port.getHost().port,
            _ClientFactory(client),
            client_options,
            timeout=TIMEOUT,
        )
        try:
            server = await factory.when_connected()
            await scenario(server, client)
        finally:
            # Whatever happened, leave no connection behind.
            peers = [*factory.peers, client]
            for peer in peers:
                if peer.lost_reason is None and peer.transport is not None:
                    peer.transport.abortConnection()
            await DeferredList(
                [peer.when_lost() for peer in peers], fireOnOneErrback=True
            )
    finally:
        await port.stopListening()
    return server


def _identity(secret: bytes) -> tuple[NetworkCredentials, NodeIdentity]:
    network = derive_network(secret)
    return network, issue_node_certificate(network, new_node_id())


@pytest_twisted.ensureDeferred
async def test_tls_same_network_mutual_handshake() -> None:
    network, server_identity = _identity(SECRET)
    _, client_identity = _identity(SECRET)
    client = _Peer(b"client hello")

    async def scenario(server: _Peer, client: _Peer) -> None:
        # The client answers only once the handshake completed; the server
        # receives that answer only after it accepted the client's certificate.
        await server.when_received(len(b"client hello"))
        await client.when_received(len(b"server hello"))
        client.transport.loseConnection()
        await server.when_lost()

    server = await _run(
        tls_options(network, server_identity),
        tls_options(network, client_identity),
        client,
        scenario,
    )
    assert server.completed and client.completed
    assert server.received == b"client hello"
    assert client.received == b"server hello"
    assert server.peer_node_id == client_identity.node_id
    assert client.peer_node_id == server_identity.node_id
    assert server.version == client.version == "TLSv1.3"


@pytest_twisted.ensureDeferred
async def test_tls_foreign_client_refused() -> None:
    network, server_identity = _identity(SECRET)
    foreign_network, foreign_identity = _identity(OTHER_SECRET)
    client = _Peer(b"intrusion", eager=True)

    async def scenario(server: _Peer, client: _Peer) -> None:
        await server.when_lost()
        await client.when_lost()

    server = await _run(
        tls_options(network, server_identity),
        tls_options(foreign_network, foreign_identity),
        client,
        scenario,
    )
    assert not server.completed
    assert server.received == b""
    assert server.peer_node_id is None
    assert server.lost_reason is not None
    assert client.received == b""
    assert client.lost_reason is not None


@pytest_twisted.ensureDeferred
async def test_tls_foreign_server_refused() -> None:
    network, client_identity = _identity(SECRET)
    foreign_network, foreign_identity = _identity(OTHER_SECRET)
    client = _Peer(b"secret", eager=True)

    async def scenario(server: _Peer, client: _Peer) -> None:
        await client.when_lost()
        await server.when_lost()

    server = await _run(
        tls_options(foreign_network, foreign_identity),
        tls_options(network, client_identity),
        client,
        scenario,
    )
    assert not client.completed
    assert not server.completed
    assert server.received == b""
    assert client.received == b""


@pytest_twisted.ensureDeferred
async def test_tls_client_without_certificate_refused() -> None:
    network, server_identity = _identity(SECRET)
    client = _Peer(b"intrusion", eager=True)
    anonymous = ssl.CertificateOptions(
        trustRoot=ssl.trustRootFromCertificates(
            [ssl.Certificate(X509.from_cryptography(network.ca_cert))]
        ),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_3,
    )

    async def scenario(server: _Peer, client: _Peer) -> None:
        await server.when_lost()
        await client.when_lost()

    server = await _run(tls_options(network, server_identity), anonymous, client, scenario)
    assert not server.completed
    assert server.received == b""
    assert client.received == b""
    assert client.lost_reason is not None
