"""
Helpers for testing applications that embed dtable, under trial or
pytest-twisted: waiting for a table to reach a condition, and running a small
network of nodes on loopback in one reactor.

    net = LocalNetwork(reactor, size=3)
    await net.start()
    net.master.add_object({"name": "www"})
    await net.converged()
    await net.stop()
"""

from __future__ import annotations

import os
import random
import socket
import sys
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import Clock

from dtable import crypto
from dtable.interfaces import TableObserver
from dtable.service import DistributedTable

#: Settings for tests: an in-memory store, and intervals short enough for
#: tests, long enough for a loaded machine.
FAST = dict(
    memory=True,
    ping_interval=0.5,
    handshake_timeout=5.0,
    connect_timeout=5.0,
    request_timeout=10.0,
    reconnect_initial_delay=0.05,
    reconnect_max_delay=0.5,
    failures_before_next_peer=2,
    master_sync_timeout=0.2,
    catch_up_retry=0.1,
    clean_interval=0.5,
    probe_retest=5.0,
    probe_pings=5,
    better_primary_wait=2.0,
)


def twistd_command() -> list[str]:
    """
    The command that runs the twistd of this interpreter's environment, for
    tests and benchmarks that start nodes as child processes.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


#: The lowest port L{free_ports} hands out.
LOWEST_PORT = 20000


def listening_port_range() -> tuple[int, int]:
    """
    The ports, C{(low, high)} with C{high} excluded, that tests may listen
    on: from L{LOWEST_PORT} up to the range the system picks local ports of
    outgoing connections from (Linux's ip_local_port_range, 32768 by
    default), so that no connection made meanwhile can take one.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    return LOWEST_PORT, max(ephemeral, LOWEST_PORT + 1000)


def free_ports(count: int, interface: str = "127.0.0.1") -> list[int]:
    """
    C{count} different ports on C{interface}, free at the time of the call
    (all are bound at once, so none is handed out twice), from
    L{listening_port_range}. Another process may take one before a node
    listens on it; the node then fails to start, and its log says why.
    """
    low, high = listening_port_range()
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    rng = random.Random()
    sockets: list[socket.socket] = []
    try:
        for _ in range(100 * count):
            if len(sockets) == count:
                break
            sock = socket.socket(family, socket.SOCK_STREAM)
            # As Twisted's listening ports do, so a port in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((interface, rng.randrange(low, high)))
            except OSError:
                sock.close()
            else:
                sockets.append(sock)
        if len(sockets) < count:
            raise RuntimeError(f"found no {count} free ports in {low}-{high - 1} "
                               f"on {interface}")
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def next_turn(clock: Clock, seconds: float = 0.0) -> None:
    """
    Move C{clock} on by C{seconds} and run the calls that are then due, but
    not the calls they schedule: one turn of a reactor, where
    C{Clock.advance} would also run what is scheduled meanwhile for no later
    than now.
    """
    clock.rightNow += seconds
    now = clock.seconds()
    for call in [c for c in clock.getDelayedCalls() if c.getTime() <= now]:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def wait_for(table: DistributedTable, predicate: Callable[[DistributedTable], bool],
             timeout: float = 30.0, reactor: Any = None) -> Deferred:
    """
    A Deferred that fires with C{table} once C{predicate(table)} is true. It
    is checked now and after every change of C{table} (its events, and links
    coming up or going down). Fails with
    L{twisted.internet.defer.TimeoutError} after C{timeout} seconds.
    """
    if reactor is None:
        reactor = table.reactor
    d: Deferred = Deferred()

    def check() -> None:
        if not d.called and predicate(table):
            d.callback(table)

    unsubscribe = table.watch(check)
    d.addTimeout(timeout, reactor)

    def cleanup(result: Any) -> Any:
        unsubscribe()
        return result

    d.addBoth(cleanup)
    check()
    return d


def wait_for_all(tables: list[DistributedTable],
                 predicate: Callable[[DistributedTable], bool],
                 timeout: float = 30.0) -> Deferred:
    """
    A Deferred that fires once C{predicate} holds for every table.
    """
    return DeferredList([wait_for(t, predicate, timeout) for t in tables],
                        fireOnOneErrback=True, consumeErrors=True)


