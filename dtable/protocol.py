"""
One Twisted Protocol per peer connection: the handshake, framing, keep-alive,
requests in flight, and dispatch of validated frames to the node.

A connection runs over mutual TLS 1.3. The server speaks first: it sends its
hello once the TLS handshake (which verified the client's certificate) is
complete; the client answers with its own hello after it has accepted the
server's, so a link is up on either side only after both hellos were seen.
Frames are decoded and validated by L{dtable.wire}; any violation closes the
connection once, with its reason in the log. What a frame means is the
node's business (L{ILinkHub}); this module knows nothing of tables or policy.
"""

from __future__ import annotations

import itertools
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from automat import MethodicalMachine
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import StringTooLongError
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from dtable import wire
from dtable._log import debug_channel
from dtable.crypto import node_id_from_certificate
from dtable.interfaces import IPeerLink
from dtable.wire import ProtocolViolation

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from dtable.config import Config
    from dtable.peers import PeerAddress

log = Logger(namespace="dtable.links")


class RequestFailed(Exception):
    """
    A request got no answer: it timed out, the peer refused it, or the link
    was lost first.
    """


class RequestRefused(RequestFailed):
    """
    The peer answered that it cannot serve the request.
    """


class Traffic:
    """
    Bytes and frames (with their length prefixes) over every connection of
    a node, kept by its connections as they go.
    """

    __slots__ = ("bytes_in", "bytes_out", "frames_in", "frames_out")

    def __init__(self) -> None:
        self.bytes_in = self.bytes_out = 0
        self.frames_in = self.frames_out = 0


class ILinkHub(Interface):
    """
    What a connection needs from its node.
    """

    node_id = Attribute("This node's id.")
    traffic = Attribute("The node's L{Traffic}, which every connection adds to.")

    def local_hello(role: str) -> bytes:
        """
        This node's hello frame for a connection of C{role}.
        """

    def link_up(link: "PeerProtocol") -> str | None:
        """
        Both hellos were accepted. Return None to keep the link, or a reason
        to close it.
        """

    def frame_received(link: "PeerProtocol", message: Any, frame: bytes) -> None:
        """
        A validated frame other than a hello or a keep-alive arrived.

        @raise ProtocolViolation: if the frame is not acceptable now.
        """

    def link_down(link: "PeerProtocol", reason: str) -> None:
        """
        A link that was up is gone.
        """

    def violation(link: "PeerProtocol", reason: str) -> None:
        """
        The peer broke the contract; the connection is being closed.
        """

    def rtt_measured(link: "PeerProtocol", seconds: float) -> None:
        """
        A keep-alive ping on a live link came back after C{seconds}.
        """


#: The most of one frame handed to the transport at once. TLS encrypts what
#: it is given in the turn it is given: a 64 MB frame written whole held
#: the reactor for 100 ms and more per link. Written in pieces, the
#: transport's own back-pressure (it pauses its producer when its buffer
#: fills) spreads a large frame over many turns.
SEND_PIECE = 1024 * 1024


