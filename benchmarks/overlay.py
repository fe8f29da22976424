"""
Overlay: how fast N nodes form one overlay, how good the links they choose
are for latency, and how fast the overlay heals after a partition.

Every node runs in this process over real mutual TLS on 127.0.0.1, and every
link a node dials goes through a dtable.testing.ProxyMesh proxy of its own.
Each node sits at a random point of a square; the one-way latency the mesh
injects between two nodes grows linearly with their distance (1 ms for two
nodes at the same point, 60 ms across the diagonal), so the latency matrix
is symmetric and known. Node 0 is the master; node i > 0 is given the
addresses of one or two random earlier nodes, as in tests/test_overlay.py.

The nodes start a fraction of a clean interval apart (--in-step starts them
at one instant, which puts every node's probes into the same reactor turns
and skews the RTTs they measure). Per run it measures:

1. formation: from giving the nodes their addresses until the graph of live
   links is one connected component (checked after every change of any
   node, as dtable.testing.wait_for_all does);
2. stretch: 3 x better_primary_wait after formation (--settle), and again at
   10 x (--settle-long), for every node the latency of the shortest path
   from the master over the live links (edge weight: the pair's injected
   one-way latency) divided by the direct latency master -> node, mean and
   max over the nodes; with how each node's primary compares with its
   nearest node, the merge (defrag) links, and how far the RTTs the nodes
   measure on their links are from the injected ones;
3. healing: the nodes are split into a west and an east half (by their
   x coordinate) and every pair across is cut; once no link crosses and
   every node has a link again, the master adds a few objects, the cut is
   healed (after --hold seconds), and the time until the overlay is one
   component and every node holds the master's head is measured.

Everything is bounded by timeouts, and every node and proxy is stopped at
the end of each run; timers a node still has once its stopService() fired
are reported.

    python benchmarks/overlay.py [--nodes 20] [--runs 3] [--seed 1] [--json overlay.json]
                                 [--settle S] [--settle-long S] [--hold S] [--in-step]
                                 [--log FILE]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall, deferLater, react
from twisted.logger import globalLogBeginner, globalLogPublisher, textFileLogObserver

from dtable import DistributedTable, crypto
from dtable.testing import FAST, ProxyMesh, components, wait_for

#: FAST, with a primary that moves after 2 s and candidates re-probed every 3 s.
SETTINGS = {**FAST, "better_primary_wait": 2.0, "probe_retest": 3.0}

#: One-way latency of two nodes at the same point and across the diagonal.
MIN_LATENCY = 0.001
MAX_LATENCY = 0.060

#: Objects the master holds before the partition and adds during it.
OBJECTS_BEFORE = 10
OBJECTS_DURING = 5

#: Seconds each phase may take before the run gives up on it.
FORM_TIMEOUT = 25.0
PARTITION_TIMEOUT = 15.0
HEAL_TIMEOUT = 30.0


class LagMeter:
    """
    How late the reactor runs a timer due every C{interval} seconds: every
    latency the nodes measure includes this, since they all share one
    reactor thread.
    """

    def __init__(self, reactor: Any, interval: float = 0.02) -> None:
        self.reactor = reactor
        self.interval = interval
        self.samples: list[float] = []
        self._due = 0.0
        self._call: Any = None

    def start(self) -> None:
        self.samples = []
        self._due = time.perf_counter() + self.interval
        self._call = self.reactor.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.samples.append(max(0.0, now - self._due))
        self._due = now + self.interval
        self._call = self.reactor.callLater(self.interval, self._tick)

    def stop(self) -> dict[str, float | None]:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        samples = sorted(self.samples)
        if not samples:
            return {"median_ms": None, "p95_ms": None, "max_ms": None}
        return {"median_ms": 1000 * samples[len(samples) // 2],
                "p95_ms": 1000 * samples[int(0.95 * (len(samples) - 1))],
                "max_ms": 1000 * samples[-1]}


class LogCounter:
    """
    Counts the overlay's decisions, per phase of a run, and any error the
    nodes log.

    A merge ("X is in another part of the overlay") is counted as spurious
    when the live links had been one component for longer than the
    component horizon (3 clean intervals) when the node decided it: no
    fragment existed for its beacons to miss.
    """

    PATTERNS = {
        "primary_moves": "moving the primary link",
        "merges": "is in another part of the overlay",
    }
    PHASES = ("form", "cut", "heal")

    def __init__(self) -> None:
        self.horizon = 3 * SETTINGS["clean_interval"]
        self.connected_for: Callable[[], float] = lambda: 0.0
        self.reset()

    def phase(self, name: str) -> None:
        self.current = name

    def __call__(self, event: dict) -> None:
        text = event.get("log_format") or ""
        counts = self.counts[self.current]
        for name, pattern in self.PATTERNS.items():
            if pattern in text:
                counts[name] += 1
                if name == "merges" and self.connected_for() > self.horizon:
                    counts["spurious_merges"] += 1
        if "log_failure" in event:
            self.errors.append(f"{text}: {event['log_failure'].getErrorMessage()}")

    def reset(self) -> dict:
        result = {"phases": getattr(self, "counts", {}), "errors": getattr(self, "errors", [])}
        self.counts = {phase: {**{name: 0 for name in self.PATTERNS}, "spurious_merges": 0}
                       for phase in self.PHASES}
        self.current = "form"
        self.errors: list[str] = []
        return result


def shortest_paths(count: int, edges: set[tuple[int, int]], weight: list[list[float]],
                   source: int = 0) -> list[float]:
    """
    Dijkstra from C{source} over undirected C{edges}; unreachable nodes get
    infinity.
    """
    neighbours: dict[int, list[int]] = {i: [] for i in range(count)}
    for i, j in edges:
        neighbours[i].append(j)
        neighbours[j].append(i)
    distance = [math.inf] * count
    distance[source] = 0.0
    queue = [(0.0, source)]
    while queue:
        d, i = heapq.heappop(queue)
        if d > distance[i]:
            continue
        for j in neighbours[i]:
            if d + weight[i][j] < distance[j]:
                distance[j] = d + weight[i][j]
                heapq.heappush(queue, (distance[j], j))
    return distance


def stretch(count: int, edges: set[tuple[int, int]],
            latency: list[list[float]]) -> tuple[float | None, float | None, int]:
    """
    Mean and max, over the nodes but the master that C{edges} connect to
    it, of the path latency from the master divided by the direct latency;
    and how many nodes are not connected to the master.
    """
    paths = shortest_paths(count, edges, latency)
    ratios = [paths[j] / latency[0][j] for j in range(1, count) if paths[j] < math.inf]
    if not ratios:
        return None, None, count - 1
    return statistics.fmean(ratios), max(ratios), count - 1 - len(ratios)


def minimum_spanning_tree(count: int, weight: list[list[float]]) -> set[tuple[int, int]]:
    """
    Prim's algorithm on the complete graph: the latency-optimal tree with as
    many links as a tree of primaries.
    """
    inside = {0}
    best = {j: (weight[0][j], 0) for j in range(1, count)}
    edges = set()
    while best:
        j = min(best, key=lambda k: best[k][0])
        _, i = best.pop(j)
        inside.add(j)
        edges.add((min(i, j), max(i, j)))
        for k in best:
            if weight[j][k] < best[k][0]:
                best[k] = (weight[j][k], j)
    return edges


async def wait_until(nodes: list[DistributedTable], conditions: dict[str, Callable[[], bool]],
                     timeout: float) -> dict[str, float | None]:
    """
    Wait until each of C{conditions} (over the whole network) has held at
    least once, and return for each the perf_counter time it first held
    (None if it had not within C{timeout}).

    Like dtable.testing.wait_for_all, every node's changes (events, links up
    or down, and its clean-loop tick) re-check the conditions, so a time is
    that of the first change after which the condition held.
    """
    first: dict[str, float | None] = {name: None for name in conditions}

    def check(_node: DistributedTable) -> bool:
        now = time.perf_counter()
        for name, condition in conditions.items():
            if first[name] is None and condition():
                first[name] = now
        return all(at is not None for at in first.values())

    waits = [wait_for(node, check, timeout) for node in nodes]
    try:
        await DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
    except Exception:
        pass
    finally:
        for d in waits:
            if not d.called:
                d.cancel()
    return first


def since(start: float, at: float | None) -> float | None:
    return None if at is None else at - start


class Run:
    """
    One network of C{count} nodes, from start to stop.
    """

    def __init__(self, reactor: Any, count: int, seed: int, settle: float,
                 settle_long: float, hold: float, counter: LogCounter,
                 stagger: bool = True) -> None:
        self.reactor = reactor
        self.settle_long = settle_long
        self.hold = hold
        self.stagger = stagger
        self.count = count
        self.seed = seed
        self.settle = settle
        self.counter = counter
        self.rng = random.Random(seed)
        self.locations = [(self.rng.random(), self.rng.random()) for _ in range(count)]
        diagonal = math.sqrt(2)
        self.latency = [
            [0.0 if i == j else MIN_LATENCY + (MAX_LATENCY - MIN_LATENCY)
             * math.dist(self.locations[i], self.locations[j]) / diagonal
             for j in range(count)]
            for i in range(count)
        ]
        self.index: dict[str, int] = {}
        self._unwatch: list[Callable[[], None]] = []
        self.split_at = 0.0
        self.by_id: dict[str, int] = {}
        self.mesh = ProxyMesh(reactor, latency=self._pair_latency)
        key = crypto.generate_network_key()
        self.nodes = [
            DistributedTable(port=0, key=key, master=i == 0, reactor=reactor,
                             interface="127.0.0.1", connect_ssl=self.mesh.connector(str(i)),
                             **SETTINGS)
            for i in range(count)
        ]
        self.result: dict[str, Any] = {
            "seed": seed, "nodes": count,
            "nearest_ms_mean": 1000 * statistics.fmean(
                min(self.latency[i][k] for k in range(count) if k != i)
                for i in range(1, count)),
            "pairs_ms_mean": 1000 * statistics.fmean(
                self.latency[i][j] for i in range(count) for j in range(count) if i != j),
            "locations": [[round(x, 4), round(y, 4)] for x, y in self.locations],
            "latency_ms": [[round(v * 1000, 3) for v in row] for row in self.latency],
        }

    def _pair_latency(self, source: str, target: str) -> float:
        j = self.index.get(target)
        return MAX_LATENCY if j is None else self.latency[int(source)][j]

    # The graph as the benchmark sees it ---------------------------------------

    def edges(self) -> set[tuple[int, int]]:
        """
        The live links between the nodes, as undirected (i, j), i < j.
        """
        edges = set()
        for i, node in enumerate(self.nodes):
            for link in node.links:
                j = self.by_id.get(link.node_id)
                if j is not None and j != i:
                    edges.add((min(i, j), max(i, j)))
        return edges

    def dialling_across(self, west: set[int]) -> int:
        """
        How many nodes keep an outbound connection (primary, extra or
        defrag, up or retrying) to a node on the other side of the cut: those
        reconnect on their own when it heals, without finding each other.
        """
        count = 0
        for i, node in enumerate(self.nodes):
            connections = [getattr(node, "_primary", None), getattr(node, "_defrag", None),
                           *getattr(node, "_extra", {}).values()]
            targets = {self.index.get(str(c.address)) for c in connections if c is not None}
            count += any(j is not None and (j in west) != (i in west) for j in targets)
        return count

    def one_component(self) -> bool:
        return len(components(self.nodes)) == 1

    def primaries(self) -> dict[int, int]:
        """
        Node -> the node its primary link goes to, for nodes whose primary
        link is up.
        """
        chosen = {}
        for i, node in enumerate(self.nodes):
            view = node.overlay()
            primary = view["primary"]
            if primary is not None and any(link["address"] == primary
                                           and link["direction"] == "outbound"
                                           for link in view["links"]):
                j = self.index.get(primary)
                if j is not None:
                    chosen[i] = j
        return chosen

    def quality(self) -> dict[str, Any]:
        """
        Stretch from the master over the live links, and how the primaries
        compare with each node's nearest node.
        """
        edges = self.edges()
        mean, worst, cut_off = stretch(self.count, edges, self.latency)
        chosen = self.primaries()
        ratios, nearest_hits = [], 0
        for i, j in chosen.items():
            nearest = min(self.latency[i][k] for k in range(self.count) if k != i)
            ratios.append(self.latency[i][j] / nearest)
            nearest_hits += self.latency[i][j] == nearest
        errors = []
        for i, node in enumerate(self.nodes):
            for link in node.links:
                j = self.by_id.get(link.node_id)
                if j is not None and link.rtt_mean is not None:
                    errors.append(link.rtt_mean - 2 * self.latency[i][j])
        merges = []
        for i, node in enumerate(self.nodes):
            for link in node.overlay()["links"]:
                j = self.index.get(link["address"])
                if link["role"] == "defrag" and link["direction"] == "outbound" and j is not None:
                    merges.append(self.latency[i][j])
        measured = [
            sum(1 for entry in node.directory.snapshot() if entry["rtt_mean"] is not None
                and self.index.get(entry["address"], i) != i) / (self.count - 1)
            for i, node in enumerate(self.nodes)
        ]
        return {
            "measured_fraction": statistics.fmean(measured),
            "stretch_mean": mean,
            "stretch_max": worst,
            "cut_off_from_master": cut_off,
            "links": len(edges),
            "primaries_up": len(chosen),
            "primary_is_nearest": nearest_hits / len(chosen) if chosen else None,
            "primary_over_nearest_mean": statistics.fmean(ratios) if ratios else None,
            "primary_over_nearest_max": max(ratios) if ratios else None,
            "primary_latency_ms_mean": (statistics.fmean(self.latency[i][j]
                                                         for i, j in chosen.items()) * 1000
                                        if chosen else None),
            "merge_links": len(merges),
            "merge_latency_ms_mean": statistics.fmean(merges) * 1000 if merges else None,
            "rtt_excess_ms_median": statistics.median(errors) * 1000 if errors else None,
        }

    # Phases -------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        try:
            await self._run()
        finally:
            await self.stop()
        self.result["log"] = self.counter.reset()
        return self.result

    async def _run(self) -> None:
        r = self.result
        nodes, master = self.nodes, self.nodes[0]
        started = time.perf_counter()
        # Nodes started at one instant run their clean loops in step, and
        # all their probes' TLS handshakes land in the same reactor
        # iterations; real nodes are not in step. Spread the starts over one
        # clean interval.
        for node in nodes:
            if self.stagger:
                await deferLater(self.reactor, SETTINGS["clean_interval"] / self.count,
                                 lambda: None)
            node.startService()
        await DeferredList([n.when_started() for n in nodes], fireOnOneErrback=True)
        r["start_s"] = time.perf_counter() - started
        self.index = {f"127.0.0.1:{n.listening_port}": i for i, n in enumerate(nodes)}
        self.by_id = {n.node_id: i for i, n in enumerate(nodes)}
        self.split_at = time.perf_counter()

        def watch() -> None:
            if not self.one_component():
                self.split_at = time.perf_counter()

        for node in nodes:
            self._unwatch.append(node.watch(watch))
        self.counter.connected_for = (
            lambda: time.perf_counter() - self.split_at if self.one_component() else 0.0)

        # 1. Formation, from one or two addresses each.
        given = set()
        t0 = time.perf_counter()
        for i, node in enumerate(nodes[1:], start=1):
            for j in self.rng.sample(range(i), min(i, self.rng.choice((1, 2)))):
                node.add_peer(f"127.0.0.1:{nodes[j].listening_port}")
                given.add((j, i))
        r["initial_stretch_mean"], r["initial_stretch_max"], _ = stretch(
            self.count, given, self.latency)
        r["mst_stretch_mean"], r["mst_stretch_max"], _ = stretch(
            self.count, minimum_spanning_tree(self.count, self.latency), self.latency)
        first = await wait_until(nodes, {"one": self.one_component}, FORM_TIMEOUT)
        r["form_s"] = since(t0, first["one"])
        if r["form_s"] is None:
            r["failed"] = "no single component within %.0f s" % FORM_TIMEOUT
            return
        r["formed"] = self.quality()

        # 2. Settle, then the stretch from the master; again after a longer
        # wait, to see whether the primaries still move towards the optimum.
        lag = LagMeter(self.reactor)
        lag.start()
        await deferLater(self.reactor, self.settle, lambda: None)
        r["reactor_lag_settling"] = lag.stop()
        r["settled"] = self.quality()
        r["settled"]["one_component"] = self.one_component()
        if self.settle_long > self.settle:
            moves = self.counter.counts["form"]["primary_moves"]
            await deferLater(self.reactor, self.settle_long - self.settle, lambda: None)
            r["settled_long"] = self.quality()
            r["settled_long"]["one_component"] = self.one_component()
            r["settled_long"]["primary_moves_since_settled"] = (
                self.counter.counts["form"]["primary_moves"] - moves)

        for i in range(OBJECTS_BEFORE):
            master.add_object({"before": i, "seed": self.seed})
        head = await master.flush()
        synced = await wait_until(nodes, {"head": lambda: all(n.head == head for n in nodes)},
                                  PARTITION_TIMEOUT)
        if synced["head"] is None:
            r["failed"] = "the master's first objects did not reach every node"
            return

        # 3. Partition into a west and an east half, then heal.
        order = sorted(range(self.count), key=lambda i: self.locations[i][0])
        west = set(order[:self.count // 2])
        r["west"] = sorted(west)

        def across(source: str, target: str) -> bool:
            j = self.index.get(target)
            return j is not None and (int(source) in west) != (j in west)

        def no_link_across() -> bool:
            return all((i in west) == (j in west) for i, j in self.edges())

        def every_node_linked() -> bool:
            return all(n.links for n in nodes)

        t_cut = time.perf_counter()
        self.counter.phase("cut")
        self.mesh.partition(across)
        first = await wait_until(nodes, {"cut": no_link_across}, PARTITION_TIMEOUT)
        if first["cut"] is None:
            r["failed"] = "links across the cut stayed up"
            return
        first = await wait_until(nodes, {"linked": lambda: no_link_across()
                                         and every_node_linked()}, PARTITION_TIMEOUT)
        r["relink_s"] = since(t_cut, first["linked"])
        r["components_cut"] = len(components(nodes))
        if r["relink_s"] is None:
            r["failed"] = "a half did not link up within %.0f s" % PARTITION_TIMEOUT
            return
        for i in range(OBJECTS_DURING):
            master.add_object({"during": i, "seed": self.seed})
        head = await master.flush()
        masters_half = [n for i, n in enumerate(nodes) if (i in west) == (0 in west)]
        other_half = [n for i, n in enumerate(nodes) if (i in west) != (0 in west)]
        await wait_until(masters_half, {"head": lambda: all(n.head == head
                                                            for n in masters_half)},
                         PARTITION_TIMEOUT)
        r["leaked_across_cut"] = sum(n.head.rev >= head.rev for n in other_half)
        if self.hold:
            await deferLater(self.reactor, self.hold, lambda: None)

        r["dialling_across_at_heal"] = self.dialling_across(west)
        t_heal = time.perf_counter()
        self.counter.phase("heal")
        self.mesh.heal()
        first = await wait_until(nodes, {
            "one": self.one_component,
            "head": lambda: all(n.head == head for n in nodes),
            "both": lambda: self.one_component() and all(n.head == head for n in nodes),
        }, HEAL_TIMEOUT)
        r["heal_component_s"] = since(t_heal, first["one"])
        r["heal_head_s"] = since(t_heal, first["head"])
        r["heal_s"] = since(t_heal, first["both"])
        expected = set(master.table.hashes())
        r["tables_equal"] = all(set(n.table.hashes()) == expected for n in nodes)
        if r["heal_s"] is None:
            r["failed"] = "not healed within %.0f s" % HEAL_TIMEOUT
        r["healed"] = self.quality()

    def timers(self) -> list[str]:
        """
        The reactor's pending timers, but the proxies' own, described.
        """
        described = []
        for call in self.reactor.getDelayedCalls():
            if not call.active():
                continue
            func = call.func
            if type(getattr(func, "__self__", None)).__module__ == "dtable.faults":
                continue
            if isinstance(func, LoopingCall):
                func = func.f
            described.append(getattr(func, "__qualname__", repr(func)))
        return described

    async def stop(self) -> None:
        await DeferredList([n.stopService() for n in self.nodes if n.running],
                           consumeErrors=True)
        # stopService() fires "when every port, connection and timer is
        # gone": whatever the nodes still have pending now outlived it.
        self.result["timers_after_stop"] = self.timers()
        await self.mesh.stop()
        # The node ends of proxied connections see them close a reactor turn
        # or so after the proxies dropped them.
        for _ in range(40):
            if not self.timers():
                break
            await deferLater(self.reactor, 0.05, lambda: None)
        self.result["timers_left"] = self.timers()
        for unwatch in self._unwatch:
            unwatch()
        self.counter.connected_for = lambda: 0.0
        self.result["proxies"] = len(self.mesh.proxies)


# Report -----------------------------------------------------------------------

def rows(settle: float, settle_long: float) -> list[tuple[str, Callable[[dict], Any], str]]:
    """
    The table: (label, getter from a run's result, format).
    """
    def at(key: str, field: str) -> Callable[[dict], Any]:
        return lambda r: r.get(key, {}).get(field)

    def percent(key: str, field: str) -> Callable[[dict], Any]:
        return lambda r: _percent(r.get(key, {}).get(field))

    table = [
        ("start-up: every node listening (s)", lambda r: r.get("start_s"), "{:.2f}"),
        ("1. addresses given -> one component (s)", lambda r: r.get("form_s"), "{:.2f}"),
        ("   stretch mean at that moment", at("formed", "stretch_mean"), "{:.2f}"),
        ("   ref: stretch mean, initial-address graph", lambda r: r.get("initial_stretch_mean"),
         "{:.2f}"),
        ("   ref: stretch mean, latency MST", lambda r: r.get("mst_stretch_mean"), "{:.2f}"),
        ("   ref: nearest node, mean one-way (ms)", lambda r: r.get("nearest_ms_mean"),
         "{:.1f}"),
        ("   ref: all pairs, mean one-way (ms)", lambda r: r.get("pairs_ms_mean"), "{:.1f}"),
    ]
    looks = [("settled", settle, "2.")]
    if settle_long > settle:
        looks.append(("settled_long", settle_long, "  "))
    for key, seconds, number in looks:
        when = f"{seconds:g} s"
        table += [
            (f"{number} stretch mean, {when} after forming", at(key, "stretch_mean"), "{:.2f}"),
            (f"   stretch max, {when}", at(key, "stretch_max"), "{:.2f}"),
            (f"   live links, {when}", at(key, "links"), "{:d}"),
            (f"   other nodes with an RTT, {when} (%)", percent(key, "measured_fraction"),
             "{:.0f}"),
            (f"   nodes without a live primary, {when}",
             lambda r, key=key: None if key not in r
             else r["nodes"] - 1 - r[key]["primaries_up"], "{:d}"),
            (f"   primary is the nearest node, {when} (%)", percent(key, "primary_is_nearest"),
             "{:.0f}"),
            (f"   primary/nearest latency mean, {when}", at(key, "primary_over_nearest_mean"),
             "{:.2f}"),
            (f"   primary/nearest latency max, {when}", at(key, "primary_over_nearest_max"),
             "{:.2f}"),
            (f"   primary links, mean one-way, {when} (ms)", at(key, "primary_latency_ms_mean"),
             "{:.1f}"),
            (f"   merge (defrag) links, {when}", at(key, "merge_links"), "{:d}"),
            (f"   merge links, mean one-way, {when} (ms)", at(key, "merge_latency_ms_mean"),
             "{:.1f}"),
            (f"   link RTT - injected, median, {when} (ms)", at(key, "rtt_excess_ms_median"),
             "{:.1f}"),
        ]
    if settle_long > settle:
        table.append(("   primary moves between the two looks",
                      at("settled_long", "primary_moves_since_settled"), "{:d}"))
    table += [
        (f"   reactor lag, first {settle:g} s, p95 (ms)", at("reactor_lag_settling", "p95_ms"),
         "{:.1f}"),
        ("3. cut -> both halves linked up (s)", lambda r: r.get("relink_s"), "{:.2f}"),
        ("   components then", lambda r: r.get("components_cut"), "{:d}"),
        ("   nodes still dialling across at heal", lambda r: r.get("dialling_across_at_heal"),
         "{:d}"),
        ("   heal -> one component (s)", lambda r: r.get("heal_component_s"), "{:.2f}"),
        ("   heal -> every node has the head (s)", lambda r: r.get("heal_head_s"), "{:.2f}"),
        ("   heal -> both at once (s)", lambda r: r.get("heal_s"), "{:.2f}"),
        ("   stretch mean once healed", at("healed", "stretch_mean"), "{:.2f}"),
        ("primary moves: forming and settling", lambda r: _logged(r, "form", "primary_moves"),
         "{:d}"),
        ("   during the cut", lambda r: _logged(r, "cut", "primary_moves"), "{:d}"),
        ("   after healing", lambda r: _logged(r, "heal", "primary_moves"), "{:d}"),
        ("merge attempts: forming and settling", lambda r: _logged(r, "form", "merges"),
         "{:d}"),
        ("   during the cut", lambda r: _logged(r, "cut", "merges"), "{:d}"),
        ("   after healing", lambda r: _logged(r, "heal", "merges"), "{:d}"),
        (f"   spurious (one component > {3 * SETTINGS['clean_interval']:g} s)",
         lambda r: sum(_logged(r, p, "spurious_merges") or 0 for p in LogCounter.PHASES)
         if r.get("log") else None, "{:d}"),
        ("wall time of the run (s)", lambda r: r.get("wall_s"), "{:.1f}"),
    ]
    return table


def _logged(result: dict, phase: str, name: str) -> int | None:
    return result.get("log", {}).get("phases", {}).get(phase, {}).get(name)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "{:d}":
        return fmt.format(int(round(value)))
    return fmt.format(value)


def summarize(results: list[dict], table: list) -> dict[str, dict[str, float]]:
    summary = {}
    for label, get, _ in table:
        values = [v for v in (get(r) for r in results) if v is not None]
        if values:
            summary[label.strip()] = {"median": statistics.median(values),
                                      "min": min(values), "max": max(values)}
    return summary


def report(results: list[dict], args: argparse.Namespace, table: list) -> None:
    print(f"\noverlay of {args.nodes} nodes over TLS on 127.0.0.1, every link through a "
          f"latency proxy; seeds {', '.join(str(r['seed']) for r in results)}")
    print(f"one-way latency {MIN_LATENCY * 1000:g}-{MAX_LATENCY * 1000:g} ms by distance; "
          f"better_primary_wait {SETTINGS['better_primary_wait']:g} s, probe_retest "
          f"{SETTINGS['probe_retest']:g} s, other settings dtable.testing.FAST; "
          + ("nodes started in step" if args.in_step else
             f"node starts spread over {SETTINGS['clean_interval']:g} s"))
    print("stretch: latency of the overlay path from the master / direct latency, "
          "mean or max over the nodes\n")
    width = max(len(label) for label, _, _ in table) + 1
    heads = [f"run {i + 1}" for i in range(len(results))] + ["median", "min", "max"]
    print(f"{'':<{width}}" + "".join(f"{h:>8}" for h in heads))
    for label, get, fmt in table:
        values = [get(r) for r in results]
        present = [v for v in values if v is not None]
        cells = [_cell(v, fmt) for v in values]
        if present:
            median_fmt = "{:.1f}" if fmt == "{:d}" else fmt
            cells += [_cell(statistics.median(present), median_fmt),
                      _cell(min(present), fmt), _cell(max(present), fmt)]
        else:
            cells += ["-"] * 3
        print(f"{label:<{width}}" + "".join(f"{c:>8}" for c in cells))
    for i, r in enumerate(results, start=1):
        notes = []
        if r.get("failed"):
            notes.append(f"FAILED: {r['failed']}")
        if r.get("tables_equal") is False:
            notes.append("a node's table differs from the master's after healing")
        if r.get("leaked_across_cut"):
            notes.append(f"{r['leaked_across_cut']} nodes got the head across the cut")
        for key in ("settled", "settled_long"):
            if r.get(key) and not r[key].get("one_component"):
                notes.append(f"not one component at the '{key}' look: the stretch is over "
                             f"the nodes linked to the master; "
                             f"{r[key]['cut_off_from_master']} were not")
        errors = r.get("log", {}).get("errors", [])
        if errors:
            notes.append(f"{len(errors)} errors logged; first: {errors[0]}")
        if r.get("timers_after_stop"):
            counts: dict[str, int] = {}
            for name in r["timers_after_stop"]:
                counts[name] = counts.get(name, 0) + 1
            notes.append("timers still pending when every stopService() had fired: "
                         + ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())))
        if r.get("timers_left"):
            notes.append(f"{len(r['timers_left'])} timers left after the proxies stopped too")
        for note in notes:
            print(f"run {i}: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1,
                        help="run k uses seed + k - 1 for locations and addresses")
    parser.add_argument("--settle", type=float, default=None,
                        help="seconds to let the overlay settle before measuring the "
                             "stretch (default 3 x better_primary_wait)")
    parser.add_argument("--settle-long", type=float, default=None,
                        help="seconds after formation for a second look at the stretch "
                             "and the primaries (default 10 x better_primary_wait; "
                             "0 skips it)")
    parser.add_argument("--hold", type=float, default=0.0,
                        help="seconds to keep the partition once both halves linked up "
                             "(default 0: heal at once)")
    parser.add_argument("--in-step", action="store_true",
                        help="start every node at the same instant (by default the starts "
                             "are spread over one clean interval)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--log", default=None, help="write the nodes' log to this file")
    args = parser.parse_args()
    if args.nodes < 4 or args.runs < 1:
        parser.error("--nodes must be at least 4 and --runs at least 1")
    settle = args.settle if args.settle is not None else 3 * SETTINGS["better_primary_wait"]
    settle_long = (args.settle_long if args.settle_long is not None
                   else 10 * SETTINGS["better_primary_wait"])
    counter = LogCounter()
    globalLogPublisher.addObserver(counter)
    if args.log:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(open(args.log, "w"))],
                                         redirectStandardIO=False)
    results: list[dict] = []

    async def go(reactor: Any) -> None:
        for k in range(args.runs):
            seed = args.seed + k
            began = time.perf_counter()
            result = await Run(reactor, args.nodes, seed, settle, settle_long, args.hold,
                               counter, stagger=not args.in_step).run()
            result["wall_s"] = time.perf_counter() - began
            results.append(result)
            print(f"run {k + 1}/{args.runs} (seed {seed}): {result['wall_s']:.1f} s"
                  + (f", FAILED: {result['failed']}" if result.get("failed") else ""),
                  flush=True)
        table = rows(settle, settle_long)
        report(results, args, table)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"nodes": args.nodes, "runs": args.runs, "seed": args.seed,
                           "settle_s": settle, "settle_long_s": settle_long,
                           "hold_s": args.hold, "staggered_starts": not args.in_step,
                           "settings": SETTINGS,
                           "latency_s": [MIN_LATENCY, MAX_LATENCY],
                           "results": results, "summary": summarize(results, table)},
                          f, indent=2)

    react(lambda reactor: Deferred.fromCoroutine(go(reactor)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
