"""
Tests for L{dtable.table}.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dtable.canonical import canonical_bytes, hash_bytes
from dtable.table import (
    EMPTY_ROOT,
    LEAF_MAX,
    ChildSummary,
    NodeSummary,
    Table,
    root_of,
)


def entry(obj: dict[str, Any]) -> tuple[str, dict[str, Any], bytes]:
    """
    The (hash, object, bytes) triple the table takes.
    """
    data = canonical_bytes(obj)
    return hash_bytes(data), obj, data


def crowded_hash(rng: random.Random) -> str:
    """
    A hash whose first digits come from a small alphabet, so that a few
    hundred of them build a tree several levels deep.
    """
    head = "".join(rng.choice("01") for _ in range(3))
    return head + "".join(rng.choice("0123456789abcdef") for _ in range(61))


def make_pool(size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = {crowded_hash(rng) for _ in range(size)}
    return sorted(pool)


POOL = make_pool(400, 1)

seeds = st.integers(0, 2**32)

hash_sets = st.builds(
    lambda size, seed: random.Random(seed).sample(POOL, size),
    st.integers(0, len(POOL)),
    seeds,
)
"""Sets of hashes from POOL, of any size up to several levels of tree."""

histories = st.lists(
    st.tuples(
        st.sampled_from([0.1, 0.5, 0.6, 0.9]),
        st.integers(0, 300),
    ),
    max_size=6,
)
"""Phases of a history: the chance that a step adds, and the number of steps."""


def reference_root(hashes: Iterable[str], prefix: str = "") -> str:
    """
    The root as the design states it, written as plainly as possible.
    """
    under = sorted(h for h in set(hashes) if h.startswith(prefix))
    if len(under) <= LEAF_MAX:
        return hashlib.sha256(b"L" + b"".join(bytes.fromhex(h) for h in under)).hexdigest()
    children = [
        bytes.fromhex(reference_root(under, prefix + digit))
        for digit in "0123456789abcdef"
    ]
    return hashlib.sha256(b"N" + b"".join(children)).hexdigest()


def table_of(hashes: Iterable[str]) -> Table:
    table = Table()
    for h in hashes:
        table.add(h)
    return table


def check_tree(test: SynchronousTestCase, table: Table, prefix: str = "") -> int:
    """
    Walk the table's tree through node() and children() and check every
    node against the rules: internal exactly when more than LEAF_MAX hashes,
    digests by the formula, counts adding up, leaf_hashes agreeing.

    @return: the number of hashes under C{prefix}.
    """
    kind, digest, count = table.node(prefix)
    hashes = table.leaf_hashes(prefix)
    test.assertEqual(len(hashes), count)
    test.assertTrue(all(h.startswith(prefix) for h in hashes))
    if kind == "internal":
        test.assertGreater(count, LEAF_MAX)
        children = table.children(prefix)
        test.assertEqual([c.prefix for c in children], [prefix + d for d in "0123456789abcdef"])
        for child in children:
            test.assertEqual(table.node(child.prefix)[1:], (child.digest, child.count))
        expected = hashlib.sha256(
            b"N" + b"".join(bytes.fromhex(c.digest) for c in children)
        ).hexdigest()
        test.assertEqual(digest, expected)
        test.assertEqual(sum(check_tree(test, table, c.prefix) for c in children), count)
    else:
        test.assertEqual(kind, "leaf" if count else "empty")
        test.assertLessEqual(count, LEAF_MAX)
        test.assertEqual(
            digest,
            hashlib.sha256(b"L" + b"".join(bytes.fromhex(h) for h in hashes)).hexdigest(),
        )
    return count


def reconcile(a: Table, b: Table, prefix: str = "") -> tuple[set[str], set[str], int]:
    """
    Find what differs between two tables the way the replication protocol
    will: compare digests from the root down and list hashes only where two
    leaves differ.

    @return: hashes only in C{a}, hashes only in C{b}, and how many prefixes
        were compared.
    """
    node_a, node_b = a.node(prefix), b.node(prefix)
    if node_a.digest == node_b.digest:
        return set(), set(), 1
    if node_a.kind != "internal" and node_b.kind != "internal":
        in_a, in_b = set(a.leaf_hashes(prefix)), set(b.leaf_hashes(prefix))
        return in_a - in_b, in_b - in_a, 1
    only_a: set[str] = set()
    only_b: set[str] = set()
    visited = 1
    for child_a, child_b in zip(a.children(prefix), b.children(prefix)):
        if child_a.digest != child_b.digest:
            more_a, more_b, seen = reconcile(a, b, child_a.prefix)
            only_a |= more_a
            only_b |= more_b
            visited += seen
    return only_a, only_b, visited


class TableSetTests(SynchronousTestCase):
    """
    The table as a set of hashes.
    """

    def test_add(self) -> None:
        table = Table()
        h = entry({"name": "www"})[0]
        self.assertTrue(table.add(h))
        self.assertEqual(len(table), 1)
        self.assertIn(h, table)
        self.assertEqual(list(table), [h])
        self.assertEqual(table.hashes(), [h])

    def test_add_present(self) -> None:
        """
        Adding a hash the table holds is a no-op.
        """
        table = Table()
        h = entry({"name": "www"})[0]
        table.add(h)
        root = table.root()
        self.assertFalse(table.add(h))
        self.assertEqual(len(table), 1)
        self.assertEqual(table.root(), root)

    def test_add_not_a_hash(self) -> None:
        """
        A malformed hash is refused and changes nothing.
        """
        table = Table()
        h = entry({"a": 1})[0]
        for bad in [h.upper(), h[:-1], h + "0", "", b"x" * 64]:
            with self.assertRaises(ValueError):
                table.add(bad)  # type: ignore[arg-type]
        self.assertEqual(len(table), 0)
        self.assertEqual(table.root(), EMPTY_ROOT)

    def test_remove(self) -> None:
        """
        remove says whether it removed anything.
        """
        table = Table()
        h = entry({"name": "www"})[0]
        table.add(h)
        self.assertTrue(table.remove(h))
        self.assertNotIn(h, table)
        self.assertEqual(len(table), 0)
        self.assertFalse(table.remove(h))
        self.assertFalse(table.remove("not a hash"))
        self.assertEqual(table.root(), EMPTY_ROOT)

    def test_hashes_sorted(self) -> None:
        table = Table()
        hashes = [entry({"n": n})[0] for n in range(300)]
        for h in hashes:
            table.add(h)
        self.assertEqual(table.hashes(), sorted(hashes))
        self.assertEqual(set(table), set(hashes))

    def test_clear(self) -> None:
        """
        clear empties the table, and it can be filled again.
        """
        table = table_of(POOL)
        table.clear()
        self.assertEqual(len(table), 0)
        self.assertEqual(table.hashes(), [])
        self.assertEqual(table.root(), EMPTY_ROOT)
        self.assertEqual(table.node(""), NodeSummary("empty", EMPTY_ROOT, 0))
        table.add(POOL[0])
        self.assertEqual(table.root(), root_of([POOL[0]]))

    def test_apply(self) -> None:
        """
        apply removes, then adds, and reports only what changed.
        """
        table = Table()
        one, two, three = (entry({"n": n})[0] for n in (1, 2, 3))
        table.add(one)
        table.add(two)
        added, removed = table.apply(adds=[three, one, three], removes=[two, two, three])
        self.assertEqual(added, [three])
        self.assertEqual(removed, [two])
        self.assertEqual(set(table), {one, three})

    def test_apply_remove_then_add(self) -> None:
        """
        A hash removed and added in one change is there afterwards and is
        reported both ways.
        """
        table = Table()
        one = entry({"n": 1})[0]
        table.add(one)
        added, removed = table.apply([one], [one])
        self.assertEqual((added, removed), ([one], [one]))
        self.assertIn(one, table)

    def test_apply_invalid_changes_nothing(self) -> None:
        """
        A malformed hash among the adds fails the whole change before any of
        it is applied.
        """
        table = Table()
        one, two = entry({"n": 1})[0], entry({"n": 2})[0]
        table.add(one)
        root = table.root()
        class Text(str):
            pass

        # The hashes of a change are checked all at once; each kind of bad
        # one is still found, and named.
        for bad in ["nope", two.upper(), two[:-1], two + "0", "g" * 64, "\u0660" * 64,
                    b"x" * 64, None, Text(two)]:
            with self.subTest(bad=bad):
                with self.assertRaisesRegex(ValueError, "not a hash: " + re.escape(repr(bad))):
                    table.apply([two, bad, entry({"n": 3})[0]], [one])
                self.assertEqual(set(table), {one})
                self.assertEqual(table.root(), root)


class RootTests(SynchronousTestCase):
    """
    The Merkle root depends on the set of hashes alone.
    """

    def test_empty(self) -> None:
        """
        The empty root is the digest of an empty leaf.
        """
        self.assertEqual(EMPTY_ROOT, hashlib.sha256(b"L").hexdigest())
        self.assertEqual(
            EMPTY_ROOT, "72dfcfb0c470ac255cde83fb8fe38de8a128188e03ea5ba5b2a93adbea1062fa"
        )
        self.assertEqual(Table().root(), EMPTY_ROOT)
        self.assertEqual(root_of([]), EMPTY_ROOT)

    def test_leaf(self) -> None:
        """
        Up to LEAF_MAX hashes the root is one leaf over the sorted raw
        hashes.
        """
        hashes = POOL[:LEAF_MAX]
        expected = hashlib.sha256(b"L" + b"".join(bytes.fromhex(h) for h in hashes))
        table = table_of(reversed(hashes))
        self.assertEqual(table.root(), expected.hexdigest())
        self.assertEqual(table.node("").kind, "leaf")

    def test_internal(self) -> None:
        """
        With LEAF_MAX + 1 hashes the root is internal, over 16 children.
        """
        hashes = POOL[: LEAF_MAX + 1]
        table = table_of(hashes)
        self.assertEqual(table.node(""), NodeSummary("internal", table.root(), LEAF_MAX + 1))
        self.assertEqual(table.root(), reference_root(hashes))

    def test_root_of_matches_reference(self) -> None:
        """
        root_of agrees with the plain statement of the rule at every size up
        to a few levels deep, and repeats in its input do not count.
        """
        for size in range(0, len(POOL) + 1, 7):
            hashes = POOL[:size]
            self.assertEqual(root_of(hashes), reference_root(hashes), size)
        self.assertEqual(root_of(POOL + POOL[:10]), root_of(POOL))

    def test_root_of_not_a_hash(self) -> None:
        """
        root_of refuses anything that is not a hash.
        """
        with self.assertRaises(ValueError):
            root_of([POOL[0], POOL[1].upper()])

    @given(hash_sets, seeds)
    @settings(max_examples=60, deadline=None)
    def test_insertion_order(self, hashes: list[str], seed: int) -> None:
        """
        Any order of adding a set gives the same root, root_of's.
        """
        shuffled = list(hashes)
        random.Random(seed).shuffle(shuffled)
        expected = root_of(hashes)
        self.assertEqual(table_of(hashes).root(), expected)
        self.assertEqual(table_of(shuffled).root(), expected)

    @given(hash_sets, seeds)
    @settings(max_examples=60, deadline=None)
    def test_load(self, hashes: list[str], seed: int) -> None:
        """
        load() builds the table adding one by one would: the same tree
        under the same rules, the same root and hashes, and one that goes
        on changing the same way. It replaces what the table held.
        """
        shuffled = list(hashes) + list(hashes[:5])
        random.Random(seed).shuffle(shuffled)
        table = table_of(POOL[:100])
        table.load(shuffled)
        self.assertEqual(table.root(), root_of(hashes))
        self.assertEqual(table.hashes(), sorted(set(hashes)))
        self.assertEqual(len(table), len(set(hashes)))
        check_tree(self, table)
        added = table_of(hashes)
        for h in POOL[:50] + hashes[::3]:
            self.assertEqual(table.add(h), added.add(h))
        for h in hashes[::2]:
            self.assertEqual(table.remove(h), added.remove(h))
        self.assertEqual(table.root(), added.root())
        check_tree(self, table)

    def test_load_not_a_hash(self) -> None:
        """
        load() refuses a list holding anything that is not a hash, and the
        table keeps what it held.
        """
        table = table_of(POOL[:10])
        root = table.root()
        with self.assertRaisesRegex(ValueError, "not a hash"):
            table.load(POOL[10:20] + [POOL[20].upper()])
        self.assertEqual(table.root(), root)
        self.assertEqual(len(table), 10)

    @given(histories, seeds)
    @settings(max_examples=60, deadline=None)
    def test_history(self, phases: list[tuple[float, int]], seed: int) -> None:
        """
        Any history of adds and removes, present or absent, gives the root of
        the final set.
        """
        rng = random.Random(seed)
        table = Table()
        present: set[str] = set()
        for add_chance, steps in phases:
            for _ in range(steps):
                h = rng.choice(POOL)
                if rng.random() < add_chance:
                    self.assertEqual(table.add(h), h not in present)
                    present.add(h)
                else:
                    self.assertEqual(table.remove(h), h in present)
                    present.discard(h)
            self.assertEqual(table.root(), root_of(present))
        self.assertEqual(table.root(), reference_root(present))
        self.assertEqual(len(table), len(present))

    def test_grow_and_shrink(self) -> None:
        """
        Through many random adds and removes that split leaves and collapse
        internal nodes over and over, the incremental root stays equal to
        root_of and the tree keeps its rules.
        """
        rng = random.Random(7)
        pool = make_pool(1500, 2)
        table = Table()
        present: set[str] = set()
        # Grow to the whole pool, shrink to nothing, then wander around the
        # sizes where the root and its children split and collapse.
        phases = [(0.9, 4000), (0.1, 4000), (0.55, 6000), (0.45, 6000)]
        for step, (add_chance, steps) in enumerate(phases):
            for index in range(steps):
                h = rng.choice(pool)
                if rng.random() < add_chance:
                    table.add(h)
                    present.add(h)
                else:
                    table.remove(h)
                    present.discard(h)
                if index % 97 == 0:
                    self.assertEqual(table.root(), root_of(present))
            self.assertEqual(table.root(), root_of(present), step)
            self.assertEqual(check_tree(self, table), len(present))
        while present:
            table.remove(present.pop())
        self.assertEqual(table.root(), EMPTY_ROOT)
        self.assertEqual(table.node(""), NodeSummary("empty", EMPTY_ROOT, 0))

    def test_around_leaf_max(self) -> None:
        """
        A table whose size wanders around LEAF_MAX splits and collapses its
        root again and again, and its root is right after every step.
        """
        rng = random.Random(11)
        pool = POOL[: 2 * LEAF_MAX]
        table = Table()
        present: set[str] = set()
        kinds = set()
        for _ in range(3000):
            h = rng.choice(pool)
            if rng.random() < 0.5:
                table.add(h)
                present.add(h)
            else:
                table.remove(h)
                present.discard(h)
            self.assertEqual(table.root(), root_of(present))
            kinds.add(table.node("").kind)
        self.assertTrue(kinds >= {"leaf", "internal"}, kinds)

    def test_collapse(self) -> None:
        """
        Dropping back to LEAF_MAX hashes turns the root into a leaf again,
        with the same root as a table that never split.
        """
        table = table_of(POOL[: LEAF_MAX + 1])
        self.assertEqual(table.node("").kind, "internal")
        table.remove(POOL[LEAF_MAX])
        self.assertEqual(table.node("").kind, "leaf")
        self.assertEqual(table.root(), table_of(POOL[:LEAF_MAX]).root())

    def test_different_sets(self) -> None:
        """
        Sets that differ in any one hash have different roots.
        """
        roots = {root_of(POOL[:size]) for size in range(len(POOL) + 1)}
        self.assertEqual(len(roots), len(POOL) + 1)
        full = root_of(POOL)
        for index in range(0, len(POOL), 13):
            self.assertNotEqual(root_of(POOL[:index] + POOL[index + 1 :]), full)
        self.assertNotEqual(root_of(POOL[:3]), root_of(POOL[1:4]))


class TreeViewTests(SynchronousTestCase):
    """
    node(), children() and leaf_hashes() describe the tree the root is
    made of.
    """

    def test_consistent(self) -> None:
        """
        Every node reachable from the root obeys the rules and adds up to
        the root.
        """
        table = table_of(make_pool(3000, 3))
        self.assertEqual(table.node("").digest, table.root())
        self.assertEqual(check_tree(self, table), len(table))

    def test_below_a_leaf(self) -> None:
        """
        A prefix under a leaf is described by the leaf its hashes would form.
        """
        hashes = POOL[:10]
        table = table_of(hashes)
        for prefix in ["0", "00", hashes[3][:5], hashes[3], "f", "ffff"]:
            under = [h for h in hashes if h.startswith(prefix)]
            kind, digest, count = table.node(prefix)
            self.assertEqual(table.leaf_hashes(prefix), under)
            self.assertEqual(count, len(under))
            self.assertEqual(digest, root_of(under))
            self.assertEqual(kind, "leaf" if under else "empty")

    def test_children_of_leaf(self) -> None:
        """
        children() of a leaf splits its hashes by the next digit, which is
        what an internal node over the same hashes would show.
        """
        small = table_of(POOL[:LEAF_MAX])
        big = table_of(POOL[: LEAF_MAX + 1])
        for prefix in ["", "0", "01"]:
            leafy = small.children(prefix)
            self.assertEqual(len(leafy), 16)
            self.assertEqual(sum(child.count for child in leafy), small.node(prefix).count)
        self.assertEqual(
            [c for c in small.children("") if c.prefix != POOL[LEAF_MAX][0]],
            [c for c in big.children("") if c.prefix != POOL[LEAF_MAX][0]],
        )
        self.assertEqual(
            small.children("f"), [ChildSummary("f" + d, EMPTY_ROOT, 0) for d in "0123456789abcdef"]
        )

    def test_bad_prefix(self) -> None:
        """
        Prefixes must be lowercase hex, at most a hash long; a whole hash has
        no children.
        """
        table = table_of(POOL)
        for bad in ["A", "0x", "g", " ", "0" * 65, None, b"0"]:
            for method in [table.node, table.children, table.leaf_hashes]:
                with self.assertRaises(ValueError):
                    method(bad)  # type: ignore[arg-type]
        self.assertEqual(table.node(POOL[5]), NodeSummary("leaf", root_of([POOL[5]]), 1))
        with self.assertRaises(ValueError):
            table.children(POOL[5])

    @given(hash_sets, hash_sets)
    @settings(max_examples=40, deadline=None)
    def test_reconcile(self, first: list[str], second: list[str]) -> None:
        """
        Walking two tables from the root and descending only where digests
        differ finds exactly the hashes one holds and the other does not,
        whatever shapes their trees have.
        """
        a, b = table_of(first), table_of(second)
        only_a, only_b, _ = reconcile(a, b)
        self.assertEqual(only_a, set(first) - set(second))
        self.assertEqual(only_b, set(second) - set(first))

    def test_reconcile_small_difference(self) -> None:
        """
        One differing hash in a large table is found by comparing a handful
        of prefixes per level, not the whole table.
        """
        pool = [hashlib.sha256(b"%d" % n).hexdigest() for n in range(20000)]
        a = table_of(pool)
        b = table_of(pool[:-1])
        only_a, only_b, visited = reconcile(a, b)
        self.assertEqual((only_a, only_b), ({pool[-1]}, set()))
        self.assertLessEqual(visited, 6)


class PageTests(SynchronousTestCase):
    """
    Paging through the hashes in order, without listing them all.
    """

    @settings(max_examples=60, deadline=None)
    @given(count=st.integers(0, 600), limit=st.integers(1, 250),
           after=st.text(alphabet="0123456789abcdef", max_size=66))
    def test_page_is_the_sorted_slice(self, count: int, limit: int, after: str) -> None:
        table = Table()
        hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(count)]
        for h in hashes:
            table.add(h)
        expected = [h for h in sorted(hashes) if h > after][:limit]
        self.assertEqual(table.page(after, limit), expected)

    def test_walk_all_pages(self) -> None:
        table = Table()
        hashes = sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(1000))
        for h in hashes:
            table.add(h)
        seen: list[str] = []
        after = ""
        while True:
            page = table.page(after, 77)
            if not page:
                break
            seen.extend(page)
            after = page[-1]
        self.assertEqual(seen, hashes)
        self.assertEqual(table.page("", 0), [])