@implementer(IPushProducer)
class SendQueue:
    """
    The outbound side of one link: frames, each with its length prefix, go
    straight to the transport while it keeps up; when the transport asks
    its producer to pause, frames wait here, and a peer that lets more than
    C{limit} bytes pile up is dropped rather than allowed to grow this
    node's memory.

    A frame longer than L{SEND_PIECE} is written a piece at a time, the
    next piece when the transport asks for more. What is left of a frame
    being written counts as written (the transport used to hold it), not
    as queued: the limit is on whole frames waiting behind it.

    A separate object from the protocol, because a protocol's own
    pauseProducing/resumeProducing are about the inbound side.
    """

    _PREFIX = struct.Struct("!I")

    def __init__(self, write: Callable[[bytes], None], limit: int,
                 overflow: Callable[[int], None]) -> None:
        self._write = write
        self._limit = limit
        self._overflow = overflow
        self._queue: deque[bytes] = deque()
        #: A frame being written in pieces, and how much of it is written.
        self._rest: bytes | None = None
        self._rest_at = 0
        self.queued_bytes = 0
        self.paused = False
        self._stopped = False

    def send(self, frame: bytes) -> bool:
        """
        Write C{frame} with its length prefix, or queue it; False if the
        link queues nothing more.
        """
        if self._stopped:
            return False
        if not self.paused and not self._queue and self._rest is None:
            self._start(frame)
            return True
        self._queue.append(frame)
        self.queued_bytes += len(frame) + 4
        if self.queued_bytes > self._limit:
            self._overflow(self.queued_bytes)
        return True

    def _start(self, frame: bytes) -> None:
        prefix = self._PREFIX.pack(len(frame))
        if len(frame) <= SEND_PIECE:
            self._write(prefix + frame)
        else:
            # Not prefix + frame: that copies all of it for four bytes.
            self._write(prefix + frame[:SEND_PIECE])
            self._continue(frame, SEND_PIECE)

    def _continue(self, frame: bytes, at: int) -> None:
        """
        Write C{frame} from C{at} until it is all written or the transport
        pauses; keep the rest for L{resumeProducing}.
        """
        end = len(frame)
        while at < end and not self.paused and not self._stopped:
            self._write(frame[at:at + SEND_PIECE])
            at += SEND_PIECE
        if at < end and not self._stopped:
            self._rest, self._rest_at = frame, at
        else:
            self._rest = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._rest is not None:
            self._continue(self._rest, self._rest_at)
        while self._queue and self._rest is None and not self.paused and not self._stopped:
            frame = self._queue.popleft()
            self.queued_bytes -= len(frame) + 4
            self._start(frame)

    def stopProducing(self) -> None:
        self._stopped = True
        self._queue.clear()
        self._rest = None
        self.queued_bytes = 0

    def finish(self) -> None:
        """
        The link is closing politely: hand what is queued to the transport
        (which buffers it) and queue nothing more.
        """
        if self._rest is not None and not self._stopped:
            self._write(self._rest[self._rest_at:])
            self._rest = None
        while self._queue and not self._stopped:
            frame = self._queue.popleft()
            self.queued_bytes -= len(frame) + 4
            self._write(self._PREFIX.pack(len(frame)) + frame)
        self._stopped = True


@implementer(IPeerLink, IHandshakeListener)
class FrameReceiver(Protocol):
    """
    Frames of a 4-byte big-endian length and that many bytes, as
    L{twisted.protocols.basic.Int32StringReceiver} reads them, but in linear
    time: the received bytes accumulate in one C{bytearray} (which CPython
    trims from the front in place), where C{Int32StringReceiver} copies
    everything buffered on every read, so that a frame of 16 MB arriving in
    TLS records of 16 KB took minutes.

    Frames are handled for at most C{turn_budget} seconds in one turn of
    the reactor: past it, reading pauses and the frames already buffered
    wait for the next turn, so that a peer that sent many large batches
    cannot keep this node from its timers and other connections.

    @ivar MAX_LENGTH: the longest frame accepted; a longer length prefix
        calls L{lengthLimitExceeded} and reading stops.
    @ivar clock: the reactor (an C{IReactorTime}), for the turn budget.
    """

    MAX_LENGTH = 99999
    turn_budget = 0.02
    clock: "IReactorTime"
    _PREFIX = struct.Struct("!I")

    def __init__(self) -> None:
        self._received = bytearray()
        self._reading = True
        self._next_turn: "IDelayedCall | None" = None

    def dataReceived(self, data: bytes) -> None:
        if not self._reading:
            return
        self._received += data
        if self._next_turn is None:
            self._read_frames()

    def _read_frames(self) -> None:
        received = self._received
        prefix = self._PREFIX.size
        began = self.clock.seconds()
        while self._reading and len(received) >= prefix:
            (length,) = self._PREFIX.unpack_from(received)
            if length > self.MAX_LENGTH:
                self._reading = False
                self.lengthLimitExceeded(length)
                return
            end = prefix + length
            if len(received) < end:
                return
            with memoryview(received) as view:
                frame = bytes(view[prefix:end])
            del received[:end]
            self.stringReceived(frame)
            if (self._reading and self._frame_waiting()
                    and self.clock.seconds() - began >= self.turn_budget):
                self.transport.pauseProducing()
                self._next_turn = self.clock.callLater(0, self._continue)
                return

    def _frame_waiting(self) -> bool:
        received = self._received
        prefix = self._PREFIX.size
        return (len(received) >= prefix
                and len(received) >= prefix + self._PREFIX.unpack_from(received)[0])

    def _continue(self) -> None:
        self._next_turn = None
        self._read_frames()
        if self._next_turn is None and self._reading:
            self.transport.resumeProducing()

    def stop_reading(self) -> None:
        """
        Ignore every byte from now on, including frames already buffered:
        nothing after a violation or a close is to be acted on.
        """
        self._reading = False
        self._received.clear()
        if self._next_turn is not None:
            if self._next_turn.active():
                self._next_turn.cancel()
            self._next_turn = None

    def stringReceived(self, frame: bytes) -> None:
        raise NotImplementedError

    def lengthLimitExceeded(self, length: int) -> None:
        raise NotImplementedError