def components(nodes: list[DistributedTable]) -> list[set[str]]:
    """
    The connected components (sets of node ids) of the graph of live links
    among C{nodes}.
    """
    ids = {n.node_id for n in nodes}
    edges: dict[str, set[str]] = {i: set() for i in ids}
    for node in nodes:
        for link in node.links:
            if link.node_id in ids:
                edges[node.node_id].add(link.node_id)
                edges[link.node_id].add(node.node_id)
    seen: set[str] = set()
    parts = []
    for start in sorted(ids):
        if start in seen:
            continue
        part: set[str] = set()
        todo = [start]
        while todo:
            current = todo.pop()
            if current in part:
                continue
            part.add(current)
            todo.extend(edges[current] - part)
        seen |= part
        parts.append(part)
    return parts


class LogCapture:
    """
    A log observer that keeps every event while it is installed and fires
    waiters on a matching one:

        capture = LogCapture(reactor)
        globalLogPublisher.addObserver(capture)
        event = await capture.wait(lambda e: "dropping" in e.get("log_format", ""))
    """

    def __init__(self, reactor: Any = None) -> None:
        self.events: list[dict] = []
        self._reactor = reactor
        self._waiters: list[tuple[Callable[[dict], bool], Deferred]] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate(event):
                self._waiters.remove(waiter)
                d.callback(event)

    def matching(self, predicate: Callable[[dict], bool]) -> list[dict]:
        """
        The events seen so far for which C{predicate} holds.
        """
        return [event for event in self.events if predicate(event)]

    def wait(self, predicate: Callable[[dict], bool], timeout: float = 30.0) -> Deferred:
        """
        A Deferred that fires with the first event (seen already, or to come)
        for which C{predicate} holds; fails with
        L{twisted.internet.defer.TimeoutError} after C{timeout} seconds.
        """
        for event in self.events:
            if predicate(event):
                return succeed(event)
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as global_reactor
            reactor = global_reactor
        d: Deferred = Deferred()
        self._waiters.append((predicate, d))
        return d.addTimeout(timeout, reactor)


