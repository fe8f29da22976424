"""
Tests for L{dtable.peers}: parsing peer addresses, the peer directory's
choice of the next primary, probes and purges, the policy that moves the
primary link, and the component tracker. Time is passed in as C{now}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dtable.peers import (
    AddressError,
    ComponentTracker,
    PeerAddress,
    PeerDirectory,
    PrimaryPolicy,
    normalize_host,
)


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


D = PeerAddress("10.0.0.4", 4)
E = PeerAddress("10.0.0.5", 5)

ID_1 = "1" * 32
ID_2 = "2" * 32
ID_3 = "3" * 32
ID_4 = "4" * 32


def measured(directory: PeerDirectory, means: dict[PeerAddress, float]) -> None:
    """
    Give each address one RTT sample.
    """
    for address, seconds in means.items():
        directory.record_rtt(address, seconds)


class NextPrimaryTests(SynchronousTestCase):
    """
    next_primary prefers the fewest failures, then the lowest mean RTT, and
    tries candidates that tie in turn.
    """

    def test_lowest_mean_rtt(self) -> None:
        directory = PeerDirectory([A, B, C])
        measured(directory, {A: 0.3, B: 0.1, C: 0.2})
        self.assertEqual([directory.next_primary() for _ in range(3)], [B, B, B])

    def test_measured_before_unmeasured(self) -> None:
        directory = PeerDirectory([A, B, C])
        measured(directory, {C: 5.0})
        self.assertEqual([directory.next_primary() for _ in range(2)], [C, C])

    def test_failures_before_rtt(self) -> None:
        directory = PeerDirectory([A, B])
        measured(directory, {A: 0.01, B: 1.0})
        directory.record_failure(A)
        self.assertEqual(directory.next_primary(), B)
        directory.record_success(A, ID_1)
        self.assertEqual(directory.next_primary(), A)

    def test_equal_rtt_ties_in_turn(self) -> None:
        directory = PeerDirectory([A, B, C])
        measured(directory, {A: 0.2, B: 0.1, C: 0.1})
        self.assertEqual([directory.next_primary() for _ in range(4)], [B, C, B, C])

    def test_exclude(self) -> None:
        directory = PeerDirectory([A, B, C])
        measured(directory, {A: 0.1, B: 0.2, C: 0.3})
        self.assertEqual(directory.next_primary(exclude=[A]), B)
        self.assertEqual(directory.next_primary(exclude={A, B}), C)
        self.assertIsNone(directory.next_primary(exclude=[A, B, C]))
        self.assertEqual(directory.next_primary(), A)

    def test_exclude_among_ties(self) -> None:
        directory = PeerDirectory([A, B, C])
        self.assertEqual([directory.next_primary(exclude=[B]) for _ in range(4)],
                         [A, C, A, C])

    def test_exclude_of_unknown_address(self) -> None:
        directory = PeerDirectory([A])
        self.assertEqual(directory.next_primary(exclude=[D]), A)


class RTTWindowTests(SynchronousTestCase):
    """
    Each address keeps only its last C{window} RTT samples.
    """

    def test_window(self) -> None:
        directory = PeerDirectory([A], window=3)
        self.assertIsNone(directory.mean_rtt(A))
        for seconds in (10.0, 1.0, 2.0, 3.0):
            directory.record_rtt(A, seconds)
        self.assertEqual(directory.mean_rtt(A), 2.0)
        self.assertEqual(directory.snapshot()[0]["rtt_samples"], 3)
        directory.record_rtt(A, 6.0)
        self.assertEqual(directory.mean_rtt(A), (2.0 + 3.0 + 6.0) / 3)

    def test_window_of_learned_addresses(self) -> None:
        directory = PeerDirectory(window=2)
        directory.learn(D, ID_4, now=1.0)
        for seconds in (9.0, 1.0, 3.0):
            directory.record_rtt(D, seconds)
        self.assertEqual(directory.mean_rtt(D), 2.0)

    def test_unknown_address(self) -> None:
        directory = PeerDirectory([A])
        directory.record_rtt(D, 1.0)
        self.assertIsNone(directory.mean_rtt(D))
        self.assertNotIn(D, directory)

    def test_success_keeps_samples(self) -> None:
        directory = PeerDirectory([A])
        directory.record_rtt(A, 0.5)
        directory.record_failure(A)
        directory.record_success(A, ID_1, now=3.0)
        self.assertEqual(directory.mean_rtt(A), 0.5)


class BetterThanTests(SynchronousTestCase):
    """
    better_than names a measured candidate whose mean RTT is below ratio
    times the current one's and that has no more failures.
    """

    def test_below_ratio(self) -> None:
        directory = PeerDirectory([A, B])
        measured(directory, {A: 1.0, B: 0.6})
        self.assertEqual(directory.better_than(A, 0.7), B)

    def test_not_below_ratio(self) -> None:
        directory = PeerDirectory([A, B])
        measured(directory, {A: 1.0, B: 0.7})
        self.assertIsNone(directory.better_than(A, 0.7))
        directory.record_rtt(B, 0.5)
        self.assertEqual(directory.better_than(A, 0.7), B)

    def test_best_of_several(self) -> None:
        directory = PeerDirectory([A, B, C, D])
        measured(directory, {A: 1.0, B: 0.5, C: 0.2, D: 0.6})
        self.assertEqual(directory.better_than(A, 0.7), C)

    def test_more_failures(self) -> None:
        directory = PeerDirectory([A, B, C])
        measured(directory, {A: 1.0, B: 0.1, C: 0.5})
        directory.record_failure(B)
        self.assertEqual(directory.better_than(A, 0.7), C)
        directory.record_failure(C)
        self.assertIsNone(directory.better_than(A, 0.7))

    def test_as_many_failures(self) -> None:
        directory = PeerDirectory([A, B])
        measured(directory, {A: 1.0, B: 0.1})
        directory.record_failure(A)
        directory.record_failure(B)
        self.assertEqual(directory.better_than(A, 0.7), B)

    def test_fewest_failures_first(self) -> None:
        directory = PeerDirectory([A, B, C])
        measured(directory, {A: 1.0, B: 0.1, C: 0.5})
        directory.record_failure(A)
        directory.record_failure(B)
        self.assertEqual(directory.better_than(A, 0.7), C)

    def test_never_the_current(self) -> None:
        directory = PeerDirectory([A])
        measured(directory, {A: 1.0})
        self.assertIsNone(directory.better_than(A, 2.0))

    def test_never_excluded(self) -> None:
        directory = PeerDirectory([A, B, C])
        measured(directory, {A: 1.0, B: 0.1, C: 0.5})
        self.assertEqual(directory.better_than(A, 0.7, exclude=[B]), C)
        self.assertIsNone(directory.better_than(A, 0.7, exclude=[B, C]))

    def test_unmeasured_candidates(self) -> None:
        directory = PeerDirectory([A, B])
        measured(directory, {A: 1.0})
        self.assertIsNone(directory.better_than(A, 0.7))

    def test_current_unmeasured(self) -> None:
        directory = PeerDirectory([A, B])
        measured(directory, {B: 0.001})
        self.assertIsNone(directory.better_than(A, 0.7))

    def test_current_unknown(self) -> None:
        directory = PeerDirectory([A, B])
        measured(directory, {B: 0.001})
        self.assertIsNone(directory.better_than(D, 0.7))


class PrimaryPolicyTests(SynchronousTestCase):
    """
    PrimaryPolicy moves the primary only to a candidate that has stayed
    better for C{wait} seconds without a break.
    """

    def setUp(self) -> None:
        self.directory = PeerDirectory([A, B, C])
        measured(self.directory, {A: 1.0})
        self.policy = PrimaryPolicy(self.directory, wait=10.0, ratio=0.7)

    def consider_until(self, end: float, start: float = 0.0, step: float = 1.0,
                       current: PeerAddress = A) -> list[PeerAddress | None]:
        """
        consider() every C{step} seconds from C{start} to C{end}, inclusive.
        """
        answers = []
        now = start
        while now <= end:
            answers.append(self.policy.consider(current, now))
            now += step
        return answers

    def test_nothing_better(self) -> None:
        measured(self.directory, {B: 0.9})
        self.assertEqual(self.consider_until(30.0), [None] * 31)

    def test_no_current(self) -> None:
        measured(self.directory, {B: 0.1})
        for now in (0.0, 10.0, 20.0):
            self.assertIsNone(self.policy.consider(None, now))

    def test_better_for_wait(self) -> None:
        measured(self.directory, {B: 0.5})
        self.assertEqual(self.consider_until(9.0), [None] * 10)
        self.assertEqual(self.policy.consider(A, 10.0), B)

    def test_returned_once(self) -> None:
        """
        Once due, the candidate is returned once; asked again, the policy
        waits anew.
        """
        measured(self.directory, {B: 0.5})
        self.assertIsNone(self.policy.consider(A, 0.0))
        self.assertEqual(self.policy.consider(A, 10.0), B)
        self.assertIsNone(self.policy.consider(A, 10.0))
        self.assertIsNone(self.policy.consider(A, 11.0))

    def test_break_resets(self) -> None:
        measured(self.directory, {B: 0.5})
        self.assertEqual(self.consider_until(8.0), [None] * 9)
        # B's mean rises above 0.7: a break.
        self.directory.record_rtt(B, 1.5)
        self.assertIsNone(self.policy.consider(A, 9.0))
        # Better again from t=10: due at t=20, not before.
        self.directory.record_rtt(B, 0.0)
        self.directory.record_rtt(B, 0.0)
        self.assertEqual(self.consider_until(19.0, start=10.0), [None] * 10)
        self.assertEqual(self.policy.consider(A, 20.0), B)

    def test_break_by_exclusion(self) -> None:
        measured(self.directory, {B: 0.5})
        self.assertIsNone(self.policy.consider(A, 0.0))
        self.assertIsNone(self.policy.consider(A, 5.0, exclude=[B]))
        self.assertIsNone(self.policy.consider(A, 10.0))
        self.assertIsNone(self.policy.consider(A, 19.0))
        self.assertEqual(self.policy.consider(A, 20.0), B)

    def test_other_candidate_restarts(self) -> None:
        measured(self.directory, {B: 0.5})
        self.assertEqual(self.consider_until(6.0), [None] * 7)
        # C becomes the better candidate at t=7.
        measured(self.directory, {C: 0.1})
        self.assertEqual(self.consider_until(16.0, start=7.0), [None] * 10)
        self.assertEqual(self.policy.consider(A, 17.0), C)

    def test_candidate_back_restarts(self) -> None:
        """
        B, then C, then B again: B's wait starts over.
        """
        measured(self.directory, {B: 0.5})
        self.assertIsNone(self.policy.consider(A, 0.0))
        measured(self.directory, {C: 0.1})
        self.assertIsNone(self.policy.consider(A, 5.0))
        self.directory.record_failure(C)
        directory_choice = self.directory.better_than(A, 0.7)
        self.assertEqual(directory_choice, B)
        self.assertIsNone(self.policy.consider(A, 9.0))
        self.assertIsNone(self.policy.consider(A, 18.0))
        self.assertEqual(self.policy.consider(A, 19.0), B)

    def test_wait_measured_from_first_sight(self) -> None:
        """
        Asked only rarely, the policy still counts from when it first saw
        the candidate.
        """
        measured(self.directory, {B: 0.5})
        self.assertIsNone(self.policy.consider(A, 100.0))
        self.assertIsNone(self.policy.consider(A, 109.5))
        self.assertEqual(self.policy.consider(A, 110.0), B)

    def test_no_wait(self) -> None:
        policy = PrimaryPolicy(self.directory, wait=0.0, ratio=0.7)
        measured(self.directory, {B: 0.5})
        self.assertEqual(policy.consider(A, 3.0), B)

    def test_ratio(self) -> None:
        policy = PrimaryPolicy(self.directory, wait=1.0, ratio=0.4)
        measured(self.directory, {B: 0.5})
        self.assertIsNone(policy.consider(A, 0.0))
        self.assertIsNone(policy.consider(A, 5.0))


class DueForProbeTests(SynchronousTestCase):
    """
    due_for_probe names addresses not probed within C{retest} seconds,
    never probed ones first, then the longest unprobed.
    """

    def test_never_probed(self) -> None:
        directory = PeerDirectory([A, B, C])
        self.assertEqual(directory.due_for_probe(0.0, retest=60.0), [A, B, C])

    def test_retest(self) -> None:
        directory = PeerDirectory([A, B])
        directory.record_probe(A, 100.0)
        self.assertEqual(directory.due_for_probe(100.0, retest=60.0), [B])
        self.assertEqual(directory.due_for_probe(159.9, retest=60.0), [B])
        self.assertEqual(directory.due_for_probe(160.0, retest=60.0), [B, A])

    def test_order(self) -> None:
        directory = PeerDirectory([A, B, C, D])
        directory.record_probe(A, 20.0)
        directory.record_probe(B, 10.0)
        directory.record_probe(D, 30.0)
        self.assertEqual(directory.due_for_probe(100.0, retest=60.0), [C, B, A, D])

    def test_probe_at_time_zero(self) -> None:
        directory = PeerDirectory([A, B])
        directory.record_probe(A, 0.0)
        self.assertEqual(directory.due_for_probe(0.0, retest=1.0), [B])
        self.assertEqual(directory.due_for_probe(1.0, retest=1.0), [B, A])

    def test_exclude(self) -> None:
        directory = PeerDirectory([A, B, C])
        directory.record_probe(B, 0.0)
        self.assertEqual(directory.due_for_probe(100.0, retest=60.0, exclude=[A]), [C, B])
        self.assertEqual(directory.due_for_probe(100.0, retest=60.0, exclude={A, B, C}), [])

    def test_self_addresses(self) -> None:
        directory = PeerDirectory([A, B])
        directory.mark_self(A)
        self.assertEqual(directory.due_for_probe(0.0, retest=60.0), [B])

    def test_unknown_address(self) -> None:
        directory = PeerDirectory([A])
        directory.record_probe(D, 5.0)
        self.assertEqual(directory.due_for_probe(5.0, retest=60.0), [A])

    def test_snapshot(self) -> None:
        directory = PeerDirectory([A])
        directory.record_probe(A, 42.0)
        self.assertEqual(directory.snapshot()[0]["last_probe"], 42.0)


class PurgeTests(SynchronousTestCase):
    """
    purge forgets learned addresses that have failed and not succeeded for
    C{after} seconds; initial ones stay.
    """

    def test_failing_learned(self) -> None:
        directory = PeerDirectory([A])
        directory.learn(D, ID_4, now=100.0)
        directory.record_failure(D)
        self.assertEqual(directory.purge(159.0, after=60.0), [])
        self.assertIn(D, directory)
        self.assertEqual(directory.purge(160.0, after=60.0), [D])
        self.assertNotIn(D, directory)
        self.assertEqual(directory.addresses(), [A])
        self.assertEqual(directory.purge(1000.0, after=60.0), [])

    def test_forgotten_can_be_learned_again(self) -> None:
        directory = PeerDirectory()
        directory.learn(D, ID_4, now=0.0)
        directory.record_failure(D)
        self.assertEqual(directory.purge(100.0, after=60.0), [D])
        self.assertTrue(directory.learn(D, ID_4, now=100.0))
        self.assertEqual(directory.failures(D), 0)

    def test_never_initial(self) -> None:
        directory = PeerDirectory([A])
        for _ in range(5):
            directory.record_failure(A)
        self.assertEqual(directory.purge(10_000.0, after=60.0), [])
        self.assertEqual(directory.addresses(), [A])

    def test_learned_then_given(self) -> None:
        """
        A learned address the operator then gives is initial: never purged.
        """
        directory = PeerDirectory()
        directory.learn(D, ID_4, now=0.0)
        self.assertFalse(directory.add(D, initial=True))
        directory.record_failure(D)
        self.assertEqual(directory.purge(10_000.0, after=60.0), [])
        self.assertIn(D, directory)

    def test_not_failing(self) -> None:
        directory = PeerDirectory()
        directory.learn(D, ID_4, now=0.0)
        self.assertEqual(directory.purge(10_000.0, after=60.0), [])
        self.assertIn(D, directory)

    def test_succeeded_recently(self) -> None:
        directory = PeerDirectory()
        directory.learn(D, ID_4, now=0.0)
        directory.record_failure(D)
        directory.record_success(D, ID_4, now=500.0)
        directory.record_failure(D)
        self.assertEqual(directory.purge(559.0, after=60.0), [])
        self.assertIn(D, directory)
        self.assertEqual(directory.purge(560.0, after=60.0), [D])

    def test_only_the_failing(self) -> None:
        directory = PeerDirectory([A])
        directory.learn(D, ID_4, now=0.0)
        directory.learn(E, ID_3, now=0.0)
        directory.record_failure(E)
        self.assertEqual(directory.purge(60.0, after=60.0), [E])
        self.assertEqual(directory.addresses(), [A, D])


class LearnTests(SynchronousTestCase):
    """
    learn adds an address a peer told of, with its node id; learned
    addresses are bounded in number.
    """

    def test_learn(self) -> None:
        directory = PeerDirectory([A])
        self.assertTrue(directory.learn(D, ID_4, now=5.0))
        self.assertIn(D, directory)
        self.assertEqual(directory.node_id(D), ID_4)
        self.assertFalse(directory.snapshot()[1]["initial"])

    def test_learn_again(self) -> None:
        directory = PeerDirectory()
        self.assertTrue(directory.learn(D, ID_4, now=5.0))
        self.assertFalse(directory.learn(D, ID_3, now=6.0))
        self.assertEqual(directory.node_id(D), ID_4)
        self.assertEqual(directory.addresses(), [D])

    def test_learn_known_without_id(self) -> None:
        directory = PeerDirectory([A])
        self.assertIsNone(directory.node_id(A))
        self.assertFalse(directory.learn(A, ID_1, now=5.0))
        self.assertEqual(directory.node_id(A), ID_1)
        self.assertTrue(directory.snapshot()[0]["initial"])

    def test_success_names_the_node(self) -> None:
        directory = PeerDirectory()
        directory.learn(D, ID_4, now=0.0)
        directory.record_success(D, ID_3, now=1.0)
        self.assertEqual(directory.node_id(D), ID_3)

    def test_node_id_of_unknown_address(self) -> None:
        self.assertIsNone(PeerDirectory([A]).node_id(D))

    def test_mark_self_then_learn(self) -> None:
        directory = PeerDirectory([A])
        directory.mark_self(D)
        self.assertFalse(directory.learn(D, ID_4, now=1.0))
        self.assertFalse(directory.add(D))
        self.assertNotIn(D, directory)
        self.assertIsNone(directory.node_id(D))

    def test_learn_then_mark_self(self) -> None:
        directory = PeerDirectory([A])
        directory.learn(D, ID_4, now=1.0)
        directory.mark_self(D)
        self.assertNotIn(D, directory)
        self.assertFalse(directory.learn(D, ID_4, now=2.0))
        self.assertEqual(directory.self_addresses(), [D])

    def test_bounded(self) -> None:
        directory = PeerDirectory(max_learned=2)
        for address, node_id in ((C, ID_3), (D, ID_4), (E, ID_1)):
            self.assertTrue(directory.learn(address, node_id, now=1.0))
        self.assertEqual(len(directory.addresses()), 2)

    def test_worst_is_forgotten(self) -> None:
        directory = PeerDirectory(max_learned=3)
        directory.learn(C, ID_3, now=0.0)
        directory.learn(D, ID_4, now=0.0)
        directory.learn(E, ID_1, now=0.0)
        directory.record_failure(D)
        directory.record_failure(D)
        directory.record_failure(E)
        new = PeerAddress("10.0.0.6", 6)
        self.assertTrue(directory.learn(new, ID_2, now=1.0))
        self.assertEqual(directory.addresses(), [C, E, new])
        newer = PeerAddress("10.0.0.7", 7)
        self.assertTrue(directory.learn(newer, ID_2, now=2.0))
        self.assertEqual(directory.addresses(), [C, new, newer])

    def test_least_recent_success_is_forgotten(self) -> None:
        directory = PeerDirectory(max_learned=3)
        for address in (C, D, E):
            directory.learn(address, ID_1, now=0.0)
        directory.record_success(C, ID_3, now=30.0)
        directory.record_success(D, ID_4, now=10.0)
        directory.record_success(E, ID_1, now=20.0)
        directory.learn(PeerAddress("10.0.0.6", 6), ID_2, now=40.0)
        self.assertNotIn(D, directory)
        self.assertIn(C, directory)
        self.assertIn(E, directory)

    def test_never_succeeded_before_succeeded(self) -> None:
        directory = PeerDirectory(max_learned=2)
        directory.learn(C, ID_3, now=0.0)
        directory.learn(D, ID_4, now=0.0)
        directory.record_success(C, ID_3, now=10.0)
        directory.learn(E, ID_1, now=20.0)
        self.assertEqual(directory.addresses(), [C, E])

    def test_initial_not_counted_nor_forgotten(self) -> None:
        directory = PeerDirectory([A, B], max_learned=1)
        for _ in range(3):
            directory.record_failure(A)
        self.assertTrue(directory.learn(D, ID_4, now=0.0))
        self.assertTrue(directory.learn(E, ID_1, now=0.0))
        self.assertEqual(directory.addresses(), [A, B, E])
        self.assertTrue(directory.add(C, initial=True))
        self.assertEqual(directory.addresses(), [A, B, E, C])

    def test_known_address_forgets_nothing(self) -> None:
        directory = PeerDirectory(max_learned=2)
        directory.learn(D, ID_4, now=0.0)
        directory.learn(E, ID_1, now=0.0)
        self.assertFalse(directory.learn(D, ID_4, now=1.0))
        self.assertEqual(directory.addresses(), [D, E])

    def test_self_address_forgets_nothing(self) -> None:
        directory = PeerDirectory(max_learned=1)
        directory.learn(D, ID_4, now=0.0)
        directory.mark_self(E)
        self.assertFalse(directory.learn(E, ID_1, now=1.0))
        self.assertEqual(directory.addresses(), [D])


class ComponentTrackerTests(SynchronousTestCase):
    """
    The component is this node and the nodes heard within C{horizon}
    seconds; outsiders are reachable nodes beyond it with greater ids, and
    with smaller ids once they have been outside for C{horizon} seconds.
    """

    def test_alone(self) -> None:
        tracker = ComponentTracker(ID_2, horizon=30.0)
        self.assertEqual(tracker.members(0.0), {ID_2})

    def test_heard(self) -> None:
        tracker = ComponentTracker(ID_2, horizon=30.0)
        tracker.heard(ID_1, 10.0)
        tracker.heard(ID_3, 20.0)
        self.assertEqual(tracker.members(20.0), {ID_1, ID_2, ID_3})

    def test_horizon(self) -> None:
        tracker = ComponentTracker(ID_2, horizon=30.0)
        tracker.heard(ID_1, 10.0)
        tracker.heard(ID_3, 20.0)
        self.assertEqual(tracker.members(40.0), {ID_1, ID_2, ID_3})
        self.assertEqual(tracker.members(40.5), {ID_2, ID_3})
        self.assertEqual(tracker.members(50.5), {ID_2})

    def test_heard_again(self) -> None:
        tracker = ComponentTracker(ID_2, horizon=30.0)
        tracker.heard(ID_1, 0.0)
        tracker.heard(ID_1, 25.0)
        self.assertEqual(tracker.members(50.0), {ID_1, ID_2})
        self.assertEqual(tracker.members(56.0), {ID_2})

    def test_forgotten_then_heard(self) -> None:
        tracker = ComponentTracker(ID_2, horizon=30.0)
        tracker.heard(ID_1, 0.0)
        self.assertEqual(tracker.members(31.0), {ID_2})
        tracker.heard(ID_1, 32.0)
        self.assertEqual(tracker.members(32.0), {ID_1, ID_2})

    def test_bounded(self) -> None:
        """
        Beacons with ever new origins keep at most max_nodes; the least
        recently heard is forgotten first.
        """
        tracker = ComponentTracker(ID_2, horizon=30.0, max_nodes=2)
        tracker.heard(ID_1, 0.0)
        tracker.heard(ID_3, 1.0)
        tracker.heard(ID_1, 2.0)
        tracker.heard(ID_4, 3.0)
        self.assertEqual(tracker.members(3.0), {ID_1, ID_2, ID_4})

    def test_own_beacon(self) -> None:
        tracker = ComponentTracker(ID_2, horizon=30.0)
        tracker.heard(ID_2, 0.0)
        self.assertEqual(tracker.members(100.0), {ID_2})

    def test_outsiders(self) -> None:
        tracker = ComponentTracker(ID_2, horizon=30.0)
        reachable = {ID_4: D, ID_3: C, ID_1: A}
        self.assertEqual(tracker.outsiders(reachable, 0.0), [C, D])

    def test_outsiders_sorted_by_id(self) -> None:
        tracker = ComponentTracker("0" * 32, horizon=30.0)
        reachable = {"f" * 32: A, "a" * 32: B, ID_4: C, ID_1: D}
        self.assertEqual(tracker.outsiders(reachable, 0.0), [D, C, B, A])

    def test_members_are_no_outsiders(self) -> None:
        tracker = ComponentTracker(ID_1, horizon=30.0)
        tracker.heard(ID_3, 10.0)
        reachable = {ID_2: B, ID_3: C, ID_4: D}
        self.assertEqual(tracker.outsiders(reachable, 20.0), [B, D])
        self.assertEqual(tracker.outsiders(reachable, 40.0), [B, D])
        self.assertEqual(tracker.outsiders(reachable, 41.0), [B, C, D])

    def test_own_id_is_no_outsider(self) -> None:
        tracker = ComponentTracker(ID_2, horizon=30.0)
        self.assertEqual(tracker.outsiders({ID_2: B}, 0.0), [])

    def test_one_side_of_a_pair(self) -> None:
        """
        Of two nodes in different components, the one with the smaller id
        dials the other at once.
        """
        low = ComponentTracker(ID_1, horizon=30.0)
        high = ComponentTracker(ID_4, horizon=30.0)
        self.assertEqual(low.outsiders({ID_4: D}, 0.0), [D])
        self.assertEqual(high.outsiders({ID_1: A}, 0.0), [])

    def test_other_side_after_a_horizon(self) -> None:
        """
        The one with the greater id dials once the other has stayed outside
        for a horizon: the smaller may not know its address, or may be
        unable to reach it.
        """
        high = ComponentTracker(ID_4, horizon=30.0)
        self.assertEqual(high.outsiders({ID_1: A, ID_3: C}, 10.0), [])
        self.assertEqual(high.outsiders({ID_1: A, ID_3: C}, 39.5), [])
        self.assertEqual(high.outsiders({ID_1: A, ID_2: B, ID_3: C}, 40.0), [A, C])
        self.assertEqual(high.outsiders({ID_1: A, ID_2: B, ID_3: C}, 70.0), [A, B, C])

    def test_outside_time_starts_again_when_heard(self) -> None:
        """
        A node heard from is inside; when its beacons stop, it has to stay
        outside for a whole horizon again.
        """
        high = ComponentTracker(ID_4, horizon=30.0)
        self.assertEqual(high.outsiders({ID_1: A}, 0.0), [])
        high.heard(ID_1, 20.0)
        self.assertEqual(high.outsiders({ID_1: A}, 35.0), [])
        self.assertEqual(high.outsiders({ID_1: A}, 51.0), [])
        self.assertEqual(high.outsiders({ID_1: A}, 80.0), [])
        self.assertEqual(high.outsiders({ID_1: A}, 81.0), [A])

    def test_outside_time_starts_again_when_unreachable(self) -> None:
        """
        A node that was not reachable at the last look has to stay outside
        for a whole horizon from when it is reachable again.
        """
        high = ComponentTracker(ID_4, horizon=30.0)
        self.assertEqual(high.outsiders({ID_1: A}, 0.0), [])
        self.assertEqual(high.outsiders({}, 20.0), [])
        self.assertEqual(high.outsiders({ID_1: A}, 30.0), [])
        self.assertEqual(high.outsiders({ID_1: A}, 60.0), [A])

    def test_nothing_reachable(self) -> None:
        tracker = ComponentTracker(ID_1, horizon=30.0)
        tracker.heard(ID_2, 0.0)
        self.assertEqual(tracker.outsiders({}, 0.0), [])


class NormalizeHostTests(SynchronousTestCase):
    def test_mapped_ipv4(self) -> None:
        self.assertEqual(normalize_host("::ffff:127.0.0.1"), "127.0.0.1")
        self.assertEqual(normalize_host("::ffff:192.0.2.1"), "192.0.2.1")

    def test_others_unchanged(self) -> None:
        for host in ("::1", "127.0.0.1", "2001:db8::5", "localhost", "node.example",
                     "::ffff:7f00:1", ""):
            self.assertEqual(normalize_host(host), host)
