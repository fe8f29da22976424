"""
DistributedTable: a node of a dtable network, as a Twisted MultiService.

The service composes the layers: it derives the node's TLS identity from the
network key, loads the table from its store, listens for peers, keeps an
outbound link, applies and forwards the master's batches, catches up from
peers that are ahead, floods messages, and tells observers what changed. It
is the hub the connections report to; the rules it follows live in
L{dtable.replication}, L{dtable.broadcast} and L{dtable.peers}.
"""

from __future__ import annotations

import gc
import ipaddress
import os
import signal
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from twisted.application.service import MultiService
from twisted.internet.defer import (
    CancelledError, Deferred, DeferredList, fail, maybeDeferred, succeed,
)
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.task import Cooperator, LoopingCall, SchedulerStopped
from twisted.logger import Logger
from zope.interface import implementer

from dtable import catchup, crypto, wire
from dtable._log import debug_channel
from dtable.broadcast import DuplicateFilter, new_message_id
from dtable.canonical import (
    InvalidObjectError, canonical_bytes, hash_bytes, is_hash,
)
from dtable.config import Config, ConfigError, master_signing_key
from dtable.interfaces import IStore, ITableObserver, TableObserver
from dtable.firewall import Firewall, FirewallEvent
from dtable.health import StallProbe, memory_report, rss_bytes
from dtable.hostfirewall import run_command
from dtable.links import GuardedTLSFactory, LinkServerFactory, PeerConnection, ProbeFactory
from dtable.peers import (
    ComponentTracker, PeerAddress, PeerDirectory, PrimaryPolicy, normalize_host,
)
from dtable.protocol import ILinkHub, PeerProtocol, RequestFailed, Traffic
from dtable.replication import (
    BadHead, BatchLog, BatchRejected, BatchWindow, Change, Decision, HeadSigner,
    HeadVerifier, Replica,
)
from dtable.store import BackgroundSqliteStore, MemoryStore
from dtable.table import EMPTY_ROOT, Table
from dtable.wire import Head, ProtocolViolation

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
    from twisted.python.failure import Failure

log = Logger(namespace="dtable")

# Other nodes' latest beacons kept for the overlay view, at most.
_MAX_BEACON_ORIGINS = 10_000

# Connections the kernel may queue before accept: enough for a burst of
# honest peers during an attack, which the firewall then sorts out.
_BACKLOG = 511

EVENTS = ("started", "object_added", "object_removed", "message_received", "error")

#: Seconds of one turn of the reactor that add_objects_cooperatively spends
#: encoding, at most (about 1,500 objects of 150 bytes).
ENCODE_BUDGET = 0.01


def _encoded(objects: list[dict]) -> Iterator[tuple[str, dict, bytes]]:
    """
    Each of C{objects} as (hash, object, canonical bytes).

    @raise InvalidObjectError: naming the first that is not a table object,
        by its index.
    """
    for index, obj in enumerate(objects):
        try:
            data = canonical_bytes(obj)
        except InvalidObjectError as e:
            raise InvalidObjectError(f"object {index}: {e}") from None
        yield hash_bytes(data), obj, data


class _Budget:
    """
    A Cooperator's termination predicate: true once C{seconds} have passed
    on C{clock} since it was made, at the start of a turn.
    """

    def __init__(self, clock: "IReactorTime", seconds: float) -> None:
        self._clock = clock
        self._end = clock.seconds() + seconds

    def __call__(self) -> bool:
        return self._clock.seconds() >= self._end


class NotMasterError(Exception):
    """
    add_object or remove_object was called on a node that is not the master.
    """


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(ITableObserver)
class _CallbackObserver:
    def __init__(self, event: str, callback: Callable[..., None]) -> None:
        self.event = event
        self._callback = callback

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name == self.event:
            return self._callback
        if name in EVENTS:
            return lambda *args: None
        raise AttributeError(name)