class PeerProtocol(FrameReceiver):
    """
    One connection to a peer.

    @ivar node_id: the peer's node id from its certificate, once TLS is up.
    @ivar hello: the peer's accepted hello.
    @ivar outbound: True if this node dialled.
    """

    _machine = MethodicalMachine()

    def __init__(self, hub: ILinkHub, clock: "IReactorTime", config: "Config",
                 outbound: bool, role: str = "link",
                 address: "PeerAddress | None" = None) -> None:
        super().__init__()
        self.hub = hub
        self.clock = clock
        self.config = config
        self.outbound = outbound
        self.role = role
        self.address = address
        self.node_id: str | None = None
        self.hello: wire.Hello | None = None
        self.rtts: deque[float] = deque(maxlen=config.ping_window)
        self.MAX_LENGTH = config.hello_max_frame
        self._ids = itertools.count(1)
        self._pending: dict[int, Deferred] = {}
        self._handshake_call: "IDelayedCall | None" = None
        self._pinger: LoopingCall | None = None
        self._last_heard = 0.0
        self._lost_waiters: list[Deferred] = []
        self._is_lost = False
        self._lost_reason = "connection lost"
        self.bytes_sent = self.bytes_received = 0
        self.frames_sent = self.frames_received = 0
        self.close_reason: str | None = None
        self._links_log = debug_channel("dtable.links", 1, config.debug)
        self._wire_log = debug_channel("dtable.wire", 3, config.debug)

    # Automat lifecycle -------------------------------------------------------

    @_machine.state(initial=True)
    def _awaiting_hello(self) -> None:
        "Connected; the peer's hello has not been accepted yet."

    @_machine.state()
    def _live(self) -> None:
        "Both hellos were accepted; frames are dispatched to the node."

    @_machine.state()
    def _closing(self) -> None:
        "The connection is being closed; frames are ignored."

    @_machine.state()
    def _closed(self) -> None:
        "The connection is gone."

    @_machine.input()
    def _hello_received(self, hello: wire.Hello) -> None:
        "A hello that matched the peer's certificate arrived."

    @_machine.input()
    def _frame_received(self, message: Any, frame: bytes) -> None:
        "A validated frame other than a hello arrived."

    @_machine.input()
    def _violation(self, reason: str) -> None:
        "The peer broke the wire contract."

    @_machine.input()
    def _close_requested(self, reason: str) -> None:
        "This node decided to close the connection."

    @_machine.input()
    def _lost(self, reason: str) -> None:
        "The transport is gone."

    @_machine.output()
    def _accept_hello(self, hello: wire.Hello) -> None:
        self.hello = hello
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        self.MAX_LENGTH = self.config.max_frame
        if self.outbound:
            self.sendString(self.hub.local_hello(self.role))
        self._links_log.debug(
            "link {state} with {peer_id} at {address} ({role}, "
            "{direction})", state="up", peer_id=hello.node_id,
            address=self._peer_text(), role=hello.role,
            direction="outbound" if self.outbound else "inbound",
        )
        self._pinger = LoopingCall(self._tick)
        self._pinger.clock = self.clock
        self._pinger.start(self.config.ping_interval, now=False)
        refusal = self.hub.link_up(self)
        if refusal is not None:
            self.close(refusal)

    @_machine.output()
    def _dispatch(self, message: Any, frame: bytes) -> None:
        self._deliver(message, frame)

    def _deliver(self, message: Any, frame: bytes) -> None:
        try:
            self.hub.frame_received(self, message, frame)
        except ProtocolViolation as e:
            self._violation(e.reason)

    @_machine.output()
    def _reject_early_frame(self, message: Any, frame: bytes) -> None:
        self._drop(f"sent {type(message).__name__} before its hello")

    @_machine.output()
    def _reject_second_hello(self, hello: wire.Hello) -> None:
        self._drop("sent a second hello")

    @_machine.output()
    def _drop_for_violation(self, reason: str) -> None:
        self._drop(reason)

    @_machine.output()
    def _close_cleanly(self, reason: str) -> None:
        self.close_reason = reason
        self.stop_reading()
        self._links_log.debug("closing link to {peer_id} at {address}: {reason}",
                  peer_id=self.node_id, address=self._peer_text(), reason=reason)
        self._stop_timers()
        if self.transport is not None:
            # A TLS transport with a registered producer does not shut down
            # until the producer is unregistered: it would wait for the peer.
            self._sender.finish()
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    @_machine.output()
    def _forget_link(self) -> None:
        self.hub.link_down(self, self.close_reason or self._lost_reason)

    @_machine.output()
    def _report_early_loss(self, reason: str) -> None:
        # TLS refusals (a foreign or missing certificate) end here: the
        # connection never got as far as a hello.
        log.warn("connection {direction} {address} closed before its hello: {reason}",
                 direction="to" if self.outbound else "from",
                 address=self._peer_text(), reason=reason)
        self.hub.violation(self, f"closed before its hello: {reason}")

    @_machine.output()
    def _release(self, reason: str) -> None:
        self._is_lost = True
        self._stop_timers()
        self._sender.stopProducing()
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(RequestFailed(f"link lost: {reason}"))
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    _awaiting_hello.upon(_hello_received, enter=_live, outputs=[_accept_hello])
    _awaiting_hello.upon(_frame_received, enter=_closing, outputs=[_reject_early_frame])
    _awaiting_hello.upon(_violation, enter=_closing, outputs=[_drop_for_violation])
    _awaiting_hello.upon(_close_requested, enter=_closing, outputs=[_close_cleanly])
    _awaiting_hello.upon(_lost, enter=_closed, outputs=[_report_early_loss, _release])
    # A live link is forgotten by the node as soon as it starts closing, so
    # that nothing more is sent on it.
    _live.upon(_hello_received, enter=_closing,
               outputs=[_reject_second_hello, _forget_link])
    _live.upon(_frame_received, enter=_live, outputs=[_dispatch])
    _live.upon(_violation, enter=_closing, outputs=[_drop_for_violation, _forget_link])
    _live.upon(_close_requested, enter=_closing, outputs=[_close_cleanly, _forget_link])
    _live.upon(_lost, enter=_closed, outputs=[_forget_link, _release])
    _closing.upon(_hello_received, enter=_closing, outputs=[])
    _closing.upon(_frame_received, enter=_closing, outputs=[])
    _closing.upon(_violation, enter=_closing, outputs=[])
    _closing.upon(_close_requested, enter=_closing, outputs=[])
    _closing.upon(_lost, enter=_closed, outputs=[_release])
    _closed.upon(_hello_received, enter=_closed, outputs=[])
    _closed.upon(_frame_received, enter=_closed, outputs=[])
    _closed.upon(_violation, enter=_closed, outputs=[])
    _closed.upon(_close_requested, enter=_closed, outputs=[])

    # Twisted callbacks -------------------------------------------------------

    def connectionMade(self) -> None:
        self._last_heard = self.clock.seconds()
        # Small frames (pings, hellos, batches of one) must not wait for
        # Nagle's algorithm: RTTs choose the links.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._sender = SendQueue(self.transport.write, self.config.send_queue_limit,
                                 self._send_overflow)
        self.transport.registerProducer(self._sender, True)
        self._handshake_call = self.clock.callLater(
            self.config.handshake_timeout, self._handshake_timed_out
        )

    def handshakeCompleted(self) -> None:
        try:
            self.node_id = node_id_from_certificate(self.transport.getPeerCertificate())
        except Exception as e:
            self._violation(f"peer certificate has no node id: {e}")
            return
        if not self.outbound:
            # The server speaks first: the client treats the link as up only
            # once this hello arrives, after the server checked its
            # certificate.
            self.sendString(self.hub.local_hello(self.role))

    def dataReceived(self, data: bytes) -> None:
        # Any bytes mean the peer is there: a frame of many megabytes may
        # take longer than the dead-link timeout to arrive whole.
        self._last_heard = self.clock.seconds()
        super().dataReceived(data)

    def stringReceived(self, frame: bytes) -> None:
        self._last_heard = self.clock.seconds()
        self.bytes_received += len(frame) + 4
        self.frames_received += 1
        traffic = self.hub.traffic
        traffic.bytes_in += len(frame) + 4
        traffic.frames_in += 1
        try:
            message = wire.decode(frame)
        except ProtocolViolation as e:
            self._violation(e.reason)
            return
        self._wire_log.debug("frame {kind} from {peer_id}",
                             kind=type(message).__name__, peer_id=self.node_id)
        if isinstance(message, wire.Hello):
            if self.node_id is None:
                self._violation("hello before the TLS handshake completed")
            elif message.node_id != self.node_id:
                self._violation("hello node_id does not match the certificate")
            else:
                self._hello_received(message)
            return
        if self.is_live:
            if isinstance(message, wire.Ping):
                self.sendString(wire.pong(message.id))
                return
            request_id = wire.response_id(message)
            if request_id is not None:
                self._answer(request_id, message)
                return
            # What the live state does with a frame (see _dispatch), without
            # the state machine's own work per call: 9-16 us, more than
            # decoding a message frame takes.
            self._deliver(message, frame)
            return
        self._frame_received(message, frame)

    def sendString(self, string: bytes) -> None:
        """
        Frame C{string} and queue it for the peer (see L{SendQueue}).
        """
        if len(string) > 0xFFFFFFFF:
            raise StringTooLongError(f"a frame of {len(string)} bytes cannot be sent")
        if self._sender.send(string):
            self.bytes_sent += len(string) + 4
            self.frames_sent += 1
            traffic = self.hub.traffic
            traffic.bytes_out += len(string) + 4
            traffic.frames_out += 1

    def _send_overflow(self, queued: int) -> None:
        self._violation(
            f"peer does not read: {queued} bytes waiting, over the limit of "
            f"{self.config.send_queue_limit}")

    def lengthLimitExceeded(self, length: int) -> None:
        self._violation(f"frame of {length} bytes exceeds the limit of {self.MAX_LENGTH}")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[override]
        self.stop_reading()
        text = reason.getErrorMessage() if reason is not None else "closed"
        self._lost_reason = text
        self._lost(text)

    # The link, for the node ---------------------------------------------------

    @property
    def is_live(self) -> bool:
        return self.hello is not None and not self._is_lost and self.close_reason is None

    def send_frame(self, frame: bytes) -> None:
        if self.transport is not None and not self._is_lost:
            self.sendString(frame)

    def request(self, build: Callable[[int], bytes]) -> Deferred:
        """
        Send C{build(request_id)}; the Deferred fires with the response
        message, or fails with L{RequestFailed}.
        """
        if self._is_lost:
            raise RequestFailed("link is closed")
        request_id = next(self._ids)
        d: Deferred = Deferred(lambda _: self._pending.pop(request_id, None))
        self._pending[request_id] = d
        d.addTimeout(self.config.request_timeout, self.clock)

        def translate(f: Failure) -> Failure:
            if f.check(TimeoutError, CancelledError):
                return Failure(RequestFailed(f"request {request_id} timed out"))
            return f

        d.addErrback(translate)
        self.sendString(build(request_id))
        return d

    def close(self, reason: str) -> None:
        """
        Close the link politely, logging C{reason} at the debug level.
        """
        self._close_requested(reason)

    def drop(self, reason: str) -> None:
        """
        The peer broke the contract: log C{reason}, count it against the
        peer, and abort the connection.
        """
        self._violation(reason)

    def when_lost(self) -> Deferred:
        """
        A fresh Deferred that fires once the connection is gone.
        """
        if self._is_lost:
            return succeed(None)
        d: Deferred = Deferred()
        self._lost_waiters.append(d)
        return d

    @property
    def rtt_mean(self) -> float | None:
        return sum(self.rtts) / len(self.rtts) if self.rtts else None

    # Internals --------------------------------------------------------------

    def _answer(self, request_id: int, message: Any) -> None:
        d = self._pending.pop(request_id, None)
        if d is None:
            # An answer after its timeout, or to nothing we asked: harmless.
            return
        if isinstance(message, wire.Refusal):
            d.errback(RequestRefused(f"peer refused: {message.reason}"))
        else:
            d.callback(message)

    def _tick(self) -> None:
        silent = self.clock.seconds() - self._last_heard
        if silent > self.config.dead_link_timeout:
            self.close(f"dead link: nothing heard for {silent:.1f} s")
            return
        self.measure_rtt().addCallbacks(
            lambda rtt: self.hub.rtt_measured(self, rtt), lambda _: None)

    def measure_rtt(self) -> Deferred:
        """
        Send one ping; the Deferred fires with the round-trip time in seconds
        (also kept in C{rtts}), or fails with L{RequestFailed}.
        """
        sent = self.clock.seconds()

        def measured(_: Any) -> float:
            rtt = self.clock.seconds() - sent
            self.rtts.append(rtt)
            return rtt

        return self.request(wire.ping).addCallback(measured)

    def _handshake_timed_out(self) -> None:
        self._handshake_call = None
        self._violation(
            f"no hello within {self.config.handshake_timeout} s of connecting"
        )

    def _drop(self, reason: str) -> None:
        self.close_reason = reason
        self.stop_reading()
        log.warn("dropping connection from {address} (peer {peer_id}): {reason}",
                 address=self._peer_text(), peer_id=self.node_id, reason=reason)
        self.hub.violation(self, reason)
        self._stop_timers()
        if self.transport is not None:
            self.transport.abortConnection()

    def _stop_timers(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None

    def _peer_text(self) -> str:
        if self.address is not None:
            return str(self.address)
        if self.transport is None:
            return "?"
        peer = self.transport.getPeer()
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
