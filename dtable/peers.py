"""
The peer directory: addresses, node ids, failures and the choice of links.

This layer owns what a node knows about other nodes: the addresses it was given
or has learned, which of them turned out to be itself, how often each failed,
and which address to dial next. It knows nothing of sockets or TLS; the
service feeds it what happened and asks it what to do.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Iterable

import attrs


class AddressError(ValueError):
    """
    A peer address could not be parsed; str() says what is wrong.
    """


def _check_port(port: int, text: str) -> int:
    if not 0 < port < 65536:
        raise AddressError(f"port out of range in {text!r} (1-65535)")
    return port


@attrs.frozen(order=True)
class PeerAddress:
    """
    Where a node listens: a host (name, IPv4 or IPv6 literal) and a TCP port.
    """

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "PeerAddress":
        """
        Parse C{host:port}, C{1.2.3.4:port} or C{[::1]:port}.

        @raise AddressError: with a message naming what is wrong.
        """
        text = text.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise AddressError(
                    f"bad IPv6 peer address {text!r}: use [address]:port"
                )
            port_text = rest[1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise AddressError(f"{host!r} in {text!r} is not an IPv6 address")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise AddressError(f"bad peer address {text!r}: use host:port")
            if ":" in host:
                raise AddressError(
                    f"bad peer address {text!r}: write IPv6 addresses as [address]:port"
                )
        if not (port_text.isascii() and port_text.isdigit()):
            raise AddressError(f"bad port {port_text!r} in peer address {text!r}")
        return cls(host=host, port=_check_port(int(port_text), text))

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        if self.is_ipv6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def normalize_host(host: str) -> str:
    """
    An IPv4 address seen on a dual-stack socket (C{::ffff:192.0.2.1}) as the
    plain IPv4 address; any other host unchanged.
    """
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:"):]
    return host


@attrs.define
class _Candidate:
    address: PeerAddress
    initial: bool
    first_seen: float = 0.0
    failures: int = 0
    node_id: str | None = None
    rtts: deque = attrs.field(factory=deque)
    last_success: float | None = None
    last_probe: float | None = None

    def mean_rtt(self) -> float | None:
        return sum(self.rtts) / len(self.rtts) if self.rtts else None


class PeerDirectory:
    """
    What a node knows about the nodes it may link to, and its choices.

    Addresses come from the operator (initial ones, never forgotten) or are
    learned from peers (bounded in number, purged when they stay
    unreachable). Each carries its failures since its last success and a
    window of round-trip times. Addresses that turned out to be the node
    itself are remembered and never chosen again.

    The primary link goes to the candidate with the fewest failures, then the
    lowest mean RTT; candidates that tie (for example, none measured yet) are
    tried in turn. Time is passed in (C{now}), so the directory needs no
    clock.
    """

    def __init__(self, initial: Iterable[PeerAddress] = (), window: int = 20,
                 max_learned: int = 1000) -> None:
        self._candidates: dict[PeerAddress, _Candidate] = {}
        self._self_addresses: set[PeerAddress] = set()
        self._last_choice: PeerAddress | None = None
        self._window = window
        self._max_learned = max_learned
        for address in initial:
            self.add(address, initial=True)

    def add(self, address: PeerAddress, initial: bool = False, now: float = 0.0) -> bool:
        """
        Learn an address. Returns False if it was already known or is the
        node itself.
        """
        if address in self._self_addresses:
            return False
        known = self._candidates.get(address)
        if known is not None:
            if initial:
                known.initial = True
            return False
        if not initial and self._learned_count() >= self._max_learned:
            if self._max_learned == 0:
                return False
            self._forget_one_learned()
        self._candidates[address] = _Candidate(
            address=address, initial=initial, first_seen=now,
            rtts=deque(maxlen=self._window))
        return True

    def learn(self, address: PeerAddress, node_id: str, now: float) -> bool:
        """
        A peer told us of a node at C{address}. Returns True if it is new.
        """
        added = self.add(address, now=now)
        candidate = self._candidates.get(address)
        if candidate is not None and candidate.node_id is None:
            candidate.node_id = node_id
        return added

    def _learned_count(self) -> int:
        return sum(1 for c in self._candidates.values() if not c.initial)

    def _forget_one_learned(self) -> None:
        learned = [c for c in self._candidates.values() if not c.initial]
        worst = max(learned, key=lambda c: (c.failures, -(c.last_success or 0.0)))
        del self._candidates[worst.address]

    def addresses(self) -> list[PeerAddress]:
        return list(self._candidates)

    def __contains__(self, address: object) -> bool:
        return address in self._candidates

    def self_addresses(self) -> list[PeerAddress]:
        return sorted(self._self_addresses)

    def is_self(self, address: PeerAddress) -> bool:
        return address in self._self_addresses

    def mark_self(self, address: PeerAddress) -> None:
        """
        The address loops back to this node: never dial it again.
        """
        self._candidates.pop(address, None)
        self._self_addresses.add(address)

    def record_failure(self, address: PeerAddress) -> None:
        candidate = self._candidates.get(address)
        if candidate is not None:
            candidate.failures += 1

    def record_success(self, address: PeerAddress, node_id: str, now: float = 0.0) -> None:
        candidate = self._candidates.get(address)
        if candidate is not None:
            candidate.failures = 0
            candidate.node_id = node_id
            candidate.last_success = now

    def record_rtt(self, address: PeerAddress, seconds: float) -> None:
        candidate = self._candidates.get(address)
        if candidate is not None:
            candidate.rtts.append(seconds)

    def record_probe(self, address: PeerAddress, now: float) -> None:
        candidate = self._candidates.get(address)
        if candidate is not None:
            candidate.last_probe = now

    def failures(self, address: PeerAddress) -> int:
        candidate = self._candidates.get(address)
        return candidate.failures if candidate is not None else 0

    def mean_rtt(self, address: PeerAddress) -> float | None:
        candidate = self._candidates.get(address)
        return candidate.mean_rtt() if candidate is not None else None

    def node_id(self, address: PeerAddress) -> str | None:
        candidate = self._candidates.get(address)
        return candidate.node_id if candidate is not None else None

    def _rank(self, address: PeerAddress) -> tuple[int, float]:
        candidate = self._candidates[address]
        mean = candidate.mean_rtt()
        return candidate.failures, (mean if mean is not None else float("inf"))

    def next_primary(self, exclude: Iterable[PeerAddress] = ()) -> PeerAddress | None:
        """
        The address to dial for the primary link, or None if there is none.
        """
        excluded = set(exclude)
        order = [a for a in self._candidates if a not in excluded]
        if not order:
            return None
        if self._last_choice in order:
            start = order.index(self._last_choice) + 1
            order = order[start:] + order[:start]
        choice = min(order, key=self._rank)
        self._last_choice = choice
        return choice

    def better_than(self, current: PeerAddress, ratio: float,
                    exclude: Iterable[PeerAddress] = ()) -> PeerAddress | None:
        """
        The best measured candidate whose mean RTT is below C{ratio} times
        the current primary's, with no more failures; None if there is none.
        """
        if current not in self._candidates:
            return None
        current_mean = self.mean_rtt(current)
        if current_mean is None:
            return None
        excluded = set(exclude) | {current}
        failures = self.failures(current)
        better = [
            a for a, c in self._candidates.items()
            if a not in excluded and c.failures <= failures
            and c.mean_rtt() is not None and c.mean_rtt() < ratio * current_mean
        ]
        return min(better, key=self._rank) if better else None

    def due_for_probe(self, now: float, retest: float,
                      exclude: Iterable[PeerAddress] = ()) -> list[PeerAddress]:
        """
        Addresses to test with a probe connection: not linked (C{exclude}),
        not probed within C{retest} seconds; never probed ones first.
        """
        excluded = set(exclude)
        due = [c for a, c in self._candidates.items()
               if a not in excluded and (c.last_probe is None or now - c.last_probe >= retest)]
        due.sort(key=lambda c: (c.last_probe is not None, c.last_probe or 0.0))
        return [c.address for c in due]

    def purge(self, now: float, after: float) -> list[PeerAddress]:
        """
        Forget learned addresses that have failed and not succeeded for
        C{after} seconds. Initial addresses are never forgotten.
        """
        gone = [
            a for a, c in self._candidates.items()
            if not c.initial and c.failures > 0
            and now - (c.last_success if c.last_success is not None else c.first_seen) >= after
        ]
        for address in gone:
            del self._candidates[address]
        return gone

    def snapshot(self) -> list[dict]:
        """
        The directory as plain data, for status displays and logs.
        """
        return [
            {
                "address": str(c.address),
                "initial": c.initial,
                "failures": c.failures,
                "node_id": c.node_id,
                "rtt_mean": c.mean_rtt(),
                "rtt_samples": len(c.rtts),
                "last_success": c.last_success,
                "last_probe": c.last_probe,
            }
            for c in self._candidates.values()
        ]


class PrimaryPolicy:
    """
    When to move the primary link: when another candidate's mean RTT has been
    below C{ratio} times the primary's for C{wait} seconds without a break.
    Switching loses nothing: the new link starts by comparing heads.
    """

    def __init__(self, directory: PeerDirectory, wait: float, ratio: float = 0.7) -> None:
        self._directory = directory
        self._wait = wait
        self._ratio = ratio
        self._candidate: PeerAddress | None = None
        self._against: PeerAddress | None = None
        self._since = 0.0

    def consider(self, current: PeerAddress | None, now: float,
                 exclude: Iterable[PeerAddress] = ()) -> PeerAddress | None:
        """
        The address to switch to now, or None to stay.
        """
        better = (self._directory.better_than(current, self._ratio, exclude)
                  if current is not None else None)
        if better is None:
            self._candidate = None
            return None
        if better != self._candidate or current != self._against:
            self._candidate = better
            self._against = current
            self._since = now
        if now - self._since >= self._wait:
            self._candidate = None
            return better
        return None


class ComponentTracker:
    """
    Which nodes share this node's component of the overlay: those whose
    beacons (flooded over every link) arrived recently. A node that is known
    and answers probes but sends no beacons sits in another component, and
    the node with the smaller id links to it to merge them. If that node
    cannot (it does not know this node's address, or cannot reach it), the
    one with the greater id links once the other has been outside for a
    further C{horizon}; a second link between the two costs little, a
    network split for good costs everything.

    At most C{max_nodes} origins are remembered, the least recently heard
    forgotten first, so beacons with made-up origins cannot grow memory.
    """

    def __init__(self, own_id: str, horizon: float, max_nodes: int = 10_000) -> None:
        self._own_id = own_id
        self._horizon = horizon
        self._max_nodes = max_nodes
        self._heard: dict[str, float] = {}
        # Reachable nodes outside the component, and since when; only those
        # of the last call, so no larger than what was reachable then.
        self._outside_since: dict[str, float] = {}

    def heard(self, node_id: str, now: float) -> None:
        # Re-inserted so that the dict stays in order of last hearing.
        self._heard.pop(node_id, None)
        self._heard[node_id] = now
        if len(self._heard) > self._max_nodes:
            del self._heard[next(iter(self._heard))]

    def members(self, now: float) -> set[str]:
        for node_id, when in list(self._heard.items()):
            if now - when > self._horizon:
                del self._heard[node_id]
        return set(self._heard) | {self._own_id}

    def outsiders(self, reachable: dict[str, PeerAddress], now: float) -> list[PeerAddress]:
        """
        Addresses of reachable nodes (id -> address) outside this component
        that this node should link to: at once if it has the smaller id,
        otherwise once the node has been outside for C{horizon} seconds.
        """
        members = self.members(now)
        outside = {node_id: address for node_id, address in reachable.items()
                   if node_id not in members}
        since = {node_id: self._outside_since.get(node_id, now) for node_id in outside}
        self._outside_since = since
        return [address for node_id, address in sorted(outside.items())
                if self._own_id < node_id or now - since[node_id] >= self._horizon]