@implementer(ILinkHub)
class DistributedTable(MultiService):
    """
    One node of a dtable network.

    @param port: the TCP port to listen on; 0 picks a free one (see
        L{when_listening}).
    @param key: the network key, as text or bytes (see
        L{dtable.crypto.parse_network_key}).
    @param peers: initial peer addresses, C{"host:port"} or C{"[v6]:port"}.
    @param master: whether this node publishes the table.
    @param store: where the table is kept (an L{IStore}); by default an
        SQLite file in C{data_dir} (see L{dtable.config.Config}), or memory
        with C{memory=True}.
    @param reactor: the reactor to use; the global one by default.
    @param master_key: on the master, the private half of a separate master
        key pair (the text C{python -m dtable master-keygen} wrote, or an
        Ed25519 private key); the other nodes are given its public half as
        C{master_public_key}. Without either, batches are signed with a key
        derived from the network key, so every holder of the network key
        can sign (the seed's trust model).
    @param api_token: the control API's bearer token, instead of reading
        C{api_token_file} at start.
    @param connect_ssl: how to dial a peer, with the signature of
        C{reactor.connectSSL(host, port, factory, contextFactory, timeout)};
        by default the reactor's. Tests use it to route links through
        L{dtable.faults.FaultProxy}.
    @param options: any other field of L{dtable.config.Config}.

    @raise dtable.crypto.WeakKeyError: if the key is missing or weak.
    @raise dtable.crypto.MasterKeyError: if C{master_key} is malformed.
    @raise dtable.config.ConfigError: if an option is out of range.
    @raise dtable.peers.AddressError: if a peer address is malformed.
    """

    def __init__(self, port: int = 9999, key: str | bytes | None = None,
                 peers: Iterable[str | PeerAddress] = (), master: bool = False, *,
                 store: IStore | None = None, reactor: Any = None,
                 config: Config | None = None, master_key: Any = None,
                 api_token: str | None = None,
                 connect_ssl: Callable[..., Any] | None = None, **options: Any) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor
            reactor = global_reactor
        if key is None:
            raise crypto.WeakKeyError(
                "a network key is required; make one with: python -m dtable keygen > net.key"
            )
        self._secret = crypto.parse_network_key(key)
        if config is None:
            config = Config(port=port, peers=tuple(peers), master=master, **options)
        self.config = config
        self._master_key = master_signing_key(master_key, config)
        if config.api is not None and api_token is None and config.api_token_file is None:
            raise ConfigError("the control API (api) needs a token: api_token_file, "
                              "or api_token")
        self._api_token = api_token
        self._api_port: Any = None
        self._api_connections: Any = None
        self._api_root: Any = None
        self.reactor = reactor
        self._connect_ssl = connect_ssl if connect_ssl is not None else reactor.connectSSL
        self.node_id = crypto.new_node_id()
        self.name = f"dtable node {self.node_id[:8]}"
        if store is None:
            path = config.store_path()
            store = MemoryStore() if path is None else BackgroundSqliteStore(path)
        self._store = store
        self.table = Table()
        self.directory = PeerDirectory(config.peers, window=config.ping_window)
        self._policy = PrimaryPolicy(self.directory, config.better_primary_wait,
                                     config.better_primary_ratio)
        self._components = ComponentTracker(self.node_id, config.component_horizon)
        self._probes: dict[PeerAddress, Any] = {}
        self._server_factory: LinkServerFactory | None = None
        self._defrag: PeerConnection | None = None
        self._extra: dict[PeerAddress, PeerConnection] = {}
        self._overlay_loop: LoopingCall | None = None
        self._started_at = 0.0
        self._beacons: dict[str, tuple[wire.Beacon, float]] = {}
        #: How late the reactor runs (see L{StallProbe}).
        self._stall_probe = StallProbe(reactor, config.stall_probe_interval)
        self._previous_usr2: Any = None
        #: Bytes and frames over every connection since the node started.
        self.traffic = Traffic()
        #: Counts since the node started: batches applied (received or
        #: published), catch-ups by how they went, messages delivered to
        #: this node and message frames relayed to peers.
        self.counters = {"batches_applied": 0, "catch_ups_log": 0, "catch_ups_merkle": 0,
                         "messages_received": 0, "messages_relayed": 0,
                         "firewall_blocks": 0}
        self.messages = DuplicateFilter(reactor, config.message_ttl,
                                        config.message_filter_size)
        #: Who may connect: per-address counts, warnings and blocks.
        self.firewall = Firewall(
            reactor,
            warn_after_new_connections=config.warn_after_new_connections,
            block_after_new_connections=config.block_after_new_connections,
            block_after_failures=config.block_after_failures,
            block_for=config.block_for,
            ipv6_group_depth=config.ipv6_group_depth,
            ipv6_subnet_breach=config.ipv6_subnet_breach,
            never_block=config.never_block,
            max_addresses=config.firewall_max_addresses,
            on_block=self._blocked,
            on_unblock=self._unblocked,
        )
        self._block_callbacks: list[Callable[[FirewallEvent], None]] = []
        self._commands: set[Deferred] = set()
        #: Connections refused because too many handshakes were in progress.
        self.refused_busy = 0
        self._refused_busy_logged = 0
        self._observers: list[Any] = []
        self._watchers: list[Callable[[], None]] = []
        self._links: list[PeerProtocol] = []
        self._peer_heads: dict[PeerProtocol, Head] = {}
        self._ports: list["IListeningPort"] = []
        self._listening_waiters: list[Deferred] = []
        self._started_waiters: list[Deferred] = []
        self._flush_waiters: list[Deferred] = []
        self._primary: PeerConnection | None = None
        self._primary_failures = 0
        self._primary_rotation: Deferred | None = None
        self._replica: Replica | None = None
        self._signer: HeadSigner | None = None
        self._window: BatchWindow | None = None
        self._cooperator: Cooperator | None = None
        self._tls: Any = None
        self._catching_up = False
        self._catch_up_call: "IDelayedCall | None" = None
        self._master_sync_call: "IDelayedCall | None" = None
        self._master_ready = not config.master
        self._reported_ahead = 0
        self._startup: Deferred | None = None
        self._stopping = False
        self._is_started = False
        #: Why the last start failed, for those who ask when_started after.
        self._start_failure: Failure | None = None
        self._links_log = debug_channel("dtable.links", 1, config.debug)
        self._overlay_log = debug_channel("dtable.overlay", 2, config.debug)

    # Observers --------------------------------------------------------------

    def subscribe(self, observer: Any) -> Callable[[], None]:
        """
        Deliver events to C{observer}, an L{ITableObserver}. Returns a
        function that unsubscribes it.
        """
        if not ITableObserver.providedBy(observer):
            raise TypeError("observer must provide ITableObserver "
                            "(subclass dtable.TableObserver)")
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    def on(self, event: str, callback: Callable[..., None]) -> Callable[[], None]:
        """
        Call C{callback} with the arguments of every C{event} (one of
        started, object_added, object_removed, message_received, error).
        Returns a function that unsubscribes it.
        """
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; events are {', '.join(EVENTS)}")
        return self.subscribe(_CallbackObserver(event, callback))

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """
        Call C{callback()} after anything about this node changed: an event,
        a link that came up or went down. For tests and status displays that
        wait for a condition. Returns a function that stops the calls.
        """
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback)

    def on_block(self, callback: Callable[[FirewallEvent], None]) -> Callable[[], None]:
        """
        Call C{callback(event)} whenever the firewall blocks an address or a
        subnet (a L{dtable.firewall.FirewallEvent}). Returns a function that
        stops the calls.
        """
        self._block_callbacks.append(callback)
        return lambda: self._block_callbacks.remove(callback)

    def _changed(self) -> None:
        for callback in list(self._watchers):
            try:
                callback()
            except Exception:
                log.failure("watcher {callback!r} failed", callback=callback)

    def _emit(self, event: str, *args: Any) -> None:
        for observer in list(self._observers):
            try:
                getattr(observer, event)(*args)
            except Exception:
                log.failure("observer {observer!r} failed on {event}",
                            observer=observer, event=event)

    def _report(self, error_string: str, origin: str, obj: Any = None) -> None:
        log.error("{origin}: {error}", origin=origin, error=error_string)
        self._emit("error", error_string, origin, obj)
        self._changed()

    def _removals_observed(self) -> bool:
        """
        Whether an observer takes object_removed events (one that inherits
        TableObserver's, which does nothing, does not).
        """
        for observer in self._observers:
            if isinstance(observer, _CallbackObserver):
                if observer.event == "object_removed":
                    return True
            elif getattr(type(observer), "object_removed", None) is not \
                    TableObserver.object_removed:
                return True
        return False

    def _emit_change(self, change: Change) -> None:
        for obj in change.removed:
            self._emit("object_removed", obj)
        for obj in change.added:
            self._emit("object_added", obj)
        self._changed()

    # Reading the table ----------------------------------------------------------

    def objects(self) -> list[dict]:
        """
        Every object in the table.
        """
        return self._replica.objects() if self._replica is not None else []

    def get(self, h: str) -> dict | None:
        """
        The object with hash C{h}, or None.
        """
        return self._replica.get(h) if self._replica is not None else None

    def object_data(self, hashes: Iterable[str]) -> dict[str, bytes]:
        """
        The canonical JSON bytes of the objects with these hashes that the
        table holds, by hash.
        """
        return self._replica.data(hashes) if self._replica is not None else {}

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, item: Any) -> bool:
        if isinstance(item, dict):
            try:
                item = hash_bytes(canonical_bytes(item))
            except InvalidObjectError:
                return False
        return item in self.table

    def __bool__(self) -> bool:
        return True

    @property
    def head(self) -> Head:
        """
        The signed state this node holds.
        """
        return self._replica.head if self._replica is not None else Head(
            rev=0, base=0, root=EMPTY_ROOT)

    @property
    def links(self) -> list[PeerProtocol]:
        """
        The live links, in the order they came up.
        """
        return [link for link in self._links if link.is_live]

    # Changing the table (master) and messages --------------------------------

    def add_object(self, obj: dict) -> str:
        """
        Add C{obj} to the table (master only). It is published with the other
        calls of this batch window. Adding an object that is present changes
        nothing.

        @return: the object's hash.
        @raise NotMasterError: on a node that is not the master.
        @raise dtable.canonical.InvalidObjectError: if C{obj} is not a JSON
            object.
        """
        self._require_master("add_object", obj)
        data = canonical_bytes(obj)
        h = hash_bytes(data)
        self._require_running("add_object")
        self._window.add(h, obj, data)
        return h

    def add_objects(self, objects: Iterable[dict]) -> list[str]:
        """
        Add many objects at once (master only): all of them, or, if one is
        not a table object, none.

        @return: their hashes, in order.
        @raise NotMasterError: on a node that is not the master.
        @raise dtable.canonical.InvalidObjectError: naming the first object
            that is not a JSON object, by its index.
        """
        objects = list(objects)
        self._require_master("add_objects", objects)
        return self._add_encoded("add_objects", list(_encoded(objects)))

    def add_objects_cooperatively(self, objects: Iterable[dict]) -> Deferred:
        """
        L{add_objects}, for a long list: the objects are checked and
        encoded a slice at a time, for at most L{ENCODE_BUDGET} seconds in
        one turn of the reactor, so that the node goes on answering its
        links meanwhile. They are then added in one turn: all of them, or,
        if one is not a table object, none. The API's C{POST /objects}
        adds this way.

        @return: a Deferred that fires with their hashes, in order, or
            fails with the error L{add_objects} would raise, or with
            L{CancelledError} if the node stops first.
        """
        objects = list(objects)
        try:
            self._require_master("add_objects", objects)
            self._require_running("add_objects")
        except Exception:
            return fail()
        encoded: list[tuple[str, dict, bytes]] = []

        def encode() -> Iterator[None]:
            for index, entry in enumerate(_encoded(objects)):
                encoded.append(entry)
                if index % 64 == 63:
                    yield None

        if self._cooperator is None:
            reactor = self.reactor
            self._cooperator = Cooperator(
                terminationPredicateFactory=lambda: _Budget(reactor, ENCODE_BUDGET),
                scheduler=lambda step: reactor.callLater(0, step),
            )
        def stopped(failure: Failure) -> None:
            failure.trap(SchedulerStopped)
            raise CancelledError("the node stopped before the objects were added")

        done = self._cooperator.cooperate(encode()).whenDone()
        done.addCallbacks(lambda _: self._add_encoded("add_objects", encoded), stopped)
        return done

    def _add_encoded(self, call: str, encoded: list[tuple[str, dict, bytes]]) -> list[str]:
        self._require_running(call)
        for h, obj, data in encoded:
            self._window.add(h, obj, data)
        return [h for h, _, _ in encoded]

    def remove_object(self, obj_or_hash: dict | str) -> str:
        """
        Remove an object, given as itself or its hash (master only).
        Removing an absent object changes nothing.

        @return: the object's hash.
        @raise NotMasterError: on a node that is not the master.
        """
        self._require_master("remove_object", obj_or_hash)
        if isinstance(obj_or_hash, str):
            if not is_hash(obj_or_hash):
                raise ValueError(f"{obj_or_hash!r} is not an object hash")
            h = obj_or_hash
        else:
            h = hash_bytes(canonical_bytes(obj_or_hash))
        self._require_running("remove_object")
        self._window.remove(h)
        return h

    def send_message(self, body: Any) -> str:
        """
        Flood C{body} (any JSON value) to every node that is online; each
        receives it once, as message_received. It is not stored.

        @return: the message id.
        @raise dtable.canonical.InvalidObjectError: if C{body} is not JSON.
        """
        [message_id] = self.send_messages([body])
        return message_id

    def send_messages(self, bodies: Iterable[Any]) -> list[str]:
        """
        Send each of C{bodies} as its own message (see L{send_message}): all
        of them, or, if one is not JSON, none. They travel together, up to
        L{wire.BUNDLE_BYTES} in a frame, and every node receives them in
        order, each as its own message_received; the ids of messages that
        share a frame are its id and their index in it.

        @return: the message ids, in order.
        @raise dtable.canonical.InvalidObjectError: naming the first body
            that is not JSON, by its index.
        """
        frames: list[tuple[str, bytes]] = []
        ids: list[str] = []
        bundle: list[bytes] = []
        size = 0

        def close_bundle() -> None:
            nonlocal size
            if bundle:
                frame_id = new_message_id()
                frames.append((frame_id, wire.message_frame(frame_id, self.node_id, bundle)))
                ids.extend([frame_id] if len(bundle) == 1 else
                           [f"{frame_id}.{i}" for i in range(len(bundle))])
                bundle.clear()
                size = 0

        for index, body in enumerate(bodies):
            data, alone = self._body_bytes(body, index)
            if alone or size + len(data) > wire.BUNDLE_BYTES or len(bundle) == wire.MAX_BUNDLE:
                close_bundle()
            bundle.append(data)
            size += len(data)
            if alone:
                close_bundle()
        close_bundle()
        for frame_id, frame in frames:
            self.messages.first_sight(frame_id)
            self._flood(frame, None)
        return ids

    @staticmethod
    def _body_bytes(body: Any, index: int) -> tuple[bytes, bool]:
        """
        C{body} encoded, and whether it must travel in a frame of its own: a
        body in a C{msgs} frame sits one level deeper than in a C{msg}.
        """
        where = f"message {index}" if index else "message"
        try:
            data = wire.body_bytes(body)
        except (TypeError, ValueError, RecursionError) as e:
            raise InvalidObjectError(f"{where} is not JSON: {e}") from None
        if not wire.nested_deeper_than(body, wire.MAX_NESTING - 2):
            return data, False
        if wire.nested_deeper_than(body, wire.MAX_NESTING - 1):
            raise InvalidObjectError(
                f"{where} is nested deeper than {wire.MAX_NESTING - 1} levels")
        return data, True

    def flush(self) -> Deferred:
        """
        Publish the pending batch now rather than at the end of its window.

        @return: a fresh Deferred that fires with the head once everything
            added or removed before this call is published (at once unless a
            starting master is still learning the network's newest state).
        """
        if self._window is not None:
            self._window.flush()
        if self._window is None or not len(self._window):
            return succeed(self.head)
        d: Deferred = Deferred()
        self._flush_waiters.append(d)
        return d

    def add_peer(self, address: str | PeerAddress) -> None:
        """
        Learn another peer address to dial.
        """
        if not isinstance(address, PeerAddress):
            address = PeerAddress.parse(address)
        if self.directory.add(address, initial=True) and self.running:
            if self._primary is None and not self._stopping:
                self._dial_next()

    def _require_master(self, call: str, obj: Any) -> None:
        if not self.config.master:
            message = f"{call} is only allowed on the master; this node is not the master"
            self._emit("error", message, call, obj)
            self._changed()
            raise NotMasterError(message)

    def _require_running(self, call: str) -> None:
        if self._window is None:
            raise RuntimeError(f"{call}: the node is not started (call startService)")

    # Lifecycle --------------------------------------------------------------

    def when_listening(self) -> Deferred:
        """
        A fresh Deferred that fires with the port number once the node
        listens.
        """
        if self._ports:
            return succeed(self.listening_port)
        if self._start_failure is not None:
            return fail(self._start_failure)
        d: Deferred = Deferred()
        self._listening_waiters.append(d)
        return d

    def when_started(self) -> Deferred:
        """
        A fresh Deferred that fires with this node once it has loaded its
        table, listens and has sent started to observers.
        """
        if self._is_started:
            return succeed(self)
        if self._start_failure is not None:
            return fail(self._start_failure)
        d: Deferred = Deferred()
        self._started_waiters.append(d)
        return d

    @property
    def listening_port(self) -> int:
        return self._ports[0].getHost().port

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._start_failure = None
        if self.config.memory_report_signal and self._previous_usr2 is None:
            # Before anything is logged: whoever sees the node start may
            # signal it at once.
            self._previous_usr2 = signal.signal(
                signal.SIGUSR2,
                lambda signum, frame: self.reactor.callFromThread(self._signalled_report))
        self._startup = Deferred.fromCoroutine(self._start())
        self._startup.addErrback(self._start_failed)

    def _start_failed(self, failure: Any) -> None:
        log.failure("node {node_id} failed to start", failure, node_id=self.node_id)
        self._start_failure = failure
        waiters = self._listening_waiters + self._started_waiters
        self._listening_waiters, self._started_waiters = [], []
        for d in waiters:
            d.errback(failure)

    async def _start(self) -> None:
        network = crypto.derive_network(self._secret)
        identity = crypto.issue_node_certificate(network, self.node_id)
        self._tls = crypto.tls_options(network, identity)
        if self._master_key is not None:
            self._signer = HeadSigner(network.network_id, self._master_key)
            trusted = self._signer.public
        elif self.config.master_public_key is not None:
            trusted = self.config.master_public_key
        else:
            self._signer = HeadSigner(network.network_id, network.master_key)
            trusted = self._signer.public
        if not self.config.master:
            self._signer = None
        verifier = HeadVerifier(network.network_id, trusted)
        self._store.open()
        self._replica = Replica(
            self.table, self._store, verifier,
            BatchLog(self.config.log_max_batches, self.config.log_max_bytes),
            removed_wanted=self._removals_observed)
        self._load()
        self._window = BatchWindow(self.reactor, self.config.batch_window,
                                   self.config.batch_max_ops, self._publish)
        await self._listen()
        if self._stopping:
            return
        if self.config.api is not None:
            await self._listen_api()
            if self._stopping:
                return
        log.info("node {node_id} listening on port {port} at revision {rev}",
                 node_id=self.node_id, port=self.listening_port,
                 rev=self.head.rev)
        for d in self._take(self._listening_waiters):
            d.callback(self.listening_port)
        if self.config.master:
            self._hold_until_synced()
        self._dial_next()
        self._started_at = self.reactor.seconds()
        self._overlay_loop = LoopingCall(self._overlay_tick)
        self._overlay_loop.clock = self.reactor
        self._overlay_loop.start(self.config.clean_interval, now=False)
        self._stall_probe.start()
        self._is_started = True
        self._emit("started")
        for obj in self._replica.iter_objects():
            self._emit("object_added", obj)
        self._changed()
        if self.config.gc_freeze:
            gc.freeze()
        for d in self._take(self._started_waiters):
            d.callback(self)

    def _load(self) -> None:
        """
        Load the stored table. A stored state that is not signed by the
        master key this node trusts (the master key changed, or the node
        was moved to another network's data) is not served: the master
        signs it again as its next revision, any other node starts empty
        and catches up from the network.
        """
        try:
            self._replica.load()
            return
        except BadHead as e:
            reason = str(e)
        if self._signer is not None:
            head = self._replica.resign(self._signer)
            log.warn("the stored table was not signed by this master's key ({reason}); "
                     "signed it again as revision {rev}", reason=reason, rev=head.rev)
        else:
            removed = self._replica.reset()
            log.warn("the stored table is not signed by the master key this node "
                     "trusts ({reason}); dropped its {count} objects, to be caught up "
                     "from the network", reason=reason, count=removed)

    def write_memory_report(self) -> str:
        """
        Write a memory report (see L{dtable.health.memory_report}) to the
        node's data directory (the working directory for a node in memory)
        and return its path.

        @raise OSError: if it cannot be written.
        """
        path = self.config.store_path()
        directory = os.path.dirname(path) if path is not None else os.getcwd()
        return memory_report(self, directory)

    def _signalled_report(self) -> None:
        try:
            path = self.write_memory_report()
        except OSError as e:
            log.error("cannot write the memory report: {reason}", reason=str(e))
            return
        log.info("memory report written to {path}", path=path)

    async def _listen_api(self) -> None:
        from twisted.internet.endpoints import serverFromString

        from dtable import api

        token = self._api_token
        if token is None:
            with open(self.config.api_token_file, encoding="utf-8") as token_file:
                token = token_file.read().strip()
        if not token:
            raise ConfigError(f"the API token file {self.config.api_token_file} is empty")
        connections, self._api_root = api.make_site(self, token)
        endpoint = serverFromString(self.reactor, api.api_endpoint(self.config.api))
        self._api_port = await endpoint.listen(connections)
        self._api_connections = connections
        host = self._api_port.getHost()
        log.info("control API of node {node_id} on {host}:{port}", node_id=self.node_id,
                 host=getattr(host, "host", "?"), port=getattr(host, "port", "?"))

    @property
    def api_port(self) -> int | None:
        """
        The control API's TCP port once it listens, else None.
        """
        if self._api_port is None:
            return None
        return getattr(self._api_port.getHost(), "port", None)

    async def _stop_api(self) -> None:
        port, self._api_port = self._api_port, None
        if port is not None:
            await maybeDeferred(port.stopListening)
        if self._api_root is not None:
            self._api_root.close_streams()
        if self._api_connections is not None:
            await self._api_connections.close_all()
        self._api_connections = self._api_root = None

    @staticmethod
    def _take(waiters: list[Deferred]) -> list[Deferred]:
        taken = list(waiters)
        waiters.clear()
        return taken

    async def _listen(self) -> None:
        factory = self._server_factory = LinkServerFactory(self, self.reactor, self.config)
        guarded = GuardedTLSFactory(self._tls, factory, self._admit)
        interfaces = ([self.config.interface] if self.config.interface is not None
                      else ["::", "0.0.0.0"])
        port = self.config.port
        errors = []
        for interface in interfaces:
            endpoint_type = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
            endpoint = endpoint_type(self.reactor, port, backlog=_BACKLOG,
                                     interface=interface)
            try:
                listening = await endpoint.listen(guarded)
            except CannotListenError as e:
                errors.append(e)
                continue
            self._ports.append(listening)
            # Every family listens on the same port as the first.
            port = listening.getHost().port
        if not self._ports:
            raise errors[0]

    @property
    def pending_handshakes(self) -> int:
        """
        Inbound connections accepted whose hello has not arrived yet.
        """
        if self._server_factory is None:
            return 0
        return self._server_factory.pending_handshakes

    def _admit(self, address: Any) -> bool:
        """
        Whether to accept a new inbound connection: not while stopping, not
        past C{max_pending_handshakes}, not from an address the firewall
        blocks. Every accepted connection counts in the firewall until the
        peer authenticates.
        """
        if self._stopping or self._server_factory is None:
            return False
        host = normalize_host(getattr(address, "host", ""))
        if self.pending_handshakes >= self.config.max_pending_handshakes:
            self.refused_busy += 1
            return False
        try:
            return self.firewall.connection(host)
        except ValueError:
            # Not an IP address (a UNIX socket in an embedding): nothing to count.
            return True

    def _peer_host(self, link: PeerProtocol) -> str | None:
        if link.transport is None:
            return None
        return normalize_host(getattr(link.transport.getPeer(), "host", "")) or None

    def _blocked(self, event: FirewallEvent) -> None:
        self.counters["firewall_blocks"] += 1
        self._run_firewall_command(self.config.block_command, event)
        for callback in list(self._block_callbacks):
            try:
                callback(event)
            except Exception:
                log.failure("block callback {callback!r} failed", callback=callback)
        self._changed()

    def _unblocked(self, event: FirewallEvent) -> None:
        self._run_firewall_command(self.config.unblock_command, event)
        self._changed()

    def _run_firewall_command(self, template: str | None, event: FirewallEvent) -> None:
        """
        Apply a block or its end in the host's firewall (see
        L{dtable.hostfirewall}); the node waits for it before it stops.
        """
        if template is None:
            return
        d = run_command(self.reactor, template, event.address)
        self._commands.add(d)
        d.addBoth(lambda _: self._commands.discard(d))

    def stopService(self) -> Deferred:
        """
        Stop dialling and listening, close every link and, once all are
        gone and every timer is cancelled, close the store.
        """
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._startup is not None and not self._startup.called:
            await self._startup
        if self._window is not None:
            if self._master_ready:
                self._window.flush()
            self._window.stop()
        if self._cooperator is not None:
            # Adds still being encoded fail with SchedulerStopped.
            self._cooperator.stop()
            self._cooperator = None
        # A starting master stopped before it could publish what it held.
        for d in self._take(self._flush_waiters):
            d.errback(CancelledError("the node stopped before it could publish"))
        for call in (self._catch_up_call, self._master_sync_call):
            if call is not None and call.active():
                call.cancel()
        self._catch_up_call = self._master_sync_call = None
        if self._overlay_loop is not None and self._overlay_loop.running:
            self._overlay_loop.stop()
        self._overlay_loop = None
        self._stall_probe.stop()
        if self._previous_usr2 is not None:
            signal.signal(signal.SIGUSR2, self._previous_usr2)
            self._previous_usr2 = None
        await self._stop_api()
        if self._primary_rotation is not None:
            await self._primary_rotation
        probes_lost = []
        for connector, factory in list(self._probes.values()):
            protocol = factory.protocol_instance
            if protocol is not None:
                probes_lost.append(protocol.when_lost())
                protocol.close("node shutting down")
            connector.disconnect()
        await DeferredList(probes_lost)
        self._probes.clear()
        await super().stopService()
        self._primary = None
        self._extra.clear()
        self._defrag = None
        ports, self._ports = self._ports, []
        # stopListening may return a Deferred, or None once it is done.
        await DeferredList([maybeDeferred(port.stopListening) for port in ports])
        # Accepted connections that are not links (probes being answered,
        # handshakes not finished) are closed too.
        open_links = set(self._links)
        if self._server_factory is not None:
            open_links |= self._server_factory.accepted
        lost = [link.when_lost() for link in open_links]
        for link in open_links:
            link.close("node shutting down")
        await DeferredList(lost)
        # Firewall commands still running finish before the node is stopped.
        await DeferredList(list(self._commands))
        self._is_started = False
        self._store.close()

    # Outbound links -----------------------------------------------------------

    def _connect(self, address: PeerAddress, factory: Any) -> Any:
        return self._connect_ssl(address.host, address.port, factory, self._tls,
                                 timeout=self.config.connect_timeout)

    def _dial_next(self, target: PeerAddress | None = None) -> None:
        address = target
        if address is None:
            # Prefer an address the extra links do not already use.
            address = (self.directory.next_primary(exclude=self._extra)
                       or self.directory.next_primary())
        if address is None:
            self._overlay_log.debug("no peer to dial")
            return
        self._primary_failures = 0
        connection = PeerConnection(self, self.reactor, self.config, address,
                                    self._connect, self._primary_failed)
        self._primary = connection
        self._overlay_log.debug("dialling {address} for the primary link",
                                address=address)
        connection.setServiceParent(self)

    def _primary_failed(self, address: PeerAddress, reason: str) -> None:
        self.directory.record_failure(address)
        self._primary_failures += 1
        self._links_log.debug("link to {address} failed: {reason}",
                              address=address, reason=reason)
        if self._primary_failures >= self.config.failures_before_next_peer:
            self._rotate_primary()

    def _rotate_primary(self, target: PeerAddress | None = None) -> None:
        """
        Give up the current primary address and dial C{target}, or the next
        candidate.
        """
        if self._stopping or self._primary is None or self._primary_rotation is not None:
            return
        current = self._primary
        if (target is None and len(self.directory.addresses()) <= 1
                and not self.directory.is_self(current.address)):
            # Only one address to try: keep backing off on it.
            self._primary_failures = 0
            return
        self._primary = None

        async def rotate() -> None:
            try:
                await current.disownServiceParent()
            finally:
                self._primary_rotation = None
            if not self._stopping:
                self._dial_next(target)

        self._primary_rotation = Deferred.fromCoroutine(rotate())

    # The overlay ----------------------------------------------------------------

    def _address_of(self, link: PeerProtocol) -> PeerAddress | None:
        """
        Where the peer of C{link} listens: the address dialled, or for an
        inbound link its IP address and the port its hello gave.
        """
        if link.outbound:
            return link.address
        if link.hello is None or link.hello.port == 0 or link.transport is None:
            return None
        host = normalize_host(getattr(link.transport.getPeer(), "host", ""))
        if not host:
            return None
        return PeerAddress(host=host, port=link.hello.port)

    def overlay(self) -> dict[str, Any]:
        """
        This node's view of the overlay, as plain data: its links, the nodes
        it knows with their RTT means and failures, its component and the
        probes in flight.
        """
        now = self.reactor.seconds()
        return {
            "node_id": self.node_id,
            "master": self.config.master,
            "rev": self.head.rev,
            "primary": str(self._primary.address) if self._primary is not None else None,
            "links": [
                {
                    "node_id": link.node_id,
                    "address": str(self._address_of(link) or ""),
                    "role": link.role if link.outbound else link.hello.role,
                    "direction": "outbound" if link.outbound else "inbound",
                    "rtt_mean": link.rtt_mean,
                }
                for link in self.links
            ],
            "known": self.directory.snapshot(),
            "self_addresses": [str(a) for a in self.directory.self_addresses()],
            "component": sorted(self._components.members(now)),
            "probing": [str(a) for a in self._probes],
        }

    def overlay_graph(self) -> dict[str, Any]:
        """
        The whole overlay as this node knows it from the nodes' beacons:
        nodes (id, master flag, revision, seconds since heard) and links
        (the two node ids and the mean RTT in milliseconds, as the node that
        reported it measured it).
        """
        now = self.reactor.seconds()
        horizon = self.config.component_horizon
        own = self._own_state()
        heard = [(own, now)] + [(beacon, when) for beacon, when in self._beacons.values()
                                if now - when <= horizon]
        nodes = [{"node_id": b.origin, "master": b.master, "rev": b.rev,
                  "self": b.origin == self.node_id, "age": round(now - when, 3)}
                 for b, when in heard]
        edges: dict[tuple[str, str], float | None] = {}
        for beacon, _ in heard:
            for peer, rtt in beacon.links:
                pair = (min(beacon.origin, peer), max(beacon.origin, peer))
                if edges.get(pair) is None:
                    edges[pair] = rtt
        links = [{"a": a, "b": b, "rtt_ms": rtt} for (a, b), rtt in sorted(edges.items())]
        return {"nodes": nodes, "links": links}

    def status(self) -> dict[str, Any]:
        """
        This node at a glance, as plain data (the control API's /status):
        identity, head, links with RTT statistics in milliseconds, known
        nodes, the overlay, the firewall's counts, traffic and counters.
        """
        now = self.reactor.seconds()
        head = self.head

        def rtt_stats(link: PeerProtocol) -> dict[str, Any]:
            rtts = [r * 1000 for r in link.rtts]
            if not rtts:
                return {"count": 0, "mean": None, "min": None, "max": None, "last": None}
            return {"count": len(rtts), "mean": round(sum(rtts) / len(rtts), 3),
                    "min": round(min(rtts), 3), "max": round(max(rtts), 3),
                    "last": round(rtts[-1], 3)}

        counts = self.firewall.counts()
        return {
            "node_id": self.node_id,
            "master": self.config.master,
            "ready": self._master_ready,
            "port": self.listening_port if self._ports else None,
            "uptime": round(now - self._started_at, 3) if self._is_started else 0.0,
            "head": {"rev": head.rev, "base": head.base, "root": head.root,
                     "master": head.master},
            "objects": len(self.table),
            "primary": str(self._primary.address) if self._primary is not None else None,
            "links": [
                {
                    "node_id": link.node_id,
                    "address": str(self._address_of(link) or ""),
                    "role": link.role if link.outbound else link.hello.role,
                    "direction": "outbound" if link.outbound else "inbound",
                    "rev": self._peer_heads[link].rev if link in self._peer_heads else None,
                    "rtt_ms": rtt_stats(link),
                    "bytes_in": link.bytes_received, "bytes_out": link.bytes_sent,
                }
                for link in self.links
            ],
            "known": self.directory.snapshot(),
            "overlay": self.overlay_graph(),
            "firewall": {"total": counts.total, "blocked": counts.blocked,
                         "warned": counts.warned, "blocked_subnets": counts.blocked_subnets,
                         "refused": counts.refused,
                         "refused_busy": self.refused_busy,
                         "pending_handshakes": self.pending_handshakes},
            "traffic": {"bytes_in": self.traffic.bytes_in,
                        "bytes_out": self.traffic.bytes_out,
                        "frames_in": self.traffic.frames_in,
                        "frames_out": self.traffic.frames_out},
            "counters": dict(self.counters),
            "reactor": self._stall_probe.report(),
            "rss_bytes": rss_bytes(),
            # Commits the store has yet to write (stores that write at once
            # have none).
            "store_pending": getattr(self._store, "pending", 0),
            "messages_remembered": len(self.messages),
        }

    def _overlay_tick(self) -> None:
        """
        The clean loop: forget unreachable learned nodes, tell peers what we
        know, send a beacon, probe nodes we are not linked to, move the
        primary if another node is clearly better, and merge fragments.
        """
        now = self.reactor.seconds()
        self.firewall.expire()
        if self.refused_busy > self._refused_busy_logged:
            log.warn("refused {count} connections so far: {limit} handshakes were "
                     "already in progress", count=self.refused_busy,
                     limit=self.config.max_pending_handshakes)
            self._refused_busy_logged = self.refused_busy
        for address in self.directory.purge(now, self.config.purge_after):
            self._overlay_log.debug("forgot {address}: unreachable", address=address)
        known = self._known_nodes()
        if known:
            frame = wire.nodes(known)
            for link in self.links:
                link.send_frame(frame)
        beacon_id = new_message_id()
        self.messages.first_sight(beacon_id)
        self._flood(self._own_beacon(beacon_id), None)
        self._start_probes(now)
        self._consider_primary(now)
        self._maintain_extra_links()
        self._merge_fragments(now)
        self._overlay_log.debug("overlay {overlay}", overlay=self.overlay())
        self._changed()

    def _linked_addresses(self) -> set[PeerAddress]:
        addresses = {self._address_of(link) for link in self.links}
        addresses.discard(None)
        return addresses  # type: ignore[return-value]

    def _known_nodes(self) -> list[tuple[str, str, int]]:
        known = {}
        for link in self.links:
            address = self._address_of(link)
            if address is not None and link.node_id:
                known[address] = link.node_id
        for entry in self.directory.snapshot():
            if entry["node_id"] and entry["last_success"] is not None:
                known.setdefault(PeerAddress.parse(entry["address"]), entry["node_id"])
        return [(node_id, a.host, a.port) for a, node_id in known.items()
                if _is_ip(a.host)][:wire.MAX_NODES]

    def _nodes_received(self, link: PeerProtocol, message: wire.Nodes) -> None:
        if not self.config.learn_peers:
            return
        now = self.reactor.seconds()
        for node in message.nodes:
            address = PeerAddress(host=normalize_host(node.host), port=node.port)
            if node.node_id == self.node_id:
                # Hearsay: a peer could name any address as this node's, to
                # keep it from dialling there. A real loop back is found
                # when this node dials itself and reads its own hello.
                continue
            if self.directory.learn(address, node.node_id, now):
                self._overlay_log.debug("learned of {peer_id} at {address} from {source}",
                                        peer_id=node.node_id, address=address,
                                        source=link.node_id)

    def _beacon_received(self, link: PeerProtocol, beacon: wire.Beacon, frame: bytes) -> None:
        if not self.messages.first_sight(beacon.id):
            return
        now = self.reactor.seconds()
        self._components.heard(beacon.origin, now)
        if beacon.origin != self.node_id:
            self._beacons.pop(beacon.origin, None)
            self._beacons[beacon.origin] = (beacon, now)
            if len(self._beacons) > _MAX_BEACON_ORIGINS:
                del self._beacons[next(iter(self._beacons))]
        self._flood(frame, link)

    def _own_state(self, beacon_id: str = "") -> wire.Beacon:
        links = tuple((link.node_id, None if link.rtt_mean is None
                       else round(link.rtt_mean * 1000, 3))
                      for link in self.links if link.node_id)
        return wire.Beacon(id=beacon_id, origin=self.node_id, master=self.config.master,
                           rev=self.head.rev, links=links)

    def _own_beacon(self, beacon_id: str) -> bytes:
        state = self._own_state(beacon_id)
        return wire.beacon(state.id, state.origin, state.master, state.rev, state.links)

    def _start_probes(self, now: float) -> None:
        room = self.config.probe_concurrency - len(self._probes)
        if room <= 0:
            return
        exclude = self._linked_addresses() | set(self._probes)
        for address in self.directory.due_for_probe(now, self.config.probe_retest, exclude)[:room]:
            self.directory.record_probe(address, now)
            self._probe(address)

    def _probe(self, address: PeerAddress) -> None:
        def failed(reason: str) -> None:
            if self._probes.pop(address, None) is not None:
                self.directory.record_failure(address)
                self._overlay_log.debug("probe of {address} failed: {reason}",
                                        address=address, reason=reason)

        factory = ProbeFactory(self, self.reactor, self.config, address, failed)
        connector = self._connect(address, factory)
        self._probes[address] = (connector, factory)

    async def _run_probe(self, link: PeerProtocol) -> None:
        address = link.address
        try:
            for _ in range(self.config.probe_pings):
                rtt = await link.measure_rtt()
                self.directory.record_rtt(address, rtt)
        except RequestFailed:
            pass
        finally:
            self._probes.pop(address, None)
            link.close("probe done")
        self._overlay_log.debug("probed {address}: mean RTT {rtt}", address=address,
                                rtt=self.directory.mean_rtt(address))

    def _consider_primary(self, now: float) -> None:
        primary = self._primary
        if primary is None or primary.protocol is None or not primary.protocol.is_live:
            return
        exclude = set(self.directory.self_addresses())
        target = self._policy.consider(primary.address, now, exclude)
        if target is not None:
            log.info("moving the primary link from {old} to {new}: mean RTT {old_rtt} "
                     "against {new_rtt}", old=primary.address, new=target,
                     old_rtt=self.directory.mean_rtt(primary.address),
                     new_rtt=self.directory.mean_rtt(target))
            self._rotate_primary(target)

    def _maintain_extra_links(self) -> None:
        """
        Keep outbound_links - 1 links besides the primary, to the best
        candidates this node is not linked to yet.
        """
        wanted = self.config.outbound_links - 1
        if wanted <= 0 or self._stopping:
            return
        busy = self._linked_addresses() | set(self._extra) | set(self.directory.self_addresses())
        if self._primary is not None:
            busy.add(self._primary.address)
        while len(self._extra) < wanted:
            address = self.directory.next_primary(exclude=busy)
            if address is None:
                return
            busy.add(address)
            self._overlay_log.debug("dialling {address} for an extra link", address=address)
            connection = PeerConnection(self, self.reactor, self.config, address,
                                        self._connect, self._extra_failed)
            self._extra[address] = connection
            connection.setServiceParent(self)

    def _extra_failed(self, address: PeerAddress, reason: str) -> None:
        self.directory.record_failure(address)
        if self.directory.failures(address) >= self.config.failures_before_next_peer:
            connection = self._extra.pop(address, None)
            if connection is not None:
                connection.disownServiceParent()

    def _merge_fragments(self, now: float) -> None:
        if now - self._started_at < self.config.component_horizon:
            return
        if self._defrag is not None:
            return
        linked = {link.node_id for link in self.links}
        reachable = {}
        for entry in self.directory.snapshot():
            node_id = entry["node_id"]
            if (node_id and node_id not in linked and entry["failures"] == 0
                    and entry["last_success"] is not None):
                reachable[node_id] = PeerAddress.parse(entry["address"])
        outsiders = self._components.outsiders(reachable, now)
        if not outsiders:
            return
        target = outsiders[0]
        log.info("{address} is in another part of the overlay; linking to it to merge",
                 address=target)

        def failed(address: PeerAddress, reason: str) -> None:
            self.directory.record_failure(address)
            defrag, self._defrag = self._defrag, None
            if defrag is not None:
                defrag.disownServiceParent()

        self._defrag = PeerConnection(self, self.reactor, self.config, target,
                                      self._connect, failed, role="defrag")
        self._defrag.setServiceParent(self)

    # ILinkHub -----------------------------------------------------------------

    def local_hello(self, role: str) -> bytes:
        return wire.hello(self.node_id, self.listening_port if self._ports else 0,
                          role, self.config.master, self.head)

    def link_up(self, link: PeerProtocol) -> str | None:
        hello = link.hello
        if hello.node_id == self.node_id:
            if link.outbound and link.address is not None:
                log.info("{address} is this node itself; not dialling it again",
                         address=link.address)
                self.directory.mark_self(link.address)
                self._probes.pop(link.address, None)
                if self._primary is not None and self._primary.address == link.address:
                    self._rotate_primary()
            return "connected to itself"
        now = self.reactor.seconds()
        if not link.outbound:
            host = self._peer_host(link)
            if host is not None:
                try:
                    self.firewall.authenticated(host)
                except ValueError:
                    pass
        if link.outbound and link.role == "probe":
            self.directory.record_success(link.address, hello.node_id, now)
            Deferred.fromCoroutine(self._run_probe(link))
            return None
        if not link.outbound and hello.role == "probe":
            # Answer the prober's pings; the link carries nothing else.
            return None
        try:
            self._replica.verify(hello.head)
        except BadHead as e:
            link.drop(f"hello carries a bad head: {e}")
            return None
        address = self._address_of(link)
        if address is not None and not link.outbound and self.config.learn_peers:
            self.directory.learn(address, hello.node_id, now)
        if hello.master:
            masters = {other.hello.node_id for other in self.links if other.hello.master}
            if self.config.master:
                masters.add(self.node_id)
            masters.discard(hello.node_id)
            if masters:
                self._report(
                    f"two masters on one network: node {hello.node_id} claims to be "
                    f"the master, and so does {sorted(masters)[0]}", hello.node_id)
        if link.outbound and link.address is not None:
            self.directory.record_success(link.address, hello.node_id, now)
            if self._primary is not None and self._primary.address == link.address:
                self._primary_failures = 0
                self._primary.hello_accepted()
            for connection in (self._extra.get(link.address), self._defrag):
                if connection is not None and connection.address == link.address:
                    connection.hello_accepted()
        self._links.append(link)
        self._peer_heads[link] = hello.head
        self._links_log.debug(
            "link up with {peer_id}: its revision {rev}, ours {our_rev}",
            peer_id=hello.node_id, rev=hello.head.rev, our_rev=self.head.rev)
        if self.head.rev > hello.head.rev:
            # The peer is behind, perhaps because this node moved on after it
            # sent its hello: tell it where this node is now.
            link.send_frame(wire.head_announcement(self.head))
        if not self._master_ready and hello.head.rev <= self.head.rev:
            self._release_master("a peer is not ahead of it")
        self._maybe_catch_up()
        self._changed()
        return None

    def link_down(self, link: PeerProtocol, reason: str) -> None:
        if link in self._links:
            self._links.remove(link)
            self._peer_heads.pop(link, None)
            self._links_log.debug("link down with {peer_id}: {reason}",
                                  peer_id=link.node_id, reason=reason)
            self._changed()

    def rtt_measured(self, link: PeerProtocol, seconds: float) -> None:
        address = self._address_of(link)
        if address is not None:
            self.directory.record_rtt(address, seconds)

    def violation(self, link: PeerProtocol, reason: str) -> None:
        # A connection this node dialled that failed before its hello says
        # nothing about the address (it may be down, or not a node); anything
        # else is the peer's doing.
        if link.outbound and link.hello is None:
            return
        host = self._peer_host(link)
        if host is not None and not self._stopping:
            try:
                self.firewall.failure(host, reason)
            except ValueError:
                pass

    def frame_received(self, link: PeerProtocol, message: Any, frame: bytes) -> None:
        if isinstance(message, wire.Batch):
            self._batch_received(link, message, frame)
        elif isinstance(message, (wire.Message, wire.Messages)):
            self._message_received(link, message, frame)
        elif isinstance(message, wire.Beacon):
            self._beacon_received(link, message, frame)
        elif isinstance(message, wire.Nodes):
            self._nodes_received(link, message)
        elif isinstance(message, wire.HeadAnnouncement):
            self._note_head(link, message.head)
            self._maybe_catch_up()
        elif isinstance(message, wire.LogRequest):
            link.send_frame(catchup.serve_log(self._replica, message, self._answer_bytes))
        elif isinstance(message, wire.TreeRequest):
            link.send_frame(catchup.serve_tree(self._replica, message))
        elif isinstance(message, wire.DiffRequest):
            link.send_frame(catchup.serve_diff(self._replica, message))
        elif isinstance(message, wire.Fetch):
            link.send_frame(catchup.serve_fetch(self._replica, message, self._answer_bytes))
        else:
            raise ProtocolViolation(f"unexpected {type(message).__name__}")

    @property
    def _answer_bytes(self) -> int:
        # Room for the answer's envelope within a peer's max_frame (peers
        # of one network are expected to share it).
        return max(1, self.config.max_frame // 2)

    # Replication --------------------------------------------------------------

    def _note_head(self, link: PeerProtocol, head: Head) -> None:
        try:
            self._replica.verify(head)
        except BadHead as e:
            raise ProtocolViolation(str(e))
        known = self._peer_heads.get(link)
        if link in self._peer_heads and (known is None or head.rev > known.rev):
            self._peer_heads[link] = head

    def _batch_received(self, link: PeerProtocol, batch: wire.Batch, frame: bytes) -> None:
        self._note_head(link, batch.head)
        decision = self._replica.decide(batch.head)
        if decision is Decision.DUPLICATE:
            return
        if decision is Decision.GAP or self._catching_up:
            self._maybe_catch_up()
            return
        try:
            change = self._replica.apply_batch(batch, frame)
        except BatchRejected as e:
            # The head is the master's, so the sender changed what it
            # carries: no honest relay forwards a batch it did not apply.
            self._report(f"batch {batch.head.rev} rejected: {e.reason}", link.node_id)
            raise ProtocolViolation(f"sent batch {batch.head.rev} that does not apply: "
                                    f"{e.reason}")
        self.counters["batches_applied"] += 1
        self._emit_change(change)
        self._flood(frame, link)

    def _publish(self, adds: list, removes: list) -> None:
        published = self._replica.publish(self._signer, adds, removes)
        if published is None:
            return
        change, frame = published
        self.counters["batches_applied"] += 1
        self._emit_change(change)
        self._flood(frame, None)

    def _flood(self, frame: bytes, source: PeerProtocol | None) -> int:
        """
        Send C{frame} on every live link but C{source}; returns how many.
        """
        sent = 0
        for link in self._links:
            if link is not source and link.is_live:
                link.send_frame(frame)
                sent += 1
        return sent

    def _hold_until_synced(self) -> None:
        """
        A master first learns whether the network holds a newer state signed
        by its key, and publishes only once it holds that state, so that a
        master restarted without its data never wipes the network.
        """
        if self.config.master_sync_timeout == 0:
            self._master_ready = True
            return
        self._window.hold()
        self._master_sync_call = self.reactor.callLater(
            self.config.master_sync_timeout, self._release_master,
            "no peer answered in time")

    def _release_master(self, why: str) -> None:
        if self._master_ready:
            return
        self._master_ready = True
        if self._master_sync_call is not None and self._master_sync_call.active():
            self._master_sync_call.cancel()
        self._master_sync_call = None
        log.info("master publishing from revision {rev}: {why}", rev=self.head.rev, why=why)
        self._window.release()
        self._window.flush()
        for d in self._take(self._flush_waiters):
            d.callback(self.head)

    def _maybe_catch_up(self) -> None:
        if self._catching_up or self._stopping or self._replica is None:
            return
        ahead = [(head.rev, i, link) for i, (link, head) in enumerate(self._peer_heads.items())
                 if link.is_live and head.rev > self.head.rev]
        if not ahead:
            if not self._master_ready and self._links:
                self._release_master("no peer is ahead of it")
            return
        rev, _, link = max(ahead)
        if self.config.master and self._master_ready:
            # A master that publishes never adopts a newer state: that state
            # came from another master, or this one lost data after it began
            # publishing. Following it would make the tables flip.
            if rev > self._reported_ahead:
                self._reported_ahead = rev
                self._report(
                    f"two masters on one network, or this master lost its data: "
                    f"node {link.node_id} holds revision {rev} signed by the master "
                    f"key, this master is at {self.head.rev}; not following it "
                    "(restart this master with its data, or a longer "
                    "master_sync_timeout)", link.node_id)
            return
        self._catching_up = True
        d = Deferred.fromCoroutine(self._catch_up(link))
        d.addErrback(lambda f: log.failure("catch-up failed", f))

    async def _catch_up(self, link: PeerProtocol) -> None:
        retry = False
        try:
            await self._catch_up_from(link)
        except RequestFailed as e:
            log.info("catch-up from {peer_id} failed: {reason}",
                     peer_id=link.node_id, reason=str(e))
            retry = True
        except ProtocolViolation as e:
            link.drop(e.reason)
            retry = True
        except BadHead as e:
            link.drop(f"answered a catch-up with a head the master did not sign: {e}")
            retry = True
        except BatchRejected as e:
            self._report(f"catch-up from {link.node_id} rejected: {e.reason}",
                         link.node_id or "?")
            retry = True
        except catchup.PeerMoved as e:
            log.info("catch-up from {peer_id} did not settle: {reason}",
                     peer_id=link.node_id, reason=str(e))
            retry = True
        finally:
            self._catching_up = False
        if self._stopping:
            return
        if retry:
            if self._catch_up_call is None or not self._catch_up_call.active():
                self._catch_up_call = self.reactor.callLater(
                    self.config.catch_up_retry, self._maybe_catch_up)
        else:
            self._maybe_catch_up()

    async def _catch_up_from(self, link: PeerProtocol) -> None:
        start_rev = self.head.rev
        how, changes = await catchup.catch_up(self._replica, link.request,
                                              self.config.fetch_chunk)
        if not changes:
            return
        self.counters[f"catch_ups_{how}"] += 1
        added = sum(len(c.added) for c in changes)
        removed = sum(c.removed_count for c in changes)
        log.info("caught up from {peer_id} by {how}: revision {old} -> {rev}, "
                 "+{added} -{removed} objects",
                 peer_id=link.node_id, how=how, old=start_rev, rev=self.head.rev,
                 added=added, removed=removed)
        for change in changes:
            self._emit_change(change)
        self._flood(wire.head_announcement(self.head), link)

    # Messages -------------------------------------------------------------------

    def _message_received(self, link: PeerProtocol, message: wire.Message | wire.Messages,
                          frame: bytes) -> None:
        if not self.messages.first_sight(message.id):
            return
        self.counters["messages_relayed"] += self._flood(frame, link)
        if message.origin != self.node_id:
            bodies = message.bodies if isinstance(message, wire.Messages) else (message.body,)
            self.counters["messages_received"] += len(bodies)
            for body in bodies:
                self._emit("message_received", body)
            self._changed()
