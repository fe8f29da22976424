"""
Tests for L{dtable.store}: the L{IStore} contract, kept by both
L{MemoryStore} and L{SqliteStore}, and what only the SQLite file does:
surviving a reopen, write-ahead logging, rolling back a failed commit and
refusing files it cannot read.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dtable.canonical import canonical_bytes, hash_bytes
from dtable.interfaces import IStore
from dtable import store as store_module
from dtable.store import (
    DB_NAME,
    PAGE_SIZE,
    BackgroundSqliteStore,
    SCHEMA_VERSION,
    MemoryStore,
    SqliteStore,
    StoreClosed,
    StoreError,
    default_data_dir,
    empty_head,
)
from dtable.table import EMPTY_ROOT, root_of
from dtable.wire import Head

SIG = "5" * 128
MASTER = "6" * 64


def entry(n: int) -> tuple[str, bytes]:
    """
    The (hash, canonical bytes) of a small object numbered C{n}.
    """
    data = canonical_bytes({"n": n, "name": f"object {n}"})
    return hash_bytes(data), data


def entries(*ns: int) -> list[tuple[str, bytes]]:
    return [entry(n) for n in ns]


def head_of(rev: int, hashes: list[str]) -> Head:
    return Head(rev=rev, base=rev - 1, root=root_of(hashes), sig=SIG, master=MASTER)


ABSENT = entry(-1)[0]


class StoreContract:
    """
    The L{IStore} contract. A subclass is a SynchronousTestCase that
    provides C{new_store()}, returning a store that is not open yet.
    """

    def new_store(self) -> Any:
        raise NotImplementedError

    def opened(self) -> Any:
        store = self.new_store()
        store.open()
        self.addCleanup(store.close)
        return store

    def state(self, store: Any) -> tuple[Head, list[tuple[str, bytes]]]:
        return store.head(), sorted(store.items())

    def commit(self, store: Any, rev: int, adds: list[tuple[str, bytes]],
               removes: Iterable[str] = ()) -> Head:
        """
        Commit C{adds} and C{removes} with a head whose root is that of the
        resulting set, as a node would.
        """
        after = (set(store.hashes()) - set(removes)) | {h for h, _ in adds}
        head = head_of(rev, sorted(after))
        store.commit(head, adds, list(removes))
        return head

    def test_interface(self) -> None:
        verifyObject(IStore, self.new_store())

    def test_new_store(self) -> None:
        """
        A new store is at revision 0 with the empty root and no objects.
        """
        store = self.opened()
        self.assertEqual(store.head(), Head(rev=0, base=0, root=EMPTY_ROOT))
        self.assertEqual(store.head(), empty_head())
        self.assertEqual(store.count(), 0)
        self.assertEqual(list(store.hashes()), [])
        self.assertEqual(list(store.items()), [])
        self.assertIsNone(store.get(ABSENT))
        self.assertEqual(store.get_many([ABSENT]), {})

    def test_commit_and_read_back(self) -> None:
        store = self.opened()
        adds = entries(1, 2, 3)
        head = self.commit(store, 1, adds)
        self.assertEqual(store.head(), head)
        self.assertEqual(store.count(), 3)
        self.assertEqual(sorted(store.hashes()), sorted(h for h, _ in adds))
        self.assertEqual(sorted(store.items()), sorted(adds))
        for h, data in adds:
            self.assertEqual(store.get(h), data)
        self.assertIsNone(store.get(ABSENT))
        self.assertEqual(store.get_many([adds[0][0], ABSENT, adds[2][0]]),
                         dict([adds[0], adds[2]]))
        self.assertEqual(store.get_many([]), {})
        self.assertEqual(root_of(store.hashes()), store.head().root)

    def test_iterables_are_streamed(self) -> None:
        """
        hashes() and items() return iterators, not lists built in advance.
        """
        store = self.opened()
        self.commit(store, 1, entries(1, 2))
        for iterable in (store.hashes(), store.items()):
            self.assertIs(iter(iterable), iterable)

    def test_get_many_thousands(self) -> None:
        """
        get_many takes any iterable of more hashes than one query carries
        and returns exactly the stored ones among them.
        """
        store = self.opened()
        stored = entries(*range(0, 2400, 2))
        self.commit(store, 1, stored)
        asked = (entry(n)[0] for n in range(2400))
        self.assertEqual(store.get_many(asked), dict(stored))

    def test_removes_and_re_adds(self) -> None:
        store = self.opened()
        a, b, c, d = entries(1, 2, 3, 4)
        self.commit(store, 1, [a, b, c])
        head = self.commit(store, 2, [d], [a[0], c[0]])
        self.assertEqual(self.state(store), (head, sorted([b, d])))
        self.assertIsNone(store.get(a[0]))
        self.assertEqual(store.count(), 2)
        head = self.commit(store, 3, [a], [])
        self.assertEqual(self.state(store), (head, sorted([a, b, d])))
        head = self.commit(store, 4, [], [a[0], b[0], d[0]])
        self.assertEqual(self.state(store), (head, []))
        self.assertEqual(store.count(), 0)

    def test_add_present_keeps_bytes(self) -> None:
        """
        Adding a hash that is stored is a no-op: the stored bytes stay.
        """
        store = self.opened()
        a = entry(1)
        self.commit(store, 1, [a])
        head = head_of(2, [a[0]])
        store.commit(head, [(a[0], b"other bytes")], [])
        self.assertEqual(self.state(store), (head, [a]))

    def test_duplicate_adds(self) -> None:
        store = self.opened()
        a = entry(1)
        head = head_of(1, [a[0]])
        store.commit(head, [a, a], [])
        self.assertEqual(self.state(store), (head, [a]))

    def test_remove_absent(self) -> None:
        """
        Removing a hash that is not stored is a no-op.
        """
        store = self.opened()
        a = entry(1)
        self.commit(store, 1, [a])
        head = head_of(2, [a[0]])
        store.commit(head, [], [ABSENT, ABSENT])
        self.assertEqual(self.state(store), (head, [a]))

    def test_remove_and_add_same_hash(self) -> None:
        """
        Removes come first: a hash both removed and added is stored after.
        """
        store = self.opened()
        a = entry(1)
        self.commit(store, 1, [a])
        head = head_of(2, [a[0]])
        store.commit(head, [a], [a[0]])
        self.assertEqual(self.state(store), (head, [a]))

    def test_empty_commit_moves_head(self) -> None:
        store = self.opened()
        self.commit(store, 1, entries(1))
        head = Head(rev=7, base=1, root=store.head().root, sig=SIG, master=MASTER)
        store.commit(head, [], [])
        self.assertEqual(store.head(), head)

    def test_malformed_hash_refused(self) -> None:
        """
        A hash that is not 64 lowercase hex digits raises ValueError; a
        commit holding one changes nothing.
        """
        store = self.opened()
        self.commit(store, 1, entries(1, 2))
        before = self.state(store)
        good = entry(3)
        # Spaces between bytes, which bytes.fromhex skips, and digits of
        # other scripts are not hex digits either.
        for bad in ["zz" * 32, ABSENT.upper(), ABSENT[:-1], ABSENT + "0", "", b"x" * 64, None,
                    ABSENT[:60] + " ab ", "\u0660" * 64, "\N{LATIN SMALL LETTER E WITH ACUTE}" * 64]:
            with self.subTest(bad=bad):
                with self.assertRaises(ValueError):
                    store.commit(head_of(2, []), [good, (bad, b"{}")], [])
                with self.assertRaises(ValueError):
                    store.commit(head_of(2, []), [good], [entry(1)[0], bad])
                self.assertEqual(self.state(store), before)
                with self.assertRaises(ValueError):
                    store.get(bad)
                with self.assertRaises(ValueError):
                    store.get_many([ABSENT, bad])

    def test_data_must_be_bytes(self) -> None:
        store = self.opened()
        self.commit(store, 1, entries(1))
        before = self.state(store)
        h, data = entry(2)
        for bad in (data.decode(), bytearray(data), None):
            with self.subTest(bad=bad):
                with self.assertRaises(TypeError):
                    store.commit(head_of(2, []), [entry(3), (h, bad)], [entry(1)[0]])
                self.assertEqual(self.state(store), before)

    def assertAllClosed(self, store: Any) -> None:
        h = entry(1)[0]
        calls = [
            store.head, store.count, store.hashes, store.items,
            lambda: store.get(h), lambda: store.get_many([h]),
            lambda: store.commit(head_of(1, [h]), [entry(1)], []),
        ]
        for call in calls:
            with self.assertRaises(StoreClosed):
                call()

    def test_before_open(self) -> None:
        self.assertAllClosed(self.new_store())

    def test_after_close(self) -> None:
        store = self.opened()
        self.commit(store, 1, entries(1))
        store.close()
        self.assertAllClosed(store)

    def test_close_idempotent(self) -> None:
        store = self.new_store()
        store.close()
        store.open()
        store.close()
        store.close()
        self.assertAllClosed(store)

    def test_open_again(self) -> None:
        """
        A closed store opened again holds what it held.
        """
        store = self.opened()
        head = self.commit(store, 1, entries(1, 2))
        store.close()
        store.open()
        self.assertEqual(self.state(store), (head, sorted(entries(1, 2))))


class MemoryStoreTests(StoreContract, SynchronousTestCase):
    def new_store(self) -> MemoryStore:
        return MemoryStore()


def temp_dir(case: SynchronousTestCase) -> str:
    path = tempfile.mkdtemp(prefix="dtable-store-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


class SqliteStoreTests(StoreContract, SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)
        self.path = os.path.join(self.dir, "data", DB_NAME)

    def new_store(self) -> SqliteStore:
        return SqliteStore(self.path)

    def sqlite(self) -> sqlite3.Connection:
        """
        A separate connection to the file, for looking inside it.
        """
        db = sqlite3.connect(self.path)
        self.addCleanup(db.close)
        return db

    def test_constructor_does_no_io(self) -> None:
        store = self.new_store()
        self.assertEqual(store.path, self.path)
        self.assertFalse(os.path.exists(os.path.dirname(self.path)))

    def assert_sized_by_rows(self, size: Any, read: Any, expected: list[tuple[int, int]],
                             default: int) -> None:
        """
        C{size(store, rows)} sets what C{read(store)} reads to each value of
        C{expected} for its rows, and a reopened store reads C{default}
        until it is sized again.
        """
        store = self.opened()
        self.assertEqual(read(store), default)
        for rows, value in expected:
            size(store, rows)
            self.assertEqual(read(store), value, rows)
        size(store, expected[-2][0])
        store.close()
        store.open()
        self.assertEqual(read(store), default)
        size(store, expected[-2][0])
        self.assertEqual(read(store), expected[-2][1])

    def test_cache_grows_with_the_store(self) -> None:
        """
        size_cache gives SQLite 48 bytes of page cache per object, between
        its own 2 MiB and 64 MiB, and a reopened store starts from SQLite's
        default again.
        """
        self.assert_sized_by_rows(
            SqliteStore.size_cache,
            lambda store: -store._open_db().execute("PRAGMA cache_size").fetchone()[0],
            [(0, 2048), (40_000, 2048), (100_000, 4687), (10_000_000, 65536),
             (1_000_000, 46875), (1_000, 2048)],
            default=2000)

    def test_log_grows_with_the_store(self) -> None:
        """
        size_log has the log checkpointed per 160 bytes per object, between
        40 and 160 MiB, counted in the file's pages; a reopened store starts
        from SQLite's default again.
        """
        self.assert_sized_by_rows(
            SqliteStore.size_log,
            lambda store: store._open_db().execute("PRAGMA wal_autocheckpoint").fetchone()[0],
            [(0, 2560), (100_000, 2560), (500_000, 4882), (10_000_000, 10240),
             (1_000_000, 9765), (1_000, 2560)],
            default=1000)

    def test_log_of_a_file_of_small_pages(self) -> None:
        """
        In a file of 4 KiB pages the same bytes are four times the pages.
        """
        self.patch(store_module, "PAGE_SIZE", 4096)
        store = self.opened()
        store.size_log(200_000)
        self.assertEqual(
            store._open_db().execute("PRAGMA wal_autocheckpoint").fetchone()[0], 10240)
        store.size_log(1_000_000)
        self.assertEqual(
            store._open_db().execute("PRAGMA wal_autocheckpoint").fetchone()[0], 39062)

    def test_open_creates_directories(self) -> None:
        self.path = os.path.join(self.dir, "a", "b", "c", DB_NAME)
        self.opened()
        self.assertTrue(os.path.isfile(self.path))

    def test_in_directory(self) -> None:
        store = SqliteStore.in_directory(self.dir)
        self.assertEqual(store.path, os.path.join(self.dir, DB_NAME))

    def test_default_data_dir(self) -> None:
        self.assertEqual(default_data_dir(9100), os.path.join(os.getcwd(), "dtable-9100"))

    def test_survives_reopen(self) -> None:
        """
        A new instance on the same file reads the committed state.
        """
        store = self.opened()
        self.commit(store, 1, entries(1, 2, 3))
        head = self.commit(store, 2, entries(4), [entry(2)[0]])
        expected = self.state(store)
        store.close()
        again = self.opened()
        self.assertEqual(self.state(again), expected)
        self.assertEqual(again.head(), head)
        self.assertEqual(again.count(), 3)
        self.assertEqual(root_of(again.hashes()), head.root)

    def test_layout(self) -> None:
        """
        The file is in write-ahead-log mode with pages of PAGE_SIZE bytes,
        carries the schema version and keys objects by the hash's 32 raw
        bytes.
        """
        store = self.opened()
        self.commit(store, 1, entries(1))
        db = self.sqlite()
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(PAGE_SIZE, 16384)
        self.assertEqual(db.execute("PRAGMA page_size").fetchone()[0], PAGE_SIZE)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(db.execute("SELECT hash FROM objects").fetchall(),
                         [(bytes.fromhex(entry(1)[0]),)])

    def test_page_size_of_an_existing_file_is_kept(self) -> None:
        """
        A file created with another page size (as earlier versions made
        them, 4 KiB) keeps it: it opens with its objects and takes commits.
        """
        self.patch(store_module, "PAGE_SIZE", 4096)
        store = self.opened()
        head = self.commit(store, 1, entries(1, 2))
        store.close()
        self.patch(store_module, "PAGE_SIZE", 16384)
        store = self.opened()
        self.assertEqual(self.state(store), (head, sorted(entries(1, 2))))
        self.commit(store, 2, entries(3), [entry(1)[0]])
        self.assertEqual(sorted(store.items()), sorted(entries(2, 3)))
        self.assertEqual(self.sqlite().execute("PRAGMA page_size").fetchone()[0], 4096)

    def test_failed_commit_rolls_back(self) -> None:
        """
        A commit that fails after it has written rows (a malformed hash
        after hundreds of good ones, after the removes) leaves the previous
        state whole, in this instance and in the file, and the store goes on
        working.
        """
        store = self.opened()
        self.commit(store, 1, entries(*range(100)))
        before = self.state(store)
        adds = entries(*range(1000, 1600)) + [("not a hash", b"{}")]
        removes = [entry(n)[0] for n in range(50)]
        with self.assertRaises(ValueError):
            store.commit(head_of(2, []), adds, removes)
        self.assertEqual(self.state(store), before)
        store.close()
        store = self.opened()
        self.assertEqual(self.state(store), before)
        head = self.commit(store, 2, entries(5000), removes)
        self.assertEqual(store.head(), head)
        self.assertEqual(store.count(), 51)

    def test_version_1_is_upgraded(self) -> None:
        """
        A file written by schema version 1 (objects in a WITHOUT ROWID table
        keyed by hash) opens with its head and objects, rewritten to the
        current layout.
        """
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("CREATE TABLE objects (hash BLOB PRIMARY KEY CHECK (length(hash) = 32),"
                   " data BLOB NOT NULL) WITHOUT ROWID")
        db.execute("CREATE TABLE head (id INTEGER PRIMARY KEY CHECK (id = 0), rev INTEGER "
                   "NOT NULL, base INTEGER NOT NULL, root TEXT NOT NULL, sig TEXT NOT NULL, "
                   "master TEXT NOT NULL)")
        stored = entries(1, 2, 3)
        head = head_of(4, sorted(h for h, _ in stored))
        db.executemany("INSERT INTO objects VALUES (?, ?)",
                       [(bytes.fromhex(h), data) for h, data in stored])
        db.execute("INSERT INTO head VALUES (0, ?, ?, ?, ?, ?)",
                   (head.rev, head.base, head.root, head.sig, head.master))
        db.execute("PRAGMA user_version = 1")
        db.close()
        store = self.opened()
        self.assertEqual(self.state(store), (head, sorted(stored)))
        self.commit(store, 5, entries(4), [entry(1)[0]])
        self.assertEqual(sorted(store.items()), sorted(entries(2, 3, 4)))
        db = self.sqlite()
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        columns = [row[1] for row in db.execute("PRAGMA table_info(objects)")]
        self.assertEqual(columns, ["id", "hash", "data"])

    def test_newer_schema_refused(self) -> None:
        """
        A file from a newer version is refused, naming the file, and left
        as it was.
        """
        store = self.opened()
        store.close()
        db = self.sqlite()
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.close()
        with open(self.path, "rb") as f:
            before = f.read()
        e = self.assertRaises(StoreError, store.open)
        self.assertIn(self.path, str(e))
        self.assertIn("newer version", str(e))
        self.assertEqual(e.path, self.path)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertRaises(StoreClosed, store.head)

    def test_garbage_refused(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "wb") as f:
            f.write(os.urandom(8192))
        store = self.new_store()
        e = self.assertRaises(StoreError, store.open)
        self.assertIn(self.path, str(e))
        self.assertIn("not a database", str(e))
        self.assertRaises(StoreClosed, store.head)

    def test_foreign_sqlite_refused(self) -> None:
        """
        An SQLite file that dtable did not write is refused, not adopted.
        """
        os.makedirs(os.path.dirname(self.path))
        db = self.sqlite()
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()
        db.close()
        e = self.assertRaises(StoreError, self.new_store().open)
        self.assertIn(self.path, str(e))
        self.assertIn("something else", str(e))

    def test_directory_in_the_way(self) -> None:
        """
        A path that cannot be opened as a file is refused with StoreError.
        """
        os.makedirs(self.path)
        e = self.assertRaises(StoreError, self.new_store().open)
        self.assertIn(self.path, str(e))

    def test_closed_names_path(self) -> None:
        e = self.assertRaises(StoreClosed, self.new_store().head)
        self.assertIn(self.path, str(e))

    def test_two_instances_share_the_file(self) -> None:
        """
        A second instance reads what the first committed (as a node's
        inspection tools would).
        """
        one = self.opened()
        two = self.opened()
        head = self.commit(one, 1, entries(1, 2))
        self.assertEqual(self.state(two), (head, sorted(entries(1, 2))))


class BackgroundSqliteStoreTests(StoreContract, SynchronousTestCase):
    """
    The store a node uses by default: SQLite written by a thread of its own.
    It keeps the whole contract, reads its queued commits before they are
    on disk, and has them all on disk once closed.
    """

    def setUp(self) -> None:
        self.dir = temp_dir(self)
        self.path = os.path.join(self.dir, "data", DB_NAME)

    def new_store(self) -> BackgroundSqliteStore:
        return BackgroundSqliteStore(self.path)

    def test_queued_commits_read_as_done(self) -> None:
        gate = threading.Event()

        class Held(SqliteStore):
            def commit(self, head, adds, removes) -> None:
                # Bounded: the test fails rather than hangs if never released.
                gate.wait(30)
                super().commit(head, adds, removes)

        store = BackgroundSqliteStore(self.path, writer_factory=Held)
        store.open()
        self.addCleanup(store.close)
        # Heads made here: the contract's commit() reads the store's hashes,
        # which waits for the writer.
        first = head_of(1, sorted(h for h, _ in entries(1, 2, 3)))
        store.commit(first, entries(1, 2, 3), [])
        second = head_of(2, sorted(h for h, _ in entries(1, 3, 4)))
        store.commit(second, entries(4), [entry(2)[0]])
        self.assertEqual(store.head(), second)
        self.assertEqual(store.get(entry(4)[0]), entry(4)[1])
        self.assertIsNone(store.get(entry(2)[0]))
        self.assertEqual(store.get_many([entry(1)[0], entry(2)[0], entry(4)[0]]),
                         dict([entry(1), entry(4)]))
        # Nothing of them is on disk yet.
        on_disk = sqlite3.connect(self.path)
        self.addCleanup(on_disk.close)
        self.assertEqual(on_disk.execute("SELECT rev FROM head").fetchone()[0], 0)
        self.assertEqual(store.pending, 2)
        gate.set()
        store.count()  # waits for the writer
        self.assertEqual(store.pending, 0)
        store.close()
        self.assertEqual(on_disk.execute("SELECT rev FROM head").fetchone()[0], 2)
        again = SqliteStore(self.path)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual(again.head(), second)
        self.assertEqual(sorted(again.items()), sorted(entries(1, 3, 4)))

    def test_writer_sizes_cache_and_log_as_the_store_grows(self) -> None:
        """
        The writer sizes SQLite's cache and checkpoint interval for the
        objects stored when it starts and after every transaction.
        """
        sized: list[tuple[str, int]] = []

        class Sizing(SqliteStore):
            def size_cache(self, rows: int) -> None:
                sized.append(("cache", rows))
                super().size_cache(rows)

            def size_log(self, rows: int) -> None:
                sized.append(("log", rows))
                super().size_log(rows)

        store = BackgroundSqliteStore(self.path, writer_factory=Sizing)
        store.open()
        self.addCleanup(store.close)
        store.commit(head_of(1, sorted(h for h, _ in entries(1, 2, 3))), entries(1, 2, 3), [])
        store.close()  # the writer thread has ended
        self.assertEqual(sized, [("cache", 0), ("log", 0), ("cache", 3), ("log", 3)])

    def test_queued_commits_written_as_one(self) -> None:
        """
        Commits that queue up while the writer is busy are written in one
        transaction, with the effect of each in order: an object added then
        removed is gone, one removed then added again is there.
        """
        gate = threading.Event()
        written: list[tuple[int, list[str], list[str]]] = []

        class Recorded(SqliteStore):
            def commit(self, head, adds, removes) -> None:
                gate.wait(30)
                written.append((head.rev, sorted(h for h, _ in adds), sorted(removes)))
                super().commit(head, adds, removes)

        store = BackgroundSqliteStore(self.path, writer_factory=Recorded)
        store.open()
        self.addCleanup(store.close)
        a, b, c = entry(1), entry(2), entry(3)
        store.commit(head_of(1, [a[0], b[0]]), [a, b], [])
        steps = [([c], [a[0]]), ([], [c[0]]), ([a], [b[0]]), ([b], [])]
        for rev, (adds, removes) in enumerate(steps, start=2):
            store.commit(head_of(rev, []), adds, removes)
        gate.set()
        self.assertEqual(store.count(), 2)
        # The writer takes the first commit alone or with the others; those
        # queued while it waits at the gate are written together.
        self.assertIn(len(written), (1, 2))
        self.assertEqual(written[-1][0], 5)
        self.assertEqual(dict(store.items()), dict([a, b]))
        self.assertEqual(store.head().rev, 5)

    def recorded(self, **options) -> tuple[BackgroundSqliteStore, list, threading.Event]:
        """
        An open store whose writer records each transaction as (rev, ops)
        and sets the returned event after each.
        """
        written: list[tuple[int, int]] = []
        wrote = threading.Event()

        class Recorded(SqliteStore):
            def commit(self, head, adds, removes) -> None:
                super().commit(head, adds, removes)
                written.append((head.rev, len(adds) + len(removes)))
                wrote.set()

        store = BackgroundSqliteStore(self.path, writer_factory=Recorded, **options)
        store.open()
        self.addCleanup(store.close)
        return store, written, wrote

    def without_waiting(self, store: BackgroundSqliteStore, call) -> None:
        """
        Call C{call}, which must not wait for the writer's gathering: if it
        is still waiting after 30 s, a commit of 1,000 ops ends the
        gathering (so the test does not hang) and the test fails.
        """
        fired = threading.Event()

        def end_gathering() -> None:
            fired.set()
            store.commit(head_of(99, []), entries(*range(1000, 2000)), [])

        guard = threading.Timer(30, end_gathering)
        guard.start()
        try:
            call()
        finally:
            guard.cancel()
        self.assertFalse(fired.is_set(), f"{call} waited for the gathering")

    def test_gathers_ops_into_one_transaction(self) -> None:
        """
        The writer gathers commits until they hold gather_ops ops, and
        writes them as one transaction.
        """
        store, written, wrote = self.recorded(gather_ops=3, gather_delay=3600, gather_idle=3600)
        store.commit(head_of(1, []), entries(1), [])
        store.commit(head_of(2, []), entries(2), [])
        # Two ops of three: nothing is written however long the writer runs.
        self.assertFalse(wrote.wait(0.2))
        self.assertEqual(written, [])
        store.commit(head_of(3, []), entries(3), [])
        self.assertTrue(wrote.wait(30))
        self.assertEqual(written, [(3, 3)])

    def test_gathers_for_gather_delay_at_most(self) -> None:
        """
        A commit alone is written once it has waited gather_delay seconds,
        without a read that asks for it.
        """
        store, written, wrote = self.recorded(gather_ops=1000, gather_delay=0.01,
                                              gather_idle=3600)
        store.commit(head_of(1, []), entries(1, 2), [])
        self.assertTrue(wrote.wait(30))
        self.assertEqual(written, [(1, 2)])

    def test_gathers_while_commits_keep_coming(self) -> None:
        """
        A commit that no other follows within gather_idle seconds is
        written without waiting for gather_delay.
        """
        store, written, wrote = self.recorded(gather_ops=1000, gather_delay=3600,
                                              gather_idle=0.01)
        store.commit(head_of(1, []), entries(1, 2), [])
        self.assertTrue(wrote.wait(30))
        self.assertEqual(written, [(1, 2)])

    def test_reads_of_the_file_and_close_do_not_wait_for_the_gathering(self) -> None:
        """
        count() (which reads the file) makes the writer write what it
        gathered at once, and so does close().
        """
        store, written, _ = self.recorded(gather_ops=1000, gather_delay=3600, gather_idle=3600)
        store.commit(head_of(1, []), entries(1, 2), [])
        counted: list[int] = []
        self.without_waiting(store, lambda: counted.append(store.count()))
        self.assertEqual(counted, [2])
        self.assertEqual(written, [(1, 2)])
        store.commit(head_of(2, []), entries(3), [])
        self.without_waiting(store, store.close)
        self.assertEqual(written, [(1, 2), (2, 1)])

    def test_failed_write_is_reported_and_later_commits_refused(self) -> None:
        class FullDisk(SqliteStore):
            def commit(self, head, adds, removes) -> None:
                if head.rev >= 2:
                    raise StoreError(self.path, "writing failed: database or disk is full")
                super().commit(head, adds, removes)

        store = BackgroundSqliteStore(self.path, writer_factory=FullDisk)
        store.open()
        self.addCleanup(store.close)
        self.commit(store, 1, entries(1))
        self.commit(store, 2, entries(2))
        store.count()  # waits for the writer
        with self.assertRaises(StoreError) as e:
            self.commit(store, 3, entries(3))
        self.assertIn("disk is full", str(e.exception))
        # What was committed is still readable, from memory.
        self.assertEqual(store.get(entry(2)[0]), entry(2)[1])
        self.assertEqual(store.head().rev, 2)
