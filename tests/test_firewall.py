"""
Tests for L{dtable.firewall}: per-IP counting, warning and blocking of inbound
connections, IPv6 subnet blocks, expiry and the memory bound.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from dtable.firewall import Firewall, FirewallCounts, FirewallEvent

HOUR = 3600.0


class FirewallTestCase(SynchronousTestCase):
    """
    A clock, the hooks' events and the firewall's log events.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.blocks: list[FirewallEvent] = []
        self.unblocks: list[FirewallEvent] = []
        self.log_events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "dtable.firewall":
                self.log_events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def firewall(self, **kwargs: Any) -> Firewall:
        kwargs.setdefault("on_block", self.blocks.append)
        kwargs.setdefault("on_unblock", self.unblocks.append)
        return Firewall(self.clock, **kwargs)

    def logged(self, level: LogLevel) -> list[str]:
        """
        The firewall's log lines at C{level}, formatted.
        """
        return [formatEvent(e) for e in self.log_events if e["log_level"] == level]

    def block_by_failure(self, firewall: Firewall, *hosts: str) -> None:
        """
        Block C{hosts} with a firewall that blocks after one failure.
        """
        for host in hosts:
            firewall.failure(host, "bad hello")
            self.assertTrue(firewall.is_blocked(host), host)


class WarningTests(FirewallTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.fw = self.firewall(
            warn_after_new_connections=5, block_after_new_connections=100
        )

    def test_warned_at_threshold(self) -> None:
        """
        The address is warned on its Nth connection, not its (N-1)th, and
        the warning is logged once.
        """
        for _ in range(4):
            self.assertTrue(self.fw.connection("192.0.2.1"))
        self.assertFalse(self.fw.details("192.0.2.1")["warned"])
        self.assertEqual(self.fw.counts().warned, 0)
        self.assertEqual(self.logged(LogLevel.warn), [])

        self.assertTrue(self.fw.connection("192.0.2.1"))
        self.assertTrue(self.fw.details("192.0.2.1")["warned"])
        self.assertEqual(self.fw.counts().warned, 1)
        self.assertEqual(
            self.logged(LogLevel.warn),
            ["Firewall warns 192.0.2.1: 5 unauthenticated connections"],
        )
        [event] = self.log_events
        self.assertEqual(event["address"], "192.0.2.1")
        self.assertEqual(event["reason"], "5 unauthenticated connections")

        for _ in range(10):
            self.assertTrue(self.fw.connection("192.0.2.1"))
        self.assertEqual(len(self.logged(LogLevel.warn)), 1)
        self.assertEqual(self.fw.counts().warned, 1)
        self.assertEqual(self.blocks, [])

    def test_authenticated_resets_count_and_warning(self) -> None:
        for _ in range(7):
            self.fw.connection("192.0.2.1")
        self.fw.authenticated("192.0.2.1")
        details = self.fw.details("192.0.2.1")
        self.assertEqual(details["new_connections"], 0)
        self.assertFalse(details["warned"])
        self.assertEqual(self.fw.counts().warned, 0)

        for _ in range(4):
            self.fw.connection("192.0.2.1")
        self.assertFalse(self.fw.details("192.0.2.1")["warned"])
        self.fw.connection("192.0.2.1")
        self.assertTrue(self.fw.details("192.0.2.1")["warned"])
        self.assertEqual(len(self.logged(LogLevel.warn)), 2)

    def test_authenticated_unknown_address(self) -> None:
        """
        Authenticating an address the firewall does not track tracks nothing.
        """
        self.fw.authenticated("192.0.2.1")
        self.assertIsNone(self.fw.details("192.0.2.1"))
        self.assertEqual(self.fw.counts().total, 0)


class ConnectionBlockTests(FirewallTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.fw = self.firewall(
            warn_after_new_connections=5, block_after_new_connections=10
        )

    def test_blocked_at_threshold(self) -> None:
        """
        The Mth unauthenticated connection blocks the address and is refused;
        so are the connections after it.
        """
        for _ in range(9):
            self.assertTrue(self.fw.connection("192.0.2.1"))
        self.assertFalse(self.fw.is_blocked("192.0.2.1"))
        self.assertFalse(self.fw.connection("192.0.2.1"))
        self.assertTrue(self.fw.is_blocked("192.0.2.1"))
        self.assertEqual(self.fw.counts().refused, 1)
        self.assertFalse(self.fw.connection("192.0.2.1"))
        self.assertFalse(self.fw.connection("192.0.2.1"))
        self.assertEqual(self.fw.counts().refused, 3)
        self.assertEqual(self.fw.counts().blocked, 1)

        reason = "10 unauthenticated connections"
        self.assertEqual(
            self.blocks, [FirewallEvent("address", "192.0.2.1", reason, HOUR)]
        )
        details = self.fw.details("192.0.2.1")
        self.assertTrue(details["blocked"])
        self.assertEqual(details["blocked_until"], HOUR)
        self.assertEqual(details["new_connections"], 10)
        self.assertEqual(self.fw.blocked_addresses(), ["192.0.2.1"])

        self.assertEqual(
            self.logged(LogLevel.warn),
            [
                "Firewall warns 192.0.2.1: 5 unauthenticated connections",
                f"Firewall blocks 192.0.2.1 for 3600 seconds: {reason}",
            ],
        )
        block = self.log_events[-1]
        self.assertEqual(block["address"], "192.0.2.1")
        self.assertEqual(block["reason"], reason)
        self.assertEqual(block["seconds"], HOUR)

    def test_other_addresses_allowed(self) -> None:
        for _ in range(10):
            self.fw.connection("192.0.2.1")
        self.assertTrue(self.fw.connection("192.0.2.2"))
        self.assertFalse(self.fw.is_blocked("192.0.2.2"))

    def test_authenticating_before_threshold_prevents_block(self) -> None:
        for _ in range(3):
            for _ in range(9):
                self.assertTrue(self.fw.connection("192.0.2.1"))
            self.fw.authenticated("192.0.2.1")
        self.assertFalse(self.fw.is_blocked("192.0.2.1"))
        self.assertEqual(self.blocks, [])


class FailureTests(FirewallTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.fw = self.firewall(block_after_failures=3, block_for=100.0)

    def test_blocked_after_failures(self) -> None:
        self.fw.failure("192.0.2.1", "bad hello")
        self.fw.failure("192.0.2.1", "bad hello")
        self.assertFalse(self.fw.is_blocked("192.0.2.1"))
        self.assertEqual(self.fw.details("192.0.2.1")["failures"], 2)
        self.fw.failure("192.0.2.1", "frame too long")
        self.assertTrue(self.fw.is_blocked("192.0.2.1"))
        self.assertFalse(self.fw.connection("192.0.2.1"))

        reason = "3 failed handshakes or protocol violations"
        self.assertEqual(
            self.blocks, [FirewallEvent("address", "192.0.2.1", reason, 100.0)]
        )
        [block] = self.log_events
        self.assertEqual(block["log_level"], LogLevel.warn)
        self.assertEqual(block["reason"], reason)
        self.assertEqual(block["last_failure"], "frame too long")
        self.assertEqual(block["seconds"], 100.0)

    def test_authenticated_keeps_failures(self) -> None:
        self.fw.connection("192.0.2.1")
        self.fw.failure("192.0.2.1", "bad hello")
        self.fw.failure("192.0.2.1", "bad hello")
        self.fw.authenticated("192.0.2.1")
        self.assertEqual(self.fw.details("192.0.2.1")["failures"], 2)
        self.fw.failure("192.0.2.1", "bad hello")
        self.assertTrue(self.fw.is_blocked("192.0.2.1"))

    def test_failures_leave_the_window(self) -> None:
        """
        A failure counts for block_for seconds.
        """
        self.fw.failure("192.0.2.1", "bad hello")
        self.clock.advance(50)
        self.fw.failure("192.0.2.1", "bad hello")
        self.clock.advance(49)
        self.assertEqual(self.fw.details("192.0.2.1")["failures"], 2)
        self.clock.advance(1)
        self.assertEqual(self.fw.details("192.0.2.1")["failures"], 1)
        self.fw.failure("192.0.2.1", "bad hello")
        self.assertFalse(self.fw.is_blocked("192.0.2.1"))
        self.clock.advance(49)
        self.fw.failure("192.0.2.1", "bad hello")
        # The failures at 50, 100 and 149 are within 100 seconds.
        self.assertTrue(self.fw.is_blocked("192.0.2.1"))

    def test_failures_bounded(self) -> None:
        """
        Only the last block_after_failures failures are kept.
        """
        fw = self.firewall(block_after_failures=3, never_block=True)
        for _ in range(100):
            fw.failure("192.0.2.1", "bad hello")
        self.assertEqual(fw.details("192.0.2.1")["failures"], 3)


class ExpiryTests(FirewallTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.fw = self.firewall(
            warn_after_new_connections=2,
            block_after_new_connections=5,
            block_after_failures=1,
            block_for=100.0,
        )

    def test_block_expires(self) -> None:
        """
        A block ends block_for seconds after it began; the address's counts
        start again.
        """
        for _ in range(3):
            self.fw.connection("192.0.2.1")
        self.fw.failure("192.0.2.1", "bad hello")
        self.clock.advance(50)
        self.assertFalse(self.fw.connection("192.0.2.1"))
        self.clock.advance(49)
        self.fw.expire()
        self.assertTrue(self.fw.is_blocked("192.0.2.1"))
        self.assertEqual(self.unblocks, [])

        self.clock.advance(1)
        self.fw.expire()
        self.assertEqual(
            self.unblocks,
            [FirewallEvent("address", "192.0.2.1", "block expired", 100.0)],
        )
        self.assertEqual(
            self.logged(LogLevel.info),
            ["Firewall unblocks 192.0.2.1 after 100 seconds: block expired"],
        )
        self.assertEqual(
            self.fw.details("192.0.2.1"),
            {
                "address": "192.0.2.1",
                "new_connections": 0,
                "failures": 0,
                "warned": False,
                "blocked": False,
                "blocked_until": None,
                "blocked_subnet": None,
                "last_seen": 50.0,
            },
        )
        self.assertEqual(self.fw.counts(), FirewallCounts(1, 0, 0, 0, 1))
        self.assertTrue(self.fw.connection("192.0.2.1"))
        self.assertEqual(self.fw.details("192.0.2.1")["new_connections"], 1)

    def test_block_ends_without_expire(self) -> None:
        """
        Every call sees the blocks that are over as over, even if the node
        has not called expire().
        """
        self.fw.failure("192.0.2.1", "bad hello")
        self.clock.advance(100)
        self.assertTrue(self.fw.connection("192.0.2.1"))
        self.assertEqual(len(self.unblocks), 1)

    def test_idle_address_forgotten(self) -> None:
        self.fw.connection("192.0.2.1")
        self.fw.connection("192.0.2.1")
        self.assertEqual(self.fw.counts().warned, 1)
        self.clock.advance(99)
        self.fw.expire()
        self.assertEqual(self.fw.counts().total, 1)
        self.clock.advance(1)
        self.fw.expire()
        self.assertEqual(self.fw.counts(), FirewallCounts(0, 0, 0, 0, 0))
        self.assertIsNone(self.fw.details("192.0.2.1"))

    def test_activity_keeps_address(self) -> None:
        self.fw.connection("192.0.2.1")
        self.fw.connection("192.0.2.2")
        self.clock.advance(60)
        self.fw.authenticated("192.0.2.1")
        self.clock.advance(60)
        self.fw.expire()
        self.assertIsNotNone(self.fw.details("192.0.2.1"))
        self.assertIsNone(self.fw.details("192.0.2.2"))
        self.clock.advance(40)
        self.fw.expire()
        self.assertIsNone(self.fw.details("192.0.2.1"))

    def test_blocked_address_forgotten_after_block(self) -> None:
        """
        A blocked address with no activity is unblocked, then forgotten.
        """
        self.fw.failure("192.0.2.1", "bad hello")
        self.clock.advance(99)
        self.fw.expire()
        self.assertEqual(self.fw.counts().total, 1)
        self.clock.advance(1)
        self.fw.expire()
        self.assertEqual(self.fw.counts(), FirewallCounts(0, 0, 0, 0, 0))
        self.assertEqual(len(self.unblocks), 1)

    def test_many_early_unblocks(self) -> None:
        """
        Blocks lifted early by the operator do not disturb the expiry of the
        ones that remain.
        """
        self.fw.failure("198.51.100.1", "bad hello")
        for i in range(500):
            host = f"10.0.{i // 256}.{i % 256}"
            self.fw.failure(host, "bad hello")
            self.assertTrue(self.fw.unblock(host))
        self.assertEqual(self.fw.blocked_addresses(), ["198.51.100.1"])
        self.clock.advance(100)
        self.fw.expire()
        self.assertEqual(self.fw.blocked_addresses(), [])
        self.assertEqual(self.unblocks[-1].address, "198.51.100.1")
        self.assertEqual(self.unblocks[-1].reason, "block expired")


class NormalisationTests(FirewallTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.fw = self.firewall()

    def test_ipv4_mapped(self) -> None:
        self.fw.connection("::ffff:192.0.2.1")
        self.fw.connection("192.0.2.1")
        self.fw.connection("::ffff:c000:201")
        self.assertEqual(self.fw.details("192.0.2.1")["new_connections"], 3)
        self.assertEqual(self.fw.details("::ffff:192.0.2.1")["address"], "192.0.2.1")
        self.assertEqual(self.fw.counts().total, 1)

    def test_ipv6_spellings(self) -> None:
        self.fw.connection("2001:db8::1")
        self.fw.connection("2001:0db8:0000:0000:0000:0000:0000:0001")
        self.fw.connection("2001:DB8:0::0:1")
        self.assertEqual(self.fw.details("2001:db8::1")["new_connections"], 3)
        self.assertEqual(self.fw.counts().total, 1)

    def test_zone_dropped(self) -> None:
        self.fw.connection("fe80::1%eth0")
        self.fw.connection("fe80::1%2")
        self.fw.connection("fe80::1")
        self.assertEqual(self.fw.details("fe80::1%eth1")["new_connections"], 3)
        self.assertEqual(self.fw.details("fe80::1")["address"], "fe80::1")
        self.assertEqual(self.fw.counts().total, 1)

    def test_unblock_any_spelling(self) -> None:
        fw = self.firewall(block_after_failures=1)
        self.block_by_failure(fw, "192.0.2.1")
        self.assertTrue(fw.unblock("::ffff:192.0.2.1"))
        self.assertFalse(fw.is_blocked("192.0.2.1"))

    def test_not_an_ip_address(self) -> None:
        calls = [
            self.fw.connection,
            self.fw.authenticated,
            lambda host: self.fw.failure(host, "bad hello"),
            self.fw.is_blocked,
            self.fw.details,
            self.fw.unblock,
        ]
        hosts = [
            "example.com",
            "",
            "192.0.2",
            "192.0.2.1:80",
            "192.0.2.1%eth0",
            "[2001:db8::1]",
            "2001:db8::1::2",
        ]
        for call in calls:
            for host in hosts:
                error = self.assertRaises(ValueError, call, host)
                self.assertEqual(str(error), f"{host!r} is not an IP address")
        error = self.assertRaises(ValueError, self.fw.connection, 3232235521)
        self.assertIn("IP address string", str(error))
        self.assertRaises(ValueError, self.fw.unblock, "2001:db8::/200")
        self.assertEqual(self.fw.counts(), FirewallCounts(0, 0, 0, 0, 0))


class SubnetTests(FirewallTestCase):
    def test_slash64_blocked_at_breach(self) -> None:
        """
        With the defaults, 40 blocked addresses in a /64 block the /64: a
        fresh address inside it is refused, one in the next /64 is not.
        """
        fw = self.firewall(block_after_failures=1)
        self.block_by_failure(fw, *(f"2001:db8:1:2::{i:x}" for i in range(1, 40)))
        self.assertEqual(fw.counts().blocked_subnets, 0)
        self.assertTrue(fw.connection("2001:db8:1:2::ffff"))

        self.block_by_failure(fw, "2001:db8:1:2::ff")
        cidr = "2001:db8:1:2::/64"
        self.assertEqual(
            self.blocks[-2:],
            [
                FirewallEvent(
                    "address",
                    "2001:db8:1:2::ff",
                    "1 failed handshakes or protocol violations",
                    HOUR,
                ),
                FirewallEvent("subnet", cidr, f"40 blocked addresses in {cidr}", HOUR),
            ],
        )
        self.assertEqual(
            self.logged(LogLevel.warn)[-1],
            f"Firewall blocks {cidr} for 3600 seconds: 40 blocked addresses in {cidr}",
        )
        self.assertEqual(self.log_events[-1]["kind"], "subnet")
        self.assertEqual(fw.counts().blocked_subnets, 1)
        self.assertEqual(fw.counts().blocked, 40)

        self.assertFalse(fw.connection("2001:db8:1:2::ffff"))
        self.assertFalse(fw.connection("2001:db8:1:2:abcd::1"))
        self.assertTrue(fw.is_blocked("2001:db8:1:2::1234"))
        self.assertEqual(fw.details("2001:db8:1:2::ffff")["blocked_subnet"], cidr)
        self.assertFalse(fw.details("2001:db8:1:2::ffff")["blocked"])
        self.assertEqual(fw.counts().refused, 2)
        self.assertTrue(fw.connection("2001:db8:1:3::1"))
        self.assertFalse(fw.is_blocked("2001:db8:1:3::1"))
        self.assertEqual(fw.blocked_addresses()[-1], cidr)

    def test_refused_in_subnet_not_tracked(self) -> None:
        fw = self.firewall(block_after_failures=1, ipv6_subnet_breach=2)
        self.block_by_failure(fw, "2001:db8:1:2::1", "2001:db8:1:2::2")
        for i in range(100):
            self.assertFalse(fw.connection(f"2001:db8:1:2::1:{i:x}"))
        self.assertEqual(fw.counts(), FirewallCounts(2, 2, 0, 1, 100))

    def test_levels_multiply(self) -> None:
        """
        With breach 2 and depth 4 a /64 is blocked at 2 blocked addresses, a
        /48 at 4 and a /32 at 8.
        """
        fw = self.firewall(block_after_failures=1, ipv6_subnet_breach=2)
        self.block_by_failure(fw, "2001:db8:1:1::1", "2001:db8:1:1::2")
        self.block_by_failure(fw, "2001:db8:1:2::1")
        self.assertEqual(fw.counts().blocked_subnets, 1)
        self.assertTrue(fw.connection("2001:db8:1:3::1"))

        self.block_by_failure(fw, "2001:db8:1:2::2")
        self.assertEqual(
            [event.address for event in self.blocks if event.kind == "subnet"],
            ["2001:db8:1:1::/64", "2001:db8:1:2::/64", "2001:db8:1::/48"],
        )
        self.assertEqual(
            self.blocks[-1].reason, "4 blocked addresses in 2001:db8:1::/48"
        )
        self.assertFalse(fw.connection("2001:db8:1:3::2"))
        self.assertFalse(fw.connection("2001:db8:1:ffff::1"))
        self.assertTrue(fw.connection("2001:db8:2::1"))
        self.assertTrue(fw.connection("2001:db9::1"))

        self.block_by_failure(
            fw, "2001:db8:2:1::1", "2001:db8:2:1::2", "2001:db8:2:2::1"
        )
        self.assertEqual(fw.counts().blocked_subnets, 4)
        self.block_by_failure(fw, "2001:db8:2:2::2")
        self.assertEqual(
            [event.address for event in self.blocks[-3:]],
            ["2001:db8:2:2::/64", "2001:db8:2::/48", "2001:db8::/32"],
        )
        self.assertFalse(fw.connection("2001:db8:ffff::1"))
        self.assertTrue(fw.connection("2001:db9::2"))
        self.assertEqual(
            fw.blocked_addresses()[8:],
            [
                "2001:db8::/32",
                "2001:db8:1::/48",
                "2001:db8:1:1::/64",
                "2001:db8:1:2::/64",
                "2001:db8:2::/48",
                "2001:db8:2:1::/64",
                "2001:db8:2:2::/64",
            ],
        )

    def test_depth_one(self) -> None:
        """
        Depth 1 groups addresses only by their first 16 bits.
        """
        fw = self.firewall(
            block_after_failures=1, ipv6_group_depth=1, ipv6_subnet_breach=3
        )
        self.block_by_failure(fw, "2001:db8::1", "2001:1::1")
        self.assertTrue(fw.connection("2001:ffff::1"))
        self.block_by_failure(fw, "2001:abcd:1:2:3:4:5:6")
        self.assertEqual(self.blocks[-1].address, "2001::/16")
        self.assertFalse(fw.connection("2001:ffff::1"))
        self.assertTrue(fw.connection("2002::1"))

    def test_ipv4_never_grouped(self) -> None:
        fw = self.firewall(block_after_failures=1, ipv6_subnet_breach=2)
        self.block_by_failure(fw, *(f"10.0.0.{i}" for i in range(50)))
        self.assertEqual(fw.counts().blocked_subnets, 0)
        self.assertTrue(fw.connection("10.0.0.200"))

    def test_subnet_block_expires(self) -> None:
        """
        A subnet block ends block_for seconds after it began, and the counts
        of blocked addresses fall as their blocks end.
        """
        fw = self.firewall(
            block_after_failures=1, ipv6_subnet_breach=2, block_for=100.0
        )
        self.block_by_failure(fw, "2001:db8:1:2::1")
        self.clock.advance(10)
        self.block_by_failure(fw, "2001:db8:1:2::2")
        self.clock.advance(89)
        fw.expire()
        self.assertEqual(self.unblocks, [])
        self.clock.advance(1)
        fw.expire()
        self.assertEqual(
            self.unblocks,
            [FirewallEvent("address", "2001:db8:1:2::1", "block expired", 100.0)],
        )
        # The subnet's own block lasts until 110.
        self.assertFalse(fw.connection("2001:db8:1:2::3"))
        self.clock.advance(10)
        fw.expire()
        self.assertEqual(
            self.unblocks[1:],
            [
                FirewallEvent("address", "2001:db8:1:2::2", "block expired", 110.0),
                FirewallEvent("subnet", "2001:db8:1:2::/64", "block expired", 110.0),
            ],
        )
        # Both addresses were idle for as long, so they are forgotten too.
        self.assertEqual(fw.counts(), FirewallCounts(0, 0, 0, 0, 1))
        self.assertTrue(fw.connection("2001:db8:1:2::3"))
        # Nothing is left of the old count: one more block is not two.
        self.block_by_failure(fw, "2001:db8:1:2::4")
        self.assertEqual(fw.counts().blocked_subnets, 0)

    def test_unblock_subnet(self) -> None:
        fw = self.firewall(block_after_failures=1, ipv6_subnet_breach=2)
        self.block_by_failure(fw, "2001:db8:1:2::1", "2001:db8:1:2::2")
        self.assertFalse(fw.unblock("2001:db8:1:3::/64"))
        self.assertFalse(fw.unblock("2001:db8:1::/48"))
        self.assertFalse(fw.unblock("10.0.0.0/8"))
        self.assertTrue(fw.unblock("2001:db8:1:2:0:0:0:5/64"))
        self.assertEqual(
            self.unblocks[-1],
            FirewallEvent(
                "subnet", "2001:db8:1:2::/64", "unblocked by the operator", HOUR
            ),
        )
        self.assertFalse(fw.unblock("2001:db8:1:2::/64"))
        self.assertTrue(fw.connection("2001:db8:1:2::3"))
        self.assertTrue(fw.is_blocked("2001:db8:1:2::1"))
        self.assertEqual(fw.blocked_addresses(), ["2001:db8:1:2::1", "2001:db8:1:2::2"])


class UnblockTests(FirewallTestCase):
    def test_unblock_address(self) -> None:
        fw = self.firewall(block_after_failures=2)
        fw.failure("192.0.2.1", "bad hello")
        fw.failure("192.0.2.1", "bad hello")
        self.assertFalse(fw.connection("192.0.2.1"))
        self.assertTrue(fw.unblock("192.0.2.1"))
        self.assertEqual(
            self.unblocks,
            [FirewallEvent("address", "192.0.2.1", "unblocked by the operator", HOUR)],
        )
        self.assertEqual(
            self.logged(LogLevel.info),
            ["Firewall unblocks 192.0.2.1 after 0 seconds: unblocked by the operator"],
        )
        self.assertTrue(fw.connection("192.0.2.1"))
        details = fw.details("192.0.2.1")
        self.assertEqual(details["failures"], 0)
        self.assertEqual(details["new_connections"], 1)
        self.assertFalse(fw.unblock("192.0.2.1"))
        self.assertFalse(fw.unblock("192.0.2.2"))
        self.assertEqual(fw.counts().blocked, 0)

    def test_unblocked_block_does_not_end_later(self) -> None:
        """
        An address blocked again after an early unblock stays blocked until
        its new block ends.
        """
        fw = self.firewall(block_after_failures=1, block_for=100.0)
        self.block_by_failure(fw, "192.0.2.1")
        fw.unblock("192.0.2.1")
        self.clock.advance(50)
        self.block_by_failure(fw, "192.0.2.1")
        self.clock.advance(50)
        self.assertTrue(fw.is_blocked("192.0.2.1"))
        self.clock.advance(50)
        self.assertFalse(fw.is_blocked("192.0.2.1"))


class NeverBlockTests(FirewallTestCase):
    def test_counts_and_warns_but_never_blocks(self) -> None:
        fw = self.firewall(
            warn_after_new_connections=5,
            block_after_new_connections=10,
            block_after_failures=3,
            never_block=True,
        )
        for _ in range(50):
            self.assertTrue(fw.connection("192.0.2.1"))
        for _ in range(10):
            fw.failure("192.0.2.1", "bad hello")
        self.assertTrue(fw.connection("192.0.2.1"))
        self.assertFalse(fw.is_blocked("192.0.2.1"))
        details = fw.details("192.0.2.1")
        self.assertEqual(details["new_connections"], 51)
        self.assertEqual(details["failures"], 3)
        self.assertTrue(details["warned"])
        self.assertEqual(fw.counts(), FirewallCounts(1, 0, 1, 0, 0))
        self.assertEqual(fw.blocked_addresses(), [])
        self.assertEqual(self.blocks, [])
        self.assertEqual(
            self.logged(LogLevel.warn),
            [
                "Firewall warns 192.0.2.1: 5 unauthenticated connections",
                "Firewall would block 192.0.2.1 for 3600 seconds"
                " but never_block is set: 10 unauthenticated connections",
            ],
        )

    def test_no_subnet_blocks(self) -> None:
        fw = self.firewall(
            block_after_failures=1, ipv6_subnet_breach=2, never_block=True
        )
        for i in range(10):
            fw.failure(f"2001:db8:1:2::{i}", "bad hello")
        self.assertTrue(fw.connection("2001:db8:1:2::ff"))
        self.assertEqual(fw.counts().blocked_subnets, 0)
        self.assertEqual(len(self.logged(LogLevel.warn)), 10)


class BoundTests(FirewallTestCase):
    def test_at_most_max_addresses(self) -> None:
        """
        Beyond max_addresses, the least recently active address is forgotten.
        """
        fw = self.firewall(max_addresses=1000)
        for i in range(1100):
            fw.connection(f"10.0.{i // 256}.{i % 256}")
            self.assertLessEqual(fw.counts().total, 1000)
        self.assertEqual(fw.counts().total, 1000)
        self.assertIsNone(fw.details("10.0.0.0"))
        self.assertIsNone(fw.details("10.0.0.99"))
        self.assertIsNotNone(fw.details("10.0.0.100"))
        self.assertIsNotNone(fw.details("10.0.4.75"))

    def test_activity_protects_from_eviction(self) -> None:
        fw = self.firewall(max_addresses=3)
        for host in ["192.0.2.1", "192.0.2.2", "192.0.2.3"]:
            fw.connection(host)
        fw.failure("192.0.2.1", "bad hello")
        fw.connection("192.0.2.4")
        self.assertIsNotNone(fw.details("192.0.2.1"))
        self.assertIsNone(fw.details("192.0.2.2"))

    def test_evicting_a_blocked_address_unblocks_it(self) -> None:
        fw = self.firewall(
            max_addresses=2, block_after_failures=1, ipv6_subnet_breach=2
        )
        self.block_by_failure(fw, "2001:db8:1:2::1")
        fw.connection("192.0.2.1")
        fw.connection("192.0.2.2")
        self.assertEqual(
            self.unblocks,
            [
                FirewallEvent(
                    "address",
                    "2001:db8:1:2::1",
                    "forgotten to track at most 2 addresses",
                    HOUR,
                )
            ],
        )
        self.assertEqual(fw.counts(), FirewallCounts(2, 0, 0, 0, 0))
        # The forgotten block no longer counts towards its /64.
        self.block_by_failure(fw, "2001:db8:1:2::2")
        self.assertEqual(fw.counts().blocked_subnets, 0)


class CountsTests(FirewallTestCase):
    def test_counts(self) -> None:
        fw = self.firewall(
            warn_after_new_connections=2,
            block_after_new_connections=4,
            block_after_failures=1,
            ipv6_subnet_breach=2,
        )
        self.assertEqual(fw.counts(), FirewallCounts(0, 0, 0, 0, 0))
        for _ in range(3):
            fw.connection("192.0.2.1")
        for _ in range(4):
            fw.connection("192.0.2.2")
        fw.connection("192.0.2.3")
        self.block_by_failure(fw, "2001:db8::1", "2001:db8::2")
        fw.connection("2001:db8::3")
        self.assertEqual(
            fw.counts(),
            FirewallCounts(
                total=5, blocked=3, warned=2, blocked_subnets=1, refused=2
            ),
        )

    def test_blocked_addresses_in_order(self) -> None:
        fw = self.firewall(block_after_failures=1, ipv6_subnet_breach=2)
        self.block_by_failure(
            fw, "2001:db8::2", "192.0.2.10", "2001:db8::1", "192.0.2.9"
        )
        self.assertEqual(
            fw.blocked_addresses(),
            [
                "192.0.2.9",
                "192.0.2.10",
                "2001:db8::1",
                "2001:db8::2",
                "2001:db8::/64",
            ],
        )


class HookTests(FirewallTestCase):
    def test_raising_hooks(self) -> None:
        """
        A hook that raises is logged and changes nothing.
        """

        def broken(event: FirewallEvent) -> None:
            raise RuntimeError("hook broke")

        fw = self.firewall(
            block_after_failures=1, block_for=100.0, on_block=broken, on_unblock=broken
        )
        fw.failure("192.0.2.1", "bad hello")
        fw.failure("192.0.2.2", "bad hello")
        self.assertFalse(fw.connection("192.0.2.1"))
        self.assertEqual(fw.counts().blocked, 2)
        self.clock.advance(100)
        fw.expire()
        self.assertEqual(fw.counts().blocked, 0)
        self.assertTrue(fw.connection("192.0.2.2"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 4)
        failures = [e for e in self.log_events if "log_failure" in e]
        self.assertEqual(
            [formatEvent(e) for e in failures],
            [
                "Firewall on_block hook failed for 192.0.2.1",
                "Firewall on_block hook failed for 192.0.2.2",
                "Firewall on_unblock hook failed for 192.0.2.1",
                "Firewall on_unblock hook failed for 192.0.2.2",
            ],
        )

    def test_hook_sees_state_and_may_call_back(self) -> None:
        """
        A hook runs once the firewall's state is updated, and may call it.
        """
        seen = []

        def on_block(event: FirewallEvent) -> None:
            seen.append((event.address, event.address in fw.blocked_addresses()))
            if event.kind == "subnet":
                fw.unblock(event.address)

        fw = self.firewall(
            block_after_failures=1, ipv6_subnet_breach=2, on_block=on_block
        )
        self.block_by_failure(fw, "2001:db8::1", "2001:db8::2")
        self.assertEqual(
            seen,
            [("2001:db8::1", True), ("2001:db8::2", True), ("2001:db8::/64", True)],
        )
        self.assertEqual(fw.counts().blocked_subnets, 0)
        self.assertEqual(
            [event.address for event in self.unblocks], ["2001:db8::/64"]
        )

    def test_hook_must_be_callable(self) -> None:
        error = self.assertRaises(TypeError, Firewall, self.clock, on_block=1)
        self.assertIn("on_block", str(error))
        error = self.assertRaises(TypeError, Firewall, self.clock, on_unblock="x")
        self.assertIn("on_unblock", str(error))


class ConstructorTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        fw = Firewall(Clock())
        self.assertEqual(fw.counts(), FirewallCounts(0, 0, 0, 0, 0))

    def test_bad_counts(self) -> None:
        for name in [
            "warn_after_new_connections",
            "block_after_new_connections",
            "block_after_failures",
            "ipv6_subnet_breach",
            "max_addresses",
        ]:
            for value in [0, -1, 1.5, True, "3", None]:
                error = self.assertRaises(
                    ValueError, Firewall, Clock(), **{name: value}
                )
                self.assertEqual(
                    str(error), f"{name} must be a positive integer, not {value!r}"
                )

    def test_bad_block_for(self) -> None:
        for value in [0, -1.0, float("inf"), float("nan"), "60", True, None]:
            error = self.assertRaises(ValueError, Firewall, Clock(), block_for=value)
            self.assertIn("block_for must be a positive finite number", str(error))
        self.assertEqual(Firewall(Clock(), block_for=1).counts().total, 0)

    def test_bad_depth(self) -> None:
        for value in [0, 9, -1, 4.0, True]:
            error = self.assertRaises(
                ValueError, Firewall, Clock(), ipv6_group_depth=value
            )
            self.assertEqual(
                str(error), f"ipv6_group_depth must be an integer 1-8, not {value!r}"
            )
        Firewall(Clock(), ipv6_group_depth=1)
        Firewall(Clock(), ipv6_group_depth=8)
