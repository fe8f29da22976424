"""
The firewall: per-IP access control for inbound connections, in the spirit of
the JavaScript library node-ip-ac.

This layer owns what a node remembers about the addresses that connect to it:
how many connections each opened since it last authenticated, how many
handshakes or protocol rules it broke recently, which addresses are warned or
blocked and until when, and which IPv6 subnets are blocked because too many
addresses inside them were. It knows nothing of sockets, TLS, the network key
or the wire format; the node tells it what happened (a connection, a hello
accepted, a failure) and asks whether to accept a connection. Time comes from
an injected L{IReactorTime}; nothing is scheduled here, and the node calls
L{Firewall.expire} from its own loop.

Memory is bounded. At most C{max_addresses} addresses are tracked, the least
recently active one is forgotten first (and unblocked if it was blocked), and
each keeps at most C{block_after_failures} failure times. Subnet counters
exist only for the prefixes of blocked addresses, at most C{ipv6_group_depth}
per blocked address. A blocked subnet is kept for C{block_for} seconds. The
heap of block end times holds at most twice the live blocks plus a small
constant: stale entries left by early unblocks are dropped when it grows past
that.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import math
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable, Union

import attrs
from twisted.logger import Logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

log = Logger(namespace="dtable.firewall")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Hook = Callable[["FirewallEvent"], None]

_GROUP_BITS = 16
_IPV6_BITS = 128


@attrs.frozen
class FirewallEvent:
    """
    An address or subnet was blocked or unblocked; given to C{on_block} and
    C{on_unblock}.

    @ivar kind: C{"address"} or C{"subnet"}.
    @ivar address: the IP address, or the subnet in CIDR form (for example
        C{"2001:db8:1:2::/64"}).
    @ivar reason: why, in words (for example C{"600 unauthenticated
        connections"} or C{"block expired"}).
    @ivar until: the clock time when the block ends, or was to end.
    """

    kind: str
    address: str
    reason: str
    until: float


@attrs.frozen
class FirewallCounts:
    """
    How much the firewall tracks, for status pages and tests.

    @ivar total: the addresses tracked.
    @ivar blocked: the addresses blocked (subnets not included).
    @ivar warned: the addresses warned.
    @ivar blocked_subnets: the IPv6 subnets blocked.
    @ivar refused: the connections refused so far.
    """

    total: int
    blocked: int
    warned: int
    blocked_subnets: int
    refused: int


@attrs.frozen
class _Subnet:
    """
    An IPv6 prefix: its length in bits and the integer value of its bits.
    """

    length: int
    prefix: int

    @classmethod
    def of(cls, address: ipaddress.IPv6Address, length: int) -> "_Subnet":
        return cls(length, int(address) >> (_IPV6_BITS - length))

    @property
    def first(self) -> int:
        """
        The integer value of the subnet's first address.
        """
        return self.prefix << (_IPV6_BITS - self.length)

    @property
    def cidr(self) -> str:
        return str(ipaddress.IPv6Network((self.first, self.length)))


@attrs.define
class _Entry:
    """
    What the firewall remembers about one address.

    The failure times are created on the first failure, since most addresses
    never fail and an empty deque costs more than the rest of the entry.
    """

    last_seen: float
    new_connections: int = 0
    warned: bool = False
    failures: deque[float] | None = None
    blocked_until: float | None = None
    would_have_blocked: bool = False


def _address(host: str) -> IPAddress:
    """
    The address that C{host} names, normalised for counting: an IPv4-mapped
    IPv6 address is its IPv4 address and an IPv6 zone is dropped.

    @raise ValueError: if C{host} is not an IP address.
    """
    if not isinstance(host, str):
        raise ValueError(f"host must be an IP address string, not {host!r}")
    text = host.partition("%")[0] if ":" in host else host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> int:
    if not (_is_int(value) and value > 0):
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


def _positive_seconds(name: str, value: Any) -> float:
    if not (
        (_is_int(value) or isinstance(value, float))
        and value > 0
        and math.isfinite(value)
    ):
        raise ValueError(
            f"{name} must be a positive finite number of seconds, not {value!r}"
        )
    return float(value)


def _check_hook(name: str, hook: Any) -> Any:
    if hook is not None and not callable(hook):
        raise TypeError(f"{name} must be callable or None, not {hook!r}")
    return hook


class Firewall:
    """
    Counts new connections and failures per address and blocks the addresses,
    and IPv6 subnets, that pass the thresholds.

    Every call first forgets what has expired, so its answers are current;
    L{expire} exists so that blocks end, and C{on_unblock} runs, on time when
    there is no traffic.

    The hooks run after the firewall's state is updated, outside any of its
    loops, so they may call back into it; an exception from a hook is logged
    and does not stop the firewall.
    """

    def __init__(
        self,
        clock: "IReactorTime",
        *,
        warn_after_new_connections: int = 80,
        block_after_new_connections: int = 600,
        block_after_failures: int = 30,
        block_for: float = 3600.0,
        ipv6_group_depth: int = 4,
        ipv6_subnet_breach: int = 40,
        never_block: bool = False,
        max_addresses: int = 100_000,
        on_block: Hook | None = None,
        on_unblock: Hook | None = None,
    ) -> None:
        """
        @param clock: where the time comes from.
        @param warn_after_new_connections: warn an address (once, logged)
            when it has opened this many connections since it last
            authenticated.
        @param block_after_new_connections: block an address when it has
            opened this many connections since it last authenticated.
        @param block_after_failures: block an address when this many of its
            failures fall within C{block_for} seconds.
        @param block_for: how long a block lasts, in seconds; also how long a
            failure counts and how long an idle address is remembered.
        @param ipv6_group_depth: how many levels of IPv6 subnets to block, in
            16-bit groups from the left: 4 blocks /64, /48, /32 and /16.
        @param ipv6_subnet_breach: a /64 (at depth 4) is blocked when this
            many addresses inside it are blocked, each level above it when
            C{ipv6_subnet_breach} times as many are.
        @param never_block: count and warn, but only log what would have
            been blocked.
        @param max_addresses: the most addresses tracked at once.
        @param on_block: called with a L{FirewallEvent} when an address or
            subnet is blocked.
        @param on_unblock: called with a L{FirewallEvent} when an address or
            subnet is unblocked.
        @raise ValueError: naming the argument that is out of range.
        @raise TypeError: if a hook is not callable.
        """
        if not (_is_int(ipv6_group_depth) and 1 <= ipv6_group_depth <= 8):
            raise ValueError(
                f"ipv6_group_depth must be an integer 1-8, not {ipv6_group_depth!r}"
            )
        depth = ipv6_group_depth
        breach = _positive_int("ipv6_subnet_breach", ipv6_subnet_breach)
        self._clock = clock
        self._warn_after = _positive_int(
            "warn_after_new_connections", warn_after_new_connections
        )
        self._block_after = _positive_int(
            "block_after_new_connections", block_after_new_connections
        )
        self._block_after_failures = _positive_int(
            "block_after_failures", block_after_failures
        )
        self._block_for = _positive_seconds("block_for", block_for)
        self._never_block = bool(never_block)
        self._max_addresses = _positive_int("max_addresses", max_addresses)
        self._on_block = _check_hook("on_block", on_block)
        self._on_unblock = _check_hook("on_unblock", on_unblock)

        # (prefix length, blocked addresses needed), the longest prefix first.
        self._subnet_levels = [
            (_GROUP_BITS * level, breach ** (depth - level + 1))
            for level in range(depth, 0, -1)
        ]
        # Least recently active first.
        self._entries: OrderedDict[IPAddress, _Entry] = OrderedDict()
        self._blocked: set[IPAddress] = set()
        self._warned = 0
        self._refused = 0
        self._blocked_in_subnet: dict[_Subnet, int] = {}
        self._blocked_subnets: dict[_Subnet, float] = {}
        # (until, sequence, address or subnet); stale items are skipped.
        self._block_ends: list[tuple[float, int, IPAddress | _Subnet]] = []
        self._sequence = itertools.count()
        self._hook_calls: deque[tuple[str, Hook, FirewallEvent]] = deque()
        self._calling_hooks = False

    # The node's calls.

    def connection(self, host: str) -> bool:
        """
        A new inbound connection from C{host} is being accepted.

        A connection from a blocked address, or from inside a blocked IPv6
        subnet, is refused and counted in L{FirewallCounts.refused}. Any
        other counts as one unauthenticated new connection: the address is
        warned when the count reaches C{warn_after_new_connections}, and
        blocked when it reaches C{block_after_new_connections}, in which
        case this connection is refused too.

        @param host: the peer's IP address.
        @return: False to refuse the connection.
        @raise ValueError: if C{host} is not an IP address.
        """
        address = _address(host)
        now = self._clock.seconds()
        self._expire(now)
        entry = self._entries.get(address)
        if entry is not None and entry.blocked_until is not None:
            self._touch(address, entry, now)
            self._refused += 1
            self._call_hooks()
            return False
        if self._blocked_subnet(address) is not None:
            self._refused += 1
            self._call_hooks()
            return False
        entry = self._activity(address, now)
        entry.new_connections += 1
        count = entry.new_connections
        if count >= self._warn_after and not entry.warned:
            entry.warned = True
            self._warned += 1
            log.warn(
                "Firewall warns {address}: {reason}",
                address=str(address),
                reason=f"{count} unauthenticated connections",
            )
        allowed = True
        if count >= self._block_after:
            if self._block(address, entry, now, f"{count} unauthenticated connections"):
                self._refused += 1
                allowed = False
        self._call_hooks()
        return allowed

    def authenticated(self, host: str) -> None:
        """
        The peer at C{host} proved it holds the network key (its hello was
        accepted): its new-connection count and its warning start again. Its
        failures are kept.

        @param host: the peer's IP address.
        @raise ValueError: if C{host} is not an IP address.
        """
        address = _address(host)
        now = self._clock.seconds()
        self._expire(now)
        entry = self._entries.get(address)
        if entry is not None:
            self._touch(address, entry, now)
            entry.new_connections = 0
            self._clear_warning(entry)
        self._call_hooks()

    def failure(self, host: str, reason: str) -> None:
        """
        A failed handshake or a protocol violation from C{host}.

        The address is blocked when C{block_after_failures} failures fall
        within the last C{block_for} seconds.

        @param host: the peer's IP address.
        @param reason: what went wrong, for the log.
        @raise ValueError: if C{host} is not an IP address.
        """
        address = _address(host)
        now = self._clock.seconds()
        self._expire(now)
        entry = self._activity(address, now)
        if entry.failures is None:
            entry.failures = deque(maxlen=self._block_after_failures)
        entry.failures.append(now)
        count = self._failures_in_window(entry, now)
        if count >= self._block_after_failures and entry.blocked_until is None:
            self._block(
                address,
                entry,
                now,
                f"{count} failed handshakes or protocol violations",
                last_failure=reason,
            )
        self._call_hooks()

    def expire(self) -> None:
        """
        Forget what has expired: blocks end C{block_for} seconds after they
        began (calling C{on_unblock} for each), and an unblocked address with
        no activity for C{block_for} seconds is forgotten with its failures.

        Failures of an address that is still active leave the window when
        they are next counted. The cost is proportional to what expires,
        not to what is tracked.
        """
        now = self._clock.seconds()
        self._expire(now)
        self._call_hooks()

    def unblock(self, host_or_subnet: str) -> bool:
        """
        The operator's override: unblock an address, or an IPv6 subnet given
        in CIDR form. The address's counts start again. Unblocking a subnet
        leaves the addresses blocked inside it blocked, and the subnet is
        blocked again if one more address inside it is blocked while enough
        are.

        @param host_or_subnet: an IP address or a CIDR subnet.
        @return: True if something was unblocked.
        @raise ValueError: if C{host_or_subnet} is neither.
        """
        now = self._clock.seconds()
        self._expire(now)
        if isinstance(host_or_subnet, str) and "/" in host_or_subnet:
            try:
                network = ipaddress.ip_network(host_or_subnet, strict=False)
            except ValueError:
                raise ValueError(f"{host_or_subnet!r} is not an IP subnet") from None
            unblocked = False
            if isinstance(network, ipaddress.IPv6Network):
                subnet = _Subnet.of(network.network_address, network.prefixlen)
                if subnet in self._blocked_subnets:
                    self._unblock_subnet(subnet, now, "unblocked by the operator")
                    unblocked = True
        else:
            address = _address(host_or_subnet)
            entry = self._entries.get(address)
            unblocked = entry is not None and entry.blocked_until is not None
            if unblocked:
                self._unblock_address(address, entry, now, "unblocked by the operator")
        self._call_hooks()
        return unblocked

    # Questions.

    def is_blocked(self, host: str) -> bool:
        """
        @param host: an IP address.
        @return: True if connections from C{host} are refused: the address,
            or an IPv6 subnet holding it, is blocked.
        @raise ValueError: if C{host} is not an IP address.
        """
        address = _address(host)
        now = self._clock.seconds()
        self._expire(now)
        entry = self._entries.get(address)
        blocked = (
            entry is not None and entry.blocked_until is not None
        ) or self._blocked_subnet(address) is not None
        self._call_hooks()
        return blocked

    def details(self, host: str) -> dict[str, Any] | None:
        """
        What the firewall remembers about C{host}.

        @param host: an IP address.
        @return: None if the address is not tracked; otherwise a dict with
            C{address} (normalised), C{new_connections} (since it last
            authenticated), C{failures} (within the window), C{warned},
            C{blocked} and C{blocked_until} (the address's own block: a
            float or None), C{blocked_subnet} (the CIDR of a blocked subnet
            holding it, or None) and C{last_seen} (clock time of its last
            activity).
        @raise ValueError: if C{host} is not an IP address.
        """
        address = _address(host)
        now = self._clock.seconds()
        self._expire(now)
        entry = self._entries.get(address)
        if entry is None:
            self._call_hooks()
            return None
        subnet = self._blocked_subnet(address)
        result = {
            "address": str(address),
            "new_connections": entry.new_connections,
            "failures": self._failures_in_window(entry, now),
            "warned": entry.warned,
            "blocked": entry.blocked_until is not None,
            "blocked_until": entry.blocked_until,
            "blocked_subnet": None if subnet is None else subnet.cidr,
            "last_seen": entry.last_seen,
        }
        self._call_hooks()
        return result

    def counts(self) -> FirewallCounts:
        """
        @return: how many addresses are tracked, blocked and warned, how
            many subnets are blocked and how many connections were refused.
        """
        now = self._clock.seconds()
        self._expire(now)
        counts = FirewallCounts(
            total=len(self._entries),
            blocked=len(self._blocked),
            warned=self._warned,
            blocked_subnets=len(self._blocked_subnets),
            refused=self._refused,
        )
        self._call_hooks()
        return counts

    def blocked_addresses(self) -> list[str]:
        """
        @return: the blocked addresses in order, then the blocked subnets in
            CIDR form, in order.
        """
        now = self._clock.seconds()
        self._expire(now)
        addresses = sorted(self._blocked, key=lambda a: (a.version, int(a)))
        subnets = sorted(self._blocked_subnets, key=lambda s: (s.first, s.length))
        result = [str(address) for address in addresses]
        result.extend(subnet.cidr for subnet in subnets)
        self._call_hooks()
        return result

    # Time and tracking.

    def _expire(self, now: float) -> None:
        """
        End the blocks that are over by C{now} and forget the entries idle
        since C{block_for} before it.
        """
        block_ends = self._block_ends
        while block_ends and block_ends[0][0] <= now:
            item = heapq.heappop(block_ends)
            if not self._is_live(item):
                continue
            target = item[2]
            if isinstance(target, _Subnet):
                self._unblock_subnet(target, now, "block expired")
            else:
                entry = self._entries[target]
                self._unblock_address(target, entry, now, "block expired")
        # Entries are in order of last activity, and a blocked entry's block
        # ends no later than block_for after its last activity, so the idle
        # ones are all at the front.
        idle_since = now - self._block_for
        entries = self._entries
        while entries:
            address, entry = next(iter(entries.items()))
            if entry.blocked_until is not None or entry.last_seen > idle_since:
                break
            self._forget(address, entry)

    def _activity(self, address: IPAddress, now: float) -> _Entry:
        """
        The entry for C{address}, created if need be, marked active now.
        """
        entry = self._entries.get(address)
        if entry is not None:
            self._touch(address, entry, now)
            return entry
        while len(self._entries) >= self._max_addresses:
            oldest, oldest_entry = next(iter(self._entries.items()))
            if oldest_entry.blocked_until is not None:
                reason = f"forgotten to track at most {self._max_addresses} addresses"
                self._unblock_address(oldest, oldest_entry, now, reason)
            self._forget(oldest, oldest_entry)
        entry = self._entries[address] = _Entry(last_seen=now)
        return entry

    def _touch(self, address: IPAddress, entry: _Entry, now: float) -> None:
        entry.last_seen = now
        self._entries.move_to_end(address)

    def _forget(self, address: IPAddress, entry: _Entry) -> None:
        self._clear_warning(entry)
        del self._entries[address]

    def _clear_warning(self, entry: _Entry) -> None:
        if entry.warned:
            entry.warned = False
            self._warned -= 1

    def _failures_in_window(self, entry: _Entry, now: float) -> int:
        failures = entry.failures
        if failures is None:
            return 0
        while failures and failures[0] <= now - self._block_for:
            failures.popleft()
        return len(failures)

    def _blocked_subnet(self, address: IPAddress) -> _Subnet | None:
        if not self._blocked_subnets or not isinstance(address, ipaddress.IPv6Address):
            return None
        for length, _ in self._subnet_levels:
            subnet = _Subnet.of(address, length)
            if subnet in self._blocked_subnets:
                return subnet
        return None

    # Blocking and unblocking.

    def _block(
        self,
        address: IPAddress,
        entry: _Entry,
        now: float,
        reason: str,
        last_failure: str | None = None,
    ) -> bool:
        """
        Block C{address}, and the IPv6 subnets that this block breaches.

        @return: False if C{never_block} kept it unblocked.
        """
        if self._never_block:
            if not entry.would_have_blocked:
                entry.would_have_blocked = True
                log.warn(
                    "Firewall would block {address} for {seconds:g} seconds"
                    " but never_block is set: {reason}",
                    address=str(address),
                    reason=reason,
                    seconds=self._block_for,
                    last_failure=last_failure,
                )
            return False
        until = now + self._block_for
        entry.blocked_until = until
        self._blocked.add(address)
        self._schedule_end(until, address)
        log.warn(
            "Firewall blocks {address} for {seconds:g} seconds: {reason}",
            kind="address",
            address=str(address),
            reason=reason,
            seconds=self._block_for,
            last_failure=last_failure,
        )
        self._queue_hook(
            "on_block", FirewallEvent("address", str(address), reason, until)
        )
        if isinstance(address, ipaddress.IPv6Address):
            for length, needed in self._subnet_levels:
                subnet = _Subnet.of(address, length)
                count = self._blocked_in_subnet.get(subnet, 0) + 1
                self._blocked_in_subnet[subnet] = count
                if count >= needed and subnet not in self._blocked_subnets:
                    why = f"{count} blocked addresses in {subnet.cidr}"
                    self._block_subnet(subnet, now, why)
        return True

    def _block_subnet(self, subnet: _Subnet, now: float, reason: str) -> None:
        until = now + self._block_for
        self._blocked_subnets[subnet] = until
        self._schedule_end(until, subnet)
        log.warn(
            "Firewall blocks {address} for {seconds:g} seconds: {reason}",
            kind="subnet",
            address=subnet.cidr,
            reason=reason,
            seconds=self._block_for,
        )
        self._queue_hook(
            "on_block", FirewallEvent("subnet", subnet.cidr, reason, until)
        )

    def _unblock_address(
        self, address: IPAddress, entry: _Entry, now: float, reason: str
    ) -> None:
        """
        End the block of C{address}; its counts start again.
        """
        until = entry.blocked_until
        assert until is not None
        entry.blocked_until = None
        entry.new_connections = 0
        entry.failures = None
        self._clear_warning(entry)
        self._blocked.discard(address)
        if isinstance(address, ipaddress.IPv6Address):
            for length, _ in self._subnet_levels:
                subnet = _Subnet.of(address, length)
                count = self._blocked_in_subnet[subnet] - 1
                if count:
                    self._blocked_in_subnet[subnet] = count
                else:
                    del self._blocked_in_subnet[subnet]
        self._log_unblock("address", str(address), now, reason, until)

    def _unblock_subnet(self, subnet: _Subnet, now: float, reason: str) -> None:
        until = self._blocked_subnets.pop(subnet)
        self._log_unblock("subnet", subnet.cidr, now, reason, until)

    def _log_unblock(
        self, kind: str, address: str, now: float, reason: str, until: float
    ) -> None:
        log.info(
            "Firewall unblocks {address} after {seconds:g} seconds: {reason}",
            kind=kind,
            address=address,
            reason=reason,
            seconds=now - (until - self._block_for),
        )
        self._queue_hook("on_unblock", FirewallEvent(kind, address, reason, until))

    def _schedule_end(self, until: float, target: IPAddress | _Subnet) -> None:
        block_ends = self._block_ends
        heapq.heappush(block_ends, (until, next(self._sequence), target))
        live = len(self._blocked) + len(self._blocked_subnets)
        if len(block_ends) > 2 * live + 64:
            # Early unblocks left stale items behind; keep only live ones.
            block_ends[:] = [item for item in block_ends if self._is_live(item)]
            heapq.heapify(block_ends)

    def _is_live(self, item: tuple[float, int, IPAddress | _Subnet]) -> bool:
        """
        True if a heap item still marks the end of a block.
        """
        until, _, target = item
        if isinstance(target, _Subnet):
            return self._blocked_subnets.get(target) == until
        entry = self._entries.get(target)
        return entry is not None and entry.blocked_until == until

    # Hooks.

    def _queue_hook(self, name: str, event: FirewallEvent) -> None:
        hook = self._on_block if name == "on_block" else self._on_unblock
        if hook is not None:
            self._hook_calls.append((name, hook, event))

    def _call_hooks(self) -> None:
        """
        Call the queued hooks, unless a hook is already running: then the
        outer call runs them when that hook returns.
        """
        if self._calling_hooks:
            return
        self._calling_hooks = True
        try:
            while self._hook_calls:
                name, hook, event = self._hook_calls.popleft()
                try:
                    hook(event)
                except Exception:
                    log.failure(
                        "Firewall {hook} hook failed for {address}",
                        hook=name,
                        address=event.address,
                    )
        finally:
            self._calling_hooks = False
