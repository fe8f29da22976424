"""
Tests for L{dtable.protocol}: one L{PeerProtocol} over a StringTransport,
with time driven by a Clock and a hub that records what the connection
tells its node.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dtable import crypto, wire
from dtable.config import Config
from dtable.interfaces import IPeerLink
from dtable.protocol import (
    SEND_PIECE, ILinkHub, PeerProtocol, RequestFailed, RequestRefused, SendQueue, Traffic,
)
from dtable.store import empty_head
from dtable.testing import next_turn
from dtable.wire import ProtocolViolation

LOCAL_ID = "00000000000000000000000000000001"
PEER_ID = "00000000000000000000000000000002"
OTHER_ID = "00000000000000000000000000000003"

BATCH_HEAD = wire.Head(rev=1, base=0, root="ab" * 32, sig="ef" * 64, master="12" * 32)

CONFIG = Config(
    ping_interval=1.0,
    handshake_timeout=5.0,
    request_timeout=3.0,
    hello_max_frame=1024,
    max_frame=64 * 1024,
)


@functools.lru_cache(maxsize=None)
def certificate(node_id: str) -> x509.Certificate:
    """
    A real node certificate for C{node_id}, on one network derived once.
    """
    network = crypto.derive_network(_secret())
    return crypto.issue_node_certificate(network, node_id).cert


@functools.lru_cache(maxsize=None)
def _secret() -> bytes:
    return crypto.parse_network_key(crypto.generate_network_key())


def length_prefixed(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def peer_hello(node_id: str = PEER_ID, role: str = "link") -> bytes:
    return wire.hello(node_id, 10000, role, False, empty_head())


def log_request(request_id: int) -> bytes:
    """
    Some request: the batches since revision 0.
    """
    return wire.log_request(request_id, 0)


def big_message(size: int) -> bytes:
    """
    A valid msg frame of exactly C{size} bytes.
    """
    empty = wire.message("big", PEER_ID, "")
    frame = wire.message("big", PEER_ID, "x" * (size - len(empty)))
    assert len(frame) == size
    return frame


@implementer(ILinkHub)
class RecordingHub:
    """
    An ILinkHub that records every call as (name, args).

    @ivar refusal: what link_up returns.
    @ivar reject_frames: if set, frame_received raises ProtocolViolation
        with it.
    """

    def __init__(self, node_id: str = LOCAL_ID) -> None:
        self.node_id = node_id
        self.traffic = Traffic()
        self.calls: list[tuple[str, tuple]] = []
        self.refusal: str | None = None
        self.reject_frames: str | None = None

    def named(self, name: str) -> list[tuple]:
        return [args for called, args in self.calls if called == name]

    def local_hello(self, role: str) -> bytes:
        self.calls.append(("local_hello", (role,)))
        return wire.hello(self.node_id, 9999, role, False, empty_head())

    def link_up(self, link: PeerProtocol) -> str | None:
        self.calls.append(("link_up", (link,)))
        return self.refusal

    def frame_received(self, link: PeerProtocol, message: Any, frame: bytes) -> None:
        self.calls.append(("frame_received", (link, message, frame)))
        if self.reject_frames is not None:
            raise ProtocolViolation(self.reject_frames)

    def link_down(self, link: PeerProtocol, reason: str) -> None:
        self.calls.append(("link_down", (link, reason)))

    def violation(self, link: PeerProtocol, reason: str) -> None:
        self.calls.append(("violation", (link, reason)))

    def rtt_measured(self, link: PeerProtocol, seconds: float) -> None:
        self.calls.append(("rtt_measured", (link, seconds)))


class TLSStringTransport(StringTransport):
    """
    A StringTransport that presents a peer certificate, as a TLS transport
    does, and records an abort.
    """

    def __init__(self, peer_certificate: Any) -> None:
        super().__init__()
        self.peer_certificate = peer_certificate
        self.aborted = False

    def getPeerCertificate(self) -> Any:
        if isinstance(self.peer_certificate, Exception):
            raise self.peer_certificate
        return self.peer_certificate

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class FillingTransport(TLSStringTransport):
    """
    A transport that, once C{fill} is set, pauses its producer after every
    write, and records the length of each write.
    """

    def __init__(self, peer_certificate: Any) -> None:
        super().__init__(peer_certificate)
        self.fill = False
        self.writes: list[int] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes.append(len(data))
        if self.fill:
            self.producer.pauseProducing()


class ProtocolTestMixin:
    """
    Sets up one PeerProtocol, TLS already handshaken, and helpers to speak
    to it.
    """

    outbound = False

    def setUp(self) -> None:
        self.clock = Clock()
        self.hub = RecordingHub()
        self.protocol = PeerProtocol(self.hub, self.clock, CONFIG, outbound=self.outbound)
        self.transport = TLSStringTransport(certificate(PEER_ID))
        self.protocol.makeConnection(self.transport)

    def handshake(self) -> None:
        self.protocol.handshakeCompleted()

    def feed(self, *frames: bytes) -> None:
        self.protocol.dataReceived(b"".join(length_prefixed(f) for f in frames))

    def sent(self) -> list[bytes]:
        """
        The frames written so far, without their length prefixes; clears
        the transport.
        """
        data = self.transport.value()
        self.transport.clear()
        frames = []
        while data:
            (length,) = struct.unpack("!I", data[:4])
            frames.append(data[4 : 4 + length])
            data = data[4 + length :]
        return frames

    def sent_messages(self) -> list[Any]:
        return [wire.decode(frame) for frame in self.sent()]

    def go_live(self) -> None:
        """
        Complete TLS and exchange hellos.
        """
        self.handshake()
        self.feed(peer_hello())
        self.assertTrue(self.protocol.is_live)
        self.sent()

    def lose(self, reason: Exception | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))

    def assertViolation(self, *words: str) -> str:
        """
        Exactly one violation was reported, holding every one of C{words},
        and the transport was aborted.
        """
        violations = self.hub.named("violation")
        self.assertEqual(len(violations), 1, self.hub.calls)
        link, reason = violations[0]
        self.assertIs(link, self.protocol)
        for word in words:
            self.assertIn(word, reason)
        self.assertTrue(self.transport.aborted)
        self.assertFalse(self.protocol.is_live)
        return reason


class InterfaceTests(ProtocolTestMixin, SynchronousTestCase):
    def test_peer_protocol_provides_ipeerlink(self) -> None:
        self.assertTrue(verifyObject(IPeerLink, self.protocol))

    def test_recording_hub_provides_ilinkhub(self) -> None:
        self.assertTrue(verifyObject(ILinkHub, self.hub))


class ServerHandshakeTests(ProtocolTestMixin, SynchronousTestCase):
    """
    The server speaks first, once TLS is up.
    """

    outbound = False

    def test_silent_before_tls(self) -> None:
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.hub.calls, [])

    def test_hello_on_handshake(self) -> None:
        self.handshake()
        self.assertEqual(self.protocol.node_id, PEER_ID)
        self.assertEqual(self.hub.named("local_hello"), [("link",)])
        messages = self.sent_messages()
        self.assertEqual(len(messages), 1)
        self.assertIsInstance(messages[0], wire.Hello)
        self.assertEqual(messages[0].node_id, LOCAL_ID)
        self.assertFalse(self.protocol.is_live)

    def test_client_hello_brings_link_up(self) -> None:
        self.handshake()
        self.sent()
        self.feed(peer_hello())
        self.assertTrue(self.protocol.is_live)
        self.assertEqual(self.protocol.hello, wire.decode(peer_hello()))
        self.assertEqual(self.hub.named("link_up"), [(self.protocol,)])
        # The server said its hello already; it says nothing more.
        self.assertEqual(self.sent(), [])
        self.assertEqual(self.hub.named("local_hello"), [("link",)])

    def test_role(self) -> None:
        protocol = PeerProtocol(self.hub, self.clock, CONFIG, outbound=False, role="probe")
        protocol.makeConnection(TLSStringTransport(certificate(PEER_ID)))
        protocol.handshakeCompleted()
        self.assertEqual(self.hub.named("local_hello"), [("probe",)])

    def test_certificate_without_node_id(self) -> None:
        self.transport.peer_certificate = ValueError("no common name")
        self.handshake()
        self.assertViolation("no node id", "no common name")
        self.assertEqual(self.transport.value(), b"")


class ClientHandshakeTests(ProtocolTestMixin, SynchronousTestCase):
    """
    The client answers only once it has accepted the server's hello.
    """

    outbound = True

    def test_silent_after_tls(self) -> None:
        self.handshake()
        self.assertEqual(self.protocol.node_id, PEER_ID)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.hub.named("local_hello"), [])

    def test_hello_after_server_hello(self) -> None:
        self.handshake()
        self.feed(peer_hello())
        messages = self.sent_messages()
        self.assertEqual(len(messages), 1)
        self.assertIsInstance(messages[0], wire.Hello)
        self.assertEqual(messages[0].node_id, LOCAL_ID)
        self.assertTrue(self.protocol.is_live)
        self.assertEqual(self.hub.named("link_up"), [(self.protocol,)])
        names = [name for name, _ in self.hub.calls]
        self.assertLess(names.index("local_hello"), names.index("link_up"))

    def test_no_hello_for_a_bad_server_hello(self) -> None:
        self.handshake()
        self.feed(peer_hello(OTHER_ID))
        self.assertEqual(self.transport.value(), b"")
        self.assertViolation("does not match")


class EarlyViolationTests(ProtocolTestMixin, SynchronousTestCase):
    """
    Until the hello is accepted, anything else closes the connection.
    """

    def test_frame_before_hello(self) -> None:
        self.handshake()
        self.feed(wire.ping(1))
        self.assertViolation("Ping", "before its hello")
        self.assertEqual(self.hub.named("link_up"), [])
        self.assertEqual(self.hub.named("frame_received"), [])

    def test_hello_before_tls(self) -> None:
        self.feed(peer_hello())
        self.assertViolation("before the TLS handshake")
        self.assertEqual(self.hub.named("link_up"), [])

    def test_hello_from_another_node_id(self) -> None:
        self.handshake()
        self.feed(peer_hello(OTHER_ID))
        self.assertViolation("does not match the certificate")
        self.assertEqual(self.hub.named("link_up"), [])

    def test_malformed_frame(self) -> None:
        self.handshake()
        self.feed(b"not json")
        self.assertViolation("not UTF-8 JSON")

    def test_schema_violation(self) -> None:
        self.handshake()
        hello = peer_hello()
        ours = b'"version":%d,' % wire.PROTOCOL_VERSION
        self.assertIn(ours, hello)
        self.feed(hello.replace(ours, b'"version":1,'))
        self.assertViolation("protocol version 1 is not supported")
        self.assertIsNone(self.protocol.hello)

    def test_large_frame_before_hello(self) -> None:
        self.handshake()
        self.feed(big_message(CONFIG.hello_max_frame + 1))
        self.assertViolation("exceeds the limit", str(CONFIG.hello_max_frame))

    def test_large_length_prefix_alone(self) -> None:
        """
        The length prefix is enough: the oversized frame is never buffered.
        """
        self.handshake()
        self.protocol.dataReceived(struct.pack("!I", 2**31))
        self.assertViolation("exceeds the limit")

    def test_frame_at_hello_limit(self) -> None:
        self.go_live()
        self.feed(big_message(CONFIG.hello_max_frame))
        self.assertEqual(len(self.hub.named("frame_received")), 1)

    def test_handshake_timeout(self) -> None:
        self.handshake()
        self.clock.advance(CONFIG.handshake_timeout - 0.5)
        self.assertEqual(self.hub.named("violation"), [])
        self.assertFalse(self.transport.aborted)
        self.clock.advance(1)
        self.assertViolation("no hello within")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_handshake_timeout_without_tls(self) -> None:
        self.clock.advance(CONFIG.handshake_timeout + 1)
        self.assertViolation("no hello within")

    def test_hello_cancels_handshake_timeout(self) -> None:
        self.go_live()
        self.clock.advance(CONFIG.handshake_timeout + 1)
        # The peer said nothing, so keep-alive may close the link, but it
        # is not a handshake violation.
        self.assertEqual(self.hub.named("violation"), [])

    def test_frames_after_violation_are_ignored(self) -> None:
        self.handshake()
        self.feed(wire.ping(1), peer_hello(), wire.message("m", PEER_ID, 1), wire.ping(2))
        self.assertViolation("before its hello")
        self.assertEqual(self.hub.named("link_up"), [])
        self.assertEqual(self.hub.named("frame_received"), [])
        self.assertEqual(self.hub.named("link_down"), [])
        # Nothing but the server's own hello was written: no pong.
        self.assertEqual([type(m) for m in self.sent_messages()], [wire.Hello])
        self.feed(wire.message("m", PEER_ID, 2))
        self.assertEqual(self.hub.named("frame_received"), [])
        self.assertEqual(len(self.hub.named("violation")), 1)

    def test_violation_cancels_timers(self) -> None:
        self.handshake()
        self.feed(wire.ping(1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_early_loss_is_not_link_down(self) -> None:
        self.handshake()
        self.lose(ConnectionLost())
        self.assertEqual(self.hub.named("link_down"), [])
        self.assertEqual(self.hub.named("link_up"), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LiveLinkTests(ProtocolTestMixin, SynchronousTestCase):
    """
    After both hellos: dispatch, keep-alive, limits and closing.
    """

    def setUp(self) -> None:
        super().setUp()
        self.go_live()

    def test_frames_are_dispatched(self) -> None:
        frame = wire.message("m1", PEER_ID, {"x": 1})
        self.feed(frame)
        [(link, message, raw)] = self.hub.named("frame_received")
        self.assertIs(link, self.protocol)
        self.assertEqual(message, wire.Message(id="m1", origin=PEER_ID, body={"x": 1}))
        self.assertEqual(raw, frame)

    def test_second_hello(self) -> None:
        self.feed(peer_hello())
        self.assertViolation("second hello")
        self.assertEqual(len(self.hub.named("link_up")), 1)
        self.assertEqual(len(self.hub.named("link_down")), 1)
        self.lose()
        self.assertEqual(len(self.hub.named("link_down")), 1)

    def test_larger_frame_after_hello(self) -> None:
        frame = big_message(CONFIG.max_frame)
        self.feed(frame)
        self.assertEqual(self.hub.named("violation"), [])
        [(_, message, raw)] = self.hub.named("frame_received")
        self.assertEqual(raw, frame)

    def test_frame_above_max_frame(self) -> None:
        self.feed(big_message(CONFIG.max_frame + 1))
        self.assertViolation("exceeds the limit", str(CONFIG.max_frame))
        self.assertEqual(self.hub.named("frame_received"), [])
        self.assertEqual(len(self.hub.named("link_down")), 1)

    def test_bad_frame_on_live_link(self) -> None:
        self.feed(b"[1, 2")
        self.assertViolation("not UTF-8 JSON")
        [(link, reason)] = self.hub.named("link_down")
        self.assertIs(link, self.protocol)

    def test_hub_rejects_frame(self) -> None:
        self.hub.reject_frames = "a batch from nowhere"
        self.feed(wire.message("m1", PEER_ID, None), wire.message("m2", PEER_ID, None))
        self.assertViolation("a batch from nowhere")
        self.assertEqual(len(self.hub.named("frame_received")), 1)
        self.assertEqual(len(self.hub.named("link_down")), 1)

    def test_ping_answered_with_pong(self) -> None:
        self.feed(wire.ping(7))
        self.assertEqual(self.sent_messages(), [wire.Pong(id=7)])
        self.assertEqual(self.hub.named("frame_received"), [])

    def test_frames_after_violation_are_ignored(self) -> None:
        self.feed(peer_hello(), wire.message("m", PEER_ID, 1), wire.ping(3))
        self.assertViolation("second hello")
        self.assertEqual(self.hub.named("frame_received"), [])
        self.assertEqual(self.sent(), [])

    def test_keep_alive_pings(self) -> None:
        """
        Every ping interval the link pings its peer; answered pings are
        measured and keep the link up.
        """
        self.clock.advance(CONFIG.ping_interval)
        for _ in range(10):
            [ping] = self.sent_messages()
            self.assertIsInstance(ping, wire.Ping)
            self.clock.advance(0.25)
            self.feed(wire.pong(ping.id))
            self.clock.advance(CONFIG.ping_interval - 0.25)
        self.assertTrue(self.protocol.is_live)
        self.assertEqual(self.hub.named("link_down"), [])
        self.assertEqual(list(self.protocol.rtts), [0.25] * 10)
        self.assertEqual(self.protocol.rtt_mean, 0.25)

    def test_any_frame_keeps_the_link_up(self) -> None:
        for i in range(10):
            self.clock.advance(CONFIG.ping_interval)
            self.feed(wire.message(f"m{i}", PEER_ID, i))
        self.assertTrue(self.protocol.is_live)

    def test_dead_link(self) -> None:
        """
        A link that hears nothing for longer than twice the ping interval
        is closed, cleanly, and reported down once.
        """
        self.assertEqual(CONFIG.dead_link_timeout, 2 * CONFIG.ping_interval)
        for _ in range(3):
            self.clock.advance(CONFIG.ping_interval)
        self.assertFalse(self.protocol.is_live)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.aborted)
        self.assertEqual(self.hub.named("violation"), [])
        [(link, reason)] = self.hub.named("link_down")
        self.assertIn("dead link", reason)
        self.assertEqual(self.protocol.close_reason, reason)
        self.lose()
        self.assertEqual(len(self.hub.named("link_down")), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_part_of_a_large_frame_keeps_the_link_up(self) -> None:
        """
        A link receiving one frame that takes longer than the dead-link
        timeout to arrive is not dead: bytes are arriving.
        """
        frame = wire.message("big", PEER_ID, "x" * 50_000)
        data = length_prefixed(frame)
        pieces = [data[i:i + 5_000] for i in range(0, len(data), 5_000)]
        for piece in pieces:
            self.clock.advance(CONFIG.ping_interval)
            self.protocol.dataReceived(piece)
        self.assertTrue(self.protocol.is_live)
        self.assertEqual(self.hub.named("link_down"), [])
        self.assertEqual(len(self.hub.named("frame_received")), 1)

    def test_frames_split_anywhere(self) -> None:
        """
        Frames arrive whole and in order however the bytes are cut: one
        byte at a time, several frames and a part in one read.
        """
        frames = [wire.message(f"m{i}", PEER_ID, "y" * i) for i in range(20)]
        data = b"".join(length_prefixed(f) for f in frames)
        cuts = [0, 1, 2, 3, 4, 5, 90, 91, 700, 701, len(data) - 1, len(data)]
        for start, end in zip(cuts, cuts[1:]):
            self.protocol.dataReceived(data[start:end])
        self.assertEqual([raw for _, _, raw in self.hub.named("frame_received")], frames)

    def test_large_frame_in_records(self) -> None:
        """
        A frame of the largest size allowed, arriving in 16 KiB TLS records,
        arrives whole (buffering it copies each byte a bounded number of
        times; a copy of everything buffered per read took minutes).
        """
        frame = big_message(CONFIG.max_frame)
        data = length_prefixed(frame) + length_prefixed(wire.ping(9))
        for i in range(0, len(data), 16_384):
            self.protocol.dataReceived(data[i:i + 16_384])
        [(_, _, raw)] = self.hub.named("frame_received")
        self.assertEqual(raw, frame)
        self.assertEqual(self.sent_messages(), [wire.Pong(id=9)])

    def test_frames_past_the_turn_budget_wait_a_turn(self) -> None:
        """
        Once handling frames has taken the turn's budget, reading pauses and
        the frames already buffered are handled in later turns, in order;
        reading resumes when none is left.
        """
        self.protocol.turn_budget = 0.0
        frames = [wire.message(f"m{i}", PEER_ID, i) for i in range(3)]
        self.feed(*frames)
        received = lambda: [raw for _, _, raw in self.hub.named("frame_received")]
        self.assertEqual(received(), frames[:1])
        self.assertEqual(self.transport.producerState, "paused")
        # Bytes that arrive meanwhile wait behind the buffered frames.
        late = wire.message("late", PEER_ID, None)
        self.feed(late)
        self.assertEqual(received(), frames[:1])
        next_turn(self.clock)
        self.assertEqual(received(), frames[:2])
        self.assertEqual(self.transport.producerState, "paused")
        next_turn(self.clock)
        next_turn(self.clock)
        self.assertEqual(received(), [*frames, late])
        self.assertEqual(self.transport.producerState, "producing")

    def test_no_turn_after_loss(self) -> None:
        """
        Frames still waiting for their turn when the connection is lost are
        not handled, and nothing is left scheduled.
        """
        self.protocol.turn_budget = 0.0
        self.feed(*[wire.message(f"m{i}", PEER_ID, i) for i in range(3)])
        self.lose()
        self.clock.advance(0)
        self.assertEqual(len(self.hub.named("frame_received")), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothing_read_after_close(self) -> None:
        """
        Once this node closes a link, frames already buffered behind the
        one that closed it are not decoded or answered.
        """
        self.hub.reject_frames = "refused"
        self.protocol.dataReceived(
            length_prefixed(wire.message("m1", PEER_ID, None))
            + length_prefixed(wire.ping(4)) + length_prefixed(wire.ping(5))[:3])
        self.protocol.dataReceived(length_prefixed(wire.ping(5))[3:])
        self.assertViolation("refused")
        self.assertEqual(self.sent(), [])

    def test_request_answered(self) -> None:
        d = self.protocol.request(log_request)
        [request] = self.sent_messages()
        assert isinstance(request, wire.LogRequest)
        self.assertEqual(request.since, 0)
        self.assertNoResult(d)
        self.feed(wire.log_entries(request.id + 1000, []))
        self.assertNoResult(d)
        batch = wire.batch(BATCH_HEAD, [b'{"a":1}'], [])
        self.feed(wire.log_entries(request.id, [batch]))
        self.assertEqual(
            self.successResultOf(d),
            wire.LogEntries(id=request.id, batches=(
                wire.Batch(head=BATCH_HEAD, adds=({"a": 1},), removes=()),)),
        )
        self.assertEqual(self.hub.named("frame_received"), [])

    def test_tree_and_diff_answers(self) -> None:
        """
        Tree and diff answers go to their requests, not to the node.
        """
        tree = self.protocol.request(lambda i: wire.tree_request(i, [""]))
        diff = self.protocol.request(lambda i: wire.diff_request(i, "a", [b"12345678"]))
        tree_request, diff_request = self.sent_messages()
        self.assertEqual(tree_request.prefixes, ("",))
        self.assertEqual(diff_request.have, (b"12345678",))
        self.feed(wire.diff(diff_request.id, 3, ["a" * 64], []))
        self.feed(wire.tree_nodes(tree_request.id, empty_head(),
                                  [wire.tree_node("", 0, bytes(32), None)]))
        self.assertEqual(self.successResultOf(diff),
                         wire.Diff(id=diff_request.id, rev=3, missing=("a" * 64,), extra=()))
        self.assertEqual(
            self.successResultOf(tree),
            wire.TreeNodes(id=tree_request.id, head=empty_head(), nodes=(
                wire.TreeNode(prefix="", count=0, digest=bytes(wire.DIGEST_BYTES),
                              children=None),)),
        )
        self.assertEqual(self.hub.named("frame_received"), [])

    def test_request_ids_are_distinct(self) -> None:
        self.protocol.request(wire.ping)
        self.protocol.request(wire.ping)
        first, second = self.sent_messages()
        self.assertNotEqual(first.id, second.id)

    def test_each_response_to_its_request(self) -> None:
        d1 = self.protocol.request(lambda i: wire.fetch(i, []))
        d2 = self.protocol.request(lambda i: wire.fetch(i, []))
        first, second = self.sent_messages()
        self.feed(wire.objects(second.id, [b'{"b":2}']))
        self.assertNoResult(d1)
        self.assertEqual(self.successResultOf(d2).objects, ({"b": 2},))
        self.feed(wire.objects(first.id, [b'{"a":1}']))
        self.assertEqual(self.successResultOf(d1).objects, ({"a": 1},))

    def test_request_refused(self) -> None:
        d = self.protocol.request(log_request)
        [request] = self.sent_messages()
        self.feed(wire.refusal(request.id, "too busy"))
        failure = self.failureResultOf(d, RequestRefused)
        self.assertIn("too busy", failure.getErrorMessage())
        # Callers that handle any failed request handle a refusal too.
        self.assertIsInstance(failure.value, RequestFailed)
        self.assertEqual(self.hub.named("frame_received"), [])
        self.assertTrue(self.protocol.is_live)

    def test_request_timeout(self) -> None:
        d = self.protocol.request(log_request)
        [request] = self.sent_messages()
        self.clock.advance(CONFIG.request_timeout - 0.5)
        self.assertNoResult(d)
        # Keep the link alive meanwhile.
        self.feed(wire.message("m", PEER_ID, None))
        self.clock.advance(1)
        failure = self.failureResultOf(d, RequestFailed)
        self.assertIn("timed out", failure.getErrorMessage())
        self.assertNotIsInstance(failure.value, RequestRefused)
        # A late answer, or a late refusal, is harmless.
        self.feed(wire.log_entries(request.id, []))
        self.feed(wire.refusal(request.id, "too late"))
        self.assertEqual(self.hub.named("violation"), [])
        self.assertEqual(self.hub.named("frame_received"), [])

    def test_connection_lost_fails_pending_requests(self) -> None:
        requests = [self.protocol.request(log_request) for _ in range(3)]
        self.lose(ConnectionLost("gone"))
        for d in requests:
            failure = self.failureResultOf(d, RequestFailed)
            self.assertIn("link lost", failure.getErrorMessage())
            self.assertNotIsInstance(failure.value, RequestRefused)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertRaises(RequestFailed, self.protocol.request, log_request)

    def test_link_down_once_on_loss(self) -> None:
        self.lose(ConnectionLost("gone"))
        [(link, reason)] = self.hub.named("link_down")
        self.assertIs(link, self.protocol)
        self.assertIn("gone", reason)
        self.assertFalse(self.protocol.is_live)
        self.assertEqual(self.hub.named("violation"), [])

    def test_close(self) -> None:
        self.protocol.close("switching primary")
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.aborted)
        self.assertEqual(self.hub.named("link_down"), [(self.protocol, "switching primary")])
        self.assertEqual(self.protocol.close_reason, "switching primary")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.lose()
        self.assertEqual(len(self.hub.named("link_down")), 1)
        self.assertEqual(self.hub.named("violation"), [])

    def test_drop(self) -> None:
        self.protocol.drop("sent nonsense")
        self.assertViolation("sent nonsense")
        self.assertEqual(len(self.hub.named("link_down")), 1)

    def test_when_lost(self) -> None:
        d1 = self.protocol.when_lost()
        d2 = self.protocol.when_lost()
        self.assertIsNot(d1, d2)
        self.assertNoResult(d1)
        self.lose()
        self.assertIsNone(self.successResultOf(d1))
        self.assertIsNone(self.successResultOf(d2))
        self.assertIsNone(self.successResultOf(self.protocol.when_lost()))

    def test_send_frame(self) -> None:
        self.protocol.send_frame(wire.ping(5))
        self.assertEqual(self.sent(), [wire.ping(5)])
        self.lose()
        self.protocol.send_frame(wire.ping(6))
        self.assertEqual(self.sent(), [])


class TrafficCountTests(ProtocolTestMixin, SynchronousTestCase):
    """
    A link counts the frames and bytes it sends and receives, length
    prefixes included.
    """

    def test_new_link_counts_nothing(self) -> None:
        self.assertEqual((self.protocol.frames_sent, self.protocol.bytes_sent,
                          self.protocol.frames_received, self.protocol.bytes_received),
                         (0, 0, 0, 0))

    def test_counts(self) -> None:
        self.handshake()
        written = len(self.transport.value())
        self.assertEqual(self.protocol.frames_sent, 1)
        self.assertEqual(self.protocol.bytes_sent, written)
        self.feed(peer_hello())
        self.assertEqual(self.protocol.frames_received, 1)
        self.assertEqual(self.protocol.bytes_received, len(length_prefixed(peer_hello())))
        received = self.protocol.bytes_received

        message = wire.message("m", PEER_ID, {"x": "ü"})
        self.feed(wire.ping(4), message)
        self.protocol.send_frame(message)
        self.assertEqual(self.protocol.frames_received, 3)
        self.assertEqual(self.protocol.bytes_received,
                         received + len(length_prefixed(wire.ping(4)))
                         + len(length_prefixed(message)))
        # The hello, the pong and the message.
        self.assertEqual(self.protocol.frames_sent, 3)
        self.assertEqual(self.protocol.bytes_sent, len(self.transport.value()))
        # The node's totals count the same.
        traffic = self.hub.traffic
        self.assertEqual((traffic.frames_in, traffic.bytes_in, traffic.frames_out,
                          traffic.bytes_out),
                         (3, self.protocol.bytes_received, 3, self.protocol.bytes_sent))

    def test_frame_that_breaks_the_schema_is_counted(self) -> None:
        self.go_live()
        self.feed(b"[1, 2")
        self.assertViolation("not UTF-8 JSON")
        self.assertEqual(self.protocol.frames_received, 2)
        self.assertEqual(self.protocol.bytes_received,
                         len(length_prefixed(peer_hello())) + len(length_prefixed(b"[1, 2")))


class RefusedLinkTests(ProtocolTestMixin, SynchronousTestCase):
    def test_link_up_refusal_closes(self) -> None:
        self.hub.refusal = "duplicate link"
        self.handshake()
        self.feed(peer_hello())
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.aborted)
        self.assertFalse(self.protocol.is_live)
        self.assertEqual(self.protocol.close_reason, "duplicate link")
        self.assertEqual(self.hub.named("violation"), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FuzzTests(SynchronousTestCase):
    """
    Whatever bytes a peer sends, the protocol raises nothing: it dispatches,
    or reports one violation.
    """

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=64), max_size=6), st.booleans())
    def test_arbitrary_data(self, chunks: list[bytes], live: bool) -> None:
        hub = RecordingHub()
        transport = TLSStringTransport(certificate(PEER_ID))
        protocol = PeerProtocol(hub, Clock(), CONFIG, outbound=False)
        protocol.makeConnection(transport)
        protocol.handshakeCompleted()
        if live:
            protocol.dataReceived(length_prefixed(peer_hello()))
        for chunk in chunks:
            protocol.dataReceived(chunk)
        self.assertLessEqual(len(hub.named("violation")), 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(hub.named("link_down")), 1 if live else 0)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=40), max_size=6))
    def test_arbitrary_frames(self, frames: list[bytes]) -> None:
        hub = RecordingHub()
        transport = TLSStringTransport(certificate(PEER_ID))
        protocol = PeerProtocol(hub, Clock(), CONFIG, outbound=True)
        protocol.makeConnection(transport)
        protocol.handshakeCompleted()
        protocol.dataReceived(length_prefixed(peer_hello()))
        protocol.dataReceived(b"".join(length_prefixed(f) for f in frames))
        self.assertLessEqual(len(hub.named("violation")), 1)
        self.assertLessEqual(len(hub.named("link_down")), 1)


class BackpressureTests(ProtocolTestMixin, SynchronousTestCase):
    """
    Frames wait in a capped queue while the transport has paused its
    producer; a peer that does not read is dropped past the cap.
    """

    def test_producer_registered(self) -> None:
        self.assertTrue(self.transport.streaming)
        self.assertIsNotNone(self.transport.producer)
        self.assertIsNot(self.transport.producer, self.protocol)

    def test_frames_wait_while_paused_and_flow_in_order_on_resume(self) -> None:
        self.go_live()
        producer = self.transport.producer
        producer.pauseProducing()
        self.protocol.send_frame(wire.ping(1))
        self.protocol.send_frame(wire.ping(2))
        self.assertEqual(self.transport.value(), b"")
        producer.resumeProducing()
        self.assertEqual([m.id for m in self.sent_messages()], [1, 2])

    def relink(self, send_queue_limit: int, transport: TLSStringTransport) -> None:
        """
        Replace the link with a live one over C{transport} whose send
        queue holds at most C{send_queue_limit} bytes.
        """
        config = Config(ping_interval=1.0, send_queue_limit=send_queue_limit,
                        hello_max_frame=1024, max_frame=64 * 1024)
        self.protocol = PeerProtocol(self.hub, self.clock, config, outbound=False)
        self.transport = transport
        self.protocol.makeConnection(transport)
        self.go_live()

    def test_peer_that_does_not_read_is_dropped(self) -> None:
        self.relink(1000, TLSStringTransport(certificate(PEER_ID)))
        self.transport.producer.pauseProducing()
        frame = big_message(400)
        self.protocol.send_frame(frame)
        self.protocol.send_frame(frame)
        self.assertEqual(self.hub.named("violation"), [])
        self.protocol.send_frame(frame)
        self.assertViolation("does not read", "1000")

    def fill_on_write(self, send_queue_limit: int = CONFIG.send_queue_limit) -> list[int]:
        """
        A new live link whose transport pauses its producer after every
        write, as a TCP transport does once its buffer passes its size;
        returns the lengths written, as they are written.
        """
        transport = FillingTransport(certificate(PEER_ID))
        self.relink(send_queue_limit, transport)
        transport.writes.clear()
        transport.fill = True
        return transport.writes

    def test_large_frame_written_in_pieces_as_the_transport_drains(self) -> None:
        written = self.fill_on_write()
        frame = big_message(2 * SEND_PIECE + 100)
        small = wire.ping(7)
        self.protocol.send_frame(frame)
        self.protocol.send_frame(small)
        self.assertEqual(written, [4 + SEND_PIECE])
        for _ in range(3):
            self.transport.producer.resumeProducing()
        self.assertEqual(written, [4 + SEND_PIECE, SEND_PIECE, 100, 4 + len(small)])
        self.assertEqual(self.sent(), [frame, small])

    def test_rest_of_a_frame_is_not_counted_as_queued(self) -> None:
        """
        A frame longer than the queue's cap can be sent: what is left of
        it is the transport's, and only whole frames behind it count.
        """
        self.fill_on_write(send_queue_limit=SEND_PIECE)
        self.protocol.send_frame(big_message(3 * SEND_PIECE))
        self.transport.producer.resumeProducing()
        self.protocol.send_frame(big_message(SEND_PIECE // 2))
        self.assertEqual(self.hub.named("violation"), [])
        self.protocol.send_frame(big_message(SEND_PIECE // 2 + 10))
        self.assertViolation("does not read", str(SEND_PIECE + 18))


class SendQueueTests(SynchronousTestCase):
    """
    L{SendQueue} on its own, with a list for the transport.
    """

    def setUp(self) -> None:
        self.written: list[bytes] = []
        self.overflows: list[int] = []
        self.queue = SendQueue(self.written.append, 10 * SEND_PIECE, self.overflows.append)

    def test_frame_of_one_piece_written_whole(self) -> None:
        self.queue.send(b"x" * SEND_PIECE)
        self.assertEqual([len(w) for w in self.written], [4 + SEND_PIECE])

    def test_unpaused_transport_takes_every_piece_at_once(self) -> None:
        frame = bytes(range(256)) * (SEND_PIECE // 128 + 1)
        self.queue.send(frame)
        self.assertEqual([len(w) for w in self.written],
                         [4 + SEND_PIECE, SEND_PIECE, len(frame) - 2 * SEND_PIECE])
        self.assertEqual(b"".join(self.written), struct.pack("!I", len(frame)) + frame)

    def test_finish_writes_the_rest_then_the_queue(self) -> None:
        self.queue.send(b"a")
        self.queue.pauseProducing()
        self.queue.resumeProducing()
        self.written.clear()
        frame = b"b" * (3 * SEND_PIECE)
        self.queue._write = lambda data: (self.written.append(data), self.queue.pauseProducing())
        self.queue.send(frame)
        self.queue.send(b"c")
        self.assertEqual(self.queue.queued_bytes, 5)
        self.queue.finish()
        self.assertEqual(b"".join(self.written),
                         length_prefixed(frame) + length_prefixed(b"c"))
        self.assertFalse(self.queue.send(b"d"))

    def test_stop_drops_the_rest(self) -> None:
        self.queue._write = lambda data: (self.written.append(data), self.queue.pauseProducing())
        self.queue.send(b"b" * (3 * SEND_PIECE))
        self.queue.send(b"c")
        self.queue.stopProducing()
        self.queue.resumeProducing()
        self.assertEqual([len(w) for w in self.written], [4 + SEND_PIECE])
        self.assertEqual(self.queue.queued_bytes, 0)
        self.assertEqual(self.overflows, [])