class Recorder(TableObserver):
    """
    An observer that records every event as (name, args) in C{events}.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple]] = []

    def started(self) -> None:
        self.events.append(("started", ()))

    def object_added(self, obj: dict) -> None:
        self.events.append(("object_added", (obj,)))

    def object_removed(self, obj: dict) -> None:
        self.events.append(("object_removed", (obj,)))

    def message_received(self, msg: object) -> None:
        self.events.append(("message_received", (msg,)))

    def error(self, error_string: str, origin: str, obj: object) -> None:
        self.events.append(("error", (error_string, origin, obj)))

    def named(self, name: str) -> list[tuple]:
        return [args for event, args in self.events if event == name]


class LocalNetwork:
    """
    C{size} nodes on one loopback address in one reactor: node 0 is the
    master, and node i > 0 dials node C{links[i]} (by default node i - 1,
    a chain). With C{master_key} (from L{dtable.crypto.generate_master_key})
    the master signs with it and every other node trusts only its public
    half.

    @ivar nodes: the nodes, in order.
    @ivar recorders: a L{Recorder} per node.
    """

    def __init__(self, reactor: Any, size: int = 3, key: str | None = None,
                 links: dict[int, list[int]] | None = None, master: bool = True,
                 interface: str = "127.0.0.1", master_key: str | None = None,
                 **options: Any) -> None:
        self.reactor = reactor
        self.key = key or crypto.generate_network_key()
        self.interface = interface
        self.links = links if links is not None else {i: [i - 1] for i in range(1, size)}
        self.options = {**FAST, **options}
        if master_key is not None:
            self.options["master_public_key"] = crypto.public_key_hex(
                crypto.parse_master_key(master_key))
        self.nodes = [
            DistributedTable(port=0, key=self.key, master=master and i == 0,
                             master_key=master_key if master and i == 0 else None,
                             reactor=reactor, interface=interface, **self.options)
            for i in range(size)
        ]
        self.recorders = [Recorder() for _ in self.nodes]
        for node, recorder in zip(self.nodes, self.recorders):
            node.subscribe(recorder)

    @property
    def master(self) -> DistributedTable:
        return self.nodes[0]

    def address(self, index: int) -> str:
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"{host}:{self.nodes[index].listening_port}"

    async def start(self) -> None:
        """
        Start every node, then give each its peers.
        """
        for node in self.nodes:
            node.startService()
        await DeferredList([n.when_started() for n in self.nodes],
                           fireOnOneErrback=True, consumeErrors=True)
        for i, targets in self.links.items():
            for j in targets:
                self.nodes[i].add_peer(self.address(j))

    async def converged(self, timeout: float = 30.0) -> None:
        """
        Publish what the master has pending, then wait until every node
        holds the master's revision and root.
        """
        head = await self.master.flush()

        def same(node: DistributedTable) -> bool:
            return node.head == head

        await wait_for_all(self.nodes, same, timeout)

    async def stop(self) -> None:
        await DeferredList([n.stopService() for n in self.nodes if n.running],
                           consumeErrors=True)


class ProxyMesh:
    """
    Routes every link a node dials through a L{dtable.faults.FaultProxy} of
    its own, one per (dialling node, target address), so that a test can add
    latency to any pair of nodes or cut it (a partition).

        mesh = ProxyMesh(reactor, latency=lambda source, target: 0.005)
        node = DistributedTable(..., connect_ssl=mesh.connector("a"))

    @param latency: the one-way latency of a new pair, from the dialling
        node's name and the target address (C{"host:port"}).
    """

    def __init__(self, reactor: Any,
                 latency: Callable[[str, str], float] = lambda source, target: 0.0) -> None:
        from dtable.faults import FaultProxy

        self._proxy_class = FaultProxy
        self.reactor = reactor
        self._latency = latency
        self.proxies: dict[tuple[str, str], Any] = {}
        self._blocked: Callable[[str, str], bool] = lambda source, target: False

    def connector(self, source: str) -> Callable[..., Any]:
        """
        A C{connect_ssl} for the node named C{source}.
        """
        def connect_ssl(host: str, port: int, factory: Any, context: Any,
                        timeout: float = 30) -> Any:
            proxy = self.proxy(source, host, port)
            return self.reactor.connectSSL("127.0.0.1", proxy.port, factory, context,
                                           timeout=timeout)

        return connect_ssl

    def proxy(self, source: str, host: str, port: int) -> Any:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        key = (source, target)
        proxy = self.proxies.get(key)
        if proxy is None:
            proxy = self._proxy_class(self.reactor, host, port,
                                      latency=self._latency(source, target))
            started = Deferred.fromCoroutine(proxy.start())
            if not started.called:
                raise RuntimeError("a proxy did not start listening at once")
            self.proxies[key] = proxy
            if self._blocked(source, target):
                proxy.cut()
        return proxy

    def set_latency(self, seconds: float, where: Callable[[str, str], bool]) -> None:
        """
        Set the one-way latency of every pair (source, target) C{where}
        holds, now and for pairs made later.
        """
        previous = self._latency

        def latency(source: str, target: str) -> float:
            return seconds if where(source, target) else previous(source, target)

        self._latency = latency
        for (source, target), proxy in self.proxies.items():
            if where(source, target):
                proxy.set_latency(seconds)

    def partition(self, where: Callable[[str, str], bool]) -> None:
        """
        Cut every pair C{where} holds, now and for pairs made later.
        """
        self._blocked = where
        for (source, target), proxy in self.proxies.items():
            if where(source, target):
                proxy.cut()

    def heal(self) -> None:
        self._blocked = lambda source, target: False
        for proxy in self.proxies.values():
            proxy.restore()

    async def stop(self) -> None:
        await DeferredList([Deferred.fromCoroutine(p.stop()) for p in self.proxies.values()],
                           consumeErrors=True)
