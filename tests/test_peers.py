"""
Tests for L{dtable.peers}: parsing peer addresses and the peer directory's
choice of the next primary.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dtable.peers import AddressError, PeerAddress, PeerDirectory


class PeerAddressTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        address = PeerAddress.parse("127.0.0.1:10000")
        self.assertEqual(address, PeerAddress(host="127.0.0.1", port=10000))
        self.assertFalse(address.is_ipv6)

    def test_ipv6(self) -> None:
        address = PeerAddress.parse("[::1]:10000")
        self.assertEqual(address, PeerAddress(host="::1", port=10000))
        self.assertTrue(address.is_ipv6)

    def test_name(self) -> None:
        self.assertEqual(PeerAddress.parse("localhost:1"),
                         PeerAddress(host="localhost", port=1))
        self.assertEqual(PeerAddress.parse("node.example:65535").port, 65535)

    def test_surrounding_space(self) -> None:
        self.assertEqual(PeerAddress.parse("  localhost:1\n"),
                         PeerAddress(host="localhost", port=1))

    def assertAddressError(self, text: str, *words: str) -> None:
        e = self.assertRaises(AddressError, PeerAddress.parse, text)
        self.assertIsInstance(e, ValueError)
        for word in words:
            self.assertIn(word, str(e))

    def test_bare_ipv6(self) -> None:
        self.assertAddressError("::1:10000", "[address]:port")

    def test_no_port(self) -> None:
        self.assertAddressError("host", "host:port")
        self.assertAddressError(":10000", "host:port")

    def test_port_out_of_range(self) -> None:
        self.assertAddressError("host:0", "port out of range", "1-65535")
        self.assertAddressError("host:70000", "port out of range")
        self.assertAddressError("[::1]:65536", "port out of range")

    def test_bad_port(self) -> None:
        self.assertAddressError("host:", "bad port")
        self.assertAddressError("host:-1", "bad port")
        self.assertAddressError("host:http", "bad port")
        self.assertAddressError("host:1 2", "bad port")

    def test_port_of_non_ascii_digits(self) -> None:
        """
        Ports are ASCII digits: other Unicode digits are an AddressError,
        like any other bad port.
        """
        self.assertAddressError("host:\u00b2", "bad port")
        self.assertAddressError("host:\u0661\u0662", "bad port")

    def test_ipv6_without_colon(self) -> None:
        self.assertAddressError("[::1]10000", "[address]:port")
        self.assertAddressError("[::1", "[address]:port")

    def test_not_ipv6(self) -> None:
        self.assertAddressError("[zz]:1", "not an IPv6 address")
        self.assertAddressError("[127.0.0.1]:1", "not an IPv6 address")

    def test_str_round_trip(self) -> None:
        for text in ("127.0.0.1:10000", "[::1]:10000", "localhost:1",
                     "[2001:db8::5]:9999", "node.example:65535"):
            address = PeerAddress.parse(text)
            self.assertEqual(str(address), text)
            self.assertEqual(PeerAddress.parse(str(address)), address)

    def test_values(self) -> None:
        """
        Addresses are hashable, ordered values.
        """
        one = PeerAddress.parse("a:1")
        self.assertEqual({one, PeerAddress("a", 1)}, {one})
        self.assertLess(PeerAddress("a", 1), PeerAddress("a", 2))


A = PeerAddress("10.0.0.1", 1)
B = PeerAddress("10.0.0.2", 2)
C = PeerAddress("10.0.0.3", 3)


class PeerDirectoryTests(SynchronousTestCase):
    def test_empty(self) -> None:
        directory = PeerDirectory()
        self.assertIsNone(directory.next_primary())
        self.assertEqual(directory.addresses(), [])
        self.assertEqual(directory.snapshot(), [])

    def test_add(self) -> None:
        directory = PeerDirectory([A])
        self.assertTrue(directory.add(B))
        self.assertFalse(directory.add(B))
        self.assertFalse(directory.add(A))
        self.assertEqual(directory.addresses(), [A, B])

    def test_rotates_in_turn(self) -> None:
        directory = PeerDirectory([A, B, C])
        choices = [directory.next_primary() for _ in range(7)]
        self.assertEqual(choices, [A, B, C, A, B, C, A])

    def test_single(self) -> None:
        directory = PeerDirectory([A])
        self.assertEqual([directory.next_primary() for _ in range(3)], [A, A, A])

    def test_prefers_fewer_failures(self) -> None:
        directory = PeerDirectory([A, B, C])
        directory.record_failure(A)
        directory.record_failure(A)
        directory.record_failure(B)
        self.assertEqual(directory.failures(A), 2)
        self.assertEqual(directory.failures(B), 1)
        self.assertEqual(directory.failures(C), 0)
        self.assertEqual(directory.next_primary(), C)
        self.assertEqual(directory.next_primary(), C)
        directory.record_failure(C)
        directory.record_failure(C)
        # B has fewest now.
        self.assertEqual(directory.next_primary(), B)

    def test_ties_rotate_among_fewest(self) -> None:
        directory = PeerDirectory([A, B, C])
        directory.record_failure(B)
        self.assertEqual([directory.next_primary() for _ in range(4)], [A, C, A, C])

    def test_mark_self(self) -> None:
        directory = PeerDirectory([A, B])
        directory.mark_self(A)
        self.assertTrue(directory.is_self(A))
        self.assertFalse(directory.is_self(B))
        self.assertEqual(directory.addresses(), [B])
        self.assertEqual(directory.self_addresses(), [A])
        self.assertFalse(directory.add(A))
        self.assertFalse(directory.add(A, initial=True))
        self.assertEqual([directory.next_primary() for _ in range(3)], [B, B, B])

    def test_mark_self_of_unknown_address(self) -> None:
        directory = PeerDirectory([A])
        directory.mark_self(C)
        self.assertFalse(directory.add(C))
        self.assertEqual(directory.addresses(), [A])

    def test_only_self(self) -> None:
        directory = PeerDirectory([A])
        directory.mark_self(A)
        self.assertIsNone(directory.next_primary())

    def test_mark_self_of_last_choice(self) -> None:
        directory = PeerDirectory([A, B, C])
        self.assertEqual(directory.next_primary(), A)
        self.assertEqual(directory.next_primary(), B)
        directory.mark_self(B)
        self.assertIn(directory.next_primary(), [A, C])

    def test_record_success_resets_failures(self) -> None:
        directory = PeerDirectory([A, B])
        for _ in range(3):
            directory.record_failure(A)
        directory.record_success(A, "f" * 32)
        self.assertEqual(directory.failures(A), 0)
        self.assertEqual(directory.snapshot()[0]["node_id"], "f" * 32)

    def test_unknown_addresses_are_ignored(self) -> None:
        directory = PeerDirectory([A])
        directory.record_failure(B)
        directory.record_success(B, "f" * 32)
        self.assertEqual(directory.failures(B), 0)
        self.assertEqual(directory.addresses(), [A])

    def test_snapshot(self) -> None:
        directory = PeerDirectory([A])
        directory.add(PeerAddress("::1", 5))
        directory.record_failure(A)
        directory.record_success(PeerAddress("::1", 5), "a" * 32, now=7.0)
        directory.record_rtt(PeerAddress("::1", 5), 0.25)
        directory.record_rtt(PeerAddress("::1", 5), 0.75)
        self.assertEqual(directory.snapshot(), [
            {"address": "10.0.0.1:1", "initial": True, "failures": 1, "node_id": None,
             "rtt_mean": None, "rtt_samples": 0, "last_success": None, "last_probe": None},
            {"address": "[::1]:5", "initial": False, "failures": 0, "node_id": "a" * 32,
             "rtt_mean": 0.5, "rtt_samples": 2, "last_success": 7.0, "last_probe": None},
        ])
